//! Splitting multi-document YAML and turning each document into a typed [`Resource`].
//!
//! Documents are split by line (`---` / `...` markers at column 0, which YAML forbids inside
//! scalars) rather than with serde_yaml's stream iterator, because we need each document's
//! starting line for [`Source`] and serde_yaml does not expose it. Parser positions inside a
//! document are shifted by the document's first line so they are file positions.

// See the note in `config`: errors are rare, large on purpose.
#![allow(clippy::result_large_err)]

use serde::{de::DeserializeOwned, Deserialize};
use serde_yaml::Value;

use super::{
    ConfigError, DestinationRule, Gateway, ObjectMeta, Origin, Position, Resource, ResourceKind,
    ResourceSet, ServiceEntry, Source, VirtualService, ACCEPTED_API_VERSIONS,
};

/// Largest accepted input per file (or per `parse_str` call): far above any real rule set, low
/// enough that a mistaken `--config /dev/zero`-style input fails fast instead of eating memory.
pub const MAX_INPUT_BYTES: usize = 4 * 1024 * 1024;

/// One YAML document of the input.
struct Chunk {
    /// 1-based document number as a human counts `---` separators.
    document: usize,
    /// Line (0-based) of the chunk's first line in the file.
    first_line: usize,
    /// 1-based line of the first non-blank, non-comment line.
    content_line: usize,
    /// Text; the `---` marker itself is blanked so columns stay true.
    text: String,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn is_content(line: &str) -> bool {
    let trimmed = line.trim();
    !trimmed.is_empty() && !trimmed.starts_with('#')
}

fn split_documents(text: &str) -> Vec<Chunk> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut current = Chunk {
        document: 1,
        first_line: 0,
        content_line: 0,
        text: String::new(),
    };
    let mut seen_separator = false;
    for (index, line) in text.lines().enumerate() {
        if is_marker(line, "---") {
            let preamble_is_empty = !seen_separator && current.content_line == 0;
            let next_document = if preamble_is_empty {
                current.document
            } else {
                current.document + 1
            };
            chunks.push(std::mem::replace(
                &mut current,
                Chunk {
                    document: next_document,
                    first_line: index,
                    content_line: 0,
                    text: String::new(),
                },
            ));
            seen_separator = true;
            // Keep content after the marker (`--- {a: 1}`), with the marker blanked.
            let rest = &line[3..];
            if is_content(rest) {
                current.content_line = index + 1;
            }
            current.text.push_str("   ");
            current.text.push_str(rest);
            current.text.push('\n');
            continue;
        }
        // Directives and document-end markers carry nothing we use; blank them to keep lines.
        let keep =
            !(is_marker(line, "...") || (line.starts_with('%') && current.content_line == 0));
        if keep {
            if current.content_line == 0 && is_content(line) {
                current.content_line = index + 1;
            }
            current.text.push_str(line);
        }
        current.text.push('\n');
    }
    chunks.push(current);
    chunks.retain(|chunk| chunk.content_line != 0);
    chunks
}

/// Removes serde_yaml's own " at line N column M" (positions relative to the chunk) and the
/// path prefix it adds, so we can print file positions and our own path once.
fn clean_message(message: &str) -> String {
    let mut out = message.to_owned();
    for marker in [" at line ", " at position "] {
        while let Some(start) = out.find(marker) {
            let tail = &out[start + marker.len()..];
            let mut end = tail
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(tail.len());
            if let Some(column) = tail[end..].strip_prefix(" column ") {
                end += " column ".len()
                    + column
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(column.len());
            }
            out.replace_range(start..start + marker.len() + end, "");
        }
    }
    if let Some((prefix, rest)) = out.split_once(": ") {
        if !prefix.is_empty() && !prefix.contains(char::is_whitespace) {
            return rest.to_owned();
        }
    }
    out
}

fn shift(location: Option<serde_yaml::Location>, chunk: &Chunk) -> Option<Position> {
    location.map(|l| Position {
        line: l.line() + chunk.first_line,
        column: l.column(),
    })
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document<S> {
    // Checked from the untyped value before typed parsing; present here so they are not
    // "unknown fields".
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    spec: S,
}

fn typed<S: DeserializeOwned>(chunk: &Chunk, at: &Origin) -> Result<(ObjectMeta, S), ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(&chunk.text);
    match serde_path_to_error::deserialize::<_, Document<S>>(deserializer) {
        Ok(document) => Ok((document.metadata, document.spec)),
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            Err(ConfigError::Field {
                at: at.clone(),
                path: if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                message: clean_message(&inner.to_string()),
                position: shift(inner.location(), chunk),
            })
        }
    }
}

fn parse_chunk(file: &str, chunk: &Chunk) -> Result<Parsed, ConfigError> {
    let mut at = Origin {
        file: file.to_owned(),
        document: chunk.document,
        line: chunk.content_line,
        resource: None,
    };
    let value: Value = serde_yaml::from_str(&chunk.text).map_err(|error| ConfigError::Syntax {
        at: at.clone(),
        message: clean_message(&error.to_string()),
        position: shift(error.location(), chunk),
    })?;
    let Value::Mapping(map) = &value else {
        return Err(ConfigError::NotAMapping {
            at,
            found: value_kind(&value),
        });
    };
    let string_field = |key: &str| map.get(key).and_then(Value::as_str);
    let metadata = map.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if let (Some(kind), Some(name)) = (string_field("kind"), name) {
        at.resource = Some(format!("{kind} {namespace}/{name}"));
    }
    let missing = |at: &Origin, field: &'static str, key: Option<&Value>, want: &str| {
        ConfigError::MissingField {
            at: at.clone(),
            field,
            message: match key {
                None => format!("required field is missing (expected {want})"),
                Some(other) => format!("expected {want}, found {}", value_kind(other)),
            },
        }
    };
    let Some(api_version) = string_field("apiVersion") else {
        return Err(missing(
            &at,
            "apiVersion",
            map.get("apiVersion"),
            "a string such as networking.istio.io/v1",
        ));
    };
    let Some(kind) = string_field("kind") else {
        return Err(missing(
            &at,
            "kind",
            map.get("kind"),
            "a string such as VirtualService",
        ));
    };
    let Some(metadata) = metadata else {
        return Err(missing(&at, "metadata", None, "a mapping with a name"));
    };
    if !metadata.is_mapping() {
        return Err(missing(
            &at,
            "metadata",
            Some(metadata),
            "a mapping with a name",
        ));
    }
    if name.is_none() {
        return Err(missing(
            &at,
            "metadata.name",
            metadata.get("name"),
            "a string",
        ));
    }
    let group = api_version.split_once('/').map_or("", |(group, _)| group);
    if group != "networking.istio.io" {
        return Ok(Parsed::Skipped(format!(
            "{at}: skipped: {kind} ({api_version}) is not an Istio networking resource"
        )));
    }
    if let Some(why) = unimplemented_kind(kind) {
        return Ok(Parsed::Skipped(format!(
            "{at}: skipped: {kind} is not supported ({why})"
        )));
    }
    if !ACCEPTED_API_VERSIONS.contains(&api_version) {
        return Err(ConfigError::UnsupportedApiVersion {
            at,
            api_version: api_version.to_owned(),
        });
    }
    let (meta, kind) = match kind {
        "ServiceEntry" => {
            let (meta, spec) = typed::<ServiceEntry>(chunk, &at)?;
            (meta, ResourceKind::ServiceEntry(spec))
        }
        "DestinationRule" => {
            let (meta, spec) = typed::<DestinationRule>(chunk, &at)?;
            (meta, ResourceKind::DestinationRule(spec))
        }
        "VirtualService" => {
            let (meta, spec) = typed::<VirtualService>(chunk, &at)?;
            (meta, ResourceKind::VirtualService(spec))
        }
        "Gateway" => {
            let (meta, spec) = typed::<Gateway>(chunk, &at)?;
            (meta, ResourceKind::Gateway(spec))
        }
        other => {
            return Err(ConfigError::UnknownKind {
                at,
                kind: other.to_owned(),
            })
        }
    };
    Ok(Parsed::Resource(Resource {
        source: Source {
            file: file.to_owned(),
            document: chunk.document,
            line: chunk.content_line,
        },
        kind,
        meta,
    }))
}

/// A document read: an Istio resource mesh models, or a one-line notice saying why it was
/// skipped.
// Unboxed like `ResourceKind`: one value per document, moved straight into the set.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Resource(Resource),
    Skipped(String),
}

/// Istio networking kinds mesh reads but does not implement, with the reason it gives.
fn unimplemented_kind(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Sidecar" => "mesh has no sidecars: every rule applies node-wide",
        "EnvoyFilter" => "mesh does not run Envoy",
        "WorkloadEntry" | "WorkloadGroup" => {
            "list endpoints in the ServiceEntry instead (mesh has no workload registry)"
        }
        "ProxyConfig" => "mesh has no per-workload proxies",
        _ => return None,
    })
}

pub(super) fn parse_documents(file: &str, text: &str) -> Result<ResourceSet, ConfigError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(ConfigError::TooLarge {
            file: file.to_owned(),
            size: text.len() as u64,
            limit: MAX_INPUT_BYTES as u64,
        });
    }
    parse_documents_unbounded(file, text)
}

/// [`parse_documents`] without the input size limit: for text meshd wrote itself.
pub(super) fn parse_documents_unbounded(
    file: &str,
    text: &str,
) -> Result<ResourceSet, ConfigError> {
    let chunks = split_documents(text);
    if chunks.is_empty() {
        return Err(ConfigError::NoResources {
            file: file.to_owned(),
        });
    }
    let mut set = ResourceSet::default();
    let mut errors = Vec::new();
    for chunk in &chunks {
        match parse_chunk(file, chunk) {
            Ok(Parsed::Resource(resource)) => set.resources.push(resource),
            Ok(Parsed::Skipped(notice)) => set.notices.push(notice),
            Err(error) => errors.push(error),
        }
    }
    match errors.len() {
        0 => Ok(set),
        1 => Err(errors.remove(0)),
        _ => Err(ConfigError::Multiple(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::{clean_message, split_documents};

    #[test]
    fn documents_are_split_with_numbers_and_lines() {
        let text = "# header\n---\na: 1\n---\n# only a comment\n---\n\nb: 2\n...\n";
        let chunks = split_documents(text);
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].document, chunks[0].content_line), (1, 3));
        assert_eq!((chunks[1].document, chunks[1].content_line), (3, 8));
    }

    #[test]
    fn preamble_with_content_is_document_one() {
        let chunks = split_documents("a: 1\n--- {b: 2}\n");
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[1].document, chunks[1].content_line), (2, 2));
    }

    #[test]
    fn serde_yaml_positions_and_paths_are_stripped() {
        assert_eq!(
            clean_message("spec.hosts: invalid type: map, expected a string at line 4 column 3"),
            "invalid type: map, expected a string"
        );
        assert_eq!(
            clean_message("did not find expected key at line 2 column 1, while parsing a block mapping at line 1 column 1"),
            "did not find expected key, while parsing a block mapping"
        );
    }
}
