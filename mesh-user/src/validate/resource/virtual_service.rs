//! VirtualService checks: hosts, gateways, HTTP and TCP routes (matches, destinations,
//! weights, redirects, rewrites, retries, faults, mirrors, CORS), and the client-identity
//! matches mesh names as not supported.

use std::collections::BTreeMap;

use super::{export_to, values, Checker};
use crate::config::{Destination, HttpRoute, VirtualService};
pub(super) fn virtual_service(c: &mut Checker, spec: &VirtualService) {
    if spec.hosts.is_empty() {
        c.error("spec.hosts", "at least one host is required");
    }
    let mesh_bound = spec.applies_to_mesh();
    for (i, host) in spec.hosts.iter().enumerate() {
        if let Err(message) = values::host(host, true) {
            c.error(format!("spec.hosts[{i}]"), message);
        } else if host == "*" && mesh_bound {
            c.error(
                format!("spec.hosts[{i}]"),
                "the wildcard host `*` is only allowed when the rule is bound to gateways only (not `mesh`)",
            );
        }
    }
    for (i, gateway) in spec.gateways.iter().enumerate() {
        c.gateway_reference(format!("spec.gateways[{i}]"), gateway);
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        c.error("spec", "at least one of http, tcp, tls routes is required");
    }
    for (i, route) in spec.http.iter().enumerate() {
        http_route(c, &format!("spec.http[{i}]"), route);
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        let field = format!("spec.tcp[{i}]");
        for (j, m) in route.matches.iter().enumerate() {
            let field = format!("{field}.match[{j}]");
            if let Some(port) = m.port {
                c.port(format!("{field}.port"), port);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                if let Err(message) = values::cidr(subnet) {
                    c.error(format!("{field}.destinationSubnets[{k}]"), message);
                }
            }
            if let Some(subnet) = &m.source_subnet {
                if let Err(message) = values::cidr(subnet) {
                    c.error(format!("{field}.sourceSubnet"), message);
                }
            }
            c.labels(&format!("{field}.sourceLabels"), &m.source_labels);
            no_workload_identity(c, &field, &m.source_labels, &m.source_namespace);
            for (k, gateway) in m.gateways.iter().enumerate() {
                c.gateway_reference(format!("{field}.gateways[{k}]"), gateway);
            }
        }
        route_destinations(
            c,
            &field,
            route.route.iter().map(|r| (&r.destination, r.weight)),
        );
    }
    for (i, route) in spec.tls.iter().enumerate() {
        let field = format!("spec.tls[{i}]");
        if route.matches.is_empty() {
            c.error(
                format!("{field}.match"),
                "at least one match (with sniHosts) is required",
            );
        }
        for (j, m) in route.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                c.error(
                    format!("{field}.match[{j}].sniHosts"),
                    "at least one SNI host is required",
                );
            }
            if let Some(port) = m.port {
                c.port(format!("{field}.match[{j}].port"), port);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                if let Err(message) = values::cidr(subnet) {
                    c.error(
                        format!("{field}.match[{j}].destinationSubnets[{k}]"),
                        message,
                    );
                }
            }
        }
        route_destinations(
            c,
            &field,
            route.route.iter().map(|r| (&r.destination, r.weight)),
        );
    }
    export_to(c, &spec.export_to);
}

fn route_destinations<'d>(
    c: &mut Checker,
    field: &str,
    destinations: impl Iterator<Item = (&'d Destination, Option<i64>)>,
) {
    let mut weights = Vec::new();
    for (k, (destination, weight)) in destinations.enumerate() {
        c.destination(&format!("{field}.route[{k}].destination"), destination);
        weights.push(weight);
    }
    if weights.is_empty() {
        c.error(
            format!("{field}.route"),
            "at least one destination is required",
        );
    }
    c.weights(&format!("{field}.route"), &weights);
}

/// `sourceLabels` and `sourceNamespace` select clients by workload identity, which mesh does not
/// have: refused for every rule, whether or not it is ever served.
fn no_workload_identity(
    c: &mut Checker,
    field: &str,
    labels: &BTreeMap<String, String>,
    namespace: &Option<String>,
) {
    if !labels.is_empty() {
        c.error(
            format!("{field}.sourceLabels"),
            "matching on client workload labels is not supported (mesh has no workload identity)",
        );
    }
    if namespace.is_some() {
        c.error(
            format!("{field}.sourceNamespace"),
            "matching on the client namespace is not supported (mesh has no workload identity)",
        );
    }
}

fn http_route(c: &mut Checker, field: &str, route: &HttpRoute) {
    for (j, m) in route.matches.iter().enumerate() {
        let field = format!("{field}.match[{j}]");
        for (name, value) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(value) = value {
                c.string_match(format!("{field}.{name}"), value);
            }
        }
        for (map_name, map) in [
            ("headers", &m.headers),
            ("queryParams", &m.query_params),
            ("withoutHeaders", &m.without_headers),
        ] {
            for (key, value) in map {
                // `withoutHeaders: {x: {}}` means "header absent"; an empty match is allowed there.
                if !(map_name == "withoutHeaders" && value.members_set() == 0) {
                    c.string_match(format!("{field}.{map_name}.{key}"), value);
                }
            }
        }
        if let Some(port) = m.port {
            c.port(format!("{field}.port"), port);
        }
        c.labels(&format!("{field}.sourceLabels"), &m.source_labels);
        no_workload_identity(c, &field, &m.source_labels, &m.source_namespace);
        for (k, gateway) in m.gateways.iter().enumerate() {
            c.gateway_reference(format!("{field}.gateways[{k}]"), gateway);
        }
    }
    let forwards = !route.route.is_empty();
    if !forwards
        && route.redirect.is_none()
        && route.direct_response.is_none()
        && route.delegate.is_none()
    {
        c.error(
            format!("{field}.route"),
            "one of route, redirect, directResponse or delegate is required",
        );
    }
    if forwards && route.redirect.is_some() {
        c.error(
            format!("{field}.redirect"),
            "redirect and route are mutually exclusive",
        );
    }
    if forwards && route.direct_response.is_some() {
        c.error(
            format!("{field}.directResponse"),
            "directResponse and route are mutually exclusive",
        );
    }
    if forwards {
        route_destinations(
            c,
            field,
            route.route.iter().map(|r| (&r.destination, r.weight)),
        );
    }
    if let Some(redirect) = &route.redirect {
        if let Some(port) = redirect.port {
            c.port(format!("{field}.redirect.port"), port);
        }
        if let Some(code) = redirect.redirect_code {
            if !(300..=399).contains(&code) {
                c.error(
                    format!("{field}.redirect.redirectCode"),
                    format!("{code} is not a 3xx status"),
                );
            }
        }
    }
    if let Some(response) = &route.direct_response {
        if !(200..=599).contains(&response.status) {
            c.error(
                format!("{field}.directResponse.status"),
                format!("{} is not an HTTP status (200..=599)", response.status),
            );
        }
    }
    c.duration(format!("{field}.timeout"), &route.timeout);
    if let Some(retries) = &route.retries {
        c.non_negative(format!("{field}.retries.attempts"), Some(retries.attempts));
        c.duration(
            format!("{field}.retries.perTryTimeout"),
            &retries.per_try_timeout,
        );
    }
    if let Some(fault) = &route.fault {
        if let Some(delay) = &fault.delay {
            c.duration(
                format!("{field}.fault.delay.fixedDelay"),
                &delay.fixed_delay,
            );
            c.percent(format!("{field}.fault.delay.percentage"), &delay.percentage);
            c.int_percent(format!("{field}.fault.delay.percent"), delay.percent);
        }
        if let Some(abort) = &fault.abort {
            c.percent(format!("{field}.fault.abort.percentage"), &abort.percentage);
            c.int_percent(format!("{field}.fault.abort.percent"), abort.percent);
            if let Some(status) = abort.http_status {
                if !(200..=599).contains(&status) {
                    c.error(
                        format!("{field}.fault.abort.httpStatus"),
                        format!("{status} is not an HTTP status (200..=599)"),
                    );
                }
            }
        }
    }
    if let Some(mirror) = &route.mirror {
        c.destination(&format!("{field}.mirror"), mirror);
    }
    for (k, mirror) in route.mirrors.iter().enumerate() {
        c.destination(
            &format!("{field}.mirrors[{k}].destination"),
            &mirror.destination,
        );
        c.percent(
            format!("{field}.mirrors[{k}].percentage"),
            &mirror.percentage,
        );
    }
    c.percent(
        format!("{field}.mirrorPercentage"),
        &route.mirror_percentage,
    );
    c.int_percent(format!("{field}.mirrorPercent"), route.mirror_percent);
    if let Some(cors) = &route.cors_policy {
        for (k, origin) in cors.allow_origins.iter().enumerate() {
            c.string_match(format!("{field}.corsPolicy.allowOrigins[{k}]"), origin);
        }
        c.duration(format!("{field}.corsPolicy.maxAge"), &cors.max_age);
    }
}
