//! Checks of random splits with a tolerance derived from the sample size.
//!
//! Every test or demo that counts where randomly spread traffic landed (per-connection Maglev
//! with kernel-chosen source ports, per-request weights, mirror percentages) goes through this
//! module. The count of one destination among `n` independent samples is binomial(n, p); the
//! tolerance is the smallest deviation whose two-sided tail probability is below
//! [`FALSE_FAILURE_PER_SHARE`], computed exactly, so a correct data path fails a check less than
//! once in ten million runs per share (below one in a million for a test with up to ten shares
//! checked). A fixed percentage would be either flaky for small samples or blind for large ones.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};

/// Probability that a correct split fails one share check by chance.
pub const FALSE_FAILURE_PER_SHARE: f64 = 1e-7;

/// Allowance for the difference between the configured share and the probability the data path
/// really uses: Maglev apportions slots to within 1/M (M >= 4093), the proxy's weights are
/// integers. Small against any tolerance a test can reach.
pub const MODEL_SLACK: f64 = 0.001;

/// Largest deviation `|observed/n - p|` a correct binomial(n, p) split shows except with
/// probability [`FALSE_FAILURE_PER_SHARE`], plus [`MODEL_SLACK`].
pub fn tolerance(n: usize, p: f64) -> f64 {
    deviation_bound(n, p, FALSE_FAILURE_PER_SHARE) + MODEL_SLACK
}

/// Smallest `d/n` such that `P(|X - np| > d) <= alpha` for X ~ binomial(n, p), from the exact
/// probability mass function (log space, so large `n` does not underflow).
pub fn deviation_bound(n: usize, p: f64, alpha: f64) -> f64 {
    assert!((0.0..=1.0).contains(&p), "share {p} is not a probability");
    if n == 0 {
        return 1.0;
    }
    if p == 0.0 || p == 1.0 {
        return 0.0;
    }
    let mean = n as f64 * p;
    // ln k! for k in 0..=n.
    let mut ln_fact = Vec::with_capacity(n + 1);
    ln_fact.push(0.0f64);
    for k in 1..=n {
        ln_fact.push(ln_fact[k - 1] + (k as f64).ln());
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // Every outcome with its distance from the mean, farthest first; the tail mass grows as the
    // distance shrinks, and the bound is the distance where it would pass alpha.
    let mut outcomes: Vec<(f64, f64)> = (0..=n)
        .map(|k| {
            let ln_pmf =
                ln_fact[n] - ln_fact[k] - ln_fact[n - k] + k as f64 * lp + (n - k) as f64 * lq;
            ((k as f64 - mean).abs(), ln_pmf.exp())
        })
        .collect();
    outcomes.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut tail = 0.0;
    let mut i = 0;
    while i < outcomes.len() {
        // All outcomes at this same distance enter the tail together.
        let distance = outcomes[i].0;
        let mut mass = 0.0;
        while i < outcomes.len() && outcomes[i].0 == distance {
            mass += outcomes[i].1;
            i += 1;
        }
        if tail + mass > alpha {
            // Deviations strictly beyond `distance` are rare enough; this one is not.
            return distance / n as f64;
        }
        tail += mass;
    }
    0.0
}

/// Checks that `count` of `n` samples is a plausible binomial draw with probability `share`;
/// the error names `what`, the figures and the tolerance.
pub fn check_share(what: &str, count: usize, n: usize, share: f64) -> Result<()> {
    let observed = count as f64 / n.max(1) as f64;
    let tolerance = tolerance(n, share);
    ensure!(
        (observed - share).abs() <= tolerance,
        "{what}: observed share {observed:.3} ({count} of {n}), configured {share:.3} \
         (tolerance {tolerance:.3} for {n} samples)"
    );
    Ok(())
}

/// Checks every observed share is within the binomial tolerance of the expected one, and
/// nothing else answered.
pub fn assert_shares(seen: &BTreeMap<String, usize>, expected: &[(&str, f64)]) -> Result<()> {
    let total: usize = seen.values().sum();
    for identity in seen.keys() {
        ensure!(
            expected.iter().any(|(e, _)| e == identity),
            "connections reached unexpected backend {identity}: {seen:?}"
        );
    }
    for (identity, share) in expected {
        let count = *seen.get(*identity).unwrap_or(&0);
        check_share(identity, count, total, *share).map_err(|e| e.context(format!("{seen:?}")))?;
    }
    Ok(())
}

/// [`assert_shares`] for backends named `v1`, `v2`, ... with these weights (shares are
/// `weight / sum`, as Istio's).
pub fn assert_weights(seen: &BTreeMap<String, usize>, weights: &[u32]) -> Result<()> {
    let sum: u32 = weights.iter().sum();
    let names: Vec<String> = (1..=weights.len()).map(|i| format!("v{i}")).collect();
    let expected: Vec<(&str, f64)> = names
        .iter()
        .zip(weights)
        .map(|(name, w)| (name.as_str(), f64::from(*w) / f64::from(sum.max(1))))
        .collect();
    assert_shares(seen, &expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_normal_approximation_for_large_samples() {
        // 5.33 standard deviations for 1e-7 two-sided.
        let d = deviation_bound(10_000, 0.5, 1e-7);
        let sigma = (0.25f64 / 10_000.0).sqrt();
        assert!((d / sigma - 5.33).abs() < 0.1, "{}", d / sigma);
    }

    #[test]
    fn the_flaky_sandbox_case_is_covered() {
        // 100 requests at 50/50 showed 60/40 and 44/56 in CI: a correct split.
        assert!(tolerance(100, 0.5) >= 0.10);
        assert!(check_share("v1", 60, 100, 0.5).is_ok());
        // A broken split is still caught.
        assert!(check_share("v1", 90, 100, 0.5).is_err());
        assert!(check_share("v1", 0, 1000, 0.2).is_err());
    }

    #[test]
    fn certain_shares_allow_no_deviation() {
        assert_eq!(deviation_bound(200, 1.0, 1e-7), 0.0);
        assert!(check_share("v3", 199, 200, 1.0).is_err());
        assert!(check_share("v3", 200, 200, 1.0).is_ok());
    }

    #[test]
    fn tail_beyond_the_bound_is_below_alpha() {
        // Brute force for a small case: P(|X - np| > d) summed directly.
        let (n, p, alpha) = (60usize, 0.3f64, 1e-4);
        let d = deviation_bound(n, p, alpha) * n as f64;
        let mut tail = 0.0;
        for k in 0..=n {
            if (k as f64 - n as f64 * p).abs() > d + 1e-9 {
                let mut c = 1.0f64;
                for i in 0..k {
                    c = c * (n - i) as f64 / (i + 1) as f64;
                }
                tail += c * p.powi(k as i32) * (1.0 - p).powi((n - k) as i32);
            }
        }
        assert!(tail <= alpha, "{tail}");
    }
}
