//! A fleet for tests: a three-member etcd cluster (Debian's `etcd`) and three meshd nodes, each
//! with its own client, in front of three shared backends. Every piece is a network namespace;
//! all is torn down on drop.
//!
//! ```text
//!   control bridge (ns <p>-cp, 198.18.200.0/24): etcd e1..e3 .1-.3, nodes n1..n3 .11-.13
//!   client c<i> 198.18.1<i>.2 ── c0 198.18.1<i>.1  node n<i>  lan 198.18.150.1<i> ── backend LAN
//!   backend LAN bridge (ns <p>-lan, 198.18.150.0/24): backends b1..b3 at .1-.3
//! ```
//! Backends route client subnet 198.18.1<i>.0/24 back through node n<i>, so replies reach the
//! node that translated the flow. The service VIP 198.18.100.1 is on no interface.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    meshd::{meshctl, Meshd},
    netns::{unique_prefix, veth, Netns},
};

/// Nodes and etcd members in a fleet.
pub const SIZE: usize = 3;

/// Address of etcd member `i` (1-based) on the control bridge.
pub fn etcd_ip(i: usize) -> String {
    format!("198.18.200.{i}")
}

/// Address of node `i` (1-based) on the control bridge.
pub fn node_ctl_ip(i: usize) -> String {
    format!("198.18.200.{}", 10 + i)
}

/// Address of node `i` on the backend LAN.
pub fn node_lan_ip(i: usize) -> String {
    format!("198.18.150.{}", 10 + i)
}

/// Address of backend `i` on the backend LAN.
pub fn backend_ip(i: usize) -> String {
    format!("198.18.150.{i}")
}

/// Every backend as a ServiceEntry endpoint: (number, address), labelled `version: v<number>`
/// by [`crate::rules::service_entry`].
pub fn backend_endpoints() -> Vec<(usize, std::net::IpAddr)> {
    (1..=SIZE)
        .map(|i| (i, backend_ip(i).parse().expect("valid address")))
        .collect()
}

/// Address of node `i`'s client.
pub fn client_ip(i: usize) -> String {
    format!("198.18.{}.2", 10 + i)
}

/// A bridge inside its own namespace, with a helper to plug namespaces into it.
pub struct Bridge {
    /// The namespace holding the bridge `br0`.
    pub ns: Netns,
}

impl Bridge {
    /// Creates the bridge namespace `name`.
    pub fn create(name: &str) -> Result<Self> {
        let ns = Netns::create(name)?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Bridge { ns })
    }

    /// Plugs `other` in: port `port` on the bridge, `iface` with `cidr` in `other`.
    pub fn plug(&self, port: &str, other: &Netns, iface: &str, cidr: &str) -> Result<()> {
        veth(&self.ns, port, other, iface)?;
        self.ns.ip(&["link", "set", port, "master", "br0"])?;
        other.ip(&["addr", "add", cidr, "dev", iface])?;
        Ok(())
    }

    /// Takes a port down (a cut cable) or up again.
    pub fn set_port(&self, port: &str, up: bool) -> Result<()> {
        self.ns
            .ip(&["link", "set", port, if up { "up" } else { "down" }])?;
        Ok(())
    }
}

/// One etcd member process.
pub struct EtcdMember {
    /// Member number (1-based).
    pub index: usize,
    /// Its namespace.
    pub ns: Netns,
    data_dir: PathBuf,
    cluster: String,
    token: String,
    child: Option<Child>,
    log: PathBuf,
}

impl EtcdMember {
    /// Starts (or restarts, with the same data directory) the member.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let ip = etcd_ip(self.index);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .ns
            .command("etcd")
            .args([
                "--name",
                &format!("e{}", self.index),
                "--data-dir",
                &self.data_dir.display().to_string(),
                "--listen-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
                "--listen-client-urls",
                &format!("http://{ip}:2379"),
                "--advertise-client-urls",
                &format!("http://{ip}:2379"),
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's etcd-server; `cargo xtask` installs it)")?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the member (SIGKILL: a crash), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A three-member etcd cluster on a control bridge.
pub struct EtcdCluster {
    /// Members (index 0 is e1).
    pub members: Vec<EtcdMember>,
    /// The control bridge (nodes plug in here too).
    pub bridge: Bridge,
}

impl EtcdCluster {
    /// Starts three members and waits until the cluster answers.
    pub fn start(prefix: &str) -> Result<Self> {
        let bridge = Bridge::create(&format!("{prefix}-cp"))?;
        let cluster = (1..=SIZE)
            .map(|i| format!("e{i}=http://{}:2380", etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 1..=SIZE {
            let ns = Netns::create(&format!("{prefix}-e{i}"))?;
            bridge.plug(&format!("e{i}"), &ns, "eth0", &format!("{}/24", etcd_ip(i)))?;
            let data_dir = std::env::temp_dir().join(format!("{prefix}-etcd{i}"));
            let _ = std::fs::remove_dir_all(&data_dir);
            members.push(EtcdMember {
                index: i,
                ns,
                data_dir,
                cluster: cluster.clone(),
                token: prefix.to_string(),
                child: None,
                log: std::env::temp_dir().join(format!("{prefix}-etcd{i}.log")),
            });
        }
        for member in &mut members {
            member.start()?;
        }
        let cluster = EtcdCluster { members, bridge };
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> String {
        (1..=SIZE)
            .map(|i| format!("http://{}:2379", etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl` from member 1's namespace (v3 API), returning stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let live = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .context("no etcd member is running")?;
        let out = live
            .ns
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints())
            .arg("--command-timeout=3s")
            .args(args)
            .output()
            .context("running etcdctl (Debian's etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until a write goes through (a leader and a quorum).
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.etcdctl(&["put", "/health-probe", "ok"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "etcd cluster not healthy within {timeout:?}: {e}\n{}",
                        self.members[0].log()
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// One node of the fleet: its namespace, its client, and meshd when running.
pub struct FleetNode {
    /// Node number (1-based).
    pub index: usize,
    /// meshd (dropped first).
    pub meshd: Option<Meshd>,
    /// The node namespace.
    pub ns: Netns,
    /// Its client.
    pub client: Netns,
    /// Directory for its socket and state file.
    pub dir: PathBuf,
    /// Interfaces meshd attaches to (`c0` and `lan`, plus `gw` behind a gateway tier).
    pub ifaces: Vec<String>,
}

impl FleetNode {
    /// Node name in the fleet.
    pub fn name(&self) -> String {
        format!("n{}", self.index)
    }

    /// The admin socket.
    pub fn socket(&self) -> String {
        self.dir.join("meshd.sock").display().to_string()
    }

    /// Runs meshctl against this node.
    pub fn meshctl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        meshctl(&self.socket(), args)
    }

    /// Runs meshctl and fails with its stderr unless it succeeds; returns stdout.
    pub fn meshctl_ok(&self, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.meshctl(args)?;
        if !ok {
            bail!(
                "meshctl {} on {} failed: {err}{out}",
                args.join(" "),
                self.name()
            );
        }
        Ok(out)
    }
}

impl Drop for FleetNode {
    fn drop(&mut self) {
        self.meshd.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// etcd, nodes, backends and the bridges; everything is removed on drop.
pub struct Fleet {
    /// Per-run name prefix.
    pub prefix: String,
    /// Nodes (dropped first: meshd stops before its network goes).
    pub nodes: Vec<FleetNode>,
    /// Backend namespaces.
    pub backends: Vec<Netns>,
    /// The backend LAN.
    pub lan: Bridge,
    /// The etcd cluster (and the control bridge).
    pub etcd: EtcdCluster,
}

impl Fleet {
    /// Builds everything and starts etcd; meshd is started with [`Fleet::start_meshd`].
    pub fn build() -> Result<Self> {
        let prefix = unique_prefix();
        let etcd = EtcdCluster::start(&prefix)?;
        let lan = Bridge::create(&format!("{prefix}-lan"))?;
        let mut backends = Vec::new();
        for i in 1..=SIZE {
            let ns = Netns::create(&format!("{prefix}-b{i}"))?;
            lan.plug(
                &format!("b{i}"),
                &ns,
                "eth0",
                &format!("{}/24", backend_ip(i)),
            )?;
            for n in 1..=SIZE {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("198.18.{}.0/24", 10 + n),
                    "via",
                    &node_lan_ip(n),
                ])?;
            }
            backends.push(ns);
        }
        let mut nodes = Vec::new();
        for i in 1..=SIZE {
            let ns = Netns::create(&format!("{prefix}-n{i}"))?;
            for sysctl in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"] {
                ns.exec("sysctl", &["-qw", sysctl])?;
            }
            etcd.bridge.plug(
                &format!("n{i}"),
                &ns,
                "ctl",
                &format!("{}/24", node_ctl_ip(i)),
            )?;
            lan.plug(
                &format!("n{i}"),
                &ns,
                "lan",
                &format!("{}/24", node_lan_ip(i)),
            )?;
            let client = Netns::create(&format!("{prefix}-c{i}"))?;
            veth(&ns, "c0", &client, "eth0")?;
            ns.ip(&[
                "addr",
                "add",
                &format!("198.18.{}.1/24", 10 + i),
                "dev",
                "c0",
            ])?;
            client.ip(&[
                "addr",
                "add",
                &format!("{}/24", client_ip(i)),
                "dev",
                "eth0",
            ])?;
            client.ip(&[
                "route",
                "add",
                "198.18.0.0/15",
                "via",
                &format!("198.18.{}.1", 10 + i),
            ])?;
            let dir = std::env::temp_dir().join(format!("{prefix}-n{i}"));
            std::fs::create_dir_all(&dir)?;
            nodes.push(FleetNode {
                index: i,
                meshd: None,
                ns,
                client,
                dir,
                ifaces: vec!["c0".into(), "lan".into()],
            });
        }
        Ok(Fleet {
            prefix,
            nodes,
            backends,
            lan,
            etcd,
        })
    }

    /// meshd arguments for node `i` (1-based): its data interfaces, the fleet's etcd, short
    /// lease and publish interval so tests see state changes quickly.
    pub fn meshd_args(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i - 1];
        let mut args: Vec<String> = node
            .ifaces
            .iter()
            .flat_map(|iface| ["--iface".to_string(), iface.clone()])
            .collect();
        args.extend(etcd_node_args(
            &self.etcd,
            &self.prefix,
            &node.name(),
            &node.dir,
        ));
        args
    }

    /// Starts meshd on node `i`.
    pub fn start_meshd(&mut self, i: usize) -> Result<()> {
        let args = self.meshd_args(i);
        let node = &mut self.nodes[i - 1];
        node.meshd = Some(Meshd::start(&node.ns, &args)?);
        Ok(())
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &FleetNode {
        &self.nodes[i - 1]
    }

    /// Cuts (or restores) node `i`'s link to etcd; its data links stay up.
    pub fn partition(&self, i: usize, cut: bool) -> Result<()> {
        self.etcd.bridge.set_port(&format!("n{i}"), !cut)
    }
}

/// Polls `f` every 100 ms until it returns Some, or fails after `timeout` with `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match f() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} (last error: {last_error:?})");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The fleet part of a node's meshd arguments: no pins, its socket and state file in `dir`, the
/// cluster's endpoints under prefix `/<prefix>`, node name `name`, a short lease and publish
/// interval so state changes show quickly.
pub fn etcd_node_args(
    etcd: &EtcdCluster,
    prefix: &str,
    name: &str,
    dir: &std::path::Path,
) -> Vec<String> {
    [
        "--no-pin",
        "--no-metrics",
        "--socket",
        &dir.join("meshd.sock").display().to_string(),
        "--state-file",
        &dir.join("state.yaml").display().to_string(),
        "--etcd",
        &etcd.endpoints(),
        "--etcd-prefix",
        &format!("/{prefix}"),
        "--node-name",
        name,
        "--etcd-lease-ttl",
        "3s",
        "--etcd-publish-interval",
        "500ms",
        "--etcd-timeout",
        "1500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
