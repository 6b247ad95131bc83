//! Shared test support: the kernel object under test, frame builders, network-namespace hosts.

/// The compiled kernel programs, as embedded in meshd.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

pub mod meshd;
pub mod netns;
pub mod servers;
pub mod topology;

pub mod maps;
pub mod packet;
