//! Section 1, trace check: what `meshctl trace`'s kernel hook costs an established-flow packet
//! while no trace runs, against the same object loaded with the check compiled out (the
//! `.rodata` switch `TRACE_AVAILABLE` = 0, which the verifier turns into dead code), and while a
//! trace runs for another client (the filter is read and compared, nothing is emitted). And
//! kernel debug logging (`meshd --kernel-log debug`) against off: its log points are off the
//! established-flow path, and off the verifier removes them (the translated size shows it).
//!
//! Hot loop through BPF_PROG_TEST_RUN on a self-mapped service (the frame stays byte-identical,
//! see `micro.rs`), rounds interleaved across the three loads so drift hits them alike.

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use mesh_common::{
    map_names, TraceFilter, PROTO_UDP, TRACE_AVAILABLE_GLOBAL, TRACE_MATCH_CLIENT_ADDR,
    XDP_PROGRAM_NAME,
};
use mesh_tests::{
    maps::{addr_bytes, Lb, Service, LOG_LEVEL_GLOBAL},
    packet::Frame,
    EBPF_OBJECT,
};

use crate::util::{median, progress, Plan};

const CLIENT: &str = "198.18.1.2:40000";
const SELF_VIP: &str = "198.18.100.2:8082";

/// Median hot-loop ns per packet of each variant.
#[derive(Clone, Debug)]
pub struct TraceCost {
    /// Check compiled out (`TRACE_AVAILABLE` = 0).
    pub without_check_ns: f64,
    /// Default object, no trace running (the production case).
    pub off_ns: f64,
    /// A trace running for another client.
    pub other_client_ns: f64,
    /// Default object, no trace, kernel log at debug level.
    pub kernel_log_ns: f64,
    /// Bytes of the program after the verifier: kernel log off, and at debug level.
    pub translated_bytes: (u32, u32),
}

/// aya-log levels: off (meshd's default) and debug (`--kernel-log debug`).
const LOG_OFF: u8 = 0;
const LOG_DEBUG: u8 = 4;

fn load(trace_available: u8, log_level: u8) -> Result<Lb> {
    let mut ebpf = EbpfLoader::new()
        .override_global(TRACE_AVAILABLE_GLOBAL, &trace_available, true)
        .override_global(LOG_LEVEL_GLOBAL, &log_level, true)
        .map_max_entries(map_names::MAGLEV, 2 * 1024)
        .map_max_entries(map_names::CONNTRACK, 1024)
        .load(EBPF_OBJECT)
        .context("loading the BPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM_NAME)
        .context("mesh_xdp missing")?
        .try_into()?;
    prog.load().context("verifying mesh_xdp")?;
    let mut lb = Lb {
        ebpf,
        hook: mesh_tests::maps::Hook::Xdp,
    };
    let vip: SocketAddr = SELF_VIP.parse()?;
    lb.install(&Service {
        id: 1,
        addr: vip,
        proto: PROTO_UDP,
        flags: 0,
        table_offset: 0,
        table_size: 251,
        backends: vec![(1, vip)],
    })?;
    Ok(lb)
}

/// Measures the three variants.
pub fn run(plan: &Plan) -> Result<TraceCost> {
    let plan = plan.clone();
    crate::micro::in_empty_netns(move || measure(&plan))
}

fn measure(plan: &Plan) -> Result<TraceCost> {
    let frame = Frame::udp(CLIENT.parse()?, SELF_VIP.parse()?).build()?;
    let mut variants = [
        load(0, LOG_OFF)?,
        load(1, LOG_OFF)?,
        load(1, LOG_OFF)?,
        load(1, LOG_DEBUG)?,
    ];
    // The third runs a trace for a client that is not this one.
    let mut filter: Array<_, TraceFilter> = Array::try_from(
        variants[2]
            .ebpf
            .map_mut(map_names::TRACE_FILTER)
            .context("TRACE_FILTER")?,
    )?;
    let mut other = TraceFilter {
        enabled: 1,
        fields: TRACE_MATCH_CLIENT_ADDR,
        ..Default::default()
    };
    other.client_addr = addr_bytes("198.18.9.9".parse()?);
    filter.set(0, other, 0)?;
    for lb in &mut variants {
        lb.run(&frame)?; // creates the flow's connection-table entries
    }
    progress(&format!(
        "trace check: {} rounds x {} repeats per variant",
        plan.hot_rounds, plan.hot_repeat
    ));
    let mut ns: [Vec<f64>; 4] = Default::default();
    for _ in 0..plan.hot_rounds {
        for (k, lb) in variants.iter().enumerate() {
            let prog: &Xdp = lb
                .ebpf
                .program(XDP_PROGRAM_NAME)
                .context("mesh_xdp")?
                .try_into()?;
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: plan.hot_repeat,
                ..Default::default()
            })?;
            ensure!(
                r.return_value == 2,
                "verdict {} (expected XDP_PASS)",
                r.return_value
            );
            ns[k].push(r.duration.as_nanos() as f64);
        }
    }
    let translated = |lb: &Lb| -> Result<u32> {
        let prog: &Xdp = lb
            .ebpf
            .program(XDP_PROGRAM_NAME)
            .context("mesh_xdp")?
            .try_into()?;
        Ok(prog.info()?.size_translated().unwrap_or(0))
    };
    Ok(TraceCost {
        without_check_ns: median(&ns[0]),
        off_ns: median(&ns[1]),
        other_client_ns: median(&ns[2]),
        kernel_log_ns: median(&ns[3]),
        translated_bytes: (translated(&variants[1])?, translated(&variants[3])?),
    })
}

/// The report's paragraph.
pub fn markdown(r: &Result<TraceCost, String>) -> String {
    match r {
        Err(e) => format!("\n### Trace check\n\nNot measured: {e}\n"),
        Ok(c) => format!(
            "\n### Trace check (`meshctl trace`)\n\n\
             Established IPv4 flow, hot loop, median ns per packet:\n\n\
             | object | ns/packet | vs. without the check |\n|---|---|---|\n\
             | check compiled out (`TRACE_AVAILABLE` = 0) | {:.1} | 1.000 |\n\
             | default, no trace running | {:.1} | {:.3} |\n\
             | default, a trace running for another client | {:.1} | {:.3} |\n\
             | default, kernel log at debug (`--kernel-log debug`), no trace | {:.1} | {:.3} |\n\n\
             With no trace running the hook is one read of the one-entry `TRACE_FILTER` array \
             (inlined by the verifier) and a compare. The kernel log points (refusals, table \
             inconsistencies, connection-table repairs) are off this path; with logging off \
             (meshd's default) the verifier removes them: `mesh_xdp` is {} bytes after \
             verification with logging off, {} at debug level.\n",
            c.without_check_ns,
            c.off_ns,
            c.off_ns / c.without_check_ns,
            c.other_client_ns,
            c.other_client_ns / c.without_check_ns,
            c.kernel_log_ns,
            c.kernel_log_ns / c.without_check_ns,
            c.translated_bytes.0,
            c.translated_bytes.1,
        ),
    }
}
