//! `meshctl status`: meshd's interfaces, programs, map fill levels and last apply.

use anyhow::Result;
use mesh_user::admin::{client::AdminClient, Status};

use crate::{fleet, Output};

/// `meshctl status` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl status\n  \
    meshctl status --fleet        # every node of the fleet: revision, ok/stale/failing/gone")]
pub struct Args {
    /// Output format (table or json).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// Every node of the fleet (meshd --etcd) as etcd knows it, like `meshctl get nodes`.
    #[arg(long)]
    fleet: bool,
}

/// Prints this node's status, or the fleet's with `--fleet`.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    if args.fleet {
        return fleet::nodes(client, args.output).await;
    }
    let status: Status = client.get("/v1/status").await?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(status: &Status) {
    println!(
        "meshd {} (pid {}), up {:.0}s",
        status.version, status.pid, status.uptime_s
    );
    if let Some(k) = &status.kernel {
        println!("{}", k.summary());
    }
    println!("\nINTERFACE        IFINDEX  HOOK         PROGRAM   WHY");
    for i in &status.interfaces {
        println!(
            "{:<16} {:>7}  {:<12} {:<9} {}",
            i.name,
            i.ifindex,
            i.mode,
            i.program_id
                .map(|id| format!("id {id}"))
                .unwrap_or_else(|| "-".into()),
            i.reason
        );
        if i.peer_redirect {
            println!(
                "{:<16} {:>7}  packets routed here go straight into the container behind it \
                 (bpf_redirect_peer)",
                "", ""
            );
        }
    }
    println!("\nMAP              USED / CAPACITY              MEMORY");
    for m in &status.maps {
        let pct = if m.capacity > 0 {
            m.used as f64 * 100.0 / m.capacity as f64
        } else {
            0.0
        };
        println!(
            "{:<16} {:>9} / {:<9} ({pct:>5.1}%) {:>8.1} MiB",
            m.name,
            m.used,
            m.capacity,
            m.memory_bytes as f64 / 1048576.0
        );
    }
    println!(
        "maps hold {:.1} MiB of kernel memory",
        status.map_memory_bytes as f64 / 1048576.0
    );
    if let Some(progress) = &status.progress {
        println!("in progress: {progress}");
    }
    println!(
        "\nconntrack: {} of {} entries; {} resources, {} service addresses in force",
        status.conntrack_entries, status.conntrack_capacity, status.resources, status.services
    );
    match &status.last_apply {
        Some(a) if a.ok => println!("last apply: {} ok ({} us)", a.trigger, a.duration_us),
        Some(a) => println!(
            "last apply: {} FAILED, previous rules in force: {}",
            a.trigger,
            a.error.clone().unwrap_or_default()
        ),
        None => println!("last apply: none"),
    }
    if let Some(f) = &status.state_file {
        println!("state file: {f}");
    }
    if let Some(p) = &status.pin_dir {
        println!("pinned under: {p}");
    }
    if let Some(layout) = &status.pin_layout {
        println!("pin layout: version {}", layout.version);
        for note in &layout.notes {
            println!("  {note}");
        }
    }
    if let Some(f) = &status.fleet {
        println!(
            "fleet: node {} at revision {} of {} (etcd {}{}){}",
            f.name,
            f.applied_revision,
            f.seen_revision,
            f.endpoints.join(","),
            if f.connected { "" } else { ", NOT ANSWERING" },
            if f.stale() { ": STALE" } else { "" }
        );
        if let Some(e) = &f.etcd_error {
            println!("  etcd: {e}");
        }
        if let Some(e) = &f.last_error {
            println!("  last error: {e}");
        }
    }
    match &status.socket_lb {
        Some(s) => {
            println!(
                "\nsocket hooks: {} on cgroup2 {}{} (network namespace cookie {}){}",
                s.hooks.join(", "),
                s.cgroup,
                if s.mounted_by_meshd {
                    ", mounted by meshd"
                } else {
                    ""
                },
                s.netns_cookie,
                match &s.pinned_under {
                    Some(p) => format!(", pinned under {p}"),
                    None => String::new(),
                }
            );
            let counts: Vec<String> = s
                .counters
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            if !counts.is_empty() {
                println!("  {}", counts.join(", "));
            }
        }
        None => println!("\nsocket hooks: off (node-local clients are not balanced)"),
    }
}
