//! `mesh-bench --quick` (what `cargo xtask bench --quick` runs) produces a complete report:
//! every section present, the summary's numbers parse, the plots exist. Never asserts on speed.

use std::process::Command;

#[test]
fn quick_bench_writes_a_complete_report() {
    let out = std::env::temp_dir().join(format!("mesh-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["--quick", "--out"])
        .arg(&out)
        .output()
        .expect("running mesh-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "mesh-bench --quick failed:\n{stderr}");

    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    for heading in [
        "## Summary against the targets",
        "## 1. Per-packet cost of the XDP program",
        "## 2. Forwarding through the node",
        "## 3. Scale: number of services",
        "## 4. L7",
        "## 5. Split quality",
        "## Method and caveats",
    ] {
        assert!(
            report.contains(heading),
            "missing {heading:?} in:\n{report}"
        );
    }
    // Section 4: mesh's proxy is always measured (the peers only when already installed: quick
    // mode installs nothing); its keep-alive and fixed-rate rows carry numbers.
    let l7 = report
        .split("## 4. L7")
        .nth(1)
        .and_then(|s| s.split("## 5. Split quality").next())
        .expect("section 4");
    let mesh_rows: Vec<&str> = l7.lines().filter(|l| l.starts_with("| mesh |")).collect();
    // Keep-alive, close and fixed-rate rows, and instructions per request when perf is there.
    assert!(
        mesh_rows.len() >= 3,
        "keep-alive, close, fixed-rate rows:\n{l7}"
    );
    for row in &mesh_rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let v: f64 = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("{:?} in {row:?} is not a number", cells[2]));
        assert!(v > 0.0, "{row}");
    }

    // Section 1's table: every hot-loop figure of the established flow parses as a number.
    let row = report
        .lines()
        .find(|l| l.starts_with("| established flow IPv4 |"))
        .unwrap_or_else(|| panic!("no established-flow row in:\n{report}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    for cell in &cells[2..=4] {
        cell.parse::<f64>()
            .unwrap_or_else(|_| panic!("{cell:?} in {row:?} is not a number"));
    }

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).expect("summary.json"),
    )
    .expect("summary.json parses");
    let map = summary.as_object().expect("summary is an object");
    for key in [
        "established_hot_ns",
        "new_flow_single_net_ns",
        "mesh_vs_nftables_per_core",
        "mesh_vs_iptables_per_core",
        "scale_cost_ratio_largest_vs_1",
        "weight_error_points",
        "disruption_max_excess_points",
        "l7_mesh_keepalive_rps",
        "l7_mesh_p99_us",
        "l7_mesh_vs_envoy_keepalive_per_core",
        "l7_mesh_vs_nginx_keepalive_per_core",
        "l7_p99_mesh_vs_envoy",
        "l7_p99_mesh_vs_nginx",
    ] {
        let v = map
            .get(key)
            .unwrap_or_else(|| panic!("summary lacks {key}"));
        // null = not measured (e.g. a peer could not be installed); otherwise a finite number.
        assert!(
            v.is_null() || v.as_f64().is_some_and(f64::is_finite),
            "{key} = {v}"
        );
    }
    for key in [
        "established_hot_ns",
        "weight_error_points",
        "disruption_max_excess_points",
        "l7_mesh_keepalive_rps",
        "l7_mesh_p99_us",
    ] {
        assert!(
            map[key].is_f64(),
            "{key} must always be measured: {}",
            map[key]
        );
    }
    for png in [
        "cost_vs_services.png",
        "disruption_vs_n.png",
        "pps_per_system.png",
        "l7_latency.png",
        "l7_rps.png",
    ] {
        assert!(out.join(png).exists(), "{png} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}
