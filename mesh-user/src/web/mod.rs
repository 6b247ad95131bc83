//! The live split page on the metrics listener: `GET /` (one HTML file with its script, embedded
//! in the binary, no external assets), `GET /api/stats` (the stats snapshot) and
//! `GET /api/stats/stream` (the same snapshot once a second as server-sent events).
//!
//! The snapshot is [`Controller::stats`](crate::daemon::control::Controller::stats): the data
//! `/metrics` and `meshctl stats -o json` show. The page derives shares and rates from it.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::{
    admin::stream::{AnyBody, ChannelBody},
    daemon::control::Controller,
    dataplane::StatsSnapshot,
};

/// The page.
pub const PAGE: &str = include_str!("page.html");
/// How often the stream pushes a snapshot.
pub const PUSH_INTERVAL: Duration = Duration::from_secs(1);

type Shared = Arc<Mutex<Controller>>;

/// Answers the page's paths; `None` for anything else.
pub async fn serve(path: &str, controller: &Shared) -> Option<Response<AnyBody>> {
    match path {
        "/" | "/index.html" => Some(answer(
            "text/html; charset=utf-8",
            Bytes::from_static(PAGE.as_bytes()),
        )),
        "/api/stats" => Some(match snapshot(controller.clone()).await {
            Ok(s) => answer(
                "application/json",
                Bytes::from(serde_json::to_vec(&s).unwrap_or_default()),
            ),
            Err(e) => {
                let mut r = answer("text/plain", Bytes::from(e));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            }
        }),
        "/api/stats/stream" => Some(stream(controller.clone())),
        _ => None,
    }
}

fn answer(content_type: &str, body: Bytes) -> Response<AnyBody> {
    Response::builder()
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body).boxed())
        .expect("static response")
}

async fn snapshot(controller: Shared) -> Result<StatsSnapshot, String> {
    tokio::task::spawn_blocking(move || {
        let c = controller.lock().unwrap_or_else(|p| p.into_inner());
        c.stats().map_err(|r| r.message)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Server-sent events: one `data:` line with the snapshot per [`PUSH_INTERVAL`] until the
/// browser goes away.
fn stream(controller: Shared) -> Response<AnyBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PUSH_INTERVAL);
        loop {
            tick.tick().await;
            let event = match snapshot(controller.clone()).await {
                Ok(s) => format!(
                    "data: {}\n\n",
                    serde_json::to_string(&s).unwrap_or_default()
                ),
                // A comment keeps the connection alive and shows up in the browser's devtools.
                Err(e) => format!(": stats unavailable: {}\n\n", e.replace('\n', " ")),
            };
            if tx.send(Bytes::from(event)).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-store")
        .body(ChannelBody::new(rx).boxed())
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "//cdn", "<link", "src="] {
            assert!(
                !PAGE.contains(needle),
                "page refers to an external asset: {needle}"
            );
        }
        assert!(PAGE.contains("/api/stats/stream"));
    }
}
