//! Scale with default settings: 10 000 ServiceEntries (two endpoints each, no DestinationRule,
//! no pool or table-size flags) apply, carry traffic to the first and the last service, and come
//! back from the pinned maps after a restart without being rewritten; a change to one service
//! leaves every other service's kernel entries byte-identical.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    maps::pinned_services,
    meshd::{meshctl, Meshd, PinDir},
    rules::{meshd_args, scale_service_entries, scale_vip, RulesDir},
    servers::tcp_connect,
    topology::{backend_v4, Topology},
    traffic::start_backends,
};

/// meshd with pins and a state file, every other flag at its default.
fn args(topo: &Topology, rules: &RulesDir, pins: &PinDir) -> Vec<String> {
    let mut args: Vec<String> = meshd_args(topo, rules)
        .into_iter()
        .filter(|a| a != "--no-pin" && a != "--no-state")
        .collect();
    args.extend([
        "--pin-dir".into(),
        pins.0.display().to_string(),
        "--state-file".into(),
        state_file(rules),
    ]);
    args
}

fn state_file(rules: &RulesDir) -> String {
    format!("{}/state/state.yaml", rules.path())
}

/// Writes services `0..n` (two endpoints: backends 1 and 2) as files of 2000 under `dir`.
fn write_set(dir: &Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let endpoints = [backend_v4(1), backend_v4(2)];
    for (k, start) in (0..n).step_by(2000).enumerate() {
        let yaml = scale_service_entries(start..(start + 2000).min(n), "TCP", 9000, &endpoints);
        std::fs::write(dir.join(format!("part-{k:02}.yaml")), yaml)?;
    }
    Ok(())
}

fn apply(socket: &str, path: &Path) -> Result<String> {
    let (ok, stdout, stderr) = meshctl(socket, &["apply", "-f", &path.display().to_string()])?;
    ensure!(ok, "meshctl apply failed:\n{stdout}\n{stderr}");
    Ok(format!("{stdout}{stderr}"))
}

/// Connects to service `i` from the client; the identity of the backend that answered.
fn reach(topo: &Topology, i: usize) -> Result<String> {
    let target = SocketAddr::new(scale_vip(i), 9000);
    topo.client
        .run(move || tcp_connect(target).map(|(_, identity)| identity))?
        .with_context(|| format!("connecting to service {i} at {target}"))
}

#[test]
fn ten_thousand_default_services_apply_carry_traffic_and_survive_a_restart() -> Result<()> {
    const N: usize = 10_000;
    let topo = Topology::build(2)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    let pins = PinDir::new(&topo);
    let args = args(&topo, &rules, &pins);
    let meshd = Meshd::start(&topo.node, &args)?;
    let input = RulesDir::named(&topo, "input")?;
    let set = input.0.join("set");
    write_set(&set, N)?;
    let out = apply(&rules.socket(), &set)?;
    ensure!(out.contains("10000 service addresses"), "{out}");
    for i in [0, N - 1] {
        let who = reach(&topo, i)?;
        ensure!(who == "v1" || who == "v2", "service {i} answered by {who}");
    }
    let before = pinned_services(&pins.0)?;
    ensure!(before.len() == N, "{} service entries pinned", before.len());
    let state_bytes = std::fs::metadata(state_file(&rules))?.len();
    ensure!(
        state_bytes > 4 << 20,
        "the state file holds {state_bytes} bytes: the test needs one above 4 MiB"
    );

    // Restart: the pinned tables match the stored rules, so nothing is rewritten.
    meshd.stop()?;
    let who = reach(&topo, N - 1)?;
    ensure!(who == "v1" || who == "v2", "while meshd is down: {who}");
    let mut meshd = Meshd::start_within(&topo.node, &args, Duration::from_secs(120))?;
    let line = meshd.wait_for_log("rules installed", 0, Duration::from_secs(1))?;
    ensure!(
        line.contains("services=10000") && line.contains("written=0"),
        "the restarted meshd rewrote tables it should have adopted: {line}"
    );
    ensure!(
        pinned_services(&pins.0)? == before,
        "a restart changed kernel entries"
    );
    for i in [0, N - 1] {
        let who = reach(&topo, i)?;
        ensure!(
            who == "v1" || who == "v2",
            "after the restart, service {i}: {who}"
        );
    }
    let (ok, status, stderr) = meshctl(&rules.socket(), &["status"])?;
    ensure!(
        ok && status.contains("10000 service addresses"),
        "{status}{stderr}"
    );
    ensure!(status.contains("MiB of kernel memory"), "{status}");
    Ok(())
}

#[test]
fn one_change_leaves_every_other_service_byte_identical() -> Result<()> {
    const N: usize = 300;
    let topo = Topology::build(3)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    let pins = PinDir::new(&topo);
    let _meshd = Meshd::start(&topo.node, &args(&topo, &rules, &pins))?;
    let input = RulesDir::named(&topo, "input")?;
    let set = input.0.join("set");
    write_set(&set, N)?;
    apply(&rules.socket(), &set)?;
    let before = pinned_services(&pins.0)?;
    ensure!(before.len() == N);

    // Service 7 moves to backends 1 and 3.
    const CHANGED: usize = 7;
    let one = input.0.join("one.yaml");
    std::fs::write(
        &one,
        scale_service_entries(
            CHANGED..CHANGED + 1,
            "TCP",
            9000,
            &[backend_v4(1), backend_v4(3)],
        ),
    )?;
    let out = apply(&rules.socket(), &one)?;
    ensure!(out.contains("1 written"), "{out}");
    let after = pinned_services(&pins.0)?;
    ensure!(after.len() == N);
    let mut differing = Vec::new();
    for (key, entry) in &before {
        if after.get(key) != Some(entry) {
            differing.push(key.clone());
        }
    }
    ensure!(
        differing.len() == 1 && differing[0][..4] == [198, 19, 0, CHANGED as u8],
        "entries that changed: {differing:?}"
    );
    // The changed service really moved: only backends 1 and 3 answer it now.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(reach(&topo, CHANGED)?);
    }
    ensure!(
        seen.iter().all(|who| who == "v1" || who == "v3") && seen.contains("v3"),
        "service {CHANGED} answered by {seen:?}"
    );

    // Deleting one service removes its entry and nothing else changes.
    let (ok, stdout, stderr) = meshctl(&rules.socket(), &["delete", "se", "s9"])?;
    ensure!(ok, "{stdout}{stderr}");
    let last = pinned_services(&pins.0)?;
    ensure!(last.len() == N - 1);
    for (key, entry) in &last {
        ensure!(
            after.get(key) == Some(entry),
            "{key:?} changed on another's delete"
        );
    }
    Ok(())
}

/// A running meshd whose rules outgrow its Maglev pool keeps the rules in force: the apply is
/// refused whole with the entries needed and the pool's size, no kernel entry changes (a packet
/// never meets a half-written table), and the services in force keep answering.
#[test]
fn rules_outgrowing_the_pool_are_refused_whole_and_traffic_keeps_flowing() -> Result<()> {
    let topo = Topology::build(2)?;
    let _servers = start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    let pins = PinDir::new(&topo);
    let mut args = args(&topo, &rules, &pins);
    // Room for four two-backend services (211 entries each) and not for six.
    args.extend(["--maglev-pool-entries".into(), "1000".into()]);
    let _meshd = Meshd::start(&topo.node, &args)?;
    let input = RulesDir::named(&topo, "input")?;
    let small = input.0.join("small");
    write_set(&small, 2)?;
    apply(&rules.socket(), &small)?;
    let before = pinned_services(&pins.0)?;
    ensure!(before.len() == 2, "{} services pinned", before.len());

    let large = input.0.join("large");
    write_set(&large, 6)?;
    let (ok, stdout, stderr) = meshctl(
        &rules.socket(),
        &["apply", "-f", &large.display().to_string()],
    )?;
    ensure!(
        !ok,
        "six services applied into a 1000-entry pool:\n{stdout}{stderr}"
    );
    ensure!(
        stderr.contains("1266 Maglev entries") && stderr.contains("1000"),
        "the refusal names what the rules need and what the pool holds: {stderr}"
    );
    ensure!(
        pinned_services(&pins.0)? == before,
        "a refused apply changed kernel entries"
    );
    for i in [0, 1] {
        let who = reach(&topo, i)?;
        ensure!(who == "v1" || who == "v2", "service {i} answered by {who}");
    }
    Ok(())
}
