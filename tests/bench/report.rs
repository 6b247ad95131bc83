//! The Markdown report, its machine-readable summary (`summary.json`) and the plots, from the
//! results of every section. Targets are reported (met / not met, with the reason), never
//! asserted.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::json;

use crate::{
    forward::{FwdResult, System},
    l7::{self, L7Result},
    micro::{MicroResult, ScalePoint, SplitObserved},
    plot,
    scale::ApplyPoint,
    split::DisruptionPoint,
    util::f,
};

/// Everything measured (a section that failed carries its error instead).
pub struct Results {
    pub quick: bool,
    pub command: String,
    pub machine: Vec<(String, String)>,
    pub micro: Result<MicroResult, String>,
    pub realistic: Result<crate::realistic::RealisticResult, String>,
    pub trace_cost: Result<crate::trace_cost::TraceCost, String>,
    pub forwarding: Result<Vec<FwdResult>, String>,
    pub scale_packet: Result<Vec<ScalePoint>, String>,
    pub scale_apply: Vec<ApplyPoint>,
    pub new_conn: Vec<crate::newconn::NewConnRow>,
    pub l7: Result<L7Result, String>,
    pub split: Result<Vec<SplitObserved>, String>,
    pub disruption: Vec<DisruptionPoint>,
    pub elapsed_s: f64,
}

/// Headings every report has (the quick test checks them).
pub const SECTIONS: [&str; 7] = [
    "## Summary against the targets",
    "## 1. Per-packet cost of the XDP program",
    "## 2. Forwarding through the node",
    "## 3. Scale: number of services",
    "## 4. L7",
    "## 5. Split quality",
    "## Method and caveats",
];

fn yes(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

fn fwd(r: &[FwdResult], s: System) -> Option<&FwdResult> {
    r.iter().find(|x| x.system == s && x.skipped.is_none())
}

/// Headline numbers (also `summary.json`): NaN / None when not measured.
struct Headline {
    est_hot_ns: Option<f64>,
    est_single_net_ns: Option<f64>,
    new_flow_net_ns: Option<f64>,
    /// mesh's native XDP path against the peers (delivered pps, and per node core).
    mesh_vs_nft: Option<f64>,
    mesh_vs_ipt: Option<f64>,
    mesh_vs_nft_core: Option<f64>,
    mesh_vs_ipt_core: Option<f64>,
    /// mesh's TC path (the container-host default) against the peers, per node core.
    tc_vs_nft_core: Option<f64>,
    tc_vs_ipt_core: Option<f64>,
    /// Both paths against nftables with a flowtable, per node core.
    xdp_vs_ft_core: Option<f64>,
    tc_vs_ft_core: Option<f64>,
    scale_ratio: Option<f64>,
    scale_max_n: Option<usize>,
    weight_error: Option<f64>,
    disruption_excess: Option<f64>,
}

/// The node's share of CPU time per delivered packet: the system's total minus the baseline's.
fn node_ns(rs: &[FwdResult], x: &FwdResult) -> Option<f64> {
    let base = fwd(rs, System::Null)?;
    finite(x.ns_per_packet - base.ns_per_packet).filter(|v| *v > 0.0)
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn headline(r: &Results) -> Headline {
    let case = |name: &str| {
        r.micro
            .as_ref()
            .ok()
            .and_then(|m| m.cases.iter().find(|c| c.name == name).cloned())
    };
    let est = case("established flow IPv4");
    let new = case("new flow IPv4 (conntrack miss)");
    let ratio = |a: System, b: System, per_core: bool| {
        let rs = r.forwarding.as_ref().ok()?;
        let (x, y) = (fwd(rs, a)?, fwd(rs, b)?);
        if per_core {
            finite(node_ns(rs, y)? / node_ns(rs, x)?)
        } else {
            finite(x.delivered_pps / y.delivered_pps)
        }
    };
    let (scale_ratio, scale_max_n) = match r.scale_packet.as_ref().ok() {
        Some(p) if p.len() >= 2 => {
            let first = &p[0];
            let last = &p[p.len() - 1];
            (
                finite(last.new_flow_net_ns / first.new_flow_net_ns),
                Some(last.services),
            )
        }
        _ => (None, None),
    };
    Headline {
        est_hot_ns: est.as_ref().and_then(|c| finite(c.hot_ns)),
        est_single_net_ns: est.as_ref().and_then(|c| finite(c.single_net_ns)),
        new_flow_net_ns: new.as_ref().and_then(|c| finite(c.single_net_ns)),
        mesh_vs_nft: ratio(System::MeshXdp, System::Nftables, false),
        mesh_vs_ipt: ratio(System::MeshXdp, System::Iptables, false),
        mesh_vs_nft_core: ratio(System::MeshXdp, System::Nftables, true),
        mesh_vs_ipt_core: ratio(System::MeshXdp, System::Iptables, true),
        tc_vs_nft_core: ratio(System::MeshTc, System::Nftables, true),
        tc_vs_ipt_core: ratio(System::MeshTc, System::Iptables, true),
        xdp_vs_ft_core: ratio(System::MeshXdp, System::NftFlowtable, true),
        tc_vs_ft_core: ratio(System::MeshTc, System::NftFlowtable, true),
        scale_ratio,
        scale_max_n,
        weight_error: r.split.as_ref().ok().and_then(|s| {
            s.iter()
                .map(|x| (x.observed_share_a - 80.0).abs())
                .reduce(f64::max)
        }),
        // The target is about what meshd does by default (no tableSize in the rules).
        disruption_excess: r
            .disruption
            .iter()
            .filter(|d| d.is_default)
            .map(|d| d.moved_pct - d.ideal_pct)
            .reduce(f64::max),
    }
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map(|x| f(x, d)).unwrap_or_else(|| "n/a".into())
}

/// Writes report.md, summary.json and the PNGs into `out`; returns the Markdown.
pub fn write(r: &Results, out: &Path) -> Result<String> {
    std::fs::create_dir_all(out)?;
    let text = plot::init_font();
    let mut plots_note = Vec::new();
    let h = headline(r);
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# mesh benchmark report\n");
    let _ = writeln!(
        w,
        "Mode: **{}**. Command: `{}`. Took {:.0} s.\n",
        if r.quick {
            "quick (small counts: a smoke run, not numbers to quote)"
        } else {
            "full"
        },
        r.command,
        r.elapsed_s
    );
    let _ = writeln!(w, "| machine | |\n|---|---|");
    for (k, v) in &r.machine {
        let _ = writeln!(w, "| {k} | {v} |");
    }
    let _ = writeln!(
        w,
        "\nA 2-core VM shared with other work is noisy: every figure is a median of repeated runs, \
         and comparisons are ratios to peers measured in the same run.\n"
    );

    // Targets.
    let _ = writeln!(w, "{}\n", SECTIONS[0]);
    let _ = writeln!(w, "| target | measured | verdict |\n|---|---|---|");
    let _ = writeln!(
        w,
        "| established-flow XDP packet <= 100 ns | {} ns (hot loop); {} ns net (single run) | {} |",
        opt(h.est_hot_ns, 0),
        opt(h.est_single_net_ns, 0),
        yes(h.est_hot_ns.map(|v| v <= 100.0))
    );
    let real = |p: &str| opt(crate::realistic::net_ns(&r.realistic, p), 0);
    let _ = writeln!(
        w,
        "| established flow on a realistic table (random of {} live flows, forwarded) <= 100 ns | XDP {} ns net, TC {} ns net; a new flow (SYN) {} ns net | {} |",
        r.realistic.as_ref().map(|m| m.flows.to_string()).unwrap_or_else(|_| "N".into()),
        real("established flow, random of the table (XDP)"),
        real("established flow, random of the table (TC"),
        real("new flow"),
        yes(crate::realistic::net_ns(&r.realistic, "established flow, random of the table (XDP)").map(|v| v <= 100.0))
    );
    let _ = writeln!(
        w,
        "| XDP forwarding >= 3x nftables DNAT | {}x per node core ({}x delivered pps) | {} |",
        opt(h.mesh_vs_nft_core, 2),
        opt(h.mesh_vs_nft, 2),
        yes(h.mesh_vs_nft_core.map(|v| v >= 3.0))
    );
    let _ = writeln!(
        w,
        "| XDP forwarding >= 3x iptables DNAT | {}x per node core ({}x delivered pps) | {} |",
        opt(h.mesh_vs_ipt_core, 2),
        opt(h.mesh_vs_ipt, 2),
        yes(h.mesh_vs_ipt_core.map(|v| v >= 3.0))
    );
    let _ = writeln!(
        w,
        "| TC forwarding (default veths) >= 1.5x nftables DNAT per node core | {}x (iptables: {}x) | {} |",
        opt(h.tc_vs_nft_core, 2),
        opt(h.tc_vs_ipt_core, 2),
        yes(h.tc_vs_nft_core.map(|v| v >= 1.5))
    );
    let _ = writeln!(
        w,
        "| (no target) against nftables DNAT with a flowtable, per node core | XDP {}x, TC {}x | n/a |",
        opt(h.xdp_vs_ft_core, 2),
        opt(h.tc_vs_ft_core, 2)
    );
    let _ = writeln!(
        w,
        "| per-packet cost at {} services within 10% of 1 service | {}x (new flow to a random service) | {} |",
        h.scale_max_n.map(|n| n.to_string()).unwrap_or_else(|| "N".into()),
        opt(h.scale_ratio, 3),
        yes(h.scale_ratio.map(|v| v <= 1.10))
    );
    let _ = writeln!(
        w,
        "| weight error <= 1 point (80/20) | {} points (worst table size) | {} |",
        opt(h.weight_error, 2),
        yes(h.weight_error.map(|v| v <= 1.0))
    );
    l7::summary_rows(w, &r.l7);
    let _ = writeln!(
        w,
        "| disruption <= 1/N + 1 point (N = 2..100) | worst excess over 1/N: {} points (default table sizes) | {} |\n",
        opt(h.disruption_excess, 2),
        yes(h.disruption_excess.map(|v| v <= 1.0))
    );

    // 1.
    let _ = writeln!(w, "{} (BPF_PROG_TEST_RUN)\n", SECTIONS[1]);
    match &r.micro {
        Ok(m) => {
            let _ = writeln!(
                w,
                "JIT: `net.core.bpf_jit_enable = {}`. Hot loop: {} rounds of {} repeats per case \
                 (median of rounds). Single run: {} calls per case, interleaved call by call, one \
                 fresh frame per call, kernel-measured duration; *net* = minus the empty \
                 program's single-run median (the test-run overhead). Mpps per core = 1000 / ns.\n",
                m.jit, m.hot_rounds, m.hot_repeat, m.single_runs
            );
            let _ = writeln!(
                w,
                "| case | hot loop ns/pkt | hot loop Mpps/core | single run median ns (raw) | p90 ns (raw) | single run net ns | net Mpps/core |\n|---|---|---|---|---|---|---|"
            );
            for c in &m.cases {
                let mpps = |ns: f64| {
                    if ns > 0.0 {
                        f(1000.0 / ns, 1)
                    } else {
                        "n/a".into()
                    }
                };
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    c.name,
                    f(c.hot_ns, 0),
                    if c.hot_ns.is_finite() {
                        mpps(c.hot_ns)
                    } else {
                        "n/a".into()
                    },
                    f(c.single_ns, 0),
                    f(c.single_p90, 0),
                    f(c.single_net_ns, 0),
                    if c.name.starts_with("empty") {
                        "n/a".into()
                    } else {
                        mpps(c.single_net_ns)
                    }
                );
            }
            let _ = writeln!(
                w,
                "\nHot loop n/a for new flows: the kernel re-runs the program on the same buffer, \
                 so only frames the program leaves unchanged can be looped (see Method).\n"
            );
        }
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
        }
    }
    let _ = writeln!(w, "{}", crate::realistic::markdown(&r.realistic));
    let _ = writeln!(w, "{}", crate::trace_cost::markdown(&r.trace_cost));

    // 2.
    let _ = writeln!(w, "{}\n", SECTIONS[2]);
    match &r.forwarding {
        Ok(rs) => {
            let _ = writeln!(
                w,
                "Generator -> node -> 2 backends, 80/20 split, 60-byte UDP frames with real \
                 checksums from 4096 source ports to one VIP. Same generator, same frames, same \
                 pinning for every system; everything runs on CPU 0 in a closed loop (see \
                 Method). *CPU ns per packet* = measured CPU time / delivered packets, where CPU \
                 time = the generator thread's own CPU time (the scheduler's figure, which \
                 includes the softirq work run in its context) plus the CPU time of the \
                 `ksoftirqd`/`napi` kernel threads over the same interval; *wall ns* = interval / \
                 delivered, for comparison. *Node ns per packet* = CPU ns minus the baseline's \
                 (generator only, frames dropped at the node's ingress): the node's forwarding \
                 cost including the veth hop to the backend and the backend's counter; *node \
                 Mpps per core* = 1000 / node ns. Medians of the measured intervals.\n"
            );
            let _ = writeln!(
                w,
                "| system | offered pps | delivered pps | loss % | CPU 0 busy % (/proc/stat) | wall ns per packet | CPU ns per packet | node ns per packet | node Mpps per core | share at backend A % | setup |\n|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for x in rs {
                match &x.skipped {
                    Some(why) => {
                        let _ = writeln!(
                            w,
                            "| {} | skipped | | | | | | | | | {} |",
                            x.system.label(),
                            why.replace('\n', " ").replace('|', "/")
                        );
                    }
                    None => {
                        let node = node_ns(rs, x);
                        let _ = writeln!(
                            w,
                            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                            x.system.label(),
                            f(x.offered_pps, 0),
                            f(x.delivered_pps, 0),
                            f(x.loss_pct, 1),
                            f(x.node_cpu_pct, 0),
                            f(x.wall_ns_per_packet, 0),
                            f(x.ns_per_packet, 0),
                            if x.system == System::Null {
                                "0 (baseline)".into()
                            } else {
                                opt(node, 0)
                            },
                            if x.system == System::Null {
                                "n/a".into()
                            } else {
                                opt(node.map(|n| 1000.0 / n), 2)
                            },
                            if x.system == System::Null {
                                "n/a".into()
                            } else {
                                f(x.share_a_pct, 2)
                            },
                            x.note
                        );
                    }
                }
            }
            let _ = writeln!(
                w,
                "\nRatios: mesh XDP/nftables = {}x per node core, {}x delivered; mesh XDP/iptables \
                 = {}x per node core, {}x delivered; mesh TC/nftables = {}x per node core; mesh \
                 TC/iptables = {}x per node core; against nftables with a flowtable: mesh XDP {}x, \
                 mesh TC {}x per node core.\n",
                opt(h.mesh_vs_nft_core, 2),
                opt(h.mesh_vs_nft, 2),
                opt(h.mesh_vs_ipt_core, 2),
                opt(h.mesh_vs_ipt, 2),
                opt(h.tc_vs_nft_core, 2),
                opt(h.tc_vs_ipt_core, 2),
                opt(h.xdp_vs_ft_core, 2),
                opt(h.tc_vs_ft_core, 2)
            );
            let cats: Vec<String> = rs.iter().map(|x| x.system.short().to_string()).collect();
            let path = out.join("pps_per_system.png");
            match plot::bars(
                &path,
                text,
                "Forwarding: packets/s per system",
                "packets/s",
                &cats,
                &[
                    (
                        "delivered pps".into(),
                        rs.iter().map(|x| x.delivered_pps).collect(),
                    ),
                    (
                        "node packets/s per core".into(),
                        rs.iter()
                            .map(|x| node_ns(rs, x).map(|n| 1e9 / n).unwrap_or(f64::NAN))
                            .collect(),
                    ),
                ],
            ) {
                Ok(()) => {
                    let _ = writeln!(
                        w,
                        "Plot: `pps_per_system.png` (groups left to right: {}; blue = delivered \
                         pps, red = node packets/s per core, i.e. 1e9 / node ns per packet; none for the baseline).\n",
                        cats.join(", ")
                    );
                }
                Err(e) => plots_note.push(format!("pps_per_system.png: {e:#}")),
            }
        }
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
        }
    }

    // 3.
    let _ = writeln!(w, "{}\n", SECTIONS[3]);
    let _ = writeln!(
        w,
        "Per packet: N UDP services with 2 backends and a 251-entry Maglev slice each, written \
         into the maps directly; each single-run call is a new flow (connection-table miss) to a \
         service drawn at random among N, so the service lookup and Maglev read are on a \
         different entry each time; net of the empty program. Established flows never look up \
         services (connection table first), so their cost does not depend on N.\n"
    );
    match &r.scale_packet {
        Ok(ps) => {
            let _ = writeln!(
                w,
                "| services | new flow net ns (median) | p90 net ns | vs 1 service | non-service packet net ns | map fill s |\n|---|---|---|---|---|---|"
            );
            let base = ps.first().map(|p| p.new_flow_net_ns).unwrap_or(f64::NAN);
            for p in ps {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} |",
                    p.services,
                    f(p.new_flow_net_ns, 0),
                    f(p.new_flow_p90_net_ns, 0),
                    f(p.new_flow_net_ns / base, 3),
                    f(p.miss_net_ns, 0),
                    f(p.fill_s, 2)
                );
            }
            let path = out.join("cost_vs_services.png");
            let series = [
                plot::Series {
                    name: "new flow, net ns".into(),
                    points: ps
                        .iter()
                        .map(|p| (p.services as f64, p.new_flow_net_ns))
                        .collect(),
                    dashed: false,
                },
                plot::Series {
                    name: "non-service packet, net ns".into(),
                    points: ps
                        .iter()
                        .map(|p| (p.services as f64, p.miss_net_ns))
                        .collect(),
                    dashed: false,
                },
            ];
            match plot::lines(
                &path,
                text,
                "Per-packet cost vs number of services",
                "services (log)",
                "ns per packet",
                true,
                &series,
            ) {
                Ok(()) => {
                    let _ = writeln!(
                        w,
                        "\nPlot: `cost_vs_services.png` (x: services, log scale; y: ns; blue = \
                         new flow, red = non-service packet).\n"
                    );
                }
                Err(e) => plots_note.push(format!("cost_vs_services.png: {e:#}")),
            }
        }
        Err(e) => {
            let _ = writeln!(w, "Per packet not measured: {e}\n");
        }
    }
    let _ = writeln!(
        w,
        "Control plane, through meshd with default settings (no `maglev.tableSize`, no pool \
         flag): `meshctl apply` of N ServiceEntries (two endpoints, one VIP each, no \
         DestinationRule) on a running empty meshd; then `meshctl apply` of one changed \
         ServiceEntry (median of 5; wall time until meshctl returns: the rules are in force); \
         the maps' kernel memory from `meshctl status`; then meshd stopped and started again on \
         its pins and state file (wall time from start to `meshd ready`, the admin API \
         answering), with the number of services that start rewrote.\n"
    );
    let _ = writeln!(
        w,
        "| services | YAML KiB | apply whole set s | apply one change ms | services written by the change | restart to ready s | services rewritten at restart | Maglev entries | map memory MiB | note |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let opt = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
    for p in &r.scale_apply {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.services,
            p.yaml_bytes / 1024,
            f(p.apply_all_s, 3),
            f(p.apply_one_s * 1e3, 1),
            opt(p.one_written),
            f(p.restart_s, 3),
            opt(p.restart_written),
            p.maglev_entries,
            f(p.map_memory_bytes as f64 / 1048576.0, 1),
            p.error
                .clone()
                .unwrap_or_default()
                .replace('\n', " ")
                .replace('|', "/")
        );
    }
    if let Some(p) = r.scale_apply.iter().rfind(|p| p.error.is_none()) {
        let verdict = |ok: bool| if ok { "met" } else { "not met" };
        let _ = writeln!(
            w,
            "\nAt {} services: the whole set applied in {} s (target 2 s: {}), one change in {} ms \
             (target 10 ms: {}), restart ready in {} s (target 1 s: {}), with {} services \
             rewritten at restart.\n",
            p.services,
            f(p.apply_all_s, 2),
            verdict(p.apply_all_s <= 2.0),
            f(p.apply_one_s * 1e3, 1),
            verdict(p.apply_one_s <= 0.010),
            f(p.restart_s, 2),
            verdict(p.restart_s <= 1.0),
            opt(p.restart_written)
        );
    }
    let _ = writeln!(
        w,
        "\nNew connections, through the node: from the client namespace, sequential TCP \
         connections (connect, read the backend's identity, close) to the last of N services \
         (2 backends each), for mesh (meshd, N ServiceEntries; the client is a pod behind a \
         default veth, served by the TC program `--attach auto` puts there), mesh-node (the same, the client \
         on the node itself: meshd's socket hooks choose at connect(), no per-packet work after), \
         nftables (service map of N -> numgen -> dnat) and iptables (N rules in KUBE-SERVICES, the target last). Rate: median \
         of 3 rounds; connect latency: SYN to SYN-ACK through the node, over all rounds. Client and \
         backend servers run pinned to CPU 0 (unpinned, the rate swings 3x with thread placement).\n"
    );
    let _ = writeln!(
        w,
        "| N | system | connections/s | mesh / this | connect p50 µs | connect p99 µs | note |\n\
         |---|---|---|---|---|---|---|"
    );
    for x in &r.new_conn {
        let mesh = r
            .new_conn
            .iter()
            .find(|m| m.services == x.services && m.system == "mesh")
            .map_or(f64::NAN, |m| m.conn_per_s);
        let note = match &x.error {
            Some(e) => format!("n/a ({e})"),
            None => x.note.clone(),
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            x.services,
            x.system,
            f(x.conn_per_s, 0),
            f(mesh / x.conn_per_s, 2),
            f(x.connect_p50_us, 1),
            f(x.connect_p99_us, 1),
            note.replace('\n', " ").replace('|', "/")
        );
    }
    let _ = writeln!(w);

    // 4.
    let _ = writeln!(w, "{}\n", SECTIONS[4]);
    l7::write_section(w, &r.l7, out, text, &mut plots_note);

    // 5.
    let _ = writeln!(w, "{}\n", SECTIONS[5]);
    match &r.split {
        Ok(s) => {
            let _ = writeln!(
                w,
                "mesh: new flows from random client addresses and ports through `mesh_xdp` \
                 (BPF_PROG_TEST_RUN) over a weighted Maglev table built by meshd's own builder \
                 (`compile::maglev::build_table`, 80/20), counted by the program's per-backend \
                 connection counters.\n"
            );
            let _ = writeln!(
                w,
                "| table size M | flows | table share A % | observed share A % | error points |\n|---|---|---|---|---|"
            );
            for x in s {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} |",
                    x.table_size,
                    x.flows,
                    f(x.table_share_a, 2),
                    f(x.observed_share_a, 2),
                    f((x.observed_share_a - 80.0).abs(), 2)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(w, "mesh split not measured: {e}");
        }
    }
    if let Ok(rs) = &r.forwarding {
        let _ = writeln!(
            w,
            "\nIn the forwarding run (packets over 4096 round-robin flows, so packet share = \
             flow share): {}.\n",
            rs.iter()
                .filter(
                    |x| x.skipped.is_none() && !matches!(x.system, System::Routing | System::Null)
                )
                .map(|x| format!(
                    "{} {}% at A (error {} points)",
                    x.system.short(),
                    f(x.share_a_pct, 2),
                    f((x.share_a_pct - 80.0).abs(), 2)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let _ = writeln!(
        w,
        "Disruption: equal weights, the middle one of N backends removed, Maglev tables compared \
         slot by slot (= share of all flows that move, for a uniform hash). Ideal: 1/N. The first \
         rows use the table size meshd picks when the rules set none (`default_table_size`: the \
         smallest listed prime with at least 100 slots per backend: 101, 211, 307, ...); the \
         others are fixed sizes for comparison (15013 is what `tableSize` needs for the 1-point \
         bound).\n"
    );
    let _ = writeln!(
        w,
        "| N | table size | default for N | flows moved % | ideal 1/N % | excess points |\n|---|---|---|---|---|---|"
    );
    for d in &r.disruption {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            d.backends,
            d.table_size,
            if d.is_default { "yes" } else { "no" },
            f(d.moved_pct, 2),
            f(d.ideal_pct, 2),
            f(d.moved_pct - d.ideal_pct, 2)
        );
    }
    let series = [
        plot::Series {
            name: "moved % (default table size)".into(),
            points: r
                .disruption
                .iter()
                .filter(|d| d.is_default)
                .map(|d| (d.backends as f64, d.moved_pct))
                .collect(),
            dashed: false,
        },
        plot::Series {
            name: "ideal 1/N %".into(),
            points: r
                .disruption
                .iter()
                .filter(|d| d.is_default)
                .map(|d| (d.backends as f64, d.ideal_pct))
                .collect(),
            dashed: true,
        },
    ];
    match plot::lines(
        &out.join("disruption_vs_n.png"),
        text,
        "Flows moved when 1 of N backends is removed",
        "backends N (log)",
        "% of flows moved",
        true,
        &series,
    ) {
        Ok(()) => {
            let _ = writeln!(
                w,
                "\nPlot: `disruption_vs_n.png` (x: N, log scale; y: % of flows moved; blue = \
                 measured, red thin = ideal 1/N).\n"
            );
        }
        Err(e) => plots_note.push(format!("disruption_vs_n.png: {e:#}")),
    }

    let _ = writeln!(w, "{}\n", SECTIONS[6]);
    let _ = writeln!(w, "{}", METHOD);
    let _ = writeln!(
        w,
        "- Plots: PNG via plotters' bitmap backend without fontconfig/freetype; text {}.",
        if text {
            "drawn with a TrueType file found under /usr/share/fonts (ab_glyph)"
        } else {
            "omitted (no TrueType file found): the captions above name axes and series"
        }
    );
    for p in &plots_note {
        let _ = writeln!(w, "- Plot not drawn: {p}");
    }
    std::fs::write(out.join("report.md"), &md)?;

    let mut summary = json!({
        "quick": r.quick,
        "established_hot_ns": h.est_hot_ns,
        "established_single_net_ns": h.est_single_net_ns,
        "new_flow_single_net_ns": h.new_flow_net_ns,
        "mesh_vs_nftables_per_core": h.mesh_vs_nft_core,
        "mesh_vs_iptables_per_core": h.mesh_vs_ipt_core,
        "mesh_vs_nftables_delivered": h.mesh_vs_nft,
        "mesh_vs_iptables_delivered": h.mesh_vs_ipt,
        "mesh_tc_vs_nftables_per_core": h.tc_vs_nft_core,
        "mesh_tc_vs_iptables_per_core": h.tc_vs_ipt_core,
        "mesh_xdp_vs_nft_flowtable_per_core": h.xdp_vs_ft_core,
        "mesh_tc_vs_nft_flowtable_per_core": h.tc_vs_ft_core,
        "realistic_established_xdp_net_ns": crate::realistic::net_ns(&r.realistic, "established flow, random of the table (XDP)"),
        "realistic_new_flow_net_ns": crate::realistic::net_ns(&r.realistic, "new flow"),
        "scale_cost_ratio_largest_vs_1": h.scale_ratio,
        "weight_error_points": h.weight_error,
        "disruption_max_excess_points": h.disruption_excess,
    });
    for (key, value) in l7::summary_json(&r.l7) {
        summary[key] = json!(value);
    }
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(md)
}

const METHOD: &str = "\
- Section 1 runs in a fresh, empty network namespace, so the program's FIB lookup fails and \
translated frames come back as XDP_PASS with reason `pass_fib_other`: the figures include the FIB \
lookup but not the redirect itself (that is in section 2).
- Hot loop: BPF_PROG_TEST_RUN re-runs the program on the same buffer, keeping its writes. The \
established and reply cases therefore use a self-mapped service (its backend is the VIP itself): \
connection-table hit, rewrite with full checksum arithmetic, counters and FIB lookup all run, and \
the frame stays byte-identical; each round checks that every repeat took the intended path \
(reason counters). New flows cannot be looped; they are measured as single runs, each call a \
flow never seen before (fresh source address/port): a real connection-table miss, service lookup, \
Maglev read and two LRU inserts.
- Single run: one call per packet with `repeat = 1`; the kernel's duration includes fixed \
test-run overhead (timer reads, bh disable), measured with the empty `mesh_xdp_pass` program \
interleaved call by call and subtracted (*net*).
- Section 2 generator: the benchmark's own XDP program run with BPF_PROG_TEST_RUN in \
live-frames mode (as xdp-trafficgen does), returning XDP_TX out of the generator's veth; it \
rewrites the 42 header bytes of every frame (the kernel recycles live frames without restoring \
what the forwarder changed: without this, NATed destinations and decremented TTLs came back) and \
cycles the UDP source port over 4096 values. xdp-trafficgen itself only generates IPv6 UDP with \
hop limit 1 (not routable through a node); trafgen goes through AF_PACKET and costs about as much \
per frame as the forwarders. Delivered packets are counted by a counting-and-dropping XDP program \
on each backend veth (which also gives the veth the NAPI context that redirected frames need).
- Section 2 is a closed loop on one core: veth runs the receiver's NAPI on the transmitting CPU, \
so generator, node and backends share CPU 0 and the generator cannot outrun the node; the \
node's cost per packet is isolated by subtracting the baseline (same generator, frames dropped \
by XDP at the node's ingress). Ratios compare these node costs. Loss is reported but is expected \
near zero. An open-loop design (node NAPI threaded and pinned to CPU 1) was tried first and \
rejected: its NAPI thread stayed mostly idle while the veth ring overflowed, so it measured \
wake-up latency, not forwarding. Other work on this shared 2-core machine adds noise; medians help.
- Section 2 peers: a fresh topology per system (no conntrack hooks or rules left from another); \
nftables and iptables rule shapes follow kube-proxy (service map/chain -> random endpoint choice \
-> DNAT chain); the routing ceiling sends the same frames to backend A by a host route.
- Section 3 control plane goes through the real meshd and meshctl; section 3 per-packet fills the \
maps directly (so it measures the data plane only).
- Section 4 runs real processes: meshd (release build, access log off), Envoy, nginx and \
HAProxy, each pinned to CPU 1 with every thread, against the same hyper backends; load \
generators and backends on CPU 0. Closed-loop requests/s are limited by whichever core saturates \
first (often both are 100% busy), so the per-core comparison divides by the proxy processes' own \
CPU time. The fixed-rate latencies include the scheduling noise of a shared 2-core VM (the \
*sent late* column counts requests whose connection was still busy at their scheduled time).
- Section 5 disruption compares whole tables; the weight error is measured through the kernel \
program with random flows.";
