//! Where the packet programs run on each interface, and attaching them there.
//!
//! [`choose`] is the one place that decides, per interface, between XDP and TC:
//! - **XDP (native)** on devices whose driver runs XDP itself: physical NICs and virtio-net.
//!   Frames there carry complete checksums, and XDP may redirect into other native-XDP
//!   interfaces.
//! - **TC** (tcx on kernels that have it, cls_bpf otherwise) on veth, netkit, bridges and other
//!   virtual devices. On a veth, native XDP sees frames whose TCP/UDP checksum is only partial
//!   (senders with TX checksum offload, the default in every container runtime), and frames it
//!   redirects into a veth are dropped unless the peer has NAPI. TC runs on the skb, whose
//!   checksum state the kernel's helpers keep right, and redirects skbs anywhere.
//!
//! `--attach xdp` / `--attach tc` force a hook; `--xdp-mode generic` stays an explicit choice.
//! Interfaces that neither hook can serve (not Ethernet) are refused with the reason.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink, TcAttachOptions, TcHandle},
    xdp::XdpLink,
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use tracing::warn;

use super::DataplaneError;

/// Which hook `--attach` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachRequest {
    /// XDP on NICs whose driver runs it natively, TC on everything else (veth, bridges, ...).
    Auto,
    /// XDP everywhere (in --xdp-mode); for veth only with GRO on and TX checksum offload off
    /// on every endpoint.
    Xdp,
    /// TC everywhere.
    Tc,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Driver (native) mode: the fast path. Fails if the driver has no XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, runs after the kernel allocated an skb (slower).
    Generic,
}

/// The hook a program actually runs at on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// XDP in the driver.
    XdpNative,
    /// XDP in generic (skb) mode.
    XdpGeneric,
    /// TC ingress through a tcx link (kernel 6.6 and later).
    Tcx,
    /// TC ingress through a cls_bpf filter on the clsact qdisc (older kernels).
    TcClsBpf,
}

impl HookKind {
    /// Short name for `meshctl status` and logs.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::XdpNative => "xdp-native",
            HookKind::XdpGeneric => "xdp-generic",
            HookKind::Tcx => "tcx",
            HookKind::TcClsBpf => "tc-cls_bpf",
        }
    }

    /// Whether this is an XDP hook.
    pub fn is_xdp(self) -> bool {
        matches!(self, HookKind::XdpNative | HookKind::XdpGeneric)
    }
}

/// What is known about an interface, from sysfs and the ethtool driver query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Interface name.
    pub name: String,
    /// ARPHRD type (1 = Ethernet).
    pub link_type: u32,
    /// Driver name (`veth`, `bridge`, `virtio_net`, `ixgbe`, ...), when the kernel tells.
    pub driver: Option<String>,
    /// Whether a bus device (PCI, virtio, ...) backs the interface.
    pub has_device: bool,
}

/// Drivers of virtual devices that carry skbs from the stack (TC's territory).
const VIRTUAL_DRIVERS: &[&str] = &[
    "veth",
    "netkit",
    "bridge",
    "bond",
    "team",
    "vxlan",
    "geneve",
    "macvlan",
    "ipvlan",
    "vrf",
    "dummy",
    "tun",
    "openvswitch",
];

/// The hook to use on one interface, with the reason shown in `meshctl status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// XDP (in the given mode) or TC.
    pub xdp: Option<XdpAttachMode>,
    /// Why, in words.
    pub reason: String,
    /// Whether `auto` may fall back to TC if native XDP attach fails.
    pub fallback_to_tc: bool,
}

/// Decides the hook for `info` (pure: probing is [`probe`]).
pub fn choose(
    info: &InterfaceInfo,
    request: AttachRequest,
    xdp_mode: XdpAttachMode,
) -> Result<Choice, DataplaneError> {
    const ARPHRD_ETHER: u32 = 1;
    if info.link_type != ARPHRD_ETHER {
        return Err(DataplaneError::Other(format!(
            "interface {}: not an Ethernet device (link type {}); mesh's programs parse \
             Ethernet frames, so L3 devices (tun, WireGuard, IPIP, loopback) cannot be served: \
             attach to the Ethernet interfaces the traffic crosses instead",
            info.name, info.link_type
        )));
    }
    let driver = info.driver.as_deref().unwrap_or("unknown");
    let is_virtual = !info.has_device || VIRTUAL_DRIVERS.contains(&driver);
    Ok(match request {
        AttachRequest::Tc => Choice {
            xdp: None,
            reason: "--attach tc".into(),
            fallback_to_tc: false,
        },
        AttachRequest::Xdp => Choice {
            xdp: Some(xdp_mode),
            reason: format!("--attach xdp (driver {driver})"),
            fallback_to_tc: false,
        },
        AttachRequest::Auto if xdp_mode == XdpAttachMode::Generic => Choice {
            xdp: Some(XdpAttachMode::Generic),
            reason: "--xdp-mode generic".into(),
            fallback_to_tc: false,
        },
        AttachRequest::Auto if is_virtual => Choice {
            xdp: None,
            reason: format!(
                "virtual device (driver {driver}): TC keeps the skb's checksum state and can \
                 redirect into any device"
            ),
            fallback_to_tc: false,
        },
        AttachRequest::Auto => Choice {
            xdp: Some(XdpAttachMode::Native),
            reason: format!("driver {driver} runs XDP natively"),
            fallback_to_tc: true,
        },
    })
}

/// Reads what [`choose`] needs about `interface`, through ioctls on a socket of this process's
/// network namespace (sysfs shows another namespace's devices when /sys was not remounted).
pub fn probe(interface: &str) -> Result<InterfaceInfo, DataplaneError> {
    let link_type = link_type(interface)
        .map_err(|e| DataplaneError::Other(format!("interface {interface}: {e}")))?;
    let (driver, bus_info) = ethtool_driver(interface).unzip();
    Ok(InterfaceInfo {
        name: interface.to_string(),
        link_type,
        driver,
        // Physical and virtio NICs name their bus device (PCI address, `virtio0`).
        has_device: bus_info.is_some_and(|b: String| !b.is_empty()),
    })
}

/// An `ifreq` for `interface`, or `None` when the name cannot be one.
fn ifreq(interface: &str) -> Option<libc::ifreq> {
    if interface.is_empty() || interface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain C struct; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    Some(req)
}

/// Runs one interface ioctl on a throw-away datagram socket.
fn ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: a datagram socket for the ioctl, closed below; `req` is a valid ifreq whose
    // pointers (if any) outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, request, req as *mut libc::ifreq);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The ARPHRD link type (`SIOCGIFHWADDR`'s address family).
fn link_type(interface: &str) -> std::io::Result<u32> {
    let mut req = ifreq(interface).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an interface name")
    })?;
    ioctl(libc::SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } as u32)
}

/// Driver name and bus info from the `ETHTOOL_GDRVINFO` ioctl (what `ethtool -i` prints).
fn ethtool_driver(interface: &str) -> Option<(String, String)> {
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    // SAFETY: plain C struct; all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = ifreq(interface)?;
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    ioctl(libc::SIOCETHTOOL, &mut req).ok()?;
    let text = |bytes: &[u8]| {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let driver = text(&info.driver);
    (!driver.is_empty()).then(|| (driver, text(&info.bus_info)))
}

/// The outcome of attaching one program to one interface.
pub struct Attached {
    /// The hook it runs at.
    pub hook: HookKind,
    /// The link pinned for it (kept open while meshd runs), if a new one was created.
    pub link: Option<PinnedLink>,
    /// Whether an attachment left by an earlier meshd was taken over in place.
    pub replaced: bool,
}

/// cls_bpf filter priority and handle mesh uses on kernels without tcx; fixed so that a
/// restarted meshd replaces its own filter in place.
const CLS_BPF_PRIORITY: u16 = 0x4d53;
const CLS_BPF_HANDLE: u16 = 1;

/// Where an interface's pinned link lives: `<pin_dir>/links/<iface>` for XDP, `tc-<iface>` for
/// tcx, and `cls_bpf-<iface>` for a cls_bpf filter (the TC program pinned as a marker naming the
/// interface). bpffs refuses names holding a `.`, which interface names may have (VLANs such as
/// `eth0.100`): it is written as `:`, which no interface name holds.
pub fn link_pin(pin_dir: &Path, interface: &str, hook: HookKind) -> PathBuf {
    let links = pin_dir.join("links");
    let name = interface.replace('.', ":");
    match hook {
        HookKind::XdpNative | HookKind::XdpGeneric => links.join(name),
        HookKind::Tcx => links.join(format!("tc-{name}")),
        HookKind::TcClsBpf => links.join(format!("{CLS_BPF_PIN_PREFIX}{name}")),
    }
}

/// The start of a cls_bpf marker's name in `links/`.
const CLS_BPF_PIN_PREFIX: &str = "cls_bpf-";

/// Whether TC programs go through tcx links here: the choice the kernel probe made at load time
/// (`features::current`), which `meshctl status` reports.
pub fn kernel_has_tcx() -> bool {
    super::features::current().tc_attach == super::features::TcAttach::Tcx
}

/// Attaches the XDP program; with `pin_dir`, through a pinned bpf_link a later meshd swaps its
/// program into atomically. Returns the link to keep (unpinned) or `None`.
pub fn attach_xdp(
    program: &mut Xdp,
    interface: &str,
    ifindex: u32,
    mode: XdpAttachMode,
    pin_dir: Option<&Path>,
) -> Result<Attached, DataplaneError> {
    let hook = match mode {
        XdpAttachMode::Native => HookKind::XdpNative,
        XdpAttachMode::Generic => HookKind::XdpGeneric,
    };
    let pin = pin_dir.map(|d| link_pin(d, interface, hook));
    if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
        let swapped = PinnedLink::from_pin(pin)
            .map_err(|e| e.to_string())
            .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
            .and_then(|l| program.attach_to_link(l).map_err(|e| e.to_string()));
        match swapped {
            Ok(_) => {
                return Ok(Attached {
                    hook,
                    link: None,
                    replaced: true,
                })
            }
            Err(e) => {
                warn!(
                    interface,
                    "pinned XDP link unusable ({e}); attaching afresh"
                );
                let _ = fs::remove_file(pin);
            }
        }
    }
    let xdp_mode = match mode {
        XdpAttachMode::Native => XdpMode::Driver,
        XdpAttachMode::Generic => XdpMode::Skb,
    };
    let link_id = program
        .attach_to_if_index(ifindex, xdp_mode)
        .map_err(|source| {
            DataplaneError::Other(format!(
                "attaching XDP ({} mode) to {interface}: {source}",
                hook.name()
            ))
        })?;
    let fresh = |link| Attached {
        hook,
        link,
        replaced: false,
    };
    let Some(pin) = pin else {
        return Ok(fresh(None));
    };
    let link = program
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
    Ok(fresh(Some(pin_link(fd_link, &pin)?)))
}

/// Attaches the TC program at `interface`'s ingress: a tcx link (pinned like XDP's) where the
/// kernel has tcx, otherwise a cls_bpf filter on the clsact qdisc at a fixed priority, which
/// outlives meshd by itself and which a later meshd replaces in place.
pub fn attach_tc(
    program: &mut SchedClassifier,
    interface: &str,
    pin_dir: Option<&Path>,
) -> Result<Attached, DataplaneError> {
    let err = |what: &str, e: String| {
        DataplaneError::Other(format!("attaching TC ({what}) to {interface}: {e}"))
    };
    if kernel_has_tcx() {
        let pin = pin_dir.map(|d| link_pin(d, interface, HookKind::Tcx));
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let swapped = PinnedLink::from_pin(pin)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string())
                })
                .and_then(|l| program.attach_to_link(l).map_err(|e| e.to_string()));
            match swapped {
                Ok(_) => {
                    return Ok(Attached {
                        hook: HookKind::Tcx,
                        link: None,
                        replaced: true,
                    })
                }
                Err(e) => {
                    warn!(
                        interface,
                        "pinned tcx link unusable ({e}); attaching afresh"
                    );
                    let _ = fs::remove_file(pin);
                }
            }
        }
        let link_id = program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| err("tcx", e.to_string()))?;
        let fresh = |link| Attached {
            hook: HookKind::Tcx,
            link,
            replaced: false,
        };
        let Some(pin) = pin else {
            return Ok(fresh(None));
        };
        let link = program
            .take_link(link_id)
            .map_err(|e| err("tcx", e.to_string()))?;
        let fd_link = FdLink::try_from(link).map_err(|e| err("tcx", e.to_string()))?;
        return Ok(fresh(Some(pin_link(fd_link, &pin)?)));
    }

    if let Err(e) = tc::qdisc_add_clsact(interface) {
        // EEXIST: the qdisc is there already (ours from an earlier run, or another tool's).
        if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) {
            return Err(err("clsact qdisc", e.to_string()));
        }
    }
    let handle = TcHandle::new(0, CLS_BPF_HANDLE);
    // Replace our own filter if an earlier meshd left it (no moment without a program).
    let replaced = SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        CLS_BPF_PRIORITY,
        handle,
        None,
    )
    .ok()
    .and_then(|link| program.attach_to_link(link).ok());
    let was_replaced = replaced.is_some();
    let link_id = match replaced {
        Some(id) => id,
        None => program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(tc::NlOptions {
                    priority: CLS_BPF_PRIORITY,
                    handle,
                    classid: None,
                }),
            )
            .map_err(|e| err("cls_bpf", e.to_string()))?,
    };
    if let Some(dir) = pin_dir {
        // The filter must outlive this process: take it out of the program's care (dropping
        // it would detach it) and leave a marker so `meshd --cleanup` finds it. bpffs holds
        // only BPF objects (a plain file there is EPERM), so the marker is the program itself
        // pinned under the interface's name; an earlier run's marker is replaced.
        let link = program
            .take_link(link_id)
            .map_err(|e| err("cls_bpf", e.to_string()))?;
        std::mem::forget(link);
        let marker = link_pin(dir, interface, HookKind::TcClsBpf);
        create_parent(&marker)?;
        match fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(err("cls_bpf marker", format!("{}: {e}", marker.display())));
            }
            _ => {}
        }
        program
            .pin(&marker)
            .map_err(|e| err("cls_bpf marker", format!("{}: {e}", marker.display())))?;
    }
    Ok(Attached {
        hook: HookKind::TcClsBpf,
        link: None,
        replaced: was_replaced,
    })
}

/// Removes one pinned link or cls_bpf marker (for `meshd --cleanup`), detaching the program.
pub fn remove_link_pin(path: &Path) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    if let Some(interface) = name
        .as_deref()
        .and_then(|n| n.strip_prefix(CLS_BPF_PIN_PREFIX))
        .map(|n| n.replace(':', "."))
    {
        if let Ok(link) = SchedClassifierLink::attached(
            &interface,
            TcAttachType::Ingress,
            CLS_BPF_PRIORITY,
            TcHandle::new(0, CLS_BPF_HANDLE),
            None,
        ) {
            // Detaches on drop; the interface may be gone already, which is fine.
            drop(link);
        }
    }
    fs::remove_file(path)
}

fn pin_link(link: FdLink, pin: &Path) -> Result<PinnedLink, DataplaneError> {
    create_parent(pin)?;
    link.pin(pin)
        .map_err(|e| DataplaneError::Other(format!("pinning {}: {e}", pin.display())))
}

fn create_parent(path: &Path) -> Result<(), DataplaneError> {
    let dir = path.parent().expect("link pins live in a directory");
    fs::create_dir_all(dir)
        .map_err(|e| DataplaneError::Other(format!("creating {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_hold_no_dot_which_bpffs_refuses() {
        let dir = Path::new("/sys/fs/bpf/mesh");
        for hook in [HookKind::XdpNative, HookKind::Tcx, HookKind::TcClsBpf] {
            let pin = link_pin(dir, "eth0.100", hook);
            let name = pin.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.contains('.'), "{name}");
            assert!(name.ends_with("eth0:100"), "{name}");
        }
        assert_eq!(
            link_pin(dir, "veth1", HookKind::TcClsBpf),
            dir.join("links/cls_bpf-veth1")
        );
    }

    fn info(driver: &str, has_device: bool) -> InterfaceInfo {
        InterfaceInfo {
            name: "if0".into(),
            link_type: 1,
            driver: Some(driver.into()),
            has_device,
        }
    }

    #[test]
    fn auto_picks_tc_on_virtual_devices_and_xdp_on_nics() {
        for driver in ["veth", "bridge", "netkit"] {
            let c = choose(
                &info(driver, false),
                AttachRequest::Auto,
                XdpAttachMode::Native,
            )
            .unwrap();
            assert_eq!(c.xdp, None, "{driver}");
            assert!(c.reason.contains(driver));
        }
        for driver in ["virtio_net", "ixgbe", "mlx5_core"] {
            let c = choose(
                &info(driver, true),
                AttachRequest::Auto,
                XdpAttachMode::Native,
            )
            .unwrap();
            assert_eq!(c.xdp, Some(XdpAttachMode::Native), "{driver}");
            assert!(c.fallback_to_tc);
        }
    }

    #[test]
    fn explicit_requests_win() {
        let veth = info("veth", false);
        let c = choose(&veth, AttachRequest::Xdp, XdpAttachMode::Native).unwrap();
        assert_eq!(c.xdp, Some(XdpAttachMode::Native));
        assert!(!c.fallback_to_tc);
        let c = choose(&veth, AttachRequest::Auto, XdpAttachMode::Generic).unwrap();
        assert_eq!(c.xdp, Some(XdpAttachMode::Generic));
        let nic = info("virtio_net", true);
        assert_eq!(
            choose(&nic, AttachRequest::Tc, XdpAttachMode::Native)
                .unwrap()
                .xdp,
            None
        );
    }

    #[test]
    fn non_ethernet_devices_are_refused_with_the_reason() {
        let mut wg = info("wireguard", false);
        wg.link_type = 65534;
        let e = choose(&wg, AttachRequest::Auto, XdpAttachMode::Native)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an Ethernet device"), "{e}");
        assert!(e.contains("if0"), "{e}");
    }

    #[test]
    fn loopback_probes_as_non_ethernet() {
        let lo = probe("lo").unwrap();
        assert_eq!(lo.link_type, 772);
        assert!(choose(&lo, AttachRequest::Auto, XdpAttachMode::Native).is_err());
    }
}
