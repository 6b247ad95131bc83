//! Per-resource checks: each field alone, and fields of the same resource against each other.

//! One module per kind: [`destination_rule`] and [`virtual_service`] here, ServiceEntry and
//! Gateway (short) in this file, with the [`Checker`] they share.

mod destination_rule;
mod virtual_service;

use std::collections::{BTreeMap, BTreeSet};

use super::{values, ValidationErrors};
use crate::config::{
    Destination, Duration, Gateway, Percent, Resolution, Resource, ResourceKind, ServiceEntry,
    StringMatch,
};

struct Checker<'a> {
    resource: &'a Resource,
    errors: &'a mut ValidationErrors,
}

impl Checker<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(self.resource, field, message);
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.warn(self.resource, field, message);
    }

    fn port(&mut self, field: String, number: i64) -> Option<u16> {
        match values::port(number) {
            Ok(port) => Some(port),
            Err(message) => {
                self.error(field, message);
                None
            }
        }
    }

    fn duration(&mut self, field: String, duration: &Option<Duration>) {
        if let Some(duration) = duration {
            if let Err(message) = duration.parse() {
                self.error(field, message);
            }
        }
    }

    fn percent(&mut self, field: String, percent: &Option<Percent>) {
        if let Some(percent) = percent {
            if !(0.0..=100.0).contains(&percent.value) {
                self.error(
                    format!("{field}.value"),
                    format!("{} is out of range, expected 0..=100", percent.value),
                );
            }
        }
    }

    fn int_percent(&mut self, field: String, value: Option<i64>) {
        if let Some(value) = value {
            if !(0..=100).contains(&value) {
                self.error(field, format!("{value} is out of range, expected 0..=100"));
            }
        }
    }

    fn non_negative(&mut self, field: String, value: Option<i64>) {
        if let Some(value) = value {
            if value < 0 {
                self.error(field, format!("{value} must not be negative"));
            }
        }
    }

    fn string_match(&mut self, field: String, string_match: &StringMatch) {
        if string_match.members_set() != 1 {
            self.error(field, "exactly one of exact, prefix, regex is required");
        }
    }

    fn labels(&mut self, field: &str, labels: &BTreeMap<String, String>) {
        for key in labels.keys() {
            let name = key.rsplit('/').next().unwrap_or(key);
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid {
                self.error(format!("{field}.{key}"), "is not a valid label key");
            }
        }
    }

    fn gateway_reference(&mut self, field: String, reference: &str) {
        let valid = reference == "mesh"
            || match reference.split_once('/') {
                Some((ns, name)) => values::is_dns_label(ns) && values::is_dns_subdomain(name),
                None => values::is_dns_subdomain(reference),
            };
        if !valid {
            self.error(
                field,
                format!("`{reference}` is not `mesh`, a Gateway name or `namespace/name`"),
            );
        }
    }

    fn destination(&mut self, field: &str, destination: &Destination) {
        if destination.host.is_empty() {
            self.error(format!("{field}.host"), "a destination host is required");
        } else if let Err(message) = values::host(&destination.host, false) {
            self.error(format!("{field}.host"), message);
        } else if destination.host.contains('*') {
            self.error(
                format!("{field}.host"),
                "a destination host must not be a wildcard",
            );
        }
        if let Some(subset) = &destination.subset {
            if !values::is_dns_label(subset) {
                self.error(
                    format!("{field}.subset"),
                    format!("`{subset}` is not a valid subset name"),
                );
            }
        }
        if let Some(port) = &destination.port {
            self.port(format!("{field}.port.number"), port.number);
        }
    }

    /// Istio's current rule: weights are relative (share = weight / sum); negative weights and
    /// an all-zero split between several destinations are errors.
    fn weights(&mut self, field: &str, weights: &[Option<i64>]) {
        let mut sum: i64 = 0;
        for (i, weight) in weights.iter().enumerate() {
            let Some(weight) = *weight else { continue };
            if weight < 0 {
                self.error(
                    format!("{field}[{i}].weight"),
                    format!("weight {weight} must not be negative"),
                );
            } else if weight > i64::from(i32::MAX) {
                self.error(
                    format!("{field}[{i}].weight"),
                    format!("weight {weight} is out of range, expected 0..={}", i32::MAX),
                );
            } else {
                sum += weight;
            }
        }
        // Unset means 0, as in Istio; a lone destination gets everything whatever its weight.
        if weights.len() > 1 && weights.iter().all(|w| w.unwrap_or(0) == 0) {
            self.error(
                field.to_owned(),
                "weights sum to 0; at least one destination needs a positive weight",
            );
        }
        if sum > i64::from(u32::MAX) {
            self.error(
                field.to_owned(),
                format!("weights sum to {sum}, more than {}", u32::MAX),
            );
        }
    }
}

pub(super) fn check(resource: &Resource, errors: &mut ValidationErrors) {
    let mut checker = Checker { resource, errors };
    let meta = &resource.meta;
    if !values::is_dns_subdomain(&meta.name) {
        checker.error(
            "metadata.name",
            format!(
                "`{}` is not a valid name (lower-case RFC 1123 subdomain)",
                meta.name
            ),
        );
    }
    if !values::is_dns_label(&meta.namespace) {
        checker.error(
            "metadata.namespace",
            format!(
                "`{}` is not a valid namespace (lower-case RFC 1123 label)",
                meta.namespace
            ),
        );
    }
    match &resource.kind {
        ResourceKind::ServiceEntry(spec) => service_entry(&mut checker, spec),
        ResourceKind::DestinationRule(spec) => {
            destination_rule::destination_rule(&mut checker, spec)
        }
        ResourceKind::VirtualService(spec) => virtual_service::virtual_service(&mut checker, spec),
        ResourceKind::Gateway(spec) => gateway(&mut checker, spec),
    }
}

fn export_to(c: &mut Checker, export_to: &[String]) {
    for (i, target) in export_to.iter().enumerate() {
        if !(target == "." || target == "*" || target == "~" || values::is_dns_label(target)) {
            c.error(
                format!("spec.exportTo[{i}]"),
                format!("`{target}` is not `.`, `*`, `~` or a namespace"),
            );
        }
    }
}

fn service_entry(c: &mut Checker, spec: &ServiceEntry) {
    if spec.hosts.is_empty() {
        c.error("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        if let Err(message) = values::host(host, false) {
            c.error(format!("spec.hosts[{i}]"), message);
        }
    }
    let mut vips = Vec::new();
    for (i, address) in spec.addresses.iter().enumerate() {
        match values::vip(address) {
            Ok(ip) => vips.push((i, ip)),
            Err(message) => c.error(format!("spec.addresses[{i}]"), message),
        }
    }
    if spec.ports.is_empty() {
        c.error("spec.ports", "at least one port is required");
    }
    let mut numbers = BTreeMap::new();
    let mut names = BTreeMap::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if let Some(number) = c.port(format!("{field}.number"), port.number) {
            if let Some(first) = numbers.insert(number, i) {
                c.error(
                    format!("{field}.number"),
                    format!("port {number} is already defined by spec.ports[{first}]"),
                );
            }
        }
        if let Err(message) = values::protocol(port.protocol.as_deref()) {
            c.error(format!("{field}.protocol"), message);
        }
        match &port.name {
            None => c.error(format!("{field}.name"), "a port name is required"),
            Some(name) => {
                if let Some(first) = names.insert(name.clone(), i) {
                    c.error(
                        format!("{field}.name"),
                        format!("port name `{name}` is already used by spec.ports[{first}]"),
                    );
                }
            }
        }
        if let Some(target) = port.target_port {
            c.port(format!("{field}.targetPort"), target);
        }
    }
    match spec.resolution {
        Some(Resolution::Static) => {}
        None => c.error(
            "spec.resolution",
            "resolution is missing (Istio's default is NONE); only STATIC is supported",
        ),
        Some(other) => c.error(
            "spec.resolution",
            format!(
                "{} is not supported; only STATIC is supported",
                match other {
                    Resolution::None => "NONE",
                    Resolution::Dns => "DNS",
                    Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
                    Resolution::Static => "STATIC",
                }
            ),
        ),
    }
    if spec.workload_selector.is_some() {
        c.error(
            "spec.workloadSelector",
            "workloadSelector is not supported; list endpoints instead",
        );
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        match endpoint.address.parse::<std::net::IpAddr>() {
            Err(_) if endpoint.address.is_empty() => {
                c.error(format!("{field}.address"), "an endpoint address is required")
            }
            Err(_) => c.error(
                format!("{field}.address"),
                format!("`{}` is not an IP address (hostnames and unix sockets need DNS or the L7 proxy, not supported)", endpoint.address),
            ),
            Ok(ip) => {
                if let Some((v, vip)) = vips.iter().find(|(_, vip)| vip.is_ipv4() != ip.is_ipv4()) {
                    c.error(
                        format!("{field}.address"),
                        format!(
                            "{} endpoint {ip} cannot serve {} address {vip} (spec.addresses[{v}]): mesh does not translate between IPv4 and IPv6 (no NAT46/NAT64)",
                            values::family(ip),
                            values::family(*vip)
                        ),
                    );
                }
            }
        }
        for (name, number) in &endpoint.ports {
            if !names.contains_key(name) {
                c.error(
                    format!("{field}.ports.{name}"),
                    format!("no port named `{name}` in spec.ports"),
                );
            }
            c.port(format!("{field}.ports.{name}"), *number);
        }
        c.labels(&format!("{field}.labels"), &endpoint.labels);
        if let Some(weight) = endpoint.weight {
            if !(0..=i64::from(u32::MAX)).contains(&weight) {
                c.error(
                    format!("{field}.weight"),
                    format!("weight {weight} is out of range, expected 0..={}", u32::MAX),
                );
            }
        }
    }
    export_to(c, &spec.export_to);
}

fn gateway(c: &mut Checker, spec: &Gateway) {
    if spec.servers.is_empty() {
        c.error("spec.servers", "at least one server is required");
    }
    let mut ports: BTreeMap<(u16, Option<&str>), usize> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let field = format!("spec.servers[{i}]");
        let number = c.port(format!("{field}.port.number"), server.port.number);
        match values::protocol(Some(&server.port.protocol)) {
            Err(message) => c.error(format!("{field}.port.protocol"), message),
            Ok(crate::compile::L4Protocol::Udp) => c.error(
                format!("{field}.port.protocol"),
                "UDP is not a gateway protocol in Istio (TCP, HTTP, HTTP2, GRPC, HTTPS, TLS, MONGO)",
            ),
            Ok(_) => {}
        }
        if server.port.name.is_empty() {
            c.error(format!("{field}.port.name"), "a port name is required");
        }
        if let Some(target) = server.port.target_port {
            c.port(format!("{field}.port.targetPort"), target);
        }
        if let Some(bind) = &server.bind {
            if bind.parse::<std::net::IpAddr>().is_err() {
                c.error(
                    format!("{field}.bind"),
                    format!("`{bind}` is not an IP address"),
                );
            }
        }
        if let Some(number) = number {
            if let Some(first) = ports.insert((number, server.bind.as_deref()), i) {
                c.error(
                    format!("{field}.port.number"),
                    format!("port {number} is already served by spec.servers[{first}]"),
                );
            }
        }
        if server.hosts.is_empty() {
            c.error(format!("{field}.hosts"), "at least one host is required");
        }
        for (k, host) in server.hosts.iter().enumerate() {
            let name = host.split_once('/').map_or(host.as_str(), |(_, h)| h);
            if let Err(message) = values::host(name, true) {
                c.error(format!("{field}.hosts[{k}]"), message);
            }
        }
        if let Some(tls) = &server.tls {
            if let Some(mode) = &tls.mode {
                if !matches!(
                    mode.as_str(),
                    "PASSTHROUGH"
                        | "SIMPLE"
                        | "MUTUAL"
                        | "AUTO_PASSTHROUGH"
                        | "ISTIO_MUTUAL"
                        | "OPTIONAL_MUTUAL"
                ) {
                    c.error(format!("{field}.tls.mode"), format!("`{mode}` is not PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL or OPTIONAL_MUTUAL"));
                }
            }
        }
        if let Some(name) = &server.name {
            if !names.insert(name.as_str()) {
                c.error(
                    format!("{field}.name"),
                    format!("server name `{name}` is used twice"),
                );
            }
        }
    }
}
