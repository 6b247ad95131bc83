//! DestinationRule checks: subsets, traffic policy (load balancer, consistent hash,
//! connection pool, outlier detection) and client TLS, which mesh names as not supported.

use std::collections::BTreeMap;

use super::{export_to, values, Checker};
use crate::config::{ConsistentHashLb, DestinationRule, LoadBalancerSettings, TrafficPolicy};
pub(super) fn destination_rule(c: &mut Checker, spec: &DestinationRule) {
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
