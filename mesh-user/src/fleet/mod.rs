//! A fleet of nodes sharing one rule set through etcd (`meshd --etcd URL,...`).
//!
//! The meshctl layer of the rules lives in etcd instead of the local state file; the `--config`
//! files layer stays per node. Layout under the prefix (default `/mesh`):
//!
//! | key                              | value                                   | lease |
//! |----------------------------------|-----------------------------------------|-------|
//! | `<prefix>/rules`                 | the *guard*: who changed the rules last | no    |
//! | `<prefix>/rules/<Kind>/<ns>/<n>` | one Istio resource, YAML                | no    |
//! | `<prefix>/members/<node>`        | when the node first joined              | no    |
//! | `<prefix>/nodes/<node>`          | [`NodeRecord`] (JSON)                   | yes   |
//!
//! Every change of the rules is one etcd transaction that rewrites the guard and is conditional
//! on the guard's `mod_revision` being the one the change was validated against, so two
//! concurrent applies cannot both win. The guard's `mod_revision` is the **fleet revision**: the
//! number every node reports as the rules it has applied. Resources are ordered by their
//! `create_revision` (creation time decides route precedence, as in Istio).
//!
//! Owns the types shared by meshd and meshctl; [`etcd`] talks to etcd, [`agent`] is the daemon
//! side (watch, apply, publish), [`view`] renders the fleet for meshctl.

pub mod agent;
pub mod etcd;
pub mod view;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How meshd reaches etcd.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    /// Client URLs (`http://198.18.0.1:2379`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix shared by the fleet.
    pub prefix: String,
    /// This node's name in the fleet (unique).
    pub node_name: String,
    /// CA bundle that signed the etcd server certificates.
    pub cacert: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    pub cert: Option<PathBuf>,
    /// Client key (mutual TLS).
    pub key: Option<PathBuf>,
    /// `user:password` for etcd authentication.
    pub user: Option<String>,
    /// Lease TTL of the node record in seconds: a node silent this long shows as gone.
    pub lease_ttl_s: i64,
    /// How often the node record (applied revision, counters) is refreshed.
    pub publish_interval: std::time::Duration,
    /// Time limit of one etcd request (a partition or lost quorum shows up after this).
    pub request_timeout: std::time::Duration,
}

/// Keys of one fleet.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The guard key; also the prefix of every rule key (one range read sees both).
    pub fn guard(&self) -> String {
        format!("{}/rules", self.prefix)
    }

    /// The key of one resource.
    pub fn resource(&self, kind: &str, namespace: &str, name: &str) -> String {
        format!("{}/rules/{kind}/{namespace}/{name}", self.prefix)
    }

    /// Prefix of the resource keys.
    pub fn resources_prefix(&self) -> String {
        format!("{}/rules/", self.prefix)
    }

    /// A node's leased record.
    pub fn node(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.prefix)
    }

    /// Prefix of the node records.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// A node's membership (not leased: a member without a record is gone).
    pub fn member(&self, name: &str) -> String {
        format!("{}/members/{name}", self.prefix)
    }

    /// Prefix of the memberships.
    pub fn members_prefix(&self) -> String {
        format!("{}/members/", self.prefix)
    }
}

/// What a node publishes about itself under its lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Fleet revision of the rules in force on the node (0: none yet).
    pub applied_revision: i64,
    /// When that revision was applied (seconds since the epoch).
    pub applied_at: f64,
    /// The last failure to apply a fleet revision (the node keeps its previous rules).
    pub last_error: Option<String>,
    /// How each service is served on this node.
    pub services: Vec<ServicePath>,
    /// Attached interfaces and their modes.
    pub interfaces: Vec<InterfaceMode>,
    /// Connections per backend as counted by this node's kernel program, and requests per
    /// destination on its L7 proxy (the numbers of its `/v1/stats`).
    pub counters: Vec<ServiceCounters>,
    /// When the record was written (seconds since the epoch).
    pub published_at: f64,
}

/// One service's path on a node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServicePath {
    /// Service name (host).
    pub name: String,
    /// `ip:port/proto`.
    pub address: String,
    /// `kernel` or `proxy`.
    pub path: String,
}

/// An interface and its attach mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct InterfaceMode {
    /// Interface name.
    pub name: String,
    /// Attach mode.
    pub mode: String,
}

/// One service's counters on one node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceCounters {
    /// Service name.
    pub name: String,
    /// `ip:port/proto`.
    pub address: String,
    /// Per backend (kernel path) or per destination subset (proxy).
    pub backends: Vec<BackendCount>,
}

/// Connections (kernel path) or requests (proxy) that went to one backend or subset.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendCount {
    /// Backend `ip:port` (kernel) or destination host (proxy).
    pub backend: String,
    /// Subset, when the backend belongs to one.
    pub subset: Option<String>,
    /// Connections (kernel) or requests (proxy).
    pub count: u64,
    /// `connections` or `requests`.
    pub unit: String,
    /// Configured share of the service's traffic.
    pub configured_share: Option<f64>,
}

/// This node's own view of its link to the fleet (known even when etcd is not).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LocalFleetState {
    /// Node name.
    pub name: String,
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// Fleet revision in force here.
    pub applied_revision: i64,
    /// Newest fleet revision this node has seen in etcd.
    pub seen_revision: i64,
    /// Whether etcd answered the last request.
    pub connected: bool,
    /// Since when etcd has not answered (seconds since the epoch).
    pub disconnected_since: Option<f64>,
    /// Why, in etcd's words.
    pub etcd_error: Option<String>,
    /// The last failure to apply a fleet revision.
    pub last_error: Option<String>,
    /// The rules in force came from the local cache (etcd was unreachable at start).
    pub from_cache: bool,
}

impl LocalFleetState {
    /// True when this node cannot vouch that its rules are the fleet's newest.
    pub fn stale(&self) -> bool {
        !self.connected || self.applied_revision < self.seen_revision
    }
}

/// `GET /v1/fleet`: every node as etcd knows it, plus this node's own view.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetView {
    /// The fleet revision in etcd (None when etcd did not answer).
    pub revision: Option<i64>,
    /// Why etcd did not answer.
    pub error: Option<String>,
    /// This node's view.
    pub local: LocalFleetState,
    /// Every member, with its record when it has one.
    pub nodes: Vec<NodeView>,
}

/// One member of the fleet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `ok`, `stale` (behind the fleet revision), `failing` (last apply failed) or `gone` (its
    /// lease expired: meshd stopped or cut off from etcd).
    pub state: String,
    /// Its record (None when gone).
    pub record: Option<NodeRecord>,
}

/// The state of a member, from its record and the fleet revision.
pub fn node_state(record: Option<&NodeRecord>, fleet_revision: i64) -> &'static str {
    match record {
        None => "gone",
        Some(r) if r.last_error.is_some() => "failing",
        Some(r) if r.applied_revision < fleet_revision => "stale",
        Some(_) => "ok",
    }
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_is_a_prefix_of_every_rule_key_but_not_of_nodes() {
        let keys = Keys::new("/mesh/");
        assert_eq!(keys.guard(), "/mesh/rules");
        assert!(keys
            .resource("VirtualService", "default", "reviews")
            .starts_with(&keys.guard()));
        assert!(!keys.node("n1").starts_with(&keys.guard()));
        assert!(!keys.member("n1").starts_with(&keys.nodes_prefix()));
    }

    #[test]
    fn states_follow_record_and_revision() {
        let ok = NodeRecord {
            applied_revision: 7,
            ..Default::default()
        };
        assert_eq!(node_state(Some(&ok), 7), "ok");
        assert_eq!(node_state(Some(&ok), 9), "stale");
        assert_eq!(node_state(None, 7), "gone");
        let failing = NodeRecord {
            last_error: Some("x".into()),
            ..ok
        };
        assert_eq!(node_state(Some(&failing), 7), "failing");
    }
}
