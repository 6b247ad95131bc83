//! Lookups across resources (host -> ServiceEntry, host -> DestinationRule, gateway references),
//! with Istio's short-name rule, shared by cross-resource validation and compile.

use std::collections::HashMap;

use crate::config::{
    DestinationRule, Gateway, Resource, ResourceKind, ResourceSet, ServiceEntry, VirtualService,
};

/// The Kubernetes-style FQDN of a host as seen from `namespace`: a name without dots is short
/// for `<name>.<namespace>.svc.cluster.local`; anything else is taken as written.
pub(crate) fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// The warning for a reference to a host no ServiceEntry defines (Istio's IST0101): the one
/// wording, wherever a host reference is resolved.
pub(crate) fn dangling_host(host: &str, namespace: &str) -> String {
    format!(
        "no ServiceEntry defines host `{host}` (yet; a short name means `{}`): the rule takes effect when one does, until then traffic routed to it is refused",
        fqdn(host, namespace)
    )
}

/// Whether a host named in one namespace denotes a host defined in another: equal after
/// short-name completion, or written identically.
pub(crate) fn same_host(
    host: &str,
    namespace: &str,
    defined: &str,
    defined_namespace: &str,
) -> bool {
    host == defined || fqdn(host, namespace) == fqdn(defined, defined_namespace)
}

/// Typed views of a resource set, in source order, with hash indexes by host so that lookups
/// stay O(1) with tens of thousands of services.
pub(crate) struct Index<'a> {
    pub service_entries: Vec<(&'a Resource, &'a ServiceEntry)>,
    pub destination_rules: Vec<(&'a Resource, &'a DestinationRule)>,
    pub virtual_services: Vec<(&'a Resource, &'a VirtualService)>,
    pub gateways: Vec<(&'a Resource, &'a Gateway)>,
    service_entries_by_host: HostIndex,
    destination_rules_by_host: HostIndex,
    virtual_services_by_host: HostIndex,
    gateways_by_name: HashMap<(&'a str, &'a str), usize>,
}

/// Positions (in source order) of the resources naming each host, by the host as written and
/// by its FQDN: [`same_host`] matches either way.
#[derive(Default)]
struct HostIndex {
    literal: HashMap<String, Vec<usize>>,
    fqdn: HashMap<String, Vec<usize>>,
}

impl HostIndex {
    fn add(&mut self, host: &str, namespace: &str, position: usize) {
        let literal = self.literal.entry(host.to_owned()).or_default();
        if literal.last() != Some(&position) {
            literal.push(position);
        }
        let full = self.fqdn.entry(fqdn(host, namespace)).or_default();
        if full.last() != Some(&position) {
            full.push(position);
        }
    }

    /// Positions of resources whose host is the same host as `host` named from `namespace`,
    /// in source order.
    fn find(&self, host: &str, namespace: &str) -> Vec<usize> {
        let mut found: Vec<usize> = self
            .literal
            .get(host)
            .into_iter()
            .chain(self.fqdn.get(&fqdn(host, namespace)))
            .flatten()
            .copied()
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

impl<'a> Index<'a> {
    pub(crate) fn new(set: &'a ResourceSet) -> Self {
        let mut index = Index {
            service_entries: Vec::new(),
            destination_rules: Vec::new(),
            virtual_services: Vec::new(),
            gateways: Vec::new(),
            service_entries_by_host: HostIndex::default(),
            destination_rules_by_host: HostIndex::default(),
            virtual_services_by_host: HostIndex::default(),
            gateways_by_name: HashMap::new(),
        };
        for resource in &set.resources {
            let ns = resource.meta.namespace.as_str();
            match &resource.kind {
                ResourceKind::ServiceEntry(spec) => {
                    for host in &spec.hosts {
                        index
                            .service_entries_by_host
                            .add(host, ns, index.service_entries.len());
                    }
                    index.service_entries.push((resource, spec));
                }
                ResourceKind::DestinationRule(spec) => {
                    index.destination_rules_by_host.add(
                        &spec.host,
                        ns,
                        index.destination_rules.len(),
                    );
                    index.destination_rules.push((resource, spec));
                }
                ResourceKind::VirtualService(spec) => {
                    for host in &spec.hosts {
                        index
                            .virtual_services_by_host
                            .add(host, ns, index.virtual_services.len());
                    }
                    index.virtual_services.push((resource, spec));
                }
                ResourceKind::Gateway(spec) => {
                    index
                        .gateways_by_name
                        .entry((ns, resource.meta.name.as_str()))
                        .or_insert(index.gateways.len());
                    index.gateways.push((resource, spec));
                }
            }
        }
        index
    }

    /// The first ServiceEntry defining `host` (as named from `namespace`).
    pub(crate) fn service_entry(
        &self,
        host: &str,
        namespace: &str,
    ) -> Option<(&'a Resource, &'a ServiceEntry)> {
        let first = *self.service_entries_by_host.find(host, namespace).first()?;
        Some(self.service_entries[first])
    }

    /// The first DestinationRule for `host` (as named from `namespace`).
    pub(crate) fn destination_rule(
        &self,
        host: &str,
        namespace: &str,
    ) -> Option<(&'a Resource, &'a DestinationRule)> {
        let first = *self
            .destination_rules_by_host
            .find(host, namespace)
            .first()?;
        Some(self.destination_rules[first])
    }

    /// VirtualServices naming any of `hosts` (as defined in `namespace`), in source order.
    pub(crate) fn virtual_services_for(
        &self,
        hosts: &[String],
        namespace: &str,
    ) -> Vec<(&'a Resource, &'a VirtualService)> {
        let mut positions: Vec<usize> = hosts
            .iter()
            .flat_map(|h| self.virtual_services_by_host.find(h, namespace))
            .collect();
        positions.sort_unstable();
        positions.dedup();
        positions
            .into_iter()
            .map(|i| self.virtual_services[i])
            .collect()
    }

    /// The Gateway a VirtualService in `namespace` means by `reference` (`name` or `ns/name`).
    pub(crate) fn gateway(
        &self,
        reference: &str,
        namespace: &str,
    ) -> Option<(&'a Resource, &'a Gateway)> {
        let (ns, name) = gateway_ref(reference, namespace);
        let position = *self.gateways_by_name.get(&(ns, name))?;
        Some(self.gateways[position])
    }
}

/// Splits a gateway reference into (namespace, name); a bare name is in `namespace`.
pub(crate) fn gateway_ref<'r>(reference: &'r str, namespace: &'r str) -> (&'r str, &'r str) {
    reference.split_once('/').unwrap_or((namespace, reference))
}

/// True when every label of a subset selector is on the endpoint (an empty selector selects all).
pub(crate) fn selects(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Every destination a VirtualService names, with its field path (routes and mirrors).
pub(crate) fn destinations(spec: &VirtualService) -> Vec<(String, &crate::config::Destination)> {
    let mut out = Vec::new();
    for (i, route) in spec.http.iter().enumerate() {
        for (k, d) in route.route.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].route[{k}].destination"),
                &d.destination,
            ));
        }
        if let Some(mirror) = &route.mirror {
            out.push((format!("spec.http[{i}].mirror"), mirror));
        }
        for (k, mirror) in route.mirrors.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].mirrors[{k}].destination"),
                &mirror.destination,
            ));
        }
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        for (k, d) in route.route.iter().enumerate() {
            out.push((
                format!("spec.tcp[{i}].route[{k}].destination"),
                &d.destination,
            ));
        }
    }
    for (i, route) in spec.tls.iter().enumerate() {
        for (k, d) in route.route.iter().enumerate() {
            out.push((
                format!("spec.tls[{i}].route[{k}].destination"),
                &d.destination,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_complete_with_the_namespace() {
        assert_eq!(fqdn("reviews", "shop"), "reviews.shop.svc.cluster.local");
        assert_eq!(fqdn("a.example.com", "shop"), "a.example.com");
        assert!(same_host(
            "reviews",
            "shop",
            "reviews.shop.svc.cluster.local",
            "x"
        ));
        assert!(same_host(
            "reviews.shop.svc.cluster.local",
            "x",
            "reviews",
            "shop"
        ));
        assert!(!same_host(
            "reviews",
            "a",
            "reviews.b.svc.cluster.local",
            "b"
        ));
        // Written identically: the same host even across namespaces.
        assert!(same_host("reviews", "a", "reviews", "b"));
    }
}
