//! meshctl: the command line for mesh, shaped like kubectl/istioctl. One module per verb, each
//! with its arguments (`Args`, whose `--help` teaches with examples) and its `run`.

mod apply;
mod delete;
mod fleet;
mod get;
mod inputs;
mod shift;
mod stats;
mod status;
mod trace;
mod validate;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_user::admin::client::AdminClient;

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
    Apply(apply::Args),
    /// Delete resources applied with meshctl.
    Delete(delete::Args),
    /// List resources in force.
    Get(get::Args),
    /// Validate resources offline (no daemon needed); exit 1 on any problem.
    Validate(validate::Args),
    /// Traffic per service and backend: observed share of connections next to the weight.
    Stats(stats::Args),
    /// Progressive delivery: move traffic from one subset to another step by step, watching the
    /// canary's health, and roll back automatically when it degrades.
    Shift(shift::Args),
    /// Live decisions for a filter: per packet on the kernel path, per request on the proxy.
    Trace(trace::TraceArgs),
    /// Daemon status: interfaces, programs, map fill levels, last apply.
    Status(status::Args),
}

/// Output formats shared by the verbs (each says which it supports).
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
        Command::Apply(args) => apply::run(&client, args).await,
        Command::Delete(args) => delete::run(&client, args).await,
        Command::Get(args) => get::run(&client, args).await,
        Command::Validate(args) => validate::run(args),
        Command::Stats(args) => stats::run(&client, args).await,
        Command::Shift(args) => shift::run(&client, args).await,
        Command::Trace(args) => trace::run(&client, args).await,
        Command::Status(args) => status::run(&client, args).await,
    }
}

/// Durations on the command line (`500ms`, `30s`, `5m`), within 50 ms .. 1 h.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    mesh_user::config::Duration::parse_in(
        text,
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(3600),
    )
}
