//! Section 3, control plane: how long meshd takes to put a whole rule set of N services in force
//! (`meshctl apply` of N ServiceEntries + N DestinationRules on a running, empty meshd) and one
//! change on top of it (`meshctl apply` of one modified ServiceEntry), for each N.
//!
//! `meshctl apply` returns when the rules are in force (README), so its wall time is the apply
//! time. Each meshd runs in its own namespace with a private socket and no pins or state; both
//! are removed on drop, also on failure. Every wait is bounded by `Plan::apply_timeout`.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{bin, Meshd},
    netns::{unique_prefix, Netns},
};

use crate::{forward::meshd_private_args, micro::SCALE_TABLE, util::progress, DirGuard, Plan};

/// Timings at one size.
#[derive(Clone, Debug)]
pub struct ApplyPoint {
    pub services: usize,
    /// Seconds for `meshctl apply` of the whole set; NaN when it failed (see `error`).
    pub apply_all_s: f64,
    /// Seconds for `meshctl apply` of one changed ServiceEntry.
    pub apply_one_s: f64,
    /// Size of the YAML applied, bytes.
    pub yaml_bytes: usize,
    pub error: Option<String>,
}

/// One ServiceEntry in compact flow style (meshctl takes at most 16 MiB per request, and 30 000
/// services in block style would exceed it).
fn service_yaml(out: &mut String, i: usize, second_backend: &str) {
    let _ = writeln!(
        out,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}}}\n\
         spec: {{hosts: [s{i}.b], addresses: [198.19.{}.{}], ports: [{{number: 8081, protocol: UDP, \
         name: u}}], location: MESH_INTERNAL, resolution: STATIC, endpoints: [{{address: 198.18.2.1}}, \
         {{address: {second_backend}}}]}}\n---",
        i >> 8,
        i & 255
    );
}

/// Services per YAML file: meshctl refuses files over 4 MiB, so big sets span several files.
const SERVICES_PER_FILE: usize = 2_000;

fn rule_set(range: std::ops::Range<usize>) -> String {
    let mut s = String::with_capacity(range.len() * 700);
    for i in range {
        service_yaml(&mut s, i, "198.18.3.1");
        let _ = writeln!(
            s,
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s{i}}}\n\
             spec: {{host: s{i}.b, trafficPolicy: {{loadBalancer: {{consistentHash: {{useSourceIp: true, \
             maglev: {{tableSize: {SCALE_TABLE}}}}}}}}}}}\n---"
        );
    }
    s
}

/// Runs meshctl with a deadline; returns the wall time.
fn meshctl(socket: &Path, file: &Path, timeout: Duration) -> Result<f64> {
    let started = Instant::now();
    let mut child = Command::new(bin("meshctl")?)
        .args(["apply", "--socket"])
        .arg(socket)
        .arg("-f")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshctl")?;
    loop {
        if let Some(status) = child.try_wait()? {
            let secs = started.elapsed().as_secs_f64();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("meshctl apply failed ({status}): {}", err.trim());
            }
            return Ok(secs);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("meshctl apply did not return within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn one(n: usize, timeout: Duration) -> Result<ApplyPoint> {
    let prefix = unique_prefix();
    let ns = Netns::create(&format!("{prefix}-scale"))?;
    let dir = std::env::temp_dir().join(format!("{prefix}-bench-scale"));
    std::fs::create_dir_all(&dir)?;
    let _guard = DirGuard(dir.clone());
    // The whole set: a directory of files, applied with one `meshctl apply -f <dir>`.
    let all = dir.join("all");
    std::fs::create_dir_all(&all)?;
    let mut yaml_bytes = 0;
    for (k, start) in (0..n).step_by(SERVICES_PER_FILE).enumerate() {
        let yaml = rule_set(start..(start + SERVICES_PER_FILE).min(n));
        yaml_bytes += yaml.len();
        std::fs::write(all.join(format!("part-{k:03}.yaml")), yaml)?;
    }
    let mut change = String::new();
    service_yaml(&mut change, 0, "198.18.4.1");
    let one_file = dir.join("one.yaml");
    std::fs::write(&one_file, change)?;

    let pool = (n as u64 * u64::from(SCALE_TABLE))
        .next_power_of_two()
        .max(u64::from(mesh_common::DEFAULT_MAGLEV_POOL_ENTRIES));
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
    let mut args = meshd_private_args(&dir);
    args.extend(["--iface".into(), "s0".into()]);
    args.extend(["--maglev-pool-entries".into(), pool.to_string()]);
    let meshd = Meshd::start(&ns, &args)?;
    let socket = dir.join("meshd.sock");
    progress(&format!(
        "meshd: applying {n} services ({} KiB of YAML)",
        yaml_bytes / 1024
    ));
    let apply_all_s = meshctl(&socket, &all, timeout)?;
    progress(&format!(
        "meshd: {n} services in force after {apply_all_s:.2} s; one change"
    ));
    let apply_one_s = meshctl(&socket, &one_file, timeout)?;
    drop(meshd);
    Ok(ApplyPoint {
        services: n,
        apply_all_s,
        apply_one_s,
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
                progress(&format!("meshd apply with {n} services failed: {e:#}"));
                ApplyPoint {
                    services: *n,
                    apply_all_s: f64::NAN,
                    apply_one_s: f64::NAN,
                    yaml_bytes: 0,
                    error: Some(format!("{e:#}")),
                }
            })
        })
        .collect()
}
