//! Rule tables in the kernel: per-service Maglev slices, id allocation and incremental applies.
//!
//! Every service has its own slice of the Maglev pool and one SERVICES entry pointing at it. An
//! apply compares each desired service with what is installed by a digest of its kernel content
//! (flags, backends, table): an unchanged service costs nothing. A changed service gets a new
//! slice written into free pool space first, then its entry is replaced with one map update, so
//! a packet reads either the old complete slice or the new complete one. Removed services lose
//! their entry. Entries are written with batch system calls, slices through memory shared with
//! the kernel (see [`super::bpf_sys`]).
//!
//! Space and ids a switched-away entry referenced are reused only from the next apply on (see
//! [`super::pool`]). A restarted meshd rebuilds this view from the pinned maps
//! ([`Tables::recover`]), so its first apply of the same rules finds every digest equal and
//! writes nothing.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
};

use aya::{maps::Map, util::nr_cpus, Ebpf};
use mesh_common::{
    map_names, port_from_wire, port_to_wire, Backend, ServiceInfo, ServiceKey, TrafficCounters,
    FAMILY_IPV4, FAMILY_IPV6, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
    SERVICE_FLAG_HASH_SOURCE_IP, SERVICE_FLAG_L7_PROXY,
};
use tracing::info;

use super::{
    bpf_sys::{self, MappedU32Array},
    pool::{IdPool, RangePool},
    DataplaneError,
};
use crate::compile::{maglev, DesiredState, L4Protocol, Plan, ServiceAddress, ServicePlan};

/// What one apply did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyReport {
    /// Service addresses in force.
    pub services: usize,
    /// Backends in force (per service).
    pub backends: usize,
    /// Services whose kernel entries were written (new or changed).
    pub written: usize,
    /// Services removed.
    pub removed: usize,
    /// Maglev entries written.
    pub maglev_entries: usize,
    /// Wall time of the kernel update.
    pub duration: Duration,
}

/// A service as it sits in the kernel: its ids, for reading counters back.
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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

/// One installed service: its entry, the digest of its content and its backends' ids.
#[derive(Clone, Debug)]
struct Entry {
    info: ServiceInfo,
    digest: u128,
    backend_ids: HashMap<SocketAddr, u32>,
    view: InstalledService,
}

/// Progress is logged (and shown by `meshctl status`) every this many services written.
const PROGRESS_EVERY: usize = 5_000;

/// Userspace view of the rule tables.
pub(crate) struct Tables {
    maglev: MappedU32Array,
    pool: RangePool,
    service_ids: IdPool,
    backend_ids: IdPool,
    entries: BTreeMap<ServiceAddress, Entry>,
}

impl Tables {
    /// Rebuilds the userspace view from maps that may have been pinned by an earlier meshd:
    /// every service entry with its slice, backend ids and digest, read with a few batch calls
    /// and from the shared pool memory.
    pub(crate) fn recover(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let pool_entries = super::map_data(map(ebpf, map_names::MAGLEV)?)
            .ok_or_else(|| DataplaneError::Other("MAGLEV is not an array".into()))?
            .info()
            .map_err(super::map_err("reading the kernel's info on MAGLEV"))?
            .max_entries();
        let maglev = MappedU32Array::map(fd(ebpf, map_names::MAGLEV)?, pool_entries as usize)
            .map_err(sys_err("mapping MAGLEV"))?;
        let mut tables = Tables {
            maglev,
            pool: RangePool::new(pool_entries),
            service_ids: IdPool::new(MAX_SERVICES),
            backend_ids: IdPool::new(MAX_BACKENDS),
            entries: BTreeMap::new(),
        };
        let services: Vec<(ServiceKey, ServiceInfo)> =
            bpf_sys::lookup_all(fd(ebpf, map_names::SERVICES)?, 4096)
                .map_err(sys_err("reading SERVICES"))?;
        if services.is_empty() {
            return Ok(tables);
        }
        let backends: Vec<(u32, Backend)> =
            bpf_sys::lookup_all(fd(ebpf, map_names::BACKENDS)?, 16_384)
                .map_err(sys_err("reading BACKENDS"))?;
        let mut stale = Vec::new();
        let mut slice = Vec::new();
        for (key, info) in services {
            let address = service_address(&key).filter(|_| key._pad == 0);
            let Some(address) = address.filter(|_| {
                tables.pool.reserve(info.table_offset, info.table_size)
                    && tables.service_ids.reserve(info.service_id)
            }) else {
                // Not written by this layout, or overlapping another entry: not trusted.
                stale.push(key);
                continue;
            };
            slice.resize(info.table_size as usize, 0);
            tables.maglev.read(info.table_offset as usize, &mut slice);
            let mut backend_ids = HashMap::new();
            let mut addresses = Vec::new();
            for id in &slice {
                let known = backends
                    .get(*id as usize)
                    .and_then(|(_, b)| backend_address(b));
                if let Some(addr) = known {
                    if backend_ids.insert(addr, *id).is_none() {
                        tables.backend_ids.reserve(*id);
                        addresses.push(addr);
                    }
                }
            }
            addresses.sort();
            let index: HashMap<u32, u32> = addresses
                .iter()
                .enumerate()
                .map(|(i, a)| (backend_ids[a], i as u32))
                .collect();
            let local: Vec<u32> = slice
                .iter()
                .map(|id| index.get(id).copied().unwrap_or(u32::MAX))
                .collect();
            let digest = content_digest(info.flags, &addresses, &local);
            let view = InstalledService {
                address,
                name: address_label(&address),
                service_id: info.service_id,
                backends: addresses
                    .iter()
                    .map(|a| InstalledBackend {
                        address: *a,
                        backend_id: backend_ids[a],
                        subset: None,
                        version: None,
                        share: 0.0,
                    })
                    .collect(),
            };
            tables.entries.insert(
                address,
                Entry {
                    info,
                    digest,
                    backend_ids,
                    view,
                },
            );
        }
        if !stale.is_empty() {
            bpf_sys::delete_batch(fd(ebpf, map_names::SERVICES)?, &stale)
                .map_err(sys_err("removing service entries of another layout"))?;
        }
        info!(
            services = tables.entries.len(),
            maglev_entries = tables.pool.used(),
            "rule tables recovered from the pinned maps"
        );
        Ok(tables)
    }

    /// Maglev entries in use.
    pub(crate) fn maglev_entries_in_use(&self) -> u64 {
        self.pool.used()
    }

    /// The services currently in force.
    pub(crate) fn installed(&self) -> impl Iterator<Item = &InstalledService> {
        self.entries.values().map(|e| &e.view)
    }

    /// Number of services in force.
    pub(crate) fn installed_len(&self) -> usize {
        self.entries.len()
    }

    /// Keeps the table size a service already has when its size was picked by default and
    /// still fits its backends (see [`maglev::keep_table_size`]): a new size would move most
    /// of its flows.
    pub(crate) fn stabilise(&self, state: &mut DesiredState) {
        for service in &mut state.services {
            let Plan::L4(plan) = &mut service.plan else {
                continue;
            };
            let Some(entry) = self.entries.get(&service.address) else {
                continue;
            };
            let installed = entry.info.table_size;
            if !plan.sized_by_default
                || plan.table.is_empty()
                || installed == 0
                || installed as usize == plan.table.len()
                || !maglev::keep_table_size(installed, plan.backends.len())
            {
                continue;
            }
            let keys: Vec<String> = plan
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect();
            let shares: Vec<f64> = plan.backends.iter().map(|b| b.share).collect();
            plan.table = crate::compile::table_cache::table(&keys, &shares, installed);
        }
    }

    /// Makes `state` the rules in force, writing only what changed.
    pub(crate) fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        state: &DesiredState,
    ) -> Result<ApplyReport, DataplaneError> {
        let started = Instant::now();
        // Whatever the previous apply switched away from is no longer read by any packet.
        self.pool.end_quarantine();
        self.service_ids.end_quarantine();
        self.backend_ids.end_quarantine();

        // What changes, and whether it fits, before anything is written.
        let mut changed: Vec<(&ServicePlan, u128)> = Vec::new();
        let mut kept = Vec::new();
        for service in &state.services {
            let digest = plan_digest(service);
            match self.entries.get(&service.address) {
                Some(entry) if entry.digest == digest => kept.push(service),
                _ => changed.push((service, digest)),
            }
        }
        let wanted: std::collections::HashSet<&ServiceAddress> =
            state.services.iter().map(|s| &s.address).collect();
        let removed: Vec<ServiceAddress> = self
            .entries
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        self.check_capacity(state, &changed)?;

        // Ids of the changed services: kept where the service or backend already has one.
        let mut fresh_services = Vec::new();
        let mut fresh_backends: Vec<(u32, SocketAddr)> = Vec::new();
        let mut plans = Vec::with_capacity(changed.len());
        for (service, digest) in &changed {
            let old = self.entries.get(&service.address);
            let service_id = match old {
                Some(e) => e.info.service_id,
                None => {
                    let id = self.service_ids.allocate().expect("checked capacity");
                    fresh_services.push(id);
                    id
                }
            };
            let mut backend_ids = HashMap::new();
            for backend in kernel_backends(&service.plan) {
                let id = match old.and_then(|e| e.backend_ids.get(&backend.address)) {
                    Some(id) => *id,
                    None => {
                        let id = self.backend_ids.allocate().expect("checked capacity");
                        fresh_backends.push((id, backend.address));
                        id
                    }
                };
                backend_ids.insert(backend.address, id);
            }
            plans.push((*service, *digest, service_id, backend_ids));
        }

        // Fresh ids: counters from zero, backend slots with their addresses. No entry references
        // them yet.
        let cpus =
            nr_cpus().map_err(|(_, e)| DataplaneError::Other(format!("counting CPUs: {e}")))?;
        zero_counters(ebpf, map_names::SERVICE_STATS, &fresh_services, cpus)?;
        let fresh_backend_ids: Vec<u32> = fresh_backends.iter().map(|(id, _)| *id).collect();
        zero_counters(ebpf, map_names::BACKEND_STATS, &fresh_backend_ids, cpus)?;
        if !fresh_backends.is_empty() {
            let values: Vec<Backend> = fresh_backends
                .iter()
                .map(|(_, a)| backend_value(a))
                .collect();
            bpf_sys::update_batch(
                fd(ebpf, map_names::BACKENDS)?,
                &fresh_backend_ids,
                as_bytes(&values),
                std::mem::size_of::<Backend>(),
            )
            .map_err(sys_err("writing BACKENDS"))?;
        }

        // New slices into free space, then the entries switched in batches.
        let services_fd = fd(ebpf, map_names::SERVICES)?;
        let mut pending_keys: Vec<ServiceKey> = Vec::new();
        let mut pending_infos: Vec<ServiceInfo> = Vec::new();
        let mut maglev_entries = 0usize;
        let total = plans.len();
        let mut written = 0usize;
        for (service, digest, service_id, backend_ids) in plans {
            let (table, flags) = kernel_table(service);
            let size = table.len() as u32;
            let offset = match self.pool.allocate(size) {
                Some(offset) => offset,
                None => {
                    // The free space is held by slices this apply already switched away
                    // from: switch what is written, let packets move on, and reuse it.
                    switch(services_fd, &mut pending_keys, &mut pending_infos)?;
                    std::thread::sleep(Duration::from_millis(2));
                    self.pool.end_quarantine();
                    self.pool.allocate(size).ok_or_else(|| {
                        DataplaneError::Capacity(format!(
                            "the Maglev pool is too fragmented for a {size}-entry table; {written} \
                             of {total} changed services were written; restart meshd with a larger \
                             --maglev-pool-entries"
                        ))
                    })?
                }
            };
            let ids: Vec<u32> = kernel_backends(&service.plan)
                .iter()
                .map(|b| backend_ids[&b.address])
                .collect();
            self.maglev.write(
                offset as usize,
                table.iter().map(|slot| ids[*slot as usize]),
            );
            maglev_entries += table.len();
            let info = ServiceInfo {
                service_id,
                table_offset: if size == 0 { 0 } else { offset },
                table_size: size,
                flags,
            };
            pending_keys.push(service_key(&service.address));
            pending_infos.push(info);
            let old = self.entries.insert(
                service.address,
                Entry {
                    info,
                    digest,
                    view: installed_view(service, service_id, &backend_ids),
                    backend_ids,
                },
            );
            if let Some(old) = old {
                self.pool
                    .release_later(old.info.table_offset, old.info.table_size);
                let entry = &self.entries[&service.address];
                for (addr, id) in old.backend_ids {
                    if !entry.backend_ids.contains_key(&addr) {
                        self.backend_ids.release_later(id);
                    }
                }
            }
            written += 1;
            if written.is_multiple_of(PROGRESS_EVERY) {
                info!(written, total, "writing service tables");
                crate::progress::set(format!("writing service tables: {written} of {total}"));
            }
        }
        switch(services_fd, &mut pending_keys, &mut pending_infos)?;

        // Services that left: entries first, then their space and ids (after the quarantine).
        if !removed.is_empty() {
            let keys: Vec<ServiceKey> = removed.iter().map(service_key).collect();
            bpf_sys::delete_batch(services_fd, &keys).map_err(sys_err("removing services"))?;
            for address in &removed {
                let old = self.entries.remove(address).expect("listed from entries");
                self.pool
                    .release_later(old.info.table_offset, old.info.table_size);
                self.service_ids.release_later(old.info.service_id);
                for id in old.backend_ids.into_values() {
                    self.backend_ids.release_later(id);
                }
            }
        }

        // Unchanged services: only what stats show (names, subsets, shares) may differ.
        for service in kept {
            let entry = self.entries.get_mut(&service.address).expect("kept");
            let view = installed_view(service, entry.info.service_id, &entry.backend_ids);
            if view != entry.view {
                entry.view = view;
            }
        }
        if total >= PROGRESS_EVERY {
            info!(written, total, "service tables written");
        }
        Ok(ApplyReport {
            services: self.entries.len(),
            backends: self.entries.values().map(|e| e.backend_ids.len()).sum(),
            written,
            removed: removed.len(),
            maglev_entries,
            duration: started.elapsed(),
        })
    }

    fn check_capacity(
        &self,
        state: &DesiredState,
        changed: &[(&ServicePlan, u128)],
    ) -> Result<(), DataplaneError> {
        if state.services.len() > MAX_SERVICES as usize {
            return Err(DataplaneError::Capacity(format!(
                "the rules define {} service addresses, at most {MAX_SERVICES} are supported",
                state.services.len()
            )));
        }
        // After the apply: the new slices of changed services plus the unchanged ones.
        let live: u64 = state
            .services
            .iter()
            .map(|s| kernel_table(s).0.len() as u64)
            .sum();
        if live > u64::from(self.pool.capacity()) {
            return Err(DataplaneError::Capacity(format!(
                "the rules need {live} Maglev entries but the pool holds {}; restart meshd with \
                 a larger --maglev-pool-entries or use smaller consistentHash.maglev.tableSize \
                 values",
                self.pool.capacity()
            )));
        }
        let new_services = changed
            .iter()
            .filter(|(s, _)| !self.entries.contains_key(&s.address))
            .count();
        if new_services > self.service_ids.available() {
            return Err(DataplaneError::Capacity(format!(
                "more than {MAX_SERVICES} service ids in use"
            )));
        }
        let new_backends: usize = changed
            .iter()
            .map(|(s, _)| {
                let old = self.entries.get(&s.address);
                kernel_backends(&s.plan)
                    .iter()
                    .filter(|b| old.is_none_or(|e| !e.backend_ids.contains_key(&b.address)))
                    .count()
            })
            .sum();
        if new_backends > self.backend_ids.available() {
            return Err(DataplaneError::Capacity(format!(
                "more than {MAX_BACKENDS} backend ids in use"
            )));
        }
        Ok(())
    }
}

/// Replaces the pending service entries with one batch update (each entry's switch is atomic).
fn switch(
    services: BorrowedFd<'_>,
    keys: &mut Vec<ServiceKey>,
    infos: &mut Vec<ServiceInfo>,
) -> Result<(), DataplaneError> {
    if keys.is_empty() {
        return Ok(());
    }
    // The slices were written through shared memory: make them visible before the entries.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    bpf_sys::update_batch(
        services,
        keys,
        as_bytes(infos),
        std::mem::size_of::<ServiceInfo>(),
    )
    .map_err(sys_err("writing SERVICES"))?;
    keys.clear();
    infos.clear();
    Ok(())
}

/// The table and flags a service has in the kernel (an L7 service: no table, the proxy flag).
fn kernel_table(service: &ServicePlan) -> (&[u32], u32) {
    match &service.plan {
        Plan::L4(plan) => {
            let flags = if plan.hash_source_ip {
                SERVICE_FLAG_HASH_SOURCE_IP
            } else {
                0
            };
            (plan.table.as_slice(), flags)
        }
        Plan::L7(_) => (&[][..], SERVICE_FLAG_L7_PROXY),
    }
}

/// Digest of a service's kernel content from its plan; equal to [`content_digest`] of the same
/// content read back from the maps.
fn plan_digest(service: &ServicePlan) -> u128 {
    let (table, flags) = kernel_table(service);
    let backends = kernel_backends(&service.plan);
    // Only the backends the table references, in address order, with the table re-indexed.
    let mut used = vec![false; backends.len()];
    for slot in table {
        used[*slot as usize] = true;
    }
    let mut addresses: Vec<(SocketAddr, usize)> = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| used[*i])
        .map(|(i, b)| (b.address, i))
        .collect();
    addresses.sort();
    let mut index = vec![u32::MAX; backends.len()];
    for (position, (_, i)) in addresses.iter().enumerate() {
        index[*i] = position as u32;
    }
    let local: Vec<u32> = table.iter().map(|slot| index[*slot as usize]).collect();
    let addresses: Vec<SocketAddr> = addresses.into_iter().map(|(a, _)| a).collect();
    content_digest(flags, &addresses, &local)
}

fn content_digest(flags: u32, addresses: &[SocketAddr], table: &[u32]) -> u128 {
    let mut bytes = Vec::with_capacity(8 + addresses.len() * 18 + table.len() * 4);
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&(addresses.len() as u32).to_le_bytes());
    for address in addresses {
        bytes.extend_from_slice(&ip_bytes(&address.ip()));
        bytes.extend_from_slice(&address.port().to_le_bytes());
    }
    for slot in table {
        bytes.extend_from_slice(&slot.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

fn installed_view(
    service: &ServicePlan,
    service_id: u32,
    backend_ids: &HashMap<SocketAddr, u32>,
) -> InstalledService {
    InstalledService {
        address: service.address,
        name: service.name.clone(),
        service_id,
        backends: kernel_backends(&service.plan)
            .iter()
            .map(|b| InstalledBackend {
                address: b.address,
                backend_id: backend_ids[&b.address],
                subset: b.subset.clone(),
                version: b.labels.get("version").cloned(),
                share: b.share,
            })
            .collect(),
    }
}

/// Backends the kernel forwards to: an L7 service has none (the proxy connects itself).
fn kernel_backends(plan: &Plan) -> &[crate::compile::BackendPlan] {
    match plan {
        Plan::L4(plan) => &plan.backends,
        Plan::L7(_) => &[],
    }
}

fn zero_counters(ebpf: &Ebpf, name: &str, ids: &[u32], cpus: usize) -> Result<(), DataplaneError> {
    if ids.is_empty() {
        return Ok(());
    }
    // Per-CPU values are laid out one per CPU, each rounded up to 8 bytes (48 already is).
    let value_size = std::mem::size_of::<TrafficCounters>() * cpus;
    let zeros = vec![0u8; value_size * ids.len()];
    bpf_sys::update_batch(fd(ebpf, name)?, ids, &zeros, value_size)
        .map_err(sys_err(format!("resetting {name}")))
}

fn as_bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: Pod types are plain data with explicit padding.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast(), std::mem::size_of_val(items)) }
}

fn sys_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let context = context.into();
    move |e| DataplaneError::Other(format!("{context}: {e}"))
}

pub(crate) fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map, DataplaneError> {
    ebpf.map(name)
        .ok_or_else(|| DataplaneError::Other(format!("map {name} missing from the object")))
}

/// The file descriptor of one of the program's maps.
pub(crate) fn fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>, DataplaneError> {
    super::map_data(map(ebpf, name)?)
        .map(|m| m.fd().as_fd())
        .ok_or_else(|| DataplaneError::Other(format!("map {name} has an unexpected type")))
}

/// The map key of a service address.
pub fn service_key(address: &ServiceAddress) -> ServiceKey {
    ServiceKey {
        addr: ip_bytes(&address.ip),
        port: port_to_wire(address.port),
        proto: match address.protocol {
            L4Protocol::Tcp => PROTO_TCP,
            L4Protocol::Udp => PROTO_UDP,
        },
        _pad: 0,
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
