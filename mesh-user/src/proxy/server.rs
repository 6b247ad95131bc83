//! Listeners: one per L7 service address, HTTP/1.1 and h2c (prior knowledge) on the same port,
//! with limits against abusive clients, and graceful draining when a listener closes.
//!
//! Limits: request head at most [`MAX_HEAD_BYTES`] (hyper answers 431 beyond it) with at most
//! [`MAX_HEADERS`] headers; the head must arrive within [`HEADER_READ_TIMEOUT`] (slowloris),
//! which also closes HTTP/1 keep-alive connections idle that long; a connection that sends
//! nothing at all is closed after the same time; HTTP/2 streams per connection and header
//! list size are capped; at most [`MAX_CONNECTIONS`] client connections per listener (more are
//! closed at once rather than queued).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::TcpStream,
    sync::{watch, Semaphore},
    task::JoinHandle,
};

use super::{handler, Shared};
use crate::compile::ServiceAddress;

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 100;
/// Time a client has to send a complete request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HTTP/2 streams per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Client connections per listener.
pub const MAX_CONNECTIONS: usize = 10_000;
/// How long a closing listener lets in-flight requests finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection builder with the limits above.
pub fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// A running listener.
pub struct ListenerHandle {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ListenerHandle {
    /// Stops accepting, lets in-flight requests finish (HTTP/1 answers carry
    /// `Connection: close`, HTTP/2 gets GOAWAY), closes idle connections, and resolves when
    /// all are gone or [`DRAIN_TIMEOUT`] passed.
    pub async fn drain(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Binds `address` (IP_FREEBIND: a VIP is local by route, which IPv6 bind does not look at).
pub fn bind(address: ServiceAddress) -> std::io::Result<std::net::TcpListener> {
    let addr = SocketAddr::new(address.ip, address.port);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves `listener` for `address` until drained. Must run inside the runtime.
pub fn spawn(
    shared: Arc<Shared>,
    address: ServiceAddress,
    listener: std::net::TcpListener,
) -> std::io::Result<ListenerHandle> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (shutdown, mut stop) = watch::channel(false);
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, client)) = accepted else { continue };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        continue; // over the limit: dropped, i.e. closed
                    };
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _slot = slot;
                        if !sends_within(&stream, HEADER_READ_TIMEOUT).await {
                            return;
                        }
                        let builder = shared.builder.clone();
                        let service = service_fn(move |request| {
                            handler::handle(shared.clone(), address, client, request)
                        });
                        let connection = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        let _ = watcher.watch(connection).await;
                    });
                }
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    });
    Ok(ListenerHandle { shutdown, task })
}

/// Whether the client sends a first byte in time (HTTP/1 header timeouts start only once the
/// protocol is known).
async fn sends_within(stream: &TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}
