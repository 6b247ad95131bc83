//! mesh's userspace: Istio rules in, BPF maps (and later the L7 proxy's route table) out.
//!
//! The pipeline, one module per stage:
//! - [`config`]: typed Istio resources read from YAML, with positions for errors;
//! - [`validate`]: per-resource and cross-resource checks;
//! - [`compile`]: a pure function from resources to a [`compile::DesiredState`];
//! - [`dataplane`]: loads and attaches the kernel programs and applies a desired state to the
//!   BPF maps atomically.

pub mod admin;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod metrics;
pub mod shift;
pub mod store;
pub mod validate;
