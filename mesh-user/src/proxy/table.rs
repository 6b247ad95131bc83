//! The proxy's run-time route table: an [`L7Plan`] per service address with regexes compiled,
//! balancers and upstream clients attached, swapped in one step on every apply.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use regex::Regex;

use super::{
    balance::Balancer,
    matching::{MatchError, Matcher, RequestMatcher},
    rewrite::HeaderOps,
    slots::{Slot, Slots},
    stats::{ProxyStats, RouteCounters, StatsKey},
    upstream::{PoolSettings, Upstream},
};
use crate::compile::{ClusterPlan, HttpRoutePlan, L7Plan, RouteActionPlan, ServiceAddress};

/// Error type of bodies the proxy sends and receives.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Envoy's circuit-breaker defaults, used when a DestinationRule sets no limit: requests in
/// flight per cluster, and requests waiting for one of them.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// See [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_PENDING: u32 = 1024;
/// Connect deadline when the DestinationRule gives none (Istio's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle upstream connections close after this when the DestinationRule gives no idleTimeout.
pub const DEFAULT_UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// Every L7 service in force.
#[derive(Default)]
pub struct RouteTable {
    /// By service address.
    pub services: HashMap<ServiceAddress, Arc<ServiceRuntime>>,
}

/// One L7 service address.
pub struct ServiceRuntime {
    /// Display name.
    pub name: String,
    /// Virtual hosts in order.
    pub virtual_hosts: Vec<VirtualHostRuntime>,
    /// Clusters by index (as referenced from routes).
    pub clusters: Vec<Arc<ClusterRuntime>>,
    /// Counters for requests no route matched.
    pub unmatched: Arc<RouteCounters>,
}

/// A virtual host.
pub struct VirtualHostRuntime {
    /// Host patterns.
    pub domains: Vec<String>,
    /// Routes in order.
    pub routes: Vec<RouteRuntime>,
}

/// A route with its compiled matchers and counters.
pub struct RouteRuntime {
    /// The compiled plan.
    pub plan: HttpRoutePlan,
    /// One per `match` entry.
    pub matchers: Vec<RequestMatcher>,
    /// `rewrite.uriRegexRewrite` pattern.
    pub uri_regex: Option<Regex>,
    /// CORS origins.
    pub cors_origins: Vec<Matcher>,
    /// Counters per forward destination (same order as the action's destinations).
    pub destination_counters: Vec<Arc<RouteCounters>>,
    /// Counters of answers the proxy gives itself on this route.
    pub local_counters: Arc<RouteCounters>,
    /// Route name (access log).
    pub name: Arc<str>,
    /// The route's request and response header operations.
    pub request_ops: HeaderOps,
    /// See `request_ops`.
    pub response_ops: HeaderOps,
    /// Per forward destination: request and response header operations.
    pub destination_ops: Vec<(HeaderOps, HeaderOps)>,
}

/// An upstream cluster: backends, balancer, connection limits and a pooled client.
pub struct ClusterRuntime {
    /// The compiled plan (compared on apply to reuse state).
    pub plan: ClusterPlan,
    /// Backend choice and outlier state.
    pub balancer: Balancer,
    /// Upstream connection pools, per worker and backend.
    pub upstream: Upstream,
    /// Subset name (access log).
    pub subset: Arc<str>,
    /// The circuit breaker on requests in flight and waiting.
    pub slots: Slots,
}

impl ClusterRuntime {
    fn new(plan: ClusterPlan, workers: usize) -> Self {
        let pool = &plan.policy.connection_pool;
        let settings = PoolSettings {
            http2: plan.http2,
            connect_timeout: pool.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: pool.idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE),
            // maxRequestsPerConnection: 0 means unlimited in Istio.
            max_requests: pool.max_requests_per_connection.filter(|n| *n > 0),
        };
        let backends: Vec<_> = plan
            .backends
            .iter()
            .map(|b| (b.address, b.weight))
            .collect();
        Self {
            balancer: Balancer::new(
                &backends,
                plan.policy.load_balancer.clone(),
                plan.policy.outlier_detection.clone(),
            ),
            upstream: Upstream::new(settings, workers, plan.backends.len()),
            subset: plan.subset.as_deref().unwrap_or("").into(),
            slots: Slots::new(
                pool.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS) as usize,
                pool.max_pending_requests.unwrap_or(DEFAULT_MAX_PENDING),
            ),
            plan,
        }
    }

    /// A slot for one request to the cluster: at once if one is free, else after waiting in a
    /// bounded queue; `None` (overflow, answer 503) when the queue is full too.
    pub async fn acquire(&self) -> Option<Slot<'_>> {
        self.slots.acquire().await
    }
}

/// Builds a table from the L7 plans of a desired state, reusing clusters whose plan did not
/// change (keeping their pooled connections and outlier state).
pub fn build(
    plans: &[(ServiceAddress, String, &L7Plan)],
    previous: &RouteTable,
    stats: &ProxyStats,
    workers: usize,
) -> Result<RouteTable, MatchError> {
    let mut services = HashMap::new();
    let mut configured = BTreeMap::new();
    for (address, name, plan) in plans {
        let old = previous.services.get(address);
        let clusters: Vec<Arc<ClusterRuntime>> = plan
            .clusters
            .iter()
            .map(|c| {
                old.and_then(|o| o.clusters.iter().find(|x| x.plan == *c).cloned())
                    .unwrap_or_else(|| Arc::new(ClusterRuntime::new(c.clone(), workers)))
            })
            .collect();
        let key = |route: &str, cluster: Option<&ClusterPlan>| StatsKey {
            address: *address,
            service: name.clone(),
            route: route.to_string(),
            destination: cluster.map(|c| c.name.clone()).unwrap_or_default(),
            subset: cluster.and_then(|c| c.subset.clone()).unwrap_or_default(),
        };
        let mut virtual_hosts = Vec::new();
        for vh in &plan.virtual_hosts {
            let mut routes = Vec::new();
            for route in &vh.routes {
                let matchers = route
                    .matches
                    .iter()
                    .map(RequestMatcher::new)
                    .collect::<Result<Vec<_>, _>>()?;
                let uri_regex = match route.rewrite.as_ref().and_then(|r| r.uri_regex.as_ref()) {
                    Some((pattern, _)) => {
                        Some(Regex::new(pattern).map_err(|source| MatchError::Regex {
                            pattern: pattern.clone(),
                            source,
                        })?)
                    }
                    None => None,
                };
                let cors_origins = route
                    .cors
                    .as_ref()
                    .map(|c| {
                        c.allow_origins
                            .iter()
                            .map(|o| Matcher::new(o, false))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?
                    .unwrap_or_default();
                let mut destination_counters = Vec::new();
                let mut destination_ops = Vec::new();
                if let RouteActionPlan::Forward { destinations } = &route.action {
                    destination_ops = destinations
                        .iter()
                        .map(|d| {
                            (
                                HeaderOps::new(&d.headers.request),
                                HeaderOps::new(&d.headers.response),
                            )
                        })
                        .collect();
                    let total: u32 = destinations.iter().map(|d| d.weight).sum();
                    for d in destinations {
                        let k = key(&route.name, Some(&plan.clusters[d.cluster]));
                        if total > 0 {
                            *configured.entry(k.clone()).or_insert(0.0) +=
                                f64::from(d.weight) / f64::from(total);
                        }
                        destination_counters.push(stats.counters(&k));
                    }
                }
                routes.push(RouteRuntime {
                    name: route.name.as_str().into(),
                    request_ops: HeaderOps::new(&route.headers.request),
                    response_ops: HeaderOps::new(&route.headers.response),
                    destination_ops,
                    plan: route.clone(),
                    matchers,
                    uri_regex,
                    cors_origins,
                    destination_counters,
                    local_counters: stats.counters(&key(&route.name, None)),
                });
            }
            virtual_hosts.push(VirtualHostRuntime {
                domains: vh.domains.clone(),
                routes,
            });
        }
        services.insert(
            *address,
            Arc::new(ServiceRuntime {
                name: name.clone(),
                virtual_hosts,
                clusters,
                unmatched: stats.counters(&key("(no route)", None)),
            }),
        );
    }
    stats.set_configured(configured);
    Ok(RouteTable { services })
}
