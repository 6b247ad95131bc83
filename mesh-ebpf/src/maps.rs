//! Every map of the program, named exactly as in `mesh_common::map_names`.
//!
//! Sizes are the contract's defaults; meshd may resize MAGLEV and CONNTRACK at load time, so the code relies only on the lookups' own bounds checks. Nothing is pinned here:
//! pinning is userspace's decision.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use mesh_common::{
    ct_event, reason, sock_reason, Backend, FlowKey, FlowState, ServiceInfo, ServiceKey,
    SockConfig, SockKey, SockTarget, TrafficCounters, DEFAULT_CONNTRACK_ENTRIES,
    DEFAULT_MAGLEV_POOL_ENTRIES, DEFAULT_PENDING_ENTRIES, MAGLEV_MAP_FLAGS, MAX_BACKENDS,
    MAX_SERVICES, MAX_XDP_INTERFACES, SOCK_MAP_ENTRIES,
};

/// Service address/port/protocol -> service id, Maglev slice and flags. meshd switches a
/// service to a new slice by replacing its entry (one update), so a lookup sees the old slice or
/// the new one, both complete.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Backend id -> backend address and port.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev lookup tables of all services, one slice each; entries are backend ids.
#[map]
pub static MAGLEV: Array<u32> =
    Array::with_max_entries(DEFAULT_MAGLEV_POOL_ENTRIES, MAGLEV_MAP_FLAGS);

/// Both directions of every flow: client -> service to the chosen backend, backend -> client to
/// the service address restored on replies.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Interfaces the programs may send packets into themselves (ifindex -> `redirect_target`
/// flags): XDP into those where meshd runs XDP natively (anything else routed out of an XDP
/// interface is left to the stack); TC straight into the container behind a veth whose peer
/// lives in another namespace. The name predates the second use; it stays for the pins.
#[map]
pub static XDP_REDIRECT_TARGETS: HashMap<u32, u32> =
    HashMap::with_max_entries(MAX_XDP_INTERFACES, 0);

/// Flows not yet confirmed in both directions, same layout as [`CONNTRACK`]: floods churn this
/// table, not the one holding established flows.
#[map]
pub static CT_PENDING: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_PENDING_ENTRIES, 0);

/// One slot per CPU of working space for building connection-table entries off the stack.
#[map]
pub static CT_SCRATCH: PerCpuArray<crate::conntrack::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Connection-table event code -> count (`mesh_common::ct_event`).
#[map]
pub static CT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ct_event::COUNT, 0);

/// Service id -> traffic counters.
#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Backend id -> traffic counters.
#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Reason code -> packets that left the program for that reason.
#[map]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

// The socket hooks' own state (see `sock.rs`).

/// Which network namespace the socket hooks serve (meshd's); all zero: none.
#[map]
pub static SOCK_CONFIG: Array<SockConfig> = Array::with_max_entries(1, 0);

/// Socket cookie + backend -> the service address the socket asked for (recvmsg, getpeername).
#[map]
pub static SOCK_REVNAT: LruHashMap<SockKey, SockTarget> =
    LruHashMap::with_max_entries(SOCK_MAP_ENTRIES, 0);

/// Socket cookie + service address -> backend: UDP flows of unconnected sockets.
#[map]
pub static SOCK_FLOWS: LruHashMap<SockKey, SockTarget> =
    LruHashMap::with_max_entries(SOCK_MAP_ENTRIES, 0);

/// Socket hook outcome -> count.
#[map]
pub static SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sock_reason::COUNT, 0);
