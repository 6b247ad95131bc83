//! Progressive delivery (`meshctl shift`): the plan of weight steps, the rewrite of a
//! VirtualService route for one step, and the health verdict on the canary from mesh's own
//! counters. Pure functions; meshctl drives them against the admin API.
//!
//! Health: for services on the kernel path the canary's error signal is TCP resets sent by its
//! backends (a refused or aborted connection) per new connection; for services on the L7 proxy
//! it is 5xx responses per request and the p99 latency.

use serde_json::{json, Value};

use crate::dataplane::StatsSnapshot;

/// Errors of shift planning.
#[derive(Debug, thiserror::Error)]
pub enum ShiftError {
    /// No VirtualService routes the service.
    #[error("no VirtualService applied with meshctl routes `{0}` (meshctl get vs); shift rewrites a VirtualService in the API layer")]
    NoVirtualService(String),
    /// No route mentions the subsets.
    #[error("VirtualService {vs}: no route sends traffic to subset `{from}` or `{to}`")]
    NoRoute {
        /// VirtualService name.
        vs: String,
        /// The stable subset.
        from: String,
        /// The canary subset.
        to: String,
    },
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
}

/// The canary weights of each step, ending at 100: `start` 0 and `step` 10 give 10, 20, ... 100.
pub fn plan(start: u32, step: u32) -> Result<Vec<u32>, ShiftError> {
    if step == 0 || step > 100 {
        return Err(ShiftError::Invalid(format!(
            "--step must be 1..=100, got {step}"
        )));
    }
    let mut weights = Vec::new();
    let mut w = start.min(100);
    while w < 100 {
        w = (w + step).min(100);
        weights.push(w);
    }
    Ok(weights)
}

/// Where the shifted route lives inside a VirtualService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRef {
    /// `http` or `tcp`.
    pub section: String,
    /// Index of the route in that section.
    pub index: usize,
    /// Destination host of the subsets.
    pub host: String,
    /// Destination port, if the route names one.
    pub port: Option<Value>,
    /// Current weight of the canary subset (0..=100).
    pub canary_weight: u32,
}

/// Finds the routes to shift: every route that sends traffic to the `from` or `to` subset and
/// matches on nothing but the port (so per-port routes all move together, while routes for
/// particular requests, like "user jason to v2", keep their meaning).
pub fn find_routes(vs: &Value, from: &str, to: &str) -> Result<Vec<RouteRef>, ShiftError> {
    let name = vs["metadata"]["name"].as_str().unwrap_or("?").to_string();
    let mut found = Vec::new();
    for section in ["http", "tcp"] {
        let Some(routes) = vs["spec"][section].as_array() else {
            continue;
        };
        for (index, route) in routes.iter().enumerate() {
            let Some(dests) = route["route"].as_array() else {
                continue;
            };
            let subsets: Vec<&str> = dests
                .iter()
                .filter_map(|d| d["destination"]["subset"].as_str())
                .collect();
            if !subsets.iter().any(|s| *s == from || *s == to) {
                continue;
            }
            let port_only = route["match"].as_array().is_none_or(|matches| {
                matches
                    .iter()
                    .all(|m| m.as_object().is_some_and(|o| o.keys().all(|k| k == "port")))
            });
            if !port_only {
                continue;
            }
            let total: i64 = dests
                .iter()
                .map(|d| d["weight"].as_i64().unwrap_or(0))
                .sum();
            let canary: i64 = dests
                .iter()
                .filter(|d| d["destination"]["subset"].as_str() == Some(to))
                .map(|d| d["weight"].as_i64().unwrap_or(0))
                .sum();
            // Istio: a lone destination gets everything whatever its weight says.
            let canary_weight = if dests.len() == 1 {
                if subsets == [to] {
                    100
                } else {
                    0
                }
            } else if total > 0 {
                (canary * 100 / total) as u32
            } else {
                0
            };
            let first = &dests[0]["destination"];
            found.push(RouteRef {
                section: section.into(),
                index,
                host: first["host"].as_str().unwrap_or_default().to_string(),
                port: first.get("port").cloned(),
                canary_weight,
            });
        }
    }
    if found.is_empty() {
        return Err(ShiftError::NoRoute {
            vs: name,
            from: from.into(),
            to: to.into(),
        });
    }
    Ok(found)
}

/// The VirtualService with each of `routes` set to `100 - canary` to `from` and `canary` to `to`.
pub fn with_weights(vs: &Value, routes: &[RouteRef], from: &str, to: &str, canary: u32) -> Value {
    let mut out = vs.clone();
    for route in routes {
        let destination = |subset: &str| {
            let mut d = json!({"host": route.host, "subset": subset});
            if let Some(port) = &route.port {
                d["port"] = port.clone();
            }
            d
        };
        out["spec"][route.section.as_str()][route.index]["route"] = json!([
            {"destination": destination(from), "weight": 100 - canary.min(100)},
            {"destination": destination(to), "weight": canary.min(100)},
        ]);
    }
    // Only what a user writes: the API may return more metadata than it accepts.
    if let Some(meta) = out["metadata"].as_object_mut() {
        meta.retain(|k, _| k == "name" || k == "namespace" || k == "labels" || k == "annotations");
    }
    out
}

/// Traffic and errors of one subset between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Health {
    /// New connections (kernel path) plus requests (L7 proxy) in the window.
    pub requests: u64,
    /// Resets (kernel path) plus 5xx answers (L7 proxy) in the window.
    pub errors: u64,
    /// p99 latency in seconds (upper bound of its histogram bucket) of the L7 requests in the
    /// window; `None` without L7 requests.
    pub p99: Option<f64>,
}

impl Health {
    /// errors / requests, 0 without traffic.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// The canary subset's health between `before` and `after` for the service named `service`
/// (the ServiceEntry host, or its short name): kernel-path connections and resets of its
/// backends, plus L7 requests, 5xx answers and latency of the routes' destinations.
pub fn subset_health(
    before: &StatsSnapshot,
    after: &StatsSnapshot,
    service: &str,
    subset: &str,
) -> Health {
    let short = |name: &str| name.split('.').next().unwrap_or(name).to_string();
    let matches = |name: &str| name == service || short(name) == short(service);
    let mut health = Health::default();
    for now in after.services.iter().filter(|s| matches(&s.name)) {
        let old = before.services.iter().find(|s| s.address == now.address);
        for b in now.backends.iter().filter(|b| {
            b.subset.as_deref() == Some(subset)
                || (b.subset.is_none() && b.version.as_deref() == Some(subset))
        }) {
            let prev = old
                .and_then(|s| s.backends.iter().find(|x| x.address == b.address))
                .map(|x| x.counters)
                .unwrap_or_default();
            health.requests += b.counters.connections.saturating_sub(prev.connections);
            health.errors += b.counters.reply_resets.saturating_sub(prev.reply_resets);
        }
    }
    // L7: destinations are named "host|subset|port"; the host is the destination service.
    let mut buckets: Vec<u64> = Vec::new();
    let destination_matches = |d: &crate::proxy::L7DestinationStats| {
        d.subset.as_deref() == Some(subset) && d.destination.split('|').next().is_some_and(matches)
    };
    for now in &after.l7 {
        let old = before.l7.iter().find(|s| s.address == now.address);
        for route in &now.routes {
            let old_route = old.and_then(|s| s.routes.iter().find(|r| r.route == route.route));
            for d in route.destinations.iter().filter(|d| destination_matches(d)) {
                let prev = old_route.and_then(|r| {
                    r.destinations
                        .iter()
                        .find(|x| x.destination == d.destination)
                });
                let prev_requests = prev.map(|p| p.requests).unwrap_or(0);
                let prev_5xx = prev.map(|p| p.status_classes[4]).unwrap_or(0);
                health.requests += d.requests.saturating_sub(prev_requests);
                health.errors += d.status_classes[4].saturating_sub(prev_5xx);
                if buckets.len() < d.latency_buckets.len() {
                    buckets.resize(d.latency_buckets.len(), 0);
                }
                for (i, count) in d.latency_buckets.iter().enumerate() {
                    let prev_count = prev
                        .and_then(|p| p.latency_buckets.get(i))
                        .copied()
                        .unwrap_or(0);
                    buckets[i] += count.saturating_sub(prev_count);
                }
            }
        }
    }
    health.p99 = p99(&buckets);
    health
}

/// The upper bound of the bucket holding the 99th percentile of `buckets` (non-cumulative
/// counts), `None` when empty.
fn p99(buckets: &[u64]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(crate::proxy::latency_bucket_bound(i));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bound_of_the_bucket_holding_the_99th_percentile() {
        assert_eq!(p99(&[]), None);
        // 98 fast (<= 1 ms), 2 slow (<= 4 ms): the 99th request is slow.
        assert_eq!(p99(&[98, 0, 2]), Some(0.004));
        assert_eq!(p99(&[100, 0, 0]), Some(0.001));
    }

    #[test]
    fn plans_steps_up_to_100() {
        assert_eq!(plan(0, 25).unwrap(), vec![25, 50, 75, 100]);
        assert_eq!(plan(10, 30).unwrap(), vec![40, 70, 100]);
        assert_eq!(plan(100, 10).unwrap(), Vec::<u32>::new());
        assert!(plan(0, 0).is_err());
    }

    fn reviews() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80}, {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}]}
            ]}
        })
    }

    #[test]
    fn finds_the_unconditional_routes_and_the_canary_weight() {
        let routes = find_routes(&reviews(), "v1", "v3").unwrap();
        assert_eq!(routes.len(), 1, "the jason route is left alone");
        assert_eq!(
            (
                routes[0].section.as_str(),
                routes[0].index,
                routes[0].canary_weight
            ),
            ("http", 1, 20)
        );
        assert!(find_routes(&reviews(), "v7", "v8").is_err());
        // Per-port TCP routes move together.
        let tcp = json!({"metadata": {"name": "echo"}, "spec": {"tcp": [
            {"match": [{"port": 8080}], "route": [{"destination": {"host": "e", "subset": "v1"}}]},
            {"match": [{"port": 8081}], "route": [{"destination": {"host": "e", "subset": "v1"}}]}
        ]}});
        assert_eq!(find_routes(&tcp, "v1", "v3").unwrap().len(), 2);
    }

    #[test]
    fn rewrites_only_the_shifted_routes() {
        let vs = reviews();
        let routes = find_routes(&vs, "v1", "v3").unwrap();
        let out = with_weights(&vs, &routes, "v1", "v3", 60);
        assert_eq!(out["spec"]["http"][0], vs["spec"]["http"][0]);
        assert_eq!(out["spec"]["http"][1]["route"][0]["weight"], 40);
        assert_eq!(
            out["spec"]["http"][1]["route"][1]["destination"]["subset"],
            "v3"
        );
        assert_eq!(out["spec"]["http"][1]["route"][1]["weight"], 60);
    }
}
