//! Spoofed floods against a service address (the flood test and the soak's flood phase): raw
//! IPv4 packets from random sources in the test range, built with etherparse.

use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};

/// Sends `packets` spoofed packets to `vip`: a third each TCP SYN and TCP ACK to `tcp_port`
/// and UDP to `udp_port`, from pseudo-random sources in 198.19.0.0/16 (part of the
/// benchmarking range, routed nowhere) and random ports, different per `round`. Call it on a
/// thread inside the client's namespace. Returns how many were sent.
pub fn spoof(vip: Ipv4Addr, tcp_port: u16, udp_port: u16, packets: u32, round: u32) -> Result<u32> {
    // SAFETY: plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let vip_addr = vip;
    let target = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(vip_addr.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(round);
    let mut next = || {
        // xorshift64*: deterministic, different per round.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut sent = 0;
    let mut frame = Vec::with_capacity(64);
    for i in 0..packets {
        let r = next();
        let src = [198, 19, (r >> 8) as u8, (r >> 16) as u8];
        let sport = 1024 + (r >> 24) as u16 % 60_000;
        let builder = etherparse::PacketBuilder::ipv4(src, vip_addr.octets(), 64);
        frame.clear();
        let written = match i % 3 {
            0 => builder
                .tcp(sport, tcp_port, r as u32, 64_240)
                .syn()
                .write(&mut frame, &[]),
            1 => builder
                .tcp(sport, tcp_port, r as u32, 64_240)
                .ack((r >> 32) as u32)
                .write(&mut frame, &[]),
            _ => builder.udp(sport, udp_port).write(&mut frame, b"flood"),
        };
        written.context("building a flood packet")?;
        // SAFETY: `frame` and `target` outlive the call.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&target as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n == frame.len() as isize {
            sent += 1;
        }
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// `mesh_conntrack_events_total{event="<name>"}` in meshd's Prometheus text (0 when absent).
pub fn conntrack_event(text: &str, name: &str) -> u64 {
    crate::meshd::metric_value(text, "mesh_conntrack_events_total{", &format!("\"{name}\""))
        .unwrap_or(0)
}
