//! The rules in force and where they came from.
//!
//! Two layers make up the rule set: the *files* layer (`meshd --config PATH`, re-read when the
//! files change or on SIGHUP) and the *API* layer (`meshctl apply` / `delete`). A resource lives
//! in exactly one layer: defining the same kind/namespace/name in both is an error, so a file can
//! never be silently shadowed. The API layer is persisted to the state file (temp file, fsync,
//! rename, fsync of the directory) and restored when meshd starts.
//!
//! The store never changes by itself: callers build a candidate, compile and apply it, and only
//! then [`RuleStore::commit_api`] or [`RuleStore::commit_files`].

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use crate::config::{self, Resource, ResourceSet};

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
}

impl RuleStore {
    /// Opens the store, restoring the API layer from `state_file` when it exists.
    pub fn open(state_file: Option<PathBuf>) -> Result<Self, StoreError> {
        let mut store = RuleStore {
            state_file,
            ..Default::default()
        };
        if let Some(path) = &store.state_file {
            match fs::read_to_string(path) {
                Ok(text) if text.trim().is_empty() => {}
                Ok(text) => {
                    store.api =
                        config::parse_str(&path.display().to_string(), &text).map_err(|e| {
                            StoreError::Corrupt {
                                path: path.display().to_string(),
                                message: e.to_string(),
                            }
                        })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(store)
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
    pub fn combine(files: &ResourceSet, api: &ResourceSet) -> Result<ResourceSet, StoreError> {
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
        Ok(all)
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

    /// Makes `api` the API layer, persisting it first.
    pub fn commit_api(&mut self, api: ResourceSet) -> Result<(), StoreError> {
        if let Some(path) = &self.state_file {
            write_atomically(path, api.to_yaml().as_bytes()).map_err(|source| {
                StoreError::Write {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        }
        self.api = api;
        Ok(())
    }

    /// Makes `files` the files layer.
    pub fn commit_files(&mut self, files: ResourceSet) {
        self.files = files;
    }
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
