//! Section 3, data plane for new connections: the new-connection rate and the first packet's
//! latency (`connect()`, SYN -> SYN-ACK through the node) with N services configured, for mesh
//! (meshd with its default `--attach auto`, i.e. the TC program on the topology's default veths;
//! N ServiceEntries applied through meshctl), nftables (kube-proxy nftables mode:
//! one service map with N entries -> numgen -> dnat chains) and iptables (kube-proxy iptables
//! mode: N KUBE-SVC chains in KUBE-SERVICES, loaded with one `iptables-restore`, the measured
//! service LAST so iptables' linear walk shows).
//!
//! Each (N, system) runs in a fresh `Topology::build(2)`: client -> node -> 2 backends, each
//! backend running a TCP identity server that writes its name and closes. The client opens
//! `K` sequential connections to the target VIP (connect, read the identity, close); the rate
//! is the median over rounds, the connect latency percentiles are over all rounds. Client and
//! servers are pinned to one CPU: unpinned, the rate swung about 3x between runs with where the
//! scheduler placed the threads. Services use VIPs 198.19.x.y (inside 198.18.0.0/15, routed by
//! the client through the node).
//!
//! `mesh-node` is mesh measured from the node's own namespace: meshd's socket hooks choose the
//! backend at connect(), and the row's note shows from meshd's counters that the packet path
//! translated none of those connections' packets.
//!
//! Nothing here fails the bench: a system that cannot be set up or measured in time is a row
//! with `error` set. Namespaces, meshd, nft tables / iptables rules (inside the node's
//! namespace) and temp files are removed on drop.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    meshd::{bin, Meshd},
    netns::Netns,
    topology::{backend_v4, Topology},
};

use crate::{
    forward::meshd_private_args,
    micro::SCALE_TABLE,
    peers::Peers,
    util::{median, percentile, progress, Plan},
    DirGuard,
};

const PORT: u16 = 8080;
/// Client and backend servers share one CPU: every connection then takes the same path
/// (softirq and wake-ups on that CPU) instead of depending on where the scheduler put them.
const CPU: usize = 0;

/// Pins the calling thread to `cpu` (best effort: the measurement still runs unpinned).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One (N, system) measurement.
#[derive(Clone, Debug)]
pub struct NewConnRow {
    pub services: usize,
    pub system: &'static str,
    /// Connections per second (median of the rounds); NaN when not measured.
    pub conn_per_s: f64,
    /// `connect()` latency percentiles, microseconds.
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    pub note: String,
    /// Why it was not measured.
    pub error: Option<String>,
}

fn vip(i: usize) -> String {
    format!("198.19.{}.{}", i >> 8, i & 255)
}

/// A TCP server that writes its identity and closes each connection; stops on drop.
struct IdServer {
    stop: Arc<AtomicBool>,
}

impl Drop for IdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn id_server(ns: &Netns, addr: SocketAddr, identity: &str) -> Result<IdServer> {
    let listener = ns
        .run(move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, line) = (stop.clone(), format!("{identity}\n"));
    std::thread::spawn(move || {
        pin(CPU);
        let fd = listener.as_raw_fd();
        while !stop2.load(Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the listener outlives the call.
            let ready = unsafe { libc::poll(&mut p, 1, 100) };
            if ready > 0 {
                if let Ok((mut s, _)) = listener.accept() {
                    let _ = s.write_all(line.as_bytes());
                }
            }
        }
    });
    Ok(IdServer { stop })
}

/// Runs `program` in `ns` with a deadline.
fn run_bounded(ns: &Netns, program: &Path, args: &[&str], timeout: Duration) -> Result<f64> {
    let started = Instant::now();
    let mut child = ns
        .command(program.to_str().context("utf-8 path")?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let err: String = err.trim().chars().take(300).collect();
                bail!("{} failed ({status}): {err}", program.display());
            }
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {timeout:?}", program.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What keeps a configured system alive during the measurement.
struct Config {
    _meshd: Option<Meshd>,
    _dir: DirGuard,
    setup_s: f64,
}

fn mesh_yaml(range: std::ops::Range<usize>) -> String {
    let mut s = String::with_capacity(range.len() * 600);
    for i in range {
        let _ = writeln!(
            s,
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}}}\n\
             spec: {{hosts: [s{i}.b], addresses: [{}], ports: [{{number: {PORT}, protocol: TCP, \
             name: t}}], location: MESH_INTERNAL, resolution: STATIC, endpoints: [{{address: {}}}, \
             {{address: {}}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: s{i}}}\nspec: {{host: s{i}.b, trafficPolicy: {{loadBalancer: \
             {{consistentHash: {{useSourceIp: true, maglev: {{tableSize: {SCALE_TABLE}}}}}}}}}}}\n---",
            vip(i),
            backend_v4(1),
            backend_v4(2)
        );
    }
    s
}

fn nft_script(n: usize) -> String {
    let mut s = String::with_capacity(n * 400);
    s.push_str("table ip kube-proxy-bench {\n    map service-ips {\n        type ipv4_addr . inet_proto . inet_service : verdict\n");
    if n > 0 {
        s.push_str("        elements = {\n");
        for i in 0..n {
            let sep = if i + 1 == n { "" } else { "," };
            let _ = writeln!(
                s,
                "            {} . tcp . {PORT} : goto svc-{i}{sep}",
                vip(i)
            );
        }
        s.push_str("        }\n");
    }
    s.push_str(
        "    }\n    chain nat-prerouting {\n        type nat hook prerouting priority dstnat; policy accept;\n        jump services\n    }\n    chain services {\n        ip daddr . meta l4proto . th dport vmap @service-ips\n    }\n",
    );
    let (a, b) = (backend_v4(1), backend_v4(2));
    for i in 0..n {
        let _ = writeln!(
            s,
            "    chain svc-{i} {{\n        numgen random mod 2 vmap {{ 0 : goto sep-{i}-a, 1 : goto sep-{i}-b }}\n    }}\n    chain sep-{i}-a {{\n        meta l4proto tcp dnat to {a}:{PORT}\n    }}\n    chain sep-{i}-b {{\n        meta l4proto tcp dnat to {b}:{PORT}\n    }}"
        );
    }
    s.push_str("}\n");
    s
}

fn iptables_restore_file(n: usize) -> String {
    let mut s = String::with_capacity(n * 450);
    s.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i}-A - [0:0]\n:KUBE-SEP-{i}-B - [0:0]"
        );
    }
    s.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    // Service 0 first ... the target (N-1) last: the linear walk passes every other rule.
    for i in 0..n {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {PORT} -j KUBE-SVC-{i}",
            vip(i)
        );
    }
    let (a, b) = (backend_v4(1), backend_v4(2));
    for i in 0..n {
        let _ = writeln!(
            s,
            "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{i}-A\n\
             -A KUBE-SVC-{i} -j KUBE-SEP-{i}-B\n\
             -A KUBE-SEP-{i}-A -p tcp -m tcp -j DNAT --to-destination {a}:{PORT}\n\
             -A KUBE-SEP-{i}-B -p tcp -m tcp -j DNAT --to-destination {b}:{PORT}"
        );
    }
    s.push_str("COMMIT\n");
    s
}

fn configure(
    system: &str,
    n: usize,
    topo: &Topology,
    peers: &Peers,
    timeout: Duration,
) -> Result<Config> {
    let dir = std::env::temp_dir().join(format!("{}-bench-newconn", topo.prefix));
    std::fs::create_dir_all(&dir)?;
    let guard = DirGuard(dir.clone());
    match system {
        "mesh" | "mesh-node" => {
            let all = dir.join("all");
            std::fs::create_dir_all(&all)?;
            // meshctl refuses files over 4 MiB: 2 000 services per file.
            for (k, start) in (0..n).step_by(2_000).enumerate() {
                std::fs::write(
                    all.join(format!("part-{k:03}.yaml")),
                    mesh_yaml(start..(start + 2_000).min(n)),
                )?;
            }
            let pool = (n as u64 * u64::from(SCALE_TABLE))
                .next_power_of_two()
                .max(u64::from(mesh_common::DEFAULT_MAGLEV_POOL_ENTRIES));
            let mut args = Vec::new();
            for i in topo.node_interfaces() {
                args.extend(["--iface".to_string(), i]);
            }
            args.extend(meshd_private_args(&dir));
            args.extend(["--maglev-pool-entries".into(), pool.to_string()]);
            let meshd = Meshd::start(&topo.node, &args)?;
            let socket = dir.join("meshd.sock");
            let started = Instant::now();
            let mut child = Command::new(bin("meshctl")?)
                .args(["apply", "--socket"])
                .arg(&socket)
                .arg("-f")
                .arg(&all)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting meshctl")?;
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        let mut err = String::new();
                        if let Some(mut e) = child.stderr.take() {
                            let _ = e.read_to_string(&mut err);
                        }
                        bail!("meshctl apply failed ({status}): {}", err.trim());
                    }
                    break;
                }
                if started.elapsed() > timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("meshctl apply did not return within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Config {
                _meshd: Some(meshd),
                _dir: guard,
                setup_s: started.elapsed().as_secs_f64(),
            })
        }
        "nftables" => {
            let nft = peers.nft.clone().map_err(anyhow::Error::msg)?;
            let path = dir.join("rules.nft");
            std::fs::write(&path, nft_script(n))?;
            let path_s = path.to_str().context("utf-8 path")?;
            let setup_s = run_bounded(&topo.node, Path::new(&nft), &["-f", path_s], timeout)?;
            Ok(Config {
                _meshd: None,
                _dir: guard,
                setup_s,
            })
        }
        "iptables" => {
            let ipt = peers.iptables.clone().map_err(anyhow::Error::msg)?;
            let path = dir.join("rules.iptables");
            std::fs::write(&path, iptables_restore_file(n))?;
            let path_s = path.to_str().context("utf-8 path")?;
            let restore = format!("{ipt}-restore");
            let setup_s = run_bounded(&topo.node, Path::new(&restore), &[path_s], timeout)?;
            Ok(Config {
                _meshd: None,
                _dir: guard,
                setup_s,
            })
        }
        other => bail!("unknown system {other}"),
    }
}

/// One connection: connect (timed), read the identity, close. Returns the connect time.
fn one_conn(target: SocketAddr) -> Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .with_context(|| format!("connecting to {target}"))?;
    let connect = t0.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    // The server writes "<identity>\n" and closes: read until the newline or EOF (bounded).
    for _ in 0..16 {
        let k = s.read(&mut buf[got..]).context("reading the identity")?;
        got += k;
        if k == 0 || buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    if !buf[..got].contains(&b'\n') {
        bail!("no identity from {target}");
    }
    Ok(connect)
}

/// (connections/s median, connect p50 µs, connect p99 µs) from the namespace `from`.
fn measure(from: &Netns, target: SocketAddr, k: usize, rounds: usize) -> Result<[f64; 3]> {
    from.run(move || -> Result<[f64; 3]> {
        pin(CPU);
        // Warm-up (neighbours, caches) and a check that the path works at all.
        for _ in 0..20 {
            one_conn(target).context("warm-up connection")?;
        }
        let mut rates = Vec::new();
        let mut lat = Vec::with_capacity(k * rounds);
        for _ in 0..rounds {
            let t0 = Instant::now();
            let mut failed = 0;
            for _ in 0..k {
                match one_conn(target) {
                    Ok(d) => lat.push(d.as_secs_f64() * 1e6),
                    Err(_) => failed += 1,
                }
                if failed > k / 50 + 1 {
                    bail!("more than 2% of connections failed");
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("a round took more than 30 s");
                }
            }
            rates.push((k - failed) as f64 / t0.elapsed().as_secs_f64());
        }
        Ok([
            median(&rates),
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
        ])
    })?
}

fn one(
    system: &'static str,
    n: usize,
    plan: &Plan,
    peers: &Peers,
    k: usize,
    rounds: usize,
) -> Result<NewConnRow> {
    let topo = Topology::build(2)?;
    let mut servers = Vec::new();
    for (i, be) in topo.backends.iter().enumerate() {
        let addr = SocketAddr::new(backend_v4(i + 1), PORT);
        servers.push(id_server(be, addr, &format!("b{}", i + 1))?);
    }
    let config = configure(system, n, &topo, peers, plan.apply_timeout)?;
    let target: SocketAddr = format!("{}:{PORT}", vip(n - 1)).parse()?;
    // `mesh-node`: a client on the node itself, balanced by meshd's socket hooks at connect().
    let from = if system == "mesh-node" {
        &topo.node
    } else {
        &topo.client
    };
    let [rate, p50, p99] = measure(from, target, k, rounds)?;
    let note = match system {
        "mesh" => format!(
            "XDP; {n} ServiceEntries applied in {:.2} s (Maglev {SCALE_TABLE}, useSourceIp)",
            config.setup_s
        ),
        "mesh-node" => {
            let (connections, packets) = socket_path_counters(&topo, target)?;
            format!(
                "from the node: socket hooks choose at connect(); meshd counted {connections} \
                 connections and translated {packets} of their packets; {n} ServiceEntries \
                 applied in {:.2} s",
                config.setup_s
            )
        }
        "nftables" => format!(
            "vmap of {n} -> numgen -> dnat; `nft -f` {:.2} s",
            config.setup_s
        ),
        _ => format!(
            "{} KUBE-SERVICES rules, target last; `{}-restore` {:.2} s",
            n,
            peers.iptables.clone().unwrap_or_default(),
            config.setup_s
        ),
    };
    drop(config);
    drop(servers);
    Ok(NewConnRow {
        services: n,
        system,
        conn_per_s: rate,
        connect_p50_us: p50,
        connect_p99_us: p99,
        note,
        error: None,
    })
}

/// The target service's `connections` and `packets` counters as meshd reports them: for
/// clients on the node, every connection is counted and no packet passes the packet path.
fn socket_path_counters(topo: &Topology, target: SocketAddr) -> Result<(u64, u64)> {
    let socket = std::env::temp_dir()
        .join(format!("{}-bench-newconn", topo.prefix))
        .join("meshd.sock");
    let out = Command::new(bin("meshctl")?)
        .args(["stats", "-o", "json", "--socket"])
        .arg(&socket)
        .output()
        .context("running meshctl stats")?;
    if !out.status.success() {
        bail!(
            "meshctl stats: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let totals = stats["services"]
        .as_array()
        .and_then(|s| {
            s.iter().find(|s| {
                s["address"]["ip"] == target.ip().to_string()
                    && s["address"]["port"] == target.port()
            })
        })
        .map(|s| s["totals"].clone())
        .context("the target service in meshctl stats")?;
    let get = |k: &str| totals[k].as_u64().unwrap_or(0);
    Ok((get("connections"), get("packets") + get("reply_packets")))
}

/// Every size of the plan, every system; never fails (errors become rows).
pub fn run(plan: &Plan, peers: &Peers) -> Vec<NewConnRow> {
    let (k, rounds) = if plan.quick { (300, 3) } else { (2_000, 3) };
    let mut out = Vec::new();
    for &n in &plan.scale_sizes {
        for system in ["mesh", "mesh-node", "nftables", "iptables"] {
            let skip = match system {
                "nftables" => peers.nft.clone().err(),
                "iptables" => peers.iptables.clone().err(),
                _ => bin("meshd").err().map(|e| format!("{e:#}")),
            };
            let started = Instant::now();
            let row = match skip {
                Some(why) => Err(anyhow::anyhow!(why)),
                None => one(system, n.max(1), plan, peers, k, rounds),
            };
            let row = row.unwrap_or_else(|e| {
                progress(&format!(
                    "new connections: {system} with {n} services: {e:#}"
                ));
                NewConnRow {
                    services: n,
                    system,
                    conn_per_s: f64::NAN,
                    connect_p50_us: f64::NAN,
                    connect_p99_us: f64::NAN,
                    note: String::new(),
                    error: Some(format!("{e:#}")),
                }
            });
            progress(&format!(
                "new connections: {system}, {n} services: {:.0} conn/s ({:.1} s)",
                row.conn_per_s,
                started.elapsed().as_secs_f64()
            ));
            out.push(row);
        }
    }
    out
}
