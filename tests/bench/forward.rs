//! Section 2: forwarding through the node namespace, generator -> node -> 2 backends (80/20),
//! for mesh on its TC path (what `--attach auto` picks on veths: the container-host path), mesh on
//! native XDP (`--attach xdp`), nftables DNAT with numgen (kube-proxy's nftables mode), iptables DNAT
//! with statistic (kube-proxy's iptables mode) and plain routing without NAT (the ceiling).
//!
//! ```text
//!  gen  g<pid> 198.18.1.2 ── i<pid> 198.18.1.1  node  o<pid>a 198.18.2.254 ── a<pid> 198.18.2.1  backend A
//!                                                      o<pid>b 198.18.3.254 ── b<pid> 198.18.3.1  backend B
//! ```
//!
//! - Generator: [`rawbpf::Generator`] in BPF_PROG_TEST_RUN live-frames mode, pinned to CPU 0:
//!   60-byte UDP frames to the VIP 198.18.100.1:8081 from 4096 source ports (round-robin),
//!   transmitted out of `g<pid>`. xdp-trafficgen is not used because its UDP mode sends IPv6 with
//!   hop limit 1 (not routable); trafgen (AF_PACKET) costs about as much per frame as the
//!   forwarders do.
//! - Everything runs on CPU 0: veth schedules the receiving NAPI on the transmitting CPU, so after
//!   every generator batch (64 frames) the node's receive path (NAPI for XDP, the backlog for TC
//!   and netfilter on a default veth) and the backends' NAPI run in softirq on the same core. The
//!   measurement is therefore a closed loop: CPU-0 time per delivered packet. The same topology
//!   with the node's ingress dropping every frame (an XDP counter, the *baseline*) gives the
//!   generator's own share; the difference is the node's forwarding cost per packet, whose
//!   inverse is the node's packets/s per core. An
//!   open-loop variant (node NAPI threaded and pinned to CPU 1) was tried first: its NAPI thread
//!   stayed mostly idle while the veth ring overflowed, which measured the wake-ups, not the
//!   forwarder.
//! - Backends: [`rawbpf::Counter`] on each backend veth counts and drops (delivered packets) where
//!   they enter the backend's namespace: in the veth's XDP, or at its TC ingress for skbs mesh's
//!   TC program hands straight to it (`bpf_redirect_peer`, which skips the veth's XDP). Part of
//!   the "node" figure for every system.
//!
//! Everything lives in namespaces with per-run names, deleted on drop (nft tables, iptables rules
//! and conntrack state go with the node namespace); meshd is stopped on drop.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{bin, Meshd},
    netns::{unique_prefix, veth, Netns},
    packet::Frame,
};

use crate::{
    rawbpf::{ifindex, Counter, Generator},
    util::{median, progress, Plan},
};

/// The systems compared, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// meshd with `--attach auto`, which runs the TC program on veths.
    MeshTc,
    /// meshd with `--attach xdp` (native XDP on the veths).
    MeshXdp,
    Nftables,
    /// The nftables rules plus a flowtable: established flows take the software fast path at
    /// the ingress hook (the fastest thing a kube-proxy user can switch to).
    NftFlowtable,
    Iptables,
    Routing,
    Null,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::MeshTc => "mesh TC (meshd, --attach auto on veths)",
            System::MeshXdp => "mesh XDP (meshd, --attach xdp)",
            System::Nftables => "nftables DNAT (numgen, kube-proxy nftables mode)",
            System::NftFlowtable => "nftables DNAT + flowtable (software fast path)",
            System::Iptables => "iptables DNAT (statistic, kube-proxy iptables mode)",
            System::Routing => "kernel routing, no NAT (ceiling)",
            System::Null => "baseline: generator only, dropped at the node's ingress",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            System::MeshTc => "mesh-tc",
            System::MeshXdp => "mesh-xdp",
            System::Nftables => "nftables",
            System::NftFlowtable => "nft-flowtable",
            System::Iptables => "iptables",
            System::Routing => "routing",
            System::Null => "baseline",
        }
    }
}

/// One system's result (medians over the measured intervals).
#[derive(Clone, Debug)]
pub struct FwdResult {
    pub system: System,
    /// Why it was not measured, when it was not.
    pub skipped: Option<String>,
    /// Extra detail (e.g. which iptables backend).
    pub note: String,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub loss_pct: f64,
    /// Busy share of CPU 0 as /proc/stat reports it, percent (informational: it under-reports
    /// time spent inside long BPF_PROG_TEST_RUN calls on this kernel).
    pub node_cpu_pct: f64,
    /// Wall nanoseconds of the closed loop per delivered packet (informational).
    pub wall_ns_per_packet: f64,
    /// CPU nanoseconds per delivered packet (generator + node + backend counter), measured:
    /// the generator thread's CPU time (which includes the softirq work run in its context:
    /// this kernel has no IRQ time accounting) plus the CPU time of the softirq and NAPI
    /// kernel threads over the same interval.
    pub ns_per_packet: f64,
    /// Share of delivered packets at backend A (80% configured; routing sends all to A).
    pub share_a_pct: f64,
}

impl FwdResult {
    fn skipped(system: System, why: String) -> FwdResult {
        FwdResult {
            system,
            skipped: Some(why),
            note: String::new(),
            offered_pps: f64::NAN,
            delivered_pps: f64::NAN,
            loss_pct: f64::NAN,
            node_cpu_pct: f64::NAN,
            wall_ns_per_packet: f64::NAN,
            ns_per_packet: f64::NAN,
            share_a_pct: f64::NAN,
        }
    }
}

const VIP: &str = "198.18.100.1";
const PORT: u16 = 8081;
const GEN_MAC: &str = "02:00:00:00:01:02";
const NODE_MAC: &str = "02:00:00:00:01:01";
const BE_MAC: [&str; 2] = ["02:00:00:00:02:01", "02:00:00:00:03:01"];
const FLOWS_MASK: u16 = 4095;
const GEN_CPU: usize = 0;

struct Topo {
    id: String,
    // Field order = drop order: counters detach before their namespaces go.
    counters: Vec<Counter>,
    _gen_counter: Counter,
    _backends: Vec<Netns>,
    gen: Netns,
    node: Netns,
}

impl Topo {
    fn ingress(&self) -> String {
        format!("i{}", self.id)
    }
    fn egress(&self, k: usize) -> String {
        format!("o{}{}", self.id, ['a', 'b'][k])
    }
    fn gen_if(&self) -> String {
        format!("g{}", self.id)
    }

    fn build() -> Result<Topo> {
        let prefix = unique_prefix();
        // Interface names carry a per-run id so NAPI thread names ("napi/<if>-<n>") are ours.
        let id = format!(
            "{}{}",
            std::process::id() % 1_000_000,
            prefix.rsplit('x').next().unwrap_or("0")
        );
        let node = Netns::create(&format!("{prefix}-fnode"))?;
        let gen = Netns::create(&format!("{prefix}-fgen"))?;
        let mut backends = Vec::new();
        for k in 0..2 {
            backends.push(Netns::create(&format!("{prefix}-fb{k}"))?);
        }
        let (ing, gif) = (format!("i{id}"), format!("g{id}"));
        veth(&node, &ing, &gen, &gif)?;
        node.ip(&["link", "set", &ing, "address", NODE_MAC])?;
        gen.ip(&["link", "set", &gif, "address", GEN_MAC])?;
        node.ip(&["addr", "add", "198.18.1.1/24", "dev", &ing])?;
        gen.ip(&["addr", "add", "198.18.1.2/24", "dev", &gif])?;
        node.ip(&[
            "neigh",
            "replace",
            "198.18.1.2",
            "lladdr",
            GEN_MAC,
            "dev",
            &ing,
            "nud",
            "permanent",
        ])?;
        for (k, be) in backends.iter().enumerate() {
            let (o, b) = (
                format!("o{id}{}", ['a', 'b'][k]),
                format!("{}{id}", ['a', 'b'][k]),
            );
            veth(&node, &o, be, &b)?;
            be.ip(&["link", "set", &b, "address", BE_MAC[k]])?;
            let net = 2 + k;
            node.ip(&["addr", "add", &format!("198.18.{net}.254/24"), "dev", &o])?;
            be.ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &b])?;
            node.ip(&[
                "neigh",
                "replace",
                &format!("198.18.{net}.1"),
                "lladdr",
                BE_MAC[k],
                "dev",
                &o,
                "nud",
                "permanent",
            ])?;
        }
        node.exec("ethtool", &["-K", &ing, "gro", "on"])?;
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            node.exec("sysctl", &["-qw", sysctl])?;
        }
        // Default veth settings (no GRO, TX checksum offload on), as container hosts run them,
        // except one: the generator transmits with XDP_TX, and a veth drops XDP frames unless
        // its peer has NAPI, which GRO gives it. So the node's ingress gets GRO for every system
        // alike (UDP is not aggregated by GRO unless a socket asks for it); the node's egress
        // veths and the backends keep the defaults.
        // Counters (XDP gives the veths NAPI), then threaded NAPI on the backends.
        let mut counters = Vec::new();
        for (k, be) in backends.iter().enumerate() {
            let b = format!("{}{id}", ['a', 'b'][k]);
            let name = b.clone();
            counters.push(be.run(move || Counter::attach(&name))??);
        }
        let g = gif.clone();
        let gen_counter = gen.run(move || Counter::attach(&g))??;
        Ok(Topo {
            id,
            counters,
            _gen_counter: gen_counter,
            _backends: backends,
            gen,
            node,
        })
    }

    fn delivered(&self) -> Result<[u64; 2]> {
        Ok([self.counters[0].count()?, self.counters[1].count()?])
    }
}

fn set_affinity(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({pid}, cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// (busy, total) jiffies of one CPU from /proc/stat.
fn cpu_ticks(cpu: usize) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("cpu{cpu} in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// CPU time this thread has used, nanoseconds (the scheduler's precise figure).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (ns) used so far by the kernel threads that run deferred packet work: softirq
/// threads (`ksoftirqd/N`) and threaded NAPI (`napi/...`).
fn packet_kthreads_cpu_ns() -> u64 {
    let hz = ticks_per_second();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... ; fields after the closing parenthesis, utime and stime are 14, 15.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        if !(comm.starts_with("ksoftirqd/") || comm.starts_with("napi/")) {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += t(11) + t(12);
    }
    (ticks as f64 * 1e9 / hz) as u64
}

/// Runs the generator in the generator namespace on the generator CPU for `time`; returns the
/// number of frames offered and the CPU time the generator thread used (ns).
fn generate(
    topo: &Topo,
    gen: &Arc<Generator>,
    frame: &Arc<Vec<u8>>,
    time: Duration,
) -> Result<(u64, u64)> {
    let (gen, frame, ifname) = (gen.clone(), frame.clone(), topo.gen_if());
    topo.gen.run(move || -> Result<(u64, u64)> {
        set_affinity(0, GEN_CPU)?;
        let idx = ifindex(&ifname)?;
        let cpu0 = thread_cpu_ns();
        let batch = 65_536u32;
        let deadline = Instant::now() + time;
        let mut sent = 0u64;
        // Bounded by time, and by count as a backstop (at most 10^9 frames).
        while Instant::now() < deadline && sent < 1_000_000_000 {
            gen.send(&frame, idx, batch)?;
            sent += u64::from(batch);
        }
        Ok((sent, thread_cpu_ns() - cpu0))
    })?
}

/// Measures every system; a system that cannot be set up is reported as skipped.
pub fn run(plan: &Plan, peers: &crate::peers::Peers) -> Result<Vec<FwdResult>> {
    let mut frame = Frame::udp(
        SocketAddr::new("198.18.1.2".parse()?, 10_000),
        SocketAddr::new(VIP.parse()?, PORT),
    );
    frame.src_mac = mac(GEN_MAC);
    frame.dst_mac = mac(NODE_MAC);
    // Real UDP checksums: every system has to keep them right through the NAT.
    frame.udp_no_checksum = false;
    let frame = Arc::new(frame.build()?);
    let gen = Arc::new(Generator::load(&frame, 10_000, FLOWS_MASK)?);
    let mut out = Vec::new();
    for system in [
        System::Null,
        System::MeshTc,
        System::MeshXdp,
        System::Nftables,
        System::NftFlowtable,
        System::Iptables,
        System::Routing,
    ] {
        let skip = match system {
            System::Nftables => peers.nft.clone().err(),
            System::NftFlowtable => peers.nft.clone().err().or_else(flowtable_missing),
            System::Iptables => peers.iptables.clone().err(),
            System::MeshTc | System::MeshXdp => bin("meshd").err().map(|e| format!("{e:#}")),
            System::Routing | System::Null => None,
        };
        if let Some(why) = skip {
            progress(&format!("forwarding: skipping {}: {why}", system.short()));
            out.push(FwdResult::skipped(system, why));
            continue;
        }
        progress(&format!("forwarding: {}", system.label()));
        match measure(plan, system, peers, &gen, &frame) {
            Ok(r) => out.push(r),
            Err(e) => {
                progress(&format!("forwarding: {} failed: {e:#}", system.short()));
                out.push(FwdResult::skipped(system, format!("failed: {e:#}")));
            }
        }
    }
    Ok(out)
}

/// Why nftables flowtables cannot run here, when the kernel says it was built without them.
fn flowtable_missing() -> Option<String> {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "# CONFIG_NF_FLOW_TABLE is not set")
        .then(|| {
            "this kernel was built without nftables flowtables (CONFIG_NF_FLOW_TABLE is not set)"
                .into()
        })
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}

/// Keeps whatever configures a system alive for the measurement (meshd, its rule directory).
struct Config {
    _meshd: Option<Meshd>,
    _dir: Option<crate::DirGuard>,
    /// The baseline's counter on the node's ingress (it replaces delivery to the backends).
    counter: Option<Counter>,
}

fn configure(system: System, topo: &Topo, peers: &crate::peers::Peers) -> Result<Config> {
    let none = |_what: &str| Config {
        _meshd: None,
        _dir: None,
        counter: None,
    };
    match system {
        System::Null => {
            let ing = topo.ingress();
            let counter = topo.node.run(move || Counter::attach(&ing))??;
            Ok(Config {
                counter: Some(counter),
                ..none("")
            })
        }
        System::Routing => {
            topo.node
                .ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.2.1"])?;
            Ok(none("host route to backend A, no conntrack rules"))
        }
        System::Nftables | System::NftFlowtable => {
            let flowtable = (system == System::NftFlowtable).then(|| {
                format!(
                    "    flowtable fast {{
        hook ingress priority filter;
        devices = {{ {}, {}, {} }};
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        meta l4proto {{ tcp, udp }} flow add @fast
    }}
",
                    topo.ingress(),
                    topo.egress(0),
                    topo.egress(1)
                )
            });
            let script = format!(
                "table ip kube-proxy-bench {{
{}    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {VIP} . udp . {PORT} : goto svc-bench }}
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain svc-bench {{
        numgen random mod 100 vmap {{ 0-79 : goto ep-a, 80-99 : goto ep-b }}
    }}
    chain ep-a {{
        meta l4proto udp dnat to 198.18.2.1:{PORT}
    }}
    chain ep-b {{
        meta l4proto udp dnat to 198.18.3.1:{PORT}
    }}
}}
",
                flowtable.unwrap_or_default()
            );
            let path = std::env::temp_dir().join(format!("mesh-bench-{}.nft", topo.id));
            std::fs::write(&path, script)?;
            let guard = crate::DirGuard(path.clone());
            topo.node
                .exec("nft", &["-f", path.to_str().context("utf-8 path")?])
                .context("loading the nftables rules")?;
            Ok(Config {
                _meshd: None,
                _dir: Some(guard),
                counter: None,
            })
        }
        System::Iptables => {
            let ipt = peers.iptables.clone().map_err(anyhow::Error::msg)?;
            let rules: Vec<Vec<String>> = vec![
                vec!["-t", "nat", "-N", "KUBE-SERVICES"],
                vec!["-t", "nat", "-N", "KUBE-SVC-BENCH"],
                vec!["-t", "nat", "-N", "KUBE-SEP-A"],
                vec!["-t", "nat", "-N", "KUBE-SEP-B"],
                vec!["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
                vec![
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    "198.18.100.1/32",
                    "-p",
                    "udp",
                    "--dport",
                    "8081",
                    "-j",
                    "KUBE-SVC-BENCH",
                ],
                vec![
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SVC-BENCH",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    "0.80000000000",
                    "-j",
                    "KUBE-SEP-A",
                ],
                vec!["-t", "nat", "-A", "KUBE-SVC-BENCH", "-j", "KUBE-SEP-B"],
                vec![
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SEP-A",
                    "-p",
                    "udp",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "198.18.2.1:8081",
                ],
                vec![
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SEP-B",
                    "-p",
                    "udp",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "198.18.3.1:8081",
                ],
            ]
            .into_iter()
            .map(|r| r.into_iter().map(String::from).collect())
            .collect();
            for r in &rules {
                let args: Vec<&str> = r.iter().map(String::as_str).collect();
                topo.node
                    .exec(&ipt, &args)
                    .with_context(|| format!("{ipt} {}", r.join(" ")))?;
            }
            Ok(none(&format!(
                "{ipt}: PREROUTING -> KUBE-SERVICES -> KUBE-SVC (statistic 0.8) -> KUBE-SEP (DNAT)"
            )))
        }
        System::MeshTc | System::MeshXdp => {
            let dir = std::env::temp_dir().join(format!("mesh-bench-fwd-{}", topo.id));
            std::fs::create_dir_all(&dir)?;
            let guard = crate::DirGuard(dir.clone());
            std::fs::write(dir.join("bench.yaml"), mesh_rules())?;
            let mut args = Vec::new();
            for i in [topo.ingress(), topo.egress(0), topo.egress(1)] {
                args.extend(["--iface".to_string(), i]);
            }
            args.extend(meshd_private_args(&dir));
            let attach = if system == System::MeshXdp {
                "xdp"
            } else {
                "auto"
            };
            args.extend(["--attach".into(), attach.into()]);
            args.extend([
                "--config".into(),
                dir.join("bench.yaml").display().to_string(),
            ]);
            let meshd = Meshd::start(&topo.node, &args)?;
            Ok(Config {
                _meshd: Some(meshd),
                _dir: Some(guard),
                counter: None,
            })
        }
    }
}

/// meshd flags that keep a benchmark instance private: no pins, no state, no TCP metrics, its
/// own admin socket.
pub fn meshd_private_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--no-pin".into(),
        "--no-state".into(),
        "--no-metrics".into(),
        "--socket".into(),
        dir.join("meshd.sock").display().to_string(),
    ]
}

fn mesh_rules() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bench\nspec:\n  \
         hosts:\n  - bench\n  addresses:\n  - {VIP}\n  ports:\n  - number: {PORT}\n    protocol: UDP\n    \
         name: udp-bench\n  location: MESH_INTERNAL\n  resolution: STATIC\n  endpoints:\n  \
         - address: 198.18.2.1\n    labels:\n      version: a\n  - address: 198.18.3.1\n    labels:\n      \
         version: b\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  \
         name: bench\nspec:\n  host: bench\n  subsets:\n  - name: a\n    labels:\n      version: a\n  \
         - name: b\n    labels:\n      version: b\n---\napiVersion: networking.istio.io/v1\n\
         kind: VirtualService\nmetadata:\n  name: bench\nspec:\n  hosts:\n  - bench\n  tcp:\n  - route:\n    \
         - destination:\n        host: bench\n        subset: a\n      weight: 80\n    \
         - destination:\n        host: bench\n        subset: b\n      weight: 20\n"
    )
}

fn measure(
    plan: &Plan,
    system: System,
    peers: &crate::peers::Peers,
    gen: &Arc<Generator>,
    frame: &Arc<Vec<u8>>,
) -> Result<FwdResult> {
    let topo = Topo::build()?;
    let config = configure(system, &topo, peers)?;
    // Warm-up: creates every flow's conntrack entry, resolves nothing (neighbours are static).
    generate(&topo, gen, frame, Duration::from_millis(300))?;
    std::thread::sleep(Duration::from_millis(50));
    let counts = || -> Result<[u64; 2]> {
        match &config.counter {
            Some(c) => Ok([c.count()?, 0]),
            None => topo.delivered(),
        }
    };
    if counts()?.iter().sum::<u64>() == 0 {
        bail!("no packet reached a backend during warm-up");
    }
    let (mut offered, mut delivered, mut loss, mut cpu, mut per_core, mut share) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut wall = vec![];
    for _ in 0..plan.fwd_rounds {
        let d0 = counts()?;
        let c0 = cpu_ticks(GEN_CPU)?;
        let k0 = packet_kthreads_cpu_ns();
        let t0 = Instant::now();
        let (sent, gen_cpu_ns) = generate(&topo, gen, frame, plan.fwd_interval)?;
        let c1 = cpu_ticks(GEN_CPU)?;
        let secs = t0.elapsed().as_secs_f64();
        // Let frames still queued drain before reading the counters.
        std::thread::sleep(Duration::from_millis(50));
        let d1 = counts()?;
        let cpu_ns = gen_cpu_ns + packet_kthreads_cpu_ns().saturating_sub(k0);
        let got = [d1[0] - d0[0], d1[1] - d0[1]];
        let total = (got[0] + got[1]) as f64;
        let busy = (c1.0 - c0.0) as f64;
        let all = (c1.1 - c0.1).max(1) as f64;
        offered.push(sent as f64 / secs);
        delivered.push(total / secs);
        loss.push(100.0 * (1.0 - total / sent.max(1) as f64));
        cpu.push(100.0 * busy / all);
        wall.push(if total > 0.0 {
            1e9 * secs / total
        } else {
            f64::NAN
        });
        per_core.push(if total > 0.0 {
            cpu_ns as f64 / total
        } else {
            f64::NAN
        });
        share.push(if total > 0.0 {
            100.0 * got[0] as f64 / total
        } else {
            f64::NAN
        });
    }
    if std::env::var_os("MESH_BENCH_DEBUG").is_some() {
        for (ns, dev) in [
            (&topo.gen, topo.gen_if()),
            (&topo.node, topo.ingress()),
            (&topo.node, topo.egress(0)),
        ] {
            if let Ok(o) = ns.exec("ethtool", &["-S", &dev]) {
                eprintln!("--- {dev}\n{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        let _ = std::process::Command::new("sh")
            .args(["-c", "ps -eLo tid,psr,pcpu,comm | grep napi/"])
            .status();
        let sock = std::env::temp_dir()
            .join(format!("mesh-bench-fwd-{}", topo.id))
            .join("meshd.sock");
        if sock.exists() {
            let _ = std::process::Command::new(bin("meshctl")?)
                .arg("status")
                .arg("--socket")
                .arg(&sock)
                .status();
        }
    }
    drop(config);
    Ok(FwdResult {
        system,
        skipped: None,
        note: String::new(),
        offered_pps: median(&offered),
        delivered_pps: median(&delivered),
        loss_pct: median(&loss),
        node_cpu_pct: median(&cpu),
        wall_ns_per_packet: median(&wall),
        ns_per_packet: median(&per_core),
        share_a_pct: median(&share),
    })
    .map(|mut r| {
        r.note = note_for(system, peers);
        r
    })
}

fn note_for(system: System, peers: &crate::peers::Peers) -> String {
    match system {
        System::MeshTc => {
            "TC (tcx or cls_bpf) on the node's veths, as auto picks; VirtualService 80/20".into()
        }
        System::MeshXdp => "XDP native on the node's veths; VirtualService 80/20".into(),
        System::Nftables => "service vmap -> numgen random mod 100 vmap -> dnat chains".into(),
        System::NftFlowtable => {
            "the nftables rules, plus `flow add` in forward: established flows bypass the hooks"
                .into()
        }
        System::Iptables => format!(
            "{}: KUBE-SERVICES -> KUBE-SVC (statistic 0.8) -> KUBE-SEP (DNAT)",
            peers.iptables.clone().unwrap_or_default()
        ),
        System::Routing => "host route to backend A; no NAT, no conntrack".into(),
        System::Null => "XDP counter on the node's ingress drops every frame".into(),
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
