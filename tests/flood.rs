//! Floods against the connection table: spoofed SYNs, ACKs and UDP datagrams from random
//! sources, many times the table's capacity, with weight changes during and after the flood.
//! Established connections must keep their backend (never re-balanced because a flood evicted
//! their entry), and new connections must follow the weights in force.

use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    meshd::{metric_value, scrape_metrics, Meshd},
    rules::{echo_split, meshd_args, VIP_V4},
    servers::{tcp_connect, tcp_echo},
    traffic::{tcp_split, vip, EchoSetup},
};

/// Established-flow capacity given to meshd: 500 connections fit (two entries each), the flood
/// is 30 times larger.
const CONNTRACK_FLOWS: u32 = 2048;
/// Spoofed packets per flood round (two rounds).
const FLOOD_PACKETS: u32 = 30_000;
const ESTABLISHED: usize = 500;

#[test]
fn established_connections_survive_a_spoofed_flood_and_weight_changes() -> Result<()> {
    let setup = EchoSetup::new(Some([100, 0, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let mut args = meshd_args(topo, rules);
    args.extend(["--conntrack-entries".into(), CONNTRACK_FLOWS.to_string()]);
    let mut meshd = Meshd::start(&topo.node, &args)?;

    let mut streams = topo.client.run(|| -> Result<Vec<_>> {
        (0..ESTABLISHED).map(|_| tcp_connect(vip(8080))).collect()
    })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("before the flood {n}").as_bytes())?;
    }

    // Round 1 of the flood, then a weight change while round 2 runs.
    flood(topo, 1)?;
    std::thread::scope(|scope| -> Result<()> {
        let round2 = scope.spawn(|| flood(topo, 2));
        rules.write("vs.yaml", &echo_split([0, 100, 0]))?;
        ensure!(
            meshd.reload()?.contains("rules reloaded"),
            "{}",
            meshd.log()
        );
        round2
            .join()
            .map_err(|_| anyhow::anyhow!("flooder panicked"))?
    })?;
    // And another change after the flood.
    rules.write("vs.yaml", &echo_split([0, 0, 100]))?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "{}",
        meshd.log()
    );

    // Every established connection still echoes, on its own stream to v1.
    let mut broken = Vec::new();
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        if let Err(e) = tcp_echo(stream, format!("after the flood {n}").as_bytes()) {
            broken.push(format!("{n}: {e:#}"));
        }
    }
    ensure!(
        broken.is_empty(),
        "{} of {ESTABLISHED} established connections broke: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
    let served_v1 = setup.servers[0].served();
    // New connections follow the weights in force now.
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(
        seen.len() == 1 && seen.get("v3") == Some(&200),
        "new connections after the flood: {seen:?}"
    );
    ensure!(
        setup.servers[0].served() == served_v1,
        "v1 accepted new connections after its weight went to 0"
    );

    // The pressure is visible: far more pending flows than the table holds, the established
    // ones confirmed.
    let text = scrape_metrics(&topo.node)?;
    let event = |name: &str| {
        metric_value(
            &text,
            "mesh_conntrack_events_total{",
            &format!("\"{name}\""),
        )
        .unwrap_or(0)
    };
    ensure!(
        event("pending") >= u64::from(FLOOD_PACKETS) && event("confirmed") >= ESTABLISHED as u64,
        "conntrack events: pending {} confirmed {}\n{text}",
        event("pending"),
        event("confirmed")
    );
    ensure!(
        text.contains("mesh_conntrack_pending_turnover"),
        "no pressure gauge:\n{text}"
    );
    Ok(())
}

/// One flood round from the client namespace.
fn flood(topo: &mesh_tests::topology::Topology, round: u32) -> Result<()> {
    let sent = topo.client.run(move || spoof(round))??;
    ensure!(sent == FLOOD_PACKETS, "only {sent} flood packets sent");
    Ok(())
}

/// Sends [`FLOOD_PACKETS`] spoofed packets to the service: a third each TCP SYN, TCP ACK and
/// UDP, from pseudo-random sources in 198.19.0.0/16 (part of the benchmarking range, routed
/// nowhere) and random ports. Returns how many were sent.
fn spoof(round: u32) -> Result<u32> {
    // SAFETY: plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let vip_addr: Ipv4Addr = VIP_V4.parse()?;
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
    for i in 0..FLOOD_PACKETS {
        let r = next();
        let src = [198, 19, (r >> 8) as u8, (r >> 16) as u8];
        let sport = 1024 + (r >> 24) as u16 % 60_000;
        let builder = etherparse::PacketBuilder::ipv4(src, vip_addr.octets(), 64);
        frame.clear();
        let written = match i % 3 {
            0 => builder
                .tcp(sport, 8080, r as u32, 64_240)
                .syn()
                .write(&mut frame, &[]),
            1 => builder
                .tcp(sport, 8080, r as u32, 64_240)
                .ack((r >> 32) as u32)
                .write(&mut frame, &[]),
            _ => builder.udp(sport, 8081).write(&mut frame, b"flood"),
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
