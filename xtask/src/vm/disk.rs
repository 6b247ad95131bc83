//! The suite's disk: an ext4 image written with `mkfs.ext4 -d` (no mounting, no root tricks) that
//! the guest mounts as its root. It holds the already-built test binaries and mesh binaries at
//! the same absolute paths as on the host (the tests find meshd next to themselves and config
//! files through paths compiled in), the repository's tracked files, the tools the tests call
//! with the shared libraries everything links, a static busybox, and the guest's run plan.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::initramfs::write_exec;

/// Tools the tests and meshd run (looked up on the host's PATH; a missing one is reported).
const TOOLS: &[&str] = &[
    "sh", "ip", "tc", "ethtool", "curl", "nsenter", "taskset", "timeout", "sysctl", "nft",
    "bpftool", "mount", "umount", "ss", "env", "cat", "sleep", "kill",
];

/// The guest's run script (see the file for its protocol).
const RUN_SUITE: &str = include_str!("run-suite.sh");

/// One test binary to run in the guest.
#[derive(Clone, Debug)]
pub struct TestBinary {
    /// Cargo target name, e.g. `golden_packets`.
    pub name: String,
    pub path: PathBuf,
}

/// What goes on the disk besides the tools.
pub struct Contents<'a> {
    pub repo: &'a Path,
    /// meshd, meshctl and the helper binaries the tests start.
    pub programs: Vec<PathBuf>,
    pub tests: &'a [TestBinary],
    /// Arguments after `--`, given to every test binary (a filter, `--ignored`, ...).
    pub args: &'a [String],
    /// Per test binary, in seconds (the guest kills a binary that takes longer).
    pub timeout_secs: u64,
    /// Guest uptime after which binaries not started yet are skipped (0: none).
    pub budget_secs: u64,
    /// With a budget: how much longer a binary started within it may run.
    pub grace_secs: u64,
}

/// Stages the contents under `dir/rootfs` and writes `dir/disk.ext4`; returns the image path.
pub fn build(dir: &Path, contents: &Contents) -> Result<PathBuf> {
    let stage = dir.join("rootfs");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "var/tmp",
        "var/lib",
        "root",
        "etc",
        "mesh/bb",
    ] {
        fs::create_dir_all(stage.join(d))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("var/run", "../run"),
    ] {
        symlink(target, stage.join(link))?;
    }
    fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(stage.join("etc/group"), "root:x:0:\n")?;
    fs::write(
        stage.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;

    let mut elves: Vec<PathBuf> = Vec::new();
    let mut missing = Vec::new();
    for tool in TOOLS {
        match which(tool) {
            Some(path) => {
                copy_file(&path, &stage)?;
                elves.push(path);
            }
            None => missing.push(*tool),
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "==> vm: not on this host, so not in the guest: {}",
            missing.join(" ")
        );
    }
    for program in contents
        .programs
        .iter()
        .chain(contents.tests.iter().map(|t| &t.path))
    {
        copy_stripped(program, &stage)?;
        elves.push(program.clone());
    }
    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(shared_libraries(elf)?);
    }
    for lib in &libs {
        copy_file(lib, &stage)?;
    }
    copy_repo(contents.repo, &stage)?;

    // busybox applets for the run script (after the real tools on PATH).
    fs::copy("/bin/busybox", stage.join("mesh/bb/busybox")).context("copying /bin/busybox")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", stage.join("mesh/bb").join(applet))?;
        }
    }
    write_exec(&stage.join("mesh/run-suite"), RUN_SUITE)?;
    let plan: String = contents
        .tests
        .iter()
        .map(|t| format!("{} {}\n", t.name, t.path.display()))
        .collect();
    fs::write(stage.join("mesh/plan"), plan)?;
    let args: String = contents.args.iter().map(|a| format!("{a}\n")).collect();
    fs::write(stage.join("mesh/args"), args)?;
    fs::write(
        stage.join("mesh/timeout"),
        contents.timeout_secs.to_string(),
    )?;
    fs::write(stage.join("mesh/budget"), contents.budget_secs.to_string())?;
    fs::write(stage.join("mesh/grace"), contents.grace_secs.to_string())?;
    fs::write(
        stage.join("mesh/cwd"),
        contents.repo.join("tests").to_string_lossy().as_bytes(),
    )?;

    let image = dir.join("disk.ext4");
    let bytes = du(&stage)?;
    let size_mib = bytes / (1 << 20) * 5 / 4 + 256;
    let _ = fs::remove_file(&image);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "meshvm",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&stage)
        .arg(&image)
        .arg(format!("{size_mib}M"))
        .output()
        .context("starting mkfs.ext4 (e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::remove_dir_all(&stage)?;
    eprintln!("==> vm: disk image {} ({size_mib} MiB)", image.display());
    Ok(image)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// Where `path` goes under `stage` (same absolute path).
fn staged(path: &Path, stage: &Path) -> PathBuf {
    stage.join(path.strip_prefix("/").unwrap_or(path))
}

/// Copies a file's content (following symlinks) to the same path under `stage`.
fn copy_file(path: &Path, stage: &Path) -> Result<()> {
    let dst = staged(path, stage);
    if dst.exists() {
        return Ok(());
    }
    fs::create_dir_all(dst.parent().unwrap())?;
    fs::copy(path, &dst).with_context(|| format!("copying {}", path.display()))?;
    Ok(())
}

/// Copies a binary without its debug sections (they are most of a debug build's size).
fn copy_stripped(path: &Path, stage: &Path) -> Result<()> {
    let dst = staged(path, stage);
    fs::create_dir_all(dst.parent().unwrap())?;
    let ok = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&dst)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        fs::copy(path, &dst).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(())
}

/// The shared libraries (and the dynamic loader) `elf` needs, from `ldd`.
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("starting ldd")?;
    if !out.status.success() {
        return Ok(Vec::new()); // static
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The repository's tracked files (config, test corpora), at the same path as on the host.
fn copy_repo(repo: &Path, stage: &Path) -> Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["ls-files", "-z"])
        .output()
        .context("starting git ls-files")?;
    if !out.status.success() {
        bail!("git ls-files failed in {}", repo.display());
    }
    for rel in out.stdout.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let rel = String::from_utf8_lossy(rel);
        let src = repo.join(rel.as_ref());
        if src.is_file() {
            copy_file(&src, stage)?;
        }
    }
    Ok(())
}

fn du(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += du(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}
