//! Test frames: a small description of an Ethernet/IP/TCP-or-UDP frame, built with etherparse
//! (which computes every checksum itself), and an independent checksum verifier for frames the
//! program under test produced.
//!
//! Expected output frames are built from the same description with the translated addresses, so
//! a golden test compares the program's incremental checksum updates against etherparse's full
//! recomputation byte for byte.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, ensure, Context, Result};
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, NetSlice, SlicedPacket, TcpHeader,
    TransportSlice, UdpHeader,
};

/// Source MAC of every test frame (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of every test frame.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Transport protocol of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with the given flags (`syn`).
    Tcp { syn: bool },
    /// UDP.
    Udp,
}

/// Everything that varies between the golden frames.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub l4: L4,
    /// TTL or hop limit.
    pub ttl: u8,
    pub payload: Vec<u8>,
    /// Raw IPv4 options (a multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment: (more fragments, offset in 8-byte units).
    pub ipv4_fragment: Option<(bool, u16)>,
    /// IPv6: insert a hop-by-hop options header.
    pub ipv6_hop_by_hop: bool,
    /// IPv6: insert a destination options header.
    pub ipv6_dest_opts: bool,
    /// IPv6: insert a fragment header (first fragment, more fragments).
    pub ipv6_fragment: bool,
    /// UDP over IPv4: send without a checksum (field 0).
    pub udp_no_checksum: bool,
    /// TCP: set the RST flag.
    pub tcp_rst: bool,
}

impl Frame {
    /// A TCP segment from `src` to `dst` with a short payload.
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Frame {
        Frame {
            src_mac: CLIENT_MAC,
            dst_mac: ROUTER_MAC,
            src,
            dst,
            l4: L4::Tcp { syn: true },
            ttl: 64,
            payload: b"mesh golden packet".to_vec(),
            ipv4_options: Vec::new(),
            ipv4_fragment: None,
            ipv6_hop_by_hop: false,
            ipv6_dest_opts: false,
            ipv6_fragment: false,
            udp_no_checksum: false,
            tcp_rst: false,
        }
    }

    /// A UDP datagram from `src` to `dst` with a short payload.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Frame {
        Frame {
            l4: L4::Udp,
            ..Frame::tcp(src, dst)
        }
    }

    /// The same frame with another destination (what destination NAT should produce).
    pub fn with_dst(&self, dst: SocketAddr) -> Frame {
        Frame {
            dst,
            ..self.clone()
        }
    }

    /// The same frame with another source (what reverse NAT should produce).
    pub fn with_src(&self, src: SocketAddr) -> Frame {
        Frame {
            src,
            ..self.clone()
        }
    }

    /// Serialises the frame with correct lengths and checksums.
    pub fn build(&self) -> Result<Vec<u8>> {
        let proto = match self.l4 {
            L4::Tcp { .. } => IpNumber::TCP,
            L4::Udp => IpNumber::UDP,
        };
        let (sport, dport) = (self.src.port(), self.dst.port());
        let mut tcp = TcpHeader::new(sport, dport, 0x0102_0304, 64_240);
        if let L4::Tcp { syn } = self.l4 {
            tcp.syn = syn;
            tcp.ack = !syn;
            tcp.rst = self.tcp_rst;
        }
        let udp_len = (UdpHeader::LEN + self.payload.len()) as u16;
        let mut udp = UdpHeader {
            source_port: sport,
            destination_port: dport,
            length: udp_len,
            checksum: 0,
        };
        let l4_len = match self.l4 {
            L4::Tcp { .. } => tcp.header_len() + self.payload.len(),
            L4::Udp => udp_len as usize,
        };

        let mut out = Vec::new();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                Ethernet2Header {
                    source: self.src_mac,
                    destination: self.dst_mac,
                    ether_type: EtherType::IPV4,
                }
                .write(&mut out)?;
                let mut ip = Ipv4Header::new(0, self.ttl, proto, src.octets(), dst.octets())?;
                ip.identification = 0x4d45;
                ip.options = Ipv4Options::try_from(&self.ipv4_options[..])
                    .map_err(|e| anyhow::anyhow!("bad IPv4 options: {e:?}"))?;
                ip.set_payload_len(l4_len)?;
                if let Some((more, offset)) = self.ipv4_fragment {
                    ip.dont_fragment = false;
                    ip.more_fragments = more;
                    ip.fragment_offset = IpFragOffset::try_new(offset)?;
                }
                ip.header_checksum = ip.calc_header_checksum();
                ip.write(&mut out)?;
                match self.l4 {
                    L4::Tcp { .. } => {
                        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &self.payload)?;
                        tcp.write(&mut out)?;
                    }
                    L4::Udp => {
                        if !self.udp_no_checksum {
                            udp.checksum = udp.calc_checksum_ipv4(&ip, &self.payload)?;
                        }
                        udp.write(&mut out)?;
                    }
                }
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                Ethernet2Header {
                    source: self.src_mac,
                    destination: self.dst_mac,
                    ether_type: EtherType::IPV6,
                }
                .write(&mut out)?;
                // The chain, in RFC 8200 order, each header naming the next.
                let mut chain: Vec<(IpNumber, Vec<u8>)> = Vec::new();
                if self.ipv6_hop_by_hop {
                    // PadN option filling the 6 payload bytes.
                    let opts = [1u8, 4, 0, 0, 0, 0];
                    let h = Ipv6RawExtHeader::new_raw(IpNumber::TCP, &opts)?;
                    chain.push((IpNumber::IPV6_HEADER_HOP_BY_HOP, h.to_bytes().to_vec()));
                }
                if self.ipv6_dest_opts {
                    // 14 bytes of options: one PadN covering all, header length 1 (16 bytes).
                    let mut opts = vec![1u8, 12];
                    opts.extend_from_slice(&[0; 12]);
                    let h = Ipv6RawExtHeader::new_raw(IpNumber::TCP, &opts)?;
                    chain.push((IpNumber::IPV6_DESTINATION_OPTIONS, h.to_bytes().to_vec()));
                }
                if self.ipv6_fragment {
                    let h =
                        Ipv6FragmentHeader::new(IpNumber::TCP, IpFragOffset::ZERO, true, 0x4d45);
                    chain.push((IpNumber::IPV6_FRAGMENTATION_HEADER, h.to_bytes().to_vec()));
                }
                // Patch each header's next-header byte (always the first byte).
                for i in 0..chain.len() {
                    let next = chain.get(i + 1).map(|(n, _)| *n).unwrap_or(proto);
                    chain[i].1[0] = next.0;
                }
                let ext_len: usize = chain.iter().map(|(_, b)| b.len()).sum();
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(0x12345)?,
                    payload_length: (ext_len + l4_len) as u16,
                    next_header: chain.first().map(|(n, _)| *n).unwrap_or(proto),
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                ip.write(&mut out)?;
                for (_, bytes) in &chain {
                    out.extend_from_slice(bytes);
                }
                match self.l4 {
                    L4::Tcp { .. } => {
                        tcp.checksum = tcp.calc_checksum_ipv6(&ip, &self.payload)?;
                        tcp.write(&mut out)?;
                    }
                    L4::Udp => {
                        udp.checksum = udp.calc_checksum_ipv6(&ip, &self.payload)?;
                        udp.write(&mut out)?;
                    }
                }
            }
            _ => bail!("source and destination must be the same address family"),
        }
        out.extend_from_slice(&self.payload);
        Ok(out)
    }
}

/// An ARP request frame (not IP).
pub fn arp_request() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    // htype 1, ptype IPv4, hlen 6, plen 4, op request.
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[198, 18, 0, 1]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[198, 18, 0, 2]);
    out
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of `frame` from scratch and
/// fails if any stored value differs (an IPv4 UDP checksum of 0, "none", is accepted).
pub fn verify_checksums(frame: &[u8]) -> Result<()> {
    let sliced = SlicedPacket::from_ethernet(frame).context("parsing the frame")?;
    let transport = sliced.transport.context("no transport header")?;
    match sliced.net.context("no IP header")? {
        NetSlice::Ipv4(ipv4) => {
            let header = ipv4.header().to_header();
            ensure!(
                header.header_checksum == header.calc_header_checksum(),
                "IPv4 header checksum {:#06x}, recomputed {:#06x}",
                header.header_checksum,
                header.calc_header_checksum()
            );
            match transport {
                TransportSlice::Tcp(tcp) => {
                    let want = tcp.to_header().calc_checksum_ipv4(&header, tcp.payload())?;
                    ensure!(
                        tcp.checksum() == want,
                        "TCP checksum {:#06x}, recomputed {want:#06x}",
                        tcp.checksum()
                    );
                }
                TransportSlice::Udp(udp) => {
                    if udp.checksum() != 0 {
                        let want = udp.to_header().calc_checksum_ipv4(&header, udp.payload())?;
                        ensure!(
                            udp.checksum() == want,
                            "UDP checksum {:#06x}, recomputed {want:#06x}",
                            udp.checksum()
                        );
                    }
                }
                other => bail!("unexpected transport {other:?}"),
            }
        }
        NetSlice::Ipv6(ipv6) => {
            let header = ipv6.header().to_header();
            match transport {
                TransportSlice::Tcp(tcp) => {
                    let want = tcp.to_header().calc_checksum_ipv6(&header, tcp.payload())?;
                    ensure!(
                        tcp.checksum() == want,
                        "TCP checksum {:#06x}, recomputed {want:#06x}",
                        tcp.checksum()
                    );
                }
                TransportSlice::Udp(udp) => {
                    ensure!(udp.checksum() != 0, "IPv6 UDP checksum 0");
                    let want = udp.to_header().calc_checksum_ipv6(&header, udp.payload())?;
                    ensure!(
                        udp.checksum() == want,
                        "UDP checksum {:#06x}, recomputed {want:#06x}",
                        udp.checksum()
                    );
                }
                other => bail!("unexpected transport {other:?}"),
            }
        }
        other => bail!("unexpected network layer {other:?}"),
    }
    Ok(())
}
