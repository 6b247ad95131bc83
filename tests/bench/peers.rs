//! The peers the forwarding section compares against (nftables, iptables): found on PATH, or
//! installed with apt-get (progress shown) when missing. A failed install is a reported skip.
//!
//! xdp-tools and netsniff-ng are deliberately not installed: the generator is the benchmark's
//! own live-frames XDP program (see `rawbpf.rs` for why neither xdp-trafficgen nor trafgen fits).

use std::process::Command;

use crate::util::progress;

/// What is available; `Err` holds why a peer is skipped.
#[derive(Clone, Debug)]
pub struct Peers {
    /// `nft` binary.
    pub nft: Result<String, String>,
    /// iptables binary to use (`iptables-legacy` preferred: kube-proxy's classic x_tables path).
    pub iptables: Result<String, String>,
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn apt_install(package: &str) -> Result<(), String> {
    progress(&format!(
        "installing {package} (apt-get install -y {package})"
    ));
    let install = || {
        Command::new("timeout")
            .args(["600", "apt-get", "install", "-y", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if install() {
        return Ok(());
    }
    progress("apt-get install failed; running apt-get update once and retrying");
    let _ = Command::new("timeout")
        .args(["600", "apt-get", "update"])
        .status();
    if install() {
        Ok(())
    } else {
        Err(format!("apt-get install -y {package} failed"))
    }
}

fn ensure(binaries: &[&str], package: &str) -> Result<String, String> {
    let found = |bins: &[&str]| bins.iter().find(|b| have(b)).map(|b| b.to_string());
    if let Some(b) = found(binaries) {
        return Ok(b);
    }
    apt_install(package)?;
    found(binaries).ok_or_else(|| format!("{package} installed but none of {binaries:?} found"))
}

/// Finds or installs nftables and iptables.
pub fn ensure_peers() -> Peers {
    Peers {
        nft: ensure(&["nft"], "nftables"),
        iptables: ensure(&["iptables-legacy", "iptables"], "iptables"),
    }
}
