//! Address and port rewrites with their checksum updates, and the TTL / hop-limit decrement done
//! when the program forwards the packet itself.
//!
//! The rewrite is the same for every hook: the fields are written in place and each checksum
//! that covers them is updated through the context ([`Packet::l3_csum_replace`] and
//! [`Packet::l4_csum_replace`]), which knows whether the hook sees a frame with complete
//! checksums (XDP) or an skb whose checksum state the kernel tracks (TC). Every access re-derives
//! its pointer through the `parse` accessors: a TC checksum helper invalidates earlier ones.

use mesh_common::{FAMILY_IPV4, PROTO_UDP};
use network_types::eth::EthHdr;

use crate::{
    ctx::Packet as Ctx,
    parse::{ipv4_header, ipv6_header, l4_csum_off, l4_ports, Packet},
};

/// Offset of the IPv4 header checksum in the frame.
const IPV4_CSUM_OFF: usize = EthHdr::LEN + 10;

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination: client -> service becomes client -> backend.
    Destination,
    /// Source: backend -> client becomes service -> client.
    Source,
}

/// Rewrites one end's address and port to `addr`/`port` (wire order), fixing the IPv4 header
/// checksum and the TCP/UDP checksum (whose pseudo-header covers the addresses).
#[inline(always)]
pub fn rewrite<C: Ctx>(
    ctx: &C,
    pkt: &Packet,
    side: Side,
    addr: &[u8; 16],
    port: u16,
) -> Result<(), ()> {
    let dst = side == Side::Destination;
    let (old_addr, old_port) = if dst {
        (&pkt.key.dst_addr, pkt.key.dst_port)
    } else {
        (&pkt.key.src_addr, pkt.key.src_port)
    };
    let udp = pkt.key.proto == PROTO_UDP;
    let csum_off = l4_csum_off(pkt);
    // SAFETY (all dereferences below): each pointer comes from a bounds-checked accessor.
    if pkt.key.family == FAMILY_IPV4 {
        let old4 = [old_addr[0], old_addr[1], old_addr[2], old_addr[3]];
        let new4 = [addr[0], addr[1], addr[2], addr[3]];
        let ip = ipv4_header(ctx)?;
        unsafe {
            if dst {
                (*ip).dst = new4;
            } else {
                (*ip).src = new4;
            }
        }
        let (old4, new4) = (u32::from_ne_bytes(old4), u32::from_ne_bytes(new4));
        ctx.l3_csum_replace(IPV4_CSUM_OFF, old4, new4, 4)?;
        ctx.l4_csum_replace(csum_off, old4, new4, 4, true, udp)?;
    } else {
        let ip = ipv6_header(ctx)?;
        unsafe {
            if dst {
                (*ip).dst = *addr;
            } else {
                (*ip).src = *addr;
            }
        }
        ctx.l4_csum_replace_addr6(csum_off, old_addr, addr, udp)?;
    }
    let ports = l4_ports(ctx, pkt)?;
    unsafe { (*ports)[if dst { 1 } else { 0 }] = port.to_ne_bytes() };
    ctx.l4_csum_replace(csum_off, old_port as u32, port as u32, 2, false, udp)
}

/// Decrements the TTL / hop limit, as a router must. The caller checked it is above 1.
#[inline(always)]
pub fn decrement_ttl<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<(), ()> {
    // SAFETY: pointers from bounds-checked accessors.
    if pkt.key.family == FAMILY_IPV4 {
        let ip = ipv4_header(ctx)?;
        let (old, new) = unsafe {
            let old = [(*ip).ttl, (*ip).proto];
            (*ip).ttl = old[0].wrapping_sub(1);
            (old, [old[0].wrapping_sub(1), old[1]])
        };
        ctx.l3_csum_replace(
            IPV4_CSUM_OFF,
            u16::from_ne_bytes(old) as u32,
            u16::from_ne_bytes(new) as u32,
            2,
        )?;
    } else {
        let ip = ipv6_header(ctx)?;
        unsafe { (*ip).hop_limit = (*ip).hop_limit.wrapping_sub(1) };
    }
    Ok(())
}
