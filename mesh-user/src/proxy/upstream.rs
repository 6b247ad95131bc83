//! Upstream connections of one cluster: a pool per worker and backend, so a worker never
//! shares (or locks against another worker for) a connection.
//!
//! HTTP/1.1: idle keep-alive connections are reused newest first; a connection goes back to
//! its pool when its response body has been read to the end, unless it has served
//! `maxRequestsPerConnection` requests (then it closes) or the backend closed it. A pooled
//! connection that turns out closed before the request was written is replaced by a fresh one
//! transparently. HTTP/2 (`h2UpgradePolicy: UPGRADE` / `useClientProtocol` compiled to
//! `http2`): one multiplexed connection per worker and backend, replaced when it closes.
//! Idle connections close after the pool's idle timeout.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::UpBody;

/// Why a request got no response from the backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be made (refused, unreachable, or the connect timeout).
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The HTTP exchange failed (reset, closed before a response, protocol error).
    #[error("exchange with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
}

impl UpstreamError {
    /// Whether the connection was never established.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(..))
    }

    /// HTTP/2 REFUSED_STREAM from the backend.
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Http(_, e) = self else {
            return false;
        };
        // hyper does not expose h2's reason; its debug text names it (error path only).
        format!("{e:?}").contains("REFUSED_STREAM")
    }
}

/// Pool settings of a cluster.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// HTTP/2 to the backends.
    pub http2: bool,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Requests per connection (`None`: unlimited).
    pub max_requests: Option<u32>,
}

/// An HTTP/1.1 connection checked out of a pool, with the number of requests it served.
pub struct Http1Conn {
    sender: http1::SendRequest<UpBody>,
    served: u32,
    idle_since: Instant,
}

#[derive(Default)]
struct BackendPool {
    idle: Vec<Http1Conn>,
    h2: Option<http2::SendRequest<UpBody>>,
}

/// The pools of one cluster: `[worker][backend]`.
pub struct Upstream {
    settings: PoolSettings,
    pools: Vec<Vec<Mutex<BackendPool>>>,
}

/// What to do with the connection once the response body has been read to the end.
pub struct Checkin {
    conn: Option<Http1Conn>,
    worker: usize,
    backend: usize,
}

impl Upstream {
    /// Pools for `workers` workers and `backends` backends.
    pub fn new(settings: PoolSettings, workers: usize, backends: usize) -> Self {
        Self {
            settings,
            pools: (0..workers.max(1))
                .map(|_| (0..backends).map(|_| Mutex::default()).collect())
                .collect(),
        }
    }

    fn pool(&self, worker: usize, backend: usize) -> std::sync::MutexGuard<'_, BackendPool> {
        self.pools[worker % self.pools.len()][backend]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `request` (origin-form URI, Host set) to backend `backend` at `address` from
    /// worker `worker`. On success, the returned [`Checkin`] must be given to
    /// [`Upstream::checkin`] when the response body has ended.
    pub async fn send(
        &self,
        worker: usize,
        backend: usize,
        address: SocketAddr,
        request: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        if self.settings.http2 {
            return self.send_h2(worker, backend, address, request).await;
        }
        let mut request = request;
        // Reused connections first; one the backend closed meanwhile hands the request back.
        while let Some(mut conn) = self.checkout(worker, backend) {
            match conn.sender.try_send_request(request).await {
                Ok(response) => {
                    conn.served += 1;
                    return Ok((response, self.checkin_for(conn, worker, backend)));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => request = back,
                    None => return Err(UpstreamError::Http(address, e.into_error())),
                },
            }
        }
        let mut conn = self.connect_h1(address).await?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Http(address, e))?;
        conn.served += 1;
        Ok((response, self.checkin_for(conn, worker, backend)))
    }

    fn checkin_for(&self, conn: Http1Conn, worker: usize, backend: usize) -> Checkin {
        let reusable = self.settings.max_requests.is_none_or(|m| conn.served < m);
        Checkin {
            conn: reusable.then_some(conn),
            worker,
            backend,
        }
    }

    /// Returns a connection whose response body ended to its pool.
    pub fn checkin(&self, checkin: Checkin) {
        if let Some(mut conn) = checkin.conn {
            if conn.sender.is_closed() {
                return;
            }
            conn.idle_since = Instant::now();
            self.pool(checkin.worker, checkin.backend).idle.push(conn);
        }
    }

    fn checkout(&self, worker: usize, backend: usize) -> Option<Http1Conn> {
        let mut pool = self.pool(worker, backend);
        let now = Instant::now();
        // Connections idle too long are closed (dropped), oldest first.
        let fresh_from = pool
            .idle
            .iter()
            .position(|c| now.duration_since(c.idle_since) < self.settings.idle_timeout)
            .unwrap_or(pool.idle.len());
        pool.idle.drain(..fresh_from);
        pool.idle.retain(|c| !c.sender.is_closed());
        // Newest first; one still finishing its previous exchange stays for later.
        let ready = pool.idle.iter().rposition(|c| c.sender.is_ready())?;
        Some(pool.idle.remove(ready))
    }

    async fn connect(
        &self,
        address: SocketAddr,
    ) -> Result<TokioIo<tokio::net::TcpStream>, UpstreamError> {
        let stream = match tokio::time::timeout(
            self.settings.connect_timeout,
            tokio::net::TcpStream::connect(address),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(address, e)),
            Err(_) => {
                return Err(UpstreamError::Connect(
                    address,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self, address: SocketAddr) -> Result<Http1Conn, UpstreamError> {
        let io = self.connect(address).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Http(address, e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Http1Conn {
            sender,
            served: 0,
            idle_since: Instant::now(),
        })
    }

    async fn send_h2(
        &self,
        worker: usize,
        backend: usize,
        address: SocketAddr,
        request: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        let existing = {
            let pool = self.pool(worker, backend);
            pool.h2.as_ref().filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let io = self.connect(address).await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(|e| UpstreamError::Http(address, e))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                self.pool(worker, backend).h2 = Some(sender.clone());
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Http(address, e))?;
        Ok((
            response,
            Checkin {
                conn: None,
                worker,
                backend,
            },
        ))
    }
}
