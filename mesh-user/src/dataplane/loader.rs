//! Loading the kernel object, sizing and pinning its maps, and attaching the XDP program.
//!
//! Maps that carry state worth keeping across a daemon restart (connection tracking, the rule
//! tables and the counters) are pinned under the pin directory and reused when they are already
//! there, so a restarted meshd sees the same connections and the same rules.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{map_names, XDP_PROGRAM_NAME};
use tracing::{info, warn};

use super::{tables::Tables, DataplaneError, EBPF_OBJECT};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Driver (native) mode: the fast path. Fails if the driver has no XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, runs after the kernel allocated an skb (slower).
    Generic,
}

/// Sizing and placement of the kernel state.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Directory under bpffs where maps are pinned; `None` keeps them private to this process.
    pub pin_dir: Option<PathBuf>,
    /// Entries of the Maglev pool (all services' tables together).
    pub maglev_pool_entries: u32,
    /// Connection-tracking capacity in flows (the map holds two entries per flow).
    pub conntrack_entries: u32,
}

impl DataplaneOptions {
    /// Capacity of the pending-flow table in flows: a quarter of the connection table (at least
    /// 512), enough for the handshakes in flight; floods only ever fill this one.
    pub fn pending_flows(&self) -> u32 {
        (self.conntrack_entries / 4).max(512)
    }
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            pin_dir: None,
            maglev_pool_entries: mesh_common::DEFAULT_MAGLEV_POOL_ENTRIES,
            conntrack_entries: mesh_common::DEFAULT_CONNTRACK_FLOWS,
        }
    }
}

/// One interface the program is attached to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    /// Interface name.
    pub interface: String,
    /// Interface index.
    pub ifindex: u32,
    /// Mode actually used.
    pub mode: XdpAttachMode,
}

/// The loaded kernel programs and their maps.
pub struct Dataplane {
    pub(crate) ebpf: Ebpf,
    pub(crate) tables: Tables,
    pub(crate) options: DataplaneOptions,
    pub(crate) census: super::census::CensusTaker,
    attachments: BTreeMap<String, Attachment>,
    pinned_links: Vec<PinnedLink>,
}

const PINNED_MAPS: &[&str] = &[
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::MAGLEV,
    map_names::CONNTRACK,
    map_names::CT_PENDING,
    map_names::CT_STATS,
    map_names::SERVICE_STATS,
    map_names::BACKEND_STATS,
    map_names::REASON_STATS,
    // The socket hooks' memory of what each socket asked for (getpeername/recvmsg) and of UDP
    // flows, so sockets opened before a restart keep both.
    map_names::SOCK_REVNAT,
    map_names::SOCK_FLOWS,
];

impl Dataplane {
    /// Loads the programs and creates (or reopens pinned) maps. Does not attach anything.
    pub fn load(options: DataplaneOptions) -> Result<Self, DataplaneError> {
        if let Some(dir) = &options.pin_dir {
            ensure_bpffs(dir)?;
        }
        let pins: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::MAGLEV, options.maglev_pool_entries)
            // Two entries per flow, one per direction.
            .map_max_entries(
                map_names::CONNTRACK,
                options.conntrack_entries.checked_mul(2).ok_or_else(|| {
                    DataplaneError::Capacity("conntrack capacity too large".into())
                })?,
            )
            .map_max_entries(map_names::CT_PENDING, 2 * options.pending_flows());
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .ok_or_else(|| DataplaneError::Other(format!("program {XDP_PROGRAM_NAME} missing")))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                context: "program type".into(),
                source,
            })?;
        program.load().map_err(|source| DataplaneError::Program {
            context: format!("verifying {XDP_PROGRAM_NAME}"),
            source,
        })?;
        let tables = Tables::recover(&mut ebpf)?;
        let census = super::census::CensusTaker::start(
            super::tables::fd(&ebpf, map_names::CONNTRACK)?
                .try_clone_to_owned()
                .map_err(|e| DataplaneError::Other(format!("duplicating the CONNTRACK fd: {e}")))?,
        );
        Ok(Self {
            ebpf,
            tables,
            options,
            census,
            attachments: BTreeMap::new(),
            pinned_links: Vec::new(),
        })
    }

    /// Attaches the XDP program to `interface`.
    ///
    /// With a pin directory the attachment is a bpf_link pinned under `<pin_dir>/links/`, so the
    /// program stays attached when meshd exits; a later meshd swaps its own program into that
    /// same link atomically (no moment without a program on the interface).
    pub fn attach(&mut self, interface: &str, mode: XdpAttachMode) -> Result<(), DataplaneError> {
        let ifindex = ifindex(interface)?;
        let link_pin = self
            .options
            .pin_dir
            .as_ref()
            .map(|dir| dir.join("links").join(interface));
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .expect("loaded in Dataplane::load")
            .try_into()
            .expect("checked in Dataplane::load");
        let mut replaced = false;
        if let Some(pin) = link_pin.as_ref().filter(|p| p.exists()) {
            match replace_pinned(program, pin) {
                Ok(()) => replaced = true,
                Err(e) => {
                    warn!(
                        interface,
                        "pinned XDP link unusable ({e}); attaching afresh"
                    );
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        if !replaced {
            let xdp_mode = match mode {
                XdpAttachMode::Native => XdpMode::Driver,
                XdpAttachMode::Generic => XdpMode::Skb,
            };
            let link_id = program
                .attach_to_if_index(ifindex, xdp_mode)
                .map_err(|source| {
                    let hint = match mode {
                        XdpAttachMode::Native => {
                            "; the driver may lack native XDP: rerun with --xdp-mode generic to \
                             use the slower generic mode"
                        }
                        XdpAttachMode::Generic => "",
                    };
                    DataplaneError::Other(format!(
                        "attaching XDP ({mode:?} mode) to {interface}: {source}{hint}"
                    ))
                })?;
            if let Some(pin) = &link_pin {
                let link =
                    program
                        .take_link(link_id)
                        .map_err(|source| DataplaneError::Program {
                            context: format!("taking the XDP link of {interface}"),
                            source,
                        })?;
                let fd_link = FdLink::try_from(link).map_err(|e| {
                    DataplaneError::Other(format!(
                        "XDP on {interface} is attached through netlink, which cannot be pinned: {e}"
                    ))
                })?;
                std::fs::create_dir_all(pin.parent().expect("links dir")).map_err(|e| {
                    DataplaneError::Other(format!("creating {}: {e}", pin.display()))
                })?;
                let pinned = fd_link.pin(pin).map_err(|e| {
                    DataplaneError::Other(format!("pinning {}: {e}", pin.display()))
                })?;
                self.pinned_links.push(pinned);
            }
        }
        if mode == XdpAttachMode::Generic {
            warn!(
                interface,
                "XDP attached in generic mode: correct but slower than native"
            );
        }
        info!(
            interface,
            ifindex,
            ?mode,
            replaced_pinned_link = replaced,
            "XDP attached"
        );
        self.attachments.insert(
            interface.to_string(),
            Attachment {
                interface: interface.to_string(),
                ifindex,
                mode,
            },
        );
        Ok(())
    }

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values()
    }

    /// Kernel id of the loaded XDP program.
    pub fn program_id(&self) -> Option<u32> {
        let program: &Xdp = self.ebpf.program(XDP_PROGRAM_NAME)?.try_into().ok()?;
        program.info().ok().map(|info| info.id())
    }

    /// Options the dataplane was loaded with.
    pub fn options(&self) -> &DataplaneOptions {
        &self.options
    }

    /// Removes the pinned links (detaching the programs) and maps (for `meshd --cleanup`).
    pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
        let links = pin_dir.join("links");
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())?;
            }
            std::fs::remove_dir(&links)?;
        }
        for name in PINNED_MAPS {
            match std::fs::remove_file(pin_dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(pin_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Swaps our program into an XDP link pinned by an earlier meshd.
fn replace_pinned(program: &mut Xdp, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    program.attach_to_link(link).map_err(|e| e.to_string())?;
    Ok(())
}

/// Resolves an interface name to its index.
pub fn ifindex(interface: &str) -> Result<u32, DataplaneError> {
    nix::net::if_::if_nametoindex(interface)
        .map_err(|e| DataplaneError::Other(format!("interface {interface}: {e}")))
}

/// Mounts bpffs at /sys/fs/bpf when `dir` lies under it and it is not mounted, then creates `dir`.
fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DataplaneError::Other(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        DataplaneError::Other(format!("creating pin directory {}: {e}", dir.display()))
    })
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}
