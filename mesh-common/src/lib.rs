//! The contract between the kernel programs (`mesh-ebpf`) and the daemon (`mesh-user`).
//!
//! Everything both sides must agree on lives here and only here: map names, map sizes, the
//! layout of every key and value, flag bits and the pass/drop reason codes. All types are
//! `#[repr(C)]` with explicit padding so the byte layout is the same on both sides and no
//! uninitialised padding ever reaches a map.
//!
//! Byte order: addresses are stored as they appear on the wire (network order bytes); ports are
//! `u16` values holding the *network-order* bytes (i.e. `u16::from_ne_bytes(wire_bytes)`), so the
//! kernel can compare them with packet fields without swapping. Use [`port_to_wire`] and
//! [`port_from_wire`] on the user side.
#![no_std]

/// Map names, as they appear in the object file and under the bpffs pin directory.
pub mod map_names {
    /// Hash: [`ServiceKey`](crate::ServiceKey) -> [`ServiceInfo`](crate::ServiceInfo).
    /// Replacing a service's entry is how a change to that service takes effect: one map
    /// update switches it to a Maglev slice written beforehand.
    pub const SERVICES: &str = "SERVICES";
    /// Array: backend id -> [`Backend`](crate::Backend).
    pub const BACKENDS: &str = "BACKENDS";
    /// Array ([`MAGLEV_MAP_FLAGS`](crate::MAGLEV_MAP_FLAGS)): the Maglev pool, one slice per
    /// service; entries are backend ids.
    pub const MAGLEV: &str = "MAGLEV";
    /// LRU hash: [`FlowKey`](crate::FlowKey) as seen on the wire -> [`FlowState`](crate::FlowState).
    /// Holds both directions of every flow (one lookup per packet whichever way it goes): the
    /// client -> service entry names the backend, the backend -> client entry the service
    /// address to restore on replies (see [`FlowState::direction`](crate::FlowState)).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// LRU hash, same key and value as [`CONNTRACK`]: flows not yet confirmed by traffic in
    /// both directions (a request after a reply: the TCP handshake's final ACK, a UDP client's
    /// second datagram). A flood of spoofed packets only churns this table; flows move to
    /// [`CONNTRACK`] once confirmed, so the flood never evicts an established flow.
    pub const CT_PENDING: &str = "CT_PENDING";
    /// Per-CPU array: [`ct_event`](crate::ct_event) code -> count.
    pub const CT_STATS: &str = "CT_STATS";
    /// Per-CPU array: service id -> [`TrafficCounters`](crate::TrafficCounters).
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU array: backend id -> [`TrafficCounters`](crate::TrafficCounters).
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-CPU array: reason code -> packet count.
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const XDP_REDIRECT_TARGETS: &str = "XDP_REDIRECT_TARGETS";
    /// Ring buffer of [`TraceEvent`](crate::TraceEvent)s (decision trace); never pinned.
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    /// Single-entry array holding the [`TraceFilter`](crate::TraceFilter); never pinned.
    pub const TRACE_FILTER: &str = "TRACE_FILTER";
    /// Array, one entry: [`SockConfig`](crate::SockConfig) of the socket hooks.
    pub const SOCK_CONFIG: &str = "SOCK_CONFIG";
    /// LRU hash: [`SockKey`](crate::SockKey) (socket cookie + backend) ->
    /// [`SockTarget`](crate::SockTarget) (the service address the socket asked for): what
    /// `recvmsg` and `getpeername` show instead of the backend.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// LRU hash: [`SockKey`](crate::SockKey) (socket cookie + service address) ->
    /// [`SockTarget`](crate::SockTarget) (the backend): the UDP flows of unconnected sockets,
    /// so every datagram of one socket to one service goes to the same backend.
    pub const SOCK_FLOWS: &str = "SOCK_FLOWS";
    /// Per-CPU array: [`sock_reason`](crate::sock_reason) code -> count.
    pub const SOCK_STATS: &str = "SOCK_STATS";
}

/// Name of the load-time switch (a `.rodata` global, 1 by default) that compiles the trace check
/// in. Loaded with 0, the verifier removes the check entirely (the benchmark's baseline).
pub const TRACE_AVAILABLE_GLOBAL: &str = "TRACE_AVAILABLE";
/// Size of the trace ring buffer in bytes (a power of two, a multiple of the page size).
pub const TRACE_RING_BYTES: u32 = 1 << 20;

/// Names of the cgroup sock_addr programs (socket-level balancing of node-local clients), in
/// attach order, each with the hook it belongs to (`connect4`, `sendmsg6`, ...).
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    ("mesh_sock_connect4", "connect4"),
    ("mesh_sock_connect6", "connect6"),
    ("mesh_sock_sendmsg4", "sendmsg4"),
    ("mesh_sock_sendmsg6", "sendmsg6"),
    ("mesh_sock_recvmsg4", "recvmsg4"),
    ("mesh_sock_recvmsg6", "recvmsg6"),
    ("mesh_sock_getpeername4", "getpeername4"),
    ("mesh_sock_getpeername6", "getpeername6"),
];
/// Capacity of [`map_names::SOCK_REVNAT`] and of [`map_names::SOCK_FLOWS`] (LRU: the least
/// recently used sockets' entries go first).
pub const SOCK_MAP_ENTRIES: u32 = 65_536;

/// Name of the XDP program in the object file.
pub const XDP_PROGRAM_NAME: &str = "mesh_xdp";
/// Name of the trivial XDP_PASS program (used on veth peers so redirected frames are accepted,
/// and as the baseline in benchmarks).
pub const XDP_PASS_PROGRAM_NAME: &str = "mesh_xdp_pass";
/// Name of the TC (tcx / cls_bpf ingress) program, the same pipeline on an skb.
pub const TC_PROGRAM_NAME: &str = "mesh_tc";
/// Interfaces meshd can run XDP on natively at once (the XDP redirect-target map's size).
pub const MAX_XDP_INTERFACES: u32 = 1_024;

/// Capacity of [`map_names::SERVICES`].
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of [`map_names::BACKENDS`].
pub const MAX_BACKENDS: u32 = 131_072;
/// Default number of entries of the Maglev pool, all services together (meshd may resize it at
/// load time): 64 MiB (the kernel stores each entry in 8 bytes), room for 30 000 two-backend
/// services at their default table size (211) plus
/// the free space a change writes into before its switch.
pub const DEFAULT_MAGLEV_POOL_ENTRIES: u32 = 1 << 23;
/// Flags of [`map_names::MAGLEV`]: `BPF_F_MMAPABLE`, so meshd writes and reads slices through
/// shared memory instead of one system call per entry (the kernel's lookup is unchanged).
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;
/// Default capacity of the connection-tracking LRU map, in entries (meshd may resize it at load
/// time); every flow takes two entries, one per direction.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 524_288;
/// Default connection-tracking capacity in flows.
pub const DEFAULT_CONNTRACK_FLOWS: u32 = DEFAULT_CONNTRACK_ENTRIES / 2;
/// Default capacity of [`map_names::CT_PENDING`] in entries (two per flow); meshd sizes it from
/// `--conntrack-entries` at load time.
pub const DEFAULT_PENDING_ENTRIES: u32 = 65_536;
/// [`FlowState::flags`]: a reply of this pending flow was seen (set on its request entry).
pub const FLOW_FLAG_REPLY_SEEN: u8 = 1;
/// [`FlowState::direction`]: the entry of the client -> service direction.
pub const FLOW_REQUEST: u8 = 0;
/// [`FlowState::direction`]: the entry of the backend -> client direction.
pub const FLOW_REPLY: u8 = 1;
/// Largest Maglev table size per service (prime, as in Envoy/Istio).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Sentinel backend id: "no backend".
pub const NO_BACKEND: u32 = u32::MAX;

/// Address family tags used in keys.
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// [`ServiceInfo::flags`]: pick the backend by hashing only the client address
/// (`consistentHash.useSourceIp`), not the whole 5-tuple.
pub const SERVICE_FLAG_HASH_SOURCE_IP: u32 = 1 << 0;
/// [`ServiceInfo::flags`]: the service is served by the L7 proxy inside meshd; the kernel
/// program passes its packets to the stack untouched.
pub const SERVICE_FLAG_L7_PROXY: u32 = 1 << 1;

/// Pass/drop/forward reason codes: the index into [`map_names::REASON_STATS`].
pub mod reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, VLAN-tagged, ...).
    pub const PASS_NOT_IP: u32 = 0;
    /// A header ended before its declared length; the kernel decides what to do.
    pub const PASS_TRUNCATED: u32 = 1;
    /// An IP fragment: ports are unknown for non-first fragments, so all fragments go to the stack.
    pub const PASS_FRAGMENT: u32 = 2;
    /// IP traffic that is neither to a service address nor a reply of a tracked flow.
    pub const PASS_NOT_SERVICE: u32 = 3;
    /// Not TCP or UDP, or an IPv6 extension header chain we do not walk.
    pub const PASS_UNSUPPORTED_PROTOCOL: u32 = 4;
    /// TTL / hop limit would expire: the stack sends the ICMP error.
    pub const PASS_TTL_EXPIRED: u32 = 5;
    /// Translated, but the next hop's neighbour entry is not resolved: the stack resolves and sends.
    pub const PASS_NO_NEIGHBOUR: u32 = 6;
    /// Translated, but the FIB said the packet is not forwardable from XDP (local, blackhole,
    /// forwarding disabled, ...): handed to the stack.
    pub const PASS_FIB_OTHER: u32 = 7;
    /// A service served by the L7 proxy in meshd.
    pub const PASS_L7_PROXY: u32 = 8;
    /// A service with no backend in its table (its routes name subsets or hosts not defined yet,
    /// selecting no endpoint yet, or all weights zero): passed to the stack, where meshd has made
    /// the address local with nothing listening on the port, so a TCP client gets a reset and a
    /// UDP client an ICMP port unreachable at once (Istio answers such routes with 503).
    pub const REFUSED_NO_BACKEND: u32 = 9;
    /// A service lookup hit an inconsistent table (should never happen).
    pub const DROP_INTERNAL: u32 = 10;
    /// Forwarded out of the interface it came in on (XDP_TX).
    pub const FORWARD_TX: u32 = 11;
    /// Forwarded to another interface (XDP_REDIRECT, or a TC redirect).
    pub const FORWARD_REDIRECT: u32 = 12;
    /// TC sent the packet with `bpf_redirect_neigh`: the kernel resolves the next hop's MAC.
    pub const FORWARD_REDIRECT_NEIGH: u32 = 13;
    /// Translated and routed out of an interface XDP cannot send frames into (e.g. a veth):
    /// the stack forwards it.
    pub const PASS_STACK_FORWARDS: u32 = 14;
    /// TC sent the packet with `bpf_redirect_peer` straight into the ingress of a container's
    /// end of a veth (or netkit), skipping the host end's transmit and the backlog queue.
    pub const FORWARD_REDIRECT_PEER: u32 = 15;
    /// Number of reason codes.
    pub const COUNT: u32 = 16;

    /// Stable, lower-case names for reason codes (metrics labels, `meshctl status`).
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_truncated",
        "pass_fragment",
        "pass_not_service",
        "pass_unsupported_protocol",
        "pass_ttl_expired",
        "pass_no_neighbour",
        "pass_fib_other",
        "pass_l7_proxy",
        "refused_no_backend",
        "drop_internal",
        "forward_tx",
        "forward_redirect",
        "forward_redirect_neigh",
        "pass_stack_forwards",
        "forward_redirect_peer",
    ];
}

/// Values of [`map_names::XDP_REDIRECT_TARGETS`]: how the packet programs may send a packet into
/// an interface themselves (flags; an interface with none is not listed).
pub mod redirect_target {
    /// meshd runs XDP natively there, so its driver takes XDP frames: XDP may redirect into it.
    pub const XDP_FRAMES: u32 = 1 << 0;
    /// A veth or netkit device whose peer lives in another network namespace (a container's
    /// end): TC hands skbs routed into it straight to the peer's ingress (`bpf_redirect_peer`).
    pub const PEER: u32 = 1 << 1;
}

/// Connection-table events counted in [`map_names::CT_STATS`].
pub mod ct_event {
    /// A new flow entered the pending table (SYN, first datagram, or a packet of a flow whose
    /// state is gone).
    pub const PENDING: u32 = 0;
    /// A pending flow was confirmed (request after reply) and moved to the connection table.
    pub const CONFIRMED: u32 = 1;
    /// One direction of an established flow was missing (evicted) and rebuilt from the other.
    pub const REBUILT: u32 = 2;
    /// Number of event codes.
    pub const COUNT: u32 = 3;
    /// Names for metrics labels, indexed by code.
    pub const NAMES: [&str; COUNT as usize] = ["pending", "confirmed", "rebuilt"];
}

/// Outcomes of the socket hooks: the index into [`map_names::SOCK_STATS`].
pub mod sock_reason {
    /// `connect()` to a service address went straight to a backend.
    pub const CONNECT_BALANCED: u32 = 0;
    /// A UDP `sendmsg()` opened a new flow of an unconnected socket to a backend.
    pub const SENDMSG_BALANCED: u32 = 1;
    /// A UDP `sendmsg()` followed its socket's flow to the same backend.
    pub const SENDMSG_FLOW: u32 = 2;
    /// `recvmsg()` showed a backend's datagram as coming from the service address.
    pub const RECVMSG_RESTORED: u32 = 3;
    /// `getpeername()` showed the service address instead of the backend.
    pub const GETPEERNAME_RESTORED: u32 = 4;
    /// A service served by the L7 proxy: the address is left as it is (the proxy listens there).
    pub const L7_PROXY: u32 = 5;
    /// A service with no backend: the call fails with ECONNREFUSED.
    pub const NO_BACKEND: u32 = 6;
    /// A service lookup hit an inconsistent table (should never happen); the call fails.
    pub const INTERNAL: u32 = 7;
    /// Number of codes.
    pub const COUNT: u32 = 8;

    /// Stable, lower-case names (`meshctl status`, metrics labels).
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_balanced",
        "sendmsg_balanced",
        "sendmsg_flow",
        "recvmsg_restored",
        "getpeername_restored",
        "l7_proxy",
        "no_backend",
        "internal",
    ];
}

/// Value of [`map_names::SOCK_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockConfig {
    /// Cookie of meshd's network namespace (`SO_NETNS_COOKIE`): the hooks act only on sockets
    /// of this namespace. 0 turns them off.
    pub netns_cookie: u64,
}

/// Key of [`map_names::SOCK_REVNAT`] and [`map_names::SOCK_FLOWS`]: one socket and one peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Peer address (backend in SOCK_REVNAT, service in SOCK_FLOWS), wire order.
    pub addr: [u8; 16],
    /// Peer port, network order.
    pub port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}

/// Value of [`map_names::SOCK_REVNAT`] (the service address) and [`map_names::SOCK_FLOWS`]
/// (the backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockTarget {
    /// Address, wire order.
    pub addr: [u8; 16],
    /// Port, network order.
    pub port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service id (for counters).
    pub service_id: u32,
    /// Backend id (for counters, and to see that a cached backend is still the same).
    pub backend_id: u32,
}

/// Key of [`map_names::SERVICES`]: a service address.
///
/// IPv4 addresses occupy `addr[0..4]`, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// Service address (VIP or node address for a Gateway), wire order.
    pub addr: [u8; 16],
    /// Service port, network order (see the crate docs).
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// Value of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    /// Stable id: index into [`map_names::SERVICE_STATS`].
    pub service_id: u32,
    /// Index of this service's first Maglev entry in [`map_names::MAGLEV`].
    pub table_offset: u32,
    /// Number of Maglev entries (prime), 0 when the service has no backend.
    pub table_size: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
}

/// Value of [`map_names::BACKENDS`]: where a backend listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Backend address, wire order; IPv4 in `addr[0..4]`.
    pub addr: [u8; 16],
    /// Backend port (targetPort), network order.
    pub port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`]; 0 marks an unused slot.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// Key of [`map_names::CONNTRACK`]: one direction of a flow as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address, wire order; IPv4 in `[0..4]`.
    pub src_addr: [u8; 16],
    /// Destination address, wire order; IPv4 in `[0..4]`.
    pub dst_addr: [u8; 16],
    /// Source port, network order.
    pub src_port: u16,
    /// Destination port, network order.
    pub dst_port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// Value of [`map_names::CONNTRACK`].
///
/// In a [`FLOW_REQUEST`] entry (key: client -> service address) `addr`/`port` are the chosen
/// backend; in a [`FLOW_REPLY`] entry (key: backend -> client) they are the service address to
/// restore as the source of replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// Address to write (backend for requests, service address for replies), wire order.
    pub addr: [u8; 16],
    /// Port to write, network order.
    pub port: u16,
    /// [`FLOW_REQUEST`] or [`FLOW_REPLY`].
    pub direction: u8,
    /// [`FLOW_FLAG_REPLY_SEEN`] (pending flows only); zero otherwise.
    pub flags: u8,
    /// Service id (for counters).
    pub service_id: u32,
    /// Backend id (for counters).
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub _pad2: u32,
    /// `bpf_ktime_get_ns()` when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet seen, refreshed at most about once a second.
    pub last_seen_ns: u64,
}

/// Counters kept per service and per backend (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    /// Packets from clients towards the service.
    pub packets: u64,
    /// Bytes (whole frames) from clients towards the service.
    pub bytes: u64,
    /// Reply packets from backends back to clients.
    pub reply_packets: u64,
    /// Reply bytes (whole frames).
    pub reply_bytes: u64,
    /// New flows (conntrack misses that selected a backend).
    pub connections: u64,
    /// TCP resets sent by backends (refused or aborted connections): the L4 health signal.
    pub reply_resets: u64,
}

impl TrafficCounters {
    /// Adds another CPU's counters into these.
    pub fn accumulate(&mut self, other: &TrafficCounters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.reply_packets = self.reply_packets.wrapping_add(other.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(other.reply_bytes);
        self.connections = self.connections.wrapping_add(other.connections);
        self.reply_resets = self.reply_resets.wrapping_add(other.reply_resets);
    }
}

/// [`TraceFilter::fields`]: match the client address (request source, reply destination).
pub const TRACE_MATCH_CLIENT_ADDR: u32 = 1 << 0;
/// [`TraceFilter::fields`]: match the client port.
pub const TRACE_MATCH_CLIENT_PORT: u32 = 1 << 1;
/// [`TraceFilter::fields`]: match the service address (request destination before NAT).
pub const TRACE_MATCH_SERVICE_ADDR: u32 = 1 << 2;
/// [`TraceFilter::fields`]: match the service port.
pub const TRACE_MATCH_SERVICE_PORT: u32 = 1 << 3;
/// [`TraceFilter::fields`]: match the backend id.
pub const TRACE_MATCH_BACKEND: u32 = 1 << 4;

/// [`TraceEvent::hook`]: the XDP entry.
pub const TRACE_HOOK_XDP: u8 = 1;
/// [`TraceEvent::hook`]: the TC entry.
pub const TRACE_HOOK_TC: u8 = 2;

/// [`TraceEvent::kind`]: a new flow, backend picked from the Maglev table.
pub const TRACE_NEW_FLOW: u8 = 1;
/// [`TraceEvent::kind`]: a packet of a tracked connection, sent to its recorded backend.
pub const TRACE_ESTABLISHED: u8 = 2;
/// [`TraceEvent::kind`]: a reply from a backend, service address restored.
pub const TRACE_REPLY: u8 = 3;
/// [`TraceEvent::kind`]: a packet to a service address that was not balanced (refused for want
/// of a backend, passed to the L7 proxy or the stack, dropped); [`TraceEvent::reason`] says why.
pub const TRACE_UNTRANSLATED: u8 = 4;
/// [`TraceEvent::reason`] of translated packets (their action says where they went).
pub const TRACE_REASON_TRANSLATED: u8 = u8::MAX;

/// Value of [`map_names::TRACE_FILTER`]: which packets the kernel reports.
///
/// Off (`enabled == 0`) the programs read this one entry and nothing else. On, a packet is
/// reported when every field named in `fields` matches; userspace may filter further.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceFilter {
    /// 0: tracing off.
    pub enabled: u32,
    /// `TRACE_MATCH_*` bits: which of the fields below must match.
    pub fields: u32,
    /// Client address, wire order; IPv4 in `[0..4]`.
    pub client_addr: [u8; 16],
    /// Service address, wire order; IPv4 in `[0..4]`.
    pub service_addr: [u8; 16],
    /// Client port, network order.
    pub client_port: u16,
    /// Service port, network order.
    pub service_port: u16,
    /// Backend id.
    pub backend_id: u32,
}

/// One decision of the kernel path, as written to [`map_names::TRACE_EVENTS`].
///
/// The tuple is the packet as it arrived (before translation); `target_*` is what was written
/// into it (the backend for requests, the service address for replies).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// The packet's source and destination as it arrived.
    pub key: FlowKey,
    /// Address written into the packet, wire order.
    pub target_addr: [u8; 16],
    /// Port written into the packet, network order.
    pub target_port: u16,
    /// [`TRACE_HOOK_XDP`] or [`TRACE_HOOK_TC`].
    pub hook: u8,
    /// `TRACE_NEW_FLOW`, `TRACE_ESTABLISHED`, `TRACE_REPLY` or `TRACE_UNTRANSLATED`.
    pub kind: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The [`reason`] code of an untranslated packet, [`TRACE_REASON_TRANSLATED`] otherwise.
    pub reason: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// Service id.
    pub service_id: u32,
    /// Backend id.
    pub backend_id: u32,
    /// Maglev slot (index inside the service's table) for new flows, `u32::MAX` otherwise.
    pub slot: u32,
    /// The program's return code (XDP or TC action).
    pub action: u32,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// Explicit padding, always zero.
    pub _pad2: u32,
}

/// Converts a host-order port to the representation stored in maps.
pub const fn port_to_wire(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// Converts a port stored in a map back to host order.
pub const fn port_from_wire(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], contain only integers and byte arrays, and have explicit
    // padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::TraceEvent {}
    unsafe impl aya::Pod for super::SockConfig {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockTarget {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceInfo>(), 16);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowState>(), 48);
        assert_eq!(size_of::<TrafficCounters>(), 48);
        assert_eq!(size_of::<TraceFilter>(), 48);
        assert_eq!(size_of::<TraceEvent>(), 96);
        assert_eq!(size_of::<SockConfig>(), 8);
        assert_eq!(size_of::<SockKey>(), 32);
        assert_eq!(size_of::<SockTarget>(), 28);
    }

    #[test]
    fn ports_round_trip_through_wire_order() {
        assert_eq!(port_from_wire(port_to_wire(8080)), 8080);
        assert_eq!(port_to_wire(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }

    /// Reads the reason constants from this file's source, so a reason added without its name,
    /// a name out of order or a gap in the numbering fails here (the array length alone is
    /// fixed by its type and proves nothing).
    #[test]
    fn every_reason_has_a_name() {
        assert_eq!(sock_reason::NAMES.len(), sock_reason::COUNT as usize);
        extern crate std;
        use std::{string::String, vec::Vec};
        let source = include_str!("lib.rs");
        let start = source.find("pub mod reason {").expect("mod reason");
        let body = &source[start..];
        let body = &body[..body.find("\n}").expect("end of mod reason")];
        let mut constants: Vec<(String, u32)> = Vec::new();
        for line in body.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const ") else {
                continue;
            };
            let Some((name, value)) = rest.split_once(": u32 = ") else {
                continue;
            };
            let value: u32 = value.trim_end_matches(';').parse().expect(name);
            if name != "COUNT" {
                constants.push((String::from(name), value));
            }
        }
        assert_eq!(constants.len(), reason::COUNT as usize, "{constants:?}");
        let mut values: Vec<u32> = constants.iter().map(|(_, v)| *v).collect();
        values.sort_unstable();
        assert!(
            values.iter().copied().eq(0..reason::COUNT),
            "reason codes must be 0..COUNT without gaps or repeats: {values:?}"
        );
        for (name, value) in &constants {
            assert_eq!(
                reason::NAMES[*value as usize],
                name.to_lowercase(),
                "name of reason {name} = {value}"
            );
        }
    }
}
