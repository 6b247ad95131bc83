//! A fleet through a real etcd cluster: three etcd members (Debian's etcd) and three meshd nodes
//! in network namespaces, each node with its own client, in front of shared backends.
//!
//! One fleet runs the scenarios in order (building it costs more than each step): one apply
//! converging on every node (time printed, not asserted), the split observed on every node and
//! summed by `meshctl stats --fleet`, concurrent applies, a partitioned node going stale and
//! catching up, an etcd member killed, quorum lost and regained, meshd restarted with etcd down.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    figures,
    fleet::{backend_endpoints, backend_ip, wait_for, Fleet, SIZE},
    meshd::meshctl_stdin,
    rules::{echo_split, service_entry, ECHO_SUBSETS},
    servers::{tcp_connect, tcp_server, Server},
    split::assert_weights,
    traffic::tcp_split,
};
use serde_json::Value;

const VIP: &str = "198.18.100.1";

fn target() -> SocketAddr {
    format!("{VIP}:8080").parse().expect("vip")
}

/// The echo ServiceEntry over the three shared backends, and its subsets.
fn base_rules() -> String {
    let se = service_entry(
        "v1",
        "echo",
        VIP,
        &[
            "{number: 8080, name: tcp-echo, protocol: TCP}",
            "{number: 8081, name: udp-echo, protocol: UDP}",
        ],
        &backend_endpoints(),
    );
    format!("{se}---\n{ECHO_SUBSETS}")
}

fn apply(fleet: &Fleet, node: usize, yaml: &str) -> Result<(bool, String, String)> {
    meshctl_stdin(&fleet.node(node).socket(), &["apply", "-f", "-"], yaml)
}

fn apply_ok(fleet: &Fleet, node: usize, yaml: &str) -> Result<()> {
    let (ok, out, err) = apply(fleet, node, yaml)?;
    ensure!(ok, "apply on n{node} failed: {err}{out}");
    Ok(())
}

/// `meshctl status -o json` of node `i`.
fn status(fleet: &Fleet, i: usize) -> Result<Value> {
    let out = fleet.node(i).meshctl_ok(&["status", "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

/// `meshctl get nodes -o json` asked from node `i`.
fn nodes(fleet: &Fleet, i: usize) -> Result<Value> {
    let out = fleet.node(i).meshctl_ok(&["get", "nodes", "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

/// The fleet revision as etcd holds it (asked through node `i`).
fn fleet_revision(fleet: &Fleet, i: usize) -> Result<i64> {
    nodes(fleet, i)?["revision"]
        .as_i64()
        .context("the fleet revision (etcd did not answer?)")
}

/// Applied revision of node `i` by its own account.
fn applied(fleet: &Fleet, i: usize) -> Result<i64> {
    status(fleet, i)?["fleet"]["applied_revision"]
        .as_i64()
        .context("status without fleet")
}

/// Waits until every listed node has applied `revision`; returns how long it took.
fn converge(fleet: &Fleet, on: &[usize], revision: i64) -> Result<Duration> {
    let started = Instant::now();
    wait_for(
        &format!("nodes {on:?} applying fleet revision {revision}"),
        Duration::from_secs(20),
        || {
            for i in on {
                if applied(fleet, *i)? != revision {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    Ok(started.elapsed())
}

/// Every connection from node `i`'s client lands on `identity`.
fn all_to(fleet: &Fleet, i: usize, identity: &str, count: usize) -> Result<()> {
    let seen = tcp_split(&fleet.node(i).client, target(), count)?;
    ensure!(
        seen.len() == 1 && seen.get(identity) == Some(&count),
        "n{i}: expected all {count} connections on {identity}, saw {seen:?}"
    );
    Ok(())
}

fn backends(fleet: &Fleet) -> Result<Vec<Server>> {
    let mut servers = Vec::new();
    for (index, ns) in fleet.backends.iter().enumerate() {
        let i = index + 1;
        let addr: SocketAddr = format!("{}:8080", backend_ip(i)).parse()?;
        servers.push(tcp_server(ns, addr, &format!("v{i}"))?);
    }
    Ok(servers)
}

#[test]
fn fleet_shares_rules_through_etcd_and_survives_failures() -> Result<()> {
    let mut fleet = Fleet::build()?;
    let _servers = backends(&fleet)?;
    for i in 1..=SIZE {
        fleet.start_meshd(i)?;
    }
    wait_for("three nodes in the fleet", Duration::from_secs(20), || {
        let view = nodes(&fleet, 1)?;
        let ok = view["nodes"]
            .as_array()
            .map(|n| n.iter().filter(|n| n["state"] == "ok").count())
            .unwrap_or(0);
        Ok((ok == SIZE).then_some(()))
    })?;

    // --- One apply converges on every node.
    let weights = [60, 30, 10];
    let started = Instant::now();
    apply_ok(
        &fleet,
        1,
        &format!("{}---\n{}", base_rules(), echo_split(weights)),
    )?;
    let applied_on_n1 = started.elapsed();
    let revision = fleet_revision(&fleet, 1)?;
    ensure!(
        applied(&fleet, 1)? == revision,
        "n1 applies before answering"
    );
    let others = converge(&fleet, &[2, 3], revision)?;
    let mut measured = vec![format!(
        "one `meshctl apply` on n1: in force on n1 when meshctl returned, {} ms after it \
         started; on all {SIZE} nodes {} ms after it started",
        applied_on_n1.as_millis(),
        (applied_on_n1 + others).as_millis()
    )];
    println!("converge: {}", measured[0]);

    // --- The split observed on every node matches the weights, and the fleet sum adds up.
    let per_node = 600;
    let mut observed: Vec<BTreeMap<String, usize>> = Vec::new();
    for i in 1..=SIZE {
        let seen = tcp_split(&fleet.node(i).client, target(), per_node)?;
        assert_weights(&seen, &weights).with_context(|| format!("split on n{i}"))?;
        println!("split on n{i}: {seen:?}");
        observed.push(seen);
    }
    let expected_total: usize = observed.iter().map(|s| s.values().sum::<usize>()).sum();
    let fleet_stats = wait_for(
        "stats --fleet summing every node's connections",
        Duration::from_secs(10),
        || {
            let out = fleet
                .node(2)
                .meshctl_ok(&["stats", "--fleet", "-o", "json"])?;
            let split: Value = serde_json::from_str(&out)?;
            let total: u64 = split
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["address"].as_str().unwrap_or("").starts_with(VIP))
                .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                .map(|b| b["total"].as_u64().unwrap_or(0))
                .sum();
            Ok((total as usize == expected_total).then_some(split))
        },
    )?;
    for backend in fleet_stats[0]["backends"].as_array().context("backends")? {
        let subset = backend["subset"].as_str().unwrap_or("-");
        for (i, seen) in observed.iter().enumerate() {
            let counted = backend["per_node"][format!("n{}", i + 1)]
                .as_u64()
                .unwrap_or(0);
            let answered = *seen.get(subset).unwrap_or(&0) as u64;
            ensure!(
                counted == answered,
                "n{}: node counted {counted} connections to {subset}, clients got {answered}",
                i + 1
            );
        }
    }
    println!(
        "{}",
        fleet.node(3).meshctl_ok(&["stats", "--fleet"])?.trim_end()
    );

    // --- Concurrent applies from two nodes: one wins, the other is told to retry.
    let mut conflicts = 0;
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(2));
        let sockets = [fleet.node(1).socket(), fleet.node(2).socket()];
        let submissions = [echo_split([100, 0, 0]), echo_split([0, 100, 0])];
        let handles: Vec<_> = (0..2)
            .map(|k| {
                let (socket, yaml, barrier) =
                    (sockets[k].clone(), submissions[k].clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    meshctl_stdin(&socket, &["apply", "-f", "-"], &yaml)
                })
            })
            .collect();
        let outcomes: Vec<(bool, String, String)> = handles
            .into_iter()
            .map(|h| h.join().expect("apply thread"))
            .collect::<Result<_>>()?;
        for (ok, _, err) in &outcomes {
            ensure!(
                *ok || err.contains("run the command again"),
                "round {round}: an apply failed for another reason than a conflict: {err}"
            );
        }
        let winners: Vec<usize> = (0..2).filter(|k| outcomes[*k].0).collect();
        ensure!(!winners.is_empty(), "round {round}: both applies lost");
        if winners.len() == 1 {
            conflicts += 1;
        }
        // Nothing half-applied: every node ends on one complete submission (the later winner).
        let revision = fleet_revision(&fleet, 3)?;
        converge(&fleet, &[1, 2, 3], revision)?;
        let identity = first_identity(&fleet, 1)?;
        ensure!(
            identity == "v1" || identity == "v2",
            "round {round}: traffic went to {identity}"
        );
        for i in 1..=SIZE {
            all_to(&fleet, i, &identity, 5)?;
        }
    }
    measured.push(format!(
        "20 rounds of two simultaneous applies from n1 and n2: in {conflicts} one was told to retry, \
         in {} both went through one after the other; every node ended each round on one complete \
         submission",
        20 - conflicts
    ));
    println!("concurrent applies: 20 rounds, {conflicts} with one apply told to retry");
    ensure!(
        conflicts > 0,
        "20 rounds of simultaneous applies never conflicted: the guard was not exercised"
    );

    // --- A partitioned node keeps forwarding with its last rules, says it is stale, catches up.
    apply_ok(&fleet, 1, &echo_split([100, 0, 0]))?;
    let before = fleet_revision(&fleet, 1)?;
    converge(&fleet, &[1, 2, 3], before)?;
    fleet.partition(3, true)?;
    wait_for("n3 noticing it lost etcd", Duration::from_secs(15), || {
        let s = status(&fleet, 3)?;
        Ok((s["fleet"]["connected"] == false).then_some(()))
    })?;
    apply_ok(&fleet, 2, &echo_split([0, 0, 100]))?;
    let after = fleet_revision(&fleet, 2)?;
    converge(&fleet, &[1, 2], after)?;
    all_to(&fleet, 3, "v1", 20)?; // the old rules, still forwarding
    all_to(&fleet, 1, "v3", 20)?;
    let (ok, out, _) = fleet.node(3).meshctl(&["status"])?;
    ensure!(
        ok && out.contains("STALE"),
        "n3 does not say it is stale:\n{out}"
    );
    let gone = wait_for("n1 seeing n3 gone", Duration::from_secs(15), || {
        let view = nodes(&fleet, 1)?;
        let n3 = view["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == "n3").cloned());
        Ok(n3.filter(|n| n["state"] == "gone" || n["state"] == "stale"))
    })?;
    println!("partitioned n3 as seen from n1: {}", gone["state"]);
    fleet.partition(3, false)?;
    let healed = converge(&fleet, &[3], after)?;
    all_to(&fleet, 3, "v3", 20)?;
    measured.push(format!(
        "n3 cut off from etcd: kept forwarding with its last rules, said STALE, seen `{}` by n1; \
         after the link healed it applied the newest revision within {} ms",
        gone["state"].as_str().unwrap_or("?"),
        healed.as_millis()
    ));
    println!(
        "partition healed: n3 caught up with revision {after} in {} ms",
        healed.as_millis()
    );

    // --- Losing one etcd member of three changes nothing.
    fleet.etcd.members[0].kill();
    apply_ok(&fleet, 1, &echo_split([0, 100, 0]))?;
    let revision = fleet_revision(&fleet, 2)?;
    converge(&fleet, &[1, 2, 3], revision)?;
    for i in 1..=SIZE {
        all_to(&fleet, i, "v2", 10)?;
    }
    fleet.etcd.members[0].start()?;
    fleet.etcd.wait_healthy(Duration::from_secs(20))?;

    // --- Losing quorum blocks applies with a clear error; forwarding goes on.
    fleet.etcd.members[1].kill();
    fleet.etcd.members[2].kill();
    let (ok, _, err) = apply(&fleet, 1, &echo_split([100, 0, 0]))?;
    ensure!(!ok, "an apply succeeded without an etcd quorum");
    ensure!(
        err.contains("changes are blocked until etcd answers"),
        "unclear error without quorum: {err}"
    );
    println!("apply without quorum: {}", err.trim());
    for i in 1..=SIZE {
        all_to(&fleet, i, "v2", 10)?;
    }
    fleet.etcd.members[1].start()?;
    fleet.etcd.members[2].start()?;
    fleet.etcd.wait_healthy(Duration::from_secs(30))?;
    let regained = Instant::now();
    wait_for(
        "an apply after quorum came back",
        Duration::from_secs(20),
        || Ok(apply(&fleet, 1, &echo_split([100, 0, 0]))?.0.then_some(())),
    )?;
    let revision = fleet_revision(&fleet, 1)?;
    converge(&fleet, &[1, 2, 3], revision)?;
    for i in 1..=SIZE {
        all_to(&fleet, i, "v1", 10)?;
    }
    measured.push(format!(
        "quorum lost: apply refused with `{}`, every node still forwarding; quorum back: an \
         apply accepted and in force on every node {} ms after the cluster was healthy",
        err.find("changes are blocked")
            .map_or(err.trim(), |at| err[at..].trim()),
        regained.elapsed().as_millis()
    ));
    println!(
        "quorum regained: apply accepted and converged {} ms after the cluster was healthy",
        regained.elapsed().as_millis()
    );

    // --- meshd restarted while etcd is down starts with its last applied rules.
    for member in &mut fleet.etcd.members {
        member.kill();
    }
    let meshd = fleet.nodes[1].meshd.take().context("n2 runs meshd")?;
    meshd.stop()?;
    fleet.start_meshd(2)?;
    let s = status(&fleet, 2)?;
    ensure!(
        s["fleet"]["applied_revision"] == revision && s["fleet"]["from_cache"] == true,
        "n2 did not restore revision {revision} from its cache: {}",
        s["fleet"]
    );
    all_to(&fleet, 2, "v1", 10)?;
    for member in &mut fleet.etcd.members {
        member.start()?;
    }
    fleet.etcd.wait_healthy(Duration::from_secs(30))?;
    wait_for("n2 reconnecting to etcd", Duration::from_secs(20), || {
        let s = status(&fleet, 2)?;
        let connected = s["fleet"]["connected"] == true;
        Ok((connected && s["fleet"]["applied_revision"] == revision).then_some(()))
    })?;
    measured.push(format!(
        "n2 restarted with all of etcd down: started on its cached revision {revision} and \
         forwarded by it, then reconnected when etcd came back"
    ));
    println!(
        "{}",
        fleet.node(2).meshctl_ok(&["get", "nodes"])?.trim_end()
    );
    let block = format!(
        "Measured by `tests/fleet.rs` (three etcd members, three nodes, a debug build):\n\n{}\n",
        measured
            .iter()
            .map(|m| format!("- {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let file = figures::publish("docs/fleet.md", "fleet-failures", &block)?;
    println!("{block}(written to {})", file.display());
    Ok(())
}

/// Who answers one connection from node `i`'s client.
fn first_identity(fleet: &Fleet, i: usize) -> Result<String> {
    Ok(fleet.node(i).client.run(move || tcp_connect(target()))??.1)
}
