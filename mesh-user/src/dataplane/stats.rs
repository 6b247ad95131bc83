//! Counters read back from the per-CPU maps and summed over CPUs.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use mesh_common::{ct_event, map_names, reason, FlowKey, FlowState, TrafficCounters, FLOW_REQUEST};
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
        let active = self.active_flows();
        let services = self
            .tables
            .installed()
            .iter()
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

    /// Applies a desired state atomically (see [`super::tables`]).
    pub fn apply(
        &mut self,
        state: &crate::compile::DesiredState,
    ) -> Result<super::ApplyReport, DataplaneError> {
        self.tables.apply(&mut self.ebpf, state)
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
}

/// A flow counts as active when it carried a packet within this window.
pub const ACTIVE_FLOW_WINDOW: Duration = Duration::from_secs(10);

impl Dataplane {
    /// Fill levels of the rule and connection maps.
    pub fn fill_levels(&self) -> Vec<FillLevel> {
        let installed = self.tables.installed();
        let backends: u64 = installed.iter().map(|s| s.backends.len() as u64).sum();
        let maglev: u64 = self.tables.maglev_entries_in_use();
        // Flows: the client-side entries (each flow also has a reply-side one).
        let flows = map(&self.ebpf, map_names::CONNTRACK)
            .ok()
            .and_then(|m| BpfHashMap::<&MapData, FlowKey, FlowState>::try_from(m).ok())
            .map(|m| {
                m.iter()
                    .filter_map(Result::ok)
                    .filter(|(_, state)| state.direction == FLOW_REQUEST)
                    .count() as u64
            })
            .unwrap_or(0);
        vec![
            FillLevel {
                name: map_names::SERVICES.into(),
                used: installed.len() as u64,
                capacity: u64::from(mesh_common::MAX_SERVICES),
            },
            FillLevel {
                name: map_names::BACKENDS.into(),
                used: backends,
                capacity: u64::from(mesh_common::MAX_BACKENDS),
            },
            FillLevel {
                name: map_names::MAGLEV.into(),
                used: maglev,
                capacity: u64::from(self.options.maglev_pool_entries),
            },
            FillLevel {
                name: map_names::CONNTRACK.into(),
                used: flows,
                capacity: u64::from(self.options.conntrack_entries),
            },
        ]
    }

    /// Active flows (a packet within [`ACTIVE_FLOW_WINDOW`]) per backend id.
    pub(crate) fn active_flows(&self) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        let Ok(m) = map(&self.ebpf, map_names::CONNTRACK) else {
            return out;
        };
        let Ok(flows) = BpfHashMap::<&MapData, FlowKey, FlowState>::try_from(m) else {
            return out;
        };
        let now = monotonic_ns();
        let window = ACTIVE_FLOW_WINDOW.as_nanos() as u64;
        for (_, state) in flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| state.direction == FLOW_REQUEST)
        {
            if now.saturating_sub(state.last_seen_ns) <= window {
                *out.entry(state.backend_id).or_insert(0) += 1;
            }
        }
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

/// The clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
