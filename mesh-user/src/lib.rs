//! mesh's userspace: Istio rules in, BPF maps and the L7 proxy's route table out.
//!
//! The pipeline, one module per stage:
//! - [`config`]: typed Istio resources read from YAML, with positions for errors;
//! - [`validate`]: per-resource and cross-resource checks;
//! - [`resolve`]: one typed, resolved model of the rules (references looked up, kernel or
//!   proxy decided with its reason, destinations resolved to endpoints);
//! - [`compile`]: a pure function, that cannot fail, from the model to a
//!   [`compile::DesiredState`];
//! - [`dataplane`]: loads and attaches the kernel programs and applies a desired state to the
//!   BPF maps atomically;
//! - [`proxy`]: the L7 proxy serving the services whose routes need HTTP;
//! - [`daemon`]: meshd's life cycle and the controller, the one place rules change;
//! - [`admin`], [`store`], [`metrics`], [`shift`]: the admin API, the persisted rule layers,
//!   Prometheus, progressive delivery;
//! - [`trace`], [`web`]: `meshctl trace` (per-packet and per-request decisions) and the live
//!   split page on the metrics listener.

pub mod admin;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod fleet;
pub mod metrics;
pub mod progress;
pub mod proxy;
pub mod resolve;
pub mod shift;
pub mod store;
pub mod trace;
pub mod validate;
pub mod web;
