//! Golden-packet tests of `mesh_xdp` through BPF_PROG_TEST_RUN.
//!
//! Each test loads its own copy of the object (so tests run in parallel), fills the maps like
//! meshd, runs frames built with etherparse and compares the verdict and the output bytes with
//! frames built independently (etherparse computes their checksums from scratch). Every
//! translated frame's checksums are also recomputed from scratch.
//!
//! Each test first moves its thread into a fresh network namespace: the program's FIB lookup
//! runs in the caller's namespace, and an empty one (forwarding off, no routes) makes the
//! outcome deterministic: translated frames come back as XDP_PASS / PASS_FIB_OTHER with the TTL
//! untouched. `forwarding_through_veth_devices` builds routes and neighbours to reach
//! XDP_REDIRECT, XDP_TX and PASS_NO_NEIGHBOUR.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{SchedClassifier, Xdp, XdpMode};
use mesh_common::{
    reason, redirect_target, NO_BACKEND, PROTO_TCP, PROTO_UDP, SERVICE_FLAG_HASH_SOURCE_IP,
    SERVICE_FLAG_L7_PROXY, XDP_PASS_PROGRAM_NAME,
};
use mesh_tests::{
    maps::{Hook, Lb, Service, HOOKS, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    packet::{arp_request, verify_checksums, Frame, L4},
};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Moves the calling test thread (only) into a new, empty network namespace.
fn isolate() -> Result<()> {
    // SAFETY: plain syscall; CLONE_NEWNET is allowed in a multi-threaded process and affects
    // only the calling thread, which the test harness created for this test alone.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fresh namespace and a freshly loaded program of `hook`.
fn setup(hook: Hook) -> Result<Lb> {
    isolate()?;
    Lb::load_hook(hook)
}

/// Runs `case` once for each hook (XDP and TC), each in a fresh namespace with a fresh load:
/// the two entry points share one pipeline and must give the same verdicts and bytes.
fn for_each_hook(case: impl Fn(Lb) -> Result<()>) -> Result<()> {
    for hook in HOOKS {
        case(setup(hook)?).with_context(|| format!("through the {hook:?} hook"))?;
    }
    Ok(())
}

/// A TCP service with one backend per entry of `backends`, ids 1.., table size 13.
fn service(id: u32, vip: &str, proto: u8, backends: &[&str]) -> Service {
    Service {
        id,
        addr: sa(vip),
        proto,
        flags: 0,
        table_offset: id * 100,
        table_size: 13,
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, b)| (id * 10 + i as u32, sa(b)))
            .collect(),
    }
}

/// Runs `input` and expects `expected` back as XDP_PASS / PASS_FIB_OTHER with valid checksums.
fn expect_translated(lb: &mut Lb, input: &Frame, expected: &Frame) -> Result<()> {
    let before = lb.reason_count(reason::PASS_FIB_OTHER)?;
    let (verdict, out) = lb.run(&input.build()?)?;
    ensure!(verdict == XDP_PASS, "verdict {verdict}, want XDP_PASS");
    assert_frame_eq(&out, &expected.build()?)?;
    verify_checksums(&out)?;
    ensure!(lb.reason_count(reason::PASS_FIB_OTHER)? == before + 1);
    Ok(())
}

/// Runs `input` and expects it back unchanged with `want` verdict, counted under `why`.
fn expect_untouched(lb: &mut Lb, input: &[u8], want: u32, why: u32) -> Result<()> {
    let before = lb.reason_counts()?;
    let (verdict, out) = lb.run(input)?;
    ensure!(verdict == want, "verdict {verdict}, want {want}");
    if want != XDP_DROP {
        assert_frame_eq(&out, input)?;
    }
    let after = lb.reason_counts()?;
    for (r, (a, b)) in after.iter().zip(&before).enumerate() {
        let expect = b + u64::from(r as u32 == why);
        ensure!(
            *a == expect,
            "reason {} counted {a}, want {expect}",
            reason::NAMES[r]
        );
    }
    Ok(())
}

fn assert_frame_eq(got: &[u8], want: &[u8]) -> Result<()> {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        bail!(
            "frames differ at byte {first} (len {} vs {}):\n got  {got:02x?}\n want {want:02x?}",
            got.len(),
            want.len()
        );
    }
    Ok(())
}

#[test]
fn new_ipv4_tcp_flow_is_translated_to_the_backend() -> Result<()> {
    for_each_hook(|mut lb| {
        let svc = service(1, "198.18.0.10:80", PROTO_TCP, &["198.19.0.2:8080"]);
        lb.install(&svc)?;
        let input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_translated(&mut lb, &input, &input.with_dst(sa("198.19.0.2:8080")))?;

        let len = input.build()?.len() as u64;
        for stats in [lb.service_stats(1)?, lb.backend_stats(10)?] {
            ensure!(stats.packets == 1 && stats.bytes == len && stats.connections == 1);
            ensure!(stats.reply_packets == 0 && stats.reply_bytes == 0);
        }
        ensure!(
            lb.reason_counts()?.iter().sum::<u64>() == 1,
            "exactly one reason per packet"
        );
        Ok(())
    })
}

#[test]
fn new_ipv4_udp_flow_is_translated_to_the_backend() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            1,
            "198.18.0.10:53",
            PROTO_UDP,
            &["198.19.0.2:5353"],
        ))?;
        let input = Frame::udp(sa("198.18.1.1:40000"), sa("198.18.0.10:53"));
        expect_translated(&mut lb, &input, &input.with_dst(sa("198.19.0.2:5353")))?;

        // A datagram without checksum keeps none.
        let mut bare = Frame::udp(sa("198.18.1.2:40001"), sa("198.18.0.10:53"));
        bare.udp_no_checksum = true;
        expect_translated(&mut lb, &bare, &bare.with_dst(sa("198.19.0.2:5353")))?;
        let out = lb.run(&bare.build()?)?.1;
        ensure!(out[40..42] == [0, 0], "UDP checksum must stay 0");

        // The TCP service with the same address and port does not exist.
        let tcp = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:53"));
        expect_untouched(&mut lb, &tcp.build()?, XDP_PASS, reason::PASS_NOT_SERVICE)
    })
}

#[test]
fn established_flow_keeps_its_backend_after_the_table_changes() -> Result<()> {
    for_each_hook(|mut lb| {
        let svc = service(
            2,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080", "198.19.0.3:8080"],
        );
        lb.install(&svc)?;
        let syn = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        let (verdict, out) = lb.run(&syn.build()?)?;
        ensure!(verdict == XDP_PASS);
        verify_checksums(&out)?;
        let chosen = svc
            .backends
            .iter()
            .find(|(_, b)| out == syn.with_dst(*b).build().unwrap())
            .copied()
            .context("first packet went to no known backend")?;
        let other = svc
            .backends
            .iter()
            .find(|b| **b != chosen)
            .copied()
            .unwrap();

        // Point the whole table at the other backend: the tracked flow must not move...
        lb.write_maglev(svc.table_offset, &vec![other.0; svc.table_size as usize])?;
        let mut ack = syn.clone();
        ack.l4 = L4::Tcp { syn: false };
        ack.payload = b"second segment".to_vec();
        expect_translated(&mut lb, &ack, &ack.with_dst(chosen.1))?;
        // ...while a new flow follows the new table.
        let fresh = Frame::tcp(sa("198.18.1.1:40001"), sa("198.18.0.10:80"));
        expect_translated(&mut lb, &fresh, &fresh.with_dst(other.1))?;

        let s = lb.service_stats(2)?;
        ensure!(s.packets == 3 && s.connections == 2, "service stats {s:?}");
        let b = lb.backend_stats(chosen.0)?;
        ensure!(b.packets == 2 && b.connections == 1, "backend stats {b:?}");
        Ok(())
    })
}

#[test]
fn reply_from_the_backend_gets_the_service_source() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            3,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        let client = sa("198.18.1.1:40000");
        let request = Frame::tcp(client, sa("198.18.0.10:80"));
        expect_translated(&mut lb, &request, &request.with_dst(sa("198.19.0.2:8080")))?;

        let mut reply = Frame::tcp(sa("198.19.0.2:8080"), client);
        reply.payload = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        expect_translated(&mut lb, &reply, &reply.with_src(sa("198.18.0.10:80")))?;

        let len = reply.build()?.len() as u64;
        for s in [lb.service_stats(3)?, lb.backend_stats(30)?] {
            ensure!(s.reply_packets == 1 && s.reply_bytes == len, "stats {s:?}");
            ensure!(s.packets == 1 && s.connections == 1, "stats {s:?}");
        }

        // A reply to another client port is not a tracked flow.
        let stray = Frame::tcp(sa("198.19.0.2:8080"), sa("198.18.1.1:40001"));
        expect_untouched(&mut lb, &stray.build()?, XDP_PASS, reason::PASS_NOT_SERVICE)
    })
}

#[test]
fn backend_resets_are_counted_as_the_health_signal() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            3,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        let client = sa("198.18.1.1:40000");
        let request = Frame::tcp(client, sa("198.18.0.10:80"));
        expect_translated(&mut lb, &request, &request.with_dst(sa("198.19.0.2:8080")))?;

        // A refused connection: the backend answers the SYN with RST (no payload).
        let mut reset = Frame::tcp(sa("198.19.0.2:8080"), client);
        reset.l4 = L4::Tcp { syn: false };
        reset.tcp_rst = true;
        reset.payload.clear();
        expect_translated(&mut lb, &reset, &reset.with_src(sa("198.18.0.10:80")))?;
        let mut ack = Frame::tcp(sa("198.19.0.2:8080"), client);
        ack.l4 = L4::Tcp { syn: false };
        expect_translated(&mut lb, &ack, &ack.with_src(sa("198.18.0.10:80")))?;
        for s in [lb.service_stats(3)?, lb.backend_stats(30)?] {
            ensure!(s.reply_packets == 2 && s.reply_resets == 1, "stats {s:?}");
        }
        Ok(())
    })
}

#[test]
fn ipv6_tcp_flow_and_reply_are_translated() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            4,
            "[2001:db8::10]:443",
            PROTO_TCP,
            &["[2001:db8:1::2]:8443"],
        ))?;
        let client = sa("[2001:db8:2::1]:40000");
        let request = Frame::tcp(client, sa("[2001:db8::10]:443"));
        expect_translated(
            &mut lb,
            &request,
            &request.with_dst(sa("[2001:db8:1::2]:8443")),
        )?;
        let reply = Frame::tcp(sa("[2001:db8:1::2]:8443"), client);
        expect_translated(&mut lb, &reply, &reply.with_src(sa("[2001:db8::10]:443")))
    })
}

#[test]
fn ipv6_udp_flow_is_translated() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            4,
            "[2001:db8::10]:53",
            PROTO_UDP,
            &["[2001:db8:1::2]:5353"],
        ))?;
        // Vary the payload so that some translated checksum lands on the 0 / 0xffff edge case
        // would be found by the independent verification.
        for i in 0..64u16 {
            let mut input = Frame::udp(
                sa(&format!("[2001:db8:2::1]:{}", 40000 + i)),
                sa("[2001:db8::10]:53"),
            );
            input.payload = i.to_be_bytes().repeat(3);
            expect_translated(&mut lb, &input, &input.with_dst(sa("[2001:db8:1::2]:5353")))?;
        }
        Ok(())
    })
}

#[test]
fn non_service_ipv4_passes_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            5,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        for dst in ["198.18.0.11:80", "198.18.0.10:81"] {
            let frame = Frame::tcp(sa("198.18.1.1:40000"), sa(dst)).build()?;
            expect_untouched(&mut lb, &frame, XDP_PASS, reason::PASS_NOT_SERVICE)?;
        }
        ensure!(lb.service_stats(5)? == Default::default());
        Ok(())
    })
}

#[test]
fn arp_passes_untouched() -> Result<()> {
    for_each_hook(|mut lb| expect_untouched(&mut lb, &arp_request(), XDP_PASS, reason::PASS_NOT_IP))
}

#[test]
fn truncated_service_frames_pass_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            6,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        lb.install(&service(
            7,
            "[2001:db8::10]:80",
            PROTO_TCP,
            &["[2001:db8:1::2]:8080"],
        ))?;
        let mut v6 = Frame::tcp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:80"));
        v6.ipv6_hop_by_hop = true;
        let mut v4 = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        v4.ipv4_options = vec![0x94, 0x04, 0, 0];
        let mut run = 0;
        for frame in [v4.build()?, v6.build()?] {
            for len in 0..frame.len() {
                let cut = &frame[..len];
                match lb.run(cut) {
                    Ok(_) => {
                        run += 1;
                        expect_untouched(&mut lb, cut, XDP_PASS, reason::PASS_TRUNCATED)
                            .with_context(|| format!("truncated at {len}"))?;
                    }
                    // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header, and
                    // builds no skb from some truncated IP headers (the lengths it accepts are
                    // checked, and must include truncated transport headers).
                    Err(_) if len < 14 || lb.hook == Hook::Tc => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("running {len} bytes: {cut:02x?}"))
                    }
                }
            }
        }
        ensure!(run > 20, "only {run} truncated lengths could be run");
        // Each accepted length was run twice (once to probe, once checked).
        ensure!(lb.reason_count(reason::PASS_TRUNCATED)? == 2 * run);
        ensure!(lb.service_stats(6)? == Default::default());
        ensure!(lb.service_stats(7)? == Default::default());
        // Nothing was tracked: the full frames are still new flows.
        expect_translated(&mut lb, &v4, &v4.with_dst(sa("198.19.0.2:8080")))?;
        ensure!(lb.service_stats(6)?.connections == 1);
        Ok(())
    })
}

#[test]
fn ipv4_options_are_skipped_and_preserved() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            8,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        // Router alert, three NOPs and end-of-list, then a timestamp-sized filler (IHL 5 + 4).
        for options in [
            vec![0x94, 0x04, 0x00, 0x00],
            vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00],
            vec![0x01; 40],
        ] {
            let mut input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
            input.ipv4_options = options;
            expect_translated(&mut lb, &input, &input.with_dst(sa("198.19.0.2:8080")))?;
        }
        Ok(())
    })
}

#[test]
fn ipv4_fragments_pass_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            9,
            "198.18.0.10:80",
            PROTO_UDP,
            &["198.19.0.2:8080"],
        ))?;
        for fragment in [(true, 0), (false, 8), (true, 16)] {
            let mut input = Frame::udp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
            input.ipv4_fragment = Some(fragment);
            expect_untouched(&mut lb, &input.build()?, XDP_PASS, reason::PASS_FRAGMENT)?;
        }
        Ok(())
    })
}

#[test]
fn ipv6_extension_headers_are_walked() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            10,
            "[2001:db8::10]:80",
            PROTO_TCP,
            &["[2001:db8:1::2]:8080"],
        ))?;
        let mut input = Frame::tcp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:80"));
        input.ipv6_hop_by_hop = true;
        input.ipv6_dest_opts = true;
        expect_translated(&mut lb, &input, &input.with_dst(sa("[2001:db8:1::2]:8080")))
    })
}

#[test]
fn ipv6_fragment_header_passes_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            11,
            "[2001:db8::10]:80",
            PROTO_TCP,
            &["[2001:db8:1::2]:8080"],
        ))?;
        let mut input = Frame::tcp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:80"));
        input.ipv6_fragment = true;
        expect_untouched(&mut lb, &input.build()?, XDP_PASS, reason::PASS_FRAGMENT)?;
        input.ipv6_hop_by_hop = true;
        expect_untouched(&mut lb, &input.build()?, XDP_PASS, reason::PASS_FRAGMENT)
    })
}

#[test]
fn expiring_ttl_passes_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            12,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        lb.install(&service(
            13,
            "[2001:db8::10]:80",
            PROTO_TCP,
            &["[2001:db8:1::2]:8080"],
        ))?;
        for (src, dst) in [
            ("198.18.1.1:40000", "198.18.0.10:80"),
            ("[2001:db8:2::1]:40000", "[2001:db8::10]:80"),
        ] {
            let mut input = Frame::tcp(sa(src), sa(dst));
            for ttl in [0, 1] {
                input.ttl = ttl;
                expect_untouched(&mut lb, &input.build()?, XDP_PASS, reason::PASS_TTL_EXPIRED)?;
            }
        }
        ensure!(lb.service_stats(12)? == Default::default());
        // No flow was created: the first translated packet is a new connection.
        let input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_translated(&mut lb, &input, &input.with_dst(sa("198.19.0.2:8080")))?;
        ensure!(lb.service_stats(12)?.connections == 1);
        // A tracked flow with an expiring TTL is left to the stack as well.
        let mut late = input.clone();
        late.ttl = 1;
        expect_untouched(&mut lb, &late.build()?, XDP_PASS, reason::PASS_TTL_EXPIRED)
    })
}

#[test]
fn service_without_backends_is_passed_to_the_stack_to_be_refused() -> Result<()> {
    for_each_hook(|mut lb| {
        let mut svc = service(14, "198.18.0.10:80", PROTO_TCP, &[]);
        svc.table_size = 0;
        lb.install(&svc)?;
        let input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_untouched(
            &mut lb,
            &input.build()?,
            XDP_PASS,
            reason::REFUSED_NO_BACKEND,
        )?;
        ensure!(lb.service_stats(14)? == Default::default());
        Ok(())
    })
}

#[test]
fn inconsistent_table_drops() -> Result<()> {
    for_each_hook(|mut lb| {
        let svc = service(15, "198.18.0.10:80", PROTO_TCP, &["198.19.0.2:8080"]);
        lb.install(&svc)?;
        lb.write_maglev(svc.table_offset, &vec![NO_BACKEND; svc.table_size as usize])?;
        let input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_untouched(&mut lb, &input.build()?, XDP_DROP, reason::DROP_INTERNAL)?;
        // A backend slot that was never filled.
        lb.write_maglev(svc.table_offset, &vec![9_999; svc.table_size as usize])?;
        expect_untouched(&mut lb, &input.build()?, XDP_DROP, reason::DROP_INTERNAL)
    })
}

/// Which backend a translated frame went to (by destination address and port).
fn destination(frame: &[u8]) -> Result<SocketAddr> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame)?;
    let ip: IpAddr = match sliced.net.context("no IP")? {
        etherparse::NetSlice::Ipv4(v4) => v4.header().destination_addr().into(),
        etherparse::NetSlice::Ipv6(v6) => v6.header().destination_addr().into(),
        _ => bail!("not IP"),
    };
    let port = match sliced.transport.context("no L4")? {
        etherparse::TransportSlice::Tcp(t) => t.destination_port(),
        etherparse::TransportSlice::Udp(u) => u.destination_port(),
        _ => bail!("not TCP/UDP"),
    };
    Ok(SocketAddr::new(ip, port))
}

#[test]
fn source_ip_affinity_pins_a_client_to_one_backend() -> Result<()> {
    for_each_hook(|mut lb| {
        let backends = [
            "198.19.0.2:8080",
            "198.19.0.3:8080",
            "198.19.0.4:8080",
            "198.19.0.5:8080",
        ];
        let mut sticky = service(16, "198.18.0.10:80", PROTO_TCP, &backends);
        sticky.flags = SERVICE_FLAG_HASH_SOURCE_IP;
        lb.install(&sticky)?;
        let spread = service(17, "198.18.0.11:80", PROTO_TCP, &backends);
        lb.install(&spread)?;

        let mut per_client = Vec::new();
        for client in ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"] {
            let mut seen = std::collections::HashSet::new();
            for port in 40000..40020 {
                let input = Frame::tcp(sa(&format!("{client}:{port}")), sa("198.18.0.10:80"));
                let (verdict, out) = lb.run(&input.build()?)?;
                ensure!(verdict == XDP_PASS);
                verify_checksums(&out)?;
                seen.insert(destination(&out)?);
            }
            ensure!(seen.len() == 1, "{client} reached {seen:?}");
            per_client.extend(seen);
        }
        // Without the flag, the same client's flows spread over the backends.
        let mut seen = std::collections::HashSet::new();
        for port in 40000..40020 {
            let input = Frame::tcp(sa(&format!("198.18.1.1:{port}")), sa("198.18.0.11:80"));
            seen.insert(destination(&lb.run(&input.build()?)?.1)?);
        }
        ensure!(
            seen.len() > 1,
            "5-tuple hashing used one backend only: {seen:?}"
        );
        ensure!(lb.service_stats(16)?.connections == 80);
        Ok(())
    })
}

#[test]
fn l7_proxy_service_passes_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        let mut svc = service(18, "198.18.0.10:80", PROTO_TCP, &["198.19.0.2:8080"]);
        svc.flags = SERVICE_FLAG_L7_PROXY;
        lb.install(&svc)?;
        let input = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_untouched(&mut lb, &input.build()?, XDP_PASS, reason::PASS_L7_PROXY)?;
        ensure!(lb.service_stats(18)? == Default::default());
        Ok(())
    })
}

#[test]
fn a_reused_client_port_reaches_the_proxy_after_the_service_moved_there() -> Result<()> {
    for_each_hook(|mut lb| {
        let svc = service(20, "198.18.0.10:80", PROTO_TCP, &["198.19.0.2:8080"]);
        lb.install(&svc)?;
        let syn = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        let mut ack = syn.clone();
        ack.l4 = L4::Tcp { syn: false };
        expect_translated(&mut lb, &syn, &syn.with_dst(sa("198.19.0.2:8080")))?;
        expect_translated(&mut lb, &ack, &ack.with_dst(sa("198.19.0.2:8080")))?;
        // The service moves to the L7 proxy (its entry is switched); the client reuses its port.
        let mut l7 = svc.clone();
        l7.flags = SERVICE_FLAG_L7_PROXY;
        lb.install(&l7)?;
        expect_untouched(&mut lb, &syn.build()?, XDP_PASS, reason::PASS_L7_PROXY)?;
        // The rest of the new connection must reach the proxy too, not the old backend.
        let (verdict, out) = lb.run(&ack.build()?)?;
        ensure!(
            verdict == XDP_PASS && out == ack.build()?,
            "the ACK was hijacked by the stale entry"
        );
        Ok(())
    })
}

#[test]
fn new_flows_follow_a_switched_service_entry() -> Result<()> {
    for_each_hook(|mut lb| {
        let old = service(19, "198.18.0.10:80", PROTO_TCP, &["198.19.0.2:8080"]);
        lb.install(&old)?;
        let first = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
        expect_translated(&mut lb, &first, &first.with_dst(sa("198.19.0.2:8080")))?;
        // meshd's change of one service: a new slice in free pool space, then the entry replaced.
        let mut new = service(19, "198.18.0.10:80", PROTO_TCP, &["198.19.0.9:8080"]);
        new.table_offset += 50;
        new.backends = vec![(199, sa("198.19.0.9:8080"))];
        lb.install(&new)?;
        let second = Frame::tcp(sa("198.18.1.1:40001"), sa("198.18.0.10:80"));
        expect_translated(&mut lb, &second, &second.with_dst(sa("198.19.0.9:8080")))?;
        // The flow created before the switch stays where it was...
        let mut first_ack = first.clone();
        first_ack.l4 = L4::Tcp { syn: false };
        expect_translated(
            &mut lb,
            &first_ack,
            &first_ack.with_dst(sa("198.19.0.2:8080")),
        )?;
        // ...but a new connection from the same client port (a bare SYN) follows the rules now.
        expect_translated(&mut lb, &first, &first.with_dst(sa("198.19.0.9:8080")))?;
        expect_translated(
            &mut lb,
            &first_ack,
            &first_ack.with_dst(sa("198.19.0.9:8080")),
        )
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string; the lookup uses a socket in the calling thread's namespace.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

#[test]
fn forwarding_through_veth_devices() -> Result<()> {
    for_each_hook(|mut lb| {
        // Child processes inherit this thread's namespace, which disappears with the thread.
        ip(&[
            "link",
            "add",
            "lan0",
            "address",
            "02:00:00:00:00:a0",
            "type",
            "veth",
            "peer",
            "name",
            "lan1",
        ])?;
        ip(&[
            "link",
            "add",
            "be0",
            "address",
            "02:00:00:00:00:b0",
            "type",
            "veth",
            "peer",
            "name",
            "be1",
        ])?;
        for dev in ["lo", "lan0", "lan1", "be0", "be1"] {
            ip(&["link", "set", dev, "up"])?;
        }
        ip(&["addr", "add", "198.18.0.1/24", "dev", "lan0"])?;
        ip(&["addr", "add", "198.19.0.1/24", "dev", "be0"])?;
        ip(&[
            "neigh",
            "replace",
            "198.19.0.2",
            "lladdr",
            "02:00:00:00:00:b2",
            "dev",
            "be0",
            "nud",
            "permanent",
        ])?;
        ip(&[
            "neigh",
            "replace",
            "198.18.0.60",
            "lladdr",
            "02:00:00:00:00:a6",
            "dev",
            "lan0",
            "nud",
            "permanent",
        ])?;
        // This thread's /proc/sys/net is the new namespace's.
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")?;
        // BPF_PROG_TEST_RUN accepts an XDP ingress device only if its XDP receive queue is
        // registered, which veth does once an XDP program is attached.
        let lan0 = ifindex("lan0")?;
        if lb.hook == Hook::Xdp {
            let pass: &mut Xdp = lb
                .ebpf
                .program_mut(XDP_PASS_PROGRAM_NAME)
                .context("mesh_xdp_pass")?
                .try_into()?;
            pass.load()?;
            pass.attach_to_if_index(lan0, XdpMode::Default)?;
        }

        lb.install(&service(
            20,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        lb.install(&service(
            21,
            "198.18.0.11:80",
            PROTO_TCP,
            &["198.18.0.60:8080"],
        ))?;
        lb.install(&service(
            22,
            "198.18.0.12:80",
            PROTO_TCP,
            &["198.19.0.3:8080"],
        ))?;
        let input = |vip: &str| Frame::tcp(sa("198.18.0.50:40000"), sa(vip));
        let counted = |lb: &Lb, why: u32, n: u64| -> Result<()> {
            let got = lb.reason_count(why)?;
            ensure!(
                got == n,
                "{} counted {got}, want {n}",
                reason::NAMES[why as usize]
            );
            Ok(())
        };

        if lb.hook == Hook::Xdp {
            // be0 runs no XDP program of meshd's: XDP must not redirect a frame into it (a veth
            // drops it unless its peer has NAPI). Translated, left to the stack to forward.
            let (verdict, out) = lb.run_on(&input("198.18.0.10:80").build()?, lan0)?;
            ensure!(verdict == XDP_PASS, "verdict {verdict}");
            assert_frame_eq(
                &out,
                &input("198.18.0.10:80")
                    .with_dst(sa("198.19.0.2:8080"))
                    .build()?,
            )?;
            counted(&lb, reason::PASS_STACK_FORWARDS, 1)?;
            lb.allow_xdp_redirect(ifindex("be0")?)?;
        }

        // Forwarded by the program: translated, MACs from the FIB, TTL decremented.
        let expect_forwarded =
            |lb: &mut Lb, vip: &str, backend: &str, macs: (u8, u8), action: u32| -> Result<()> {
                let (verdict, out) = lb.run_on(&input(vip).build()?, lan0)?;
                ensure!(verdict == action, "verdict {verdict}, want {action}");
                let mut want = input(vip).with_dst(sa(backend));
                want.src_mac = [2, 0, 0, 0, 0, macs.0];
                want.dst_mac = [2, 0, 0, 0, 0, macs.1];
                want.ttl -= 1;
                assert_frame_eq(&out, &want.build()?)?;
                verify_checksums(&out)
            };
        // Backend behind another device: redirected.
        expect_forwarded(
            &mut lb,
            "198.18.0.10:80",
            "198.19.0.2:8080",
            (0xb0, 0xb2),
            XDP_REDIRECT,
        )?;
        counted(&lb, reason::FORWARD_REDIRECT, 1)?;
        if lb.hook == Hook::Tc {
            // be0 listed as a veth whose peer is in another namespace (a container's): the same
            // bytes, sent with bpf_redirect_peer.
            lb.list_redirect_target(ifindex("be0")?, redirect_target::PEER)?;
            expect_forwarded(
                &mut lb,
                "198.18.0.10:80",
                "198.19.0.2:8080",
                (0xb0, 0xb2),
                XDP_REDIRECT,
            )?;
            counted(&lb, reason::FORWARD_REDIRECT_PEER, 1)?;
            counted(&lb, reason::FORWARD_REDIRECT, 1)?;
        }
        // Backend on the ingress segment: sent back out (XDP_TX; TC redirects to the same
        // device's egress).
        let (hairpin, why, n) = match lb.hook {
            Hook::Xdp => (XDP_TX, reason::FORWARD_TX, 1),
            Hook::Tc => (XDP_REDIRECT, reason::FORWARD_REDIRECT, 2),
        };
        expect_forwarded(
            &mut lb,
            "198.18.0.11:80",
            "198.18.0.60:8080",
            (0xa0, 0xa6),
            hairpin,
        )?;
        counted(&lb, why, n)?;

        // No neighbour entry. XDP: translated for the stack, TTL and MACs untouched. TC: sent
        // with bpf_redirect_neigh (the kernel resolves the MAC and fills the Ethernet header),
        // so the TTL is decremented here and the MACs are left as they came.
        let (verdict, out) = lb.run_on(&input("198.18.0.12:80").build()?, lan0)?;
        let mut want = input("198.18.0.12:80").with_dst(sa("198.19.0.3:8080"));
        match lb.hook {
            Hook::Xdp => {
                ensure!(verdict == XDP_PASS, "verdict {verdict}");
                counted(&lb, reason::PASS_NO_NEIGHBOUR, 1)?;
            }
            Hook::Tc => {
                ensure!(verdict == XDP_REDIRECT, "verdict {verdict}");
                counted(&lb, reason::FORWARD_REDIRECT_NEIGH, 1)?;
                want.ttl -= 1;
            }
        }
        assert_frame_eq(&out, &want.build()?)?;
        verify_checksums(&out)
    })
}

/// Finds a 2-byte payload for which the translated datagram's checksum computes to zero (sent as
/// 0xffff), the one case where an incremental update must not write 0.
fn payload_with_zero_checksum(input: &Frame, expected: &Frame) -> Result<Frame> {
    let csum_at = expected.build()?.len() - input.payload.len() - 2;
    for v in 0..=u16::MAX {
        let mut want = expected.clone();
        want.payload = v.to_be_bytes().to_vec();
        let bytes = want.build()?;
        if bytes[csum_at..csum_at + 2] == [0xff, 0xff] {
            let mut found = input.clone();
            found.payload = want.payload;
            return Ok(found);
        }
    }
    bail!("no payload gives a zero checksum")
}

#[test]
fn udp_checksum_that_computes_to_zero_is_sent_as_all_ones() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            23,
            "198.18.0.10:53",
            PROTO_UDP,
            &["198.19.0.2:5353"],
        ))?;
        lb.install(&service(
            24,
            "[2001:db8::10]:53",
            PROTO_UDP,
            &["[2001:db8:1::2]:5353"],
        ))?;
        for (client, vip, backend) in [
            ("198.18.1.1:40000", "198.18.0.10:53", "198.19.0.2:5353"),
            (
                "[2001:db8:2::1]:40000",
                "[2001:db8::10]:53",
                "[2001:db8:1::2]:5353",
            ),
        ] {
            let mut input = Frame::udp(sa(client), sa(vip));
            input.payload = vec![0, 0];
            let input = payload_with_zero_checksum(&input, &input.with_dst(sa(backend)))?;
            expect_translated(&mut lb, &input, &input.with_dst(sa(backend)))?;
        }
        Ok(())
    })
}

#[test]
fn malformed_and_unsupported_frames_pass_untouched() -> Result<()> {
    for_each_hook(|mut lb| {
        lb.install(&service(
            25,
            "198.18.0.10:80",
            PROTO_TCP,
            &["198.19.0.2:8080"],
        ))?;
        lb.install(&service(
            26,
            "[2001:db8::10]:80",
            PROTO_TCP,
            &["[2001:db8:1::2]:8080"],
        ))?;
        let v4 = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80")).build()?;

        let mut short_ihl = v4.clone();
        short_ihl[14] = 0x44;
        expect_untouched(&mut lb, &short_ihl, XDP_PASS, reason::PASS_TRUNCATED)?;
        let mut long_ihl = v4.clone();
        long_ihl[14] = 0x4f; // 60-byte header: the L4 header no longer fits the frame.
        expect_untouched(&mut lb, &long_ihl, XDP_PASS, reason::PASS_TRUNCATED)?;
        let mut icmp = v4.clone();
        icmp[23] = 1;
        expect_untouched(&mut lb, &icmp, XDP_PASS, reason::PASS_UNSUPPORTED_PROTOCOL)?;
        let mut version6 = v4.clone();
        version6[14] = 0x65;
        expect_untouched(
            &mut lb,
            &version6,
            XDP_PASS,
            reason::PASS_UNSUPPORTED_PROTOCOL,
        )?;
        // IPv4 total length beyond the frame.
        let mut long_total = v4.clone();
        long_total[16..18].copy_from_slice(&((v4.len() - 14 + 1) as u16).to_be_bytes());
        expect_untouched(&mut lb, &long_total, XDP_PASS, reason::PASS_TRUNCATED)?;

        // IPv6 with five destination-options headers: more than the walk follows.
        let base = Frame::tcp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:80")).build()?;
        let mut chain = base[..54].to_vec();
        let tcp = &base[54..];
        chain[20] = 60;
        for i in 0..5 {
            chain.extend_from_slice(&[if i == 4 { 6 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
        }
        chain.extend_from_slice(tcp);
        let payload_len = (chain.len() - 54) as u16;
        chain[18..20].copy_from_slice(&payload_len.to_be_bytes());
        expect_untouched(&mut lb, &chain, XDP_PASS, reason::PASS_UNSUPPORTED_PROTOCOL)?;
        // ICMPv6 (58).
        let mut icmp6 = base.clone();
        icmp6[20] = 58;
        expect_untouched(&mut lb, &icmp6, XDP_PASS, reason::PASS_UNSUPPORTED_PROTOCOL)?;
        // Ethernet frame carrying a VLAN tag.
        let mut vlan = v4[..12].to_vec();
        vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        vlan.extend_from_slice(&v4[12..]);
        expect_untouched(&mut lb, &vlan, XDP_PASS, reason::PASS_NOT_IP)
    })
}

#[test]
fn programs_fit_the_verifier_budget() -> Result<()> {
    for_each_hook(|lb| {
        let info = match lb.hook {
            Hook::Xdp => {
                let prog: &Xdp = lb
                    .ebpf
                    .program(mesh_common::XDP_PROGRAM_NAME)
                    .context("mesh_xdp")?
                    .try_into()?;
                prog.info()?
            }
            Hook::Tc => {
                let prog: &SchedClassifier = lb
                    .ebpf
                    .program(mesh_common::TC_PROGRAM_NAME)
                    .context("mesh_tc")?
                    .try_into()?;
                prog.info()?
            }
        };
        let verified = info.verified_instruction_count().unwrap_or(0);
        println!(
            "{:?}: {verified} instructions processed by the verifier",
            lb.hook
        );
        // Far below the 1M limit; a jump here means a loop or branch explosion crept in.
        ensure!(
            verified < 200_000,
            "verifier processed {verified} instructions"
        );
        Ok(())
    })
}
