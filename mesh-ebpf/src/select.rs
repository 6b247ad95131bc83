//! Backend selection for flows that miss conntrack: service lookup, a flow hash, and the Maglev
//! table lookup (two map reads per new flow: the service entry and its slice's entry).
//!
//! The selection is a pure function of the packet tuple and the maps, so a flow whose conntrack
//! entry was lost (daemon restart, LRU eviction) lands on the same backend while the table is
//! unchanged.

use mesh_common::{
    Backend, FlowKey, ServiceInfo, ServiceKey, NO_BACKEND, SERVICE_FLAG_HASH_SOURCE_IP,
};

use crate::maps::{BACKENDS, MAGLEV, SERVICES};

/// The service the packet is addressed to.
#[inline(always)]
pub fn service(key: &FlowKey) -> Option<ServiceInfo> {
    let skey = ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out immediately.
    unsafe { SERVICES.get(&skey) }.copied()
}

/// Picks the backend for a new flow. `svc.table_size` must be non-zero.
///
/// `None` when the Maglev entry or the backend slot is out of range or empty, i.e. the tables
/// are inconsistent.
#[inline(always)]
pub fn backend(key: &FlowKey, svc: &ServiceInfo) -> Option<(u32, Backend)> {
    let index = svc.table_offset.wrapping_add(slot(key, svc));
    let id = *MAGLEV.get(index)?;
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.family == 0 {
        return None;
    }
    Some((id, backend))
}

/// The flow's slot in the service's Maglev table (`svc.table_size` must be non-zero).
#[inline(always)]
pub fn slot(key: &FlowKey, svc: &ServiceInfo) -> u32 {
    let hash = if svc.flags & SERVICE_FLAG_HASH_SOURCE_IP != 0 {
        hash_source(key)
    } else {
        hash_flow(key)
    };
    hash % svc.table_size
}

const SEED: u32 = 0x6d65_7368;

/// Hash of the whole 5-tuple (plus family).
#[inline(always)]
fn hash_flow(key: &FlowKey) -> u32 {
    let mut h = SEED;
    for i in 0..4 {
        h = mix(h, word(&key.src_addr, i));
    }
    for i in 0..4 {
        h = mix(h, word(&key.dst_addr, i));
    }
    h = mix(h, key.src_port as u32 | (key.dst_port as u32) << 16);
    h = mix(h, key.proto as u32 | (key.family as u32) << 8);
    finish(h, 40)
}

/// Hash of the client address only (`consistentHash.useSourceIp`).
#[inline(always)]
fn hash_source(key: &FlowKey) -> u32 {
    let mut h = SEED;
    for i in 0..4 {
        h = mix(h, word(&key.src_addr, i));
    }
    h = mix(h, key.family as u32);
    finish(h, 20)
}

/// The `i`-th 32-bit word of an address, in memory order.
#[inline(always)]
pub fn word(addr: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([
        addr[4 * i],
        addr[4 * i + 1],
        addr[4 * i + 2],
        addr[4 * i + 3],
    ])
}

/// One MurmurHash3 (x86, 32-bit) block round.
#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3 finaliser: every input bit affects every output bit, which `% table_size` needs.
#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
