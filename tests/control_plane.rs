//! The control plane under real traffic: meshctl apply/delete through the admin socket while
//! connections are open, all-or-nothing rejection (kernel maps byte-for-byte unchanged), state
//! restored across a restart that keeps established connections, and counters that match what
//! the clients sent.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use mesh_common::{map_names, Backend, ServiceInfo, ServiceKey};
use mesh_tests::{
    meshd::{meshctl, meshctl_stdin, metric_value, scrape_metrics, Meshd, PinDir},
    rules::{echo_service_entry, echo_split, meshd_args, RulesDir},
    servers::{tcp_connect, tcp_echo},
    split::assert_shares,
    topology::Topology,
    traffic::{tcp_split, vip, EchoSetup},
};

/// meshd arguments with pinning and a state file (replacing `--no-pin --no-state`).
fn pinned_args(topo: &Topology, rules: &RulesDir, pins: &PinDir) -> Vec<String> {
    mesh_tests::chaos::pinned_args(topo, rules, pins, &[])
}

/// Every byte of the rule maps (not the counters or the connection table, which traffic moves).
fn rule_maps(pins: &Path) -> Result<Vec<u8>> {
    let open = |name: &str| {
        MapData::from_pin(pins.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let mut out = Vec::new();
    let services: BpfHashMap<MapData, ServiceKey, ServiceInfo> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::SERVICES)?))?;
    let mut entries: Vec<(ServiceKey, ServiceInfo)> = services.iter().collect::<Result<_, _>>()?;
    entries.sort_by_key(|(k, _)| (k.addr, k.port, k.proto));
    for (k, v) in entries {
        out.extend(format!("{k:?}{v:?}").bytes());
    }
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(open(map_names::BACKENDS)?))?;
    for b in backends.iter() {
        out.extend(format!("{:?}", b?).bytes());
    }
    let maglev: Array<MapData, u32> = Array::try_from(Map::Array(open(map_names::MAGLEV)?))?;
    for id in maglev.iter() {
        out.extend(id?.to_ne_bytes());
    }
    Ok(out)
}

/// Removes a directory on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scopeguard(dir: PathBuf) -> DirGuard {
    DirGuard(dir)
}

fn apply(socket: &str, yaml: &str) -> Result<String> {
    let (ok, stdout, stderr) = meshctl_stdin(socket, &["apply", "-f", "-"], yaml)?;
    ensure!(ok, "meshctl apply failed:\n{stdout}\n{stderr}");
    Ok(stdout)
}

#[test]
fn apply_while_200_connections_are_open_breaks_none() -> Result<()> {
    let setup = EchoSetup::new(None)?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();
    let out = apply(&socket, &echo_split([100, 0, 0]))?;
    ensure!(
        out.contains("virtualservice.networking.istio.io/echo created"),
        "{out}"
    );

    let mut open = topo
        .client
        .run(|| -> Result<Vec<_>> { (0..200).map(|_| tcp_connect(vip(8080))).collect() })??;
    ensure!(open.iter().all(|(_, id)| id == "v1"));

    // The change is in force when meshctl returns: no waiting before checking.
    let out = apply(&socket, &echo_split([0, 20, 80]))?;
    ensure!(out.contains("echo configured"), "{out}");
    let seen = tcp_split(&topo.client, vip(8080), 1000)?;
    assert_shares(&seen, &[("v2", 0.2), ("v3", 0.8)])?;
    for (n, (stream, _)) in open.iter_mut().enumerate() {
        tcp_echo(stream, format!("connection {n} after the apply").as_bytes())
            .with_context(|| format!("connection {n} broke"))?;
    }
    // Applying the same thing again is a no-op that says so.
    let out = apply(&socket, &echo_split([0, 20, 80]))?;
    ensure!(out.contains("echo unchanged"), "{out}");
    Ok(())
}

#[test]
fn a_bundle_with_one_bad_resource_changes_nothing() -> Result<()> {
    let setup = EchoSetup::new(None)?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let pins = PinDir::new(topo);
    let _meshd = Meshd::start(&topo.node, &pinned_args(topo, rules, &pins))?;
    let socket = rules.socket();
    apply(&socket, &echo_split([70, 20, 10]))?;
    let before = rule_maps(&pins.0)?;
    let resources_before = meshctl(&socket, &["get", "all", "-o", "yaml"])?;

    // Two good resources and one VirtualService with a weight that cannot mean anything (a
    // route to a subset not defined yet is only a warning, as in Istio).
    let bundle_dir = rules.0.with_extension("bundle");
    let _bundle_guard = scopeguard(bundle_dir.clone());
    std::fs::create_dir_all(&bundle_dir)?;
    std::fs::write(
        bundle_dir.join("a-good-se.yaml"),
        echo_service_entry(&[1, 2])
            .replace("name: echo\n", "name: echo-b\n")
            .replace("echo.mesh.test", "echo-b.mesh.test")
            .replace("198.18.100.1", "198.18.100.2"),
    )?;
    std::fs::write(bundle_dir.join("b-good-vs.yaml"), echo_split([0, 100, 0]))?;
    std::fs::write(
        bundle_dir.join("c-bad-vs.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: broken
spec:
  hosts: [echo-b.mesh.test]
  tcp:
  - route:
    - destination: {host: echo-b.mesh.test}
      weight: -9
",
    )?;
    let (ok, stdout, stderr) =
        meshctl(&socket, &["apply", "-f", &bundle_dir.display().to_string()])?;
    ensure!(!ok, "the bundle was accepted:\n{stdout}");
    ensure!(
        stderr.contains("broken"),
        "the error does not name the bad resource:\n{stderr}"
    );
    ensure!(
        stderr.contains("weight"),
        "the error does not name the bad field:\n{stderr}"
    );
    ensure!(
        rule_maps(&pins.0)? == before,
        "kernel rule maps changed after a rejected apply"
    );
    ensure!(
        meshctl(&socket, &["get", "all", "-o", "yaml"])? == resources_before,
        "resources changed"
    );
    // The old rules still route.
    let seen = tcp_split(&topo.client, vip(8080), 500)?;
    assert_shares(&seen, &[("v1", 0.7), ("v2", 0.2), ("v3", 0.1)])?;
    let status = meshctl(&socket, &["status"])?.1;
    ensure!(
        status.contains("FAILED"),
        "status should report the failed apply:\n{status}"
    );
    Ok(())
}

#[test]
fn bad_inputs_each_get_a_precise_error_and_change_nothing() -> Result<()> {
    let topo = Topology::build(1)?;
    let rules = RulesDir::new(&topo)?;
    let pins = PinDir::new(&topo);
    // Rules only from meshctl, so corpus files may use any resource name.
    let mut args = pinned_args(&topo, &rules, &pins);
    let at = args
        .iter()
        .position(|a| a == "--config")
        .context("--config")?;
    args.drain(at..at + 2);
    let _meshd = Meshd::start(&topo.node, &args)?;
    let socket = rules.socket();
    let before = rule_maps(&pins.0)?;
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mesh-user/tests/bad-input");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .context("the bad-input corpus")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 30, "corpus has only {} files", files.len());
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let Some(expect) = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect:"))
        else {
            continue;
        };
        let (ok, _, stderr) = meshctl(&socket, &["apply", "-f", &file.display().to_string()])?;
        ensure!(!ok, "{} was accepted", file.display());
        let name = file.file_name().unwrap().to_string_lossy();
        ensure!(
            stderr.contains(&*name),
            "error for {name} does not name the file:\n{stderr}"
        );
        ensure!(
            stderr.contains(expect.trim()),
            "error for {name} lacks {:?}:\n{stderr}",
            expect.trim()
        );
        checked += 1;
    }
    ensure!(
        checked >= 30,
        "only {checked} corpus files carry an expectation"
    );
    ensure!(
        rule_maps(&pins.0)? == before,
        "a rejected input changed the kernel maps"
    );
    Ok(())
}

#[test]
fn restart_keeps_100_long_lived_connections_and_the_rules() -> Result<()> {
    restart_keeps_connections(&[]).map(|_| ())
}

/// The same restart with TC attached as a cls_bpf filter on the clsact qdisc (what kernels
/// before 6.6 get): the filter outlives meshd, a later meshd replaces its program in place, and
/// `meshd --cleanup` in the node's namespace removes it.
#[test]
fn restart_with_cls_bpf_filters_keeps_connections_and_cleanup_removes_them() -> Result<()> {
    let (topo, pins) = restart_keeps_connections(&["--tc-attach", "cls-bpf"])?;
    let filters = |topo: &Topology| -> Result<String> {
        let out = topo
            .node
            .exec("tc", &["filter", "show", "dev", "c0", "ingress"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(
        filters(&topo)?.contains("mesh_tc"),
        "no mesh_tc filter on c0 after meshd stopped:\n{}",
        filters(&topo)?
    );
    let out = topo.node.exec(
        mesh_tests::meshd::bin("meshd")?.to_str().context("path")?,
        &["--cleanup", "--pin-dir", &pins.0.display().to_string()],
    )?;
    ensure!(out.status.success(), "meshd --cleanup: {out:?}");
    ensure!(
        !filters(&topo)?.contains("mesh_tc"),
        "meshd --cleanup left the filter on c0:\n{}",
        filters(&topo)?
    );
    Ok(())
}

/// 100 long-lived connections and the applied rules survive meshd stopping and starting again
/// with `extra` flags; returns the (still live) topology and pin directory, meshd stopped.
fn restart_keeps_connections(extra: &[&str]) -> Result<(Topology, PinDir)> {
    let setup = EchoSetup::new(None)?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let pins = PinDir::new(topo);
    let mut args = pinned_args(topo, rules, &pins);
    args.extend(extra.iter().map(|a| a.to_string()));
    let meshd = Meshd::start(&topo.node, &args)?;
    let socket = rules.socket();
    apply(&socket, &echo_split([70, 20, 10]))?;
    let before = tcp_split(&topo.client, vip(8080), 1000)?;
    assert_shares(&before, &[("v1", 0.7), ("v2", 0.2), ("v3", 0.1)])?;

    let mut open = topo
        .client
        .run(|| -> Result<Vec<_>> { (0..100).map(|_| tcp_connect(vip(8080))).collect() })??;
    let status = meshd.stop()?;
    ensure!(status.success(), "meshd exited with {status}");

    // Nobody is in charge: the pinned program keeps forwarding established connections.
    for (n, (stream, _)) in open.iter_mut().enumerate() {
        tcp_echo(stream, format!("meshd is down, connection {n}").as_bytes())
            .with_context(|| format!("connection {n} broke while meshd was down"))?;
    }
    let mut meshd = Meshd::start(&topo.node, &args)?;
    for (n, (stream, _)) in open.iter_mut().enumerate() {
        tcp_echo(stream, format!("meshd is back, connection {n}").as_bytes())
            .with_context(|| format!("connection {n} broke across the restart"))?;
    }
    let (ok, stdout, stderr) = meshctl(&socket, &["get", "vs", "echo", "-o", "yaml"])?;
    ensure!(
        ok && stdout.contains("weight: 70"),
        "the applied rules were not restored:\n{stdout}{stderr}"
    );
    let after = tcp_split(&topo.client, vip(8080), 1000)?;
    assert_shares(&after, &[("v1", 0.7), ("v2", 0.2), ("v3", 0.1)])?;
    ensure!(
        meshd
            .wait_for_log("replaced_pinned_link=true", 0, Duration::from_secs(1))
            .is_ok(),
        "the new meshd did not take over the pinned link:\n{}",
        meshd.log()
    );
    let status = meshd.stop()?;
    ensure!(status.success(), "meshd exited with {status}");
    let EchoSetup { topo, rules, .. } = setup;
    drop(rules);
    Ok((topo, pins))
}

#[test]
fn stats_match_what_the_clients_sent() -> Result<()> {
    let setup = EchoSetup::new(Some([50, 30, 20]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();

    // 300 UDP datagrams of 100 bytes, each from a fresh socket. A flow is a source port: the
    // kernel may hand out a port twice, and then the second datagram is the same flow.
    const DATAGRAMS: usize = 300;
    type Flows = std::collections::BTreeMap<String, std::collections::BTreeSet<u16>>;
    let flows = topo.client.run(move || -> Result<Flows> {
        let mut flows = Flows::new();
        for _ in 0..DATAGRAMS {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&[7u8; 100], vip(8081))?;
            let mut buf = [0u8; 64];
            let (n, _) = socket.recv_from(&mut buf)?;
            let port = socket.local_addr()?.port();
            flows
                .entry(String::from_utf8_lossy(&buf[..n]).to_string())
                .or_default()
                .insert(port);
        }
        Ok(flows)
    })??;
    let total_flows: usize = flows.values().map(|p| p.len()).sum();

    let (ok, stdout, stderr) = meshctl(&socket, &["stats", "-o", "json"])?;
    ensure!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout)?;
    let service = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["address"]["port"] == 8081))
        .context("udp service in stats")?;
    let frame = (14 + 20 + 8 + 100) as u64;
    let totals = &service["totals"];
    ensure!(
        totals["connections"] == total_flows as u64,
        "connections: {totals} vs {total_flows} flows"
    );
    ensure!(totals["packets"] == DATAGRAMS as u64, "packets: {totals}");
    ensure!(
        totals["bytes"] == DATAGRAMS as u64 * frame,
        "bytes: {totals}"
    );
    ensure!(
        totals["reply_packets"] == DATAGRAMS as u64,
        "replies: {totals}"
    );
    let mut backend_flows = 0;
    for backend in service["backends"].as_array().context("backends")? {
        let version = backend["version"].as_str().unwrap_or_default();
        let sent = flows.get(version).map(|p| p.len()).unwrap_or(0) as u64;
        ensure!(
            backend["counters"]["connections"] == sent,
            "{version}: stats {} vs clients {sent}",
            backend["counters"]
        );
        backend_flows += sent;
    }
    ensure!(backend_flows == total_flows as u64);
    // The table view shows the configured weights next to the observed shares.
    let table = meshctl(&socket, &["stats"])?.1;
    ensure!(
        table.contains("50.0%") && table.contains("30.0%") && table.contains("20.0%"),
        "{table}"
    );
    // The admin API is plain JSON over HTTP on the socket: curl works.
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket", &socket, "http://mesh/v1/status"])
        .output()?;
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("curl /v1/status")?;
    ensure!(
        status["interfaces"]
            .as_array()
            .is_some_and(|i| i.len() == 4),
        "{status}"
    );
    // And the Prometheus endpoint carries the same numbers (curl must succeed: a missing
    // endpoint is a failure, not a skip).
    let text = scrape_metrics(&topo.node)?;
    let sample = |family: &str| metric_value(&text, family, ":8081\"");
    ensure!(
        sample("mesh_service_connections_total{") == Some(total_flows as u64),
        "mesh_service_connections_total for the UDP service should be {total_flows}:\n{text}"
    );
    ensure!(
        sample("mesh_service_packets_total{") == Some(DATAGRAMS as u64),
        "mesh_service_packets_total for the UDP service should be {DATAGRAMS}:\n{text}"
    );
    // UDP has no resets, but the family is exported for every service.
    ensure!(
        sample("mesh_service_reply_resets_total{") == Some(0),
        "mesh_service_reply_resets_total missing:\n{text}"
    );
    Ok(())
}

#[test]
fn meshctl_explains_a_missing_daemon_and_validates_offline() -> Result<()> {
    let (ok, _, stderr) = meshctl("/nonexistent/meshd.sock", &["status"])?;
    ensure!(!ok && stderr.contains("is meshd running"), "{stderr}");
    let sandbox = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/sandbox");
    let (ok, stdout, stderr) = meshctl(
        "/nonexistent/meshd.sock",
        &["validate", "-f", &sandbox.display().to_string()],
    )?;
    // The sandbox folder holds several alternative VirtualServices for one host: validating them
    // together must report exactly that conflict.
    ensure!(!ok && stderr.contains("reviews"), "{stdout}{stderr}");
    let service = sandbox
        .join("00-reviews-service.yaml")
        .display()
        .to_string();
    let step = sandbox.join("step2-80-v1-20-v2.yaml").display().to_string();
    let (ok, stdout, stderr) = meshctl(
        "/nonexistent/meshd.sock",
        &["validate", "-f", &service, "-f", &step],
    )?;
    ensure!(
        ok && stdout.contains("3 resources valid"),
        "{stdout}{stderr}"
    );
    Ok(())
}
