//! End-to-end L4 forwarding: real sockets in a client namespace talk to service addresses, meshd's
//! XDP program on the node sends each connection to one backend namespace, and the backends'
//! own identities (bytes that crossed the data plane) tell where every connection landed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    meshd::Meshd,
    netns::Netns,
    servers::{tcp_connect, tcp_echo, tcp_server, udp_ask, udp_server, Server},
    topology::{backend_v4, backend_v6, Topology, NODE_V4},
};

const VIP_V4: &str = "198.18.100.1";
const VIP_V6: &str = "2001:db8:100::1";

/// A directory of rules for one test, removed on drop.
struct RulesDir(PathBuf);

impl RulesDir {
    fn new(topo: &Topology) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-rules", topo.prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(RulesDir(dir))
    }

    /// Writes atomically (temp file + rename): meshd watches the directory and must never
    /// see a half-written file.
    fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {file}"))?;
        std::fs::rename(&tmp, self.0.join(file)).with_context(|| format!("renaming {file}"))
    }

    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for RulesDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn meshd_args(topo: &Topology, rules: &RulesDir) -> Vec<String> {
    let mut args = Vec::new();
    for interface in topo.node_interfaces() {
        args.push("--iface".into());
        args.push(interface);
    }
    args.extend([
        "--config".into(),
        rules.path(),
        "--no-pin".into(),
        "--no-state".into(),
        "--socket".into(),
        format!("{}/meshd.sock", rules.path()),
    ]);
    args
}

/// The `echo` service: VIP 198.18.100.1, TCP 8080 and UDP 8081, three backends v1..v3.
fn echo_service_entry(endpoints: &[usize]) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: echo
spec:
  hosts: [echo.mesh.test]
  addresses: [{VIP_V4}]
  ports:
  - {{number: 8080, name: tcp-echo, protocol: TCP}}
  - {{number: 8081, name: udp-echo, protocol: UDP}}
  resolution: STATIC
  endpoints:
"
    );
    for i in endpoints {
        yaml.push_str(&format!(
            "  - {{address: {}, labels: {{version: v{i}}}}}\n",
            backend_v4(*i)
        ));
    }
    yaml
}

const ECHO_SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: echo
spec:
  host: echo.mesh.test
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// A VirtualService splitting both ports of `echo` across v1/v2/v3 by `weights`.
fn echo_split(weights: [u32; 3]) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts: [echo.mesh.test]
  tcp:
",
    );
    for port in [8080, 8081] {
        yaml.push_str(&format!("  - match: [{{port: {port}}}]\n    route:\n"));
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "    - destination: {{host: echo.mesh.test, subset: v{}, port: {{number: {port}}}}}\n      weight: {w}\n",
                i + 1
            ));
        }
    }
    yaml
}

/// TCP and UDP identity servers on every backend (identities `v1`, `v2`, ...).
fn start_backends(topo: &Topology, v6: bool) -> Result<Vec<Server>> {
    let mut servers = Vec::new();
    for (index, ns) in topo.backends.iter().enumerate() {
        let i = index + 1;
        let ip = if v6 { backend_v6(i) } else { backend_v4(i) };
        servers.push(tcp_server(ns, SocketAddr::new(ip, 8080), &format!("v{i}"))?);
        servers.push(udp_server(ns, SocketAddr::new(ip, 8081), &format!("v{i}"))?);
        servers.push(tcp_server(ns, SocketAddr::new(ip, 9000), &format!("v{i}"))?);
    }
    Ok(servers)
}

/// Opens `count` TCP connections from the client, one after another; counts who answered.
fn tcp_split(client: &Netns, target: SocketAddr, count: usize) -> Result<BTreeMap<String, usize>> {
    client.run(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for _ in 0..count {
            let (_stream, identity) = tcp_connect(target)?;
            *seen.entry(identity).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

/// Sends `count` UDP flows (fresh source port each); counts who answered.
fn udp_split(client: &Netns, target: SocketAddr, count: usize) -> Result<BTreeMap<String, usize>> {
    client.run(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for _ in 0..count {
            *seen.entry(udp_ask(target)?).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

fn assert_shares(seen: &BTreeMap<String, usize>, expected: &[(&str, f64)], tolerance: f64) -> Result<()> {
    let total: usize = seen.values().sum();
    for (identity, count) in seen {
        ensure!(
            expected.iter().any(|(e, _)| e == identity),
            "connections reached unexpected backend {identity}: {seen:?}"
        );
        let _ = count;
    }
    for (identity, share) in expected {
        let got = *seen.get(*identity).unwrap_or(&0) as f64 / total as f64;
        ensure!(
            (got - share).abs() <= tolerance,
            "{identity}: observed share {:.3}, configured {share:.3} (tolerance {tolerance}); all: {seen:?}",
            got
        );
    }
    Ok(())
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().expect("ip"), port)
}

#[test]
fn tcp_connections_follow_weights_70_20_10() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    rules.write("dr.yaml", ECHO_SUBSETS)?;
    rules.write("vs.yaml", &echo_split([70, 20, 10]))?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;

    let seen = tcp_split(&topo.client, vip(8080), 2000)?;
    assert_eq!(seen.values().sum::<usize>(), 2000);
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)], 0.03)
}

#[test]
fn established_connections_keep_their_backend_when_weights_change() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    rules.write("dr.yaml", ECHO_SUBSETS)?;
    rules.write("vs.yaml", &echo_split([100, 0, 0]))?;
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;

    // 50 long-lived connections, all on v1.
    let mut streams = topo.client.run(|| -> Result<Vec<_>> {
        (0..50).map(|_| tcp_connect(vip(8080))).collect()
    })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");

    rules.write("vs.yaml", &echo_split([0, 100, 0]))?;
    let outcome = meshd.reload()?;
    ensure!(outcome.contains("rules reloaded"), "reload failed: {outcome}");

    // Every old connection still talks to v1 (its echo comes back through the same backend).
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("old connection {n} still alive").as_bytes())
            .with_context(|| format!("old connection {n}"))?;
    }
    // All new connections go to v2.
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(seen.len() == 1 && seen.get("v2") == Some(&200), "new connections: {seen:?}");
    // And the old ones still work after new traffic went elsewhere.
    for (stream, _) in streams.iter_mut() {
        tcp_echo(stream, b"still here")?;
    }
    Ok(())
}

#[test]
fn udp_flows_follow_weights_70_20_10() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    rules.write("dr.yaml", ECHO_SUBSETS)?;
    rules.write("vs.yaml", &echo_split([70, 20, 10]))?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;

    let seen = udp_split(&topo.client, vip(8081), 2000)?;
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)], 0.03)
}

#[test]
fn removed_backend_gets_no_new_connections() -> Result<()> {
    let topo = Topology::build(3)?;
    let servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    // No VirtualService: the endpoints share equally.
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let before = tcp_split(&topo.client, vip(8080), 300)?;
    ensure!(before.get("v3").copied().unwrap_or(0) > 50, "v3 should serve before removal: {before:?}");

    rules.write("echo.yaml", &echo_service_entry(&[1, 2]))?;
    ensure!(meshd.reload()?.contains("rules reloaded"));
    let v3_tcp_before = servers[6].served();
    let after = tcp_split(&topo.client, vip(8080), 600)?;
    ensure!(!after.contains_key("v3"), "v3 got new connections after removal: {after:?}");
    ensure!(servers[6].served() == v3_tcp_before, "v3 accepted connections after removal");
    assert_shares(&after, &[("v1", 0.5), ("v2", 0.5)], 0.06)
}

#[test]
fn ipv6_vip_splits_70_20_10() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, true)?;
    let rules = RulesDir::new(&topo)?;
    let mut se = format!(
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: echo6
spec:
  hosts: [echo6.mesh.test]
  addresses: [\"{VIP_V6}\"]
  ports:
  - {{number: 8080, name: tcp-echo, protocol: TCP}}
  resolution: STATIC
  endpoints:
"
    );
    for i in 1..=3 {
        se.push_str(&format!("  - {{address: \"{}\", labels: {{version: v{i}}}}}\n", backend_v6(i)));
    }
    rules.write("echo6.yaml", &se)?;
    rules.write(
        "dr.yaml",
        &ECHO_SUBSETS.replace("echo.mesh.test", "echo6.mesh.test").replace("name: echo\n", "name: echo6\n"),
    )?;
    rules.write(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: echo6
spec:
  hosts: [echo6.mesh.test]
  tcp:
  - route:
    - {destination: {host: echo6.mesh.test, subset: v1}, weight: 70}
    - {destination: {host: echo6.mesh.test, subset: v2}, weight: 20}
    - {destination: {host: echo6.mesh.test, subset: v3}, weight: 10}
",
    )?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let target = SocketAddr::new(VIP_V6.parse::<IpAddr>()?, 8080);
    let seen = tcp_split(&topo.client, target, 2000)?;
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)], 0.03)
}

#[test]
fn istio_tcp_echo_task_through_the_gateway() -> Result<()> {
    let topo = Topology::build(2)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/tcp-echo");
    // Istio's own YAML for the task, plus the ServiceEntry that stands in for the Kubernetes
    // Service and its pods.
    for file in ["serviceentry.yaml", "tcp-echo-all-v1.yaml"] {
        rules.write(file, &std::fs::read_to_string(repo.join(file)).with_context(|| format!("config/tcp-echo/{file}"))?)?;
    }
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let gateway = SocketAddr::new(NODE_V4.parse::<IpAddr>()?, 31400);

    let all_v1 = tcp_split(&topo.client, gateway, 200)?;
    ensure!(all_v1.len() == 1 && all_v1.get("v1") == Some(&200), "100% v1 step: {all_v1:?}");

    // Like `kubectl apply -f tcp-echo-20-v2.yaml`: the task's second file replaces the
    // VirtualService; the Gateway and DestinationRule of the first file stay.
    let first = std::fs::read_to_string(repo.join("tcp-echo-all-v1.yaml"))?;
    let kept: Vec<&str> = first
        .split("\n---")
        .filter(|doc| !doc.contains("kind: VirtualService"))
        .collect();
    rules.write("tcp-echo-all-v1.yaml", &kept.join("\n---"))?;
    rules.write(
        "tcp-echo-20-v2.yaml",
        &std::fs::read_to_string(repo.join("tcp-echo-20-v2.yaml"))
            .context("config/tcp-echo/tcp-echo-20-v2.yaml")?,
    )?;
    ensure!(meshd.reload()?.contains("rules reloaded"), "reload:\n{}", meshd.log());
    let shifted = tcp_split(&topo.client, gateway, 1000)?;
    assert_shares(&shifted, &[("v1", 0.8), ("v2", 0.2)], 0.04)?;
    // Bounded wait so stray late packets cannot hang the test.
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
