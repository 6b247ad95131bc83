//! The proxy's run-time route table: an [`L7Plan`] per service address with regexes compiled,
//! balancers and upstream clients attached, swapped in one step on every apply.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};
use regex::Regex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    balance::Balancer,
    matching::{MatchError, Matcher, RequestMatcher},
    stats::{ProxyStats, RouteCounters, StatsKey},
};
use crate::compile::{ClusterPlan, HttpRoutePlan, L7Plan, RouteActionPlan, ServiceAddress};

/// Error type of bodies the proxy sends and receives.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Envoy's circuit-breaker defaults, used when a DestinationRule sets no limit: requests in
/// flight per cluster, and requests waiting for one of them.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// See [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_PENDING: u32 = 1024;
/// Connect deadline when the DestinationRule gives none (Istio's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// An upstream cluster: backends, balancer, connection limits and a pooled client.
pub struct ClusterRuntime {
    /// The compiled plan (compared on apply to reuse state).
    pub plan: ClusterPlan,
    /// Backend choice and outlier state.
    pub balancer: Balancer,
    /// Pooled HTTP client (connections are reused across requests).
    pub client: Client<HttpConnector, ProxyBody>,
    permits: Arc<Semaphore>,
    pending: AtomicU32,
    max_pending: u32,
}

impl ClusterRuntime {
    fn new(plan: ClusterPlan) -> Self {
        let pool = &plan.policy.connection_pool;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(
            pool.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        ));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout.unwrap_or(Duration::from_secs(60)))
            .http2_only(plan.http2);
        // maxRequestsPerConnection 1: never reuse an upstream connection.
        if pool.max_requests_per_connection == Some(1) {
            builder.pool_max_idle_per_host(0);
        }
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
            client: builder.build(connector),
            permits: Arc::new(Semaphore::new(
                pool.max_connections
                    .unwrap_or(DEFAULT_MAX_CONNECTIONS)
                    .max(1) as usize,
            )),
            pending: AtomicU32::new(0),
            max_pending: pool.max_pending_requests.unwrap_or(DEFAULT_MAX_PENDING),
            plan,
        }
    }

    /// A slot for one request to the cluster: at once if one is free, else after waiting in a
    /// bounded queue; `None` (overflow, answer 503) when the queue is full too.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = self.permits.clone().acquire_owned().await.ok();
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit
    }
}

/// Builds a table from the L7 plans of a desired state, reusing clusters whose plan did not
/// change (keeping their pooled connections and outlier state).
pub fn build(
    plans: &[(ServiceAddress, String, &L7Plan)],
    previous: &RouteTable,
    stats: &ProxyStats,
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
                    .unwrap_or_else(|| Arc::new(ClusterRuntime::new(c.clone())))
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
                if let RouteActionPlan::Forward { destinations } = &route.action {
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
