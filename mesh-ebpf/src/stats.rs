//! Per-CPU counters: one reason slot per verdict, traffic counters per service and backend.
//!
//! Per-CPU arrays need no atomics; userspace sums the CPUs.

use mesh_common::TrafficCounters;

use crate::maps::{BACKEND_STATS, REASON_STATS, SERVICE_STATS};

/// Counts the packet under `reason` and returns `action`, so every exit is `return verdict(..)`.
#[inline(always)]
pub fn verdict(reason: u32, action: u32) -> u32 {
    if let Some(slot) = REASON_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, nothing else on this CPU runs concurrently with us.
        unsafe { *slot += 1 };
    }
    action
}

/// Which way a translated packet travels.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client -> service (destination NAT); `new_flow` when the backend was just selected.
    Request { new_flow: bool },
    /// Backend -> client (reverse NAT); `reset` when the backend sent a TCP RST.
    Reply { reset: bool },
}

/// Adds one packet of `bytes` to the service's and the backend's counters.
#[inline(always)]
pub fn traffic(service_id: u32, backend_id: u32, bytes: u64, dir: Direction) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot.
        add(unsafe { &mut *c }, bytes, dir);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        add(unsafe { &mut *c }, bytes, dir);
    }
}

#[inline(always)]
fn add(c: &mut TrafficCounters, bytes: u64, dir: Direction) {
    match dir {
        Direction::Request { new_flow } => {
            c.packets += 1;
            c.bytes += bytes;
            if new_flow {
                c.connections += 1;
            }
        }
        Direction::Reply { reset } => {
            c.reply_packets += 1;
            c.reply_bytes += bytes;
            if reset {
                c.reply_resets += 1;
            }
        }
    }
}

/// Counts a connection balanced without a packet (the socket hooks: node-local clients).
#[inline(always)]
pub fn connection(service_id: u32, backend_id: u32) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot.
        unsafe { (*c).connections += 1 };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe { (*c).connections += 1 };
    }
}
