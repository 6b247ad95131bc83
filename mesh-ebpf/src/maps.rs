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
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_POOL_ENTRIES, GENERATIONS, MAX_BACKENDS,
    MAX_SERVICES, MAX_XDP_INTERFACES,
};

/// The rule generation (0 or 1) new flows are looked up in.
#[map]
pub static ACTIVE_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Service address/port/protocol/generation -> service id, Maglev slice and flags.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(GENERATIONS * MAX_SERVICES, 0);

/// Backend id -> backend address and port.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev lookup tables of all services of both generations; entries are backend ids.
#[map]
pub static MAGLEV: Array<u32> =
    Array::with_max_entries(GENERATIONS * DEFAULT_MAGLEV_POOL_ENTRIES, 0);

/// Both directions of every flow: client -> service to the chosen backend, backend -> client to
/// the service address restored on replies.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Interfaces XDP may redirect frames into (ifindex -> unused): those where meshd runs XDP
/// natively. Anything else routed out of an XDP interface is left to the stack.
#[map]
pub static XDP_REDIRECT_TARGETS: HashMap<u32, u32> =
    HashMap::with_max_entries(MAX_XDP_INTERFACES, 0);

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
