//! The decision trace behind `meshctl trace`: what the kernel path decided for each packet and
//! what the proxy decided for each request, for the flows a filter selects.
//!
//! - [`kernel`]: the ring buffer reader and the kernel's filter map;
//! - [`hub`]: subscribers (one per `meshctl trace`), their filters and the process-wide hub the
//!   proxy reports requests to;
//! - this module: the filter as the user writes it and the event as meshctl shows it.
//!
//! Nothing is traced while nobody listens: the kernel check is one array read, the proxy's one
//! atomic load.

pub mod hub;
pub mod kernel;

use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};

pub use hub::{hub, Hub, ProxyDecision, Subscription};

/// What to trace, as given to `meshctl trace` (every field optional; all given must match).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceFilter {
    /// Service name (`reviews`, `reviews.default.svc.cluster.local`), address or address:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Client address, or address:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Backend address, address:port, subset or version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Decision kind (`new`, `established`, `reply`, `refused`, `passed`, `dropped`,
    /// `request`), reason (`refused_no_backend`, `pass_l7_proxy`, ...) or verdict (`redirect`,
    /// `tx`, `pass`, `XDP_REDIRECT`, an HTTP status like `503` or class like `5xx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

/// Errors in a filter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// `--client` is neither an address nor address:port.
    #[error("client {0:?}: expected an IP address or address:port (e.g. 198.18.1.2 or 198.18.1.2:40112)")]
    Client(String),
    /// `--verdict` names nothing mesh reports.
    #[error("verdict {0:?}: expected new, established, reply, refused, passed, dropped, request, a reason (refused_no_backend, pass_l7_proxy, pass_ttl_expired, drop_internal), redirect, tx, pass, drop, an HTTP status (503) or class (5xx)")]
    Verdict(String),
}

const VERDICT_WORDS: &[&str] = &[
    "new",
    "established",
    "reply",
    "refused",
    "passed",
    "dropped",
    "request",
    "redirect",
    "tx",
    "pass",
    "drop",
];

impl TraceFilter {
    /// Checks the fields that have a fixed syntax.
    pub fn validate(&self) -> Result<(), FilterError> {
        if let Some(client) = &self.client {
            if parse_endpoint(client).is_none() {
                return Err(FilterError::Client(client.clone()));
            }
        }
        if let Some(v) = &self.verdict {
            let lower = v.to_ascii_lowercase();
            let word = lower.strip_prefix("xdp_").unwrap_or(&lower);
            let word = word.strip_prefix("tc_act_").unwrap_or(word);
            let status = lower.len() == 3
                && (lower.parse::<u16>().is_ok()
                    || (lower.ends_with("xx") && lower.as_bytes()[0].is_ascii_digit()));
            let reason = mesh_common::reason::NAMES.contains(&lower.as_str());
            if !VERDICT_WORDS.contains(&word) && !reason && !status {
                return Err(FilterError::Verdict(v.clone()));
            }
        }
        Ok(())
    }

    /// True when `event` is one this filter selects.
    pub fn matches(&self, event: &TraceEvent) -> bool {
        if let Some(s) = &self.service {
            let name_hit = event.service == *s
                || event.service.starts_with(&format!("{s}."))
                || event.service_addr.to_string() == *s
                || event.service_addr.ip().to_string() == *s;
            if !name_hit {
                return false;
            }
        }
        if let Some(c) = &self.client {
            match parse_endpoint(c) {
                Some((ip, port)) => {
                    if event.client.ip() != ip || port.is_some_and(|p| event.client.port() != p) {
                        return false;
                    }
                }
                None => return false,
            }
        }
        if let Some(b) = &self.backend {
            let hit = event
                .backend
                .is_some_and(|a| a.to_string() == *b || a.ip().to_string() == *b)
                || event.subset.as_deref() == Some(b.as_str())
                || event.version.as_deref() == Some(b.as_str());
            if !hit {
                return false;
            }
        }
        if let Some(v) = &self.verdict {
            let v = v.to_ascii_lowercase();
            let action = event.action.to_ascii_lowercase();
            let hit = event.kind.as_str() == v
                || event.reason.as_deref() == Some(v.as_str())
                || action == v
                || action.rsplit('_').next() == Some(v.as_str())
                || event.status.is_some_and(|s| {
                    s.to_string() == v
                        || (v.ends_with("xx") && v.starts_with(&(s / 100).to_string()))
                });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// `198.18.1.2` or `198.18.1.2:40112` or `[2001:db8::1]:80`.
pub fn parse_endpoint(s: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse() {
        return Some((ip, None));
    }
    s.parse::<SocketAddr>()
        .ok()
        .map(|a| (a.ip(), Some(a.port())))
}

/// Which decision an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A new flow: backend picked from the Maglev table.
    New,
    /// A packet of a tracked connection, to its recorded backend.
    Established,
    /// A reply from a backend, service address restored.
    Reply,
    /// A packet to a service address refused: the service has no backend.
    Refused,
    /// A packet to a service address passed on untranslated (to the L7 proxy, or to the stack
    /// for an expiring TTL).
    Passed,
    /// A packet to a service address dropped.
    Dropped,
    /// An HTTP request routed by the proxy.
    Request,
}

impl Kind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::New => "new",
            Kind::Established => "established",
            Kind::Reply => "reply",
            Kind::Refused => "refused",
            Kind::Passed => "passed",
            Kind::Dropped => "dropped",
            Kind::Request => "request",
        }
    }
}

/// One decision, as meshd streams it (one JSON object per line) and meshctl prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// Seconds since the epoch.
    pub at: f64,
    /// `xdp`, `tc` or `proxy`.
    pub hook: String,
    /// What was decided.
    pub kind: Kind,
    /// TCP flags of the packet (`SYN`, `ACK|FIN`), empty for UDP and requests.
    #[serde(default)]
    pub flags: String,
    /// The client's address and port.
    pub client: SocketAddr,
    /// Service name.
    pub service: String,
    /// The service address the client used.
    pub service_addr: SocketAddr,
    /// The backend chosen (None: the proxy answered itself).
    pub backend: Option<SocketAddr>,
    /// Its subset.
    #[serde(default)]
    pub subset: Option<String>,
    /// Its `version` label.
    #[serde(default)]
    pub version: Option<String>,
    /// Maglev slot, for new flows.
    #[serde(default)]
    pub slot: Option<u32>,
    /// The verdict: `XDP_REDIRECT`, `XDP_TX`, `XDP_PASS`, `TC_ACT_REDIRECT`, ..., or `HTTP 200`.
    pub action: String,
    /// Why a packet was refused, passed or dropped (`refused_no_backend`, `pass_l7_proxy`,
    /// `pass_ttl_expired`, `drop_internal`: the reason counters' names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Interface the packet arrived on.
    #[serde(default)]
    pub interface: Option<String>,
    /// Proxy: method, authority and path of the request.
    #[serde(default)]
    pub request: Option<String>,
    /// Proxy: the route that matched.
    #[serde(default)]
    pub route: Option<String>,
    /// Proxy: response status.
    #[serde(default)]
    pub status: Option<u16>,
}

impl fmt::Display for TraceEvent {
    /// `SYN 198.18.1.2:40112 -> reviews 198.18.100.10:9080: new flow, Maglev slot 2113 -> v3
    /// 198.18.13.2:9080, XDP_REDIRECT (in eth1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = self
            .subset
            .as_deref()
            .or(self.version.as_deref())
            .map(|s| format!("{s} "))
            .unwrap_or_default();
        let backend = self
            .backend
            .map(|b| format!("{label}{b}"))
            .unwrap_or_else(|| "local answer".into());
        let via = self
            .interface
            .as_deref()
            .map(|i| format!(" (in {i})"))
            .unwrap_or_default();
        match self.kind {
            Kind::Request => write!(
                f,
                "HTTP {} -> {} {}: {} route {} -> {}, {}",
                self.client,
                self.service,
                self.service_addr,
                self.request.as_deref().unwrap_or("-"),
                self.route.as_deref().unwrap_or("-"),
                backend,
                self.action
            ),
            Kind::Reply => write!(
                f,
                "{} {} -> {}: reply of {} {}, source restored, {}{}",
                flags_or(&self.flags),
                backend,
                self.client,
                self.service,
                self.service_addr,
                self.action,
                via
            ),
            Kind::Refused | Kind::Passed | Kind::Dropped => write!(
                f,
                "{} {} -> {} {}: {} ({}), {}{}",
                flags_or(&self.flags),
                self.client,
                self.service,
                self.service_addr,
                self.kind.as_str(),
                self.reason.as_deref().unwrap_or("-"),
                self.action,
                via
            ),
            Kind::New | Kind::Established => {
                let what = match (self.kind, self.slot) {
                    (Kind::New, Some(slot)) => format!("new flow, Maglev slot {slot}"),
                    (Kind::New, None) => "new flow".into(),
                    _ => "established".into(),
                };
                write!(
                    f,
                    "{} {} -> {} {}: {what} -> {backend}, {}{}",
                    flags_or(&self.flags),
                    self.client,
                    self.service,
                    self.service_addr,
                    self.action,
                    via
                )
            }
        }
    }
}

fn flags_or(flags: &str) -> &str {
    if flags.is_empty() {
        "UDP"
    } else {
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TraceEvent {
        TraceEvent {
            at: 0.0,
            hook: "xdp".into(),
            kind: Kind::New,
            flags: "SYN".into(),
            client: "198.18.1.2:40112".parse().unwrap(),
            service: "reviews.default.svc.cluster.local".into(),
            service_addr: "198.18.100.10:9080".parse().unwrap(),
            backend: Some("198.18.13.2:9080".parse().unwrap()),
            subset: Some("v3".into()),
            version: Some("v3".into()),
            slot: Some(2113),
            action: "XDP_REDIRECT".into(),
            reason: None,
            interface: Some("eth2".into()),
            request: None,
            route: None,
            status: None,
        }
    }

    #[test]
    fn prints_one_line_per_decision() {
        assert_eq!(
            event().to_string(),
            "SYN 198.18.1.2:40112 -> reviews.default.svc.cluster.local 198.18.100.10:9080: new \
             flow, Maglev slot 2113 -> v3 198.18.13.2:9080, XDP_REDIRECT (in eth2)"
        );
    }

    #[test]
    fn filters_by_every_field() {
        let e = event();
        let f = |service: Option<&str>,
                 client: Option<&str>,
                 backend: Option<&str>,
                 verdict: Option<&str>| TraceFilter {
            service: service.map(Into::into),
            client: client.map(Into::into),
            backend: backend.map(Into::into),
            verdict: verdict.map(Into::into),
        };
        assert!(f(None, None, None, None).matches(&e));
        assert!(f(Some("reviews"), None, None, None).matches(&e));
        assert!(f(Some("198.18.100.10:9080"), None, None, None).matches(&e));
        assert!(!f(Some("ratings"), None, None, None).matches(&e));
        assert!(!f(Some("review"), None, None, None).matches(&e));
        assert!(f(None, Some("198.18.1.2"), None, None).matches(&e));
        assert!(f(None, Some("198.18.1.2:40112"), None, None).matches(&e));
        assert!(!f(None, Some("198.18.1.2:40113"), None, None).matches(&e));
        assert!(!f(None, Some("198.18.1.3"), None, None).matches(&e));
        assert!(f(None, None, Some("v3"), None).matches(&e));
        assert!(f(None, None, Some("198.18.13.2"), None).matches(&e));
        assert!(!f(None, None, Some("v1"), None).matches(&e));
        assert!(f(None, None, None, Some("new")).matches(&e));
        assert!(f(None, None, None, Some("redirect")).matches(&e));
        assert!(f(None, None, None, Some("XDP_REDIRECT")).matches(&e));
        assert!(!f(None, None, None, Some("pass")).matches(&e));
        let mut r = e.clone();
        r.kind = Kind::Request;
        r.status = Some(503);
        assert!(f(None, None, None, Some("5xx")).matches(&r));
        assert!(f(None, None, None, Some("503")).matches(&r));
        assert!(!f(None, None, None, Some("2xx")).matches(&r));
        let mut refused = e.clone();
        refused.kind = Kind::Refused;
        refused.reason = Some("refused_no_backend".into());
        refused.backend = None;
        assert!(f(None, None, None, Some("refused")).matches(&refused));
        assert!(f(None, None, None, Some("refused_no_backend")).matches(&refused));
        assert!(!f(None, None, None, Some("new")).matches(&refused));
        assert!(!f(None, None, None, Some("refused")).matches(&e));
    }

    #[test]
    fn rejects_malformed_filters() {
        let bad_client = TraceFilter {
            client: Some("198.18.1".into()),
            ..Default::default()
        };
        assert!(matches!(bad_client.validate(), Err(FilterError::Client(_))));
        let bad_verdict = TraceFilter {
            verdict: Some("maybe".into()),
            ..Default::default()
        };
        assert!(matches!(
            bad_verdict.validate(),
            Err(FilterError::Verdict(_))
        ));
        let good = TraceFilter {
            client: Some("[2001:db8::1]:80".into()),
            verdict: Some("xdp_pass".into()),
            ..Default::default()
        };
        assert_eq!(good.validate(), Ok(()));
        for verdict in [
            "refused",
            "dropped",
            "passed",
            "refused_no_backend",
            "pass_l7_proxy",
        ] {
            let f = TraceFilter {
                verdict: Some(verdict.into()),
                ..Default::default()
            };
            assert_eq!(f.validate(), Ok(()), "{verdict}");
        }
    }
}
