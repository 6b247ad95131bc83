//! A loopback port on the host that reaches a TCP service inside a namespace, so a browser on
//! the host can open what listens on the namespace's own loopback (meshd's split page). Only
//! host loopback and the namespace are involved.

use std::{
    fs::File,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// The forwarder; stops accepting on drop (open connections finish on their own).
pub struct LoopbackForward {
    /// Where to point the browser (127.0.0.1 on the host, ephemeral port).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// Forwards a fresh host loopback port to `target` inside `ns`.
pub fn forward_into(ns: &Netns, target: SocketAddr) -> Result<LoopbackForward> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a host loopback port")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let netns = format!("/var/run/netns/{}", ns.name());
    let flag = stop.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            let Ok(client) = client else { continue };
            let netns = netns.clone();
            thread::spawn(move || {
                if let Ok(upstream) = connect_in(&netns, target) {
                    pump(client, upstream);
                }
            });
        }
    });
    Ok(LoopbackForward { addr, stop })
}

/// Connects to `target` from a thread that entered the namespace (the socket stays there).
fn connect_in(netns: &str, target: SocketAddr) -> io::Result<TcpStream> {
    let file = File::open(netns)?;
    thread::spawn(move || {
        // SAFETY: setns on this short-lived thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        TcpStream::connect(target)
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("connect thread panicked")))
}

fn pump(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let back = thread::spawn(move || {
        let (mut from, mut to) = (b2, a2);
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
    let (mut from, mut to) = (a, b);
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = back.join();
}

impl Drop for LoopbackForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}
