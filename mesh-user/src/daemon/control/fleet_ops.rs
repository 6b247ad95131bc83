//! The controller's side of a fleet (`meshd --etcd`): a change is checked against the fleet's
//! current revision and written to etcd in one transaction guarded by that revision; the
//! revision etcd then holds is applied here at once (other nodes get it through their watch).
//!
//! Order of a `meshctl apply` on a node of a fleet:
//! 1. read the fleet's rules (linearizable); if this node is behind, apply them first;
//! 2. validate and compile the candidate (fleet rules + submission) against this node, touching
//!    nothing;
//! 3. one etcd transaction: if the guard's mod_revision is still the one read in 1, write the
//!    changed resources and the guard; else answer 409 (another apply won: retry);
//! 4. read the rules at the new revision and apply them here, all-or-nothing.
//!
//! When etcd does not answer (partition, no quorum), step 1 fails and the change is refused
//! with 503; the rules in force keep forwarding.

use std::{sync::Arc, time::Instant};

use tracing::{error, info};

use super::{Controller, Rejection};
use crate::{
    admin::{ApplyResponse, ResourceChange},
    compile::Plan,
    config::ResourceSet,
    dataplane::ApplyReport,
    fleet::{
        agent::FleetLink,
        etcd::{EtcdError, GuardValue, RulesSnapshot},
        BackendCount, InterfaceMode, NodeRecord, ServiceCounters, ServicePath,
    },
};

impl Controller {
    /// The link to the fleet's etcd (None without `--etcd`).
    pub fn fleet_link(&self) -> Option<Arc<FleetLink>> {
        self.fleet.clone()
    }

    /// Step 1: the fleet's rules as the base of a change, applied here first when this node is
    /// behind. None without `--etcd`.
    pub(super) fn fleet_sync(&mut self) -> Result<Option<RulesSnapshot>, Rejection> {
        let Some(link) = self.fleet.clone() else {
            return Ok(None);
        };
        let read = tokio::runtime::Handle::current().block_on(async {
            let store = link.store().await?;
            link.note(store.read_rules(None).await)
        });
        let snapshot = read.map_err(|e| blocked(&link, e))?;
        link.seen(snapshot.revision);
        let behind = {
            let local = link.local();
            local.applied_revision != snapshot.revision || local.last_error.is_some()
        };
        if behind {
            // A failure is recorded; the candidate below is checked on its own anyway.
            let _ = self.install_fleet(&snapshot, "fleet");
        }
        Ok(Some(snapshot))
    }

    /// Steps 2 to 4.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fleet_commit(
        &mut self,
        files: &ResourceSet,
        candidate: ResourceSet,
        trigger: &str,
        dry_run: bool,
        changes: Vec<ResourceChange>,
        started: Instant,
        base: RulesSnapshot,
    ) -> Result<ApplyResponse, Rejection> {
        let link = self.fleet.clone().expect("fleet mode");
        let (_, warnings) = self.install(files, &candidate, trigger, true)?;
        let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        if dry_run {
            return Ok(ApplyResponse {
                changes,
                dry_run,
                services: self.current.services.len(),
                backends: 0,
                written: 0,
                duration_us: started.elapsed().as_micros() as u64,
                warnings,
            });
        }
        let guard = GuardValue {
            node: link.options.node_name.clone(),
            operation: trigger.to_string(),
            at: crate::fleet::now(),
        };
        let written = tokio::runtime::Handle::current().block_on(async {
            let store = link.store().await?;
            let revision = link.note(store.commit(&base, &candidate, &guard).await)?;
            link.note(store.read_rules(Some(revision)).await)
        });
        let snapshot = written.map_err(|e| match e {
            EtcdError::Conflict { .. } => Rejection {
                status: 409,
                message: e.to_string(),
            },
            EtcdError::Unavailable { .. } => Rejection {
                status: 503,
                message: format!(
                    "{e}; the change may or may not have been written: `meshctl status --fleet` \
                     shows the fleet revision once etcd answers"
                ),
            },
            other => Rejection::internal(other.to_string()),
        })?;
        info!(
            revision = snapshot.revision,
            "fleet: {trigger} written to etcd as fleet revision {}", snapshot.revision
        );
        let report = self.install_fleet(&snapshot, trigger)?;
        Ok(ApplyResponse {
            changes,
            dry_run,
            services: report.services,
            backends: report.backends,
            written: report.written,
            duration_us: started.elapsed().as_micros() as u64,
            warnings,
        })
    }

    /// Puts the fleet's rules of `snapshot` in force here (all-or-nothing) and caches them.
    pub fn install_fleet(
        &mut self,
        snapshot: &RulesSnapshot,
        trigger: &str,
    ) -> Result<ApplyReport, Rejection> {
        let link = self.fleet.clone().expect("fleet mode");
        let files = self.store.files().clone();
        let outcome = self
            .install(&files, &snapshot.rules, trigger, false)
            .and_then(|(report, _)| {
                let report = report.expect("not a dry run");
                match self.store.commit_api(snapshot.rules.clone()) {
                    Ok(()) => Ok(report),
                    Err(e) => {
                        // Kernel and cache must agree: put the previous rules back.
                        let previous = self.replaced.take().unwrap_or_default();
                        let _ = self.apply_state(&previous);
                        self.current = previous;
                        Err(Rejection::internal(format!(
                            "{e}; the previous rules were restored"
                        )))
                    }
                }
            });
        match &outcome {
            Ok(report) => {
                link.applied(snapshot.revision);
                info!(
                    revision = snapshot.revision,
                    services = report.services,
                    "fleet: revision {} applied",
                    snapshot.revision
                );
            }
            Err(rejection) => {
                link.failed(snapshot.revision, &rejection.message);
                error!(
                    revision = snapshot.revision,
                    "fleet: revision {} not applied, the previous rules stay in force: {}",
                    snapshot.revision,
                    rejection.message
                );
            }
        }
        outcome
    }

    /// What this node publishes in its node record (the agent adds name and revision).
    pub fn fleet_record(&self) -> NodeRecord {
        let address = |a: &crate::compile::ServiceAddress| {
            format!("{}:{}/{:?}", a.ip, a.port, a.protocol).to_lowercase()
        };
        let services = self
            .current
            .services
            .iter()
            .map(|s| ServicePath {
                name: s.name.clone(),
                address: address(&s.address),
                path: match s.plan {
                    Plan::L4(_) => "kernel".into(),
                    Plan::L7(_) => "proxy".into(),
                },
            })
            .collect();
        let interfaces = self
            .dataplane
            .attachments()
            .map(|a| InterfaceMode {
                name: a.interface.clone(),
                mode: a.hook.name().to_string(),
            })
            .collect();
        let mut counters = Vec::new();
        if let Ok(stats) = self.stats() {
            for service in &stats.services {
                counters.push(ServiceCounters {
                    name: service.name.clone(),
                    address: address(&service.address),
                    backends: service
                        .backends
                        .iter()
                        .map(|b| BackendCount {
                            backend: b.address.to_string(),
                            subset: b.subset.clone().or_else(|| b.version.clone()),
                            count: b.counters.connections,
                            unit: "connections".into(),
                            configured_share: Some(b.configured_share),
                        })
                        .collect(),
                });
            }
            for service in &stats.l7 {
                let mut backends = Vec::new();
                for route in &service.routes {
                    for d in &route.destinations {
                        backends.push(BackendCount {
                            backend: d.destination.clone(),
                            subset: d.subset.clone(),
                            count: d.requests,
                            unit: "requests".into(),
                            configured_share: d.configured_share,
                        });
                    }
                }
                counters.push(ServiceCounters {
                    name: service.name.clone(),
                    address: address(&service.address),
                    backends,
                });
            }
        }
        NodeRecord {
            applied_at: self.last_apply.as_ref().map(|a| a.at).unwrap_or_default(),
            services,
            interfaces,
            counters,
            ..Default::default()
        }
    }
}

/// A change refused because etcd does not answer.
fn blocked(link: &FleetLink, e: EtcdError) -> Rejection {
    let applied = link.local().applied_revision;
    Rejection {
        status: 503,
        message: format!(
            "{e}; changes are blocked until etcd answers (a majority of its members must be up \
             and reachable from this node); forwarding goes on with fleet revision {applied}"
        ),
    }
}
