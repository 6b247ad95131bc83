//! Service addresses, route selection and backend shares: everything between validated
//! resources and a [`ServicePlan`].
//!
//! Per service address the first applicable route decides the path: a TCP route, or an HTTP
//! route with nothing but weighted destinations, is served by the kernel (per connection); an
//! HTTP route that needs to see requests is compiled into an L7 plan by [`super::l7`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::{
    maglev, BackendPlan, L4Plan, L4Protocol, NodeContext, Plan, ServiceAddress, ServicePlan,
};
use crate::{
    config::{
        Destination, HttpRoute, L4MatchAttributes, Resource, ResourceSet, ServiceEntry,
        ServicePort, VirtualService,
    },
    validate::{
        index::{same_host, selects, Index},
        values, ValidationError, ValidationErrors,
    },
};

/// The wording every "this build cannot do it" error ends with (TLS is the one thing the L7
/// proxy does not do yet).
pub(crate) const L7_NEEDED: &str =
    "needs the L7 proxy with TLS support, which this build does not have";

/// The address and port a route is being selected for.
#[derive(Clone, Copy)]
pub(super) struct Listener<'a> {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    /// The Gateways served here (several merged on one port); empty for a ServiceEntry VIP
    /// (the implicit `mesh` gateway).
    pub(super) gateways: &'a [&'a Resource],
}

/// A chosen route: the rule it comes from and its weighted destinations.
struct Selected<'a> {
    rule: &'a Resource,
    destinations: Vec<(String, Destination, i64)>,
    /// Chosen from an HTTP route (or the host's default route): HTTP-only load balancing
    /// (header, cookie, query hashing) may move it to the L7 proxy.
    http: bool,
}

/// A route's destinations with their field paths (`<route>.route[k].destination`) and weights
/// (unset counts as 0, as in Istio).
fn weighted_destinations<'d>(
    route_field: &str,
    destinations: impl Iterator<Item = (&'d Destination, Option<i64>)>,
) -> Vec<(String, Destination, i64)> {
    destinations
        .enumerate()
        .map(|(k, (destination, weight))| {
            (
                format!("{route_field}.route[{k}].destination"),
                destination.clone(),
                weight.unwrap_or(0),
            )
        })
        .collect()
}

/// The path a listener's first applicable route asks for.
enum Choice<'a> {
    /// Weighted destinations the kernel can serve per connection.
    L4(Selected<'a>),
    /// An HTTP route that needs per-request handling: the whole rule goes to the proxy.
    L7,
}

pub(super) type Result<T> = std::result::Result<T, ValidationError>;

pub(super) fn plan_services(
    set: &ResourceSet,
    node: &NodeContext,
) -> std::result::Result<Vec<ServicePlan>, ValidationErrors> {
    let index = Index::new(set);
    let mut errors = ValidationErrors::default();
    let mut plans: Vec<(&Resource, ServicePlan)> = Vec::new();
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
                match vip_service(&index, resource, entry, address) {
                    Ok(plan) => plans.push((resource, plan)),
                    Err(error) => errors.errors.push(error),
                }
            }
        }
    }
    for (port, group) in server_groups(&index) {
        match gateway_services(&index, port, &group, node) {
            Ok(more) => plans.extend(more.into_iter().map(|p| (group[0].0, p))),
            Err(error) => errors.errors.push(error),
        }
    }
    let mut seen: BTreeMap<ServiceAddress, String> = BTreeMap::new();
    for (resource, plan) in &plans {
        if let Some(first) = seen.insert(plan.address, plan.name.clone()) {
            errors.push(
                resource,
                "spec",
                format!(
                    "{} port {} ({:?}) is also served by `{first}`; one address and port can serve one service",
                    plan.address.ip, plan.address.port, plan.address.protocol
                ),
            );
        }
    }
    errors.into_result()?;
    Ok(plans.into_iter().map(|(_, plan)| plan).collect())
}

fn vip_service(
    index: &Index,
    resource: &Resource,
    entry: &ServiceEntry,
    address: ServiceAddress,
) -> Result<ServicePlan> {
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
    let mut selected = None;
    if let Some((vs_resource, vs)) = rule {
        sources.insert(vs_resource.id());
        match select_route(index, vs_resource, vs, listener)? {
            Some(Choice::L7) => {
                return super::l7::vip_plan(
                    index,
                    resource,
                    entry,
                    address,
                    Some((vs_resource, vs)),
                    listener,
                    sources,
                )
            }
            Some(Choice::L4(found)) => selected = Some(found),
            None => {}
        }
    }
    // No rule, or no route for this port: Istio sends traffic to the host's own endpoints.
    let http_port = entry
        .ports
        .iter()
        .find(|p| p.number == i64::from(address.port))
        .is_some_and(|p| is_http_protocol(p.protocol.as_deref()));
    let selected = selected.unwrap_or_else(|| Selected {
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
    });
    let backends = backends(
        index,
        &selected,
        Some(address.port),
        address.ip,
        &mut sources,
    )?;
    // The VIP's own host decides the load balancer; fall back to the first destination's.
    let lb_host = entry
        .hosts
        .iter()
        .find(|h| index.destination_rule(h, ns).is_some())
        .map(|h| (h.clone(), ns.clone()));
    let (table_size, hash_source_ip) = match load_balancer(index, lb_host, &selected, &mut sources)?
    {
        Balancing::Kernel(size, by_source) => (size, by_source),
        Balancing::NeedsHttp(_) if selected.http => {
            let vs = rule;
            return super::l7::vip_plan(index, resource, entry, address, vs, listener, sources);
        }
        Balancing::NeedsHttp(error) => return Err(error),
    };
    Ok(finish(
        address,
        entry.hosts[0].clone(),
        sources,
        backends,
        table_size,
        hash_source_ip,
    ))
}

/// Gateway servers on one port (and bind address), merged across Gateways like Istio does:
/// validation has made sure only HTTP servers with distinct hosts share a port.
type ServerGroup<'a> = Vec<(&'a Resource, &'a crate::config::Server)>;

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
) -> Result<Vec<ServicePlan>> {
    let mut plans = Vec::new();
    let (resource, server) = group[0];
    let i = resource_server_index(resource, server);
    let field = format!("spec.servers[{i}]");
    let protocol = server.port.protocol.to_ascii_uppercase();
    let http_server = matches!(protocol.as_str(), "HTTP" | "HTTP2");
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
        let mut needs_l7 = None;
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
                Some(Choice::L7) => {
                    needs_l7.get_or_insert(vs_resource.id());
                }
                Some(Choice::L4(found)) if selected.is_none() => {
                    sources.insert(vs_resource.id());
                    selected = Some(found);
                }
                Some(Choice::L4(_)) | None => {}
            }
        }
        // Several Gateways on one port are told apart by the Host header: the proxy's job.
        if needs_l7.is_none() && group.len() > 1 && !bound.is_empty() {
            needs_l7 = Some(format!(
                "{} (several Gateways share port {port})",
                bound[0].0.id()
            ));
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
        if let Some(rule) = &needs_l7 {
            if !http_server {
                return Err(ValidationError::new(
                    resource,
                    format!("{field}.port.protocol"),
                    format!("`{rule}` has HTTP routes that need the L7 proxy, which serves gateway servers with protocol HTTP or HTTP2, not {protocol}"),
                ));
            }
            plans.push(super::l7::gateway_plan(
                index, group, address, name, &bound, listener, sources,
            )?);
            continue;
        }
        // A server no rule routes is left to the node's own stack.
        let Some(selected) = selected else { continue };
        let backends = backends(index, &selected, None, ip, &mut sources)?;
        if backends.is_empty() && has_other_family_backends(index, &selected, ip) {
            continue; // e.g. an IPv6 node address in front of IPv4-only backends
        }
        let (table_size, hash_source_ip) =
            match load_balancer(index, None, &selected, &mut sources)? {
                Balancing::Kernel(size, by_source) => (size, by_source),
                Balancing::NeedsHttp(_) if selected.http && http_server => {
                    plans.push(super::l7::gateway_plan(
                        index, group, address, name, &bound, listener, sources,
                    )?);
                    continue;
                }
                Balancing::NeedsHttp(error) => return Err(error),
            };
        plans.push(finish(
            address,
            name,
            sources,
            backends,
            table_size,
            hash_source_ip,
        ));
    }
    Ok(plans)
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

/// "No tableSize in the rules": [`finish`] sizes the table by the number of backends.
const AUTO_TABLE_SIZE: u32 = 0;

fn finish(
    address: ServiceAddress,
    name: String,
    sources: BTreeSet<String>,
    backends: Vec<BackendPlan>,
    table_size: u32,
    hash_source_ip: bool,
) -> ServicePlan {
    let sized_by_default = table_size == AUTO_TABLE_SIZE;
    let table_size = match table_size {
        AUTO_TABLE_SIZE => maglev::default_table_size(backends.len()),
        configured => configured,
    };
    let keys: Vec<String> = backends.iter().map(|b| b.address.to_string()).collect();
    let shares: Vec<f64> = backends.iter().map(|b| b.share).collect();
    let table = if backends.is_empty() {
        Vec::new()
    } else {
        maglev::build_table(&keys, &shares, table_size)
    };
    ServicePlan {
        address,
        name,
        sources: sources.into_iter().collect(),
        plan: Plan::L4(L4Plan {
            backends,
            table,
            hash_source_ip,
            sized_by_default,
        }),
    }
}

/// True when `references` (a rule's or a match's `gateways`) name the Gateway `gateway`.
fn gateway_listed(
    index: &Index,
    references: &[String],
    namespace: &str,
    gateway: &Resource,
) -> bool {
    references.iter().any(|r| {
        r != "mesh"
            && index
                .gateway(r, namespace)
                .is_some_and(|(found, _)| std::ptr::eq(found, gateway))
    })
}

/// Whether match-level `gateways` let a match apply to `listener` (empty: inherit the rule's).
fn match_gateways_apply(
    index: &Index,
    references: &[String],
    namespace: &str,
    listener: Listener,
) -> bool {
    if references.is_empty() {
        return true;
    }
    if listener.gateways.is_empty() {
        return references.iter().any(|r| r == "mesh");
    }
    listener
        .gateways
        .iter()
        .any(|gateway| gateway_listed(index, references, namespace, gateway))
}

/// Whether a match's `port` and `gateways` let it apply to `listener` (the per-connection
/// conditions).
pub(super) fn http_match_applies(
    index: &Index,
    rule: &Resource,
    m: &crate::config::HttpMatchRequest,
    listener: Listener,
) -> bool {
    m.port.is_none_or(|p| p == i64::from(listener.port))
        && match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener)
}

/// Istio port protocols that carry HTTP.
pub(super) fn is_http_protocol(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| {
        matches!(
            p.to_ascii_uppercase().as_str(),
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB"
        )
    })
}

fn l4_match_applies(
    index: &Index,
    rule: &Resource,
    field: &str,
    m: &L4MatchAttributes,
    listener: Listener,
) -> Result<bool> {
    if m.port.is_some_and(|p| p != i64::from(listener.port)) {
        return Ok(false);
    }
    if !match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener) {
        return Ok(false);
    }
    if !m.destination_subnets.is_empty()
        && !m
            .destination_subnets
            .iter()
            .filter_map(|s| values::cidr(s).ok())
            .any(|net| values::in_subnet(listener.ip, net))
    {
        return Ok(false);
    }
    // The kernel path selects a route per service address; conditions on the client need a
    // per-connection classifier it does not have.
    if m.source_subnet.is_some() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceSubnet"),
            "matching on the client subnet is not supported in this build",
        ));
    }
    if !m.source_labels.is_empty() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceLabels"),
            "matching on client workload labels is not supported (mesh has no workload identity)",
        ));
    }
    if m.source_namespace.is_some() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceNamespace"),
            "matching on the client namespace is not supported (mesh has no workload identity)",
        ));
    }
    Ok(true)
}

/// First TCP route that applies; else the first applicable HTTP route: [`Choice::L4`] when it
/// needs nothing but weights, [`Choice::L7`] otherwise; `None` when no route applies.
fn select_route<'a>(
    index: &Index,
    rule: &'a Resource,
    vs: &VirtualService,
    listener: Listener,
) -> Result<Option<Choice<'a>>> {
    if !vs.tls.is_empty() {
        return Err(ValidationError::new(
            rule,
            "spec.tls",
            format!("TLS (SNI) routing {L7_NEEDED}"),
        ));
    }
    for (i, route) in vs.tcp.iter().enumerate() {
        let mut applies = route.matches.is_empty();
        for (j, m) in route.matches.iter().enumerate() {
            if l4_match_applies(
                index,
                rule,
                &format!("spec.tcp[{i}].match[{j}]"),
                m,
                listener,
            )? {
                applies = true;
                break;
            }
        }
        if applies {
            let destinations = weighted_destinations(
                &format!("spec.tcp[{i}]"),
                route.route.iter().map(|d| (&d.destination, d.weight)),
            );
            return Ok(Some(Choice::L4(Selected {
                rule,
                destinations,
                http: false,
            })));
        }
    }
    for (i, route) in vs.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        let applicable: Vec<_> = route
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.port.is_none_or(|p| p == i64::from(listener.port)))
            .filter(|(_, m)| {
                match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener)
            })
            .collect();
        if !route.matches.is_empty() && applicable.is_empty() {
            continue;
        }
        if applicable
            .iter()
            .any(|(_, m)| m.first_l7_condition().is_some())
            || l7_feature(route).is_some()
        {
            return Ok(Some(Choice::L7));
        }
        let destinations = weighted_destinations(
            &field,
            route.route.iter().map(|d| (&d.destination, d.weight)),
        );
        return Ok(Some(Choice::L4(Selected {
            rule,
            destinations,
            http: true,
        })));
    }
    Ok(None)
}

/// Names the first thing an HTTP route asks for beyond weighted forwarding, or `None`.
pub(super) fn l7_feature(route: &HttpRoute) -> Option<&'static str> {
    let features = [
        (route.redirect.is_some(), "redirect"),
        (route.direct_response.is_some(), "directResponse"),
        (route.delegate.is_some(), "delegate"),
        (route.rewrite.is_some(), "rewrite"),
        // Per-request deadlines and retries cannot be enforced per connection; ignoring them
        // would silently change behaviour.
        (route.timeout.is_some(), "timeout"),
        (route.retries.is_some(), "retries"),
        (route.fault.is_some(), "fault"),
        (route.mirror.is_some(), "mirror"),
        (!route.mirrors.is_empty(), "mirrors"),
        (route.mirror_percentage.is_some(), "mirrorPercentage"),
        (route.mirror_percent.is_some(), "mirrorPercent"),
        (route.cors_policy.is_some(), "corsPolicy"),
        (route.headers.is_some(), "headers"),
    ];
    if let Some((_, name)) = features.iter().find(|(present, _)| *present) {
        return Some(name);
    }
    route
        .route
        .iter()
        .any(|d| d.headers.is_some())
        .then_some("route.headers")
}

/// The destination host's port a route uses: the one named, else the service's own port when
/// the host has it, else the host's only port.
pub(super) fn resolve_port<'e>(
    entry: &'e ServiceEntry,
    destination: &Destination,
    service_port: Option<u16>,
) -> std::result::Result<&'e ServicePort, String> {
    let list = || {
        entry
            .ports
            .iter()
            .map(|p| p.number.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
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

/// Backends of a selected route for a listener address: share = route weight share x endpoint
/// weight share; endpoints of the other address family are left out (no NAT46).
fn backends(
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
            let target = port
                .name
                .as_ref()
                .and_then(|name| endpoint.ports.get(name).copied())
                .or(port.target_port)
                .unwrap_or(port.number);
            let target = values::port(target)
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
fn has_other_family_backends(index: &Index, selected: &Selected, family_of: IpAddr) -> bool {
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

/// What a DestinationRule's load balancer asks of the path.
enum Balancing {
    /// Maglev table size and source-IP hashing: the kernel can do it.
    Kernel(u32, bool),
    /// Hashing on a header, cookie or query parameter: only the L7 proxy can (the error says
    /// why when the route cannot go there).
    NeedsHttp(ValidationError),
}

/// Maglev table size and source-IP hashing from the DestinationRule of `host` (or, when `None`,
/// of the first destination that gets traffic).
fn load_balancer(
    index: &Index,
    host: Option<(String, String)>,
    selected: &Selected,
    sources: &mut BTreeSet<String>,
) -> Result<Balancing> {
    let (host, ns) = match host {
        Some(found) => found,
        None => {
            let weighted = selected.destinations.len() == 1;
            let Some((_, d, _)) = selected
                .destinations
                .iter()
                .find(|(_, _, w)| weighted || *w > 0)
            else {
                return Ok(Balancing::Kernel(AUTO_TABLE_SIZE, false));
            };
            (d.host.clone(), selected.rule.meta.namespace.clone())
        }
    };
    let Some((rule_resource, rule)) = index.destination_rule(&host, &ns) else {
        return Ok(Balancing::Kernel(AUTO_TABLE_SIZE, false));
    };
    let hash = rule
        .traffic_policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.consistent_hash.as_ref());
    let Some(hash) = hash else {
        return Ok(Balancing::Kernel(AUTO_TABLE_SIZE, false));
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
            return Ok(Balancing::NeedsHttp(ValidationError::new(
                rule_resource,
                format!("{field}.{key}"),
                format!("hashing on {key} needs the L7 proxy, which serves HTTP routes and HTTP, HTTP2 or GRPC ports; this service is routed as TCP"),
            )));
        }
    }
    let size = hash
        .maglev
        .as_ref()
        .and_then(|m| m.table_size)
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(AUTO_TABLE_SIZE);
    Ok(Balancing::Kernel(size, hash.use_source_ip == Some(true)))
}
