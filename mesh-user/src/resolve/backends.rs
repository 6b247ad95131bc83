//! Destinations resolved to endpoints: the host's port a route uses, the backends a route's
//! weighted destinations select (route weight x endpoint weight, per address family), and what
//! the DestinationRule's load balancer asks of the path.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::{
    index::{selects, Index},
    path::{HttpHash, ProxyReason},
    select::{Result, Selected},
};
use crate::{
    compile::BackendPlan,
    config::{Destination, ServiceEntry, ServicePort},
    validate::{values, ValidationError},
};

/// The destination host's port a route uses: the one named, else the service's own port when
/// the host has it, else the host's only port.
pub(crate) fn resolve_port<'e>(
    entry: &'e ServiceEntry,
    destination: &Destination,
    service_port: Option<u16>,
) -> std::result::Result<&'e ServicePort, String> {
    let list = || port_list(entry);
    if let Some(port) = &destination.port {
        return entry
            .ports
            .iter()
            .find(|p| p.number == port.number)
            .ok_or_else(|| {
                format!(
                    "host `{}` has no port {} (it has: {})",
                    destination.host,
                    port.number,
                    list()
                )
            });
    }
    if let Some(found) =
        service_port.and_then(|sp| entry.ports.iter().find(|p| p.number == i64::from(sp)))
    {
        return Ok(found);
    }
    match entry.ports.as_slice() {
        [only] => Ok(only),
        _ => Err(format!(
            "host `{}` has several ports ({}); say which with port.number",
            destination.host,
            list()
        )),
    }
}

/// The ports a ServiceEntry declares, for messages ("80, 443").
pub(crate) fn port_list(entry: &ServiceEntry) -> String {
    entry
        .ports
        .iter()
        .map(|p| p.number.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The port an endpoint listens on for a host's `port`: the endpoint's own port of that name,
/// else the port's `targetPort`, else its number.
pub(crate) fn target_port(
    port: &ServicePort,
    endpoint: &crate::config::WorkloadEntry,
) -> std::result::Result<u16, String> {
    let target = port
        .name
        .as_ref()
        .and_then(|name| endpoint.ports.get(name).copied())
        .or(port.target_port)
        .unwrap_or(port.number);
    values::port(target)
}

/// Backends of a selected route for a listener address: share = route weight share x endpoint
/// weight share; endpoints of the other address family are left out (no NAT46).
pub(super) fn backends(
    index: &Index,
    selected: &Selected,
    service_port: Option<u16>,
    family_of: IpAddr,
    sources: &mut BTreeSet<String>,
) -> Result<Vec<BackendPlan>> {
    let rule = selected.rule;
    let ns = &rule.meta.namespace;
    // Istio: a lone destination gets all traffic whatever its weight.
    let weights: Vec<i64> = if selected.destinations.len() == 1 {
        vec![1]
    } else {
        selected
            .destinations
            .iter()
            .map(|(_, _, w)| (*w).max(0))
            .collect()
    };
    let total: i64 = weights.iter().sum();
    let mut merged: BTreeMap<SocketAddr, BackendPlan> = BTreeMap::new();
    for ((field, destination, _), weight) in selected.destinations.iter().zip(weights) {
        if weight == 0 || total == 0 {
            continue;
        }
        // A host or subset not defined (yet) contributes no backend: validation warned, and
        // its share of connections is refused until it arrives.
        let Some((entry_resource, entry)) = index.service_entry(&destination.host, ns) else {
            continue;
        };
        sources.insert(entry_resource.id());
        let port = resolve_port(entry, destination, service_port)
            .map_err(|message| ValidationError::new(rule, format!("{field}.port"), message))?;
        let mut selector = BTreeMap::new();
        if let Some(subset) = &destination.subset {
            let found =
                index
                    .destination_rule(&destination.host, ns)
                    .and_then(|(dr_resource, dr)| {
                        dr.subsets
                            .iter()
                            .find(|s| &s.name == subset)
                            .map(|s| (dr_resource, s))
                    });
            let Some((dr_resource, found)) = found else {
                continue;
            };
            sources.insert(dr_resource.id());
            selector = found.labels.clone();
        }
        let endpoints: Vec<(IpAddr, &crate::config::WorkloadEntry)> = entry
            .endpoints
            .iter()
            .filter(|e| selects(&selector, &e.labels))
            .filter_map(|e| e.address.parse::<IpAddr>().ok().map(|ip| (ip, e)))
            .filter(|(ip, _)| ip.is_ipv4() == family_of.is_ipv4())
            .collect();
        let endpoint_total: i64 = endpoints
            .iter()
            .map(|(_, e)| e.effective_weight().max(0))
            .sum();
        if endpoint_total == 0 {
            continue;
        }
        for (ip, endpoint) in endpoints {
            let endpoint_weight = endpoint.effective_weight().max(0);
            if endpoint_weight == 0 {
                continue;
            }
            let share =
                (weight as f64 / total as f64) * (endpoint_weight as f64 / endpoint_total as f64);
            let target = target_port(port, endpoint)
                .map_err(|m| ValidationError::new(entry_resource, "spec.endpoints", m))?;
            let address = SocketAddr::new(ip, target);
            merged
                .entry(address)
                .and_modify(|b| {
                    b.share += share;
                    if b.subset != destination.subset {
                        b.subset = None;
                    }
                })
                .or_insert_with(|| BackendPlan {
                    address,
                    subset: destination.subset.clone(),
                    labels: endpoint.labels.clone(),
                    share,
                });
        }
    }
    Ok(merged.into_values().collect())
}

/// True when the selected destinations do have endpoints, just none of `family_of`'s family.
pub(super) fn has_other_family_backends(
    index: &Index,
    selected: &Selected,
    family_of: IpAddr,
) -> bool {
    let ns = &selected.rule.meta.namespace;
    selected.destinations.iter().any(|(_, d, _)| {
        index.service_entry(&d.host, ns).is_some_and(|(_, entry)| {
            entry
                .endpoints
                .iter()
                .filter_map(|e| e.address.parse::<IpAddr>().ok())
                .any(|ip| ip.is_ipv4() != family_of.is_ipv4())
        })
    })
}

/// What a DestinationRule's load balancer asks of a kernel-path service.
#[derive(Default)]
pub(super) struct Balancing {
    /// `consistentHash.maglev.tableSize` (`None`: sized by the backend count).
    pub(super) table_size: Option<u32>,
    /// `consistentHash.useSourceIp`.
    pub(super) hash_source_ip: bool,
    /// Hashing on a header, cookie or query parameter: only the L7 proxy can.
    pub(super) http_hash: Option<HttpHash>,
}

/// The load balancer from the DestinationRule of `host` (or, when `None`, of the first
/// destination that gets traffic).
pub(super) fn balancing(
    index: &Index,
    host: Option<(String, String)>,
    selected: &Selected,
    sources: &mut BTreeSet<String>,
) -> Balancing {
    let (host, ns) = match host {
        Some(found) => found,
        None => {
            let weighted = selected.destinations.len() == 1;
            let Some((_, d, _)) = selected
                .destinations
                .iter()
                .find(|(_, _, w)| weighted || *w > 0)
            else {
                return Balancing::default();
            };
            (d.host.clone(), selected.rule.meta.namespace.clone())
        }
    };
    let Some((rule_resource, rule)) = index.destination_rule(&host, &ns) else {
        return Balancing::default();
    };
    let hash = rule
        .traffic_policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.consistent_hash.as_ref());
    let Some(hash) = hash else {
        return Balancing::default();
    };
    sources.insert(rule_resource.id());
    let field = "spec.trafficPolicy.loadBalancer.consistentHash";
    for (present, key) in [
        (hash.http_header_name.is_some(), "httpHeaderName"),
        (hash.http_cookie.is_some(), "httpCookie"),
        (
            hash.http_query_parameter_name.is_some(),
            "httpQueryParameterName",
        ),
    ] {
        if present {
            let not_http = ValidationError::new(
                rule_resource,
                format!("{field}.{key}"),
                format!("hashing on {key} needs the L7 proxy, which serves HTTP routes and HTTP, HTTP2 or GRPC ports; this service is routed as TCP"),
            );
            let reason = ProxyReason::HttpHash {
                rule: rule_resource.display_name(),
                key,
            };
            return Balancing {
                http_hash: Some(HttpHash { reason, not_http }),
                ..Balancing::default()
            };
        }
    }
    Balancing {
        table_size: hash
            .maglev
            .as_ref()
            .and_then(|m| m.table_size)
            .and_then(|s| u32::try_from(s).ok())
            .filter(|s| *s != 0),
        hash_source_ip: hash.use_source_ip == Some(true),
        http_hash: None,
    }
}
