//! Header parsing: Ethernet, IPv4 (with options), IPv6 (with a bounded extension-header walk),
//! and the fixed part of TCP/UDP.
//!
//! Parsing never writes to the packet. It either yields a [`Packet`] (the tuple plus the offsets
//! of headers proven complete), or says why the frame goes to the stack. The accessors at the end
//! are how later stages reach those headers.

use mesh_common::{reason, FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};
use network_types::eth::EthHdr;

use crate::ctx::Packet as Ctx;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up; each step is a constant-bounded loop iteration.
const IPV6_MAX_EXT_HEADERS: usize = 4;

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum inside the TCP and UDP headers.
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;

/// IPv4 header without options. Byte arrays only, so any offset is a valid place to read it
/// and no field has a validity invariant (unlike an enum for the protocol).
#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// Fixed IPv6 header.
#[repr(C)]
pub struct Ipv6Hdr {
    pub vcf: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The two bytes every walked IPv6 extension header starts with.
#[repr(C)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    /// Length in 8-octet units, not counting the first 8 octets.
    len: u8,
}

/// A TCP or UDP packet we may translate.
///
/// It holds offsets, not pointers: later stages branch on `key.family` and `key.proto`, but the
/// verifier does not connect those bytes with the lengths checked on each parsing path, so every
/// access re-derives its pointer with [`ptr_at`] (the accessors below).
pub struct Packet {
    /// The packet's own tuple, as on the wire.
    pub key: FlowKey,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    /// IP total length (IPv4 `tot_len`, IPv6 40 + payload length), host order, for the FIB MTU check.
    pub ip_len: u16,
    /// TTL or hop limit as received.
    pub ttl: u8,
    /// IPv4 TOS, for the FIB lookup.
    pub tos: u8,
    /// IPv6 traffic class and flow label (network order), for the FIB lookup.
    pub flowinfo: u32,
}

/// What parsing decided.
pub enum Frame {
    /// TCP/UDP over IPv4/IPv6 with all headers present: a candidate for load balancing.
    Flow(Packet),
    /// Not ours: hand to the stack untouched, counted under this reason.
    Pass(u32),
}

/// Returns a pointer to `T` at `offset` only if the whole `T` lies inside the frame.
///
/// `Err(())` means the frame is truncated at that point.
#[inline(always)]
pub fn ptr_at<C: Ctx, T>(ctx: &C, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// Parses the frame. `Err(())` means it ended before a header we need (PASS_TRUNCATED).
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C) -> Result<Frame, ()> {
    let eth = eth_header(ctx)?;
    // SAFETY: `eth` was bounds-checked by `ptr_at`; `ether_type` is a plain u16.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Ok(Frame::Pass(reason::PASS_NOT_IP)),
    }
}

#[inline(always)]
fn parse_ipv4<C: Ctx>(ctx: &C) -> Result<Frame, ()> {
    let ip = ipv4_header(ctx)?;
    // SAFETY: all 20 bytes of the fixed header are inside the frame.
    let hdr = unsafe { &*ip };
    if hdr.vihl >> 4 != 4 {
        return Ok(Frame::Pass(reason::PASS_UNSUPPORTED_PROTOCOL));
    }
    // The mask keeps the offset provably <= 60 for the verifier.
    let ihl = ((hdr.vihl & 0x0f) as usize) << 2;
    if ihl < core::mem::size_of::<Ipv4Hdr>() {
        return Err(());
    }
    // MF set or a non-zero offset: ports are missing or belong to another fragment.
    if u16::from_be_bytes(hdr.frag) & 0x3fff != 0 {
        return Ok(Frame::Pass(reason::PASS_FRAGMENT));
    }
    let proto = hdr.proto;
    let l4_len = match proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return Ok(Frame::Pass(reason::PASS_UNSUPPORTED_PROTOCOL)),
    };
    let tot_len = u16::from_be_bytes(hdr.tot_len);
    // A datagram shorter than its own headers is malformed; let the stack drop it.
    if (tot_len as usize) < ihl + l4_len {
        return Err(());
    }
    let l4_off = EthHdr::LEN + ihl;
    let l4 = l4_ptr(ctx, l4_off, proto)?;
    // The IP datagram must be entirely inside the frame (Ethernet padding after it is fine),
    // otherwise we would rewrite and count a packet the stack will discard.
    check_len(ctx, EthHdr::LEN, tot_len as usize)?;

    let mut key = FlowKey {
        family: FAMILY_IPV4,
        proto,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&hdr.src);
    key.dst_addr[..4].copy_from_slice(&hdr.dst);
    fill_ports(&mut key, l4);
    Ok(Frame::Flow(Packet {
        key,
        l4_off,
        ip_len: tot_len,
        ttl: hdr.ttl,
        tos: hdr.tos,
        flowinfo: 0,
    }))
}

#[inline(always)]
fn parse_ipv6<C: Ctx>(ctx: &C) -> Result<Frame, ()> {
    let ip = ipv6_header(ctx)?;
    // SAFETY: all 40 bytes of the fixed header are inside the frame.
    let hdr = unsafe { &*ip };
    if hdr.vcf[0] >> 4 != 6 {
        return Ok(Frame::Pass(reason::PASS_UNSUPPORTED_PROTOCOL));
    }
    let payload_len = u16::from_be_bytes(hdr.payload_len);
    let mut next = hdr.next_hdr;
    let mut off = EthHdr::LEN + core::mem::size_of::<Ipv6Hdr>();
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: *const Ipv6ExtHdr = ptr_at(ctx, off)?;
                // SAFETY: bounds-checked above.
                let ext = unsafe { &*ext };
                next = ext.next_hdr;
                off += (ext.len as usize + 1) * 8;
            }
            _ => break,
        }
    }
    let proto = match next {
        PROTO_TCP | PROTO_UDP => next,
        IPV6_FRAGMENT => return Ok(Frame::Pass(reason::PASS_FRAGMENT)),
        _ => return Ok(Frame::Pass(reason::PASS_UNSUPPORTED_PROTOCOL)),
    };
    let l4 = l4_ptr(ctx, off, proto)?;
    let ip_len = core::mem::size_of::<Ipv6Hdr>() + payload_len as usize;
    // Extension headers and the L4 header must lie inside the declared payload.
    let l4_len = if proto == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if off - EthHdr::LEN + l4_len > ip_len {
        return Err(());
    }
    check_len(ctx, EthHdr::LEN, ip_len)?;

    let mut key = FlowKey {
        src_addr: hdr.src,
        dst_addr: hdr.dst,
        family: FAMILY_IPV6,
        proto,
        ..FlowKey::default()
    };
    fill_ports(&mut key, l4);
    Ok(Frame::Flow(Packet {
        key,
        l4_off: off,
        ip_len: ip_len as u16,
        ttl: hdr.hop_limit,
        tos: 0,
        // Traffic class and flow label, network order, as the FIB lookup expects.
        flowinfo: u32::from_ne_bytes(hdr.vcf) & u32::from_be(0x0fff_ffff),
    }))
}

/// The Ethernet header.
#[inline(always)]
pub fn eth_header<C: Ctx>(ctx: &C) -> Result<*mut EthHdr, ()> {
    ptr_at(ctx, 0)
}

/// The fixed IPv4 header.
#[inline(always)]
pub fn ipv4_header<C: Ctx>(ctx: &C) -> Result<*mut Ipv4Hdr, ()> {
    ptr_at(ctx, EthHdr::LEN)
}

/// The IPv6 header.
#[inline(always)]
pub fn ipv6_header<C: Ctx>(ctx: &C) -> Result<*mut Ipv6Hdr, ()> {
    ptr_at(ctx, EthHdr::LEN)
}

/// Source and destination port of the L4 header, wire order.
#[inline(always)]
pub fn l4_ports<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<*mut [[u8; 2]; 2], ()> {
    ptr_at(ctx, pkt.l4_off)
}

/// Offset of the TCP or UDP checksum field.
#[inline(always)]
pub fn l4_csum_off(pkt: &Packet) -> usize {
    let off = if pkt.key.proto == PROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    pkt.l4_off + off
}

/// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...); 0 for UDP or a frame too short.
#[inline(always)]
pub fn tcp_flags<C: Ctx>(ctx: &C, pkt: &Packet) -> u8 {
    if pkt.key.proto != PROTO_TCP {
        return 0;
    }
    match ptr_at::<_, [u8; 14]>(ctx, pkt.l4_off) {
        // SAFETY: bounds-checked by `ptr_at`.
        Ok(hdr) => unsafe { (*hdr)[13] },
        Err(()) => 0,
    }
}

/// TCP flag: the sender opens a connection.
pub const TCP_FLAG_SYN: u8 = 0x02;
/// TCP flag: the sender resets the connection.
pub const TCP_FLAG_RST: u8 = 0x04;
/// TCP flag: the acknowledgement number is valid (every segment after the first SYN).
pub const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn l4_ptr<C: Ctx>(ctx: &C, off: usize, proto: u8) -> Result<*mut u8, ()> {
    if proto == PROTO_TCP {
        Ok(ptr_at::<_, [u8; TCP_HDR_LEN]>(ctx, off)? as *mut u8)
    } else {
        Ok(ptr_at::<_, [u8; UDP_HDR_LEN]>(ctx, off)? as *mut u8)
    }
}

/// `Err(())` unless `len` bytes starting at `off` are inside the packet (for an skb, possibly
/// beyond its linear part).
#[inline(always)]
fn check_len<C: Ctx>(ctx: &C, off: usize, len: usize) -> Result<(), ()> {
    if off + len > ctx.len() {
        return Err(());
    }
    Ok(())
}

#[inline(always)]
fn fill_ports(key: &mut FlowKey, l4: *mut u8) {
    // SAFETY: the L4 header was bounds-checked; ports are its first four bytes.
    let ports = unsafe { *(l4 as *const [u8; 4]) };
    key.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    key.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
}
