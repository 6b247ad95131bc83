//! Address and port rewrites with incremental checksum updates, and the TTL / hop-limit
//! decrement done when XDP forwards the packet itself.
//!
//! Every access re-derives its pointer through the `parse` accessors (see `parse::Packet`);
//! parsing already proved the lengths, so those `Err(())` paths are unreachable in practice.

use aya_ebpf::programs::XdpContext;
use mesh_common::{FAMILY_IPV4, PROTO_UDP};

use crate::{
    csum::{self, Delta},
    parse::{ipv4_header, ipv6_header, l4_csum, l4_ports, Packet},
};

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
pub fn rewrite(
    ctx: &XdpContext,
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
    let mut l4 = Delta::new();
    l4.word(old_port, port);
    // SAFETY (all dereferences below): each pointer comes from a bounds-checked accessor.
    if pkt.key.family == FAMILY_IPV4 {
        let ip = ipv4_header(ctx)?;
        let old4 = [old_addr[0], old_addr[1], old_addr[2], old_addr[3]];
        let new4 = [addr[0], addr[1], addr[2], addr[3]];
        let mut ip_delta = Delta::new();
        ip_delta.bytes(&old4, &new4);
        l4.add(ip_delta);
        unsafe {
            if dst {
                (*ip).dst = new4;
            } else {
                (*ip).src = new4;
            }
            csum::update(&mut (*ip).check, ip_delta);
        }
    } else {
        let ip = ipv6_header(ctx)?;
        l4.bytes(old_addr, addr);
        unsafe {
            if dst {
                (*ip).dst = *addr;
            } else {
                (*ip).src = *addr;
            }
        }
    }
    let ports = l4_ports(ctx, pkt)?;
    unsafe { (*ports)[if dst { 1 } else { 0 }] = port.to_ne_bytes() };

    let udp = pkt.key.proto == PROTO_UDP;
    let field = l4_csum(ctx, pkt)?;
    let old_csum = unsafe { *field };
    if udp && old_csum == [0, 0] && pkt.key.family == FAMILY_IPV4 {
        // IPv4 UDP without a checksum stays without one.
        return Ok(());
    }
    let new = l4.apply(u16::from_ne_bytes(old_csum));
    // A computed UDP checksum of zero is sent as all ones (RFC 768; mandatory for IPv6).
    let new = if udp && new == 0 { 0xffff } else { new };
    unsafe { *field = new.to_ne_bytes() };
    Ok(())
}

/// Decrements the TTL / hop limit, as a router must. The caller checked it is above 1.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) -> Result<(), ()> {
    // SAFETY: pointers from bounds-checked accessors.
    unsafe {
        if pkt.key.family == FAMILY_IPV4 {
            let ip = ipv4_header(ctx)?;
            let old = [(*ip).ttl, (*ip).proto];
            let new = [old[0].wrapping_sub(1), old[1]];
            (*ip).ttl = new[0];
            let mut d = Delta::new();
            d.bytes(&old, &new);
            csum::update(&mut (*ip).check, d);
        } else {
            let ip = ipv6_header(ctx)?;
            (*ip).hop_limit = (*ip).hop_limit.wrapping_sub(1);
        }
    }
    Ok(())
}
