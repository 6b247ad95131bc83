//! Loading `mesh_xdp` or `mesh_tc` for BPF_PROG_TEST_RUN and populating its maps the way meshd
//! does: backends, a Maglev slice, and the service entry pointing at it.
//!
//! The Maglev slice here is filled round-robin rather than with Maglev's permutation: the kernel
//! program only reads `MAGLEV[table_offset + hash % table_size]`, so any table exercises it, and
//! tests then know exactly which backends are reachable.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    map_names, port_to_wire, Backend, ServiceInfo, ServiceKey, TrafficCounters, FAMILY_IPV4,
    FAMILY_IPV6, TC_PROGRAM_NAME, XDP_PROGRAM_NAME,
};

use crate::EBPF_OBJECT;

/// Maglev pool entries in test loads: small, so parallel tests stay light, and a
/// resize at load time like meshd's.
pub const TEST_MAGLEV_POOL_ENTRIES: u32 = 4096;
/// Connection-tracking capacity in test loads.
pub const TEST_CONNTRACK_ENTRIES: u32 = 1024;

/// The packet hook a test runs the pipeline through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `mesh_xdp` on an XDP buffer.
    Xdp,
    /// `mesh_tc` on an skb.
    Tc,
}

/// aya-log's level in the kernel object (`meshd --kernel-log`): 0 off, 1 error .. 5 trace.
pub const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";
const LOG_OFF: u8 = 0;

/// Both hooks, for tests that must hold for each.
pub const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// XDP verdict codes; TC verdicts are reported as these (see [`Lb::run_on`]).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// One loaded copy of the kernel object with the program of one hook loaded (not attached).
pub struct Lb {
    pub ebpf: Ebpf,
    /// Which program [`Lb::run_on`] runs.
    pub hook: Hook,
}

/// A service to install: address, protocol, flags and its backends.
#[derive(Clone, Debug)]
pub struct Service {
    pub id: u32,
    pub addr: SocketAddr,
    /// `mesh_common::PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// First Maglev entry of this service in the pool.
    pub table_offset: u32,
    /// Maglev table size (0 means "no backend").
    pub table_size: u32,
    /// Backend ids and addresses.
    pub backends: Vec<(u32, SocketAddr)>,
}

/// Key-address bytes as stored in maps: wire order, IPv4 in the first four bytes.
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    }
}

impl Lb {
    /// Loads the object with test-sized maps and loads (verifies) `mesh_xdp`.
    pub fn load() -> Result<Lb> {
        Self::load_hook(Hook::Xdp)
    }

    /// Loads the object with test-sized maps and loads (verifies) the program of `hook`, with
    /// kernel logging off as meshd loads it by default.
    pub fn load_hook(hook: Hook) -> Result<Lb> {
        Self::load_hook_with(hook, &[])
    }

    /// [`Lb::load_hook`] with `.rodata` globals overridden (e.g. [`LOG_LEVEL_GLOBAL`] at 5 to
    /// verify and run every kernel log point).
    pub fn load_hook_with(hook: Hook, globals: &[(&str, u8)]) -> Result<Lb> {
        let mut loader = EbpfLoader::new();
        loader.override_global(LOG_LEVEL_GLOBAL, &LOG_OFF, true);
        for (name, value) in globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .map_max_entries(map_names::MAGLEV, TEST_MAGLEV_POOL_ENTRIES)
            .map_max_entries(map_names::CONNTRACK, TEST_CONNTRACK_ENTRIES)
            .load(EBPF_OBJECT)
            .context("loading the BPF object")?;
        match hook {
            Hook::Xdp => {
                let prog: &mut Xdp = ebpf
                    .program_mut(XDP_PROGRAM_NAME)
                    .context("mesh_xdp missing")?
                    .try_into()?;
                prog.load().context("verifying mesh_xdp")?;
            }
            Hook::Tc => {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(TC_PROGRAM_NAME)
                    .context("mesh_tc missing")?
                    .try_into()?;
                prog.load().context("verifying mesh_tc")?;
            }
        }
        Ok(Lb { ebpf, hook })
    }

    /// Instructions the verifier processed for the loaded program.
    pub fn verified_instructions(&self) -> Result<u32> {
        let info = match self.hook {
            Hook::Xdp => {
                let prog: &Xdp = self
                    .ebpf
                    .program(XDP_PROGRAM_NAME)
                    .context("mesh_xdp")?
                    .try_into()?;
                prog.info()?
            }
            Hook::Tc => {
                let prog: &SchedClassifier = self
                    .ebpf
                    .program(TC_PROGRAM_NAME)
                    .context("mesh_tc")?
                    .try_into()?;
                prog.info()?
            }
        };
        Ok(info.verified_instruction_count().unwrap_or(0))
    }

    /// Runs the hook's program once on `frame`; returns the verdict (TC's translated to the
    /// XDP code of the same meaning: OK -> PASS, SHOT -> DROP, REDIRECT -> REDIRECT) and the
    /// frame as the program left it. `ifindex` is the device the packet arrives on; 0 means "no
    /// context" (the kernel uses the namespace's loopback device).
    pub fn run_on(&mut self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 512];
        let (verdict, len) = match self.hook {
            Hook::Xdp => {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(XDP_PROGRAM_NAME)
                    .context("mesh_xdp missing")?
                    .try_into()?;
                // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex }
                let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect();
                let result = prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: (ifindex != 0).then_some(&ctx[..]),
                    ..Default::default()
                })?;
                (result.return_value, result.data_size_out)
            }
            Hook::Tc => {
                let prog: &mut SchedClassifier = self
                    .ebpf
                    .program_mut(TC_PROGRAM_NAME)
                    .context("mesh_tc missing")?
                    .try_into()?;
                // struct __sk_buff (192 bytes): only ingress_ifindex (offset 36) and ifindex (40)
                // are set; the kernel rejects other non-zero fields.
                let mut ctx = [0u8; 192];
                ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                let result = prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: (ifindex != 0).then_some(&ctx[..]),
                    ..Default::default()
                })?;
                let verdict = match result.return_value {
                    TC_ACT_OK => XDP_PASS,
                    TC_ACT_SHOT => XDP_DROP,
                    TC_ACT_REDIRECT => XDP_REDIRECT,
                    other => bail!("unexpected TC verdict {other}"),
                };
                (verdict, result.data_size_out)
            }
        };
        out.truncate(len as usize);
        Ok((verdict, out))
    }

    /// Lets XDP redirect frames into `ifindex`, as meshd does for its native-XDP interfaces.
    pub fn allow_xdp_redirect(&mut self, ifindex: u32) -> Result<()> {
        self.list_redirect_target(ifindex, mesh_common::redirect_target::XDP_FRAMES)
    }

    /// Lists `ifindex` in the redirect targets with `flags` (`mesh_common::redirect_target`), as
    /// meshd does when it attaches.
    pub fn list_redirect_target(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let mut targets: HashMap<_, u32, u32> = HashMap::try_from(
            self.ebpf
                .map_mut(map_names::XDP_REDIRECT_TARGETS)
                .context("XDP_REDIRECT_TARGETS")?,
        )?;
        targets.insert(ifindex, flags, 0)?;
        Ok(())
    }

    /// [`Lb::run_on`] without an ingress device.
    pub fn run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_on(frame, 0)
    }

    /// Writes backends, the Maglev slice (round-robin over `svc.backends`) and then the service
    /// entry, in meshd's order: replacing an existing entry switches the service to this slice.
    pub fn install(&mut self, svc: &Service) -> Result<()> {
        {
            let mut backends: Array<_, Backend> =
                Array::try_from(self.ebpf.map_mut(map_names::BACKENDS).context("BACKENDS")?)?;
            for (id, addr) in &svc.backends {
                ensure!(
                    addr.is_ipv4() == svc.addr.is_ipv4(),
                    "backend family must match the service"
                );
                backends.set(
                    *id,
                    Backend {
                        addr: addr_bytes(addr.ip()),
                        port: port_to_wire(addr.port()),
                        family: family(addr.ip()),
                        _pad: 0,
                    },
                    0,
                )?;
            }
        }
        if svc.table_size > 0 {
            if svc.backends.is_empty() {
                bail!("a non-empty table needs backends");
            }
            let ids: Vec<u32> = svc.backends.iter().map(|(id, _)| *id).collect();
            let table: Vec<u32> = (0..svc.table_size as usize)
                .map(|i| ids[i % ids.len()])
                .collect();
            self.write_maglev(svc.table_offset, &table)?;
        }
        let mut services: HashMap<_, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.ebpf.map_mut(map_names::SERVICES).context("SERVICES")?)?;
        services.insert(
            ServiceKey {
                addr: addr_bytes(svc.addr.ip()),
                port: port_to_wire(svc.addr.port()),
                proto: svc.proto,
                _pad: 0,
            },
            ServiceInfo {
                service_id: svc.id,
                table_offset: svc.table_offset,
                table_size: svc.table_size,
                flags: svc.flags,
            },
            0,
        )?;
        Ok(())
    }

    /// Overwrites Maglev entries starting at `offset` (e.g. to move a service's table to other
    /// backends).
    pub fn write_maglev(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        let mut maglev: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::MAGLEV).context("MAGLEV")?)?;
        for (i, id) in table.iter().enumerate() {
            maglev.set(offset + i as u32, *id, 0)?;
        }
        Ok(())
    }

    /// Packets counted under `reason`, summed over CPUs.
    pub fn reason_count(&self, reason: u32) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(map_names::REASON_STATS)
                .context("REASON_STATS")?,
        )?;
        Ok(map.get(&reason, 0)?.iter().sum())
    }

    /// All reason counters, summed over CPUs, indexed by reason code.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        (0..mesh_common::reason::COUNT)
            .map(|r| self.reason_count(r))
            .collect()
    }

    /// Traffic counters of a service, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<TrafficCounters> {
        self.counters(map_names::SERVICE_STATS, id)
    }

    /// Traffic counters of a backend, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficCounters> {
        self.counters(map_names::BACKEND_STATS, id)
    }

    fn counters(&self, name: &str, id: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(name).context("stats map")?)?;
        let mut total = TrafficCounters::default();
        for c in map.get(&id, 0)?.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }
}

/// Everything the kernel holds for one service, as bytes: its SERVICES entry, its Maglev slice
/// and the BACKENDS entries the slice references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBytes {
    pub info: Vec<u8>,
    pub slice: Vec<u32>,
    pub backends: Vec<(u32, Vec<u8>)>,
}

fn pod_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
    // SAFETY: Pod types are plain data with explicit padding.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// Reads every service's kernel entries back from the maps pinned under `pin_dir`, keyed by the
/// SERVICES key's bytes.
pub fn pinned_services(
    pin_dir: &std::path::Path,
) -> Result<std::collections::BTreeMap<Vec<u8>, ServiceBytes>> {
    use aya::maps::{Map, MapData};
    let open = |name: &str| {
        MapData::from_pin(pin_dir.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let services: HashMap<MapData, ServiceKey, ServiceInfo> =
        HashMap::try_from(Map::HashMap(open(map_names::SERVICES)?))?;
    let maglev: Array<MapData, u32> = Array::try_from(Map::Array(open(map_names::MAGLEV)?))?;
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(open(map_names::BACKENDS)?))?;
    let mut out = std::collections::BTreeMap::new();
    for entry in services.iter() {
        let (key, info) = entry?;
        let slice: Vec<u32> = (0..info.table_size)
            .map(|i| maglev.get(&(info.table_offset + i), 0))
            .collect::<Result<_, _>>()?;
        let mut ids: Vec<u32> = slice.clone();
        ids.sort_unstable();
        ids.dedup();
        let backends = ids
            .into_iter()
            .map(|id| Ok((id, pod_bytes(&backends.get(&id, 0)?))))
            .collect::<Result<_>>()?;
        out.insert(
            pod_bytes(&key),
            ServiceBytes {
                info: pod_bytes(&info),
                slice,
                backends,
            },
        );
    }
    Ok(out)
}
