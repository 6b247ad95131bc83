//! Long work in progress (compiling a large rule set, writing thousands of service tables,
//! persisting the state file), readable without the controller's lock: `meshctl status` shows
//! it while an apply holds the controller, and the work logs it.
//!
//! One process-wide slot: meshd changes its rules one change at a time.

use std::sync::{Mutex, OnceLock};

use crate::admin::Status;

#[derive(Default)]
struct Board {
    /// What is being done now.
    current: Option<String>,
    /// The last full status, answered (with `current`) while the controller is busy.
    last_status: Option<Status>,
}

fn board() -> &'static Mutex<Board> {
    static BOARD: OnceLock<Mutex<Board>> = OnceLock::new();
    BOARD.get_or_init(Default::default)
}

fn with<T>(f: impl FnOnce(&mut Board) -> T) -> T {
    f(&mut board().lock().unwrap_or_else(|p| p.into_inner()))
}

/// Says what is being done now (replaces the previous step).
pub fn set(step: impl Into<String>) {
    let step = step.into();
    with(|b| b.current = Some(step));
}

/// The work is over.
pub fn clear() {
    with(|b| b.current = None);
}

/// What is being done now, if anything.
pub fn current() -> Option<String> {
    with(|b| b.current.clone())
}

/// Keeps `status` to answer with while the controller is busy.
pub fn remember(status: &Status) {
    let status = status.clone();
    with(|b| b.last_status = Some(status));
}

/// The status to answer while the controller is busy: the last one known, with the work in
/// progress; `None` before any status was computed.
pub fn busy_status() -> Option<Status> {
    with(|b| {
        b.last_status.clone().map(|mut s| {
            s.progress = b.current.clone().or(Some("applying rules".into()));
            s
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn steps_replace_each_other_and_clear() {
        super::set("compiling 30000 resources");
        super::set("writing service tables: 5000 of 30000");
        assert_eq!(
            super::current().as_deref(),
            Some("writing service tables: 5000 of 30000")
        );
        super::clear();
        assert_eq!(super::current(), None);
    }
}
