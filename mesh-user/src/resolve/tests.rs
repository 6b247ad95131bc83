//! Resolution tests: the kernel-or-proxy decision names its reason, once per address.

use super::*;
use crate::{compile::tests::ECHO_SE, config::parse_str};

fn path_of(extra: &str) -> Path {
    let text = format!("{ECHO_SE}{extra}");
    let model = resolve(
        &parse_str("test.yaml", &text).unwrap(),
        &NodeContext::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.services.len(), 1);
    let service = &model.services[0];
    // The variant served always agrees with the decision.
    assert_eq!(
        matches!(service.serving, Serving::Kernel(_)),
        matches!(service.path, Path::Kernel(_)),
        "{:?}",
        service.path
    );
    service.path.clone()
}

fn vs(routes: &str) -> String {
    format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: shop}}\nspec:\n  hosts: [echo]\n{routes}")
}

#[test]
fn no_rule_is_the_kernel_path_to_every_endpoint() {
    assert_eq!(path_of(""), Path::Kernel(KernelReason::NoRoute));
    assert_eq!(
        path_of("").to_string(),
        "kernel: no route: all endpoints of the host"
    );
}

#[test]
fn weights_and_tcp_routes_stay_in_the_kernel_naming_the_route() {
    let weights = vs("  http:\n  - route:\n    - {destination: {host: echo, subset: v1}, weight: 80}\n    - {destination: {host: echo, subset: v2}, weight: 20}\n");
    assert_eq!(
        path_of(&weights).to_string(),
        "kernel: HTTP route spec.http[0] of VirtualService shop/echo has only weighted destinations"
    );
    let tcp = vs("  tcp:\n  - route: [{destination: {host: echo}}]\n");
    assert_eq!(
        path_of(&tcp),
        Path::Kernel(KernelReason::TcpRoute {
            rule: "VirtualService shop/echo".into(),
            field: "spec.tcp[0]".into()
        })
    );
}

#[test]
fn request_conditions_and_features_go_to_the_proxy_naming_the_first() {
    let header = vs("  http:\n  - match: [{port: 80}, {headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: echo, subset: v2}}]\n");
    assert_eq!(
        path_of(&header).to_string(),
        "proxy: spec.http[0].match[1] of VirtualService shop/echo matches on headers"
    );
    let fault = vs("  http:\n  - fault: {abort: {percentage: {value: 10}, httpStatus: 500}}\n    route: [{destination: {host: echo, subset: v1}}]\n");
    assert_eq!(
        path_of(&fault),
        Path::Proxy(ProxyReason::RouteFeature {
            rule: "VirtualService shop/echo".into(),
            field: "spec.http[0]".into(),
            feature: "fault"
        })
    );
}

#[test]
fn hashing_on_a_header_goes_to_the_proxy_naming_the_destination_rule() {
    let hash =
        "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n";
    assert_eq!(
        path_of(hash).to_string(),
        "proxy: DestinationRule shop/echo hashes on httpHeaderName (consistentHash)"
    );
}
