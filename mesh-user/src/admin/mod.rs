//! The admin API between meshctl and meshd: JSON over HTTP/1.1 on a Unix socket (root only,
//! mode 0600), so `curl --unix-socket /run/mesh/meshd.sock http://mesh/v1/status` works too.
//!
//! | method | path            | body / answer                                    |
//! |--------|-----------------|--------------------------------------------------|
//! | GET    | `/v1/status`    | [`Status`]                                        |
//! | GET    | `/v1/resources` | `[ResourceEntry]` (`?kind=&name=&namespace=`)     |
//! | GET    | `/v1/services`  | [`[ServiceView]`](services::ServiceView): path and reason |
//! | POST   | `/v1/apply`     | [`ApplyRequest`] -> [`ApplyResponse`]             |
//! | POST   | `/v1/delete`    | [`DeleteRequest`] -> [`ApplyResponse`]            |
//! | GET    | `/v1/stats`     | [`StatsSnapshot`](crate::dataplane::StatsSnapshot) |
//! | GET    | `/metrics`      | Prometheus text (also on the metrics listener)    |
//! | GET    | `/v1/fleet`     | [`FleetView`](crate::fleet::FleetView) (`meshd --etcd`) |
//! | GET    | `/v1/trace`     | decisions as NDJSON until hang-up (`?service=&client=&backend=&verdict=`) |
//! | GET    | `/v1/trace/stats` | [`TraceStats`](crate::trace::hub::TraceStats)   |
//!
//! The metrics listener also serves the live split page (see [`crate::web`]).
//!
//! Errors answer 4xx/5xx with [`ErrorBody`].

pub mod client;
pub mod server;
pub mod services;
pub mod stream;

use serde::{Deserialize, Serialize};

/// Where meshd listens by default.
pub const DEFAULT_SOCKET: &str = "/run/mesh/meshd.sock";

/// One input file (or stdin) as the user gave it; parsed by meshd so errors name the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceDocument {
    /// File path or `<stdin>`.
    pub source: String,
    /// Its YAML text (may hold several documents).
    pub yaml: String,
}

/// `POST /v1/apply`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// All files of the submission; validated and applied together or not at all.
    pub documents: Vec<SourceDocument>,
    /// Validate and compile against the current state, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// A resource by identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceRef {
    /// Kind (`VirtualService`, ...).
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// `POST /v1/delete`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// Resources to delete; all or nothing.
    pub resources: Vec<ResourceRef>,
    /// Check only.
    #[serde(default)]
    pub dry_run: bool,
}

/// What an apply or delete did to each resource.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourceChange {
    /// `VirtualService default/reviews`.
    pub resource: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: String,
}

/// Answer of apply and delete.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// Per-resource outcome.
    pub changes: Vec<ResourceChange>,
    /// True when nothing was changed on purpose.
    pub dry_run: bool,
    /// Service addresses in force afterwards.
    pub services: usize,
    /// Backends in force afterwards.
    pub backends: usize,
    /// Service addresses whose kernel entries were written (new or changed); the others were
    /// left untouched.
    #[serde(default)]
    pub written: usize,
    /// Time spent compiling and writing the maps, in microseconds.
    pub duration_us: u64,
    /// Notices (documents skipped) and warnings about the submitted resources (dangling
    /// references, empty subsets, unsupported settings mesh can ignore safely), one line each.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One resource as `meshctl get` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourceEntry {
    /// `file` (meshd --config) or `api` (meshctl apply).
    pub layer: String,
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// File it came from.
    pub source: String,
    /// The resource in Istio form (apiVersion, kind, metadata, spec).
    pub resource: serde_json::Value,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// meshd version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Attached interfaces.
    pub interfaces: Vec<InterfaceStatus>,
    /// Map fill levels.
    pub maps: Vec<MapStatus>,
    /// Kernel memory of all maps, in bytes.
    #[serde(default)]
    pub map_memory_bytes: u64,
    /// Long work in progress (a large apply), if any.
    #[serde(default)]
    pub progress: Option<String>,
    /// Connection-tracking entries in use.
    pub conntrack_entries: u64,
    /// Connection-tracking capacity.
    pub conntrack_capacity: u64,
    /// Resources in force (files + API).
    pub resources: usize,
    /// Service addresses in force.
    pub services: usize,
    /// The last apply (rules change) and its outcome.
    pub last_apply: Option<ApplyRecord>,
    /// Where the API layer is persisted.
    pub state_file: Option<String>,
    /// Where maps are pinned.
    pub pin_dir: Option<String>,
    /// The pinned maps' layout and what reopening them did (absent without pinning).
    #[serde(default)]
    pub pin_layout: Option<PinLayoutStatus>,
    /// This node's link to its fleet (`meshd --etcd`).
    #[serde(default)]
    pub fleet: Option<crate::fleet::LocalFleetState>,
    /// The kernel's features and what meshd chose from them (absent from older daemons).
    #[serde(default)]
    pub kernel: Option<crate::dataplane::features::KernelFeatures>,
    /// Socket-level balancing of node-local clients (None: off, `--no-socket-lb`).
    #[serde(default)]
    pub socket_lb: Option<crate::dataplane::SocketLbStatus>,
}

/// The pin directory's layout (see `mesh_user::dataplane::pins`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinLayoutStatus {
    /// Layout version of the pinned maps.
    pub version: u32,
    /// Migrations done and capacities kept at start, one line each.
    pub notes: Vec<String>,
}

/// An attached interface.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Name.
    pub name: String,
    /// Index.
    pub ifindex: u32,
    /// The hook serving it: `xdp-native`, `xdp-generic`, `tcx` or `tc-cls_bpf`.
    pub mode: String,
    /// Why that hook was chosen.
    #[serde(default)]
    pub reason: String,
    /// Whether TC sends packets routed into this interface straight into the container behind
    /// it (`bpf_redirect_peer`).
    #[serde(default)]
    pub peer_redirect: bool,
    /// Kernel program id.
    pub program_id: Option<u32>,
}

/// A map's fill level.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapStatus {
    /// Map name.
    pub name: String,
    /// Entries in use (for arrays: entries the rules use).
    pub used: u64,
    /// Capacity.
    pub capacity: u64,
    /// Kernel memory it holds, in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
}

/// One rules change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRecord {
    /// Seconds since the epoch.
    pub at: f64,
    /// `startup`, `files`, `apply`, `delete`.
    pub trigger: String,
    /// Whether it took effect.
    pub ok: bool,
    /// Error text when it did not.
    pub error: Option<String>,
    /// Duration in microseconds.
    pub duration_us: u64,
}

/// Error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, precise enough to act on.
    pub error: String,
}
