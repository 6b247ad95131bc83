//! The fleet's rules and node records in etcd, through the `etcd-client` crate (etcd's v3 gRPC
//! API): linearizable reads of the rule set, one guarded transaction per change, leased node
//! records, and memberships.
//!
//! Every request has a time limit per endpoint and goes to the next endpoint when one fails, and
//! the client asks for a leader (`require_leader`), so one dead member costs nothing, and a
//! partitioned node or a cluster without quorum answers "unavailable" within those limits instead
//! of hanging.

use std::collections::BTreeMap;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};

use super::{FleetOptions, Keys, NodeRecord};
use crate::config::{self, Resource, ResourceSet};

/// Errors of the fleet store.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd did not answer (unreachable, partitioned, or no quorum).
    #[error("etcd ({endpoints}) is unavailable: {reason}")]
    Unavailable {
        /// Endpoints tried.
        endpoints: String,
        /// What happened, in etcd's or the transport's words.
        reason: String,
    },
    /// Another change won the race.
    #[error("the fleet's rules changed while this change was being checked (checked against fleet revision {expected}, etcd now holds revision {actual}); nothing was written: run the command again")]
    Conflict {
        /// Revision the change was validated against.
        expected: i64,
        /// Revision in etcd.
        actual: i64,
    },
    /// A value under the prefix is not what mesh writes.
    #[error("etcd key {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Options that cannot work (unreadable certificate, ...).
    #[error("etcd options: {0}")]
    Options(String),
}

/// The rule set at one fleet revision.
#[derive(Clone, Debug, Default)]
pub struct RulesSnapshot {
    /// Fleet revision (mod_revision of the guard; 0 before the first change).
    pub revision: i64,
    /// etcd's revision at the read (a watch from the next one misses nothing).
    pub etcd_revision: i64,
    /// The resources, in creation order.
    pub rules: ResourceSet,
    /// The stored YAML per key (to write only what changes).
    yaml_by_key: BTreeMap<String, String>,
}

/// What the guard key holds: who made the last change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuardValue {
    /// Node whose meshctl made the change.
    pub node: String,
    /// `apply` or `delete`.
    pub operation: String,
    /// Seconds since the epoch.
    pub at: f64,
}

/// A connected fleet store: one client per endpoint, the one that answered last used first
/// (as etcd's own clients pin an endpoint and move on when it fails).
#[derive(Clone)]
pub struct EtcdStore {
    clients: Vec<(String, Client)>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    keys: Keys,
    endpoints: String,
    timeout: std::time::Duration,
}

impl EtcdStore {
    /// Builds the client. Connections are made lazily and re-made after failures, so this
    /// succeeds while etcd is down (except with user authentication, which needs a token).
    pub async fn connect(options: &FleetOptions) -> Result<Self, EtcdError> {
        let endpoints = options.endpoints.join(",");
        let mut connect = ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.request_timeout)
            .with_keep_alive(std::time::Duration::from_secs(1), options.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = tls_options(options)? {
            connect = connect.with_tls(tls);
        }
        if let Some(user) = &options.user {
            let (name, password) = user.split_once(':').ok_or_else(|| {
                EtcdError::Options("--etcd-user must be NAME:PASSWORD".to_string())
            })?;
            connect = connect.with_user(name, password);
        }
        let mut clients = Vec::new();
        let mut failures = Vec::new();
        for endpoint in &options.endpoints {
            let made = tokio::time::timeout(
                options.request_timeout,
                Client::connect([endpoint.as_str()], Some(connect.clone())),
            )
            .await;
            match made {
                Ok(Ok(client)) => clients.push((endpoint.clone(), client)),
                Ok(Err(e)) => failures.push(format!("{endpoint}: {}", short(&e))),
                Err(_) => failures.push(format!(
                    "{endpoint}: no answer within {:?}",
                    options.request_timeout
                )),
            }
        }
        if clients.is_empty() {
            return Err(EtcdError::Unavailable {
                endpoints,
                reason: failures.join("; "),
            });
        }
        Ok(Self {
            clients,
            current: Default::default(),
            keys: Keys::new(&options.prefix),
            endpoints,
            timeout: options.request_timeout,
        })
    }

    /// The keys of this fleet.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `request` on the endpoint that answered last, then on the others in turn, and
    /// again while the time budget (three request timeouts) lasts: a leader election after a
    /// lost member answers "leader changed" or nothing for about a second, then works.
    async fn call<T, F, Fut>(&self, mut request: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let deadline = tokio::time::Instant::now() + self.timeout * 3;
        let mut failures = Vec::new();
        loop {
            failures.clear();
            let first = self.current.load(Ordering::Relaxed);
            for k in 0..self.clients.len() {
                let i = (first + k) % self.clients.len();
                let (endpoint, client) = &self.clients[i];
                match tokio::time::timeout(self.timeout, request(client.clone())).await {
                    Ok(Ok(value)) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(value);
                    }
                    Ok(Err(e)) => failures.push(format!("{endpoint}: {}", short(&e))),
                    Err(_) => {
                        failures.push(format!("{endpoint}: no answer within {:?}", self.timeout))
                    }
                }
            }
            if tokio::time::Instant::now() + self.timeout / 2 > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(self.unavailable(format!(
            "{} (partitioned from the cluster, or the cluster has no quorum)",
            failures.join("; ")
        )))
    }

    fn unavailable(&self, reason: String) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason,
        }
    }

    /// The rule set, read linearizably (at `revision` when given: an etcd revision, not a fleet
    /// revision).
    pub async fn read_rules(&self, revision: Option<i64>) -> Result<RulesSnapshot, EtcdError> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(revision) = revision {
            options = options.with_revision(revision);
        }
        let key = self.keys.guard();
        let answer = self
            .call(|mut c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.get(key, Some(options)).await }
            })
            .await?;
        let guard = self.keys.guard();
        let resources_prefix = self.keys.resources_prefix();
        let mut snapshot = RulesSnapshot {
            etcd_revision: answer.header().map(|h| h.revision()).unwrap_or_default(),
            ..Default::default()
        };
        let mut ordered: Vec<(i64, String, Resource)> = Vec::new();
        for item in answer.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            if key == guard {
                snapshot.revision = item.mod_revision();
                continue;
            }
            if !key.starts_with(&resources_prefix) {
                continue;
            }
            let text = String::from_utf8_lossy(item.value()).into_owned();
            let set = config::parse_str(&format!("etcd:{key}"), &text).map_err(|e| {
                EtcdError::Corrupt {
                    key: key.clone(),
                    message: e.to_string(),
                }
            })?;
            if set.resources.len() != 1 {
                return Err(EtcdError::Corrupt {
                    key,
                    message: format!("holds {} resources, expected one", set.resources.len()),
                });
            }
            let resource = set.resources.into_iter().next().expect("one resource");
            snapshot.yaml_by_key.insert(key.clone(), text);
            ordered.push((item.create_revision(), key, resource));
        }
        ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        snapshot.rules.resources = ordered.into_iter().map(|(_, _, r)| r).collect();
        Ok(snapshot)
    }

    /// Writes `candidate` as the whole rule set in one transaction, if the fleet is still at
    /// `base.revision`. Returns the etcd revision of the change (the new fleet revision).
    pub async fn commit(
        &self,
        base: &RulesSnapshot,
        candidate: &ResourceSet,
        guard: &GuardValue,
    ) -> Result<i64, EtcdError> {
        let mut ops = Vec::new();
        let mut kept = std::collections::HashSet::new();
        for resource in &candidate.resources {
            let (kind, namespace, name) = resource.key();
            let key = self.keys.resource(kind, namespace, name);
            let yaml = resource_yaml(resource);
            if base.yaml_by_key.get(&key) != Some(&yaml) {
                ops.push(TxnOp::put(key.clone(), yaml, None));
            }
            kept.insert(key);
        }
        for key in base.yaml_by_key.keys() {
            if !kept.contains(key) {
                ops.push(TxnOp::delete(key.clone(), None));
            }
        }
        let value = serde_json::to_string(guard).expect("guard serialises");
        ops.push(TxnOp::put(self.keys.guard(), value.clone(), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.keys.guard(),
                CompareOp::Equal,
                base.revision,
            )])
            .and_then(ops)
            .or_else([TxnOp::get(self.keys.guard(), None)]);
        let answer = self
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = answer.header().map(|h| h.revision()).unwrap_or_default();
        if answer.succeeded() {
            return Ok(revision);
        }
        let guard_now = answer.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| (kv.mod_revision(), kv.value().to_vec())),
            _ => None,
        });
        match guard_now {
            // An attempt that timed out on another endpoint did go through: it is our write.
            Some((actual, written)) if written == value.as_bytes() => Ok(actual),
            other => Err(EtcdError::Conflict {
                expected: base.revision,
                actual: other.map(|(r, _)| r).unwrap_or_default(),
            }),
        }
    }

    /// The fleet revision alone (the guard's mod_revision), read linearizably.
    pub async fn revision(&self) -> Result<i64, EtcdError> {
        let key = self.keys.guard();
        let answer = self
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(answer
            .kvs()
            .first()
            .map(|kv| kv.mod_revision())
            .unwrap_or(0))
    }

    /// Grants a lease of `ttl_s` seconds.
    pub async fn grant_lease(&self, ttl_s: i64) -> Result<i64, EtcdError> {
        let granted = self
            .call(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .await?;
        Ok(granted.id())
    }

    /// Renews `lease`; false when it has expired (the record went with it).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        // The crate sends one renewal and reads its answer; an expired lease is an error there.
        match self
            .call(|mut c| async move { c.lease_keep_alive(lease).await })
            .await
        {
            Ok(_) => Ok(true),
            Err(EtcdError::Unavailable { reason, .. }) if reason.contains("lease not found") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes this node's record under `lease`, and its membership once.
    pub async fn publish(&self, record: &NodeRecord, lease: i64) -> Result<(), EtcdError> {
        let value = serde_json::to_string(record).expect("record serialises");
        let member = self.keys.member(&record.name);
        let joined = serde_json::json!({ "joined_at": super::now() }).to_string();
        let txn = Txn::new().and_then([
            TxnOp::put(
                self.keys.node(&record.name),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(
                        member.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(member, joined, None)]),
            ),
        ]);
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    /// Every member with its record (None when its lease expired).
    pub async fn nodes(&self) -> Result<Vec<(String, Option<NodeRecord>)>, EtcdError> {
        let get_prefix = |prefix: String| {
            self.call(move |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
        };
        let members = get_prefix(self.keys.members_prefix()).await?;
        let records = get_prefix(self.keys.nodes_prefix()).await?;
        let mut out: BTreeMap<String, Option<NodeRecord>> = BTreeMap::new();
        let members_prefix = self.keys.members_prefix();
        for item in members.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            if let Some(name) = key.strip_prefix(&members_prefix) {
                out.insert(name.to_string(), None);
            }
        }
        let nodes_prefix = self.keys.nodes_prefix();
        for item in records.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            let Some(name) = key.strip_prefix(&nodes_prefix) else {
                continue;
            };
            let record: NodeRecord =
                serde_json::from_slice(item.value()).map_err(|e| EtcdError::Corrupt {
                    key: key.clone(),
                    message: e.to_string(),
                })?;
            out.insert(name.to_string(), Some(record));
        }
        Ok(out.into_iter().collect())
    }

    /// A watch on the rules (guard and resources) from etcd revision `from`.
    pub async fn watch_rules(&self, from: i64) -> Result<etcd_client::WatchStream, EtcdError> {
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(from);
        let key = self.keys.guard();
        self.call(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.watch(key, Some(options)).await }
        })
        .await
    }
}

/// An etcd client error in few words: gRPC's message and the innermost cause ("tcp connect
/// error: Connection refused (os error 111)", "etcdserver: no leader").
fn short(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return e.to_string();
    };
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    match innermost {
        Some(c) => format!("{}: {c}", status.message()),
        None => status.message().to_string(),
    }
}

/// One resource as stored in etcd.
fn resource_yaml(resource: &Resource) -> String {
    ResourceSet {
        resources: vec![resource.clone()],
        ..Default::default()
    }
    .to_yaml()
}

fn tls_options(options: &FleetOptions) -> Result<Option<TlsOptions>, EtcdError> {
    if options.cacert.is_none() && options.cert.is_none() {
        return Ok(None);
    }
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|e| EtcdError::Options(format!("{}: {e}", path.display())))
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &options.cacert {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Options(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    }
    Ok(Some(tls))
}
