//! The soak's load, run from the client namespace until told to stop: new L4 connections to
//! `echo` (kernel path: connect, identity, echo), HTTP requests to `web` (meshd's proxy), and a
//! set of long-lived L4 connections echoing every two seconds (they must survive every rule
//! change and restart). Every outcome is counted; errors by kind, and separately when they
//! happened while meshd was restarting.

use std::{
    collections::BTreeMap,
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use mesh_tests::{
    http::get_once,
    netns::Netns,
    servers::{tcp_connect, tcp_echo},
    traffic::vip,
};

use crate::setup::{web_vip, WEB_HOST};

/// Shared counters of one run.
#[derive(Default)]
pub struct Tally {
    /// L4 connections that connected, got an identity and echoed.
    pub l4_ok: AtomicU64,
    /// HTTP requests answered 2xx by a backend.
    pub l7_ok: AtomicU64,
    /// Echo rounds on the long-lived connections that worked.
    pub held_ok: AtomicU64,
    /// Errors: kind -> count (`l4 refused`, `l7 http 503 (restart)`, ...).
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Long-lived connections that broke (index and error).
    pub held_lost: Mutex<Vec<String>>,
    /// Long-lived connections opened.
    pub held_opened: AtomicU64,
    /// Set while meshd is stopped or starting.
    pub restarting: AtomicBool,
    /// Set to end the load.
    pub stop: AtomicBool,
}

impl Tally {
    fn error(&self, path: &str, kind: &str) {
        let during = if self.restarting.load(Ordering::Relaxed) {
            " (during a restart)"
        } else {
            ""
        };
        *self
            .errors
            .lock()
            .expect("lock")
            .entry(format!("{path} {kind}{during}"))
            .or_insert(0) += 1;
    }
}

/// What kind of failure an error chain describes.
fn kind(error: &anyhow::Error) -> &'static str {
    let text = format!("{error:#}").to_ascii_lowercase();
    if text.contains("refused") {
        "connection refused"
    } else if text.contains("reset") {
        "connection reset"
    } else if text.contains("timed out") || text.contains("temporarily unavailable") {
        "timeout"
    } else if text.contains("mismatch") {
        "wrong echo"
    } else if text.contains("closed") || text.contains("eof") || text.contains("broken pipe") {
        "closed early"
    } else {
        "other"
    }
}

/// Starts the three load threads (each inside `client`); they run until `tally.stop`.
pub fn start(client: &Netns, tally: &Arc<Tally>, held: usize) -> Vec<thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    let ns = client.name().to_string();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        let ns = ns.clone();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || match enter(&ns) {
                Ok(()) => f(),
                Err(e) => eprintln!("soak load thread: {e:#}"),
            })
            .expect("spawning a load thread")
    };
    let t = tally.clone();
    threads.push(spawn("soak-l4", Box::new(move || l4_loop(&t))));
    let t = tally.clone();
    threads.push(spawn("soak-l7", Box::new(move || l7_loop(&t))));
    let t = tally.clone();
    threads.push(spawn("soak-held", Box::new(move || held_loop(&t, held))));
    threads
}

/// Moves the calling thread into namespace `name` (what [`Netns::run`] does for its thread).
fn enter(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: setns on this thread only; the fd is valid for the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn pause() {
    thread::sleep(Duration::from_millis(5));
}

fn l4_loop(t: &Tally) {
    while !t.stop.load(Ordering::Relaxed) {
        let result = tcp_connect(vip(8080)).and_then(|(mut s, _)| tcp_echo(&mut s, b"soak"));
        match result {
            Ok(()) => {
                t.l4_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => t.error("l4", kind(&e)),
        }
        pause();
    }
}

fn l7_loop(t: &Tally) {
    while !t.stop.load(Ordering::Relaxed) {
        match get_once(web_vip(), "/soak", WEB_HOST, &[]) {
            Ok(reply) if (200..300).contains(&reply.status) && reply.identity() != "-" => {
                t.l7_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => t.error("l7", &format!("http {}", reply.status)),
            Err(e) => t.error("l7", kind(&e)),
        }
        pause();
    }
}

fn held_loop(t: &Tally, count: usize) {
    let mut streams: Vec<Option<TcpStream>> = Vec::new();
    for _ in 0..count {
        match tcp_connect(vip(8080)) {
            Ok((s, _)) => {
                t.held_opened.fetch_add(1, Ordering::Relaxed);
                streams.push(Some(s));
            }
            Err(e) => t.error("held connect", kind(&e)),
        }
    }
    let mut round = 0u64;
    while !t.stop.load(Ordering::Relaxed) {
        round += 1;
        for (i, slot) in streams.iter_mut().enumerate() {
            let Some(stream) = slot else { continue };
            match tcp_echo(stream, format!("held {i} round {round}").as_bytes()) {
                Ok(()) => {
                    t.held_ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    t.held_lost
                        .lock()
                        .expect("lock")
                        .push(format!("connection {i} in round {round}: {e:#}"));
                    *slot = None;
                }
            }
        }
        for _ in 0..20 {
            if t.stop.load(Ordering::Relaxed) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}
