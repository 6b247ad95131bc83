//! Streaming answers: `GET /v1/trace` (NDJSON, one decision per line, until the client hangs up)
//! and the body type shared with the split page's server-sent events.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Frame, Response, StatusCode};
use tokio::sync::mpsc;

use crate::trace::{hub, Subscription, TraceFilter};

/// Any answer of the admin and metrics listeners.
pub type AnyBody = BoxBody<Bytes, Infallible>;

/// A body fed by a channel; ends when the sender side is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    /// Kept alive as long as the body (dropping it ends a trace).
    _subscription: Option<Subscription>,
}

impl ChannelBody {
    /// A body streaming what is sent on `rx`.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            _subscription: None,
        }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self._subscription {
            Some(sub) => sub.lines.poll_recv(cx),
            None => self.rx.poll_recv(cx),
        }
        .map(|line| line.map(|b| Ok(Frame::data(b))))
    }
}

/// `GET /v1/trace?service=&client=&backend=&verdict=`: decisions as NDJSON until the client
/// disconnects.
pub fn trace(query: &str) -> Response<AnyBody> {
    let filter = match parse_filter(query) {
        Ok(f) => f,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let subscription = hub().subscribe(filter);
    let (_tx, rx) = mpsc::channel(1);
    let body = ChannelBody {
        rx,
        _subscription: Some(subscription),
    };
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-cache")
        .body(body.boxed())
        .expect("static response")
}

/// `GET /v1/trace/stats`.
pub fn trace_stats() -> Response<AnyBody> {
    let body = serde_json::to_vec(&hub().stats()).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}

/// The filter from a query string (`%xx` and `+` decoded).
pub fn parse_filter(query: &str) -> Result<TraceFilter, String> {
    let mut filter = TraceFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        if v.is_empty() {
            continue;
        }
        match k {
            "service" => filter.service = Some(v),
            "client" => filter.client = Some(v),
            "backend" => filter.backend = Some(v),
            "verdict" => filter.verdict = Some(v),
            other => {
                return Err(format!(
                    "unknown trace filter {other:?}: expected service, client, backend, verdict"
                ))
            }
        }
    }
    filter.validate().map_err(|e| e.to_string())?;
    Ok(filter)
}

/// Percent-encoding for a query value (the inverse of [`decode`]).
pub fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(status: StatusCode, message: &str) -> Response<AnyBody> {
    let body = serde_json::to_vec(&super::ErrorBody {
        error: message.to_string(),
    })
    .unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_round_trip_through_the_query_string() {
        let q = format!(
            "service={}&client={}&verdict=new",
            encode("reviews"),
            encode("[2001:db8::1]:80")
        );
        let f = parse_filter(&q).unwrap();
        assert_eq!(f.service.as_deref(), Some("reviews"));
        assert_eq!(f.client.as_deref(), Some("[2001:db8::1]:80"));
        assert_eq!(f.verdict.as_deref(), Some("new"));
        assert!(parse_filter("colour=red").unwrap_err().contains("colour"));
        assert!(parse_filter("client=nonsense")
            .unwrap_err()
            .contains("client"));
    }
}
