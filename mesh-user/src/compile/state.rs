//! The compiler's output: what the node must enforce, with no I/O attached.
//!
//! A [`DesiredState`] is the single input of the dataplane and (later) the proxy. It is built by
//! [`super::compile`] from validated resources and applied all-or-nothing.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Transport protocol of a service address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Protocol {
    /// TCP (Istio protocols TCP, HTTP, HTTP2, GRPC, TLS, HTTPS, MONGO, REDIS, MYSQL).
    Tcp,
    /// UDP.
    Udp,
}

/// Where clients send traffic: a VIP from a ServiceEntry, or a node address for a Gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// Address clients connect to.
    pub ip: IpAddr,
    /// Port clients connect to.
    pub port: u16,
    /// Transport protocol.
    pub protocol: L4Protocol,
}

/// Everything one node enforces.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DesiredState {
    /// One entry per service address, sorted by address (deterministic output).
    pub services: Vec<ServicePlan>,
}

/// How one service address is served.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePlan {
    /// The address clients use.
    pub address: ServiceAddress,
    /// Human name for stats: the Istio host (or `gateway/<name>` for a Gateway server).
    pub name: String,
    /// Resources this plan was compiled from (`kind/namespace/name`), for `meshctl` and errors.
    pub sources: Vec<String>,
    /// The kernel path or the L7 proxy.
    pub plan: Plan,
}

/// The per-service decision "kernel path or L7 proxy", made from the rules alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Plan {
    /// Served entirely by the XDP program.
    L4(L4Plan),
}

/// A weighted Maglev plan executed in the kernel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L4Plan {
    /// Backends that may appear in `table` (weight > 0), sorted by address.
    pub backends: Vec<BackendPlan>,
    /// Maglev lookup table: `table.len()` is the (prime) table size M; each entry is an index
    /// into `backends`. Empty when the service has no backend with weight > 0.
    pub table: Vec<u32>,
    /// `consistentHash.useSourceIp`: hash the client address only.
    pub hash_source_ip: bool,
}

/// One backend of an L4 plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendPlan {
    /// Where the backend listens (endpoint address, resolved target port).
    pub address: SocketAddr,
    /// Destination subset it was selected through (`None` when the route names no subset).
    pub subset: Option<String>,
    /// The endpoint's labels, for stats (`version` in particular).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Configured share of new connections, 0.0..=1.0 (route weight x endpoint weight, normalised).
    pub share: f64,
}
