// Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` and hands the object's path
// to the crate as `MESH_EBPF_OBJECT`, so `meshd` embeds the programs it loads.
//
// The BPF target needs Debian's rustc (which ships a prebuilt `core` for it) and bpf-linker;
// `cargo xtask setup` installs both. The nested cargo runs with a clean environment so the
// host build's flags never leak into the BPF build.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("workspace root")?
        .to_path_buf(); // both users sit one level below the root
    let ebpf_dir = root.join("mesh-ebpf");
    for watched in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-ebpf/Cargo.lock",
        "mesh-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=MESH_BPF_CARGO");
    println!("cargo:rerun-if-env-changed=MESH_BPF_RUSTC");

    let bpf_cargo = env::var("MESH_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let bpf_rustc = env::var("MESH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    if !PathBuf::from(&bpf_cargo).exists() || !PathBuf::from(&bpf_rustc).exists() {
        bail!(
            "the BPF toolchain is missing ({bpf_cargo}, {bpf_rustc}); run `cargo xtask setup` \
             (installs Debian's rustc-web with the bpfel core library and bpf-linker)"
        );
    }
    let target_dir = ebpf_dir.join("target");
    let home = env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = format!("{home}/.cargo/bin:{}", env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(&bpf_cargo);
    cmd.env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("RUSTC", &bpf_rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ]);
    if let Ok(cargo_home) = env::var("CARGO_HOME") {
        cmd.env("CARGO_HOME", cargo_home);
    }
    let output = cmd.output().context("running the BPF build")?;
    if !output.status.success() {
        bail!(
            "building mesh-ebpf failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/mesh");
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
    Ok(())
}
