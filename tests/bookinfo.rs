//! The Bookinfo sample services (Istio's traffic-management tutorial), small enough to read:
//! one binary that runs as `productpage`, `details`, `reviews` or `ratings` in a given version.
//!
//! They behave like Istio's sample where routing is concerned:
//! - productpage calls details and reviews, forwarding the `end-user` header it got (or the user
//!   its `/login` put in the `session` cookie), so header routes work across hops;
//! - reviews v1 shows no rating, v2 calls ratings and shows black stars, v3 calls ratings and
//!   shows red stars;
//! - every response says which version of each service answered (JSON body and the
//!   `x-bookinfo-versions` header).
//!
//! Service-to-service calls go to service addresses (through meshd on the node), one connection
//! per call: the kernel path splits per connection, so this makes its split per request too.
//! `GET /stats` reports how many requests arrived, and how many were mirrored copies (a Host
//! ending in `-shadow`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

struct Service {
    name: String,
    version: String,
    details: Option<SocketAddr>,
    reviews: Option<SocketAddr>,
    ratings: Option<SocketAddr>,
    requests: AtomicU64,
    shadow_requests: AtomicU64,
}

fn usage() -> &'static str {
    "usage: mesh-bookinfo --service productpage|details|reviews|ratings --version vN --listen ADDR \
     [--details ADDR] [--reviews ADDR] [--ratings ADDR]"
}

fn parse_args() -> Result<(Service, SocketAddr)> {
    let mut args = std::env::args().skip(1);
    let (mut name, mut version, mut listen) = (None, None, None);
    let (mut details, mut reviews, mut ratings) = (None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value; {}", usage()))
        };
        match flag.as_str() {
            "--service" => name = Some(value()?),
            "--version" => version = Some(value()?),
            "--listen" => listen = Some(value()?.parse().context("--listen")?),
            "--details" => details = Some(value()?.parse().context("--details")?),
            "--reviews" => reviews = Some(value()?.parse().context("--reviews")?),
            "--ratings" => ratings = Some(value()?.parse().context("--ratings")?),
            _ => bail!("unknown argument {flag}; {}", usage()),
        }
    }
    let name = name.context(usage())?;
    if !matches!(
        name.as_str(),
        "productpage" | "details" | "reviews" | "ratings"
    ) {
        bail!("unknown service {name}; {}", usage());
    }
    Ok((
        Service {
            name,
            version: version.context(usage())?,
            details,
            reviews,
            ratings,
            requests: AtomicU64::new(0),
            shadow_requests: AtomicU64::new(0),
        },
        listen.context(usage())?,
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let (service, listen) = parse_args()?;
    let service = Arc::new(service);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("{} {} listening on {listen}", service.name, service.version);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |req| handle(req, service.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    service: Arc<Service>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/stats" {
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "service": service.name,
                "version": service.version,
                "requests": service.requests.load(Ordering::Relaxed),
                "shadow_requests": service.shadow_requests.load(Ordering::Relaxed),
            }),
            None,
        ));
    }
    service.requests.fetch_add(1, Ordering::Relaxed);
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if host
        .split(':')
        .next()
        .unwrap_or_default()
        .ends_with("-shadow")
    {
        service.shadow_requests.fetch_add(1, Ordering::Relaxed);
    }
    let user = end_user(&req);
    let answer = match service.name.as_str() {
        "productpage" => productpage(&service, &path, &req, user).await,
        "details" => Ok(json!({"details": service.version})),
        "ratings" => {
            Ok(json!({"ratings": service.version, "stars": {"Reviewer1": 5, "Reviewer2": 4}}))
        }
        _ => reviews(&service, user).await,
    };
    Ok(match answer {
        Ok(Value::String(redirect)) => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "/productpage")
            .header("set-cookie", redirect)
            .body(Full::new(Bytes::new()))
            .expect("static response"),
        Ok(body) => {
            let versions = versions_header(&service, &body);
            json_response(StatusCode::OK, &body, Some(versions))
        }
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": format!("{} {}: {e:#}", service.name, service.version)}),
            None,
        ),
    })
}

/// The user a request speaks for: the `end-user` header, else the `session` cookie.
fn end_user(req: &Request<Incoming>) -> Option<String> {
    if let Some(user) = req.headers().get("end-user").and_then(|h| h.to_str().ok()) {
        return Some(user.to_string());
    }
    req.headers()
        .get_all("cookie")
        .iter()
        .filter_map(|c| c.to_str().ok())
        .flat_map(|c| c.split(';'))
        .find_map(|kv| kv.trim().strip_prefix("session=").map(str::to_string))
        .filter(|u| !u.is_empty())
}

async fn productpage(
    service: &Service,
    path: &str,
    req: &Request<Incoming>,
    user: Option<String>,
) -> Result<Value> {
    if path == "/login" {
        let user = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("user="))
            .unwrap_or("jason");
        return Ok(Value::String(format!("session={user}; Path=/")));
    }
    if path == "/logout" {
        return Ok(Value::String("session=; Path=/; Max-Age=0".into()));
    }
    let details = call(
        service.details.context("no --details")?,
        "details",
        "/details/0",
        user.as_deref(),
    )
    .await?;
    let reviews = call(
        service.reviews.context("no --reviews")?,
        "reviews",
        "/reviews/0",
        user.as_deref(),
    )
    .await?;
    Ok(json!({
        "productpage": service.version,
        "user": user,
        "details": details["details"],
        "reviews": reviews["reviews"],
        "ratings": reviews["ratings"],
        "stars": reviews["stars"],
    }))
}

async fn reviews(service: &Service, user: Option<String>) -> Result<Value> {
    let (stars, ratings) = match service.version.as_str() {
        "v1" => ("none", Value::Null),
        v => {
            let ratings = call(
                service.ratings.context("no --ratings")?,
                "ratings",
                "/ratings/0",
                user.as_deref(),
            )
            .await?;
            (
                if v == "v2" { "black" } else { "red" },
                ratings["ratings"].clone(),
            )
        }
    };
    Ok(json!({"reviews": service.version, "stars": stars, "ratings": ratings}))
}

/// One request on a fresh connection to a service address.
async fn call(addr: SocketAddr, host: &str, path: &str, user: Option<&str>) -> Result<Value> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {host} at {addr}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::get(path)
            .header("host", format!("{host}:{}", addr.port()))
            .header("connection", "close");
        if let Some(user) = user {
            request = request.header("end-user", user);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::new()))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{host} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{host} did not answer within 5 s"))?
}

fn versions_header(service: &Service, body: &Value) -> String {
    let mut parts = vec![format!("{}={}", service.name, service.version)];
    for key in ["details", "reviews", "ratings"] {
        if let Some(v) = body[key].as_str() {
            if key != service.name {
                parts.push(format!("{key}={v}"));
            }
        }
    }
    parts.join(",")
}

fn json_response(
    status: StatusCode,
    body: &Value,
    versions: Option<String>,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(v) = versions {
        builder = builder.header("x-bookinfo-versions", v);
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response")
}
