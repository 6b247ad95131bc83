//! Validation tests: one per rule, asserting the field path and message.

use super::*;
use crate::config::parse_str;

const SE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo]
  addresses: [198.18.100.1]
  ports: [{number: 80, protocol: TCP, name: tcp}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.2.1, labels: {version: v1}}
";

const DR: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  subsets: [{name: v1, labels: {version: v1}}]
";

fn vs(body: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo}}\nspec:\n{body}")
}

fn errors(docs: &[&str]) -> Vec<String> {
    let set = parse_str("v.yaml", &docs.join("---\n")).unwrap();
    match validate(&set) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.errors.iter().map(ToString::to_string).collect(),
    }
}

/// Warnings, whether or not there are errors too.
fn warnings(docs: &[&str]) -> Vec<String> {
    let set = parse_str("v.yaml", &docs.join("---\n")).unwrap();
    match validate(&set) {
        Ok(warnings) => warnings.iter().map(ToString::to_string).collect(),
        Err(errors) => errors.warnings.iter().map(ToString::to_string).collect(),
    }
}

fn assert_warning(docs: &[&str], want: &str) {
    let found = warnings(docs);
    assert!(
        found.iter().any(|e| e.contains(want)),
        "want {want:?} in {found:#?}"
    );
}

fn assert_error(docs: &[&str], want: &str) {
    let found = errors(docs);
    assert!(
        found.iter().any(|e| e.contains(want)),
        "want {want:?} in {found:#?}"
    );
}

#[test]
fn valid_rules_pass() {
    let route =
        vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo, subset: v1}}]}]\n");
    assert_eq!(errors(&[SE, DR, &route]), Vec::<String>::new());
}

#[test]
fn display_format_is_file_document_resource_field_message() {
    let found = errors(&[SE, &vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo}, weight: -1}, {destination: {host: echo}}]}]\n")]);
    assert!(found.contains(&"v.yaml: document 2 (VirtualService default/echo): spec.tcp[0].route[0].weight: weight -1 must not be negative".to_string()), "{found:#?}");
}

#[test]
fn all_problems_are_reported() {
    let bad = vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: Nope}, weight: -1}, {destination: {host: echo, subset: V7}}]}]\n");
    assert!(errors(&[SE, DR, &bad]).len() >= 3);
}

#[test]
fn weights() {
    let two = |a: &str, b: &str| {
        vs(&format!("  hosts: [echo]\n  tcp: [{{route: [{{destination: {{host: echo}}{a}}}, {{destination: {{host: echo}}{b}}}]}}]\n"))
    };
    assert_error(
        &[SE, &two(", weight: 0", ", weight: 0")],
        "spec.tcp[0].route: weights sum to 0",
    );
    assert_error(&[SE, &two("", "")], "weights sum to 0");
    assert_error(
        &[SE, &two(", weight: 3000000000", ", weight: 1")],
        "spec.tcp[0].route[0].weight: weight 3000000000 is out of range",
    );
    assert!(
        errors(&[SE, &two(", weight: 3", ", weight: 1")]).is_empty(),
        "relative weights need not sum to 100"
    );
    let single =
        vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo}, weight: 0}]}]\n");
    assert!(
        errors(&[SE, &single]).is_empty(),
        "a lone destination gets everything"
    );
}

#[test]
fn unknown_host_subset_and_port() {
    let route = |dest: &str| {
        vs(&format!(
            "  hosts: [echo]\n  tcp: [{{route: [{{destination: {dest}}}]}}]\n"
        ))
    };
    // Istio's semantics (IST0101): references to what is not defined (yet) are warnings, with
    // the same precision as errors, and nothing else is wrong with the rule.
    let dangling = [SE, &route("{host: nope}")];
    assert_warning(&dangling, "warning: v.yaml: document 2 (VirtualService default/echo): spec.tcp[0].route[0].destination.host: no ServiceEntry defines host `nope` (yet; a short name means `nope.default.svc.cluster.local`)");
    assert!(errors(&dangling).is_empty());
    assert_warning(
        &[SE, &route("{host: echo, subset: v1}")],
        "subset `v1` is not defined (yet): no DestinationRule for host `echo`",
    );
    assert_warning(
        &[SE, DR, &route("{host: echo, subset: v2}")],
        "subset `v2` is not defined (yet) in DestinationRule default/echo (it has: v1)",
    );
    assert!(errors(&[SE, DR, &route("{host: echo, subset: v2}")]).is_empty());
    assert_error(
        &[SE, &route("{host: echo, port: {number: 81}}")],
        "destination.port.number: host `echo` has no port 81 (it has: 80)",
    );
}

#[test]
fn short_names_match_fqdns() {
    let route = vs("  hosts: [echo.default.svc.cluster.local]\n  tcp: [{route: [{destination: {host: echo.default.svc.cluster.local}}]}]\n");
    assert!(errors(&[SE, &route]).is_empty());
    let other_ns = vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo.other.svc.cluster.local}}]}]\n");
    assert_warning(
        &[SE, &other_ns],
        "no ServiceEntry defines host `echo.other.svc.cluster.local`",
    );
}

#[test]
fn subsets_must_select_an_endpoint() {
    let dr = DR.replace("version: v1", "version: v9");
    // A canary's subset defined before the canary exists: a warning, as in Istio.
    assert_warning(
        &[SE, &dr],
        "spec.subsets[0].labels: subset `v1` selects no endpoint of host `echo` yet",
    );
    assert!(errors(&[SE, &dr]).is_empty());
}

#[test]
fn conflicts_between_resources() {
    assert_error(&[SE, SE], "metadata.name: duplicate resource: ServiceEntry default/echo (v.yaml: document 1) is already defined");
    let other = SE
        .replace("name: echo}", "name: echo2}")
        .replace("hosts: [echo]", "hosts: [echo2]");
    assert_error(&[SE, &other], "spec.addresses[0]: address 198.18.100.1 port 80 is already claimed by ServiceEntry default/echo");
    let route = |name: &str| {
        vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo}}]}]\n")
            .replace("name: echo}", &format!("name: {name}}}"))
    };
    assert_error(
        &[SE, &route("a"), &route("b")],
        "spec.hosts[0]: host `echo` already has VirtualService default/a",
    );
}

#[test]
fn service_entry_fields() {
    assert_error(
        &[&SE.replace("STATIC", "DNS")],
        "spec.resolution: DNS is not supported; only STATIC is supported",
    );
    assert_error(
        &[&SE.replace("  resolution: STATIC\n", "")],
        "spec.resolution: resolution is missing",
    );
    assert_error(
        &[&SE.replace("198.18.100.1]", "198.18.100.0/24]")],
        "spec.addresses[0]: `198.18.100.0/24` is a range",
    );
    assert_error(
        &[&SE.replace("198.18.100.1]", "2001:db8::1]")],
        "spec.endpoints[0].address: IPv4 endpoint 198.18.2.1 cannot serve IPv6 address 2001:db8::1",
    );
    assert_error(
        &[&SE.replace("{address: 198.18.2.1,", "{address: echo.example.com,")],
        "is not an IP address",
    );
    assert_error(
        &[&SE.replace(
            "[{number: 80, protocol: TCP, name: tcp}]",
            "[{number: 80, name: a}, {number: 80, name: b}]",
        )],
        "spec.ports[1].number: port 80 is already defined by spec.ports[0]",
    );
    assert_error(
        &[&SE.replace("number: 80,", "number: 0,")],
        "spec.ports[0].number: port 0 is out of range",
    );
    assert_error(
        &[&SE.replace("protocol: TCP", "protocol: QUIC")],
        "spec.ports[0].protocol: unknown protocol `QUIC`",
    );
    assert_error(
        &[&format!("{SE}  workloadSelector: {{labels: {{app: x}}}}\n")],
        "spec.workloadSelector",
    );
    assert_error(
        &[&SE.replace(
            "labels: {version: v1}}",
            "labels: {version: v1}, ports: {grpc: 90}}",
        )],
        "spec.endpoints[0].ports.grpc: no port named `grpc`",
    );
}

#[test]
fn destination_rule_fields() {
    let with_lb = |lb: &str| format!("{DR}  trafficPolicy: {{loadBalancer: {lb}}}\n");
    assert_error(
        &[
            SE,
            &with_lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 4096}}}"),
        ],
        "maglev.tableSize: table size 4096 must be a prime",
    );
    assert_error(
        &[
            SE,
            &with_lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 65539}}}"),
        ],
        "must be a prime number between 2 and 65537",
    );
    assert_error(
        &[
            SE,
            &with_lb("{simple: RANDOM, consistentHash: {useSourceIp: true}}"),
        ],
        "simple and consistentHash are mutually exclusive",
    );
    assert_error(
        &[SE, &with_lb("{consistentHash: {maglev: {tableSize: 7}}}")],
        "exactly one of useSourceIp",
    );
    assert!(errors(&[
        SE,
        &with_lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}")
    ])
    .is_empty());
    assert!(errors(&[SE, &with_lb("{simple: PASSTHROUGH}")]).is_empty());
    let pool =
        format!("{DR}  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: 10}}}}}}\n");
    assert_error(
        &[SE, &pool],
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout: `10` has no unit",
    );
    assert_warning(
        &[SE, &DR.replace("host: echo", "host: nope")],
        "spec.host: no ServiceEntry defines host `nope`",
    );
}

#[test]
fn gateways_are_resolved() {
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers: [{port: {number: 31400, name: tcp, protocol: TCP}, hosts: ['*']}]\n";
    let bound = |gateways: &str| {
        vs(&format!("  hosts: ['*']\n  gateways: {gateways}\n  tcp: [{{route: [{{destination: {{host: echo}}}}]}}]\n"))
    };
    assert!(errors(&[SE, gw, &bound("[gw]")]).is_empty());
    assert!(errors(&[SE, gw, &bound("[default/gw]")]).is_empty());
    assert_warning(
        &[SE, gw, &bound("[other]")],
        "spec.gateways[0]: Gateway default/other is not defined (yet)",
    );
    assert_error(
        &[SE, gw, &bound("[mesh]")],
        "the wildcard host `*` is only allowed",
    );
    let udp = gw.replace("protocol: TCP", "protocol: UDP");
    assert_error(
        &[&udp],
        "spec.servers[0].port.protocol: UDP is not a gateway protocol",
    );
    let gw2 = gw.replace("name: gw}", "name: gw2}");
    assert_error(
        &[gw, &gw2],
        "spec.servers[0].port.number: port 31400 is already served by Gateway default/gw",
    );
    // HTTP servers of several Gateways merge by host; one host twice names both Gateways.
    let http = |name: &str, host: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\nspec:\n  servers: [{{port: {{number: 8080, name: http, protocol: HTTP}}, hosts: ['{host}']}}]\n")
    };
    assert!(errors(&[&http("a", "a.example.com"), &http("b", "b.example.com")]).is_empty());
    assert_error(
        &[&http("a", "a.example.com"), &http("b", "a.example.com")],
        "v.yaml: document 2 (Gateway default/b): spec.servers[0].hosts: host `a.example.com` on port 8080 is also served by Gateway default/a (v.yaml: document 1)",
    );
}

#[test]
fn multi_port_hosts_need_a_port_from_gateways() {
    let se = SE.replace(
        "[{number: 80, protocol: TCP, name: tcp}]",
        "[{number: 80, name: a}, {number: 81, name: b}]",
    );
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers: [{port: {number: 31400, name: tcp, protocol: TCP}, hosts: ['*']}]\n";
    let bound =
        vs("  hosts: ['*']\n  gateways: [gw]\n  tcp: [{route: [{destination: {host: echo}}]}]\n");
    assert_error(
        &[&se, gw, &bound],
        "destination.port: host `echo` has several ports (80, 81); say which with port.number",
    );
    // For mesh traffic to the same host, the incoming port is kept.
    let mesh = vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: echo}}]}]\n");
    assert!(errors(&[&se, &mesh]).is_empty());
}

#[test]
fn family_mismatch_between_vip_and_route_destinations() {
    let v6 = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: six}\nspec:\n  hosts: [six]\n  ports: [{number: 80, name: tcp}]\n  resolution: STATIC\n  endpoints: [{address: '2001:db8::5'}]\n";
    let route = vs("  hosts: [echo]\n  tcp: [{route: [{destination: {host: six}}]}]\n");
    assert_error(
        &[SE, v6, &route],
        "IPv6 endpoint 2001:db8::5 of `six` cannot serve the IPv4 VIP 198.18.100.1",
    );
}

#[test]
fn http_route_fields() {
    let http = |route: &str| vs(&format!("  hosts: [echo]\n  http:\n  - {route}\n"));
    assert_error(
        &[
            SE,
            &http(
                "{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: echo}}]}",
            ),
        ],
        "spec.http[0].match[0].uri: exactly one of exact, prefix, regex is required",
    );
    assert_error(
        &[
            SE,
            &http("{route: [{destination: {host: echo}}], timeout: soon}"),
        ],
        "spec.http[0].timeout",
    );
    assert_error(
        &[
            SE,
            &http("{route: [{destination: {host: echo}}], redirect: {uri: /x}}"),
        ],
        "redirect and route are mutually exclusive",
    );
    assert_error(&[SE, &http("{fault: {abort: {httpStatus: 503, percentage: {value: 150}}}, route: [{destination: {host: echo}}]}")], "spec.http[0].fault.abort.percentage.value: 150 is out of range");
    assert_error(
        &[SE, &http("{name: x}")],
        "one of route, redirect, directResponse or delegate is required",
    );
}

#[test]
fn names_must_be_dns() {
    assert_error(
        &[&SE.replace("name: echo}", "name: Echo_1}")],
        "metadata.name: `Echo_1` is not a valid name",
    );
}
