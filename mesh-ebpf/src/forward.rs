//! Forwarding a translated packet: FIB lookup, MAC rewrite, TTL decrement, XDP_TX/XDP_REDIRECT.
//!
//! Anything the FIB cannot fully resolve goes to the stack already translated and with its TTL
//! untouched, because the stack decrements it when it forwards.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use core::ptr::read_unaligned;

use mesh_common::{reason, FAMILY_IPV4};

use crate::{
    nat,
    parse::{eth_header, ipv4_header, ipv6_header, l4_ports, Packet},
    stats::verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Routes the (already translated) packet and returns the XDP verdict.
#[inline(always)]
///
/// `Err(())` only if the frame is shorter than parsing established, which cannot happen.
pub fn forward(ctx: &XdpContext, pkt: &Packet) -> Result<u32, ()> {
    // SAFETY: a plain C struct; all-zero is its documented "no options" state.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // The translated tuple is read back from the packet rather than kept in a second copy of
    // the flow key on the stack.
    // SAFETY (reads below): inside the IP and L4 headers checked during parsing.
    let ports = unsafe { *l4_ports(ctx, pkt)? };
    fib.l4_protocol = pkt.key.proto;
    fib.sport = u16::from_ne_bytes(ports[0]);
    fib.dport = u16::from_ne_bytes(ports[1]);
    fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    let ingress = ctx.ingress_ifindex() as u32;
    fib.ifindex = ingress;
    if pkt.key.family == FAMILY_IPV4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = pkt.tos;
        let ip = ipv4_header(ctx)?;
        unsafe {
            fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src);
            fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst);
        }
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_2.flowinfo = pkt.flowinfo;
        let ip = ipv6_header(ctx)?;
        unsafe {
            fib.__bindgen_anon_3.ipv6_src = read_unaligned((*ip).src.as_ptr() as *const [u32; 4]);
            fib.__bindgen_anon_4.ipv6_dst = read_unaligned((*ip).dst.as_ptr() as *const [u32; 4]);
        }
    }

    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        nat::decrement_ttl(ctx, pkt)?;
        let eth = eth_header(ctx)?;
        // SAFETY: bounds-checked accessor.
        unsafe {
            (*eth).dst_addr = fib.dmac;
            (*eth).src_addr = fib.smac;
        }
        if fib.ifindex == ingress {
            return Ok(verdict(reason::FORWARD_TX, xdp_action::XDP_TX));
        }
        // SAFETY: plain helper call; flags 0.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
        return Ok(verdict(reason::FORWARD_REDIRECT, action));
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(verdict(reason::PASS_NO_NEIGHBOUR, xdp_action::XDP_PASS));
    }
    Ok(verdict(reason::PASS_FIB_OTHER, xdp_action::XDP_PASS))
}
