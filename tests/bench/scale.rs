//! Section 3, control plane, with meshd's default settings (no `maglev.tableSize`, no pool flag):
//! for each N, `meshctl apply` of N ServiceEntries (two endpoints, one VIP each, no
//! DestinationRule) on a running empty meshd, then `meshctl apply` of one changed ServiceEntry,
//! the kernel memory of the maps (`meshctl status`), and a restart: the wall time from starting
//! meshd with that state until it logs `meshd ready` (its admin API answers), and how many
//! services that start rewrote (0 when it adopted the pinned tables).
//!
//! `meshctl apply` returns when the rules are in force (README), so its wall time is the apply
//! time. Each meshd runs in its own namespace with a private socket, pin directory and state
//! file; all are removed on drop, also on failure. Every wait is bounded by `Plan::apply_timeout`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{bin, Meshd},
    netns::{unique_prefix, Netns},
    rules::scale_service_entries,
};

use crate::{util::progress, DirGuard, Plan};

/// Measurements at one size.
#[derive(Clone, Debug)]
pub struct ApplyPoint {
    pub services: usize,
    /// Seconds for `meshctl apply` of the whole set; NaN when it failed (see `error`).
    pub apply_all_s: f64,
    /// Seconds for `meshctl apply` of one changed ServiceEntry (median of the runs).
    pub apply_one_s: f64,
    /// Services the change wrote into the kernel (meshctl's "N written").
    pub one_written: Option<usize>,
    /// Seconds from starting meshd on the pinned maps and the state file to `meshd ready`.
    pub restart_s: f64,
    /// Services the restarted meshd wrote (0: the pinned tables were adopted as they were).
    pub restart_written: Option<usize>,
    /// Maglev pool entries in use, and the kernel memory of all maps, from `meshctl status`.
    pub maglev_entries: u64,
    pub map_memory_bytes: u64,
    /// Size of the YAML applied, bytes.
    pub yaml_bytes: usize,
    pub error: Option<String>,
}

/// Services per YAML file: meshctl refuses files over 4 MiB, so big sets span several files.
const SERVICES_PER_FILE: usize = 2_000;
/// Changed-service applies per size (the median is reported).
const ONE_CHANGE_RUNS: usize = 5;

fn endpoints(second: u8) -> [std::net::IpAddr; 2] {
    [[198, 18, 2, 1].into(), [198, 18, second, 1].into()]
}

/// Runs meshctl with a deadline; returns the wall time and its stderr.
fn meshctl(socket: &Path, args: &[&str], timeout: Duration) -> Result<(f64, String, String)> {
    let started = Instant::now();
    let mut child = Command::new(bin("meshctl")?)
        .arg(args[0])
        .arg("--socket")
        .arg(socket)
        .args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshctl")?;
    let deadline = started + timeout;
    loop {
        if child.try_wait()?.is_some() {
            let secs = started.elapsed().as_secs_f64();
            let out = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            if !out.status.success() {
                bail!(
                    "meshctl {} failed ({}): {}",
                    args[0],
                    out.status,
                    stderr.trim()
                );
            }
            return Ok((secs, stdout, stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("meshctl {} did not return within {timeout:?}", args[0]);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// "(N written, ...)" from meshctl apply's summary line.
fn written(stderr: &str) -> Option<usize> {
    let before = stderr.split(" written").next()?;
    before.rsplit('(').next()?.trim().parse().ok()
}

/// `written=N` from meshd's "rules installed" log line.
fn logged_written(line: &str) -> Option<usize> {
    line.split("written=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn one(n: usize, timeout: Duration) -> Result<ApplyPoint> {
    let prefix = unique_prefix();
    let ns = Netns::create(&format!("{prefix}-scale"))?;
    let dir = std::env::temp_dir().join(format!("{prefix}-bench-scale"));
    std::fs::create_dir_all(&dir)?;
    let _guard = DirGuard(dir.clone());
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{prefix}-bench-scale"));
    let _pins = mesh_tests::meshd::PinDir(pins.clone());
    // The whole set: a directory of files, applied with one `meshctl apply -f <dir>`.
    let all = dir.join("all");
    std::fs::create_dir_all(&all)?;
    let mut yaml_bytes = 0;
    for (k, start) in (0..n).step_by(SERVICES_PER_FILE).enumerate() {
        let yaml = scale_service_entries(
            start..(start + SERVICES_PER_FILE).min(n),
            "UDP",
            8081,
            &endpoints(3),
        );
        yaml_bytes += yaml.len();
        std::fs::write(all.join(format!("part-{k:03}.yaml")), yaml)?;
    }
    // The change alternates the last service's second endpoint, so every run changes it.
    let changes: Vec<std::path::PathBuf> = (0..2)
        .map(|k| {
            let file = dir.join(format!("one-{k}.yaml"));
            let yaml = scale_service_entries(n - 1..n, "UDP", 8081, &endpoints(4 + k as u8));
            std::fs::write(&file, yaml).map(|()| file)
        })
        .collect::<std::io::Result<_>>()?;

    // meshd needs an interface to attach to: a veth pair inside the namespace.
    mesh_tests::netns::sh(
        "ip",
        &[
            "-n",
            ns.name(),
            "link",
            "add",
            "s0",
            "type",
            "veth",
            "peer",
            "name",
            "s1",
        ],
    )?;
    ns.ip(&["link", "set", "s0", "up"])?;
    ns.ip(&["link", "set", "s1", "up"])?;
    let socket = dir.join("meshd.sock");
    let args: Vec<String> = vec![
        "--iface".into(),
        "s0".into(),
        "--no-metrics".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--pin-dir".into(),
        pins.display().to_string(),
        "--state-file".into(),
        dir.join("state.yaml").display().to_string(),
    ];
    let meshd = Meshd::start(&ns, &args)?;
    progress(&format!(
        "meshd: applying {n} services ({} KiB of YAML)",
        yaml_bytes / 1024
    ));
    let all_arg = all.display().to_string();
    let (apply_all_s, _, _) = meshctl(&socket, &["apply", "-f", &all_arg], timeout)?;
    progress(&format!(
        "meshd: {n} services in force after {apply_all_s:.2} s; {ONE_CHANGE_RUNS} single changes"
    ));
    let mut one_times = Vec::new();
    let mut one_written = None;
    for run in 0..ONE_CHANGE_RUNS {
        let file = changes[run % 2].display().to_string();
        let (secs, _, stderr) = meshctl(&socket, &["apply", "-f", &file], timeout)?;
        one_times.push(secs);
        one_written = written(&stderr);
    }
    one_times.sort_by(f64::total_cmp);
    let (_, status, _) = meshctl(&socket, &["status", "-o", "json"], timeout)?;
    let status: serde_json::Value = serde_json::from_str(&status).context("status JSON")?;
    let maglev_entries = status["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == "MAGLEV"))
        .and_then(|m| m["used"].as_u64())
        .unwrap_or(0);
    let map_memory_bytes = status["map_memory_bytes"].as_u64().unwrap_or(0);

    meshd.stop()?;
    progress(&format!("meshd: restarting on {n} pinned services"));
    let started = Instant::now();
    let mut meshd = Meshd::start_within(&ns, &args, timeout)?;
    let restart_s = started.elapsed().as_secs_f64();
    let line = meshd.wait_for_log("rules installed", 0, Duration::from_secs(1))?;
    drop(meshd);
    Ok(ApplyPoint {
        services: n,
        apply_all_s,
        apply_one_s: one_times[one_times.len() / 2],
        one_written,
        restart_s,
        restart_written: logged_written(&line),
        maglev_entries,
        map_memory_bytes,
        yaml_bytes,
        error: None,
    })
}

/// Section 3, control plane, at every size of the plan.
pub fn run(plan: &Plan) -> Vec<ApplyPoint> {
    plan.scale_sizes
        .iter()
        .map(|n| {
            one(*n, plan.apply_timeout).unwrap_or_else(|e| {
                progress(&format!("meshd with {n} services failed: {e:#}"));
                ApplyPoint {
                    services: *n,
                    apply_all_s: f64::NAN,
                    apply_one_s: f64::NAN,
                    one_written: None,
                    restart_s: f64::NAN,
                    restart_written: None,
                    maglev_entries: 0,
                    map_memory_bytes: 0,
                    yaml_bytes: 0,
                    error: Some(format!("{e:#}")),
                }
            })
        })
        .collect()
}
