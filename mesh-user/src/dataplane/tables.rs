//! Rule tables in the kernel: id allocation and atomic, double-buffered updates.
//!
//! The maps hold two rule generations. An apply writes the whole new rule set into the inactive
//! generation (services keyed with that generation, Maglev tables in that generation's half of
//! the pool), then flips `ACTIVE_GENERATION` with one map write. A packet reads the active
//! generation once, so it sees either the old rules or the new ones, never a mix.
//!
//! Service and backend ids index the per-CPU counters. They stay stable while a service or
//! backend exists, and an id is only reused once neither generation references it, so counters
//! and in-flight flows are never attributed to a stranger.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use mesh_common::{
    map_names, port_from_wire, port_to_wire, Backend, ServiceInfo, ServiceKey, TrafficCounters,
    FAMILY_IPV4, FAMILY_IPV6, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
    SERVICE_FLAG_HASH_SOURCE_IP, SERVICE_FLAG_L7_PROXY,
};

use super::{map_err, DataplaneError};
use crate::compile::{DesiredState, L4Protocol, Plan, ServiceAddress};

/// What one apply did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyReport {
    /// Generation now active.
    pub generation: u8,
    /// Service addresses in force.
    pub services: usize,
    /// Backends in force (per service).
    pub backends: usize,
    /// Maglev entries written.
    pub maglev_entries: usize,
    /// Wall time of the kernel update.
    pub duration: Duration,
}

/// A service as it sits in the kernel: its ids, for reading counters back.
#[derive(Clone, Debug)]
pub struct InstalledService {
    /// Service address.
    pub address: ServiceAddress,
    /// Display name.
    pub name: String,
    /// Index into SERVICE_STATS.
    pub service_id: u32,
    /// Backends with their ids, configured share and subset.
    pub backends: Vec<InstalledBackend>,
}

/// A backend as it sits in the kernel.
#[derive(Clone, Debug)]
pub struct InstalledBackend {
    /// Where it listens.
    pub address: SocketAddr,
    /// Index into BACKEND_STATS.
    pub backend_id: u32,
    /// Subset it came from.
    pub subset: Option<String>,
    /// The `version` label, if any.
    pub version: Option<String>,
    /// Configured share of new connections.
    pub share: f64,
}

type BackendKey = (ServiceAddress, SocketAddr);

/// Userspace view of the rule tables.
pub(crate) struct Tables {
    active_generation: u8,
    pool_entries: u32,
    service_ids: HashMap<ServiceAddress, u32>,
    backend_ids: HashMap<BackendKey, u32>,
    /// Ids referenced by the inactive generation: not reusable until the next apply.
    retired_service_ids: BTreeSet<u32>,
    retired_backend_ids: BTreeSet<u32>,
    installed: Vec<InstalledService>,
    maglev_in_use: u64,
}

impl Tables {
    /// Rebuilds the userspace view from maps that may have been pinned by an earlier meshd.
    pub(crate) fn recover(ebpf: &Ebpf, pool_entries: u32) -> Result<Self, DataplaneError> {
        let active: Array<&MapData, u32> =
            Array::try_from(map(ebpf, map_names::ACTIVE_GENERATION)?)
                .map_err(map_err("opening ACTIVE_GENERATION"))?;
        let active_generation = active
            .get(&0, 0)
            .map_err(map_err("reading ACTIVE_GENERATION"))? as u8;
        let services: BpfHashMap<&MapData, ServiceKey, ServiceInfo> =
            BpfHashMap::try_from(map(ebpf, map_names::SERVICES)?)
                .map_err(map_err("opening SERVICES"))?;
        let backends: Array<&MapData, Backend> = Array::try_from(map(ebpf, map_names::BACKENDS)?)
            .map_err(map_err("opening BACKENDS"))?;
        let maglev: Array<&MapData, u32> =
            Array::try_from(map(ebpf, map_names::MAGLEV)?).map_err(map_err("opening MAGLEV"))?;

        let mut tables = Tables {
            active_generation,
            pool_entries,
            service_ids: HashMap::new(),
            backend_ids: HashMap::new(),
            retired_service_ids: BTreeSet::new(),
            retired_backend_ids: BTreeSet::new(),
            installed: Vec::new(),
            maglev_in_use: 0,
        };
        for entry in services.iter() {
            let (key, info) = entry.map_err(map_err("iterating SERVICES"))?;
            let Some(address) = service_address(&key) else {
                continue;
            };
            let mut ids = BTreeSet::new();
            for i in 0..info.table_size {
                if let Ok(id) = maglev.get(&(info.table_offset + i), 0) {
                    ids.insert(id);
                }
            }
            if key.generation == active_generation {
                tables.maglev_in_use += u64::from(info.table_size);
                tables.service_ids.insert(address, info.service_id);
                let mut installed = InstalledService {
                    address,
                    name: address_label(&address),
                    service_id: info.service_id,
                    backends: Vec::new(),
                };
                for id in ids {
                    let Ok(backend) = backends.get(&id, 0) else {
                        continue;
                    };
                    let Some(addr) = backend_address(&backend) else {
                        continue;
                    };
                    tables.backend_ids.insert((address, addr), id);
                    installed.backends.push(InstalledBackend {
                        address: addr,
                        backend_id: id,
                        subset: None,
                        version: None,
                        share: 0.0,
                    });
                }
                tables.installed.push(installed);
            } else {
                tables.retired_service_ids.insert(info.service_id);
                tables.retired_backend_ids.extend(ids);
            }
        }
        Ok(tables)
    }

    /// Maglev entries the active generation uses.
    pub(crate) fn maglev_entries_in_use(&self) -> u64 {
        self.maglev_in_use
    }

    /// The services currently in force.
    pub(crate) fn installed(&self) -> &[InstalledService] {
        &self.installed
    }

    /// Writes `state` into the inactive generation and makes it active.
    pub(crate) fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        state: &DesiredState,
    ) -> Result<ApplyReport, DataplaneError> {
        let started = Instant::now();
        self.check_capacity(state)?;
        let next_gen = 1 - self.active_generation;

        // Ids: keep the ones still in use, allocate the rest from slots neither generation uses.
        let mut used_services: BTreeSet<u32> = self.retired_service_ids.clone();
        used_services.extend(self.service_ids.values().copied());
        let mut used_backends: BTreeSet<u32> = self.retired_backend_ids.clone();
        used_backends.extend(self.backend_ids.values().copied());
        let mut new_service_ids = HashMap::new();
        let mut new_backend_ids = HashMap::new();
        let mut fresh_services = Vec::new();
        let mut fresh_backends = Vec::new();
        for service in &state.services {
            let id = match self.service_ids.get(&service.address) {
                Some(id) => *id,
                None => {
                    let id = allocate(&mut used_services, MAX_SERVICES, "services")?;
                    fresh_services.push(id);
                    id
                }
            };
            new_service_ids.insert(service.address, id);
            for backend in kernel_backends(&service.plan) {
                let key = (service.address, backend.address);
                let id = match self.backend_ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id = allocate(&mut used_backends, MAX_BACKENDS, "backends")?;
                        fresh_backends.push((id, backend.address));
                        id
                    }
                };
                new_backend_ids.insert(key, id);
            }
        }

        // Counters of fresh ids start from zero; their backend slots get addresses. Neither is
        // visible to packets yet: only the inactive generation will reference them.
        zero_counters(ebpf, map_names::SERVICE_STATS, &fresh_services)?;
        let fresh_backend_ids: Vec<u32> = fresh_backends.iter().map(|(id, _)| *id).collect();
        zero_counters(ebpf, map_names::BACKEND_STATS, &fresh_backend_ids)?;
        {
            let mut backends: Array<&mut MapData, Backend> =
                Array::try_from(map_mut(ebpf, map_names::BACKENDS)?)
                    .map_err(map_err("opening BACKENDS"))?;
            for (id, addr) in &fresh_backends {
                backends
                    .set(*id, backend_value(addr), 0)
                    .map_err(map_err(format!("writing backend {addr}")))?;
            }
        }

        // Maglev tables of the new generation, packed from the start of its half of the pool.
        let mut infos = Vec::with_capacity(state.services.len());
        let mut maglev_entries = 0usize;
        {
            let mut maglev: Array<&mut MapData, u32> =
                Array::try_from(map_mut(ebpf, map_names::MAGLEV)?)
                    .map_err(map_err("opening MAGLEV"))?;
            let mut cursor = u32::from(next_gen) * self.pool_entries;
            for service in &state.services {
                let (table, hash_source_ip, l7) = match &service.plan {
                    Plan::L4(plan) => (plan.table.as_slice(), plan.hash_source_ip, false),
                    // The XDP program passes the service's packets to the stack (the proxy).
                    Plan::L7(_) => (&[][..], false, true),
                };
                let ids: Vec<u32> = kernel_backends(&service.plan)
                    .iter()
                    .map(|b| new_backend_ids[&(service.address, b.address)])
                    .collect();
                for (i, slot) in table.iter().enumerate() {
                    maglev
                        .set(cursor + i as u32, ids[*slot as usize], 0)
                        .map_err(map_err("writing MAGLEV"))?;
                }
                let mut flags = 0;
                if hash_source_ip {
                    flags |= SERVICE_FLAG_HASH_SOURCE_IP;
                }
                if l7 {
                    flags |= SERVICE_FLAG_L7_PROXY;
                }
                infos.push((
                    service_key(&service.address, next_gen),
                    ServiceInfo {
                        service_id: new_service_ids[&service.address],
                        table_offset: cursor,
                        table_size: table.len() as u32,
                        flags,
                    },
                ));
                cursor += table.len() as u32;
                maglev_entries += table.len();
            }
        }

        {
            let mut services: BpfHashMap<&mut MapData, ServiceKey, ServiceInfo> =
                BpfHashMap::try_from(map_mut(ebpf, map_names::SERVICES)?)
                    .map_err(map_err("opening SERVICES"))?;
            let wanted: std::collections::HashSet<ServiceKey> =
                infos.iter().map(|(k, _)| *k).collect();
            let stale: Vec<ServiceKey> = services
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.generation == next_gen && !wanted.contains(k))
                .collect();
            for key in stale {
                services
                    .remove(&key)
                    .map_err(map_err("removing a stale service"))?;
            }
            for (key, info) in &infos {
                services
                    .insert(key, info, 0)
                    .map_err(map_err("writing SERVICES"))?;
            }
        }

        // The flip: one write makes the whole new generation visible.
        {
            let mut active: Array<&mut MapData, u32> =
                Array::try_from(map_mut(ebpf, map_names::ACTIVE_GENERATION)?)
                    .map_err(map_err("opening ACTIVE_GENERATION"))?;
            active
                .set(0, u32::from(next_gen), 0)
                .map_err(map_err("switching ACTIVE_GENERATION"))?;
        }

        self.retired_service_ids = self.service_ids.values().copied().collect();
        self.retired_backend_ids = self.backend_ids.values().copied().collect();
        self.service_ids = new_service_ids;
        self.backend_ids = new_backend_ids;
        self.active_generation = next_gen;
        self.maglev_in_use = maglev_entries as u64;
        self.installed = state
            .services
            .iter()
            .map(|s| InstalledService {
                address: s.address,
                name: s.name.clone(),
                service_id: self.service_ids[&s.address],
                backends: kernel_backends(&s.plan)
                    .iter()
                    .map(|b| InstalledBackend {
                        address: b.address,
                        backend_id: self.backend_ids[&(s.address, b.address)],
                        subset: b.subset.clone(),
                        version: b.labels.get("version").cloned(),
                        share: b.share,
                    })
                    .collect(),
            })
            .collect();
        Ok(ApplyReport {
            generation: next_gen,
            services: state.services.len(),
            backends: self.backend_ids.len(),
            maglev_entries,
            duration: started.elapsed(),
        })
    }

    fn check_capacity(&self, state: &DesiredState) -> Result<(), DataplaneError> {
        let entries: usize = state
            .services
            .iter()
            .map(|s| match &s.plan {
                Plan::L4(plan) => plan.table.len(),
                Plan::L7(_) => 0,
            })
            .sum();
        if entries > self.pool_entries as usize {
            return Err(DataplaneError::Capacity(format!(
                "the rules need {entries} Maglev entries but each generation holds {}; raise \
                 --maglev-pool-entries or use smaller consistentHash.maglev.tableSize values",
                self.pool_entries
            )));
        }
        if state.services.len() > MAX_SERVICES as usize {
            return Err(DataplaneError::Capacity(format!(
                "the rules define {} service addresses, at most {MAX_SERVICES} are supported",
                state.services.len()
            )));
        }
        Ok(())
    }
}

/// Backends the kernel forwards to: an L7 service has none (the proxy connects itself).
fn kernel_backends(plan: &Plan) -> &[crate::compile::BackendPlan] {
    match plan {
        Plan::L4(plan) => &plan.backends,
        Plan::L7(_) => &[],
    }
}

fn allocate(used: &mut BTreeSet<u32>, capacity: u32, what: &str) -> Result<u32, DataplaneError> {
    // Lowest free id keeps the counter arrays dense.
    let mut candidate = 0;
    for id in used.iter() {
        if *id != candidate {
            break;
        }
        candidate += 1;
    }
    if candidate >= capacity {
        return Err(DataplaneError::Capacity(format!(
            "more than {capacity} {what}"
        )));
    }
    used.insert(candidate);
    Ok(candidate)
}

fn zero_counters(ebpf: &mut Ebpf, name: &str, ids: &[u32]) -> Result<(), DataplaneError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut counters: PerCpuArray<&mut MapData, TrafficCounters> =
        PerCpuArray::try_from(map_mut(ebpf, name)?).map_err(map_err(format!("opening {name}")))?;
    let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Other(format!("counting CPUs: {e}")))?;
    for id in ids {
        let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
            .map_err(|e| DataplaneError::Other(format!("per-CPU values: {e}")))?;
        counters
            .set(*id, zeros, 0)
            .map_err(map_err(format!("resetting {name}[{id}]")))?;
    }
    Ok(())
}

pub(crate) fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a aya::maps::Map, DataplaneError> {
    ebpf.map(name)
        .ok_or_else(|| DataplaneError::Other(format!("map {name} missing from the object")))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, DataplaneError> {
    ebpf.map_mut(name)
        .ok_or_else(|| DataplaneError::Other(format!("map {name} missing from the object")))
}

/// The map key of a service address in a generation.
pub fn service_key(address: &ServiceAddress, generation: u8) -> ServiceKey {
    ServiceKey {
        addr: ip_bytes(&address.ip),
        port: port_to_wire(address.port),
        proto: match address.protocol {
            L4Protocol::Tcp => PROTO_TCP,
            L4Protocol::Udp => PROTO_UDP,
        },
        generation,
    }
}

fn service_address(key: &ServiceKey) -> Option<ServiceAddress> {
    let protocol = match key.proto {
        PROTO_TCP => L4Protocol::Tcp,
        PROTO_UDP => L4Protocol::Udp,
        _ => return None,
    };
    // A service key does not carry the family: an IPv4 address has 12 trailing zero bytes, which
    // no routable IPv6 service address (2001:db8::/32 in tests, global or ULA in production) has.
    let ip = if key.addr[4..].iter().all(|b| *b == 0) {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    };
    Some(ServiceAddress {
        ip,
        port: port_from_wire(key.port),
        protocol,
    })
}

fn backend_value(addr: &SocketAddr) -> Backend {
    Backend {
        addr: ip_bytes(&addr.ip()),
        port: port_to_wire(addr.port()),
        family: if addr.is_ipv4() {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        },
        _pad: 0,
    }
}

fn backend_address(backend: &Backend) -> Option<SocketAddr> {
    let ip = match backend.family {
        FAMILY_IPV4 => IpAddr::from([
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ]),
        FAMILY_IPV6 => IpAddr::from(backend.addr),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port_from_wire(backend.port)))
}

/// Wire bytes of an address as stored in keys (IPv4 in the first four bytes).
pub fn ip_bytes(ip: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn address_label(address: &ServiceAddress) -> String {
    format!("{}", SocketAddr::new(address.ip, address.port))
}
