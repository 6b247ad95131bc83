//! Listeners and client connections: per service address one listening socket per worker
//! (`SO_REUSEPORT`), HTTP/1.1 and h2c (prior knowledge) on the same port, with the limits
//! that keep abusive clients from hurting others, and graceful draining.
//!
//! Limits:
//! - request head at most [`MAX_HEAD_BYTES`] (hyper answers 431 beyond it), at most
//!   [`MAX_HEADERS`] headers, complete within [`HEADER_READ_TIMEOUT`] (slowloris), which also
//!   closes HTTP/1 keep-alive connections idle that long; a connection that sends nothing at
//!   all is closed after the same time;
//! - HTTP/2: [`MAX_CONCURRENT_STREAMS`] streams and a capped header list per connection; a
//!   connection with no request in flight for the idle timeout is closed (GOAWAY);
//! - stream idle timeout: a request body that stops arriving (408, see [`super::body`]) or a
//!   client that stops reading its response (the write stalls: the connection is closed);
//! - a global cap on client connections: beyond it a new connection gets a 503 and is closed;
//! - accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off instead of spinning.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
    time::{Instant, Sleep},
};

use super::{
    handler::{self, ConnContext},
    watchdog::SideWaker,
    Shared,
};
use crate::compile::ServiceAddress;

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one request: hyper's own default, deliberately not set on the builder
/// (setting it, even to the same value, makes hyper initialise a 100-entry array for every
/// request head it parses instead of using an uninitialised inline one).
pub const MAX_HEADERS: usize = 100;
/// Time a client has to send a complete request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default cap on client connections over all listeners and workers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// How long a closing listener lets in-flight requests finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default stream idle timeout (request body or response write without progress).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle timeout of a client connection without a request in flight (HTTP/2; HTTP/1
/// keep-alive connections close after [`HEADER_READ_TIMEOUT`] already).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the answer to a connection over the cap is.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

/// Timeouts and caps of client connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// See [`DEFAULT_STREAM_IDLE_TIMEOUT`].
    pub stream_idle: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle: Duration,
    /// Client connections at once, over all listeners.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            stream_idle: DEFAULT_STREAM_IDLE_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The connection builder with the limits above.
pub fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .writev(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// Raises this process's open-file limit to its hard limit (each client connection and each
/// upstream connection is a file descriptor); returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a plain struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// A running listener (one socket per worker).
pub struct ListenerHandle {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ListenerHandle {
    /// Stops accepting, lets in-flight requests finish (HTTP/1 answers carry
    /// `Connection: close`, HTTP/2 gets GOAWAY), closes idle connections, and resolves when
    /// all are gone or [`DRAIN_TIMEOUT`] passed.
    pub async fn drain(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Every connection holds a receiver: closed() resolves when the last one is gone.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.shutdown.closed()).await;
    }
}

/// Binds `address` for one worker (IP_FREEBIND: a VIP is local by route, which IPv6 bind does
/// not look at; SO_REUSEPORT: every worker has its own socket on the same address).
pub fn bind(address: ServiceAddress) -> io::Result<std::net::TcpListener> {
    let addr = SocketAddr::new(address.ip, address.port);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Opens `address` on every worker and serves it until drained.
pub fn spawn(
    shared: Arc<Shared>,
    address: ServiceAddress,
    workers: &[tokio::runtime::Handle],
) -> io::Result<ListenerHandle> {
    let (shutdown, stop) = watch::channel(false);
    let mut sockets = Vec::new();
    for _ in workers {
        sockets.push(bind(address)?);
    }
    let mut tasks = Vec::new();
    for (worker, (runtime, socket)) in workers.iter().zip(sockets).enumerate() {
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(socket)?
        };
        tasks.push(runtime.spawn(accept_loop(
            shared.clone(),
            address,
            worker,
            listener,
            stop.clone(),
        )));
    }
    Ok(ListenerHandle { shutdown, tasks })
}

/// One slot of the global connection cap, released on drop.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn take_slot(shared: &Arc<Shared>) -> Option<Slot> {
    let limit = shared.limits.max_connections;
    shared
        .connections
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(shared.clone()))
}

async fn accept_loop(
    shared: Arc<Shared>,
    address: ServiceAddress,
    worker: usize,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) => {
                if is_resource_error(&e) {
                    // Out of descriptors or memory: accepting again at once would fail again
                    // (and spin); wait, longer each time, up to a second.
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    tracing::warn!(error = %e, ?backoff, "L7 proxy cannot accept connections");
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
                continue;
            }
        };
        let Some(slot) = take_slot(&shared) else {
            // Over the cap: answer 503 (the send buffer takes it at once) and close.
            let _ = stream.try_write(OVER_CAP);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnContext::new(shared.clone(), address, client, worker));
        tokio::spawn(serve_connection(conn, stream, stop.clone(), slot));
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn serve_connection(
    conn: Arc<ConnContext>,
    stream: TcpStream,
    mut drain: watch::Receiver<bool>,
    _slot: Slot,
) {
    let limits = conn.shared.limits;
    let shared = conn.shared.clone();
    let requests = conn.clone();
    let service = service_fn(move |request| handler::handle(requests.clone(), request));
    let io = TokioIo::new(ClientIo::new(
        stream,
        limits.stream_idle,
        HEADER_READ_TIMEOUT,
    ));
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    // Drain and idle checks, polled only when one of them fired (see [`super::watchdog`]).
    let watchdog = async {
        loop {
            tokio::select! {
                _ = drain.changed() => return,
                _ = tokio::time::sleep(limits.idle) => {
                    if conn.idle_for() >= limits.idle {
                        return;
                    }
                }
            }
        }
    };
    tokio::pin!(watchdog);
    let side = SideWaker::default();
    let mut closing = false;
    std::future::poll_fn(|cx| {
        if connection.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !closing && side.poll(watchdog.as_mut(), cx).is_ready() {
            // In-flight requests finish, HTTP/1 answers say `Connection: close`, HTTP/2 gets
            // GOAWAY; the connection is polled again at once to act on it.
            closing = true;
            connection.as_mut().graceful_shutdown();
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
}

/// A client stream with two deadlines: its first bytes must arrive within `first_read` (HTTP/1
/// header timeouts only start once the protocol is known, so a connection that sends nothing
/// would otherwise be held forever), and its writes may not stall longer than `stall`: a
/// client that stops reading its responses gets its connection closed (the write fails with
/// `TimedOut`). Timers exist only while a read or write waits: the common case (the request
/// is already there, the socket takes the answer) costs no syscall and no timer.
struct ClientIo {
    stream: TcpStream,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    /// Until the first bytes arrived: how long they may take, and whether the wait started.
    first_read: Option<Duration>,
    first_waiting: bool,
}

impl ClientIo {
    fn new(stream: TcpStream, stall: Duration, first_read: Duration) -> Self {
        Self {
            stream,
            stall,
            timer: None,
            stalled: false,
            first_read: Some(first_read),
            first_waiting: false,
        }
    }

    /// Arms the timer for `limit` from now if `armed` is not set yet, then polls it.
    fn poll_deadline(
        timer: &mut Option<Pin<Box<Sleep>>>,
        armed: &mut bool,
        limit: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        if !*armed {
            *armed = true;
            let deadline = Instant::now() + limit;
            match timer {
                Some(t) => t.as_mut().reset(deadline),
                None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        matches!(
            timer.as_mut().map(|t| t.as_mut().poll(cx)),
            Some(Poll::Ready(()))
        )
    }

    fn on_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = false;
            return r;
        }
        if Self::poll_deadline(&mut self.timer, &mut self.stalled, self.stall, cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading (stream idle timeout)",
            )));
        }
        Poll::Pending
    }
}

use std::future::Future as _;

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(limit) = this.first_read else {
            return r;
        };
        if r.is_ready() {
            // Data, an error or the end: the protocol's own timeouts take over.
            this.first_read = None;
            if this.first_waiting {
                this.timer = None;
            }
            return r;
        }
        if Self::poll_deadline(&mut this.timer, &mut this.first_waiting, limit, cx) {
            this.first_read = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client sent nothing (header read timeout)",
            )));
        }
        Poll::Pending
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.on_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.on_write(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Requests in flight on a connection and when the last one started or ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    since: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            since: Default::default(),
            epoch: std::time::Instant::now(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.since.store(ms, Ordering::Relaxed);
    }

    /// A request starts (no clock read: while one is in flight the idle time is zero).
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ends.
    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// How long nothing has been in flight (zero while a request is).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = self.since.load(Ordering::Relaxed);
        Duration::from_millis((self.epoch.elapsed().as_millis() as u64).saturating_sub(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The builder refuses a head with more than [`MAX_HEADERS`] headers (431) although the
    /// limit is hyper's default rather than set explicitly.
    #[tokio::test]
    async fn more_than_max_headers_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new(
                    )))
                });
                tokio::spawn(async move {
                    let _ = connection_builder()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        for (extra, want) in [(MAX_HEADERS - 1, "200"), (MAX_HEADERS, "431")] {
            let mut head = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
            // Host and Connection count too.
            for i in 0..extra - 1 {
                head.push_str(&format!("x-h{i}: v\r\n"));
            }
            head.push_str("\r\n");
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {want}")),
                "{} headers: {answer}",
                extra + 1
            );
        }
    }
}
