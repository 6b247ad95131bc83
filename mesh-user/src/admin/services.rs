//! `GET /v1/services`: which hosts are served where, and how: one [`ServiceView`] per service
//! address of the rules in force (address, port, kernel path or proxy with the reason
//! [`crate::resolve::path::decide`] gave, subsets, endpoints). `meshctl get services` prints it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::compile::{DesiredState, Plan, ServicePlan};

/// One service address as `meshctl get services` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The Istio host (or `gateway/<ns>/<name>:<port>`).
    pub name: String,
    /// Address clients connect to.
    pub address: String,
    /// Port clients connect to.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `kernel` or `proxy`.
    pub path: String,
    /// Why (the decision's reason).
    pub reason: String,
    /// Subsets traffic is routed to (`-` for a destination without subset).
    pub subsets: Vec<String>,
    /// Endpoints traffic reaches (`address:port`), sorted.
    pub endpoints: Vec<String>,
    /// Resources it comes from (`kind/namespace/name`).
    pub sources: Vec<String>,
}

impl ServiceView {
    /// The view of one compiled service.
    pub fn of(service: &ServicePlan) -> Self {
        let mut subsets = BTreeSet::new();
        let mut endpoints = BTreeSet::new();
        match &service.plan {
            Plan::L4(plan) => {
                for backend in &plan.backends {
                    subsets.insert(backend.subset.clone().unwrap_or_else(|| "-".into()));
                    endpoints.insert(backend.address.to_string());
                }
            }
            Plan::L7(plan) => {
                for cluster in &plan.clusters {
                    subsets.insert(cluster.subset.clone().unwrap_or_else(|| "-".into()));
                    endpoints.extend(cluster.backends.iter().map(|b| b.address.to_string()));
                }
            }
        }
        ServiceView {
            name: service.name.clone(),
            address: service.address.ip.to_string(),
            port: service.address.port,
            protocol: format!("{:?}", service.address.protocol).to_lowercase(),
            path: service.path.name().into(),
            reason: service.path.reason(),
            subsets: subsets.into_iter().collect(),
            endpoints: endpoints.into_iter().collect(),
            sources: service.sources.clone(),
        }
    }
}

/// Every service address of `state`, in address order.
pub fn services(state: &DesiredState) -> Vec<ServiceView> {
    state.services.iter().map(ServiceView::of).collect()
}

/// The table `meshctl get services` prints; `wide` adds subsets, endpoints and the reason.
pub fn render(views: &[ServiceView], wide: bool) -> String {
    let mut out = String::new();
    let width = views.iter().map(|v| v.name.len()).max().unwrap_or(0).max(7);
    let header = format!(
        "{:<width$}  {:<24} {:>5} {:<4} {:<6}",
        "SERVICE", "ADDRESS", "PORT", "PROT", "PATH"
    );
    out.push_str(header.trim_end());
    if wide {
        out.push_str("  SUBSETS  ENDPOINTS  REASON");
    }
    out.push('\n');
    for v in views {
        let line = format!(
            "{:<width$}  {:<24} {:>5} {:<4} {:<6}",
            v.name, v.address, v.port, v.protocol, v.path
        );
        out.push_str(line.trim_end());
        if wide {
            let list = |items: &[String]| match items {
                [] => "<none>".to_string(),
                _ => items.join(","),
            };
            out.push_str(&format!(
                "  {}  {}  {}",
                list(&v.subsets),
                list(&v.endpoints),
                v.reason
            ));
        }
        out.push('\n');
    }
    out
}
