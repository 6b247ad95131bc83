//! The meshctl side of the admin API: one HTTP/1.1 request per call over the Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use super::ErrorBody;

/// Errors talking to meshd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error("cannot reach meshd at {socket}: {reason}; is meshd running? (start it with `meshd --iface IF --config PATH`, or pass --socket)")]
    Unreachable {
        /// Socket path.
        socket: String,
        /// OS error text.
        reason: String,
    },
    /// The socket exists but this user may not use it.
    #[error("permission denied on {socket}: the admin socket is root-only; run meshctl as root")]
    PermissionDenied {
        /// Socket path.
        socket: String,
    },
    /// meshd answered with an error.
    #[error("{0}")]
    Rejected(String),
    /// The exchange failed half-way or the answer was not understood.
    #[error("talking to meshd: {0}")]
    Protocol(String),
}

/// A client for one socket path.
#[derive(Clone, Debug)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// A client for `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// GET `path`, decoding JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.request(Method::GET, path, Bytes::new()).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// GET `path` as text.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.request(Method::GET, path, Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// POST JSON to `path`, decoding JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let answer = self.request(Method::POST, path, Bytes::from(bytes)).await?;
        serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// GET `path` and hand every non-empty line of the (endless) answer to `on_line` until it
    /// returns false or meshd ends the answer.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let response = self.send(Method::GET, path, Bytes::new()).await?;
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            return Err(rejected(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]);
                if !line.trim().is_empty() && !on_line(&line) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn request(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(rejected(status, &bytes));
        }
        Ok(bytes)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let socket = self.socket.display().to_string();
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    socket: socket.clone(),
                }
            } else {
                ClientError::Unreachable {
                    socket: socket.clone(),
                    reason: e.to_string(),
                }
            }
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mesh")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

fn rejected(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| {
            format!(
                "meshd answered {status}: {}",
                String::from_utf8_lossy(bytes)
            )
        });
    ClientError::Rejected(message)
}
