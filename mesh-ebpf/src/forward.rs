//! Forwarding a translated packet: FIB lookup, then, when the hook may send it out there itself,
//! MAC rewrite, TTL decrement and the hook's transmit ([`Packet::transmit`]).
//!
//! Anything the hook cannot send itself goes to the stack already translated and with its TTL
//! untouched, because the stack decrements it when it forwards.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup,
};
use core::ptr::read_unaligned;

use mesh_common::{reason, FAMILY_IPV4};

use crate::{
    ctx::{Packet as Ctx, Route},
    nat,
    parse::{eth_header, ipv4_header, ipv6_header, l4_ports, Packet},
    stats::verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Routes the (already translated) packet and returns the hook's verdict.
///
/// `Err(())` only if the frame is shorter than parsing established, which cannot happen.
#[inline(always)]
pub fn forward<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<u32, ()> {
    // SAFETY: a plain C struct; all-zero is its documented "no options" state.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // The translated tuple is read back from the packet rather than kept in a second copy of
    // the flow key on the stack.
    // SAFETY (reads below): inside the IP and L4 headers checked during parsing.
    let ports = unsafe { *l4_ports(ctx, pkt)? };
    fib.l4_protocol = pkt.key.proto;
    fib.sport = u16::from_ne_bytes(ports[0]);
    fib.dport = u16::from_ne_bytes(ports[1]);
    if C::FIB_CHECKS_IP_LEN {
        fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    }
    fib.ifindex = ctx.ifindex();
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
            ctx.raw(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if !ctx.may_transmit(fib.ifindex) {
            return Ok(verdict(reason::PASS_STACK_FORWARDS, C::PASS));
        }
        nat::decrement_ttl(ctx, pkt)?;
        let eth = eth_header(ctx)?;
        // SAFETY: bounds-checked accessor.
        unsafe {
            (*eth).dst_addr = fib.dmac;
            (*eth).src_addr = fib.smac;
        }
        return Ok(ctx.transmit(Route::Resolved(&fib)));
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        if !C::RESOLVES_NEIGHBOURS || !ctx.may_transmit(fib.ifindex) {
            return Ok(verdict(reason::PASS_NO_NEIGHBOUR, C::PASS));
        }
        nat::decrement_ttl(ctx, pkt)?;
        return Ok(ctx.transmit(Route::NoNeighbour(&fib)));
    }
    Ok(verdict(reason::PASS_FIB_OTHER, C::PASS))
}
