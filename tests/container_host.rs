//! The kernel path on a container host with default settings: pods behind veths in Docker's
//! bridge style and in Calico's routed style, a client outside behind the uplink, meshd choosing
//! its hooks by itself (TC on every veth). Real sockets; the backends' identities say where each
//! connection landed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    container_host::{ContainerHost, Pod, UPLINK_V4},
    meshd::{status_json, Meshd},
    netns::Netns,
    rules::{meshd_args_for, service_entry, RulesDir, ECHO_SUBSETS},
    servers::{tcp_connect, tcp_echo, tcp_server, udp_server, Server},
    split::assert_shares,
    traffic::{tcp_split, udp_split},
};

const VIP4: &str = "198.18.100.1";
const VIP6: &str = "2001:db8:100::1";
/// Client pods are a1 (bridged) and b3 (routed); backends v1 = a2 (bridged), v2 = b1 and
/// v3 = b2 (routed).
const CLIENT_BRIDGED: usize = 0;
const CLIENT_ROUTED: usize = 4;
const BACKENDS: [(usize, &str); 3] = [(1, "v1"), (2, "v2"), (3, "v3")];

struct Lab {
    _servers: Vec<Server>,
    _meshd: Meshd,
    rules: RulesDir,
    host: ContainerHost,
}

impl Lab {
    /// Two bridged and three routed pods, echo servers on the backends, `echo` (v4) and
    /// `echo6` split by `weights`, and a Gateway on the uplink at 31400 with the same split.
    fn start(weights: [u32; 3]) -> Result<Lab> {
        let host = ContainerHost::build(2, 3)?;
        let mut servers = Vec::new();
        for (pod, identity) in BACKENDS {
            let pod = &host.pods[pod];
            for ip in [pod.v4, pod.v6] {
                servers.push(tcp_server(&pod.ns, SocketAddr::new(ip, 8080), identity)?);
                servers.push(udp_server(&pod.ns, SocketAddr::new(ip, 8081), identity)?);
            }
        }
        let rules = RulesDir::for_prefix(&host.prefix)?;
        for (name, vip, family) in [("echo", VIP4, 4), ("echo6", VIP6, 6)] {
            let endpoints: Vec<(usize, IpAddr)> = BACKENDS
                .iter()
                .enumerate()
                .map(|(i, (pod, _))| {
                    let pod = &host.pods[*pod];
                    (i + 1, if family == 4 { pod.v4 } else { pod.v6 })
                })
                .collect();
            rules.write(
                &format!("{name}.yaml"),
                &service_entry(
                    "v1",
                    name,
                    vip,
                    &[
                        "{number: 8080, name: tcp-echo, protocol: TCP}",
                        "{number: 8081, name: udp-echo, protocol: UDP}",
                    ],
                    &endpoints,
                ),
            )?;
        }
        rules.write("dr.yaml", ECHO_SUBSETS)?;
        rules.write("dr6.yaml", &ECHO_SUBSETS.replace("echo", "echo6"))?;
        rules.write("vs.yaml", &split("echo", weights))?;
        rules.write("vs6.yaml", &split("echo6", weights))?;
        rules.write("gateway.yaml", &gateway(weights))?;
        let meshd = Meshd::start(&host.node, &meshd_args_for(host.node_interfaces(), &rules))?;
        Ok(Lab {
            _servers: servers,
            _meshd: meshd,
            rules,
            host,
        })
    }

    fn pod(&self, i: usize) -> &Pod {
        &self.host.pods[i]
    }
}

fn split(host: &str, weights: [u32; 3]) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {host}
spec:
  hosts: [{host}.mesh.test]
  tcp:
"
    );
    for port in [8080, 8081] {
        yaml.push_str(&format!("  - match: [{{port: {port}}}]\n    route:\n"));
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "    - destination: {{host: {host}.mesh.test, subset: v{}, port: {{number: {port}}}}}\n      weight: {w}\n",
                i + 1
            ));
        }
    }
    yaml
}

/// A TCP Gateway on the node's own addresses at 31400, routed like `echo` on 8080.
fn gateway(weights: [u32; 3]) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: edge
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: edge
spec:
  hosts: [\"*\"]
  gateways: [edge]
  tcp:
  - match: [{port: 31400}]
    route:
",
    );
    for (i, w) in weights.iter().enumerate() {
        yaml.push_str(&format!(
            "    - destination: {{host: echo.mesh.test, subset: v{}, port: {{number: 8080}}}}\n      weight: {w}\n",
            i + 1
        ));
    }
    yaml
}

fn vip(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("VIP"), port)
}

const SHARES: [(&str, f64); 3] = [("v1", 0.7), ("v2", 0.2), ("v3", 0.1)];

fn check(what: &str, seen: &BTreeMap<String, usize>, n: usize) -> Result<()> {
    ensure!(
        seen.values().sum::<usize>() == n,
        "{what}: {seen:?} does not add up to {n}"
    );
    assert_shares(seen, &SHARES).with_context(|| what.to_string())
}

fn client(lab: &Lab, i: usize) -> &Netns {
    &lab.pod(i).ns
}

#[test]
fn meshd_runs_tc_on_the_uplink_and_every_pod_veth() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let status = status_json(&lab.rules.socket())?;
    let interfaces = status["interfaces"].as_array().context("interfaces")?;
    let mut names: Vec<&str> = interfaces
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    names.sort_unstable();
    let mut want: Vec<String> = lab.host.node_interfaces();
    want.sort_unstable();
    ensure!(names == want, "attached to {names:?}, want {want:?}");
    for i in interfaces {
        let hook = i["mode"].as_str().unwrap_or_default();
        ensure!(hook == "tcx" || hook == "tc-cls_bpf", "{i}");
    }
    Ok(())
}

#[test]
fn pods_reach_a_vip_over_tcp_with_weights_70_20_10() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    for (what, pod) in [
        ("bridged pod", CLIENT_BRIDGED),
        ("routed pod", CLIENT_ROUTED),
    ] {
        let seen = tcp_split(client(&lab, pod), vip(VIP4, 8080), 2000)?;
        check(&format!("TCP from a {what}"), &seen, 2000)?;
    }
    Ok(())
}

#[test]
fn pods_reach_a_vip_over_udp_and_ipv6() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let seen = udp_split(client(&lab, CLIENT_BRIDGED), vip(VIP4, 8081), 2000)?;
    check("UDP from a bridged pod", &seen, 2000)?;
    let seen = tcp_split(client(&lab, CLIENT_ROUTED), vip(VIP6, 8080), 2000)?;
    check("IPv6 TCP from a routed pod", &seen, 2000)?;
    let seen = udp_split(client(&lab, CLIENT_BRIDGED), vip(VIP6, 8081), 2000)?;
    check("IPv6 UDP from a bridged pod", &seen, 2000)
}

#[test]
fn gateway_ingress_from_outside_reaches_the_pods() -> Result<()> {
    let lab = Lab::start([70, 20, 10])?;
    let gateway = SocketAddr::new(UPLINK_V4.parse()?, 31400);
    let seen = tcp_split(&lab.host.outside, gateway, 2000)?;
    check("TCP through the gateway", &seen, 2000)
}

#[test]
fn long_lived_pod_connections_keep_their_backend_across_a_weight_change() -> Result<()> {
    let lab = Lab::start([100, 0, 0])?;
    let mut streams = client(&lab, CLIENT_BRIDGED)
        .run(|| -> Result<Vec<_>> { (0..50).map(|_| tcp_connect(vip(VIP4, 8080))).collect() })??;
    ensure!(streams.iter().all(|(_, id)| id == "v1"), "not all on v1");

    lab.rules.write("vs.yaml", &split("echo", [0, 100, 0]))?;
    let socket = lab.rules.socket();
    // The files are watched: wait (bounded) until new connections follow the new rule.
    let mut moved = false;
    for _ in 0..100 {
        let (_s, id) = client(&lab, CLIENT_BRIDGED).run(move || tcp_connect(vip(VIP4, 8080)))??;
        if id == "v2" {
            moved = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(
        moved,
        "the new weights never took effect (admin socket {socket})"
    );
    for (n, (stream, _)) in streams.iter_mut().enumerate() {
        tcp_echo(stream, format!("old connection {n} still alive").as_bytes())
            .with_context(|| format!("old connection {n}"))?;
    }
    let seen = tcp_split(client(&lab, CLIENT_BRIDGED), vip(VIP4, 8080), 200)?;
    ensure!(
        seen.len() == 1 && seen.get("v2") == Some(&200),
        "new connections: {seen:?}"
    );
    Ok(())
}
