//! Forwarding a routed request: the per-request weighted destination, the request headers
//! upstream (hop-by-hop removed, X-Forwarded-For, header operations, Host, rewrites), the
//! request body, mirrors, and the tries (cluster slot, backend choice, per-try timeout,
//! retry decision, outlier accounting) up to the response headers going back.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use http::{
    header::{self, HeaderName, HeaderValue},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, Request, Response, StatusCode, Uri,
};
use hyper::body::Incoming;
use rand::Rng;

use super::{
    access::Outcome,
    balance::{retry_backoff, HashInput, TryResult},
    body::{read_request_body, ActiveGuard, ReadError, RespBody, UpBody},
    handler::{finish_local, local, roll, ConnContext, Routed},
    mirror::spawn_mirror,
    retry::{retriable, TryOutcome},
    rewrite::{rewrite_path, strip_hop_by_hop},
    stats::RouteCounters,
    table::{ClusterRuntime, RouteRuntime, ServiceRuntime},
};
use crate::compile::{LoadBalancerPlan, WeightedClusterPlan};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends the client to X-Forwarded-For as Envoy does at the edge (all earlier values kept,
/// comma-separated, then the client's address) and sets X-Forwarded-Proto.
fn forwarded_headers(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    let mut earlier = headers.get_all(&X_FORWARDED_FOR).iter();
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
            for part in headers.get_all(&X_FORWARDED_FOR) {
                v.extend_from_slice(part.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR.clone(), value);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
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

/// Forwards the request to one of `destinations` (the route's weighted clusters), with
/// retries, and returns the backend's response head (its body streams on).
#[allow(clippy::too_many_arguments)]
pub async fn forward<'a>(
    conn: &ConnContext,
    runtime: &'a ServiceRuntime,
    route: &'a RouteRuntime,
    matched: Option<usize>,
    destinations: &[WeightedClusterPlan],
    parts: Parts,
    body: Incoming,
    authority: &HeaderValue,
) -> Routed<'a> {
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
        let Some(slot) = cluster.acquire().await else {
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
        slot.keep();
        let mut active = ActiveGuard {
            cluster: cluster.clone(),
            index,
            slot: true,
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

#[cfg(test)]
mod tests {
    use super::*;

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
