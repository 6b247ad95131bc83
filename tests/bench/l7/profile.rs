//! Where the proxy's CPU goes: `perf record` under the keep-alive load and `perf stat`
//! instructions per request.

use super::*;

/// Where one system's CPU goes under the keep-alive load (`perf record` of every process in
/// its node namespace).
#[derive(Clone, Debug)]
pub struct Profile {
    pub system: L7System,
    /// Percent of samples in the kernel, in the proxy's own binary, in libc, elsewhere.
    pub kernel: f64,
    pub own: f64,
    pub libc: f64,
    pub other: f64,
    /// The top symbols (self time), as `perf report` prints them.
    pub top: String,
}

/// Every process in the proxy's namespace (the proxy, all its threads and processes).
fn node_pids(setup: &Setup) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "pids", setup.topo.node.name()])
        .output()?;
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if pids.is_empty() {
        bail!("no process in the node namespace");
    }
    Ok(pids)
}

/// `perf record -g` of the proxy's processes during a keep-alive wrk run.
pub(super) fn profile(setup: &Setup, wrk: &str, perf: &str) -> Result<Profile> {
    let data = setup._dir.0.join("perf.data");
    let pids = node_pids(setup)?;
    let child = wrk_spawn(wrk, setup, 5, false)?;
    std::thread::sleep(Duration::from_millis(700));
    let rec = Command::new("timeout")
        .args([
            "30",
            perf,
            "record",
            "-q",
            "-F",
            "999",
            "-g",
            "-p",
            &pids.join(","),
        ])
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let _ = wrk_finish(child, Duration::from_secs(30));
    if !rec.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&rec.stderr).trim()
        );
    }
    let report = |sort: &str, limit: &str, lines: usize| -> Result<Vec<String>> {
        let out = Command::new("timeout")
            .args(["120", perf, "report", "-i"])
            .arg(&data)
            .args([
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--percent-limit",
                limit,
                "--sort",
                sort,
            ])
            .stderr(Stdio::null())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(lines)
            .map(|l| {
                let l = l.trim_end();
                if l.len() > 140 {
                    format!("{}...", &l[..l.floor_char_boundary(137)])
                } else {
                    l.to_string()
                }
            })
            .collect())
    };
    let own = setup.system.binary_name();
    let mut p = Profile {
        system: setup.system,
        kernel: 0.0,
        own: 0.0,
        libc: 0.0,
        other: 0.0,
        top: report("dso,sym", "0.8", 25)?.join("\n"),
    };
    for line in report("dso", "0", 50)? {
        let mut it = line.split_whitespace();
        let (Some(pct), Some(name)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = pct.trim_end_matches('%').parse::<f64>() else {
            continue;
        };
        if name.starts_with("[kernel") {
            p.kernel += v;
        } else if name == own {
            p.own += v;
        } else if name.starts_with("libc") {
            p.libc += v;
        } else {
            p.other += v;
        }
    }
    Ok(p)
}

/// `perf stat` of the proxy's processes over one keep-alive run: (user, kernel) instructions
/// per request, requests counted by the backends over perf's whole window.
pub(super) fn instructions_per_request(
    setup: &Setup,
    perf: &str,
    secs: u64,
    load: impl FnOnce() -> Result<Run>,
) -> Result<(f64, f64)> {
    let pids = node_pids(setup)?;
    let (a0, b0) = setup.counts();
    let stat = Command::new("timeout")
        .args([
            "60",
            perf,
            "stat",
            "-x",
            ",",
            "-e",
            "instructions:u,instructions:k",
            "-p",
        ])
        .arg(pids.join(","))
        .args(["--", "sleep"])
        .arg((secs + 1).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf stat")?;
    std::thread::sleep(Duration::from_millis(300));
    let loaded = load();
    let out = stat.wait_with_output()?;
    let (a1, b1) = setup.counts();
    loaded?;
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let count = |event: &str| {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let requests = (a1 + b1).saturating_sub(a0 + b0) as f64;
    match (count("instructions:u"), count("instructions:k")) {
        (Some(u), Some(k)) if requests > 0.0 => Ok((u / requests, k / requests)),
        _ => bail!("perf stat gave no instruction counts: {}", text.trim()),
    }
}
