//! mesh's XDP programs: L4 service load balancing with per-connection NAT.
//!
//! `mesh_xdp` parses the frame, restores the service address on replies of tracked flows,
//! pins established flows to their backend, selects a backend with Maglev for new flows, and
//! forwards the translated packet itself when the FIB allows. Everything else goes to the stack
//! untouched. `mesh_xdp_pass` is the do-nothing baseline.
#![no_std]
#![no_main]
// Map keys and values are passed by reference on purpose: by value, LLVM keeps an extra copy
// on the 512-byte BPF stack (measured: +48 bytes).
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod csum;
mod forward;
mod local;
mod maps;
mod nat;
mod parse;
mod select;
mod sock;
mod stats;
mod trace;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use mesh_common::{reason, FLOW_REPLY, SERVICE_FLAG_L7_PROXY};

use crate::{
    nat::Side,
    parse::Frame,
    stats::{verdict, Direction},
};

#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    match try_mesh_xdp(&ctx) {
        Ok(action) => action,
        // Only parsing fails in practice, and before anything was written; the rewrite and
        // forwarding steps re-check lengths parsing already established.
        Err(()) => verdict(reason::PASS_TRUNCATED, xdp_action::XDP_PASS),
    }
}

#[xdp]
pub fn mesh_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_mesh_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = match parse::parse(ctx)? {
        Frame::Flow(pkt) => pkt,
        Frame::Pass(why) => return Ok(verdict(why, xdp_action::XDP_PASS)),
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
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
                return Ok(verdict(reason::PASS_NOT_SERVICE, xdp_action::XDP_PASS));
            };
            if svc.flags & SERVICE_FLAG_L7_PROXY != 0 {
                return Ok(verdict(reason::PASS_L7_PROXY, xdp_action::XDP_PASS));
            }
            // A connection the proxy still holds from before this service moved to the kernel
            // path: balancing it as a new flow would reset it.
            if pkt.key.proto == mesh_common::PROTO_TCP
                && tcp_flags & parse::TCP_FLAG_SYN == 0
                && local::is_local_connection(ctx, &pkt.key)
            {
                return Ok(verdict(reason::PASS_L7_PROXY, xdp_action::XDP_PASS));
            }
            if svc.table_size == 0 {
                return Ok(verdict(reason::REFUSED_NO_BACKEND, xdp_action::XDP_PASS));
            }
            // Checked before any state is created, like on the tracked paths below.
            if pkt.ttl <= 1 {
                return Ok(ttl_expired());
            }
            let Some((backend_id, backend)) = select::backend(&pkt.key, &svc) else {
                return Ok(verdict(reason::DROP_INTERNAL, xdp_action::XDP_DROP));
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
        return Ok(ttl_expired());
    }

    nat::rewrite(ctx, &pkt, side, &addr, port)?;
    stats::traffic(service_id, backend_id, frame_len, dir);
    let action = forward::forward(ctx, &pkt)?;
    trace::emit(trace::Decision {
        hook: mesh_common::TRACE_HOOK_XDP,
        dir,
        key: &pkt.key,
        tcp_flags,
        target: (&addr, port),
        ids: (service_id, backend_id),
        action,
        ifindex: ctx.ingress_ifindex() as u32,
    });
    Ok(action)
}

#[inline(always)]
fn ttl_expired() -> u32 {
    verdict(reason::PASS_TTL_EXPIRED, xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
