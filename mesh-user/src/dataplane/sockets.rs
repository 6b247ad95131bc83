//! Socket-level balancing for node-local clients: attaches the cgroup sock_addr programs
//! (`connect4/6`, `sendmsg4/6`, `recvmsg4/6`, `getpeername4/6`, see `mesh-ebpf/src/sock.rs`) to
//! a cgroup2 root and tells them which network namespace is meshd's.
//!
//! Owns three decisions:
//! - **where**: a mounted cgroup2 hierarchy (its root), or one meshd mounts itself under
//!   [`OWN_CGROUP2_MOUNT`] when the machine runs cgroup v1 only;
//! - **for whom**: the hooks see the calls of every process on the machine, in every network
//!   namespace; they act only on sockets whose namespace cookie is meshd's (`SO_NETNS_COOKIE`),
//!   so several meshd (one per namespace) coexist, each attached through its own bpf_link
//!   (cgroup links always allow several programs);
//! - **for how long**: with a pin directory the links are pinned under `<pin_dir>/sock/` and
//!   outlive meshd like the XDP link (balancing goes on with the last rules); a restarted meshd
//!   attaches its programs first and then replaces the pins, so no connect() goes unbalanced.
//!   Without pins the links close with the process. `meshd --cleanup` removes them
//!   ([`remove_pins`]).

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
};
use mesh_common::{map_names, sock_reason, SockConfig, SOCK_PROGRAMS};
use tracing::{info, warn};

use super::{tables::map, Dataplane};

/// Where meshd mounts a cgroup2 hierarchy when none is mounted.
pub const OWN_CGROUP2_MOUNT: &str = "/run/mesh/cgroup2";

/// Errors of socket-level balancing.
#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    /// The kernel refused a program or its attachment: too old, or built without it.
    #[error(
        "socket-level balancing for node-local clients is not available: {what}: {reason}. It \
         needs Linux 5.18 or later with CONFIG_CGROUP_BPF and a cgroup2 hierarchy; rerun with \
         --no-socket-lb to balance only packets arriving on the --iface interfaces"
    )]
    Unsupported {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        reason: String,
    },
    /// Something on the host went wrong (mount, pin directory, ...).
    #[error("socket-level balancing: {0}")]
    Host(String),
}

/// What is attached, for `meshctl status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketLbStatus {
    /// The cgroup2 directory the hooks are attached to.
    pub cgroup: String,
    /// Whether meshd mounted that cgroup2 hierarchy itself.
    pub mounted_by_meshd: bool,
    /// The network namespace the hooks act for (its cookie).
    pub netns_cookie: u64,
    /// Attached hooks (`connect4`, ...).
    pub hooks: Vec<String>,
    /// Where the links are pinned (None: they end with meshd).
    pub pinned_under: Option<String>,
    /// Outcomes counted by the hooks (`connect_balanced`, ...), filled in by status queries.
    #[serde(default)]
    pub counters: Vec<(String, u64)>,
}

/// Options of [`Dataplane::attach_sockets`].
#[derive(Clone, Debug, Default)]
pub struct SocketLbOptions {
    /// A cgroup2 directory to attach to instead of the discovered root.
    pub cgroup: Option<PathBuf>,
}

impl Dataplane {
    /// Loads the socket hooks, points them at this process's network namespace and attaches
    /// them to the cgroup2 root.
    pub fn attach_sockets(
        &mut self,
        options: &SocketLbOptions,
    ) -> Result<SocketLbStatus, SocketLbError> {
        let (cgroup, mounted_by_meshd) = match &options.cgroup {
            Some(dir) => (dir.clone(), false),
            None => cgroup2_root()?,
        };
        let netns_cookie = netns_cookie()?;
        {
            let mut config: Array<&mut MapData, SockConfig> = Array::try_from(
                self.ebpf
                    .map_mut(map_names::SOCK_CONFIG)
                    .ok_or_else(|| SocketLbError::Host("SOCK_CONFIG map missing".into()))?,
            )
            .map_err(|e| SocketLbError::Host(format!("opening SOCK_CONFIG: {e}")))?;
            config
                .set(0, SockConfig { netns_cookie }, 0)
                .map_err(|e| SocketLbError::Host(format!("writing SOCK_CONFIG: {e}")))?;
        }
        let cgroup_dir = File::open(&cgroup)
            .map_err(|e| SocketLbError::Host(format!("opening {}: {e}", cgroup.display())))?;
        let pin_dir = self.options.pin_dir.as_ref().map(|dir| dir.join("sock"));
        if let Some(dir) = &pin_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| SocketLbError::Host(format!("creating {}: {e}", dir.display())))?;
        }
        let mut hooks = Vec::new();
        for (name, hook) in SOCK_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| SocketLbError::Host(format!("program {name} missing")))?
                .try_into()
                .map_err(|e| SocketLbError::Host(format!("program {name}: {e}")))?;
            program.load().map_err(|e| SocketLbError::Unsupported {
                what: format!("loading the {hook} hook"),
                reason: e.to_string(),
            })?;
            let link = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| SocketLbError::Unsupported {
                    what: format!("attaching the {hook} hook to {}", cgroup.display()),
                    reason: e.to_string(),
                })?;
            if let Some(dir) = &pin_dir {
                let link = program
                    .take_link(link)
                    .map_err(|e| SocketLbError::Host(format!("taking the {hook} link: {e}")))?;
                let link = FdLink::try_from(link).map_err(|e| {
                    SocketLbError::Host(format!("the {hook} link cannot be pinned: {e}"))
                })?;
                pin_replacing(link, &dir.join(hook))?;
            }
            hooks.push(hook.to_string());
        }
        info!(
            cgroup = %cgroup.display(),
            mounted_by_meshd,
            netns_cookie,
            pinned = pin_dir.is_some(),
            "socket-level balancing attached: node-local clients of this network namespace are \
             balanced at connect()"
        );
        Ok(SocketLbStatus {
            cgroup: cgroup.display().to_string(),
            mounted_by_meshd,
            netns_cookie,
            hooks,
            pinned_under: pin_dir.map(|d| d.display().to_string()),
            counters: Vec::new(),
        })
    }

    /// The socket hooks' outcome counters, summed over CPUs.
    pub fn socket_counters(&self) -> Vec<(String, u64)> {
        let Ok(m) = map(&self.ebpf, map_names::SOCK_STATS) else {
            return Vec::new();
        };
        let Ok(counters) = PerCpuArray::<&MapData, u64>::try_from(m) else {
            return Vec::new();
        };
        sock_reason::NAMES
            .iter()
            .enumerate()
            .map(|(code, name)| {
                let total = counters
                    .get(&(code as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (name.to_string(), total)
            })
            .collect()
    }
}

/// The hooks' outcome counters as Prometheus families (`mesh_socket_hook_calls_total{outcome}`),
/// without the closing `# EOF`, to go into meshd's one exposition.
pub fn render_prometheus(counters: &[(String, u64)]) -> String {
    use prometheus_client::{
        encoding::text::encode,
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    };
    let calls = Family::<Vec<(String, String)>, Counter>::default();
    for (outcome, n) in counters {
        calls
            .get_or_create(&vec![("outcome".into(), outcome.clone())])
            .inc_by(*n);
    }
    let mut registry = Registry::with_prefix("mesh_socket_hook");
    registry.register(
        "calls",
        "Calls of node-local clients handled by the socket hooks, by outcome",
        calls,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    encode(&mut out, &registry).expect("metrics encode into a String");
    out.strip_suffix("# EOF\n")
        .map(str::to_string)
        .unwrap_or(out)
}

/// Pins `link` at `path`, atomically replacing (and so detaching) a link an earlier meshd
/// pinned there: the new program is already attached, so no call goes unbalanced.
fn pin_replacing(link: FdLink, path: &Path) -> Result<(), SocketLbError> {
    // bpffs refuses names with a dot.
    let mut fresh = path.as_os_str().to_owned();
    fresh.push("-new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        SocketLbError::Host(format!("pinning {}: {e}{cause}", fresh.display()))
    })?;
    let replaced = path.exists();
    std::fs::rename(&fresh, path).map_err(|e| {
        SocketLbError::Host(format!(
            "renaming {} to {}: {e}",
            fresh.display(),
            path.display()
        ))
    })?;
    if replaced {
        info!(pin = %path.display(), "replaced the socket hook link of an earlier meshd");
    }
    Ok(())
}

/// Detaches pinned socket hooks under `pin_dir` (for `meshd --cleanup`).
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    let dir = pin_dir.join("sock");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path())?;
    }
    std::fs::remove_dir(&dir)
}

/// The root of a mounted cgroup2 hierarchy, or one mounted at [`OWN_CGROUP2_MOUNT`]; the flag
/// says whether meshd mounted it.
fn cgroup2_root() -> Result<(PathBuf, bool), SocketLbError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SocketLbError::Host(format!("reading /proc/self/mountinfo: {e}")))?;
    if let Some(found) = find_cgroup2(&mountinfo) {
        return Ok((found, false));
    }
    let dir = Path::new(OWN_CGROUP2_MOUNT);
    std::fs::create_dir_all(dir)
        .map_err(|e| SocketLbError::Host(format!("creating {}: {e}", dir.display())))?;
    nix::mount::mount(
        Some("cgroup2"),
        dir,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| SocketLbError::Unsupported {
        what: format!("no cgroup2 hierarchy is mounted, and mounting one at {OWN_CGROUP2_MOUNT}"),
        reason: e.to_string(),
    })?;
    warn!(
        mount = OWN_CGROUP2_MOUNT,
        "no cgroup2 hierarchy was mounted (cgroup v1 host): mounted one for the socket hooks; \
         it stays mounted after meshd exits"
    );
    Ok((dir.to_path_buf(), true))
}

/// The mount point of the first cgroup2 mount whose root is the hierarchy's root (a mount of a
/// sub-cgroup would cover only that subtree).
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - fstype source super`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
fn netns_cookie() -> Result<u64, SocketLbError> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SocketLbError::Host(format!(
            "socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(SocketLbError::Unsupported {
            what: "reading this network namespace's cookie (SO_NETNS_COOKIE)".into(),
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_and_skips_v1_and_subtrees() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
40 23 0:35 /system.slice /mnt/slice rw - cgroup2 cgroup2 rw
41 23 0:35 / /run/mesh/my\\040cgroup2 rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(mountinfo),
            Some(PathBuf::from("/run/mesh/my cgroup2"))
        );
        assert_eq!(
            find_cgroup2("31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw"),
            None
        );
    }

    #[test]
    fn the_namespace_cookie_is_stable_and_nonzero() {
        let a = netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(netns_cookie().expect("SO_NETNS_COOKIE"), a);
    }
}
