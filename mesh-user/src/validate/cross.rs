//! Cross-resource checks: references resolve (hosts, subsets, ports, gateways) and resources do
//! not claim the same thing twice (names, hosts, addresses, gateway ports).
//!
//! Errors are reported on the resource that comes later in source order, since that is usually
//! the one being added.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    net::IpAddr,
};

use super::{values, ValidationErrors};
use crate::{
    config::{Resource, ResourceSet, ServiceEntry},
    resolve::{
        backends::port_list,
        index::{self, dangling_host, fqdn, same_host, Index},
    },
};

pub(super) fn check(set: &ResourceSet, errors: &mut ValidationErrors) {
    duplicates(set, errors);
    let index = Index::new(set);
    service_entries(&index, errors);
    destination_rules(&index, errors);
    virtual_services(&index, errors);
    gateways(&index, errors);
}

fn first_seen(resource: &Resource) -> String {
    format!(
        "{} ({}: document {})",
        resource.display_name(),
        resource.source.file,
        resource.source.document
    )
}

fn duplicates(set: &ResourceSet, errors: &mut ValidationErrors) {
    let mut seen: BTreeMap<(&str, &str, &str), &Resource> = BTreeMap::new();
    for resource in &set.resources {
        match seen.entry(resource.key()) {
            Entry::Vacant(slot) => {
                slot.insert(resource);
            }
            Entry::Occupied(first) => errors.push(
                resource,
                "metadata.name",
                format!(
                    "duplicate resource: {} is already defined",
                    first_seen(first.get())
                ),
            ),
        }
    }
}

fn vips_of(entry: &ServiceEntry) -> Vec<IpAddr> {
    entry
        .addresses
        .iter()
        .filter_map(|a| values::vip(a).ok())
        .collect()
}

fn service_entries(index: &Index, errors: &mut ValidationErrors) {
    let mut hosts: BTreeMap<String, &Resource> = BTreeMap::new();
    let mut claims: BTreeMap<(IpAddr, u16), (&Resource, usize)> = BTreeMap::new();
    for (resource, entry) in &index.service_entries {
        for (i, host) in entry.hosts.iter().enumerate() {
            match hosts.entry(fqdn(host, &resource.meta.namespace)) {
                Entry::Vacant(slot) => {
                    slot.insert(resource);
                }
                Entry::Occupied(first) if !std::ptr::eq(*first.get(), *resource) => errors.push(
                    resource,
                    format!("spec.hosts[{i}]"),
                    format!(
                        "host `{host}` is already defined by {}",
                        first_seen(first.get())
                    ),
                ),
                Entry::Occupied(_) => errors.push(
                    resource,
                    format!("spec.hosts[{i}]"),
                    format!("host `{host}` is listed twice"),
                ),
            }
        }
        for (a, address) in entry.addresses.iter().enumerate() {
            let Ok(ip) = values::vip(address) else {
                continue;
            };
            for port in &entry.ports {
                let Ok(number) = values::port(port.number) else {
                    continue;
                };
                match claims.entry((ip, number)) {
                    Entry::Vacant(slot) => {
                        slot.insert((resource, a));
                    }
                    Entry::Occupied(first) => {
                        let (owner, first_a) = *first.get();
                        let by = if std::ptr::eq(owner, *resource) {
                            format!("spec.addresses[{first_a}] of this ServiceEntry")
                        } else {
                            first_seen(owner)
                        };
                        errors.push(
                            resource,
                            format!("spec.addresses[{a}]"),
                            format!("address {ip} port {number} is already claimed by {by}"),
                        );
                    }
                }
            }
        }
    }
}

fn destination_rules(index: &Index, errors: &mut ValidationErrors) {
    let mut rules: BTreeMap<String, &Resource> = BTreeMap::new();
    for (resource, rule) in &index.destination_rules {
        if rule.host.is_empty() || rule.host.contains('*') {
            continue;
        }
        let ns = &resource.meta.namespace;
        match rules.entry(fqdn(&rule.host, ns)) {
            Entry::Vacant(slot) => {
                slot.insert(resource);
            }
            Entry::Occupied(first) => errors.push(
                resource,
                "spec.host",
                format!(
                    "host `{}` already has {}; merge the subsets into one DestinationRule",
                    rule.host,
                    first_seen(first.get())
                ),
            ),
        }
        let Some((_, entry)) = index.service_entry(&rule.host, ns) else {
            errors.warn(resource, "spec.host", dangling_host(&rule.host, ns));
            continue;
        };
        for (i, subset) in rule.subsets.iter().enumerate() {
            if !entry
                .endpoints
                .iter()
                .any(|e| index::selects(&subset.labels, &e.labels))
            {
                errors.warn(
                    resource,
                    format!("spec.subsets[{i}].labels"),
                    format!(
                        "subset `{}` selects no endpoint of host `{}` yet (no endpoint has all of {}); traffic routed to it is refused until one does",
                        subset.name,
                        rule.host,
                        label_list(&subset.labels)
                    ),
                );
            }
        }
    }
}

fn label_list(labels: &BTreeMap<String, String>) -> String {
    let list: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("[{}]", list.join(", "))
}

fn virtual_services(index: &Index, errors: &mut ValidationErrors) {
    let mut mesh_hosts: BTreeMap<String, &Resource> = BTreeMap::new();
    for (resource, spec) in &index.virtual_services {
        let ns = &resource.meta.namespace;
        let gateway_bound = spec.gateways.iter().any(|g| g != "mesh");
        // Gateway references, at rule and match level.
        let mut references: Vec<(String, &String)> = spec
            .gateways
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("spec.gateways[{i}]"), g))
            .collect();
        for (i, route) in spec.http.iter().enumerate() {
            for (j, m) in route.matches.iter().enumerate() {
                for (k, g) in m.gateways.iter().enumerate() {
                    references.push((format!("spec.http[{i}].match[{j}].gateways[{k}]"), g));
                }
            }
        }
        for (i, route) in spec.tcp.iter().enumerate() {
            for (j, m) in route.matches.iter().enumerate() {
                for (k, g) in m.gateways.iter().enumerate() {
                    references.push((format!("spec.tcp[{i}].match[{j}].gateways[{k}]"), g));
                }
            }
        }
        for (field, reference) in references {
            if reference != "mesh" && index.gateway(reference, ns).is_none() {
                let (gns, name) = index::gateway_ref(reference, ns);
                errors.warn(
                    resource,
                    field,
                    format!("Gateway {gns}/{name} is not defined (yet); the rule is bound to it when it is (use `mesh` for sidecar traffic)"),
                );
            }
        }
        // Hosts: one mesh-bound rule per host, and the host must exist to ever apply.
        let mut vips = Vec::new();
        if spec.applies_to_mesh() {
            for (i, host) in spec.hosts.iter().enumerate() {
                if host.contains('*') {
                    continue;
                }
                match mesh_hosts.entry(fqdn(host, ns)) {
                    Entry::Vacant(slot) => {
                        slot.insert(resource);
                    }
                    Entry::Occupied(first) => errors.push(
                        resource,
                        format!("spec.hosts[{i}]"),
                        format!(
                            "host `{host}` already has {}; only one VirtualService per host is supported for mesh traffic",
                            first_seen(first.get())
                        ),
                    ),
                }
                match index.service_entry(host, ns) {
                    Some((_, entry)) if entry.addresses.is_empty() && !gateway_bound => errors.warn(
                        resource,
                        format!("spec.hosts[{i}]"),
                        format!(
                            "host `{host}` has no address clients could use (its ServiceEntry has no `addresses`): this rule serves nothing until it has one or is bound to a Gateway"
                        ),
                    ),
                    Some((_, entry)) => vips.extend(vips_of(entry)),
                    None => errors.warn(resource, format!("spec.hosts[{i}]"), dangling_host(host, ns)),
                }
            }
        }
        for (field, destination) in index::destinations(spec) {
            let host = &destination.host;
            if host.is_empty() || host.contains('*') {
                continue; // reported by the per-resource checks
            }
            let Some((_, entry)) = index.service_entry(host, ns) else {
                errors.warn(resource, format!("{field}.host"), dangling_host(host, ns));
                continue;
            };
            let mut selector = BTreeMap::new();
            if let Some(subset) = &destination.subset {
                match index.destination_rule(host, ns) {
                    None => errors.warn(
                        resource,
                        format!("{field}.subset"),
                        format!("subset `{subset}` is not defined (yet): no DestinationRule for host `{host}`; traffic routed to it is refused until it is"),
                    ),
                    Some((rule_resource, rule)) => match rule.subsets.iter().find(|s| &s.name == subset) {
                        Some(found) => selector = found.labels.clone(),
                        None => errors.warn(
                            resource,
                            format!("{field}.subset"),
                            format!(
                                "subset `{subset}` is not defined (yet) in {} (it has: {}); traffic routed to it is refused until it is",
                                rule_resource.display_name(),
                                rule.subsets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        ),
                    },
                }
            }
            match &destination.port {
                Some(port)
                    if values::port(port.number).is_ok()
                        && !entry.ports.iter().any(|p| p.number == port.number) =>
                {
                    errors.push(
                        resource,
                        format!("{field}.port.number"),
                        format!(
                            "host `{host}` has no port {} (it has: {})",
                            port.number,
                            port_list(entry)
                        ),
                    );
                }
                Some(_) => {}
                None if entry.ports.len() > 1 => {
                    let same_as_rule_host = spec.hosts.iter().any(|h| same_host(h, ns, host, ns));
                    if gateway_bound || !same_as_rule_host {
                        errors.push(
                            resource,
                            format!("{field}.port"),
                            format!(
                                "host `{host}` has several ports ({}); say which with port.number",
                                port_list(entry)
                            ),
                        );
                    }
                }
                None => {}
            }
            // A VIP only reaches endpoints of its own family: the XDP path rewrites addresses
            // within one family and never translates between IPv4 and IPv6.
            for endpoint in entry
                .endpoints
                .iter()
                .filter(|e| index::selects(&selector, &e.labels))
            {
                let Ok(ip) = endpoint.address.parse::<IpAddr>() else {
                    continue;
                };
                if let Some(vip) = vips.iter().find(|vip| vip.is_ipv4() != ip.is_ipv4()) {
                    errors.push(
                        resource,
                        format!("{field}.host"),
                        format!(
                            "{} endpoint {ip} of `{host}` cannot serve the {} VIP {vip} of this rule's host (no NAT46/NAT64)",
                            values::family(ip),
                            values::family(*vip)
                        ),
                    );
                    break;
                }
            }
        }
    }
}

/// Gateways are served on every node address. Like Istio, servers of several Gateways on one
/// port merge by host (HTTP servers, told apart by the Host header); the same host twice on one
/// port, or a non-HTTP server sharing its port with another Gateway, is a conflict.
fn gateways(index: &Index, errors: &mut ValidationErrors) {
    type Claim<'a> = (&'a Resource, bool, Vec<&'a str>);
    let mut ports: BTreeMap<(u16, Option<&str>), Vec<Claim>> = BTreeMap::new();
    for (resource, spec) in &index.gateways {
        for (i, server) in spec.servers.iter().enumerate() {
            let Ok(number) = values::port(server.port.number) else {
                continue;
            };
            let http = matches!(
                server.port.protocol.to_ascii_uppercase().as_str(),
                "HTTP" | "HTTP2"
            );
            let hosts: Vec<&str> = server
                .hosts
                .iter()
                .map(|h| h.split_once('/').map_or(h.as_str(), |(_, host)| host))
                .collect();
            let claims = ports.entry((number, server.bind.as_deref())).or_default();
            let field = format!("spec.servers[{i}]");
            for (owner, owner_http, owner_hosts) in claims.iter() {
                if std::ptr::eq(*owner, *resource) {
                    continue; // reported by the per-resource checks
                }
                if !(http && *owner_http) {
                    errors.push(
                        resource,
                        format!("{field}.port.number"),
                        format!(
                            "port {number} is already served by {}; only HTTP servers of several Gateways can share a port (by host)",
                            first_seen(owner)
                        ),
                    );
                } else if let Some(host) = hosts.iter().find(|h| owner_hosts.contains(h)) {
                    errors.push(
                        resource,
                        format!("{field}.hosts"),
                        format!(
                            "host `{host}` on port {number} is also served by {}: two Gateways cannot serve one host on one port",
                            first_seen(owner)
                        ),
                    );
                }
            }
            claims.push((resource, http, hosts));
        }
    }
}
