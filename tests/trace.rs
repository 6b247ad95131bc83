//! `meshctl trace` end to end: a filtered trace shows exactly the kernel's decisions for one
//! client's connections (as many new flows as the backends accepted, each to the backend that
//! accepted it; one refusal per connection to a service without backends, with its reason) and
//! nothing of another client's traffic; with no trace running the kernel reports nothing at all.
//!
//! Kernel debug logging (`meshd --kernel-log`): with `debug`, each refused connection shows as
//! one line in meshd's log; off (the default), none. Through BPF_PROG_TEST_RUN: a packet dropped
//! for an inconsistent table is traced with its reason and logged, nothing is logged when the
//! object is loaded with logging off, and a rebuilt connection-table direction is logged.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{Array, HashMap, PerCpuArray, RingBuf};
use mesh_common::{
    ct_event, map_names, port_to_wire, reason, FlowKey, FlowState, TraceEvent, TraceFilter,
    FAMILY_IPV4, NO_BACKEND, PROTO_TCP, SERVICE_FLAG_L7_PROXY, TRACE_MATCH_CLIENT_ADDR,
    TRACE_UNTRANSLATED,
};
use mesh_tests::{
    maps::{addr_bytes, Hook, Lb, Service, HOOKS, LOG_LEVEL_GLOBAL, XDP_DROP, XDP_PASS},
    meshd::Meshd,
    observe::{trace_stats, wait_until, TraceRun},
    packet::{Frame, L4},
    rules::{meshd_args, service_entry},
    servers::tcp_connect,
    topology::{backend_v4, Topology, CLIENT_V4},
    traffic::{vip, EchoSetup},
};

/// A service whose only route goes to a subset selecting no endpoint: refused by the kernel.
const VOID_VIP: &str = "198.18.100.9";
const VOID_PORT: u16 = 7070;

fn void_vip() -> SocketAddr {
    SocketAddr::new(VOID_VIP.parse().expect("ip"), VOID_PORT)
}

/// `void`: one endpoint (v1), but its VirtualService routes everything to subset v9, which
/// selects nothing (accepted with a warning, as in Istio).
fn void_rules() -> String {
    let entry = service_entry(
        "v1",
        "void",
        VOID_VIP,
        &["{number: 7070, name: tcp-void, protocol: TCP}"],
        &[(1, backend_v4(1))],
    );
    format!(
        "{entry}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: void}}
spec:
  host: void.mesh.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v9, labels: {{version: v9}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: void}}
spec:
  hosts: [void.mesh.test]
  tcp:
  - route: [{{destination: {{host: void.mesh.test, subset: v9}}}}]
"
    )
}

/// `attempts` connections to `void` from the client, each refused at once.
fn refused_connections(topo: &Topology, attempts: usize) -> Result<()> {
    topo.client.run(move || -> Result<()> {
        for n in 0..attempts {
            match TcpStream::connect_timeout(&void_vip(), Duration::from_secs(5)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                other => bail!("connection {n} to a service without backends: {other:?}"),
            }
        }
        Ok(())
    })?
}

/// meshd's log lines written from kernel records (target `kernel`).
fn kernel_lines(meshd: &Meshd) -> Vec<String> {
    meshd
        .log()
        .lines()
        .filter(|l| l.contains(" kernel: "))
        .map(String::from)
        .collect()
}

/// A second client address on the client host: its traffic must never show in the trace.
const OTHER_CLIENT: &str = "198.18.1.3";

/// UDP flows from `OTHER_CLIENT` (fresh source port each).
fn other_client_udp(flows: usize) -> Result<usize> {
    let mut answered = 0;
    for _ in 0..flows {
        let socket = UdpSocket::bind(format!("{OTHER_CLIENT}:0"))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            socket.send_to(b"who", vip(8081))?;
            if socket.recv_from(&mut buf).is_ok() {
                answered += 1;
                break;
            }
        }
    }
    Ok(answered)
}

fn kernel_events(socket: &str) -> Result<u64> {
    trace_stats(socket)?["kernel_events"]
        .as_u64()
        .context("kernel_events")
}

/// Sends `connections` TCP connections and some UDP flows of the other client and checks the
/// kernel reported none of it.
fn assert_quiet(topo: &Topology, socket: &str, connections: usize, when: &str) -> Result<()> {
    let before = kernel_events(socket)?;
    topo.client.run(move || -> Result<()> {
        for _ in 0..connections {
            tcp_connect(vip(8080))?;
        }
        other_client_udp(connections / 3).map(|_| ())
    })??;
    let after = kernel_events(socket)?;
    ensure!(
        after == before,
        "the kernel reported {} events {when}",
        after - before
    );
    Ok(())
}

#[test]
fn a_filtered_trace_shows_exactly_one_clients_decisions() -> Result<()> {
    let setup = EchoSetup::new(Some([50, 30, 20]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    rules.write("void.yaml", &void_rules())?;
    topo.client
        .ip(&["addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", "eth0"])?;
    // Kernel logging off (the default).
    let meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();

    // Tracing off: traffic of both kinds, and the kernel reports nothing.
    assert_quiet(topo, &socket, 50, "with tracing off")?;
    let off_after = kernel_events(&socket)?;

    // Traced: the client's TCP connections, while the other client sends UDP flows.
    let trace = TraceRun::start(&socket, &["--client", CLIENT_V4])?;
    let accepted_before: Vec<u64> = setup.servers.iter().map(|s| s.served()).collect();
    const CONNECTIONS: usize = 120;
    let (seen, ports) = topo
        .client
        .run(|| -> Result<(BTreeMap<String, usize>, Vec<u16>)> {
            let mut seen = BTreeMap::new();
            let mut ports = Vec::new();
            for i in 0..CONNECTIONS {
                let (stream, identity) = tcp_connect(vip(8080))?;
                ports.push(stream.local_addr()?.port());
                *seen.entry(identity).or_insert(0) += 1;
                if i % 4 == 0 {
                    other_client_udp(1)?;
                }
            }
            Ok((seen, ports))
        })??;
    // What each backend accepted on the TCP port during the traced run (servers are
    // [tcp 8080, udp 8081, tcp 9000] per backend).
    let accepted: BTreeMap<String, u64> = (0..3)
        .map(|b| {
            let i = 3 * b;
            (
                format!("v{}", b + 1),
                setup.servers[i].served() - accepted_before[i],
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();

    // Everything the kernel reported reaches the trace (one subscriber: the kernel filter is
    // exactly this client, so every kernel event is one of its packets).
    wait_until(
        Duration::from_secs(20),
        "all kernel events in the trace",
        || {
            let stats = trace_stats(&socket)?;
            let reported = stats["kernel_events"].as_u64().unwrap_or(0) - off_after;
            // meshd counts an event when it reads it from the ring buffer, which may be behind
            // the kernel: equal counts alone could be a moment in the middle of the stream.
            let new_flows = trace.events().iter().filter(|e| e["kind"] == "new").count();
            Ok(reported > 0 && trace.len() as u64 == reported && new_flows >= CONNECTIONS)
        },
    )
    .with_context(|| {
        let stats = trace_stats(&socket)
            .map(|s| s.to_string())
            .unwrap_or_default();
        format!(
            "{} events in the trace; meshd's trace stats: {stats}",
            trace.len()
        )
    })?;
    let stats = trace_stats(&socket)?;
    ensure!(stats["dropped"] == 0, "events dropped: {stats}");
    let events = trace.events();

    // Nothing but this client.
    for e in &events {
        let client: SocketAddr = e["client"].as_str().context("client")?.parse()?;
        ensure!(
            client.ip().to_string() == CLIENT_V4,
            "event of another client: {e}"
        );
        // The test topology's veths are served by the TC hook (meshd's automatic choice).
        ensure!(e["hook"] == "tc", "hook: {e}");
    }
    // One new-flow decision per connection, on the connection's own port, to the backend that
    // accepted it; as many per backend as each backend accepted.
    let new_flows: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "new").collect();
    ensure!(
        new_flows.len() == CONNECTIONS,
        "{} new-flow events for {CONNECTIONS} connections",
        new_flows.len()
    );
    let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
    for e in &new_flows {
        let client: SocketAddr = e["client"].as_str().context("client")?.parse()?;
        ensure!(ports.contains(&client.port()), "unknown client port: {e}");
        ensure!(
            e["flags"] == "SYN",
            "a new flow starts with a bare SYN: {e}"
        );
        ensure!(
            e["slot"].as_u64().is_some(),
            "new flow without a Maglev slot: {e}"
        );
        let backend: SocketAddr = e["backend"].as_str().context("backend")?.parse()?;
        let subset = e["subset"].as_str().context("subset")?;
        let n: usize = subset.trim_start_matches('v').parse()?;
        ensure!(
            backend.ip() == backend_v4(n),
            "subset {subset} but backend {backend}"
        );
        *by_backend.entry(subset.to_string()).or_insert(0) += 1;
    }
    ensure!(
        by_backend == accepted,
        "trace says {by_backend:?}, the backends accepted {accepted:?}"
    );
    let seen: BTreeMap<String, u64> = seen.into_iter().map(|(k, v)| (k, v as u64)).collect();
    ensure!(
        by_backend == seen,
        "trace says {by_backend:?}, the client saw {seen:?}"
    );
    // Replies were traced too (the identity line each backend sent back).
    ensure!(
        events.iter().any(|e| e["kind"] == "reply"),
        "no reply events"
    );
    println!(
        "{} events for {CONNECTIONS} connections: {by_backend:?}",
        events.len()
    );

    // Refusals are decisions too: one event per refused connection (its SYN), with the reason.
    const REFUSED: usize = 25;
    refused_connections(topo, REFUSED)?;
    wait_until(Duration::from_secs(20), "the refusals in the trace", || {
        let reported = trace_stats(&socket)?["kernel_events"].as_u64().unwrap_or(0) - off_after;
        // As above: wait for every refusal, not just for the counts to agree at some moment.
        let refused = trace
            .events()
            .iter()
            .filter(|e| e["kind"] == "refused")
            .count();
        Ok(trace.len() as u64 == reported && refused >= REFUSED)
    })?;
    let refusals: Vec<serde_json::Value> = trace
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "refused")
        .collect();
    let mut ports = BTreeSet::new();
    for e in &refusals {
        ensure!(
            e["reason"] == "refused_no_backend" && e["flags"] == "SYN" && e["backend"].is_null(),
            "refusal: {e}"
        );
        ensure!(
            e["service"] == "void.mesh.test",
            "refusal of another service: {e}"
        );
        ensure!(e["service_addr"] == void_vip().to_string(), "refusal: {e}");
        let client: SocketAddr = e["client"].as_str().context("client")?.parse()?;
        ensure!(client.ip().to_string() == CLIENT_V4, "refusal: {e}");
        ports.insert(client.port());
    }
    ensure!(
        refusals.len() == REFUSED && ports.len() == REFUSED,
        "{} refused events on {} client ports for {REFUSED} refused connections",
        refusals.len(),
        ports.len()
    );
    ensure!(
        events.iter().all(|e| e["kind"] != "refused"),
        "a refusal before any connection to void"
    );

    // The trace ends with meshctl: the kernel goes quiet again.
    drop(trace);
    wait_until(Duration::from_secs(10), "the trace to end", || {
        Ok(trace_stats(&socket)?["subscribers"] == 0)
    })?;
    assert_quiet(topo, &socket, 30, "after the trace ended")?;
    // Kernel logging was off: the refusals left no kernel line in meshd's log.
    let lines = kernel_lines(&meshd);
    ensure!(
        lines.is_empty(),
        "kernel log lines with --kernel-log off: {lines:?}"
    );
    drop(meshd);
    Ok(())
}

#[test]
fn kernel_log_debug_writes_each_refusal_to_meshds_log() -> Result<()> {
    let setup = EchoSetup::new(Some([50, 30, 20]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    rules.write("void.yaml", &void_rules())?;
    let mut args = meshd_args(topo, rules);
    args.extend(["--kernel-log".into(), "debug".into()]);
    let mut meshd = Meshd::start(&topo.node, &args)?;
    ensure!(
        meshd.log().contains("kernel log at Debug level"),
        "meshd did not report the kernel log:\n{}",
        meshd.log()
    );
    // Balanced connections pass no log point.
    topo.client.run(|| -> Result<()> {
        for _ in 0..20 {
            tcp_connect(vip(8080))?;
        }
        Ok(())
    })??;
    const REFUSED: usize = 10;
    refused_connections(topo, REFUSED)?;
    let needle = "DEBUG kernel: refused a new flow to service";
    meshd.wait_for_log(needle, 0, Duration::from_secs(20))?;
    wait_until(
        Duration::from_secs(20),
        "one kernel line per refusal",
        || Ok(kernel_lines(&meshd).len() >= REFUSED),
    )?;
    let lines = kernel_lines(&meshd);
    ensure!(
        lines.len() == REFUSED,
        "{REFUSED} refusals, kernel lines: {lines:#?}"
    );
    for line in &lines {
        ensure!(
            line.contains(needle) && line.contains(": no backend"),
            "kernel line: {line}"
        );
    }
    println!("{}", lines[0]);
    drop(meshd);
    Ok(())
}

/// Reads every record of a ring buffer map of `lb`.
fn drain(lb: &mut Lb, map: &str) -> Result<Vec<Vec<u8>>> {
    let mut ring = RingBuf::try_from(lb.ebpf.map_mut(map).context("ring buffer map")?)?;
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(item.to_vec());
    }
    Ok(out)
}

/// Runs `case` on a thread of its own moved into a fresh network namespace.
fn in_fresh_netns(case: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall; affects only this thread, created for this case.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            }
            case()
        })
        .join()
        .expect("case thread")
    })
}

#[test]
fn a_drop_is_traced_with_its_reason_and_logged_in_the_kernel() -> Result<()> {
    for hook in HOOKS {
        for log_level in [LOG_TRACE, LOG_OFF] {
            in_fresh_netns(|| drop_case(hook, log_level))
                .with_context(|| format!("{hook:?} hook, log level {log_level}"))?;
        }
    }
    Ok(())
}

#[test]
fn a_rebuilt_conntrack_direction_is_logged_in_the_kernel() -> Result<()> {
    for hook in HOOKS {
        in_fresh_netns(|| rebuild_case(hook)).with_context(|| format!("{hook:?} hook"))?;
    }
    Ok(())
}

/// An established flow loses its reply-direction entry (as an LRU eviction would); its next
/// request packet after the refresh interval puts it back, counts it and logs it.
fn rebuild_case(hook: Hook) -> Result<()> {
    let mut lb = Lb::load_hook_with(hook, &[(LOG_LEVEL_GLOBAL, LOG_TRACE)])?;
    let (vip, backend): (SocketAddr, SocketAddr) =
        ("198.18.0.10:80".parse()?, "198.19.0.2:8080".parse()?);
    lb.install(&Service {
        id: 3,
        addr: vip,
        proto: PROTO_TCP,
        flags: 0,
        table_offset: 300,
        table_size: 13,
        backends: vec![(30, backend)],
    })?;
    let client: SocketAddr = "198.18.1.1:40000".parse()?;
    let mut ack = Frame::tcp(client, vip);
    ack.l4 = L4::Tcp { syn: false };
    // Handshake: SYN, the backend's answer, the client's ACK confirms the flow.
    for frame in [
        Frame::tcp(client, vip),
        Frame::tcp(backend, client),
        ack.clone(),
    ] {
        lb.run(&frame.build()?)?;
    }
    let reply_key = FlowKey {
        src_addr: addr_bytes(backend.ip()),
        dst_addr: addr_bytes(client.ip()),
        src_port: port_to_wire(backend.port()),
        dst_port: port_to_wire(client.port()),
        proto: PROTO_TCP,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    };
    {
        let mut ct: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(lb.ebpf.map_mut(map_names::CONNTRACK).context("CONNTRACK")?)?;
        ct.get(&reply_key, 0)
            .context("the confirmed flow's reply entry")?;
        ct.remove(&reply_key)?;
    }
    ensure!(
        drain(&mut lb, "AYA_LOGS")?.is_empty(),
        "records before the rebuild"
    );
    // The other direction is checked when the entry's timestamp is refreshed (once a second).
    std::thread::sleep(Duration::from_millis(1100));
    lb.run(&ack.build()?)?;
    let rebuilt: u64 =
        PerCpuArray::<_, u64>::try_from(lb.ebpf.map(map_names::CT_STATS).context("CT_STATS")?)?
            .get(&ct_event::REBUILT, 0)?
            .iter()
            .sum();
    ensure!(rebuilt == 1, "rebuilt counted {rebuilt}");
    let logs: Vec<String> = drain(&mut lb, "AYA_LOGS")?
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    ensure!(
        logs.len() == 1 && logs[0].contains("rebuilt the missing direction"),
        "kernel log records: {logs:?}"
    );
    // And the reply is translated again.
    let (_, out) = lb.run(&Frame::tcp(backend, client).build()?)?;
    ensure!(
        out == Frame::tcp(vip, client).build()?,
        "the reply after the rebuild was not given the service address"
    );
    Ok(())
}

/// aya-log levels: off, and everything on.
const LOG_OFF: u8 = 0;
const LOG_TRACE: u8 = 5;

/// One load of `hook` at `log_level` in a fresh network namespace of its own thread: a service
/// whose Maglev table names no backend drops new flows, one without backends refuses them, one
/// on the L7 proxy passes them.
fn drop_case(hook: Hook, log_level: u8) -> Result<()> {
    let mut lb = Lb::load_hook_with(hook, &[(LOG_LEVEL_GLOBAL, log_level)])?;
    println!(
        "{hook:?}, log level {log_level}: {} instructions processed by the verifier",
        lb.verified_instructions()?
    );
    let vip: SocketAddr = "198.18.0.10:80".parse()?;
    let svc = Service {
        id: 15,
        addr: vip,
        proto: PROTO_TCP,
        flags: 0,
        table_offset: 1500,
        table_size: 13,
        backends: vec![(150, "198.19.0.2:8080".parse()?)],
    };
    lb.install(&svc)?;
    lb.write_maglev(svc.table_offset, &vec![NO_BACKEND; svc.table_size as usize])?;
    let client: SocketAddr = "198.18.1.1:40000".parse()?;
    let mut filter = TraceFilter {
        enabled: 1,
        fields: TRACE_MATCH_CLIENT_ADDR,
        ..Default::default()
    };
    filter.client_addr = addr_bytes(client.ip());
    Array::try_from(lb.ebpf.map_mut(map_names::TRACE_FILTER).context("filter")?)?
        .set(0, filter, 0)?;

    let (verdict, _) = lb.run(&Frame::tcp(client, vip).build()?)?;
    ensure!(verdict == XDP_DROP, "verdict {verdict}");
    // Another client: dropped too, neither traced (the filter) nor logged twice.
    let other: SocketAddr = "198.18.1.7:40000".parse()?;
    let (verdict, _) = lb.run(&Frame::tcp(other, vip).build()?)?;
    ensure!(verdict == XDP_DROP, "verdict {verdict}");
    // A refused flow of the traced client: passed to the stack, traced with its reason.
    let empty = Service {
        id: 16,
        addr: "198.18.0.11:80".parse()?,
        table_size: 0,
        table_offset: 1600,
        backends: Vec::new(),
        ..svc.clone()
    };
    lb.install(&empty)?;
    let (verdict, _) = lb.run(&Frame::tcp(client, empty.addr).build()?)?;
    ensure!(verdict == XDP_PASS, "verdict {verdict}");
    // A service on the L7 proxy: its connection's SYN is traced as passed, the rest is not
    // (the proxy traces each request).
    let proxied = Service {
        id: 17,
        addr: "198.18.0.12:80".parse()?,
        flags: SERVICE_FLAG_L7_PROXY,
        table_offset: 1700,
        ..empty.clone()
    };
    lb.install(&proxied)?;
    let mut ack = Frame::tcp(client, proxied.addr);
    ack.l4 = L4::Tcp { syn: false };
    for frame in [Frame::tcp(client, proxied.addr), ack] {
        let (verdict, _) = lb.run(&frame.build()?)?;
        ensure!(verdict == XDP_PASS, "verdict {verdict}");
    }

    let events: Vec<TraceEvent> = drain(&mut lb, map_names::TRACE_EVENTS)?
        .iter()
        // SAFETY: the kernel wrote whole TraceEvents (length checked).
        .map(|b| {
            assert_eq!(b.len(), std::mem::size_of::<TraceEvent>());
            unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) }
        })
        .collect();
    let got: Vec<(u8, u32, u32)> = events
        .iter()
        .map(|e| (e.kind, u32::from(e.reason), e.service_id))
        .collect();
    ensure!(
        got == [
            (TRACE_UNTRANSLATED, reason::DROP_INTERNAL, 15),
            (TRACE_UNTRANSLATED, reason::REFUSED_NO_BACKEND, 16),
            (TRACE_UNTRANSLATED, reason::PASS_L7_PROXY, 17)
        ],
        "trace events (kind, reason, service): {got:?}"
    );
    let logs = drain(&mut lb, "AYA_LOGS")?;
    let text: Vec<String> = logs
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    let count = |needle: &str| text.iter().filter(|t| t.contains(needle)).count();
    match log_level {
        // Everything on: two drops (error) and one refusal (debug), one record each.
        LOG_TRACE => ensure!(
            count("names a missing") == 2 && count(": no backend") == 1 && logs.len() == 3,
            "kernel log records: {text:?}"
        ),
        _ => ensure!(logs.is_empty(), "{} records with logging off", logs.len()),
    }
    Ok(())
}
