//! Node-local clients: processes in the node's own network namespace (where meshd runs) connect
//! to service addresses and are balanced by meshd's cgroup socket hooks at connect()/sendmsg()
//! time. The backends' identities (bytes that crossed the network) tell where each connection
//! landed; getpeername()/recvmsg() must still show the service address; meshd's own counters
//! must count the connections and no per-packet work; and sockets of any other namespace (also
//! one served by another meshd with the same VIP) must be left alone.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    http::{get_once, http_server},
    meshd::{meshctl, reason_counts, Meshd},
    netns::{unique_prefix, Netns},
    rules::{echo_split, meshd_args, service_entry, RulesDir, ECHO_SUBSETS, VIP_V4, VIP_V6},
    servers::{tcp_connect, tcp_echo, tcp_server, udp_server},
    split::assert_shares,
    topology::{backend_v4, backend_v6, Topology},
    traffic::{start_backends, vip, EchoSetup},
};

/// Connections (TCP) or flows (UDP) per split check.
const SAMPLES: usize = 2000;

/// Runs `probe` `count` times in `ns` (with the attempt number); who answered, by identity.
fn tally(
    ns: &Netns,
    count: usize,
    probe: impl Fn(usize) -> Result<String> + Send + 'static,
) -> Result<BTreeMap<String, usize>> {
    ns.run(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for n in 0..count {
            *seen.entry(probe(n)?).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

/// `count` TCP connections from `ns`; each one's getpeername() must be `target`.
fn tcp_split_showing(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    tally(ns, count, move |n| {
        let (stream, identity) = tcp_connect(target)?;
        let peer = stream.peer_addr()?;
        ensure!(
            peer == target,
            "connection {n}: getpeername shows {peer}, not {target}"
        );
        Ok(identity)
    })
}

/// `count` UDP flows from `ns` (a fresh unconnected socket each); every answer must come from
/// `target` as recvmsg() shows it.
fn udp_split_showing(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    tally(ns, count, move |n| {
        let socket = UdpSocket::bind(any(target))?;
        let (identity, from) = ask(&socket, target)?;
        ensure!(
            from == target,
            "flow {n}: the answer came from {from}, not {target}"
        );
        Ok(identity)
    })
}

/// The wildcard address of `target`'s family.
fn any(target: SocketAddr) -> SocketAddr {
    if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    }
}

/// One datagram on `socket` to `target` (retried a little: the first may wait for a
/// neighbour); the identity that answered and where recvmsg() says it came from.
fn ask(socket: &UdpSocket, target: SocketAddr) -> Result<(String, SocketAddr)> {
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 512];
    for _ in 0..4 {
        socket.send_to(b"who", target)?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            return Ok((String::from_utf8_lossy(&buf[..n]).to_string(), from));
        }
    }
    anyhow::bail!("no UDP answer from {target}")
}

/// `meshctl stats -o json`.
fn stats(socket: &str) -> Result<serde_json::Value> {
    let (ok, out, err) = meshctl(socket, &["stats", "-o", "json"])?;
    ensure!(ok, "meshctl stats: {err}");
    Ok(serde_json::from_str(&out)?)
}

/// Per version, the connections meshd counted for the service at `port`.
fn counted_connections(stats: &serde_json::Value, port: u16) -> Result<BTreeMap<String, usize>> {
    let service = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["address"]["port"] == port))
        .with_context(|| format!("service at port {port} in {stats}"))?;
    let mut out = BTreeMap::new();
    for backend in service["backends"].as_array().context("backends")? {
        let n = backend["counters"]["connections"].as_u64().unwrap_or(0) as usize;
        if n > 0 {
            out.insert(backend["version"].as_str().unwrap_or("?").to_string(), n);
        }
    }
    Ok(out)
}

/// The echo service (TCP 8080, UDP 8081) at the IPv6 VIP, split 70/20/10, written to `rules`.
fn write_echo6(rules: &RulesDir) -> Result<()> {
    let endpoints: Vec<(usize, IpAddr)> = (1..=3).map(|i| (i, backend_v6(i))).collect();
    rules.write(
        "echo6.yaml",
        &service_entry(
            "v1",
            "echo6",
            VIP_V6,
            &[
                "{number: 8080, name: tcp-echo, protocol: TCP}",
                "{number: 8081, name: udp-echo, protocol: UDP}",
            ],
            &endpoints,
        ),
    )?;
    let rename = |yaml: &str| {
        yaml.replace("echo.mesh.test", "echo6.mesh.test")
            .replace("name: echo\n", "name: echo6\n")
    };
    rules.write("dr6.yaml", &rename(ECHO_SUBSETS))?;
    rules.write("vs6.yaml", &rename(&echo_split([70, 20, 10])))
}

/// TCP and UDP from the node to `vip` (port 8080 TCP, 8081 UDP): the split holds, the peer
/// address shown is the VIP, and meshd counted exactly the connections the clients saw.
fn node_split(setup: &EchoSetup, ip: IpAddr) -> Result<()> {
    let node = &setup.topo.node;
    let weights = [("v1", 0.7), ("v2", 0.2), ("v3", 0.1)];
    let tcp = tcp_split_showing(node, SocketAddr::new(ip, 8080), SAMPLES)?;
    assert_shares(&tcp, &weights).context("TCP from the node")?;
    let udp = udp_split_showing(node, SocketAddr::new(ip, 8081), SAMPLES)?;
    assert_shares(&udp, &weights).context("UDP from the node")?;

    // Every TCP connection and every UDP socket's flow is one connection in meshd's counters,
    // on the backend that answered it.
    let stats: Vec<serde_json::Value> = stats(&setup.rules.socket())?["services"]
        .as_array()
        .context("services")?
        .iter()
        .filter(|s| s["address"]["ip"] == ip.to_string())
        .cloned()
        .collect();
    let stats = serde_json::json!({ "services": stats });
    ensure!(
        counted_connections(&stats, 8080)? == tcp,
        "TCP: meshd counted {:?}, the clients saw {tcp:?}",
        counted_connections(&stats, 8080)?
    );
    ensure!(
        counted_connections(&stats, 8081)? == udp,
        "UDP: meshd counted {:?}, the clients saw {udp:?}",
        counted_connections(&stats, 8081)?
    );
    Ok(())
}

#[test]
fn node_clients_ipv4_tcp_and_udp_follow_weights_70_20_10_and_see_the_vip() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    node_split(&setup, VIP_V4.parse()?)?;

    let (ok, status, err) = meshctl(&rules.socket(), &["status"])?;
    ensure!(ok, "{err}");
    ensure!(
        status.contains("socket hooks: connect4, connect6, sendmsg4, sendmsg6, recvmsg4")
            && status.contains("cgroup2 /")
            && status.contains("connect_balanced"),
        "meshctl status does not show the socket hooks:\n{status}"
    );
    let metrics = topo
        .node
        .exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let connects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_socket_hook_calls_total{outcome=\"connect_balanced\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    ensure!(
        connects == Some(SAMPLES as u64),
        "connect_balanced in /metrics: {connects:?}\n{metrics}"
    );
    Ok(())
}

#[test]
fn node_clients_ipv6_tcp_and_udp_follow_weights_70_20_10_and_see_the_vip() -> Result<()> {
    let setup = EchoSetup::new(None)?;
    let _v6 = start_backends(&setup.topo, true)?;
    write_echo6(&setup.rules)?;
    let _meshd = Meshd::start(&setup.topo.node, &meshd_args(&setup.topo, &setup.rules))?;
    node_split(&setup, VIP_V6.parse()?)
}

#[test]
fn a_udp_socket_keeps_its_backend_and_connected_udp_shows_the_vip() -> Result<()> {
    let setup = EchoSetup::new(Some([100, 0, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let mut meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let target = vip(8081);

    // One unconnected socket, opened while v1 takes everything.
    let socket = topo.node.run(move || UdpSocket::bind(any(target)))??;
    let socket2 = socket.try_clone()?;
    let (first, from) = ask(&socket, target)?;
    ensure!(
        first == "v1" && from == target,
        "first answer: {first} from {from}"
    );

    rules.write("vs.yaml", &echo_split([0, 0, 100]))?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "{}",
        meshd.log()
    );
    // The socket's flow stays where it was; new sockets follow the new weights.
    for n in 0..50 {
        let (identity, from) = ask(&socket2, target)?;
        ensure!(
            identity == "v1" && from == target,
            "datagram {n} of the old flow: {identity} from {from}"
        );
    }
    let fresh = udp_split_showing(&topo.node, target, 50)?;
    ensure!(fresh.get("v3") == Some(&50), "new flows: {fresh:?}");

    // A connected UDP socket: connect() chooses, getpeername() shows the VIP, send/recv work.
    let (peer, identity) = topo.node.run(move || -> Result<(SocketAddr, String)> {
        let socket = UdpSocket::bind(any(target))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            socket.send(b"who")?;
            if let Ok(n) = socket.recv(&mut buf) {
                return Ok((
                    socket.peer_addr()?,
                    String::from_utf8_lossy(&buf[..n]).to_string(),
                ));
            }
        }
        anyhow::bail!("no answer on the connected UDP socket")
    })??;
    ensure!(
        peer == target && identity == "v3",
        "connected UDP: peer {peer}, answered by {identity}"
    );
    Ok(())
}

#[test]
fn data_of_a_node_local_connection_costs_no_per_packet_work() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;

    let identity = topo.node.run(|| -> Result<String> {
        let (mut stream, identity) = tcp_connect(vip(8080))?;
        let payload = vec![0x5a_u8; 1024];
        for _ in 0..200 {
            tcp_echo(&mut stream, &payload)?;
        }
        Ok(identity)
    })??;

    let stats = stats(&rules.socket())?;
    let service = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["address"]["port"] == 8080))
        .context("service 8080")?;
    let totals = &service["totals"];
    // One connection counted, on the backend that answered; not one packet translated.
    ensure!(totals["connections"] == 1, "connections: {totals}");
    ensure!(
        totals["packets"] == 0 && totals["reply_packets"] == 0 && totals["bytes"] == 0,
        "the packet path translated packets of a node-local connection: {totals}"
    );
    ensure!(
        counted_connections(&stats, 8080)? == BTreeMap::from([(identity.clone(), 1)]),
        "backend counters: {service}"
    );
    let reasons = reason_counts(&rules.socket())?;
    for forwarded in [
        "forward_tx",
        "forward_redirect",
        "forward_redirect_neigh",
        "forward_redirect_peer",
        "pass_no_neighbour",
        "pass_fib_other",
    ] {
        ensure!(
            reasons.get(forwarded).copied().unwrap_or(0) == 0,
            "{forwarded} moved: {reasons:?}"
        );
    }
    Ok(())
}

/// HTTP service `web` at VIP:80 on backends 1 and 2 (port 8080), subsets v1/v2, and the
/// VirtualService `http` routes.
fn web_rules(http: &str) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.mesh.test]
  addresses: [{VIP_V4}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  resolution: STATIC
  endpoints:
"
    );
    for i in 1..=2 {
        yaml.push_str(&format!(
            "  - {{address: {}, labels: {{version: v{i}}}}}\n",
            backend_v4(i)
        ));
    }
    yaml.push_str(&format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web.mesh.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web.mesh.test]
  http:
{http}"
    ));
    yaml
}

#[test]
fn a_service_moved_to_the_l7_proxy_is_still_reached_from_the_node() -> Result<()> {
    let topo = Topology::build(2)?;
    let _servers = (1..=2)
        .map(|i| {
            http_server(
                &topo.backends[i - 1],
                SocketAddr::new(backend_v4(i), 8080),
                &format!("v{i}"),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let rules = RulesDir::new(&topo)?;
    let split = "  - route:
    - {destination: {host: web.mesh.test, subset: v1}, weight: 50}
    - {destination: {host: web.mesh.test, subset: v2}, weight: 50}
";
    rules.write("web.yaml", &web_rules(split))?;
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let target = SocketAddr::new(VIP_V4.parse()?, 80);
    let probe = |topo: &Topology| -> Result<BTreeMap<String, usize>> {
        topo.node.run(move || -> Result<BTreeMap<String, usize>> {
            let mut seen = BTreeMap::new();
            for n in 0..40 {
                let reply = get_once(target, "/node", "web.mesh.test", &[("end-user", "jason")])
                    .with_context(|| format!("request {n} from the node"))?;
                ensure!(reply.status == 200, "request {n}: status {}", reply.status);
                *seen.entry(reply.identity().to_string()).or_insert(0) += 1;
            }
            Ok(seen)
        })?
    };
    // Kernel path: balanced by the socket hooks, per connection.
    let kernel = probe(&topo)?;
    ensure!(
        kernel.len() == 2,
        "the kernel path should split jason's connections: {kernel:?}"
    );

    // Now a header route: only the proxy can do it. The node reaches the proxy on the VIP.
    let l7 = "  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web.mesh.test, subset: v2}}]
  - route: [{destination: {host: web.mesh.test, subset: v1}}]
";
    rules.write("web.yaml", &web_rules(l7))?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "{}",
        meshd.log()
    );
    let proxied = probe(&topo)?;
    ensure!(
        proxied == BTreeMap::from([("v2".to_string(), 40)]),
        "through the proxy jason always reaches v2: {proxied:?}"
    );
    let (_, status, _) = meshctl(&rules.socket(), &["status"])?;
    ensure!(
        status.contains("l7_proxy"),
        "no l7_proxy count in:\n{status}"
    );
    Ok(())
}

/// A namespace of its own with `VIP_V4` on its loopback and identity servers `local` on it.
struct LocalVip {
    _servers: Vec<mesh_tests::servers::Server>,
    ns: Netns,
}

impl LocalVip {
    fn new() -> Result<Self> {
        let ns = Netns::create(&format!("{}-other", unique_prefix()))?;
        ns.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
        let servers = vec![
            tcp_server(&ns, vip(8080), "local")?,
            udp_server(&ns, vip(8081), "local")?,
        ];
        Ok(Self {
            _servers: servers,
            ns,
        })
    }
}

#[test]
fn sockets_of_other_namespaces_are_left_alone() -> Result<()> {
    // Two nodes with the same VIP and opposite weights, each with its own meshd, plus a third
    // namespace that serves the VIP itself.
    let a = EchoSetup::new(Some([100, 0, 0]))?;
    let b = EchoSetup::new(Some([0, 0, 100]))?;
    let _meshd_a = Meshd::start(&a.topo.node, &meshd_args(&a.topo, &a.rules))?;
    let _meshd_b = Meshd::start(&b.topo.node, &meshd_args(&b.topo, &b.rules))?;
    let other = LocalVip::new()?;

    let on_a = tcp_split_showing(&a.topo.node, vip(8080), 100)?;
    let on_b = tcp_split_showing(&b.topo.node, vip(8080), 100)?;
    ensure!(on_a.get("v1") == Some(&100), "node A: {on_a:?}");
    ensure!(on_b.get("v3") == Some(&100), "node B: {on_b:?}");
    let udp_a = udp_split_showing(&a.topo.node, vip(8081), 50)?;
    let udp_b = udp_split_showing(&b.topo.node, vip(8081), 50)?;
    ensure!(udp_a.get("v1") == Some(&50), "node A UDP: {udp_a:?}");
    ensure!(udp_b.get("v3") == Some(&50), "node B UDP: {udp_b:?}");

    // Neither meshd touches the third namespace: its connections reach its own VIP.
    let local_tcp = tcp_split_showing(&other.ns, vip(8080), 50)?;
    let local_udp = udp_split_showing(&other.ns, vip(8081), 50)?;
    ensure!(
        local_tcp.get("local") == Some(&50),
        "other namespace TCP: {local_tcp:?}"
    );
    ensure!(
        local_udp.get("local") == Some(&50),
        "other namespace UDP: {local_udp:?}"
    );
    // Each meshd counted only its own node's connections.
    for (setup, name) in [(&a, "A"), (&b, "B")] {
        let counted: usize = counted_connections(&stats(&setup.rules.socket())?, 8080)?
            .values()
            .sum();
        ensure!(
            counted == 100,
            "meshd on node {name} counted {counted} TCP connections"
        );
    }
    Ok(())
}

/// A bpffs pin directory for one test; `meshd --cleanup` and removal on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(meshd) = mesh_tests::meshd::bin("meshd") {
            let _ = std::process::Command::new(meshd)
                .args(["--cleanup", "--pin-dir"])
                .arg(&self.0)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pinned_socket_hooks_outlive_meshd_are_taken_over_and_cleanup_detaches_them() -> Result<()> {
    let setup = EchoSetup::new(Some([0, 100, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let pins = PinDir(format!("/sys/fs/bpf/{}", topo.prefix).into());
    let mut args: Vec<String> = meshd_args(topo, rules)
        .into_iter()
        .filter(|a| a != "--no-pin")
        .collect();
    args.extend(["--pin-dir".into(), pins.0.display().to_string()]);
    let all_v2 = |when: &str| -> Result<()> {
        let seen = tcp_split_showing(&topo.node, vip(8080), 20)?;
        ensure!(seen.get("v2") == Some(&20), "{when}: {seen:?}");
        Ok(())
    };

    let meshd = Meshd::start(&topo.node, &args)?;
    all_v2("meshd running")?;
    // A connection opened now must still show the VIP as its peer after the restart.
    let (mut before, _) = topo.node.run(|| tcp_connect(vip(8080)))??;
    ensure!(meshd.stop()?.success(), "meshd exit status");
    all_v2("meshd stopped, hooks pinned")?;

    let mut meshd = Meshd::start(&topo.node, &args)?;
    meshd
        .wait_for_log("replaced the socket hook link", 0, Duration::from_secs(1))
        .context("the restarted meshd did not take over the pinned socket hooks")?;
    all_v2("meshd restarted")?;
    ensure!(
        before.peer_addr()? == vip(8080),
        "getpeername after the restart: {}",
        before.peer_addr()?
    );
    tcp_echo(&mut before, b"across the restart")?;
    ensure!(meshd.stop()?.success(), "meshd exit status");

    let out = std::process::Command::new(mesh_tests::meshd::bin("meshd")?)
        .args(["--cleanup", "--pin-dir"])
        .arg(&pins.0)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !pins.0.join("sock").exists(),
        "socket hook pins left behind"
    );
    // Detached: nothing rewrites the VIP any more, and the node has no route to it. The kernel
    // releases an unpinned link from a work queue, so give it a moment (bounded).
    let detached = topo.node.run(|| {
        (0..50).any(|_| {
            let refused =
                std::net::TcpStream::connect_timeout(&vip(8080), Duration::from_secs(1)).is_err();
            if !refused {
                std::thread::sleep(Duration::from_millis(100));
            }
            refused
        })
    })?;
    ensure!(detached, "the VIP is still reached 5 s after --cleanup");
    Ok(())
}

#[test]
fn dual_stack_sockets_reach_ipv4_vips_through_mapped_addresses() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    // An IPv6 socket connecting to `::ffff:198.18.100.1` (as Java and many dual-stack programs
    // do for IPv4 peers): balanced like IPv4, and the peer shown in the mapped form it asked for.
    let v4: std::net::Ipv4Addr = VIP_V4.parse()?;
    let mapped = |port| SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
    let weights = [("v1", 0.7), ("v2", 0.2), ("v3", 0.1)];
    let tcp = tcp_split_showing(&topo.node, mapped(8080), 1000)?;
    assert_shares(&tcp, &weights).context("TCP on IPv6 sockets")?;
    let udp = udp_split_showing(&topo.node, mapped(8081), 1000)?;
    assert_shares(&udp, &weights).context("UDP on IPv6 sockets")
}

#[test]
fn no_socket_lb_leaves_node_local_sockets_alone() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let mut args = meshd_args(topo, rules);
    args.push("--no-socket-lb".into());
    let _meshd = Meshd::start(&topo.node, &args)?;
    // Without the hooks the node has no route to the VIP: the connect fails.
    let reached = topo
        .node
        .run(|| std::net::TcpStream::connect_timeout(&vip(8080), Duration::from_secs(1)).is_ok())?;
    ensure!(
        !reached,
        "the VIP was reached from the node with --no-socket-lb"
    );
    let (ok, status, err) = meshctl(&rules.socket(), &["status"])?;
    ensure!(ok, "{err}");
    ensure!(
        status.contains("socket hooks: off"),
        "meshctl status:\n{status}"
    );
    // The packet path is untouched: the client namespace still reaches the service.
    let seen = tcp_split_showing(&topo.client, vip(8080), 20)?;
    ensure!(seen.values().sum::<usize>() == 20, "{seen:?}");
    Ok(())
}
