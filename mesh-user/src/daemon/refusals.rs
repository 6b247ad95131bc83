//! Refusing connections to services routed to nothing.
//!
//! A service whose routes resolve to no backend (a subset or host not defined yet, a subset
//! that selects no endpoint yet) stays in the kernel maps with an empty table, like Istio keeps
//! the route and answers it with 503. The kernel programs pass its packets to the stack
//! (`REFUSED_NO_BACKEND`); this module makes such a VIP local (a `local` route on `lo`, as for
//! the L7 proxy) with nothing listening on the port, so the stack refuses at once: a TCP client
//! gets a reset, a UDP client an ICMP port unreachable. Node addresses (Gateways) are local
//! already. VIPs that also serve an L7 port are local through the proxy's route.

use std::{collections::BTreeSet, net::IpAddr};

use crate::{
    compile::{DesiredState, Plan},
    proxy::local_routes::LocalRoutes,
};

/// The local routes meshd added for refused services (in the main table: the proxy's own
/// routes for the same VIP live in the local table and come and go on their own).
#[derive(Debug)]
pub struct Refusals {
    routes: LocalRoutes,
    local: BTreeSet<IpAddr>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            routes: LocalRoutes::in_main_table(),
            local: BTreeSet::new(),
        }
    }
}

/// VIPs with a service routed to nothing, and VIPs the proxy makes local.
fn addresses(state: &DesiredState) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
    let mut refused = BTreeSet::new();
    let mut proxied = BTreeSet::new();
    for service in &state.services {
        match &service.plan {
            Plan::L4(plan) if plan.table.is_empty() => {
                refused.insert(service.address.ip);
            }
            Plan::L4(_) => {}
            Plan::L7(_) => {
                proxied.insert(service.address.ip);
            }
        }
    }
    let refused = refused.difference(&proxied).copied().collect();
    (refused, proxied)
}

impl Refusals {
    /// Before the generation flip: makes the VIPs of `state`'s refused services local, so their
    /// first packets after the flip are already refused.
    pub fn prepare(&mut self, state: &DesiredState) {
        let (refused, _) = addresses(state);
        for ip in refused {
            if self.local.contains(&ip) {
                continue;
            }
            match self.routes.ensure(ip) {
                Ok(()) => {
                    self.local.insert(ip);
                }
                Err(e) => tracing::warn!("refusing connections to {ip}: {e}"),
            }
        }
    }

    /// After the flip (or with the rules still in force when it failed): removes the routes of
    /// VIPs that have backends again or are served by the proxy now.
    pub fn commit(&mut self, state: &DesiredState) {
        let (refused, _) = addresses(state);
        let leaving: Vec<IpAddr> = self.local.difference(&refused).copied().collect();
        for ip in leaving {
            self.local.remove(&ip);
            if let Err(e) = self.routes.remove(ip) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Removes every route added here (at exit).
    pub fn shutdown(&mut self) {
        self.local.clear();
        self.routes.remove_all();
    }
}
