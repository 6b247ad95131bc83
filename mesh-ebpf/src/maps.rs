//! Every map of the program, named exactly as in `mesh_common::map_names`.
//!
//! Sizes are the contract's defaults; meshd may resize MAGLEV and CONNTRACK at load time, so the code relies only on the lookups' own bounds checks. Nothing is pinned here:
//! pinning is userspace's decision.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use mesh_common::{
    reason, Backend, FlowKey, FlowState, ServiceInfo, ServiceKey, TrafficCounters,
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_POOL_ENTRIES, MAGLEV_MAP_FLAGS, MAX_BACKENDS,
    MAX_SERVICES,
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
