//! The L7 proxy end to end: real HTTP from a client namespace to a VIP (or a Gateway on the
//! node's address), through meshd's proxy on the node, to HTTP backends in their own
//! namespaces. What arrived where is read from the backends' own answers and counters.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    http::{get_once, Client, HttpServer, Reply},
    l7::{vip, virtual_service, Setup, HOST},
    meshd::{meshctl, meshctl_stdin},
    split::{assert_shares, check_share},
};

/// `count` requests on one keep-alive connection; who answered, by identity.
fn tally(
    setup: &Setup,
    count: usize,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> Result<BTreeMap<String, usize>> {
    setup.client(move || {
        let mut client = Client::connect(vip())?;
        let mut seen = BTreeMap::new();
        for n in 0..count {
            let reply = client
                .request("GET", path, HOST, headers)
                .with_context(|| format!("request {n}"))?;
            ensure!(
                reply.status == 200,
                "request {n}: status {}: {}",
                reply.status,
                reply.body
            );
            *seen.entry(reply.identity().to_string()).or_insert(0) += 1;
        }
        Ok(seen)
    })
}

#[test]
fn header_route_sends_jason_to_v2_and_everyone_else_to_v1() -> Result<()> {
    let setup = Setup::new(
        2,
        "",
        "  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web.mesh.test, subset: v2}}]
  - route: [{destination: {host: web.mesh.test, subset: v1}}]
",
    )?;
    let jason = tally(&setup, 500, "/reviews", &[("end-user", "jason")])?;
    ensure!(
        jason == BTreeMap::from([("v2".into(), 500)]),
        "jason: {jason:?}"
    );
    let others = tally(&setup, 500, "/reviews", &[("end-user", "alice")])?;
    ensure!(
        others == BTreeMap::from([("v1".into(), 500)]),
        "others: {others:?}"
    );
    let nobody = tally(&setup, 50, "/reviews", &[])?;
    ensure!(
        nobody == BTreeMap::from([("v1".into(), 50)]),
        "no header: {nobody:?}"
    );
    // HTTP/2 without TLS (h2c, prior knowledge) on the same port is routed the same way.
    for (user, want) in [("jason", "v2"), ("alice", "v1")] {
        let out = setup.topo.client.exec(
            "curl",
            &[
                "-s",
                "--http2-prior-knowledge",
                "-w",
                "\nhttp_version=%{http_version}\n",
                "-H",
                &format!("end-user: {user}"),
                "-H",
                &format!("host: {HOST}"),
                &format!("http://{}/h2", vip()),
            ],
        )?;
        let body = String::from_utf8_lossy(&out.stdout);
        ensure!(body.contains("http_version=2"), "not HTTP/2: {body}");
        ensure!(
            body.contains(&format!("identity={want}")),
            "h2c as {user}: {body}"
        );
    }
    // The request really crossed the proxy with its headers and Host intact.
    let reply = setup.client(|| get_once(vip(), "/x", HOST, &[("end-user", "jason")]))?;
    ensure!(reply.field("host") == Some(HOST), "{}", reply.body);
    ensure!(
        reply.field("header.end-user") == Some("jason"),
        "{}",
        reply.body
    );
    ensure!(
        reply.field("header.x-forwarded-for") == Some("198.18.1.2"),
        "{}",
        reply.body
    );
    // meshctl stats shows the L7 service and its routes.
    let (ok, out, err) = meshctl(&setup.rules.socket(), &["stats"])?;
    ensure!(ok, "{err}");
    ensure!(
        out.contains("L7 proxy") && out.contains("web.mesh.test|v2|80"),
        "{out}"
    );
    // One JSON access-log line per request, naming route, subset and backend.
    let access: Vec<serde_json::Value> = setup
        .meshd
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "mesh::access")
        .collect();
    ensure!(
        access.len() >= 1000,
        "{} access-log lines for 1000 requests; the log starts:\n{}",
        access.len(),
        setup
            .meshd
            .log()
            .lines()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let jason = access
        .iter()
        .find(|v| v["fields"]["subset"] == "v2")
        .context("no access-log line for subset v2")?;
    for field in [
        "method",
        "authority",
        "path",
        "route",
        "backend",
        "status",
        "duration_ms",
        "bytes",
    ] {
        ensure!(
            !jason["fields"][field].is_null(),
            "access log lacks {field}: {jason}"
        );
    }
    // Prometheus carries the L7 families next to the kernel ones.
    let metrics = setup
        .topo
        .node
        .exec("curl", &["-s", "http://127.0.0.1:9464/metrics"])?;
    let text = String::from_utf8_lossy(&metrics.stdout);
    ensure!(
        text.contains("mesh_l7_requests_total"),
        "no L7 requests in /metrics"
    );
    ensure!(
        text.contains("mesh_l7_request_duration_seconds_bucket"),
        "no L7 latency histogram"
    );
    ensure!(
        text.contains("mesh_rule_applies_total"),
        "no apply counter in /metrics"
    );
    Ok(())
}

#[test]
fn per_request_split_50_50_on_one_keepalive_connection() -> Result<()> {
    let setup = Setup::new(
        2,
        "",
        "  - match: [{uri: {prefix: /}}]
    route:
    - {destination: {host: web.mesh.test, subset: v1}, weight: 50}
    - {destination: {host: web.mesh.test, subset: v2}, weight: 50}
",
    )?;
    let seen = tally(&setup, 2000, "/split", &[])?;
    ensure!(
        seen.values().sum::<usize>() == 2000 && seen.len() == 2,
        "{seen:?}"
    );
    assert_shares(&seen, &[("v1", 0.5), ("v2", 0.5)]).context("one keep-alive connection")?;
    // Upstream connections are pooled, not one per request.
    for s in &setup.servers {
        let connections = s.connections.load(Ordering::Relaxed);
        ensure!(
            connections < 50,
            "{connections} upstream connections for ~1000 requests"
        );
    }
    Ok(())
}

/// (method, path, headers, expected identity or status).
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

#[test]
fn uri_method_query_and_without_headers_routing() -> Result<()> {
    let setup = Setup::new(
        3,
        "",
        "  - match: [{uri: {exact: /exact}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
  - match: [{uri: {regex: '/items/[0-9]+'}}]
    route: [{destination: {host: web.mesh.test, subset: v2}}]
  - match: [{method: {exact: POST}, uri: {prefix: /api}}]
    route: [{destination: {host: web.mesh.test, subset: v3}}]
  - match: [{queryParams: {flavour: {exact: beta}}}]
    route: [{destination: {host: web.mesh.test, subset: v2}}]
  - match: [{uri: {prefix: /api}, withoutHeaders: {x-debug: {exact: '1'}}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
  - match: [{uri: {prefix: /CaSe}, ignoreUriCase: true}]
    route: [{destination: {host: web.mesh.test, subset: v3}}]
  - directResponse: {status: 418, body: {string: teapot}}
",
    )?;
    let cases: Vec<Case> = vec![
        ("GET", "/exact", vec![], "v1"),
        ("GET", "/exact/more", vec![], "418"),
        ("GET", "/items/42", vec![], "v2"),
        ("GET", "/items/42x", vec![], "418"),
        ("POST", "/api/orders", vec![], "v3"),
        ("GET", "/api/orders", vec![], "v1"),
        ("GET", "/api/orders", vec![("x-debug", "1")], "418"),
        ("GET", "/?flavour=beta", vec![], "v2"),
        ("GET", "/?flavour=alpha", vec![], "418"),
        ("GET", "/case/x", vec![], "v3"),
    ];
    let results = setup.client(move || {
        let mut client = Client::connect(vip())?;
        let mut out = Vec::new();
        for (method, path, headers, want) in cases {
            for _ in 0..5 {
                let reply = client.request(method, path, HOST, &headers)?;
                let got = if reply.status == 200 {
                    reply.identity().to_string()
                } else {
                    reply.status.to_string()
                };
                out.push((format!("{method} {path} {headers:?}"), want, got));
            }
        }
        Ok(out)
    })?;
    for (request, want, got) in results {
        ensure!(want == got, "{request}: expected {want}, got {got}");
    }
    Ok(())
}

/// Waits (bounded) until `server` has received `at_least` requests; returns its count.
fn settle(server: &HttpServer, at_least: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    while server.count() < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Late stragglers of a share: a short quiet period.
    std::thread::sleep(Duration::from_millis(300));
    server.count()
}

#[test]
fn mirror_copies_requests_with_shadow_host_and_never_delays_the_client() -> Result<()> {
    let mut setup = Setup::new(
        2,
        "",
        "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
    mirror: {host: web.mesh.test, subset: v2}
",
    )?;
    let primary = tally(&setup, 200, "/m", &[])?;
    ensure!(
        primary == BTreeMap::from([("v1".into(), 200)]),
        "client saw {primary:?}"
    );
    let shadow = &setup.servers[1];
    let mirrored = settle(shadow, 200, Duration::from_secs(5));
    ensure!(mirrored == 200, "100% mirror: shadow got {mirrored} of 200");
    ensure!(
        shadow
            .hosts
            .lock()
            .expect("hosts")
            .iter()
            .all(|h| h == "web.mesh.test-shadow"),
        "shadow Host headers: {:?}",
        shadow
            .hosts
            .lock()
            .expect("hosts")
            .iter()
            .take(3)
            .collect::<Vec<_>>()
    );

    setup.rules.write(
        "vs.yaml",
        &virtual_service(
            "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
    mirror: {host: web.mesh.test, subset: v2}
    mirrorPercentage: {value: 30}
",
        ),
    )?;
    ensure!(setup.meshd.reload()?.contains("rules reloaded"));
    let before = shadow.count();
    let primary = tally(&setup, 1000, "/m", &[])?;
    ensure!(
        primary == BTreeMap::from([("v1".into(), 1000)]),
        "client saw {primary:?}"
    );
    let mirrored = settle(shadow, before + 250, Duration::from_secs(5)) - before;
    check_share("30% mirror", mirrored as usize, 1000, 0.30)?;

    // A shadow that takes 5 s must not slow the client.
    setup.rules.write(
        "vs.yaml",
        &virtual_service(
            "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
    mirror: {host: web.mesh.test, subset: v2}
    mirrorPercent: 100
",
        ),
    )?;
    ensure!(setup.meshd.reload()?.contains("rules reloaded"));
    shadow.behaviour.sleep_ms.store(5000, Ordering::Relaxed);
    let slowest = setup.client(|| {
        let mut client = Client::connect(vip())?;
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let started = Instant::now();
            let reply = client.request("GET", "/slow-shadow", HOST, &[])?;
            ensure!(reply.status == 200 && reply.identity() == "v1", "{reply:?}");
            slowest = slowest.max(started.elapsed());
        }
        Ok(slowest)
    })?;
    ensure!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?} with a 5 s shadow"
    );
    Ok(())
}

#[test]
fn fault_abort_for_jason_and_delay_beyond_the_route_timeout() -> Result<()> {
    let setup = Setup::new(
        1,
        "",
        "  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: web.mesh.test, subset: v1}}]
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
    timeout: 1s
    route: [{destination: {host: web.mesh.test, subset: v1}}]
  - route: [{destination: {host: web.mesh.test, subset: v1}}]
",
    )?;
    let before = setup.servers[0].count();
    let statuses = setup.client(|| {
        let mut client = Client::connect(vip())?;
        let mut out = BTreeMap::new();
        for _ in 0..100 {
            let jason = client.request("GET", "/", HOST, &[("end-user", "jason")])?;
            *out.entry(format!("jason {}", jason.status)).or_insert(0) += 1;
            let other = client.request("GET", "/", HOST, &[("end-user", "alice")])?;
            *out.entry(format!("alice {}", other.status)).or_insert(0) += 1;
        }
        Ok(out)
    })?;
    ensure!(
        statuses == BTreeMap::from([("alice 200".into(), 100), ("jason 500".into(), 100)]),
        "{statuses:?}"
    );
    ensure!(
        setup.servers[0].count() - before == 100,
        "aborted requests reached the backend"
    );
    let (status, took) = setup.client(|| {
        let started = Instant::now();
        let reply = get_once(vip(), "/slow", HOST, &[])?;
        Ok((reply.status, started.elapsed()))
    })?;
    ensure!(status == 504, "delay 2s with timeout 1s answered {status}");
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1800),
        "504 after {took:?}, expected about 1 s"
    );
    Ok(())
}

#[test]
fn retries_hide_a_flapping_backend_and_per_try_timeout_is_honoured() -> Result<()> {
    let setup = Setup::new(
        1,
        "",
        "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: '5xx'}
",
    )?;
    let backend = &setup.servers[0];
    backend.behaviour.fail_every.store(2, Ordering::Relaxed);
    let seen = tally(&setup, 200, "/flap", &[])?;
    ensure!(seen == BTreeMap::from([("v1".into(), 200)]), "{seen:?}");
    ensure!(
        backend.count() >= 300,
        "only {} tries for 200 requests with every other failing",
        backend.count()
    );

    backend.behaviour.fail_every.store(0, Ordering::Relaxed);
    backend.behaviour.slow_every.store(2, Ordering::Relaxed);
    backend.behaviour.slow_ms.store(3000, Ordering::Relaxed);
    let slowest = setup.client(|| {
        let mut client = Client::connect(vip())?;
        let mut slowest = Duration::ZERO;
        for n in 0..10 {
            let started = Instant::now();
            let reply = client.request("GET", "/sometimes-slow", HOST, &[])?;
            ensure!(reply.status == 200, "request {n}: {reply:?}");
            slowest = slowest.max(started.elapsed());
        }
        Ok(slowest)
    })?;
    ensure!(
        slowest < Duration::from_millis(2500),
        "perTryTimeout 500ms not honoured: {slowest:?}"
    );
    Ok(())
}

#[test]
fn consistent_hash_keeps_users_and_outlier_detection_ejects_a_failing_backend() -> Result<()> {
    let setup = Setup::new(
        3,
        "loadBalancer:
  consistentHash: {httpHeaderName: x-user}
outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}",
        "",
    )?;
    let homes = setup.client(|| {
        let mut client = Client::connect(vip())?;
        let mut homes: BTreeMap<String, String> = BTreeMap::new();
        for round in 0..10 {
            for user in 0..30 {
                let name = format!("user-{user}");
                let reply = client.request("GET", "/", HOST, &[("x-user", &name)])?;
                ensure!(reply.status == 200, "{reply:?}");
                let home = homes
                    .entry(name.clone())
                    .or_insert_with(|| reply.identity().to_string());
                ensure!(
                    home == reply.identity(),
                    "round {round}: {name} moved from {home} to {}",
                    reply.identity()
                );
            }
        }
        Ok(homes)
    })?;
    let distinct: std::collections::BTreeSet<&String> = homes.values().collect();
    ensure!(distinct.len() >= 2, "30 users all hashed to {distinct:?}");

    // v2 starts failing: after 3 consecutive 5xx it is ejected and gets nothing more.
    let failing = &setup.servers[1];
    failing.behaviour.status.store(500, Ordering::Relaxed);
    let replies: Vec<Reply> = setup.client(|| {
        let mut client = Client::connect(vip())?;
        let mut out = Vec::new();
        for n in 0..300 {
            let user = format!("user-{}", n % 30);
            out.push(client.request("GET", "/", HOST, &[("x-user", &user)])?);
        }
        Ok(out)
    })?;
    let failures = replies.iter().filter(|r| r.status != 200).count();
    ensure!(
        failures <= 3,
        "{failures} failures: ejection should stop them after 3"
    );
    ensure!(
        failing.count() <= 3 + homes.values().filter(|h| *h == "v2").count() as u64 * 10,
        "ejected backend kept receiving: {}",
        failing.count()
    );
    let after = failing.count();
    let more = tally(&setup, 100, "/", &[("x-user", "user-1")])?;
    ensure!(
        failing.count() == after,
        "ejected backend received requests: {more:?}"
    );
    Ok(())
}

/// A request's window and whether it failed.
struct Attempt {
    started: Instant,
    ended: Instant,
    error: Option<String>,
}

#[test]
fn switching_between_kernel_path_and_proxy_while_clients_run() -> Result<()> {
    let setup = Setup::new(2, "", "")?;
    let socket = setup.rules.socket();
    let l4 = virtual_service(
        "  - route:
    - {destination: {host: web.mesh.test, subset: v1}, weight: 50}
    - {destination: {host: web.mesh.test, subset: v2}, weight: 50}
",
    );
    let l7 = virtual_service(
        "  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web.mesh.test, subset: v2}}]
  - route:
    - {destination: {host: web.mesh.test, subset: v1}, weight: 50}
    - {destination: {host: web.mesh.test, subset: v2}, weight: 50}
",
    );
    let apply = |yaml: &str| -> Result<(Instant, Instant)> {
        let started = Instant::now();
        let (ok, out, err) = meshctl_stdin(&socket, &["apply", "-f", "-"], yaml)?;
        ensure!(ok, "apply failed: {out}{err}");
        Ok((started, Instant::now()))
    };
    // Which path serves: jason always lands on v2 only through the proxy.
    let probe = |setup: &Setup| -> Result<usize> {
        setup.client(|| {
            let mut v2 = 0;
            for _ in 0..40 {
                if get_once(vip(), "/probe", HOST, &[("end-user", "jason")])?.identity() == "v2" {
                    v2 += 1;
                }
            }
            Ok(v2)
        })
    };
    apply(&l4)?;
    ensure!(
        probe(&setup)? < 40,
        "kernel path should split jason's connections"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        clients.push(std::thread::spawn({
            let path = format!("/var/run/netns/{}", setup.topo.client.name());
            move || -> Result<Vec<Attempt>> {
                let file = std::fs::File::open(&path)?;
                // SAFETY: setns on this thread only.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                ensure!(rc == 0, "setns failed");
                let mut attempts = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let started = Instant::now();
                    let result = get_once(vip(), "/switch", HOST, &[]);
                    let error = match result {
                        Ok(r) if r.status == 200 => None,
                        Ok(r) => Some(format!("status {}", r.status)),
                        Err(e) => Some(format!("{e:#}")),
                    };
                    attempts.push(Attempt {
                        started,
                        ended: Instant::now(),
                        error,
                    });
                }
                Ok(attempts)
            }
        }));
    }
    let mut switches = Vec::new();
    std::thread::sleep(Duration::from_millis(800));
    switches.push(apply(&l7)?);
    std::thread::sleep(Duration::from_millis(1200));
    switches.push(apply(&l4)?);
    std::thread::sleep(Duration::from_millis(1200));
    switches.push(apply(&l7)?);
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for c in clients {
        attempts.extend(c.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    ensure!(attempts.len() > 100, "only {} requests ran", attempts.len());
    // A failure is allowed only for a connection that was open when a switch happened.
    let slack = Duration::from_millis(500);
    for a in attempts.iter().filter(|a| a.error.is_some()) {
        let spans_switch = switches
            .iter()
            .any(|(from, to)| a.started <= *to + slack && a.ended + slack >= *from);
        ensure!(
            spans_switch,
            "a request failed away from any switch: {:?}",
            a.error
        );
    }
    let failed = attempts.iter().filter(|a| a.error.is_some()).count();
    eprintln!("switching: {failed} failed of {} requests", attempts.len());
    for a in attempts.iter().filter(|a| a.error.is_some()) {
        eprintln!("  failed: {:?}", a.error);
    }
    ensure!(
        failed <= 4 * switches.len(),
        "{failed} failures of {} requests",
        attempts.len()
    );
    ensure!(
        probe(&setup)? == 40,
        "after switching to L7, jason must always reach v2"
    );
    Ok(())
}

#[test]
fn bad_clients_get_errors_or_closed_connections_and_others_are_served() -> Result<()> {
    let setup = Setup::new(
        1,
        "",
        "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
",
    )?;
    let outcome = setup.client(|| {
        // Malformed request line.
        let mut bad = Client::connect(vip())?;
        bad.send_raw(b"THIS IS NOT HTTP\r\n\r\n")?;
        let malformed = bad.read_reply().map(|r| r.status).unwrap_or(0);
        // 100 KB of headers.
        let mut big = Client::connect(vip())?;
        let huge = "a".repeat(100 * 1024);
        let oversized = big
            .request("GET", "/", HOST, &[("x-huge", &huge)])
            .map(|r| r.status)
            .unwrap_or(0);
        // Slowloris: a head that never ends, one header line per 500 ms.
        let mut slow = Client::connect(vip())?;
        slow.send_raw(b"GET / HTTP/1.1\r\nhost: web.mesh.test\r\n")?;
        let started = Instant::now();
        let mut slowloris_closed = None;
        while started.elapsed() < Duration::from_secs(20) {
            if slow.send_raw(b"x-drip: 1\r\n").is_err()
                || slow.closed_within(Duration::from_millis(500))
            {
                slowloris_closed = Some(started.elapsed());
                break;
            }
        }
        // A client that connects and says nothing.
        let mut silent = Client::connect(vip())?;
        let silent_closed = silent.closed_within(Duration::from_secs(15));
        // Meanwhile and after, a well-behaved client is served.
        let good = get_once(vip(), "/fine", HOST, &[])?;
        Ok((malformed, oversized, slowloris_closed, silent_closed, good))
    })?;
    let (malformed, oversized, slowloris, silent, good) = outcome;
    eprintln!(
        "malformed {malformed}, oversized {oversized}, slowloris {slowloris:?}, silent {silent}"
    );
    ensure!(malformed == 400, "malformed request answered {malformed}");
    ensure!(oversized == 431, "oversized headers answered {oversized}");
    let slowloris = slowloris.context("slowloris connection was never closed")?;
    ensure!(
        slowloris < Duration::from_secs(15),
        "slowloris closed after {slowloris:?}"
    );
    ensure!(silent, "a silent connection stayed open");
    ensure!(good.status == 200 && good.identity() == "v1", "{good:?}");
    Ok(())
}
