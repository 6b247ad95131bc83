//! The packet context the pipeline runs on: an XDP frame or a TC skb.
//!
//! The pipeline stages (parse, conntrack, select, NAT, forward) are written once against
//! [`Packet`]; the two implementations here are the only places that differ between the hooks:
//! - how checksums are updated: XDP edits the field itself (a NIC frame carries complete
//!   checksums); TC goes through the skb helpers, which also keep `CHECKSUM_PARTIAL` and
//!   `CHECKSUM_COMPLETE` skbs right (veth senders with TX checksum offload leave partial ones);
//! - how a routed packet leaves: XDP_TX or XDP_REDIRECT into an interface that takes XDP frames
//!   (else the stack forwards it); TC redirects the skb (straight into a container's namespace
//!   with `bpf_redirect_peer` when the next hop's interface is a veth meshd listed), and lets the
//!   kernel resolve a missing neighbour with `bpf_redirect_neigh`;
//! - the verdict codes.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, xdp_action, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_csum_diff, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use mesh_common::{reason, redirect_target};

use crate::{csum::Delta, maps::XDP_REDIRECT_TARGETS, parse::ptr_at, stats::verdict};

/// The hook a program runs at (trace events say which).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP, in the driver (or generic mode when asked for).
    Xdp,
    /// TC ingress (tcx or cls_bpf), on an skb.
    Tc,
}

const AF_INET: u8 = 2;

/// What the forwarding stage learned from a successful or neighbour-less FIB lookup.
pub enum Route<'a> {
    /// Next hop and its MAC are known; the Ethernet header is already rewritten.
    Resolved(&'a FibParams),
    /// The route is known but the next hop's MAC is not (yet).
    NoNeighbour(&'a FibParams),
}

/// One packet hook's view of the packet and its exits.
pub trait Packet {
    /// Which hook runs (for counters and traces).
    const HOOK: Hook;
    /// Verdict: continue into the kernel's stack.
    const PASS: u32;
    /// Verdict: drop.
    const DROP: u32;
    /// Whether the FIB lookup should check the MTU against the IP length we pass (XDP), or
    /// against the skb itself, which knows about GSO (TC: `tot_len` 0).
    const FIB_CHECKS_IP_LEN: bool;
    /// Whether the hook can send a packet whose next hop's MAC is not known yet (TC, with
    /// `bpf_redirect_neigh`); otherwise such packets go to the stack.
    const RESOLVES_NEIGHBOURS: bool;

    /// Start of the linear packet data (the Ethernet header).
    fn data(&self) -> usize;
    /// End of the linear packet data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, including data outside the linear part.
    fn len(&self) -> usize;
    /// Index of the interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// The raw context pointer, for helpers that take it.
    fn raw(&self) -> *mut core::ffi::c_void;

    /// The IPv4 header checksum at `off` covers a 16-bit word (`size` 2) or two (`size` 4) that
    /// changed from `old` to `new` (wire-order bytes read natively).
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32, size: u8) -> Result<(), ()>;
    /// The TCP/UDP checksum at `off` covers a field that changed from `old` to `new`; `pseudo`
    /// when the field is part of the pseudo-header (an address), `udp` for UDP's "zero means
    /// no checksum" rule.
    fn l4_csum_replace(
        &self,
        off: usize,
        old: u32,
        new: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), ()>;
    /// Like [`Packet::l4_csum_replace`] for a 16-byte IPv6 address (always pseudo-header).
    fn l4_csum_replace_addr6(
        &self,
        off: usize,
        old: &[u8; 16],
        new: &[u8; 16],
        udp: bool,
    ) -> Result<(), ()>;

    /// Whether a packet routed out of `ifindex` may leave from this hook. When not, the
    /// forwarding stage leaves the packet (translated, TTL and MACs untouched) to the stack.
    fn may_transmit(&self, ifindex: u32) -> bool;
    /// Sends the routed, translated packet on; returns the verdict.
    fn transmit(&self, route: Route) -> u32;
}

impl Packet for XdpContext {
    const HOOK: Hook = Hook::Xdp;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const FIB_CHECKS_IP_LEN: bool = true;
    const RESOLVES_NEIGHBOURS: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut core::ffi::c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32, size: u8) -> Result<(), ()> {
        let field: *mut [u8; 2] = ptr_at(self, off)?;
        let mut d = Delta::new();
        d.value(old, new, size);
        // SAFETY: bounds-checked by `ptr_at`.
        unsafe { crate::csum::update(field, d) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_replace(
        &self,
        off: usize,
        old: u32,
        new: u32,
        size: u8,
        _pseudo: bool,
        udp: bool,
    ) -> Result<(), ()> {
        let mut d = Delta::new();
        d.value(old, new, size);
        xdp_l4_update(self, off, d, udp)
    }

    #[inline(always)]
    fn l4_csum_replace_addr6(
        &self,
        off: usize,
        old: &[u8; 16],
        new: &[u8; 16],
        udp: bool,
    ) -> Result<(), ()> {
        let mut d = Delta::new();
        d.bytes(old, new);
        xdp_l4_update(self, off, d, udp)
    }

    /// Back out of the interface it came in on (XDP_TX), or into an interface where meshd runs
    /// XDP natively (its driver takes XDP frames). A veth never qualifies: a frame redirected
    /// into it is dropped unless its peer has NAPI, which a container's end does not have.
    #[inline(always)]
    fn may_transmit(&self, ifindex: u32) -> bool {
        ifindex == self.ifindex() || target_flags(ifindex) & redirect_target::XDP_FRAMES != 0
    }

    #[inline(always)]
    fn transmit(&self, route: Route) -> u32 {
        let fib = match route {
            Route::Resolved(fib) => fib,
            // Not sent here (RESOLVES_NEIGHBOURS is false): the stack resolves the neighbour.
            Route::NoNeighbour(_) => return verdict(reason::PASS_NO_NEIGHBOUR, Self::PASS),
        };
        if fib.ifindex == self.ifindex() {
            return verdict(reason::FORWARD_TX, xdp_action::XDP_TX);
        }
        // SAFETY: plain helper call; flags 0.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
        verdict(reason::FORWARD_REDIRECT, action)
    }
}

/// XDP's L4 checksum update, in place. IPv4 UDP without a checksum stays without one, and a
/// computed zero is sent as all ones (RFC 768), as the skb helper does with `MARK_MANGLED_0`.
#[inline(always)]
fn xdp_l4_update(ctx: &XdpContext, off: usize, d: Delta, udp: bool) -> Result<(), ()> {
    let field: *mut [u8; 2] = ptr_at(ctx, off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        let old = u16::from_ne_bytes(*field);
        if udp && old == 0 {
            return Ok(());
        }
        let new = d.apply(old);
        *field = (if udp && new == 0 { 0xffff } else { new }).to_ne_bytes();
    }
    Ok(())
}

impl Packet for TcContext {
    const HOOK: Hook = Hook::Tc;
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const FIB_CHECKS_IP_LEN: bool = false;
    const RESOLVES_NEIGHBOURS: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the program was called with.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut core::ffi::c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32, size: u8) -> Result<(), ()> {
        TcContext::l3_csum_replace(self, off, old as u64, new as u64, size as u64).map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace(
        &self,
        off: usize,
        old: u32,
        new: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), ()> {
        let flags = size as u64 | tc_l4_flags(pseudo, udp);
        TcContext::l4_csum_replace(self, off, old as u64, new as u64, flags).map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum_replace_addr6(
        &self,
        off: usize,
        old: &[u8; 16],
        new: &[u8; 16],
        udp: bool,
    ) -> Result<(), ()> {
        // SAFETY: both buffers are 16 readable bytes on the stack.
        let diff = unsafe {
            bpf_csum_diff(
                old.as_ptr() as *mut u32,
                16,
                new.as_ptr() as *mut u32,
                16,
                0,
            )
        };
        if diff < 0 {
            return Err(());
        }
        // Size 0: `new` is a ready checksum difference.
        let flags = tc_l4_flags(true, udp);
        TcContext::l4_csum_replace(self, off, 0, diff as u32 as u64, flags).map_err(|_| ())
    }

    /// An skb can go into any interface.
    #[inline(always)]
    fn may_transmit(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn transmit(&self, route: Route) -> u32 {
        match route {
            // Straight into the ingress of the container behind a veth (the kernel checks the
            // peer is a veth or netkit in another namespace, else it drops: meshd lists only
            // those), skipping the host end's transmit and the backlog queue.
            Route::Resolved(fib) if target_flags(fib.ifindex) & redirect_target::PEER != 0 => {
                // SAFETY: plain helper call; flags 0.
                let action = unsafe { bpf_redirect_peer(fib.ifindex, 0) } as u32;
                verdict(reason::FORWARD_REDIRECT_PEER, action)
            }
            // Into the egress of the next hop's interface (the same one for a hairpin).
            Route::Resolved(fib) => {
                // SAFETY: plain helper call; flags 0.
                let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
                verdict(reason::FORWARD_REDIRECT, action)
            }
            // The kernel resolves the neighbour (queueing the packet meanwhile) and fills the
            // Ethernet header itself.
            Route::NoNeighbour(fib) => {
                // SAFETY: plain data; all-zero is valid.
                let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
                nh.nh_family = fib.family as u32;
                // SAFETY: union members of plain data, copied as the family says.
                unsafe {
                    if fib.family == AF_INET {
                        nh.__bindgen_anon_1.ipv4_nh = fib.__bindgen_anon_4.ipv4_dst;
                    } else {
                        nh.__bindgen_anon_1.ipv6_nh = fib.__bindgen_anon_4.ipv6_dst;
                    }
                }
                // SAFETY: `nh` is a valid parameter block of the size passed.
                let action = unsafe {
                    bpf_redirect_neigh(
                        fib.ifindex,
                        &mut nh,
                        core::mem::size_of::<bpf_redir_neigh>() as i32,
                        0,
                    )
                } as u32;
                verdict(reason::FORWARD_REDIRECT_NEIGH, action)
            }
        }
    }
}

/// How the programs may send into `ifindex` themselves (`redirect_target` flags; 0 if unlisted).
#[inline(always)]
fn target_flags(ifindex: u32) -> u32 {
    // SAFETY: a plain u32 read from the map's value.
    unsafe { XDP_REDIRECT_TARGETS.get(&ifindex) }
        .copied()
        .unwrap_or(0)
}

#[inline(always)]
fn tc_l4_flags(pseudo: bool, udp: bool) -> u64 {
    let mut flags = 0;
    if pseudo {
        flags |= BPF_F_PSEUDO_HDR as u64;
    }
    if udp {
        flags |= BPF_F_MARK_MANGLED_0 as u64;
    }
    flags
}
