//! Traffic for tests: identity servers on every backend, and client loops that count which
//! backend answered.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Result;

use crate::{
    netns::Netns,
    rules::VIP_V4,
    servers::{tcp_connect, tcp_server, udp_ask, udp_server, Server},
    topology::{backend_v4, backend_v6, Topology},
};

/// TCP and UDP identity servers on every backend (identities `v1`, `v2`, ...).
pub fn start_backends(topo: &Topology, v6: bool) -> Result<Vec<Server>> {
    let mut servers = Vec::new();
    for (index, ns) in topo.backends.iter().enumerate() {
        let i = index + 1;
        let ip = if v6 { backend_v6(i) } else { backend_v4(i) };
        servers.push(tcp_server(ns, SocketAddr::new(ip, 8080), &format!("v{i}"))?);
        servers.push(udp_server(ns, SocketAddr::new(ip, 8081), &format!("v{i}"))?);
        servers.push(tcp_server(ns, SocketAddr::new(ip, 9000), &format!("v{i}"))?);
    }
    Ok(servers)
}

/// Opens `count` TCP connections from the client, one after another; counts who answered.
pub fn tcp_split(
    client: &Netns,
    target: SocketAddr,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    client.run(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for _ in 0..count {
            let (_stream, identity) = tcp_connect(target)?;
            *seen.entry(identity).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

/// Sends `count` UDP flows (fresh source port each); counts who answered.
pub fn udp_split(
    client: &Netns,
    target: SocketAddr,
    count: usize,
) -> Result<BTreeMap<String, usize>> {
    client.run(move || -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for _ in 0..count {
            *seen.entry(udp_ask(target)?).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

/// The `echo` IPv4 VIP at `port`.
pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP_V4.parse().expect("ip"), port)
}

/// The standard `echo` setup: three backends running identity servers, the `echo`
/// ServiceEntry and its v1..v3 subsets written to a rules directory, and optionally a
/// VirtualService splitting it by `weights`. Start meshd on it after building this, so meshd
/// stops first when the test ends.
pub struct EchoSetup {
    /// Identity servers (dropped first).
    pub servers: Vec<Server>,
    /// The rules directory meshd reads.
    pub rules: crate::rules::RulesDir,
    /// Client, node and backends.
    pub topo: Topology,
}

impl EchoSetup {
    /// Builds the setup; `weights` adds a VirtualService with that v1/v2/v3 split.
    pub fn new(weights: Option<[u32; 3]>) -> Result<Self> {
        use crate::rules::{echo_service_entry, echo_split, RulesDir, ECHO_SUBSETS};
        let topo = Topology::build(3)?;
        let servers = start_backends(&topo, false)?;
        let rules = RulesDir::new(&topo)?;
        rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
        rules.write("dr.yaml", ECHO_SUBSETS)?;
        if let Some(weights) = weights {
            rules.write("vs.yaml", &echo_split(weights))?;
        }
        Ok(EchoSetup {
            servers,
            rules,
            topo,
        })
    }
}
