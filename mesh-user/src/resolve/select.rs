//! Route selection for one listener (a service address and port): which route of a
//! VirtualService applies, and what it asks of the path ([`super::path::route_need`]).

use std::net::IpAddr;

use super::{
    index::Index,
    path::{self, KernelReason, Path, ProxyReason},
};
use crate::{
    config::{Destination, L4MatchAttributes, Resource, VirtualService},
    validate::{values, ValidationError},
};

/// The wording every "this build cannot do it" error ends with (TLS is the one thing the L7
/// proxy does not do yet).
pub(crate) const L7_NEEDED: &str =
    "needs the L7 proxy with TLS support, which this build does not have";

/// The address and port a route is being selected for.
#[derive(Clone, Copy)]
pub(crate) struct Listener<'a> {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// The Gateways served here (several merged on one port); empty for a ServiceEntry VIP
    /// (the implicit `mesh` gateway).
    pub(crate) gateways: &'a [&'a Resource],
}

/// A chosen route: the rule it comes from and its weighted destinations.
pub(super) struct Selected<'a> {
    pub(super) rule: &'a Resource,
    pub(super) destinations: Vec<(String, Destination, i64)>,
    /// Chosen from an HTTP route (or the host's default route): HTTP-only load balancing
    /// (header, cookie, query hashing) may move it to the L7 proxy.
    pub(super) http: bool,
}

/// A route's destinations with their field paths (`<route>.route[k].destination`) and weights
/// (unset counts as 0, as in Istio).
fn weighted_destinations<'d>(
    route_field: &str,
    destinations: impl Iterator<Item = (&'d Destination, Option<i64>)>,
) -> Vec<(String, Destination, i64)> {
    destinations
        .enumerate()
        .map(|(k, (destination, weight))| {
            (
                format!("{route_field}.route[{k}].destination"),
                destination.clone(),
                weight.unwrap_or(0),
            )
        })
        .collect()
}

/// The path a listener's first applicable route asks for.
pub(super) enum Choice<'a> {
    /// Weighted destinations the kernel can serve per connection.
    Kernel(Selected<'a>, KernelReason),
    /// An HTTP route that needs per-request handling: the whole rule goes to the proxy.
    Proxy(ProxyReason),
}

pub(crate) type Result<T> = std::result::Result<T, ValidationError>;

/// True when `references` (a rule's or a match's `gateways`) name the Gateway `gateway`.
pub(super) fn gateway_listed(
    index: &Index,
    references: &[String],
    namespace: &str,
    gateway: &Resource,
) -> bool {
    references.iter().any(|r| {
        r != "mesh"
            && index
                .gateway(r, namespace)
                .is_some_and(|(found, _)| std::ptr::eq(found, gateway))
    })
}

/// Whether match-level `gateways` let a match apply to `listener` (empty: inherit the rule's).
fn match_gateways_apply(
    index: &Index,
    references: &[String],
    namespace: &str,
    listener: Listener,
) -> bool {
    if references.is_empty() {
        return true;
    }
    if listener.gateways.is_empty() {
        return references.iter().any(|r| r == "mesh");
    }
    listener
        .gateways
        .iter()
        .any(|gateway| gateway_listed(index, references, namespace, gateway))
}

/// Whether a match's `port` and `gateways` let it apply to `listener` (the per-connection
/// conditions).
pub(crate) fn http_match_applies(
    index: &Index,
    rule: &Resource,
    m: &crate::config::HttpMatchRequest,
    listener: Listener,
) -> bool {
    m.port.is_none_or(|p| p == i64::from(listener.port))
        && match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener)
}

fn l4_match_applies(
    index: &Index,
    rule: &Resource,
    field: &str,
    m: &L4MatchAttributes,
    listener: Listener,
) -> Result<bool> {
    if m.port.is_some_and(|p| p != i64::from(listener.port)) {
        return Ok(false);
    }
    if !match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener) {
        return Ok(false);
    }
    if !m.destination_subnets.is_empty()
        && !m
            .destination_subnets
            .iter()
            .filter_map(|s| values::cidr(s).ok())
            .any(|net| values::in_subnet(listener.ip, net))
    {
        return Ok(false);
    }
    // The kernel path selects a route per service address; conditions on the client need a
    // per-connection classifier it does not have.
    if m.source_subnet.is_some() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceSubnet"),
            "matching on the client subnet is not supported in this build",
        ));
    }
    if !m.source_labels.is_empty() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceLabels"),
            "matching on client workload labels is not supported (mesh has no workload identity)",
        ));
    }
    if m.source_namespace.is_some() {
        return Err(ValidationError::new(
            rule,
            format!("{field}.sourceNamespace"),
            "matching on the client namespace is not supported (mesh has no workload identity)",
        ));
    }
    Ok(true)
}

/// First TCP route that applies; else the first applicable HTTP route: [`Choice::Kernel`] when
/// it needs nothing but weights, [`Choice::Proxy`] otherwise; `None` when no route applies.
pub(super) fn select_route<'a>(
    index: &Index,
    rule: &'a Resource,
    vs: &VirtualService,
    listener: Listener,
) -> Result<Option<Choice<'a>>> {
    if !vs.tls.is_empty() {
        return Err(ValidationError::new(
            rule,
            "spec.tls",
            format!("TLS (SNI) routing {L7_NEEDED}"),
        ));
    }
    for (i, route) in vs.tcp.iter().enumerate() {
        let mut applies = route.matches.is_empty();
        for (j, m) in route.matches.iter().enumerate() {
            if l4_match_applies(
                index,
                rule,
                &format!("spec.tcp[{i}].match[{j}]"),
                m,
                listener,
            )? {
                applies = true;
                break;
            }
        }
        if applies {
            let destinations = weighted_destinations(
                &format!("spec.tcp[{i}]"),
                route.route.iter().map(|d| (&d.destination, d.weight)),
            );
            let why = KernelReason::TcpRoute {
                rule: rule.display_name(),
                field: format!("spec.tcp[{i}]"),
            };
            let selected = Selected {
                rule,
                destinations,
                http: false,
            };
            return Ok(Some(Choice::Kernel(selected, why)));
        }
    }
    for (i, route) in vs.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        let applicable: Vec<_> = route
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.port.is_none_or(|p| p == i64::from(listener.port)))
            .filter(|(_, m)| {
                match_gateways_apply(index, &m.gateways, &rule.meta.namespace, listener)
            })
            .collect();
        if !route.matches.is_empty() && applicable.is_empty() {
            continue;
        }
        let why = match path::route_need(rule, &field, route, &applicable) {
            Path::Proxy(why) => return Ok(Some(Choice::Proxy(why))),
            Path::Kernel(why) => why,
        };
        let destinations = weighted_destinations(
            &field,
            route.route.iter().map(|d| (&d.destination, d.weight)),
        );
        let selected = Selected {
            rule,
            destinations,
            http: true,
        };
        return Ok(Some(Choice::Kernel(selected, why)));
    }
    Ok(None)
}
