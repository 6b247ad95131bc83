//! The sandbox: the main job of `cargo xtask demo`.
//!
//! Builds a client, a node and three backends (reviews v1, v2, v3) as network namespaces, starts
//! meshd on the node, then walks through traffic-shifting steps from `config/sandbox/`: each step
//! applies a VirtualService, opens real TCP connections from the client to the reviews service
//! address and prints the observed split per version next to the configured one. Afterwards it
//! stays up until Ctrl-C (unless `--no-wait`) and tears everything down, also on failure.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{meshctl, Meshd},
    servers::{tcp_connect, tcp_server},
    topology::{backend_v4, Topology},
};

const REVIEWS_VIP: &str = "198.18.100.10:9080";
const STEPS: &[(&str, &str)] = &[
    ("step1-all-v1.yaml", "route all traffic to reviews v1"),
    (
        "step2-80-v1-20-v2.yaml",
        "canary: shift 20% of connections to v2",
    ),
    ("step3-50-v1-50-v3.yaml", "split 50/50 between v1 and v3"),
    (
        "step4-all-v3.yaml",
        "complete the migration: all traffic to v3",
    ),
];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Options {
    wait: bool,
    connections: usize,
    tolerance: f64,
}

fn parse_args() -> Result<Option<Options>> {
    let mut options = Options {
        wait: true,
        connections: 1000,
        tolerance: 0.05,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-wait" => options.wait = false,
            "--connections" => {
                options.connections = args
                    .next()
                    .context("--connections needs a number")?
                    .parse()
                    .context("--connections needs a number")?;
                if !(10..=100_000).contains(&options.connections) {
                    bail!("--connections must be between 10 and 100000");
                }
            }
            "-h" | "--help" => {
                println!(
                    "mesh-sandbox: meshd forwarding real traffic between network namespaces\n\n\
                     Usage: cargo xtask demo [-- OPTIONS]\n\n\
                     Options:\n  \
                     --no-wait          run the steps, check them, tear down and exit (for tests)\n  \
                     --connections N    connections per step (default 1000)\n  \
                     -h, --help         this help\n\n\
                     Each step applies a VirtualService from config/sandbox/ and prints the observed\n\
                     split per version. Exits non-zero if a step's split is off by more than 5 points."
                );
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    // SAFETY: installs a handler that only stores to an atomic.
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

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/sandbox")
}

fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    progress("creating namespaces: client, node, reviews-v1, reviews-v2, reviews-v3");
    let topo = Topology::build(3)?;
    check_interrupt()?;
    progress("starting the reviews backends (TCP servers that answer with their version)");
    let mut servers = Vec::new();
    for i in 1..=3 {
        servers.push(tcp_server(
            &topo.backends[i - 1],
            SocketAddr::new(backend_v4(i), 9080),
            &format!("v{i}"),
        )?);
    }
    let rules_dir = std::env::temp_dir().join(format!("{}-sandbox-rules", topo.prefix));
    let _rules_guard = DirGuard(rules_dir.clone());
    std::fs::create_dir_all(&rules_dir)?;
    copy(
        &config_dir().join("00-reviews-service.yaml"),
        &rules_dir.join("00-reviews-service.yaml"),
    )?;

    progress("starting meshd on the node (XDP on c0, b1, b2, b3)");
    let mut args = Vec::new();
    for interface in topo.node_interfaces() {
        args.extend(["--iface".to_string(), interface]);
    }
    args.extend([
        "--config".to_string(),
        rules_dir.display().to_string(),
        "--no-pin".to_string(),
        "--no-state".to_string(),
        "--socket".to_string(),
        rules_dir.join("meshd.sock").display().to_string(),
    ]);
    let socket = rules_dir.join("meshd.sock").display().to_string();
    let meshd = Meshd::start(&topo.node, &args)?;
    progress(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
    let target: SocketAddr = REVIEWS_VIP.parse()?;

    let mut failures = Vec::new();
    for (n, (file, title)) in STEPS.iter().enumerate() {
        check_interrupt()?;
        println!(
            "\n\x1b[1mStep {}/{}: {title}\x1b[0m  (config/sandbox/{file})",
            n + 1,
            STEPS.len()
        );
        let step_file = config_dir().join(file);
        let (ok, stdout, stderr) =
            meshctl(&socket, &["apply", "-f", &step_file.display().to_string()])?;
        if !ok {
            bail!("meshctl apply -f config/sandbox/{file} failed: {stderr}");
        }
        println!(
            "  $ meshctl apply -f config/sandbox/{file}\n  {}",
            stdout.trim()
        );
        let configured = configured_weights(&config_dir().join(file))?;
        let connections = options.connections;
        let seen = topo
            .client
            .run(move || -> Result<BTreeMap<String, usize>> {
                let mut seen = BTreeMap::new();
                for _ in 0..connections {
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        break;
                    }
                    let (_stream, version) = tcp_connect(target)?;
                    *seen.entry(version).or_insert(0) += 1;
                }
                Ok(seen)
            })??;
        check_interrupt()?;
        let total: usize = seen.values().sum();
        println!("  {total} TCP connections from the client to reviews ({REVIEWS_VIP}):");
        for version in ["v1", "v2", "v3"] {
            let observed = *seen.get(version).unwrap_or(&0) as f64 / total.max(1) as f64;
            let want = configured.get(version).copied().unwrap_or(0.0);
            println!(
                "  {version}  {}  {:5.1}%   configured {:5.1}%",
                bar(observed, 40),
                observed * 100.0,
                want * 100.0
            );
            if (observed - want).abs() > options.tolerance {
                failures.push(format!(
                    "step {}: {version} observed {:.1}% vs configured {:.1}%",
                    n + 1,
                    observed * 100.0,
                    want * 100.0
                ));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "observed splits off by more than {:.0} points:\n  {}",
            options.tolerance * 100.0,
            failures.join("\n  ")
        );
    }
    println!(
        "\nEvery step's observed split matched its rules (within {:.0} points).",
        options.tolerance * 100.0
    );

    if options.wait {
        let client = topo.client.name();
        println!(
            "\nThe sandbox stays up until Ctrl-C. Try, from another shell (as root):\n  \
             nsenter --net=/var/run/netns/{client} bash -c 'for i in $(seq 10); do head -1 < /dev/tcp/198.18.100.10/9080; done'\n  \
             target/release/meshctl --socket {socket} apply -f config/sandbox/step2-80-v1-20-v2.yaml\n  \
             target/release/meshctl --socket {socket} stats --watch\n  \
             target/release/meshctl --socket {socket} status"
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("\ntearing down the sandbox");
    }
    let status = meshd.stop()?;
    if !status.success() {
        bail!("meshd exited with {status}");
    }
    drop(servers);
    drop(topo);
    progress("sandbox removed");
    Ok(())
}

/// Configured share per version, read back from the step's VirtualService.
fn configured_weights(path: &Path) -> Result<BTreeMap<String, f64>> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    let route = doc["spec"]["tcp"][0]["route"]
        .as_sequence()
        .with_context(|| format!("{}: no spec.tcp[0].route", path.display()))?;
    let mut weights = BTreeMap::new();
    for destination in route {
        let subset = destination["destination"]["subset"]
            .as_str()
            .context("route without a subset")?;
        // Istio: a lone destination without a weight gets everything.
        let weight = destination["weight"].as_f64().unwrap_or(100.0);
        weights.insert(subset.to_string(), weight);
    }
    let total: f64 = weights.values().sum();
    Ok(weights.into_iter().map(|(k, v)| (k, v / total)).collect())
}

fn bar(share: f64, width: usize) -> String {
    let cells = (share * width as f64).round() as usize;
    format!(
        "{}{}",
        "█".repeat(cells),
        "·".repeat(width - cells.min(width))
    )
}

fn progress(what: &str) {
    eprintln!("==> {what}");
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
