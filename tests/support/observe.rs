//! Watching meshd from tests: plain GETs on the admin socket, and `meshctl trace` running in the
//! background with its NDJSON lines collected.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::meshd::bin;

/// GET `path` on meshd's admin socket; the body of a 200 answer.
pub fn admin_get(socket: &str, path: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting {socket}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no header/body separator")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}\n{body}");
    }
    Ok(body.to_string())
}

/// The trace counters (`GET /v1/trace/stats`).
pub fn trace_stats(socket: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&admin_get(
        socket,
        "/v1/trace/stats",
    )?)?)
}

/// `meshctl trace ... -o json` running in the background; killed on drop.
pub struct TraceRun {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl TraceRun {
    /// Starts `meshctl --socket SOCKET trace ARGS -o json` and waits until meshd counts it as
    /// a subscriber.
    pub fn start(socket: &str, args: &[&str]) -> Result<Self> {
        let before = trace_stats(socket)?["subscribers"].as_u64().unwrap_or(0);
        let mut child = std::process::Command::new(bin("meshctl")?)
            .args(["--socket", socket, "trace"])
            .args(args)
            .args(["-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshctl trace")?;
        let stdout = child.stdout.take().context("meshctl stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().expect("lines lock").push(v);
                }
            }
        });
        let run = TraceRun { child, lines };
        wait_until(
            Duration::from_secs(10),
            "meshctl trace to subscribe",
            || Ok(trace_stats(socket)?["subscribers"].as_u64().unwrap_or(0) > before),
        )?;
        Ok(run)
    }

    /// Events received so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Number of events received so far.
    pub fn len(&self) -> usize {
        self.lines.lock().expect("lines lock").len()
    }

    /// True when nothing arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for TraceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns true; fails with `what` after `limit` (stretched by
/// `MESH_TEST_SLOWDOWN`, see [`crate::patience`]: emulated VMs are slow).
pub fn wait_until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let limit = crate::patience(limit);
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
