//! meshd's side of the fleet: the link to etcd shared by the controller and the admin API, and
//! the agent task that keeps this node on the fleet's newest rules.
//!
//! The agent reads the rule set, applies it (all-or-nothing, through the controller), watches
//! the prefix from the revision it read, and on every change re-reads and applies the newest
//! revision. Every `publish_interval` it renews its lease and rewrites its node record. Any etcd
//! failure ends the session: the node keeps forwarding with the rules in force, says it is
//! stale, and the agent starts a new session (read, apply, watch) until etcd answers again.
//!
//! The fleet revision in force is cached next to the state file (`<state-file>.fleet`), with
//! the rules themselves in the state file, so a meshd restarted while etcd is down starts with
//! the last rules it applied and knows which revision they are.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    etcd::{EtcdError, EtcdStore, RulesSnapshot},
    FleetOptions, LocalFleetState, NodeRecord,
};
use crate::daemon::control::Controller;

/// The link to etcd: options, the client (made once etcd answers) and this node's view.
pub struct FleetLink {
    /// How to reach etcd.
    pub options: FleetOptions,
    store: tokio::sync::Mutex<Option<EtcdStore>>,
    local: Mutex<LocalFleetState>,
    cache: Option<PathBuf>,
}

/// What `<state-file>.fleet` holds.
#[derive(Debug, Serialize, Deserialize)]
struct CachedRevision {
    prefix: String,
    revision: i64,
}

impl FleetLink {
    /// A link for `options`; `state_file` is where the rules in force are cached.
    pub fn new(options: FleetOptions, state_file: Option<&Path>) -> Self {
        let cache = state_file.map(|p| {
            let mut name = p.as_os_str().to_owned();
            name.push(".fleet");
            PathBuf::from(name)
        });
        let local = LocalFleetState {
            name: options.node_name.clone(),
            endpoints: options.endpoints.clone(),
            prefix: options.prefix.clone(),
            disconnected_since: Some(super::now()),
            etcd_error: Some("not connected yet".into()),
            ..Default::default()
        };
        Self {
            options,
            store: tokio::sync::Mutex::new(None),
            local: Mutex::new(local),
            cache,
        }
    }

    /// Reads the cached revision of the rules restored from the state file.
    pub fn restore_cached_revision(&self) {
        let Some(path) = &self.cache else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match serde_json::from_str::<CachedRevision>(&text) {
            Ok(cached) if cached.prefix == self.options.prefix => {
                let mut local = self.local();
                local.applied_revision = cached.revision;
                local.from_cache = true;
                info!(
                    revision = cached.revision,
                    "fleet: rules of revision {} restored from the local cache", cached.revision
                );
            }
            Ok(_) => warn!(
                "fleet: {} belongs to another prefix; ignored",
                path.display()
            ),
            Err(e) => warn!("fleet: {}: {e}; ignored", path.display()),
        }
    }

    /// Records that the rules of `revision` are in force (cache file, local view).
    pub fn applied(&self, revision: i64) {
        if let Some(path) = &self.cache {
            let cached = CachedRevision {
                prefix: self.options.prefix.clone(),
                revision,
            };
            let bytes = serde_json::to_vec(&cached).expect("cache serialises");
            if let Err(e) = crate::store::write_atomically(path, &bytes) {
                warn!("fleet: writing {}: {e}", path.display());
            }
        }
        let mut local = self.local();
        local.applied_revision = revision;
        local.seen_revision = local.seen_revision.max(revision);
        local.last_error = None;
        local.from_cache = false;
    }

    /// Records that the rules of `revision` could not be applied.
    pub fn failed(&self, revision: i64, message: &str) {
        let mut local = self.local();
        local.seen_revision = local.seen_revision.max(revision);
        local.last_error = Some(format!("fleet revision {revision}: {message}"));
    }

    /// This node's view, locked.
    pub fn local(&self) -> std::sync::MutexGuard<'_, LocalFleetState> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store, connecting first when needed.
    pub async fn store(&self) -> Result<EtcdStore, EtcdError> {
        let mut slot = self.store.lock().await;
        if let Some(store) = slot.as_ref() {
            return Ok(store.clone());
        }
        let store = EtcdStore::connect(&self.options).await;
        let store = self.note(store)?;
        *slot = Some(store.clone());
        Ok(store)
    }

    /// Notes the outcome of an etcd call in the local view, and passes it on.
    pub fn note<T>(&self, outcome: Result<T, EtcdError>) -> Result<T, EtcdError> {
        let mut local = self.local();
        match &outcome {
            Ok(_) | Err(EtcdError::Conflict { .. }) => {
                local.connected = true;
                local.disconnected_since = None;
                local.etcd_error = None;
            }
            Err(e @ EtcdError::Unavailable { .. }) => {
                if local.connected || local.disconnected_since.is_none() {
                    local.disconnected_since = Some(super::now());
                }
                local.connected = false;
                local.etcd_error = Some(e.to_string());
            }
            Err(_) => {}
        }
        outcome
    }

    /// Notes the newest fleet revision seen in etcd.
    pub fn seen(&self, revision: i64) {
        let mut local = self.local();
        local.seen_revision = local.seen_revision.max(revision);
    }
}

/// Runs the agent until the process ends.
pub async fn run(link: Arc<FleetLink>, controller: Arc<Mutex<Controller>>) {
    let mut was_connected = false;
    loop {
        let outcome = session(&link, &controller, &mut was_connected).await;
        if let Err(e) = link.note(outcome) {
            if was_connected {
                let applied = link.local().applied_revision;
                warn!(
                    applied,
                    "fleet: lost etcd ({e}); forwarding goes on with fleet revision {applied}, \
                     this node is stale until etcd answers again"
                );
                was_connected = false;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn session(
    link: &Arc<FleetLink>,
    controller: &Arc<Mutex<Controller>>,
    was_connected: &mut bool,
) -> Result<(), EtcdError> {
    let store = link.store().await?;
    let mut lease = link.note(store.grant_lease(link.options.lease_ttl_s).await)?;
    let snapshot = link.note(store.read_rules(None).await)?;
    let mut watch = link.note(store.watch_rules(snapshot.etcd_revision + 1).await)?;
    info!(
        revision = snapshot.revision,
        "fleet: connected to etcd ({}), watching {}",
        link.options.endpoints.join(","),
        store.keys().guard()
    );
    *was_connected = true;
    catch_up(link, controller, snapshot).await;
    publish(link, controller, &store, lease).await?;
    let mut tick = tokio::time::interval(link.options.publish_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = watch.message() => {
                let message = link.note(message.map_err(|e| EtcdError::Unavailable {
                    endpoints: link.options.endpoints.join(","),
                    reason: format!("watch: {e}"),
                }))?;
                let Some(message) = message else {
                    return Err(EtcdError::Unavailable {
                        endpoints: link.options.endpoints.join(","),
                        reason: "the watch ended".into(),
                    });
                };
                if message.canceled() {
                    return Err(EtcdError::Unavailable {
                        endpoints: link.options.endpoints.join(","),
                        reason: format!("the watch was cancelled: {}", message.cancel_reason()),
                    });
                }
                if !message.events().is_empty() {
                    let snapshot = link.note(store.read_rules(None).await)?;
                    catch_up(link, controller, snapshot).await;
                    publish(link, controller, &store, lease).await?;
                }
            }
            _ = tick.tick() => {
                if !link.note(store.keep_alive(lease).await)? {
                    lease = link.note(store.grant_lease(link.options.lease_ttl_s).await)?;
                }
                let revision = link.note(store.revision().await)?;
                link.seen(revision);
                publish(link, controller, &store, lease).await?;
            }
        }
    }
}

/// Applies `snapshot` unless its revision is the one in force.
async fn catch_up(
    link: &Arc<FleetLink>,
    controller: &Arc<Mutex<Controller>>,
    snapshot: RulesSnapshot,
) {
    link.seen(snapshot.revision);
    {
        let local = link.local();
        if local.applied_revision == snapshot.revision && local.last_error.is_none() {
            return;
        }
    }
    let controller = controller.clone();
    let _ = tokio::task::spawn_blocking(move || {
        controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .install_fleet(&snapshot, "fleet")
    })
    .await;
}

async fn publish(
    link: &Arc<FleetLink>,
    controller: &Arc<Mutex<Controller>>,
    store: &EtcdStore,
    lease: i64,
) -> Result<(), EtcdError> {
    let controller = controller.clone();
    let mut record: NodeRecord = tokio::task::spawn_blocking(move || {
        controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fleet_record()
    })
    .await
    .unwrap_or_default();
    {
        let local = link.local();
        record.name = local.name.clone();
        record.applied_revision = local.applied_revision;
        record.last_error = local.last_error.clone();
    }
    record.published_at = super::now();
    link.note(store.publish(&record, lease).await)
}
