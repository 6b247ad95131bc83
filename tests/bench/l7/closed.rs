//! The closed-loop loads (wrk, h2load or the built-in client), keep-alive or a new
//! connection per request, and their medians over the rounds.

use super::*;

/// One closed-loop run.
pub(super) struct Run {
    pub(super) rps: f64,
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) a: u64,
    pub(super) b: u64,
    pub(super) proxy_cpu: f64,
    pub(super) load_cpu: f64,
    /// CPU seconds the proxy's processes used during the run.
    pub(super) proxy_cpu_s: f64,
}

pub(super) fn request_bytes(close: bool) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

pub(super) fn wrk_spawn(wrk: &str, setup: &Setup, secs: u64, close: bool) -> Result<Child> {
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
pub(super) fn wrk_finish(mut child: Child, limit: Duration) -> Result<(u64, f64, u64)> {
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
pub(super) async fn exchange(
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

pub(super) async fn connect(target: SocketAddr) -> Option<tokio::net::TcpStream> {
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
pub(super) fn builtin_closed(setup: &Setup, secs: u64, close: bool) -> Result<(u64, f64, u64)> {
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

pub(super) fn closed(setup: &Setup, wrk: Option<&str>, secs: u64, close: bool) -> Result<Run> {
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
pub(super) fn closed_with(
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

/// h2load's closed loop over h2c: (2xx responses, seconds, other outcomes).
pub(super) fn h2load_closed(h2load: &str, setup: &Setup, secs: u64) -> Result<(u64, f64, u64)> {
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

pub(super) fn load_stats(runs: &[Run]) -> Option<LoadStats> {
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
