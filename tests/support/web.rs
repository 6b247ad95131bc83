//! A small blocking HTTP/1.1 client for tests and the sandbox (hyper underneath), and helpers to
//! run and stop processes inside namespaces.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::{meshd::bin, netns::Netns};

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Response headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Answer {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A blocking client whose sockets are created on the calling thread (so in its namespace).
pub struct Client {
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the calling thread.
    pub fn new() -> Result<Self> {
        Ok(Client {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// GET `path` from `target` on a fresh connection, with extra `headers`; 5 s timeout.
    pub fn get(&self, target: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        self.runtime.block_on(async {
            let exchange = async {
                let stream = tokio::net::TcpStream::connect(target)
                    .await
                    .with_context(|| format!("connecting to {target}"))?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                let mut request = Request::get(path)
                    .header("host", target.to_string())
                    .header("connection", "close");
                for (k, v) in headers {
                    request = request.header(*k, *v);
                }
                let response = sender
                    .send_request(request.body(Full::new(Bytes::new()))?)
                    .await?;
                let status = response.status().as_u16();
                let headers = response
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            v.to_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                let body = response.into_body().collect().await?.to_bytes();
                anyhow::Ok(Answer {
                    status,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            };
            tokio::time::timeout(Duration::from_secs(5), exchange)
                .await
                .with_context(|| format!("GET {path} from {target}: no answer within 5 s"))?
        })
    }
}

/// A process running inside a namespace; killed on drop.
pub struct NsProcess {
    child: Child,
    /// What it is, for messages.
    pub label: String,
}

impl NsProcess {
    /// Starts the mesh binary `name` with `args` inside `ns`.
    pub fn start(ns: &Netns, name: &str, args: &[String], label: &str) -> Result<Self> {
        let child = ns
            .command(bin(name)?.to_str().context("utf-8 path")?)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        Ok(NsProcess {
            child,
            label: label.to_string(),
        })
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status})", self.label);
        }
        Ok(())
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
