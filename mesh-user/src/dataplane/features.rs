//! What the running kernel can do, probed once when meshd loads its programs: the choices made
//! from it (TC attachment through tcx links or cls_bpf, `bpf_redirect_peer` into containers) and
//! the features mesh cannot do without (XDP, the helpers and map types its programs use). A
//! missing must-have makes meshd refuse to start with a message naming the kernel and the
//! feature; the rest is reported by `meshctl status`.
//!
//! Probes load tiny programs through aya's feature probes (as libbpf does), so they answer for
//! this kernel's configuration, not for its version number. The one exception is tcx: aya attaches
//! TC programs through tcx links from kernel 6.6 on and through netlink (cls_bpf) before, so the
//! choice reported here follows the same rule as the attachment itself.

use std::sync::OnceLock;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
    util::KernelVersion,
};
use serde::{Deserialize, Serialize};

/// How TC programs are attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcAttach {
    /// tcx links (kernel 6.6+): owned by meshd, pinnable, no qdisc.
    Tcx,
    /// A clsact qdisc with a cls_bpf filter (older kernels).
    ClsBpf,
}

/// How the user asked TC programs to be attached (`meshd --tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachRequest {
    /// tcx where the kernel has it (6.6+), cls_bpf otherwise.
    #[default]
    Auto,
    /// tcx links; refused on a kernel without tcx.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, also where tcx exists (for hosts whose other tools
    /// manage TC through qdiscs and filters).
    ClsBpf,
}

/// Set once by meshd before the first probe.
static TC_REQUEST: OnceLock<TcAttachRequest> = OnceLock::new();

/// Records `--tc-attach` before the kernel is probed; a later call changes nothing.
pub fn request_tc_attach(request: TcAttachRequest) {
    let _ = TC_REQUEST.set(request);
}

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// e.g. `helper bpf_fib_lookup (xdp)`.
    pub name: String,
    pub available: bool,
    /// mesh cannot run without it.
    pub required: bool,
}

/// The kernel's features and the choices made from them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub kernel: String,
    /// TC attachment chosen.
    pub tc_attach: TcAttach,
    /// `bpf_redirect_peer` from TC: frames into a container's veth skip the backlog queue.
    pub redirect_peer: bool,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// Everything probed, must-haves first.
    pub probed: Vec<Feature>,
}

/// A must-have feature is missing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("kernel {kernel} lacks {}, which mesh cannot do without (a kernel of 5.15 or later with BPF, XDP and BPF_JIT enabled has them)", missing.join(", "))]
pub struct MissingFeatures {
    /// The kernel release.
    pub kernel: String,
    /// What is missing.
    pub missing: Vec<String>,
}

/// Helpers the XDP program calls (mesh-ebpf/src): without any of them it does not load.
const XDP_HELPERS: &[(&str, BpfHelper)] = &[
    ("bpf_fib_lookup", BpfHelper::BPF_FUNC_fib_lookup),
    ("bpf_redirect", BpfHelper::BPF_FUNC_redirect),
    ("bpf_skc_lookup_tcp", BpfHelper::BPF_FUNC_skc_lookup_tcp),
    ("bpf_sk_release", BpfHelper::BPF_FUNC_sk_release),
    ("bpf_ktime_get_ns", BpfHelper::BPF_FUNC_ktime_get_ns),
];

/// Map types the programs declare.
const MAP_TYPES: &[(&str, MapType)] = &[
    ("LRU hash map", MapType::LruHash),
    ("per-CPU array map", MapType::PerCpuArray),
    ("hash map", MapType::Hash),
    ("array map", MapType::Array),
];

impl KernelFeatures {
    /// Probes the running kernel (a few tiny program loads; a few milliseconds).
    pub fn probe() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "(unknown)".into());
        let mut probed = Vec::new();
        let xdp = is_program_supported(ProgramType::Xdp).unwrap_or(false);
        probed.push(feature("XDP programs", xdp, true));
        for (name, helper) in XDP_HELPERS {
            let ok = xdp && is_helper_supported(ProgramType::Xdp, *helper).unwrap_or(false);
            probed.push(feature(&format!("helper {name} (xdp)"), ok, true));
        }
        for (name, map) in MAP_TYPES {
            probed.push(feature(name, is_map_supported(*map).unwrap_or(false), true));
        }
        let tc = is_program_supported(ProgramType::SchedClassifier).unwrap_or(false);
        probed.push(feature("TC (sched_cls) programs", tc, false));
        let redirect_peer = tc
            && is_helper_supported(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_redirect_peer,
            )
            .unwrap_or(false);
        probed.push(feature(
            "helper bpf_redirect_peer (tc)",
            redirect_peer,
            false,
        ));
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let request = TC_REQUEST.get().copied().unwrap_or_default();
        // Asked for explicitly, tcx is a must-have (require() then names it).
        probed.push(feature(
            "tcx links (6.6+)",
            tcx,
            request == TcAttachRequest::Tcx,
        ));
        let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
        probed.push(feature("kernel BTF", btf, false));
        Self {
            kernel,
            tc_attach: match request {
                TcAttachRequest::ClsBpf => TcAttach::ClsBpf,
                _ if tcx => TcAttach::Tcx,
                _ => TcAttach::ClsBpf,
            },
            redirect_peer,
            btf,
            probed,
        }
    }

    /// Fails, naming the kernel and every missing must-have, when mesh cannot run here.
    pub fn require(&self) -> Result<(), MissingFeatures> {
        let missing: Vec<String> = self
            .probed
            .iter()
            .filter(|f| f.required && !f.available)
            .map(|f| f.name.clone())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(MissingFeatures {
                kernel: self.kernel.clone(),
                missing,
            })
        }
    }

    /// One line for logs and `meshctl status`.
    pub fn summary(&self) -> String {
        format!(
            "kernel {}: TC via {}, bpf_redirect_peer {}, BTF {}",
            self.kernel,
            match self.tc_attach {
                TcAttach::Tcx => "tcx links",
                TcAttach::ClsBpf => "cls_bpf (clsact qdisc)",
            },
            if self.redirect_peer {
                "yes"
            } else {
                "no (bpf_redirect)"
            },
            if self.btf { "yes" } else { "no" },
        )
    }
}

fn feature(name: &str, available: bool, required: bool) -> Feature {
    Feature {
        name: name.to_string(),
        available,
        required,
    }
}

/// The running kernel's features, probed on first use.
pub fn current() -> &'static KernelFeatures {
    static FEATURES: OnceLock<KernelFeatures> = OnceLock::new();
    FEATURES.get_or_init(KernelFeatures::probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(missing: &[&str]) -> KernelFeatures {
        KernelFeatures {
            kernel: "6.1.0-test".into(),
            tc_attach: TcAttach::ClsBpf,
            redirect_peer: true,
            btf: true,
            probed: [
                "XDP programs",
                "helper bpf_fib_lookup (xdp)",
                "tcx links (6.6+)",
            ]
            .iter()
            .map(|n| feature(n, !missing.contains(n), !n.starts_with("tcx")))
            .collect(),
        }
    }

    #[test]
    fn a_missing_must_have_names_kernel_and_feature() {
        let err = features(&["helper bpf_fib_lookup (xdp)"])
            .require()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("6.1.0-test"), "{text}");
        assert!(text.contains("bpf_fib_lookup"), "{text}");
    }

    #[test]
    fn a_missing_choice_is_not_fatal() {
        assert_eq!(features(&["tcx links (6.6+)"]).require(), Ok(()));
        assert!(features(&[]).summary().contains("cls_bpf"));
    }

    #[test]
    fn probing_this_kernel_finds_the_must_haves() {
        // Needs root (program loads); skipped otherwise.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let f = KernelFeatures::probe();
        assert_eq!(f.require(), Ok(()), "{f:#?}");
    }
}
