//! Request matching: Istio `HTTPMatchRequest` conditions compiled once per apply (regexes
//! included) and evaluated per request. Fields of one match are ANDed, the matches of a route
//! ORed, and the first route with a matching entry wins.

use regex::Regex;

use crate::compile::{RequestMatchPlan, StringMatchPlan};

/// A compiled `StringMatch`.
#[derive(Debug)]
pub enum Matcher {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-value regex.
    Regex(Regex),
}

/// Why a plan could not be turned into matchers (compile already checked, so only on bugs).
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// A regex did not compile.
    #[error("regex `{pattern}`: {source}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex error.
        source: regex::Error,
    },
}

impl Matcher {
    /// Compiles a plan's string match; regexes are anchored at both ends (RE2 full match, as
    /// Envoy's safe_regex does).
    pub fn new(plan: &StringMatchPlan, ignore_case: bool) -> Result<Self, MatchError> {
        Ok(match plan {
            StringMatchPlan::Exact(v) if ignore_case => Matcher::Exact(v.to_ascii_lowercase()),
            StringMatchPlan::Exact(v) => Matcher::Exact(v.clone()),
            StringMatchPlan::Prefix(v) if ignore_case => Matcher::Prefix(v.to_ascii_lowercase()),
            StringMatchPlan::Prefix(v) => Matcher::Prefix(v.clone()),
            StringMatchPlan::Regex(pattern) => {
                let anchored = if ignore_case {
                    format!("(?i)^(?:{pattern})$")
                } else {
                    format!("^(?:{pattern})$")
                };
                Matcher::Regex(Regex::new(&anchored).map_err(|source| MatchError::Regex {
                    pattern: pattern.clone(),
                    source,
                })?)
            }
        })
    }

    /// Whether `value` matches (`ignore_case`: `value` is compared lower-cased, the pattern was
    /// lower-cased at compile time).
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(v) if ignore_case => value.eq_ignore_ascii_case(v),
            Matcher::Exact(v) => value == v,
            Matcher::Prefix(p) if ignore_case => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// What a match looks at in a request.
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Query string (without `?`), if any.
    pub query: Option<&'a str>,
    /// `http` (TLS is not terminated here).
    pub scheme: &'a str,
    /// Host header or `:authority`.
    pub authority: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
}

/// One compiled `HTTPMatchRequest`.
#[derive(Debug)]
pub struct RequestMatcher {
    uri: Option<Matcher>,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(http::HeaderName, Matcher)>,
    without_headers: Vec<(http::HeaderName, Matcher)>,
    query_params: Vec<(String, Matcher)>,
    ignore_uri_case: bool,
}

impl RequestMatcher {
    /// Compiles one match.
    pub fn new(plan: &RequestMatchPlan) -> Result<Self, MatchError> {
        let opt = |m: &Option<StringMatchPlan>, ci: bool| {
            m.as_ref().map(|m| Matcher::new(m, ci)).transpose()
        };
        let named = |list: &[(String, StringMatchPlan)]| -> Result<Vec<(http::HeaderName, Matcher)>, MatchError> {
            let mut out = Vec::new();
            for (name, m) in list {
                // Compile validated names; an unrepresentable one can never be present.
                if let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) {
                    out.push((header, Matcher::new(m, false)?));
                }
            }
            Ok(out)
        };
        Ok(Self {
            uri: opt(&plan.uri, plan.ignore_uri_case)?,
            scheme: opt(&plan.scheme, false)?,
            method: opt(&plan.method, false)?,
            authority: opt(&plan.authority, false)?,
            headers: named(&plan.headers)?,
            without_headers: named(&plan.without_headers)?,
            query_params: plan
                .query_params
                .iter()
                .map(|(k, m)| Ok((k.clone(), Matcher::new(m, false)?)))
                .collect::<Result<_, MatchError>>()?,
            ignore_uri_case: plan.ignore_uri_case,
        })
    }

    /// Whether every condition holds for `request`.
    pub fn matches(&self, request: &RequestView) -> bool {
        if let Some(m) = &self.uri {
            if !m.matches(request.path, self.ignore_uri_case) {
                return false;
            }
        }
        for (m, value) in [
            (&self.scheme, request.scheme),
            (&self.method, request.method),
            (&self.authority, request.authority),
        ] {
            if let Some(m) = m {
                if !m.matches(value, false) {
                    return false;
                }
            }
        }
        let header_matches = |name: &http::HeaderName, m: &Matcher| {
            request
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| m.matches(v, false))
        };
        if !self.headers.iter().all(|(n, m)| header_matches(n, m)) {
            return false;
        }
        if self
            .without_headers
            .iter()
            .any(|(n, m)| header_matches(n, m))
        {
            return false;
        }
        self.query_params
            .iter()
            .all(|(name, m)| query_values(request.query, name).any(|v| m.matches(v, false)))
    }
}

/// Values of `name` in a raw query string (`a=1&b=2&a=3`); a bare `a` has the empty value.
pub fn query_values<'q>(query: Option<&'q str>, name: &'q str) -> impl Iterator<Item = &'q str> {
    query.unwrap_or("").split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Whether a Host value (port stripped) is covered by a virtual host domain (`*`,
/// `*.suffix`, exact; case-insensitive).
pub fn domain_matches(domain: &str, host: &str) -> bool {
    if domain == "*" {
        return true;
    }
    if let Some(suffix) = domain.strip_prefix('*') {
        return host.len() > suffix.len()
            && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
    }
    domain.eq_ignore_ascii_case(host)
}

/// The host part of a Host header value (`[v6]:port`, `name:port`, `name`).
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(kind: &str, v: &str) -> StringMatchPlan {
        match kind {
            "exact" => StringMatchPlan::Exact(v.into()),
            "prefix" => StringMatchPlan::Prefix(v.into()),
            _ => StringMatchPlan::Regex(v.into()),
        }
    }

    fn view<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a http::HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            scheme: "http",
            authority: "echo.mesh.test",
            headers,
        }
    }

    #[test]
    fn exact_prefix_and_anchored_regex() {
        let exact = Matcher::new(&sm("exact", "/a"), false).unwrap();
        assert!(exact.matches("/a", false) && !exact.matches("/ab", false));
        let prefix = Matcher::new(&sm("prefix", "/api"), false).unwrap();
        assert!(prefix.matches("/api/v1", false) && !prefix.matches("/ap", false));
        let regex = Matcher::new(&sm("regex", "/item/[0-9]+"), false).unwrap();
        assert!(regex.matches("/item/42", false));
        assert!(
            !regex.matches("/item/42/x", false),
            "regex must match the whole value"
        );
        assert!(!regex.matches("x/item/42", false));
    }

    #[test]
    fn ignore_uri_case_applies_to_exact_prefix_and_regex() {
        let plan = RequestMatchPlan {
            uri: Some(sm("prefix", "/API")),
            ignore_uri_case: true,
            ..Default::default()
        };
        let m = RequestMatcher::new(&plan).unwrap();
        let h = http::HeaderMap::new();
        assert!(m.matches(&view("GET", "/api/x", None, &h)));
        let plan = RequestMatchPlan {
            uri: Some(sm("regex", "/Ab+")),
            ignore_uri_case: true,
            ..Default::default()
        };
        assert!(RequestMatcher::new(&plan)
            .unwrap()
            .matches(&view("GET", "/aBB", None, &h)));
    }

    #[test]
    fn fields_are_anded_headers_and_without_headers() {
        let plan = RequestMatchPlan {
            method: Some(sm("exact", "POST")),
            headers: vec![("end-user".into(), sm("exact", "jason"))],
            without_headers: vec![("x-canary".into(), sm("prefix", ""))],
            ..Default::default()
        };
        let m = RequestMatcher::new(&plan).unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("end-user", "jason".parse().unwrap());
        assert!(m.matches(&view("POST", "/", None, &h)));
        assert!(
            !m.matches(&view("GET", "/", None, &h)),
            "method must also hold"
        );
        h.insert("x-canary", "1".parse().unwrap());
        assert!(
            !m.matches(&view("POST", "/", None, &h)),
            "withoutHeaders present"
        );
        let empty = http::HeaderMap::new();
        assert!(
            !m.matches(&view("POST", "/", None, &empty)),
            "header missing"
        );
    }

    #[test]
    fn query_params_match_any_value() {
        let plan = RequestMatchPlan {
            query_params: vec![("v".into(), sm("exact", "2"))],
            ..Default::default()
        };
        let m = RequestMatcher::new(&plan).unwrap();
        let h = http::HeaderMap::new();
        assert!(m.matches(&view("GET", "/", Some("a=1&v=2"), &h)));
        assert!(!m.matches(&view("GET", "/", Some("v=3"), &h)));
        assert!(!m.matches(&view("GET", "/", None, &h)));
        assert_eq!(query_values(Some("a&b=1"), "a").collect::<Vec<_>>(), [""]);
    }

    #[test]
    fn domains_and_ports() {
        assert!(domain_matches("*", "x"));
        assert!(domain_matches("*.example.com", "a.example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(domain_matches("Echo.Test", "echo.test"));
        assert_eq!(strip_port("a.b:8080"), "a.b");
        assert_eq!(strip_port("[2001:db8::1]:80"), "2001:db8::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
