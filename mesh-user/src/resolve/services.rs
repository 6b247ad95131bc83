//! Service addresses and what serves each: ServiceEntry VIPs x ports, and Gateway servers
//! (merged by port like Istio's) x node addresses. For each address the applicable route is
//! selected ([`super::select`]), the path decided ([`super::path::decide`]), and the
//! destinations resolved to backends ([`super::backends`]) or to the proxy's route table
//! ([`super::l7`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    backends::{backends, balancing, has_other_family_backends},
    index::{same_host, Index},
    l7,
    path::{self, decide, KernelReason, NonHttpServer, Path, PathInputs, ProxyReason},
    select::{gateway_listed, select_route, Choice, Listener, Result, Selected, L7_NEEDED},
    KernelService, NodeContext, ResolvedService, Serving,
};
use crate::{
    compile::{L4Protocol, ServiceAddress},
    config::{Destination, Resource, ServiceEntry},
    validate::{values, ValidationError, ValidationErrors},
};

/// Every service address of the rules, resolved; all errors found (an address served twice,
/// a route the node cannot serve).
pub(super) fn resolve_services(
    index: &Index,
    node: &NodeContext,
) -> std::result::Result<Vec<ResolvedService>, ValidationErrors> {
    let mut errors = ValidationErrors::default();
    let mut services: Vec<(&Resource, ResolvedService)> = Vec::new();
    for (resource, entry) in &index.service_entries {
        for vip in entry.addresses.iter().filter_map(|a| values::vip(a).ok()) {
            for port in &entry.ports {
                let (Ok(number), Ok(protocol)) = (
                    values::port(port.number),
                    values::protocol(port.protocol.as_deref()),
                ) else {
                    continue; // validated already
                };
                let address = ServiceAddress {
                    ip: vip,
                    port: number,
                    protocol,
                };
                match vip_service(index, resource, entry, address) {
                    Ok(service) => services.push((resource, service)),
                    Err(error) => errors.errors.push(error),
                }
            }
        }
    }
    for (port, group) in server_groups(index) {
        match gateway_services(index, port, &group, node) {
            Ok(more) => services.extend(more.into_iter().map(|s| (group[0].0, s))),
            Err(error) => errors.errors.push(error),
        }
    }
    let mut seen: BTreeMap<ServiceAddress, String> = BTreeMap::new();
    for (resource, service) in &services {
        if let Some(first) = seen.insert(service.address, service.name.clone()) {
            errors.push(
                resource,
                "spec",
                format!(
                    "{} port {} ({:?}) is also served by `{first}`; one address and port can serve one service",
                    service.address.ip, service.address.port, service.address.protocol
                ),
            );
        }
    }
    errors.into_result()?;
    Ok(services.into_iter().map(|(_, s)| s).collect())
}

fn vip_service(
    index: &Index,
    resource: &Resource,
    entry: &ServiceEntry,
    address: ServiceAddress,
) -> Result<ResolvedService> {
    let ns = &resource.meta.namespace;
    let mut sources = BTreeSet::from([resource.id()]);
    let listener = Listener {
        ip: address.ip,
        port: address.port,
        gateways: &[],
    };
    let rule = index
        .virtual_services_for(&entry.hosts, ns)
        .into_iter()
        .find(|(vs_resource, vs)| {
            vs.applies_to_mesh()
                && vs.hosts.iter().any(|h| {
                    entry
                        .hosts
                        .iter()
                        .any(|own| same_host(h, &vs_resource.meta.namespace, own, ns))
                })
        });
    let mut choice = None;
    if let Some((vs_resource, vs)) = rule {
        sources.insert(vs_resource.id());
        choice = select_route(index, vs_resource, vs, listener)?;
    }
    // No rule, or no route for this port: Istio sends traffic to the host's own endpoints.
    let http_port = entry
        .ports
        .iter()
        .find(|p| p.number == i64::from(address.port))
        .is_some_and(|p| path::is_http_protocol(p.protocol.as_deref()));
    let (selected, route) = match choice {
        Some(Choice::Proxy(why)) => (None, Path::Proxy(why)),
        Some(Choice::Kernel(selected, why)) => (Some(selected), Path::Kernel(why)),
        None => {
            let default = Selected {
                http: http_port,
                rule: resource,
                destinations: vec![(
                    "spec.hosts[0]".into(),
                    Destination {
                        host: entry.hosts[0].clone(),
                        subset: None,
                        port: None,
                    },
                    1,
                )],
            };
            (Some(default), Path::Kernel(KernelReason::NoRoute))
        }
    };
    // The VIP's own host decides the load balancer; fall back to the first destination's.
    let lb_host = entry
        .hosts
        .iter()
        .find(|h| index.destination_rule(h, ns).is_some())
        .map(|h| (h.clone(), ns.clone()));
    let lb = match &selected {
        Some(selected) => balancing(index, lb_host, selected, &mut sources),
        None => Default::default(),
    };
    let path = decide(PathInputs {
        route,
        http_route: selected.as_ref().is_some_and(|s| s.http),
        http_hash: lb.http_hash,
        non_http_server: None,
    })?;
    let serving = match (&path, selected) {
        (Path::Kernel(_), Some(selected)) => Serving::Kernel(KernelService {
            backends: backends(
                index,
                &selected,
                Some(address.port),
                address.ip,
                &mut sources,
            )?,
            table_size: lb.table_size,
            hash_source_ip: lb.hash_source_ip,
        }),
        _ => Serving::Proxy(l7::vip_plan(
            index,
            resource,
            entry,
            rule,
            listener,
            &mut sources,
        )?),
    };
    Ok(ResolvedService {
        address,
        name: entry.hosts[0].clone(),
        sources: sources.into_iter().collect(),
        path,
        serving,
    })
}

/// Gateway servers on one port (and bind address), merged across Gateways like Istio does:
/// validation has made sure only HTTP servers with distinct hosts share a port.
pub(super) type ServerGroup<'a> = Vec<(&'a Resource, &'a crate::config::Server)>;

fn server_groups<'a>(index: &Index<'a>) -> Vec<(u16, ServerGroup<'a>)> {
    let mut groups: BTreeMap<(u16, Option<&str>), ServerGroup<'a>> = BTreeMap::new();
    for (resource, gateway) in &index.gateways {
        for server in &gateway.servers {
            let Ok(port) = values::port(server.port.number) else {
                continue;
            };
            groups
                .entry((port, server.bind.as_deref()))
                .or_default()
                .push((*resource, server));
        }
    }
    groups
        .into_iter()
        .map(|((port, _), group)| (port, group))
        .collect()
}

fn gateway_services(
    index: &Index,
    port: u16,
    group: &[(&Resource, &crate::config::Server)],
    node: &NodeContext,
) -> Result<Vec<ResolvedService>> {
    let mut services = Vec::new();
    let (resource, server) = group[0];
    let i = resource_server_index(resource, server);
    let field = format!("spec.servers[{i}]");
    let protocol = server.port.protocol.to_ascii_uppercase();
    let http_server = path::http_server_protocol(&protocol);
    for (resource, server) in group {
        let i = resource_server_index(resource, server);
        let field = format!("spec.servers[{i}]");
        let protocol = server.port.protocol.to_ascii_uppercase();
        if !matches!(protocol.as_str(), "TCP" | "HTTP" | "HTTP2") {
            return Err(ValidationError::new(
                resource,
                format!("{field}.port.protocol"),
                format!("a {protocol} gateway server {L7_NEEDED} (TCP, HTTP and HTTP2 are served per connection)"),
            ));
        }
        if server.tls.is_some() {
            return Err(ValidationError::new(
                resource,
                format!("{field}.tls"),
                format!("TLS on a gateway server {L7_NEEDED}"),
            ));
        }
    }
    let gateways: Vec<&Resource> = group.iter().map(|(r, _)| *r).collect();
    let bind: Option<IpAddr> = server.bind.as_deref().and_then(|b| b.parse().ok());
    for ip in node
        .node_addresses
        .iter()
        .copied()
        .filter(|ip| bind.is_none_or(|b| b == *ip))
    {
        let listener = Listener {
            ip,
            port,
            gateways: &gateways,
        };
        let mut sources: BTreeSet<String> = gateways.iter().map(|g| g.id()).collect();
        let mut selected = None;
        let mut needs_proxy = None;
        let mut bound = Vec::new();
        for (vs_resource, vs) in &index.virtual_services {
            if !gateways
                .iter()
                .any(|g| gateway_listed(index, &vs.gateways, &vs_resource.meta.namespace, g))
            {
                continue;
            }
            bound.push((*vs_resource, *vs));
            match select_route(index, vs_resource, vs, listener)? {
                Some(Choice::Proxy(why)) => {
                    needs_proxy.get_or_insert(why);
                }
                Some(Choice::Kernel(found, why)) if selected.is_none() => {
                    sources.insert(vs_resource.id());
                    selected = Some((found, why));
                }
                Some(Choice::Kernel(..)) | None => {}
            }
        }
        // Several Gateways on one port are told apart by the Host header: the proxy's job.
        if needs_proxy.is_none() && group.len() > 1 && !bound.is_empty() {
            needs_proxy = Some(ProxyReason::SharedGatewayPort { port });
        }
        let address = ServiceAddress {
            ip,
            port,
            protocol: L4Protocol::Tcp,
        };
        let name = format!(
            "gateway/{}/{}:{port}",
            resource.meta.namespace, resource.meta.name
        );
        let (route, selected) = match (needs_proxy, selected) {
            (Some(why), _) => (Path::Proxy(why), None),
            (None, Some((selected, why))) => (Path::Kernel(why), Some(selected)),
            // A server no rule routes is left to the node's own stack.
            (None, None) => continue,
        };
        let lb = match &selected {
            Some(selected) => balancing(index, None, selected, &mut sources),
            None => Default::default(),
        };
        let path = decide(PathInputs {
            route,
            http_route: selected.as_ref().is_some_and(|s| s.http),
            http_hash: lb.http_hash,
            non_http_server: (!http_server).then(|| NonHttpServer {
                resource,
                field: field.clone(),
                protocol: protocol.clone(),
            }),
        })?;
        let serving = match (&path, selected) {
            (Path::Kernel(_), Some(selected)) => {
                let backends = backends(index, &selected, None, ip, &mut sources)?;
                if backends.is_empty() && has_other_family_backends(index, &selected, ip) {
                    continue; // e.g. an IPv6 node address in front of IPv4-only backends
                }
                Serving::Kernel(KernelService {
                    backends,
                    table_size: lb.table_size,
                    hash_source_ip: lb.hash_source_ip,
                })
            }
            _ => Serving::Proxy(l7::gateway_plan(
                index,
                group,
                &bound,
                listener,
                &mut sources,
            )?),
        };
        services.push(ResolvedService {
            address,
            name,
            sources: sources.into_iter().collect(),
            path,
            serving,
        });
    }
    Ok(services)
}

/// Position of `server` among its Gateway's servers (for field paths).
fn resource_server_index(resource: &Resource, server: &crate::config::Server) -> usize {
    match &resource.kind {
        crate::config::ResourceKind::Gateway(gateway) => gateway
            .servers
            .iter()
            .position(|s| std::ptr::eq(s, server))
            .unwrap_or(0),
        _ => 0,
    }
}
