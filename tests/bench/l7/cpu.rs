//! CPU accounting around a run: /proc/stat busy shares per CPU and the CPU time of every
//! process in a namespace.

use super::*;

/// (busy, total) jiffies per CPU from /proc/stat.
pub(super) fn cpu_ticks() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut out = Vec::new();
    for line in stat.lines() {
        let mut it = line.split_whitespace();
        let Some(name) = it.next() else { continue };
        if name.len() <= 3 || !name.starts_with("cpu") {
            continue;
        }
        let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        out.push((total - idle, total));
    }
    out
}

/// CPU time (user + system, clock ticks) of every process inside `ns`: the proxy, all its
/// threads and processes (nginx's master and worker), and nothing else.
pub(super) fn ns_cpu_ticks(ns: &Netns) -> u64 {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let v: Vec<u64> = after
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            v.get(11).copied().unwrap_or(0) + v.get(12).copied().unwrap_or(0)
        })
        .sum()
}

pub(super) fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub(super) fn busy_pct(a: &[(u64, u64)], b: &[(u64, u64)], cpu: usize) -> f64 {
    match (a.get(cpu), b.get(cpu)) {
        (Some(x), Some(y)) if y.1 > x.1 => 100.0 * (y.0 - x.0) as f64 / (y.1 - x.1) as f64,
        _ => f64::NAN,
    }
}

pub(super) fn share(a: u64, b: u64) -> f64 {
    if a + b == 0 {
        f64::NAN
    } else {
        100.0 * a as f64 / (a + b) as f64
    }
}
