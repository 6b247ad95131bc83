//! Compiles validated resources into a [`DesiredState`]: a pure function, no I/O.
//!
//! This module owns the decision "which rule serves which address, and can the kernel path do
//! it": service addresses (ServiceEntry VIPs x ports, Gateway servers x node addresses), route
//! selection (first matching TCP route, else a weights-only HTTP route), backend shares, and the
//! weighted Maglev tables ([`maglev`]). Rules that need per-request (L7) behaviour compile into
//! an [`L7Plan`] for the proxy inside meshd ([`l7`] says exactly when).

mod l7;
pub mod maglev;
mod routes;
mod state;

use std::{collections::BTreeMap, net::IpAddr};

pub use state::*;

use crate::{
    config::ResourceSet,
    validate::{validate, ValidationErrors},
};

/// What the compiler needs to know about the node it compiles for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Addresses Gateways listen on (every Gateway server is served on each of them).
    pub node_addresses: Vec<IpAddr>,
}

/// Why rules could not be compiled. Every variant prints one line per problem in the format
/// "FILE: document N (Kind ns/name): FIELD: MESSAGE" where a resource is involved.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The rules are invalid (see [`crate::validate`]).
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    /// Valid Istio, but this build cannot serve it (needs the L7 proxy, or conflicts in what the
    /// node can serve).
    #[error("{0}")]
    Unsupported(ValidationErrors),
    /// More services or backends than the kernel maps hold.
    #[error("the rules need {count} {what}, more than the limit of {limit}")]
    TooLarge {
        /// "services" or "backends".
        what: &'static str,
        /// How many the rules need.
        count: usize,
        /// The map capacity.
        limit: usize,
    },
}

/// Validates `set` and compiles it for one node. Deterministic: the same input gives the same
/// output (services sorted by address, backends by socket address).
pub fn compile(set: &ResourceSet, node: &NodeContext) -> Result<DesiredState, CompileError> {
    let warnings = validate(set)?;
    let mut services = routes::plan_services(set, node).map_err(CompileError::Unsupported)?;
    services.sort_by_key(|s| s.address);
    if services.len() > mesh_common::MAX_SERVICES as usize {
        return Err(CompileError::TooLarge {
            what: "services",
            count: services.len(),
            limit: mesh_common::MAX_SERVICES as usize,
        });
    }
    let mut distinct = BTreeMap::new();
    for service in &services {
        // L7 backends are reached by the proxy's sockets, not through the BACKENDS map.
        if let Plan::L4(plan) = &service.plan {
            for backend in &plan.backends {
                distinct.insert(backend.address, ());
            }
        }
    }
    if distinct.len() > mesh_common::MAX_BACKENDS as usize {
        return Err(CompileError::TooLarge {
            what: "backends",
            count: distinct.len(),
            limit: mesh_common::MAX_BACKENDS as usize,
        });
    }
    Ok(DesiredState { services, warnings })
}

#[cfg(test)]
mod tests;
