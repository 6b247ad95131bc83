//! Small shared pieces of the benchmark: run-size settings, robust statistics, a deterministic
//! PRNG, bounded waiting, and progress output.

use std::time::Duration;

/// How big each measurement is: `--quick` (seconds, for the test suite) or full.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Repeats per BPF_PROG_TEST_RUN call in the hot-loop method.
    pub hot_repeat: u32,
    /// Rounds of every hot-loop case (the median is reported).
    pub hot_rounds: usize,
    /// Single-run calls per case.
    pub single_runs: usize,
    /// Service counts of the scale section.
    pub scale_sizes: Vec<usize>,
    /// Single-run calls per size in the scale section.
    pub scale_runs: usize,
    /// Flows for the split-quality section.
    pub split_flows: usize,
    /// Backend counts for the disruption curve.
    pub disruption_sizes: Vec<usize>,
    /// Forwarding: seconds per measured interval and number of intervals.
    pub fwd_interval: Duration,
    pub fwd_rounds: usize,
    /// Time limit for one meshd start or apply in the scale section.
    pub apply_timeout: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                hot_repeat: 100_000,
                hot_rounds: 3,
                single_runs: 3_000,
                scale_sizes: vec![1, 100],
                scale_runs: 2_000,
                split_flows: 20_000,
                disruption_sizes: vec![2, 3, 5, 10, 20, 50, 100],
                fwd_interval: Duration::from_millis(400),
                fwd_rounds: 2,
                apply_timeout: Duration::from_secs(20),
            }
        } else {
            Plan {
                quick,
                hot_repeat: 2_000_000,
                hot_rounds: 7,
                single_runs: 100_000,
                scale_sizes: vec![1, 1_000, 10_000, 30_000],
                scale_runs: 50_000,
                split_flows: 100_000,
                disruption_sizes: vec![
                    2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 75, 90, 100,
                ],
                fwd_interval: Duration::from_secs(3),
                fwd_rounds: 5,
                apply_timeout: Duration::from_secs(300),
            }
        }
    }
}

/// Median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile of `v` (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    s[rank.min(s.len() - 1)]
}

/// xorshift64*: deterministic, seedable, good enough to pick services and ports.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Progress line on stderr.
pub fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Formats a number with a fixed number of decimals, or "n/a" for NaN.
pub fn f(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_string()
    }
}
