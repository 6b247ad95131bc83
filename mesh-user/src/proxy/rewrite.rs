//! Request and response transforms the routes ask for: URI rewrites (prefix and regex),
//! redirect locations, CORS headers, Istio header operations (compiled once per apply),
//! hop-by-hop header removal and the mirror's `-shadow` Host.

use http::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Uri,
};

use super::{matching::strip_port, table::RouteRuntime};
use crate::compile::{HeaderOpPlan, RedirectPlan, StringMatchPlan};

/// One direction's header operations with names and values parsed once per apply.
#[derive(Debug, Default)]
pub struct HeaderOps {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// Compiles a plan (names and values that are not valid HTTP are skipped; validation
    /// rejects them before).
    pub fn new(plan: &HeaderOpPlan) -> Self {
        let pair = |(n, v): &(String, String)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        Self {
            remove: plan
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            set: plan.set.iter().filter_map(pair).collect(),
            add: plan.add.iter().filter_map(pair).collect(),
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the operations in Envoy's order: remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Whether `name` is a hop-by-hop header whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in `Connection`.
/// The common head has none: one pass over its few names finds that without hashing each
/// hop-by-hop name into the map.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
    .iter()
    {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    for name in ["keep-alive", "proxy-connection"] {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// Istio/Envoy's mirror Host: `-shadow` appended to the host part (`a.b:80` -> `a.b-shadow:80`).
pub fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(']')
                && port.bytes().all(|b| b.is_ascii_digit())
                && !name.contains(':') =>
        {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

pub fn rewrite_path(route: &RouteRuntime, matched: Option<usize>, path_and_query: &str) -> String {
    let Some(rewrite) = &route.plan.rewrite else {
        return path_and_query.to_string();
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q)),
        None => (path_and_query.to_string(), None),
    };
    let mut new_path = path.clone();
    if let (Some(regex), Some((_, replacement))) = (&route.uri_regex, &rewrite.uri_regex) {
        new_path = regex
            .replace_all(&path, envoy_substitution(replacement).as_str())
            .into_owned();
    } else if let Some(uri) = &rewrite.uri {
        let prefix = matched
            .and_then(|i| route.plan.matches.get(i))
            .and_then(|m| m.uri.as_ref());
        new_path = match prefix {
            Some(StringMatchPlan::Prefix(p)) if path.len() >= p.len() => {
                format!("{uri}{}", &path[p.len()..])
            }
            _ => uri.clone(),
        };
    }
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// Envoy's `\1` group references in the regex crate's `${1}` syntax.
fn envoy_substitution(replacement: &str) -> String {
    let mut out = String::new();
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

pub fn redirect_location(redirect: &RedirectPlan, uri: &Uri, authority: &str) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let request_port = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, p)| p.to_string());
    let mut host = redirect
        .authority
        .clone()
        .unwrap_or_else(|| strip_port(authority).to_string());
    let port = redirect.port.map(|p| p.to_string()).or_else(|| {
        if redirect.port_from_request || redirect.authority.is_none() {
            request_port
        } else {
            None
        }
    });
    if let Some(port) = port {
        host = format!("{}:{port}", strip_port(&host));
    }
    let path = redirect.uri.clone().unwrap_or_else(|| {
        uri.path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into())
    });
    format!("{scheme}://{host}{path}")
}

pub fn cors_headers(route: &RouteRuntime, origin: &str, preflight: bool, headers: &mut HeaderMap) {
    let Some(cors) = &route.plan.cors else {
        return;
    };
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set("access-control-allow-origin", origin.to_string());
    if cors.allow_credentials {
        set("access-control-allow-credentials", "true".into());
    }
    if !cors.expose_headers.is_empty() {
        set(
            "access-control-expose-headers",
            cors.expose_headers.join(","),
        );
    }
    if preflight {
        if !cors.allow_methods.is_empty() {
            set("access-control-allow-methods", cors.allow_methods.join(","));
        }
        if !cors.allow_headers.is_empty() {
            set("access-control-allow-headers", cors.allow_headers.join(","));
        }
        if let Some(age) = cors.max_age {
            set("access-control-max-age", age.as_secs().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(shadow_host("echo.test:8080"), "echo.test-shadow:8080");
        assert_eq!(shadow_host("echo.test"), "echo.test-shadow");
    }

    #[test]
    fn header_ops_remove_set_add() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("b", "1".parse().unwrap());
        let ops = HeaderOps::new(&HeaderOpPlan {
            set: vec![("a".into(), "2".into())],
            add: vec![("c".into(), "3".into())],
            remove: vec!["b".into()],
        });
        ops.apply(&mut h);
        assert_eq!(h.get("a").unwrap(), "2");
        assert!(h.get("b").is_none());
        assert_eq!(h.get("c").unwrap(), "3");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn envoy_group_references() {
        assert_eq!(envoy_substitution(r"/v2/\1"), "/v2/${1}");
    }

    fn redirect(authority: Option<&str>, port_from_request: bool) -> RedirectPlan {
        RedirectPlan {
            uri: None,
            authority: authority.map(str::to_string),
            port: None,
            port_from_request,
            scheme: None,
            status: 301,
        }
    }

    #[test]
    fn redirect_keeps_path_and_port() {
        let uri: Uri = "/a?b=1".parse().unwrap();
        // No new authority: the request's host and port stay (Envoy keeps the Host header).
        assert_eq!(
            redirect_location(&redirect(None, false), &uri, "old.test:8080"),
            "http://old.test:8080/a?b=1"
        );
        // A new authority keeps the port only with derivePort: FROM_REQUEST_PORT.
        assert_eq!(
            redirect_location(&redirect(Some("new.test"), true), &uri, "old.test:8080"),
            "http://new.test:8080/a?b=1"
        );
    }

    #[test]
    fn redirect_to_a_new_authority_drops_the_port_as_envoy_does() {
        let uri: Uri = "/a?b=1".parse().unwrap();
        assert_eq!(
            redirect_location(&redirect(Some("new.test"), false), &uri, "old.test:8080"),
            "http://new.test/a?b=1"
        );
        let explicit = RedirectPlan {
            port: Some(9090),
            ..redirect(Some("new.test"), false)
        };
        assert_eq!(
            redirect_location(&explicit, &uri, "old.test:8080"),
            "http://new.test:9090/a?b=1"
        );
    }
}
