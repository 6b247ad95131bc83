//! Section 1 (per-packet cost through BPF_PROG_TEST_RUN), the per-packet half of section 3
//! (cost with N services) and the kernel half of section 5 (observed 80/20 split).
//!
//! Everything here runs on a thread inside a fresh, empty network namespace, like the golden
//! tests: the program's FIB lookup then fails deterministically, so translated frames come back
//! as XDP_PASS (PASS_FIB_OTHER) with their TTL untouched.
//!
//! Two methods, both with the JIT on:
//! - **hot loop**: one BPF_PROG_TEST_RUN call with `repeat` = millions. The kernel runs the
//!   program again and again on the *same buffer*, keeping whatever the previous run wrote. That
//!   is only valid for frames the program leaves byte-identical, so the established and reply
//!   cases use a "self-mapped" service whose only backend is the VIP itself: the connection-table
//!   hit, the rewrite (to identical bytes, full checksum arithmetic), the counters and the FIB
//!   lookup all still run every time. A new flow can never be measured this way.
//! - **single run**: `repeat = 1` per call, a fresh copy of the frame each call, the kernel's own
//!   per-call duration (ns) recorded, median of many calls. Each call includes the fixed test-run
//!   overhead (timer reads, bh disable), so the empty `mesh_xdp_pass` program is measured the same
//!   way, interleaved call by call, and subtracted. New flows are measured this way: every call
//!   carries a flow never seen before (distinct source address/port), i.e. a real
//!   connection-table miss, service lookup, Maglev lookup and two connection-table inserts.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use mesh_common::{
    map_names, port_to_wire, reason, Backend, ServiceInfo, ServiceKey, FAMILY_IPV4, FAMILY_IPV6,
    PROTO_UDP, TC_PROGRAM_NAME, XDP_PASS_PROGRAM_NAME, XDP_PROGRAM_NAME,
};
use mesh_tests::{
    maps::{addr_bytes, Lb, Service},
    netns::{unique_prefix, Netns},
    packet::Frame,
    EBPF_OBJECT,
};

use crate::util::{median, percentile, progress, Plan, Rng};

const XDP_PASS: u32 = 2;
const CLIENT: &str = "198.18.1.2:40000";
const CLIENT6: &str = "[2001:db8:1::2]:40000";
/// Real services (two backends).
const VIP: &str = "198.18.100.1:8081";
const VIP6: &str = "[2001:db8:100::1]:8081";
/// Self-mapped services (the VIP is its own backend), for the hot loop.
const SELF_VIP: &str = "198.18.100.2:8082";
const SELF_VIP6: &str = "[2001:db8:100::2]:8082";
/// Backends of the real services.
pub const BACKEND_A: &str = "198.18.2.1:8081";
pub const BACKEND_B: &str = "198.18.3.1:8081";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("valid socket address")
}

/// Loads the object with a MAGLEV pool of `pool` entries and loads both programs.
pub fn load_lb(pool: u32, conntrack: u32) -> Result<Lb> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::MAGLEV, pool)
        .map_max_entries(map_names::CONNTRACK, conntrack)
        .load(EBPF_OBJECT)
        .context("loading the BPF object")?;
    for name in [XDP_PROGRAM_NAME, XDP_PASS_PROGRAM_NAME] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        prog.load().with_context(|| format!("verifying {name}"))?;
    }
    let tc: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM_NAME)
        .context("mesh_tc missing")?
        .try_into()?;
    tc.load().context("verifying mesh_tc")?;
    Ok(Lb {
        ebpf,
        hook: mesh_tests::maps::Hook::Xdp,
    })
}

/// Runs `program` (XDP, or `mesh_tc` on an skb) on `frame` `repeat` times; returns (verdict, ns
/// per run as the kernel measured). TC's TC_ACT_OK is reported as XDP_PASS.
fn run(lb: &Lb, program: &str, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let options = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    let found = lb
        .ebpf
        .program(program)
        .with_context(|| format!("{program} missing"))?;
    if program == TC_PROGRAM_NAME {
        let prog: &SchedClassifier = found.try_into()?;
        let r = prog.test_run(options)?;
        let verdict = if r.return_value == 0 {
            XDP_PASS
        } else {
            r.return_value
        };
        return Ok((verdict, r.duration.as_nanos() as f64));
    }
    let prog: &Xdp = found.try_into()?;
    let r = prog.test_run(options)?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Runs `f` on a thread inside a fresh empty namespace (deleted afterwards).
pub fn in_empty_netns<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = Netns::create(&format!("{}-micro", unique_prefix()))?;
    ns.run(f)?
}

fn svc(id: u32, addr: &str, table_offset: u32, backends: &[(u32, &str)]) -> Service {
    Service {
        id,
        addr: sa(addr),
        proto: PROTO_UDP,
        flags: 0,
        table_offset,
        table_size: 251,
        backends: backends.iter().map(|(i, a)| (*i, sa(a))).collect(),
    }
}

/// One measured case of section 1.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub name: &'static str,
    /// Hot-loop ns per packet (median over rounds); NaN when the method does not apply.
    pub hot_ns: f64,
    /// Single-run median ns per call, raw.
    pub single_ns: f64,
    /// Single-run 90th percentile, raw.
    pub single_p90: f64,
    /// Single-run median minus the empty program's single-run median.
    pub single_net_ns: f64,
}

/// Section 1 results.
#[derive(Clone, Debug)]
pub struct MicroResult {
    pub cases: Vec<CaseResult>,
    pub jit: String,
    pub hot_repeat: u32,
    pub hot_rounds: usize,
    pub single_runs: usize,
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Result<Vec<u8>> {
    Frame::udp(src, dst).build()
}

/// Section 1.
pub fn per_packet(plan: &Plan) -> Result<MicroResult> {
    let plan = plan.clone();
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    in_empty_netns(move || per_packet_inner(&plan, jit))
}

fn per_packet_inner(plan: &Plan, jit: String) -> Result<MicroResult> {
    let mut lb = load_lb(4096, 1 << 19)?;
    lb.install(&svc(1, VIP, 0, &[(1, BACKEND_A), (2, BACKEND_B)]))?;
    lb.install(&svc(2, SELF_VIP, 256, &[(3, SELF_VIP)]))?;
    lb.install(&svc(3, SELF_VIP6, 512, &[(4, SELF_VIP6)]))?;
    lb.install(&svc(
        4,
        VIP6,
        768,
        &[(5, "[2001:db8:2::1]:8081"), (6, "[2001:db8:3::1]:8081")],
    ))?;

    let (client, client6) = (sa(CLIENT), sa(CLIENT6));
    let non_service = udp(client, sa("198.18.50.1:80"))?;
    let self_est = udp(client, sa(SELF_VIP))?;
    let self_reply = udp(sa(SELF_VIP), client)?;
    let self_est6 = udp(client6, sa(SELF_VIP6))?;
    // Prime the self-mapped flows (creates their CONNTRACK entries, one per direction).
    for frame in [&self_est, &self_est6] {
        let (v, _) = run(&lb, XDP_PROGRAM_NAME, frame, 1)?;
        ensure!(v == XDP_PASS, "priming verdict {v}");
    }

    // Hot loop, rounds interleaved across cases so drift hits all of them alike.
    progress(&format!(
        "per-packet hot loop: {} rounds x {} repeats per case",
        plan.hot_rounds, plan.hot_repeat
    ));
    let hot_cases: Vec<(&'static str, &'static str, &Vec<u8>, Option<u32>)> = vec![
        (
            "empty program (mesh_xdp_pass)",
            XDP_PASS_PROGRAM_NAME,
            &non_service,
            None,
        ),
        (
            "non-service IPv4",
            XDP_PROGRAM_NAME,
            &non_service,
            Some(reason::PASS_NOT_SERVICE),
        ),
        (
            "established flow IPv4",
            XDP_PROGRAM_NAME,
            &self_est,
            Some(reason::PASS_FIB_OTHER),
        ),
        (
            "reply reverse-NAT IPv4",
            XDP_PROGRAM_NAME,
            &self_reply,
            Some(reason::PASS_FIB_OTHER),
        ),
        (
            "established flow IPv6",
            XDP_PROGRAM_NAME,
            &self_est6,
            Some(reason::PASS_FIB_OTHER),
        ),
        (
            "non-service IPv4 (TC, skb)",
            TC_PROGRAM_NAME,
            &non_service,
            Some(reason::PASS_NOT_SERVICE),
        ),
        (
            "established flow IPv4 (TC, skb)",
            TC_PROGRAM_NAME,
            &self_est,
            Some(reason::PASS_FIB_OTHER),
        ),
    ];
    let mut hot: Vec<Vec<f64>> = vec![Vec::new(); hot_cases.len()];
    for _ in 0..plan.hot_rounds {
        for (i, (name, prog, frame, why)) in hot_cases.iter().enumerate() {
            let before = match why {
                Some(r) => lb.reason_count(*r)?,
                None => 0,
            };
            let (v, ns) = run(&lb, prog, frame, plan.hot_repeat)?;
            ensure!(v == XDP_PASS, "{name}: verdict {v}");
            if let Some(r) = why {
                let after = lb.reason_count(*r)?;
                ensure!(
                    after - before == u64::from(plan.hot_repeat),
                    "{name}: the hot loop did not stay on the intended path ({} of {} runs)",
                    after - before,
                    plan.hot_repeat
                );
            }
            hot[i].push(ns);
        }
    }

    // Single runs: real services, fresh frames.
    progress(&format!(
        "per-packet single runs: {} calls per case",
        plan.single_runs
    ));
    let est = udp(client, sa(VIP))?;
    let est6 = udp(client6, sa(VIP6))?;
    let (_, out) = lb.run(&est)?;
    // The backend the established flow went to: destination address of the translated frame.
    let chosen = IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).context("short frame")?);
    let reply = udp(SocketAddr::new(chosen, 8081), client)?;
    lb.run(&est6)?;
    let n = plan.single_runs;
    let new_flows: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let src = SocketAddr::new(
                format!("198.18.{}.{}", 8 + i / 60_000, 1 + (i / 250) % 250)
                    .parse()
                    .expect("valid"),
                1024 + (i % 60_000) as u16,
            );
            udp(src, sa(VIP))
        })
        .collect::<Result<_>>()?;
    let new_flows6: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let src = SocketAddr::new(
                format!("2001:db8:1::{:x}", 0x1000 + i / 60_000)
                    .parse()
                    .expect("valid"),
                1024 + (i % 60_000) as u16,
            );
            udp(src, sa(VIP6))
        })
        .collect::<Result<_>>()?;
    let names = [
        "empty program (mesh_xdp_pass)",
        "non-service IPv4",
        "established flow IPv4",
        "reply reverse-NAT IPv4",
        "established flow IPv6",
        "new flow IPv4 (conntrack miss)",
        "new flow IPv6 (conntrack miss)",
        "non-service IPv4 (TC, skb)",
        "established flow IPv4 (TC, skb)",
    ];
    let mut single: Vec<Vec<f64>> = vec![Vec::with_capacity(n); names.len()];
    for i in 0..n {
        let frames: [(&str, &[u8]); 9] = [
            (XDP_PASS_PROGRAM_NAME, &non_service),
            (XDP_PROGRAM_NAME, &non_service),
            (XDP_PROGRAM_NAME, &est),
            (XDP_PROGRAM_NAME, &reply),
            (XDP_PROGRAM_NAME, &est6),
            (XDP_PROGRAM_NAME, &new_flows[i]),
            (XDP_PROGRAM_NAME, &new_flows6[i]),
            (TC_PROGRAM_NAME, &non_service),
            (TC_PROGRAM_NAME, &est),
        ];
        for (k, (prog, frame)) in frames.iter().enumerate() {
            let (v, ns) = run(&lb, prog, frame, 1)?;
            ensure!(v == XDP_PASS, "{}: verdict {v}", names[k]);
            single[k].push(ns);
        }
    }
    let connections: u64 = lb.service_stats(1)?.connections;
    ensure!(
        connections >= n as u64,
        "new IPv4 flows were not all new: {connections} connections for {n} calls"
    );
    let base = median(&single[0]);
    let cases = names
        .iter()
        .enumerate()
        .map(|(k, name)| CaseResult {
            name,
            hot_ns: hot_cases
                .iter()
                .position(|c| c.0 == *name)
                .map(|p| median(&hot[p]))
                .unwrap_or(f64::NAN),
            single_ns: median(&single[k]),
            single_p90: percentile(&single[k], 90.0),
            single_net_ns: median(&single[k]) - base,
        })
        .collect();
    Ok(MicroResult {
        cases,
        jit,
        hot_repeat: plan.hot_repeat,
        hot_rounds: plan.hot_rounds,
        single_runs: n,
    })
}

/// Section 3, per packet: cost of a new flow to a random one of N services.
#[derive(Clone, Debug)]
pub struct ScalePoint {
    pub services: usize,
    /// Single-run median of a new flow to a random service, minus the empty program.
    pub new_flow_net_ns: f64,
    /// Same, 90th percentile (raw minus the empty program's median).
    pub new_flow_p90_net_ns: f64,
    /// Single-run median of a non-service packet (a SERVICES miss), minus the empty program.
    pub miss_net_ns: f64,
    /// Seconds it took to write the maps (not meshd: this is the benchmark's own loader).
    pub fill_s: f64,
}

/// Maglev table size per service in the scale section.
pub const SCALE_TABLE: u32 = 251;

fn fd_of(data: &MapData) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    data.fd().as_fd()
}

/// `BPF_MAP_UPDATE_BATCH` on an array map: writes `values` at keys `first..`.
fn batch_update_u32(data: &MapData, first: u32, values: &[u32]) -> Result<()> {
    use std::os::fd::AsRawFd;
    let keys: Vec<u32> = (first..first + values.len() as u32).collect();
    let mut attr = [0u64; 8];
    // struct { in_batch, out_batch, keys, values, count(u32) map_fd(u32), elem_flags, flags }
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.as_ptr() as u64;
    attr[4] = (values.len() as u64) | (u64::from(fd_of(data).as_raw_fd() as u32) << 32);
    // SAFETY: attr is a valid bpf_attr for BPF_MAP_UPDATE_BATCH (26); the buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            26 as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    ensure!(
        rc == 0,
        "BPF_MAP_UPDATE_BATCH: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn scale_vip(i: usize) -> SocketAddr {
    SocketAddr::new(
        format!("198.19.{}.{}", i >> 8, i & 255)
            .parse()
            .expect("valid"),
        8081,
    )
}

/// Section 3, per packet.
pub fn scale(plan: &Plan) -> Result<Vec<ScalePoint>> {
    let plan = plan.clone();
    in_empty_netns(move || {
        plan.scale_sizes
            .iter()
            .map(|n| scale_one(*n, plan.scale_runs))
            .collect()
    })
}

fn scale_one(n: usize, runs: usize) -> Result<ScalePoint> {
    progress(&format!(
        "per-packet cost with {n} services: filling the maps"
    ));
    let started = std::time::Instant::now();
    let pool = (n as u32 * SCALE_TABLE).max(4096);
    let mut lb = load_lb(pool, 1 << 18)?;
    {
        let mut backends: Array<_, Backend> =
            Array::try_from(lb.ebpf.map_mut(map_names::BACKENDS).context("BACKENDS")?)?;
        for (id, addr) in [(1u32, BACKEND_A), (2, BACKEND_B)] {
            let a = sa(addr);
            backends.set(
                id,
                Backend {
                    addr: addr_bytes(a.ip()),
                    port: port_to_wire(a.port()),
                    family: FAMILY_IPV4,
                    _pad: 0,
                },
                0,
            )?;
        }
    }
    // Every service gets its own 251-entry slice (alternating backends 1, 2), written in batches.
    let slice: Vec<u32> = (0..SCALE_TABLE).map(|i| 1 + i % 2).collect();
    {
        let map = lb.ebpf.map(map_names::MAGLEV).context("MAGLEV")?;
        let data = match map {
            aya::maps::Map::Array(d) => d,
            _ => anyhow::bail!("MAGLEV is not an array"),
        };
        let chunk_services = 1024usize;
        let mut i = 0;
        while i < n {
            let count = chunk_services.min(n - i);
            let values: Vec<u32> = (0..count).flat_map(|_| slice.iter().copied()).collect();
            batch_update_u32(data, i as u32 * SCALE_TABLE, &values)?;
            i += count;
        }
    }
    {
        let mut services: HashMap<_, ServiceKey, ServiceInfo> =
            HashMap::try_from(lb.ebpf.map_mut(map_names::SERVICES).context("SERVICES")?)?;
        for i in 0..n {
            let vip = scale_vip(i);
            services.insert(
                ServiceKey {
                    addr: addr_bytes(vip.ip()),
                    port: port_to_wire(vip.port()),
                    proto: PROTO_UDP,
                    _pad: 0,
                },
                ServiceInfo {
                    service_id: i as u32,
                    table_offset: i as u32 * SCALE_TABLE,
                    table_size: SCALE_TABLE,
                    flags: 0,
                },
                0,
            )?;
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    let _ = FAMILY_IPV6;

    progress(&format!(
        "per-packet cost with {n} services: {runs} new flows to random services"
    ));
    let mut rng = Rng::new(0x5ca1e + n as u64);
    let non_service = udp(sa(CLIENT), sa("198.18.50.1:80"))?;
    let mut base = Vec::with_capacity(runs);
    let mut new = Vec::with_capacity(runs);
    let mut miss = Vec::with_capacity(runs);
    for i in 0..runs {
        let src = SocketAddr::new(
            format!("198.18.{}.{}", 8 + i / 60_000, 1 + (i / 250) % 250)
                .parse()
                .expect("valid"),
            1024 + (i % 60_000) as u16,
        );
        let frame = udp(src, scale_vip(rng.below(n)))?;
        let (v, ns) = run(&lb, XDP_PASS_PROGRAM_NAME, &non_service, 1)?;
        ensure!(v == XDP_PASS);
        base.push(ns);
        let (v, ns) = run(&lb, XDP_PROGRAM_NAME, &frame, 1)?;
        ensure!(v == XDP_PASS, "new flow verdict {v}");
        new.push(ns);
        let (v, ns) = run(&lb, XDP_PROGRAM_NAME, &non_service, 1)?;
        ensure!(v == XDP_PASS);
        miss.push(ns);
    }
    let b = median(&base);
    Ok(ScalePoint {
        services: n,
        new_flow_net_ns: median(&new) - b,
        new_flow_p90_net_ns: percentile(&new, 90.0) - b,
        miss_net_ns: median(&miss) - b,
        fill_s,
    })
}

/// Section 5, kernel side: the observed split of `flows` new flows over a real weighted Maglev
/// table (80/20) of size `table_size`.
#[derive(Clone, Debug)]
pub struct SplitObserved {
    pub table_size: u32,
    pub flows: usize,
    /// Share of table slots given to backend A (what the table promises), percent.
    pub table_share_a: f64,
    /// Share of flows the kernel sent to backend A, percent.
    pub observed_share_a: f64,
}

/// Runs `flows` new flows through a weighted Maglev table built by meshd's own builder.
pub fn observed_split(flows: usize, table_sizes: Vec<u32>) -> Result<Vec<SplitObserved>> {
    in_empty_netns(move || {
        table_sizes
            .iter()
            .map(|m| observed_split_one(flows, *m))
            .collect()
    })
}

fn observed_split_one(flows: usize, m: u32) -> Result<SplitObserved> {
    let mut lb = load_lb(m.max(4096), 1 << 18)?;
    let keys = vec![BACKEND_A.to_string(), BACKEND_B.to_string()];
    let table = crate::split::maglev::build_table(&keys, &[0.8, 0.2], m);
    ensure!(
        table.len() == m as usize,
        "Maglev table of {} entries",
        table.len()
    );
    // Builder indices 0/1 are backend ids 1/2.
    let ids: Vec<u32> = table.iter().map(|i| i + 1).collect();
    let mut service = svc(1, VIP, 0, &[(1, BACKEND_A), (2, BACKEND_B)]);
    service.table_size = m;
    lb.install(&service)?;
    lb.write_maglev(0, &ids)?;
    let table_share_a = 100.0 * ids.iter().filter(|i| **i == 1).count() as f64 / f64::from(m);
    progress(&format!(
        "split quality: {flows} new flows over an 80/20 Maglev table of {m}"
    ));
    let mut rng = Rng::new(0x5917 + u64::from(m));
    for i in 0..flows {
        // Random client addresses and ports, like many clients.
        let r = rng.next();
        let src = SocketAddr::new(
            format!("198.18.{}.{}", 8 + (r >> 8) % 100, 1 + (r >> 16) % 250)
                .parse()
                .expect("valid"),
            1024 + ((r >> 32) % 60_000) as u16 + (i % 2) as u16,
        );
        lb.run(&udp(src, sa(VIP))?)?;
    }
    let a = lb.backend_stats(1)?.connections as f64;
    let b = lb.backend_stats(2)?.connections as f64;
    ensure!(a + b > 0.0, "no flow reached a backend");
    Ok(SplitObserved {
        table_size: m,
        flows: (a + b) as usize,
        table_share_a,
        observed_share_a: 100.0 * a / (a + b),
    })
}
