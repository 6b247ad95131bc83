//! The kernel path on a container host with default settings: pods behind veths in Docker's
//! bridge style and in Calico's routed style, a client outside behind the uplink, meshd choosing
//! its hooks by itself (TC on every veth). Real sockets; the backends' identities say where each
//! connection landed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    container_host::{ContainerHost, Pod, UPLINK_V4},
    meshd::{reason_counts, status_json, Meshd},
    netns::Netns,
    rules::{meshd_args_for, service_entry, RulesDir, ECHO_SUBSETS},
    servers::{tcp_connect, tcp_echo, tcp_server, udp_server, Server},
    split::assert_shares,
    traffic::{tcp_split, udp_split},
};

const VIP4: &str = "198.18.100.1";
const VIP6: &str = "2001:db8:100::1";
/// Client pods are a1 (bridged) and b3 (routed); backends v1 = a2 (bridged), v2 = b1 and
/// v3 = b2 (routed).
const CLIENT_BRIDGED: usize = 0;
const CLIENT_ROUTED: usize = 4;
const BACKENDS: [(usize, &str); 3] = [(1, "v1"), (2, "v2"), (3, "v3")];

struct Lab {
    _servers: Vec<Server>,
    _meshd: Meshd,
    rules: RulesDir,
    host: ContainerHost,
}

impl Lab {
    /// Two bridged and three routed pods, echo servers on the backends, `echo` (v4) and
    /// `echo6` split by `weights`, and a Gateway on the uplink at 31400 with the same split.
    fn start(weights: [u32; 3]) -> Result<Lab> {
        let host = ContainerHost::build(2, 3)?;
        let mut servers = Vec::new();
        for (pod, identity) in BACKENDS {
            let pod = &host.pods[pod];
            for ip in [pod.v4, pod.v6] {
                servers.push(tcp_server(&pod.ns, SocketAddr::new(ip, 8080), identity)?);
                servers.push(udp_server(&pod.ns, SocketAddr::new(ip, 8081), identity)?);
            }
        }
        let rules = RulesDir::for_prefix(&host.prefix)?;
        for (name, vip, family) in [("echo", VIP4, 4), ("echo6", VIP6, 6)] {
            let endpoints: Vec<(usize, IpAddr)> = BACKENDS
                .iter()
                .enumerate()
                .map(|(i, (pod, _))| {
                    let pod = &host.pods[*pod];
                    (i + 1, if family == 4 { pod.v4 } else { pod.v6 })
                })
                .collect();
            rules.write(
                &format!("{name}.yaml"),
                &service_entry(
                    "v1",
                    name,
                    vip,
                    &[
                        "{number: 8080, name: tcp-echo, protocol: TCP}",
                        "{number: 8081, name: udp-echo, protocol: UDP}",
                    ],
                    &endpoints,
                ),
            )?;
        }
        rules.write("dr.yaml", ECHO_SUBSETS)?;
        rules.write("dr6.yaml", &ECHO_SUBSETS.replace("echo", "echo6"))?;
        rules.write("vs.yaml", &split("echo", weights))?;
        rules.write("vs6.yaml", &split("echo6", weights))?;
        rules.write("gateway.yaml", &gateway(weights))?;
        let meshd = Meshd::start(&host.node, &meshd_args_for(host.node_interfaces(), &rules))?;
        Ok(Lab {
            _servers: servers,
            _meshd: meshd,
            rules,
            host,
        })
    }

    fn pod(&self, i: usize) -> &Pod {
        &self.host.pods[i]
    }
}

fn split(host: &str, weights: [u32; 3]) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {host}
spec:
  hosts: [{host}.mesh.test]
  tcp:
"
    );
    for port in [8080, 8081] {
        yaml.push_str(&format!("  - match: [{{port: {port}}}]\n    route:\n"));
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "    - destination: {{host: {host}.mesh.test, subset: v{}, port: {{number: {port}}}}}\n      weight: {w}\n",
                i + 1
            ));
        }
    }
    yaml
}

/// A TCP Gateway on the node's own addresses at 31400, routed like `echo` on 8080.
fn gateway(weights: [u32; 3]) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: edge
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: edge
spec:
  hosts: [\"*\"]
  gateways: [edge]
  tcp:
  - match: [{port: 31400}]
    route:
",
    );
    for (i, w) in weights.iter().enumerate() {
        yaml.push_str(&format!(
            "    - destination: {{host: echo.mesh.test, subset: v{}, port: {{number: 8080}}}}\n      weight: {w}\n",
            i + 1
        ));
    }
    yaml
}

fn vip(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("VIP"), port)
}

const SHARES: [(&str, f64); 3] = [("v1", 0.7), ("v2", 0.2), ("v3", 0.1)];

fn check(what: &str, seen: &BTreeMap<String, usize>, n: usize) -> Result<()> {
    ensure!(
        seen.values().sum::<usize>() == n,
        "{what}: {seen:?} does not add up to {n}"
    );
    assert_shares(seen, &SHARES).with_context(|| what.to_string())
}

fn client(lab: &Lab, i: usize) -> &Netns {
    &lab.pod(i).ns
}

#[test]
fn meshd_runs_tc_on_the_uplink_and_every_pod_veth() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let status = status_json(&lab.rules.socket())?;
    let interfaces = status["interfaces"].as_array().context("interfaces")?;
    let mut names: Vec<&str> = interfaces
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    names.sort_unstable();
    let mut want: Vec<String> = lab.host.node_interfaces();
    want.sort_unstable();
    ensure!(names == want, "attached to {names:?}, want {want:?}");
    // Every interface here is a veth whose peer is in another namespace (a pod's, or the
    // outside client's), so TC sends straight into it when the kernel has bpf_redirect_peer.
    let peer = status["kernel"]["redirect_peer"]
        .as_bool()
        .context("kernel")?;
    for i in interfaces {
        let hook = i["mode"].as_str().unwrap_or_default();
        ensure!(hook == "tcx" || hook == "tc-cls_bpf", "{i}");
        ensure!(i["peer_redirect"].as_bool() == Some(peer), "{i}");
    }
    Ok(())
}

#[test]
fn pods_reach_a_vip_over_tcp_with_weights_70_20_10() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    for (what, pod) in [
        ("bridged pod", CLIENT_BRIDGED),
        ("routed pod", CLIENT_ROUTED),
    ] {
        let seen = tcp_split(client(&lab, pod), vip(VIP4, 8080), 2000)?;
        check(&format!("TCP from a {what}"), &seen, 2000)?;
    }
    Ok(())
}

#[test]
fn pods_reach_a_vip_over_udp_and_ipv6() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let seen = udp_split(client(&lab, CLIENT_BRIDGED), vip(VIP4, 8081), 2000)?;
    check("UDP from a bridged pod", &seen, 2000)?;
    let seen = tcp_split(client(&lab, CLIENT_ROUTED), vip(VIP6, 8080), 2000)?;
    check("IPv6 TCP from a routed pod", &seen, 2000)?;
    let seen = udp_split(client(&lab, CLIENT_BRIDGED), vip(VIP6, 8081), 2000)?;
    check("IPv6 UDP from a bridged pod", &seen, 2000)
}

#[test]
fn gateway_ingress_from_outside_reaches_the_pods() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let gateway = SocketAddr::new(UPLINK_V4.parse()?, 31400);
    let seen = tcp_split(&lab.host.outside, gateway, 2000)?;
    check("TCP through the gateway", &seen, 2000)?;
    // The routed pods (v2, v3) sit behind /32 routes on their own veths: on kernels with
    // bpf_redirect_peer their packets went straight into the pods' namespaces; the bridged
    // one (v1) behind the bridge, with a plain redirect.
    let reasons = reason_counts(&lab.rules.socket())?;
    let status = status_json(&lab.rules.socket())?;
    let count = |r: &str| reasons.get(r).copied().unwrap_or(0);
    if status["kernel"]["redirect_peer"].as_bool() == Some(true) {
        ensure!(
            count("forward_redirect_peer") > 0 && count("forward_redirect") > 0,
            "{reasons:?}"
        );
    } else {
        ensure!(count("forward_redirect_peer") == 0, "{reasons:?}");
    }
    Ok(())
}

#[test]
fn long_lived_pod_connections_keep_their_backend_across_a_weight_change() -> Result<()> {
    let lab = Lab::start([100, 0, 0])?;
    let mut streams = client(&lab, CLIENT_BRIDGED)
        .run(|| -> Result<Vec<_>> { (0..50).map(|_| tcp_connect(vip(VIP4, 8080))).collect() })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");

    lab.rules.write("vs.yaml", &split("echo", [0, 100, 0]))?;
    let socket = lab.rules.socket();
    // The files are watched: wait (bounded) until new connections follow the new rule.
    let mut moved = false;
    for _ in 0..100 {
        let (_s, id) = client(&lab, CLIENT_BRIDGED).run(move || tcp_connect(vip(VIP4, 8080)))??;
        if id == "v2" {
            moved = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(
        moved,
        "the new weights never took effect (admin socket {socket})"
    );
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("old connection {n} still alive").as_bytes())
            .with_context(|| format!("old connection {n}"))?;
    }
    let seen = tcp_split(client(&lab, CLIENT_BRIDGED), vip(VIP4, 8080), 200)?;
    ensure!(
        seen.len() == 1 && seen.get("v2") == Some(&200),
        "new connections: {seen:?}"
    );
    Ok(())
}

/// Golden output for a `CHECKSUM_PARTIAL` skb through the TC hook. A client with TX checksum
/// offload on (the veth default) sends segments whose TCP checksum field holds only the
/// pseudo-header seed; after translation, that seed must be the one of the *new* addresses, or
/// a NIC completing the checksum later sends a corrupt segment (a veth peer would not notice:
/// it trusts partial checksums). Captured on the backend with PACKET_AUXDATA, which says whether
/// the skb is still partial.
#[test]
fn tc_rewrites_a_partial_checksum_into_the_seed_of_the_new_addresses() -> Result<()> {
    let lab = Lab::start([100, 0, 0])?;
    let backend = lab.pod(BACKENDS[0].0);
    let backend_ip = backend.v4;
    let capture = backend.ns.run(move || Capture::open("eth0"))??;
    let client_pod = client(&lab, CLIENT_ROUTED);
    let client_ip = lab.pod(CLIENT_ROUTED).v4;
    client_pod.run(move || tcp_connect(vip(VIP4, 8080)))??;

    let frame = backend.ns.run(move || capture.next_tcp_to(8080))??;
    let (partial, bytes) = frame;
    ensure!(
        partial,
        "the segment reached the backend with a complete checksum: nothing tested"
    );
    let ip = &bytes[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let (src, dst) = (&ip[12..16], &ip[16..20]);
    ensure!(
        src == octets(client_ip) && dst == octets(backend_ip),
        "addresses {src:?} -> {dst:?}"
    );
    let tcp = &ip[ihl..];
    ensure!(
        u16::from_be_bytes([tcp[2], tcp[3]]) == 8080,
        "destination port"
    );
    let tcp_len = u16::from_be_bytes([ip[2], ip[3]]) as usize - ihl;
    let mut sum: u32 = 6 + tcp_len as u32;
    for pair in src.chunks(2).chain(dst.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let seed = u16::from_be_bytes([tcp[16], tcp[17]]);
    ensure!(
        seed == sum as u16,
        "partial checksum {seed:#06x}, the seed of the translated addresses is {sum:#06x}"
    );
    Ok(())
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An AF_PACKET socket on one interface that reports whether each skb's checksum is partial.
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    fn open(interface: &str) -> Result<Capture> {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(interface)?;
        // SAFETY: plain syscalls on a socket this function owns; structs are plain data.
        unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            let rc = libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
            let one: i32 = 1;
            let rc = libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&one as *const i32).cast(),
                4,
            );
            ensure!(
                rc == 0,
                "PACKET_AUXDATA: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(Capture(owned))
        }
    }

    /// The first received IPv4 TCP segment to `port`: (checksum still partial, frame bytes).
    fn next_tcp_to(&self, port: u16) -> Result<(bool, Vec<u8>)> {
        use std::os::fd::AsRawFd;
        const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
        for _ in 0..200 {
            let mut buf = vec![0u8; 65_536];
            let mut control = [0u8; 256];
            // SAFETY: recvmsg into buffers that outlive the call; cmsgs parsed with libc's
            // macros within `control`.
            let (len, status) = unsafe {
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = control.len();
                let n = libc::recvmsg(self.0.as_raw_fd(), &mut msg, 0);
                ensure!(
                    n >= 0,
                    "no segment captured: {}",
                    std::io::Error::last_os_error()
                );
                let mut status = 0u32;
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_PACKET
                        && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                    {
                        status = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const u32);
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
                (n as usize, status)
            };
            buf.truncate(len);
            let is_tcp = len > 54 && buf[12..14] == [0x08, 0x00] && buf[23] == 6;
            if is_tcp {
                let ihl = usize::from(buf[14] & 0x0f) * 4;
                let dport = u16::from_be_bytes([buf[14 + ihl + 2], buf[14 + ihl + 3]]);
                if dport == port {
                    return Ok((status & TP_STATUS_CSUMNOTREADY != 0, buf));
                }
            }
        }
        anyhow::bail!("no TCP segment to port {port} among 200 captured frames")
    }
}
