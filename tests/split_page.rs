//! The live split page in a real browser: headless Chromium (inside the node's namespace, where
//! meshd's metrics listener is) loads the page, traffic shifts from all-v1 to 50/50 v1/v3 through
//! `meshctl apply`, the page follows over server-sent events, and the shares it shows match what
//! the clients saw. A screenshot goes to target/split-page/. Afterwards `meshctl stats -o json`,
//! the page's `/api/stats` and Prometheus' `/metrics` give the same per-subset connection counts,
//! equal to the clients'.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    browser::Browser,
    meshd::{meshctl, meshctl_stdin, metric_value, scrape_metrics, Meshd},
    observe::wait_until,
    rules::{echo_split, meshd_args},
    split,
    traffic::{tcp_split, vip, EchoSetup},
};
use serde_json::Value;

/// What the page shows, read from its DOM.
const READ_DOM: &str = r#"JSON.stringify({
  updates: Number((document.body && document.body.dataset.updates) || 0),
  rows: [...document.querySelectorAll("tr.subset")].map(tr => ({
    endpoint: tr.dataset.endpoint, subset: tr.dataset.subset,
    count: Number(tr.dataset.count), total: Number(tr.dataset.total),
    configured: Number(tr.dataset.configured),
    shown: tr.querySelector(".observed").textContent }))
})"#;

fn read_page(browser: &mut Browser) -> Result<Value> {
    let text = browser.eval(READ_DOM)?;
    Ok(serde_json::from_str(text.as_str().context("DOM as JSON")?)?)
}

fn rows_of(page: &Value, endpoint: &str) -> Vec<Value> {
    page["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["endpoint"] == endpoint)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_page_shows_the_split_clients_see_while_it_shifts() -> Result<()> {
    let setup = EchoSetup::new(Some([100, 0, 0]))?;
    let (topo, rules) = (&setup.topo, &setup.rules);
    // The split lives in the meshctl layer so it can be shifted with `meshctl apply`.
    std::fs::remove_file(format!("{}/vs.yaml", rules.path()))?;
    let _meshd = Meshd::start(&topo.node, &meshd_args(topo, rules))?;
    let socket = rules.socket();
    let apply = |weights: [u32; 3]| -> Result<()> {
        let (ok, out, err) = meshctl_stdin(&socket, &["apply", "-f", "-"], &echo_split(weights))?;
        ensure!(ok, "meshctl apply failed: {out}{err}");
        Ok(())
    };
    apply([100, 0, 0])?;

    let mut browser = Browser::start(&topo.node)?;
    browser.navigate("http://127.0.0.1:9464/")?;
    let endpoint = vip(8080).to_string();
    wait_until(Duration::from_secs(30), "the page's first sample", || {
        Ok(!rows_of(&read_page(&mut browser)?, &endpoint).is_empty())
    })?;
    let updates_before = read_page(&mut browser)?["updates"].as_u64().unwrap_or(0);

    // Traffic while the page watches: all on v1, then shifted to 50/50 v1/v3.
    let mut seen: BTreeMap<String, usize> = tcp_split(&topo.client, vip(8080), 150)?;
    apply([50, 0, 50])?;
    const SHIFTED: usize = 600;
    let after = tcp_split(&topo.client, vip(8080), SHIFTED)?;
    for (k, v) in &after {
        *seen.entry(k.clone()).or_insert(0) += v;
    }
    let total: usize = seen.values().sum();

    // The page catches up live (no reload) to everything the clients did.
    wait_until(
        Duration::from_secs(30),
        "the page to show every connection",
        || {
            let page = read_page(&mut browser)?;
            Ok(rows_of(&page, &endpoint)
                .first()
                .is_some_and(|r| r["total"].as_u64() == Some(total as u64)))
        },
    )?;
    let page = read_page(&mut browser)?;
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/split-page/shifted.png");
    browser.screenshot(&shot)?;
    println!("screenshot: {}", shot.display());
    ensure!(
        page["updates"].as_u64().unwrap_or(0) > updates_before,
        "the page did not update live: {page}"
    );

    let rows = rows_of(&page, &endpoint);
    for row in &rows {
        let subset = row["subset"].as_str().context("subset")?;
        let clients = *seen.get(subset).unwrap_or(&0) as f64 / total as f64;
        // The page's counters are the kernel's, so its share is the clients' exactly, up to the
        // one decimal it prints.
        let shown: f64 = row["shown"]
            .as_str()
            .context("shown")?
            .trim_end_matches('%')
            .parse::<f64>()
            .with_context(|| format!("share cell of {subset}: {row}"))?
            / 100.0;
        ensure!(
            (shown - clients).abs() <= 0.0005 + 1e-9,
            "{subset}: page shows {shown:.4}, clients saw {clients:.4} ({seen:?})"
        );
        ensure!(
            row["count"].as_u64() == Some(*seen.get(subset).unwrap_or(&0) as u64),
            "{subset}: page counts {}, clients saw {seen:?}",
            row["count"]
        );
        let weight = match subset {
            "v1" | "v3" => 0.5,
            _ => 0.0,
        };
        ensure!(
            (row["configured"].as_f64().unwrap_or(-1.0) - weight).abs() < 1e-6,
            "{subset}: page shows weight {} after the shift, configured {weight}",
            row["configured"]
        );
    }
    // A weight-0 subset has no slot in the kernel table, so the page lists v1 and v3.
    let listed: Vec<&str> = rows.iter().filter_map(|r| r["subset"].as_str()).collect();
    ensure!(listed == ["v1", "v3"], "expected rows v1 and v3: {rows:?}");
    // And the split the clients saw after the shift is the configured one, within what chance
    // allows for this many connections.
    let tolerance = split::tolerance(SHIFTED, 0.5);
    for subset in ["v1", "v3"] {
        let share = *after.get(subset).unwrap_or(&0) as f64 / SHIFTED as f64;
        ensure!(
            (share - 0.5).abs() <= tolerance,
            "{subset}: {share:.3} of new connections after the shift, configured 0.5 \
             (tolerance {tolerance:.3} for {SHIFTED} connections)"
        );
    }
    ensure!(!after.contains_key("v2"), "v2 got connections: {after:?}");

    // One snapshot behind all three views: meshctl, the page's JSON and Prometheus agree with
    // each other and with the clients (connection counters no longer move: traffic is over).
    let (ok, cli, err) = meshctl(&socket, &["stats", "-o", "json"])?;
    ensure!(ok, "meshctl stats: {err}");
    let cli: Value = serde_json::from_str(&cli)?;
    let out = topo
        .node
        .exec("curl", &["-sf", "http://127.0.0.1:9464/api/stats"])
        .context("GET /api/stats")?;
    let api: Value = serde_json::from_slice(&out.stdout).context("/api/stats as JSON")?;
    let metrics = scrape_metrics(&topo.node)?;
    for subset in ["v1", "v3"] {
        let clients = *seen.get(subset).unwrap_or(&0) as u64;
        let cli = backend_connections(&cli, 8080, subset);
        let api = backend_connections(&api, 8080, subset);
        let needle = format!("address=\"{endpoint}\",protocol=\"tcp\",subset=\"{subset}\"");
        let prom = metric_value(&metrics, "mesh_backend_connections_total{", &needle);
        ensure!(
            cli == Some(clients) && api == Some(clients) && prom == Some(clients),
            "{subset}: meshctl {cli:?}, /api/stats {api:?}, /metrics {prom:?}, clients {clients}"
        );
    }
    Ok(())
}

/// Connections of `subset`'s backend of the service on `port`, from a stats snapshot.
fn backend_connections(stats: &Value, port: u16, subset: &str) -> Option<u64> {
    let service = stats["services"]
        .as_array()?
        .iter()
        .find(|s| s["address"]["port"] == port)?;
    service["backends"]
        .as_array()?
        .iter()
        .find(|b| b["subset"] == subset)?["counters"]["connections"]
        .as_u64()
}
