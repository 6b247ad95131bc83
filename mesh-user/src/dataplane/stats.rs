//! Counters read back from the per-CPU maps and summed over CPUs.

use std::{net::SocketAddr, time::SystemTime};

use aya::maps::{MapData, PerCpuArray};
use mesh_common::{map_names, reason, TrafficCounters};
use serde::Serialize;

use super::{
    map_err,
    tables::{map, InstalledService},
    Dataplane, DataplaneError,
};
use crate::compile::ServiceAddress;

/// Everything `meshctl stats` and the metrics endpoint show about the kernel path.
#[derive(Clone, Debug, Serialize)]
pub struct StatsSnapshot {
    /// When the counters were read (seconds since the epoch, fractional).
    pub taken_at: f64,
    /// Per service address.
    pub services: Vec<ServiceStats>,
    /// Packets per pass/drop/forward reason, by reason name.
    pub reasons: Vec<(String, u64)>,
}

/// Counters of one service address.
#[derive(Clone, Debug, Serialize)]
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
#[derive(Clone, Debug, Serialize)]
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
}

/// Summed traffic counters.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
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
}

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            connections: c.connections,
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
        let reason_counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map(&self.ebpf, map_names::REASON_STATS)?)
                .map_err(map_err("opening REASON_STATS"))?;

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
                            })
                        })
                        .collect::<Result<_, DataplaneError>>()?,
                })
            })
            .collect::<Result<_, DataplaneError>>()?;
        let mut reasons = Vec::with_capacity(reason::COUNT as usize);
        for (code, name) in reason::NAMES.iter().enumerate() {
            let values = reason_counters
                .get(&(code as u32), 0)
                .map_err(map_err("reading REASON_STATS"))?;
            reasons.push((name.to_string(), values.iter().sum()));
        }
        Ok(StatsSnapshot {
            taken_at,
            services,
            reasons,
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
