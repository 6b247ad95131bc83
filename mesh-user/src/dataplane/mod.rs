//! The kernel side as seen from userspace: loads the XDP programs embedded in meshd, attaches
//! them to interfaces, applies a [`DesiredState`](crate::compile::DesiredState) to the BPF maps
//! atomically and reads the counters back.
//!
//! - [`attach`]: per interface, XDP or TC (the one place that decides), and attaching;
//! - [`features`]: what the running kernel supports, and the choices made from it;
//! - [`kernel_log`]: the programs' debug log level and its reader (`--kernel-log`);
//! - [`loader`]: object loading and attaching; [`layout`]: the pin directory's contract (map
//!   sizing, expected shapes, the layout record); [`pins`]: reopening pins (reuse, migrate or
//!   refuse);
//! - [`tables`]: per-service Maglev slices, ids and incremental applies, over [`pool`]
//!   (free space) and [`bpf_sys`] (batch map calls, the shared Maglev pool);
//! - [`stats`]: per-CPU counters summed into a snapshot; [`census`]: connections per backend,
//!   counted off the request path.
//! - [`peer`]: which veths lead into a container's namespace (`bpf_redirect_peer` targets);
//! - [`sockets`]: the cgroup socket hooks that balance node-local clients at connect().

pub mod attach;
pub mod bpf_sys;
pub mod census;
pub mod features;
pub mod kernel_log;
pub mod layout;
pub mod loader;
pub mod peer;
pub mod pins;
pub mod pool;
pub mod sockets;
pub mod stats;
pub mod tables;

pub use attach::{AttachRequest, HookKind, XdpAttachMode};
pub use kernel_log::KernelLogLevel;
pub use loader::{Dataplane, DataplaneOptions};
pub use sockets::{SocketLbOptions, SocketLbStatus};
pub use stats::{BackendStats, ServiceStats, StatsSnapshot};
pub use tables::ApplyReport;

/// The compiled kernel programs, as built by `build.rs` from `mesh-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Errors of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded or a program failed verification.
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("{context}: {source}")]
    Program {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("{context}: {source}")]
    Map {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: aya::maps::MapError,
    },
    /// The pin directory holds maps this meshd cannot use as they are.
    #[error(transparent)]
    Pins(#[from] pins::PinsError),
    /// The rules need more room than the maps have.
    #[error("{0}")]
    Capacity(String),
    /// Something else went wrong (bpffs mount, interface lookup, ...).
    #[error("{0}")]
    Other(String),
}

pub(crate) fn map_err(
    context: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    let context = context.into();
    move |source| DataplaneError::Map { context, source }
}

/// The map behind one of aya's map handles, for the types the program uses.
pub(crate) fn map_data(map: &aya::maps::Map) -> Option<&aya::maps::MapData> {
    use aya::maps::Map;
    match map {
        Map::Array(m) | Map::HashMap(m) | Map::PerCpuArray(m) | Map::LruHashMap(m) => Some(m),
        _ => None,
    }
}
