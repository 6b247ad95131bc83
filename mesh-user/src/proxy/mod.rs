//! The L7 proxy inside meshd: serves the service addresses whose rules need HTTP (see
//! [`crate::compile`] for when that is), on the same VIP and port clients already use.
//!
//! The XDP program passes packets of an L7 service (`SERVICE_FLAG_L7_PROXY`) to the kernel
//! untouched; meshd makes the VIP local (a `local` route on `lo`, see [`local_routes`]) so the
//! kernel delivers them to this proxy's listener ([`server`]). Each request is matched against
//! the route table ([`table`], [`matching`]), and answered ([`handler`]: routing, CORS,
//! faults, redirects), forwarded and retried ([`forward`], with the cluster's circuit breaker
//! in [`slots`] and pooled upstream connections in [`upstream`]) or mirrored ([`mirror`]),
//! choosing backends with [`balance`] and deciding retries with [`retry`]; [`access`] records
//! the access log line. Counters for `meshctl stats` and Prometheus are in [`stats`].
//!
//! # Applying rules
//!
//! The controller calls [`Proxy::prepare`] before the dataplane switches service entries and
//! [`Proxy::commit`] after it (or with the previous state when the flip failed):
//! - `prepare` opens listeners for new L7 addresses (route first, then bind) and installs a
//!   table that serves both the new rules and addresses about to leave, so a connection that
//!   reaches the proxy in between is served;
//! - `commit` swaps in exactly the new table (one atomic pointer swap, [`arc_swap`]): requests
//!   already routed finish with the rules they started with, the next request on a keep-alive
//!   connection uses the new rules; then listeners of addresses that are no longer L7 drain in
//!   the background (no new connections; in-flight requests finish and HTTP/1 answers carry
//!   `Connection: close`, HTTP/2 gets GOAWAY; idle connections close) and the local route goes
//!   after the drain.
//!
//! # Switching a service between the kernel path and the proxy
//!
//! - **L4 -> L7**: the listener exists before the flip. Connections the XDP program already
//!   tracks stay in its connection table and keep their backend until they close; every new
//!   connection after the flip reaches the proxy. No request fails.
//! - **L7 -> L4**: new connections after the flip go to the kernel path. A client connection
//!   that is still open to the proxy at the flip is not in the XDP connection table; the kernel
//!   program recognises its packets by a socket lookup (a non-SYN TCP packet that matches a
//!   local, non-listening socket: `mesh-ebpf/src/local.rs`) and passes them to the stack, so
//!   the proxy finishes serving it while its listener drains: idle keep-alive connections are
//!   closed at once, busy ones after their current request (HTTP/1 `Connection: close`,
//!   HTTP/2 GOAWAY). Only a request racing the flip itself can fail (the switching test sees 0
//!   to 3 of about 11 000 requests across three flips); clients reconnect to the kernel path.
//! - Removing a service entirely drains the same way; its packets then pass to the stack, which
//!   still has the local route until the drain ends.
//!
//! When meshd stops, its listeners close with it and [`Proxy::shutdown`] removes the local
//! routes; the pinned XDP program keeps passing L7 services' packets to the stack, which
//! refuses them until meshd is back (L4 services keep forwarding).

pub mod access;
pub mod balance;
pub mod body;
pub mod forward;
pub mod handler;
pub mod local_routes;
pub mod matching;
pub mod mirror;
pub mod retry;
pub mod rewrite;
pub mod server;
pub mod slots;
pub mod stats;
pub mod table;
pub mod upstream;
pub mod watchdog;
pub mod workers;

use std::{
    collections::HashMap,
    sync::{atomic::AtomicUsize, Arc, Mutex},
};

use arc_swap::ArcSwap;
use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::sync::Semaphore;

pub use stats::{
    latency_bucket_bound, render_l7_stats, L7DestinationStats, L7RouteStats, L7ServiceStats,
};

use crate::compile::{DesiredState, L4Protocol, L7Plan, Plan, ServiceAddress};
use local_routes::LocalRoutes;
pub use server::ClientLimits;
use server::ListenerHandle;
use table::RouteTable;
pub use workers::WorkerOptions;
use workers::Workers;

/// Mirror copies in flight at once, over all services; more are dropped, never queued.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 1024;

/// Errors applying rules to the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be opened.
    #[error("listening on {address}: {source}")]
    Listen {
        /// `ip:port`.
        address: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The VIP could not be made local.
    #[error(transparent)]
    Route(#[from] local_routes::RouteError),
    /// A compiled match could not be built (compile validates regexes, so this is a bug).
    #[error(transparent)]
    Match(#[from] matching::MatchError),
    /// The worker threads could not start.
    #[error("starting the proxy workers: {0}")]
    Workers(std::io::Error),
}

/// How the proxy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Worker threads and pinning.
    pub workers: WorkerOptions,
    /// Client connection limits and timeouts.
    pub limits: ClientLimits,
}

/// State shared by every listener and request.
pub struct Shared {
    /// The route table in force.
    pub table: ArcSwap<RouteTable>,
    /// Counters.
    pub stats: stats::ProxyStats,
    /// Budget of mirror copies in flight.
    pub mirror_slots: Arc<Semaphore>,
    /// HTTP connection settings (limits) for accepted connections.
    pub builder: auto::Builder<TokioExecutor>,
    /// Client connection limits and timeouts.
    pub limits: ClientLimits,
    /// Client connections open now (all listeners and workers).
    pub connections: AtomicUsize,
}

/// The L7 proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    workers: Arc<Workers>,
    listeners: Arc<Mutex<HashMap<ServiceAddress, ListenerHandle>>>,
    routes: Arc<Mutex<LocalRoutes>>,
}

fn l7_services(state: &DesiredState) -> Vec<(ServiceAddress, String, &L7Plan)> {
    state
        .services
        .iter()
        .filter(|s| s.address.protocol == L4Protocol::Tcp)
        .filter_map(|s| match &s.plan {
            Plan::L7(plan) => Some((s.address, s.name.clone(), plan)),
            Plan::L4(_) => None,
        })
        .collect()
}

impl Proxy {
    /// A proxy with no service: its workers start now; housekeeping (draining listeners that
    /// close) runs on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle, options: ProxyOptions) -> Result<Self, ProxyError> {
        let workers = Workers::start(options.workers).map_err(ProxyError::Workers)?;
        tracing::info!(
            workers = workers.len(),
            pinned = options.workers.pin,
            max_connections = options.limits.max_connections,
            "L7 proxy workers started"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                table: ArcSwap::from_pointee(RouteTable::default()),
                stats: stats::ProxyStats::default(),
                mirror_slots: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
                builder: server::connection_builder(),
                limits: options.limits,
                connections: AtomicUsize::new(0),
            }),
            runtime,
            workers: Arc::new(workers),
            listeners: Arc::new(Mutex::new(HashMap::new())),
            routes: Arc::new(Mutex::new(LocalRoutes::default())),
        })
    }

    /// Before the dataplane flips to `state`: listeners for new L7 addresses are open and the
    /// table serves both the new rules and addresses about to leave.
    pub fn prepare(&self, state: &DesiredState) -> Result<(), ProxyError> {
        let wanted = l7_services(state);
        let current = self.shared.table.load_full();
        let mut next = table::build(&wanted, &current, &self.shared.stats, self.workers.len())?;
        for (address, service) in &current.services {
            next.services
                .entry(*address)
                .or_insert_with(|| service.clone());
        }
        self.shared.table.store(Arc::new(next));
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for (address, name, _) in &wanted {
            if listeners.contains_key(address) {
                continue;
            }
            self.routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ensure(address.ip)?;
            let listen_error = |source| ProxyError::Listen {
                address: format!("{}:{}", address.ip, address.port),
                source,
            };
            let handle = server::spawn(self.shared.clone(), *address, self.workers.handles())
                .map_err(listen_error)?;
            tracing::info!(service = %name, address = %format!("{}:{}", address.ip, address.port), "L7 proxy listening");
            listeners.insert(*address, handle);
        }
        Ok(())
    }

    /// After the dataplane flipped to `state` (or failed to, with the state still in force):
    /// exactly `state`'s table, and addresses that are no longer L7 drain and close.
    pub fn commit(&self, state: &DesiredState) {
        let wanted = l7_services(state);
        let current = self.shared.table.load_full();
        match table::build(&wanted, &current, &self.shared.stats, self.workers.len()) {
            Ok(next) => self.shared.table.store(Arc::new(next)),
            Err(e) => tracing::error!("L7 route table: {e}"),
        }
        let keep: std::collections::HashSet<ServiceAddress> =
            wanted.iter().map(|(a, _, _)| *a).collect();
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let leaving: Vec<ServiceAddress> = listeners
            .keys()
            .filter(|a| !keep.contains(a))
            .copied()
            .collect();
        for address in leaving {
            let Some(handle) = listeners.remove(&address) else {
                continue;
            };
            let listeners = self.listeners.clone();
            let routes = self.routes.clone();
            self.runtime.spawn(async move {
                handle.drain().await;
                tracing::info!(address = %format!("{}:{}", address.ip, address.port), "L7 proxy listener drained and closed");
                // The VIP may have come back (another port, or a later apply) meanwhile.
                let still_used = listeners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .any(|a| a.ip == address.ip);
                if !still_used {
                    if let Err(e) = routes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(address.ip)
                    {
                        tracing::warn!("{e}");
                    }
                }
            });
        }
    }

    /// The L7 section of `meshctl stats`.
    pub fn stats(&self) -> Vec<L7ServiceStats> {
        let table = self.shared.table.load();
        let mut current: Vec<(ServiceAddress, String)> = table
            .services
            .iter()
            .map(|(a, s)| (*a, s.name.clone()))
            .collect();
        current.sort();
        self.shared.stats.snapshot(&current)
    }

    /// Prometheus text of the proxy's metric families (no `# EOF` line).
    pub fn render_metrics(&self) -> String {
        self.shared.stats.render_prometheus()
    }

    /// Removes the local routes this meshd added (at exit).
    pub fn shutdown(&self) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_all();
    }
}
