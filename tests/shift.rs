//! `meshctl shift` against a real meshd: a healthy canary is promoted to 100% in steps; a canary
//! whose backend refuses connections is rolled back to 100% of the stable subset before the
//! next step.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use mesh_tests::{
    meshd::{meshctl, meshctl_stdin, Meshd},
    rules::{echo_service_entry, echo_split, meshd_args, RulesDir, ECHO_SUBSETS},
    servers::tcp_connect,
    topology::Topology,
    traffic::{tcp_split, vip, EchoSetup},
};

/// Client load: new connections in a loop until stopped (at most 2 minutes), counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(u64, u64)>>,
}

impl Load {
    /// New TCP connections to the `echo` VIP.
    fn start(topo: &Topology) -> Result<Self> {
        Self::start_with(topo, || tcp_connect(vip(8080)).is_ok())
    }

    /// Runs `one` (a request that says whether it succeeded) in a loop in the client namespace.
    fn start_with(topo: &Topology, one: fn() -> bool) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let client = topo.client.name().to_string();
        let handle = thread::spawn(move || {
            let file = std::fs::File::open(format!("/var/run/netns/{client}")).expect("netns");
            // SAFETY: setns on this thread only.
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            let (mut ok, mut failed) = (0u64, 0u64);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if one() {
                    ok += 1;
                } else {
                    failed += 1;
                }
                thread::sleep(Duration::from_millis(2));
            }
            (ok, failed)
        });
        Ok(Load {
            stop,
            handle: Some(handle),
        })
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or((0, 0)))
            .unwrap_or((0, 0))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn shift_args() -> Vec<&'static str> {
    vec![
        "shift",
        "echo.mesh.test",
        "--from",
        "v1",
        "--to",
        "v3",
        "--step",
        "25",
        "--interval",
        "1s",
        "--max-error-rate",
        "5%",
        "--min-requests",
        "5",
    ]
}

#[test]
fn healthy_canary_is_promoted_in_steps() -> Result<()> {
    let setup = EchoSetup::new(None)?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();
    ensure!(meshctl_stdin(&socket, &["apply", "-f", "-"], &echo_split([100, 0, 0]))?.0);

    let (ok, stdout, _) = meshctl(&socket, &[&shift_args()[..], &["--dry-run"]].concat())?;
    ensure!(
        ok && stdout.contains("25%, 50%, 75%, 100%") && stdout.contains("nothing changed"),
        "{stdout}"
    );

    let load = Load::start(topo)?;
    let (ok, stdout, stderr) = meshctl(&socket, &shift_args())?;
    let (sent, failed) = load.finish();
    ensure!(
        ok,
        "shift failed:\n{stdout}\n{stderr}\nsent {sent} failed {failed}\n{}",
        meshctl(&socket, &["stats", "-o", "json"])?.1
    );
    for step in [
        "step 1/4",
        "step 2/4",
        "step 3/4",
        "step 4/4",
        "promoted v3 to 100%",
    ] {
        ensure!(stdout.contains(step), "missing {step:?}:\n{stdout}");
    }
    ensure!(
        failed == 0,
        "{failed} of {sent} connections failed during the shift"
    );
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(seen.get("v3") == Some(&200), "after the shift: {seen:?}");
    Ok(())
}

#[test]
fn failing_canary_is_rolled_back_before_the_next_step() -> Result<()> {
    let topo = Topology::build(3)?;
    // v3 runs no TCP server on 8080: its host answers every connection with a reset.
    let _servers = all_but_v3(&topo)?;
    let rules = RulesDir::new(&topo)?;
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    rules.write("dr.yaml", ECHO_SUBSETS)?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let socket = rules.socket();
    ensure!(meshctl_stdin(&socket, &["apply", "-f", "-"], &echo_split([100, 0, 0]))?.0);

    let load = Load::start(&topo)?;
    let (ok, stdout, stderr) = meshctl(&socket, &shift_args())?;
    let _ = load.finish();
    assert_rolled_back_at_step_1(ok, &stdout, &stderr, 4)?;
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(seen.get("v1") == Some(&200), "after the rollback: {seen:?}");
    let (_, vs, _) = meshctl(&socket, &["get", "vs", "echo", "-o", "yaml"])?;
    ensure!(vs.contains("weight: 100"), "{vs}");
    Ok(())
}

/// TCP identity servers on v1 and v2 only.
fn all_but_v3(topo: &Topology) -> Result<Vec<mesh_tests::servers::Server>> {
    use mesh_tests::{servers::tcp_server, topology::backend_v4};
    (1..=2)
        .map(|i| {
            tcp_server(
                &topo.backends[i - 1],
                std::net::SocketAddr::new(backend_v4(i), 8080),
                &format!("v{i}"),
            )
        })
        .collect()
}

const WEB_VIP: &str = "198.18.100.5:80";

/// An HTTP service on the L7 proxy (a route timeout needs it): `web` with v1 and v3.
fn web_rules(v3_weight: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.mesh.test]
  addresses: [198.18.100.5]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 198.18.2.1, labels: {{version: v1}}}}
  - {{address: 198.18.4.1, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web.mesh.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [web.mesh.test]
  http:
  - timeout: 5s
    route:
    - {{destination: {{host: web.mesh.test, subset: v1}}, weight: {}}}
    - {{destination: {{host: web.mesh.test, subset: v3}}, weight: {v3_weight}}}
",
        100 - v3_weight
    )
}

fn web_request() -> bool {
    mesh_tests::http::get_once(WEB_VIP.parse().expect("addr"), "/", "web.mesh.test", &[])
        .map(|r| r.status < 500)
        .unwrap_or(false)
}

fn web_backends(topo: &Topology) -> Result<Vec<mesh_tests::http::HttpServer>> {
    use mesh_tests::{http::http_server, topology::backend_v4};
    Ok(vec![
        http_server(
            &topo.backends[0],
            std::net::SocketAddr::new(backend_v4(1), 80),
            "v1",
        )?,
        http_server(
            &topo.backends[2],
            std::net::SocketAddr::new(backend_v4(3), 80),
            "v3",
        )?,
    ])
}

fn l7_shift_args() -> Vec<&'static str> {
    vec![
        "shift",
        "web",
        "--from",
        "v1",
        "--to",
        "v3",
        "--step",
        "50",
        "--interval",
        "1500ms",
        "--max-error-rate",
        "5%",
        "--min-requests",
        "10",
    ]
}

#[test]
fn healthy_l7_canary_is_promoted() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = web_backends(&topo)?;
    let rules = RulesDir::new(&topo)?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let socket = rules.socket();
    let (ok, _, stderr) = meshctl_stdin(&socket, &["apply", "-f", "-"], &web_rules(0))?;
    ensure!(ok, "{stderr}");
    let load = Load::start_with(&topo, web_request)?;
    let (ok, stdout, stderr) = meshctl(&socket, &l7_shift_args())?;
    let (sent, failed) = load.finish();
    ensure!(ok, "shift failed:\n{stdout}\n{stderr}");
    ensure!(
        stdout.contains("step 2/2") && stdout.contains("promoted v3 to 100%"),
        "{stdout}"
    );
    ensure!(
        failed == 0,
        "{failed} of {sent} requests failed during the shift"
    );
    Ok(())
}

#[test]
fn l7_canary_answering_500_on_20_percent_is_rolled_back() -> Result<()> {
    let topo = Topology::build(3)?;
    let servers = web_backends(&topo)?;
    // v3 answers 500 to every fifth request: 20% errors.
    servers[1]
        .behaviour
        .fail_every
        .store(5, std::sync::atomic::Ordering::Relaxed);
    servers[1]
        .behaviour
        .fail_status
        .store(500, std::sync::atomic::Ordering::Relaxed);
    let rules = RulesDir::new(&topo)?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let socket = rules.socket();
    let (ok, _, stderr) = meshctl_stdin(&socket, &["apply", "-f", "-"], &web_rules(0))?;
    ensure!(ok, "{stderr}");
    let load = Load::start_with(&topo, web_request)?;
    let (ok, stdout, stderr) = meshctl(&socket, &l7_shift_args())?;
    let _ = load.finish();
    assert_rolled_back_at_step_1(ok, &stdout, &stderr, 2)?;
    let v3_before = servers[1].count();
    for _ in 0..50 {
        ensure!(web_request(), "request failed after the rollback");
    }
    ensure!(
        servers[1].count() == v3_before,
        "v3 still receives traffic after the rollback"
    );
    Ok(())
}

/// A shift that failed its first step: exit non-zero, no second step, 100% back on v1.
fn assert_rolled_back_at_step_1(ok: bool, stdout: &str, stderr: &str, steps: usize) -> Result<()> {
    ensure!(!ok, "a failing canary was promoted:\n{stdout}");
    ensure!(
        stdout.contains(&format!("step 1/{steps}")) && !stdout.contains(&format!("step 2/{steps}")),
        "not stopped at step 1:\n{stdout}"
    );
    ensure!(
        stdout.contains("rolled back to 100% v1"),
        "{stdout}\n{stderr}"
    );
    Ok(())
}
