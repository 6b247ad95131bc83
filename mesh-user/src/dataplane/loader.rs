//! Loading the kernel object and attaching its programs.
//!
//! Maps that carry state worth keeping across a daemon restart (connection tracking, the rule
//! tables and the counters, [`layout::PINNED_MAPS`]) are pinned under the pin directory and
//! reused when they are already there, so a restarted meshd sees the same connections and the
//! same rules. [`pins::prepare`] checks them against this meshd's layout first (and migrates or
//! refuses); sizes come from [`layout::capacities`].

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::HashMap as BpfHashMap,
    programs::{links::PinnedLink, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use mesh_common::{map_names, TC_PROGRAM_NAME, XDP_PROGRAM_NAME};
use tracing::{info, warn};

use super::{
    attach::{self, AttachRequest, HookKind, XdpAttachMode},
    layout::{self, PINNED_MAPS},
    map_err,
    pins::{self, PinReport},
    tables::Tables,
    DataplaneError, EBPF_OBJECT,
};

/// Sizing and placement of the kernel state.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Directory under bpffs where maps are pinned; `None` keeps them private to this process.
    pub pin_dir: Option<PathBuf>,
    /// Entries of the Maglev pool (all services' tables together).
    pub maglev_pool_entries: u32,
    /// Connection-tracking capacity in flows (the map holds two entries per flow).
    pub conntrack_entries: u32,
    /// Kernel debug logging (off by default).
    pub kernel_log: super::KernelLogLevel,
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
            kernel_log: super::KernelLogLevel::Off,
        }
    }
}

/// One interface a program is attached to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    /// Interface name.
    pub interface: String,
    /// Interface index.
    pub ifindex: u32,
    /// The hook actually used.
    pub hook: HookKind,
    /// Why that hook (see [`attach::choose`]).
    pub reason: String,
    /// Whether TC sends packets routed into this interface straight to the container behind it
    /// (`bpf_redirect_peer`; see [`super::peer`]).
    pub peer_redirect: bool,
}

/// The loaded kernel programs and their maps.
pub struct Dataplane {
    pub(crate) ebpf: Ebpf,
    pub(crate) tables: Tables,
    pub(crate) options: DataplaneOptions,
    pub(crate) census: super::census::CensusTaker,
    attachments: BTreeMap<String, Attachment>,
    pinned_links: Vec<PinnedLink>,
    pin_report: Option<PinReport>,
}

impl Dataplane {
    /// Loads the programs and creates (or reopens pinned) maps. Does not attach anything.
    /// Pinned maps are checked against this meshd's layout first ([`pins::prepare`]).
    pub fn load(mut options: DataplaneOptions) -> Result<Self, DataplaneError> {
        let pin_report = match options.pin_dir.clone() {
            Some(dir) => {
                ensure_bpffs(&dir)?;
                Some(pins::prepare(&dir, &mut options)?)
            }
            None => None,
        };
        let pins: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let log_level = options.kernel_log.global();
        let mut loader = EbpfLoader::new();
        loader.override_global(super::kernel_log::LEVEL_GLOBAL, &log_level, true);
        for (name, entries) in layout::capacities(&options)? {
            loader.map_max_entries(name, entries);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        if let Some(dir) = &options.pin_dir {
            pins::record(dir)?;
        }
        let verifying = |name: &str| {
            let context = format!("verifying {name}");
            move |source| DataplaneError::Program { context, source }
        };
        xdp_program(&mut ebpf)?
            .load()
            .map_err(verifying(XDP_PROGRAM_NAME))?;
        tc_program(&mut ebpf)?
            .load()
            .map_err(verifying(TC_PROGRAM_NAME))?;
        super::kernel_log::start(&mut ebpf, options.kernel_log);
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
            pin_report,
        })
    }

    /// What reopening the pin directory found and did (None without pinning).
    pub fn pin_report(&self) -> Option<&PinReport> {
        self.pin_report.as_ref()
    }

    /// Once this meshd's programs are attached everywhere: finishes a migration of pinned maps
    /// (see [`PinReport::finish`]).
    pub fn finish_pin_migration(&mut self) {
        if let Some(report) = &mut self.pin_report {
            report.finish();
        }
    }

    /// Attaches a packet program to `interface`: XDP or TC as [`attach::choose`] decides for
    /// the interface and the request.
    ///
    /// With a pin directory the attachment outlives meshd (a pinned bpf_link, or a cls_bpf
    /// filter on kernels without tcx), and a later meshd swaps its own program into it
    /// atomically: there is no moment without a program on the interface.
    pub fn attach(
        &mut self,
        interface: &str,
        request: AttachRequest,
        xdp_mode: XdpAttachMode,
    ) -> Result<(), DataplaneError> {
        let ifindex = ifindex(interface)?;
        let info = attach::probe(interface)?;
        let choice = attach::choose(&info, request, xdp_mode)?;
        let pin_dir = self.options.pin_dir.clone();
        let mut reason = choice.reason;
        let mut attached = None;
        if let Some(mode) = choice.xdp {
            let program = xdp_program(&mut self.ebpf)?;
            match attach::attach_xdp(program, interface, ifindex, mode, pin_dir.as_deref()) {
                Ok(done) => attached = Some(done),
                Err(e) if choice.fallback_to_tc => {
                    warn!(interface, "native XDP unavailable ({e}); using TC");
                    reason = format!("native XDP refused ({e}): TC instead");
                }
                Err(e) => {
                    let hint = match (mode, info.driver.as_deref()) {
                        (XdpAttachMode::Native, _) => {
                            "; the driver may lack native XDP: use --attach auto or --attach tc"
                        }
                        _ => "",
                    };
                    return Err(DataplaneError::Other(format!("{e}{hint}")));
                }
            }
        }
        let attached = match attached {
            Some(done) => {
                if info.driver.as_deref() == Some("veth") {
                    warn!(
                        interface,
                        "XDP on a veth: every endpoint behind it needs GRO on and TX checksum \
                         offload off (ethtool -K IF gro on tx off), or connections hang; \
                         --attach auto uses TC here"
                    );
                }
                done
            }
            None => attach::attach_tc(tc_program(&mut self.ebpf)?, interface, pin_dir.as_deref())?,
        };
        let hook = attached.hook;
        self.pinned_links.extend(attached.link);
        let peer_redirect = self.list_redirect_target(interface, ifindex, hook, &info)?;
        info!(
            interface,
            ifindex,
            hook = hook.name(),
            replaced_pinned_link = attached.replaced,
            %reason,
            "attached"
        );
        self.attachments.insert(
            interface.to_string(),
            Attachment {
                interface: interface.to_string(),
                ifindex,
                hook,
                reason,
                peer_redirect,
            },
        );
        Ok(())
    }

    /// Records how the programs may send packets into `interface` themselves
    /// ([`mesh_common::redirect_target`]): XDP frames when it runs XDP natively, and straight
    /// into the container behind it when it is a veth or netkit whose peer lives in another
    /// namespace and the kernel has `bpf_redirect_peer`. Returns the latter.
    fn list_redirect_target(
        &mut self,
        interface: &str,
        ifindex: u32,
        hook: HookKind,
        info: &attach::InterfaceInfo,
    ) -> Result<bool, DataplaneError> {
        use mesh_common::redirect_target::{PEER, XDP_FRAMES};
        let peer = super::features::current().redirect_peer
            && super::peer::peer_in_other_namespace(ifindex, info.driver.as_deref())
                .unwrap_or_else(|e| {
                    warn!(
                        interface,
                        "cannot tell where its peer lives ({e}): no bpf_redirect_peer"
                    );
                    false
                });
        let flags = if hook == HookKind::XdpNative {
            XDP_FRAMES
        } else {
            0
        } | if peer { PEER } else { 0 };
        let mut targets = self.xdp_targets()?;
        if flags != 0 {
            targets
                .insert(ifindex, flags, 0)
                .map_err(map_err("listing a redirect target"))?;
        } else if targets.get(&ifindex, 0).is_ok() {
            // A pinned entry from an earlier attachment of this interface.
            targets
                .remove(&ifindex)
                .map_err(map_err("unlisting a redirect target"))?;
        }
        Ok(peer)
    }

    fn xdp_targets(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, u32, u32>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(map_names::XDP_REDIRECT_TARGETS)
            .ok_or_else(|| DataplaneError::Other("XDP_REDIRECT_TARGETS missing".into()))?;
        BpfHashMap::try_from(map).map_err(map_err("XDP_REDIRECT_TARGETS"))
    }

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.values()
    }

    /// Kernel id of the loaded program for `hook`.
    pub fn program_id(&self, hook: HookKind) -> Option<u32> {
        let name = if hook.is_xdp() {
            XDP_PROGRAM_NAME
        } else {
            TC_PROGRAM_NAME
        };
        let program = self.ebpf.program(name)?;
        let info = match program {
            aya::programs::Program::Xdp(p) => p.info(),
            aya::programs::Program::SchedClassifier(p) => p.info(),
            _ => return None,
        };
        info.ok().map(|info| info.id())
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
                attach::remove_link_pin(&entry.path())?;
            }
            std::fs::remove_dir(&links)?;
        }
        for name in pins::pinned_names() {
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

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    program(ebpf, XDP_PROGRAM_NAME)
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    program(ebpf, TC_PROGRAM_NAME)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Other(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            context: format!("program type of {name}"),
            source,
        })
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
        if in_private_mount_namespace() {
            warn!(
                "mounted bpffs at /sys/fs/bpf inside a private mount namespace (ip netns exec, \
                 or a service unit with private mounts): the pins vanish with this namespace, \
                 so programs, connections and rules will NOT survive a meshd restart; pin on a \
                 bpffs shared with the host (mount -t bpf bpf /sys/fs/bpf on the host first, or \
                 --pin-dir on a bpffs mounted outside /sys)"
            );
        } else {
            info!("mounted bpffs at /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        DataplaneError::Other(format!("creating pin directory {}: {e}", dir.display()))
    })
}

/// True when this process's mount namespace is not the host's (pid 1's).
fn in_private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(host)) => own != host,
        _ => false,
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}
