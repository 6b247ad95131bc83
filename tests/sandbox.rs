//! The sandbox: the main job of `cargo xtask demo`. Istio's Bookinfo traffic-management tutorial
//! on one machine, without Kubernetes or sidecars.
//!
//! It builds network namespaces: a client, a node running meshd, and one host per Bookinfo
//! workload (productpage, details, reviews v1/v2/v3, ratings) running the sample services of
//! `tests/bookinfo.rs`. Every service-to-service call goes through the service addresses (east-
//! west traffic through meshd on the node), and the client enters through the bookinfo Gateway
//! on the node's address. Each tutorial step applies Istio's YAML from `config/bookinfo/` with
//! meshctl, sends real requests, and prints the observed split per version next to the
//! configured one. Then it stays up until Ctrl-C (unless `--no-wait`) and tears everything down,
//! also on failure or interruption.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{meshctl, Meshd},
    portfwd::forward_into,
    split::check_share,
    topology::{Topology, CLIENT_V4},
    web::{Client, NsProcess},
};

/// Where the client enters: the bookinfo Gateway on the node's address.
const GATEWAY: &str = "198.18.1.1:8080";

/// Share of mirrored copies that may still be in flight when the mirror step counts them.
const MIRROR_IN_FLIGHT: f64 = 0.05;

#[path = "sandbox_fleet.rs"]
mod fleet;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// What a step expects to see.
pub(crate) enum Expect {
    /// Requests (as `user`, if any) see reviews versions in these shares.
    Split {
        user: Option<&'static str>,
        shares: &'static [(&'static str, f64)],
    },
    /// Requests see only v1, and reviews v2 receives a mirrored copy of each.
    Mirrored,
}

pub(crate) struct Step {
    pub(crate) title: &'static str,
    pub(crate) files: &'static [&'static str],
    pub(crate) expect: &'static [Expect],
    pub(crate) note: &'static str,
}

pub(crate) const STEPS: &[Step] = &[
    Step {
        title: "Route all traffic to v1 (and open the ingress gateway)",
        files: &["bookinfo-gateway.yaml", "virtual-service-all-v1.yaml"],
        expect: &[Expect::Split { user: None, shares: &[("v1", 1.0)] }],
        note: "the gateway's URI matches run in meshd's L7 proxy; the all-v1 routes are weights only, so the kernel serves them",
    },
    Step {
        title: "Route user jason to reviews v2, everyone else to v1",
        files: &["virtual-service-reviews-test-v2.yaml"],
        expect: &[
            Expect::Split { user: Some("jason"), shares: &[("v2", 1.0)] },
            Expect::Split { user: None, shares: &[("v1", 1.0)] },
        ],
        note: "a header match: reviews moves to the L7 proxy, same address, no restart",
    },
    Step {
        title: "Shift 50% of the traffic to reviews v3",
        files: &["virtual-service-reviews-50-v3.yaml"],
        expect: &[Expect::Split { user: None, shares: &[("v1", 0.5), ("v3", 0.5)] }],
        note: "weights only: back to the kernel path, split per connection (productpage opens one per call)",
    },
    Step {
        title: "Route all traffic to reviews v3",
        files: &["virtual-service-reviews-v3.yaml"],
        expect: &[Expect::Split { user: None, shares: &[("v3", 1.0)] }],
        note: "",
    },
    Step {
        title: "Mirror reviews traffic to v2 while v1 serves it",
        files: &["virtual-service-reviews-mirror-v2.yaml"],
        expect: &[Expect::Mirrored],
        note: "copies are fire-and-forget: v2's answers never reach the client",
    },
];

pub(crate) struct Options {
    pub(crate) wait: bool,
    pub(crate) requests: usize,
    pub(crate) fleet: bool,
}

fn parse_args() -> Result<Option<Options>> {
    let mut options = Options {
        wait: true,
        requests: 0,
        fleet: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-wait" => options.wait = false,
            "--fleet" => options.fleet = true,
            "--requests" => {
                options.requests = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (20..=100_000).contains(n))
                    .context("--requests needs a number between 20 and 100000")?;
            }
            "-h" | "--help" => {
                println!(
                    "mesh-sandbox: Istio's Bookinfo traffic-management tutorial through meshd\n\n\
                     Usage: cargo xtask demo [-- OPTIONS]\n\n\
                     Options:\n  \
                     --no-wait       run the steps, check them, tear down and exit (for tests and CI)\n  \
                     --requests N    requests for the split steps (default 1000, per node 300 with\n                  \
                     --fleet; others use N/5)\n  \
                     --fleet         three nodes sharing the rules through a three-member etcd\n                  \
                     cluster: each step applied on one node, the revision each node runs and\n                  \
                     the split each node's client sees printed per node\n  \
                     -h, --help      this help\n\n\
                     Each step applies Istio YAML from config/bookinfo/ with meshctl, sends real\n\
                     requests to productpage through the ingress gateway and prints the reviews\n\
                     version that answered, per version, next to the configured weights. Exits\n\
                     non-zero if a step's split is off by more than chance allows for its number\n\
                     of requests (binomial, false alarm below one in a million)."
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if options.requests == 0 {
        options.requests = if options.fleet { 300 } else { 1000 };
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    // SAFETY: installs handlers that only store to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    match parse_args().and_then(|o| match o {
        Some(options) if options.fleet => fleet::run(&options),
        Some(options) => run(&options),
        None => Ok(()),
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; everything was torn down");
    }
    Ok(())
}

pub(crate) fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/bookinfo")
}

/// Bookinfo workloads: (backend index, service, version, extra args).
const WORKLOADS: &[(usize, &str, &str)] = &[
    (1, "productpage", "v1"),
    (2, "details", "v1"),
    (3, "reviews", "v1"),
    (4, "reviews", "v2"),
    (5, "reviews", "v3"),
    (6, "ratings", "v1"),
];

fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    progress("creating namespaces: client, node, productpage, details, reviews-v1/v2/v3, ratings");
    let topo = Topology::build(WORKLOADS.len())?;
    check_interrupt()?;

    progress("starting the Bookinfo services");
    let mut workloads = start_workloads(&topo)?;
    let (rules_dir, _rules_guard) = node_rules_dir(&topo.prefix)?;
    progress("starting meshd on the node (XDP on every node interface; services and subsets from config/bookinfo/0*.yaml)");
    let socket = rules_dir.join("meshd.sock").display().to_string();
    let mut args = node_args(&topo, &rules_dir);
    args.extend(
        ["--no-pin", "--no-state", "--socket", &socket]
            .iter()
            .map(|s| s.to_string()),
    );
    let meshd = Meshd::start(&topo.node, &args)?;
    for w in &mut workloads {
        w.check_alive()?;
    }
    progress(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
    // meshd's split page listens on the node's loopback; a host loopback port reaches it.
    let page = forward_into(&topo.node, "127.0.0.1:9464".parse()?)?;
    println!(
        "\nLive split page: http://{}/  (meshd's metrics listener in the node namespace, \
         forwarded to this host's loopback; open it now to watch the steps)\n",
        page.addr
    );

    let mut failures = Vec::new();
    for (n, step) in STEPS.iter().enumerate() {
        check_interrupt()?;
        print_step(n, step);
        apply_step(&socket, step)?;
        check_step(&topo, n + 1, step, options, "", &mut failures)?;
    }
    if !failures.is_empty() {
        bail!(
            "steps did not match their rules:\n  {}",
            failures.join("\n  ")
        );
    }
    println!("\nEvery step's observed traffic matched its rules (within what chance allows).");

    if options.wait {
        let client = topo.client.name();
        println!(
            "\nThe sandbox stays up until Ctrl-C. From another shell, as root:\n  \
             nsenter --net=/var/run/netns/{client} curl -s http://{GATEWAY}/productpage\n  \
             nsenter --net=/var/run/netns/{client} curl -s -H 'cookie: session=jason' http://{GATEWAY}/productpage\n  \
             target/release/meshctl --socket {socket} apply -f config/bookinfo/virtual-service-reviews-50-v3.yaml\n  \
             target/release/meshctl --socket {socket} stats --watch\n  \
             target/release/meshctl --socket {socket} trace reviews               # its decisions, live\n  \
             target/release/meshctl --socket {socket} trace --client {CLIENT_V4}     # the client's connections\n  \
             target/release/meshctl --socket {socket} get vs\n\
             Live split page: http://{}/",
            page.addr
        );
        wait_for_interrupt();
    }
    let status = meshd.stop()?;
    if !status.success() {
        bail!("meshd exited with {status}");
    }
    drop(workloads);
    drop(topo);
    progress("sandbox removed");
    Ok(())
}

/// Blocks until Ctrl-C (or SIGTERM).
pub(crate) fn wait_for_interrupt() {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\ntearing down the sandbox");
}

/// Starts the Bookinfo workloads, one per backend namespace of `topo`.
pub(crate) fn start_workloads(topo: &Topology) -> Result<Vec<NsProcess>> {
    let mut workloads = Vec::new();
    for (i, service, version) in WORKLOADS {
        let listen = format!("198.18.{}.1:9080", 1 + i);
        let args: Vec<String> = [
            "--service",
            service,
            "--version",
            version,
            "--listen",
            &listen,
            "--details",
            "198.18.100.2:9080",
            "--reviews",
            "198.18.100.3:9080",
            "--ratings",
            "198.18.100.4:9080",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        workloads.push(NsProcess::start(
            &topo.backends[i - 1],
            "mesh-bookinfo",
            &args,
            &format!("{service} {version}"),
        )?);
    }
    Ok(workloads)
}

/// A node's rules directory (`<prefix>-sandbox-rules`, removed with the guard) holding the
/// `--config` layer: Bookinfo's services and subsets.
pub(crate) fn node_rules_dir(prefix: &str) -> Result<(PathBuf, DirGuard)> {
    let rules_dir = std::env::temp_dir().join(format!("{prefix}-sandbox-rules"));
    let guard = DirGuard(rules_dir.clone());
    std::fs::create_dir_all(&rules_dir)?;
    for file in ["00-services.yaml", "01-destination-rules.yaml"] {
        std::fs::copy(config_dir().join(file), rules_dir.join(file))
            .with_context(|| format!("copying {file}"))?;
    }
    Ok((rules_dir, guard))
}

/// meshd's interfaces on the node of `topo` and its `--config` directory.
pub(crate) fn node_args(topo: &Topology, rules_dir: &std::path::Path) -> Vec<String> {
    let mut args = Vec::new();
    for interface in topo.node_interfaces() {
        args.extend(["--iface".to_string(), interface]);
    }
    args.extend(["--config".to_string(), rules_dir.display().to_string()]);
    args
}

pub(crate) fn print_step(n: usize, step: &Step) {
    println!(
        "\n\x1b[1mStep {}/{}: {}\x1b[0m",
        n + 1,
        STEPS.len(),
        step.title
    );
}

/// Applies a step's files with meshctl through `socket`, printing the command and its answer.
pub(crate) fn apply_step(socket: &str, step: &Step) -> Result<()> {
    for file in step.files {
        let path = config_dir().join(file);
        let (ok, stdout, stderr) = meshctl(socket, &["apply", "-f", &path.display().to_string()])?;
        if !ok {
            bail!("meshctl apply -f config/bookinfo/{file} failed:\n{stderr}");
        }
        println!("  $ meshctl apply -f config/bookinfo/{file}");
        for line in stdout.lines() {
            println!("    {line}");
        }
    }
    if !step.note.is_empty() {
        println!("  ({})", step.note);
    }
    Ok(())
}

/// Sends a step's requests through the gateway of `topo` and records what does not match its
/// rules in `failures` (`label` names the node in a fleet).
pub(crate) fn check_step(
    topo: &Topology,
    step_no: usize,
    step: &Step,
    options: &Options,
    label: &str,
    failures: &mut Vec<String>,
) -> Result<()> {
    let gateway: SocketAddr = GATEWAY.parse()?;
    let mut step_failures = Vec::new();
    for expect in step.expect {
        check_interrupt()?;
        match expect {
            Expect::Split { user, shares } => {
                let count = if shares.len() > 1 {
                    options.requests
                } else {
                    (options.requests / 5).max(20)
                };
                let seen = requests(topo, gateway, *user, count)?;
                report_split(step_no, *user, shares, &seen, &mut step_failures);
            }
            Expect::Mirrored => {
                let count = (options.requests / 5).max(20);
                let before = shadow_requests(topo)?;
                let seen = requests(topo, gateway, None, count)?;
                report_split(step_no, None, &[("v1", 1.0)], &seen, &mut step_failures);
                // Copies are asynchronous: give the last ones a moment to land.
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut mirrored = shadow_requests(topo)? - before;
                while mirrored < count as u64 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                    mirrored = shadow_requests(topo)? - before;
                }
                println!("  reviews v2 received {mirrored} mirrored copies (Host reviews-shadow) for {count} requests");
                // Every request is copied; only copies still in flight may be missing.
                if (mirrored as f64) < count as f64 * (1.0 - MIRROR_IN_FLIGHT) {
                    step_failures.push(format!(
                        "step {step_no}: only {mirrored} of {count} requests mirrored to v2"
                    ));
                }
            }
        }
    }
    failures.extend(step_failures.into_iter().map(|f| format!("{label}{f}")));
    Ok(())
}

/// `count` GETs of /productpage through the gateway; the reviews version of each answer.
fn requests(
    topo: &Topology,
    gateway: SocketAddr,
    user: Option<&'static str>,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    topo.client
        .run(move || -> Result<BTreeMap<String, usize>> {
            let client = Client::new()?;
            let cookie = user.map(|u| format!("session={u}"));
            let mut seen = BTreeMap::new();
            for _ in 0..count {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    break;
                }
                let headers: Vec<(&str, &str)> =
                    cookie.iter().map(|c| ("cookie", c.as_str())).collect();
                let answer = client.get(gateway, "/productpage", &headers)?;
                let key = if answer.status == 200 {
                    answer.json()["reviews"].as_str().unwrap_or("?").to_string()
                } else {
                    format!("HTTP {}", answer.status)
                };
                *seen.entry(key).or_insert(0) += 1;
            }
            Ok(seen)
        })?
}

/// Mirrored requests reviews v2 has received so far (its own /stats, asked directly).
fn shadow_requests(topo: &Topology) -> Result<u64> {
    let v2: SocketAddr = "198.18.5.1:9080".parse()?;
    topo.client.run(move || -> Result<u64> {
        let answer = Client::new()?.get(v2, "/stats", &[])?;
        answer.json()["shadow_requests"]
            .as_u64()
            .context("reviews v2 /stats")
    })?
}

fn report_split(
    step: usize,
    user: Option<&str>,
    shares: &[(&str, f64)],
    seen: &BTreeMap<String, usize>,
    failures: &mut Vec<String>,
) {
    let total: usize = seen.values().sum();
    println!(
        "  {total} requests to productpage as {}; reviews answered by:",
        user.unwrap_or("an anonymous user")
    );
    for version in ["v1", "v2", "v3"] {
        let observed = *seen.get(version).unwrap_or(&0) as f64 / total.max(1) as f64;
        let want = shares
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, s)| *s)
            .unwrap_or(0.0);
        println!(
            "    {version}  {}  {:5.1}%   configured {:5.1}%",
            bar(observed, 40),
            observed * 100.0,
            want * 100.0
        );
        let count = *seen.get(version).unwrap_or(&0);
        if let Err(e) = check_share(&format!("reviews {version}"), count, total, want) {
            failures.push(format!(
                "step {step} ({}): {e}",
                user.unwrap_or("anonymous")
            ));
        }
    }
    for (other, count) in seen
        .iter()
        .filter(|(k, _)| !["v1", "v2", "v3"].contains(&k.as_str()))
    {
        println!("    {other}: {count}");
        failures.push(format!("step {step}: {count} requests answered {other}"));
    }
}

fn bar(share: f64, width: usize) -> String {
    let cells = ((share * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(cells), "·".repeat(width - cells))
}

pub(crate) fn progress(what: &str) {
    eprintln!("==> {what}");
}

pub(crate) struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
