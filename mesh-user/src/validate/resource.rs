//! Per-resource checks: each field alone, and fields of the same resource against each other.

use std::collections::{BTreeMap, BTreeSet};

use super::{values, ValidationErrors};
use crate::config::{
    ConsistentHashLb, Destination, DestinationRule, Duration, Gateway, HttpRoute,
    LoadBalancerSettings, Percent, Resolution, Resource, ResourceKind, ServiceEntry, StringMatch,
    TrafficPolicy, VirtualService,
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
        ResourceKind::DestinationRule(spec) => destination_rule(&mut checker, spec),
        ResourceKind::VirtualService(spec) => virtual_service(&mut checker, spec),
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

fn destination_rule(c: &mut Checker, spec: &DestinationRule) {
    if spec.host.is_empty() {
        c.error("spec.host", "a host is required");
    } else if let Err(message) = values::host(&spec.host, false) {
        c.error("spec.host", message);
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(c, "spec.trafficPolicy", policy);
    }
    let mut names = BTreeMap::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if !values::is_dns_label(&subset.name) {
            c.error(
                format!("{field}.name"),
                format!(
                    "`{}` is not a valid subset name (lower-case RFC 1123 label)",
                    subset.name
                ),
            );
        } else if let Some(first) = names.insert(subset.name.clone(), i) {
            c.error(
                format!("{field}.name"),
                format!(
                    "subset `{}` is already defined by spec.subsets[{first}]",
                    subset.name
                ),
            );
        }
        c.labels(&format!("{field}.labels"), &subset.labels);
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(c, &format!("{field}.trafficPolicy"), policy);
        }
    }
    if spec.workload_selector.is_some() {
        c.error(
            "spec.workloadSelector",
            "workloadSelector is not supported (rules apply node-wide)",
        );
    }
    export_to(c, &spec.export_to);
}

fn traffic_policy(c: &mut Checker, field: &str, policy: &TrafficPolicy) {
    if let Some(lb) = &policy.load_balancer {
        load_balancer(c, &format!("{field}.loadBalancer"), lb);
    }
    if let Some(pool) = &policy.connection_pool {
        connection_pool(c, &format!("{field}.connectionPool"), pool);
    }
    if let Some(outlier) = &policy.outlier_detection {
        outlier_detection(c, &format!("{field}.outlierDetection"), outlier);
    }
    if let Some(tls) = &policy.tls {
        client_tls(c, &format!("{field}.tls"), tls);
    }
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        let field = format!("{field}.portLevelSettings[{i}]");
        match &port_policy.port {
            Some(port) => {
                c.port(format!("{field}.port.number"), port.number);
            }
            None => c.error(format!("{field}.port"), "a port is required"),
        }
        if let Some(lb) = &port_policy.load_balancer {
            load_balancer(c, &format!("{field}.loadBalancer"), lb);
        }
        if let Some(pool) = &port_policy.connection_pool {
            connection_pool(c, &format!("{field}.connectionPool"), pool);
        }
        if let Some(outlier) = &port_policy.outlier_detection {
            outlier_detection(c, &format!("{field}.outlierDetection"), outlier);
        }
        if let Some(tls) = &port_policy.tls {
            client_tls(c, &format!("{field}.tls"), tls);
        }
    }
    if let Some(tunnel) = &policy.tunnel {
        if tunnel.target_host.is_empty() {
            c.error(
                format!("{field}.tunnel.targetHost"),
                "a target host is required",
            );
        }
        c.port(format!("{field}.tunnel.targetPort"), tunnel.target_port);
    }
    if let Some(proxy) = &policy.proxy_protocol {
        if let Some(version) = &proxy.version {
            if !matches!(version.as_str(), "V1" | "V2") {
                c.error(
                    format!("{field}.proxyProtocol.version"),
                    format!("`{version}` is not V1 or V2"),
                );
            }
        }
    }
}

fn load_balancer(c: &mut Checker, field: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        c.error(
            field.to_owned(),
            "simple and consistentHash are mutually exclusive",
        );
    }
    if let Some(hash) = &lb.consistent_hash {
        consistent_hash(c, &format!("{field}.consistentHash"), hash);
    }
    c.duration(
        format!("{field}.warmupDurationSecs"),
        &lb.warmup_duration_secs,
    );
    if let Some(warmup) = &lb.warmup {
        c.duration(format!("{field}.warmup.duration"), &warmup.duration);
    }
    if let Some(locality) = &lb.locality_lb_setting {
        if !locality.distribute.is_empty() && !locality.failover.is_empty() {
            c.error(
                format!("{field}.localityLbSetting"),
                "distribute and failover are mutually exclusive",
            );
        }
    }
}

fn consistent_hash(c: &mut Checker, field: &str, hash: &ConsistentHashLb) {
    let keys = [
        hash.http_header_name.is_some(),
        hash.http_cookie.is_some(),
        hash.use_source_ip.is_some(),
        hash.http_query_parameter_name.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count();
    if keys != 1 {
        c.error(
            field.to_owned(),
            "exactly one of useSourceIp, httpHeaderName, httpCookie, httpQueryParameterName is required",
        );
    }
    if let Some(cookie) = &hash.http_cookie {
        if cookie.name.is_empty() {
            c.error(
                format!("{field}.httpCookie.name"),
                "a cookie name is required",
            );
        }
        c.duration(format!("{field}.httpCookie.ttl"), &cookie.ttl);
    }
    if hash.ring_hash.is_some() && hash.maglev.is_some() {
        c.error(
            field.to_owned(),
            "ringHash and maglev are mutually exclusive",
        );
    }
    if let Some(table_size) = hash.maglev.as_ref().and_then(|m| m.table_size) {
        let max = i64::from(mesh_common::MAX_MAGLEV_TABLE_SIZE);
        if table_size < 2 || table_size > max || !values::is_prime(table_size as u64) {
            c.error(
                format!("{field}.maglev.tableSize"),
                format!("table size {table_size} must be a prime number between 2 and {max}"),
            );
        }
    }
    c.non_negative(format!("{field}.minimumRingSize"), hash.minimum_ring_size);
    if let Some(ring) = &hash.ring_hash {
        c.non_negative(
            format!("{field}.ringHash.minimumRingSize"),
            ring.minimum_ring_size,
        );
    }
}

fn connection_pool(c: &mut Checker, field: &str, pool: &crate::config::ConnectionPoolSettings) {
    if let Some(tcp) = &pool.tcp {
        c.non_negative(format!("{field}.tcp.maxConnections"), tcp.max_connections);
        c.duration(format!("{field}.tcp.connectTimeout"), &tcp.connect_timeout);
        c.duration(
            format!("{field}.tcp.maxConnectionDuration"),
            &tcp.max_connection_duration,
        );
        c.duration(format!("{field}.tcp.idleTimeout"), &tcp.idle_timeout);
        if let Some(keepalive) = &tcp.tcp_keepalive {
            c.non_negative(format!("{field}.tcp.tcpKeepalive.probes"), keepalive.probes);
            c.duration(format!("{field}.tcp.tcpKeepalive.time"), &keepalive.time);
            c.duration(
                format!("{field}.tcp.tcpKeepalive.interval"),
                &keepalive.interval,
            );
        }
    }
    if let Some(http) = &pool.http {
        c.non_negative(
            format!("{field}.http.http1MaxPendingRequests"),
            http.http1_max_pending_requests,
        );
        c.non_negative(
            format!("{field}.http.http2MaxRequests"),
            http.http2_max_requests,
        );
        c.non_negative(
            format!("{field}.http.maxRequestsPerConnection"),
            http.max_requests_per_connection,
        );
        c.non_negative(format!("{field}.http.maxRetries"), http.max_retries);
        c.non_negative(
            format!("{field}.http.maxConcurrentStreams"),
            http.max_concurrent_streams,
        );
        c.duration(format!("{field}.http.idleTimeout"), &http.idle_timeout);
        if let Some(policy) = &http.h2_upgrade_policy {
            if !matches!(policy.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") {
                c.error(
                    format!("{field}.http.h2UpgradePolicy"),
                    format!("`{policy}` is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                );
            }
        }
    }
}

fn outlier_detection(c: &mut Checker, field: &str, outlier: &crate::config::OutlierDetection) {
    c.non_negative(
        format!("{field}.consecutiveLocalOriginFailures"),
        outlier.consecutive_local_origin_failures,
    );
    c.non_negative(
        format!("{field}.consecutiveGatewayErrors"),
        outlier.consecutive_gateway_errors,
    );
    c.non_negative(
        format!("{field}.consecutive5xxErrors"),
        outlier.consecutive_5xx_errors,
    );
    c.non_negative(
        format!("{field}.consecutiveErrors"),
        outlier.consecutive_errors,
    );
    c.duration(format!("{field}.interval"), &outlier.interval);
    c.duration(
        format!("{field}.baseEjectionTime"),
        &outlier.base_ejection_time,
    );
    c.int_percent(
        format!("{field}.maxEjectionPercent"),
        outlier.max_ejection_percent,
    );
    c.int_percent(
        format!("{field}.minHealthPercent"),
        outlier.min_health_percent,
    );
}

/// mesh has no workload identity and does not originate TLS: `ISTIO_MUTUAL` (Istio's sidecar
/// mTLS) is accepted with a warning saying traffic stays as the client sent it, `SIMPLE` and
/// `MUTUAL` (TLS origination to the backends) are refused, `DISABLE` is what mesh does anyway.
fn client_tls(c: &mut Checker, field: &str, tls: &crate::config::ClientTlsSettings) {
    match tls.mode.as_deref() {
        None | Some("DISABLE") => {}
        Some("ISTIO_MUTUAL") => c.warn(
            format!("{field}.mode"),
            "ISTIO_MUTUAL is not supported (mesh has no sidecars and no workload identity): traffic reaches the backends as the client sent it, without mTLS",
        ),
        Some(mode @ ("SIMPLE" | "MUTUAL")) => c.error(
            format!("{field}.mode"),
            format!("{mode} (TLS origination to the backends) is not supported; mesh forwards traffic as the client sent it"),
        ),
        Some(mode) => c.error(
            format!("{field}.mode"),
            format!("`{mode}` is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
        ),
    }
}

fn virtual_service(c: &mut Checker, spec: &VirtualService) {
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
