//! Prometheus metrics: the kernel counters (read at scrape time from the per-CPU maps), map fill
//! levels, and the rule-apply counters and latency histogram kept by meshd.

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::dataplane::{stats::FillLevel, StatsSnapshot};

/// Metrics meshd keeps itself (the kernel's are read at scrape time).
#[derive(Clone, Debug)]
pub struct Metrics {
    applies: Family<Vec<(String, String)>, Counter>,
    apply_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            applies: Family::default(),
            // 50 us .. ~3 s.
            apply_seconds: Histogram::new(exponential_buckets(0.000_05, 3.0, 11)),
        }
    }
}

impl Metrics {
    /// Counts one rules change and its duration.
    pub fn record_apply(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.applies
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        if ok {
            self.apply_seconds.observe(seconds);
        }
    }

    /// The exposition text.
    pub fn render(&self, snapshot: Option<&StatsSnapshot>, fill: &[FillLevel]) -> String {
        let mut registry = Registry::with_prefix("mesh");
        registry.register(
            "rule_applies",
            "Rule changes (startup, file reload, meshctl apply/delete) by result",
            self.applies.clone(),
        );
        registry.register(
            "rule_apply_duration_seconds",
            "Time to compile and install a rule change",
            self.apply_seconds.clone(),
        );
        registry.register_collector(Box::new(KernelCollector {
            snapshot: snapshot.cloned(),
            fill: fill.to_vec(),
        }));
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &registry).expect("metrics encode into a String");
        out
    }
}

#[derive(Debug)]
struct KernelCollector {
    snapshot: Option<StatsSnapshot>,
    fill: Vec<FillLevel>,
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in samples {
        let metric = family.encode_family(labels)?;
        ConstCounter::new(*value).encode(metric)?;
    }
    Ok(())
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in samples {
        let metric = family.encode_family(labels)?;
        ConstGauge::new(*value).encode(metric)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(snapshot) = &self.snapshot {
            let mut svc: [Vec<(Labels, u64)>; 6] = Default::default();
            let mut be: [Vec<(Labels, u64)>; 6] = Default::default();
            let mut active = Vec::new();
            for s in &snapshot.services {
                let labels: Labels = vec![
                    ("service", s.name.clone()),
                    ("address", format!("{}:{}", s.address.ip, s.address.port)),
                    (
                        "protocol",
                        format!("{:?}", s.address.protocol).to_lowercase(),
                    ),
                ];
                let t = s.totals;
                for (slot, value) in svc.iter_mut().zip([
                    t.packets,
                    t.bytes,
                    t.reply_packets,
                    t.reply_bytes,
                    t.connections,
                    t.reply_resets,
                ]) {
                    slot.push((labels.clone(), value));
                }
                for b in &s.backends {
                    let mut labels = labels.clone();
                    labels.push(("subset", b.subset.clone().unwrap_or_default()));
                    labels.push(("version", b.version.clone().unwrap_or_default()));
                    labels.push(("backend", b.address.to_string()));
                    let c = b.counters;
                    for (slot, value) in be.iter_mut().zip([
                        c.packets,
                        c.bytes,
                        c.reply_packets,
                        c.reply_bytes,
                        c.connections,
                        c.reply_resets,
                    ]) {
                        slot.push((labels.clone(), value));
                    }
                    active.push((labels, b.active_connections as i64));
                }
            }
            let names = [
                "packets",
                "bytes",
                "reply_packets",
                "reply_bytes",
                "connections",
                "reply_resets",
            ];
            let helps = [
                "Packets from clients to the service, forwarded by XDP",
                "Bytes from clients to the service, forwarded by XDP",
                "Reply packets from backends, reverse-translated by XDP",
                "Reply bytes from backends, reverse-translated by XDP",
                "New connections (flows) to the service",
                "TCP resets sent by backends (refused or aborted connections)",
            ];
            for i in 0..names.len() {
                counter_family(
                    &mut encoder,
                    &format!("service_{}", names[i]),
                    helps[i],
                    &svc[i],
                )?;
                counter_family(
                    &mut encoder,
                    &format!("backend_{}", names[i]),
                    helps[i],
                    &be[i],
                )?;
            }
            gauge_family(
                &mut encoder,
                "backend_active_connections",
                "Connections that carried a packet in the last 10 seconds",
                &active,
            )?;
            let reasons: Vec<(Labels, u64)> = snapshot
                .reasons
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.clone())], *n))
                .collect();
            counter_family(
                &mut encoder,
                "xdp_packets",
                "Packets seen by the XDP program, by verdict reason",
                &reasons,
            )?;
            let events: Vec<(Labels, u64)> = snapshot
                .conntrack_events
                .iter()
                .map(|(event, n)| (vec![("event", event.clone())], *n))
                .collect();
            counter_family(
                &mut encoder,
                "conntrack_events",
                "Connection-table events: pending (new flow awaiting traffic both ways), \
                 confirmed (moved to the established table), rebuilt (a lost direction of an \
                 established flow restored)",
                &events,
            )?;
            let count = |name: &str| {
                snapshot
                    .conntrack_events
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| *v)
                    .unwrap_or(0)
            };
            let unconfirmed = count("pending").saturating_sub(count("confirmed"));
            if let Some(turnover) = unconfirmed.checked_div(snapshot.pending_capacity) {
                // Unconfirmed flows per pending-table capacity: above 1 the table overflowed
                // (a flood, or handshakes that never completed) and pending flows were evicted;
                // established flows live in their own table and are not affected.
                gauge_family(
                    &mut encoder,
                    "conntrack_pending_turnover",
                    "Times unconfirmed flows filled the pending-flow table since start (table \
                     pressure; above 1 pending flows were evicted, established ones never)",
                    &[(Vec::new(), turnover as i64)],
                )?;
            }
        }
        let used: Vec<(Labels, i64)> = self
            .fill
            .iter()
            .map(|f| (vec![("map", f.name.clone())], f.used as i64))
            .collect();
        let capacity: Vec<(Labels, i64)> = self
            .fill
            .iter()
            .map(|f| (vec![("map", f.name.clone())], f.capacity as i64))
            .collect();
        gauge_family(
            &mut encoder,
            "map_entries",
            "Entries in use per BPF map (conntrack: tracked flows)",
            &used,
        )?;
        gauge_family(
            &mut encoder,
            "map_capacity",
            "Capacity per BPF map",
            &capacity,
        )?;
        let memory: Vec<(Labels, i64)> = self
            .fill
            .iter()
            .map(|f| (vec![("map", f.name.clone())], f.memory_bytes as i64))
            .collect();
        gauge_family(
            &mut encoder,
            "map_memory_bytes",
            "Kernel memory per BPF map (values, keys and element headers, preallocated)",
            &memory,
        )?;
        Ok(())
    }
}
