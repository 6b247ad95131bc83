//! The soak's node and rules: three backends each running a TCP identity/echo server (the L4
//! service `echo`, kernel path) and an HTTP server (the L7 service `web`, on meshd's proxy
//! because its route has a timeout), meshd with pinned maps and a state file (so restarts are
//! hitless and the applied rules must survive them), and the rule changes applied with meshctl.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use mesh_tests::{
    http::{http_server, HttpServer},
    meshd::{meshctl, Meshd, PinDir},
    rules::{echo_service_entry, echo_split, service_entry, RulesDir, ECHO_SUBSETS},
    servers::{tcp_server, Server},
    topology::{backend_v4, Topology},
};

/// The L7 service's address and host.
pub const WEB_VIP: &str = "198.18.100.2";
pub const WEB_HOST: &str = "web.mesh.test";
/// Connection-table capacity: small, so the flood phase overflows it many times.
pub const CONNTRACK_ENTRIES: u32 = 4096;

/// `web`'s address.
pub fn web_vip() -> SocketAddr {
    SocketAddr::new(WEB_VIP.parse().expect("ip"), 80)
}

/// Everything the soak runs on; meshd is kept outside so it stops first.
pub struct Node {
    /// TCP identity servers (echo) and HTTP servers (web) on every backend.
    pub _tcp: Vec<Server>,
    pub _http: Vec<HttpServer>,
    /// The `--config` directory (services and subsets).
    pub rules: RulesDir,
    /// State file, socket and the files applied with meshctl.
    pub state: RulesDir,
    /// Pinned maps (hitless restarts).
    pub pins: PinDir,
    pub topo: Topology,
}

impl Node {
    /// Builds the namespaces, servers and rule files.
    pub fn build() -> Result<Node> {
        let topo = Topology::build(3)?;
        let mut tcp = Vec::new();
        let mut http = Vec::new();
        for (index, ns) in topo.backends.iter().enumerate() {
            let i = index + 1;
            let id = format!("v{i}");
            tcp.push(tcp_server(ns, SocketAddr::new(backend_v4(i), 8080), &id)?);
            http.push(http_server(ns, SocketAddr::new(backend_v4(i), 9090), &id)?);
        }
        let rules = RulesDir::new(&topo)?;
        rules.write("echo.yaml", &echo_service_entry(&[1, 2, 3]))?;
        rules.write("dr.yaml", ECHO_SUBSETS)?;
        let endpoints: Vec<_> = (1..=3).map(|i| (i, backend_v4(i))).collect();
        let mut web = service_entry(
            "v1",
            "web",
            WEB_VIP,
            &["{number: 80, name: http, protocol: HTTP, targetPort: 9090}"],
            &endpoints,
        );
        web.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: \
             web}}\nspec:\n  host: {WEB_HOST}\n  subsets:\n  - {{name: v1, labels: {{version: \
             v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n  - {{name: v3, labels: \
             {{version: v3}}}}\n"
        ));
        rules.write("web.yaml", &web)?;
        let state = RulesDir::named(&topo, "state")?;
        let pins = PinDir::new(&topo);
        Ok(Node {
            _tcp: tcp,
            _http: http,
            rules,
            state,
            pins,
            topo,
        })
    }

    /// meshd's arguments: every node interface, pins and state file of this run.
    pub fn meshd_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for interface in self.topo.node_interfaces() {
            args.extend(["--iface".to_string(), interface]);
        }
        args.extend([
            "--config".into(),
            self.rules.path(),
            "--socket".into(),
            self.socket(),
            "--pin-dir".into(),
            self.pins.0.display().to_string(),
            "--state-file".into(),
            format!("{}/state.yaml", self.state.path()),
            "--conntrack-entries".into(),
            CONNTRACK_ENTRIES.to_string(),
        ]);
        args
    }

    /// The admin socket.
    pub fn socket(&self) -> String {
        self.state.socket()
    }

    /// Starts meshd (a restart reopens the pins and the state file).
    pub fn start_meshd(&self) -> Result<Meshd> {
        Meshd::start_within(
            &self.topo.node,
            &self.meshd_args(),
            mesh_tests::patience(Duration::from_secs(60)),
        )
    }

    /// Applies the VirtualServices of both services with these v1/v2/v3 weights through
    /// `meshctl apply`; an error carries meshctl's message.
    pub fn apply_weights(&self, weights: [u32; 3]) -> Result<()> {
        let file = format!("{}/vs.yaml", self.state.path());
        let yaml = format!("{}---\n{}", echo_split(weights), web_split(weights));
        std::fs::write(&file, yaml).context("writing vs.yaml")?;
        let (ok, _, err) = meshctl(&self.socket(), &["apply", "-f", &file])?;
        ensure!(ok, "meshctl apply: {}", err.trim());
        Ok(())
    }

    /// The rules applied through the API as meshd reports them (`meshctl get vs -o yaml`).
    pub fn applied_rules(&self) -> Result<String> {
        let (ok, out, err) = meshctl(&self.socket(), &["get", "vs", "-o", "yaml"])?;
        ensure!(ok, "meshctl get vs: {}", err.trim());
        Ok(out)
    }
}

/// `web`'s VirtualService: one HTTP route split by `weights` with a timeout (a per-request
/// feature, so the proxy serves it).
fn web_split(weights: [u32; 3]) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web}}\n\
         spec:\n  hosts: [{WEB_HOST}]\n  http:\n  - timeout: 10s\n    route:\n"
    );
    for (i, w) in weights.iter().enumerate() {
        yaml.push_str(&format!(
            "    - destination: {{host: {WEB_HOST}, subset: v{}}}\n      weight: {w}\n",
            i + 1
        ));
    }
    yaml
}
