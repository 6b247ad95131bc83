//! Chaos: meshd killed with SIGKILL during an apply and during a large restore, state files
//! and pin directories that are corrupt, truncated, of another version or of another shape,
//! and a changed `--conntrack-entries`. After each, the rules in force are the last
//! acknowledged set (an apply that was acknowledged is never lost; one that was not is either
//! wholly there or wholly absent) and connections established through the kernel path still
//! echo on their backend. Refusals name the file or pin and say how to go on.
//!
//! `MESH_CHAOS_LONG=1` (set by `cargo xtask soak`) runs the large variants.

use std::{net::TcpStream, time::Duration};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    chaos::{pin_new_map, pinned_args, pinned_shape, start_refused, state_file, write_first},
    maps::pinned_services,
    meshd::{meshctl, meshctl_stdin, status_json, Meshd, PinDir},
    rules::{echo_split, scale_service_entries, scale_vip, RulesDir},
    servers::{tcp_connect, tcp_echo},
    topology::{backend_v4, Topology},
    traffic::{tcp_split, vip, EchoSetup},
};

/// Long-lived connections opened before each fault.
const OPEN: usize = 50;

fn long() -> bool {
    std::env::var("MESH_CHAOS_LONG").is_ok_and(|v| v != "0")
}

fn apply(socket: &str, yaml: &str) -> Result<String> {
    let (ok, stdout, stderr) = meshctl_stdin(socket, &["apply", "-f", "-"], yaml)?;
    ensure!(ok, "meshctl apply failed:\n{stdout}\n{stderr}");
    Ok(stdout)
}

/// The echo setup with pins and a state file, meshd started with `extra` (returned apart,
/// since tests stop, kill and restart it), all of echo sent to v`to` by an acknowledged apply,
/// and [`OPEN`] connections open to it. Fields drop in order: connections, pins, namespaces.
struct Scene {
    open: Vec<(TcpStream, String)>,
    pins: PinDir,
    socket: String,
    setup: EchoSetup,
}

impl Scene {
    fn start(to: usize, extra: &[&str]) -> Result<(Self, Meshd)> {
        let setup = EchoSetup::new(None)?;
        let pins = PinDir::new(&setup.topo);
        let socket = setup.rules.socket();
        let args = pinned_args(&setup.topo, &setup.rules, &pins, extra);
        let meshd = Meshd::start(&setup.topo.node, &args)?;
        let mut weights = [0; 3];
        weights[to - 1] = 100;
        apply(&socket, &echo_split(weights))?;
        let open = open_connections(&setup.topo, &format!("v{to}"))?;
        let scene = Scene {
            open,
            pins,
            socket,
            setup,
        };
        Ok((scene, meshd))
    }

    fn into_parts(self) -> (Vec<(TcpStream, String)>, PinDir, String, EchoSetup) {
        (self.open, self.pins, self.socket, self.setup)
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        pinned_args(&self.setup.topo, &self.setup.rules, &self.pins, extra)
    }
}

/// `OPEN` connections to the echo VIP, all answered by `expected`.
fn open_connections(topo: &Topology, expected: &str) -> Result<Vec<(TcpStream, String)>> {
    let open = topo
        .client
        .run(|| -> Result<Vec<_>> { (0..OPEN).map(|_| tcp_connect(vip(8080))).collect() })??;
    ensure!(
        open.iter().all(|(_, id)| id == expected),
        "not all connections on {expected}"
    );
    Ok(open)
}

/// Every connection still echoes (on its own backend: the stream is the one to it).
fn all_echo(open: &mut [(TcpStream, String)], when: &str) -> Result<()> {
    let mut broken = Vec::new();
    for (n, (stream, _)) in open.iter_mut().enumerate() {
        if let Err(e) = tcp_echo(stream, format!("{when}: connection {n}").as_bytes()) {
            broken.push(format!("{n}: {e:#}"));
        }
    }
    ensure!(
        broken.is_empty(),
        "{when}: {} of {} connections broke: {:?}",
        broken.len(),
        open.len(),
        &broken[..broken.len().min(5)]
    );
    Ok(())
}

/// The weights of the `echo` VirtualService in force (from `meshctl get`), if any.
fn echo_weights(socket: &str) -> Result<Option<String>> {
    let (ok, stdout, stderr) = meshctl(socket, &["get", "vs", "echo", "-o", "yaml"])?;
    if !ok {
        ensure!(
            stderr.contains("not found") || stdout.is_empty(),
            "{stderr}"
        );
        return Ok(None);
    }
    let weights: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("weight: "))
        .collect();
    Ok(Some(weights.join(",")))
}

/// Names of the scale ServiceEntries (`s<i>`) in force, per `meshctl get se`.
fn scale_names(socket: &str) -> Result<std::collections::BTreeSet<usize>> {
    let (ok, stdout, stderr) = meshctl(socket, &["get", "se", "-o", "json"])?;
    ensure!(ok, "meshctl get se: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).context("meshctl get se -o json")?;
    let mut names = std::collections::BTreeSet::new();
    let mut visit = vec![&v];
    while let Some(v) = visit.pop() {
        match v {
            serde_json::Value::Array(items) => visit.extend(items),
            serde_json::Value::Object(map) => {
                if let Some(name) = map
                    .get("name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| n.strip_prefix('s'))
                    .and_then(|n| n.parse().ok())
                {
                    names.insert(name);
                }
                visit.extend(map.values());
            }
            _ => {}
        }
    }
    Ok(names)
}

#[test]
fn a_new_conntrack_capacity_is_migrated_and_connections_keep_their_backend() -> Result<()> {
    let (scene, meshd) = Scene::start(1, &["--conntrack-entries", "1024"])?;
    let (mut open, pins, socket, setup) = scene.into_parts();
    let (topo, rules) = (&setup.topo, &setup.rules);
    ensure!(
        status_json(&socket)?["conntrack_capacity"] == 1024,
        "capacity in flows"
    );
    meshd.stop()?;

    // Four times the capacity: the table is migrated, the connections keep their entries.
    let large = pinned_args(topo, rules, &pins, &["--conntrack-entries", "4096"]);
    let mut meshd = Meshd::start(&topo.node, &large)?;
    let line = meshd.wait_for_log("CONNTRACK migrated", 0, Duration::from_secs(1))?;
    ensure!(line.contains("from 2048 to 8192 entries"), "{line}");
    let status = status_json(&socket)?;
    ensure!(status["conntrack_capacity"] == 4096, "{status}");
    let notes = status["pin_layout"]["notes"].to_string();
    ensure!(notes.contains("CONNTRACK migrated"), "{status}");
    // A shift of all weights: a connection whose entry was lost would be re-balanced to v2
    // (which never saw it) and break.
    apply(&socket, &echo_split([0, 100, 0]))?;
    all_echo(&mut open, "after the migration and a shift to v2")?;
    let seen = tcp_split(&topo.client, vip(8080), 20)?;
    ensure!(seen.get("v2") == Some(&20), "new connections: {seen:?}");
    meshd.stop()?;

    // The same flags again: nothing to migrate.
    let meshd = Meshd::start(&topo.node, &large)?;
    ensure!(!meshd.log().contains("migrated"), "{}", meshd.log());
    all_echo(&mut open, "after a plain restart")?;
    Ok(())
}

#[test]
fn pins_of_another_shape_or_version_are_refused_and_change_nothing() -> Result<()> {
    let (scene, meshd) = Scene::start(3, &[])?;
    meshd.stop()?;
    let args = scene.args(&[]);
    let (mut open, pins, socket, setup) = scene.into_parts();
    let (topo, rules) = (&setup.topo, &setup.rules);
    let before = pinned_services(&pins.0)?;
    let dir = pins.0.display().to_string();

    // CONNTRACK replaced by a map whose values are 8 bytes longer.
    let conntrack = pins.0.join("CONNTRACK");
    let aside = pins.0.join("CONNTRACKaside");
    let (kind, key, value, entries) = pinned_shape(&conntrack)?;
    std::fs::rename(&conntrack, &aside)?;
    pin_new_map(&conntrack, &kind, key, value + 8, entries)?;
    let refused = start_refused(&topo.node, &args)?;
    eprintln!("refused as it should:\n{refused}");
    for needle in [
        format!("pin directory {dir}"),
        format!(
            "{dir}/CONNTRACK: found lru_hash key {key} B value {} B",
            value + 8
        ),
        format!("expected lru_hash key {key} B value {value} B"),
        format!("meshd --cleanup --pin-dir {dir}"),
        "every connection the kernel tracks is lost".into(),
    ] {
        ensure!(refused.contains(&needle), "no {needle:?} in:\n{refused}");
    }
    std::fs::remove_file(&conntrack)?;
    std::fs::rename(&aside, &conntrack)?;

    // A layout record of a future version.
    let record = pins.0.join("MESH_LAYOUT");
    let (_, _, record_size, _) = pinned_shape(&record)?;
    std::fs::rename(&record, pins.0.join("MESH_LAYOUTaside"))?;
    pin_new_map(&record, "array", 4, record_size, 1)?;
    let mut future = vec![0u8; record_size as usize];
    future[..8].copy_from_slice(b"meshpins");
    future[8..12].copy_from_slice(&99u32.to_ne_bytes());
    write_first(&record, &future)?;
    let refused = start_refused(&topo.node, &args)?;
    ensure!(
        refused.contains("layout version 99") && refused.contains("reads layout version 1"),
        "{refused}"
    );

    // Something else under the record's name.
    std::fs::remove_file(&record)?;
    pin_new_map(&record, "array", 4, 8, 1)?;
    let refused = start_refused(&topo.node, &args)?;
    ensure!(
        refused.contains(&format!("{dir}/MESH_LAYOUT is not a layout record")),
        "{refused}"
    );

    // Nothing changed: the programs still forward, the tables are as they were.
    all_echo(&mut open, "after three refused starts")?;
    ensure!(
        pinned_services(&pins.0)? == before,
        "a refused start changed the tables"
    );

    // Pins from before the record existed (no record at all): recognised and kept. Plus the
    // leftover of a migration killed between creating and placing a map: removed.
    std::fs::remove_file(&record)?;
    std::fs::remove_file(pins.0.join("MESH_LAYOUTaside"))?;
    let leftover = pins.0.join("CONNTRACK_next");
    pin_new_map(&leftover, &kind, key, value, 64)?;
    let mut meshd = Meshd::start(&topo.node, &args)?;
    meshd.wait_for_log(
        "leftover of an interrupted start",
        0,
        Duration::from_secs(1),
    )?;
    ensure!(!leftover.exists(), "the leftover pin is still there");
    meshd.wait_for_log(
        "before meshd kept a layout record",
        0,
        Duration::from_secs(1),
    )?;
    all_echo(&mut open, "after adopting pins without a record")?;
    ensure!(echo_weights(&socket)?.as_deref() == Some("0,0,100,0,0,100"));
    ensure!(pinned_shape(&record).is_ok(), "no record written");
    meshd.stop()?;

    // A larger Maglev pool: the rule tables move to new maps together, contents and offsets
    // unchanged; a smaller one later is not applied to a pool in use, and says so.
    let big = pinned_args(topo, rules, &pins, &["--maglev-pool-entries", "131072"]);
    let saved = pinned_services(&pins.0)?;
    let mut meshd = Meshd::start(&topo.node, &big)?;
    let line = meshd.wait_for_log("MAGLEV migrated", 0, Duration::from_secs(1))?;
    ensure!(line.contains("from 65536 to 131072 entries"), "{line}");
    for companion in ["SERVICES migrated", "BACKENDS migrated"] {
        meshd.wait_for_log(companion, 0, Duration::from_secs(1))?;
    }
    ensure!(pinned_shape(&pins.0.join("MAGLEV"))?.3 == 131_072);
    ensure!(
        pinned_services(&pins.0)? == saved,
        "the rule tables changed in the move"
    );
    let seen = tcp_split(&topo.client, vip(8080), 20)?;
    ensure!(seen.get("v3") == Some(&20), "new connections: {seen:?}");
    all_echo(&mut open, "after the rule tables moved")?;
    meshd.stop()?;
    let meshd = Meshd::start(&topo.node, &args)?;
    let status = status_json(&socket)?;
    ensure!(
        status["pin_layout"]["notes"]
            .to_string()
            .contains("MAGLEV keeps its 131072 entries"),
        "{status}"
    );
    all_echo(&mut open, "after a smaller pool was asked for")?;
    meshd.stop()?;
    Ok(())
}

#[test]
fn corrupt_truncated_and_wrong_version_state_files_are_refused() -> Result<()> {
    let (scene, meshd) = Scene::start(2, &[])?;
    meshd.stop()?;
    let args = scene.args(&[]);
    let (mut open, _pins, socket, setup) = scene.into_parts();
    let (topo, rules) = (&setup.topo, &setup.rules);
    let path = state_file(rules);
    let good = std::fs::read_to_string(&path)?;
    let shown = path.display().to_string();

    let cases: [(&str, String, &str); 4] = [
        ("truncated", good[..good.len() / 2].to_string(), "truncated"),
        (
            "garbage",
            format!(
                "{}\u{1}\u{2}: [unclosed\n{}",
                &good[..good.find('\n').unwrap_or(0) + 1],
                "x: {"
            ),
            "",
        ),
        (
            "a future format",
            good.replacen("format 1", "format 7", 1),
            "format 7, but this meshd reads format 1",
        ),
        ("not ours", "just: some\nother: yaml\n".into(), ""),
    ];
    for (what, text, needle) in cases {
        std::fs::write(&path, &text)?;
        let refused = start_refused(&topo.node, &args).with_context(|| what.to_string())?;
        ensure!(
            refused.contains(&format!("state file {shown}")) && refused.contains(needle),
            "{what}: {refused}"
        );
        ensure!(
            std::fs::read_to_string(&path)? == text,
            "{what}: meshd rewrote the file it refused"
        );
        all_echo(&mut open, &format!("after refusing a {what} state file"))?;
    }

    std::fs::write(&path, &good)?;
    let _meshd = Meshd::start(&topo.node, &args)?;
    ensure!(echo_weights(&socket)?.as_deref() == Some("0,100,0,0,100,0"));
    all_echo(&mut open, "after the good file came back")?;
    Ok(())
}

/// Services of apply round `r` (a block of `per_round` scale services) plus the echo weights
/// of that round.
fn round_yaml(r: usize, per_round: usize) -> (String, [u32; 3]) {
    let weights = [[100, 0, 0], [0, 100, 0], [0, 0, 100], [50, 50, 0]][r % 4];
    let endpoints = [backend_v4(1), backend_v4(2)];
    let mut yaml =
        scale_service_entries(r * per_round..(r + 1) * per_round, "TCP", 9000, &endpoints);
    yaml.push_str(&echo_split(weights));
    (yaml, weights)
}

#[test]
fn kill_during_apply_keeps_the_last_acknowledged_rules() -> Result<()> {
    let per_round = if long() { 5_000 } else { 500 };
    // How long after meshctl starts meshd is killed: from before the request arrives to after
    // the answer; which rounds are caught mid-way varies, the invariant holds for all.
    // `None`: killed right after the acknowledgement.
    let delays = [Some(0u64), Some(20), Some(100), None, Some(400), Some(1500)];
    let extra = ["--maglev-pool-entries", "262144"];
    let (scene, mut meshd) = Scene::start(1, &extra)?;
    let args = scene.args(&extra);
    let (mut open, pins, socket, setup) = scene.into_parts();
    let topo = &setup.topo;
    let timeout = Duration::from_secs(120);
    let echo_entries = pinned_services(&pins.0)?.len();
    let mut acknowledged: Option<usize> = None;
    let mut complete = 0;
    for (r, delay) in delays.iter().enumerate() {
        let (yaml, _) = round_yaml(r, per_round);
        let sock = socket.clone();
        let client = std::thread::spawn(move || meshctl_stdin(&sock, &["apply", "-f", "-"], &yaml));
        let join = |client: std::thread::JoinHandle<Result<(bool, String, String)>>| {
            client
                .join()
                .map_err(|_| anyhow::anyhow!("meshctl thread panicked"))?
        };
        let acked = match delay {
            Some(ms) => {
                std::thread::sleep(Duration::from_millis(*ms));
                meshd.kill()?;
                join(client)?.0
            }
            None => {
                let (acked, out, err) = join(client)?;
                ensure!(acked, "round {r}: {out}{err}");
                meshd.kill()?;
                true
            }
        };
        all_echo(&mut open, &format!("meshd killed in round {r}"))?;
        meshd = Meshd::start_within(&topo.node, &args, timeout)?;
        // Round r is wholly there or wholly absent; acknowledged ones always are.
        let names = scale_names(&socket)?;
        let block: Vec<usize> = (r * per_round..(r + 1) * per_round).collect();
        let present = block.iter().filter(|i| names.contains(i)).count();
        ensure!(
            present == 0 || present == per_round,
            "round {r}: {present} of {per_round} services survived"
        );
        ensure!(
            !acked || present == per_round,
            "round {r} was acknowledged and lost"
        );
        eprintln!(
            "round {r}: killed {}, acknowledged {acked}, {present} of {per_round} services in force",
            delay.map_or("after the acknowledgement".into(), |ms| format!("{ms} ms into the apply"))
        );
        if present == per_round {
            acknowledged = Some(r);
            complete += 1;
        }
        // apply adds to what is there: the complete rounds' services, and nothing else.
        ensure!(
            names.len() == complete * per_round,
            "round {r}: {} services in force, {complete} complete rounds",
            names.len()
        );
        let expected = match acknowledged {
            Some(a) => round_yaml(a, per_round).1,
            None => [100, 0, 0],
        };
        let weights = expected.map(|w| w.to_string()).join(",");
        ensure!(
            echo_weights(&socket)?.as_deref() == Some(&format!("{weights},{weights}")),
            "round {r}: echo weights are not those of the last complete apply"
        );
        // The kernel agrees with the store.
        let kernel = pinned_services(&pins.0)?.len();
        ensure!(
            kernel == names.len() + echo_entries,
            "round {r}: {kernel} services in the kernel, {} in the store",
            names.len()
        );
        all_echo(&mut open, &format!("restarted after round {r}"))?;
    }
    ensure!(
        acknowledged.is_some(),
        "no round completed; the invariant was only checked on absent applies"
    );
    Ok(())
}

#[test]
fn kill_during_a_large_restore_and_migration_loses_nothing() -> Result<()> {
    let n: usize = if long() { 30_000 } else { 3_000 };
    let topo = Topology::build(3)?;
    let _servers = mesh_tests::traffic::start_backends(&topo, false)?;
    let rules = RulesDir::new(&topo)?;
    rules.write(
        "echo.yaml",
        &mesh_tests::rules::echo_service_entry(&[1, 2, 3]),
    )?;
    rules.write("dr.yaml", mesh_tests::rules::ECHO_SUBSETS)?;
    let pins = PinDir::new(&topo);
    let socket = rules.socket();
    let timeout = Duration::from_secs(300);
    // Room for every service's default table of 211 entries.
    let pool = (n * 256).next_power_of_two().to_string();
    let flags =
        |flows: &'static str| ["--conntrack-entries", flows, "--maglev-pool-entries", &pool];
    let args = pinned_args(&topo, &rules, &pins, &flags("2048"));
    let meshd = Meshd::start(&topo.node, &args)?;
    let input = RulesDir::named(&topo, "input")?;
    let set = input.0.join("set.yaml");
    let endpoints = [backend_v4(1), backend_v4(2)];
    std::fs::write(
        &set,
        scale_service_entries(0..n, "TCP", 9000, &endpoints) + &echo_split([0, 100, 0]),
    )?;
    let (ok, stdout, stderr) = meshctl(&socket, &["apply", "-f", &set.display().to_string()])?;
    ensure!(ok, "{stdout}{stderr}");
    let mut open = open_connections(&topo, "v2")?;
    let before = pinned_services(&pins.0)?;
    meshd.kill()?;

    // Restarts with a larger connection table killed at three points of the restore: while the
    // pins are checked and migrated, after the tables were read back, after the rules went in.
    let grown = pinned_args(&topo, &rules, &pins, &flags("8192"));
    for at in [
        "checking the pinned maps",
        "rule tables recovered",
        "rules installed",
    ] {
        let mut meshd = Meshd::spawn(&topo.node, &grown)?;
        meshd.wait_for_log(at, 0, timeout)?;
        meshd.kill()?;
        all_echo(&mut open, &format!("meshd killed at {at:?}"))?;
    }
    let meshd = Meshd::start_within(&topo.node, &grown, timeout)?;
    let status = status_json(&socket)?;
    ensure!(status["conntrack_capacity"] == 8192, "{status}");
    ensure!(scale_names(&socket)?.len() == n, "services lost");
    ensure!(
        pinned_services(&pins.0)? == before,
        "the kernel tables differ"
    );
    all_echo(&mut open, "after the killed restores")?;
    for i in [0, n - 1] {
        let target = std::net::SocketAddr::new(scale_vip(i), 9000);
        let who = topo
            .client
            .run(move || tcp_connect(target).map(|(_, id)| id))??;
        ensure!(who == "v1" || who == "v2", "service {i}: {who}");
    }
    drop(meshd);
    Ok(())
}
