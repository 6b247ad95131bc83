//! Compile tests: the shipped examples, route selection, shares, ports, and L7 refusals.

use std::{net::IpAddr, path::Path};

use super::{compile_rules as compile, *};
use crate::config::{load_path, parse_str, ResourceSet};
use crate::resolve::ResolveError as CompileError;

fn node() -> NodeContext {
    NodeContext {
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
    }
}

fn example(dir: &str) -> ResourceSet {
    load_path(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(dir),
    )
    .unwrap()
}

fn compile_str(text: &str) -> Result<DesiredState, CompileError> {
    compile(&parse_str("test.yaml", text).unwrap(), &node())
}

fn l4(service: &ServicePlan) -> &L4Plan {
    match &service.plan {
        Plan::L4(plan) => plan,
        Plan::L7(_) => panic!("{} was compiled for the L7 proxy", service.name),
    }
}

fn l7(service: &ServicePlan) -> &L7Plan {
    match &service.plan {
        Plan::L7(plan) => plan,
        Plan::L4(_) => panic!("{} was compiled for the kernel path", service.name),
    }
}

/// Slots per backend address in a plan's table.
fn slots(plan: &L4Plan) -> Vec<(String, usize)> {
    plan.backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                b.address.to_string(),
                plan.table.iter().filter(|s| **s as usize == i).count(),
            )
        })
        .collect()
}

fn shares(plan: &L4Plan) -> Vec<(String, f64)> {
    plan.backends
        .iter()
        .map(|b| (b.address.to_string(), (b.share * 1e6).round() / 1e6))
        .collect()
}

/// Host `echo` (HTTP port 80, VIP 198.18.100.1, endpoints v1 and v2) with its subsets.
pub(crate) const ECHO_SE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo]
  addresses: [198.18.100.1]
  ports:
  - {number: 80, protocol: HTTP, name: http}
  resolution: STATIC
  endpoints:
  - {address: 198.18.2.1, labels: {version: v1}}
  - {address: 198.18.3.1, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn with_vs(http_or_tcp: &str) -> String {
    format!(
        "{ECHO_SE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: shop}}\nspec:\n  hosts: [echo]\n{http_or_tcp}"
    )
}

#[test]
fn tcp_echo_step_one_sends_everything_to_v1() {
    let state = compile(&example("tcp-echo"), &node()).unwrap();
    assert_eq!(state.services.len(), 1);
    let service = &state.services[0];
    assert_eq!(
        service.address,
        ServiceAddress {
            ip: "198.18.0.1".parse().unwrap(),
            port: 31400,
            protocol: L4Protocol::Tcp
        }
    );
    assert_eq!(service.name, "gateway/default/tcp-echo-gateway:31400");
    assert_eq!(
        service.sources,
        [
            "DestinationRule/default/tcp-echo-destination",
            "Gateway/default/tcp-echo-gateway",
            "ServiceEntry/default/tcp-echo",
            "VirtualService/default/tcp-echo",
        ]
    );
    let plan = l4(service);
    assert_eq!(shares(plan), [("198.18.2.1:9000".to_string(), 1.0)]);
    assert_eq!(plan.backends[0].subset.as_deref(), Some("v1"));
    assert_eq!(plan.backends[0].labels["version"], "v1");
    assert_eq!(
        plan.table.len(),
        super::maglev::default_table_size(1) as usize
    );
    assert!(plan.sized_by_default);
    assert!(plan.table.iter().all(|s| *s == 0));
    assert!(!plan.hash_source_ip);
}

#[test]
fn tcp_echo_step_two_splits_80_20() {
    let mut set = example("tcp-echo");
    set.merge(example("tcp-echo/step-2-20-v2"));
    let state = compile(&set, &node()).unwrap();
    assert_eq!(state.services.len(), 1);
    let plan = l4(&state.services[0]);
    assert_eq!(
        shares(plan),
        [
            ("198.18.2.1:9000".to_string(), 0.8),
            ("198.18.3.1:9000".to_string(), 0.2)
        ]
    );
    let m = plan.table.len() as f64;
    for ((_, count), want) in slots(plan).into_iter().zip([0.8, 0.2]) {
        assert!((count as f64 / m - want).abs() <= 1.0 / m);
    }
}

#[test]
fn tcp_echo_gateway_is_served_on_every_node_address() {
    let node = NodeContext {
        node_addresses: vec![
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ],
    };
    let state = compile(&example("tcp-echo"), &node).unwrap();
    // The IPv6 node address has no IPv4-free path to the IPv4 backends (no NAT64): not served.
    let addresses: Vec<IpAddr> = state.services.iter().map(|s| s.address.ip).collect();
    assert_eq!(
        addresses,
        [
            "198.18.0.1".parse::<IpAddr>().unwrap(),
            "198.18.0.2".parse().unwrap()
        ]
    );
}

#[test]
fn l4_split_example_compiles_70_20_10_on_both_families() {
    let state = compile(&example("l4-split"), &node()).unwrap();
    let addresses: Vec<String> = state
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {} {:?}",
                s.address.ip, s.address.port, s.address.protocol
            )
        })
        .collect();
    assert_eq!(
        addresses,
        [
            "198.18.100.1 8080 Tcp",
            "198.18.100.1 8081 Udp",
            "2001:db8:100::1 8080 Tcp",
            "2001:db8:100::1 8081 Udp"
        ]
    );
    for service in &state.services {
        let plan = l4(service);
        assert!(plan.hash_source_ip);
        assert_eq!(plan.table.len(), 65_537);
        let got: Vec<f64> = shares(plan).into_iter().map(|(_, s)| s).collect();
        assert_eq!(got, [0.7, 0.2, 0.1], "{}", service.name);
        let m = plan.table.len() as f64;
        for ((_, count), want) in slots(plan).into_iter().zip([0.7, 0.2, 0.1]) {
            assert!((count as f64 / m - want).abs() <= 1.0 / m);
        }
        let port = service.address.port;
        assert!(plan.backends.iter().all(|b| b.address.port() == port));
    }
    assert_eq!(state.services[0].name, "echo");
    assert_eq!(state.services[2].name, "echo-v6");
}

#[test]
fn compile_is_deterministic() {
    let set = example("l4-split");
    assert_eq!(
        compile(&set, &node()).unwrap(),
        compile(&set, &node()).unwrap()
    );
}

#[test]
fn no_virtual_service_means_all_endpoints_by_endpoint_weight() {
    let text = ECHO_SE.replace("{address: 198.18.2.1,", "{address: 198.18.2.1, weight: 3,");
    let state = compile_str(&text).unwrap();
    let plan = l4(&state.services[0]);
    assert_eq!(
        shares(plan),
        [
            ("198.18.2.1:80".to_string(), 0.75),
            ("198.18.3.1:80".to_string(), 0.25)
        ]
    );
    assert_eq!(plan.backends[0].subset, None);
}

#[test]
fn route_weights_multiply_endpoint_weights() {
    let text = with_vs(
        "  tcp:\n  - route:\n    - {destination: {host: echo, subset: v1}, weight: 50}\n    - {destination: {host: echo}, weight: 50}\n",
    )
    .replace("{address: 198.18.3.1,", "{address: 198.18.3.1, weight: 3,");
    let plan = l4(&compile_str(&text).unwrap().services[0]).clone();
    // v1 gets 50% + 50% x 1/4; v2 gets 50% x 3/4; the v1 backend is merged across destinations.
    assert_eq!(
        shares(&plan),
        [
            ("198.18.2.1:80".to_string(), 0.625),
            ("198.18.3.1:80".to_string(), 0.375)
        ]
    );
    assert_eq!(
        plan.backends[0].subset, None,
        "reached through two destinations"
    );
    assert_eq!(plan.backends[1].subset, None);
}

#[test]
fn zero_weight_destinations_and_endpoints_are_omitted() {
    let text = with_vs(
        "  tcp:\n  - route:\n    - {destination: {host: echo, subset: v1}, weight: 100}\n    - {destination: {host: echo, subset: v2}, weight: 0}\n",
    );
    let plan = l4(&compile_str(&text).unwrap().services[0]).clone();
    assert_eq!(shares(&plan), [("198.18.2.1:80".to_string(), 1.0)]);
}

#[test]
fn weights_only_http_route_compiles_to_l4() {
    let text = with_vs(
        "  http:\n  - name: split\n    match: [{port: 80}]\n    route:\n    - {destination: {host: echo, subset: v1}, weight: 90}\n    - {destination: {host: echo, subset: v2}, weight: 10}\n",
    );
    let state = compile_str(&text).unwrap();
    let plan = l4(&state.services[0]);
    assert_eq!(
        shares(plan),
        [
            ("198.18.2.1:80".to_string(), 0.9),
            ("198.18.3.1:80".to_string(), 0.1)
        ]
    );
    assert_eq!(
        state.services[0].sources,
        [
            "DestinationRule/shop/echo",
            "ServiceEntry/shop/echo",
            "VirtualService/shop/echo"
        ]
    );
}

#[test]
fn http_routes_needing_requests_compile_to_an_l7_plan() {
    for extra in [
        "    match: [{uri: {prefix: /api}}]\n",
        "    rewrite: {uri: /v2}\n",
        "    timeout: 1s\n",
        "    fault: {abort: {httpStatus: 503, percentage: {value: 1}}}\n",
        "    mirror: {host: echo, subset: v2}\n",
        "    retries: {attempts: 3, retryOn: 5xx}\n",
        "    headers: {request: {set: {x-a: b}}}\n",
        "    corsPolicy: {allowOrigins: [{exact: 'http://a.test'}]}\n",
    ] {
        let text = with_vs(&format!(
            "  http:\n  - route:\n    - destination: {{host: echo, subset: v1}}\n{extra}"
        ));
        let state = compile_str(&text).unwrap_or_else(|e| panic!("{extra}: {e}"));
        let plan = l7(&state.services[0]);
        assert_eq!(plan.virtual_hosts.len(), 1, "{extra}");
        assert_eq!(plan.virtual_hosts[0].domains, ["*"]);
        assert_eq!(
            plan.clusters[0].backends[0].address.to_string(),
            "198.18.2.1:80"
        );
    }
}

#[test]
fn weights_only_http_routes_stay_in_the_kernel() {
    let text = with_vs(
        "  http:\n  - route:\n    - {destination: {host: echo, subset: v1}, weight: 50}\n    - {destination: {host: echo, subset: v2}, weight: 50}\n",
    );
    l4(&compile_str(&text).unwrap().services[0]);
}

#[test]
fn l7_plan_keeps_route_order_matches_and_weights() {
    let text = with_vs(
        "  http:\n  - name: jason\n    match: [{headers: {End-User: {exact: jason}}}, {queryParams: {u: {regex: 'j.*'}}}]\n    route: [{destination: {host: echo, subset: v2}}]\n  - route:\n    - {destination: {host: echo, subset: v1}, weight: 75}\n    - {destination: {host: echo, subset: v2}, weight: 25}\n    retries: {attempts: 4, perTryTimeout: 250ms, retryOn: 'gateway-error,503'}\n",
    );
    let state = compile_str(&text).unwrap();
    let plan = l7(&state.services[0]);
    let routes = &plan.virtual_hosts[0].routes;
    assert_eq!(routes[0].name, "jason");
    assert_eq!(routes[1].name, "echo.http[1]");
    assert_eq!(routes[0].matches.len(), 2);
    assert_eq!(
        routes[0].matches[0].headers,
        [(
            "end-user".to_string(),
            StringMatchPlan::Exact("jason".into())
        )]
    );
    // v2 is one cluster shared by both routes.
    assert_eq!(plan.clusters.len(), 2);
    let RouteActionPlan::Forward { destinations } = &routes[1].action else {
        panic!("forward expected");
    };
    assert_eq!(
        destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [75, 25]
    );
    assert_eq!(routes[1].retries.attempts, 4);
    assert_eq!(
        routes[1].retries.per_try_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(routes[1].retries.retriable_status_codes, [503]);
    assert!(routes[1]
        .retries
        .retry_on
        .contains(&RetryOn::RetriableStatusCodes));
    // No retries given: Istio's default policy.
    assert_eq!(routes[0].retries, RetryPlan::istio_default());
}

#[test]
fn header_hashing_moves_an_http_port_to_the_proxy_but_not_a_tcp_one() {
    let hash =
        "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n";
    let text = format!("{ECHO_SE}{hash}");
    let state = compile_str(&text).unwrap();
    let plan = l7(&state.services[0]);
    assert_eq!(
        plan.clusters[0].policy.load_balancer,
        LoadBalancerPlan::HashHeader {
            name: "x-user".into()
        }
    );
    let tcp = text.replace("protocol: HTTP, name: http", "protocol: TCP, name: tcp");
    let message = compile_str(&tcp).unwrap_err().to_string();
    assert!(
        message.contains("hashing on httpHeaderName needs the L7 proxy"),
        "{message}"
    );
}

#[test]
fn destination_rule_policies_reach_the_cluster_subset_over_host() {
    let text = format!(
        "{ECHO_SE}  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    connectionPool:\n      tcp: {{maxConnections: 10, connectTimeout: 2s}}\n      http: {{http1MaxPendingRequests: 5}}\n    outlierDetection: {{consecutive5xxErrors: 3, baseEjectionTime: 20s}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: shop}}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{{uri: {{prefix: /}}}}]\n    route: [{{destination: {{host: echo, subset: v1}}}}]\n"
    )
    .replace(
        "  - {name: v1, labels: {version: v1}}\n",
        "  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n",
    );
    let state = compile_str(&text).unwrap();
    let policy = &l7(&state.services[0]).clusters[0].policy;
    assert_eq!(policy.load_balancer, LoadBalancerPlan::Random);
    assert_eq!(policy.connection_pool.max_connections, Some(10));
    assert_eq!(policy.connection_pool.max_pending_requests, Some(5));
    assert_eq!(
        policy.connection_pool.connect_timeout,
        Some(std::time::Duration::from_secs(2))
    );
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx, Some(3));
    assert_eq!(
        outlier.base_ejection_time,
        std::time::Duration::from_secs(20)
    );
    assert_eq!(outlier.max_ejection_percent, 10);
}

#[test]
fn bad_regex_is_refused_with_the_field() {
    let text = with_vs(
        "  http:\n  - match: [{uri: {regex: '/a(['}}]\n    route: [{destination: {host: echo}}]\n",
    );
    let message = compile_str(&text).unwrap_err().to_string();
    assert!(
        message.contains("spec.http[0].match[0].uri.regex: not a valid RE2 regex"),
        "{message}"
    );
}

#[test]
fn http_gateway_routes_by_host_through_the_proxy() {
    let text = format!(
        "{ECHO_SE}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: shop}}\nspec:\n  servers:\n  - port: {{number: 8000, protocol: HTTP, name: http}}\n    hosts: ['*']\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\nspec:\n  hosts: [web.test]\n  gateways: [gw]\n  http:\n  - match: [{{uri: {{prefix: /a}}}}]\n    route: [{{destination: {{host: echo, subset: v2, port: {{number: 80}}}}}}]\n"
    );
    let state = compile_str(&text).unwrap();
    let gateway = state
        .services
        .iter()
        .find(|s| s.address.port == 8000)
        .unwrap();
    let plan = l7(gateway);
    assert_eq!(plan.virtual_hosts[0].domains, ["web.test"]);
    assert_eq!(
        plan.clusters[0].backends[0].address.to_string(),
        "198.18.3.1:80"
    );
}

#[test]
fn l7_route_for_another_port_does_not_block_the_l4_one() {
    let text = with_vs(
        "  http:\n  - match: [{port: 8080, uri: {prefix: /a}}]\n    route: [{destination: {host: echo}}]\n  - route: [{destination: {host: echo, subset: v2}}]\n",
    );
    let plan = l4(&compile_str(&text).unwrap().services[0]).clone();
    assert_eq!(shares(&plan), [("198.18.3.1:80".to_string(), 1.0)]);
}

#[test]
fn tcp_routes_win_over_http_and_match_on_port() {
    let text = with_vs(
        "  tcp:\n  - match: [{port: 81}]\n    route: [{destination: {host: echo, subset: v1}}]\n  - match: [{port: 80}]\n    route: [{destination: {host: echo, subset: v2}}]\n  http:\n  - route: [{destination: {host: echo, subset: v1}}]\n",
    );
    let plan = l4(&compile_str(&text).unwrap().services[0]).clone();
    assert_eq!(shares(&plan), [("198.18.3.1:80".to_string(), 1.0)]);
}

#[test]
fn tls_routes_are_refused() {
    let text = with_vs(
        "  tls:\n  - match: [{sniHosts: [echo]}]\n    route: [{destination: {host: echo}}]\n",
    );
    let message = compile_str(&text).unwrap_err().to_string();
    assert!(
        message.contains("spec.tls: TLS (SNI) routing needs the L7 proxy"),
        "{message}"
    );
}

#[test]
fn short_names_resolve_across_spellings() {
    let text = with_vs(
        "  tcp:\n  - route: [{destination: {host: echo.shop.svc.cluster.local, subset: v2}}]\n",
    );
    let plan = l4(&compile_str(&text).unwrap().services[0]).clone();
    assert_eq!(shares(&plan), [("198.18.3.1:80".to_string(), 1.0)]);
}

#[test]
fn ports_map_to_endpoint_ports_then_target_port_then_number() {
    let text = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: multi}
spec:
  hosts: [multi.example.com]
  addresses: [198.18.100.2]
  ports:
  - {number: 80, protocol: HTTP, name: http, targetPort: 8080}
  - {number: 81, protocol: TCP, name: tcp}
  resolution: STATIC
  endpoints:
  - {address: 198.18.2.1, ports: {http: 9090}}
  - {address: 198.18.3.1}
";
    let state = compile_str(text).unwrap();
    let by_port: Vec<Vec<String>> = state
        .services
        .iter()
        .map(|s| {
            l4(s)
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect()
        })
        .collect();
    assert_eq!(by_port[0], ["198.18.2.1:9090", "198.18.3.1:8080"]);
    assert_eq!(by_port[1], ["198.18.2.1:81", "198.18.3.1:81"]);
}

#[test]
fn destination_port_selects_the_host_port() {
    let text = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: front}
spec:
  hosts: [front.example.com]
  addresses: [198.18.100.3]
  ports: [{number: 443, protocol: TCP, name: tcp}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: back}
spec:
  hosts: [back.example.com]
  ports: [{number: 80, protocol: TCP, name: a}, {number: 90, protocol: TCP, name: b, targetPort: 9999}]
  resolution: STATIC
  endpoints: [{address: 198.18.5.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front}
spec:
  hosts: [front.example.com]
  tcp: [{route: [{destination: {host: back.example.com, port: {number: 90}}}]}]
";
    let state = compile_str(text).unwrap();
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        l4(&state.services[0]).backends[0].address.to_string(),
        "198.18.5.1:9999"
    );
}

#[test]
fn invalid_rules_fail_compile_with_validation_errors() {
    let text = with_vs("  tcp:\n  - route: [{destination: {host: echo}, weight: -5}, {destination: {host: echo}}]\n");
    let error = compile_str(&text).unwrap_err();
    assert!(matches!(error, CompileError::Invalid(_)));
    assert!(
        error
            .to_string()
            .contains("spec.tcp[0].route[0].weight: weight -5 must not be negative"),
        "{error}"
    );
}

#[test]
fn a_route_to_a_subset_not_defined_yet_compiles_to_no_backend_with_a_warning() {
    // Kernel path: the service exists with an empty table (connections are refused).
    let text = with_vs("  tcp:\n  - route: [{destination: {host: echo, subset: v9}}]\n");
    let state = compile_str(&text).unwrap();
    assert!(l4(&state.services[0]).table.is_empty());
    assert!(state.warnings[0]
        .to_string()
        .contains("spec.tcp[0].route[0].destination.subset: subset `v9` is not defined (yet)"));
    // Proxy: the route's cluster has no backend (503 per request).
    let text = with_vs("  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: echo, subset: v9}}]\n  - route: [{destination: {host: echo, subset: v1}}]\n");
    let state = compile_str(&text).unwrap();
    let Plan::L7(plan) = &state.services[0].plan else {
        panic!("header match needs the proxy");
    };
    assert!(plan
        .clusters
        .iter()
        .any(|c| c.subset.as_deref() == Some("v9") && c.backends.is_empty()));
    assert!(plan
        .clusters
        .iter()
        .any(|c| c.subset.as_deref() == Some("v1") && !c.backends.is_empty()));
}

#[test]
fn two_gateways_on_the_same_node_port_conflict_at_compile() {
    // A bound and an unbound server do not collide in validation, but do on a node holding the
    // bound address.
    let mut set = example("tcp-echo");
    let other = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: other}
spec:
  servers: [{port: {number: 31400, name: tcp, protocol: TCP}, hosts: ['*'], bind: 198.18.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other}
spec:
  hosts: ['*']
  gateways: [other]
  tcp: [{route: [{destination: {host: tcp-echo}}]}]
";
    set.resources
        .extend(parse_str("other.yaml", other).unwrap().resources);
    let message = compile(&set, &node()).map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("other.yaml: document 1 (Gateway default/other): spec: 198.18.0.1 port 31400 (Tcp) is also served by `gateway/default/tcp-echo-gateway:31400`"), "{message}");
}

#[test]
fn sandbox_steps_compile_on_top_of_the_service() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sandbox");
    for (step, want) in [
        ("step1-all-v1.yaml", vec![1.0]),
        ("step2-80-v1-20-v2.yaml", vec![0.8, 0.2]),
        ("step3-50-v1-50-v3.yaml", vec![0.5, 0.5]),
        ("step4-all-v3.yaml", vec![1.0]),
    ] {
        let mut set = load_path(&config.join("00-reviews-service.yaml")).unwrap();
        set.merge(load_path(&config.join(step)).unwrap());
        let state = compile(&set, &node()).unwrap();
        assert_eq!(state.services.len(), 1, "{step}");
        let got: Vec<f64> = shares(l4(&state.services[0]))
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(got, want, "{step}");
    }
}

/// Istio's semantics make the order of applies irrelevant: whatever arrives first (a
/// VirtualService naming subsets, its DestinationRule, the ServiceEntry, the Gateway), every
/// intermediate set is accepted and the final rules in force are the same.
#[test]
fn every_order_of_apply_ends_with_the_same_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/istio-samples");
    let pieces: Vec<ResourceSet> = [
        "services.yaml",
        "bookinfo-networking/destination-rule-all.yaml",
        "bookinfo-networking/virtual-service-reviews-jason-v2-v3.yaml",
        "bookinfo-networking/bookinfo-gateway.yaml",
    ]
    .iter()
    .map(|f| crate::config::load_path(&dir.join(f)).unwrap())
    .collect();
    let mut reference: Option<DesiredState> = None;
    let mut orders = 0;
    for order in permutations(pieces.len()) {
        let mut applied = ResourceSet::default();
        for &i in &order {
            applied.merge(pieces[i].clone());
            // Each step is accepted, whatever is still missing.
            compile(&applied, &node()).unwrap_or_else(|e| panic!("order {order:?}: {e}"));
        }
        let mut state = compile(&applied, &node()).unwrap();
        state.warnings.clear();
        assert!(state.services.iter().any(|s| matches!(&s.plan, Plan::L7(p)
            if p.clusters.iter().any(|c| c.subset.as_deref() == Some("v2") && !c.backends.is_empty()))));
        match &reference {
            None => reference = Some(state),
            Some(first) => assert_eq!(first, &state, "order {order:?}"),
        }
        orders += 1;
    }
    assert_eq!(orders, 24);
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            out.push(order);
        }
    }
    out
}
