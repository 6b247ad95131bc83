//! Two tiny XDP programs written as raw BPF instructions and loaded with bpf(2) directly: the
//! traffic generator and the per-backend packet counter of the forwarding benchmark.
//!
//! They are not part of mesh's kernel object on purpose (the benchmark must not change the code
//! under test), and a dozen instructions do not justify a second BPF build.
//!
//! - [`Counter`]: counts every frame in a per-CPU array and drops it (XDP_DROP). Attached to a
//!   backend's veth it gives an exact "delivered" count, keeps the backend's cost per packet tiny
//!   and equal for every system under test, and gives the veth the NAPI context that frames
//!   XDP-redirected into it need.
//! - [`Generator`]: run with `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//!   the mechanism xdp-trafficgen uses), it rewrites the headers of the template frame (the
//!   kernel recycles live frames without restoring what a forwarder changed), sets the UDP source
//!   port to `base + (n & mask)` (n counts frames per CPU) and returns XDP_TX, so the kernel
//!   transmits it out of the generator's veth. Tens of nanoseconds per frame.
//!
//! Every fd is owned ([`OwnedFd`]): programs, maps and links go away when dropped, which also
//! detaches the counters.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;

const XDP_DROP: i32 = 1;
const TC_ACT_SHOT: i32 = 2;
const XDP_TX: i32 = 3;

/// `union bpf_attr`, large enough for every command used here, zero-filled.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Attr([0; 160])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Number of possible CPUs (the per-CPU value layout).
pub fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut count = 0;
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => count += b.parse::<usize>()? - a.parse::<usize>()? + 1,
            None => count += 1,
        }
    }
    Ok(count)
}

/// One BPF instruction.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

fn encode(insns: &[Insn]) -> Vec<u64> {
    insns
        .iter()
        .map(|i| {
            let mut b = [0u8; 8];
            b[0] = i.code;
            b[1] = (i.dst & 0xf) | (i.src << 4);
            b[2..4].copy_from_slice(&i.off.to_ne_bytes());
            b[4..8].copy_from_slice(&i.imm.to_ne_bytes());
            u64::from_ne_bytes(b)
        })
        .collect()
}

/// `*(u32 *)(r10 - 4) = 0; r2 = r10 - 4; r1 = map; call map_lookup_elem`: 6 slots.
fn lookup_key0(map_fd: i32) -> Vec<Insn> {
    vec![
        insn(0x62, 10, 0, -4, 0),                      // *(u32 *)(r10 - 4) = 0
        insn(0xbf, 2, 10, 0, 0),                       // r2 = r10
        insn(0x07, 2, 0, 0, -4),                       // r2 += -4
        insn(0x18, 1, 1, 0, map_fd),                   // r1 = map (ld_imm64, pseudo map fd)
        insn(0x00, 0, 0, 0, 0),                        //   (second half)
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // call
    ]
}

fn create_percpu_counter() -> Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_MAP_TYPE_PERCPU_ARRAY)
        .u32(4, 4)
        .u32(8, 8)
        .u32(12, 1);
    let rc = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE (per-CPU counter)")?;
    Ok(fd_from(rc))
}

fn load_xdp(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
    load_prog(name, BPF_PROG_TYPE_XDP, BPF_XDP, insns)
}

fn load_prog(name: &str, prog_type: u32, attach_type: u32, insns: &[Insn]) -> Result<OwnedFd> {
    let code = encode(insns);
    let license = CString::new("GPL").expect("no nul");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32(0, prog_type)
        .u32(4, code.len() as u32)
        .u64(8, code.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, attach_type);
    for (i, b) in name.bytes().take(15).enumerate() {
        attr.0[48 + i] = b;
    }
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(rc) => Ok(fd_from(rc)),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading the {name} program: {e}\nverifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// Sums a per-CPU u64 at key 0.
fn read_percpu(map: &OwnedFd) -> Result<u64> {
    let cpus = possible_cpus()?;
    let key = 0u32;
    let mut values = vec![0u64; cpus];
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, values.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading a per-CPU counter")?;
    Ok(values.iter().sum())
}

/// Attaches `prog` to `ifindex` of the calling thread's network namespace with a bpf_link
/// (native mode); the attachment lives as long as the returned fd.
fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    attach_link(prog, ifindex, BPF_XDP).context("BPF_LINK_CREATE (XDP)")
}

fn attach_link(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, attach_type)
        .u32(12, 0);
    Ok(fd_from(bpf(BPF_LINK_CREATE, &mut attr)?))
}

/// Interface index of `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}

/// Counts and drops everything arriving on one interface: an XDP program (frames the veth
/// receives through its transmit path; it also gives the veth NAPI, which XDP redirects into it
/// need) and a TC ingress program on a tcx link, sharing one counter, for skbs handed straight
/// to the interface's ingress with `bpf_redirect_peer`, which skip the veth's XDP. Each packet
/// is counted once: what XDP drops never reaches TC. The tcx part is left out on kernels
/// without tcx (before 6.6), where nothing here uses `bpf_redirect_peer` through it.
pub struct Counter {
    map: OwnedFd,
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

impl Counter {
    /// Loads the counter and attaches it to `ifname`; call from a thread inside the interface's
    /// namespace (see `Netns::run`).
    pub fn attach(ifname: &str) -> Result<Counter> {
        let map = create_percpu_counter()?;
        let program = |verdict: i32| {
            let mut p = lookup_key0(map.as_raw_fd());
            p.extend([
                insn(0x15, 0, 0, 3, 0),       // if r0 == 0 goto +3
                insn(0x79, 1, 0, 0, 0),       // r1 = *(u64 *)(r0 + 0)
                insn(0x07, 1, 0, 0, 1),       // r1 += 1
                insn(0x7b, 0, 1, 0, 0),       // *(u64 *)(r0 + 0) = r1
                insn(0xb7, 0, 0, 0, verdict), // r0 = verdict
                insn(0x95, 0, 0, 0, 0),       // exit
            ]);
            p
        };
        let ifindex = ifindex(ifname)?;
        let xdp = load_xdp("bench_count", &program(XDP_DROP))?;
        let xdp_link = attach_xdp(&xdp, ifindex)
            .with_context(|| format!("attaching the counter to {ifname}"))?;
        let mut links = vec![xdp_link];
        let mut progs = vec![xdp];
        let tc = load_prog(
            "bench_count_tc",
            BPF_PROG_TYPE_SCHED_CLS,
            0,
            &program(TC_ACT_SHOT),
        )?;
        match attach_link(&tc, ifindex, BPF_TCX_INGRESS) {
            Ok(link) => {
                links.push(link);
                progs.push(tc);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("attaching the TC counter to {ifname}"))
            }
        }
        Ok(Counter {
            map,
            _links: links,
            _progs: progs,
        })
    }

    /// Frames seen so far.
    pub fn count(&self) -> Result<u64> {
        read_percpu(&self.map)
    }
}

/// The live-frames traffic generator program.
pub struct Generator {
    prog: OwnedFd,
    _map: OwnedFd,
}

/// Ethernet + 20-byte IPv4 + UDP headers: what the generator restores in every frame.
pub const GEN_HEADER_LEN: usize = 42;

/// Offset of the UDP source port in an untagged Ethernet + 20-byte IPv4 header frame.
const UDP_SPORT_OFFSET: i16 = 34;

impl Generator {
    /// Loads the program. Every frame gets the first [`GEN_HEADER_LEN`] bytes of `header`
    /// written back (live frames are recycled pages: whatever the forwarder rewrote, such as the
    /// destination address, TTL and checksums, would otherwise come back in later frames), then
    /// its UDP source port set to `base + (n & mask)` (`mask` = 2^k - 1) and, when the template
    /// carries a UDP checksum (computed with source port `base`), that checksum updated.
    pub fn load(header: &[u8], base: u16, mask: u16) -> Result<Generator> {
        if header.len() < GEN_HEADER_LEN {
            bail!("the generator's template frame is shorter than {GEN_HEADER_LEN} bytes");
        }
        let map = create_percpu_counter()?;
        let mut p = vec![insn(0xbf, 6, 1, 0, 0)]; // r6 = ctx
        p.extend(lookup_key0(map.as_raw_fd()));
        let check_map = p.len();
        p.extend([
            insn(0x15, 0, 0, 0, 0),                     // if r0 == 0 goto drop (patched)
            insn(0x79, 7, 0, 0, 0),                     // r7 = *(u64 *)(r0 + 0)
            insn(0x07, 7, 0, 0, 1),                     // r7 += 1
            insn(0x7b, 0, 7, 0, 0),                     // *(u64 *)(r0 + 0) = r7
            insn(0x61, 2, 6, 0, 0),                     // r2 = ctx->data
            insn(0x61, 3, 6, 4, 0),                     // r3 = ctx->data_end
            insn(0xbf, 4, 2, 0, 0),                     // r4 = r2
            insn(0x07, 4, 0, 0, GEN_HEADER_LEN as i32), // r4 += 42
        ]);
        let check_len = p.len();
        p.push(insn(0x2d, 4, 3, 0, 0)); // if r4 > r3 goto drop (patched)
                                        // *(u32 *)(r2 + off) = header[off..off + 4], then the last two bytes as a u16.
        for off in (0..40).step_by(4) {
            let word = i32::from_ne_bytes(header[off..off + 4].try_into().expect("4 bytes"));
            p.push(insn(0x62, 2, 0, off as i16, word));
        }
        let half = u16::from_ne_bytes([header[40], header[41]]);
        p.push(insn(0x6a, 2, 0, 40, i32::from(half)));
        p.push(insn(0x57, 7, 0, 0, i32::from(mask))); // r7 &= mask: d, the port's offset
                                                      // A template with a UDP checksum keeps it right: the port grows by d, so the one's
                                                      // complement sum does too (the template's port must be `base`). A result of 0 reads as
                                                      // "no checksum", which IPv4 allows.
        let csum = u16::from_be_bytes([header[40], header[41]]);
        if csum != 0 {
            p.extend([
                insn(0xbf, 8, 7, 0, 0),                    // r8 = d
                insn(0x07, 8, 0, 0, i32::from(!csum)),     // r8 += ~csum (the old sum)
                insn(0xbf, 9, 8, 0, 0),                    // r9 = r8
                insn(0x77, 9, 0, 0, 16),                   // r9 >>= 16 (the carry)
                insn(0x57, 8, 0, 0, 0xffff),               // r8 &= 0xffff
                insn(0x0f, 8, 9, 0, 0),                    // r8 += r9
                insn(0xa7, 8, 0, 0, 0xffff),               // r8 = ~r8 (16 bits)
                insn(0xdc, 8, 0, 0, 16),                   // r8 = htobe16(r8)
                insn(0x6b, 2, 8, UDP_SPORT_OFFSET + 6, 0), // *(u16 *)(r2 + 40) = r8
            ]);
        }
        p.extend([
            insn(0x07, 7, 0, 0, i32::from(base)),  // r7 += base
            insn(0xdc, 7, 0, 0, 16),               // r7 = htobe16(r7)
            insn(0x6b, 2, 7, UDP_SPORT_OFFSET, 0), // *(u16 *)(r2 + 34) = r7
            insn(0xb7, 0, 0, 0, XDP_TX),           // r0 = XDP_TX
            insn(0x95, 0, 0, 0, 0),                // exit
        ]);
        let drop = p.len();
        p.extend([
            insn(0xb7, 0, 0, 0, XDP_DROP), // drop: r0 = XDP_DROP
            insn(0x95, 0, 0, 0, 0),        // exit
        ]);
        p[check_map].off = (drop - check_map - 1) as i16;
        p[check_len].off = (drop - check_len - 1) as i16;
        let prog = load_xdp("bench_gen", &p)?;
        Ok(Generator { prog, _map: map })
    }

    /// Transmits `repeat` copies of `frame` (source port varied) out of `ifindex` of the calling
    /// thread's namespace. The device's XDP receive queue must be registered (an XDP program
    /// attached, which [`Counter`] provides).
    pub fn send(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<()> {
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut attr = Attr::new();
        attr.u32(0, self.prog.as_raw_fd() as u32)
            .u32(8, frame.len() as u32)
            .u64(16, frame.as_ptr() as u64)
            .u32(32, repeat)
            .u32(40, ctx.len() as u32)
            .u64(48, ctx.as_ptr() as u64)
            .u32(64, BPF_F_TEST_XDP_LIVE_FRAMES)
            .u32(72, 64);
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN (live frames)")?;
        let retval = attr.get_u32(4);
        let _ = retval;
        Ok(())
    }
}
