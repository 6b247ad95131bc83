//! The kernel path on a real NIC driver. Inside `cargo xtask vm-test`'s guests two virtio-net
//! NICs are joined back to back by qemu (a socket netdev on the host's loopback); the guest's run
//! script names them in `MESH_VM_NIC_CLIENT` and `MESH_VM_NIC_NODE`. These tests move one into
//! the client namespace and the other into the node namespace of the standard topology, so the
//! client reaches services over `virtio_net` and meshd's XDP program runs in native mode on that
//! driver (not only on veth). Outside those VMs the NICs do not exist and the tests are skipped,
//! saying so (`MESH-SKIP:` lines, which the VM matrix reports).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::{
    meshd::{meshctl, Meshd},
    netns::Netns,
    packet::{verify_checksums, Frame},
    rules::{echo_service_entry, meshd_args, RulesDir},
    split::assert_shares,
    topology::{backend_v4, Topology},
    traffic::{start_backends, tcp_split},
};

/// The client's address on the virtio link.
const CLIENT_NIC_V4: &str = "198.18.200.2";
/// The node's address on the virtio link (the tcp-echo gateway listens here too).
const NODE_NIC_V4: &str = "198.18.200.1";

/// The two NICs, or why the test cannot run here.
fn vm_nics() -> Option<(String, String)> {
    Some((
        std::env::var("MESH_VM_NIC_CLIENT").ok()?,
        std::env::var("MESH_VM_NIC_NODE").ok()?,
    ))
}

macro_rules! nics_or_skip {
    () => {
        match vm_nics() {
            Some(nics) => nics,
            None => {
                println!(
                    "MESH-SKIP: no virtio-net pair (MESH_VM_NIC_CLIENT/MESH_VM_NIC_NODE unset): runs \
                     inside `cargo xtask vm-test` only"
                );
                return Ok(());
            }
        }
    };
}

/// The NICs moved into the topology, moved back (and renamed back) on drop so the next test
/// finds them. Declare it after the topology so it is dropped first.
struct NicPair {
    moved: Vec<(String, String, String)>, // (namespace, name inside, original name)
}

impl NicPair {
    /// Puts `client_nic` into the client namespace as `vnic` (198.18.200.2/24, routes to the
    /// service VIPs and the virtio subnet through the node) and `node_nic` into the node
    /// namespace as `vnic` (198.18.200.1/24).
    fn attach(topo: &Topology, client_nic: &str, node_nic: &str) -> Result<Self> {
        let mut pair = NicPair { moved: Vec::new() };
        for (nic, ns, addr) in [
            (client_nic, &topo.client, CLIENT_NIC_V4),
            (node_nic, &topo.node, NODE_NIC_V4),
        ] {
            host_ip(&["link", "set", nic, "down"])?;
            host_ip(&["link", "set", nic, "netns", ns.name(), "name", "vnic"])?;
            pair.moved
                .push((ns.name().to_string(), "vnic".into(), nic.to_string()));
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "vnic"])?;
            ns.ip(&["link", "set", "vnic", "up"])?;
        }
        // Services (198.18.100.0/24) are reached over the virtio link; everything else of the
        // test range stays on the topology's veth.
        topo.client.ip(&[
            "route",
            "add",
            "198.18.100.0/24",
            "via",
            NODE_NIC_V4,
            "dev",
            "vnic",
        ])?;
        Ok(pair)
    }
}

impl Drop for NicPair {
    fn drop(&mut self) {
        for (ns, inside, original) in self.moved.drain(..) {
            let _ = Command::new("ip")
                .args(["-n", &ns, "link", "set", &inside, "down"])
                .output();
            let _ = Command::new("ip")
                .args([
                    "-n", &ns, "link", "set", &inside, "netns", "1", "name", &original,
                ])
                .output();
        }
    }
}

fn host_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// meshd on the topology's interfaces plus the node's virtio NIC, in native XDP mode there.
fn start_meshd(topo: &Topology, rules: &RulesDir) -> Result<Meshd> {
    let mut args = meshd_args(topo, rules);
    args.extend([
        "--iface".into(),
        "vnic".into(),
        "--xdp-mode".into(),
        "native".into(),
    ]);
    let meshd = Meshd::start(&topo.node, &args)?;
    let (ok, out, err) = meshctl(&rules.socket(), &["status", "-o", "json"])?;
    ensure!(ok, "meshctl status: {err}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    let vnic = status["interfaces"]
        .as_array()
        .and_then(|ifs| ifs.iter().find(|i| i["name"] == "vnic"))
        .with_context(|| format!("vnic not attached: {out}"))?;
    ensure!(
        vnic["mode"] == "xdp-native",
        "vnic attached as {}",
        vnic["mode"]
    );
    // The chosen kernel features are reported (the VM matrix is about kernels).
    if let Some(kernel) = status.get("kernel") {
        println!("kernel features: {kernel}");
    }
    Ok(meshd)
}

/// Istio's tcp-echo task (its own YAML), entered through the gateway on the node's virtio
/// address: all to v1, then 80/20.
#[test]
fn tcp_echo_split_over_virtio_net() -> Result<()> {
    let (client_nic, node_nic) = nics_or_skip!();
    let topo = Topology::build(2)?;
    let _servers = start_backends(&topo, false)?;
    let nics = NicPair::attach(&topo, &client_nic, &node_nic)?;
    let rules = RulesDir::new(&topo)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/tcp-echo");
    for file in ["serviceentry.yaml", "tcp-echo-all-v1.yaml"] {
        rules.write(file, &std::fs::read_to_string(repo.join(file))?)?;
    }
    let mut meshd = start_meshd(&topo, &rules)?;
    let gateway = SocketAddr::new(NODE_NIC_V4.parse::<IpAddr>()?, 31400);

    let all_v1 = tcp_split(&topo.client, gateway, 100)?;
    ensure!(
        all_v1.len() == 1 && all_v1.get("v1") == Some(&100),
        "100% v1 step: {all_v1:?}"
    );

    let first = std::fs::read_to_string(repo.join("tcp-echo-all-v1.yaml"))?;
    let kept: Vec<&str> = first
        .split("\n---")
        .filter(|doc| !doc.contains("kind: VirtualService"))
        .collect();
    rules.write("tcp-echo-all-v1.yaml", &kept.join("\n---"))?;
    rules.write(
        "tcp-echo-20-v2.yaml",
        &std::fs::read_to_string(repo.join("step-2-20-v2/tcp-echo-20-v2.yaml"))?,
    )?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "reload:\n{}",
        meshd.log()
    );
    // Tolerance from the sample size (binomial, see tests/support/split.rs).
    let shifted: BTreeMap<String, usize> = tcp_split(&topo.client, gateway, 1000)?;
    assert_shares(&shifted, &[("v1", 0.8), ("v2", 0.2)])?;
    drop(meshd);
    drop(nics);
    Ok(())
}

/// The golden forwarding case on the wire: a SYN to the VIP leaves the client's virtio NIC as
/// raw bytes, meshd's XDP program on the node's virtio NIC translates it and redirects it to the
/// backend's veth, where it is captured and compared byte for byte with the expected frame
/// (destination translated, MACs from the FIB, TTL decremented, checksums recomputed
/// independently).
#[test]
fn golden_forwarding_over_virtio_net() -> Result<()> {
    let (client_nic, node_nic) = nics_or_skip!();
    let topo = Topology::build(1)?;
    let nics = NicPair::attach(&topo, &client_nic, &node_nic)?;
    let rules = RulesDir::new(&topo)?;
    rules.write("echo.yaml", &echo_service_entry(&[1]))?;
    let meshd = start_meshd(&topo, &rules)?;

    let node_vnic_mac = mac(&topo.node, "vnic")?;
    let client_vnic_mac = mac(&topo.client, "vnic")?;
    let node_b1_mac = mac(&topo.node, "b1")?;
    let backend_mac = mac(&topo.backends[0], "eth0")?;
    // A resolved neighbour, so XDP forwards it itself (redirect) rather than handing it to the
    // kernel to resolve.
    topo.node.ip(&[
        "neigh",
        "replace",
        &backend_v4(1).to_string(),
        "lladdr",
        &fmt_mac(&backend_mac),
        "dev",
        "b1",
        "nud",
        "permanent",
    ])?;

    let src: SocketAddr = format!("{CLIENT_NIC_V4}:40123").parse()?;
    let mut input = Frame::tcp(src, "198.18.100.1:8080".parse()?);
    input.src_mac = client_vnic_mac;
    input.dst_mac = node_vnic_mac;
    let mut want = input.with_dst(SocketAddr::new(backend_v4(1), 8080));
    want.src_mac = node_b1_mac;
    want.dst_mac = backend_mac;
    want.ttl -= 1;
    let want = want.build()?;

    let capture = topo.backends[0].run(|| RawSocket::open("eth0"))??;
    let sender = topo.client.run(|| RawSocket::open("vnic"))??;
    let bytes = input.build()?;
    // A few sends, in case the first is lost while links settle; bounded.
    let mut got = None;
    for _ in 0..5 {
        sender.send(&bytes)?;
        if let Some(frame) = capture.wait_for(|f| is_probe(f, 40123), Duration::from_secs(20))? {
            got = Some(frame);
            break;
        }
    }
    let got = got.context("the frame sent over virtio-net never reached the backend")?;
    verify_checksums(&got)?;
    ensure!(
        got == want,
        "forwarded frame differs:\n got  {}\n want {}",
        hex(&got),
        hex(&want)
    );
    drop(meshd);
    drop(nics);
    Ok(())
}

/// A TCP/IPv4 frame from source port `port`.
fn is_probe(frame: &[u8], port: u16) -> bool {
    frame.len() >= 14 + 20 + 20
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 6
        && u16::from_be_bytes([frame[34], frame[35]]) == port
}

/// `dev`'s MAC from `ip -br link` (the namespace's sysfs is not remounted by a bare setns, so
/// /sys/class/net shows another namespace's devices).
fn mac(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = ns.exec("ip", &["-br", "link", "show", "dev", dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes: Vec<u8> = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC of {dev}: {text}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC of {dev}: {text}"))
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An AF_PACKET socket bound to one interface (of the namespace it was opened in).
struct RawSocket {
    fd: i32,
    ifindex: i32,
}

impl RawSocket {
    fn open(dev: &str) -> Result<Self> {
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: plain syscalls on values owned here.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            ensure!(ifindex != 0, "no interface {dev}");
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
            ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto as u16;
            sll.sll_ifindex = ifindex;
            let rc = libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc != 0 {
                libc::close(fd);
                bail!("bind to {dev}: {}", std::io::Error::last_os_error());
            }
            Ok(RawSocket { fd, ifindex })
        }
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::send(self.fd, frame.as_ptr().cast(), frame.len(), 0) };
        ensure!(
            n as usize == frame.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
        let _ = self.ifindex;
        Ok(())
    }

    /// The first received frame matching `want`, or `None` after `limit` without one.
    fn wait_for(&self, want: impl Fn(&[u8]) -> bool, limit: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = std::time::Instant::now() + limit;
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 500) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: the buffer is large enough for any frame.
            let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && want(&buf[..n as usize]) {
                return Ok(Some(buf[..n as usize].to_vec()));
            }
        }
        Ok(None)
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by this value.
        unsafe { libc::close(self.fd) };
    }
}
