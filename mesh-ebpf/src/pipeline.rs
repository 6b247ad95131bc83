//! The load-balancing pipeline, one copy for every packet hook: parse, connection table,
//! Maglev selection for new flows, NAT, forward.
//!
//! [`run`] is generic over the hook's context ([`Packet`](crate::ctx::Packet)); the XDP and TC
//! entry points in `main.rs` only call it. What differs between hooks (checksum updates, how a
//! packet leaves, verdict codes) is behind that trait, so no stage exists twice.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{reason, FlowKey, FLOW_REPLY, SERVICE_FLAG_L7_PROXY};

use crate::{
    conntrack,
    ctx::Packet as Ctx,
    forward, klog, local,
    nat::{self, Side},
    parse::{self, Frame},
    select,
    stats::{self, verdict, Direction},
    trace,
};

/// Runs the pipeline on one packet and returns the hook's verdict. `Err(())` means the packet
/// ended before a header parsing needs (counted as truncated by the caller).
#[inline(always)]
pub fn run<C: Ctx>(ctx: &C) -> Result<u32, ()> {
    let pkt = match parse::parse(ctx)? {
        Frame::Flow(pkt) => pkt,
        Frame::Pass(why) => return Ok(verdict(why, C::PASS)),
    };
    let frame_len = ctx.len() as u64;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };

    let tcp_flags = parse::tcp_flags(ctx, &pkt);
    // A bare SYN opens a new connection even when an earlier one on the same client port left
    // its entry behind: it is balanced by the rules in force now, not the old choice.
    let opening = tcp_flags & (parse::TCP_FLAG_SYN | parse::TCP_FLAG_ACK) == parse::TCP_FLAG_SYN;

    // One lookup whichever way the packet goes: a reply from a backend finds its reverse-NAT
    // entry, a packet of an established flow its backend.
    let tracked = conntrack::lookup(&pkt.key, now);
    // SAFETY: map values stay valid for the whole run.
    let tracked = tracked.map(|state| unsafe { &*state });
    let (side, addr, port, service_id, backend_id, dir) = match tracked {
        Some(state) if state.direction == FLOW_REPLY => (
            Side::Source,
            state.addr,
            state.port,
            state.service_id,
            state.backend_id,
            // A reset from the backend is how L4 health is judged (refused or broken).
            Direction::Reply {
                reset: tcp_flags & parse::TCP_FLAG_RST != 0,
            },
        ),
        Some(state) if !opening => (
            Side::Destination,
            state.addr,
            state.port,
            state.service_id,
            state.backend_id,
            Direction::Request { new_flow: false },
        ),
        _ => {
            // A bare SYN on a client port whose earlier connection left its entry: that entry
            // is stale. Drop it now, or the rest of this new connection would follow the old
            // choice (fatal when the service has moved to the proxy since).
            if tracked.is_some() {
                conntrack::forget(&pkt.key);
            }
            let Some(svc) = select::service(&pkt.key) else {
                return Ok(verdict(reason::PASS_NOT_SERVICE, C::PASS));
            };
            // A packet to this service that is not balanced: counted, traced with its reason.
            macro_rules! unbalanced {
                ($why:expr, $action:expr) => {{
                    let why = $why;
                    return Ok(trace::untranslated(
                        ctx,
                        &pkt.key,
                        tcp_flags,
                        svc.service_id,
                        why,
                        $action,
                    ));
                }};
            }
            if svc.flags & SERVICE_FLAG_L7_PROXY != 0 {
                // Traced once per connection (its SYN): the proxy traces each request.
                if !opening {
                    return Ok(verdict(reason::PASS_L7_PROXY, C::PASS));
                }
                unbalanced!(reason::PASS_L7_PROXY, C::PASS);
            }
            // A connection the proxy still holds from before this service moved to the kernel
            // path: balancing it as a new flow would reset it.
            if pkt.key.proto == mesh_common::PROTO_TCP
                && tcp_flags & parse::TCP_FLAG_SYN == 0
                && local::is_local_connection(ctx, &pkt.key)
            {
                return Ok(verdict(reason::PASS_L7_PROXY, C::PASS));
            }
            if svc.table_size == 0 {
                klog::refused(&pkt.key, svc.service_id);
                unbalanced!(reason::REFUSED_NO_BACKEND, C::PASS);
            }
            // Checked before any state is created, like on the tracked paths below.
            if pkt.ttl <= 1 {
                unbalanced!(reason::PASS_TTL_EXPIRED, C::PASS);
            }
            let Some((backend_id, backend)) = select::backend(&pkt.key, &svc) else {
                klog::inconsistent(&pkt.key, svc.service_id);
                unbalanced!(reason::DROP_INTERNAL, C::DROP);
            };
            conntrack::track(&pkt.key, &backend, svc.service_id, backend_id, now);
            (
                Side::Destination,
                backend.addr,
                backend.port,
                svc.service_id,
                backend_id,
                Direction::Request { new_flow: true },
            )
        }
    };
    // Decided before the packet changes, so the stack sees the original packet and sends the
    // ICMP time exceeded itself.
    if pkt.ttl <= 1 {
        return Ok(ttl_expired(ctx, &pkt.key, tcp_flags, service_id));
    }

    nat::rewrite(ctx, &pkt, side, &addr, port)?;
    stats::traffic(service_id, backend_id, frame_len, dir);
    let action = forward::forward(ctx, &pkt)?;
    trace::emit(trace::Decision {
        hook: trace::hook::<C>(),
        kind: trace::kind(dir),
        reason: mesh_common::TRACE_REASON_TRANSLATED,
        key: &pkt.key,
        tcp_flags,
        target: (&addr, port),
        ids: (service_id, backend_id),
        action,
        ifindex: ctx.ifindex(),
    });
    Ok(action)
}

/// The stack answers an expiring TTL (ICMP time exceeded); traced like any untranslated packet.
#[inline(always)]
fn ttl_expired<C: Ctx>(ctx: &C, key: &FlowKey, tcp_flags: u8, service_id: u32) -> u32 {
    let why = reason::PASS_TTL_EXPIRED;
    trace::untranslated(ctx, key, tcp_flags, service_id, why, C::PASS)
}
