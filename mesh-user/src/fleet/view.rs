//! The fleet as meshctl shows it: `meshctl get nodes` / `status --fleet` (every node, its
//! revision and state) and `meshctl stats --fleet` (the split per service summed over nodes).
//!
//! The counters come from the node records in etcd: each meshd publishes its own kernel
//! connection counters and proxy request counters (the numbers of its `/v1/stats`) every
//! publish interval, so the sum is as fresh as the slowest node's last record.

use std::{collections::BTreeMap, fmt::Write};

use serde::Serialize;

use super::{FleetView, NodeView};

/// One backend (or subset) of one service across the fleet.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FleetBackend {
    /// Subset (or `-`).
    pub subset: String,
    /// Backend address or destination host.
    pub backend: String,
    /// `connections` or `requests`.
    pub unit: String,
    /// Count per node, by node name.
    pub per_node: BTreeMap<String, u64>,
    /// Sum over nodes.
    pub total: u64,
    /// Configured share.
    pub configured_share: Option<f64>,
}

/// One service across the fleet.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FleetService {
    /// Name.
    pub name: String,
    /// `ip:port/proto`.
    pub address: String,
    /// Backends in first-seen order.
    pub backends: Vec<FleetBackend>,
}

impl FleetService {
    /// Sum over all backends.
    pub fn total(&self) -> u64 {
        self.backends.iter().map(|b| b.total).sum()
    }
}

/// Sums the counters of every node with a record.
pub fn fleet_split(view: &FleetView) -> Vec<FleetService> {
    let mut services: Vec<FleetService> = Vec::new();
    for node in &view.nodes {
        let Some(record) = &node.record else { continue };
        for counters in &record.counters {
            let position = services
                .iter()
                .position(|s| s.address == counters.address)
                .unwrap_or_else(|| {
                    services.push(FleetService {
                        name: counters.name.clone(),
                        address: counters.address.clone(),
                        backends: Vec::new(),
                    });
                    services.len() - 1
                });
            let service = &mut services[position];
            for b in &counters.backends {
                let subset = b.subset.clone().unwrap_or_else(|| "-".into());
                let position = service
                    .backends
                    .iter()
                    .position(|x| x.backend == b.backend && x.subset == subset)
                    .unwrap_or_else(|| {
                        service.backends.push(FleetBackend {
                            subset: subset.clone(),
                            backend: b.backend.clone(),
                            unit: b.unit.clone(),
                            configured_share: b.configured_share,
                            ..Default::default()
                        });
                        service.backends.len() - 1
                    });
                let backend = &mut service.backends[position];
                *backend.per_node.entry(record.name.clone()).or_default() += b.count;
                backend.total += b.count;
            }
        }
    }
    services
}

/// `meshctl get nodes` / `meshctl status --fleet`.
pub fn render_nodes(view: &FleetView) -> String {
    let mut out = String::new();
    match (view.revision, &view.error) {
        (Some(revision), _) => {
            let _ = writeln!(
                out,
                "fleet revision {revision} (etcd {})",
                view.local.endpoints.join(",")
            );
        }
        (None, Some(error)) => {
            let _ = writeln!(out, "etcd does not answer: {error}");
        }
        (None, None) => {}
    }
    let local = &view.local;
    let _ = writeln!(
        out,
        "this node: {} at revision {}{}{}",
        local.name,
        local.applied_revision,
        if local.stale() { ", STALE" } else { "" },
        match (&local.disconnected_since, &local.etcd_error) {
            (Some(since), Some(e)) => format!(
                " (no answer from etcd for {:.0}s: {e})",
                (super::now() - since).max(0.0)
            ),
            _ => String::new(),
        }
    );
    if let Some(e) = &local.last_error {
        let _ = writeln!(out, "last error: {e}");
    }
    if view.nodes.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:<8} {:>9} {:>9}  {:<24} {:<20} ERROR",
        "NODE", "STATE", "REVISION", "AGE", "SERVICES (kernel/proxy)", "INTERFACES"
    );
    for node in &view.nodes {
        out.push_str(&node_line(node));
    }
    out
}

fn node_line(node: &NodeView) -> String {
    let Some(r) = &node.record else {
        return format!(
            "{:<16} {:<8} {:>9} {:>9}  {:<24} {:<20} lease expired: meshd stopped or cut off from etcd\n",
            node.name, node.state, "-", "-", "-", "-"
        );
    };
    let kernel = r.services.iter().filter(|s| s.path == "kernel").count();
    let proxy = r.services.iter().filter(|s| s.path == "proxy").count();
    let interfaces = r
        .interfaces
        .iter()
        .map(|i| format!("{}:{}", i.name, i.mode))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{:<16} {:<8} {:>9} {:>8.0}s  {:<24} {:<20} {}\n",
        node.name,
        node.state,
        r.applied_revision,
        (super::now() - r.published_at).max(0.0),
        format!("{kernel}/{proxy}"),
        if interfaces.is_empty() {
            "-".into()
        } else {
            interfaces
        },
        r.last_error.as_deref().unwrap_or("-")
    )
}

/// `meshctl stats --fleet`.
pub fn render_split(view: &FleetView) -> String {
    let mut out = String::new();
    let services = fleet_split(view);
    let nodes: Vec<&str> = view
        .nodes
        .iter()
        .filter(|n| n.record.is_some())
        .map(|n| n.name.as_str())
        .collect();
    let _ = writeln!(
        out,
        "observed split summed over {} node(s), from the counters each node publishes in etcd",
        nodes.len()
    );
    if services.is_empty() {
        let _ = writeln!(out, "no services in force");
    }
    for service in &services {
        let total = service.total();
        let _ = writeln!(
            out,
            "\n{} ({})  total {}",
            service.name, service.address, total
        );
        let mut header = format!("  {:<8} {:<24}", "SUBSET", "BACKEND");
        for node in &nodes {
            let _ = write!(header, " {node:>10}");
        }
        let _ = writeln!(
            out,
            "{header} {:>10} {:>7} {:>7}",
            "TOTAL", "SHARE", "WEIGHT"
        );
        for b in &service.backends {
            let mut line = format!("  {:<8} {:<24}", b.subset, b.backend);
            for node in &nodes {
                let _ = write!(line, " {:>10}", b.per_node.get(*node).copied().unwrap_or(0));
            }
            let share = if total > 0 {
                b.total as f64 / total as f64 * 100.0
            } else {
                0.0
            };
            let weight = b
                .configured_share
                .map(|s| format!("{:.1}%", s * 100.0))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "{line} {:>10} {share:>6.1}% {weight:>7}", b.total);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{BackendCount, NodeRecord, ServiceCounters};

    fn node(name: &str, counts: &[(&str, u64)]) -> NodeView {
        NodeView {
            name: name.into(),
            state: "ok".into(),
            record: Some(NodeRecord {
                name: name.into(),
                counters: vec![ServiceCounters {
                    name: "echo".into(),
                    address: "198.18.0.10:7/tcp".into(),
                    backends: counts
                        .iter()
                        .map(|(b, c)| BackendCount {
                            backend: (*b).into(),
                            subset: Some("v1".into()),
                            count: *c,
                            unit: "connections".into(),
                            configured_share: Some(0.5),
                        })
                        .collect(),
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn split_sums_per_backend_over_nodes_and_skips_gone_ones() {
        let view = FleetView {
            nodes: vec![
                node("a", &[("b1", 3), ("b2", 1)]),
                node("b", &[("b1", 2), ("b2", 4)]),
                NodeView {
                    name: "c".into(),
                    state: "gone".into(),
                    record: None,
                },
            ],
            ..Default::default()
        };
        let split = fleet_split(&view);
        assert_eq!(split.len(), 1);
        assert_eq!(split[0].total(), 10);
        assert_eq!(split[0].backends[0].total, 5);
        assert_eq!(split[0].backends[0].per_node["a"], 3);
        assert_eq!(split[0].backends[1].total, 5);
        let text = render_split(&view);
        assert!(text.contains("summed over 2 node(s)"), "{text}");
    }
}
