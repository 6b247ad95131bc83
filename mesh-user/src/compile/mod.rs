//! Lowers a [`ResolvedModel`] into a [`DesiredState`]: a pure function that cannot fail, since
//! every check and decision was made by [`crate::resolve`].
//!
//! What is left to do here: build the weighted Maglev table of every kernel-path service
//! ([`maglev`], each table built once for its inputs: [`table_cache`]) and attach each
//! service's path and reason to its plan. The L7 route tables come
//! out of resolution ready for the proxy.

pub mod maglev;
mod state;
pub mod table_cache;

pub use state::*;

pub use crate::resolve::{NodeContext, ResolveError};
use crate::{
    config::ResourceSet,
    resolve::{resolve, KernelService, ResolvedModel, Serving},
};

/// The desired state of a resolved model. Deterministic: services keep the model's order
/// (sorted by address), backends theirs (by socket address).
pub fn compile(model: ResolvedModel) -> DesiredState {
    let services = model
        .services
        .into_iter()
        .map(|service| ServicePlan {
            address: service.address,
            name: service.name,
            sources: service.sources,
            path: service.path,
            plan: match service.serving {
                Serving::Kernel(kernel) => Plan::L4(kernel_plan(kernel)),
                Serving::Proxy(plan) => Plan::L7(plan),
            },
        })
        .collect();
    DesiredState {
        services,
        warnings: model.warnings,
    }
}

/// Resolves `set` for `node` and compiles the model: what meshd and `meshctl validate` do
/// with a rule set. The only failures are resolution's.
pub fn compile_rules(set: &ResourceSet, node: &NodeContext) -> Result<DesiredState, ResolveError> {
    Ok(compile(resolve(set, node)?))
}

/// The Maglev table of a kernel-path service (sized by the backend count unless the rules
/// say `maglev.tableSize`).
fn kernel_plan(kernel: KernelService) -> L4Plan {
    let KernelService {
        backends,
        table_size,
        hash_source_ip,
    } = kernel;
    let size = table_size.unwrap_or_else(|| maglev::default_table_size(backends.len()));
    let keys: Vec<String> = backends.iter().map(|b| b.address.to_string()).collect();
    let shares: Vec<f64> = backends.iter().map(|b| b.share).collect();
    let table = if backends.is_empty() {
        Vec::new()
    } else {
        table_cache::table(&keys, &shares, size)
    };
    L4Plan {
        backends,
        table,
        hash_source_ip,
        sized_by_default: table_size.is_none(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
