//! Unit tests for parsing: accepted forms, strictness, and error positions.

use super::*;

const VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  tcp:
  - route:
    - destination:
        host: reviews
      weight: 100
";

fn err(text: &str) -> String {
    parse_str("rules.yaml", text).unwrap_err().to_string()
}

#[test]
fn all_three_api_versions_parse() {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let text = VS.replace(
            "networking.istio.io/v1\n",
            &format!("networking.istio.io/{version}\n"),
        );
        let set = parse_str("rules.yaml", &text).unwrap();
        assert_eq!(set.len(), 1, "{version}");
        assert_eq!(set.resources[0].meta.namespace, "default");
    }
}

#[test]
fn other_api_versions_are_rejected() {
    let text = VS.replace("networking.istio.io/v1\n", "networking.istio.io/v2\n");
    let message = err(&text);
    assert!(
        message.contains("unsupported apiVersion `networking.istio.io/v2`"),
        "{message}"
    );
    assert!(
        message.contains("rules.yaml: document 1 (VirtualService default/reviews)"),
        "{message}"
    );
}

#[test]
fn sources_count_documents_and_lines() {
    let text = format!(
        "# comment\n{VS}---\n{}",
        VS.replace("reviews\nspec", "ratings\nspec")
    );
    let set = parse_str("<stdin>", &text).unwrap();
    assert_eq!(
        set.resources[0].source,
        Source {
            file: "<stdin>".into(),
            document: 1,
            line: 2
        }
    );
    assert_eq!(set.resources[1].source.document, 2);
    assert_eq!(set.resources[1].source.line, 15);
    assert_eq!(set.resources[1].meta.name, "ratings");
}

#[test]
fn unknown_fields_are_errors_with_path_and_position() {
    let text = VS.replace(
        "      weight: 100\n",
        "      weight: 100\n      wieght: 5\n",
    );
    let message = err(&text);
    assert!(message.contains("spec.tcp[0].route[0]"), "{message}");
    assert!(message.contains("unknown field `wieght`"), "{message}");
    assert!(message.contains("at line 13"), "{message}");
}

#[test]
fn wrong_types_name_the_field() {
    let text = VS.replace("weight: 100", "weight: lots");
    let message = err(&text);
    assert!(
        message.contains("spec.tcp[0].route[0].weight: invalid type: string \"lots\""),
        "{message}"
    );
    assert!(message.contains("at line 12 column"), "{message}");
}

#[test]
fn positions_are_file_positions_in_later_documents() {
    let text = format!("{VS}---\n{}", VS.replace("weight: 100", "weight: [1]"));
    let message = err(&text);
    assert!(message.contains("document 2"), "{message}");
    assert!(message.contains("at line 25"), "{message}");
}

#[test]
fn syntax_errors_have_positions() {
    let message = err("apiVersion: networking.istio.io/v1\nkind: [Gateway\n");
    assert!(message.contains("yaml syntax error"), "{message}");
    assert!(message.contains("at line"), "{message}");
}

#[test]
fn empty_input_has_no_resources() {
    assert!(err("").contains("no resources"));
    assert!(err("# nothing\n---\n\n").contains("no resources"));
}

#[test]
fn top_level_shape_errors_are_precise() {
    assert!(err("- a\n- b\n").contains("expected a mapping"));
    assert!(err("kind: Gateway\nmetadata: {name: g}\nspec: {}\n")
        .contains("apiVersion: required field is missing"));
    assert!(
        err("apiVersion: networking.istio.io/v1\nmetadata: {name: g}\nspec: {}\n")
            .contains("kind: required field is missing")
    );
    assert!(
        err("apiVersion: networking.istio.io/v1\nkind: Gateway\nspec: {}\n")
            .contains("metadata: required field is missing")
    );
    assert!(err(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {namespace: x}\nspec: {}\n"
    )
    .contains("metadata.name: required field is missing"));
    let message =
        err("apiVersion: networking.istio.io/v1\nkind: Sidecars\nmetadata: {name: s}\nspec: {}\n");
    assert!(message.contains("unknown kind `Sidecars`"), "{message}");
}

#[test]
fn other_api_groups_and_unimplemented_kinds_are_skipped_with_one_notice_each() {
    let text = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reviews-v1}}\nspec: {{replicas: 1}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default}}\nspec: {{}}\n---\n{VS}"
    );
    let set = parse_str("bundle.yaml", &text).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(
        set.notices,
        [
            "bundle.yaml: document 1 (Deployment default/reviews-v1): skipped: Deployment (apps/v1) is not an Istio networking resource",
            "bundle.yaml: document 2 (Service default/reviews): skipped: Service (v1) is not an Istio networking resource",
            "bundle.yaml: document 3 (Sidecar default/default): skipped: Sidecar is not supported (mesh has no sidecars: every rule applies node-wide)",
        ]
    );
}

#[test]
fn several_bad_documents_are_all_reported() {
    let text = format!(
        "{}---\n{}",
        VS.replace("weight: 100", "weight: x"),
        VS.replace("hosts:", "hostz:")
    );
    let message = err(&text);
    assert_eq!(message.lines().count(), 2, "{message}");
}

#[test]
fn oversized_input_is_rejected() {
    let big = "#".repeat(MAX_INPUT_BYTES + 1);
    assert!(err(&big).contains("more than the limit"));
}

#[test]
fn to_yaml_round_trips() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/tcp-echo/tcp-echo-all-v1.yaml"
    ))
    .unwrap();
    let set = parse_str("a.yaml", &text).unwrap();
    let again = parse_str("b.yaml", &set.to_yaml()).unwrap();
    assert_eq!(set.len(), again.len());
    for (a, b) in set.resources.iter().zip(&again.resources) {
        assert_eq!(a.kind, b.kind);
        assert_eq!(a.meta, b.meta);
    }
    let yaml = set.to_yaml();
    assert!(
        yaml.contains("apiVersion: networking.istio.io/v1\nkind: Gateway"),
        "{yaml}"
    );
    assert!(!yaml.contains("null"), "{yaml}");
}

#[test]
fn every_modelled_field_round_trips() {
    let text = "\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: full, namespace: shop, labels: {a: b}}
spec:
  hosts: [full]
  http:
  - name: r
    match:
    - uri: {prefix: /a}
      headers: {x-user: {exact: bob}}
      queryParams: {q: {regex: '.*'}}
      withoutHeaders: {x-no: {exact: ''}}
      port: 80
      ignoreUriCase: true
    route:
    - destination: {host: full, subset: v1, port: {number: 80}}
      weight: 90
      headers: {request: {set: {a: b}}}
    rewrite: {uri: /b}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: 5xx}
    fault: {delay: {fixedDelay: 1s, percentage: {value: 10}}, abort: {httpStatus: 503, percentage: {value: 1.5}}}
    mirror: {host: full}
    mirrorPercentage: {value: 5}
    corsPolicy: {allowOrigins: [{exact: 'https://a'}], allowMethods: [GET], maxAge: 24h}
    headers: {response: {remove: [x]}}
  tls:
  - match: [{sniHosts: [full], port: 443}]
    route: [{destination: {host: full}}]
  tcp:
  - match: [{port: 9000, destinationSubnets: [198.18.0.0/15], sourceSubnet: 198.18.0.0/16}]
    route: [{destination: {host: full}, weight: 1}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: full}
spec:
  host: full
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}
    connectionPool: {tcp: {maxConnections: 10, connectTimeout: 1s, tcpKeepalive: {probes: 3, time: 10s}}, http: {http1MaxPendingRequests: 5, h2UpgradePolicy: UPGRADE}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL, sni: full}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
";
    let set = parse_str("full.yaml", text).unwrap();
    let again = parse_str("again.yaml", &set.to_yaml()).unwrap();
    for (a, b) in set.resources.iter().zip(&again.resources) {
        assert_eq!(a.kind, b.kind);
        assert_eq!(a.meta, b.meta);
    }
    assert_eq!(set.resources[0].meta.namespace, "shop");
}

#[test]
fn merge_replaces_same_key_and_appends_new() {
    let mut base = parse_str("a", VS).unwrap();
    let update = VS.replace("weight: 100", "weight: 50");
    let extra = VS.replace("reviews\nspec", "ratings\nspec");
    base.merge(parse_str("b", &format!("{update}---\n{extra}")).unwrap());
    assert_eq!(base.len(), 2);
    assert_eq!(base.resources[0].source.file, "b");
    assert_eq!(base.resources[1].meta.name, "ratings");
}

#[test]
fn load_path_reads_a_directory_in_name_order() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/tcp-echo");
    let set = load_path(std::path::Path::new(dir)).unwrap();
    let kinds: Vec<_> = set.resources.iter().map(|r| r.kind.kind_name()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceEntry",
            "Gateway",
            "DestinationRule",
            "VirtualService"
        ]
    );
    assert!(set.resources[0].source.file.ends_with("serviceentry.yaml"));
}

#[test]
fn load_path_reports_missing_files() {
    let message = load_path(std::path::Path::new("/nonexistent/x.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("/nonexistent/x.yaml: cannot read"),
        "{message}"
    );
}
