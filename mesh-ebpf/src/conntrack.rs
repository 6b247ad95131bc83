//! Connection tracking: per flow, a client-side entry that pins it to its backend and a
//! backend-side entry that restores the service address on replies, so that every packet costs
//! one lookup whichever way it goes, and idle flows age out without a sweeper in the kernel.
//!
//! Two LRU maps keep floods away from established flows. A new flow enters `CT_PENDING`; it
//! moves to `CONNTRACK` once traffic went both ways (a request after a reply: the handshake's
//! final ACK, a UDP client's second datagram). Spoofed SYNs, ACKs or datagrams from random
//! sources never get that far, so however many there are they only churn the pending table,
//! and an established flow is never evicted by them (and so never re-balanced when the weights
//! change later). When one direction of an established flow is missing anyway (evicted by other
//! established flows), it is rebuilt from the other direction, which holds everything needed.

use aya_ebpf::maps::LruHashMap;
use mesh_common::{
    ct_event, Backend, FlowKey, FlowState, FLOW_FLAG_REPLY_SEEN, FLOW_REPLY, FLOW_REQUEST,
};

use crate::maps::{CONNTRACK, CT_PENDING, CT_SCRATCH, CT_STATS};

/// `last_seen_ns` is rewritten at most this often: a write per packet would bounce the entry's
/// cache line between CPUs for no gain in precision anyone uses. The other direction's entry
/// is checked (and rebuilt if missing) at the same moments.
const REFRESH_NS: u64 = 1_000_000_000;

/// Per-CPU working space for building entries: the 512-byte BPF stack has no room for them
/// next to the packet pipeline's own state.
#[repr(C)]
pub struct Scratch {
    /// A request entry being written.
    state: FlowState,
    /// The other direction of the flow at hand.
    other_key: FlowKey,
    /// Its state.
    other: FlowState,
}

/// The tracked state of the packet's own tuple, either direction (see `FlowState::direction`).
///
/// Established flows are found in `CONNTRACK`; pending ones in `CT_PENDING`, where a reply
/// marks its flow and a request of a marked flow confirms it (moves it to `CONNTRACK`).
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64) -> Option<*const FlowState> {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a map value pointer stays valid for the whole program run (RCU); a racing
        // writer only stores another recent timestamp.
        unsafe {
            if now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
                (*entry).last_seen_ns = now;
                ensure_partner(key, entry);
            }
        }
        return Some(entry);
    }
    let entry = CT_PENDING.get_ptr_mut(key)?;
    // SAFETY: as above; the flag is a single byte only ever set.
    unsafe {
        if (*entry).direction == FLOW_REPLY {
            mark_answered(key, entry);
        } else if (*entry).flags & FLOW_FLAG_REPLY_SEEN != 0 {
            return confirm(key, entry, now);
        }
    }
    Some(entry)
}

/// Records a new flow from `client` (client -> service tuple) to `backend` in both directions,
/// as pending until traffic went both ways.
///
/// Insert failures are ignored: the packet is still translated, and the next packet of the flow
/// selects the same backend again as long as the Maglev table is unchanged.
#[inline(always)]
pub fn track(client: &FlowKey, backend: &Backend, service_id: u32, backend_id: u32, now: u64) {
    let Some(s) = scratch() else { return };
    s.state = FlowState {
        addr: backend.addr,
        port: backend.port,
        service_id,
        backend_id,
        direction: FLOW_REQUEST,
        created_ns: now,
        last_seen_ns: now,
        ..FlowState::default()
    };
    partner(client, &s.state, &mut s.other_key, &mut s.other);
    let _ = CT_PENDING.insert(client, &s.state, 0);
    let _ = CT_PENDING.insert(&s.other_key, &s.other, 0);
    count(ct_event::PENDING);
}

/// Removes the entry of `key` (a stale client -> service entry), wherever it is.
#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
    let _ = CT_PENDING.remove(key);
}

/// A reply of a pending flow (`key` is its reply side): marks the request entry answered.
#[inline(always)]
fn mark_answered(key: &FlowKey, entry: *const FlowState) {
    let Some(s) = scratch() else { return };
    // SAFETY: map value pointer, valid for the run.
    partner(key, unsafe { &*entry }, &mut s.other_key, &mut s.other);
    if let Some(request) = CT_PENDING.get_ptr_mut(&s.other_key) {
        // SAFETY: as above; one byte, only ever set.
        unsafe { (*request).flags |= FLOW_FLAG_REPLY_SEEN };
    }
}

/// Moves a confirmed pending flow (`key` is its request side) into `CONNTRACK`; returns the
/// established entry. The state is copied first: a removed LRU element may be reused at once.
#[inline(always)]
fn confirm(key: &FlowKey, pending: *const FlowState, now: u64) -> Option<*const FlowState> {
    let s = scratch()?;
    // SAFETY: map value pointer, valid for the run.
    s.state = unsafe { *pending };
    s.state.flags = 0;
    s.state.last_seen_ns = now;
    partner(key, &s.state, &mut s.other_key, &mut s.other);
    let _ = CONNTRACK.insert(key, &s.state, 0);
    let _ = CONNTRACK.insert(&s.other_key, &s.other, 0);
    let _ = CT_PENDING.remove(key);
    let _ = CT_PENDING.remove(&s.other_key);
    count(ct_event::CONFIRMED);
    CONNTRACK.get_ptr_mut(key).map(|e| e as *const FlowState)
}

/// Puts back the other direction of an established flow when it was evicted.
#[inline(always)]
fn ensure_partner(key: &FlowKey, entry: *const FlowState) {
    let Some(s) = scratch() else { return };
    // SAFETY: map value pointer, valid for the run.
    partner(key, unsafe { &*entry }, &mut s.other_key, &mut s.other);
    if CONNTRACK.get_ptr_mut(&s.other_key).is_none() {
        let _ = CONNTRACK.insert(&s.other_key, &s.other, 0);
        count(ct_event::REBUILT);
        crate::klog::rebuilt(s.other.service_id, s.other.backend_id);
    }
}

/// Writes the other direction of a flow into `other_key`/`other`: a request entry (client
/// -> service, holding the backend) gives the reply entry (backend -> client, holding the
/// service address) and vice versa.
#[inline(always)]
fn partner(key: &FlowKey, state: &FlowState, other_key: &mut FlowKey, other: &mut FlowState) {
    other_key.proto = key.proto;
    other_key.family = key.family;
    other_key._pad = [0; 2];
    other.service_id = state.service_id;
    other.backend_id = state.backend_id;
    other.created_ns = state.created_ns;
    other.last_seen_ns = state.last_seen_ns;
    other.flags = 0;
    other._pad2 = 0;
    if state.direction == FLOW_REQUEST {
        // backend -> client; restores the service address.
        other_key.src_addr = state.addr;
        other_key.src_port = state.port;
        other_key.dst_addr = key.src_addr;
        other_key.dst_port = key.src_port;
        other.addr = key.dst_addr;
        other.port = key.dst_port;
        other.direction = FLOW_REPLY;
    } else {
        // client -> service; goes to the backend.
        other_key.src_addr = key.dst_addr;
        other_key.src_port = key.dst_port;
        other_key.dst_addr = state.addr;
        other_key.dst_port = state.port;
        other.addr = key.src_addr;
        other.port = key.src_port;
        other.direction = FLOW_REQUEST;
    }
}

/// This CPU's scratch space.
#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot; a program run is not interrupted by another on the same CPU.
    CT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Counts a connection-table event on this CPU.
#[inline(always)]
fn count(event: u32) {
    if let Some(slot) = CT_STATS.get_ptr_mut(event) {
        // SAFETY: per-CPU slot, nothing else on this CPU runs concurrently with us.
        unsafe { *slot += 1 };
    }
}
