//! Compiles validated resources into a [`DesiredState`].

mod state;
pub use state::*;
