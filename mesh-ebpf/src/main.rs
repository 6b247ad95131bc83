//! mesh's packet programs: L4 service load balancing with per-connection NAT.
//!
//! One pipeline ([`pipeline::run`]) behind several entry points:
//! - `mesh_xdp`: XDP, for NICs whose driver runs XDP natively (the line-rate path);
//! - `mesh_tc`: TC ingress (tcx or cls_bpf) on an skb, for veth, bridge ports and anything
//!   where checksum offload state must be kept right;
//! - `mesh_xdp_pass`: the do-nothing XDP baseline for benchmarks.
//!
//! Each parses the packet, restores the service address on replies of tracked flows, pins
//! established flows to their backend, selects a backend with Maglev for new flows, and forwards
//! the translated packet itself when it can. Everything else goes to the stack untouched.
#![no_std]
#![no_main]
// Map keys and values are passed by reference on purpose: by value, LLVM keeps an extra copy
// on the 512-byte BPF stack (measured: +48 bytes).
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod csum;
mod ctx;
mod forward;
mod klog;
mod local;
mod maps;
mod nat;
mod parse;
mod pipeline;
mod select;
mod sock;
mod stats;
mod trace;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use mesh_common::reason;

use crate::stats::verdict;

/// Bytes of headers the pipeline reads at most (Ethernet, IPv6 with walked extension headers,
/// TCP), pulled into an skb's linear part when they are not there yet.
const TC_HEADROOM: u32 = 256;

#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    match pipeline::run(&ctx) {
        Ok(action) => action,
        // Only parsing fails in practice, and before anything was written; the rewrite and
        // forwarding steps re-check lengths parsing already established.
        Err(()) => verdict(reason::PASS_TRUNCATED, xdp_action::XDP_PASS),
    }
}

#[classifier]
pub fn mesh_tc(ctx: TcContext) -> i32 {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < len && linear < TC_HEADROOM {
        // Headers outside the linear part (rare: most drivers and veth put them there).
        let _ = ctx.pull_data(if len < TC_HEADROOM { len } else { TC_HEADROOM });
    }
    match pipeline::run(&ctx) {
        Ok(action) => action as i32,
        Err(()) => verdict(reason::PASS_TRUNCATED, TC_ACT_OK as u32) as i32,
    }
}

#[xdp]
pub fn mesh_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
