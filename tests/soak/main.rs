//! `mesh-soak`, the job of `cargo xtask soak --minutes N`: mixed L4 (kernel path) and L7
//! (proxy) load against a real meshd in namespaces for N minutes, the weights shifting every
//! second and meshd restarting every minute, then a flood phase; reports requests, errors by
//! kind, restarts, meshd's file descriptors and memory over time, and writes the report
//! (`docs/reliability.md` with `--docs`).
//!
//! `setup.rs` builds the node and applies rules, `traffic.rs` runs the load, `probe.rs` samples
//! meshd's /proc, `flood.rs` is the flood phase, `report.rs` renders the Markdown.

mod flood;
mod probe;
mod report;
mod setup;
mod traffic;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    probe::Probe,
    report::{Figures, Restart},
    setup::Node,
    traffic::Tally,
};

const HELP: &str = "mesh-soak: mesh's soak run (run it with `cargo xtask soak`)

Usage: mesh-soak [--minutes N] [--held N] [--out DIR] [--docs FILE]

  --minutes N   minutes of mixed load (default 3); meshd restarts once a minute
  --held N      long-lived L4 connections that must survive everything (default 20)
  --out DIR     where report.md goes (default target/soak)
  --docs FILE   also write the report there (cargo xtask soak: docs/reliability.md)
  -h, --help    this help

Needs root (namespaces, BPF) and the meshd/meshctl binaries (MESH_BIN_DIR).";

struct Args {
    minutes: u64,
    held: usize,
    out: PathBuf,
    docs: Option<PathBuf>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        minutes: 3,
        held: 20,
        out: PathBuf::from("target/soak"),
        docs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--minutes" => args.minutes = value()?.parse().context("--minutes")?,
            "--held" => args.held = value()?.parse().context("--held")?,
            "--out" => args.out = value()?.into(),
            "--docs" => args.docs = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n\n{HELP}"),
        }
    }
    if args.minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    Ok(Some(args))
}

/// The v1/v2/v3 weights at second `t`: a slow rotation v1 -> v2 -> v3 -> v1 in steps of 10.
fn weights(t: u64) -> [u32; 3] {
    let s = (t % 30) as u32;
    let k = (s % 10) * 10;
    match s / 10 {
        0 => [100 - k, k, 0],
        1 => [0, 100 - k, k],
        _ => [k, 0, 100 - k],
    }
}

/// The first line of an error, without the run's temp paths (a stable error kind).
fn error_kind(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let line = text.lines().next().unwrap_or("").to_string();
    line.chars().take(120).collect()
}

fn soak(args: &Args) -> Result<Figures> {
    let started = Instant::now();
    let node = Node::build()?;
    let mut meshd = Some(node.start_meshd()?);
    node.apply_weights(weights(0))?;
    let tally = Arc::new(Tally::default());
    let probe = Probe::start(started);
    probe
        .pid
        .store(meshd.as_ref().map_or(0, |m| m.pid()), Ordering::Relaxed);
    let threads = traffic::start(&node.topo.client, &tally, args.held);

    let mut applies_ok = 0;
    let mut applies_failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut restarts = Vec::new();
    let end = started + Duration::from_secs(args.minutes * 60);
    let mut next_restart = started + Duration::from_secs(60);
    let mut tick = 0u64;
    while Instant::now() < end {
        tick += 1;
        let due = started + Duration::from_secs(tick);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if Instant::now() >= next_restart && Instant::now() < end {
            let at = started.elapsed().as_secs_f64();
            let before = node.applied_rules()?;
            tally.restarting.store(true, Ordering::Relaxed);
            probe.pid.store(0, Ordering::Relaxed);
            let t0 = Instant::now();
            if let Some(m) = meshd.take() {
                m.stop()?;
            }
            let fresh = node.start_meshd()?;
            let down = t0.elapsed().as_secs_f64();
            probe.pid.store(fresh.pid(), Ordering::Relaxed);
            meshd = Some(fresh);
            tally.restarting.store(false, Ordering::Relaxed);
            let rules_kept = node.applied_rules()? == before;
            eprintln!("soak: restart at {at:.0}s, down {down:.2}s, rules kept: {rules_kept}");
            restarts.push(Restart {
                at,
                down,
                rules_kept,
            });
            next_restart += Duration::from_secs(60);
            continue;
        }
        match node.apply_weights(weights(tick)) {
            Ok(()) => applies_ok += 1,
            Err(e) => *applies_failed.entry(error_kind(&e)).or_insert(0) += 1,
        }
        if tick.is_multiple_of(15) {
            eprintln!(
                "soak: {:.0}s: {} L4, {} L7 ok, {} errors",
                started.elapsed().as_secs_f64(),
                tally.l4_ok.load(Ordering::Relaxed),
                tally.l7_ok.load(Ordering::Relaxed),
                tally.errors.lock().expect("lock").values().sum::<u64>()
            );
        }
    }
    tally.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("soak: load done after {seconds:.0}s; flood phase");
    let flood = flood::run(&node).map_err(|e| format!("{e:#}"));
    if let Some(pid) = meshd.as_ref().map(|m| m.pid()) {
        if let Some(s) = probe::sample(pid, started.elapsed().as_secs_f64()) {
            probe.samples.lock().expect("lock").push(s);
        }
    }
    let samples = probe.finish();
    if let Some(m) = meshd.take() {
        m.stop()?;
    }
    let errors = tally.errors.lock().expect("lock").clone();
    let held_lost = tally.held_lost.lock().expect("lock").clone();
    Ok(Figures {
        minutes: args.minutes,
        seconds,
        l4_ok: tally.l4_ok.load(Ordering::Relaxed),
        l7_ok: tally.l7_ok.load(Ordering::Relaxed),
        held_opened: tally.held_opened.load(Ordering::Relaxed),
        held_ok: tally.held_ok.load(Ordering::Relaxed),
        held_lost,
        errors,
        applies_ok,
        applies_failed,
        restarts,
        samples,
        flood,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-soak: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    mesh_tests::netns::sweep_stale();
    // The tree's state before anything is written (the report itself changes it).
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(mesh_tests::fuzz::repo_root())
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(true);
    let figures = match soak(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mesh-soak: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let text = report::render(&figures, dirty);
    println!("{text}");
    let _ = std::fs::create_dir_all(&args.out);
    let mut targets = vec![args.out.join("report.md")];
    targets.extend(args.docs.clone());
    for path in targets {
        if let Err(e) = std::fs::write(&path, &text) {
            eprintln!("mesh-soak: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("mesh-soak: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
