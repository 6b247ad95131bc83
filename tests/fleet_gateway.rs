//! The fleet's gateway tier: three meshd nodes sharing rules through a real etcd cluster, behind a
//! router namespace that spreads connections to the service addresses over them by ECMP (a
//! 5-tuple hash). Long-lived connections are open through every node when
//! one node's namespace disappears (meshd, links and all); then every connection is asked for an
//! echo on the same socket.
//!
//! The backends route replies through the tier by a connection mark set from the forwarding
//! node's MAC (see `support/gateway_tier.rs`), in two ways side by side, chosen per port:
//! - ports 8080 and 8082: replies go to the node that forwarded the *latest* packet;
//! - port 8081: replies go to the node that forwarded the *first* packet.
//!
//! Ports 8080 and 8081 are one service behind the router's plain (hash-threshold) nexthop group;
//! port 8082 is a second service address behind a resilient group over the same nodes.
//!
//! What is asserted: every connection that went through a surviving node keeps echoing on its
//! backend (also those the router's rehash moved to the other surviving node; behind the
//! resilient group none moves), and with replies following the latest node so do the lost
//! node's connections (another node picks the same backend from the same rules and rebuilds the
//! flow's state from its packets). What the lost
//! node's connections do when replies stick to the first node is measured and reported. The
//! figures go to `target/figures/fleet-gateway.md` (and docs/fleet.md with `MESH_UPDATE_DOCS=1`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    figures,
    fleet::{backend_endpoints, backend_ip, node_lan_ip, wait_for, Fleet, SIZE},
    gateway_tier::{
        node_per_connection, route_replies_through_nodes, GatewayTier, ReturnPath, CLIENT,
    },
    meshd::meshctl_stdin,
    rules::{echo_split, service_entry, ECHO_SUBSETS},
    servers::{tcp_connect, tcp_echo, tcp_server, Server},
    split::{assert_shares, assert_weights},
};
use serde_json::Value;

const VIP: &str = "198.18.100.1";
/// Replies through the node that forwarded the latest packet.
const FOLLOW: u16 = 8080;
/// Replies through the node that forwarded the first packet.
const STICKY: u16 = 8081;
/// The service behind the router's resilient nexthop group (replies follow the latest node).
const VIP_RESILIENT: &str = "198.18.100.2";
/// Its port.
const RESILIENT: u16 = 8082;
/// Connections opened per port before the failure.
const PER_PORT: usize = 120;
/// Connections opened after the failure.
const AFTER: usize = 60;
const WEIGHTS: [u32; 3] = [50, 30, 20];
/// The node that disappears.
const LOST: usize = 3;

/// One long-lived connection through the tier.
struct Conn {
    stream: TcpStream,
    sport: u16,
    dport: u16,
    backend: String,
    /// The node the backend saw it through before the failure.
    node_before: usize,
    /// The node the router picks for it after the failure.
    node_after: usize,
    /// Whether it echoed in each round after the failure (see [`ROUNDS`]).
    survived: Vec<bool>,
}

/// When the connections are asked for an echo after the failure.
const ROUNDS: [&str; 2] = [
    "right after the loss",
    "after the backends' neighbour entry for the lost node expired",
];

fn rules() -> String {
    let se = service_entry(
        "v1",
        "echo",
        VIP,
        &[
            &format!("{{number: {FOLLOW}, name: tcp-follow, protocol: TCP}}"),
            &format!("{{number: {STICKY}, name: tcp-sticky, protocol: TCP}}"),
        ],
        &backend_endpoints(),
    );
    let resilient = service_entry(
        "v1",
        "echo-resilient",
        VIP_RESILIENT,
        &[&format!(
            "{{number: {RESILIENT}, name: tcp-resilient, protocol: TCP}}"
        )],
        &backend_endpoints(),
    );
    format!(
        "{se}---\n{resilient}---\n{ECHO_SUBSETS}---\n{}",
        echo_split(WEIGHTS)
    )
}

fn applied(fleet: &Fleet, i: usize) -> Result<Option<i64>> {
    let out = fleet.node(i).meshctl_ok(&["status", "-o", "json"])?;
    let status: Value = serde_json::from_str(&out)?;
    Ok(status["fleet"]["applied_revision"].as_i64())
}

/// (client port, backend port) -> (backend identity, node) for every connection the backends
/// track from the client.
fn seen_by_backends(fleet: &Fleet) -> Result<BTreeMap<(u16, u16), (String, usize)>> {
    let mut seen = BTreeMap::new();
    for (index, ns) in fleet.backends.iter().enumerate() {
        for (key, node) in node_per_connection(ns, CLIENT)? {
            seen.insert(key, (format!("v{}", index + 1), node));
        }
    }
    Ok(seen)
}

/// The service address of `port`: the resilient group's own, or the plain group's.
fn vip_of(port: u16) -> &'static str {
    if port == RESILIENT {
        VIP_RESILIENT
    } else {
        VIP
    }
}

/// Opens `count` connections to `port` of its service from the client behind the router.
fn open(tier: &GatewayTier, port: u16, count: usize) -> Result<Vec<(TcpStream, String)>> {
    let target: SocketAddr = format!("{}:{port}", vip_of(port)).parse()?;
    tier.client
        .run(move || (0..count).map(|_| tcp_connect(target)).collect())?
}

fn shares(values: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_insert(0) += 1;
    }
    counts
}

/// Sends one payload on every connection still alive, then reads every echo until one shared
/// deadline; records the outcome of round `round`.
fn echo_all(conns: &mut [Conn], round: usize, wait: Duration) {
    let payloads: Vec<Vec<u8>> = (0..conns.len())
        .map(|k| format!("round {round} after the failure {k}\n").into_bytes())
        .collect();
    let sent: Vec<bool> = conns
        .iter_mut()
        .zip(&payloads)
        .map(|(c, p)| c.survived.iter().all(|ok| *ok) && c.stream.write_all(p).is_ok())
        .collect();
    let deadline = Instant::now() + mesh_tests::patience(wait);
    for ((conn, payload), sent) in conns.iter_mut().zip(&payloads).zip(sent) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut back = vec![0u8; payload.len()];
        let echoed = sent
            && conn.stream.set_read_timeout(Some(left)).is_ok()
            && conn.stream.read_exact(&mut back).is_ok()
            && &back == payload;
        conn.survived.push(echoed);
    }
}

#[test]
fn gateway_tier_keeps_connections_when_a_node_disappears() -> Result<()> {
    let mut fleet = Fleet::build()?;
    let tier = GatewayTier::build(&mut fleet, VIP)?;
    route_replies_through_nodes(
        &fleet,
        &[
            (FOLLOW, ReturnPath::LastNode),
            (STICKY, ReturnPath::FirstNode),
            (RESILIENT, ReturnPath::LastNode),
        ],
    )?;
    tier.route_resilient(VIP_RESILIENT, SIZE)?;
    let mut servers: Vec<Server> = Vec::new();
    for (index, ns) in fleet.backends.iter().enumerate() {
        for port in [FOLLOW, STICKY, RESILIENT] {
            let addr: SocketAddr = format!("{}:{port}", backend_ip(index + 1)).parse()?;
            servers.push(tcp_server(ns, addr, &format!("v{}", index + 1))?);
        }
    }
    for i in 1..=SIZE {
        fleet.start_meshd(i)?;
    }
    let (ok, out, err) = meshctl_stdin(&fleet.node(1).socket(), &["apply", "-f", "-"], &rules())?;
    ensure!(ok, "apply on n1 failed: {err}{out}");
    let revision = applied(&fleet, 1)?.context("n1 applied no fleet revision")?;
    wait_for(
        "every node applying the rules",
        Duration::from_secs(20),
        || {
            for i in 2..=SIZE {
                if applied(&fleet, i)? != Some(revision) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;

    // --- Long-lived connections through every node; who carries each, seen by the backends.
    let mut opened = Vec::new();
    for port in [FOLLOW, STICKY, RESILIENT] {
        let conns = open(&tier, port, PER_PORT)?;
        // The resilient service has no VirtualService: every endpoint weighs the same.
        let weights: &[u32] = if port == RESILIENT {
            &[1, 1, 1]
        } else {
            &WEIGHTS
        };
        assert_weights(&shares(conns.iter().map(|(_, id)| id.clone())), weights)
            .with_context(|| format!("backends of port {port}"))?;
        for (mut stream, backend) in conns {
            tcp_echo(&mut stream, b"before the failure\n")?;
            let sport = stream.local_addr()?.port();
            opened.push((stream, sport, port, backend));
        }
    }
    let seen = seen_by_backends(&fleet)?;
    let mut conns = Vec::new();
    for (stream, sport, dport, backend) in opened {
        let (tracked_by, node) = seen
            .get(&(sport, dport))
            .with_context(|| format!("no backend tracks client port {sport} -> {dport}"))?
            .clone();
        ensure!(
            tracked_by == backend && node != 0,
            "client port {sport}: answered by {backend}, tracked by {tracked_by} through node {node}"
        );
        let routed = tier.node_for(vip_of(dport), sport, dport)?;
        ensure!(
            routed == node,
            "client port {sport}: the router's lookup says n{routed}, the packets came via n{node}"
        );
        conns.push(Conn {
            stream,
            sport,
            dport,
            backend,
            node_before: node,
            node_after: 0,
            survived: Vec::new(),
        });
    }
    let per_node = shares(conns.iter().map(|c| format!("n{}", c.node_before)));
    let third = 1.0 / SIZE as f64;
    assert_shares(&per_node, &[("n1", third), ("n2", third), ("n3", third)])
        .context("ECMP spread over the nodes")?;

    // --- Node 3 disappears: meshd, its namespace and its links.
    let lost = fleet.nodes.remove(LOST - 1);
    drop(lost);
    wait_for(
        "the router dropping the lost node's nexthop",
        Duration::from_secs(20),
        || Ok((tier.nodes_in_group()? == [1, 2]).then_some(())),
    )?;
    for conn in &mut conns {
        conn.node_after = tier.node_for(vip_of(conn.dport), conn.sport, conn.dport)?;
        ensure!(
            conn.node_after != LOST,
            "port {}: the router still sends client port {} to the lost node",
            conn.dport,
            conn.sport
        );
    }
    echo_all(&mut conns, 0, Duration::from_secs(8));
    // Until then the backends still address the lost node's MAC; the bridge, no longer knowing
    // it, floods those frames to every node, and a node holding the flow translates them.
    // Neighbour entries of a silent node expire (tens of seconds): expire them now.
    for ns in &fleet.backends {
        ns.ip(&["neigh", "flush", "to", &node_lan_ip(LOST)])?;
    }
    echo_all(&mut conns, 1, Duration::from_secs(8));

    // Replies following the latest node: the backends' marks show the router's new choice.
    let seen = seen_by_backends(&fleet)?;
    for conn in conns
        .iter()
        .filter(|c| c.dport != STICKY && c.survived.iter().all(|ok| *ok))
    {
        let now = seen.get(&(conn.sport, conn.dport)).map(|(_, n)| *n);
        ensure!(
            now == Some(conn.node_after),
            "client port {}: the router sends it to n{}, the backend saw n{now:?}",
            conn.sport,
            conn.node_after
        );
    }

    // --- New connections after the failure reach the two surviving nodes and every backend.
    let fresh = open(&tier, FOLLOW, AFTER)?;
    let seen = seen_by_backends(&fleet)?;
    let mut fresh_nodes = BTreeMap::new();
    for (stream, backend) in &fresh {
        let sport = stream.local_addr()?.port();
        let (tracked_by, node) = seen
            .get(&(sport, FOLLOW))
            .with_context(|| format!("no backend tracks new client port {sport}"))?;
        ensure!(
            tracked_by == backend,
            "new port {sport}: {backend} vs {tracked_by}"
        );
        *fresh_nodes.entry(format!("n{node}")).or_insert(0) += 1;
    }
    assert_shares(&fresh_nodes, &[("n1", 0.5), ("n2", 0.5)]).context("new connections")?;

    let report = report(&conns, &per_node, &fresh_nodes);
    println!("{report}");
    let file = figures::publish("docs/fleet.md", "fleet-gateway", &report)?;
    println!("(written to {})", file.display());

    // --- What must hold.
    for conn in &conns {
        let through_survivor = conn.node_before != LOST;
        let survived = conn.survived.iter().all(|ok| *ok);
        ensure!(
            !through_survivor || survived,
            "port {} client port {} through surviving n{} (now n{}) to {} stopped echoing",
            conn.dport,
            conn.sport,
            conn.node_before,
            conn.node_after,
            conn.backend
        );
        ensure!(
            conn.dport == STICKY || survived,
            "port {}: client port {} of the lost node (now n{}, backend {}) stopped \
             echoing although replies follow the latest node",
            conn.dport,
            conn.sport,
            conn.node_after,
            conn.backend
        );
        ensure!(
            conn.dport != RESILIENT || !through_survivor || conn.node_after == conn.node_before,
            "resilient group: client port {} moved from surviving n{} to n{}",
            conn.sport,
            conn.node_before,
            conn.node_after
        );
    }
    drop(servers);
    Ok(())
}

/// The measured outcome as a Markdown block for docs/fleet.md.
fn report(
    conns: &[Conn],
    per_node: &BTreeMap<String, usize>,
    fresh: &BTreeMap<String, usize>,
) -> String {
    let mut out = format!(
        "Measured by `tests/fleet_gateway.rs` (three nodes behind a router hashing the 5-tuple over a \
         plain (hash-threshold) or resilient nexthop group; \
         {} long-lived connections, node n{LOST} removed with its namespace):\n\n\
         ECMP spread before the failure: {}.\n\n\
         | router's nexthop group; backends send replies to | asked | via surviving nodes: echoing | of them moved by the router's rehash: echoing | via the lost node: echoing |\n\
         |---|---|---|---|---|\n",
        conns.len(),
        per_node
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (port, what) in [
        (
            FOLLOW,
            "plain group; replies to the node of the latest packet",
        ),
        (
            STICKY,
            "plain group; replies to the node of the first packet",
        ),
        (
            RESILIENT,
            "resilient group; replies to the node of the latest packet",
        ),
    ] {
        let mine: Vec<&Conn> = conns.iter().filter(|c| c.dport == port).collect();
        for (round, when) in ROUNDS.iter().enumerate() {
            let count = |f: &dyn Fn(&Conn) -> bool| {
                let all: Vec<&&Conn> = mine.iter().filter(|c| f(c)).collect();
                let ok = all.iter().filter(|c| c.survived[round]).count();
                format!("{ok} of {}", all.len())
            };
            out.push_str(&format!(
                "| {what} (port {port}) | {when} | {} | {} | {} |\n",
                count(&|c| c.node_before != LOST),
                count(&|c| c.node_before != LOST && c.node_after != c.node_before),
                count(&|c| c.node_before == LOST),
            ));
        }
    }
    out.push_str(&format!(
        "\nNew connections after the failure: {}.\n",
        fresh
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}
