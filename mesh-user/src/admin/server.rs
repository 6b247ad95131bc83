//! The meshd side of the admin API (see the module docs of [`crate::admin`]) and the
//! Prometheus listener.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use super::{
    stream::{self, AnyBody},
    ApplyRequest, DeleteRequest, ErrorBody,
};
use crate::daemon::control::{Controller, Rejection};

/// Largest request body accepted (a rule bundle: 30 000 services are about 17 MiB of YAML).
const MAX_BODY_BYTES: usize = 64 << 20;

type Shared = Arc<Mutex<Controller>>;

/// Binds the admin socket (root only) and serves it until the process ends.
pub async fn serve_admin(socket: PathBuf, controller: Shared) -> Result<()> {
    let listener = bind_socket(&socket)?;
    info!(socket = %socket.display(), "admin API listening");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let controller = controller.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| handle(req, controller.clone(), false));
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            debug!("admin connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("admin accept: {e}"),
            }
        }
    });
    Ok(())
}

/// Serves `GET /metrics` on a TCP address (loopback by default).
pub async fn serve_metrics(addr: SocketAddr, controller: Shared) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics listener on {addr} (use --metrics-addr or --no-metrics)")
    })?;
    info!(%addr, "metrics listening");
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let controller = controller.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, controller.clone(), true));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    });
    Ok(())
}

fn bind_socket(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        // A socket file with a live listener means another meshd: refuse rather than steal it.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("another meshd is already serving {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", socket.display()))?;
    Ok(listener)
}

/// Streaming and page answers first, then the plain JSON ones.
async fn handle(
    req: Request<Incoming>,
    controller: Shared,
    metrics_only: bool,
) -> Result<Response<AnyBody>, Infallible> {
    if req.method() == Method::GET {
        let path = req.uri().path();
        if metrics_only {
            if let Some(response) = crate::web::serve(path, &controller).await {
                return Ok(response);
            }
        } else if path == "/v1/trace" {
            return Ok(stream::trace(req.uri().query().unwrap_or("")));
        } else if path == "/v1/trace/stats" {
            return Ok(stream::trace_stats());
        }
    }
    let response = handle_unary(req, controller, metrics_only).await?;
    Ok(response.map(|body| body.boxed()))
}

async fn handle_unary(
    req: Request<Incoming>,
    controller: Shared,
    metrics_only: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if metrics_only && !(method == Method::GET && path == "/metrics") {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "only GET /metrics and the split page (/, /api/stats, /api/stats/stream) are served here",
        ));
    }
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            let text = blocking(controller, |c| Ok(c.render_metrics())).await;
            match text {
                Ok(text) => Response::builder()
                    .header(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(text)))
                    .expect("static response"),
                Err(r) => rejection(r),
            }
        }
        (&Method::GET, "/v1/status") => json_result(status(controller).await),
        (&Method::GET, "/v1/fleet") => json_result(fleet_view(controller).await),
        (&Method::GET, "/v1/stats") => json_result(blocking(controller, |c| c.stats()).await),
        (&Method::GET, "/v1/services") => {
            json_result(blocking(controller, |c| Ok(c.services())).await)
        }
        (&Method::GET, "/v1/resources") => {
            let params = parse_query(&query);
            json_result(
                blocking(controller, move |c| {
                    Ok(c.resources(
                        params.get("kind").map(String::as_str),
                        params.get("name").map(String::as_str),
                        params.get("namespace").map(String::as_str),
                    ))
                })
                .await,
            )
        }
        (&Method::POST, "/v1/apply") => match read_json::<ApplyRequest>(req).await {
            Ok(request) => json_result(blocking(controller, move |c| c.apply(request)).await),
            Err(r) => rejection(r),
        },
        (&Method::POST, "/v1/delete") => match read_json::<DeleteRequest>(req).await {
            Ok(request) => json_result(blocking(controller, move |c| c.delete(request)).await),
            Err(r) => rejection(r),
        },
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {method} {path}"),
        ),
    };
    Ok(response)
}

/// Every node of the fleet as etcd knows it, plus this node's own view.
async fn fleet_view(controller: Shared) -> Result<crate::fleet::FleetView, Rejection> {
    let link = blocking(controller, |c| Ok(c.fleet_link())).await?;
    let Some(link) = link else {
        return Err(Rejection {
            status: 404,
            message: "this meshd is not part of a fleet (start it with --etcd URL)".into(),
        });
    };
    let read = async {
        let store = link.store().await?;
        let revision = link.note(store.revision().await)?;
        let nodes = link.note(store.nodes().await)?;
        Ok::<_, crate::fleet::etcd::EtcdError>((revision, nodes))
    }
    .await;
    let mut view = crate::fleet::FleetView::default();
    match read {
        Ok((revision, nodes)) => {
            link.seen(revision);
            view.revision = Some(revision);
            view.nodes = nodes
                .into_iter()
                .map(|(name, record)| crate::fleet::NodeView {
                    state: crate::fleet::node_state(record.as_ref(), revision).into(),
                    name,
                    record,
                })
                .collect();
        }
        Err(e) => view.error = Some(e.to_string()),
    }
    view.local = link.local().clone();
    Ok(view)
}

/// `meshctl status`: from the controller, or, while a long apply holds it, the last status
/// with the work in progress (see [`crate::progress`]).
async fn status(controller: Shared) -> Result<super::Status, Rejection> {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        loop {
            match controller.try_lock() {
                Ok(c) => return Ok(c.status()),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner().status()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        if let Some(status) = crate::progress::busy_status() {
                            return Ok(status);
                        }
                        // Nothing to show yet: wait for the controller.
                        let c = controller.lock().unwrap_or_else(|p| p.into_inner());
                        return Ok(c.status());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(Rejection {
            status: 500,
            message: format!("internal error: {e}"),
        })
    })
}

/// Runs a controller operation off the async threads (map writes are syscalls).
async fn blocking<T: Send + 'static>(
    controller: Shared,
    f: impl FnOnce(&mut Controller) -> Result<T, Rejection> + Send + 'static,
) -> Result<T, Rejection> {
    tokio::task::spawn_blocking(move || {
        let mut guard = controller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    })
    .await
    .unwrap_or_else(|e| {
        Err(Rejection {
            status: 500,
            message: format!("internal error: {e}"),
        })
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Rejection> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| Rejection {
            status: 413,
            message: format!("request body: {e} (limit {MAX_BODY_BYTES} bytes)"),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| Rejection {
        status: 400,
        message: format!("request body is not valid JSON for this endpoint: {e}"),
    })
}

fn parse_query(query: &str) -> std::collections::HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn json_result<T: Serialize>(result: Result<T, Rejection>) -> Response<Full<Bytes>> {
    match result {
        Ok(value) => match serde_json::to_vec(&value) {
            Ok(bytes) => Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(bytes)))
                .expect("static response"),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        Err(r) => rejection(r),
    }
}

fn rejection(r: Rejection) -> Response<Full<Bytes>> {
    error(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
        &r.message,
    )
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: message.to_string(),
    })
    .unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}
