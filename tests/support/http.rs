//! HTTP/1.1 for the L7 tests, written small and plain so the tests depend on nothing they test:
//! backend servers that answer with their identity, the Host and the request headers they saw
//! (and can be told to fail, sleep or just count), and a keep-alive client.
//!
//! A backend's answer body is lines of `key=value`: `identity=v1`, `host=...`, `path=...`,
//! `method=...`, then `header.<name>=<value>` per request header.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// What a backend does, changeable while it runs.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Answer `fail_status` (503 when 0) to every n-th request (0: never).
    pub fail_every: AtomicU64,
    /// The status of the failing requests of `fail_every` (0: 503).
    pub fail_status: AtomicU64,
    /// Answer this status to every request (0: 200).
    pub status: AtomicU64,
    /// Sleep this many milliseconds before answering every request.
    pub sleep_ms: AtomicU64,
    /// Sleep this many milliseconds before answering every n-th request (see `slow_every`).
    pub slow_ms: AtomicU64,
    /// Which requests `slow_ms` applies to (0: none).
    pub slow_every: AtomicU64,
}

/// A running HTTP backend; stops on drop.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    /// Requests received.
    pub requests: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    /// Host header of every request.
    pub hosts: Arc<Mutex<Vec<String>>>,
    /// Behaviour switches.
    pub behaviour: Arc<Behaviour>,
}

impl HttpServer {
    /// Requests received so far.
    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts an HTTP backend on `addr` inside `ns`, answering as `identity`.
pub fn http_server(ns: &Netns, addr: SocketAddr, identity: &str) -> Result<HttpServer> {
    let listener = ns
        .run(move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let server = HttpServer {
        stop: Arc::new(AtomicBool::new(false)),
        requests: Arc::new(AtomicU64::new(0)),
        connections: Arc::new(AtomicU64::new(0)),
        hosts: Arc::new(Mutex::new(Vec::new())),
        behaviour: Arc::new(Behaviour::default()),
    };
    let state = Conn {
        stop: server.stop.clone(),
        requests: server.requests.clone(),
        hosts: server.hosts.clone(),
        behaviour: server.behaviour.clone(),
        identity: identity.to_string(),
    };
    let (stop, connections) = (server.stop.clone(), server.connections.clone());
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    connections.fetch_add(1, Ordering::Relaxed);
                    let state = state.clone();
                    thread::spawn(move || state.serve(stream));
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Ok(server)
}

#[derive(Clone)]
struct Conn {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    hosts: Arc<Mutex<Vec<String>>>,
    behaviour: Arc<Behaviour>,
    identity: String,
}

impl Conn {
    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(crate::patience(Duration::from_secs(30))));
        let Ok(write) = stream.try_clone() else {
            return;
        };
        let mut write = write;
        let mut reader = BufReader::new(stream);
        while !self.stop.load(Ordering::Relaxed) {
            let Ok(Some(request)) = read_request(&mut reader) else {
                return;
            };
            let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
            let host = request.headers.get("host").cloned().unwrap_or_default();
            self.hosts.lock().expect("hosts").push(host.clone());
            let b = &self.behaviour;
            let mut sleep = b.sleep_ms.load(Ordering::Relaxed);
            let slow_every = b.slow_every.load(Ordering::Relaxed);
            if slow_every > 0 && n.is_multiple_of(slow_every) {
                sleep += b.slow_ms.load(Ordering::Relaxed);
            }
            if sleep > 0 {
                thread::sleep(Duration::from_millis(sleep));
            }
            let fail_every = b.fail_every.load(Ordering::Relaxed);
            let mut status = match b.status.load(Ordering::Relaxed) {
                0 => 200,
                s => s,
            };
            if fail_every > 0 && n.is_multiple_of(fail_every) {
                status = match b.fail_status.load(Ordering::Relaxed) {
                    0 => 503,
                    s => s,
                };
            }
            let mut body = format!(
                "identity={}\nhost={host}\npath={}\nmethod={}\n",
                self.identity, request.path, request.method
            );
            for (name, value) in &request.headers {
                body.push_str(&format!("header.{name}={value}\n"));
            }
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nx-served-by: {}\r\n\r\n",
                body.len(),
                self.identity
            );
            // One write: head and body in separate segments would meet Nagle and delayed ACK.
            if write.write_all(format!("{head}{body}").as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// A parsed request (headers lower-cased; the last value of a repeated header wins).
struct ParsedRequest {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<ParsedRequest>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let headers = read_headers(reader)?;
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Some(ParsedRequest {
        method,
        path,
        headers,
    }))
}

fn read_headers(reader: &mut impl BufRead) -> Result<BTreeMap<String, String>> {
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed inside the headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(headers);
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: BTreeMap<String, String>,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// A `key=value` line of a backend's body (`identity`, `host`, `header.end-user`, ...).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// The backend that answered (`-` for answers the proxy gave itself).
    pub fn identity(&self) -> &str {
        self.field("identity").unwrap_or("-")
    }
}

/// One keep-alive client connection.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects to `target` (call inside the client namespace).
    pub fn connect(target: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&target, crate::patience(Duration::from_secs(3)))
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(crate::patience(Duration::from_secs(10))))?;
        stream.set_write_timeout(Some(crate::patience(Duration::from_secs(10))))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends a request (Host `host`) and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut text = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (name, value) in headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("content-length: 0\r\n\r\n");
        self.stream.write_all(text.as_bytes())?;
        self.read_reply()
    }

    /// Writes raw bytes (for malformed requests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads one answer.
    pub fn read_reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed before an answer");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let headers = read_headers(&mut self.reader)?;
        let mut body = Vec::new();
        if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
                let mut chunk = vec![0u8; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(length) = headers.get("content-length").and_then(|v| v.parse().ok()) {
            body = vec![0u8; length];
            self.reader.read_exact(&mut body)?;
        }
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Whether the server closed the connection (reads EOF or an error within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(wait));
        let mut buf = [0u8; 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // an error answer before the close is fine
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// One request on a fresh connection.
pub fn get_once(
    target: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<Reply> {
    Client::connect(target)?.request("GET", path, host, headers)
}
