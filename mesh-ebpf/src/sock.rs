//! Socket-level balancing for clients in meshd's own network namespace (a host-network pod, an
//! agent, `curl` on the node): cgroup sock_addr hooks that choose the backend when the socket
//! names its peer, so the connection's packets carry the backend's address from the start and
//! pay no per-packet translation.
//!
//! - `connect4/6`: a TCP connect, or a UDP connect, to a service address goes to a backend chosen
//!   by the same service lookup and Maglev selection as the packet path (`select.rs`);
//! - `sendmsg4/6`: a datagram of an unconnected UDP socket to a service address goes to the
//!   backend of that socket's flow to the service (chosen on its first datagram, kept in
//!   `SOCK_FLOWS` while the backend stays in the tables);
//! - `recvmsg4/6`, `getpeername4/6`: the backend's address is shown as the service address the
//!   socket asked for (`SOCK_REVNAT`, keyed by socket cookie and backend).
//!
//! The hooks are attached to a cgroup2 root, so they see the calls of every process in every
//! network namespace; they act only on sockets of the namespace in `SOCK_CONFIG` and return
//! "proceed" at once for all others. Services on the L7 proxy are left alone (the proxy listens
//! on the service address itself). The selection hashes the socket cookie instead of the
//! 5-tuple (the source port is not chosen yet at connect time); with `useSourceIp` it hashes the
//! namespace cookie, so all clients of the node share one backend, as one source address would.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::{
    sock_reason, FlowKey, ServiceInfo, SockKey, SockTarget, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP,
    PROTO_UDP, SERVICE_FLAG_HASH_SOURCE_IP, SERVICE_FLAG_L7_PROXY,
};

use crate::{
    maps::{BACKENDS, SOCK_CONFIG, SOCK_FLOWS, SOCK_REVNAT, SOCK_STATS},
    select, stats,
};

/// Verdict of a sock_addr program: let the call go on (with the address as the program left it).
const PROCEED: i32 = 1;
/// Verdict of a sock_addr program: fail the call (with the errno given to `bpf_set_retval`).
const REJECT: i32 = 0;
/// `ECONNREFUSED`: what a client sees for a service without backends, like a closed port.
const ECONNREFUSED: i32 = 111;

/// Which call a hook intercepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// connect(): the socket's one peer.
    Connect,
    /// sendmsg() with an address on an unconnected UDP socket.
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, FAMILY_IPV4, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, FAMILY_IPV6, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, FAMILY_IPV4, Call::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, FAMILY_IPV6, Call::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_IPV4, sock_reason::RECVMSG_RESTORED)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_IPV6, sock_reason::RECVMSG_RESTORED)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_IPV4, sock_reason::GETPEERNAME_RESTORED)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_IPV6, sock_reason::GETPEERNAME_RESTORED)
}

/// connect/sendmsg: a service address becomes a backend's.
#[inline(always)]
fn forward(ctx: &SockAddrContext, family: u8, call: Call) -> i32 {
    let Some(netns) = our_netns(ctx) else {
        return PROCEED;
    };
    // SAFETY: the context pointer is valid for the whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = peer(sa, family);
    // The service's family: IPv4 for a mapped address on an IPv6 socket.
    let (svc_family, addr, mapped) = unmap(family, addr);
    // SAFETY: plain helper call on a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut key = FlowKey {
        dst_addr: addr,
        dst_port: port,
        proto,
        family: svc_family,
        ..FlowKey::default()
    };
    let Some(svc) = select::service(&key) else {
        return PROCEED;
    };
    if svc.flags & SERVICE_FLAG_L7_PROXY != 0 {
        return count(sock_reason::L7_PROXY, PROCEED);
    }
    if svc.table_size == 0 {
        return refuse(sock_reason::NO_BACKEND);
    }
    let flow_key = SockKey {
        cookie,
        addr,
        port,
        family: svc_family,
        proto,
        _pad: [0; 4],
    };
    if call == Call::Sendmsg {
        if let Some(backend) = flow(&flow_key) {
            set_peer(sa, family, &backend.addr, backend.port, mapped);
            return count(sock_reason::SENDMSG_FLOW, PROCEED);
        }
    }
    // The client's identity in the hash: this socket, or with `useSourceIp` the whole node.
    let client = if svc.flags & SERVICE_FLAG_HASH_SOURCE_IP != 0 {
        netns
    } else {
        cookie
    };
    key.src_addr[..8].copy_from_slice(&client.to_ne_bytes());
    let Some((backend_id, backend)) = select::backend(&key, &svc) else {
        return refuse(sock_reason::INTERNAL);
    };
    let target = SockTarget {
        addr: backend.addr,
        port: backend.port,
        family: svc_family,
        _pad: 0,
        service_id: svc.service_id,
        backend_id,
    };
    remember(&flow_key, &target, &svc, call);
    set_peer(sa, family, &backend.addr, backend.port, mapped);
    let why = match call {
        Call::Connect => sock_reason::CONNECT_BALANCED,
        Call::Sendmsg => sock_reason::SENDMSG_BALANCED,
    };
    count(why, PROCEED)
}

/// recvmsg/getpeername: a backend's address is shown as the service address asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8, why: u32) -> i32 {
    if our_netns(ctx).is_none() {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for the whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = peer(sa, family);
    let (svc_family, addr, mapped) = unmap(family, addr);
    let key = SockKey {
        // SAFETY: plain helper call on a sock_addr context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        family: svc_family,
        proto,
        _pad: [0; 4],
    };
    // SAFETY: the value is copied out at once.
    let Some(service) = (unsafe { SOCK_REVNAT.get(&key) }).copied() else {
        return PROCEED;
    };
    set_peer(sa, family, &service.addr, service.port, mapped);
    count(why, PROCEED)
}

/// The namespace cookie of the socket when it is meshd's namespace.
#[inline(always)]
fn our_netns(ctx: &SockAddrContext) -> Option<u64> {
    let wanted = SOCK_CONFIG.get(0)?.netns_cookie;
    // SAFETY: plain helper call on a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (wanted != 0 && netns == wanted).then_some(netns)
}

/// The cached backend of an unconnected UDP socket's flow, if it is still where it was: a
/// backend slot reused for another address since (the backend left the rules) sends the flow
/// to a fresh selection.
#[inline(always)]
fn flow(key: &SockKey) -> Option<SockTarget> {
    // SAFETY: the value is copied out at once.
    let cached = unsafe { SOCK_FLOWS.get(key) }.copied()?;
    let slot = BACKENDS.get(cached.backend_id)?;
    (slot.family != 0 && slot.addr == cached.addr && slot.port == cached.port).then_some(cached)
}

/// Records a new choice: the reverse entry (recvmsg/getpeername), the UDP flow, and one
/// connection in the service's and the backend's counters (once per socket and backend: a
/// repeated connect() on a non-blocking socket chooses the same backend and counts nothing).
#[inline(always)]
fn remember(flow_key: &SockKey, target: &SockTarget, svc: &ServiceInfo, call: Call) {
    let rev_key = SockKey {
        addr: target.addr,
        port: target.port,
        ..*flow_key
    };
    let service = SockTarget {
        addr: flow_key.addr,
        port: flow_key.port,
        ..*target
    };
    // SAFETY: the value is only compared.
    let known = unsafe { SOCK_REVNAT.get(&rev_key) }
        .is_some_and(|old| old.addr == service.addr && old.port == service.port);
    if !known {
        let _ = SOCK_REVNAT.insert(&rev_key, &service, 0);
        stats::connection(svc.service_id, target.backend_id);
    }
    if call == Call::Sendmsg {
        let _ = SOCK_FLOWS.insert(flow_key, target, 0);
    }
}

/// The peer address in the context (wire order, IPv4 in the first 4 bytes) and port.
#[inline(always)]
fn peer(sa: &bpf_sock_addr, family: u8) -> ([u8; 16], u16) {
    let mut addr = [0u8; 16];
    if family == FAMILY_IPV4 {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        addr[..4].copy_from_slice(&sa.user_ip6[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&sa.user_ip6[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&sa.user_ip6[2].to_ne_bytes());
        addr[12..].copy_from_slice(&sa.user_ip6[3].to_ne_bytes());
    }
    // The port is stored in network order in the low 16 bits.
    (addr, sa.user_port as u16)
}

/// An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`: a dual-stack IPv6 socket talking to an IPv4
/// address) as the IPv4 address it stands for, flagged so the answer is mapped back.
#[inline(always)]
fn unmap(family: u8, addr: [u8; 16]) -> (u8, [u8; 16], bool) {
    let is_mapped = family == FAMILY_IPV6
        && addr[..10].iter().all(|b| *b == 0)
        && addr[10] == 0xff
        && addr[11] == 0xff;
    if !is_mapped {
        return (family, addr, false);
    }
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&addr[12..]);
    (FAMILY_IPV4, v4, true)
}

/// Writes the peer address and port into the context of a `family` hook (4-byte stores, as the
/// verifier wants): `addr` of its own family, or an IPv4 address mapped into IPv6 when `mapped`.
#[inline(always)]
fn set_peer(sa: &mut bpf_sock_addr, family: u8, addr: &[u8; 16], port: u16, mapped: bool) {
    if family == FAMILY_IPV4 {
        sa.user_ip4 = select::word(addr, 0);
    } else if mapped {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        sa.user_ip6[3] = select::word(addr, 0);
    } else {
        sa.user_ip6[0] = select::word(addr, 0);
        sa.user_ip6[1] = select::word(addr, 1);
        sa.user_ip6[2] = select::word(addr, 2);
        sa.user_ip6[3] = select::word(addr, 3);
    }
    sa.user_port = port as u32;
}

/// Fails the call with ECONNREFUSED, counted under `why`.
#[inline(always)]
fn refuse(why: u32) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    count(why, REJECT)
}

/// Counts one outcome and returns `verdict`.
#[inline(always)]
fn count(why: u32, verdict: i32) -> i32 {
    if let Some(slot) = SOCK_STATS.get_ptr_mut(why) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += 1 };
    }
    verdict
}
