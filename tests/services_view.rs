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

/// Istio's semantics make the order of applies irrelevant: VirtualService before
/// DestinationRule before ServiceEntry, or the reverse, every step is accepted (with warnings
/// while pieces are missing) and the same services are in force at the end, answering.
#[test]
fn apply_in_either_order_ends_with_the_same_services_in_force() -> Result<()> {
    let all = rules();
    let documents: Vec<&str> = all
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    // The `weights` host stays in meshd's rules file; `headers` is applied piece by piece.
    let (file, pieces) = documents.split_at(3);
    let node = OneBackendNode::start("weights.yaml", &file.join("---\n"))?;
    let socket = node.rules.socket();
    let vip = SocketAddr::new("198.18.100.2".parse()?, 80);
    let mut in_force = Vec::new();
    for (order, names) in [
        ([2, 1, 0], "VirtualService, DestinationRule, ServiceEntry"),
        ([0, 1, 2], "ServiceEntry, DestinationRule, VirtualService"),
    ] {
        for (step, &i) in order.iter().enumerate() {
            let (ok, _, stderr) =
                mesh_tests::meshd::meshctl_stdin(&socket, &["apply", "-f", "-"], pieces[i])?;
            ensure!(ok, "{names}: step {step} refused: {stderr}");
            // VirtualService first: it (then the DestinationRule) names a host not defined yet.
            let missing = order[0] == 2 && step < 2;
            ensure!(
                stderr.contains("no ServiceEntry defines host `headers.mesh.test`") == missing,
                "{names}: step {step}: a warning about the missing host {}expected: {stderr}",
                if missing { "" } else { "not " }
            );
        }
        let (ok, json, stderr) = meshctl(&socket, &["get", "services", "-o", "json"])?;
        ensure!(ok, "{stderr}");
        let reply = node
            .topo
            .client
            .run(move || get_once(vip, "/", "headers.mesh.test", &[("end-user", "jason")]))??;
        ensure!(
            reply.status == 200 && reply.identity() == "v1",
            "{names}: {} {}",
            reply.status,
            reply.body
        );
        in_force.push(json);
        for kind in ["vs", "dr", "se"] {
            let (ok, _, stderr) = meshctl(&socket, &["delete", kind, "headers"])?;
            ensure!(ok, "delete {kind}: {stderr}");
        }
    }
    ensure!(
        in_force[0] == in_force[1],
        "VS-first:\n{}\nSE-first:\n{}",
        in_force[0],
        in_force[1]
    );
    ensure!(
        in_force[0].contains("\"path\": \"proxy\""),
        "{}",
        in_force[0]
    );
    Ok(())
}
