//! The daemon's life cycle: restore state, load and attach the dataplane, serve the admin API and
//! metrics, re-read `--config` when it changes or on SIGHUP, and stop on SIGTERM/SIGINT.
//!
//! Stopping leaves pinned programs and maps in place (forwarding goes on with the last rules),
//! so a restarted or upgraded meshd takes over without breaking established connections.
//! `meshd --cleanup` removes them.

pub mod control;
pub mod node;
pub mod refusals;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::{
    admin::server,
    compile::NodeContext,
    dataplane::{AttachRequest, Dataplane, DataplaneOptions, XdpAttachMode},
    store::RuleStore,
};
use control::Controller;

/// Log output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up `tracing` on stderr; `RUST_LOG` overrides the default `info` level. Kernel records
/// (`--kernel-log`, target `kernel`) always pass: the kernel filtered them by level already.
pub fn init_logging(format: LogFormat) {
    let kernel = format!("{}=trace", crate::dataplane::kernel_log::TARGET);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(kernel.parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What the daemon runs with.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Rules files: a file or a directory (watched).
    pub config: Option<PathBuf>,
    /// Which hook to run on the interfaces (auto: XDP on NICs, TC on virtual devices).
    pub attach: AttachRequest,
    /// XDP attach mode, where XDP is used.
    pub xdp_mode: XdpAttachMode,
    /// Pin directory for maps and links (None: private, nothing survives a restart).
    pub pin_dir: Option<PathBuf>,
    /// Where rules applied with meshctl are persisted (None: not persisted).
    pub state_file: Option<PathBuf>,
    /// Admin API socket.
    pub socket: PathBuf,
    /// Metrics listener (None: off).
    pub metrics_addr: Option<SocketAddr>,
    /// Entries of the Maglev pool.
    pub maglev_pool_entries: u32,
    /// Conntrack capacity.
    pub conntrack_entries: u32,
    /// Kernel debug logging (`--kernel-log`).
    pub kernel_log: crate::dataplane::KernelLogLevel,
    /// How often the --config files are checked for changes.
    pub watch_interval: Duration,
    /// The fleet's etcd, when the API layer lives there (`--etcd`).
    pub fleet: Option<crate::fleet::FleetOptions>,
    /// The L7 proxy's workers and client limits.
    pub proxy: crate::proxy::ProxyOptions,
    /// Socket-level balancing of node-local clients (None: off).
    pub socket_lb: Option<crate::dataplane::SocketLbOptions>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: DaemonOptions) -> Result<()> {
    let node = NodeContext {
        node_addresses: node::interface_addresses(&options.interfaces)?,
    };
    let store = RuleStore::open(options.state_file.clone()).context("restoring applied rules")?;
    let fleet = options.fleet.clone().map(|fleet| {
        let link = crate::fleet::agent::FleetLink::new(fleet, options.state_file.as_deref());
        // The state file caches the fleet's rules last applied here: they go in force now,
        // whether etcd answers or not, and the agent catches up once it does.
        link.restore_cached_revision();
        Arc::new(link)
    });
    let features = crate::dataplane::features::current();
    features.require()?;
    tracing::info!("{}", features.summary());
    let dataplane = Dataplane::load(DataplaneOptions {
        pin_dir: options.pin_dir.clone(),
        maglev_pool_entries: options.maglev_pool_entries,
        conntrack_entries: options.conntrack_entries,
        kernel_log: options.kernel_log,
    })
    .context("loading the kernel programs")?;
    let mut controller = Controller::new(
        dataplane,
        store,
        node,
        options.config.clone(),
        options.state_file.clone(),
    )
    .with_proxy(crate::proxy::Proxy::new(
        tokio::runtime::Handle::current(),
        options.proxy,
    )?);
    if let Some(link) = &fleet {
        controller = controller.with_fleet(link.clone());
    }
    // Rules before attaching: bad rules fail here, before any packet is touched.
    let report = controller
        .load_files("startup")
        .map_err(|r| anyhow::anyhow!(r.message))?;
    info!(
        services = report.services,
        backends = report.backends,
        written = report.written,
        micros = report.duration.as_micros() as u64,
        "rules installed"
    );
    for interface in &options.interfaces {
        controller
            .dataplane_mut()
            .attach(interface, options.attach, options.xdp_mode)?;
    }
    if let Some(socket_lb) = &options.socket_lb {
        controller.attach_sockets(socket_lb)?;
    }
    controller.dataplane_mut().finish_pin_migration();
    let controller = Arc::new(Mutex::new(controller));
    crate::trace::kernel::start_for(&controller);
    server::serve_admin(options.socket.clone(), controller.clone()).await?;
    if let Some(addr) = options.metrics_addr {
        server::serve_metrics(addr, controller.clone()).await?;
    }
    if let Some(link) = fleet {
        tokio::spawn(crate::fleet::agent::run(link, controller.clone()));
    }
    info!(interfaces = ?options.interfaces, socket = %options.socket.display(), "meshd ready");

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut watch = tokio::time::interval(options.watch_interval);
    let mut seen = options.config.as_deref().map(fingerprint);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: re-reading the rules files");
                seen = options.config.as_deref().map(fingerprint);
                reload(&controller).await;
            }
            _ = watch.tick() => {
                let now = options.config.as_deref().map(fingerprint);
                if now != seen {
                    seen = now;
                    info!("rules files changed: re-reading");
                    reload(&controller).await;
                }
            }
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    let _ = std::fs::remove_file(&options.socket);
    controller
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown_proxy();
    if options.pin_dir.is_some() {
        info!("programs and maps stay pinned and keep forwarding; `meshd --cleanup` removes them");
    }
    Ok(())
}

async fn reload(controller: &Arc<Mutex<Controller>>) {
    let controller = controller.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut c = controller.lock().unwrap_or_else(|p| p.into_inner());
        c.load_files("files")
    })
    .await;
    match outcome {
        Ok(Ok(report)) => info!(
            services = report.services,
            backends = report.backends,
            written = report.written,
            micros = report.duration.as_micros() as u64,
            "rules reloaded"
        ),
        Ok(Err(rejection)) => error!(
            "reload rejected, the previous rules stay in force: {}",
            rejection.message
        ),
        Err(e) => error!("reload failed: {e}"),
    }
}

/// Names, sizes and modification times of the rule files: a cheap change detector that needs
/// no inotify and also sees files replaced by rename (how editors and GitOps tools write).
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut entries = Vec::new();
    let mut add = |p: &Path| {
        if let Ok(meta) = std::fs::metadata(p) {
            entries.push((p.to_path_buf(), meta.len(), meta.modified().ok()));
        }
    };
    if path.is_dir() {
        if let Ok(dir) = std::fs::read_dir(path) {
            for entry in dir.flatten() {
                let p = entry.path();
                if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    add(&p);
                }
            }
        }
    } else {
        add(path);
    }
    entries.sort();
    entries
}
