//! Reopening the pin directory: the one place that decides whether maps pinned by an earlier
//! meshd are reused, migrated or refused, before the loader opens them.
//!
//! The contract (see [`super::layout`] for the record and the expected shapes):
//!
//! - A pinned map whose type, key size or value size differs from what this meshd expects, a
//!   record of another layout version, or something unreadable under the record's name: meshd
//!   refuses to start, changes nothing, and says which map, what was found, what was expected
//!   and how to go on ([`PinsError`]).
//! - Only the capacity (or creation flags) differ, e.g. a new `--conntrack-entries`: the map is
//!   migrated. A new map of the expected shape is created, the live entries are copied, and it
//!   replaces the old pin atomically (pinned under `NAME_next`, renamed over `NAME`). The
//!   programs still attached from the earlier meshd keep using the old maps until this meshd's
//!   programs replace them; entries they add meanwhile (new connections) are copied again right
//!   after the swap ([`PinReport::finish`]). The rule tables (services, backends, Maglev pool)
//!   move together so a program never mixes old and new ones.
//! - The Maglev pool is never shrunk under live rules: a pinned pool larger than
//!   `--maglev-pool-entries` is kept, and the difference is reported.
//! - Pins written before the record existed are accepted as layout 1 when their types and
//!   sizes match (and migrated like any other when only capacities differ).
//!
//! Everything decided is logged and shown by `meshctl status` ([`PinReport::notes`]).
//!
//! Known limit: the entries the earlier programs add between the migration and the swap are
//! copied by the meshd that migrated. If that meshd dies after placing the new pins and before
//! its programs are attached everywhere, connections opened meanwhile are tracked only in the
//! old maps (or, killed mid-attach, split across both) until the next meshd re-creates their
//! entries from the Maglev table, which keeps them on their backend unless the rules changed.

use std::{collections::BTreeMap, fmt, os::fd::AsFd, path::Path};

use aya::maps::MapData;
use tracing::{info, warn};

use super::{
    bpf_sys::{self, MapShape},
    layout::{self, RecordState, Shown, LAYOUT_VERSION, PINNED_MAPS, RULE_TABLES},
    loader::DataplaneOptions,
    DataplaneError,
};

/// Suffix of a pin being put in place (a leftover one is from an interrupted start).
const NEXT: &str = "_next";

/// Why meshd refuses the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// Maps of another shape than this meshd's.
    #[error("{}", incompatible(dir, maps, *recorded))]
    Incompatible {
        /// The pin directory.
        dir: String,
        /// Every map that differs.
        maps: Vec<Mismatch>,
        /// Whether a layout record was there (false: pins of a meshd before the record).
        recorded: bool,
    },
    /// A record of another layout version.
    #[error(
        "pin directory {dir}: the maps follow layout version {found} (record {dir}/{}), this \
         meshd reads layout version {expected}; {}",
        layout::RECORD_NAME,
        remedy(dir)
    )]
    Version {
        /// The pin directory.
        dir: String,
        /// The version recorded.
        found: u32,
        /// This meshd's version.
        expected: u32,
    },
    /// Something under the record's name this meshd cannot read.
    #[error(
        "pin directory {dir}: {dir}/{} is not a layout record this meshd can read ({why}); {}",
        layout::RECORD_NAME,
        remedy(dir)
    )]
    Record {
        /// The pin directory.
        dir: String,
        /// What is wrong with it.
        why: String,
    },
    /// A map to migrate holds more entries than its new capacity and cannot evict.
    #[error(
        "pin directory {dir}: {map} holds {entries} entries, more than the {capacity} this meshd \
         would give it; {}",
        remedy(dir)
    )]
    TooSmall {
        /// The pin directory.
        dir: String,
        /// The map.
        map: String,
        /// Entries in it.
        entries: usize,
        /// The new capacity.
        capacity: u32,
    },
}

/// One map whose shape differs.
#[derive(Debug)]
pub struct Mismatch {
    /// Map name.
    pub map: String,
    /// As pinned.
    pub found: MapShape,
    /// As this meshd creates it.
    pub expected: MapShape,
}

fn incompatible(dir: &str, maps: &[Mismatch], recorded: bool) -> String {
    let origin = if recorded {
        "these pinned maps differ from what this meshd expects"
    } else {
        "these pinned maps (written before meshd kept a layout record) differ from what this \
         meshd expects"
    };
    let mut text = format!("pin directory {dir}: {origin}:");
    for m in maps {
        text.push_str(&format!(
            "\n  {dir}/{}: found {}; expected {}",
            m.map,
            Shown(&m.found),
            Shown(&m.expected)
        ));
    }
    text.push_str(&format!("\n{}", remedy(dir)));
    text
}

fn remedy(dir: &str) -> String {
    format!(
        "meshd changed nothing and did not start. To go on, either start the meshd version that \
         wrote these pins, or run `meshd --cleanup --pin-dir {dir}` first: it detaches the \
         programs and removes these maps, so every connection the kernel tracks is lost \
         (clients reconnect and are balanced afresh); rules applied with meshctl come back \
         from the state file at the next start"
    )
}

/// A map replaced by a migration: the old one (still read by programs of the earlier meshd
/// until they are replaced) and the new one.
struct Migrated {
    name: &'static str,
    old: MapData,
    new: MapData,
    shape: MapShape,
}

/// What [`prepare`] found and did.
pub struct PinReport {
    /// Layout version of the pins in use.
    pub layout_version: u32,
    /// Decisions worth telling (migrations, capacities kept), one line each.
    pub notes: Vec<String>,
    migrated: Vec<Migrated>,
}

impl fmt::Debug for PinReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinReport")
            .field("layout_version", &self.layout_version)
            .field("notes", &self.notes)
            .finish()
    }
}

impl PinReport {
    fn new() -> Self {
        Self {
            layout_version: LAYOUT_VERSION,
            notes: Vec::new(),
            migrated: Vec::new(),
        }
    }

    fn note(&mut self, line: String) {
        info!("pins: {line}");
        self.notes.push(line);
    }

    /// After this meshd's programs replaced the earlier ones: copies into the migrated hash
    /// maps the entries the earlier programs added since the migration (connections opened in
    /// between), then lets the old maps go.
    pub fn finish(&mut self) {
        for m in std::mem::take(&mut self.migrated) {
            if !is_hash(m.shape.map_type) {
                continue;
            }
            let stride = value_stride(&m.shape);
            let mut added = 0usize;
            let outcome = bpf_sys::lookup_each_raw(
                m.old.fd().as_fd(),
                m.shape.key_size as usize,
                stride,
                1024,
                |k, v| {
                    if bpf_sys::update_elem(m.new.fd().as_fd(), k, v, bpf_sys::NOEXIST).is_ok() {
                        added += 1;
                    }
                },
            );
            match outcome {
                Ok(()) if added > 0 => self.note(format!(
                    "{}: {added} entries added during the switch copied",
                    m.name
                )),
                Ok(()) => {}
                Err(e) => warn!(map = m.name, "copying entries added during the switch: {e}"),
            }
        }
    }
}

/// Checks the pinned maps under `dir` against this meshd's layout and migrates those whose
/// capacity changed; `options` is updated to the capacities in force.
pub fn prepare(dir: &Path, options: &mut DataplaneOptions) -> Result<PinReport, DataplaneError> {
    let mut report = PinReport::new();
    info!(dir = %dir.display(), "checking the pinned maps against layout {LAYOUT_VERSION}");
    remove_leftovers(dir);
    let expected = layout::expected(options)?;
    let mut found = BTreeMap::new();
    for name in PINNED_MAPS {
        if let Some(shape) = layout::pinned_shape(&dir.join(name))? {
            found.insert(*name, shape);
        }
    }
    let shown = dir.display().to_string();
    let recorded = match layout::read_record(dir) {
        RecordState::Found(record) if record.version != LAYOUT_VERSION => {
            return Err(PinsError::Version {
                dir: shown,
                found: record.version,
                expected: LAYOUT_VERSION,
            }
            .into())
        }
        RecordState::Found(record) => {
            let recorded = record.shapes();
            for (name, shape) in &found {
                if recorded.get(*name).is_some_and(|r| r != shape) {
                    warn!(map = name, "the layout record disagrees with the pinned map (replaced by hand, or a migration was interrupted): the map is checked as found");
                }
            }
            true
        }
        RecordState::Unreadable(why) => return Err(PinsError::Record { dir: shown, why }.into()),
        RecordState::Missing if found.is_empty() => return Ok(report),
        RecordState::Missing => false,
    };
    let mismatches: Vec<Mismatch> = found
        .iter()
        .filter(|(name, shape)| {
            let want = &expected[**name];
            (shape.map_type, shape.key_size, shape.value_size)
                != (want.map_type, want.key_size, want.value_size)
        })
        .map(|(name, shape)| Mismatch {
            map: name.to_string(),
            found: *shape,
            expected: expected[*name],
        })
        .collect();
    if !mismatches.is_empty() {
        return Err(PinsError::Incompatible {
            dir: shown,
            maps: mismatches,
            recorded,
        }
        .into());
    }
    if !recorded {
        report.note(format!(
            "the maps under {shown} were pinned before meshd kept a layout record; their types \
             and sizes match layout {LAYOUT_VERSION}, so they are kept"
        ));
    }
    let mut to_migrate: Vec<&'static str> = Vec::new();
    for (name, shape) in &found {
        let want = &expected[*name];
        if shape == want {
            continue;
        }
        if *name == mesh_common::map_names::MAGLEV
            && shape.max_entries > want.max_entries
            && shape.map_flags == want.map_flags
        {
            report.note(format!(
                "MAGLEV keeps its {} entries: --maglev-pool-entries {} is smaller, and a pool in \
                 use is not shrunk (meshd --cleanup starts afresh, losing connections)",
                shape.max_entries, want.max_entries
            ));
            options.maglev_pool_entries = shape.max_entries;
            continue;
        }
        to_migrate.push(name);
    }
    if to_migrate.iter().any(|m| RULE_TABLES.contains(m)) {
        for name in RULE_TABLES {
            if found.contains_key(name) && !to_migrate.contains(name) {
                to_migrate.push(name);
            }
        }
    }
    // The shapes the migrated maps get (MAGLEV may have been kept at its pinned size above).
    let expected = layout::expected(options)?;
    // All new maps are filled and pinned under their `_next` names first, then put in place one
    // rename after the other: a crash before the renames leaves the old pins whole.
    for name in &to_migrate {
        migrate(dir, name, &found[name], &expected[name], &mut report)?;
    }
    for name in &to_migrate {
        place(dir, name)?;
    }
    Ok(report)
}

/// Writes the record describing the maps now pinned under `dir`.
pub fn record(dir: &Path) -> Result<(), DataplaneError> {
    let mut shapes = BTreeMap::new();
    for name in PINNED_MAPS {
        if let Some(shape) = layout::pinned_shape(&dir.join(name))? {
            shapes.insert(*name, shape);
        }
    }
    layout::write_record(dir, &layout::LayoutRecord::new(LAYOUT_VERSION, &shapes))
}

/// Creates the new map, copies the live entries, and swaps the pin.
fn migrate(
    dir: &Path,
    name: &'static str,
    found: &MapShape,
    want: &MapShape,
    report: &mut PinReport,
) -> Result<(), DataplaneError> {
    let path = dir.join(name);
    let sys = |what: String| move |e: std::io::Error| DataplaneError::Other(format!("{what}: {e}"));
    let old =
        MapData::from_pin(&path).map_err(super::map_err(format!("opening {}", path.display())))?;
    let entries = read_all(&old, found).map_err(sys(format!("reading {}", path.display())))?;
    let count = entries.len();
    let lru = matches!(found.map_type, 9 | 10);
    let mut kept: Vec<&(Vec<u8>, Vec<u8>)> = entries.iter().collect();
    if is_hash(found.map_type) && count > want.max_entries as usize && !lru {
        return Err(PinsError::TooSmall {
            dir: dir.display().to_string(),
            map: name.into(),
            entries: count,
            capacity: want.max_entries,
        }
        .into());
    }
    if !is_hash(found.map_type) {
        // Array elements past the new end have nowhere to go.
        kept.retain(|(k, _)| index(k) < want.max_entries);
    }
    let fd = bpf_sys::create_map(name, want).map_err(sys(format!("creating the new {name}")))?;
    let keys: Vec<u8> = kept.iter().flat_map(|(k, _)| k.iter().copied()).collect();
    let values: Vec<u8> = kept.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    bpf_sys::update_batch_raw(
        fd.as_fd(),
        &keys,
        found.key_size as usize,
        &values,
        value_stride(want),
    )
    .map_err(sys(format!("copying {name} into its new map")))?;
    let new = MapData::from_fd(fd).map_err(super::map_err(format!("wrapping the new {name}")))?;
    pin_next(&new, dir, name)?;
    let lost = if lru && count > want.max_entries as usize {
        format!(
            " ({} least recently used did not fit and were dropped)",
            count - want.max_entries as usize
        )
    } else {
        String::new()
    };
    report.note(format!(
        "{name} migrated from {} to {} entries: {} entries copied{lost}",
        found.max_entries,
        want.max_entries,
        kept.len().min(want.max_entries as usize)
    ));
    report.migrated.push(Migrated {
        name,
        old,
        new,
        shape: *want,
    });
    Ok(())
}

/// Pins `map` as `<dir>/<name>`, atomically replacing what is pinned there.
pub(crate) fn pin_replacing(map: &MapData, dir: &Path, name: &str) -> Result<(), DataplaneError> {
    pin_next(map, dir, name)?;
    place(dir, name)
}

/// Pins `map` as `<dir>/<name>_next`.
fn pin_next(map: &MapData, dir: &Path, name: &str) -> Result<(), DataplaneError> {
    let next = dir.join(format!("{name}{NEXT}"));
    let _ = std::fs::remove_file(&next);
    map.pin(&next)
        .map_err(|e| DataplaneError::Other(format!("pinning {}: {e}", next.display())))
}

/// Renames `<dir>/<name>_next` over `<dir>/<name>` (atomic on bpffs as anywhere).
fn place(dir: &Path, name: &str) -> Result<(), DataplaneError> {
    let next = dir.join(format!("{name}{NEXT}"));
    std::fs::rename(&next, dir.join(name)).map_err(|e| {
        let _ = std::fs::remove_file(&next);
        DataplaneError::Other(format!("renaming {} into place: {e}", next.display()))
    })
}

/// Removes `*_next` pins an interrupted start left behind (the maps they name were never put
/// in place, so nothing uses them).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(NEXT) {
            warn!(pin = %entry.path().display(), "removing the leftover of an interrupted start");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Every (key, value) of `map`, as bytes.
fn read_all(map: &MapData, shape: &MapShape) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    bpf_sys::lookup_each_raw(
        map.fd().as_fd(),
        shape.key_size as usize,
        value_stride(shape),
        4096,
        |k, v| out.push((k.to_vec(), v.to_vec())),
    )?;
    Ok(out)
}

fn is_hash(map_type: u32) -> bool {
    matches!(map_type, 1 | 5 | 9 | 10)
}

/// Bytes of one value in a batch call: per-CPU maps carry one 8-byte-aligned value per CPU.
fn value_stride(shape: &MapShape) -> usize {
    let size = shape.value_size as usize;
    if matches!(shape.map_type, 5 | 6 | 10) {
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        size.div_ceil(8) * 8 * cpus
    } else {
        size
    }
}

fn index(key: &[u8]) -> u32 {
    key.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(u32::MAX, u32::from_ne_bytes)
}

/// Names of everything [`prepare`] and [`record`] may pin under a pin directory (for
/// `meshd --cleanup`).
pub fn pinned_names() -> impl Iterator<Item = String> {
    PINNED_MAPS
        .iter()
        .chain(std::iter::once(&layout::RECORD_NAME))
        .flat_map(|name| [name.to_string(), format!("{name}{NEXT}")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_map_what_was_found_and_expected_and_the_way_out() {
        let shape = |value_size| MapShape {
            map_type: 9,
            key_size: 40,
            value_size,
            max_entries: 2048,
            map_flags: 0,
        };
        let text = PinsError::Incompatible {
            dir: "/sys/fs/bpf/mesh".into(),
            maps: vec![Mismatch {
                map: "CONNTRACK".into(),
                found: shape(56),
                expected: shape(48),
            }],
            recorded: false,
        }
        .to_string();
        for needle in [
            "written before meshd kept a layout record",
            "/sys/fs/bpf/mesh/CONNTRACK: found lru_hash key 40 B value 56 B, 2048 entries",
            "expected lru_hash key 40 B value 48 B",
            "meshd --cleanup --pin-dir /sys/fs/bpf/mesh",
            "every connection the kernel tracks is lost",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
    }

    #[test]
    fn per_cpu_values_are_counted_once_per_cpu_and_aligned() {
        let shape = MapShape {
            map_type: 6,
            key_size: 4,
            value_size: 12,
            max_entries: 1,
            map_flags: 0,
        };
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        assert_eq!(value_stride(&shape), 16 * cpus);
        assert_eq!(
            value_stride(&MapShape {
                map_type: 2,
                ..shape
            }),
            12
        );
    }
}
