//! `cargo xtask demo --fleet`: the sandbox's Bookinfo tutorial on three nodes sharing one rule
//! set through a real etcd cluster (three members in namespaces, as in `tests/fleet.rs`).
//!
//! Each node is the sandbox's node (`Topology`): its own client entering through the bookinfo
//! Gateway on the node's address, and its own copy of the Bookinfo workloads at the same
//! addresses, so the shared ServiceEntries name the same endpoints behind every node. The
//! `--config` layer (services and subsets) is per node, as in a fleet; each tutorial step is
//! applied with `meshctl` on one node (a different one each step) and reaches the others through
//! etcd. After each step the demo prints the fleet revision, the revision each node runs and how
//! long the others took to run it, `meshctl get nodes`, and the split each node's client sees.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::{
    fleet::{etcd_node_args, node_ctl_ip, wait_for, EtcdCluster, SIZE},
    meshd::{meshctl, Meshd},
    netns::unique_prefix,
    topology::Topology,
    web::NsProcess,
};
use serde_json::Value;

use crate::{
    apply_step, check_interrupt, check_step, node_args, node_rules_dir, print_step, progress,
    start_workloads, wait_for_interrupt, DirGuard, Options, STEPS, WORKLOADS,
};

/// One node of the demo fleet. Fields drop in order: meshd first, its network last.
struct DemoNode {
    name: String,
    socket: String,
    meshd: Option<Meshd>,
    workloads: Vec<NsProcess>,
    _rules: DirGuard,
    topo: Topology,
}

pub(crate) fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let prefix = unique_prefix();
    progress("starting a three-member etcd cluster (Debian's etcd, one namespace per member)");
    let etcd = EtcdCluster::start(&prefix)?;
    let mut nodes = Vec::new();
    for i in 1..=SIZE {
        check_interrupt()?;
        let name = format!("n{i}");
        progress(&format!(
            "{name}: namespaces (client, node, Bookinfo workloads), the workloads, meshd --etcd"
        ));
        let topo = Topology::build(WORKLOADS.len())?;
        etcd.bridge
            .plug(&name, &topo.node, "ctl", &format!("{}/24", node_ctl_ip(i)))?;
        let workloads = start_workloads(&topo)?;
        let (rules_dir, rules) = node_rules_dir(&topo.prefix)?;
        let mut args = node_args(&topo, &rules_dir);
        args.extend(etcd_node_args(&etcd, &prefix, &name, &rules_dir));
        let meshd = Meshd::start(&topo.node, &args)?;
        nodes.push(DemoNode {
            socket: rules_dir.join("meshd.sock").display().to_string(),
            name,
            meshd: Some(meshd),
            workloads,
            _rules: rules,
            topo,
        });
    }
    for node in &mut nodes {
        for w in &mut node.workloads {
            w.check_alive()?;
        }
    }
    progress(&format!(
        "fleet ready in {:.1}s: etcd at {}",
        started.elapsed().as_secs_f64(),
        etcd.endpoints()
    ));

    let mut failures = Vec::new();
    for (n, step) in STEPS.iter().enumerate() {
        check_interrupt()?;
        print_step(n, step);
        let on = &nodes[n % SIZE];
        println!(
            "  (applied on {}; the other nodes get it through etcd)",
            on.name
        );
        apply_step(&on.socket, step)?;
        let returned = Instant::now();
        let revision = fleet_revision(on)?;
        let mut lines = Vec::new();
        for node in &nodes {
            let took = wait_for(
                &format!("{} running fleet revision {revision}", node.name),
                Duration::from_secs(30),
                || Ok((applied_revision(node)? >= revision).then(|| returned.elapsed())),
            )?;
            lines.push(format!(
                "    {}  runs revision {}  ({})",
                node.name,
                applied_revision(node)?,
                if node.name == on.name {
                    "in force when meshctl returned".to_string()
                } else {
                    format!("{} ms after meshctl returned", took.as_millis())
                }
            ));
        }
        println!("  fleet revision {revision} (etcd):");
        for line in lines {
            println!("{line}");
        }
        println!("  $ meshctl get nodes");
        for line in nodes_table(on, revision)?.lines() {
            println!("    {line}");
        }
        for node in &nodes {
            check_interrupt()?;
            println!("  -- {} (its own client, through its gateway):", node.name);
            check_step(
                &node.topo,
                n + 1,
                step,
                options,
                &format!("{}: ", node.name),
                &mut failures,
            )?;
        }
    }
    if !failures.is_empty() {
        bail!(
            "steps did not match their rules:\n  {}",
            failures.join("\n  ")
        );
    }
    println!(
        "\nEvery step's observed traffic matched its rules on every node (within what chance \
         allows)."
    );

    if options.wait {
        let sockets: Vec<String> = nodes
            .iter()
            .map(|n| format!("  {}: {}", n.name, n.socket))
            .collect();
        println!(
            "\nThe fleet stays up until Ctrl-C. meshctl sockets:\n{}\nFrom another shell, as \
             root:\n  target/release/meshctl --socket {} get nodes\n  \
             target/release/meshctl --socket {} apply -f config/bookinfo/virtual-service-reviews-50-v3.yaml\n  \
             target/release/meshctl --socket {} stats --fleet\n  \
             nsenter --net=/var/run/netns/{} curl -s http://198.18.1.1:8080/productpage",
            sockets.join("\n"),
            nodes[0].socket,
            nodes[1].socket,
            nodes[2].socket,
            nodes[2].topo.client.name()
        );
        wait_for_interrupt();
    }
    for node in &mut nodes {
        if let Some(meshd) = node.meshd.take() {
            let status = meshd.stop()?;
            if !status.success() {
                bail!("meshd on {} exited with {status}", node.name);
            }
        }
    }
    drop(nodes);
    drop(etcd);
    progress("fleet sandbox removed");
    Ok(())
}

/// The node's own account of the fleet revision it runs.
fn applied_revision(node: &DemoNode) -> Result<i64> {
    let status = json(node, &["status", "-o", "json"])?;
    status["fleet"]["applied_revision"]
        .as_i64()
        .context("meshctl status without a fleet revision")
}

/// The fleet revision in etcd, asked through `node`.
fn fleet_revision(node: &DemoNode) -> Result<i64> {
    json(node, &["get", "nodes", "-o", "json"])?["revision"]
        .as_i64()
        .context("meshctl get nodes without the fleet revision")
}

/// `meshctl get nodes` once every node's published record shows `revision` (records are
/// republished every half second).
fn nodes_table(node: &DemoNode, revision: i64) -> Result<String> {
    wait_for(
        "every node's record showing the revision",
        Duration::from_secs(10),
        || {
            let view = json(node, &["get", "nodes", "-o", "json"])?;
            let all_ok = view["nodes"].as_array().is_some_and(|n| {
                n.len() == SIZE
                    && n.iter()
                        .all(|n| n["state"] == "ok" && n["record"]["applied_revision"] == revision)
            });
            Ok(all_ok.then_some(()))
        },
    )?;
    let (ok, out, err) = meshctl(&node.socket, &["get", "nodes"])?;
    if !ok {
        bail!("meshctl get nodes on {}: {err}", node.name);
    }
    Ok(out)
}

fn json(node: &DemoNode, args: &[&str]) -> Result<Value> {
    let (ok, out, err) = meshctl(&node.socket, args)?;
    if !ok {
        bail!("meshctl {} on {}: {err}", args.join(" "), node.name);
    }
    Ok(serde_json::from_str(&out)?)
}
