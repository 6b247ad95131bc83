//! Floods against the connection table: spoofed SYNs, ACKs and UDP datagrams from random
//! sources, many times the table's capacity, with weight changes during and after the flood.
//! Established connections must keep their backend (never re-balanced because a flood evicted
//! their entry), and new connections must follow the weights in force.

use std::net::Ipv4Addr;

use anyhow::{ensure, Result};
use mesh_tests::{
    flood::{conntrack_event, spoof},
    meshd::{scrape_metrics, Meshd},
    rules::{echo_split, meshd_args, VIP_V4},
    servers::{tcp_connect, tcp_echo},
    traffic::{tcp_split, vip, EchoSetup},
};

/// Established-flow capacity given to meshd: 500 connections fit (two entries each), the flood
/// is 30 times larger.
const CONNTRACK_FLOWS: u32 = 2048;
/// Spoofed packets per flood round (two rounds).
const FLOOD_PACKETS: u32 = 30_000;
const ESTABLISHED: usize = 500;

#[test]
fn established_connections_survive_a_spoofed_flood_and_weight_changes() -> Result<()> {
    let setup = EchoSetup::new(Some([100, 0, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let mut args = meshd_args(topo, rules);
    args.extend(["--conntrack-entries".into(), CONNTRACK_FLOWS.to_string()]);
    let mut meshd = Meshd::start(&topo.node, &args)?;

    let mut streams = topo.client.run(|| -> Result<Vec<_>> {
        (0..ESTABLISHED).map(|_| tcp_connect(vip(8080))).collect()
    })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("before the flood {n}").as_bytes())?;
    }

    // Round 1 of the flood, then a weight change while round 2 runs.
    flood(topo, 1)?;
    std::thread::scope(|scope| -> Result<()> {
        let round2 = scope.spawn(|| flood(topo, 2));
        rules.write("vs.yaml", &echo_split([0, 100, 0]))?;
        ensure!(
            meshd.reload()?.contains("rules reloaded"),
            "{}",
            meshd.log()
        );
        round2
            .join()
            .map_err(|_| anyhow::anyhow!("flooder panicked"))?
    })?;
    // And another change after the flood.
    rules.write("vs.yaml", &echo_split([0, 0, 100]))?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "{}",
        meshd.log()
    );

    // Every established connection still echoes, on its own stream to v1.
    let mut broken = Vec::new();
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        if let Err(e) = tcp_echo(stream, format!("after the flood {n}").as_bytes()) {
            broken.push(format!("{n}: {e:#}"));
        }
    }
    ensure!(
        broken.is_empty(),
        "{} of {ESTABLISHED} established connections broke: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
    let served_v1 = setup.servers[0].served();
    // New connections follow the weights in force now.
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(
        seen.len() == 1 && seen.get("v3") == Some(&200),
        "new connections after the flood: {seen:?}"
    );
    ensure!(
        setup.servers[0].served() == served_v1,
        "v1 accepted new connections after its weight went to 0"
    );

    // The pressure is visible: far more pending flows than the table holds, the established
    // ones confirmed.
    let text = scrape_metrics(&topo.node)?;
    let event = |name: &str| conntrack_event(&text, name);
    ensure!(
        event("pending") >= u64::from(FLOOD_PACKETS) && event("confirmed") >= ESTABLISHED as u64,
        "conntrack events: pending {} confirmed {}\n{text}",
        event("pending"),
        event("confirmed")
    );
    ensure!(
        text.contains("mesh_conntrack_pending_turnover"),
        "no pressure gauge:\n{text}"
    );
    Ok(())
}

/// One flood round from the client namespace.
fn flood(topo: &mesh_tests::topology::Topology, round: u32) -> Result<()> {
    let vip: Ipv4Addr = VIP_V4.parse()?;
    let sent = topo
        .client
        .run(move || spoof(vip, 8080, 8081, FLOOD_PACKETS, round))??;
    ensure!(sent == FLOOD_PACKETS, "only {sent} flood packets sent");
    Ok(())
}
