//! End-to-end L4 forwarding: real sockets in a client namespace talk to service addresses, meshd's
//! XDP program on the node sends each connection to one backend namespace, and the backends'
//! own identities (bytes that crossed the data plane) tell where every connection landed.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    meshd::Meshd,
    rules::{
        echo_service_entry, echo_split, meshd_args, service_entry, RulesDir, ECHO_SUBSETS, VIP_V6,
    },
    servers::{tcp_connect, tcp_echo},
    split::assert_shares,
    topology::{backend_v6, Topology, NODE_V4},
    traffic::{start_backends, tcp_split, udp_split, vip, EchoSetup},
};

#[test]
fn tcp_connections_follow_weights_70_20_10() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;

    let seen = tcp_split(&topo.client, vip(8080), 2000)?;
    assert_eq!(seen.values().sum::<usize>(), 2000);
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)])
}

#[test]
fn established_connections_keep_their_backend_when_weights_change() -> Result<()> {
    let setup = EchoSetup::new(Some([100, 0, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let mut meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;

    // 50 long-lived connections, all on v1.
    let mut streams = topo
        .client
        .run(|| -> Result<Vec<_>> { (0..50).map(|_| tcp_connect(vip(8080))).collect() })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");

    rules.write("vs.yaml", &echo_split([0, 100, 0]))?;
    let outcome = meshd.reload()?;
    ensure!(
        outcome.contains("rules reloaded"),
        "reload failed: {outcome}"
    );

    // Every old connection still talks to v1 (its echo comes back through the same backend).
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("old connection {n} still alive").as_bytes())
            .with_context(|| format!("old connection {n}"))?;
    }
    // All new connections go to v2.
    let seen = tcp_split(&topo.client, vip(8080), 200)?;
    ensure!(
        seen.len() == 1 && seen.get("v2") == Some(&200),
        "new connections: {seen:?}"
    );
    // And the old ones still work after new traffic went elsewhere.
    for (stream, _) in streams.iter_mut() {
        tcp_echo(stream, b"still here")?;
    }
    Ok(())
}

#[test]
fn udp_flows_follow_weights_70_20_10() -> Result<()> {
    let setup = EchoSetup::new(Some([70, 20, 10]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;

    let seen = udp_split(&topo.client, vip(8081), 2000)?;
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)])
}

#[test]
fn removed_backend_gets_no_new_connections() -> Result<()> {
    let topo = Topology::build(3)?;
    let servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    // No VirtualService: the endpoints share equally.
    rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let before = tcp_split(&topo.client, vip(8080), 300)?;
    ensure!(
        before.get("v3").copied().unwrap_or(0) > 50,
        "v3 should serve before removal: {before:?}"
    );

    rules.write("echo.yaml", &echo_service_entry(&[1, 2]))?;
    ensure!(meshd.reload()?.contains("rules reloaded"));
    let v3_tcp_before = servers[6].served();
    let after = tcp_split(&topo.client, vip(8080), 600)?;
    ensure!(
        !after.contains_key("v3"),
        "v3 got new connections after removal: {after:?}"
    );
    ensure!(
        servers[6].served() == v3_tcp_before,
        "v3 accepted connections after removal"
    );
    assert_shares(&after, &[("v1", 0.5), ("v2", 0.5)])
}

#[test]
fn ipv6_vip_splits_70_20_10() -> Result<()> {
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, true)?;
    let rules = RulesDir::new(&topo)?;
    let endpoints: Vec<(usize, IpAddr)> = (1..=3).map(|i| (i, backend_v6(i))).collect();
    let se = service_entry(
        "v1beta1",
        "echo6",
        VIP_V6,
        &["{number: 8080, name: tcp-echo, protocol: TCP}"],
        &endpoints,
    );
    rules.write("echo6.yaml", &se)?;
    rules.write(
        "dr.yaml",
        &ECHO_SUBSETS
            .replace("echo.mesh.test", "echo6.mesh.test")
            .replace("name: echo\n", "name: echo6\n"),
    )?;
    rules.write(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: echo6
spec:
  hosts: [echo6.mesh.test]
  tcp:
  - route:
    - {destination: {host: echo6.mesh.test, subset: v1}, weight: 70}
    - {destination: {host: echo6.mesh.test, subset: v2}, weight: 20}
    - {destination: {host: echo6.mesh.test, subset: v3}, weight: 10}
",
    )?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let target = SocketAddr::new(VIP_V6.parse::<IpAddr>()?, 8080);
    let seen = tcp_split(&topo.client, target, 2000)?;
    assert_shares(&seen, &[("v1", 0.70), ("v2", 0.20), ("v3", 0.10)])
}

#[test]
fn istio_tcp_echo_task_through_the_gateway() -> Result<()> {
    let topo = Topology::build(2)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/tcp-echo");
    // Istio's own YAML for the task, plus the ServiceEntry that stands in for the Kubernetes
    // Service and its pods.
    for file in ["serviceentry.yaml", "tcp-echo-all-v1.yaml"] {
        rules.write(
            file,
            &std::fs::read_to_string(repo.join(file))
                .with_context(|| format!("config/tcp-echo/{file}"))?,
        )?;
    }
    let mut meshd = Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
    let gateway = SocketAddr::new(NODE_V4.parse::<IpAddr>()?, 31400);

    let all_v1 = tcp_split(&topo.client, gateway, 200)?;
    ensure!(
        all_v1.len() == 1 && all_v1.get("v1") == Some(&200),
        "100% v1 step: {all_v1:?}"
    );

    // Like `kubectl apply -f tcp-echo-20-v2.yaml`: the task's second file replaces the
    // VirtualService; the Gateway and DestinationRule of the first file stay.
    let first = std::fs::read_to_string(repo.join("tcp-echo-all-v1.yaml"))?;
    let kept: Vec<&str> = first
        .split("\n---")
        .filter(|doc| !doc.contains("kind: VirtualService"))
        .collect();
    rules.write("tcp-echo-all-v1.yaml", &kept.join("\n---"))?;
    rules.write(
        "tcp-echo-20-v2.yaml",
        &std::fs::read_to_string(repo.join("step-2-20-v2/tcp-echo-20-v2.yaml"))
            .context("config/tcp-echo/step-2-20-v2/tcp-echo-20-v2.yaml")?,
    )?;
    ensure!(
        meshd.reload()?.contains("rules reloaded"),
        "reload:\n{}",
        meshd.log()
    );
    let shifted = tcp_split(&topo.client, gateway, 1000)?;
    assert_shares(&shifted, &[("v1", 0.8), ("v2", 0.2)])?;
    // Bounded wait so stray late packets cannot hang the test.
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
