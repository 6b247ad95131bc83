//! Installs what the eBPF build and the tests need on a fresh machine of this kind (Debian 12,
//! root): Debian's rustc-web (ships `core` prebuilt for `bpfel-unknown-none`), LLVM 22 for
//! bpf-linker, bpf-linker itself, and the network tools the tests drive.
//!
//! Idempotent: every step checks first and is skipped when its result is already there, so a
//! second run takes well under a second.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages, with the file that proves each one is installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none",
    ),
    ("rust-web-src", "/usr/lib/rustlib/src"),
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("curl", "/usr/bin/curl"),
    // The VM suite (`cargo xtask vm-test`): qemu, a static busybox for the guest's initramfs,
    // cpio to write it, mkfs.ext4 -d for the guest's disk, xz for the kernels' modules.
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/usr/share/doc/busybox-static"),
    ("cpio", "/usr/bin/cpio"),
    ("e2fsprogs", "/usr/sbin/mkfs.ext4"),
    ("xz-utils", "/usr/bin/xz"),
    ("kmod", "/usr/sbin/depmod"),
    // The split page's test drives a real headless browser (tests/split_page.rs).
    ("chromium", "/usr/bin/chromium"),
];

/// What the fleet needs (issue 14): `protoc` and protobuf's well-known types to build the etcd
/// client crate, and etcd itself
/// (server and etcdctl) for the fleet tests and `cargo xtask demo --fleet`.
const FLEET_PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "/usr/bin/protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Makes sure every tool the build and tests need is installed.
pub fn ensure() -> Result<()> {
    ensure_root_for_install()?;
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_apt_packages(FLEET_PACKAGES)?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_root_for_install() -> Result<()> {
    let missing = APT_PACKAGES
        .iter()
        .chain(FLEET_PACKAGES)
        .any(|(_, p)| !Path::new(p).exists());
    if missing && !is_root() {
        bail!("packages are missing and installing them needs root: run as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_apt_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, proof)| !Path::new(proof).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "==> setup: installing Debian packages: {}",
        missing.join(" ")
    );
    let mut update = Command::new("apt-get");
    update
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut update).context("apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install).context("apt-get install")?;
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!("==> setup: found {v}, want bpf-linker {BPF_LINKER_VERSION}");
    }
    eprintln!(
        "==> setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
    );
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("PATH", path);
    run(&mut install).context("cargo install bpf-linker")?;
    Ok(())
}
