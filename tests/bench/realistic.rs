//! Section 1b: per-packet cost on a realistic connection table.
//!
//! Section 1's hot loop measures one flow whose entry is always in cache, and its frames end in
//! a failed FIB lookup. Here the program works the way it does on a busy node:
//! - the connection table holds `flows` established TCP connections (100 000 in a full run),
//!   built by the program itself through the real handshake (SYN, SYN-ACK, ACK: pending, then
//!   confirmed), so both directions of every flow are live entries;
//! - every measured call carries a flow drawn at random from them, so lookups miss the CPU
//!   caches the way they do under real traffic (two entries per flow, far more than L2 holds);
//! - frames carry real TCP checksums (built by etherparse), which the program updates;
//! - the FIB lookup succeeds: the namespace has routes and permanent neighbours for the
//!   backends and the clients' gateway, forwarding is on, so the program rewrites the MACs,
//!   decrements the TTL and redirects (XDP_REDIRECT into a device that runs XDP, TC's
//!   bpf_redirect), exactly what a forwarded packet costs.
//!
//! Each call is a single BPF_PROG_TEST_RUN with `repeat = 1` and a fresh copy of the frame; the
//! empty program is measured the same way, interleaved, and subtracted (see section 1).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{ensure, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode};
use mesh_common::{
    reason, DEFAULT_CONNTRACK_ENTRIES, PROTO_TCP, TC_PROGRAM_NAME, XDP_PASS_PROGRAM_NAME,
    XDP_PROGRAM_NAME,
};
use mesh_tests::{
    maps::{Lb, Service},
    netns::sh,
    packet::{Frame, L4},
};

use crate::{
    micro::{in_empty_netns, load_lb, CaseResult},
    util::{median, percentile, progress, Plan, Rng},
};

const XDP_REDIRECT: u32 = 4;
const TC_ACT_REDIRECT: u32 = 7;
const VIP: &str = "198.18.0.10:80";
const BACKENDS: [&str; 2] = ["198.19.0.2:8080", "198.19.0.3:8080"];

/// Section 1b results.
#[derive(Clone, Debug)]
pub struct RealisticResult {
    /// Established connections in the table while measuring.
    pub flows: usize,
    /// Capacity of the connection table (entries).
    pub table_entries: u32,
    /// Calls per case.
    pub runs: usize,
    pub cases: Vec<CaseResult>,
}

/// Client `i`: one of 32 000 addresses behind the clients' gateway, several ports each.
fn client(i: usize) -> SocketAddr {
    let idx = i % 32_000;
    let addr = Ipv4Addr::new(198, 18, 128 + (idx / 250) as u8, 1 + (idx % 250) as u8);
    SocketAddr::new(IpAddr::V4(addr), 20_000 + (i / 32_000) as u16)
}

fn tcp(src: SocketAddr, dst: SocketAddr, syn: bool) -> Result<Vec<u8>> {
    Frame {
        l4: L4::Tcp { syn },
        ..Frame::tcp(src, dst)
    }
    .build()
}

fn ip(args: &[&str]) -> Result<()> {
    sh("ip", args).map(|_| ())
}

/// Devices, addresses, routes and neighbours of the namespace the thread runs in.
fn topology() -> Result<(u32, u32)> {
    for (a, mac, b) in [
        ("lan0", "02:00:00:00:01:a0", "lan1"),
        ("be0", "02:00:00:00:01:b0", "be1"),
    ] {
        ip(&[
            "link", "add", a, "address", mac, "type", "veth", "peer", "name", b,
        ])?;
    }
    for dev in ["lo", "lan0", "lan1", "be0", "be1"] {
        ip(&["link", "set", dev, "up"])?;
    }
    ip(&["addr", "add", "198.18.0.1/24", "dev", "lan0"])?;
    ip(&["addr", "add", "198.19.0.1/24", "dev", "be0"])?;
    // The clients sit behind a gateway on the LAN side.
    ip(&["route", "add", "198.18.128.0/17", "via", "198.18.0.254"])?;
    for (addr, mac, dev) in [
        ("198.18.0.254", "02:00:00:00:01:a6", "lan0"),
        ("198.19.0.2", "02:00:00:00:01:b2", "be0"),
        ("198.19.0.3", "02:00:00:00:01:b3", "be0"),
    ] {
        ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    // This thread's /proc/sys/net is the namespace's.
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").context("enabling forwarding")?;
    let index = |dev: &str| -> Result<u32> {
        let c = std::ffi::CString::new(dev)?;
        // SAFETY: a valid NUL-terminated name.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        ensure!(i != 0, "no device {dev}");
        Ok(i)
    };
    Ok((index("lan0")?, index("be0")?))
}

/// One call of `program` on `frame` arriving on `ifindex`: (raw verdict, kernel-measured ns).
fn run_timed(lb: &Lb, program: &str, frame: &[u8], ifindex: u32) -> Result<(u32, f64)> {
    let found = lb
        .ebpf
        .program(program)
        .with_context(|| format!("{program} missing"))?;
    let result = if program == TC_PROGRAM_NAME {
        // struct __sk_buff: ingress_ifindex (offset 36) and ifindex (40).
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let prog: &SchedClassifier = found.try_into()?;
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx[..]),
            ..Default::default()
        })?
    } else {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, ... }
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let prog: &Xdp = found.try_into()?;
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx[..]),
            ..Default::default()
        })?
    };
    Ok((result.return_value, result.duration.as_nanos() as f64))
}

/// Section 1b.
pub fn run(plan: &Plan) -> Result<RealisticResult> {
    let plan = plan.clone();
    in_empty_netns(move || run_inner(&plan))
}

fn run_inner(plan: &Plan) -> Result<RealisticResult> {
    let flows = if plan.quick { 5_000 } else { 100_000 };
    let (lan0, be0) = topology()?;
    let mut lb = load_lb(4096, DEFAULT_CONNTRACK_ENTRIES)?;
    // BPF_PROG_TEST_RUN takes an XDP ingress device only once its XDP queue is registered
    // (veth: an XDP program attached); meshd lets XDP redirect into its own XDP devices.
    for dev in [lan0, be0] {
        let pass: &mut Xdp = lb
            .ebpf
            .program_mut(XDP_PASS_PROGRAM_NAME)
            .context("mesh_xdp_pass missing")?
            .try_into()?;
        pass.attach_to_if_index(dev, XdpMode::Default)?;
        lb.allow_xdp_redirect(dev)?;
    }
    lb.install(&Service {
        id: 1,
        addr: VIP.parse()?,
        proto: PROTO_TCP,
        flags: 0,
        table_offset: 0,
        table_size: 251,
        backends: BACKENDS
            .iter()
            .enumerate()
            .map(|(i, b)| Ok((i as u32 + 1, b.parse()?)))
            .collect::<Result<_>>()?,
    })?;
    let vip: SocketAddr = VIP.parse()?;

    // The handshake of every connection, through the program: SYN (pending), SYN-ACK from the
    // chosen backend (answered), ACK (confirmed into the connection table).
    progress(&format!(
        "realistic table: opening {flows} TCP connections through the program"
    ));
    let mut requests = Vec::with_capacity(flows);
    let mut replies = Vec::with_capacity(flows);
    for i in 0..flows {
        let c = client(i);
        let (v, out) = lb.run_on(&tcp(c, vip, true)?, lan0)?;
        ensure!(v == XDP_REDIRECT, "SYN {i}: verdict {v}");
        let backend = SocketAddr::new(
            IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).context("short frame")?),
            8080,
        );
        let reply = tcp(backend, c, false)?;
        let (v, _) = lb.run_on(&reply, be0)?;
        ensure!(v == XDP_REDIRECT, "SYN-ACK {i}: verdict {v}");
        let request = tcp(c, vip, false)?;
        let (v, _) = lb.run_on(&request, lan0)?;
        ensure!(v == XDP_REDIRECT, "ACK {i}: verdict {v}");
        requests.push(request);
        replies.push(reply);
    }
    let confirmed = lb.reason_count(reason::FORWARD_REDIRECT).unwrap_or(0);
    ensure!(
        confirmed >= 3 * flows as u64,
        "the handshakes were not all forwarded ({confirmed} redirects for {flows} connections)"
    );

    let runs = plan.single_runs;
    progress(&format!(
        "realistic table: {runs} calls per case, random flows out of {flows}"
    ));
    let non_service = tcp(client(0), "198.18.50.1:80".parse()?, false)?;
    let names = [
        "empty program (mesh_xdp_pass)",
        "established flow, random of the table (XDP)",
        "reply reverse-NAT, random of the table (XDP)",
        "new flow, SYN, full table (XDP)",
        "established flow, random of the table (TC, skb)",
        "reply reverse-NAT, random of the table (TC, skb)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); names.len()];
    let mut rng = Rng::new(0x7ab1e);
    for k in 0..runs {
        let est = &requests[rng.below(flows)];
        let rep = &replies[rng.below(flows)];
        let tc_est = &requests[rng.below(flows)];
        let tc_rep = &replies[rng.below(flows)];
        // New connections from ports no handshake above used.
        let fresh = tcp(
            SocketAddr::new(client(k).ip(), 40_000 + (k / 32_000) as u16),
            vip,
            true,
        )?;
        let calls: [(&str, &[u8], u32, u32); 6] = [
            (XDP_PASS_PROGRAM_NAME, &non_service, lan0, 2),
            (XDP_PROGRAM_NAME, est, lan0, XDP_REDIRECT),
            (XDP_PROGRAM_NAME, rep, be0, XDP_REDIRECT),
            (XDP_PROGRAM_NAME, &fresh, lan0, XDP_REDIRECT),
            (TC_PROGRAM_NAME, tc_est, lan0, TC_ACT_REDIRECT),
            (TC_PROGRAM_NAME, tc_rep, be0, TC_ACT_REDIRECT),
        ];
        for (i, (prog, frame, dev, want)) in calls.iter().enumerate() {
            let (v, ns) = run_timed(&lb, prog, frame, *dev)?;
            ensure!(v == *want, "{}: verdict {v}, expected {want}", names[i]);
            samples[i].push(ns);
        }
    }
    let base = median(&samples[0]);
    let cases = names
        .iter()
        .enumerate()
        .map(|(i, name)| CaseResult {
            name,
            hot_ns: f64::NAN,
            single_ns: median(&samples[i]),
            single_p90: percentile(&samples[i], 90.0),
            single_net_ns: median(&samples[i]) - base,
        })
        .collect();
    Ok(RealisticResult {
        flows,
        table_entries: DEFAULT_CONNTRACK_ENTRIES,
        runs,
        cases,
    })
}

/// The section's Markdown (a subsection of section 1).
pub fn markdown(r: &Result<RealisticResult, String>) -> String {
    use std::fmt::Write as _;
    let mut w = String::from("### 1b. On a realistic connection table\n\n");
    let m = match r {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
            return w;
        }
    };
    let _ = writeln!(
        w,
        "{} established TCP connections opened through the program itself (SYN, SYN-ACK, ACK) \
         in a connection table of {} entries; every call takes a flow at random out of them, \
         frames carry real TCP checksums, and the FIB lookup succeeds (routes and permanent \
         neighbours for the backends and the clients' gateway), so each packet is translated, \
         gets new MACs and a decremented TTL, and is redirected. {} single-run calls per case, \
         interleaved; *net* = minus the empty program's median.\n",
        m.flows, m.table_entries, m.runs
    );
    let _ = writeln!(
        w,
        "| case | median ns (raw) | p90 ns (raw) | net ns | net Mpps/core |\n|---|---|---|---|---|"
    );
    for c in &m.cases {
        let mpps = if c.name.starts_with("empty") || c.single_net_ns <= 0.0 {
            "n/a".to_string()
        } else {
            crate::util::f(1000.0 / c.single_net_ns, 1)
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            c.name,
            crate::util::f(c.single_ns, 0),
            crate::util::f(c.single_p90, 0),
            crate::util::f(c.single_net_ns, 0),
            mpps
        );
    }
    w.push('\n');
    w
}

/// Net ns of the case whose name starts with `prefix`.
pub fn net_ns(r: &Result<RealisticResult, String>, prefix: &str) -> Option<f64> {
    r.as_ref()
        .ok()?
        .cases
        .iter()
        .find(|c| c.name.starts_with(prefix))
        .map(|c| c.single_net_ns)
}
