//! The pin directory's contract: which maps meshd pins, the shape this meshd expects of each
//! (type, key size, value size, capacity, flags), and the layout record that says which layout
//! the pinned maps' contents follow.
//!
//! - Expected shapes come from the kernel object embedded in meshd (its map definitions) with
//!   the capacities the flags ask for ([`capacities`]: the one place that sizes maps).
//! - The record is itself a pinned map, `<pin_dir>/MESH_LAYOUT` (bpffs holds only BPF objects):
//!   a one-element array whose value is a [`LayoutRecord`]: a magic number, the layout version
//!   ([`LAYOUT_VERSION`]) and the shape of every pinned map as it was written. It is replaced
//!   atomically (pinned under another name, then renamed) each time meshd settles its pins.
//!
//! Bump [`LAYOUT_VERSION`] whenever the meaning of a pinned map's key or value changes without
//! its size changing; a size change is seen from the shapes alone. [`super::pins`] acts on
//! differences (migrate or refuse).

use std::{collections::BTreeMap, fmt, os::fd::AsFd, path::Path};

use aya::maps::{Array, MapData};
use mesh_common::map_names;

use super::{
    bpf_sys::{self, MapShape},
    loader::DataplaneOptions,
    DataplaneError, EBPF_OBJECT,
};

/// Layout of the pinned maps' contents written by this meshd. Pins written before the record
/// existed are layout 1 when their shapes match.
pub const LAYOUT_VERSION: u32 = 1;

/// Name of the record's pin in the pin directory.
pub const RECORD_NAME: &str = "MESH_LAYOUT";

/// Marks a [`LayoutRecord`] ("meshpins" in ASCII).
const MAGIC: u64 = u64::from_le_bytes(*b"meshpins");

/// Most maps a record describes.
const MAX_RECORDED: usize = 16;

/// Maps that carry state worth keeping across a daemon restart, pinned under the pin directory.
pub const PINNED_MAPS: &[&str] = &[
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::MAGLEV,
    map_names::CONNTRACK,
    map_names::CT_PENDING,
    map_names::CT_STATS,
    map_names::SERVICE_STATS,
    map_names::BACKEND_STATS,
    map_names::REASON_STATS,
    // The socket hooks' memory of what each socket asked for (getpeername/recvmsg) and of UDP
    // flows, so sockets opened before a restart keep both.
    map_names::SOCK_REVNAT,
    map_names::SOCK_FLOWS,
];

/// Maps read together by one packet (a service entry, its Maglev slice, the backends): they
/// move to new maps together or not at all, so a program never mixes an old and a new one.
pub const RULE_TABLES: &[&str] = &[map_names::SERVICES, map_names::BACKENDS, map_names::MAGLEV];

/// Capacities set from the options rather than the object: (map, max_entries).
pub fn capacities(options: &DataplaneOptions) -> Result<Vec<(&'static str, u32)>, DataplaneError> {
    Ok(vec![
        (map_names::MAGLEV, options.maglev_pool_entries),
        // Two entries per flow, one per direction.
        (
            map_names::CONNTRACK,
            options
                .conntrack_entries
                .checked_mul(2)
                .ok_or_else(|| DataplaneError::Capacity("conntrack capacity too large".into()))?,
        ),
        (map_names::CT_PENDING, 2 * options.pending_flows()),
    ])
}

/// The shape of every pinned map as this meshd creates it.
pub fn expected(
    options: &DataplaneOptions,
) -> Result<BTreeMap<&'static str, MapShape>, DataplaneError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DataplaneError::Other(format!("reading the embedded kernel object: {e}")))?;
    let sizes = capacities(options)?;
    PINNED_MAPS
        .iter()
        .map(|name| {
            let map = object.maps.get(*name).ok_or_else(|| {
                DataplaneError::Other(format!("map {name} missing from the kernel object"))
            })?;
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, size)| *size);
            Ok((
                *name,
                MapShape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    map_flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// The shape of the map pinned at `path`, `None` when nothing is pinned there.
pub fn pinned_shape(path: &Path) -> Result<Option<MapShape>, DataplaneError> {
    if !path.exists() {
        return Ok(None);
    }
    let data =
        MapData::from_pin(path).map_err(super::map_err(format!("opening {}", path.display())))?;
    let info = data.info().map_err(super::map_err(format!(
        "reading the kernel's info on {}",
        path.display()
    )))?;
    Ok(Some(MapShape {
        map_type: type_number(&info),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        map_flags: info.map_flags(),
    }))
}

fn type_number(info: &aya::maps::MapInfo) -> u32 {
    // MapInfo exposes the type only as aya's enum; its discriminants are the kernel's numbers.
    info.map_type().map_or(u32::MAX, |t| t as u32)
}

/// A map type's name as bpftool prints it.
pub fn type_name(map_type: u32) -> &'static str {
    match map_type {
        1 => "hash",
        2 => "array",
        5 => "percpu_hash",
        6 => "percpu_array",
        9 => "lru_hash",
        10 => "lru_percpu_hash",
        _ => "other",
    }
}

/// A shape as people read it.
pub struct Shown<'a>(pub &'a MapShape);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(
            f,
            "{} key {} B value {} B, {} entries, flags {:#x}",
            type_name(s.map_type),
            s.key_size,
            s.value_size,
            s.max_entries,
            s.map_flags
        )
    }
}

/// One map as a record stores it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordedMap {
    /// Map name, NUL-padded.
    pub name: [u8; 24],
    /// Its shape when the record was written.
    pub map_type: u32,
    /// Key size.
    pub key_size: u32,
    /// Value size.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub map_flags: u32,
    /// Zero.
    pub _pad: u32,
}

/// The value of the record map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LayoutRecord {
    /// [`MAGIC`].
    pub magic: u64,
    /// Layout version of the contents.
    pub version: u32,
    /// Entries of `maps` in use.
    pub count: u32,
    /// The pinned maps.
    pub maps: [RecordedMap; MAX_RECORDED],
}

// SAFETY: plain `#[repr(C)]` data without implicit padding (sizes are multiples of 8).
unsafe impl aya::Pod for LayoutRecord {}

impl LayoutRecord {
    /// A record of `version` describing `maps`.
    pub fn new(version: u32, maps: &BTreeMap<&str, MapShape>) -> Self {
        let mut record = Self {
            magic: MAGIC,
            version,
            count: 0,
            maps: [RecordedMap::default(); MAX_RECORDED],
        };
        for ((name, shape), slot) in maps.iter().zip(record.maps.iter_mut()) {
            for (b, c) in slot.name.iter_mut().zip(name.bytes()) {
                *b = c;
            }
            *slot = RecordedMap {
                name: slot.name,
                map_type: shape.map_type,
                key_size: shape.key_size,
                value_size: shape.value_size,
                max_entries: shape.max_entries,
                map_flags: shape.map_flags,
                _pad: 0,
            };
            record.count += 1;
        }
        record
    }

    /// The recorded shapes by name.
    pub fn shapes(&self) -> BTreeMap<String, MapShape> {
        self.maps[..(self.count as usize).min(MAX_RECORDED)]
            .iter()
            .map(|m| {
                let end = m.name.iter().position(|b| *b == 0).unwrap_or(m.name.len());
                (
                    String::from_utf8_lossy(&m.name[..end]).into_owned(),
                    MapShape {
                        map_type: m.map_type,
                        key_size: m.key_size,
                        value_size: m.value_size,
                        max_entries: m.max_entries,
                        map_flags: m.map_flags,
                    },
                )
            })
            .collect()
    }
}

const RECORD_SHAPE: MapShape = MapShape {
    map_type: 2, // BPF_MAP_TYPE_ARRAY
    key_size: 4,
    value_size: std::mem::size_of::<LayoutRecord>() as u32,
    max_entries: 1,
    map_flags: 0,
};

/// What the pin directory's record says.
#[derive(Debug)]
pub enum RecordState {
    /// No record pinned.
    Missing,
    /// A record this meshd can read.
    Found(Box<LayoutRecord>),
    /// Something pinned under the record's name that is not a record this meshd can read.
    Unreadable(String),
}

/// Reads `<dir>/MESH_LAYOUT`.
pub fn read_record(dir: &Path) -> RecordState {
    let path = dir.join(RECORD_NAME);
    let shape = match pinned_shape(&path) {
        Ok(None) => return RecordState::Missing,
        Ok(Some(shape)) => shape,
        Err(e) => return RecordState::Unreadable(e.to_string()),
    };
    if shape != RECORD_SHAPE {
        return RecordState::Unreadable(format!(
            "{} (a record of this meshd is {})",
            Shown(&shape),
            Shown(&RECORD_SHAPE)
        ));
    }
    let read = MapData::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            let array: Array<MapData, LayoutRecord> =
                Array::try_from(aya::maps::Map::Array(data)).map_err(|e| e.to_string())?;
            array.get(&0, 0).map_err(|e| e.to_string())
        });
    match read {
        Ok(record) if record.magic == MAGIC => RecordState::Found(Box::new(record)),
        Ok(_) => RecordState::Unreadable("no mesh layout record marker".into()),
        Err(e) => RecordState::Unreadable(e),
    }
}

/// Writes `record` as `<dir>/MESH_LAYOUT`, replacing an older one atomically.
pub fn write_record(dir: &Path, record: &LayoutRecord) -> Result<(), DataplaneError> {
    let io = |what: &str| {
        let what = format!("{what} {}", dir.join(RECORD_NAME).display());
        move |e: std::io::Error| DataplaneError::Other(format!("{what}: {e}"))
    };
    let fd = bpf_sys::create_map(RECORD_NAME, &RECORD_SHAPE).map_err(io("creating"))?;
    let value = bytes_of(record);
    bpf_sys::update_elem(fd.as_fd(), &0u32.to_ne_bytes(), value, 0).map_err(io("writing"))?;
    let data = MapData::from_fd(fd).map_err(super::map_err("wrapping the layout record"))?;
    super::pins::pin_replacing(&data, dir, RECORD_NAME)
}

fn bytes_of(record: &LayoutRecord) -> &[u8] {
    // SAFETY: LayoutRecord is plain data without padding (see its Pod impl).
    unsafe {
        std::slice::from_raw_parts(
            (record as *const LayoutRecord).cast::<u8>(),
            std::mem::size_of::<LayoutRecord>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_its_shapes() {
        let shape = MapShape {
            map_type: 9,
            key_size: 40,
            value_size: 48,
            max_entries: 1024,
            map_flags: 0,
        };
        let maps = BTreeMap::from([("CONNTRACK", shape)]);
        let record = LayoutRecord::new(LAYOUT_VERSION, &maps);
        assert_eq!(record.shapes().get("CONNTRACK"), Some(&shape));
        assert_eq!(record.shapes().len(), 1);
        assert_eq!(std::mem::size_of::<LayoutRecord>() % 8, 0);
    }

    #[test]
    fn every_pinned_map_fits_in_a_record_and_is_in_the_object() {
        assert!(PINNED_MAPS.len() <= MAX_RECORDED);
        let shapes = expected(&DataplaneOptions::default()).expect("the object's maps");
        assert_eq!(shapes.len(), PINNED_MAPS.len());
        assert_eq!(
            shapes[map_names::CONNTRACK].max_entries,
            2 * mesh_common::DEFAULT_CONNTRACK_FLOWS
        );
    }
}
