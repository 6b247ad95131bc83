//! Request matches (Istio `StringMatch`, RE2 regexes checked) and DestinationRule traffic
//! policies (host, subset and port-level settings merged; durations parsed) for the proxy.

use std::time::Duration;

use super::error;
use crate::{
    compile::{
        ConnectionPoolPlan, LoadBalancerPlan, OutlierPlan, RequestMatchPlan, StringMatchPlan,
        TrafficPolicyPlan,
    },
    config::{PortTrafficPolicy, Resource, SimpleLb, StringMatch, TrafficPolicy},
    resolve::select::Result,
};

pub(super) fn check_regex(rule: &Resource, field: &str, pattern: &str) -> Result<()> {
    regex::Regex::new(pattern)
        .map(|_| ())
        .map_err(|e| error(rule, field, format!("not a valid RE2 regex: {e}")))
}

pub(super) fn string_match(
    rule: &Resource,
    field: &str,
    m: &StringMatch,
) -> Result<StringMatchPlan> {
    if let Some(exact) = &m.exact {
        Ok(StringMatchPlan::Exact(exact.clone()))
    } else if let Some(prefix) = &m.prefix {
        Ok(StringMatchPlan::Prefix(prefix.clone()))
    } else if let Some(regex) = &m.regex {
        check_regex(rule, &format!("{field}.regex"), regex)?;
        Ok(StringMatchPlan::Regex(regex.clone()))
    } else {
        Err(error(
            rule,
            field,
            "exactly one of exact, prefix, regex is required",
        ))
    }
}

pub(super) fn request_match(
    rule: &Resource,
    field: &str,
    m: &crate::config::HttpMatchRequest,
) -> Result<RequestMatchPlan> {
    if !m.source_labels.is_empty() {
        return Err(error(
            rule,
            format!("{field}.sourceLabels"),
            "matching on client workload labels is not supported (mesh has no workload identity)",
        ));
    }
    if m.source_namespace.is_some() {
        return Err(error(
            rule,
            format!("{field}.sourceNamespace"),
            "matching on the client namespace is not supported (mesh has no workload identity)",
        ));
    }
    let opt = |name: &str, v: &Option<StringMatch>| -> Result<Option<StringMatchPlan>> {
        v.as_ref()
            .map(|v| string_match(rule, &format!("{field}.{name}"), v))
            .transpose()
    };
    let map = |name: &str,
               v: &std::collections::BTreeMap<String, StringMatch>,
               lower: bool|
     -> Result<Vec<(String, StringMatchPlan)>> {
        v.iter()
            .map(|(k, sm)| {
                let key = if lower {
                    k.to_ascii_lowercase()
                } else {
                    k.clone()
                };
                Ok((key, string_match(rule, &format!("{field}.{name}.{k}"), sm)?))
            })
            .collect()
    };
    Ok(RequestMatchPlan {
        uri: opt("uri", &m.uri)?,
        scheme: opt("scheme", &m.scheme)?,
        method: opt("method", &m.method)?,
        authority: opt("authority", &m.authority)?,
        headers: map("headers", &m.headers, true)?,
        without_headers: map("withoutHeaders", &m.without_headers, true)?,
        query_params: map("queryParams", &m.query_params, false)?,
        ignore_uri_case: m.ignore_uri_case == Some(true),
    })
}

/// Host-level policy with the subset's policy over it, field by field (Istio: a subset's
/// loadBalancer, connectionPool or outlierDetection replaces the host's).
pub(super) fn traffic_policy(
    rule: &Resource,
    host: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: u16,
) -> Result<TrafficPolicyPlan> {
    // Port-level settings override the policy they sit in, for that port.
    fn for_port(p: Option<&TrafficPolicy>, port: u16) -> Option<&PortTrafficPolicy> {
        p.and_then(|p| {
            p.port_level_settings.iter().find(|s| {
                s.port
                    .as_ref()
                    .is_some_and(|sel| sel.number == i64::from(port))
            })
        })
    }
    let port_level = |p| for_port(p, port);
    let pick = |f: &dyn Fn(&TrafficPolicy) -> bool| -> Option<&TrafficPolicy> {
        subset.filter(|p| f(p)).or(host.filter(|p| f(p)))
    };
    let lb = port_level(subset)
        .and_then(|p| p.load_balancer.as_ref())
        .or_else(|| pick(&|p| p.load_balancer.is_some()).and_then(|p| p.load_balancer.as_ref()))
        .or_else(|| port_level(host).and_then(|p| p.load_balancer.as_ref()));
    let pool = port_level(subset)
        .and_then(|p| p.connection_pool.as_ref())
        .or_else(|| pick(&|p| p.connection_pool.is_some()).and_then(|p| p.connection_pool.as_ref()))
        .or_else(|| port_level(host).and_then(|p| p.connection_pool.as_ref()));
    let outlier = port_level(subset)
        .and_then(|p| p.outlier_detection.as_ref())
        .or_else(|| {
            pick(&|p| p.outlier_detection.is_some()).and_then(|p| p.outlier_detection.as_ref())
        })
        .or_else(|| port_level(host).and_then(|p| p.outlier_detection.as_ref()));
    let field = "spec.trafficPolicy";
    let duration = |f: &str, d: &Option<crate::config::Duration>| -> Result<Option<Duration>> {
        d.as_ref()
            .map(|d| {
                d.parse()
                    .map_err(|m| error(rule, format!("{field}.{f}"), m))
            })
            .transpose()
    };
    let load_balancer = match lb {
        None => LoadBalancerPlan::default(),
        Some(lb) => match (&lb.consistent_hash, lb.simple) {
            (Some(hash), _) => {
                if let Some(name) = &hash.http_header_name {
                    LoadBalancerPlan::HashHeader {
                        name: name.to_ascii_lowercase(),
                    }
                } else if let Some(cookie) = &hash.http_cookie {
                    LoadBalancerPlan::HashCookie {
                        name: cookie.name.clone(),
                        path: cookie.path.clone(),
                        ttl: duration("loadBalancer.consistentHash.httpCookie.ttl", &cookie.ttl)?,
                    }
                } else if let Some(name) = &hash.http_query_parameter_name {
                    LoadBalancerPlan::HashQueryParameter { name: name.clone() }
                } else {
                    LoadBalancerPlan::HashSourceIp
                }
            }
            (None, Some(SimpleLb::RoundRobin)) => LoadBalancerPlan::RoundRobin,
            (None, Some(SimpleLb::Random)) => LoadBalancerPlan::Random,
            (None, Some(SimpleLb::Passthrough)) => {
                return Err(error(
                    rule,
                    format!("{field}.loadBalancer.simple"),
                    "PASSTHROUGH is not supported (mesh forwards to listed endpoints only)",
                ))
            }
            (None, _) => LoadBalancerPlan::LeastRequest,
        },
    };
    let count = |v: Option<i64>| v.and_then(|v| u32::try_from(v.max(0)).ok());
    let connection_pool = match pool {
        None => ConnectionPoolPlan::default(),
        Some(pool) => {
            let tcp = pool.tcp.as_ref();
            let http = pool.http.as_ref();
            ConnectionPoolPlan {
                max_connections: count(tcp.and_then(|t| t.max_connections)),
                connect_timeout: duration(
                    "connectionPool.tcp.connectTimeout",
                    &tcp.and_then(|t| t.connect_timeout.clone()),
                )?,
                max_pending_requests: count(http.and_then(|h| h.http1_max_pending_requests)),
                max_requests_per_connection: count(
                    http.and_then(|h| h.max_requests_per_connection),
                ),
                idle_timeout: duration(
                    "connectionPool.http.idleTimeout",
                    &http
                        .and_then(|h| h.idle_timeout.clone())
                        .or_else(|| tcp.and_then(|t| t.idle_timeout.clone())),
                )?,
            }
        }
    };
    let outlier_detection = match outlier {
        None => None,
        Some(o) => Some(OutlierPlan {
            // Istio's default for consecutive5xxErrors is 5; the deprecated consecutiveErrors
            // counts gateway errors.
            consecutive_5xx: match (o.consecutive_5xx_errors, o.consecutive_errors) {
                (Some(n), _) => count(Some(n)).filter(|n| *n > 0),
                (None, Some(_)) => None,
                (None, None) => Some(5),
            },
            consecutive_gateway_errors: count(
                o.consecutive_gateway_errors.or(o.consecutive_errors),
            )
            .filter(|n| *n > 0),
            interval: duration("outlierDetection.interval", &o.interval)?
                .unwrap_or(Duration::from_secs(10)),
            base_ejection_time: duration(
                "outlierDetection.baseEjectionTime",
                &o.base_ejection_time,
            )?
            .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: count(o.max_ejection_percent).unwrap_or(10).min(100),
        }),
    };
    Ok(TrafficPolicyPlan {
        load_balancer,
        connection_pool,
        outlier_detection,
    })
}
