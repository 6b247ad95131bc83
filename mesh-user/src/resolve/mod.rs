//! How a rule is resolved: parsed Istio resources in, one typed [`ResolvedModel`] out, with
//! every decision made and every reference looked up once. [`crate::compile`] lowers the model
//! into kernel maps and proxy tables and cannot fail.
//!
//! The stages, in order:
//! 1. [`crate::validate`]: each resource alone and the references between them; errors reject
//!    the submission, warnings (Istio's IST0101: a host, subset or Gateway not defined yet, a
//!    subset without endpoints) are kept beside the model.
//! 2. [`index`]: host -> ServiceEntry / DestinationRule / VirtualServices, gateway references,
//!    with Istio's short-name rule. The one place a host is looked up (and the one wording of
//!    "no ServiceEntry defines host").
//! 3. [`services`]: the service addresses (ServiceEntry VIPs x ports, Gateway servers merged
//!    by port x node addresses); for each, [`select`] picks the applicable route and
//!    [`path::decide`] makes THE kernel-or-proxy decision, naming its reason ([`Path`]).
//! 4. Destinations resolved to endpoints: [`backends`] for the kernel path (shares = route
//!    weight x endpoint weight, per address family, target ports resolved), [`l7`] for the
//!    proxy (the route table with typed durations, `retryOn` conditions, regexes checked,
//!    clusters with their endpoints and traffic policy). A destination not defined yet
//!    resolves to no backend: its share is refused on the kernel path, 503 on the proxy.
//! 5. Capacity: more services or backends than the kernel maps hold is an error here.

pub(crate) mod backends;
pub(crate) mod index;
mod l7;
pub mod path;
mod select;
mod services;

use std::{collections::BTreeMap, net::IpAddr};

pub use path::{KernelReason, Path, ProxyReason};

use crate::{
    compile::{BackendPlan, L7Plan, ServiceAddress},
    config::ResourceSet,
    validate::{validate, ValidationErrors, Warning},
};

/// What resolution needs to know about the node it resolves for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Addresses Gateways listen on (every Gateway server is served on each of them).
    pub node_addresses: Vec<IpAddr>,
}

/// Why rules could not be resolved. Every variant prints one line per problem in the format
/// "FILE: document N (Kind ns/name): FIELD: MESSAGE" where a resource is involved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The rules are invalid (see [`crate::validate`]).
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    /// Valid Istio, but this build cannot serve it (needs TLS in the proxy, or conflicts in
    /// what the node can serve).
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

impl ResolveError {
    /// The warnings found next to the errors (empty for [`ResolveError::TooLarge`]).
    pub fn warnings(&self) -> &[Warning] {
        match self {
            ResolveError::Invalid(found) | ResolveError::Unsupported(found) => &found.warnings,
            ResolveError::TooLarge { .. } => &[],
        }
    }
}

/// The rules with every decision made: one entry per service address, sorted by address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvedModel {
    /// Every service address the node serves.
    pub services: Vec<ResolvedService>,
    /// What validation warned about, for `meshctl` and meshd's log.
    pub warnings: Vec<Warning>,
}

/// One service address, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedService {
    /// The address clients use.
    pub address: ServiceAddress,
    /// Human name: the Istio host (or `gateway/<ns>/<name>:<port>` for a Gateway server).
    pub name: String,
    /// Resources it was resolved from (`kind/namespace/name`), sorted.
    pub sources: Vec<String>,
    /// Kernel or proxy, and why ([`path::decide`]).
    pub path: Path,
    /// What serves it, resolved to endpoints.
    pub serving: Serving,
}

/// What serves a service address; the variant always agrees with [`ResolvedService::path`].
#[derive(Clone, Debug, PartialEq)]
pub enum Serving {
    /// The kernel path: weighted backends.
    Kernel(KernelService),
    /// The L7 proxy: its route table, with clusters resolved to endpoints.
    Proxy(L7Plan),
}

/// A kernel-path service: backends with their shares and the Maglev settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelService {
    /// Backends with share > 0, sorted by address; empty when the route leads to nothing (yet).
    pub backends: Vec<BackendPlan>,
    /// `consistentHash.maglev.tableSize`; `None`: sized by the backend count.
    pub table_size: Option<u32>,
    /// `consistentHash.useSourceIp`.
    pub hash_source_ip: bool,
}

/// Validates `set` and resolves it for one node. Deterministic: the same input gives the same
/// model.
pub fn resolve(set: &ResourceSet, node: &NodeContext) -> Result<ResolvedModel, ResolveError> {
    let warnings = validate(set)?;
    let index = index::Index::new(set);
    let mut services = services::resolve_services(&index, node).map_err(|mut e| {
        e.warnings = warnings.clone();
        ResolveError::Unsupported(e)
    })?;
    services.sort_by_key(|s| s.address);
    check_capacity(&services)?;
    Ok(ResolvedModel { services, warnings })
}

fn check_capacity(services: &[ResolvedService]) -> Result<(), ResolveError> {
    if services.len() > mesh_common::MAX_SERVICES as usize {
        return Err(ResolveError::TooLarge {
            what: "services",
            count: services.len(),
            limit: mesh_common::MAX_SERVICES as usize,
        });
    }
    let mut distinct = BTreeMap::new();
    for service in services {
        // L7 backends are reached by the proxy's sockets, not through the BACKENDS map.
        if let Serving::Kernel(kernel) = &service.serving {
            for backend in &kernel.backends {
                distinct.insert(backend.address, ());
            }
        }
    }
    if distinct.len() > mesh_common::MAX_BACKENDS as usize {
        return Err(ResolveError::TooLarge {
            what: "backends",
            count: distinct.len(),
            limit: mesh_common::MAX_BACKENDS as usize,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
