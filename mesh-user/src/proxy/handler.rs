//! One request through the proxy, and the filters that answer it before it is forwarded: the
//! authority check, virtual host and route selection, CORS (preflight answered here, headers
//! on the way back), the route's overall timeout, fault injection, redirects and direct
//! responses. Forwarding itself (destination, headers, body, retries) is [`super::forward`],
//! mirroring [`super::mirror`], what is recorded afterwards [`super::access`].
//!
//! The request path allocates little: the client's header map and URI are forwarded in place
//! (no copy, no re-formatting), counters are handles resolved once per apply, header operations
//! are compiled once per apply, and the access log's fields are only gathered when its target
//! (`mesh::access`) is enabled. Bodies: see [`super::body`].

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    request::Parts,
    Method, Request, Response, StatusCode,
};
use hyper::body::Incoming;
use rand::Rng;

use super::{
    access::{self, Outcome},
    body::RespBody,
    forward::forward,
    matching::{domain_matches, strip_port, RequestView},
    rewrite::{cors_headers, redirect_location},
    server::Activity,
    table::{RouteRuntime, ServiceRuntime},
    Shared,
};
use crate::compile::{RouteActionPlan, ServiceAddress};

pub use super::body::MAX_REPLAY_BODY;

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
    let log = access::enabled();
    let kept = (log || crate::trace::hub::hub().active())
        .then(|| (parts.method.clone(), parts.uri.clone()));
    let record =
        |authority: &str, service_name: &str, outcome: &Outcome, response: &Response<RespBody>| {
            if let Some((method, uri)) = &kept {
                if log {
                    access::access_log(conn, method, uri, authority, outcome, started, response);
                }
                access::trace(conn, service_name, method, uri, authority, outcome);
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

pub type Routed<'a> = (Response<RespBody>, Outcome<'a>);

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

pub fn finish_local(route: &RouteRuntime, mut response: Response<RespBody>) -> Routed<'_> {
    let status = response.status().as_u16();
    route.response_ops.apply(response.headers_mut());
    (
        response,
        Outcome::local(Some(route), status, Some(&route.local_counters)),
    )
}

/// True with probability `share` (fault and mirror percentages).
pub fn roll(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && rand::rng().random_bool(share))
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
    match &route.plan.action {
        RouteActionPlan::Redirect(redirect) => {
            let location =
                redirect_location(redirect, &parts.uri, authority.to_str().unwrap_or(""));
            let status =
                StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            let mut response = local(status, "");
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            finish_local(route, response)
        }
        RouteActionPlan::DirectResponse { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut response = Response::new(RespBody::local(Bytes::from(body.clone())));
            *response.status_mut() = status;
            finish_local(route, response)
        }
        RouteActionPlan::Forward { destinations } => {
            forward(
                conn,
                runtime,
                route,
                matched,
                destinations,
                parts,
                body,
                authority,
            )
            .await
        }
    }
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
}
