//! meshctl: the command line for mesh, shaped like kubectl/istioctl.

#[path = "meshctl/fleet.rs"]
mod fleet;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

#[path = "meshctl/trace.rs"]
mod trace;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_user::{
    admin::{
        client::AdminClient, ApplyRequest, ApplyResponse, DeleteRequest, ResourceEntry,
        ResourceRef, SourceDocument, Status,
    },
    compile::{self, NodeContext},
    config,
    dataplane::StatsSnapshot,
    shift::{self, ShiftError},
};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Control mesh: apply Istio traffic rules, inspect them, watch the split live",
    after_help = "Examples:\n  \
        meshctl validate -f config/sandbox/            # offline, like istioctl validate\n  \
        meshctl apply -f reviews-80-20.yaml             # all-or-nothing, in force when it returns\n  \
        meshctl get vs                                  # VirtualServices in force\n  \
        meshctl stats --watch                           # observed split vs configured weights\n  \
        meshctl trace reviews --client 198.18.1.2       # every decision for one client, live\n  \
        meshctl status                                  # interfaces, programs, map fill levels"
)]
struct Cli {
    /// meshd's admin socket.
    #[arg(long, global = true, value_name = "PATH", default_value = mesh_user::admin::DEFAULT_SOCKET, env = "MESH_SOCKET")]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply Istio resources (create or replace); the whole submission or nothing.
    #[command(after_help = "Examples:\n  \
        meshctl apply -f config/tcp-echo/\n  \
        meshctl apply -f se.yaml -f dr.yaml -f vs.yaml\n  \
        cat vs.yaml | meshctl apply -f -\n  \
        meshctl apply -f vs.yaml --dry-run              # check against the rules in force")]
    Apply {
        /// File, directory (*.yaml, *.yml) or `-` for stdin; repeatable.
        #[arg(
            short = 'f',
            long = "filename",
            required = true,
            value_name = "FILE|DIR|-"
        )]
        files: Vec<String>,
        /// Validate and compile against the rules in force, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete resources applied with meshctl.
    #[command(after_help = "Examples:\n  \
        meshctl delete -f vs.yaml\n  \
        meshctl delete vs reviews\n  \
        meshctl delete dr reviews -n bookinfo")]
    Delete {
        /// Files naming the resources to delete.
        #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-", conflicts_with_all = ["kind", "name"])]
        files: Vec<String>,
        /// Kind (virtualservice|vs, destinationrule|dr, serviceentry|se, gateway|gw).
        kind: Option<String>,
        /// Name.
        name: Option<String>,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Check only.
        #[arg(long)]
        dry_run: bool,
    },
    /// List resources in force.
    #[command(after_help = "Examples:\n  \
        meshctl get vs\n  \
        meshctl get se reviews -o yaml\n  \
        meshctl get all -o wide\n  \
        meshctl get nodes                               # the fleet (meshd --etcd)")]
    Get {
        /// Kind (virtualservice|vs, destinationrule|dr, serviceentry|se, gateway|gw, all), or
        /// nodes (the fleet's nodes, with meshd --etcd).
        kind: String,
        /// Name (all when omitted).
        name: Option<String>,
        /// Namespace filter.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Validate resources offline (no daemon needed); exit 1 on any problem.
    #[command(after_help = "Examples:\n  \
        meshctl validate -f config/bookinfo/\n  \
        meshctl validate -f se.yaml -f vs.yaml          # checked together (cross references)")]
    Validate {
        /// File, directory or `-`; all are validated together.
        #[arg(
            short = 'f',
            long = "filename",
            required = true,
            value_name = "FILE|DIR|-"
        )]
        files: Vec<String>,
    },
    /// Traffic per service and backend: observed share of connections next to the weight.
    #[command(after_help = "Examples:\n  \
        meshctl stats\n  \
        meshctl stats --watch --interval 2s\n  \
        meshctl stats -o json")]
    Stats {
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
    },
    /// Progressive delivery: move traffic from one subset to another step by step, watching the
    /// canary's health, and roll back automatically when it degrades.
    #[command(after_help = "Examples:\n  \
        meshctl shift reviews --from v1 --to v3 --dry-run\n  \
        meshctl shift reviews --from v1 --to v3 --step 10 --interval 30s --max-error-rate 1%\n\n\
        Each step rewrites the service's VirtualService (applied with meshctl) through the same \
        all-or-nothing apply, then watches the canary subset for --interval: TCP resets per new \
        connection on the kernel path, 5xx per request (and p99 latency) on the L7 proxy. \
        Crossing a threshold puts 100% back on --from and exits 1. Ctrl-C stops and leaves the \
        weights where they are.")]
    Shift(ShiftOptions),
    /// Live decisions for a filter: per packet on the kernel path, per request on the proxy.
    Trace(trace::TraceArgs),
    /// Daemon status: interfaces, programs, map fill levels, last apply.
    #[command(after_help = "Examples:\n  \
        meshctl status\n  \
        meshctl status --fleet        # every node of the fleet: revision, ok/stale/failing/gone")]
    Status {
        /// Output format (table or json).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// Every node of the fleet (meshd --etcd) as etcd knows it, like `meshctl get nodes`.
        #[arg(long)]
        fleet: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = AdminClient::new(&cli.socket);
    match cli.command {
        Command::Apply { files, dry_run } => {
            let documents = read_inputs(&files)?;
            let answer: ApplyResponse = client
                .post("/v1/apply", &ApplyRequest { documents, dry_run })
                .await?;
            print_changes(&answer);
            Ok(())
        }
        Command::Delete {
            files,
            kind,
            name,
            namespace,
            dry_run,
        } => {
            let resources = if !files.is_empty() {
                let mut refs = Vec::new();
                for doc in read_inputs(&files)? {
                    let set = config::parse_str(&doc.source, &doc.yaml)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    refs.extend(set.resources.iter().map(|r| ResourceRef {
                        kind: r.kind.kind_name().into(),
                        namespace: r.meta.namespace.clone(),
                        name: r.meta.name.clone(),
                    }));
                }
                refs
            } else {
                let (Some(kind), Some(name)) = (kind, name) else {
                    bail!("say what to delete: `meshctl delete -f FILE` or `meshctl delete KIND NAME`");
                };
                vec![ResourceRef {
                    kind: canonical_kind(&kind)?.into(),
                    namespace,
                    name,
                }]
            };
            let answer: ApplyResponse = client
                .post("/v1/delete", &DeleteRequest { resources, dry_run })
                .await?;
            print_changes(&answer);
            Ok(())
        }
        Command::Get {
            kind,
            name,
            namespace,
            output,
        } => {
            if matches!(kind.to_ascii_lowercase().as_str(), "nodes" | "node" | "no") {
                return fleet::nodes(&client, output).await;
            }
            let mut path = String::from("/v1/resources?");
            if kind != "all" {
                path.push_str(&format!("kind={}&", canonical_kind(&kind)?));
            }
            if let Some(name) = &name {
                path.push_str(&format!("name={name}&"));
            }
            if let Some(ns) = &namespace {
                path.push_str(&format!("namespace={ns}&"));
            }
            let entries: Vec<ResourceEntry> = client.get(&path).await?;
            if entries.is_empty() && name.is_some() {
                bail!("{kind} {} not found", name.unwrap_or_default());
            }
            print_resources(&entries, output)
        }
        Command::Validate { files } => validate(&files),
        Command::Stats {
            watch,
            interval,
            count,
            output,
            fleet: false,
        } => stats(&client, watch, interval, count, output).await,
        Command::Stats {
            output,
            fleet: true,
            ..
        } => fleet::stats(&client, output).await,
        Command::Shift(options) => shift(&client, &options).await,
        Command::Trace(args) => trace::run(&client, args).await,
        Command::Status {
            output,
            fleet: true,
        } => fleet::nodes(&client, output).await,
        Command::Status {
            output,
            fleet: false,
        } => {
            let status: Status = client.get("/v1/status").await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
    }
}

/// Reads `-f` arguments: files, directories (*.yaml, *.yml, sorted) and `-` (stdin).
fn read_inputs(inputs: &[String]) -> Result<Vec<SourceDocument>> {
    let mut documents = Vec::new();
    for input in inputs {
        if input == "-" {
            let mut yaml = String::new();
            std::io::stdin()
                .read_to_string(&mut yaml)
                .context("reading stdin")?;
            documents.push(SourceDocument {
                source: "<stdin>".into(),
                yaml,
            });
            continue;
        }
        let path = Path::new(input);
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {input}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{input}: no *.yaml or *.yml files in this directory");
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            let meta = std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?;
            if meta.len() > config::MAX_INPUT_BYTES as u64 {
                bail!(
                    "{}: {} bytes, more than the limit of {} bytes per file",
                    file.display(),
                    meta.len(),
                    config::MAX_INPUT_BYTES
                );
            }
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            documents.push(SourceDocument {
                source: file.display().to_string(),
                yaml,
            });
        }
    }
    Ok(documents)
}

fn validate(inputs: &[String]) -> Result<()> {
    let mut set = config::ResourceSet::default();
    let mut errors = Vec::new();
    for doc in read_inputs(inputs)? {
        match config::parse_str(&doc.source, &doc.yaml) {
            Ok(parsed) => {
                set.resources.extend(parsed.resources);
                set.notices.extend(parsed.notices);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    for notice in &set.notices {
        eprintln!("{notice}");
    }
    let mut warnings = Vec::new();
    if errors.is_empty() {
        // Offline there is no node: Gateways are checked but bound to no address.
        match compile::compile(
            &set,
            &NodeContext {
                node_addresses: vec![],
            },
        ) {
            Ok(state) => warnings = state.warnings,
            Err(e) => {
                if let compile::CompileError::Invalid(found) = &e {
                    warnings = found.warnings.clone();
                }
                errors.push(e.to_string());
            }
        }
    }
    for warning in &warnings {
        eprintln!("{warning}");
    }
    if !errors.is_empty() {
        bail!("validation failed:\n{}", errors.join("\n"));
    }
    match warnings.len() {
        0 => println!("{} resources valid", set.resources.len()),
        n => println!("{} resources valid, {n} warnings", set.resources.len()),
    }
    Ok(())
}

fn print_changes(answer: &ApplyResponse) {
    for warning in &answer.warnings {
        eprintln!("{warning}");
    }
    for change in &answer.changes {
        // "VirtualService default/reviews" -> "virtualservice.networking.istio.io/reviews".
        let (kind, qualified) = change
            .resource
            .split_once(' ')
            .unwrap_or((&change.resource, ""));
        let name = qualified.rsplit('/').next().unwrap_or(qualified);
        println!(
            "{}.networking.istio.io/{name} {}{}",
            kind.to_lowercase(),
            change.action,
            if answer.dry_run { " (dry run)" } else { "" }
        );
    }
    if !answer.dry_run {
        eprintln!(
            "in force: {} service addresses, {} backends ({} written, {} us)",
            answer.services, answer.backends, answer.written, answer.duration_us
        );
    }
}

fn canonical_kind(kind: &str) -> Result<&'static str> {
    Ok(match kind.to_ascii_lowercase().as_str() {
        "vs" | "virtualservice" | "virtualservices" => "VirtualService",
        "dr" | "destinationrule" | "destinationrules" => "DestinationRule",
        "se" | "serviceentry" | "serviceentries" => "ServiceEntry",
        "gw" | "gateway" | "gateways" => "Gateway",
        other => bail!(
            "unknown kind `{other}`: expected virtualservice (vs), destinationrule (dr), \
             serviceentry (se), gateway (gw) or all"
        ),
    })
}

fn print_resources(entries: &[ResourceEntry], output: Output) -> Result<()> {
    match output {
        Output::Json => {
            let values: Vec<&serde_json::Value> = entries.iter().map(|e| &e.resource).collect();
            println!("{}", serde_json::to_string_pretty(&values)?);
        }
        Output::Yaml => {
            for e in entries {
                print!("---\n{}", serde_yaml::to_string(&e.resource)?);
            }
        }
        Output::Table | Output::Wide => {
            if entries.is_empty() {
                eprintln!("no resources found");
                return Ok(());
            }
            let wide = output == Output::Wide;
            println!(
                "{:<16} {:<24} {:<12} {:<6}{}",
                "KIND",
                "NAME",
                "NAMESPACE",
                "FROM",
                if wide { "  HOSTS / SOURCE" } else { "" }
            );
            for e in entries {
                let extra = if wide {
                    let spec = &e.resource["spec"];
                    let hosts = spec["hosts"]
                        .as_array()
                        .map(|h| {
                            h.iter()
                                .filter_map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .or_else(|| spec["host"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    format!("  {hosts}  {}", e.source)
                } else {
                    String::new()
                };
                println!(
                    "{:<16} {:<24} {:<12} {:<6}{extra}",
                    e.kind, e.name, e.namespace, e.layer
                );
            }
        }
    }
    Ok(())
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

/// `meshctl shift` arguments.
#[derive(clap::Args)]
struct ShiftOptions {
    /// The service: its host (reviews, reviews.default.svc.cluster.local) or VirtualService name.
    service: String,
    /// The stable subset traffic moves away from.
    #[arg(long)]
    from: String,
    /// The canary subset traffic moves to.
    #[arg(long)]
    to: String,
    /// Percentage points added per step.
    #[arg(long, default_value_t = 10)]
    step: u32,
    /// How long each step is watched before the next.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    interval: Duration,
    /// Roll back when the canary's error rate exceeds this (e.g. 1%, 0.5%).
    #[arg(long, default_value = "1%", value_parser = parse_percent)]
    max_error_rate: f64,
    /// Roll back when the canary's p99 latency exceeds this (L7 services only).
    #[arg(long, value_parser = parse_duration)]
    max_latency_p99: Option<Duration>,
    /// Fewest canary connections/requests a step needs before it can be judged.
    #[arg(long, default_value_t = 10)]
    min_requests: u64,
    /// Print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
}

async fn shift(client: &AdminClient, o: &ShiftOptions) -> Result<()> {
    let entries: Vec<ResourceEntry> = client.get("/v1/resources?kind=VirtualService").await?;
    let first_label = |h: &str| h.split('.').next().unwrap_or(h).to_string();
    let routes_service = |e: &ResourceEntry| {
        e.name == o.service
            || e.resource["spec"]["hosts"].as_array().is_some_and(|hosts| {
                hosts
                    .iter()
                    .filter_map(|h| h.as_str())
                    .any(|h| h == o.service || first_label(h) == first_label(&o.service))
            })
    };
    let Some(entry) = entries
        .iter()
        .find(|e| routes_service(e) && e.layer == "api")
    else {
        if let Some(file) = entries.iter().find(|e| routes_service(e)) {
            bail!(
                "the VirtualService for {} comes from meshd --config ({}); shift rewrites VirtualServices applied with meshctl",
                o.service,
                file.source
            );
        }
        bail!(ShiftError::NoVirtualService(o.service.clone()));
    };
    let vs = entry.resource.clone();
    let routes = shift::find_routes(&vs, &o.from, &o.to)?;
    let start = routes[0].canary_weight;
    let steps = shift::plan(start, o.step)?;
    println!(
        "shift {}: {} -> {}, now {}% on {}; steps {}; each watched {:?}; roll back above {:.2}% errors{}",
        o.service,
        o.from,
        o.to,
        start,
        o.to,
        steps.iter().map(|w| format!("{w}%")).collect::<Vec<_>>().join(", "),
        o.interval,
        o.max_error_rate * 100.0,
        o.max_latency_p99.map(|d| format!(" or p99 above {d:?}")).unwrap_or_default()
    );
    if o.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    let apply_weight = |canary: u32| {
        let doc = shift::with_weights(&vs, &routes, &o.from, &o.to, canary);
        ApplyRequest {
            documents: vec![SourceDocument {
                source: format!("meshctl shift {}", o.service),
                yaml: serde_yaml::to_string(&doc).unwrap_or_default(),
            }],
            dry_run: false,
        }
    };
    let host = entry.resource["spec"]["hosts"][0]
        .as_str()
        .unwrap_or(&o.service)
        .to_string();
    for (n, weight) in steps.iter().enumerate() {
        let _: ApplyResponse = client.post("/v1/apply", &apply_weight(*weight)).await?;
        let current = *weight;
        println!(
            "step {}/{}: {} {}% / {} {}% in force",
            n + 1,
            steps.len(),
            o.from,
            100 - weight,
            o.to,
            weight
        );
        let verdict = tokio::select! {
            v = watch_step(client, o, &host) => v?,
            _ = tokio::signal::ctrl_c() => {
                println!("interrupted: weights left at {} {}% / {} {}%; rerun to continue", o.from, 100 - current, o.to, current);
                return Ok(());
            }
        };
        match verdict {
            StepVerdict::Healthy(h) => println!(
                "  {}: {} connections/requests, {} errors ({:.2}%){}: healthy",
                o.to,
                h.requests,
                h.errors,
                h.error_rate() * 100.0,
                h.p99
                    .map(|p| format!(", p99 <= {:.0} ms", p * 1000.0))
                    .unwrap_or_default()
            ),
            StepVerdict::Unhealthy(h, why) => {
                let _: ApplyResponse = client.post("/v1/apply", &apply_weight(0)).await?;
                println!("  {}: {why}: rolled back to 100% {}", o.to, o.from);
                bail!(
                    "canary {} failed at {}% ({} errors in {} connections/requests); 100% {} restored",
                    o.to,
                    weight,
                    h.errors,
                    h.requests,
                    o.from
                );
            }
            StepVerdict::NoTraffic(h) => {
                bail!(
                    "canary {} saw only {} connections/requests in 3 intervals, not enough to judge; weights left at {} {}% / {} {}%",
                    o.to,
                    h.requests,
                    o.from,
                    100 - current,
                    o.to,
                    current
                );
            }
        }
    }
    println!("promoted {} to 100% of {}", o.to, o.service);
    Ok(())
}

enum StepVerdict {
    Healthy(shift::Health),
    Unhealthy(shift::Health, String),
    NoTraffic(shift::Health),
}

/// Watches one step: judged as soon as the error threshold is crossed with enough traffic, else
/// at the end of the interval; a step without enough traffic is extended up to three intervals.
async fn watch_step(client: &AdminClient, o: &ShiftOptions, host: &str) -> Result<StepVerdict> {
    let baseline: StatsSnapshot = client.get("/v1/stats").await?;
    let started = std::time::Instant::now();
    let tick = o.interval.min(Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let now: StatsSnapshot = client.get("/v1/stats").await?;
        let health = shift::subset_health(&baseline, &now, host, &o.to);
        if let (Some(limit), Some(p99)) = (o.max_latency_p99, health.p99) {
            if health.requests >= o.min_requests && p99 > limit.as_secs_f64() {
                let why = format!(
                    "p99 latency {:.0} ms above {:.0} ms",
                    p99 * 1000.0,
                    limit.as_secs_f64() * 1000.0
                );
                return Ok(StepVerdict::Unhealthy(health, why));
            }
        }
        if health.requests >= o.min_requests && health.error_rate() > o.max_error_rate {
            let why = format!(
                "error rate {:.2}% above {:.2}%",
                health.error_rate() * 100.0,
                o.max_error_rate * 100.0
            );
            return Ok(StepVerdict::Unhealthy(health, why));
        }
        let elapsed = started.elapsed();
        if elapsed >= o.interval && health.requests >= o.min_requests {
            return Ok(StepVerdict::Healthy(health));
        }
        if elapsed >= o.interval * 3 {
            return Ok(StepVerdict::NoTraffic(health));
        }
    }
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{text}` is not a percentage like 1% or 0.5%"))?;
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("`{text}` must be between 0% and 100%"));
    }
    Ok(value / 100.0)
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    mesh_user::config::Duration::parse_in(
        text,
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(3600),
    )
}
