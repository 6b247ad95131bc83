//! One request through the proxy: the authority check, virtual host and route selection, CORS,
//! faults, redirects and direct responses, rewrites and header operations, per-request weighted
//! destination choice, mirroring, retries with per-try and overall deadlines, connection-pool
//! limits, outlier accounting, the access log line and the counters.
//!
//! The request path allocates little: the client's header map and URI are forwarded in place
//! (no copy, no re-formatting), counters are handles resolved once per apply, header operations
//! are compiled once per apply, and the access log's fields are only gathered when its target
//! (`mesh::access`) is enabled. Bodies: see [`super::body`].

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, Method, Request, Response, StatusCode, Uri,
};
use hyper::body::Incoming;
use rand::Rng;

use super::{
    balance::{retry_backoff, HashInput, TryResult},
    body::{read_request_body, ActiveGuard, ReadError, RespBody, UpBody},
    matching::{domain_matches, strip_port, RequestView},
    retry::{retriable, TryOutcome},
    rewrite::{cors_headers, redirect_location, rewrite_path, shadow_host, strip_hop_by_hop},
    server::Activity,
    stats::RouteCounters,
    table::{ClusterRuntime, RouteRuntime, ServiceRuntime},
    Shared,
};
use crate::compile::{LoadBalancerPlan, RouteActionPlan, ServiceAddress};

pub use super::body::MAX_REPLAY_BODY;

/// A mirror request that takes longer is abandoned (its answer is never used anyway).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection's requests share: the proxy, where the connection came in and from
/// whom, and which worker serves it.
pub struct ConnContext {
    /// The proxy.
    pub shared: Arc<Shared>,
    /// The listener's service address.
    pub service: ServiceAddress,
    /// The client.
    pub client: SocketAddr,
    /// The client's address as a header value (X-Forwarded-For), formatted once.
    pub client_ip: HeaderValue,
    /// The worker serving the connection.
    pub worker: usize,
    /// Requests in flight (idle timeout).
    pub activity: Activity,
}

impl ConnContext {
    /// Context of a new connection.
    pub fn new(
        shared: Arc<Shared>,
        service: ServiceAddress,
        client: SocketAddr,
        worker: usize,
    ) -> Self {
        let client_ip = HeaderValue::try_from(client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            shared,
            service,
            client,
            client_ip,
            worker,
            activity: Activity::default(),
        }
    }

    /// How long the connection has had no request in flight.
    pub fn idle_for(&self) -> Duration {
        self.activity.idle_for()
    }
}

/// What the access log and the counters record about one request.
struct Outcome<'a> {
    route: Option<&'a RouteRuntime>,
    cluster: Option<&'a ClusterRuntime>,
    backend: Option<SocketAddr>,
    status: u16,
    counters: Option<&'a RouteCounters>,
}

impl<'a> Outcome<'a> {
    fn local(
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
fn access_log_enabled() -> bool {
    tracing::enabled!(target: "mesh::access", tracing::Level::INFO)
}

/// Serves one request of the connection `conn`.
pub async fn handle(
    conn: Arc<ConnContext>,
    request: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    conn.activity.start();
    let response = serve(&conn, request).await;
    conn.activity.end();
    Ok(response)
}

async fn serve(conn: &ConnContext, request: Request<Incoming>) -> Response<RespBody> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // The method and URI outlive the request only for the access log or a running trace.
    let log = access_log_enabled();
    let kept = (log || crate::trace::hub::hub().active())
        .then(|| (parts.method.clone(), parts.uri.clone()));
    let record =
        |authority: &str, service_name: &str, outcome: &Outcome, response: &Response<RespBody>| {
            if let Some((method, uri)) = &kept {
                if log {
                    access_log(conn, method, uri, authority, outcome, started, response);
                }
                trace(conn, service_name, method, uri, authority, outcome);
            }
        };
    let authority = match request_authority(&parts) {
        Ok(a) => a,
        Err(why) => {
            let response = local(StatusCode::BAD_REQUEST, why);
            record("", "", &Outcome::local(None, 400, None), &response);
            return response;
        }
    };
    let authority_str = authority.to_str().unwrap_or("");
    let table = conn.shared.table.load();
    let runtime = table.services.get(&conn.service).cloned();
    drop(table);
    let Some(runtime) = runtime else {
        let response = local(
            StatusCode::SERVICE_UNAVAILABLE,
            "service is not served by the L7 proxy",
        );
        record(
            authority_str,
            "",
            &Outcome::local(None, 503, None),
            &response,
        );
        return response;
    };
    let (response, outcome) = route_request(conn, &runtime, parts, body, &authority).await;
    if let Some(counters) = outcome.counters {
        counters.observe(outcome.status, started.elapsed());
    }
    record(authority_str, &runtime.name, &outcome, &response);
    response
}

fn route_label<'a>(outcome: &'a Outcome) -> &'a str {
    match outcome.route {
        Some(r) => &r.name,
        None if outcome.status == 404 => "(no route)",
        None => "",
    }
}

/// The proxy's decision for `meshctl trace` (built only while a trace runs).
fn trace(
    conn: &ConnContext,
    service_name: &str,
    method: &Method,
    uri: &Uri,
    authority: &str,
    outcome: &Outcome,
) {
    let backend = outcome.backend.map(|b| b.to_string()).unwrap_or_default();
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

fn access_log(
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
    let backend = outcome.backend.map(|b| b.to_string()).unwrap_or_default();
    tracing::info!(
        target: "mesh::access",
        method = %method,
        authority = %authority,
        path = %uri.path(),
        route = %route_label(outcome),
        subset = %outcome.cluster.map(|c| &*c.subset).unwrap_or(""),
        backend = %backend,
        status = outcome.status,
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        bytes = %bytes,
        client = %conn.client,
        "access"
    );
}

/// The request's one authority: the absolute-form URI's authority (HTTP/2's `:authority`) or
/// the Host header. Both present and different is an error (RFC 9112 3.2.2 lets a server
/// ignore Host there; a proxy that routed on one and forwarded the other could be steered).
fn request_authority(parts: &Parts) -> Result<HeaderValue, &'static str> {
    let host = parts.headers.get(header::HOST);
    match (parts.uri.authority(), host) {
        (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h.to_str().unwrap_or("")) => {
            Err("the request's authority and Host header differ")
        }
        (_, Some(h)) => Ok(h.clone()),
        (Some(a), None) => {
            HeaderValue::from_str(a.as_str()).map_err(|_| "the request's authority is not valid")
        }
        (None, None) => Ok(HeaderValue::from_static("")),
    }
}

type Routed<'a> = (Response<RespBody>, Outcome<'a>);

async fn route_request<'a>(
    conn: &ConnContext,
    runtime: &'a ServiceRuntime,
    parts: Parts,
    body: Incoming,
    authority: &HeaderValue,
) -> Routed<'a> {
    let authority_str = authority.to_str().unwrap_or("");
    let host = strip_port(authority_str);
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        scheme: "http",
        authority: authority_str,
        headers: &parts.headers,
    };
    let mut chosen = None;
    // Istio: the first virtual host for the Host decides; no route there is a 404.
    if let Some(vh) = runtime
        .virtual_hosts
        .iter()
        .find(|vh| vh.domains.iter().any(|d| domain_matches(d, host)))
    {
        for route in &vh.routes {
            if route.matchers.is_empty() {
                chosen = Some((route, None));
                break;
            }
            if let Some(i) = route.matchers.iter().position(|m| m.matches(&view)) {
                chosen = Some((route, Some(i)));
                break;
            }
        }
    }
    let Some((route, matched)) = chosen else {
        return (
            local(StatusCode::NOT_FOUND, "no route matched"),
            Outcome::local(None, 404, Some(&runtime.unmatched)),
        );
    };
    let cors_allowed: Option<HeaderValue> = parts
        .headers
        .get(header::ORIGIN)
        .filter(|o| {
            let o = o.to_str().unwrap_or("");
            route.cors_origins.iter().any(|m| m.matches(o, false))
        })
        .cloned();
    if let Some(origin) = &cors_allowed {
        if route.plan.cors.is_some()
            && parts.method == Method::OPTIONS
            && parts
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut response = local(StatusCode::OK, "");
            cors_headers(
                route,
                origin.to_str().unwrap_or(""),
                true,
                response.headers_mut(),
            );
            return finish_local(route, response);
        }
    }
    let work = serve_route(conn, runtime, route, matched, parts, body, authority);
    let (mut response, outcome) = match route.plan.timeout {
        Some(deadline) => match tokio::time::timeout(deadline, work).await {
            Ok(done) => done,
            Err(_) => finish_local(
                route,
                local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            ),
        },
        None => work.await,
    };
    if let Some(origin) = &cors_allowed {
        cors_headers(
            route,
            origin.to_str().unwrap_or(""),
            false,
            response.headers_mut(),
        );
    }
    (response, outcome)
}

fn finish_local(route: &RouteRuntime, mut response: Response<RespBody>) -> Routed<'_> {
    let status = response.status().as_u16();
    route.response_ops.apply(response.headers_mut());
    (
        response,
        Outcome::local(Some(route), status, Some(&route.local_counters)),
    )
}

fn roll(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && rand::rng().random_bool(share))
}

/// Appends the client to X-Forwarded-For as Envoy does at the edge (all earlier values kept,
/// comma-separated, then the client's address) and sets X-Forwarded-Proto.
fn forwarded_headers(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    let mut earlier = headers.get_all("x-forwarded-for").iter();
    let value = match (earlier.next(), earlier.next()) {
        (None, _) => client_ip.clone(),
        (Some(first), None) => {
            let mut v = Vec::with_capacity(first.len() + 2 + client_ip.len());
            v.extend_from_slice(first.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone())
        }
        (Some(_), Some(_)) => {
            let mut v = Vec::new();
            for part in headers.get_all("x-forwarded-for") {
                v.extend_from_slice(part.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone())
        }
    };
    headers.insert("x-forwarded-for", value);
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

fn pick_destination(weights: impl Iterator<Item = u32> + Clone) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = rand::rng().random_range(0..total);
    for (i, w) in weights.enumerate() {
        if point < u64::from(w) {
            return Some(i);
        }
        point -= u64::from(w);
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn serve_route<'a>(
    conn: &ConnContext,
    runtime: &'a ServiceRuntime,
    route: &'a RouteRuntime,
    matched: Option<usize>,
    parts: Parts,
    body: Incoming,
    authority: &HeaderValue,
) -> Routed<'a> {
    if let Some(fault) = &route.plan.fault {
        if let Some((delay, share)) = fault.delay {
            if roll(share) {
                tokio::time::sleep(delay).await;
            }
        }
        if let Some((status, share)) = fault.abort {
            if roll(share) {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return finish_local(route, local(status, "fault filter abort"));
            }
        }
    }
    let destinations = match &route.plan.action {
        RouteActionPlan::Redirect(redirect) => {
            let location =
                redirect_location(redirect, &parts.uri, authority.to_str().unwrap_or(""));
            let status =
                StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            let mut response = local(status, "");
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            return finish_local(route, response);
        }
        RouteActionPlan::DirectResponse { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut response = Response::new(RespBody::local(Bytes::from(body.clone())));
            *response.status_mut() = status;
            return finish_local(route, response);
        }
        RouteActionPlan::Forward { destinations } => destinations,
    };
    // Per-request weighted choice of the destination.
    let Some(pick) = pick_destination(destinations.iter().map(|d| d.weight)) else {
        return finish_local(
            route,
            local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        );
    };
    let destination = &destinations[pick];
    let cluster: &'a Arc<ClusterRuntime> = &runtime.clusters[destination.cluster];
    let counters: &'a RouteCounters = &route.destination_counters[pick];
    let (request_ops, response_ops) = &route.destination_ops[pick];
    let outcome = |status: u16, backend: Option<SocketAddr>| Outcome {
        route: Some(route),
        cluster: Some(cluster),
        backend,
        status,
        counters: Some(counters),
    };

    let Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    strip_hop_by_hop(&mut headers);
    forwarded_headers(&mut headers, &conn.client_ip);
    route.request_ops.apply(&mut headers);
    request_ops.apply(&mut headers);
    // The one authority goes upstream as Host (an absolute-form or HTTP/2 request may have
    // come without one).
    if !headers.contains_key(header::HOST) && !authority.is_empty() {
        headers.insert(header::HOST, authority.clone());
    }
    let mut path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some(rewrite) = &route.plan.rewrite {
        if let Ok(p) = PathAndQuery::try_from(rewrite_path(route, matched, path_and_query.as_str()))
        {
            path_and_query = p;
        }
        if let Some(new_authority) = &rewrite.authority {
            if let Ok(v) = HeaderValue::from_str(new_authority) {
                headers.insert(header::HOST, v);
            }
        }
    }
    // Cookie hashing without the cookie: generate one so the client sticks from now on.
    let mut generated_cookie = None;
    if let LoadBalancerPlan::HashCookie {
        name, ttl: Some(_), ..
    } = cluster.balancer.policy()
    {
        if super::balance::cookie(&headers, name).is_none() {
            generated_cookie = Some(format!("{:016x}", rand::rng().random::<u64>()));
        }
    }

    let stream_idle = conn.shared.limits.stream_idle;
    let body = match read_request_body(body, stream_idle).await {
        Ok(b) => b,
        Err(ReadError::Timeout) => {
            let mut response = local(StatusCode::REQUEST_TIMEOUT, "request body timeout");
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return finish_local(route, response);
        }
        Err(ReadError::Broken) => {
            return finish_local(
                route,
                local(StatusCode::BAD_REQUEST, "request body ended early"),
            )
        }
    };
    let retries = &route.plan.retries;
    let replayable = body.replay().is_some();
    let attempts = if replayable { retries.attempts } else { 0 };

    if replayable {
        for mirror in &route.plan.mirrors {
            if roll(mirror.share) {
                spawn_mirror(
                    conn,
                    runtime.clusters[mirror.cluster].clone(),
                    &method,
                    &path_and_query,
                    &headers,
                    &body,
                );
            }
        }
    }

    let mut body = Some(body);
    let mut avoid = None;
    let mut attempt = 0;
    loop {
        if attempt > 0 {
            tokio::time::sleep(retry_backoff(attempt)).await;
        }
        let Some(permit) = cluster.acquire().await else {
            let mut response = local(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connection pool overflow",
            );
            response
                .headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            let (response, _) = finish_local(route, response);
            return (response, outcome(503, None));
        };
        let input = HashInput {
            headers: &headers,
            query: path_and_query.query(),
            client: conn.client.ip(),
            generated_cookie: generated_cookie.as_deref(),
        };
        let Some(index) = cluster.balancer.pick(&input, avoid) else {
            let (response, _) = finish_local(
                route,
                local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            );
            return (response, outcome(503, None));
        };
        let backend = &cluster.balancer.backends[index];
        // A replayable body is copied for each try but the last; a streamed one goes once.
        let this_body = if attempt < attempts {
            body.as_ref()
                .and_then(UpBody::replay)
                .unwrap_or(UpBody::Empty)
        } else {
            body.take().unwrap_or(UpBody::Empty)
        };
        let mut upstream = Request::new(this_body);
        *upstream.method_mut() = method.clone();
        *upstream.uri_mut() = if cluster.plan.http2 {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Authority::try_from(authority.as_bytes())
                .ok()
                .or_else(|| Authority::try_from(backend.address.to_string()).ok());
            uri.path_and_query = Some(path_and_query.clone());
            Uri::from_parts(uri).unwrap_or_default()
        } else {
            Uri::from(path_and_query.clone())
        };
        *upstream.headers_mut() = if attempt < attempts || !route.plan.mirrors.is_empty() {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };
        if cluster.plan.http2 {
            *upstream.version_mut() = http::Version::HTTP_2;
            upstream.headers_mut().remove(header::HOST);
        }
        backend.active.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        let mut active = ActiveGuard {
            cluster: cluster.clone(),
            index,
            permit: Some(permit),
            checkin: None,
        };
        let sent = cluster
            .upstream
            .send(conn.worker, index, backend.address, upstream);
        let result = match retries.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| ()),
            None => Ok(sent.await),
        };
        let try_outcome = match &result {
            Ok(Ok((response, _))) => TryOutcome::Response(
                response.status().as_u16(),
                response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            ),
            Ok(Err(e)) if e.is_connect() => TryOutcome::ConnectFailure,
            Ok(Err(e)) if e.is_refused_stream() => TryOutcome::RefusedStream,
            Ok(Err(_)) => TryOutcome::Reset,
            Err(()) => TryOutcome::Timeout,
        };
        cluster.balancer.record(
            index,
            match try_outcome {
                TryOutcome::Response(status, _) => TryResult::Status(status),
                _ => TryResult::Failed,
            },
        );
        if attempt < attempts && retriable(retries, try_outcome) {
            attempt += 1;
            avoid = Some(index);
            tracing::debug!(backend = %backend.address, ?try_outcome, attempt, "retrying");
            continue;
        }
        let address = Some(backend.address);
        return match result {
            Ok(Ok((response, checkin))) => {
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                response_ops.apply(&mut head.headers);
                route.response_ops.apply(&mut head.headers);
                if let (Some(value), LoadBalancerPlan::HashCookie { name, path, ttl }) =
                    (&generated_cookie, cluster.balancer.policy())
                {
                    let mut cookie = format!("{name}={value}");
                    if let Some(path) = path {
                        cookie.push_str(&format!("; Path={path}"));
                    }
                    if let Some(ttl) = ttl {
                        cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        head.headers.append(header::SET_COOKIE, v);
                    }
                }
                let status = head.status.as_u16();
                active.checkin = Some(checkin);
                if hyper::body::Body::is_end_stream(&body) {
                    // Nothing to read: the connection is free again now.
                    active.release();
                }
                (
                    Response::from_parts(head, RespBody::Upstream(body, active)),
                    outcome(status, address),
                )
            }
            Ok(Err(e)) => {
                tracing::debug!("upstream: {e}");
                let mut response = local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                );
                route.response_ops.apply(response.headers_mut());
                (response, outcome(503, address))
            }
            Err(()) => {
                let mut response = local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                route.response_ops.apply(response.headers_mut());
                (response, outcome(504, address))
            }
        };
    }
}

/// Sends a copy of the request to a mirror cluster in the background; its answer (and how
/// long it takes) never reaches the client. Copies beyond the proxy's mirror budget are
/// dropped rather than queued.
fn spawn_mirror(
    conn: &ConnContext,
    cluster: Arc<ClusterRuntime>,
    method: &Method,
    path_and_query: &PathAndQuery,
    headers: &HeaderMap,
    body: &UpBody,
) {
    let Some(body) = body.replay() else { return };
    let Ok(slot) = conn.shared.mirror_slots.clone().try_acquire_owned() else {
        tracing::debug!("mirror budget exhausted: copy dropped");
        return;
    };
    let mut headers = headers.clone();
    if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        if let Ok(v) = HeaderValue::from_str(&shadow_host(host)) {
            headers.insert(header::HOST, v);
        }
    }
    let method = method.clone();
    let path_and_query = path_and_query.clone();
    let client = conn.client;
    let worker = conn.worker;
    tokio::spawn(async move {
        let _slot = slot;
        let input = HashInput {
            headers: &headers,
            query: None,
            client: client.ip(),
            generated_cookie: None,
        };
        let Some(index) = cluster.balancer.pick(&input, None) else {
            return;
        };
        let address = cluster.balancer.backends[index].address;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = Uri::from(path_and_query);
        *request.headers_mut() = headers;
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, async {
            if let Ok((response, checkin)) =
                cluster.upstream.send(worker, index, address, request).await
            {
                use http_body_util::BodyExt as _;
                if response.into_body().collect().await.is_ok() {
                    cluster.upstream.checkin(checkin);
                }
            }
        })
        .await;
    });
}

/// A short text answer from the proxy itself.
pub fn local(status: StatusCode, text: &str) -> Response<RespBody> {
    let body = if text.is_empty() {
        Bytes::new()
    } else {
        let mut b = Vec::with_capacity(text.len() + 1);
        b.extend_from_slice(text.as_bytes());
        b.push(b'\n');
        Bytes::from(b)
    };
    let mut response = Response::new(RespBody::local(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn one_authority_or_400() {
        assert_eq!(
            request_authority(&parts("/a", Some("web:80"))).unwrap(),
            "web:80"
        );
        assert_eq!(
            request_authority(&parts("http://web:80/a", None)).unwrap(),
            "web:80"
        );
        assert_eq!(
            request_authority(&parts("http://WEB:80/a", Some("web:80"))).unwrap(),
            "web:80"
        );
        assert!(request_authority(&parts("http://evil/a", Some("web:80"))).is_err());
    }

    #[test]
    fn x_forwarded_for_appends_the_client_like_envoy() {
        let ip = HeaderValue::from_static("198.18.1.2");
        let mut h = HeaderMap::new();
        forwarded_headers(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "198.18.1.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "198.19.0.1".parse().unwrap());
        h.append("x-forwarded-for", "198.19.0.2".parse().unwrap());
        forwarded_headers(&mut h, &ip);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["198.19.0.1, 198.19.0.2, 198.18.1.2"]
        );
    }
}
