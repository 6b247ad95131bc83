//! The kernels the VM suite boots: Debian 12's 6.1 and 6.12 cloud kernels, fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` under `target/vm/kernels/` (never installed
//! on the host), and the host's own kernel image when it is readable.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// A kernel named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's cloud kernel (linux-image-cloud-amd64).
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 cloud kernel from Debian 12's security suite.
    #[value(name = "6.12")]
    V6_12,
    /// The kernel this machine runs, when its image is readable.
    Host,
    /// All of the above.
    All,
}

impl KernelChoice {
    /// The kernels this choice stands for, in matrix order.
    pub fn expand(self) -> Vec<KernelChoice> {
        match self {
            KernelChoice::All => vec![KernelChoice::V6_1, KernelChoice::V6_12, KernelChoice::Host],
            k => vec![k],
        }
    }

    /// Short label used in the matrix and in file names.
    pub fn label(self) -> &'static str {
        match self {
            KernelChoice::V6_1 => "6.1",
            KernelChoice::V6_12 => "6.12",
            KernelChoice::Host => "host",
            KernelChoice::All => "all",
        }
    }
}

/// A kernel ready to boot.
#[derive(Debug)]
pub struct Kernel {
    /// Matrix label ("6.1", "6.12", "host").
    pub label: &'static str,
    /// Release string (`uname -r` inside the guest), e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// Where it came from (Debian package and version, or the host's path).
    pub source: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of this kernel, if it has loadable modules.
    pub modules: Option<PathBuf>,
}

/// Why a kernel cannot be booted: the matrix row says it.
#[derive(Debug)]
pub struct Unavailable {
    pub label: &'static str,
    pub reason: String,
}

/// Finds (downloading and unpacking when needed) the kernel for `choice`.
pub fn resolve(
    choice: KernelChoice,
    cache: &Path,
) -> Result<std::result::Result<Kernel, Unavailable>> {
    match choice {
        KernelChoice::V6_1 => {
            // The metapackage names the current ABI (linux-image-6.1.0-N-cloud-amd64).
            let pkg = apt_depends("linux-image-cloud-amd64", "linux-image-6.1.")?;
            debian(choice.label(), &pkg, cache).map(Ok)
        }
        KernelChoice::V6_12 => {
            let pkg = newest_package(r"^linux-image-6\.12\..*\+deb12-cloud-amd64-unsigned$")?;
            debian(choice.label(), &pkg, cache).map(Ok)
        }
        KernelChoice::Host => Ok(host()),
        KernelChoice::All => bail!("`all` is expanded before resolving"),
    }
}

fn host() -> std::result::Result<Kernel, Unavailable> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let candidates = [
        format!("/boot/vmlinuz-{release}"),
        format!("/lib/modules/{release}/vmlinuz"),
        format!("/usr/lib/modules/{release}/vmlinuz"),
    ];
    let Some(image) = candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| fs::File::open(p).is_ok())
    else {
        return Err(Unavailable {
            label: "host",
            reason: format!(
                "the host kernel's image ({release}) is not readable here: none of {}",
                candidates.join(", ")
            ),
        });
    };
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    Ok(Kernel {
        label: "host",
        source: format!("host image {}", image.display()),
        vmlinuz: image,
        modules: modules.join("modules.dep").exists().then_some(modules),
        release,
    })
}

/// `apt-cache depends PKG`, the first dependency starting with `prefix`.
fn apt_depends(pkg: &str, prefix: &str) -> Result<String> {
    let out = capture(Command::new("apt-cache").args(["depends", pkg]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with(prefix))
        .map(str::to_string)
        .with_context(|| format!("apt-cache depends {pkg}: no dependency starting with {prefix} (run apt-get update?)"))
}

/// The highest-versioned package whose name matches `regex`.
fn newest_package(regex: &str) -> Result<String> {
    let out = capture(Command::new("apt-cache").args(["search", "--names-only", regex]))?;
    let mut names: Vec<&str> = out.lines().filter_map(|l| l.split(' ').next()).collect();
    names.sort_by_key(|a| version_key(a));
    names
        .last()
        .map(|s| s.to_string())
        .with_context(|| format!("no Debian package matches {regex} (is bookworm-security in the apt sources? run apt-get update)"))
}

/// Numeric parts of a package name, for ordering 6.12.9 before 6.12.10.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// Downloads and unpacks a Debian kernel package once; later runs reuse the cache.
fn debian(label: &'static str, pkg: &str, cache: &Path) -> Result<Kernel> {
    let dir = cache.join(pkg);
    let done = dir.join(".unpacked");
    if !done.exists() {
        eprintln!(
            "==> vm: fetching {pkg} (apt-get download, unpacked under {})",
            dir.display()
        );
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let dl = dir.join("deb");
        fs::create_dir_all(&dl)?;
        crate::run(
            Command::new("apt-get")
                .args(["download", "-q", pkg])
                .current_dir(&dl),
        )
        .with_context(|| format!("apt-get download {pkg}"))?;
        let deb = fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {pkg} left no .deb"))?;
        crate::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(dir.join("root")),
        )
        .with_context(|| format!("dpkg-deb -x {}", deb.display()))?;
        let version = capture(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
        fs::remove_dir_all(&dl)?;
        fs::write(&done, format!("{pkg} {}", version.trim()))?;
    }
    let boot = dir.join("root/boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{pkg} has no boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = dir.join("root/lib/modules").join(&release);
    if modules.exists() && !modules.join("modules.dep").exists() {
        // A package's modules.dep is written by depmod at install time; do it here instead.
        crate::run(
            Command::new("depmod")
                .arg("-b")
                .arg(dir.join("root"))
                .arg(&release),
        )
        .context("depmod (Debian's kmod package)")?;
    }
    let unpacked = fs::read_to_string(&done).unwrap_or_default();
    Ok(Kernel {
        label,
        source: format!("Debian package {}", unpacked.trim()),
        vmlinuz,
        modules: modules.exists().then_some(modules),
        release,
    })
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_sorts_numerically() {
        let mut v = [
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.38+deb12-cloud-amd64-unsigned",
        ];
        v.sort_by_key(|a| version_key(a));
        assert_eq!(v[2], "linux-image-6.12.117+deb12-cloud-amd64-unsigned");
    }
}
