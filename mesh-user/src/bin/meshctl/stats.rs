//! `meshctl stats`: traffic per service and backend, observed share next to the weight.

use std::time::Duration;

use anyhow::Result;
use mesh_user::{admin::client::AdminClient, dataplane::StatsSnapshot};

use crate::{fleet, parse_duration, Output};

/// `meshctl stats` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl stats\n  \
    meshctl stats --watch --interval 2s\n  \
    meshctl stats -o json")]
pub struct Args {
    /// Refresh in place until Ctrl-C.
    #[arg(short, long)]
    watch: bool,
    /// Refresh interval for --watch (e.g. 500ms, 2s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop after this many refreshes (with --watch).
    #[arg(long)]
    count: Option<u64>,
    /// Output format (table or json).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The split summed over every node of the fleet (meshd --etcd), from the counters each
    /// node publishes in its etcd record (refreshed every --etcd-publish-interval).
    #[arg(long, conflicts_with = "watch")]
    fleet: bool,
}

/// Prints the stats once, or refreshed with `--watch`; `--fleet` sums the nodes.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    if args.fleet {
        return fleet::stats(client, args.output).await;
    }
    stats(client, args.watch, args.interval, args.count, args.output).await
}

async fn stats(
    client: &AdminClient,
    watch: bool,
    interval: Duration,
    count: Option<u64>,
    output: Output,
) -> Result<()> {
    let mut previous: Option<StatsSnapshot> = None;
    let mut shown = 0u64;
    loop {
        let snapshot: StatsSnapshot = client.get("/v1/stats").await?;
        if output == Output::Json {
            println!("{}", serde_json::to_string(&snapshot)?);
        } else {
            if watch {
                print!("\x1b[H\x1b[2J");
            }
            print_stats(&snapshot, previous.as_ref());
        }
        shown += 1;
        if !watch || count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        previous = Some(snapshot);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_stats(now: &StatsSnapshot, previous: Option<&StatsSnapshot>) {
    let elapsed = previous.map(|p| (now.taken_at - p.taken_at).max(1e-3));
    if now.services.is_empty() {
        println!("no services in force");
    }
    for service in &now.services {
        println!(
            "\n{} ({}:{}/{:?})  connections {}  packets {}  bytes {}",
            service.name,
            service.address.ip,
            service.address.port,
            service.address.protocol,
            service.totals.connections,
            service.totals.packets,
            human_bytes(service.totals.bytes)
        );
        let before =
            previous.and_then(|p| p.services.iter().find(|s| s.address == service.address));
        // Share of new connections: over the last interval when watching, else since start.
        let delta = |b: &mesh_user::dataplane::BackendStats| -> u64 {
            let old = before
                .and_then(|s| s.backends.iter().find(|x| x.address == b.address))
                .map(|x| x.counters.connections)
                .unwrap_or(0);
            b.counters.connections.saturating_sub(old)
        };
        let window_total: u64 = service.backends.iter().map(delta).sum();
        println!(
            "  {:<8} {:<22} {:>7} {:>8} {:>10} {:>10} {:>10}  {:<28} {:>7}",
            "SUBSET", "BACKEND", "ACTIVE", "NEW/S", "CONNS", "PACKETS", "BYTES", "SHARE", "WEIGHT"
        );
        for b in &service.backends {
            let d = delta(b);
            let share = if window_total > 0 {
                d as f64 / window_total as f64
            } else {
                0.0
            };
            let rate = elapsed
                .map(|e| format!("{:.1}", d as f64 / e))
                .unwrap_or_else(|| "-".into());
            let subset = b
                .subset
                .clone()
                .or_else(|| b.version.clone())
                .unwrap_or_else(|| "-".into());
            println!(
                "  {:<8} {:<22} {:>7} {:>8} {:>10} {:>10} {:>10}  {} {:5.1}% {:6.1}%",
                subset,
                b.address.to_string(),
                b.active_connections,
                rate,
                b.counters.connections,
                b.counters.packets,
                human_bytes(b.counters.bytes),
                bar(share, 20),
                share * 100.0,
                b.configured_share * 100.0
            );
        }
    }
    print!("{}", mesh_user::proxy::render_l7_stats(&now.l7));
}

fn bar(share: f64, width: usize) -> String {
    let cells = ((share * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(cells), "·".repeat(width - cells))
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}
