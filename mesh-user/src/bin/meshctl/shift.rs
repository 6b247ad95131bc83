//! `meshctl shift`: progressive delivery. Moves traffic from one subset to another step by step
//! through the all-or-nothing apply, watches the canary's health, rolls back when it degrades.

use std::time::Duration;

use anyhow::{bail, Result};
use mesh_user::{
    admin::{client::AdminClient, ApplyRequest, ApplyResponse, ResourceEntry, SourceDocument},
    dataplane::StatsSnapshot,
    shift::{self, ShiftError},
};

use crate::parse_duration;

/// `meshctl shift` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl shift reviews --from v1 --to v3 --dry-run\n  \
    meshctl shift reviews --from v1 --to v3 --step 10 --interval 30s --max-error-rate 1%\n\n\
    Each step rewrites the service's VirtualService (applied with meshctl) through the same \
    all-or-nothing apply, then watches the canary subset for --interval: TCP resets per new \
    connection on the kernel path, 5xx per request (and p99 latency) on the L7 proxy. \
    Crossing a threshold puts 100% back on --from and exits 1. Ctrl-C stops and leaves the \
    weights where they are.")]
pub struct Args {
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

/// Runs the shift to the end, a rollback or Ctrl-C.
pub async fn run(client: &AdminClient, args: Args) -> Result<()> {
    let o = &args;
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
async fn watch_step(client: &AdminClient, o: &Args, host: &str) -> Result<StepVerdict> {
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
