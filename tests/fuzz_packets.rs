//! Fuzz target `packets`: random and mutated frames through the kernel pipeline with
//! BPF_PROG_TEST_RUN, through both entry points (`mesh_xdp` on an XDP buffer, `mesh_tc` on an
//! skb), against a loaded rule set: IPv4 and IPv6 TCP/UDP services with backends, a service on
//! the L7 proxy and one without backends.
//!
//! Frames are built by etherparse from a random description (addresses among clients, VIPs and
//! backends of the test ranges, TCP flags, TTL, IPv4 options, fragments, IPv6 extension
//! headers, UDP without checksum) and then damaged: truncated, bytes overwritten in the
//! headers, a VLAN tag inserted, IHL changed, checksums broken. Seeds come from
//! `tests/fuzz-corpus/packets/`. The harness keeps its own model of the flows it saw
//! translated. Invariants, for every frame:
//! - the verdict is pass, TX or redirect (nothing is dropped: the tables are consistent), and
//!   exactly one reason counter counts it;
//! - a frame that comes out modified (or is sent with TX/redirect) is an unfragmented
//!   IPv4/IPv6 TCP/UDP frame, either to a service address with backends (then its destination
//!   became one of that service's backends, its source unchanged) or a reply of a flow the
//!   model saw translated (then its source became the service address); its length is
//!   unchanged;
//! - a modified frame that came in with valid checksums leaves with valid IPv4 header and L4
//!   checksums (recomputed from scratch by etherparse).
//!
//! Test addresses only: 198.18.0.0/15 and 2001:db8::/32.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use mesh_common::{PROTO_TCP, PROTO_UDP, SERVICE_FLAG_L7_PROXY};
use mesh_tests::{
    fuzz::{self, mutate, Budget, Corpus},
    maps::{Hook, Lb, Service, XDP_PASS, XDP_REDIRECT, XDP_TX},
    packet::{verify_checksums, Frame, L4},
};
use proptest::{collection::vec, prelude::*};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// The rule set every frame runs against.
fn services() -> Vec<Service> {
    let svc = |id: u32, vip: &str, proto: u8, flags: u32, backends: &[&str]| Service {
        id,
        addr: sa(vip),
        proto,
        flags,
        table_offset: id * 100,
        table_size: if backends.is_empty() { 0 } else { 13 },
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, b)| (id * 10 + i as u32, sa(b)))
            .collect(),
    };
    let v6_web = ["[2001:db8:1::2]:8080", "[2001:db8:1::3]:8080"];
    vec![
        svc(
            1,
            "198.18.0.10:80",
            PROTO_TCP,
            0,
            &["198.19.0.2:8080", "198.19.0.3:8080"],
        ),
        svc(2, "198.18.0.10:53", PROTO_UDP, 0, &["198.19.0.4:5353"]),
        svc(3, "[2001:db8::10]:80", PROTO_TCP, 0, &v6_web),
        svc(
            4,
            "[2001:db8::10]:53",
            PROTO_UDP,
            0,
            &["[2001:db8:1::4]:5353"],
        ),
        svc(5, "198.18.0.11:80", PROTO_TCP, SERVICE_FLAG_L7_PROXY, &[]),
        svc(6, "198.18.0.12:80", PROTO_TCP, 0, &[]),
    ]
}

/// Endpoints frames are built between: clients, service addresses (right and wrong ports),
/// backends and unrelated hosts.
const V4_ENDS: &[&str] = &[
    "198.18.1.1:40000",
    "198.18.1.2:40001",
    "198.18.0.10:80",
    "198.18.0.10:53",
    "198.18.0.10:81",
    "198.18.0.11:80",
    "198.18.0.12:80",
    "198.19.0.2:8080",
    "198.19.0.3:8080",
    "198.19.0.4:5353",
    "198.18.7.7:0",
    "198.19.255.255:65535",
];
const V6_ENDS: &[&str] = &[
    "[2001:db8:2::1]:40000",
    "[2001:db8:2::2]:40001",
    "[2001:db8::10]:80",
    "[2001:db8::10]:53",
    "[2001:db8:1::2]:8080",
    "[2001:db8:1::3]:8080",
    "[2001:db8:1::4]:5353",
    "[2001:db8::ff]:9",
];

/// Damage done to a built frame.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(usize),
    Byte(usize, u8),
    Vlan,
    Ihl(u8),
    IpChecksum,
    L4Checksum,
    Raw(mutate::Edit),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0usize..90).prop_map(Damage::Truncate),
        (0usize..90, any::<u8>()).prop_map(|(at, b)| Damage::Byte(at, b)),
        Just(Damage::Vlan),
        (0u8..16).prop_map(Damage::Ihl),
        Just(Damage::IpChecksum),
        Just(Damage::L4Checksum),
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Raw(mutate::Edit::Flip { at, bit })),
    ]
}

fn apply(frame: &mut Vec<u8>, d: &Damage) {
    let v4 = frame.get(12..14) == Some(&[0x08, 0x00]);
    match *d {
        Damage::Truncate(n) => frame.truncate(n),
        Damage::Byte(at, b) => {
            if let Some(x) = frame.get_mut(at) {
                *x = b;
            }
        }
        Damage::Vlan if frame.len() >= 12 => {
            frame.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        }
        Damage::Ihl(ihl) if v4 && frame.len() > 14 => frame[14] = 0x40 | ihl,
        Damage::IpChecksum if v4 && frame.len() > 25 => frame[24] ^= 0x5a,
        Damage::L4Checksum => {
            // TCP's checksum is at L4 + 16, UDP's at L4 + 6.
            let (l4, proto) = if v4 {
                let ihl = frame.get(14).copied().unwrap_or(0x45) & 0xf;
                (14 + usize::from(ihl) * 4, frame.get(23).copied())
            } else {
                (54, frame.get(20).copied())
            };
            let at = l4 + if proto == Some(6) { 16 } else { 6 };
            if let Some(x) = frame.get_mut(at) {
                *x ^= 0xa5;
            }
        }
        Damage::Raw(ref e) => mutate::apply(frame, e, &[], &[]),
        _ => {}
    }
}

/// The shortest frame a device delivers (an Ethernet header).
const ETH_HLEN: usize = 14;

/// How a frame is built before it is damaged.
#[derive(Clone, Debug)]
struct Shape {
    tcp: bool,
    syn: bool,
    rst: bool,
    ttl: u8,
    options: u8,
    payload: usize,
    fragment: u8,
    hop_by_hop: bool,
    dest_opts: bool,
    no_udp_checksum: bool,
}

fn shape() -> impl Strategy<Value = Shape> {
    let ttl = prop_oneof![Just(64u8), Just(1), Just(0), any::<u8>()];
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), ttl),
        (0u8..4, 0usize..40, 0u8..8),
        (any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |((tcp, syn, rst, ttl), (options, payload, fragment), flags)| Shape {
                tcp,
                syn,
                rst,
                ttl,
                options,
                payload,
                fragment,
                hop_by_hop: flags.0,
                dest_opts: flags.1,
                no_udp_checksum: flags.2,
            },
        )
}

fn build(src: SocketAddr, dst: SocketAddr, s: &Shape) -> Vec<u8> {
    let mut f = if s.tcp {
        Frame::tcp(src, dst)
    } else {
        Frame::udp(src, dst)
    };
    if s.tcp {
        f.l4 = L4::Tcp { syn: s.syn };
        f.tcp_rst = s.rst;
    }
    f.ttl = s.ttl;
    f.payload = vec![0x6d; s.payload];
    f.ipv4_options = vec![1; usize::from(s.options) * 4];
    f.ipv4_fragment = match s.fragment {
        1 => Some((true, 0)),
        2 => Some((false, 3)),
        _ => None,
    };
    f.ipv6_hop_by_hop = s.hop_by_hop;
    f.ipv6_dest_opts = s.dest_opts;
    f.ipv6_fragment = s.fragment == 3;
    f.udp_no_checksum = s.no_udp_checksum && src.is_ipv4();
    f.build().unwrap_or_default()
}

/// A frame from a random description, then 0..4 damages.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    let pick = |ends: &'static [&'static str]| {
        (0..ends.len(), 0..ends.len()).prop_map(move |(a, b)| (sa(ends[a]), sa(ends[b])))
    };
    let ends = prop_oneof![3 => pick(V4_ENDS), 1 => pick(V6_ENDS)];
    (ends, shape(), vec(damage(), 0..4)).prop_map(|((src, dst), shape, damages)| {
        let mut bytes = build(src, dst, &shape);
        for d in &damages {
            apply(&mut bytes, d);
        }
        bytes
    })
}

/// Protocol, source, destination of an unfragmented IP TCP/UDP frame whose IP header is valid
/// and whose ports are present: the least a frame needs for the pipeline to translate it (the
/// pipeline reads only ports from the L4 header; a segment with a bad data offset is the
/// receiver's to drop).
fn tuple(frame: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let ip = frame.get(14..)?;
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, &[u8]) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(ip.first()? & 0xf) * 4;
            let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
            if ip[0] >> 4 != 4 || ihl < 20 || fragment != 0 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (ip[9], src.into(), dst.into(), ip.get(ihl..)?)
        }
        [0x86, 0xdd] => {
            if ip.first()? >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let (mut next, mut at) = (*ip.get(6)?, 40);
            // Hop-by-hop, routing and destination options; a fragment header ends the walk.
            while matches!(next, 0 | 43 | 60) {
                next = *ip.get(at)?;
                at += (usize::from(*ip.get(at + 1)?) + 1) * 8;
            }
            (next, src.into(), dst.into(), ip.get(at..)?)
        }
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    Some((
        proto,
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
    ))
}

/// The pipeline's state as the harness sees it: the rules and the flows translated so far.
struct Model {
    services: Vec<Service>,
    /// (protocol, client, backend) -> service address.
    flows: HashMap<(u8, SocketAddr, SocketAddr), SocketAddr>,
    /// Frames that came out translated (shows the invariants were exercised).
    translated: u64,
}

impl Model {
    fn check(&mut self, lb: &mut Lb, input: &[u8]) -> Result<(), String> {
        if input.len() < ETH_HLEN {
            // No device delivers it, and BPF_PROG_TEST_RUN refuses it (EINVAL).
            return Ok(());
        }
        let counted = |lb: &Lb| -> Result<u64, String> {
            Ok(lb.reason_counts().map_err(|e| e.to_string())?.iter().sum())
        };
        let before = counted(lb)?;
        let (verdict, out) = match lb.run(input) {
            Ok(result) => result,
            // BPF_PROG_TEST_RUN refuses some frames before the program runs (for skbs, an IP
            // ethertype without a complete IP header): nothing was tested.
            Err(e) if format!("{e:#}").contains("Invalid argument") => return Ok(()),
            Err(e) => return Err(format!("run: {e:#}")),
        };
        let after = counted(lb)?;
        if ![XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&verdict) {
            return Err(format!("unexpected verdict {verdict}"));
        }
        if after != before + 1 {
            return Err(format!("{} reason counts for one frame", after - before));
        }
        if out == input && verdict == XDP_PASS {
            return Ok(());
        }
        let (proto, src, dst) =
            tuple(input).ok_or("modified a frame that is not unfragmented IP TCP/UDP")?;
        if out.len() != input.len() {
            return Err(format!(
                "length changed from {} to {}",
                input.len(),
                out.len()
            ));
        }
        let (oproto, osrc, odst) = tuple(&out).ok_or("the output frame does not parse")?;
        if oproto != proto {
            return Err("protocol changed".into());
        }
        // A reply of a tracked flow (the client may itself have used a service address) ...
        let reply = self.flows.get(&(proto, dst, src)).copied();
        let is_reply = reply.is_some_and(|vip| osrc == vip && odst == dst);
        if is_reply {
            // The reply's source is the service address again.
        } else if let Some(svc) = self
            .services
            .iter()
            .find(|s| s.addr == dst && s.proto == proto)
        {
            // ... or a packet to a service address.
            if svc.table_size == 0 || svc.flags & SERVICE_FLAG_L7_PROXY != 0 {
                return Err(format!(
                    "translated {src} -> {dst} into {osrc} -> {odst}: a service without \
                     kernel backends"
                ));
            }
            if osrc != src || !svc.backends.iter().any(|(_, b)| *b == odst) {
                return Err(format!(
                    "{src} -> {dst} became {osrc} -> {odst}: not to a backend of the service"
                ));
            }
            self.flows.insert((proto, src, odst), dst);
        } else if let Some(vip) = reply {
            return Err(format!(
                "reply {src} -> {dst} became {osrc} -> {odst}, want from {vip}"
            ));
        } else {
            return Err(format!(
                "{src} -> {dst} (verdict {verdict}) is neither to a service nor a tracked \
                 flow, yet it was modified"
            ));
        }
        self.translated += 1;
        if verify_checksums(input).is_ok() {
            verify_checksums(&out)
                .map_err(|e| format!("checksums broken by the translation: {e:#}"))?;
        }
        Ok(())
    }
}

fn fuzz_hook(hook: Hook, name: &str) {
    // SAFETY: plain syscall; CLONE_NEWNET affects only this test's thread: its FIB lookups see
    // an empty namespace, so translated frames come back as XDP_PASS deterministically.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let mut lb = Lb::load_hook(hook).expect("loading the program");
    let services = services();
    for s in &services {
        lb.install(s).expect("installing a service");
    }
    let mut model = Model {
        services,
        flows: HashMap::new(),
        translated: 0,
    };
    let corpus = Corpus::new("packets").named(name);
    let strategy = prop_oneof![
        4 => structured(),
        2 => mutate::mutated(corpus.seeds(), &[]),
        1 => vec(any::<u8>(), 0..128),
    ];
    let report = fuzz::run(&corpus, Budget::from_env(400), strategy, |frame| {
        model.check(&mut lb, frame)
    });
    eprintln!(
        "{name}: {} frames translated, {} flows tracked",
        model.translated,
        model.flows.len()
    );
    report.assert_clean();
}

#[test]
fn xdp_frames_keep_the_invariants() {
    fuzz_hook(Hook::Xdp, "packets-xdp");
}

#[test]
fn tc_frames_keep_the_invariants() {
    fuzz_hook(Hook::Tc, "packets-tc");
}

/// Writes the seed frames into the corpus (`MESH_FUZZ_WRITE_SEEDS=1`): one per frame shape the
/// golden tests cover.
#[test]
fn write_seed_frames() {
    if std::env::var("MESH_FUZZ_WRITE_SEEDS").ok().as_deref() != Some("1") {
        return;
    }
    let dir = Corpus::new("packets").dir;
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let v4 = Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.0.10:80"));
    let v6 = Frame::tcp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:80"));
    let mut ack = v4.clone();
    ack.l4 = L4::Tcp { syn: false };
    let mut opts = v4.clone();
    opts.ipv4_options = vec![1; 8];
    let mut frag = v4.clone();
    frag.ipv4_fragment = Some((true, 0));
    let mut ext = v6.clone();
    ext.ipv6_hop_by_hop = true;
    ext.ipv6_dest_opts = true;
    let seeds = [
        ("tcp-syn-v4", v4),
        ("tcp-ack-v4", ack),
        ("tcp-options-v4", opts),
        ("fragment-v4", frag),
        ("tcp-syn-v6", v6),
        ("ext-headers-v6", ext),
        (
            "udp-v4",
            Frame::udp(sa("198.18.1.1:40000"), sa("198.18.0.10:53")),
        ),
        (
            "udp-v6",
            Frame::udp(sa("[2001:db8:2::1]:40000"), sa("[2001:db8::10]:53")),
        ),
        (
            "reply-v4",
            Frame::tcp(sa("198.19.0.2:8080"), sa("198.18.1.1:40000")),
        ),
        (
            "not-service-v4",
            Frame::tcp(sa("198.18.1.1:40000"), sa("198.18.7.7:80")),
        ),
    ];
    for (name, frame) in seeds {
        let bytes = frame.build().expect("frame");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }
}
