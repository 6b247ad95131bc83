//! Rules for tests: a per-test rules directory and the YAML of the `echo` test service.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result};

use crate::topology::{backend_v4, Topology};

/// IPv4 VIP of the `echo` service.
pub const VIP_V4: &str = "198.18.100.1";
/// IPv6 VIP of the `echo6` service.
pub const VIP_V6: &str = "2001:db8:100::1";

/// A directory of rules for one test, removed on drop.
pub struct RulesDir(pub PathBuf);

impl RulesDir {
    /// Creates the directory for `topo`.
    pub fn new(topo: &Topology) -> Result<Self> {
        Self::named(topo, "rules")
    }

    /// Creates the rules directory for a test whose namespaces carry `prefix`.
    pub fn for_prefix(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-rules"));
        std::fs::create_dir_all(&dir)?;
        Ok(RulesDir(dir))
    }

    /// Another directory of the run, `<prefix>-<suffix>` (e.g. for files to `meshctl apply`
    /// that meshd must not see as `--config` files).
    pub fn named(topo: &Topology, suffix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-{suffix}", topo.prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(RulesDir(dir))
    }

    /// Writes atomically (temp file + rename): meshd watches the directory and must never
    /// see a half-written file.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {file}"))?;
        std::fs::rename(&tmp, self.0.join(file)).with_context(|| format!("renaming {file}"))
    }

    /// The directory as a string.
    pub fn path(&self) -> String {
        self.0.display().to_string()
    }

    /// The admin socket meshd uses with [`meshd_args`].
    pub fn socket(&self) -> String {
        format!("{}/meshd.sock", self.path())
    }
}

impl Drop for RulesDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// meshd arguments for the topology: every node interface, these rules, nothing pinned or
/// persisted, the admin socket inside the rules directory.
pub fn meshd_args(topo: &Topology, rules: &RulesDir) -> Vec<String> {
    meshd_args_for(topo.node_interfaces(), rules)
}

/// [`meshd_args`] for any set of node interfaces.
pub fn meshd_args_for(interfaces: Vec<String>, rules: &RulesDir) -> Vec<String> {
    let mut args = Vec::new();
    for interface in interfaces {
        args.push("--iface".into());
        args.push(interface);
    }
    args.extend([
        "--config".into(),
        rules.path(),
        "--no-pin".into(),
        "--no-state".into(),
        "--socket".into(),
        format!("{}/meshd.sock", rules.path()),
    ]);
    args
}

/// A STATIC ServiceEntry `name` (host `<name>.mesh.test`) at `vip` with `ports` (YAML flow
/// mappings) and one endpoint per (backend number, address), labelled `version: v<number>`.
pub fn service_entry(
    api_version: &str,
    name: &str,
    vip: &str,
    ports: &[&str],
    endpoints: &[(usize, IpAddr)],
) -> String {
    let mut yaml = format!(
        "apiVersion: networking.istio.io/{api_version}
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{name}.mesh.test]
  addresses: [\"{vip}\"]
  ports:
"
    );
    for port in ports {
        yaml.push_str(&format!("  - {port}\n"));
    }
    yaml.push_str("  resolution: STATIC\n  endpoints:\n");
    for (i, address) in endpoints {
        yaml.push_str(&format!(
            "  - {{address: \"{address}\", labels: {{version: v{i}}}}}\n"
        ));
    }
    yaml
}

/// The `echo` service: VIP 198.18.100.1, TCP 8080 and UDP 8081, backends v1..v3 by number.
pub fn echo_service_entry(endpoints: &[usize]) -> String {
    let endpoints: Vec<(usize, IpAddr)> = endpoints.iter().map(|i| (*i, backend_v4(*i))).collect();
    service_entry(
        "v1",
        "echo",
        VIP_V4,
        &[
            "{number: 8080, name: tcp-echo, protocol: TCP}",
            "{number: 8081, name: udp-echo, protocol: UDP}",
        ],
        &endpoints,
    )
}

/// Subsets v1..v3 of `echo`.
pub const ECHO_SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: echo
spec:
  host: echo.mesh.test
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// A VirtualService splitting both ports of `echo` across v1/v2/v3 by `weights`.
pub fn echo_split(weights: [u32; 3]) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts: [echo.mesh.test]
  tcp:
",
    );
    for port in [8080, 8081] {
        yaml.push_str(&format!("  - match: [{{port: {port}}}]\n    route:\n"));
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!(
                "    - destination: {{host: echo.mesh.test, subset: v{}, port: {{number: {port}}}}}\n      weight: {w}\n",
                i + 1
            ));
        }
    }
    yaml
}

/// Address of the `i`-th service of a large rule set (198.19.0.0/16, 65 536 of them).
pub fn scale_vip(i: usize) -> IpAddr {
    IpAddr::from([198, 19, (i >> 8) as u8, (i & 255) as u8])
}

/// ServiceEntries `s<i>` for `range`, as a user writes them (block style): one VIP each
/// ([`scale_vip`]), one `protocol` port `port`, one endpoint per address in `endpoints`
/// (labelled `app`, `version: v<k>` (1-based), `tier` and `zone`); no DestinationRule, so every default applies.
pub fn scale_service_entries(
    range: std::ops::Range<usize>,
    protocol: &str,
    port: u16,
    endpoints: &[IpAddr],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(range.len() * 600);
    for i in range {
        let _ = write!(
            out,
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: s{i}
  namespace: default
spec:
  hosts:
  - s{i}.scale.mesh.test
  addresses:
  - {}
  ports:
  - number: {port}
    protocol: {protocol}
    name: p
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
",
            scale_vip(i)
        );
        for (k, address) in endpoints.iter().enumerate() {
            let _ = write!(
                out,
                "  - address: {address}\n    labels:\n      app: s{i}\n      version: v{}\n      \
                 tier: backend\n      zone: zone-a\n",
                k + 1
            );
        }
        out.push_str("---\n");
    }
    out
}

/// A node with one backend host (backend 1 serving HTTP on :8080 as `v1`) and meshd running
/// with one rules file. Fields drop in order: meshd, rules, server, then the namespaces.
pub struct OneBackendNode {
    /// meshd on the node.
    pub meshd: crate::meshd::Meshd,
    /// Its rules directory (`rules.socket()` is its admin socket).
    pub rules: RulesDir,
    /// The backend's HTTP server.
    pub server: crate::http::HttpServer,
    /// The namespaces.
    pub topo: Topology,
}

impl OneBackendNode {
    /// Builds the node with `yaml` as the rules file `file`.
    pub fn start(file: &str, yaml: &str) -> Result<Self> {
        let topo = Topology::build(1)?;
        let server = crate::http::http_server(
            &topo.backends[0],
            std::net::SocketAddr::new(backend_v4(1), 8080),
            "v1",
        )?;
        let rules = RulesDir::new(&topo)?;
        rules.write(file, yaml)?;
        let meshd = crate::meshd::Meshd::start(&topo.node, &meshd_args(&topo, &rules))?;
        Ok(Self {
            meshd,
            rules,
            server,
            topo,
        })
    }
}
