//! Connections per backend, counted off the request path.
//!
//! `meshctl stats`, the metrics scrape and `meshctl status` used to walk the whole connection
//! table (two system calls per entry) under the controller lock on every call: at 100 000 flows
//! that blocked every apply for a second. Now a background thread counts the table with batch
//! reads, at most every [`CENSUS_INTERVAL`] and only while someone has asked in the last minute,
//! and callers read the last count without touching the table.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_common::{FlowKey, FlowState, FLOW_REQUEST};

use super::bpf_sys;

/// How often the table is counted while the counts are wanted.
pub const CENSUS_INTERVAL: Duration = Duration::from_secs(2);
/// A flow counts as active when it carried a packet within this window.
pub const ACTIVE_FLOW_WINDOW: Duration = Duration::from_secs(10);
/// Counting stops when nobody asked for this long.
const IDLE_AFTER: Duration = Duration::from_secs(60);

/// The last count of the connection table.
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// Flows (client-side entries) in the table.
    pub flows: u64,
    /// Active flows per backend id.
    pub active: HashMap<u32, u64>,
}

#[derive(Default)]
struct Shared {
    census: Census,
    wanted_at: Option<Instant>,
}

/// Handle on the counting thread; the thread ends when this is dropped.
pub struct CensusTaker {
    shared: Arc<Mutex<Shared>>,
}

impl CensusTaker {
    /// Starts counting the connection table behind `conntrack` (a duplicate of its fd).
    pub fn start(conntrack: OwnedFd) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("conntrack-census".into())
            .spawn(move || loop {
                let Some(shared) = weak.upgrade() else { return };
                let wanted = shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .wanted_at
                    .is_some_and(|t| t.elapsed() < IDLE_AFTER);
                if wanted {
                    let census = count(&conntrack);
                    shared.lock().unwrap_or_else(|p| p.into_inner()).census = census;
                }
                drop(shared);
                std::thread::sleep(CENSUS_INTERVAL);
            });
        if let Err(e) = spawned {
            tracing::warn!("connection census thread not started ({e}): active counts stay 0");
        }
        Self { shared }
    }

    /// The last count (at most [`CENSUS_INTERVAL`] old while wanted; the first call after a
    /// quiet minute sees the count from before it).
    pub fn latest(&self) -> Census {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.wanted_at = Some(Instant::now());
        shared.census.clone()
    }
}

fn count(conntrack: &OwnedFd) -> Census {
    let mut census = Census::default();
    let now = monotonic_ns();
    let window = ACTIVE_FLOW_WINDOW.as_nanos() as u64;
    let walked = bpf_sys::lookup_each::<FlowKey, FlowState>(conntrack.as_fd(), 8192, |_, state| {
        if state.direction == FLOW_REQUEST {
            census.flows += 1;
            if now.saturating_sub(state.last_seen_ns) <= window {
                *census.active.entry(state.backend_id).or_insert(0) += 1;
            }
        }
    });
    match walked {
        Ok(()) => census,
        Err(_) => Census::default(),
    }
}

/// The clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
