//! Counters read back from the per-CPU maps and summed over CPUs; active connections and the
//! connection table's fill from the last census (see [`super::census`]), never from a walk.

use std::{net::SocketAddr, time::SystemTime};

use aya::maps::{MapData, PerCpuArray};
use mesh_common::{ct_event, map_names, reason, TrafficCounters};
use serde::{Deserialize, Serialize};

use super::{
    map_err,
    tables::{map, InstalledService},
    Dataplane, DataplaneError,
};
use crate::compile::ServiceAddress;

/// Everything `meshctl stats` and the metrics endpoint show about the kernel path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// When the counters were read (seconds since the epoch, fractional).
    pub taken_at: f64,
    /// Per service address.
    pub services: Vec<ServiceStats>,
    /// Packets per pass/drop/forward reason, by reason name.
    pub reasons: Vec<(String, u64)>,
    /// Services served by the L7 proxy: requests per route and destination (filled in by the
    /// controller; empty from older meshd versions).
    #[serde(default)]
    pub l7: Vec<crate::proxy::L7ServiceStats>,
    /// Connection-table events (`mesh_common::ct_event`) by name: pending flows created,
    /// confirmed, directions rebuilt. Empty from older meshd versions.
    #[serde(default)]
    pub conntrack_events: Vec<(String, u64)>,
    /// Capacity of the pending-flow table in flows (0 from older meshd versions).
    #[serde(default)]
    pub pending_capacity: u64,
}

/// Counters of one service address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStats {
    /// The address clients use.
    pub address: ServiceAddress,
    /// Display name.
    pub name: String,
    /// Totals over all backends (including backends no longer in the rules).
    pub totals: Counters,
    /// Per backend in the current rules.
    pub backends: Vec<BackendStats>,
}

/// Counters of one backend of a service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStats {
    /// Where it listens.
    pub address: SocketAddr,
    /// Subset it belongs to, if the route named one.
    pub subset: Option<String>,
    /// The `version` label.
    pub version: Option<String>,
    /// Configured share of new connections (0..=1).
    pub configured_share: f64,
    /// Its counters.
    pub counters: Counters,
    /// Connections that carried a packet in the last 10 seconds.
    pub active_connections: u64,
}

/// Summed traffic counters.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Client-to-service packets.
    pub packets: u64,
    /// Client-to-service bytes.
    pub bytes: u64,
    /// Reply packets.
    pub reply_packets: u64,
    /// Reply bytes.
    pub reply_bytes: u64,
    /// New connections.
    pub connections: u64,
    /// TCP resets from backends.
    #[serde(default)]
    pub reply_resets: u64,
}

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            connections: c.connections,
            reply_resets: c.reply_resets,
        }
    }
}

impl Dataplane {
    /// Reads all counters of the services in force.
    pub fn stats(&self) -> Result<StatsSnapshot, DataplaneError> {
        let taken_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let service_counters: PerCpuArray<&MapData, TrafficCounters> =
            PerCpuArray::try_from(map(&self.ebpf, map_names::SERVICE_STATS)?)
                .map_err(map_err("opening SERVICE_STATS"))?;
        let backend_counters: PerCpuArray<&MapData, TrafficCounters> =
            PerCpuArray::try_from(map(&self.ebpf, map_names::BACKEND_STATS)?)
                .map_err(map_err("opening BACKEND_STATS"))?;
        let sum = |array: &PerCpuArray<&MapData, TrafficCounters>,
                   id: u32|
         -> Result<Counters, DataplaneError> {
            let values = array
                .get(&id, 0)
                .map_err(map_err(format!("reading counters {id}")))?;
            let mut total = TrafficCounters::default();
            for v in values.iter() {
                total.accumulate(v);
            }
            Ok(total.into())
        };
        let active = self.census.latest().active;
        let services = self
            .tables
            .installed()
            .map(|s: &InstalledService| {
                Ok(ServiceStats {
                    address: s.address,
                    name: s.name.clone(),
                    totals: sum(&service_counters, s.service_id)?,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            Ok(BackendStats {
                                address: b.address,
                                subset: b.subset.clone(),
                                version: b.version.clone(),
                                configured_share: b.share,
                                counters: sum(&backend_counters, b.backend_id)?,
                                active_connections: active.get(&b.backend_id).copied().unwrap_or(0),
                            })
                        })
                        .collect::<Result<_, DataplaneError>>()?,
                })
            })
            .collect::<Result<_, DataplaneError>>()?;
        let reasons = named_sums(&self.ebpf, map_names::REASON_STATS, &reason::NAMES)?;
        let conntrack_events = named_sums(&self.ebpf, map_names::CT_STATS, &ct_event::NAMES)?;
        Ok(StatsSnapshot {
            taken_at,
            services,
            reasons,
            l7: Vec::new(),
            conntrack_events,
            pending_capacity: u64::from(self.options.pending_flows()),
        })
    }

    /// Applies a desired state, writing only the services that changed (see
    /// [`super::tables`]).
    pub fn apply(
        &mut self,
        state: &crate::compile::DesiredState,
    ) -> Result<super::ApplyReport, DataplaneError> {
        self.tables.apply(&mut self.ebpf, state)
    }

    /// Keeps installed default table sizes where they still fit (see [`super::tables`]).
    pub fn stabilise(&self, state: &mut crate::compile::DesiredState) {
        self.tables.stabilise(state)
    }
}

/// How full one map is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FillLevel {
    /// Map name.
    pub name: String,
    /// Entries in use.
    pub used: u64,
    /// Capacity.
    pub capacity: u64,
    /// Kernel memory the map holds (see [`Dataplane::fill_levels`]).
    #[serde(default)]
    pub memory_bytes: u64,
}

impl Dataplane {
    /// Fill levels and memory of every map. Memory is what the kernel allocates at creation:
    /// values rounded up to 8 bytes (per-CPU maps once per CPU), and for hash maps the key and
    /// an element header of about 48 bytes each, all preallocated; the kernel's fixed per-map
    /// bookkeeping is left out.
    pub fn fill_levels(&self) -> Vec<FillLevel> {
        let services = self.tables.installed_len() as u64;
        let backends: u64 = self
            .tables
            .installed()
            .map(|s| s.backends.len() as u64)
            .sum();
        let used = |name: &str| -> u64 {
            match name {
                map_names::SERVICES | map_names::SERVICE_STATS => services,
                map_names::BACKENDS | map_names::BACKEND_STATS => backends,
                map_names::MAGLEV => self.tables.maglev_entries_in_use(),
                // Flows: the client-side entries (each flow also has a reply-side one).
                map_names::CONNTRACK => self.census.latest().flows,
                _ => u64::from(reason::COUNT),
            }
        };
        let cpus = aya::util::nr_cpus().unwrap_or(1) as u64;
        let round8 = |n: u64| n.div_ceil(8) * 8;
        let mut out = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let Some(Ok(info)) = super::map_data(map).map(MapData::info) else {
                continue;
            };
            let entries = u64::from(info.max_entries());
            let value = round8(u64::from(info.value_size()));
            let memory_bytes = match map {
                aya::maps::Map::Array(_) => entries * value,
                aya::maps::Map::PerCpuArray(_) => entries * value * cpus,
                _ => entries * (48 + round8(u64::from(info.key_size())) + value),
            };
            let capacity = match name {
                // Two entries per flow.
                map_names::CONNTRACK => entries / 2,
                _ => entries,
            };
            out.push(FillLevel {
                name: name.to_string(),
                used: used(name),
                capacity,
                memory_bytes,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Per-CPU `u64` counters of map `name`, summed over CPUs, as (name, total) for each code.
fn named_sums(
    ebpf: &aya::Ebpf,
    name: &str,
    names: &[&str],
) -> Result<Vec<(String, u64)>, DataplaneError> {
    let counters: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map(ebpf, name)?).map_err(map_err(format!("opening {name}")))?;
    names
        .iter()
        .enumerate()
        .map(|(code, label)| {
            let values = counters
                .get(&(code as u32), 0)
                .map_err(map_err(format!("reading {name}")))?;
            Ok((label.to_string(), values.iter().sum()))
        })
        .collect()
}
