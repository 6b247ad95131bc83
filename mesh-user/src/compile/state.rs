//! The compiler's output: what the node must enforce, with no I/O attached.
//!
//! A [`DesiredState`] is the single input of the dataplane and the L7 proxy. It is built by
//! [`super::compile`] from a resolved model and applied all-or-nothing.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Transport protocol of a service address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Protocol {
    /// TCP (Istio protocols TCP, HTTP, HTTP2, GRPC, TLS, HTTPS, MONGO, REDIS, MYSQL).
    Tcp,
    /// UDP.
    Udp,
}

/// Where clients send traffic: a VIP from a ServiceEntry, or a node address for a Gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// Address clients connect to.
    pub ip: IpAddr,
    /// Port clients connect to.
    pub port: u16,
    /// Transport protocol.
    pub protocol: L4Protocol,
}

/// Everything one node enforces.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DesiredState {
    /// One entry per service address, sorted by address (deterministic output).
    pub services: Vec<ServicePlan>,
    /// What validation warned about (dangling references, empty subsets, fields mesh does not
    /// implement but can ignore safely): printed by `meshctl` and logged by meshd.
    #[serde(skip)]
    pub warnings: Vec<crate::validate::Warning>,
}

/// How one service address is served.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePlan {
    /// The address clients use.
    pub address: ServiceAddress,
    /// Human name for stats: the Istio host (or `gateway/<name>` for a Gateway server).
    pub name: String,
    /// Resources this plan was compiled from (`kind/namespace/name`), for `meshctl` and errors.
    pub sources: Vec<String>,
    /// Kernel path or proxy, and why (decided by [`crate::resolve::path::decide`]).
    pub path: crate::resolve::Path,
    /// The kernel path or the L7 proxy.
    pub plan: Plan,
}

/// The per-service decision "kernel path or L7 proxy", made from the rules alone.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Plan {
    /// Served entirely by the XDP program.
    L4(L4Plan),
    /// Served by the L7 proxy in meshd (per-request routing).
    L7(L7Plan),
}

/// A weighted Maglev plan executed in the kernel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L4Plan {
    /// Backends that may appear in `table` (weight > 0), sorted by address.
    pub backends: Vec<BackendPlan>,
    /// Maglev lookup table: `table.len()` is the (prime) table size M; each entry is an index
    /// into `backends`. Empty when the service has no backend with weight > 0.
    pub table: Vec<u32>,
    /// `consistentHash.useSourceIp`: hash the client address only.
    pub hash_source_ip: bool,
    /// The table size was picked from the backend count (no `maglev.tableSize`), so the
    /// dataplane may keep the size already installed (see `maglev::keep_table_size`).
    pub sized_by_default: bool,
}

/// One backend of an L4 plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendPlan {
    /// Where the backend listens (endpoint address, resolved target port).
    pub address: SocketAddr,
    /// Destination subset it was selected through (`None` when the route names no subset).
    pub subset: Option<String>,
    /// The endpoint's labels, for stats (`version` in particular).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Configured share of new connections, 0.0..=1.0 (route weight x endpoint weight, normalised).
    pub share: f64,
}

/// An HTTP route table executed by the L7 proxy inside meshd (the XDP program passes this
/// address's packets to the kernel, which delivers them to the proxy's listener).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L7Plan {
    /// Virtual hosts in order; a request uses the first whose domains match its Host header.
    /// A ServiceEntry VIP has one catch-all (`*`) virtual host: the address already names the
    /// service.
    pub virtual_hosts: Vec<VirtualHostPlan>,
    /// Upstream clusters (one per destination host, subset and port), referenced by index from
    /// routes and mirrors.
    pub clusters: Vec<ClusterPlan>,
    /// Protocol the clients speak: plain HTTP/1.1 and h2c are both accepted on every L7 port;
    /// this only documents the declared port protocol.
    pub declared_protocol: String,
}

/// Routes for a set of Host header values.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualHostPlan {
    /// Host patterns (`*`, `*.example.com`, `example.com`), compared without the port.
    pub domains: Vec<String>,
    /// Routes, first match wins.
    pub routes: Vec<HttpRoutePlan>,
}

/// One compiled Istio `HTTPRoute`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoutePlan {
    /// Route name for logs and metrics (the rule's `name`, else `<vs>.http[<i>]`).
    pub name: String,
    /// Alternatives (ORed); each one's conditions are ANDed. Empty: every request.
    pub matches: Vec<RequestMatchPlan>,
    /// What to do with a matching request.
    pub action: RouteActionPlan,
    /// Path and authority rewrite before forwarding.
    pub rewrite: Option<RewritePlan>,
    /// Overall deadline for the request, retries included.
    pub timeout: Option<std::time::Duration>,
    /// Retry policy (Istio's default when the rule gives none).
    pub retries: RetryPlan,
    /// Injected delay and abort.
    pub fault: Option<FaultPlan>,
    /// Fire-and-forget copies of requests.
    pub mirrors: Vec<MirrorPlan>,
    /// Header operations on the request and response of this route.
    pub headers: HeaderOpsPlan,
    /// CORS policy.
    pub cors: Option<CorsPlan>,
}

/// One `HTTPMatchRequest`; every condition present must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestMatchPlan {
    /// Path (without the query string).
    pub uri: Option<StringMatchPlan>,
    /// `http` or `https`.
    pub scheme: Option<StringMatchPlan>,
    /// Request method.
    pub method: Option<StringMatchPlan>,
    /// Host header / `:authority`.
    pub authority: Option<StringMatchPlan>,
    /// Headers that must be present and match (names lower-case).
    pub headers: Vec<(String, StringMatchPlan)>,
    /// Headers that must not match (absent, or present with a non-matching value).
    pub without_headers: Vec<(String, StringMatchPlan)>,
    /// Query parameters that must be present and match.
    pub query_params: Vec<(String, StringMatchPlan)>,
    /// Compare `uri` case-insensitively (exact and prefix).
    pub ignore_uri_case: bool,
}

/// An Istio `StringMatch`. Regexes are RE2 syntax matched against the whole value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StringMatchPlan {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Full-value regex match.
    Regex(String),
}

/// What a route does with a request.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouteActionPlan {
    /// Forward to one of the weighted clusters, chosen per request.
    Forward {
        /// Destinations with their weights (a lone destination gets everything).
        destinations: Vec<WeightedClusterPlan>,
    },
    /// Answer with a redirect.
    Redirect(RedirectPlan),
    /// Answer directly.
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body bytes.
        body: Vec<u8>,
    },
}

/// A weighted destination of a route.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedClusterPlan {
    /// Index into [`L7Plan::clusters`].
    pub cluster: usize,
    /// Relative weight (0 never chosen).
    pub weight: u32,
    /// Header operations for requests sent to this destination.
    pub headers: HeaderOpsPlan,
}

/// `HTTPRedirect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RedirectPlan {
    /// Replacement path (with query) or `None` to keep the request's.
    pub uri: Option<String>,
    /// Replacement authority.
    pub authority: Option<String>,
    /// Replacement port.
    pub port: Option<u16>,
    /// Use the request's port (`derivePort: FROM_REQUEST_PORT`).
    pub port_from_request: bool,
    /// Replacement scheme.
    pub scheme: Option<String>,
    /// Status code (301 by default).
    pub status: u16,
}

/// `HTTPRewrite`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RewritePlan {
    /// Replaces the part of the path the route's `uri` match matched (the whole path for exact
    /// and regex matches, the prefix for prefix matches).
    pub uri: Option<String>,
    /// Replaces the Host header.
    pub authority: Option<String>,
    /// Regex replacement over the path: (pattern, replacement with `\1` groups).
    pub uri_regex: Option<(String, String)>,
}

/// Retry policy of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPlan {
    /// Retries after the first try (0: no retry).
    pub attempts: u32,
    /// Deadline of each try.
    pub per_try_timeout: Option<std::time::Duration>,
    /// Conditions retried (Envoy's `retryOn` vocabulary, which Istio passes through).
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried under `retriable-status-codes` (and listed bare in `retryOn`).
    pub retriable_status_codes: Vec<u16>,
}

impl RetryPlan {
    /// Istio's policy when a route gives none: 2 retries on connect failure, refused stream,
    /// unavailable, cancelled and 503.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            retriable_status_codes: vec![503],
        }
    }
}

/// One `retryOn` condition: Envoy's HTTP and gRPC conditions that Istio passes through
/// (anything else is refused when the rules are resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
pub enum RetryOn {
    /// `5xx`: any 5xx response, and tries that got no response.
    FiveXx,
    /// `gateway-error`: 502, 503, 504, and tries that got no response.
    GatewayError,
    /// `connect-failure`.
    ConnectFailure,
    /// `reset`: the connection broke (or the try timed out) before a response.
    Reset,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// `retriable-4xx`: 409.
    Retriable4xx,
    /// `retriable-status-codes`: the listed codes.
    RetriableStatusCodes,
    /// gRPC `cancelled` (grpc-status 1).
    Cancelled,
    /// gRPC `deadline-exceeded` (4).
    DeadlineExceeded,
    /// gRPC `resource-exhausted` (8).
    ResourceExhausted,
    /// gRPC `unavailable` (14).
    Unavailable,
    /// gRPC `internal` (13).
    Internal,
}

impl RetryOn {
    /// Every condition, in Envoy's documentation order.
    pub const ALL: [RetryOn; 12] = [
        RetryOn::FiveXx,
        RetryOn::GatewayError,
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::RefusedStream,
        RetryOn::Retriable4xx,
        RetryOn::RetriableStatusCodes,
        RetryOn::Cancelled,
        RetryOn::DeadlineExceeded,
        RetryOn::ResourceExhausted,
        RetryOn::Unavailable,
        RetryOn::Internal,
    ];

    /// The name as written in `retryOn`.
    pub fn name(self) -> &'static str {
        match self {
            RetryOn::FiveXx => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::RefusedStream => "refused-stream",
            RetryOn::Retriable4xx => "retriable-4xx",
            RetryOn::RetriableStatusCodes => "retriable-status-codes",
            RetryOn::Cancelled => "cancelled",
            RetryOn::DeadlineExceeded => "deadline-exceeded",
            RetryOn::ResourceExhausted => "resource-exhausted",
            RetryOn::Unavailable => "unavailable",
            RetryOn::Internal => "internal",
        }
    }

    /// The condition named `token`, if mesh knows it.
    pub fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == token)
    }
}

impl From<RetryOn> for &'static str {
    fn from(condition: RetryOn) -> Self {
        condition.name()
    }
}

impl std::fmt::Display for RetryOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Fault injection of a route.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultPlan {
    /// (delay, share of requests 0..=1).
    pub delay: Option<(std::time::Duration, f64)>,
    /// (status, share of requests 0..=1).
    pub abort: Option<(u16, f64)>,
}

/// A mirror target.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MirrorPlan {
    /// Index into [`L7Plan::clusters`].
    pub cluster: usize,
    /// Share of requests mirrored, 0..=1.
    pub share: f64,
}

/// Header set/add/remove for requests and responses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOpsPlan {
    /// On the request to the upstream.
    pub request: HeaderOpPlan,
    /// On the response to the client.
    pub response: HeaderOpPlan,
}

/// One direction's header operations (names lower-case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOpPlan {
    /// Overwrite.
    pub set: Vec<(String, String)>,
    /// Append.
    pub add: Vec<(String, String)>,
    /// Remove.
    pub remove: Vec<String>,
}

/// `CorsPolicy`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CorsPlan {
    /// Allowed origins.
    pub allow_origins: Vec<StringMatchPlan>,
    /// `Access-Control-Allow-Methods`.
    pub allow_methods: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers`.
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age`.
    pub max_age: Option<std::time::Duration>,
    /// `Access-Control-Allow-Credentials`.
    pub allow_credentials: bool,
}

/// An upstream cluster: one destination host, subset and port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterPlan {
    /// `host|subset|port`, for logs and metrics.
    pub name: String,
    /// Destination host (as written in the rule).
    pub host: String,
    /// Subset name.
    pub subset: Option<String>,
    /// Service port of the host.
    pub port: u16,
    /// Speak HTTP/2 (prior knowledge) to the backends: the port protocol is HTTP2 or GRPC.
    pub http2: bool,
    /// Endpoints with weight > 0 of the client's address family.
    pub backends: Vec<L7BackendPlan>,
    /// Load balancing, connection limits and outlier detection (subset policy over host
    /// policy, field by field).
    pub policy: TrafficPolicyPlan,
}

/// One endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L7BackendPlan {
    /// Where it listens.
    pub address: SocketAddr,
    /// Endpoint weight.
    pub weight: u32,
    /// Endpoint labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A DestinationRule traffic policy as the proxy applies it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrafficPolicyPlan {
    /// Backend choice.
    pub load_balancer: LoadBalancerPlan,
    /// Connection and request limits.
    pub connection_pool: ConnectionPoolPlan,
    /// Ejection of failing backends.
    pub outlier_detection: Option<OutlierPlan>,
}

/// Backend choice within a cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LoadBalancerPlan {
    /// Least requests, power of two choices (Istio's default).
    #[default]
    LeastRequest,
    /// Weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Consistent hash of a header value.
    HashHeader {
        /// Header name (lower-case).
        name: String,
    },
    /// Consistent hash of a cookie value (set when absent and a ttl is given).
    HashCookie {
        /// Cookie name.
        name: String,
        /// Path of a generated cookie.
        path: Option<String>,
        /// Lifetime of a generated cookie.
        ttl: Option<std::time::Duration>,
    },
    /// Consistent hash of the client address.
    HashSourceIp,
    /// Consistent hash of a query parameter.
    HashQueryParameter {
        /// Parameter name.
        name: String,
    },
}

/// `connectionPool` limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPoolPlan {
    /// Requests in flight to the cluster at once (each holds one upstream HTTP/1 connection).
    pub max_connections: Option<u32>,
    /// TCP connect deadline.
    pub connect_timeout: Option<std::time::Duration>,
    /// Requests allowed to wait for a free connection; beyond it, 503 at once.
    pub max_pending_requests: Option<u32>,
    /// Requests per upstream connection (1 disables keep-alive).
    pub max_requests_per_connection: Option<u32>,
    /// Idle upstream connections are closed after this.
    pub idle_timeout: Option<std::time::Duration>,
}

/// `outlierDetection`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierPlan {
    /// Consecutive 5xx (and connect failures) before ejection.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (and connect failures) before ejection.
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reconsidered.
    pub interval: std::time::Duration,
    /// Ejection time, multiplied by the number of times the backend was ejected.
    pub base_ejection_time: std::time::Duration,
    /// Most backends ejected at once, in percent (at least one backend may always be ejected).
    pub max_ejection_percent: u32,
}
