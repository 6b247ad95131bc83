//! Bodies through the proxy, without boxing: what goes upstream ([`UpBody`]), what goes back
//! to the client ([`RespBody`]), and the stream idle timeout on a client's request body.
//!
//! Like nginx's request buffering, a request body is read (up to [`MAX_REPLAY_BODY`]) before
//! a backend is chosen or an upstream slot taken: a client that opens a request and never
//! sends its body ties up nothing upstream and gets 408 after the stream idle timeout. A
//! complete buffered body can be replayed by retries and mirrors; a longer one streams on
//! (its head first), once.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{
    table::{BoxError, ClusterRuntime},
    upstream::Checkin,
};

/// Largest request body kept in memory before forwarding (and so replayable).
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// No progress on a body for the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?} (stream idle timeout)")]
pub struct BodyTimeout(pub Duration);

/// A body whose frames must keep coming: an error after `limit` without one.
pub struct Timed<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<B> Timed<B> {
    /// `inner` with the stream idle timeout `limit`.
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.limit;
                if !this.waiting {
                    this.waiting = true;
                    match &mut this.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// A request body on its way upstream.
pub enum UpBody {
    /// No body.
    Empty,
    /// The whole body (and trailers), replayable.
    Full(Option<Bytes>, Option<HeaderMap>),
    /// The head already read, then the rest as it comes.
    Stream(Option<Bytes>, Box<Timed<Incoming>>),
}

impl UpBody {
    /// A copy for another try or a mirror; `None` for a streamed body.
    pub fn replay(&self) -> Option<UpBody> {
        match self {
            UpBody::Empty => Some(UpBody::Empty),
            UpBody::Full(b, t) => Some(UpBody::Full(b.clone(), t.clone())),
            UpBody::Stream(..) => None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Full(data, trailers) => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            UpBody::Stream(head, rest) => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Full(d, t) => d.is_none() && t.is_none(),
            UpBody::Stream(h, rest) => h.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Full(d, _) => SizeHint::with_exact(d.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Stream(h, rest) => {
                let head = h.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + head);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + head);
                }
                hint
            }
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The stream idle timeout passed (408).
    Timeout,
    /// The client broke off (400).
    Broken,
}

/// Reads the head of a request body: all of it when it ends within [`MAX_REPLAY_BODY`].
pub async fn read_request_body(body: Incoming, idle: Duration) -> Result<UpBody, ReadError> {
    if body.is_end_stream() {
        return Ok(UpBody::Empty);
    }
    let mut timed = Timed::new(body, idle);
    let mut head = BytesMut::new();
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut timed).poll_frame(cx)).await;
        match frame {
            None => return Ok(UpBody::Full(Some(head.freeze()), None)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    head.extend_from_slice(&data);
                    if head.len() > MAX_REPLAY_BODY {
                        return Ok(UpBody::Stream(Some(head.freeze()), Box::new(timed)));
                    }
                    if timed.is_end_stream() {
                        return Ok(UpBody::Full(Some(head.freeze()), None));
                    }
                }
                Err(frame) => {
                    return Ok(UpBody::Full(
                        Some(head.freeze()),
                        frame.into_trailers().ok(),
                    ))
                }
            },
            Some(Err(e)) if e.is::<BodyTimeout>() => return Err(ReadError::Timeout),
            Some(Err(_)) => return Err(ReadError::Broken),
        }
    }
}

/// Keeps a cluster slot and the backend's in-flight count until the response body is done;
/// returns the upstream connection to its pool when the body ended.
pub struct ActiveGuard {
    /// The cluster.
    pub cluster: Arc<ClusterRuntime>,
    /// Backend index.
    pub index: usize,
    /// Whether it holds a cluster slot (see [`super::slots`]), given back on drop.
    pub slot: bool,
    /// The upstream connection, back to the pool at the end of the body.
    pub checkin: Option<Checkin>,
}

impl ActiveGuard {
    /// The response body ended: the upstream connection goes back to its pool.
    pub fn release(&mut self) {
        if let Some(c) = self.checkin.take() {
            self.cluster.upstream.checkin(c);
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.slot {
            self.cluster.slots.release();
        }
        self.cluster.balancer.backends[self.index]
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A response body to the client.
pub enum RespBody {
    /// An answer from the proxy itself.
    Local(Option<Bytes>),
    /// A backend's answer.
    Upstream(Incoming, ActiveGuard),
}

impl RespBody {
    /// A local body.
    pub fn local(bytes: Bytes) -> Self {
        RespBody::Local((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            RespBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream(body, guard) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => guard.release(),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => guard.release(),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Local(b) => b.is_none(),
            RespBody::Upstream(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream(body, _) => body.size_hint(),
        }
    }
}
