//! `meshctl trace`: the decisions mesh takes for the packets and requests a filter selects,
//! live, one line each (or one JSON object each with `-o json`).

use std::time::Duration;

use anyhow::Result;
use mesh_user::{
    admin::{client::AdminClient, stream::encode},
    trace::{TraceEvent, TraceFilter},
};

/// `meshctl trace` arguments.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    meshctl trace reviews                              # every decision for the reviews service\n  \
    meshctl trace --client 198.18.1.2                  # one client's connections and requests\n  \
    meshctl trace reviews --verdict new --count 20     # the next 20 new flows, then stop\n  \
    meshctl trace --backend v3 -o json                 # what went to subset v3, as NDJSON\n  \
    meshctl trace --client 198.18.1.2 --verdict refused   # connections refused (no backend)\n\n\
    Kernel path: one line per packet mesh translated (new flow with its Maglev slot, established \
    packet, reply), with the hook (XDP or TC), the verdict and the interface it came in on; and \
    one per packet to a service address that was not balanced, with the reason: refused \
    (refused_no_backend), passed (pass_l7_proxy for a proxied connection's SYN, \
    pass_ttl_expired) or dropped (drop_internal). \
    Proxy: one line per HTTP request with the route, subset, backend and status.\n\
    Tracing costs nothing while no trace runs; while one runs, the kernel reports only packets \
    matching the client and service addresses given, the rest is filtered in meshd.")]
pub struct TraceArgs {
    /// Service name (reviews, reviews.default.svc.cluster.local), address or address:port.
    service: Option<String>,
    /// Client address or address:port.
    #[arg(long, value_name = "ADDR[:PORT]")]
    client: Option<String>,
    /// Backend address[:port], subset or version.
    #[arg(long, value_name = "ADDR|SUBSET")]
    backend: Option<String>,
    /// Only this decision, reason or verdict: new, established, reply, refused, passed, dropped,
    /// request; a reason (refused_no_backend, pass_l7_proxy, pass_ttl_expired, drop_internal);
    /// redirect, tx, pass, drop; or an HTTP status (503) or class (5xx).
    #[arg(long)]
    verdict: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = crate::parse_duration)]
    duration: Option<Duration>,
    /// Output: text lines or NDJSON.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: TraceOutput,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TraceOutput {
    Text,
    Json,
}

/// Runs the trace until `--count`, `--duration` or Ctrl-C.
pub async fn run(client: &AdminClient, args: TraceArgs) -> Result<()> {
    let filter = TraceFilter {
        service: args.service,
        client: args.client,
        backend: args.backend,
        verdict: args.verdict,
    };
    filter.validate()?;
    let mut query = Vec::new();
    for (key, value) in [
        ("service", &filter.service),
        ("client", &filter.client),
        ("backend", &filter.backend),
        ("verdict", &filter.verdict),
    ] {
        if let Some(v) = value {
            query.push(format!("{key}={}", encode(v)));
        }
    }
    let path = format!("/v1/trace?{}", query.join("&"));
    let mut seen = 0u64;
    let limit = args.count;
    let output = args.output;
    let stream = client.stream_lines(&path, |line| {
        match output {
            TraceOutput::Json => println!("{line}"),
            TraceOutput::Text => match serde_json::from_str::<TraceEvent>(line) {
                Ok(event) => println!("{event}"),
                Err(_) => println!("{line}"),
            },
        }
        seen += 1;
        limit.is_none_or(|n| seen < n)
    });
    let outcome = match args.duration {
        Some(d) => match tokio::time::timeout(d, stream).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        },
        None => {
            tokio::select! {
                r = stream => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
    };
    outcome?;
    Ok(())
}
