//! The standard test topology: a client, a node running meshd, and backends, each its own
//! network namespace, the node routing between them.
//!
//! ```text
//!  client eth0 198.18.1.2 ── c0 198.18.1.1  node  b<i> 198.18.<1+i>.254 ── eth0 198.18.<1+i>.1  backend i
//!             2001:db8:1::2     2001:db8:1::1      2001:db8:<1+i>::fe        2001:db8:<1+i>::1
//! ```
//! Service VIPs (198.18.100.0/24, 2001:db8:100::/64) are on no interface: the client routes all of
//! 198.18.0.0/15 and 2001:db8::/32 through the node, where meshd's programs translate them.
//!
//! Every endpoint keeps the settings a container runtime gives a veth (TX checksum offload on,
//! GRO off): the tests see what users see. The one test that tunes them says so in its name.

use std::net::IpAddr;

use anyhow::Result;

use crate::netns::{unique_prefix, veth, Netns};

/// Client address on its link to the node.
pub const CLIENT_V4: &str = "198.18.1.2";
/// Client IPv6 address.
pub const CLIENT_V6: &str = "2001:db8:1::2";
/// The node's address on the client link (a Gateway listens here).
pub const NODE_V4: &str = "198.18.1.1";
/// The node's IPv6 address on the client link.
pub const NODE_V6: &str = "2001:db8:1::1";

/// IPv4 address of backend `i` (1-based).
pub fn backend_v4(i: usize) -> IpAddr {
    format!("198.18.{}.1", 1 + i).parse().expect("valid")
}

/// IPv6 address of backend `i` (1-based).
pub fn backend_v6(i: usize) -> IpAddr {
    format!("2001:db8:{}::1", 1 + i).parse().expect("valid")
}

/// Makes `node` a router and joins it to `peer` (the client or the outside world) by a veth with
/// default settings: `node_if` is 198.18.1.1/24 and 2001:db8:1::1/64, the peer's `eth0` is .2 /
/// ::2 and routes the test ranges (198.18.0.0/15, 2001:db8::/32) through the node.
pub fn wire_uplink(node: &Netns, node_if: &str, peer: &Netns) -> Result<()> {
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        node.exec("sysctl", &["-qw", sysctl])?;
    }
    veth(node, node_if, peer, "eth0")?;
    node.ip(&["addr", "add", "198.18.1.1/24", "dev", node_if])?;
    node.ip(&["addr", "add", "2001:db8:1::1/64", "dev", node_if, "nodad"])?;
    peer.ip(&["addr", "add", "198.18.1.2/24", "dev", "eth0"])?;
    peer.ip(&["addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad"])?;
    peer.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.1.1"])?;
    peer.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8::/32",
        "via",
        "2001:db8:1::1",
    ])?;
    Ok(())
}

/// Client, node and backends; everything is deleted on drop.
pub struct Topology {
    /// Per-run name prefix.
    pub prefix: String,
    /// Backend namespaces (index 0 is backend 1). Dropped first.
    pub backends: Vec<Netns>,
    /// The client.
    pub client: Netns,
    /// The node meshd runs on.
    pub node: Netns,
}

impl Topology {
    /// Builds the topology with `backends` backends.
    pub fn build(backends: usize) -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-node"))?;
        let client = Netns::create(&format!("{prefix}-cli"))?;
        let mut topo = Topology {
            prefix: prefix.clone(),
            backends: Vec::new(),
            client,
            node,
        };
        wire_uplink(&topo.node, "c0", &topo.client)?;
        for i in 1..=backends {
            let ns = Netns::create(&format!("{prefix}-b{i}"))?;
            let node_if = format!("b{i}");
            veth(&topo.node, &node_if, &ns, "eth0")?;
            let net = 1 + i;
            topo.node.ip(&[
                "addr",
                "add",
                &format!("198.18.{net}.254/24"),
                "dev",
                &node_if,
            ])?;
            topo.node.ip(&[
                "addr",
                "add",
                &format!("2001:db8:{net}::fe/64"),
                "dev",
                &node_if,
                "nodad",
            ])?;
            ns.ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", "eth0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("2001:db8:{net}::1/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&[
                "route",
                "add",
                "198.18.0.0/15",
                "via",
                &format!("198.18.{net}.254"),
            ])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "2001:db8::/32",
                "via",
                &format!("2001:db8:{net}::fe"),
            ])?;
            topo.backends.push(ns);
        }
        Ok(topo)
    }

    /// The node's interfaces meshd attaches to.
    pub fn node_interfaces(&self) -> Vec<String> {
        let mut ifs = vec!["c0".to_string()];
        ifs.extend((1..=self.backends.len()).map(|i| format!("b{i}")));
        ifs
    }
}
