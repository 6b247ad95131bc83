//! Mirroring: a copy of a request to a mirror cluster in the background, within the proxy's
//! mirror budget; its answer (and how long it takes) never reaches the client.

use std::{sync::Arc, time::Duration};

use http::{
    header::{self, HeaderValue},
    uri::PathAndQuery,
    HeaderMap, Method, Request, Uri,
};

use super::{
    balance::HashInput, body::UpBody, handler::ConnContext, rewrite::shadow_host,
    table::ClusterRuntime,
};

/// A mirror request that takes longer is abandoned (its answer is never used anyway).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a copy of the request to a mirror cluster in the background; its answer (and how
/// long it takes) never reaches the client. Copies beyond the proxy's mirror budget are
/// dropped rather than queued.
pub fn spawn_mirror(
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
