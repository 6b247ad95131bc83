//! The gateway tier of a fleet: a router namespace in front of the nodes spreads connections to
//! a service address over them by ECMP, and the backends send replies back through the tier.
//!
//! ```text
//!  client 198.18.160.2 ── c0 198.18.160.1  router  n<i> 198.18.17<i>.1 ── gw 198.18.17<i>.2  node n<i>
//! ```
//! The router reaches the VIP through a nexthop group of the plain (hash-threshold) type, one
//! nexthop per node, hashing the 5-tuple (see [`GatewayTier::build`] for the sysctls). When a node's
//! namespace goes, its link goes with it and the kernel drops its nexthop from the group, as a
//! routing daemon withdrawing the node's route would.
//!
//! The backends route replies by a connection mark that nftables sets from the source MAC of the
//! node that forwarded the packet ([`ReturnPath`]), one routing table per node. Their conntrack
//! table therefore also says, per connection, which node the backend saw it through
//! ([`node_per_connection`]).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::{
    fleet::{node_lan_ip, Fleet},
    netns::{veth, Netns},
};

/// The client behind the router.
pub const CLIENT: &str = "198.18.160.2";
/// The client network, routed back through the router by every node.
const CLIENT_NET: &str = "198.18.160.0/24";
/// Id of the router's plain (hash-threshold) nexthop group; members are the node numbers.
const GROUP: &str = "100";
/// Id of the router's resilient nexthop group, see [`GatewayTier::route_resilient`].
const RESILIENT_GROUP: &str = "101";
/// Buckets of the resilient group: a multiple of the node count, so each node gets an equal
/// share.
const RESILIENT_BUCKETS: &str = "96";

/// Router address on its link to node `i`.
fn router_ip(i: usize) -> String {
    format!("198.18.{}.1", 170 + i)
}

/// Node `i`'s address on its link to the router.
fn node_up_ip(i: usize) -> String {
    format!("198.18.{}.2", 170 + i)
}

/// Which node a backend sends a connection's replies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnPath {
    /// The node that forwarded the connection's latest packet (the mark follows every packet).
    LastNode,
    /// The node that forwarded the connection's first packet (the mark is set once, as policy
    /// routing on new connections usually is).
    FirstNode,
}

/// Router and client; both namespaces are removed on drop.
pub struct GatewayTier {
    /// The client, behind the router.
    pub client: Netns,
    /// The router with the ECMP route to the VIP.
    pub router: Netns,
}

impl GatewayTier {
    /// Puts a router in front of every node of `fleet` (call before starting meshd: the nodes'
    /// link to the router, `gw`, joins their meshd interfaces) with an ECMP route to `vip`.
    pub fn build(fleet: &mut Fleet, vip: &str) -> Result<Self> {
        let router = Netns::create(&format!("{}-r", fleet.prefix))?;
        let client = Netns::create(&format!("{}-gc", fleet.prefix))?;
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            // The 5-tuple, explicitly (policy 3, fields 0x37: addresses, protocol, ports).
            // Policy 1 (L4) would reuse the flow hash the client's TCP stack put on the skb,
            // which crosses the veth because client and router share one kernel: a random
            // per-socket value, re-drawn on retransmission timeouts. A router on its own
            // machine hashes the headers, which is what this does.
            "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x37",
        ] {
            router.exec("sysctl", &["-qw", sysctl])?;
        }
        veth(&router, "c0", &client, "eth0")?;
        router.ip(&["addr", "add", "198.18.160.1/24", "dev", "c0"])?;
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
        client.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.160.1"])?;
        let mut members = Vec::new();
        for node in &mut fleet.nodes {
            let i = node.index;
            let port = format!("n{i}");
            veth(&router, &port, &node.ns, "gw")?;
            router.ip(&["addr", "add", &format!("{}/24", router_ip(i)), "dev", &port])?;
            node.ns
                .ip(&["addr", "add", &format!("{}/24", node_up_ip(i)), "dev", "gw"])?;
            node.ns
                .ip(&["route", "add", CLIENT_NET, "via", &router_ip(i)])?;
            router.ip(&[
                "nexthop",
                "add",
                "id",
                &i.to_string(),
                "via",
                &node_up_ip(i),
                "dev",
                &port,
            ])?;
            node.ifaces.push("gw".into());
            members.push(i.to_string());
        }
        router.ip(&["nexthop", "add", "id", GROUP, "group", &members.join("/")])?;
        router.ip(&["route", "add", &format!("{vip}/32"), "nhid", GROUP])?;
        Ok(GatewayTier { client, router })
    }

    /// Routes `vip` through a resilient nexthop group over the same nodes: a node's removal
    /// reassigns only its own hash buckets, so connections through the others stay put.
    pub fn route_resilient(&self, vip: &str, nodes: usize) -> Result<()> {
        let members: Vec<String> = (1..=nodes).map(|i| i.to_string()).collect();
        self.router.ip(&[
            "nexthop",
            "add",
            "id",
            RESILIENT_GROUP,
            "group",
            &members.join("/"),
            "type",
            "resilient",
            "buckets",
            RESILIENT_BUCKETS,
        ])?;
        self.router.ip(&[
            "route",
            "add",
            &format!("{vip}/32"),
            "nhid",
            RESILIENT_GROUP,
        ])?;
        Ok(())
    }

    /// The nodes in the router's plain nexthop group now.
    pub fn nodes_in_group(&self) -> Result<Vec<usize>> {
        let out = self.router.ip(&["nexthop", "show", "id", GROUP])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let group = word_after(&text, "group")?;
        group
            .split('/')
            .map(|m| {
                m.split(',')
                    .next()
                    .unwrap_or(m)
                    .parse()
                    .context("nexthop id")
            })
            .collect()
    }

    /// The node the router's own route lookup picks for a TCP flow from the client's `sport` to
    /// `vip:dport` (`ip route get` builds the same headers the multipath hash reads).
    pub fn node_for(&self, vip: &str, sport: u16, dport: u16) -> Result<usize> {
        let out = self.router.ip(&[
            "route",
            "get",
            vip,
            "from",
            CLIENT,
            "iif",
            "c0",
            "ipproto",
            "tcp",
            "sport",
            &sport.to_string(),
            "dport",
            &dport.to_string(),
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let dev = word_after(&text, "dev")?;
        dev.strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("route through {dev}, not a node"))
    }
}

/// The word after `key` in `ip`'s output.
fn word_after<'a>(text: &'a str, key: &str) -> Result<&'a str> {
    text.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .with_context(|| format!("no {key} in {text:?}"))
}

/// Makes every backend of `fleet` route replies to the client network through a node, chosen
/// per destination port by `paths`: an nftables connection mark taken from the source MAC of the
/// node that forwarded the packet, copied to the replies, and one routing table per node.
pub fn route_replies_through_nodes(fleet: &Fleet, paths: &[(u16, ReturnPath)]) -> Result<()> {
    let mut macs = Vec::new();
    for node in &fleet.nodes {
        let out = node.ns.ip(&["-j", "link", "show", "lan"])?;
        let link: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mac = link[0]["address"]
            .as_str()
            .context("MAC of a node's lan link")?
            .to_string();
        macs.push(format!("{mac} : {}", node.index));
    }
    let mut rules = String::new();
    for (port, path) in paths {
        let when = match path {
            ReturnPath::LastNode => "",
            ReturnPath::FirstNode => "ct state new ",
        };
        rules.push_str(&format!(
            "    tcp dport {port} {when}ct mark set ether saddr map @node_of_mac\n"
        ));
    }
    let ruleset = format!(
        "table ip mesh_return {{\n  map node_of_mac {{\n    type ether_addr : mark\n    \
         elements = {{ {} }}\n  }}\n  chain pre {{\n    type filter hook prerouting priority \
         mangle; policy accept;\n{rules}  }}\n  chain out {{\n    type route hook output \
         priority mangle; policy accept;\n    meta mark set ct mark\n  }}\n}}\n",
        macs.join(", ")
    );
    let file = std::env::temp_dir().join(format!("{}-return.nft", fleet.prefix));
    std::fs::write(&file, &ruleset)?;
    let result = (|| -> Result<()> {
        for ns in &fleet.backends {
            ns.exec("nft", &["-f", file.to_str().context("utf-8 path")?])?;
            // The stack routes a reply before the output hook sets its mark, so the first
            // lookup needs a route: on-link, which reaches nobody. The hook's mark then
            // reroutes it through a node's table.
            ns.ip(&["route", "add", CLIENT_NET, "dev", "eth0"])?;
            for node in &fleet.nodes {
                let (mark, table) = (node.index.to_string(), (100 + node.index).to_string());
                ns.ip(&["rule", "add", "fwmark", &mark, "table", &table])?;
                ns.ip(&[
                    "route",
                    "add",
                    CLIENT_NET,
                    "via",
                    &node_lan_ip(node.index),
                    "table",
                    &table,
                ])?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&file);
    result
}

/// For every TCP connection from `client` that backend namespace `ns` tracks: (client port,
/// backend port) -> the node its mark names (0 when unmarked), from `/proc/net/nf_conntrack`.
pub fn node_per_connection(ns: &Netns, client: &str) -> Result<BTreeMap<(u16, u16), usize>> {
    let out = ns.exec("cat", &["/proc/net/nf_conntrack"])?;
    let mut marks = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        if !line.contains(" tcp ") || field("src=").as_deref() != Some(client) {
            continue;
        }
        let (Some(sport), Some(dport)) = (field("sport="), field("dport=")) else {
            bail!("conntrack line without ports: {line}");
        };
        let mark = field("mark=").unwrap_or_default();
        marks.insert(
            (sport.parse()?, dport.parse()?),
            mark.parse().unwrap_or_default(),
        );
    }
    Ok(marks)
}
