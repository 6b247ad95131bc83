//! The L7 tests' common setup: a ServiceEntry `web` on a VIP with HTTP backends in their own
//! namespaces, a DestinationRule and a VirtualService, and meshd running on the node.

use std::net::SocketAddr;

use anyhow::Result;

use crate::{
    http::{http_server, HttpServer},
    meshd::Meshd,
    rules::{meshd_args, RulesDir},
    topology::{backend_v4, Topology},
};

/// The service address.
pub const VIP: &str = "198.18.100.1";
/// The service host.
pub const HOST: &str = "web.mesh.test";

/// VIP:80.
pub fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("ip"), 80)
}

/// ServiceEntry `web` (VIP:80, HTTP, endpoints :8080 on backends `1..=n`, version v<i>) and a
/// DestinationRule with subsets v1..vn and `policy` (YAML under `trafficPolicy:`, or empty).
pub fn service(n: usize, policy: &str) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  resolution: STATIC
  endpoints:
"
    );
    for i in 1..=n {
        yaml.push_str(&format!(
            "  - {{address: {}, labels: {{version: v{i}}}}}\n",
            backend_v4(i)
        ));
    }
    yaml.push_str(&format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: {HOST}
"
    ));
    if !policy.is_empty() {
        yaml.push_str("  trafficPolicy:\n");
        for line in policy.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    yaml.push_str("  subsets:\n");
    for i in 1..=n {
        yaml.push_str(&format!("  - {{name: v{i}, labels: {{version: v{i}}}}}\n"));
    }
    yaml
}

/// VirtualService `web` with these `http` routes (YAML under `http:`).
pub fn virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web}}
spec:
  hosts: [{HOST}]
  http:
{http}"
    )
}

/// Topology with `n` HTTP backends (identities v1..vn), rules written, meshd running.
pub struct Setup {
    /// The backends (identities v1..vn).
    pub servers: Vec<HttpServer>,
    /// meshd on the node.
    pub meshd: Meshd,
    /// The --config directory.
    pub rules: RulesDir,
    /// The namespaces.
    pub topo: Topology,
}

impl Setup {
    /// `n` backends, `policy` (see [`service`]), `http` routes (none when empty).
    pub fn new(n: usize, policy: &str, http: &str) -> Result<Self> {
        Self::with_args(n, policy, http, &[])
    }

    /// As [`Setup::new`], with more meshd arguments.
    pub fn with_args(n: usize, policy: &str, http: &str, extra: &[&str]) -> Result<Self> {
        let topo = Topology::build(n)?;
        let mut servers = Vec::new();
        for (index, ns) in topo.backends.iter().enumerate() {
            let i = index + 1;
            servers.push(http_server(
                ns,
                SocketAddr::new(backend_v4(i), 8080),
                &format!("v{i}"),
            )?);
        }
        let rules = RulesDir::new(&topo)?;
        rules.write("web.yaml", &service(n, policy))?;
        if !http.is_empty() {
            rules.write("vs.yaml", &virtual_service(http))?;
        }
        // JSON logs: the access-log check parses them.
        let mut args = meshd_args(&topo, &rules);
        args.extend(["--log-format".to_string(), "json".to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let meshd = Meshd::start(&topo.node, &args)?;
        Ok(Self {
            servers,
            meshd,
            rules,
            topo,
        })
    }

    /// Runs `f` in the client namespace.
    pub fn client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.topo.client.run(f)?
    }
}
