//! Connections the node's own stack terminates.
//!
//! When a service moves from the L7 proxy back to the kernel path, clients may still hold
//! connections to the proxy on the service address. Their packets miss the connection table
//! and would be balanced like a new flow, which resets them. A socket lookup tells them apart:
//! a non-SYN TCP packet that matches a local, non-listening socket belongs to such a connection
//! and goes to the stack.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
};
use mesh_common::{FlowKey, FAMILY_IPV4};

use crate::ctx::Packet as Ctx;

/// `TCP_LISTEN` from the kernel's TCP state enum.
const TCP_LISTEN: u32 = 10;
/// Size of the IPv4 part of `bpf_sock_tuple` (addresses and ports).
const TUPLE_V4_LEN: u32 = 12;
/// Size of the IPv6 part of `bpf_sock_tuple`.
const TUPLE_V6_LEN: u32 = 36;

/// True when `key` (a TCP packet's own tuple) belongs to an established local connection.
#[inline(always)]
pub fn is_local_connection<C: Ctx>(ctx: &C, key: &FlowKey) -> bool {
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if key.family == FAMILY_IPV4 {
        // SAFETY: writing the IPv4 member of a plain-data union.
        unsafe {
            let v4 = &mut tuple.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([
                key.src_addr[0],
                key.src_addr[1],
                key.src_addr[2],
                key.src_addr[3],
            ]);
            v4.daddr = u32::from_ne_bytes([
                key.dst_addr[0],
                key.dst_addr[1],
                key.dst_addr[2],
                key.dst_addr[3],
            ]);
            v4.sport = key.src_port;
            v4.dport = key.dst_port;
        }
        TUPLE_V4_LEN
    } else {
        // SAFETY: writing the IPv6 member of a plain-data union.
        unsafe {
            let v6 = &mut tuple.__bindgen_anon_1.ipv6;
            for i in 0..4 {
                v6.saddr[i] = u32::from_ne_bytes([
                    key.src_addr[4 * i],
                    key.src_addr[4 * i + 1],
                    key.src_addr[4 * i + 2],
                    key.src_addr[4 * i + 3],
                ]);
                v6.daddr[i] = u32::from_ne_bytes([
                    key.dst_addr[4 * i],
                    key.dst_addr[4 * i + 1],
                    key.dst_addr[4 * i + 2],
                    key.dst_addr[4 * i + 3],
                ]);
            }
            v6.sport = key.src_port;
            v6.dport = key.dst_port;
        }
        TUPLE_V6_LEN
    };
    // SAFETY: helper call with a valid context and a tuple of the declared size; a returned
    // socket is released before returning.
    unsafe {
        let sk: *mut bpf_sock = bpf_skc_lookup_tcp(
            ctx.raw() as *mut _,
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let listening = (*sk).state == TCP_LISTEN;
        bpf_sk_release(sk as *mut _);
        !listening
    }
}
