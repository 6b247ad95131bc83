//! `cargo xtask fuzz`: runs the fuzz targets (`tests/fuzz_*.rs`) for a given time each instead
//! of the few hundred cases `cargo xtask test` gives them, saves the minimal input of every
//! failure into the target's corpus (`tests/fuzz-corpus/<target>/regression-*`), and prints
//! cases run and failures per target from the summaries the harness writes to
//! `target/fuzz/<run>.json`.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};
use clap::Args;

/// The targets: name, test binary, the runs it reports (one per entry point for packets).
const TARGETS: &[(&str, &str, &[&str])] = &[
    ("config", "fuzz_config", &["config"]),
    ("admin", "fuzz_admin", &["admin"]),
    ("packets", "fuzz_packets", &["packets-xdp", "packets-tc"]),
];

#[derive(Args)]
pub struct FuzzArgs {
    /// Run one target only: `config` (Istio YAML through parse, validate and compile),
    /// `admin` (raw HTTP requests to a real meshd's admin socket) or `packets` (frames through
    /// the XDP and TC programs with BPF_PROG_TEST_RUN). Default: all three, one after another.
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Seconds of generated inputs per target (after the corpus is replayed).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Do not write failing inputs into the corpus (they are printed either way).
    #[arg(long)]
    pub no_save: bool,
}

/// Runs the chosen targets; fails when any target found a failure.
pub fn run(args: &FuzzArgs, root: &Path) -> Result<()> {
    let chosen: Vec<_> = TARGETS
        .iter()
        .filter(|(name, _, _)| args.target.as_deref().is_none_or(|t| t == *name))
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = TARGETS.iter().map(|(n, _, _)| *n).collect();
        bail!(
            "no fuzz target {:?}; targets: {}",
            args.target,
            names.join(", ")
        );
    }
    let mut rows = Vec::new();
    let mut failed = false;
    for (name, test, runs) in chosen {
        crate::step(&format!("fuzzing {name} for {}s", args.seconds));
        for run in *runs {
            let _ = std::fs::remove_file(summary_path(root, run));
        }
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "test",
            "-p",
            "mesh-tests",
            "--test",
            test,
            "--",
            "--nocapture",
        ])
        .env("MESH_FUZZ_SECONDS", args.seconds.to_string())
        .env("MESH_FUZZ_SAVE", if args.no_save { "0" } else { "1" });
        // The test fails when the target found something; the summary says what.
        let status = cmd.status().context("running cargo test")?;
        for run in *runs {
            match read_summary(root, run) {
                Some(s) => {
                    failed |= s.failures > 0;
                    rows.push(s);
                }
                None => {
                    failed = true;
                    rows.push(Summary::missing(run, status.success()));
                }
            }
        }
    }
    println!(
        "\n{:<12} {:>10} {:>10} {:>9} {:>8}  saved",
        "target", "cases", "corpus", "failures", "seconds"
    );
    for s in &rows {
        println!(
            "{:<12} {:>10} {:>10} {:>9} {:>8.1}  {}",
            s.target,
            s.cases,
            s.corpus,
            s.failures,
            s.seconds,
            if s.saved.is_empty() {
                "-".to_string()
            } else {
                s.saved.join(", ")
            }
        );
    }
    if failed {
        bail!("fuzzing found failures (inputs printed above; saved ones are now regression cases)");
    }
    Ok(())
}

struct Summary {
    target: String,
    cases: u64,
    corpus: u64,
    failures: u64,
    seconds: f64,
    saved: Vec<String>,
}

impl Summary {
    fn missing(run: &str, passed: bool) -> Summary {
        Summary {
            target: format!(
                "{run} (no summary: the test {})",
                if passed {
                    "did not run"
                } else {
                    "failed to run"
                }
            ),
            cases: 0,
            corpus: 0,
            failures: 1,
            seconds: 0.0,
            saved: Vec::new(),
        }
    }
}

fn summary_path(root: &Path, run: &str) -> std::path::PathBuf {
    root.join("target/fuzz").join(format!("{run}.json"))
}

fn read_summary(root: &Path, run: &str) -> Option<Summary> {
    let text = std::fs::read_to_string(summary_path(root, run)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(Summary {
        target: run.to_string(),
        cases: v["cases"].as_u64()?,
        corpus: v["corpus_cases"].as_u64()?,
        failures: v["failures"].as_u64()?,
        seconds: v["seconds"].as_f64()?,
        saved: v["saved"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
}
