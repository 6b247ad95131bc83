//! Fuzz target `admin`: raw HTTP requests (random and mutated methods, paths, headers and
//! bodies) written to the admin socket of a real meshd running in a namespace with the `echo`
//! service, the way `meshctl` and `curl --unix-socket` reach it.
//!
//! Seeds: `tests/fuzz-corpus/admin/` (raw requests) plus generated requests whose bodies carry
//! apply and delete submissions built from `config/` YAML, mutated YAML or random JSON.
//! Invariants, for every request:
//! - meshd answers with a well-formed HTTP/1.1 response or closes the connection, and an error
//!   status with a JSON body carries `{"error": "..."}`;
//! - meshd never wedges or exits: `GET /v1/status` answers 200 after every request;
//! - anything but an accepted (2xx) `POST /v1/apply` or `/v1/delete` leaves the resources in
//!   force (`GET /v1/resources`) exactly as they were.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use mesh_tests::{
    fuzz::{self, mutate, Budget, Corpus},
    meshd::Meshd,
    rules::meshd_args,
    traffic::EchoSetup,
};
use proptest::{collection::vec, prelude::*};

/// How long one exchange may take before meshd counts as wedged (generous: debug build, two
/// shared cores).
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a complete answer may take before the request counts as waiting for more input.
const FIRST_WAIT: Duration = Duration::from_millis(300);

/// HTTP and JSON words for mutations.
const DICTIONARY: &[&str] = &[
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "PATCH",
    "CONNECT",
    " HTTP/1.1",
    " HTTP/1.0",
    " HTTP/2.0",
    "\r\n",
    "\r\n\r\n",
    "\n",
    "Content-Length: 0\r\n",
    "Content-Length: 99999999\r\n",
    "Content-Length: -1\r\n",
    "Transfer-Encoding: chunked\r\n",
    "Expect: 100-continue\r\n",
    "Connection: close\r\n",
    "Host: \r\n",
    "/v1/apply",
    "/v1/delete",
    "/v1/status",
    "/v1/resources",
    "/v1/services",
    "/v1/stats",
    "/metrics",
    "/v1/trace/stats",
    "/v1/fleet",
    "?kind=vs&name=",
    "%00",
    "%",
    "..",
    "//",
    "*",
    "{",
    "}",
    "[",
    "]",
    "\"documents\"",
    "\"resources\"",
    "\"yaml\"",
    "\"source\"",
    "\"dry_run\": true",
    "null",
    "true",
    "1e999",
    "-1",
    "\"\\u0000\"",
    "0\r\n\r\n",
    "ffffffff\r\n",
];

/// A request as raw bytes.
fn request(method: &str, path: &str, headers: &[String], body: &[u8], length: bool) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: mesh\r\n").into_bytes();
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if length {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// JSON bodies: apply and delete submissions (valid, with mutated YAML, wrong types) and junk.
fn body(yaml_seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let yaml = mutate::mutated(yaml_seeds.clone(), &["-1", "null", "[]", "weight", "\n- "]);
    let apply = (yaml, any::<bool>()).prop_map(|(yaml, dry_run)| {
        serde_json::json!({
            "documents": [{"source": "fuzz.yaml", "yaml": String::from_utf8_lossy(&yaml)}],
            "dry_run": dry_run,
        })
        .to_string()
        .into_bytes()
    });
    let kinds = prop_oneof![
        Just("VirtualService"),
        Just("DestinationRule"),
        Just("ServiceEntry"),
        Just("Gateway"),
        Just("Nothing"),
        Just(""),
    ];
    let names = prop_oneof![Just("echo"), Just("reviews"), Just(""), Just("../x")];
    let delete = (kinds, names, any::<bool>()).prop_map(|(kind, name, dry_run)| {
        serde_json::json!({
            "resources": [{"kind": kind, "namespace": "default", "name": name}],
            "dry_run": dry_run,
        })
        .to_string()
        .into_bytes()
    });
    let json_junk = prop_oneof![
        Just(b"{}".to_vec()),
        Just(b"[]".to_vec()),
        Just(b"{\"documents\": []}".to_vec()),
        Just(b"{\"documents\": [{\"source\": 1, \"yaml\": null}]}".to_vec()),
        Just(b"{\"resources\": \"all\"}".to_vec()),
    ];
    prop_oneof![
        4 => apply,
        2 => delete,
        1 => json_junk,
        1 => vec(any::<u8>(), 0..256),
    ]
}

fn structured(yaml_seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        4 => Just("POST"),
        3 => Just("GET"),
        1 => Just("PUT"),
        1 => Just("DELETE"),
        1 => Just("HEAD"),
        1 => Just("OPTIONS"),
        1 => Just("BREW"),
    ];
    let path = prop_oneof![
        4 => Just("/v1/apply".to_string()),
        2 => Just("/v1/delete".to_string()),
        1 => Just("/v1/status".to_string()),
        1 => Just("/v1/resources?kind=vs&name=echo".to_string()),
        1 => Just("/v1/services".to_string()),
        1 => Just("/v1/stats".to_string()),
        1 => Just("/metrics".to_string()),
        1 => Just("/v1/trace/stats".to_string()),
        1 => Just("/v1/fleet".to_string()),
        1 => "/[a-z0-9/%.?&=]{0,40}",
    ];
    let header = prop_oneof![
        Just("Content-Type: application/json".to_string()),
        Just("Content-Type: text/yaml".to_string()),
        Just("Connection: close".to_string()),
        Just("Expect: 100-continue".to_string()),
        Just("X-Fuzz: \u{7f}\u{1}".to_string()),
        "[A-Za-z-]{1,20}: [ -~]{0,40}",
    ];
    (method, path, vec(header, 0..3), body(yaml_seeds), 0u8..8).prop_map(
        |(method, path, headers, body, length)| {
            request(method, &path, &headers, &body, length != 0)
        },
    )
}

/// Writes `bytes` and reads the answer: until meshd closes or a complete response arrived; if
/// nothing complete came within [`FIRST_WAIT`] (meshd may be waiting for body bytes the input
/// promised), the write side is closed and meshd must then answer or close within
/// [`PATIENCE`]. Returns the bytes read and whether the read ended by timeout.
fn exchange(socket: &str, bytes: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(PATIENCE)).ok();
    // meshd may answer (and close) before reading everything: a failed write is not a failure.
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let mut closed_write = false;
    stream.set_read_timeout(Some(FIRST_WAIT)).ok();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((out, false)),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if complete(&out) {
                    return Ok((out, false));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if closed_write {
                    return Ok((out, true));
                }
                closed_write = true;
                let _ = stream.shutdown(std::net::Shutdown::Write);
                stream.set_read_timeout(Some(PATIENCE)).ok();
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok((out, false)),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Whether `response` holds a whole response (head, and a body of its Content-Length or a
/// last chunk); an interim 1xx does not count.
fn complete(response: &[u8]) -> bool {
    let Ok((status, head, body)) = parse(response) else {
        return false;
    };
    if status < 200 {
        return false;
    }
    if let Some(length) = content_length(&head) {
        return body.len() >= length;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

/// The Content-Length of a (lower-cased) response head.
fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// Status code, headers (lower-case) and body of a complete response.
fn parse(mut response: &[u8]) -> Result<(u16, String, Vec<u8>), String> {
    // Interim answers (`100 Continue` to `Expect: 100-continue`) come first: skip them.
    while response.starts_with(b"HTTP/1.1 1") {
        match response.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) if end + 4 < response.len() => response = &response[end + 4..],
            _ => break,
        }
    }
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("response without the end of its head")?;
    let head = std::str::from_utf8(&response[..end]).map_err(|_| "response head not UTF-8")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok((
        status,
        head.to_ascii_lowercase(),
        response[end + 4..].to_vec(),
    ))
}

fn get(socket: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let close = ["Connection: close".to_string()];
    let (bytes, timed_out) = exchange(socket, &request("GET", path, &close, b"", false))?;
    if timed_out {
        return Err(format!(
            "GET {path}: no complete answer within {PATIENCE:?}: meshd wedged"
        ));
    }
    let (status, _, body) = parse(&bytes).map_err(|e| format!("GET {path}: {e}"))?;
    Ok((status, body))
}

fn check(socket: &str, input: &[u8]) -> Result<(), String> {
    let (_, before) = get(socket, "/v1/resources")?;
    let (response, timed_out) = exchange(socket, input)?;
    let mut status = None;
    if !response.is_empty() {
        let (code, head, body) = parse(&response)?;
        status = Some(code);
        let json = head.contains("content-type: application/json");
        // A HEAD answer carries the head only.
        let has_body = !input.starts_with(b"HEAD ");
        let chunked = head.contains("transfer-encoding: chunked");
        if code >= 400 && json && has_body && !timed_out && !chunked {
            // Only the first answer (a body without Content-Length becomes a second request).
            let body = &body[..content_length(&head).unwrap_or(body.len()).min(body.len())];
            let value: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("{code} answer with a bad JSON body: {e}"))?;
            if value["error"].as_str().is_none_or(|s| s.is_empty()) {
                return Err(format!("{code} answer without an error message: {value}"));
            }
        }
    } else if timed_out {
        return Err(format!("no answer and no close within {PATIENCE:?}"));
    }
    let (code, _) = get(socket, "/v1/status")?;
    if code != 200 {
        return Err(format!("GET /v1/status answered {code} afterwards"));
    }
    let (_, after) = get(socket, "/v1/resources")?;
    // A change needs an apply or delete that was accepted, or that was complete when meshd
    // closed the connection unanswered (the client hung up: the submission may still apply,
    // whole).
    let submission =
        input.starts_with(b"POST /v1/apply ") || input.starts_with(b"POST /v1/delete ");
    let accepted_change = submission && status.is_none_or(|s| (200..300).contains(&s));
    if after != before && !accepted_change {
        return Err(format!(
            "the resources changed after a request answered {status:?}:\nbefore {}\nafter  {}",
            String::from_utf8_lossy(&before),
            String::from_utf8_lossy(&after)
        ));
    }
    Ok(())
}

#[test]
fn admin_requests_get_well_formed_answers_and_rejections_change_nothing() {
    let setup = EchoSetup::new(Some([100, 0, 0])).expect("topology");
    let args = meshd_args(&setup.topo, &setup.rules);
    let mut meshd = Meshd::start(&setup.topo.node, &args).expect("meshd");
    let socket = setup.rules.socket();

    let corpus = Corpus::new("admin");
    let yaml_seeds = Corpus::new("config")
        .with_extra(&["config/sandbox", "config/l4-split"], &["yaml"])
        .seeds();
    let strategy = prop_oneof![
        3 => structured(yaml_seeds),
        2 => mutate::mutated(corpus.seeds(), DICTIONARY),
        1 => vec(any::<u8>(), 0..256),
    ];
    let report = fuzz::run(&corpus, Budget::from_env(150), strategy, |input| {
        check(&socket, input)
    });
    assert!(
        meshd
            .wait_for_log("meshd ready", 0, Duration::from_secs(1))
            .is_ok(),
        "meshd exited:\n{}",
        meshd.log()
    );
    report.assert_clean();
}
