//! Shared test support: the kernel object under test, frame builders, network-namespace hosts,
//! meshd/meshctl runners, rules and traffic helpers.

/// The compiled kernel programs, as embedded in meshd.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

pub mod browser;
pub mod fleet;
pub mod http;
pub mod maps;
pub mod meshd;
pub mod netns;
pub mod observe;
pub mod packet;
pub mod portfwd;
pub mod rules;
pub mod servers;
pub mod split;
pub mod topology;
pub mod traffic;
pub mod web;
