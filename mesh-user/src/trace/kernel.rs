//! The kernel half of the trace: the `TRACE_FILTER` map (what the programs report) and a reader
//! thread draining the `TRACE_EVENTS` ring buffer into the [`hub`](super::hub).
//!
//! Ids in kernel events are turned into names (service, backend address, subset, version,
//! interface) with a table the daemon provides; it is refreshed when an unknown id shows up.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Mutex,
    time::{Instant, SystemTime},
};

use aya::{
    maps::{Array, MapData, RingBuf},
    Ebpf,
};
use mesh_common::{
    map_names, port_from_wire, port_to_wire, FlowKey, FAMILY_IPV4, TRACE_HOOK_TC,
    TRACE_MATCH_CLIENT_ADDR, TRACE_MATCH_CLIENT_PORT, TRACE_MATCH_SERVICE_ADDR,
    TRACE_MATCH_SERVICE_PORT, TRACE_NEW_FLOW, TRACE_REPLY, TRACE_UNTRANSLATED,
};
use tracing::{debug, warn};

use super::{hub::hub, parse_endpoint, Kind, TraceEvent, TraceFilter};
use crate::dataplane::tables::InstalledService;

/// The kernel's filter map.
pub struct KernelFilter(Mutex<Array<MapData, mesh_common::TraceFilter>>);

impl KernelFilter {
    /// Writes `filter` (None: tracing off).
    pub(crate) fn set(&self, filter: Option<&TraceFilter>) {
        let value = filter.map(to_kernel).unwrap_or_default();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = map.set(0, value, 0) {
            warn!("setting the kernel trace filter: {e}");
        }
    }
}

/// The kernel filter for a user filter: the fields the kernel can check (addresses and ports);
/// names, subsets and verdicts are checked in userspace.
pub fn to_kernel(filter: &TraceFilter) -> mesh_common::TraceFilter {
    let mut k = mesh_common::TraceFilter {
        enabled: 1,
        ..Default::default()
    };
    if let Some((ip, port)) = filter.client.as_deref().and_then(parse_endpoint) {
        k.client_addr = addr_bytes(ip);
        k.fields |= TRACE_MATCH_CLIENT_ADDR;
        if let Some(port) = port {
            k.client_port = port_to_wire(port);
            k.fields |= TRACE_MATCH_CLIENT_PORT;
        }
    }
    if let Some((ip, port)) = filter.service.as_deref().and_then(parse_endpoint) {
        k.service_addr = addr_bytes(ip);
        k.fields |= TRACE_MATCH_SERVICE_ADDR;
        if let Some(port) = port {
            k.service_port = port_to_wire(port);
            k.fields |= TRACE_MATCH_SERVICE_PORT;
        }
    }
    k
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn ip_of(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Ids to names, from the rules in force.
#[derive(Clone, Debug, Default)]
pub struct Names {
    services: HashMap<u32, String>,
    backends: HashMap<u32, (Option<String>, Option<String>)>,
}

impl Names {
    /// From the services installed in the kernel.
    pub fn from_installed<'a>(installed: impl IntoIterator<Item = &'a InstalledService>) -> Self {
        let mut names = Names::default();
        for s in installed {
            names.services.insert(s.service_id, s.name.clone());
            for b in &s.backends {
                names
                    .backends
                    .insert(b.backend_id, (b.subset.clone(), b.version.clone()));
            }
        }
        names
    }
}

/// Provides fresh [`Names`] (locks the controller).
pub type Resolver = Box<dyn Fn() -> Names + Send>;

/// Starts the kernel trace of the controller's dataplane, with names from its rules.
pub fn start_for(controller: &std::sync::Arc<Mutex<crate::daemon::control::Controller>>) {
    let weak = std::sync::Arc::downgrade(controller);
    let resolver: Resolver = Box::new(move || {
        weak.upgrade()
            .map(|c| {
                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                Names::from_installed(c.dataplane_mut().tables.installed())
            })
            .unwrap_or_default()
    });
    let mut c = controller.lock().unwrap_or_else(|p| p.into_inner());
    start(&mut c.dataplane_mut().ebpf, resolver);
}

/// Takes the trace maps out of `ebpf`, hands the filter to the hub and starts the reader.
///
/// Without a ring buffer (a kernel before 5.8 refuses the map) tracing is unavailable and meshd
/// runs on.
pub fn start(ebpf: &mut Ebpf, resolver: Resolver) {
    let filter = ebpf
        .take_map(map_names::TRACE_FILTER)
        .and_then(|m| Array::<MapData, mesh_common::TraceFilter>::try_from(m).ok());
    let ring = ebpf
        .take_map(map_names::TRACE_EVENTS)
        .and_then(|m| RingBuf::try_from(m).ok());
    let (Some(filter), Some(ring)) = (filter, ring) else {
        warn!("the kernel programs have no trace maps: `meshctl trace` shows proxy requests only");
        return;
    };
    hub().set_kernel_filter(KernelFilter(Mutex::new(filter)));
    std::thread::Builder::new()
        .name("trace-reader".into())
        .spawn(move || read_loop(ring, resolver))
        .expect("spawning the trace reader thread");
}

fn read_loop(mut ring: RingBuf<MapData>, resolver: Resolver) {
    let mut names = resolver();
    let mut interfaces: HashMap<u32, String> = HashMap::new();
    let mut last_heartbeat = Instant::now();
    loop {
        let mut pfd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = super::hub::HEARTBEAT.as_millis() as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                warn!("trace ring buffer poll: {err}; tracing stops");
                return;
            }
        }
        let mut refreshed = false;
        while let Some(item) = ring.next() {
            hub().count_kernel_event();
            if item.len() < std::mem::size_of::<mesh_common::TraceEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole TraceEvent (checked length); read unaligned.
            let raw: mesh_common::TraceEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            if !refreshed
                && (!names.services.contains_key(&raw.service_id)
                    || (raw.kind != TRACE_UNTRANSLATED
                        && !names.backends.contains_key(&raw.backend_id)))
            {
                names = resolver();
                refreshed = true;
            }
            let interface = interfaces
                .entry(raw.ifindex)
                .or_insert_with(|| {
                    nix::net::if_::if_indextoname(raw.ifindex)
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| format!("if{}", raw.ifindex))
                })
                .clone();
            let event = decode(&raw, &names, interface);
            hub().publish(&event);
        }
        if last_heartbeat.elapsed() >= super::hub::HEARTBEAT {
            last_heartbeat = Instant::now();
            hub().heartbeat();
            debug!(stats = ?hub().stats(), "trace heartbeat");
        }
    }
}

/// One kernel event in user terms.
pub fn decode(raw: &mesh_common::TraceEvent, names: &Names, interface: String) -> TraceEvent {
    let key: &FlowKey = &raw.key;
    let src = SocketAddr::new(
        ip_of(&key.src_addr, key.family),
        port_from_wire(key.src_port),
    );
    let dst = SocketAddr::new(
        ip_of(&key.dst_addr, key.family),
        port_from_wire(key.dst_port),
    );
    let target = SocketAddr::new(
        ip_of(&raw.target_addr, key.family),
        port_from_wire(raw.target_port),
    );
    let (kind, client, service_addr, backend) = match raw.kind {
        TRACE_REPLY => (Kind::Reply, dst, target, Some(src)),
        TRACE_NEW_FLOW => (Kind::New, src, dst, Some(target)),
        TRACE_UNTRANSLATED => (untranslated_kind(raw.reason), src, dst, None),
        _ => (Kind::Established, src, dst, Some(target)),
    };
    let reason = (raw.kind == TRACE_UNTRANSLATED)
        .then(|| mesh_common::reason::NAMES.get(usize::from(raw.reason)))
        .flatten()
        .map(|name| name.to_string());
    let (subset, version) = names
        .backends
        .get(&raw.backend_id)
        .cloned()
        .unwrap_or_default();
    let hook = if raw.hook == TRACE_HOOK_TC {
        "tc"
    } else {
        "xdp"
    };
    TraceEvent {
        at: epoch_of_ktime(raw.ts_ns),
        hook: hook.into(),
        kind,
        flags: if key.proto == mesh_common::PROTO_TCP {
            tcp_flags(raw.tcp_flags)
        } else {
            String::new()
        },
        client,
        service: names
            .services
            .get(&raw.service_id)
            .cloned()
            .unwrap_or_else(|| format!("service#{}", raw.service_id)),
        service_addr,
        backend,
        subset,
        version,
        slot: (raw.slot != u32::MAX).then_some(raw.slot),
        action: action_name(raw.hook, raw.action),
        reason,
        interface: Some(interface),
        request: None,
        route: None,
        status: None,
    }
}

/// The kind of an untranslated packet, from its reason code.
fn untranslated_kind(reason: u8) -> Kind {
    match u32::from(reason) {
        mesh_common::reason::REFUSED_NO_BACKEND => Kind::Refused,
        mesh_common::reason::DROP_INTERNAL => Kind::Dropped,
        _ => Kind::Passed,
    }
}

fn action_name(hook: u8, action: u32) -> String {
    if hook == TRACE_HOOK_TC {
        return match action {
            0 => "TC_ACT_OK".into(),
            2 => "TC_ACT_SHOT".into(),
            7 => "TC_ACT_REDIRECT".into(),
            n => format!("TC_ACT_{n}"),
        };
    }
    match action {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        2 => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        4 => "XDP_REDIRECT".into(),
        n => format!("XDP_{n}"),
    }
}

fn tcp_flags(flags: u8) -> String {
    const NAMES: [(u8, &str); 6] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    names.join("|")
}

/// Seconds since the epoch now.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) as seconds since the epoch.
fn epoch_of_ktime(ns: u64) -> f64 {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
        .unwrap_or(0.0);
    epoch_now() - (mono - ns as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_filter_carries_addresses_and_ports_only() {
        let k = to_kernel(&TraceFilter {
            client: Some("198.18.1.2:40112".into()),
            service: Some("reviews".into()),
            ..Default::default()
        });
        assert_eq!(k.enabled, 1);
        assert_eq!(k.fields, TRACE_MATCH_CLIENT_ADDR | TRACE_MATCH_CLIENT_PORT);
        assert_eq!(&k.client_addr[..4], &[198, 18, 1, 2]);
        assert_eq!(port_from_wire(k.client_port), 40112);
        let k = to_kernel(&TraceFilter {
            service: Some("198.18.100.10:9080".into()),
            ..Default::default()
        });
        assert_eq!(
            k.fields,
            TRACE_MATCH_SERVICE_ADDR | TRACE_MATCH_SERVICE_PORT
        );
    }

    #[test]
    fn decodes_a_new_flow_and_a_reply() {
        let mut key = FlowKey {
            family: FAMILY_IPV4,
            proto: mesh_common::PROTO_TCP,
            src_port: port_to_wire(40112),
            dst_port: port_to_wire(9080),
            ..Default::default()
        };
        key.src_addr[..4].copy_from_slice(&[198, 18, 1, 2]);
        key.dst_addr[..4].copy_from_slice(&[198, 18, 100, 10]);
        let mut raw = mesh_common::TraceEvent {
            key,
            target_port: port_to_wire(9080),
            hook: mesh_common::TRACE_HOOK_XDP,
            kind: TRACE_NEW_FLOW,
            tcp_flags: 0x02,
            service_id: 7,
            backend_id: 3,
            slot: 2113,
            action: 4,
            ..Default::default()
        };
        raw.target_addr[..4].copy_from_slice(&[198, 18, 13, 2]);
        let mut names = Names::default();
        names.services.insert(7, "reviews".into());
        names
            .backends
            .insert(3, (Some("v3".into()), Some("v3".into())));
        let e = decode(&raw, &names, "eth2".into());
        assert_eq!(
            e.to_string(),
            "SYN 198.18.1.2:40112 -> reviews 198.18.100.10:9080: new flow, Maglev slot 2113 -> \
             v3 198.18.13.2:9080, XDP_REDIRECT (in eth2)"
        );
        // The reply: backend -> client, service address restored.
        raw.kind = TRACE_REPLY;
        raw.key.src_addr = raw.target_addr;
        raw.key.src_port = port_to_wire(9080);
        raw.key.dst_addr = key.src_addr;
        raw.key.dst_port = key.src_port;
        raw.target_addr = key.dst_addr;
        raw.tcp_flags = 0x12;
        raw.slot = u32::MAX;
        let e = decode(&raw, &names, "eth1".into());
        assert_eq!(e.kind, Kind::Reply);
        assert_eq!(e.client, "198.18.1.2:40112".parse().unwrap());
        assert_eq!(e.service_addr, "198.18.100.10:9080".parse().unwrap());
        assert_eq!(e.backend, Some("198.18.13.2:9080".parse().unwrap()));
        assert_eq!(e.flags, "SYN|ACK");
        // A SYN to a service without backends: refused, passed to the stack.
        raw.kind = TRACE_UNTRANSLATED;
        raw.reason = mesh_common::reason::REFUSED_NO_BACKEND as u8;
        raw.key = key;
        raw.target_addr = key.dst_addr;
        raw.tcp_flags = 0x02;
        raw.action = 2;
        let e = decode(&raw, &names, "eth1".into());
        assert_eq!(
            e.to_string(),
            "SYN 198.18.1.2:40112 -> reviews 198.18.100.10:9080: refused (refused_no_backend), \
             XDP_PASS (in eth1)"
        );
        assert_eq!(e.backend, None);
    }
}
