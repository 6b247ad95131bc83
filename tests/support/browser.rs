//! A real browser for tests: headless Chromium (Debian's package) driven over the DevTools
//! protocol on a pipe (`--remote-debugging-pipe`: commands on fd 3, answers on fd 4, each
//! message ending in a NUL byte), so no extra port and no WebSocket client are needed.
//!
//! It runs inside a namespace (to reach what listens on that namespace's loopback), as root
//! with its sandbox off, a fresh profile directory, and everything that would talk to the
//! outside world disabled.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::netns::Netns;

/// Where Debian's package puts it.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with one page; killed (and its profile removed) on drop.
pub struct Browser {
    child: Child,
    commands: File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    profile: PathBuf,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by us from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Browser {
    /// Starts Chromium inside `ns` with an empty page attached.
    pub fn start(ns: &Netns) -> Result<Self> {
        if !Path::new(CHROMIUM).exists() {
            bail!("{CHROMIUM} is missing: `cargo xtask setup` installs Debian's chromium");
        }
        let profile = std::env::temp_dir().join(format!("{}-chromium", ns.name()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let (cmd_read, cmd_write) = pipe()?;
        let (ans_read, ans_write) = pipe()?;
        let mut cmd = ns.command(CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let (r, w) = (cmd_read.as_raw_fd(), ans_write.as_raw_fd());
        // SAFETY: only async-signal-safe fcntl/dup2 calls between fork and exec. The ends are
        // first copied above 9 so placing one on 3 cannot clobber the other (and dup2 onto a
        // different number clears close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                let (r, w) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting chromium")?;
        drop((cmd_read, ans_write));
        let (tx, answers) = mpsc::channel();
        let reader = File::from(ans_read);
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut message = Vec::new();
            while matches!(reader.read_until(0, &mut message), Ok(n) if n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut browser = Browser {
            child,
            commands: File::from(cmd_write),
            answers,
            next_id: 0,
            session: String::new(),
            profile,
        };
        let target = browser.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target = target["targetId"].as_str().context("targetId")?.to_string();
        let attached = browser.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        Ok(browser)
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .context("writing to chromium")?;
        loop {
            let answer = self
                .answers
                .recv_timeout(Duration::from_secs(30))
                .with_context(|| format!("no answer from chromium to {method}"))?;
            if answer["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(error) = answer.get("error") {
                bail!("{method}: {error}");
            }
            return Ok(answer["result"].clone());
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    /// Opens `url` in the page.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.page("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r.get("errorText") {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// Evaluates `expression` in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.page(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Saves a PNG of the page to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.page("Page.captureScreenshot", json!({"format": "png"}))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
