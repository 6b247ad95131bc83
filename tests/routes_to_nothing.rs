//! Istio's semantics for routes to nothing, end to end: a route to a subset that selects no
//! endpoint yet (a canary defined before it is deployed), or to a subset not defined yet, is
//! accepted with a warning; at run time the kernel path refuses the connection at once (the
//! client sees a reset, counted as `refused_no_backend`) and the L7 proxy answers 503 (counted
//! per route and destination). The rule takes effect by itself when the missing piece arrives.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    http::get_once,
    meshd::{meshctl, meshctl_stdin},
    rules::OneBackendNode,
    topology::{backend_v4, Topology},
};

const VIP: &str = "198.18.100.1";
const HOST: &str = "web.mesh.test";

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("ip"), 80)
}

/// ServiceEntry `web` with one endpoint (v1) and a DestinationRule whose subset v2 selects
/// nothing yet: the canary is defined before it exists.
fn service() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  resolution: STATIC
  endpoints:
  - {{address: {}, labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: {HOST}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
",
        backend_v4(1)
    )
}

fn virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  http:
{http}"
    )
}

/// What a fresh TCP connection to the VIP gets: `Ok(())` when it connects.
fn connect(topo: &Topology) -> Result<std::io::Result<()>> {
    topo.client
        .run(|| TcpStream::connect_timeout(&vip(), Duration::from_secs(5)).map(|_| ()))
}

/// A kernel reason counter, from `meshctl stats -o json`.
fn reason(socket: &str, name: &str) -> Result<u64> {
    let (ok, stdout, stderr) = meshctl(socket, &["stats", "-o", "json"])?;
    ensure!(ok, "meshctl stats: {stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout)?;
    let reasons = stats["reasons"].as_array().context("reasons")?;
    Ok(reasons
        .iter()
        .find(|r| r[0] == name)
        .and_then(|r| r[1].as_u64())
        .unwrap_or(0))
}

/// 5xx answers the proxy counted for `subset` on any route.
fn proxy_5xx(socket: &str, subset: &str) -> Result<u64> {
    let (ok, stdout, stderr) = meshctl(socket, &["stats", "-o", "json"])?;
    ensure!(ok, "meshctl stats: {stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout)?;
    let mut total = 0;
    for service in stats["l7"].as_array().into_iter().flatten() {
        for route in service["routes"].as_array().into_iter().flatten() {
            for d in route["destinations"].as_array().into_iter().flatten() {
                if d["subset"] == subset {
                    total += d["status_classes"][4].as_u64().unwrap_or(0);
                }
            }
        }
    }
    Ok(total)
}

#[test]
fn routes_to_nothing_are_refused_on_the_kernel_path_and_answer_503_on_the_proxy() -> Result<()> {
    let mut node = OneBackendNode::start("web.yaml", &service())?;
    let (topo, rules) = (&node.topo, &node.rules);
    let socket = rules.socket();

    // Kernel path: every connection to the canary that is not there yet is refused at once.
    let all_v2 = virtual_service("  - route: [{destination: {host: web.mesh.test, subset: v2}}]\n");
    let (ok, _, stderr) = meshctl_stdin(&socket, &["apply", "-f", "-"], &all_v2)?;
    ensure!(ok, "apply: {stderr}");
    let before = reason(&socket, "refused_no_backend")?;
    for n in 0..20 {
        match connect(topo)? {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => anyhow::bail!("connection {n} to a route to nothing: {other:?}"),
        }
    }
    let refused = reason(&socket, "refused_no_backend")? - before;
    ensure!(
        refused >= 20,
        "refused_no_backend counted {refused} for 20 SYNs"
    );

    // Proxy: a header route to the empty subset answers 503, the others are served.
    let jason_v2 = virtual_service(
        "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: web.mesh.test, subset: v2}}]\n  - route: [{destination: {host: web.mesh.test, subset: v1}}]\n",
    );
    let (ok, _, stderr) = meshctl_stdin(&socket, &["apply", "-f", "-"], &jason_v2)?;
    ensure!(ok, "apply: {stderr}");
    let replies = topo.client.run(|| -> Result<Vec<(u16, u16)>> {
        (0..10)
            .map(|_| {
                let jason = get_once(vip(), "/", HOST, &[("end-user", "jason")])?.status;
                let other = get_once(vip(), "/", HOST, &[])?.status;
                Ok((jason, other))
            })
            .collect()
    })??;
    ensure!(
        replies.iter().all(|r| *r == (503, 200)),
        "jason / others: {replies:?}"
    );
    let counted = proxy_5xx(&socket, "v2")?;
    ensure!(
        counted == 10,
        "the proxy counted {counted} 5xx for subset v2"
    );

    // A subset not defined yet: accepted with a warning naming the field, refused until the
    // DestinationRule defines it, then in force without another apply of the rule.
    let all_v3 = virtual_service("  - route: [{destination: {host: web.mesh.test, subset: v3}}]\n");
    let (ok, _, stderr) = meshctl_stdin(&socket, &["apply", "-f", "-"], &all_v3)?;
    ensure!(ok, "apply: {stderr}");
    ensure!(
        stderr.contains("warning: <stdin>: document 1 (VirtualService default/web): spec.http[0].route[0].destination.subset: subset `v3` is not defined (yet)"),
        "{stderr}"
    );
    match connect(topo)? {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => anyhow::bail!("route to an undefined subset: {other:?}"),
    }
    rules.write(
        "web.yaml",
        &service().replace(
            "  - {name: v2, labels: {version: v2}}\n",
            "  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v1}}\n",
        ),
    )?;
    ensure!(node.meshd.reload()?.contains("rules reloaded"));
    let reply = topo.client.run(|| get_once(vip(), "/", HOST, &[]))??;
    ensure!(
        reply.status == 200 && reply.identity() == "v1",
        "after the subset arrived: {} {}",
        reply.status,
        reply.body
    );
    Ok(())
}
