//! The controller: the one place that changes the rules in force.
//!
//! Every change (startup, files changed, SIGHUP, `meshctl apply`, `meshctl delete`) follows the
//! same path: build the candidate rule set, compile it against this node, write it to the
//! dataplane (only the services that changed, each switched atomically), then commit it to the
//! store (which persists the API layer). Any error before the first switch leaves the kernel
//! byte-for-byte as it was.
//!
//! With `meshd --etcd`, the API layer is the fleet's: see `fleet_ops` for how a change is checked
//! against the fleet's revision and written to etcd.

mod fleet_ops;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime},
};

use crate::{
    admin::{
        ApplyRecord, ApplyRequest, ApplyResponse, DeleteRequest, InterfaceStatus, MapStatus,
        ResourceChange, ResourceEntry, Status,
    },
    compile::{self, DesiredState, NodeContext},
    config::{self, ResourceSet},
    dataplane::{ApplyReport, Dataplane, StatsSnapshot},
    fleet::{agent::FleetLink, etcd::RulesSnapshot},
    metrics::Metrics,
    store::{journal::Change, Layer, RuleStore},
    validate::Warning,
};

/// A rejected request: an HTTP status and a precise message.
#[derive(Debug)]
pub struct Rejection {
    /// HTTP status to answer with.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

impl Rejection {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
    }
}

/// The API layer a request would leave, and the change that makes it from the current one
/// (what the state file's journal records).
struct Candidate {
    api: ResourceSet,
    change: Change,
}

/// Owns the dataplane, the rule store and the node facts.
pub struct Controller {
    dataplane: Dataplane,
    store: RuleStore,
    node: NodeContext,
    config_path: Option<PathBuf>,
    state_file: Option<PathBuf>,
    last_apply: Option<ApplyRecord>,
    current: DesiredState,
    /// The state the last install replaced, to put back if persisting the new rules fails.
    replaced: Option<DesiredState>,
    started: Instant,
    /// The L7 proxy (None: L7 services get their SERVICES entry but nobody serves them, as in
    /// tests of the controller alone).
    proxy: Option<crate::proxy::Proxy>,
    /// The fleet's etcd, when the API layer lives there (`meshd --etcd`).
    fleet: Option<Arc<FleetLink>>,
    /// The socket hooks for node-local clients, when attached.
    socket_lb: Option<crate::dataplane::SocketLbStatus>,
    /// Apply counters and durations for the metrics endpoint.
    pub metrics: Metrics,
    /// Local routes that make the stack refuse services routed to nothing.
    refusals: Option<super::refusals::Refusals>,
}

impl Controller {
    /// A controller over a loaded (not yet configured) dataplane.
    pub fn new(
        dataplane: Dataplane,
        store: RuleStore,
        node: NodeContext,
        config_path: Option<PathBuf>,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            dataplane,
            store,
            node,
            config_path,
            state_file,
            last_apply: None,
            current: DesiredState::default(),
            replaced: None,
            started: Instant::now(),
            proxy: None,
            fleet: None,
            socket_lb: None,
            metrics: Metrics::default(),
            refusals: None,
        }
    }

    /// Serves L7 services with `proxy`.
    pub fn with_proxy(mut self, proxy: crate::proxy::Proxy) -> Self {
        self.proxy = Some(proxy);
        self.refusals = Some(super::refusals::Refusals::default());
        self
    }

    /// Keeps the API layer in the fleet's etcd behind `link`.
    pub fn with_fleet(mut self, link: Arc<FleetLink>) -> Self {
        self.fleet = Some(link);
        self
    }

    /// Removes what the proxy and the refusals added to the node (local routes); at exit.
    pub fn shutdown_proxy(&mut self) {
        if let Some(proxy) = &self.proxy {
            proxy.shutdown();
        }
        if let Some(refusals) = &mut self.refusals {
            refusals.shutdown();
        }
    }

    /// Writes `state` to the dataplane with the proxy around the flip: listeners for new L7
    /// addresses open before it, listeners of addresses that left close (drain) after it.
    fn apply_state(&mut self, state: &DesiredState) -> Result<ApplyReport, String> {
        if let Some(refusals) = &mut self.refusals {
            refusals.prepare(state);
        }
        let result = self.apply_to_dataplane_and_proxy(state);
        if let Some(refusals) = &mut self.refusals {
            refusals.commit(if result.is_ok() { state } else { &self.current });
        }
        result
    }

    fn apply_to_dataplane_and_proxy(
        &mut self,
        state: &DesiredState,
    ) -> Result<ApplyReport, String> {
        if let Some(proxy) = &self.proxy {
            if let Err(e) = proxy.prepare(state) {
                // Nothing flipped: the rules in force stay served as they were.
                proxy.commit(&self.current);
                return Err(e.to_string());
            }
        }
        match self.dataplane.apply(state) {
            Ok(report) => {
                if let Some(proxy) = &self.proxy {
                    proxy.commit(state);
                }
                Ok(report)
            }
            Err(e) => {
                if let Some(proxy) = &self.proxy {
                    proxy.commit(&self.current);
                }
                Err(e.to_string())
            }
        }
    }

    /// The dataplane (for attaching).
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Attaches the socket hooks for node-local clients (shown by `meshctl status`).
    pub fn attach_sockets(
        &mut self,
        options: &crate::dataplane::SocketLbOptions,
    ) -> Result<(), crate::dataplane::sockets::SocketLbError> {
        self.socket_lb = Some(self.dataplane.attach_sockets(options)?);
        Ok(())
    }

    /// Reads the --config files (if any), combines them with the restored API layer, and installs
    /// the result. Used at startup and when the files change.
    pub fn load_files(&mut self, trigger: &str) -> Result<ApplyReport, Rejection> {
        let files = match &self.config_path {
            // A watched directory may be empty (rules then come from meshctl only).
            Some(path) => match config::load_path(path) {
                Err(config::ConfigError::EmptyDirectory { .. }) => Ok(ResourceSet::default()),
                other => other.map_err(|e| Rejection::bad_request(e.to_string())),
            },
            None => Ok(ResourceSet::default()),
        };
        let files = match files {
            Ok(files) => files,
            Err(rejection) => {
                self.record(trigger, Err(&rejection.message), 0);
                return Err(rejection);
            }
        };
        let api = self.store.api().clone();
        let (report, _) = self.install(&files, &api, trigger, false)?;
        let report = report.expect("not a dry run");
        for notice in &files.notices {
            tracing::info!(trigger, "{notice}");
        }
        self.store.commit_files(files);
        Ok(report)
    }

    /// `meshctl apply`: all documents together or nothing.
    pub fn apply(&mut self, request: ApplyRequest) -> Result<ApplyResponse, Rejection> {
        let started = Instant::now();
        if request.documents.is_empty() {
            return Err(Rejection::bad_request("nothing to apply: no documents"));
        }
        let mut incoming = ResourceSet::default();
        let mut errors = Vec::new();
        for doc in &request.documents {
            match config::parse_str(&doc.source, &doc.yaml) {
                Ok(set) => {
                    incoming.resources.extend(set.resources);
                    incoming.notices.extend(set.notices);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() && incoming.resources.is_empty() {
            errors.push(format!(
                "nothing to apply: no Istio networking resource in the submission\n{}",
                incoming.notices.join("\n")
            ));
        }
        if !errors.is_empty() {
            let message = errors.join("\n");
            self.record("apply", Err(&message), started.elapsed().as_micros() as u64);
            return Err(Rejection::bad_request(message));
        }
        for notice in &incoming.notices {
            tracing::info!("apply: {notice}");
        }
        let mut warnings = std::mem::take(&mut incoming.notices);
        let submitted: std::collections::HashSet<String> = incoming
            .resources
            .iter()
            .map(|r| r.display_name())
            .collect();
        // Within one submission a resource may appear once: a second copy is almost always a
        // mistake (two files defining the same rule), and silently keeping one would hide it.
        let first_of = incoming.index_by_key();
        for (i, resource) in incoming.resources.iter().enumerate() {
            let (kind, namespace, name) = resource.key();
            let first = first_of
                .get(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
                .filter(|first| **first != i)
                .map(|first| &incoming.resources[*first]);
            if let Some(first) = first {
                let message = format!(
                    "{}: duplicate resource: {} is defined twice in this submission (first in {})",
                    resource.source,
                    resource.display_name(),
                    first.source
                );
                self.record("apply", Err(&message), 0);
                return Err(Rejection::bad_request(message));
            }
        }
        let base = self.fleet_sync()?;
        let existing = self.store.api().index_by_key();
        let changes: Vec<ResourceChange> = incoming
            .resources
            .iter()
            .map(|r| {
                let (kind, namespace, name) = r.key();
                let found = existing
                    .get(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
                    .map(|i| &self.store.api().resources[*i]);
                let action = match found {
                    None => "created",
                    Some(existing) if existing.kind == r.kind && existing.meta == r.meta => {
                        "unchanged"
                    }
                    Some(_) => "configured",
                };
                ResourceChange {
                    resource: r.display_name(),
                    action: action.into(),
                }
            })
            .collect();
        // What the state file's journal records: the submission alone.
        let change = Change::Apply(incoming.to_yaml());
        let candidate = self.store.api_with_applied(incoming);
        let files = self.store.files().clone();
        let mut response = self.install_and_commit(
            &files,
            Candidate {
                api: candidate,
                change,
            },
            "apply",
            request.dry_run,
            changes,
            started,
            base,
        )?;
        // What the submission is warned about (not every warning of the rules in force).
        warnings.extend(response.warnings.drain(..).filter(|w| {
            submitted
                .iter()
                .any(|name| w.contains(&format!("({name})")))
        }));
        response.warnings = warnings;
        Ok(response)
    }

    /// `meshctl delete`: all named resources or nothing.
    pub fn delete(&mut self, request: DeleteRequest) -> Result<ApplyResponse, Rejection> {
        let started = Instant::now();
        let keys: Vec<(String, String, String)> = request
            .resources
            .iter()
            .map(|r| (r.kind.clone(), r.namespace.clone(), r.name.clone()))
            .collect();
        let base = self.fleet_sync()?;
        let candidate = self.store.api_with_deleted(&keys).map_err(|e| Rejection {
            status: 404,
            message: e.to_string(),
        })?;
        let changes = request
            .resources
            .iter()
            .map(|r| ResourceChange {
                resource: format!("{} {}/{}", r.kind, r.namespace, r.name),
                action: "deleted".into(),
            })
            .collect();
        let files = self.store.files().clone();
        self.install_and_commit(
            &files,
            Candidate {
                api: candidate,
                change: Change::Delete(keys),
            },
            "delete",
            request.dry_run,
            changes,
            started,
            base,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn install_and_commit(
        &mut self,
        files: &ResourceSet,
        candidate: Candidate,
        trigger: &str,
        dry_run: bool,
        changes: Vec<ResourceChange>,
        started: Instant,
        base: Option<RulesSnapshot>,
    ) -> Result<ApplyResponse, Rejection> {
        let Candidate {
            api: candidate,
            change,
        } = candidate;
        if let Some(base) = base {
            return self.fleet_commit(files, candidate, trigger, dry_run, changes, started, base);
        }
        let report = self.install(files, &candidate, trigger, dry_run)?;
        if !dry_run {
            crate::progress::set(format!("{trigger}: writing the state file"));
            let persisting = Instant::now();
            let committed = self.store.commit_change(candidate, &change);
            crate::progress::clear();
            tracing::info!(
                trigger,
                persist_us = persisting.elapsed().as_micros() as u64,
                prepare_us = (persisting - started).as_micros() as u64,
                "rules persisted"
            );
            if let Err(e) = committed {
                // Kernel and disk must agree: put the previous rules back.
                let previous = self.replaced.take().unwrap_or_default();
                let _ = self.apply_state(&previous);
                self.current = previous;
                let message = format!("{e}; the previous rules were restored");
                self.record(trigger, Err(&message), started.elapsed().as_micros() as u64);
                return Err(Rejection::internal(message));
            }
        }
        let (report, warnings) = report;
        let (services, backends, written) = match &report {
            Some(r) => (r.services, r.backends, r.written),
            None => (self.current.services.len(), 0, 0),
        };
        Ok(ApplyResponse {
            changes,
            dry_run,
            services,
            backends,
            written,
            duration_us: started.elapsed().as_micros() as u64,
            warnings: warnings.iter().map(ToString::to_string).collect(),
        })
    }

    /// Compiles `files` + `api` and (unless `dry_run`) writes the result to the dataplane.
    /// Returns the dataplane's report (none for a dry run) and validation's warnings, which are
    /// also logged.
    fn install(
        &mut self,
        files: &ResourceSet,
        api: &ResourceSet,
        trigger: &str,
        dry_run: bool,
    ) -> Result<(Option<ApplyReport>, Vec<Warning>), Rejection> {
        let started = Instant::now();
        let resources = files.resources.len() + api.resources.len();
        crate::progress::set(format!("{trigger}: compiling {resources} resources"));
        let result = RuleStore::combine(files, api)
            .map_err(|e| Rejection::bad_request(e.to_string()))
            .and_then(|combined| {
                compile::compile_rules(&combined, &self.node)
                    .map_err(|e| Rejection::bad_request(e.to_string()))
            });
        let compiled_us = started.elapsed().as_micros() as u64;
        let mut state = match result {
            Ok(state) => state,
            Err(rejection) => {
                crate::progress::clear();
                self.record(
                    trigger,
                    Err(&rejection.message),
                    started.elapsed().as_micros() as u64,
                );
                return Err(rejection);
            }
        };
        for warning in &state.warnings {
            tracing::warn!(trigger, "{warning}");
        }
        if dry_run {
            crate::progress::clear();
            return Ok((None, state.warnings));
        }
        self.dataplane.stabilise(&mut state);
        crate::progress::set(format!(
            "{trigger}: writing the tables of {} services",
            state.services.len()
        ));
        let result = self.apply_state(&state);
        crate::progress::clear();
        match result {
            Ok(report) => {
                tracing::info!(
                    trigger,
                    resources,
                    services = report.services,
                    written = report.written,
                    compile_us = compiled_us,
                    kernel_us = report.duration.as_micros() as u64,
                    total_us = started.elapsed().as_micros() as u64,
                    "rules compiled and written"
                );
                let warnings = state.warnings.clone();
                // Kept (not cloned beforehand: 30 000 plans) in case the store refuses it.
                self.replaced = Some(std::mem::replace(&mut self.current, state));
                self.record(trigger, Ok(()), started.elapsed().as_micros() as u64);
                Ok((Some(report), warnings))
            }
            Err(message) => {
                self.record(trigger, Err(&message), started.elapsed().as_micros() as u64);
                Err(Rejection::bad_request(message))
            }
        }
    }

    fn record(&mut self, trigger: &str, outcome: Result<(), &str>, duration_us: u64) {
        self.metrics
            .record_apply(outcome.is_ok(), duration_us as f64 / 1e6);
        self.last_apply = Some(ApplyRecord {
            at: now(),
            trigger: trigger.into(),
            ok: outcome.is_ok(),
            error: outcome.err().map(str::to_string),
            duration_us,
        });
    }

    /// Every resource in force, filtered.
    pub fn resources(
        &self,
        kind: Option<&str>,
        name: Option<&str>,
        namespace: Option<&str>,
    ) -> Vec<ResourceEntry> {
        self.store
            .all()
            .into_iter()
            .filter(|(_, r)| kind.is_none_or(|k| r.kind.kind_name().eq_ignore_ascii_case(k)))
            .filter(|(_, r)| name.is_none_or(|n| r.meta.name == n))
            .filter(|(_, r)| namespace.is_none_or(|n| r.meta.namespace == n))
            .map(|(layer, r)| ResourceEntry {
                layer: match layer {
                    Layer::File => "file".into(),
                    Layer::Api => "api".into(),
                },
                kind: r.kind.kind_name().into(),
                namespace: r.meta.namespace.clone(),
                name: r.meta.name.clone(),
                source: r.source.file.clone(),
                resource: serde_json::to_value(r).unwrap_or_default(),
            })
            .collect()
    }

    /// Every service address in force: path, reason, subsets, endpoints (`meshctl get services`).
    pub fn services(&self) -> Vec<crate::admin::services::ServiceView> {
        crate::admin::services::services(&self.current)
    }

    /// Kernel counters, plus the L7 proxy's per route and destination.
    pub fn stats(&self) -> Result<StatsSnapshot, Rejection> {
        let mut snapshot = self
            .dataplane
            .stats()
            .map_err(|e| Rejection::internal(e.to_string()))?;
        if let Some(proxy) = &self.proxy {
            snapshot.l7 = proxy.stats();
        }
        Ok(snapshot)
    }

    /// What `meshctl status` shows.
    pub fn status(&self) -> Status {
        let fill = self.dataplane.fill_levels();
        let conntrack = fill
            .iter()
            .find(|m| m.name == mesh_common::map_names::CONNTRACK);
        let status = Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            interfaces: self
                .dataplane
                .attachments()
                .map(|a| InterfaceStatus {
                    name: a.interface.clone(),
                    ifindex: a.ifindex,
                    mode: a.hook.name().to_string(),
                    reason: a.reason.clone(),
                    peer_redirect: a.peer_redirect,
                    program_id: self.dataplane.program_id(a.hook),
                })
                .collect(),
            conntrack_entries: conntrack.map(|m| m.used).unwrap_or(0),
            conntrack_capacity: conntrack.map(|m| m.capacity).unwrap_or(0),
            map_memory_bytes: fill.iter().map(|m| m.memory_bytes).sum(),
            progress: crate::progress::current(),
            maps: fill
                .into_iter()
                .map(|m| MapStatus {
                    name: m.name,
                    used: m.used,
                    capacity: m.capacity,
                    memory_bytes: m.memory_bytes,
                })
                .collect(),
            resources: self.store.all().len(),
            services: self.current.services.len(),
            last_apply: self.last_apply.clone(),
            state_file: self.state_file.as_ref().map(|p| p.display().to_string()),
            fleet: self.fleet.as_ref().map(|f| f.local().clone()),
            pin_dir: self
                .dataplane
                .options()
                .pin_dir
                .as_ref()
                .map(|p| p.display().to_string()),
            pin_layout: self
                .dataplane
                .pin_report()
                .map(|r| crate::admin::PinLayoutStatus {
                    version: r.layout_version,
                    notes: r.notes.clone(),
                }),
            kernel: Some(crate::dataplane::features::current().clone()),
            socket_lb: self.socket_lb.clone().map(|mut s| {
                s.counters = self.dataplane.socket_counters();
                s
            }),
        };
        crate::progress::remember(&status);
        status
    }

    /// Prometheus text for the kernel counters plus the apply metrics.
    pub fn render_metrics(&self) -> String {
        let snapshot = self.dataplane.stats().ok();
        let fill = self.dataplane.fill_levels();
        let text = self.metrics.render(snapshot.as_ref(), &fill);
        // One exposition: the proxy's and the socket hooks' families go before the closing
        // `# EOF`.
        let body = text.strip_suffix("# EOF\n").unwrap_or(&text);
        let proxy = self
            .proxy
            .as_ref()
            .map(|p| p.render_metrics())
            .unwrap_or_default();
        let sockets = match &self.socket_lb {
            Some(_) => {
                crate::dataplane::sockets::render_prometheus(&self.dataplane.socket_counters())
            }
            None => String::new(),
        };
        format!("{body}{proxy}{sockets}# EOF\n")
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
