//! One Istio `HTTPRoute` compiled for the proxy: its action (forward, redirect, direct
//! response), rewrite, timeout, retries (`retryOn` resolved to known conditions and status
//! codes), fault, mirrors, header operations and CORS.

use std::time::Duration;

use base64::Engine as _;

use super::{
    error,
    policy::{check_regex, string_match},
    Builder,
};
use crate::{
    compile::{
        CorsPlan, FaultPlan, HeaderOpPlan, HeaderOpsPlan, HttpRoutePlan, MirrorPlan, RedirectPlan,
        RequestMatchPlan, RetryOn, RetryPlan, RewritePlan, RouteActionPlan, StringMatchPlan,
        WeightedClusterPlan,
    },
    config::{HeaderOperations, Headers, HttpRoute, Percent, Resource},
    resolve::select::Result,
};

impl Builder<'_, '_> {
    /// The plan of `route` (at `field` of `rule`) with its already compiled `matches`.
    pub(super) fn route(
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
                    match (token.parse::<u16>(), RetryOn::parse(token)) {
                        (Ok(code), _) => codes.push(code),
                        (Err(_), Some(condition)) => retry_on.push(condition),
                        // Istio rejects unknown retryOn policies too.
                        (Err(_), None) => {
                            let known: Vec<&str> = RetryOn::ALL.map(RetryOn::name).to_vec();
                            return Err(error(
                                rule,
                                format!("{field}.retries.retryOn"),
                                format!(
                                    "{token:?} is not a retry condition (expected one of {} or an HTTP status code)",
                                    known.join(", ")
                                ),
                            ));
                        }
                    }
                }
                if !codes.is_empty() && !retry_on.contains(&RetryOn::RetriableStatusCodes) {
                    retry_on.push(RetryOn::RetriableStatusCodes);
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
