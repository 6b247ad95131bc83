//! The soak's flood phase, after the mixed load: established L4 connections, then spoofed SYNs,
//! ACKs and datagrams from random sources (the flood test's generator,
//! `mesh_tests::flood::spoof`) that overflow the connection table many times, with a weight
//! change during the flood and another after it. Afterwards every established connection must
//! still echo on its backend and new connections must follow the weights in force.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use mesh_tests::{
    flood::{conntrack_event, spoof},
    meshd::scrape_metrics,
    rules::VIP_V4,
    servers::{tcp_connect, tcp_echo},
    traffic::{tcp_split, vip},
};

use crate::setup::{Node, CONNTRACK_ENTRIES};

/// Connections established before the flood.
pub const ESTABLISHED: usize = 300;
/// Spoofed packets per round (two rounds).
pub const PACKETS: u32 = 30_000;

/// What the flood phase measured.
#[derive(Debug, Default)]
pub struct FloodFigures {
    pub established: usize,
    pub spoofed_sent: u32,
    pub broken: Vec<String>,
    /// Who answered new connections after the last change (all weight on v3).
    pub new_after: BTreeMap<String, usize>,
    pub pending_events: u64,
    pub confirmed_events: u64,
    pub rebuilt_events: u64,
}

/// Runs the phase against the running meshd.
pub fn run(node: &Node) -> Result<FloodFigures> {
    let topo = &node.topo;
    node.apply_weights([100, 0, 0])?;
    let mut streams = topo
        .client
        .run(|| -> Result<Vec<_>> { (0..ESTABLISHED).map(|_| tcp_connect(vip(8080))).collect() })?
        .context("establishing the connections")?;
    for (n, (s, _)) in streams.iter_mut().enumerate() {
        tcp_echo(s, format!("before {n}").as_bytes())?;
    }
    let target: Ipv4Addr = VIP_V4.parse()?;
    let mut sent = topo
        .client
        .run(move || spoof(target, 8080, 8081, PACKETS, 1))??;
    let during = std::thread::scope(|scope| -> Result<u32> {
        let round2 = scope.spawn(|| {
            topo.client
                .run(move || spoof(target, 8080, 8081, PACKETS, 2))
        });
        node.apply_weights([0, 100, 0])?;
        round2
            .join()
            .map_err(|_| anyhow::anyhow!("flooder panicked"))??
    })?;
    sent += during;
    node.apply_weights([0, 0, 100])?;
    let mut broken = Vec::new();
    for (n, (s, _)) in streams.iter_mut().enumerate() {
        if let Err(e) = tcp_echo(s, format!("after {n}").as_bytes()) {
            broken.push(format!("{n}: {e:#}"));
        }
    }
    let new_after = tcp_split(&topo.client, vip(8080), 200)?;
    let text = scrape_metrics(&topo.node)?;
    let event = |name: &str| conntrack_event(&text, name);
    Ok(FloodFigures {
        established: streams.len(),
        spoofed_sent: sent,
        broken,
        new_after,
        pending_events: event("pending"),
        confirmed_events: event("confirmed"),
        rebuilt_events: event("rebuilt"),
    })
}

/// The table rows of the phase for the report.
pub fn rows(f: &FloodFigures) -> Vec<(String, String)> {
    vec![
        (
            "connection-table capacity (--conntrack-entries)".into(),
            CONNTRACK_ENTRIES.to_string(),
        ),
        (
            "established connections before the flood".into(),
            f.established.to_string(),
        ),
        (
            "spoofed packets sent (SYN, ACK, UDP from random sources)".into(),
            f.spoofed_sent.to_string(),
        ),
        (
            "weight changes during / after the flood".into(),
            "1 / 1".into(),
        ),
        (
            "established connections still echoing afterwards".into(),
            format!("{} of {}", f.established - f.broken.len(), f.established),
        ),
        (
            "new connections after the change (all weight on v3)".into(),
            format!("{:?}", f.new_after),
        ),
        (
            "conntrack events pending / confirmed / rebuilt".into(),
            format!(
                "{} / {} / {}",
                f.pending_events, f.confirmed_events, f.rebuilt_events
            ),
        ),
    ]
}
