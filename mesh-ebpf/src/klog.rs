//! Kernel debug logging through aya-log, for developers (`meshd --kernel-log LEVEL`).
//!
//! Log points sit only on paths no established flow takes (refusals, table inconsistencies,
//! connection-table repairs). Each checks aya-log's `.rodata` level `AYA_LOG_LEVEL`, which meshd
//! sets at load (0 unless `--kernel-log` is given): the verifier sees a constant and removes the
//! disabled log code, so logging off costs nothing. Records go to aya-log's `AYA_LOGS` ring
//! buffer, which meshd drains into its own log.
//!
//! aya-log builds each record in a BPF subprogram whose stack adds to the pipeline's, which uses
//! all but a few dozen of the 512 bytes: so a record carries two scalars at most (ids, a port).
//! `meshctl trace` shows the full tuple of the same decisions.

use aya_log_ebpf::{debug, error};
use mesh_common::{port_from_wire, FlowKey};

/// A new flow refused: its service has no backend (routes to subsets or hosts not defined yet).
#[inline(always)]
pub fn refused(key: &FlowKey, service_id: u32) {
    let client_port = port_from_wire(key.src_port);
    debug!(
        &(),
        "refused a new flow to service {} from client port {}: no backend", service_id, client_port
    );
}

/// A new flow dropped: the service's Maglev slot names a backend the backend table lacks.
#[inline(always)]
pub fn inconsistent(key: &FlowKey, service_id: u32) {
    let client_port = port_from_wire(key.src_port);
    error!(
        &(),
        "dropped a new flow to service {} from client port {}: its Maglev table names a missing \
         backend",
        service_id,
        client_port
    );
}

/// One direction of an established flow was missing from the connection table and was rebuilt
/// from the other.
#[inline(always)]
pub fn rebuilt(service_id: u32, backend_id: u32) {
    debug!(
        &(),
        "conntrack: rebuilt the missing direction of a flow of service {} (backend {})",
        service_id,
        backend_id
    );
}
