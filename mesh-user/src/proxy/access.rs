//! What is recorded about each request once it is answered: the access log line (target
//! `mesh::access`, gathered only when that target is enabled) and the proxy's decision for
//! `meshctl trace` (built only while a trace runs).

use std::{net::SocketAddr, time::Instant};

use http::{header, Method, Response, Uri};

use super::{
    body::RespBody,
    handler::ConnContext,
    stats::RouteCounters,
    table::{ClusterRuntime, RouteRuntime},
};

/// What the access log and the counters record about one request.
pub struct Outcome<'a> {
    /// The route taken, if one matched.
    pub route: Option<&'a RouteRuntime>,
    /// The destination cluster, if the request was forwarded.
    pub cluster: Option<&'a ClusterRuntime>,
    /// The backend of the last try.
    pub backend: Option<SocketAddr>,
    /// The status sent to the client.
    pub status: u16,
    /// Where the request is counted.
    pub counters: Option<&'a RouteCounters>,
}

impl<'a> Outcome<'a> {
    /// An answer the proxy gave itself (no cluster, no backend).
    pub fn local(
        route: Option<&'a RouteRuntime>,
        status: u16,
        counters: Option<&'a RouteCounters>,
    ) -> Self {
        Self {
            route,
            cluster: None,
            backend: None,
            status,
            counters,
        }
    }
}

/// Whether access-log lines are wanted (the `mesh::access` target at info level).
pub fn enabled() -> bool {
    tracing::enabled!(target: "mesh::access", tracing::Level::INFO)
}

fn route_label<'a>(outcome: &'a Outcome) -> &'a str {
    match outcome.route {
        Some(r) => &r.name,
        None if outcome.status == 404 => "(no route)",
        None => "",
    }
}

/// The proxy's decision for `meshctl trace` (built only while a trace runs).
pub fn trace(
    conn: &ConnContext,
    service_name: &str,
    method: &Method,
    uri: &Uri,
    authority: &str,
    outcome: &Outcome,
) {
    if !crate::trace::hub::hub().active() {
        return;
    }
    let backend = Backend(outcome.backend).to_string();
    crate::trace::hub::proxy_request(|| crate::trace::ProxyDecision {
        service: &conn.service,
        service_name: service_name.to_string(),
        client: conn.client,
        request: format!("{method} {authority}{}", uri.path()),
        route: route_label(outcome),
        subset: outcome.cluster.map(|c| &*c.subset).unwrap_or(""),
        backend: &backend,
        status: outcome.status,
    });
}

/// The backend's address, or nothing for an answer from the proxy itself (formatted straight
/// into the log line, no `String` in between).
struct Backend(Option<SocketAddr>);

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(b) => b.fmt(f),
            None => Ok(()),
        }
    }
}

/// One access log line (target `mesh::access`, info level).
#[allow(clippy::too_many_arguments)]
pub fn access_log(
    conn: &ConnContext,
    method: &Method,
    uri: &Uri,
    authority: &str,
    outcome: &Outcome,
    started: Instant,
    response: &Response<RespBody>,
) {
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info!(
        target: "mesh::access",
        method = %method,
        authority = %authority,
        path = %uri.path(),
        route = %route_label(outcome),
        subset = %outcome.cluster.map(|c| &*c.subset).unwrap_or(""),
        backend = %Backend(outcome.backend),
        status = outcome.status,
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        bytes = %bytes,
        client = %conn.client,
        "access"
    );
}
