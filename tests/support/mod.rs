//! Shared test support: the kernel object under test, frame builders, network-namespace hosts,
//! meshd/meshctl runners, rules and traffic helpers.

/// The compiled kernel programs, as embedded in meshd.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

pub mod browser;
pub mod chaos;
pub mod container_host;
pub mod figures;
pub mod fleet;
pub mod flood;
pub mod fuzz;
pub mod gateway_tier;
pub mod http;
pub mod l7;
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

/// `d` stretched by `MESH_TEST_SLOWDOWN` (an integer factor, default 1): `cargo xtask vm-test`
/// sets it in its guests, where emulation (TCG) makes everything many times slower. Only waits
/// and I/O timeouts use it; nothing asserts on time.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    let factor = std::env::var("MESH_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}
