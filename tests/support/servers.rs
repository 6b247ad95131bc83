//! Backend servers that say who they are, and clients that ask.
//!
//! A TCP backend writes its identity and a newline as soon as a connection is accepted, then
//! echoes whatever it receives; a UDP backend answers every datagram with its identity. Clients
//! therefore learn which backend served them from real bytes that crossed the data plane.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// A running backend server; stops on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl Server {
    /// Connections (TCP) or datagrams (UDP) served so far.
    pub fn served(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts a TCP identity+echo server on `addr` inside `ns`.
pub fn tcp_server(ns: &Netns, addr: SocketAddr, identity: &str) -> Result<Server> {
    let listener = ns
        .run(move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let (stop2, accepted2, identity) = (stop.clone(), accepted.clone(), identity.to_string());
    thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted2.fetch_add(1, Ordering::Relaxed);
                    let identity = identity.clone();
                    let stop3 = stop2.clone();
                    thread::spawn(move || serve_tcp(stream, &identity, &stop3));
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Ok(Server { stop, accepted })
}

fn serve_tcp(mut stream: TcpStream, identity: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(crate::patience(Duration::from_millis(200))));
    if stream
        .write_all(format!("{identity}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Starts a UDP identity server on `addr` inside `ns`.
pub fn udp_server(ns: &Netns, addr: SocketAddr, identity: &str) -> Result<Server> {
    let socket = ns
        .run(move || UdpSocket::bind(addr))?
        .with_context(|| format!("binding udp {addr}"))?;
    socket.set_read_timeout(Some(crate::patience(Duration::from_millis(100))))?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let (stop2, accepted2, identity) = (stop.clone(), accepted.clone(), identity.to_string());
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                accepted2.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(identity.as_bytes(), peer);
            }
        }
    });
    Ok(Server { stop, accepted })
}

/// Opens a TCP connection to `target` and returns the stream and the identity line it got.
pub fn tcp_connect(target: SocketAddr) -> Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&target, crate::patience(Duration::from_secs(3)))
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(crate::patience(Duration::from_secs(3))))?;
    stream.set_write_timeout(Some(crate::patience(Duration::from_secs(3))))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("reading the identity from {target}"))?;
    if line.is_empty() {
        anyhow::bail!("{target} closed the connection without an identity");
    }
    Ok((stream, line.trim().to_string()))
}

/// Sends `payload` on an open connection and checks it comes back unchanged.
pub fn tcp_echo(stream: &mut TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).context("reading the echo")?;
    anyhow::ensure!(back == payload, "echo mismatch");
    Ok(())
}

/// Sends one datagram from a fresh socket (a new flow) and returns the identity that answered.
pub fn udp_ask(target: SocketAddr) -> Result<String> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(crate::patience(Duration::from_millis(500))))?;
    let mut buf = [0u8; 512];
    // UDP may lose the very first datagram while the node resolves a neighbour: retry a little.
    for _ in 0..4 {
        socket.send_to(b"who", target)?;
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    anyhow::bail!("no UDP answer from {target}")
}
