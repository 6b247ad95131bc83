//! A container host as Docker, containerd and Kubernetes CNIs build one: a node namespace with
//! pods behind veth pairs, in two styles side by side, and an uplink to a client outside.
//!
//! ```text
//!  outside eth0 198.18.1.2 ── up0 198.18.1.1        node
//!                                  br0 198.18.50.1/24   (Docker's docker0 style: a bridge;
//!                                   ├─ va1 ── eth0 198.18.50.11   pod a1     the pods share
//!                                   └─ va2 ── eth0 198.18.50.12   pod a2     one subnet)
//!                                  vb1 ── eth0 198.18.60.11/32   pod b1     (Calico style:
//!                                  vb2 ── eth0 198.18.60.12/32   pod b2      routed /32s, the
//!                                                                            node answers for
//!                                                                            198.18.60.1 on
//!                                                                            every pod link)
//! ```
//! IPv6 mirrors it: 2001:db8:1::/64 outside, 2001:db8:50::/64 on the bridge, 2001:db8:60::N/128
//! routed. Every endpoint keeps default veth settings (TX checksum offload on, GRO off).
//! meshd attaches to the uplink and to the node's end of every pod veth (not to br0: frames from
//! bridged pods are seen on their port before the bridge).

use std::net::IpAddr;

use anyhow::Result;

use crate::netns::{unique_prefix, veth, Netns};

/// How a pod is wired to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodStyle {
    /// A port of the node's bridge, in the bridge's subnet.
    Bridge,
    /// A /32 (/128) routed to its own veth.
    Routed,
}

/// One pod.
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Wiring.
    pub style: PodStyle,
    /// The node's end of its veth.
    pub host_if: String,
    /// IPv4 address.
    pub v4: IpAddr,
    /// IPv6 address.
    pub v6: IpAddr,
}

/// The node, its pods and a client outside; deleted on drop (pods first).
pub struct ContainerHost {
    /// Per-run name prefix.
    pub prefix: String,
    /// Pods: `a1..` bridged, then `b1..` routed.
    pub pods: Vec<Pod>,
    /// A client outside the node, behind the uplink.
    pub outside: Netns,
    /// The node meshd runs on.
    pub node: Netns,
}

/// The node's address on the uplink (Gateways listen here).
pub const UPLINK_V4: &str = "198.18.1.1";
/// The node's IPv6 address on the uplink.
pub const UPLINK_V6: &str = "2001:db8:1::1";

impl ContainerHost {
    /// Builds a node with `bridged` pods on a bridge and `routed` pods on routed veths.
    pub fn build(bridged: usize, routed: usize) -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-node"))?;
        let outside = Netns::create(&format!("{prefix}-out"))?;
        let mut host = ContainerHost {
            prefix: prefix.clone(),
            pods: Vec::new(),
            outside,
            node,
        };
        crate::topology::wire_uplink(&host.node, "up0", &host.outside)?;

        host.node.ip(&["link", "add", "br0", "type", "bridge"])?;
        host.node.ip(&["link", "set", "br0", "up"])?;
        host.node
            .ip(&["addr", "add", "198.18.50.1/24", "dev", "br0"])?;
        host.node
            .ip(&["addr", "add", "2001:db8:50::1/64", "dev", "br0", "nodad"])?;
        for i in 1..=bridged {
            let pod = host.pod(PodStyle::Bridge, i)?;
            host.pods.push(pod);
        }
        for i in 1..=routed {
            let pod = host.pod(PodStyle::Routed, i)?;
            host.pods.push(pod);
        }
        Ok(host)
    }

    fn pod(&self, style: PodStyle, i: usize) -> Result<Pod> {
        let (tag, net) = match style {
            PodStyle::Bridge => ("a", 50),
            PodStyle::Routed => ("b", 60),
        };
        let ns = Netns::create(&format!("{}-p{tag}{i}", self.prefix))?;
        let host_if = format!("v{tag}{i}");
        veth(&self.node, &host_if, &ns, "eth0")?;
        let v4 = format!("198.18.{net}.{}", 10 + i);
        let v6 = format!("2001:db8:{net}::{}", 10 + i);
        match style {
            PodStyle::Bridge => {
                self.node.ip(&["link", "set", &host_if, "master", "br0"])?;
                ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
                ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
                ns.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.50.1"])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "2001:db8::/32",
                    "via",
                    "2001:db8:50::1",
                ])?;
            }
            PodStyle::Routed => {
                // The node's end answers for the pods' gateway address on every pod link.
                self.node
                    .ip(&["addr", "add", "198.18.60.1/32", "dev", &host_if])?;
                self.node.ip(&[
                    "addr",
                    "add",
                    "2001:db8:60::1/128",
                    "dev",
                    &host_if,
                    "nodad",
                ])?;
                self.node.ip(&["route", "add", &v4, "dev", &host_if])?;
                self.node
                    .ip(&["-6", "route", "add", &v6, "dev", &host_if])?;
                ns.ip(&["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
                ns.ip(&["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"])?;
                ns.ip(&["route", "add", "198.18.60.1", "dev", "eth0"])?;
                ns.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.60.1"])?;
                ns.ip(&["-6", "route", "add", "2001:db8:60::1", "dev", "eth0"])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "2001:db8::/32",
                    "via",
                    "2001:db8:60::1",
                ])?;
            }
        }
        Ok(Pod {
            ns,
            style,
            host_if,
            v4: v4.parse()?,
            v6: v6.parse()?,
        })
    }

    /// The node's interfaces meshd attaches to: the uplink and every pod veth.
    pub fn node_interfaces(&self) -> Vec<String> {
        let mut ifs = vec!["up0".to_string()];
        ifs.extend(self.pods.iter().map(|p| p.host_if.clone()));
        ifs
    }
}
