//! The fuzzing harness shared by the `tests/fuzz_*.rs` targets (config YAML, admin API
//! requests, packets through BPF_PROG_TEST_RUN).
//!
//! Every input is a byte string, so one corpus format serves all targets: a directory of files
//! under `tests/fuzz-corpus/<target>/` holding hand-made seeds (`seed-*`) and the minimal
//! inputs of failures found earlier (`regression-*`). A run first replays the corpus (plus the
//! target's extra seeds, e.g. `config/` and the bad-input corpus), then generates inputs with
//! proptest (mutations of the seeds, structured and random inputs) until its budget is spent.
//! A failing input is shrunk by proptest to a minimal one; with `MESH_FUZZ_SAVE=1` (`cargo
//! xtask fuzz`) it is written into the corpus as a new regression case.
//!
//! Budget: `MESH_FUZZ_SECONDS=N` runs for N seconds (`cargo xtask fuzz`); otherwise the
//! target's small case count (`cargo xtask test`), or `MESH_FUZZ_CASES`. `MESH_FUZZ_SEED`
//! replays one generator seed. Each run prints one summary line and writes it as JSON to
//! `target/fuzz/<target>.json` (read by `cargo xtask fuzz` and the soak report).

pub mod corpus;
pub mod mutate;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    time::{Duration, Instant},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner},
};

pub use corpus::Corpus;

/// How long a target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// Generated cases (after the corpus replay).
    Cases(u32),
    /// Wall-clock seconds of generation (after the corpus replay).
    Seconds(u64),
}

impl Budget {
    /// From the environment (`MESH_FUZZ_SECONDS`, `MESH_FUZZ_CASES`), else `default_cases`.
    pub fn from_env(default_cases: u32) -> Budget {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        if let Some(seconds) = var("MESH_FUZZ_SECONDS") {
            Budget::Seconds(seconds)
        } else if let Some(cases) = var("MESH_FUZZ_CASES") {
            Budget::Cases(cases as u32)
        } else {
            Budget::Cases(default_cases)
        }
    }
}

/// One failure: what failed and the (shrunk) input.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The invariant that broke.
    pub message: String,
    /// The minimal failing input.
    pub input: Vec<u8>,
    /// Where it was saved in the corpus, if it was.
    pub saved: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// Corpus inputs replayed (seeds and regressions).
    pub corpus_cases: u64,
    /// Generated inputs checked (including proptest's shrinking steps).
    pub generated_cases: u64,
    /// Distinct failures.
    pub failures: Vec<Failure>,
    /// Seconds spent.
    pub seconds: f64,
    /// Generator seed of the first batch (`MESH_FUZZ_SEED` replays it).
    pub seed: u64,
}

impl Report {
    /// Total cases run.
    pub fn cases(&self) -> u64 {
        self.corpus_cases + self.generated_cases
    }

    /// The one-line summary (also what `cargo xtask fuzz` prints per target).
    pub fn summary(&self) -> String {
        format!(
            "fuzz {}: {} cases ({} from the corpus, {} generated) in {:.1}s, {} failures (seed {})",
            self.target,
            self.cases(),
            self.corpus_cases,
            self.generated_cases,
            self.seconds,
            self.failures.len(),
            self.seed
        )
    }

    /// Panics with every failure (hex input and, if saved, its file) unless there was none.
    pub fn assert_clean(&self) {
        if self.failures.is_empty() {
            return;
        }
        let mut text = self.summary();
        for f in &self.failures {
            text.push_str(&format!(
                "\n- {}\n  input ({} bytes): ",
                f.message,
                f.input.len()
            ));
            text.push_str(&mutate::escape(&f.input));
            if let Some(path) = &f.saved {
                text.push_str(&format!("\n  saved as {}", path.display()));
            }
        }
        panic!("{text}");
    }

    fn write_json(&self) {
        let dir = target_dir().join("fuzz");
        let _ = std::fs::create_dir_all(&dir);
        let json = serde_json::json!({
            "target": self.target,
            "cases": self.cases(),
            "corpus_cases": self.corpus_cases,
            "generated_cases": self.generated_cases,
            "failures": self.failures.len(),
            "saved": self.failures.iter().filter_map(|f| f.saved.as_ref()).map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "seconds": self.seconds,
            "seed": self.seed,
        });
        let _ = std::fs::write(dir.join(format!("{}.json", self.target)), json.to_string());
    }
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs `check` over the corpus, then over inputs from `strategy` until `budget` is spent.
/// `check` returns `Err(what broke)`; a panic inside it counts as a failure too.
pub fn run<S, F>(corpus: &Corpus, budget: Budget, strategy: S, mut check: F) -> Report
where
    S: Strategy<Value = Vec<u8>>,
    F: FnMut(&[u8]) -> Result<(), String>,
{
    let started = Instant::now();
    let mut failures: Vec<Failure> = Vec::new();
    let record = |message: String, input: Vec<u8>, failures: &mut Vec<Failure>| {
        if failures.iter().any(|f| f.input == input) {
            return;
        }
        let saved = corpus.save_regression(&input);
        failures.push(Failure {
            message,
            input,
            saved,
        });
    };

    let inputs = corpus.inputs();
    for (name, input) in &inputs {
        if let Err(message) = guarded(&mut check, input) {
            // A corpus input is already minimal and stored: report it, do not save it again.
            failures.push(Failure {
                message: format!("corpus input {name}: {message}"),
                input: input.clone(),
                saved: None,
            });
        }
    }
    let corpus_cases = inputs.len() as u64;

    let seed = std::env::var("MESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(fresh_seed);
    let mut generated_cases = 0u64;
    let mut batch_seed = seed;
    loop {
        let batch = match budget {
            Budget::Cases(total) => {
                let left = u64::from(total).saturating_sub(generated_cases);
                if left == 0 {
                    break;
                }
                left.min(256) as u32
            }
            Budget::Seconds(s) => {
                if started.elapsed() >= Duration::from_secs(s) {
                    break;
                }
                64
            }
        };
        let config = Config {
            cases: batch,
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        };
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&batch_seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let count = std::cell::Cell::new(0u64);
        let cell = std::cell::RefCell::new(&mut check);
        let outcome = runner.run(&strategy, |input| {
            count.set(count.get() + 1);
            (cell.borrow_mut())(&input).map_err(TestCaseError::fail)
        });
        generated_cases += count.get().max(1);
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(reason, input)) => {
                record(reason.to_string(), input, &mut failures);
            }
            Err(TestError::Abort(reason)) => {
                failures.push(Failure {
                    message: format!("generator aborted: {reason}"),
                    input: Vec::new(),
                    saved: None,
                });
                break;
            }
        }
        batch_seed = batch_seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
    }

    let report = Report {
        target: corpus.target.clone(),
        corpus_cases,
        generated_cases,
        failures,
        seconds: started.elapsed().as_secs_f64(),
        seed,
    };
    report.write_json();
    eprintln!("{}", report.summary());
    report
}

/// `check(input)` with a panic turned into a failure.
fn guarded<F: FnMut(&[u8]) -> Result<(), String>>(
    check: &mut F,
    input: &[u8],
) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| check(input))) {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}
