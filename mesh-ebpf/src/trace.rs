//! The decision trace: one [`TraceEvent`] per packet of a service flow into a ring buffer (every
//! translated packet, and packets to a service address that were refused, passed or dropped,
//! with their reason), only while userspace (`meshctl trace`) has switched it on for a filter the
//! packet matches.
//!
//! Off, the cost is one read of the one-entry `TRACE_FILTER` array (the verifier inlines the
//! lookup into a load). Loaded with the `.rodata` global `TRACE_AVAILABLE` = 0, the verifier
//! removes even that (the benchmark's baseline). Events are reserved in the ring buffer and
//! filled in place, so nothing lands on the 512-byte stack.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, RingBuf},
};
use mesh_common::{
    FlowKey, TraceEvent, TraceFilter, TRACE_ESTABLISHED, TRACE_HOOK_TC, TRACE_HOOK_XDP,
    TRACE_MATCH_BACKEND, TRACE_MATCH_CLIENT_ADDR, TRACE_MATCH_CLIENT_PORT,
    TRACE_MATCH_SERVICE_ADDR, TRACE_MATCH_SERVICE_PORT, TRACE_NEW_FLOW, TRACE_REPLY,
    TRACE_RING_BYTES, TRACE_UNTRANSLATED,
};

use crate::{
    ctx::{Hook, Packet as Ctx},
    select,
    stats::{self, Direction},
};

/// 1: the trace check is compiled in. meshd may load the object with 0 (then the verifier drops
/// the check as dead code); the benchmark does, to measure what the check costs.
#[no_mangle]
static TRACE_AVAILABLE: u8 = 1;

/// The filter userspace sets while someone traces; all zero (off) otherwise.
#[map]
pub static TRACE_FILTER: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// Decision events for meshd to read.
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// What the pipeline decided for one packet.
pub struct Decision<'a> {
    /// `TRACE_HOOK_*`.
    pub hook: u8,
    /// `TRACE_NEW_FLOW`, ... (see [`kind`]).
    pub kind: u8,
    /// Reason code of an untranslated packet, `TRACE_REASON_TRANSLATED` otherwise.
    pub reason: u8,
    /// The packet's tuple as it arrived.
    pub key: &'a FlowKey,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// Address and port written into the packet.
    pub target: (&'a [u8; 16], u16),
    /// Service and backend ids.
    pub ids: (u32, u32),
    /// The program's verdict.
    pub action: u32,
    /// Ingress interface.
    pub ifindex: u32,
}

/// The event kind of a translated packet going `dir`.
#[inline(always)]
pub fn kind(dir: Direction) -> u8 {
    match dir {
        Direction::Request { new_flow: true } => TRACE_NEW_FLOW,
        Direction::Request { new_flow: false } => TRACE_ESTABLISHED,
        Direction::Reply { .. } => TRACE_REPLY,
    }
}

/// `TRACE_HOOK_*` of the context type.
#[inline(always)]
pub fn hook<C: Ctx>() -> u8 {
    match C::HOOK {
        Hook::Xdp => TRACE_HOOK_XDP,
        Hook::Tc => TRACE_HOOK_TC,
    }
}

/// Counts a packet to service `service_id` that is not translated (`reason`: refused, passed to
/// the proxy or the stack, dropped), reports it when tracing matches, and returns `action`.
#[inline(always)]
pub fn untranslated<C: Ctx>(
    ctx: &C,
    key: &FlowKey,
    tcp_flags: u8,
    service_id: u32,
    reason: u32,
    action: u32,
) -> u32 {
    emit(Decision {
        hook: hook::<C>(),
        kind: TRACE_UNTRANSLATED,
        reason: reason as u8,
        key,
        tcp_flags,
        target: (&key.dst_addr, key.dst_port),
        ids: (service_id, u32::MAX),
        action,
        ifindex: ctx.ifindex(),
    });
    stats::verdict(reason, action)
}

/// Reports `d` when tracing is on and its filter matches.
#[inline(always)]
pub fn emit(d: Decision) {
    // SAFETY: a read of a `.rodata` constant the loader may have patched.
    if unsafe { core::ptr::read_volatile(&TRACE_AVAILABLE) } == 0 {
        return;
    }
    let Some(filter) = TRACE_FILTER.get(0) else {
        return;
    };
    let kind = d.kind;
    if filter.enabled == 0 || !matches(filter, &d, kind) {
        return;
    }
    let Some(mut entry) = TRACE_EVENTS.reserve::<TraceEvent>(0) else {
        // Ring full: userspace is behind; it learns from the gap in nothing but silence, which
        // is acceptable for a debugging aid (never block or slow the packet).
        return;
    };
    let slot = if kind == TRACE_NEW_FLOW {
        select::service(d.key)
            .filter(|svc| svc.table_size != 0)
            .map(|svc| select::slot(d.key, &svc))
            .unwrap_or(u32::MAX)
    } else {
        u32::MAX
    };
    entry.write(TraceEvent {
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        key: *d.key,
        target_addr: *d.target.0,
        target_port: d.target.1,
        hook: d.hook,
        kind,
        tcp_flags: d.tcp_flags,
        reason: d.reason,
        _pad: [0; 2],
        service_id: d.ids.0,
        backend_id: d.ids.1,
        slot,
        action: d.action,
        ifindex: d.ifindex,
        _pad2: 0,
    });
    entry.submit(0);
}

#[inline(always)]
fn matches(f: &TraceFilter, d: &Decision, kind: u8) -> bool {
    // Requests: client -> service address. Replies: backend -> client, the service address is
    // what gets restored.
    let (client_addr, client_port, service_addr, service_port) = if kind == TRACE_REPLY {
        (&d.key.dst_addr, d.key.dst_port, d.target.0, d.target.1)
    } else {
        (
            &d.key.src_addr,
            d.key.src_port,
            &d.key.dst_addr,
            d.key.dst_port,
        )
    };
    (f.fields & TRACE_MATCH_CLIENT_ADDR == 0 || same(&f.client_addr, client_addr))
        && (f.fields & TRACE_MATCH_CLIENT_PORT == 0 || f.client_port == client_port)
        && (f.fields & TRACE_MATCH_SERVICE_ADDR == 0 || same(&f.service_addr, service_addr))
        && (f.fields & TRACE_MATCH_SERVICE_PORT == 0 || f.service_port == service_port)
        && (f.fields & TRACE_MATCH_BACKEND == 0 || f.backend_id == d.ids.1)
}

/// Address equality in two 8-byte loads (a slice compare would call `bcmp`, which BPF lacks).
#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr() as *const u64, b.as_ptr() as *const u64);
    // SAFETY: both point at 16 readable bytes.
    unsafe {
        core::ptr::read_unaligned(a) == core::ptr::read_unaligned(b)
            && core::ptr::read_unaligned(a.add(1)) == core::ptr::read_unaligned(b.add(1))
    }
}
