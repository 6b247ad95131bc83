//! HTTP routes that need the L7 proxy, compiled into an [`L7Plan`]: matches, actions,
//! per-route policies, and one upstream cluster per destination (host, subset, port) with its
//! backends and DestinationRule traffic policy.
//!
//! When a rule lands here (see [`super::routes`]): the first HTTP route that applies to the
//! address has a condition beyond `port`/`gateways`, or any of redirect, directResponse,
//! rewrite, timeout, retries, fault, mirror(s), headers, corsPolicy; or the destination's
//! DestinationRule hashes on a header, cookie or query parameter. `loadBalancer.simple`,
//! `connectionPool` and `outlierDetection` never move a service to the proxy on their own (the
//! kernel path balances with weighted Maglev and has no per-request state); once a service is
//! served by the proxy, they are all honoured there.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use base64::Engine as _;

use super::{
    routes::{http_match_applies, is_http_protocol, resolve_port, Listener, Result},
    ClusterPlan, ConnectionPoolPlan, CorsPlan, FaultPlan, HeaderOpPlan, HeaderOpsPlan,
    HttpRoutePlan, L7BackendPlan, L7Plan, LoadBalancerPlan, MirrorPlan, OutlierPlan, Plan,
    RedirectPlan, RequestMatchPlan, RetryPlan, RewritePlan, RouteActionPlan, ServiceAddress,
    ServicePlan, StringMatchPlan, TrafficPolicyPlan, VirtualHostPlan, WeightedClusterPlan,
};
use crate::{
    config::{
        Destination, HeaderOperations, Headers, HttpRoute, Percent, PortTrafficPolicy, Resource,
        Server, ServiceEntry, SimpleLb, StringMatch, TrafficPolicy, VirtualService,
    },
    validate::{
        index::{fqdn, selects, Index},
        ValidationError,
    },
};

/// The L7 plan of a ServiceEntry VIP: one catch-all virtual host with the rule's applicable
/// HTTP routes, or a default route to the host's own endpoints when no rule routes this port.
pub(super) fn vip_plan(
    index: &Index,
    entry_resource: &Resource,
    entry: &ServiceEntry,
    address: ServiceAddress,
    rule: Option<(&Resource, &VirtualService)>,
    listener: Listener,
    mut sources: BTreeSet<String>,
) -> Result<ServicePlan> {
    let mut builder = Builder::new(index, address.ip, Some(address.port));
    let mut routes = match rule {
        Some((vs_resource, vs)) => builder.routes(vs_resource, vs, listener)?,
        None => Vec::new(),
    };
    if routes.is_empty() {
        let destination = Destination {
            host: entry.hosts[0].clone(),
            subset: None,
            port: None,
        };
        let cluster = builder.cluster(entry_resource, "spec.hosts[0]", &destination)?;
        routes.push(default_route(
            format!("{}.default", entry.hosts[0]),
            cluster,
        ));
    }
    sources.extend(builder.sources.iter().cloned());
    let declared_protocol = entry
        .ports
        .iter()
        .find(|p| p.number == i64::from(address.port))
        .and_then(|p| p.protocol.clone())
        .unwrap_or_else(|| "TCP".into());
    Ok(ServicePlan {
        address,
        name: entry.hosts[0].clone(),
        sources: sources.into_iter().collect(),
        plan: Plan::L7(L7Plan {
            virtual_hosts: vec![VirtualHostPlan {
                domains: vec!["*".into()],
                routes,
            }],
            clusters: builder.clusters,
            declared_protocol,
        }),
    })
}

/// The L7 plan of HTTP Gateway servers sharing one port on one node address (several
/// Gateways merge by host, as in Istio): one virtual host per bound VirtualService, matched by
/// the Host header against the rule's hosts (`*` stands for the hosts of the servers of the
/// Gateways the rule is bound to).
pub(super) fn gateway_plan(
    index: &Index,
    group: &[(&Resource, &Server)],
    address: ServiceAddress,
    name: String,
    bound: &[(&Resource, &VirtualService)],
    listener: Listener,
    mut sources: BTreeSet<String>,
) -> Result<ServicePlan> {
    let mut builder = Builder::new(index, address.ip, None);
    let mut virtual_hosts = Vec::new();
    for (vs_resource, vs) in bound {
        let routes = builder.routes(vs_resource, vs, listener)?;
        if routes.is_empty() {
            continue;
        }
        sources.insert(vs_resource.id());
        let server_hosts: Vec<String> = group
            .iter()
            .filter(|(gateway, _)| {
                vs.gateways.iter().any(|r| {
                    index
                        .gateway(r, &vs_resource.meta.namespace)
                        .is_some_and(|(found, _)| std::ptr::eq(found, *gateway))
                })
            })
            .flat_map(|(_, server)| server.hosts.iter())
            .map(|h| {
                h.split_once('/')
                    .map_or(h.as_str(), |(_, host)| host)
                    .to_string()
            })
            .collect();
        let mut domains: Vec<String> = vs
            .hosts
            .iter()
            .flat_map(|h| {
                if h == "*" {
                    server_hosts.clone()
                } else {
                    vec![h.clone()]
                }
            })
            .collect();
        domains.dedup();
        virtual_hosts.push(VirtualHostPlan { domains, routes });
    }
    sources.extend(builder.sources.iter().cloned());
    Ok(ServicePlan {
        address,
        name,
        sources: sources.into_iter().collect(),
        plan: Plan::L7(L7Plan {
            virtual_hosts,
            clusters: builder.clusters,
            declared_protocol: group[0].1.port.protocol.to_ascii_uppercase(),
        }),
    })
}

fn default_route(name: String, cluster: usize) -> HttpRoutePlan {
    HttpRoutePlan {
        name,
        matches: Vec::new(),
        action: RouteActionPlan::Forward {
            destinations: vec![WeightedClusterPlan {
                cluster,
                weight: 1,
                headers: HeaderOpsPlan::default(),
            }],
        },
        rewrite: None,
        timeout: None,
        retries: RetryPlan::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        headers: HeaderOpsPlan::default(),
        cors: None,
    }
}

/// Collects clusters (deduplicated by host, subset and port) while routes are compiled.
struct Builder<'i, 'a> {
    index: &'i Index<'a>,
    /// Backends of the other address family are left out (no NAT46).
    family_of: IpAddr,
    /// The service port (a VIP's port; `None` for a Gateway, whose port is not the host's).
    service_port: Option<u16>,
    clusters: Vec<ClusterPlan>,
    cluster_ids: HashMap<(String, Option<String>, u16), usize>,
    sources: BTreeSet<String>,
}

fn error(rule: &Resource, field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::new(rule, field, message)
}

impl<'i, 'a> Builder<'i, 'a> {
    fn new(index: &'i Index<'a>, family_of: IpAddr, service_port: Option<u16>) -> Self {
        Self {
            index,
            family_of,
            service_port,
            clusters: Vec::new(),
            cluster_ids: HashMap::new(),
            sources: BTreeSet::new(),
        }
    }

    /// The rule's HTTP routes that can apply to `listener`, with only the matches that can.
    fn routes(
        &mut self,
        rule: &Resource,
        vs: &VirtualService,
        listener: Listener,
    ) -> Result<Vec<HttpRoutePlan>> {
        let mut out = Vec::new();
        for (i, route) in vs.http.iter().enumerate() {
            let field = format!("spec.http[{i}]");
            let applicable: Vec<(usize, &crate::config::HttpMatchRequest)> = route
                .matches
                .iter()
                .enumerate()
                .filter(|(_, m)| http_match_applies(self.index, rule, m, listener))
                .collect();
            if !route.matches.is_empty() && applicable.is_empty() {
                continue;
            }
            let name = route
                .name
                .clone()
                .unwrap_or_else(|| format!("{}.http[{i}]", rule.meta.name));
            let mut matches = Vec::new();
            for (j, m) in applicable {
                matches.push(request_match(rule, &format!("{field}.match[{j}]"), m)?);
            }
            out.push(self.route(rule, &field, name, matches, route)?);
        }
        Ok(out)
    }

    fn route(
        &mut self,
        rule: &Resource,
        field: &str,
        name: String,
        matches: Vec<RequestMatchPlan>,
        route: &HttpRoute,
    ) -> Result<HttpRoutePlan> {
        if route.delegate.is_some() {
            return Err(error(
                rule,
                format!("{field}.delegate"),
                "delegation is not supported; put the routes in this VirtualService",
            ));
        }
        let action = if let Some(redirect) = &route.redirect {
            RouteActionPlan::Redirect(RedirectPlan {
                uri: redirect.uri.clone(),
                authority: redirect.authority.clone(),
                port: redirect.port.and_then(|p| u16::try_from(p).ok()),
                port_from_request: redirect.derive_port.as_deref() == Some("FROM_REQUEST_PORT"),
                scheme: redirect.scheme.clone(),
                status: redirect
                    .redirect_code
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(301),
            })
        } else if let Some(direct) = &route.direct_response {
            let body = match &direct.body {
                None => Vec::new(),
                Some(body) => match (&body.string, &body.bytes) {
                    (Some(text), _) => text.clone().into_bytes(),
                    (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| {
                            error(
                                rule,
                                format!("{field}.directResponse.body.bytes"),
                                format!("not base64: {e}"),
                            )
                        })?,
                    (None, None) => Vec::new(),
                },
            };
            RouteActionPlan::DirectResponse {
                status: u16::try_from(direct.status).unwrap_or(200),
                body,
            }
        } else {
            let lone = route.route.len() == 1;
            let mut destinations = Vec::new();
            for (k, d) in route.route.iter().enumerate() {
                let dfield = format!("{field}.route[{k}]");
                let cluster =
                    self.cluster(rule, &format!("{dfield}.destination"), &d.destination)?;
                destinations.push(WeightedClusterPlan {
                    cluster,
                    // Istio: a lone destination gets all traffic whatever its weight.
                    weight: if lone {
                        1
                    } else {
                        u32::try_from(d.weight.unwrap_or(0).max(0)).unwrap_or(0)
                    },
                    headers: header_ops(d.headers.as_ref()),
                });
            }
            RouteActionPlan::Forward { destinations }
        };
        let rewrite = match &route.rewrite {
            None => None,
            Some(rw) => {
                let uri_regex = match &rw.uri_regex_rewrite {
                    None => None,
                    Some(r) => {
                        check_regex(
                            rule,
                            &format!("{field}.rewrite.uriRegexRewrite.match"),
                            &r.pattern,
                        )?;
                        Some((r.pattern.clone(), r.rewrite.clone()))
                    }
                };
                Some(RewritePlan {
                    uri: rw.uri.clone(),
                    authority: rw.authority.clone(),
                    uri_regex,
                })
            }
        };
        let duration = |f: &str, d: &crate::config::Duration| -> Result<Duration> {
            d.parse().map_err(|m| error(rule, f, m))
        };
        let timeout = match &route.timeout {
            Some(t) => Some(duration(&format!("{field}.timeout"), t)?).filter(|d| !d.is_zero()),
            None => None,
        };
        let retries = match &route.retries {
            None => RetryPlan::istio_default(),
            Some(r) => {
                let per_try_timeout = match &r.per_try_timeout {
                    Some(t) => Some(duration(&format!("{field}.retries.perTryTimeout"), t)?),
                    None => None,
                };
                let mut retry_on = Vec::new();
                let mut codes = Vec::new();
                for token in r
                    .retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503")
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                {
                    match token.parse::<u16>() {
                        Ok(code) => codes.push(code),
                        Err(_) if crate::proxy::retry::RETRY_ON.contains(&token) => {
                            retry_on.push(token.to_string())
                        }
                        // Istio rejects unknown retryOn policies too.
                        Err(_) => {
                            return Err(error(
                                rule,
                                format!("{field}.retries.retryOn"),
                                format!(
                                    "{token:?} is not a retry condition (expected one of {} or an HTTP status code)",
                                    crate::proxy::retry::RETRY_ON.join(", ")
                                ),
                            ))
                        }
                    }
                }
                if !codes.is_empty() && !retry_on.iter().any(|t| t == "retriable-status-codes") {
                    retry_on.push("retriable-status-codes".into());
                }
                RetryPlan {
                    attempts: u32::try_from(r.attempts.max(0)).unwrap_or(0),
                    per_try_timeout,
                    retry_on,
                    retriable_status_codes: codes,
                }
            }
        };
        let fault = match &route.fault {
            None => None,
            Some(f) => {
                let delay = match &f.delay {
                    None => None,
                    Some(d) => {
                        let Some(fixed) = &d.fixed_delay else {
                            return Err(error(
                                rule,
                                format!("{field}.fault.delay.fixedDelay"),
                                "a delay needs fixedDelay",
                            ));
                        };
                        let fixed = duration(&format!("{field}.fault.delay.fixedDelay"), fixed)?;
                        Some((fixed, share(d.percentage.as_ref(), d.percent)))
                    }
                };
                let abort = match &f.abort {
                    None => None,
                    Some(a) => {
                        if a.grpc_status.is_some() || a.http2_error.is_some() {
                            return Err(error(
                                rule,
                                format!("{field}.fault.abort"),
                                "only httpStatus aborts are supported (not grpcStatus or http2Error)",
                            ));
                        }
                        let Some(status) = a.http_status.and_then(|s| u16::try_from(s).ok()) else {
                            return Err(error(
                                rule,
                                format!("{field}.fault.abort.httpStatus"),
                                "an abort needs httpStatus",
                            ));
                        };
                        Some((status, share(a.percentage.as_ref(), a.percent)))
                    }
                };
                Some(FaultPlan { delay, abort })
            }
        };
        let mut mirrors = Vec::new();
        if let Some(mirror) = &route.mirror {
            let cluster = self.cluster(rule, &format!("{field}.mirror"), mirror)?;
            mirrors.push(MirrorPlan {
                cluster,
                share: share(route.mirror_percentage.as_ref(), route.mirror_percent),
            });
        }
        for (k, m) in route.mirrors.iter().enumerate() {
            let cluster = self.cluster(
                rule,
                &format!("{field}.mirrors[{k}].destination"),
                &m.destination,
            )?;
            mirrors.push(MirrorPlan {
                cluster,
                share: share(m.percentage.as_ref(), None),
            });
        }
        let cors = match &route.cors_policy {
            None => None,
            Some(c) => {
                let mut allow_origins = Vec::new();
                for (k, o) in c.allow_origins.iter().enumerate() {
                    allow_origins.push(string_match(
                        rule,
                        &format!("{field}.corsPolicy.allowOrigins[{k}]"),
                        o,
                    )?);
                }
                allow_origins.extend(c.allow_origin.iter().cloned().map(StringMatchPlan::Exact));
                let max_age = match &c.max_age {
                    Some(d) => Some(duration(&format!("{field}.corsPolicy.maxAge"), d)?),
                    None => None,
                };
                Some(CorsPlan {
                    allow_origins,
                    allow_methods: c.allow_methods.clone(),
                    allow_headers: c.allow_headers.clone(),
                    expose_headers: c.expose_headers.clone(),
                    max_age,
                    allow_credentials: c.allow_credentials == Some(true),
                })
            }
        };
        Ok(HttpRoutePlan {
            name,
            matches,
            action,
            rewrite,
            timeout,
            retries,
            fault,
            mirrors,
            headers: header_ops(route.headers.as_ref()),
            cors,
        })
    }

    /// A cluster for a destination that resolves to nothing (yet): the proxy answers 503.
    fn empty_cluster(&mut self, destination: &Destination, port: u16) -> usize {
        let ns_free_key = (
            format!("unresolved:{}", destination.host),
            destination.subset.clone(),
            port,
        );
        if let Some(id) = self.cluster_ids.get(&ns_free_key) {
            return *id;
        }
        self.clusters.push(ClusterPlan {
            name: format!(
                "{}|{}|{}",
                destination.host,
                destination.subset.as_deref().unwrap_or(""),
                port
            ),
            host: destination.host.clone(),
            subset: destination.subset.clone(),
            port,
            http2: false,
            backends: Vec::new(),
            policy: TrafficPolicyPlan::default(),
        });
        let id = self.clusters.len() - 1;
        self.cluster_ids.insert(ns_free_key, id);
        id
    }

    /// The cluster of a destination, created on first use.
    fn cluster(
        &mut self,
        rule: &Resource,
        field: &str,
        destination: &Destination,
    ) -> Result<usize> {
        let ns = &rule.meta.namespace;
        let Some((entry_resource, entry)) = self.index.service_entry(&destination.host, ns) else {
            // Not defined (yet): validation warned; a cluster without backends answers 503.
            let port = destination
                .port
                .as_ref()
                .and_then(|p| u16::try_from(p.number).ok())
                .or(self.service_port)
                .unwrap_or(0);
            return Ok(self.empty_cluster(destination, port));
        };
        self.sources.insert(entry_resource.id());
        let port = resolve_port(entry, destination, self.service_port)
            .map_err(|message| error(rule, format!("{field}.port"), message))?;
        let port_number = crate::validate::values::port(port.number)
            .map_err(|m| error(entry_resource, "spec.ports", m))?;
        let key = (
            fqdn(&destination.host, ns),
            destination.subset.clone(),
            port_number,
        );
        if let Some(id) = self.cluster_ids.get(&key) {
            return Ok(*id);
        }
        let dr = self.index.destination_rule(&destination.host, ns);
        let mut selector = std::collections::BTreeMap::new();
        let mut subset_policy = None;
        if let Some(subset) = &destination.subset {
            let found = dr.and_then(|(dr_resource, dr)| {
                dr.subsets
                    .iter()
                    .find(|s| &s.name == subset)
                    .map(|s| (dr_resource, s))
            });
            let Some((_, found)) = found else {
                // Not defined (yet): validation warned; no backend, so 503 until it is.
                return Ok(self.empty_cluster(destination, port_number));
            };
            selector = found.labels.clone();
            subset_policy = found.traffic_policy.as_ref();
        }
        let policy = match dr {
            Some((dr_resource, dr)) => {
                self.sources.insert(dr_resource.id());
                traffic_policy(
                    dr_resource,
                    dr.traffic_policy.as_ref(),
                    subset_policy,
                    port_number,
                )?
            }
            None => TrafficPolicyPlan::default(),
        };
        let mut backends = Vec::new();
        for endpoint in entry
            .endpoints
            .iter()
            .filter(|e| selects(&selector, &e.labels))
        {
            let Ok(ip) = endpoint.address.parse::<IpAddr>() else {
                continue;
            };
            if ip.is_ipv4() != self.family_of.is_ipv4() {
                continue;
            }
            let weight = u32::try_from(endpoint.effective_weight().max(0)).unwrap_or(0);
            if weight == 0 {
                continue;
            }
            let target = port
                .name
                .as_ref()
                .and_then(|name| endpoint.ports.get(name).copied())
                .or(port.target_port)
                .unwrap_or(port.number);
            let target = crate::validate::values::port(target)
                .map_err(|m| error(entry_resource, "spec.endpoints", m))?;
            backends.push(L7BackendPlan {
                address: SocketAddr::new(ip, target),
                weight,
                labels: endpoint.labels.clone(),
            });
        }
        backends.sort_by_key(|b| b.address);
        let name = format!(
            "{}|{}|{}",
            destination.host,
            destination.subset.as_deref().unwrap_or(""),
            port_number
        );
        self.clusters.push(ClusterPlan {
            name,
            host: destination.host.clone(),
            subset: destination.subset.clone(),
            port: port_number,
            http2: port
                .protocol
                .as_deref()
                .is_some_and(|p| matches!(p.to_ascii_uppercase().as_str(), "HTTP2" | "GRPC")),
            backends,
            policy,
        });
        let id = self.clusters.len() - 1;
        self.cluster_ids.insert(key, id);
        let _ = is_http_protocol;
        Ok(id)
    }
}

/// Share 0..=1 from Istio's `percentage` (0-100, fractional) or the old integer `percent`;
/// neither given means every request (the way Istio's examples and users read a bare fault or
/// mirror).
fn share(percentage: Option<&Percent>, percent: Option<i64>) -> f64 {
    match (percentage, percent) {
        (Some(p), _) => (p.value / 100.0).clamp(0.0, 1.0),
        (None, Some(p)) => (p as f64 / 100.0).clamp(0.0, 1.0),
        (None, None) => 1.0,
    }
}

fn header_ops(headers: Option<&Headers>) -> HeaderOpsPlan {
    let one = |ops: Option<&HeaderOperations>| -> HeaderOpPlan {
        let Some(ops) = ops else {
            return HeaderOpPlan::default();
        };
        HeaderOpPlan {
            set: ops
                .set
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            add: ops
                .add
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            remove: ops.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
        }
    };
    HeaderOpsPlan {
        request: one(headers.and_then(|h| h.request.as_ref())),
        response: one(headers.and_then(|h| h.response.as_ref())),
    }
}

fn check_regex(rule: &Resource, field: &str, pattern: &str) -> Result<()> {
    regex::Regex::new(pattern)
        .map(|_| ())
        .map_err(|e| error(rule, field, format!("not a valid RE2 regex: {e}")))
}

fn string_match(rule: &Resource, field: &str, m: &StringMatch) -> Result<StringMatchPlan> {
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

fn request_match(
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
fn traffic_policy(
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
