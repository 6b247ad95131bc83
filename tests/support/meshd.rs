//! Running the real meshd binary inside a namespace, with its log captured.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// Directory holding meshd and meshctl: `MESH_BIN_DIR`, else next to the running test binary
/// (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MESH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a mesh binary, with a clear error when it has not been built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p mesh-user --bins`, which `cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// A meshd process; SIGTERM then SIGKILL on drop.
pub struct Meshd {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Meshd {
    /// Starts meshd in `ns` with `args` and waits until it logs `meshd ready`.
    pub fn start(ns: &Netns, args: &[String]) -> Result<Self> {
        Self::start_within(ns, args, Duration::from_secs(20))
    }

    /// [`Meshd::start`] with a longer bound on the start (large rule sets in debug builds).
    pub fn start_within(ns: &Netns, args: &[String], timeout: Duration) -> Result<Self> {
        let mut meshd = Self::spawn(ns, args)?;
        meshd.wait_for_log("meshd ready", 0, crate::patience(timeout))?;
        Ok(meshd)
    }

    /// Starts meshd in `ns` with `args` without waiting for it to be ready.
    pub fn spawn(ns: &Netns, args: &[String]) -> Result<Self> {
        let mut cmd = ns.command(bin("meshd")?.to_str().context("utf-8 path")?);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting meshd")?;
        let stderr = child.stderr.take().context("meshd stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        Ok(Meshd { child, log })
    }

    /// meshd's process id (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of log lines so far (a cursor for [`Meshd::wait_for_log`]).
    pub fn log_len(&self) -> usize {
        self.log.lock().expect("log lock").len()
    }

    /// The whole log.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits for a log line after line `from` containing `needle`; fails early if meshd exits.
    pub fn wait_for_log(&mut self, needle: &str, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().expect("log lock")[from..]
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(line.clone());
            }
            if let Some(status) = self.child.try_wait()? {
                thread::sleep(Duration::from_millis(100));
                bail!(
                    "meshd exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "meshd did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGHUP and waits for the reload outcome; returns the log line.
    pub fn reload(&mut self) -> Result<String> {
        let from = self.log_len();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        loop {
            if let Some(line) = self.log.lock().expect("log lock")[from..].iter().find(|l| {
                l.contains("rules reloaded")
                    || l.contains("reload rejected")
                    || l.contains("reload failed")
            }) {
                return Ok(line.clone());
            }
            if Instant::now() > deadline {
                bail!("meshd did not report the reload:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to meshd (nsenter execs it, so the child pid is meshd's).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Kills meshd with SIGKILL (a crash: nothing of it runs afterwards) and reaps it.
    pub fn kill(mut self) -> Result<()> {
        self.signal(libc::SIGKILL);
        self.child.wait().context("reaping the killed meshd")?;
        Ok(())
    }

    /// Stops meshd with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("meshd ignored SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            for _ in 0..100 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs meshctl against `socket` and returns (success, stdout, stderr).
pub fn meshctl(socket: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new(bin("meshctl")?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .context("running meshctl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs meshctl with `stdin` fed to it.
pub fn meshctl_stdin(socket: &str, args: &[&str], stdin: &str) -> Result<(bool, String, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new(bin("meshctl")?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running meshctl")?;
    child
        .stdin
        .take()
        .context("meshctl stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `meshctl status -o json` against `socket`, parsed.
pub fn status_json(socket: &str) -> Result<serde_json::Value> {
    let (ok, out, err) = meshctl(socket, &["status", "-o", "json"])?;
    anyhow::ensure!(ok, "meshctl status failed: {err}");
    serde_json::from_str(&out).context("meshctl status output")
}

/// The packet programs' verdict counters by reason name (`meshctl stats -o json`'s `reasons`).
pub fn reason_counts(socket: &str) -> Result<std::collections::BTreeMap<String, u64>> {
    let (ok, out, err) = meshctl(socket, &["stats", "-o", "json"])?;
    anyhow::ensure!(ok, "meshctl stats failed: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).context("meshctl stats output")?;
    let reasons: Vec<(String, u64)> =
        serde_json::from_value(stats["reasons"].clone()).context("stats: reasons")?;
    Ok(reasons.into_iter().collect())
}

/// A bpffs pin directory for one test (named by the topology's per-run prefix); `meshd
/// --cleanup` and removal on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// The pin directory for `topo`.
    pub fn new(topo: &crate::topology::Topology) -> Self {
        PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(meshd) = bin("meshd") {
            let _ = std::process::Command::new(meshd)
                .args(["--cleanup", "--pin-dir"])
                .arg(&self.0)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// meshd's Prometheus text from its default metrics listener, fetched inside `ns`; an error
/// when the endpoint does not answer (never an empty page that checks pass on).
pub fn scrape_metrics(ns: &crate::netns::Netns) -> Result<String> {
    let out = ns
        .exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])
        .context("GET /metrics on meshd's metrics listener")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the first sample in `text` whose line starts with `prefix` (family name and
/// the start of its labels) and contains `needle`.
pub fn metric_value(text: &str, prefix: &str, needle: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l.contains(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
