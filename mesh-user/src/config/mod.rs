//! Typed Istio resources read from YAML, with source positions for error messages.
//!
//! This module owns the input side of the pipeline: reading files (size-capped), splitting
//! multi-document YAML, checking `apiVersion`/`kind`/`metadata`, and strict typed parsing (unknown
//! fields are errors) with field paths and line/column. It also owns the way back: each
//! [`Resource`] serialises to the Istio YAML form, and [`ResourceSet::to_yaml`] round-trips
//! through [`parse_str`].
//!
//! Whether mesh can *honour* a field is not decided here; see `validate` and `compile`.

// A load fails at most once per call and the error carries its file, resource and field for the
// user; the size of `ConfigError` on that path does not matter.
#![allow(clippy::result_large_err)]

mod common;
mod destination_rule;
mod gateway;
mod parse;
mod service_entry;
mod virtual_service;

use std::{fmt, path::Path};

use serde::{ser::SerializeStruct, Deserialize, Serialize};

pub use common::*;
pub use destination_rule::*;
pub use gateway::*;
pub use parse::MAX_INPUT_BYTES;
pub use service_entry::*;
pub use virtual_service::*;

/// The `apiVersion` written by [`Resource`]'s `Serialize` (any accepted version reads back).
pub const API_VERSION: &str = "networking.istio.io/v1";
/// Accepted `apiVersion`s; they share one schema for the fields mesh models.
pub const ACCEPTED_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Where a resource came from, for error messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Source {
    /// File path as given, or `<stdin>` (or any label passed to [`parse_str`]).
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based line of the document's first content line.
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)
    }
}

/// Kubernetes object metadata (the subset Istio resources use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Resource name.
    pub name: String,
    /// Namespace; `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels (kept for `meshctl get`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Annotations (kept for `meshctl get`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl ObjectMeta {
    /// Metadata with a name in the `default` namespace.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: default_namespace(),
            labels: Default::default(),
            annotations: Default::default(),
        }
    }
}

/// The typed spec of a resource, by kind.
// Unboxed on purpose: rule sets hold at most thousands of resources, and plain variants keep
// `ResourceKind::VirtualService(spec)` patterns simple for every consumer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ResourceKind {
    /// `ServiceEntry`.
    ServiceEntry(ServiceEntry),
    /// `DestinationRule`.
    DestinationRule(DestinationRule),
    /// `VirtualService`.
    VirtualService(VirtualService),
    /// `Gateway`.
    Gateway(Gateway),
}

impl ResourceKind {
    /// The Kubernetes kind name.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ResourceKind::ServiceEntry(_) => "ServiceEntry",
            ResourceKind::DestinationRule(_) => "DestinationRule",
            ResourceKind::VirtualService(_) => "VirtualService",
            ResourceKind::Gateway(_) => "Gateway",
        }
    }
}

/// One Istio resource with its origin.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Where it was read from.
    pub source: Source,
    /// Kind and typed spec.
    pub kind: ResourceKind,
    /// Name and namespace.
    pub meta: ObjectMeta,
}

impl Resource {
    /// "VirtualService default/reviews": how errors name the resource.
    pub fn display_name(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind.kind_name(),
            self.meta.namespace,
            self.meta.name
        )
    }

    /// "VirtualService/default/reviews": how `DesiredState` sources name the resource.
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind.kind_name(),
            self.meta.namespace,
            self.meta.name
        )
    }

    /// Identity for duplicate detection and `merge`: (kind, namespace, name).
    pub fn key(&self) -> (&'static str, &str, &str) {
        (self.kind.kind_name(), &self.meta.namespace, &self.meta.name)
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Resource", 4)?;
        out.serialize_field("apiVersion", API_VERSION)?;
        out.serialize_field("kind", self.kind.kind_name())?;
        out.serialize_field("metadata", &self.meta)?;
        match &self.kind {
            ResourceKind::ServiceEntry(spec) => out.serialize_field("spec", spec)?,
            ResourceKind::DestinationRule(spec) => out.serialize_field("spec", spec)?,
            ResourceKind::VirtualService(spec) => out.serialize_field("spec", spec)?,
            ResourceKind::Gateway(spec) => out.serialize_field("spec", spec)?,
        }
        out.end()
    }
}

/// An ordered collection of resources (source order is kept: it decides route precedence
/// between rules, like creation time does in Istio).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceSet {
    /// Resources in source order.
    pub resources: Vec<Resource>,
    /// One line per document that was read but skipped: other API groups (a Deployment, a
    /// Service of a `kubectl` bundle) and Istio kinds mesh does not implement. Not part of the
    /// rules; callers print them.
    pub notices: Vec<String>,
}

impl ResourceSet {
    /// Applies `other` on top of `self` the way `kubectl apply` does: a resource with the same
    /// kind/namespace/name replaces the existing one in place, new ones are appended in order.
    ///
    /// Loading a directory does *not* use this (it concatenates), so duplicates within one input
    /// are still reported by `validate`.
    pub fn merge(&mut self, other: ResourceSet) {
        // Indexed by identity: applying tens of thousands of resources must not be quadratic.
        let mut positions: std::collections::HashMap<(String, String, String), usize> = self
            .resources
            .iter()
            .enumerate()
            .map(|(i, r)| (owned_key(r), i))
            .collect();
        for resource in other.resources {
            match positions.get(&owned_key(&resource)) {
                Some(&i) => self.resources[i] = resource,
                None => {
                    positions.insert(owned_key(&resource), self.resources.len());
                    self.resources.push(resource);
                }
            }
        }
    }

    /// Positions by identity (kind, namespace, name); the first one where an identity repeats.
    pub fn index_by_key(&self) -> std::collections::HashMap<(String, String, String), usize> {
        let mut index = std::collections::HashMap::with_capacity(self.resources.len());
        for (i, r) in self.resources.iter().enumerate() {
            index.entry(owned_key(r)).or_insert(i);
        }
        index
    }

    /// Multi-document Istio YAML for all resources, in order; parses back with [`parse_str`].
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for resource in &self.resources {
            out.push_str("---\n");
            // Serialising plain data (strings, numbers, maps) into a String cannot fail.
            out.push_str(&serde_yaml::to_string(resource).expect("resources serialise to YAML"));
        }
        out
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// True when there are no resources.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

/// Where in the input a config error is: file, document, and the resource when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// File path or label.
    pub file: String,
    /// 1-based document index.
    pub document: usize,
    /// 1-based first content line of the document.
    pub line: usize,
    /// "Kind namespace/name" once known.
    pub resource: Option<String>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        match &self.resource {
            Some(resource) => write!(f, " ({resource})"),
            None => write!(f, " (starting at line {})", self.line),
        }
    }
}

/// A position inside a file (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Line.
    pub line: usize,
    /// Column.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, " at line {} column {}", self.line, self.column)
    }
}

fn position_suffix(position: &Option<Position>) -> String {
    position.map(|p| p.to_string()).unwrap_or_default()
}

fn join_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why input could not be read as Istio resources.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or directory could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// Path.
        file: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The input is over [`MAX_INPUT_BYTES`].
    #[error("{file}: input is {size} bytes, more than the limit of {limit} bytes per file")]
    TooLarge {
        /// Path or label.
        file: String,
        /// Size seen (at least this many bytes).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The input is not UTF-8.
    #[error("{file}: input is not valid UTF-8 (byte offset {offset})")]
    NotUtf8 {
        /// Path or label.
        file: String,
        /// First bad byte.
        offset: usize,
    },
    /// Only whitespace and comments.
    #[error("{file}: no resources (the input is empty or holds only comments)")]
    NoResources {
        /// Path or label.
        file: String,
    },
    /// A directory without `*.yaml`/`*.yml` files.
    #[error("{dir}: no resources (the directory has no *.yaml or *.yml files)")]
    EmptyDirectory {
        /// Directory path.
        dir: String,
    },
    /// YAML syntax error.
    #[error("{at}: yaml syntax error: {message}{}", position_suffix(.position))]
    Syntax {
        /// Where.
        at: Origin,
        /// Parser message.
        message: String,
        /// Line/column.
        position: Option<Position>,
    },
    /// The document is a scalar or sequence.
    #[error("{at}: expected a mapping with apiVersion, kind, metadata and spec, found {found}")]
    NotAMapping {
        /// Where.
        at: Origin,
        /// What was found.
        found: &'static str,
    },
    /// A required top-level field is missing or not a string.
    #[error("{at}: {field}: {message}")]
    MissingField {
        /// Where.
        at: Origin,
        /// Field path.
        field: &'static str,
        /// What was expected.
        message: String,
    },
    /// `apiVersion` is not an Istio networking version mesh reads.
    #[error(
        "{at}: apiVersion: unsupported apiVersion `{api_version}`, expected one of \
         networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"
    )]
    UnsupportedApiVersion {
        /// Where.
        at: Origin,
        /// What was given.
        api_version: String,
    },
    /// `kind` is not one mesh reads.
    #[error(
        "{at}: kind: unknown kind `{kind}`, expected one of ServiceEntry, DestinationRule, \
         VirtualService, Gateway"
    )]
    UnknownKind {
        /// Where.
        at: Origin,
        /// What was given.
        kind: String,
    },
    /// A field has the wrong type, is unknown, or is missing.
    #[error("{at}: {path}: {message}{}", position_suffix(.position))]
    Field {
        /// Where.
        at: Origin,
        /// Field path, e.g. `spec.tcp[0].route[1].weight`.
        path: String,
        /// What was expected.
        message: String,
        /// Line/column when the parser knows it.
        position: Option<Position>,
    },
    /// Several documents failed; one error per line.
    #[error("{}", join_lines(.0))]
    Multiple(Vec<ConfigError>),
}

/// Reads a file, or every `*.yaml`/`*.yml` file (sorted by name, not recursive) of a directory.
pub fn load_path(path: &Path) -> Result<ResourceSet, ConfigError> {
    let label = path.display().to_string();
    let metadata = std::fs::metadata(path).map_err(|source| ConfigError::Io {
        file: label.clone(),
        source,
    })?;
    if !metadata.is_dir() {
        return load_file(path);
    }
    let entries = std::fs::read_dir(path).map_err(|source| ConfigError::Io {
        file: label.clone(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Io {
            file: label.clone(),
            source,
        })?;
        let file = entry.path();
        let is_yaml = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml") | Some("yml")
        );
        if is_yaml && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::EmptyDirectory { dir: label });
    }
    let mut set = ResourceSet::default();
    let mut errors = Vec::new();
    for file in files {
        match load_file(&file) {
            // Concatenate rather than merge so duplicates across files are reported.
            Ok(loaded) => {
                set.resources.extend(loaded.resources);
                set.notices.extend(loaded.notices);
            }
            Err(ConfigError::Multiple(many)) => errors.extend(many),
            Err(error) => errors.push(error),
        }
    }
    match errors.len() {
        0 => Ok(set),
        1 => Err(errors.remove(0)),
        _ => Err(ConfigError::Multiple(errors)),
    }
}

fn load_file(path: &Path) -> Result<ResourceSet, ConfigError> {
    use std::io::Read;
    let label = path.display().to_string();
    let io_error = |source| ConfigError::Io {
        file: label.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    // Read one byte past the limit instead of trusting metadata: the file may grow, or be a pipe.
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > MAX_INPUT_BYTES {
        let size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return Err(ConfigError::TooLarge {
            file: label,
            size,
            limit: MAX_INPUT_BYTES as u64,
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::NotUtf8 {
        file: label.clone(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    parse_str(&label, &text)
}

/// Parses multi-document YAML; `file_label` names the input in errors and [`Source`]s.
pub fn parse_str(file_label: &str, text: &str) -> Result<ResourceSet, ConfigError> {
    parse::parse_documents(file_label, text)
}

/// Parses meshd's own state file: the same strict parsing as [`parse_str`] but without the
/// [`MAX_INPUT_BYTES`] limit, which guards against hostile input, not against the rules meshd
/// itself accepted (many small applies add up to a state file of any size).
pub fn parse_own_state(file_label: &str, text: &str) -> Result<ResourceSet, ConfigError> {
    parse::parse_documents_unbounded(file_label, text)
}

#[cfg(test)]
mod tests;

/// A resource's identity as an owned map key.
fn owned_key(r: &Resource) -> (String, String, String) {
    let (kind, namespace, name) = r.key();
    (kind.to_owned(), namespace.to_owned(), name.to_owned())
}
