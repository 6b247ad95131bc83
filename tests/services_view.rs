//! `meshctl get services -o wide` through a real meshd: every service address with its path
//! (kernel or proxy) and the reason resolution gave, its subsets and endpoints; and both
//! services really answer through the path shown.

use std::net::SocketAddr;

use anyhow::{ensure, Result};
use mesh_tests::{http::get_once, meshd::meshctl, rules::OneBackendNode, topology::backend_v4};

/// Two hosts on one endpoint: `weights` (a weights-only HTTP route: the kernel path) and
/// `headers` (a header match: the proxy).
fn rules() -> String {
    let endpoint = backend_v4(1);
    let mut out = String::new();
    for (name, vip, http) in [
        (
            "weights",
            "198.18.100.1",
            "  - route:\n    - {destination: {host: weights.mesh.test, subset: v1}, weight: 100}\n    - {destination: {host: weights.mesh.test, subset: v2}, weight: 0}\n",
        ),
        (
            "headers",
            "198.18.100.2",
            "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: headers.mesh.test, subset: v1}}]\n  - route: [{destination: {host: headers.mesh.test, subset: v1}}]\n",
        ),
    ] {
        out.push_str(&format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.mesh.test]
  addresses: [{vip}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  resolution: STATIC
  endpoints:
  - {{address: {endpoint}, labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {name}.mesh.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}.mesh.test]
  http:
{http}---
"
        ));
    }
    out
}

#[test]
fn get_services_wide_shows_the_path_and_its_reason() -> Result<()> {
    let node = OneBackendNode::start("services.yaml", &rules())?;
    let topo = &node.topo;
    let socket = node.rules.socket();

    let (ok, stdout, stderr) = meshctl(&socket, &["get", "services", "-o", "wide"])?;
    ensure!(ok, "meshctl get services: {stderr}");
    let line = |host: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(host))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let endpoint = format!("{}:8080", backend_v4(1));
    let weights = line("weights.mesh.test");
    ensure!(
        weights.as_deref()
            == Some(&*format!(
                "weights.mesh.test 198.18.100.1 80 tcp kernel v1 {endpoint} HTTP route spec.http[0] of VirtualService default/weights has only weighted destinations"
            )),
        "kernel-path line: {weights:?}\n{stdout}"
    );
    let headers = line("headers.mesh.test");
    ensure!(
        headers.as_deref()
            == Some(&*format!(
                "headers.mesh.test 198.18.100.2 80 tcp proxy v1 {endpoint} spec.http[0].match[0] of VirtualService default/headers matches on headers"
            )),
        "proxy-path line: {headers:?}\n{stdout}"
    );
    ensure!(
        stdout.lines().next().is_some_and(|h| h.contains("PATH")
            && h.contains("SUBSETS")
            && h.contains("ENDPOINTS")
            && h.contains("REASON")),
        "header: {stdout}"
    );

    // Without -o wide: no reason; with a name: that host only; JSON carries the same.
    let (ok, narrow, _) = meshctl(&socket, &["get", "svc", "headers.mesh.test"])?;
    ensure!(ok && narrow.lines().count() == 2, "{narrow}");
    ensure!(!narrow.contains("matches on"), "{narrow}");
    let (ok, json, _) = meshctl(&socket, &["get", "services", "-o", "json"])?;
    ensure!(ok);
    let views: serde_json::Value = serde_json::from_str(&json)?;
    ensure!(views.as_array().map(Vec::len) == Some(2), "{json}");
    ensure!(
        views[0]["path"] == "kernel" && views[1]["path"] == "proxy",
        "{json}"
    );

    // Both answer: the kernel path per connection, the proxy per request.
    for vip in ["198.18.100.1", "198.18.100.2"] {
        let address = SocketAddr::new(vip.parse()?, 80);
        let reply = topo
            .client
            .run(move || get_once(address, "/", "x.mesh.test", &[("end-user", "jason")]))??;
        ensure!(
            reply.status == 200 && reply.identity() == "v1",
            "{vip}: {} {}",
            reply.status,
            reply.body
        );
    }
    Ok(())
}
