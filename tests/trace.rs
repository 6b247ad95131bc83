//! `meshctl trace` end to end: a filtered trace shows exactly the kernel's decisions for one
//! client's connections (as many new flows as the backends accepted, each to the backend that
//! accepted it) and nothing of another client's traffic; with no trace running the kernel
//! reports nothing at all.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    meshd::Meshd,
    observe::{trace_stats, wait_until, TraceRun},
    rules::meshd_args,
    servers::tcp_connect,
    topology::{backend_v4, Topology, CLIENT_V4},
    traffic::{vip, EchoSetup},
};

/// A second client address on the client host: its traffic must never show in the trace.
const OTHER_CLIENT: &str = "198.18.1.3";

/// UDP flows from `OTHER_CLIENT` (fresh source port each).
fn other_client_udp(flows: usize) -> Result<usize> {
    let mut answered = 0;
    for _ in 0..flows {
        let socket = UdpSocket::bind(format!("{OTHER_CLIENT}:0"))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            socket.send_to(b"who", vip(8081))?;
            if socket.recv_from(&mut buf).is_ok() {
                answered += 1;
                break;
            }
        }
    }
    Ok(answered)
}

fn kernel_events(socket: &str) -> Result<u64> {
    trace_stats(socket)?["kernel_events"]
        .as_u64()
        .context("kernel_events")
}

/// Sends `connections` TCP connections and some UDP flows of the other client and checks the
/// kernel reported none of it.
fn assert_quiet(topo: &Topology, socket: &str, connections: usize, when: &str) -> Result<()> {
    let before = kernel_events(socket)?;
    topo.client.run(move || -> Result<()> {
        for _ in 0..connections {
            tcp_connect(vip(8080))?;
        }
        other_client_udp(connections / 3).map(|_| ())
    })??;
    let after = kernel_events(socket)?;
    ensure!(
        after == before,
        "the kernel reported {} events {when}",
        after - before
    );
    Ok(())
}

#[test]
fn a_filtered_trace_shows_exactly_one_clients_decisions() -> Result<()> {
    let setup = EchoSetup::new(Some([50, 30, 20]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    topo.client
        .ip(&["addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", "eth0"])?;
    let meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();

    // Tracing off: traffic of both kinds, and the kernel reports nothing.
    assert_quiet(topo, &socket, 50, "with tracing off")?;
    let off_after = kernel_events(&socket)?;

    // Traced: the client's TCP connections, while the other client sends UDP flows.
    let trace = TraceRun::start(&socket, &["--client", CLIENT_V4])?;
    let accepted_before: Vec<u64> = setup.servers.iter().map(|s| s.served()).collect();
    const CONNECTIONS: usize = 120;
    let (seen, ports) = topo
        .client
        .run(|| -> Result<(BTreeMap<String, usize>, Vec<u16>)> {
            let mut seen = BTreeMap::new();
            let mut ports = Vec::new();
            for i in 0..CONNECTIONS {
                let (stream, identity) = tcp_connect(vip(8080))?;
                ports.push(stream.local_addr()?.port());
                *seen.entry(identity).or_insert(0) += 1;
                if i % 4 == 0 {
                    other_client_udp(1)?;
                }
            }
            Ok((seen, ports))
        })??;
    // What each backend accepted on the TCP port during the traced run (servers are
    // [tcp 8080, udp 8081, tcp 9000] per backend).
    let accepted: BTreeMap<String, u64> = (0..3)
        .map(|b| {
            let i = 3 * b;
            (
                format!("v{}", b + 1),
                setup.servers[i].served() - accepted_before[i],
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();

    // Everything the kernel reported reaches the trace (one subscriber: the kernel filter is
    // exactly this client, so every kernel event is one of its packets).
    wait_until(
        Duration::from_secs(20),
        "all kernel events in the trace",
        || {
            let stats = trace_stats(&socket)?;
            let reported = stats["kernel_events"].as_u64().unwrap_or(0) - off_after;
            Ok(reported > 0 && trace.len() as u64 == reported)
        },
    )?;
    let stats = trace_stats(&socket)?;
    ensure!(stats["dropped"] == 0, "events dropped: {stats}");
    let events = trace.events();

    // Nothing but this client.
    for e in &events {
        let client: SocketAddr = e["client"].as_str().context("client")?.parse()?;
        ensure!(
            client.ip().to_string() == CLIENT_V4,
            "event of another client: {e}"
        );
        // Whichever entry meshd attached on these veths (XDP or TC) says so.
        ensure!(e["hook"] == "xdp" || e["hook"] == "tc", "hook: {e}");
    }
    // One new-flow decision per connection, on the connection's own port, to the backend that
    // accepted it; as many per backend as each backend accepted.
    let new_flows: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "new").collect();
    ensure!(
        new_flows.len() == CONNECTIONS,
        "{} new-flow events for {CONNECTIONS} connections",
        new_flows.len()
    );
    let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
    for e in &new_flows {
        let client: SocketAddr = e["client"].as_str().context("client")?.parse()?;
        ensure!(ports.contains(&client.port()), "unknown client port: {e}");
        ensure!(
            e["flags"] == "SYN",
            "a new flow starts with a bare SYN: {e}"
        );
        ensure!(
            e["slot"].as_u64().is_some(),
            "new flow without a Maglev slot: {e}"
        );
        let backend: SocketAddr = e["backend"].as_str().context("backend")?.parse()?;
        let subset = e["subset"].as_str().context("subset")?;
        let n: usize = subset.trim_start_matches('v').parse()?;
        ensure!(
            backend.ip() == backend_v4(n),
            "subset {subset} but backend {backend}"
        );
        *by_backend.entry(subset.to_string()).or_insert(0) += 1;
    }
    ensure!(
        by_backend == accepted,
        "trace says {by_backend:?}, the backends accepted {accepted:?}"
    );
    let seen: BTreeMap<String, u64> = seen.into_iter().map(|(k, v)| (k, v as u64)).collect();
    ensure!(
        by_backend == seen,
        "trace says {by_backend:?}, the client saw {seen:?}"
    );
    // Replies were traced too (the identity line each backend sent back).
    ensure!(
        events.iter().any(|e| e["kind"] == "reply"),
        "no reply events"
    );
    println!(
        "{} events for {CONNECTIONS} connections: {by_backend:?}",
        events.len()
    );

    // The trace ends with meshctl: the kernel goes quiet again.
    drop(trace);
    wait_until(Duration::from_secs(10), "the trace to end", || {
        Ok(trace_stats(&socket)?["subscribers"] == 0)
    })?;
    assert_quiet(topo, &socket, 30, "after the trace ended")?;
    drop(meshd);
    Ok(())
}
