//! The guest's initramfs: a static busybox, `/init` (see `init.sh`) and the kernel's modules the
//! suite needs, with their dependencies, decompressed and listed in load order. Written as a newc
//! archive with `cpio`; one per kernel under `target/vm/<kernel>/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::kernels::Kernel;

/// The guest's first process.
const INIT: &str = include_str!("init.sh");

/// Modules the guest loads (with their dependencies) when the kernel has them as modules:
/// devices (virtio PCI, disk, NICs), the test networks (veth, bridge), TC (ingress/clsact,
/// cls_bpf, actions), netfilter for the peers the tests compare with, and the root filesystem.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "ext4",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "act_gact",
    "act_mirred",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_ct",
    "nf_conntrack_netlink",
    "nfnetlink",
];

/// What the initramfs carries, for the log.
pub struct Built {
    pub path: PathBuf,
    /// Module names, in load order.
    pub loaded: Vec<String>,
    /// Wanted modules built into this kernel.
    pub builtin: Vec<String>,
    /// Wanted modules this kernel has neither as module nor built in.
    pub absent: Vec<String>,
}

/// Builds the initramfs for `kernel` in `dir`.
pub fn build(kernel: &Kernel, dir: &Path) -> Result<Built> {
    let stage = dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for d in ["bin", "proc", "sys", "dev", "newroot", "modules"] {
        fs::create_dir_all(stage.join(d))?;
    }
    let busybox = busybox()?;
    fs::copy(&busybox, stage.join("bin/busybox")).context("copying busybox")?;
    write_exec(&stage.join("init"), INIT)?;

    let mut built = Built {
        path: dir.join("initramfs.cpio"),
        loaded: Vec::new(),
        builtin: Vec::new(),
        absent: Vec::new(),
    };
    if let Some(modules) = &kernel.modules {
        let index = ModuleIndex::read(modules)?;
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for want in WANTED_MODULES {
            if index.deps.contains_key(*want) {
                index.visit(want, &mut seen, &mut order);
            } else if index.builtin.contains(*want) {
                built.builtin.push(want.to_string());
            } else {
                built.absent.push(want.to_string());
            }
        }
        let mut list = String::new();
        for name in &order {
            let src = modules.join(&index.paths[name]);
            let dst = stage.join("modules").join(format!("{name}.ko"));
            decompress(&src, &dst)?;
            list.push_str(&format!("{name}.ko\n"));
        }
        fs::write(stage.join("modules/order"), list)?;
        built.loaded = order;
    } else {
        fs::write(stage.join("modules/order"), "")?;
        built.builtin = WANTED_MODULES.iter().map(|s| s.to_string()).collect();
    }
    cpio(&stage, &built.path)?;
    Ok(built)
}

/// The static busybox from Debian's busybox-static.
fn busybox() -> Result<PathBuf> {
    let path = PathBuf::from("/bin/busybox");
    let out = Command::new("ldd").arg(&path).output();
    let dynamic = out.is_ok_and(|o| o.status.success());
    if !path.exists() || dynamic {
        bail!("/bin/busybox is missing or not static: install Debian's busybox-static (cargo xtask setup does)");
    }
    Ok(path)
}

/// `modules.dep` and `modules.builtin` of one kernel.
struct ModuleIndex {
    /// Module name -> relative path of its file.
    paths: BTreeMap<String, String>,
    /// Module name -> names of the modules it needs.
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn read(dir: &Path) -> Result<Self> {
        let dep = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("reading {}/modules.dep", dir.display()))?;
        let mut paths = BTreeMap::new();
        let mut deps = BTreeMap::new();
        for line in dep.lines() {
            let Some((module, needs)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(module);
            paths.insert(name.clone(), module.to_string());
            deps.insert(name, needs.split_whitespace().map(module_name).collect());
        }
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        Ok(Self {
            paths,
            deps,
            builtin,
        })
    }

    /// Depth-first: dependencies before the module.
    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        for dep in self.deps.get(name).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(name.to_string());
    }
}

/// `kernel/net/core/foo-bar.ko.xz` -> `foo_bar` (module names use underscores).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn decompress(src: &Path, dst: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        }
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(src)
                .output()
                .with_context(|| format!("starting {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", src.display());
            }
            fs::write(dst, out.stdout)?;
        }
    }
    Ok(())
}

pub(super) fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Archives `stage` (as `/`) into a newc cpio file, every file owned by root.
fn cpio(stage: &Path, out: &Path) -> Result<()> {
    let mut files = Vec::new();
    walk(stage, stage, &mut files)?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet", "-O"])
        .arg(out)
        .current_dir(stage)
        .stdin(Stdio::piped())
        .spawn()
        .context("starting cpio (Debian's cpio package)")?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(files.join("\n").as_bytes())?;
    if !child.wait()?.success() {
        bail!("cpio failed building {}", out.display());
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        out.push(path.strip_prefix(root)?.to_string_lossy().into_owned());
        if path.is_dir() && !path.is_symlink() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_from_paths() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko.xz"),
            "virtio_net"
        );
        assert_eq!(module_name("kernel/net/sched/act-bpf.ko"), "act_bpf");
    }
}
