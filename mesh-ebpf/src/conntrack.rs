//! Connection tracking: per flow, a client-side entry that pins it to its backend and a
//! backend-side entry that restores the service address on replies, both in one LRU map so
//! that every packet costs one lookup whichever way it goes, and idle flows age out without a
//! sweeper in the kernel.

use aya_ebpf::maps::LruHashMap;
use mesh_common::{Backend, FlowKey, FlowState, FLOW_REPLY, FLOW_REQUEST};

use crate::maps::CONNTRACK;

/// `last_seen_ns` is rewritten at most this often: a write per packet would bounce the entry's
/// cache line between CPUs for no gain in precision anyone uses.
const REFRESH_NS: u64 = 1_000_000_000;

/// The tracked state of the packet's own tuple, either direction (see `FlowState::direction`).
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64) -> Option<*const FlowState> {
    let map: &LruHashMap<FlowKey, FlowState> = &CONNTRACK;
    let entry = map.get_ptr_mut(key)?;
    // SAFETY: a map value pointer stays valid for the whole program run (RCU); a racing writer
    // only stores another recent timestamp.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
    }
    Some(entry)
}

/// Records a new flow from `client` (client -> service tuple) to `backend` in both directions.
///
/// Insert failures are ignored: the packet is still translated, and the next packet of the flow
/// selects the same backend again as long as the Maglev table is unchanged.
#[inline(always)]
pub fn track(client: &FlowKey, backend: &Backend, service_id: u32, backend_id: u32, now: u64) {
    // One stack slot serves both entries: the BPF stack is 512 bytes.
    let mut state = FlowState {
        addr: backend.addr,
        port: backend.port,
        service_id,
        backend_id,
        direction: FLOW_REQUEST,
        created_ns: now,
        last_seen_ns: now,
        ..FlowState::default()
    };
    let _ = CONNTRACK.insert(client, &state, 0);

    let reply_key = FlowKey {
        src_addr: backend.addr,
        dst_addr: client.src_addr,
        src_port: backend.port,
        dst_port: client.src_port,
        proto: client.proto,
        family: client.family,
        _pad: [0; 2],
    };
    state.addr = client.dst_addr;
    state.port = client.dst_port;
    state.direction = FLOW_REPLY;
    let _ = CONNTRACK.insert(&reply_key, &state, 0);
}

/// Removes the entry of `key` (a stale client -> service entry).
#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
}
