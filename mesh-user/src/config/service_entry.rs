//! The typed `ServiceEntry` spec (Istio `networking.istio.io` ServiceEntry).
//!
//! Only parsing lives here; which fields mesh can honour is decided in `validate`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::WorkloadSelector;

/// Istio `ServiceEntry` spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    /// Hosts associated with the entry (short names are completed with the namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Virtual IPs: plain addresses or single-address CIDRs (`/32`, `/128`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Ports of the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Inside or outside the mesh; accepted and not used at L4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// How endpoints are discovered; only `STATIC` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// Static endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    /// Unsupported: endpoints selected from workload entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Namespaces the entry is visible in; accepted (mesh has one node-wide view).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Accepted for mTLS parity; not used at L4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// Istio `ServicePort`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port number clients use.
    pub number: i64,
    /// Istio protocol name (TCP, HTTP, HTTP2, GRPC, HTTPS, TLS, MONGO, MYSQL, REDIS, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port name, unique within the entry; endpoints map names to their own ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port on the endpoints when they do not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
}

/// Istio `ServiceEntry.Location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh.
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// Istio `ServiceEntry.Resolution`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Pass through to the original destination.
    None,
    /// Use the static endpoints.
    Static,
    /// Resolve endpoints through DNS.
    Dns,
    /// Resolve through DNS, round robin.
    DnsRoundRobin,
}

/// Istio `WorkloadEntry` as used in `ServiceEntry.endpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// Endpoint IP address (hostnames and unix sockets are not supported).
    #[serde(default)]
    pub address: String,
    /// Port name -> port number on this endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, i64>,
    /// Labels (subsets select endpoints by these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Accepted and ignored (single network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Accepted and ignored (no locality-aware balancing at L4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// Load-balancing weight; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Accepted and ignored (identity belongs to the later L7 proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl WorkloadEntry {
    /// Weight with Istio's default applied (absent means 1).
    pub fn effective_weight(&self) -> i64 {
        self.weight.unwrap_or(1)
    }
}
