//! The proxy's counters: per service, route and destination (cluster), requests by status
//! class and a latency histogram. One set of `prometheus_client` metrics feeds both the
//! Prometheus exposition and the L7 section of [`crate::dataplane::StatsSnapshot`].

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{text::encode, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, MetricType, TypedMetric},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use crate::compile::ServiceAddress;

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, LatencyHistogram>;

/// Upper bounds (seconds) of the latency buckets: 1 ms doubling to ~16 s, then +Inf.
pub const LATENCY_BUCKET_COUNT: usize = 15;

/// A latency histogram that is a few relaxed atomic adds per observation (no lock, so the
/// proxy's workers never wait for each other), exposed in Prometheus' histogram format.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKET_COUNT + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one observation.
    pub fn observe(&self, elapsed: Duration) {
        let micros = elapsed.as_micros();
        let bucket = (0..LATENCY_BUCKET_COUNT)
            .find(|i| micros <= 1000u128 << i)
            .unwrap_or(LATENCY_BUCKET_COUNT);
        self.0.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Requests per bucket (not cumulative).
    pub fn buckets(&self) -> Vec<u64> {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.buckets();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let bound = latency_bucket_bound(i);
                (if bound.is_finite() { bound } else { f64::MAX }, *c)
            })
            .collect();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bound in seconds of latency bucket `i` (the last bucket is unbounded).
pub fn latency_bucket_bound(i: usize) -> f64 {
    if i >= LATENCY_BUCKET_COUNT {
        f64::INFINITY
    } else {
        0.001 * 2f64.powi(i as i32)
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Identifies one counter set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatsKey {
    /// Service address.
    pub address: ServiceAddress,
    /// Service display name.
    pub service: String,
    /// Route name.
    pub route: String,
    /// Cluster name (`host|subset|port`), empty for answers the proxy gives itself (no route,
    /// redirect, direct response, fault abort, overload).
    pub destination: String,
    /// Destination subset.
    pub subset: String,
}

/// Counters of one route destination.
#[derive(Clone, Debug)]
pub struct RouteCounters {
    by_class: [Counter; 5],
    /// Also read back: `meshctl shift` judges a canary's p99 from it.
    latency: LatencyHistogram,
}

impl RouteCounters {
    /// Counts one finished request.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].inc();
        self.latency.observe(elapsed);
    }

    fn latency_buckets(&self) -> Vec<u64> {
        self.latency.buckets()
    }

    fn classes(&self) -> [u64; 5] {
        [0, 1, 2, 3, 4].map(|i| self.by_class[i].get())
    }
}

/// All counters of the proxy; entries live as long as meshd (Prometheus counters must not go
/// backwards while the process runs).
pub struct ProxyStats {
    requests: Family<Labels, Counter>,
    latency: HistogramFamily,
    entries: Mutex<BTreeMap<StatsKey, Arc<RouteCounters>>>,
    /// Configured share of each destination within its route, as of the last apply.
    configured: Mutex<BTreeMap<StatsKey, f64>>,
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::default(),
            entries: Mutex::new(BTreeMap::new()),
            configured: Mutex::new(BTreeMap::new()),
        }
    }
}

impl ProxyStats {
    /// The counters of `key`, created on first use.
    pub fn counters(&self, key: &StatsKey) -> Arc<RouteCounters> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = entries.get(key) {
            return found.clone();
        }
        let base: Labels = vec![
            ("service".into(), key.service.clone()),
            (
                "address".into(),
                format!("{}:{}", key.address.ip, key.address.port),
            ),
            ("route".into(), key.route.clone()),
            ("destination".into(), key.destination.clone()),
            ("subset".into(), key.subset.clone()),
        ];
        let by_class = CLASSES.map(|class| {
            let mut labels = base.clone();
            labels.push(("class".into(), class.into()));
            self.requests.get_or_create(&labels).clone()
        });
        let latency = self.latency.get_or_create(&base).clone();
        let counters = Arc::new(RouteCounters { by_class, latency });
        entries.insert(key.clone(), counters.clone());
        counters
    }

    /// Replaces the configured shares (called on every apply).
    pub fn set_configured(&self, shares: BTreeMap<StatsKey, f64>) {
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = shares;
    }

    /// The L7 section of `meshctl stats`: services in `current`, routes and destinations.
    pub fn snapshot(&self, current: &[(ServiceAddress, String)]) -> Vec<L7ServiceStats> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let configured = self
            .configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for (address, name) in current {
            let mut routes: BTreeMap<String, Vec<L7DestinationStats>> = BTreeMap::new();
            for (key, counters) in entries.iter().filter(|(k, _)| k.address == *address) {
                let status_classes = counters.classes();
                let share = configured.get(key).copied();
                // A destination no longer configured and never used is noise.
                if share.is_none() && status_classes.iter().sum::<u64>() == 0 {
                    continue;
                }
                routes
                    .entry(key.route.clone())
                    .or_default()
                    .push(L7DestinationStats {
                        destination: key.destination.clone(),
                        subset: (!key.subset.is_empty()).then(|| key.subset.clone()),
                        requests: status_classes.iter().sum(),
                        status_classes,
                        configured_share: share,
                        observed_share: 0.0,
                        latency_buckets: counters.latency_buckets(),
                    });
            }
            let routes: Vec<L7RouteStats> = routes
                .into_iter()
                .map(|(route, mut destinations)| {
                    let forwarded: u64 = destinations
                        .iter()
                        .filter(|d| !d.destination.is_empty())
                        .map(|d| d.requests)
                        .sum();
                    for d in destinations
                        .iter_mut()
                        .filter(|d| !d.destination.is_empty())
                    {
                        if forwarded > 0 {
                            d.observed_share = d.requests as f64 / forwarded as f64;
                        }
                    }
                    L7RouteStats {
                        requests: destinations.iter().map(|d| d.requests).sum(),
                        route,
                        destinations,
                    }
                })
                .collect();
            out.push(L7ServiceStats {
                address: *address,
                name: name.clone(),
                requests: routes.iter().map(|r| r.requests).sum(),
                routes,
            });
        }
        out
    }

    /// Prometheus text of the proxy's families (`mesh_l7_requests_total`,
    /// `mesh_l7_request_duration_seconds`), without the closing `# EOF`.
    pub fn render_prometheus(&self) -> String {
        let mut registry = Registry::with_prefix("mesh_l7");
        registry.register(
            "requests",
            "Requests served by the L7 proxy, by service, route, destination and status class",
            self.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers at the L7 proxy",
            self.latency.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &registry).expect("metrics encode into a String");
        out.strip_suffix("# EOF\n")
            .map(str::to_string)
            .unwrap_or(out)
    }
}

/// One L7 service in `meshctl stats`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct L7ServiceStats {
    /// The address clients use.
    pub address: ServiceAddress,
    /// Display name.
    pub name: String,
    /// Requests answered (all routes).
    pub requests: u64,
    /// Per route.
    pub routes: Vec<L7RouteStats>,
}

/// One route of an L7 service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct L7RouteStats {
    /// Route name.
    pub route: String,
    /// Requests answered.
    pub requests: u64,
    /// Per destination (an empty destination: answers the proxy gave itself).
    pub destinations: Vec<L7DestinationStats>,
}

/// One destination (subset) of a route.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct L7DestinationStats {
    /// Cluster name (`host|subset|port`); empty for local answers.
    pub destination: String,
    /// Subset.
    pub subset: Option<String>,
    /// Requests answered.
    pub requests: u64,
    /// Requests by status class 1xx..5xx.
    pub status_classes: [u64; 5],
    /// Configured share within the route (weight / sum of weights), if still configured.
    pub configured_share: Option<f64>,
    /// Observed share of the route's forwarded requests.
    pub observed_share: f64,
    /// Requests per latency bucket (bounds: [`latency_bucket_bound`]), not cumulative.
    #[serde(default)]
    pub latency_buckets: Vec<u64>,
}

/// The L7 part of `meshctl stats` as text.
pub fn render_l7_stats(services: &[L7ServiceStats]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for service in services {
        let _ = writeln!(
            out,
            "\n{} ({}:{}/L7 proxy)  requests {}",
            service.name, service.address.ip, service.address.port, service.requests
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<36} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "ROUTE", "DESTINATION", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "SHARE", "WEIGHT"
        );
        for route in &service.routes {
            for d in &route.destinations {
                let destination = if d.destination.is_empty() {
                    "(answered by the proxy)"
                } else {
                    d.destination.as_str()
                };
                let share = if d.destination.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1}%", d.observed_share * 100.0)
                };
                let weight = d
                    .configured_share
                    .filter(|_| !d.destination.is_empty())
                    .map(|s| format!("{:.1}%", s * 100.0))
                    .unwrap_or_else(|| "-".into());
                let c = d.status_classes;
                let _ = writeln!(
                    out,
                    "  {:<24} {:<36} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
                    route.route, destination, d.requests, c[1], c[2], c[3], c[4], share, weight
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::L4Protocol;

    #[test]
    fn snapshot_computes_observed_shares_per_route() {
        let stats = ProxyStats::default();
        let address = ServiceAddress {
            ip: "198.18.100.1".parse().unwrap(),
            port: 80,
            protocol: L4Protocol::Tcp,
        };
        let key = |d: &str| StatsKey {
            address,
            service: "echo".into(),
            route: "r".into(),
            destination: d.into(),
            subset: d.into(),
        };
        for _ in 0..3 {
            stats
                .counters(&key("v1"))
                .observe(200, Duration::from_millis(1));
        }
        stats
            .counters(&key("v2"))
            .observe(503, Duration::from_millis(1));
        stats.set_configured(BTreeMap::from([(key("v1"), 0.5), (key("v2"), 0.5)]));
        let snap = stats.snapshot(&[(address, "echo".into())]);
        let route = &snap[0].routes[0];
        assert_eq!(route.requests, 4);
        let v1 = route
            .destinations
            .iter()
            .find(|d| d.destination == "v1")
            .unwrap();
        assert_eq!(v1.observed_share, 0.75);
        assert_eq!(v1.status_classes[1], 3);
        assert!(stats
            .render_prometheus()
            .contains("mesh_l7_requests_total{"));
        assert!(render_l7_stats(&snap).contains("75.0%"));
    }
}
