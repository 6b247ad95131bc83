//! Abusive clients against the L7 proxy, with a normal client asserting it keeps getting
//! answers: 1000 slowloris connections, a slow request body, a client that stops reading, a
//! flood of connections past the connection cap, and 10 000 idle HTTP/2 streams (h2 crate
//! client). meshd runs with short timeouts (`--proxy-stream-idle-timeout 2s`,
//! `--proxy-idle-timeout 3s`) so the tests stay short; every wait is bounded.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::l7::{vip, Setup, HOST};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ROUTE: &str = "  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.mesh.test, subset: v1}}]
";

fn setup(max_connections: usize) -> Result<Setup> {
    let cap = max_connections.to_string();
    Setup::with_args(
        1,
        "",
        ROUTE,
        &[
            "--proxy-stream-idle-timeout",
            "2s",
            "--proxy-idle-timeout",
            "3s",
            "--proxy-max-connections",
            &cap,
        ],
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `count` GETs, each on a new connection; how many were answered 200 by the backend (what
/// went wrong with the others is printed). The 60-s bound is a safety net, not a latency
/// assertion: this machine may be busy.
async fn good_requests(count: usize) -> usize {
    let mut ok = 0;
    for n in 0..count {
        let answered = tokio::time::timeout(Duration::from_secs(60), async {
            let mut s = TcpStream::connect(vip())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.write_all(
                format!("GET /good HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| format!("send: {e}"))?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply)
                .await
                .map_err(|e| format!("read: {e}"))?;
            Ok::<_, String>(String::from_utf8_lossy(&reply).to_string())
        })
        .await;
        match answered {
            Ok(Ok(reply)) if reply.starts_with("HTTP/1.1 200") && reply.contains("identity=v1") => {
                ok += 1
            }
            Ok(Ok(reply)) => eprintln!("good request {n}: answered {reply:?}"),
            Ok(Err(e)) => eprintln!("good request {n}: {e}"),
            Err(_) => eprintln!("good request {n}: no answer within 60 s"),
        }
    }
    ok
}

/// Reads until the peer closes (or `limit`); the bytes read and whether it closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (all, true),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => return (all, false),
        }
    }
}

#[test]
fn slowloris_slow_body_slow_reader_and_a_connection_flood_leave_others_served() -> Result<()> {
    let setup = setup(1200)?;
    let outcome = setup.client(|| {
        runtime()?.block_on(async {
            // 1000 slowloris connections: a head that never ends, one header line per second.
            let mut slow = Vec::new();
            for _ in 0..1000 {
                let mut s = TcpStream::connect(vip()).await.context("slowloris connect")?;
                s.write_all(format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n").as_bytes())
                    .await?;
                slow.push(s);
            }
            let dripping = tokio::spawn(async move {
                let mut closed = 0usize;
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    closed = 0;
                    for s in slow.iter_mut() {
                        if s.write_all(b"x-drip: 1\r\n").await.is_err() {
                            closed += 1;
                        }
                    }
                }
                (slow, closed)
            });
            // Meanwhile a normal client is served.
            let good_during_slowloris = good_requests(20).await;
            // Past the cap (1200): the 1000 slowloris connections count until the proxy closes
            // them; 300 more connections and some are answered 503.
            let mut extra = Vec::new();
            for _ in 0..300 {
                if let Ok(s) = TcpStream::connect(vip()).await {
                    extra.push(s);
                }
            }
            let checks: Vec<_> = extra
                .into_iter()
                .map(|mut s| {
                    tokio::spawn(async move {
                        let (reply, closed) = read_until_closed(&mut s, Duration::from_secs(1)).await;
                        closed && reply.starts_with(b"HTTP/1.1 503")
                    })
                })
                .collect();
            let mut refused = 0;
            for check in checks {
                refused += usize::from(check.await.unwrap_or(false));
            }

            // A request body that stops after 10 of 1000 bytes: 408 after the stream idle
            // timeout.
            let mut body = TcpStream::connect(vip()).await?;
            body.write_all(
                format!("POST /upload HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 1000\r\n\r\n0123456789")
                    .as_bytes(),
            )
            .await?;
            let (reply, _) = read_until_closed(&mut body, Duration::from_secs(20)).await;
            let slow_body = String::from_utf8_lossy(&reply).lines().next().unwrap_or("").to_string();

            // A client that sends 20 000 pipelined requests and reads nothing, with a tiny
            // receive buffer: the proxy's writes stall and it closes the connection.
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(4096)?;
            let mut reader = socket.connect(vip()).await?;
            let request = format!("GET /pipelined HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
            let burst = request.repeat(20_000);
            // The proxy stops reading once its writes stall: this write may block too.
            let _ = tokio::time::timeout(Duration::from_secs(5), reader.write_all(burst.as_bytes()))
                .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let (got, reader_closed) = read_until_closed(&mut reader, Duration::from_secs(30)).await;
            let answered = String::from_utf8_lossy(&got).matches("HTTP/1.1 200").count();

            let (slow, slowloris_closed) = dripping.await?;
            drop(slow);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let good_after = good_requests(20).await;
            anyhow::Ok((
                good_during_slowloris,
                slow_body,
                answered,
                reader_closed,
                slowloris_closed,
                refused,
                good_after,
            ))
        })
    })?;
    let (good_during, slow_body, answered, reader_closed, slowloris_closed, refused, good_after) =
        outcome;
    eprintln!(
        "good during slowloris {good_during}/20, slow body {slow_body:?}, slow reader got \
         {answered}/20000 answers (closed: {reader_closed}), slowloris closed by the proxy \
         {slowloris_closed}/1000, refused over the cap {refused}/300, good after {good_after}/20"
    );
    ensure!(
        good_during == 20,
        "normal client during slowloris: {good_during}/20 answered"
    );
    ensure!(
        slow_body.contains(" 408 "),
        "slow body answered {slow_body:?}"
    );
    ensure!(
        reader_closed && answered < 20_000,
        "slow reader: closed {reader_closed}, {answered} answers"
    );
    ensure!(refused > 0, "no connection over the cap was answered 503");
    ensure!(
        good_after == 20,
        "normal client afterwards: {good_after}/20 answered"
    );
    Ok(())
}

#[test]
fn ten_thousand_idle_http2_streams_and_idle_connections_leave_others_served() -> Result<()> {
    let setup = setup(20_000)?;
    let outcome = setup.client(|| {
        runtime()?.block_on(async {
            // 40 h2c connections with 250 streams each, every stream a POST whose body never
            // comes.
            let mut held = Vec::new();
            let mut opened = 0usize;
            for _ in 0..40 {
                let tcp = TcpStream::connect(vip()).await?;
                let (client, connection) = h2::client::handshake(tcp).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let mut client = client.ready().await?;
                for _ in 0..250 {
                    let request = http::Request::post(format!("http://{HOST}/idle"))
                        .body(())
                        .expect("request");
                    match client.send_request(request, false) {
                        Ok((response, body)) => {
                            opened += 1;
                            held.push((response, body));
                        }
                        Err(_) => break,
                    }
                    client = client.ready().await?;
                }
                // The stream handles keep the streams (and the connection) open.
                drop(client);
            }
            let good = good_requests(20).await;
            // An HTTP/2 connection with nothing in flight is closed after the idle timeout.
            let tcp = TcpStream::connect(vip()).await?;
            let (idle_client, connection) = h2::client::handshake(tcp).await?;
            let started = Instant::now();
            let idle_closed = tokio::time::timeout(Duration::from_secs(20), connection)
                .await
                .is_ok();
            drop(idle_client);
            let idle_after = started.elapsed();
            drop(held);
            let good_after = good_requests(20).await;
            anyhow::Ok((opened, good, idle_closed, idle_after, good_after))
        })
    })?;
    let (opened, good, idle_closed, idle_after, good_after) = outcome;
    eprintln!(
        "idle streams opened {opened}, good {good}/20, idle h2 connection closed {idle_closed} \
         after {idle_after:?}, good after {good_after}/20"
    );
    ensure!(opened == 10_000, "only {opened} streams opened");
    ensure!(
        good == 20,
        "normal client with 10 000 idle streams: {good}/20 answered"
    );
    ensure!(idle_closed, "an idle HTTP/2 connection stayed open");
    ensure!(
        good_after == 20,
        "normal client afterwards: {good_after}/20 answered"
    );
    Ok(())
}
