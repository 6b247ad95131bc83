//! The one decision "kernel path or L7 proxy" for a service address, and its reason.
//!
//! [`decide`] is the only place the choice is made. What it looks at is gathered per address by
//! [`super::services`]: what the first applicable route asks for ([`route_need`]: a condition
//! or feature only requests carry, or nothing beyond weights), whether the DestinationRule
//! hashes on something only HTTP carries, whether several Gateways share the port, and whether
//! the listener can be served as HTTP at all. The answer ([`Path`]) names its reason; `meshctl
//! get services -o wide` prints it.

use std::fmt;

use serde::Serialize;

use crate::{
    config::{HttpMatchRequest, HttpRoute, Resource},
    validate::ValidationError,
};

/// Where a service address is served, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "path", content = "reason", rename_all = "lowercase")]
pub enum Path {
    /// The XDP/TC program, per connection (weighted Maglev).
    Kernel(KernelReason),
    /// The L7 proxy inside meshd, per request.
    Proxy(ProxyReason),
}

impl Path {
    /// `kernel` or `proxy`.
    pub fn name(&self) -> &'static str {
        match self {
            Path::Kernel(_) => "kernel",
            Path::Proxy(_) => "proxy",
        }
    }

    /// The reason alone, as a sentence.
    pub fn reason(&self) -> String {
        match self {
            Path::Kernel(why) => why.to_string(),
            Path::Proxy(why) => why.to_string(),
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.reason())
    }
}

/// Why the kernel path can serve an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelReason {
    /// A TCP route applies.
    TcpRoute {
        /// The rule (`VirtualService ns/name`).
        rule: String,
        /// Its field path (`spec.tcp[0]`).
        field: String,
    },
    /// The first applicable HTTP route carries nothing but weighted destinations.
    WeightsOnly {
        /// The rule (`VirtualService ns/name`).
        rule: String,
        /// Its field path (`spec.http[0]`).
        field: String,
    },
    /// No rule routes this address: every endpoint of the host, by endpoint weight.
    NoRoute,
}

impl fmt::Display for KernelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelReason::TcpRoute { rule, field } => write!(f, "TCP route {field} of {rule}"),
            KernelReason::WeightsOnly { rule, field } => {
                write!(
                    f,
                    "HTTP route {field} of {rule} has only weighted destinations"
                )
            }
            KernelReason::NoRoute => f.write_str("no route: all endpoints of the host"),
        }
    }
}

/// Why an address needs the L7 proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProxyReason {
    /// An applicable match has a condition only a request carries.
    RequestMatch {
        /// The rule (`VirtualService ns/name`).
        rule: String,
        /// The match's field path (`spec.http[0].match[1]`).
        field: String,
        /// The condition (`headers`, `uri`, ...).
        condition: &'static str,
    },
    /// An applicable HTTP route uses a per-request feature.
    RouteFeature {
        /// The rule (`VirtualService ns/name`).
        rule: String,
        /// The route's field path (`spec.http[0]`).
        field: String,
        /// The feature (`fault`, `retries`, `mirror`, ...).
        feature: &'static str,
    },
    /// The DestinationRule hashes on a header, cookie or query parameter.
    HttpHash {
        /// The DestinationRule (`DestinationRule ns/name`).
        rule: String,
        /// `httpHeaderName`, `httpCookie` or `httpQueryParameterName`.
        key: &'static str,
    },
    /// Several Gateways share the port: requests are told apart by their Host header.
    SharedGatewayPort {
        /// The port.
        port: u16,
    },
}

impl ProxyReason {
    /// The resource the reason names (for errors).
    fn rule(&self) -> String {
        match self {
            ProxyReason::RequestMatch { rule, .. }
            | ProxyReason::RouteFeature { rule, .. }
            | ProxyReason::HttpHash { rule, .. } => rule.clone(),
            ProxyReason::SharedGatewayPort { port } => format!("several Gateways on port {port}"),
        }
    }
}

impl fmt::Display for ProxyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyReason::RequestMatch {
                rule,
                field,
                condition,
            } => write!(f, "{field} of {rule} matches on {condition}"),
            ProxyReason::RouteFeature {
                rule,
                field,
                feature,
            } => write!(f, "{field} of {rule} uses {feature}"),
            ProxyReason::HttpHash { rule, key } => {
                write!(f, "{rule} hashes on {key} (consistentHash)")
            }
            ProxyReason::SharedGatewayPort { port } => write!(
                f,
                "several Gateways share port {port}: requests are told apart by Host header"
            ),
        }
    }
}

/// A load balancer hashing on an HTTP attribute.
pub(crate) struct HttpHash {
    /// The reason, when the address can go to the proxy.
    pub reason: ProxyReason,
    /// The error, when it cannot (the route is TCP, or the listener is not HTTP).
    pub not_http: ValidationError,
}

/// A Gateway server the proxy cannot serve (not HTTP/HTTP2): named in the error.
pub(crate) struct NonHttpServer<'a> {
    pub resource: &'a Resource,
    pub field: String,
    pub protocol: String,
}

/// Everything [`decide`] looks at for one address.
pub(crate) struct PathInputs<'a> {
    /// What the applicable routes ask for: the first proxy need, else the kernel reason.
    pub route: Path,
    /// The selected route is HTTP (an HTTP route, or the default route of an HTTP port), so
    /// hashing on HTTP attributes can move it to the proxy.
    pub http_route: bool,
    /// The load balancer's HTTP hashing, if any.
    pub http_hash: Option<HttpHash>,
    /// Set when the listener is a Gateway server the proxy cannot serve.
    pub non_http_server: Option<NonHttpServer<'a>>,
}

/// THE decision: kernel path or L7 proxy, with its reason; an error when the rules need the
/// proxy where it cannot serve.
pub(crate) fn decide(inputs: PathInputs) -> Result<Path, ValidationError> {
    let why = match inputs.route {
        Path::Proxy(why) => why,
        Path::Kernel(why) => match inputs.http_hash {
            None => return Ok(Path::Kernel(why)),
            Some(hash) if inputs.http_route && inputs.non_http_server.is_none() => hash.reason,
            Some(hash) => return Err(hash.not_http),
        },
    };
    match inputs.non_http_server {
        None => Ok(Path::Proxy(why)),
        Some(server) => Err(ValidationError::new(
            server.resource,
            format!("{}.port.protocol", server.field),
            format!(
                "`{}` has HTTP routes that need the L7 proxy ({why}), which serves gateway servers with protocol HTTP or HTTP2, not {}",
                why.rule(),
                server.protocol
            ),
        )),
    }
}

/// What an applicable HTTP route asks of the path: the proxy (with the first match condition
/// or feature that needs it) or nothing beyond weights.
pub(crate) fn route_need(
    rule: &Resource,
    field: &str,
    route: &HttpRoute,
    applicable: &[(usize, &HttpMatchRequest)],
) -> Path {
    let rule_name = rule.display_name();
    if let Some((j, condition)) = applicable
        .iter()
        .find_map(|(j, m)| m.first_l7_condition().map(|c| (*j, c)))
    {
        return Path::Proxy(ProxyReason::RequestMatch {
            rule: rule_name,
            field: format!("{field}.match[{j}]"),
            condition,
        });
    }
    match l7_feature(route) {
        Some(feature) => Path::Proxy(ProxyReason::RouteFeature {
            rule: rule_name,
            field: field.to_string(),
            feature,
        }),
        None => Path::Kernel(KernelReason::WeightsOnly {
            rule: rule_name,
            field: field.to_string(),
        }),
    }
}

/// Names the first thing an HTTP route asks for beyond weighted forwarding, or `None`.
fn l7_feature(route: &HttpRoute) -> Option<&'static str> {
    let features = [
        (route.redirect.is_some(), "redirect"),
        (route.direct_response.is_some(), "directResponse"),
        (route.delegate.is_some(), "delegate"),
        (route.rewrite.is_some(), "rewrite"),
        // Per-request deadlines and retries cannot be enforced per connection; ignoring them
        // would silently change behaviour.
        (route.timeout.is_some(), "timeout"),
        (route.retries.is_some(), "retries"),
        (route.fault.is_some(), "fault"),
        (route.mirror.is_some(), "mirror"),
        (!route.mirrors.is_empty(), "mirrors"),
        (route.mirror_percentage.is_some(), "mirrorPercentage"),
        (route.mirror_percent.is_some(), "mirrorPercent"),
        (route.cors_policy.is_some(), "corsPolicy"),
        (route.headers.is_some(), "headers"),
    ];
    if let Some((_, name)) = features.iter().find(|(present, _)| *present) {
        return Some(name);
    }
    route
        .route
        .iter()
        .any(|d| d.headers.is_some())
        .then_some("route.headers")
}

/// Istio port protocols that carry HTTP.
pub(crate) fn is_http_protocol(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| {
        matches!(
            p.to_ascii_uppercase().as_str(),
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB"
        )
    })
}

/// Whether a Gateway listener is served as HTTP (the proxy's gateway servers).
pub(crate) fn http_server_protocol(protocol: &str) -> bool {
    matches!(protocol, "HTTP" | "HTTP2")
}
