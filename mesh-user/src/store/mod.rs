//! The rules in force and where they came from.
//!
//! Two layers make up the rule set: the *files* layer (`meshd --config PATH`, re-read when the
//! files change or on SIGHUP) and the *API* layer (`meshctl apply` / `delete`). A resource lives
//! in exactly one layer: defining the same kind/namespace/name in both is an error, so a file can
//! never be silently shadowed. The API layer is persisted to the state file and restored when
//! meshd starts: the state file is a snapshot (temp file, fsync, rename, fsync of the directory)
//! and each acknowledged change after it is one fsynced record of its [`journal`], so a change
//! costs what it touches. When the journal outgrows the snapshot, the snapshot is rewritten with
//! the next *generation* and the journal restarts empty for it (a crash between the two leaves a
//! journal of the old generation, which is then known to be in the snapshot already).
//!
//! The store never changes by itself: callers build a candidate, compile and apply it, and only
//! then [`RuleStore::commit_api`] or [`RuleStore::commit_files`].

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use crate::config::{self, Resource, ResourceSet};

pub mod journal;

use journal::{Change, Journal};

/// The journal is folded into a new snapshot when it grows past the snapshot's size or this,
/// whichever is larger (so the journal never costs more to replay than the snapshot to read).
const COMPACT_AFTER_BYTES: u64 = 64 << 10;

/// Errors of the rule store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The persisted state could not be read or parsed.
    #[error("state file {path}: {message}")]
    Corrupt {
        /// State file path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Writing the state file failed.
    #[error("writing state file {path}: {source}")]
    Write {
        /// State file path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A resource is defined both in --config files and through the API.
    #[error("{incoming}: {resource} is defined in {file} (meshd --config) and cannot also be applied with meshctl; change it in the file, or remove it there first")]
    Conflict {
        /// Where the API copy came from.
        incoming: String,
        /// The resource.
        resource: String,
        /// The file defining it.
        file: String,
    },
    /// `delete` named something that does not exist.
    #[error("{0} not found")]
    NotFound(String),
}

/// Which layer a resource belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// From `meshd --config`.
    File,
    /// From `meshctl apply`.
    Api,
}

/// The two layers and the state file.
#[derive(Debug, Default)]
pub struct RuleStore {
    files: ResourceSet,
    api: ResourceSet,
    state_file: Option<PathBuf>,
    /// The snapshot's generation (see the module doc).
    generation: u64,
    /// Size of the snapshot on disk.
    snapshot_bytes: u64,
    /// Where changes after the snapshot go (opened on the first change).
    journal: Option<Journal>,
    /// Bytes of valid journal records found at open (0: start a fresh journal).
    journal_valid: u64,
}

impl RuleStore {
    /// Opens the store, restoring the API layer from `state_file` when it exists.
    pub fn open(state_file: Option<PathBuf>) -> Result<Self, StoreError> {
        let mut store = RuleStore {
            state_file,
            ..Default::default()
        };
        if let Some(path) = store.state_file.clone() {
            let path = &path;
            let corrupt = |message: String| StoreError::Corrupt {
                path: path.display().to_string(),
                message,
            };
            match fs::read(path) {
                Ok(bytes) => {
                    let text = String::from_utf8(bytes).map_err(|e| {
                        corrupt(format!(
                            "not UTF-8 text (byte {})",
                            e.utf8_error().valid_up_to()
                        ))
                    })?;
                    store.snapshot_bytes = text.len() as u64;
                    store.generation = generation_of(&text);
                    store.api =
                        decode_state(&path.display().to_string(), &text).map_err(corrupt)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(corrupt(e.to_string())),
            }
            store.replay_journal(path)?;
        }
        Ok(store)
    }

    /// Applies the journal's records of this snapshot's generation to the restored API layer.
    fn replay_journal(&mut self, state_file: &Path) -> Result<(), StoreError> {
        let path = journal::path_of(state_file);
        let label = path.display().to_string();
        let corrupt = |message: String| StoreError::Corrupt {
            path: label.clone(),
            message: format!(
                "{message}; meshd does not start rather than lose the rules it acknowledged: \
                 repair the file or move it away"
            ),
        };
        let replay = journal::read(&path, self.generation).map_err(corrupt)?;
        if replay.torn_tail {
            tracing::warn!(
                journal = %label,
                "the last journal record was cut short (meshd stopped while writing it, before \
                 acknowledging it): dropped"
            );
        }
        for change in replay.changes {
            match change {
                Change::Apply(yaml) => {
                    let set = config::parse_own_state(&label, &yaml)
                        .map_err(|e| corrupt(e.to_string()))?;
                    self.api.merge(set);
                }
                Change::Delete(keys) => self.api.resources.retain(|r| {
                    let (kind, namespace, name) = r.key();
                    !keys
                        .iter()
                        .any(|(k, ns, n)| k == kind && ns == namespace && n == name)
                }),
            }
        }
        self.journal_valid = replay.bytes;
        Ok(())
    }

    /// The API layer.
    pub fn api(&self) -> &ResourceSet {
        &self.api
    }

    /// The files layer.
    pub fn files(&self) -> &ResourceSet {
        &self.files
    }

    /// Every resource with its layer, files first.
    pub fn all(&self) -> Vec<(Layer, &Resource)> {
        self.files
            .resources
            .iter()
            .map(|r| (Layer::File, r))
            .chain(self.api.resources.iter().map(|r| (Layer::Api, r)))
            .collect()
    }

    /// The rule set that `files` and `api` layers give together, or a conflict.
    pub fn combine<'a>(
        files: &ResourceSet,
        api: &'a ResourceSet,
    ) -> Result<std::borrow::Cow<'a, ResourceSet>, StoreError> {
        if files.resources.is_empty() {
            // Only meshctl's rules (the usual case): nothing to copy.
            return Ok(std::borrow::Cow::Borrowed(api));
        }
        let in_files = files.index_by_key();
        for resource in &api.resources {
            let (kind, namespace, name) = resource.key();
            let found = in_files.get(&(kind.to_owned(), namespace.to_owned(), name.to_owned()));
            if let Some(file) = found.map(|i| &files.resources[*i]) {
                return Err(StoreError::Conflict {
                    incoming: resource.source.to_string(),
                    resource: resource.display_name(),
                    file: file.source.file.clone(),
                });
            }
        }
        let mut all = files.clone();
        all.resources.extend(api.resources.iter().cloned());
        Ok(std::borrow::Cow::Owned(all))
    }

    /// The API layer as it would be after applying `incoming` (kubectl-apply semantics).
    pub fn api_with_applied(&self, incoming: ResourceSet) -> ResourceSet {
        let mut api = self.api.clone();
        api.merge(incoming);
        api
    }

    /// The API layer without the named resources (kind, namespace, name).
    pub fn api_with_deleted(
        &self,
        keys: &[(String, String, String)],
    ) -> Result<ResourceSet, StoreError> {
        let mut api = self.api.clone();
        for (kind, namespace, name) in keys {
            let before = api.resources.len();
            api.resources.retain(|r| {
                !(r.kind.kind_name() == kind
                    && r.meta.namespace == *namespace
                    && r.meta.name == *name)
            });
            if api.resources.len() == before {
                let in_files = self.files.resources.iter().any(|r| {
                    r.kind.kind_name() == kind
                        && r.meta.namespace == *namespace
                        && r.meta.name == *name
                });
                let what = format!("{kind} {namespace}/{name}");
                return Err(if in_files {
                    StoreError::NotFound(format!(
                        "{what} comes from meshd --config files (remove it there);"
                    ))
                } else {
                    StoreError::NotFound(what)
                });
            }
        }
        Ok(api)
    }

    /// Makes `api` the API layer, persisting it first as a new snapshot.
    pub fn commit_api(&mut self, api: ResourceSet) -> Result<(), StoreError> {
        self.write_snapshot(&api)?;
        self.api = api;
        Ok(())
    }

    /// Makes `api` the API layer, where `api` is the current layer with `change` made: persists
    /// only the change (one journal record), folding the journal into a new snapshot when it
    /// has grown past the snapshot.
    pub fn commit_change(&mut self, api: ResourceSet, change: &Change) -> Result<(), StoreError> {
        let Some(path) = self.state_file.clone() else {
            self.api = api;
            return Ok(());
        };
        if self.snapshot_bytes == 0 {
            // No snapshot yet: the first one holds the change.
            self.write_snapshot(&api)?;
            self.api = api;
            return Ok(());
        }
        let write_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Write { path, source }
        };
        if self.journal.is_none() {
            let journal_path = journal::path_of(&path);
            let opened = Journal::open(&journal_path, self.generation, self.journal_valid)
                .map_err(write_err(&journal_path))?;
            self.journal = Some(opened);
        }
        let journal = self.journal.as_mut().expect("opened above");
        journal.append(change).map_err(write_err(journal.path()))?;
        let journal_bytes = journal.bytes();
        self.api = api;
        if journal_bytes > self.snapshot_bytes.max(COMPACT_AFTER_BYTES) {
            // Acknowledged already (the record is on disk): a failure here only keeps the journal.
            let api = std::mem::take(&mut self.api);
            if let Err(e) = self.write_snapshot(&api) {
                tracing::warn!("folding the journal into the state file: {e}; the journal stays");
            }
            self.api = api;
        }
        Ok(())
    }

    /// Writes `api` as the snapshot of the next generation and starts its empty journal.
    fn write_snapshot(&mut self, api: &ResourceSet) -> Result<(), StoreError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let generation = self.generation + 1;
        let text = encode_state(api, generation);
        write_atomically(path, text.as_bytes()).map_err(|source| StoreError::Write {
            path: path.display().to_string(),
            source,
        })?;
        self.generation = generation;
        self.snapshot_bytes = text.len() as u64;
        // The snapshot holds everything: a journal of the old generation is ignored from now on,
        // so failing to reset it loses nothing.
        let journal_path = journal::path_of(path);
        self.journal = Journal::reset(&journal_path, generation).ok();
        self.journal_valid = 0;
        Ok(())
    }

    /// Makes `files` the files layer.
    pub fn commit_files(&mut self, files: ResourceSet) {
        self.files = files;
    }
}

/// First line of a state file; the format number follows.
const STATE_HEADER: &str = "# mesh state file, format ";
/// The format this meshd writes and reads.
const STATE_FORMAT: u32 = 1;
/// Last line of a state file; the resource count follows. Its absence means truncation.
const STATE_TRAILER: &str = "# end of mesh state: ";
/// Second line of a state file; the generation follows (a file without it is generation 0).
const STATE_GENERATION: &str = "# generation ";

/// The generation a state file says it is.
fn generation_of(text: &str) -> u64 {
    text.lines()
        .nth(1)
        .and_then(|l| l.strip_prefix(STATE_GENERATION))
        .and_then(|g| g.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The API layer as a state file: a header with the format, the resources as multi-document
/// YAML, and a trailer with their count, so a wrong version and a truncated file are told apart
/// from valid content instead of being read as fewer rules.
fn encode_state(api: &ResourceSet, generation: u64) -> String {
    format!(
        "{STATE_HEADER}{STATE_FORMAT}: the rules applied with meshctl, written by meshd; do not edit\n\
         {STATE_GENERATION}{generation} (changes after it are in the journal beside this file)\n\
         {}{STATE_TRAILER}{} resources\n",
        api.to_yaml(),
        api.len()
    )
}

/// Reads a state file written by [`encode_state`] (or by a meshd before the header existed:
/// plain YAML). The error says what is wrong; the caller refuses to start rather than lose the
/// rules in it.
fn decode_state(label: &str, text: &str) -> Result<ResourceSet, String> {
    const KEEP: &str = "meshd does not start rather than lose the rules it acknowledged: \
        repair the file or move it away";
    if text.trim().is_empty() {
        return Ok(ResourceSet::default());
    }
    let Some(rest) = text.strip_prefix(STATE_HEADER) else {
        // Written before the format header existed.
        return config::parse_own_state(label, text).map_err(|e| format!("{e}; {KEEP}"));
    };
    let format: Option<u32> = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok());
    match format {
        Some(STATE_FORMAT) => {}
        Some(other) => {
            return Err(format!(
                "format {other}, but this meshd reads format {STATE_FORMAT} (written by a \
                 different mesh version); {KEEP}"
            ))
        }
        None => return Err(format!("unreadable format line; {KEEP}")),
    }
    let body = text.trim_end();
    let (body, last) = body.rsplit_once('\n').unwrap_or(("", body));
    let expected: usize = last
        .strip_prefix(STATE_TRAILER)
        .and_then(|t| t.strip_suffix(" resources"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!("truncated: the end line \"{STATE_TRAILER}N resources\" is missing; {KEEP}")
        })?;
    let body = body.split_once('\n').map(|(_, b)| b).unwrap_or("");
    let body = match body.strip_prefix(STATE_GENERATION) {
        Some(rest) => rest.split_once('\n').map(|(_, b)| b).unwrap_or(""),
        None => body,
    };
    if expected == 0 && body.trim().is_empty() {
        return Ok(ResourceSet::default());
    }
    let set = config::parse_own_state(label, body).map_err(|e| format!("{e}; {KEEP}"))?;
    if set.len() != expected {
        return Err(format!(
            "holds {} resources but its end line says {expected}; {KEEP}",
            set.len()
        ));
    }
    Ok(set)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - destination: {host: reviews}
";

    #[test]
    fn api_layer_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("mesh-store-test-{}", std::process::id()));
        let path = dir.join("state.yaml");
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        let incoming = config::parse_str("vs.yaml", VS).unwrap();
        let api = store.api_with_applied(incoming);
        store.commit_api(api).unwrap();
        let reopened = RuleStore::open(Some(path)).unwrap();
        assert_eq!(reopened.api().len(), 1);
        assert_eq!(reopened.api().resources[0].meta.name, "reviews");
        fs::remove_dir_all(dir).unwrap();
    }

    /// A scratch directory for one test, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("mesh-store-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// `count` VirtualServices carrying an annotation of `pad` bytes each.
    fn many(count: usize, pad: usize) -> ResourceSet {
        let one = config::parse_str("vs.yaml", VS)
            .unwrap()
            .resources
            .remove(0);
        let resources = (0..count)
            .map(|i| {
                let mut r = one.clone();
                r.meta.name = format!("vs-{i}");
                r.meta.annotations.insert("note".into(), "x".repeat(pad));
                r
            })
            .collect();
        ResourceSet {
            resources,
            notices: Vec::new(),
        }
    }

    #[test]
    fn a_state_file_beyond_the_input_limit_is_restored() {
        let dir = Scratch::new("big");
        let path = dir.0.join("state.yaml");
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        store.commit_api(many(5, 1_000_000)).unwrap();
        let size = fs::metadata(&path).unwrap().len();
        assert!(size > config::MAX_INPUT_BYTES as u64 + 256 * 1024, "{size}");
        let reopened = RuleStore::open(Some(path)).unwrap();
        assert_eq!(reopened.api().len(), 5);
        assert_eq!(reopened.api().resources[4].meta.name, "vs-4");
    }

    #[test]
    fn damaged_state_files_are_refused_with_the_reason() {
        let dir = Scratch::new("damaged");
        let path = dir.0.join("state.yaml");
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        store.commit_api(many(3, 10)).unwrap();
        let good = fs::read_to_string(&path).unwrap();
        let refused = |text: &[u8]| {
            fs::write(&path, text).unwrap();
            RuleStore::open(Some(path.clone())).unwrap_err().to_string()
        };
        // Truncated anywhere (also exactly between two documents): never read as fewer rules.
        for cut in (1..good.len() - 1).step_by(7) {
            let err = refused(&good.as_bytes()[..cut]);
            assert!(err.contains("state.yaml"), "{err}");
            assert!(err.contains("move it away"), "cut at {cut}: {err}");
        }
        let between = good.rfind("---\n").unwrap();
        assert!(refused(&good.as_bytes()[..between]).contains("truncated"));
        // Another format.
        let err = refused(good.replacen("format 1", "format 7", 1).as_bytes());
        assert!(
            err.contains("format 7") && err.contains("reads format 1"),
            "{err}"
        );
        // Garbage.
        assert!(refused(&[0xff, 0xfe, 0, 1]).contains("not UTF-8"));
        let err = refused(b"{{{{ not yaml");
        assert!(err.contains("state.yaml"), "{err}");
        // A count that disagrees with the content.
        let err = refused(good.replace(": 3 resources", ": 4 resources").as_bytes());
        assert!(err.contains("says 4"), "{err}");
        // The good file still reads, and a file from before the header existed too.
        fs::write(&path, &good).unwrap();
        assert_eq!(RuleStore::open(Some(path.clone())).unwrap().api().len(), 3);
        fs::write(&path, VS).unwrap();
        assert_eq!(RuleStore::open(Some(path.clone())).unwrap().api().len(), 1);
        // An emptied layer round-trips.
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        store.commit_api(ResourceSet::default()).unwrap();
        assert!(RuleStore::open(Some(path)).unwrap().api().is_empty());
    }

    #[test]
    fn changes_go_to_the_journal_and_survive_reopen() {
        let dir = Scratch::new("journal");
        let path = dir.0.join("state.yaml");
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        store.commit_api(many(3, 10)).unwrap();
        let snapshot = fs::read(&path).unwrap();
        // One changed, one new, one deleted: the snapshot is not rewritten.
        let mut incoming = many(4, 20);
        incoming.resources.drain(..2);
        let change = journal::Change::Apply(incoming.to_yaml());
        let api = store.api_with_applied(incoming);
        store.commit_change(api, &change).unwrap();
        let keys = vec![("VirtualService".into(), "default".into(), "vs-0".into())];
        let api = store.api_with_deleted(&keys).unwrap();
        store
            .commit_change(api, &journal::Change::Delete(keys))
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), snapshot);
        let names = |store: &RuleStore| -> Vec<(String, usize)> {
            store
                .api()
                .resources
                .iter()
                .map(|r| (r.meta.name.clone(), r.meta.annotations["note"].len()))
                .collect()
        };
        let reopened = RuleStore::open(Some(path.clone())).unwrap();
        let expected = vec![
            ("vs-1".to_string(), 10),
            ("vs-2".into(), 20),
            ("vs-3".into(), 20),
        ];
        assert_eq!(names(&reopened), expected);
        assert_eq!(names(&store), expected);
        // A rewritten snapshot makes the old journal stale, also if it is left behind.
        let old_journal = fs::read(journal::path_of(&path)).unwrap();
        store.commit_api(many(1, 5)).unwrap();
        fs::write(journal::path_of(&path), old_journal).unwrap();
        let reopened = RuleStore::open(Some(path.clone())).unwrap();
        assert_eq!(names(&reopened), vec![("vs-0".to_string(), 5)]);
        // A damaged journal is refused.
        let mut store = RuleStore::open(Some(path.clone())).unwrap();
        let change = journal::Change::Apply(many(2, 7).to_yaml());
        let api = store.api_with_applied(many(2, 7));
        store.commit_change(api, &change).unwrap();
        let mut bytes = fs::read(journal::path_of(&path)).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        fs::write(journal::path_of(&path), bytes).unwrap();
        let err = RuleStore::open(Some(path)).unwrap_err().to_string();
        assert!(err.contains("journal") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_resource_cannot_live_in_both_layers() {
        let files = config::parse_str("rules/vs.yaml", VS).unwrap();
        let api = config::parse_str("<stdin>", VS).unwrap();
        let err = RuleStore::combine(&files, &api).unwrap_err().to_string();
        assert!(err.contains("VirtualService default/reviews"), "{err}");
        assert!(err.contains("rules/vs.yaml"), "{err}");
    }

    #[test]
    fn deleting_an_unknown_resource_is_an_error() {
        let store = RuleStore::open(None).unwrap();
        let err = store
            .api_with_deleted(&[("VirtualService".into(), "default".into(), "nope".into())])
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("VirtualService default/nope not found"));
    }
}
