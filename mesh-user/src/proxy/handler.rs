//! One request through the proxy: virtual host and route selection, CORS, faults, redirects
//! and direct responses, rewrites and header operations, per-request weighted destination
//! choice, mirroring, retries with per-try and overall deadlines, connection-pool limits,
//! outlier accounting, the access log line and the counters.
//!
//! Bodies stream in both directions. A request body is buffered only when a retry or a mirror
//! may need to send it again, and only when its declared length is at most
//! [`MAX_REPLAY_BODY`]; a larger or chunked body streams once (no retry, no mirror copy).

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Request, Response, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rand::Rng;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    balance::{retry_backoff, HashInput, TryResult},
    matching::{domain_matches, strip_port, RequestView},
    retry::{retriable, TryOutcome},
    table::{BoxError, ClusterRuntime, ProxyBody, RouteRuntime, ServiceRuntime},
    Shared,
};
use crate::compile::{
    HeaderOpPlan, LoadBalancerPlan, RedirectPlan, RouteActionPlan, ServiceAddress, StringMatchPlan,
};

/// Largest request body kept in memory so a retry or mirror can resend it.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// A mirror request that takes longer is abandoned (its answer is never used anyway).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Hop-by-hop headers (RFC 9110 7.6.1) that must not be forwarded.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What the access log and the counters record about one request.
struct Outcome {
    route: String,
    subset: String,
    backend: String,
    status: u16,
}

/// Serves one request on the listener of `service` from `client`.
pub async fn handle(
    shared: Arc<Shared>,
    service: ServiceAddress,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let authority = request_authority(&request);
    let runtime = shared.table.load().services.get(&service).cloned();
    let (response, outcome, counters) = match runtime {
        None => (
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                "service is not served by the L7 proxy",
            ),
            Outcome {
                route: String::new(),
                subset: String::new(),
                backend: String::new(),
                status: 503,
            },
            None,
        ),
        Some(runtime) => route_request(&shared, &runtime, client, request, &authority).await,
    };
    let elapsed = started.elapsed();
    if let Some(counters) = counters {
        counters.observe(outcome.status, elapsed);
    }
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    tracing::info!(
        target: "mesh::access",
        method = %method,
        authority = %authority,
        path = %path,
        route = %outcome.route,
        subset = %outcome.subset,
        backend = %outcome.backend,
        status = outcome.status,
        duration_ms = elapsed.as_secs_f64() * 1e3,
        bytes = %bytes,
        client = %client,
        "access"
    );
    crate::trace::hub::proxy_request(|| crate::trace::ProxyDecision {
        service: &service,
        service_name: shared
            .table
            .load()
            .services
            .get(&service)
            .map(|r| r.name.clone())
            .unwrap_or_default(),
        client,
        request: format!("{method} {authority}{path}"),
        route: &outcome.route,
        subset: &outcome.subset,
        backend: &outcome.backend,
        status: outcome.status,
    });
    Ok(response)
}

fn request_authority<B>(request: &Request<B>) -> String {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

type Routed = (
    Response<ProxyBody>,
    Outcome,
    Option<Arc<super::stats::RouteCounters>>,
);

async fn route_request(
    shared: &Arc<Shared>,
    runtime: &Arc<ServiceRuntime>,
    client: SocketAddr,
    request: Request<Incoming>,
    authority: &str,
) -> Routed {
    let host = strip_port(authority).to_string();
    let view = RequestView {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        scheme: "http",
        authority,
        headers: request.headers(),
    };
    let mut chosen = None;
    'hosts: for vh in &runtime.virtual_hosts {
        if !vh.domains.iter().any(|d| domain_matches(d, &host)) {
            continue;
        }
        for route in &vh.routes {
            if route.matchers.is_empty() {
                chosen = Some((route, None));
                break 'hosts;
            }
            if let Some(i) = route.matchers.iter().position(|m| m.matches(&view)) {
                chosen = Some((route, Some(i)));
                break 'hosts;
            }
        }
        // Istio: the first virtual host for the Host decides; no route there is a 404.
        break;
    }
    let Some((route, matched)) = chosen else {
        return (
            local(StatusCode::NOT_FOUND, "no route matched"),
            Outcome {
                route: "(no route)".into(),
                subset: String::new(),
                backend: String::new(),
                status: 404,
            },
            Some(runtime.unmatched.clone()),
        );
    };
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cors_allowed = origin
        .as_deref()
        .filter(|o| route.cors_origins.iter().any(|m| m.matches(o, false)));
    if route.plan.cors.is_some()
        && request.method() == http::Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        if let Some(origin) = cors_allowed {
            let mut response = local(StatusCode::OK, "");
            cors_headers(route, origin, true, response.headers_mut());
            return finish_local(route, response);
        }
    }
    let work = serve_route(shared, runtime, route, matched, client, request, authority);
    let (mut response, outcome, counters) = match route.plan.timeout {
        Some(deadline) => match tokio::time::timeout(deadline, work).await {
            Ok(done) => done,
            Err(_) => finish_local(
                route,
                local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            ),
        },
        None => work.await,
    };
    if let Some(origin) = cors_allowed {
        cors_headers(route, origin, false, response.headers_mut());
    }
    (response, outcome, counters)
}

fn finish_local(route: &RouteRuntime, response: Response<ProxyBody>) -> Routed {
    let status = response.status().as_u16();
    let mut response = response;
    apply_header_ops(&route.plan.headers.response, response.headers_mut());
    (
        response,
        Outcome {
            route: route.plan.name.clone(),
            subset: String::new(),
            backend: String::new(),
            status,
        },
        Some(route.local_counters.clone()),
    )
}

fn roll(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && rand::rng().random_bool(share))
}

#[allow(clippy::too_many_arguments)]
async fn serve_route(
    shared: &Arc<Shared>,
    runtime: &Arc<ServiceRuntime>,
    route: &RouteRuntime,
    matched: Option<usize>,
    client: SocketAddr,
    request: Request<Incoming>,
    authority: &str,
) -> Routed {
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
            let location = redirect_location(redirect, request.uri(), authority);
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
            let mut response = Response::new(full(Bytes::from(body.clone())));
            *response.status_mut() = status;
            return finish_local(route, response);
        }
        RouteActionPlan::Forward { destinations } => destinations,
    };
    // Per-request weighted choice of the destination.
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return finish_local(
            route,
            local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        );
    }
    let mut point = rand::rng().random_range(0..total);
    let mut pick = 0;
    for (i, d) in destinations.iter().enumerate() {
        if point < u64::from(d.weight) {
            pick = i;
            break;
        }
        point -= u64::from(d.weight);
    }
    let destination = &destinations[pick];
    let cluster = runtime.clusters[destination.cluster].clone();
    let counters = route.destination_counters[pick].clone();
    let subset = cluster.plan.subset.clone().unwrap_or_default();

    let (parts, body) = request.into_parts();
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    apply_header_ops(&route.plan.headers.request, &mut headers);
    apply_header_ops(&destination.headers.request, &mut headers);
    let mut path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if let Some(rewrite) = &route.plan.rewrite {
        path_and_query = rewrite_path(route, matched, &path_and_query);
        if let Some(new_authority) = &rewrite.authority {
            if let Ok(v) = HeaderValue::from_str(new_authority) {
                headers.insert(header::HOST, v);
            }
        }
    }
    if !headers.contains_key(header::HOST) && !authority.is_empty() {
        if let Ok(v) = HeaderValue::from_str(authority) {
            headers.insert(header::HOST, v);
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

    let retries = &route.plan.retries;
    let replayable = body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
    let wants_copy = retries.attempts > 0 || !route.plan.mirrors.is_empty();
    let mut streamed = None;
    let buffered = if replayable && wants_copy {
        match http_body_util::Limited::new(body, MAX_REPLAY_BODY as usize)
            .collect()
            .await
        {
            Ok(collected) => Some(collected.to_bytes()),
            Err(_) => {
                return finish_local(
                    route,
                    local(StatusCode::BAD_REQUEST, "request body ended early"),
                )
            }
        }
    } else {
        streamed = Some(body);
        None
    };
    let attempts = if buffered.is_some() {
        retries.attempts
    } else {
        0
    };

    if let Some(bytes) = &buffered {
        for mirror in &route.plan.mirrors {
            if roll(mirror.share) {
                spawn_mirror(
                    shared,
                    runtime.clusters[mirror.cluster].clone(),
                    &parts.method,
                    &path_and_query,
                    &headers,
                    bytes.clone(),
                    client,
                );
            }
        }
    }

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
            let (response, outcome, _) = finish_local(route, response);
            return (response, outcome, Some(counters));
        };
        let input = HashInput {
            headers: &headers,
            query: parts.uri.query(),
            client: client.ip(),
            generated_cookie: generated_cookie.as_deref(),
        };
        let Some(index) = cluster.balancer.pick(&input, avoid) else {
            let (response, outcome, _) = finish_local(
                route,
                local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            );
            return (response, outcome, Some(counters));
        };
        let backend = &cluster.balancer.backends[index];
        let Ok(uri) = format!("http://{}{}", backend.address, path_and_query).parse::<Uri>() else {
            return finish_local(route, local(StatusCode::BAD_REQUEST, "bad request path"));
        };
        let body: ProxyBody = match (&buffered, streamed.take()) {
            (Some(bytes), _) => full(bytes.clone()),
            (None, Some(incoming)) => incoming.map_err(|e| Box::new(e) as BoxError).boxed(),
            (None, None) => full(Bytes::new()),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = headers.clone();
        if cluster.plan.http2 {
            *upstream.version_mut() = http::Version::HTTP_2;
        }
        backend.active.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        let active = ActiveGuard {
            cluster: cluster.clone(),
            index,
            _permit: permit,
        };
        let sent = cluster.client.request(upstream);
        let result = match retries.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| ()),
            None => Ok(sent.await),
        };
        let try_outcome = match &result {
            Ok(Ok(response)) => TryOutcome::Response(
                response.status().as_u16(),
                response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            ),
            Ok(Err(e)) if e.is_connect() => TryOutcome::ConnectFailure,
            Ok(Err(e)) if is_refused_stream(e) => TryOutcome::RefusedStream,
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
        let backend_label = backend.address.to_string();
        if attempt < attempts && retriable(retries, try_outcome) {
            attempt += 1;
            avoid = Some(index);
            tracing::debug!(backend = %backend_label, ?try_outcome, attempt, "retrying");
            continue;
        }
        let outcome = |status: u16| Outcome {
            route: route.plan.name.clone(),
            subset: subset.clone(),
            backend: backend_label.clone(),
            status,
        };
        return match result {
            Ok(Ok(response)) => {
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                apply_header_ops(&destination.headers.response, &mut head.headers);
                apply_header_ops(&route.plan.headers.response, &mut head.headers);
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
                let body = GuardedBody {
                    inner: body,
                    _guard: active,
                }
                .map_err(|e| Box::new(e) as BoxError)
                .boxed();
                (
                    Response::from_parts(head, body),
                    outcome(status),
                    Some(counters),
                )
            }
            Ok(Err(_)) => {
                let mut response = local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                );
                apply_header_ops(&route.plan.headers.response, response.headers_mut());
                (response, outcome(503), Some(counters))
            }
            Err(()) => {
                let mut response = local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                apply_header_ops(&route.plan.headers.response, response.headers_mut());
                (response, outcome(504), Some(counters))
            }
        };
    }
}

fn is_refused_stream(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if format!("{h:?}").contains("REFUSED_STREAM") {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// Sends a copy of the request to a mirror cluster in the background; its answer (and how
/// long it takes) never reaches the client. Copies beyond the proxy's mirror budget are
/// dropped rather than queued.
fn spawn_mirror(
    shared: &Arc<Shared>,
    cluster: Arc<ClusterRuntime>,
    method: &http::Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    client: SocketAddr,
) {
    let Ok(slot) = shared.mirror_slots.clone().try_acquire_owned() else {
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
    let path_and_query = path_and_query.to_string();
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
        let Ok(uri) = format!("http://{address}{path_and_query}").parse::<Uri>() else {
            return;
        };
        let mut request = Request::new(full(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, async {
            if let Ok(response) = cluster.client.request(request).await {
                let _ = response.into_body().collect().await;
            }
        })
        .await;
    });
}

/// Istio/Envoy's mirror Host: `-shadow` appended to the host part (`a.b:80` -> `a.b-shadow:80`).
pub fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(']')
                && port.bytes().all(|b| b.is_ascii_digit())
                && !name.contains(':') =>
        {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

fn rewrite_path(route: &RouteRuntime, matched: Option<usize>, path_and_query: &str) -> String {
    let Some(rewrite) = &route.plan.rewrite else {
        return path_and_query.to_string();
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q)),
        None => (path_and_query.to_string(), None),
    };
    let mut new_path = path.clone();
    if let (Some(regex), Some((_, replacement))) = (&route.uri_regex, &rewrite.uri_regex) {
        new_path = regex
            .replace_all(&path, envoy_substitution(replacement).as_str())
            .into_owned();
    } else if let Some(uri) = &rewrite.uri {
        let prefix = matched
            .and_then(|i| route.plan.matches.get(i))
            .and_then(|m| m.uri.as_ref());
        new_path = match prefix {
            Some(StringMatchPlan::Prefix(p)) if path.len() >= p.len() => {
                format!("{uri}{}", &path[p.len()..])
            }
            _ => uri.clone(),
        };
    }
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// Envoy's `\1` group references in the regex crate's `${1}` syntax.
fn envoy_substitution(replacement: &str) -> String {
    let mut out = String::new();
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn redirect_location(redirect: &RedirectPlan, uri: &Uri, authority: &str) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let request_port = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, p)| p.to_string());
    let mut host = redirect
        .authority
        .clone()
        .unwrap_or_else(|| strip_port(authority).to_string());
    let port = redirect.port.map(|p| p.to_string()).or_else(|| {
        if redirect.port_from_request || redirect.authority.is_none() {
            request_port
        } else {
            None
        }
    });
    if let Some(port) = port {
        host = format!("{}:{port}", strip_port(&host));
    }
    let path = redirect.uri.clone().unwrap_or_else(|| {
        uri.path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into())
    });
    format!("{scheme}://{host}{path}")
}

fn cors_headers(route: &RouteRuntime, origin: &str, preflight: bool, headers: &mut HeaderMap) {
    let Some(cors) = &route.plan.cors else {
        return;
    };
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set("access-control-allow-origin", origin.to_string());
    if cors.allow_credentials {
        set("access-control-allow-credentials", "true".into());
    }
    if !cors.expose_headers.is_empty() {
        set(
            "access-control-expose-headers",
            cors.expose_headers.join(","),
        );
    }
    if preflight {
        if !cors.allow_methods.is_empty() {
            set("access-control-allow-methods", cors.allow_methods.join(","));
        }
        if !cors.allow_headers.is_empty() {
            set("access-control-allow-headers", cors.allow_headers.join(","));
        }
        if let Some(age) = cors.max_age {
            set("access-control-max-age", age.as_secs().to_string());
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(name.as_str());
    }
}

/// Applies Istio header operations in Envoy's order: remove, then set, then add.
pub fn apply_header_ops(ops: &HeaderOpPlan, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &ops.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
}

/// A complete body from bytes.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A short text answer from the proxy itself.
pub fn local(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(if text.is_empty() {
        String::new()
    } else {
        format!("{text}\n")
    })));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Keeps a cluster slot and the backend's in-flight count until the response body is done.
struct ActiveGuard {
    cluster: Arc<ClusterRuntime>,
    index: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.cluster.balancer.backends[self.index]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that releases its [`ActiveGuard`] when dropped.
struct GuardedBody {
    inner: Incoming,
    _guard: ActiveGuard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(shadow_host("echo.test:8080"), "echo.test-shadow:8080");
        assert_eq!(shadow_host("echo.test"), "echo.test-shadow");
    }

    #[test]
    fn header_ops_remove_set_add() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("b", "1".parse().unwrap());
        let ops = HeaderOpPlan {
            set: vec![("a".into(), "2".into())],
            add: vec![("c".into(), "3".into())],
            remove: vec!["b".into()],
        };
        apply_header_ops(&ops, &mut h);
        assert_eq!(h.get("a").unwrap(), "2");
        assert!(h.get("b").is_none());
        assert_eq!(h.get("c").unwrap(), "3");
    }

    #[test]
    fn envoy_group_references() {
        assert_eq!(envoy_substitution(r"/v2/\1"), "/v2/${1}");
    }

    #[test]
    fn redirect_keeps_path_and_port() {
        let plan = RedirectPlan {
            uri: None,
            authority: Some("new.test".into()),
            port: None,
            port_from_request: false,
            scheme: None,
            status: 301,
        };
        let uri: Uri = "/a?b=1".parse().unwrap();
        assert_eq!(
            redirect_location(&plan, &uri, "old.test:8080"),
            "http://new.test/a?b=1"
        );
    }
}
