//! HTTP routes that need the L7 proxy, compiled into an [`L7Plan`]: matches, actions,
//! per-route policies, and one upstream cluster per destination (host, subset, port) with its
//! backends and DestinationRule traffic policy.
//!
//! When a rule lands here (see [`super::path`]): the first HTTP route that applies to the
//! address has a condition beyond `port`/`gateways`, or any of redirect, directResponse,
//! rewrite, timeout, retries, fault, mirror(s), headers, corsPolicy; or the destination's
//! DestinationRule hashes on a header, cookie or query parameter. `loadBalancer.simple`,
//! `connectionPool` and `outlierDetection` never move a service to the proxy on their own (the
//! kernel path balances with weighted Maglev and has no per-request state); once a service is
//! served by the proxy, they are all honoured there.

mod policy;
mod route;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use super::{
    backends::{resolve_port, target_port},
    index::{fqdn, selects, Index},
    select::{http_match_applies, Listener, Result},
};
use crate::{
    compile::{
        ClusterPlan, HeaderOpsPlan, HttpRoutePlan, L7BackendPlan, L7Plan, RetryPlan,
        RouteActionPlan, TrafficPolicyPlan, VirtualHostPlan, WeightedClusterPlan,
    },
    config::{Destination, Resource, Server, ServiceEntry, VirtualService},
    validate::ValidationError,
};
/// HTTP routes, or a default route to the host's own endpoints when no rule routes this port.
pub(super) fn vip_plan(
    index: &Index,
    entry_resource: &Resource,
    entry: &ServiceEntry,
    rule: Option<(&Resource, &VirtualService)>,
    listener: Listener,
    sources: &mut BTreeSet<String>,
) -> Result<L7Plan> {
    let mut builder = Builder::new(index, listener.ip, Some(listener.port));
    let mut routes = match rule {
        Some((vs_resource, vs)) => builder.routes(vs_resource, vs, listener)?,
        None => Vec::new(),
    };
    if routes.is_empty() {
        let destination = Destination {
            host: entry.hosts[0].clone(),
            subset: None,
            port: None,
        };
        let cluster = builder.cluster(entry_resource, "spec.hosts[0]", &destination)?;
        routes.push(default_route(
            format!("{}.default", entry.hosts[0]),
            cluster,
        ));
    }
    sources.extend(builder.sources.iter().cloned());
    let declared_protocol = entry
        .ports
        .iter()
        .find(|p| p.number == i64::from(listener.port))
        .and_then(|p| p.protocol.clone())
        .unwrap_or_else(|| "TCP".into());
    Ok(L7Plan {
        virtual_hosts: vec![VirtualHostPlan {
            domains: vec!["*".into()],
            routes,
        }],
        clusters: builder.clusters,
        declared_protocol,
    })
}

/// The L7 plan of HTTP Gateway servers sharing one port on one node address (several
/// Gateways merge by host, as in Istio): one virtual host per bound VirtualService, matched by
/// the Host header against the rule's hosts (`*` stands for the hosts of the servers of the
/// Gateways the rule is bound to).
pub(super) fn gateway_plan(
    index: &Index,
    group: &[(&Resource, &Server)],
    bound: &[(&Resource, &VirtualService)],
    listener: Listener,
    sources: &mut BTreeSet<String>,
) -> Result<L7Plan> {
    let mut builder = Builder::new(index, listener.ip, None);
    let mut virtual_hosts = Vec::new();
    for (vs_resource, vs) in bound {
        let routes = builder.routes(vs_resource, vs, listener)?;
        if routes.is_empty() {
            continue;
        }
        sources.insert(vs_resource.id());
        let server_hosts: Vec<String> = group
            .iter()
            .filter(|(gateway, _)| {
                vs.gateways.iter().any(|r| {
                    index
                        .gateway(r, &vs_resource.meta.namespace)
                        .is_some_and(|(found, _)| std::ptr::eq(found, *gateway))
                })
            })
            .flat_map(|(_, server)| server.hosts.iter())
            .map(|h| {
                h.split_once('/')
                    .map_or(h.as_str(), |(_, host)| host)
                    .to_string()
            })
            .collect();
        let mut domains: Vec<String> = vs
            .hosts
            .iter()
            .flat_map(|h| {
                if h == "*" {
                    server_hosts.clone()
                } else {
                    vec![h.clone()]
                }
            })
            .collect();
        domains.dedup();
        virtual_hosts.push(VirtualHostPlan { domains, routes });
    }
    sources.extend(builder.sources.iter().cloned());
    Ok(L7Plan {
        virtual_hosts,
        clusters: builder.clusters,
        declared_protocol: group[0].1.port.protocol.to_ascii_uppercase(),
    })
}

fn default_route(name: String, cluster: usize) -> HttpRoutePlan {
    HttpRoutePlan {
        name,
        matches: Vec::new(),
        action: RouteActionPlan::Forward {
            destinations: vec![WeightedClusterPlan {
                cluster,
                weight: 1,
                headers: HeaderOpsPlan::default(),
            }],
        },
        rewrite: None,
        timeout: None,
        retries: RetryPlan::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        headers: HeaderOpsPlan::default(),
        cors: None,
    }
}

/// Collects clusters (deduplicated by host, subset and port) while routes are compiled.
struct Builder<'i, 'a> {
    index: &'i Index<'a>,
    /// Backends of the other address family are left out (no NAT46).
    family_of: IpAddr,
    /// The service port (a VIP's port; `None` for a Gateway, whose port is not the host's).
    service_port: Option<u16>,
    clusters: Vec<ClusterPlan>,
    cluster_ids: HashMap<(String, Option<String>, u16), usize>,
    sources: BTreeSet<String>,
}

fn error(rule: &Resource, field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::new(rule, field, message)
}

impl<'i, 'a> Builder<'i, 'a> {
    fn new(index: &'i Index<'a>, family_of: IpAddr, service_port: Option<u16>) -> Self {
        Self {
            index,
            family_of,
            service_port,
            clusters: Vec::new(),
            cluster_ids: HashMap::new(),
            sources: BTreeSet::new(),
        }
    }

    /// The rule's HTTP routes that can apply to `listener`, with only the matches that can.
    fn routes(
        &mut self,
        rule: &Resource,
        vs: &VirtualService,
        listener: Listener,
    ) -> Result<Vec<HttpRoutePlan>> {
        let mut out = Vec::new();
        for (i, route) in vs.http.iter().enumerate() {
            let field = format!("spec.http[{i}]");
            let applicable: Vec<(usize, &crate::config::HttpMatchRequest)> = route
                .matches
                .iter()
                .enumerate()
                .filter(|(_, m)| http_match_applies(self.index, rule, m, listener))
                .collect();
            if !route.matches.is_empty() && applicable.is_empty() {
                continue;
            }
            let name = route
                .name
                .clone()
                .unwrap_or_else(|| format!("{}.http[{i}]", rule.meta.name));
            let mut matches = Vec::new();
            for (j, m) in applicable {
                matches.push(policy::request_match(
                    rule,
                    &format!("{field}.match[{j}]"),
                    m,
                )?);
            }
            out.push(self.route(rule, &field, name, matches, route)?);
        }
        Ok(out)
    }

    /// A cluster for a destination that resolves to nothing (yet): the proxy answers 503.
    fn empty_cluster(&mut self, destination: &Destination, port: u16) -> usize {
        let ns_free_key = (
            format!("unresolved:{}", destination.host),
            destination.subset.clone(),
            port,
        );
        if let Some(id) = self.cluster_ids.get(&ns_free_key) {
            return *id;
        }
        self.clusters.push(ClusterPlan {
            name: format!(
                "{}|{}|{}",
                destination.host,
                destination.subset.as_deref().unwrap_or(""),
                port
            ),
            host: destination.host.clone(),
            subset: destination.subset.clone(),
            port,
            http2: false,
            backends: Vec::new(),
            policy: TrafficPolicyPlan::default(),
        });
        let id = self.clusters.len() - 1;
        self.cluster_ids.insert(ns_free_key, id);
        id
    }

    /// The cluster of a destination, created on first use.
    fn cluster(
        &mut self,
        rule: &Resource,
        field: &str,
        destination: &Destination,
    ) -> Result<usize> {
        let ns = &rule.meta.namespace;
        let Some((entry_resource, entry)) = self.index.service_entry(&destination.host, ns) else {
            // Not defined (yet): validation warned; a cluster without backends answers 503.
            let port = destination
                .port
                .as_ref()
                .and_then(|p| u16::try_from(p.number).ok())
                .or(self.service_port)
                .unwrap_or(0);
            return Ok(self.empty_cluster(destination, port));
        };
        self.sources.insert(entry_resource.id());
        let port = resolve_port(entry, destination, self.service_port)
            .map_err(|message| error(rule, format!("{field}.port"), message))?;
        let port_number = crate::validate::values::port(port.number)
            .map_err(|m| error(entry_resource, "spec.ports", m))?;
        let key = (
            fqdn(&destination.host, ns),
            destination.subset.clone(),
            port_number,
        );
        if let Some(id) = self.cluster_ids.get(&key) {
            return Ok(*id);
        }
        let dr = self.index.destination_rule(&destination.host, ns);
        let mut selector = std::collections::BTreeMap::new();
        let mut subset_policy = None;
        if let Some(subset) = &destination.subset {
            let found = dr.and_then(|(dr_resource, dr)| {
                dr.subsets
                    .iter()
                    .find(|s| &s.name == subset)
                    .map(|s| (dr_resource, s))
            });
            let Some((_, found)) = found else {
                // Not defined (yet): validation warned; no backend, so 503 until it is.
                return Ok(self.empty_cluster(destination, port_number));
            };
            selector = found.labels.clone();
            subset_policy = found.traffic_policy.as_ref();
        }
        let policy = match dr {
            Some((dr_resource, dr)) => {
                self.sources.insert(dr_resource.id());
                policy::traffic_policy(
                    dr_resource,
                    dr.traffic_policy.as_ref(),
                    subset_policy,
                    port_number,
                )?
            }
            None => TrafficPolicyPlan::default(),
        };
        let mut backends = Vec::new();
        for endpoint in entry
            .endpoints
            .iter()
            .filter(|e| selects(&selector, &e.labels))
        {
            let Ok(ip) = endpoint.address.parse::<IpAddr>() else {
                continue;
            };
            if ip.is_ipv4() != self.family_of.is_ipv4() {
                continue;
            }
            let weight = u32::try_from(endpoint.effective_weight().max(0)).unwrap_or(0);
            if weight == 0 {
                continue;
            }
            let target = target_port(port, endpoint)
                .map_err(|m| error(entry_resource, "spec.endpoints", m))?;
            backends.push(L7BackendPlan {
                address: SocketAddr::new(ip, target),
                weight,
                labels: endpoint.labels.clone(),
            });
        }
        backends.sort_by_key(|b| b.address);
        let name = format!(
            "{}|{}|{}",
            destination.host,
            destination.subset.as_deref().unwrap_or(""),
            port_number
        );
        self.clusters.push(ClusterPlan {
            name,
            host: destination.host.clone(),
            subset: destination.subset.clone(),
            port: port_number,
            http2: port
                .protocol
                .as_deref()
                .is_some_and(|p| matches!(p.to_ascii_uppercase().as_str(), "HTTP2" | "GRPC")),
            backends,
            policy,
        });
        let id = self.clusters.len() - 1;
        self.cluster_ids.insert(key, id);
        Ok(id)
    }
}
