//! Chaos helpers: meshd with pins and a state file, starts that must be refused, and pins of
//! the wrong shape made by hand with bpftool (what an older or newer meshd, or a stranger,
//! could have left in a pin directory).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    meshd::{bin, PinDir},
    netns::{sh, Netns},
    rules::{meshd_args, RulesDir},
    topology::Topology,
};

/// meshd arguments with pins under `pins` and the state file of [`state_file`], plus `extra`.
pub fn pinned_args(
    topo: &Topology,
    rules: &RulesDir,
    pins: &PinDir,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = meshd_args(topo, rules)
        .into_iter()
        .filter(|a| a != "--no-pin" && a != "--no-state")
        .collect();
    args.extend([
        "--pin-dir".into(),
        pins.0.display().to_string(),
        "--state-file".into(),
        state_file(rules).display().to_string(),
    ]);
    if !extra.contains(&"--maglev-pool-entries") {
        args.extend(["--maglev-pool-entries".into(), "65536".into()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The state file [`pinned_args`] gives meshd.
pub fn state_file(rules: &RulesDir) -> PathBuf {
    rules.0.join("state").join("state.yaml")
}

/// Runs meshd in `ns` expecting it to refuse to start; returns what it printed. Fails when it
/// starts (it is killed then) or exits successfully.
pub fn start_refused(ns: &Netns, args: &[String]) -> Result<String> {
    let mut child = ns
        .command(bin("meshd")?.to_str().context("utf-8 path")?)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshd")?;
    let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "meshd started although it should have refused:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.status.success(), "meshd exited successfully:\n{text}");
    Ok(text)
}

/// A pinned map's (type, key size, value size, max entries) as bpftool reports them.
pub fn pinned_shape(path: &Path) -> Result<(String, u64, u64, u64)> {
    let out = sh(
        "bpftool",
        &["-j", "map", "show", "pinned", &path.display().to_string()],
    )?;
    ensure!(
        out.status.success(),
        "bpftool map show {}: {out:?}",
        path.display()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| v[k].as_u64().with_context(|| format!("{k} in {v}"));
    Ok((
        v["type"].as_str().context("type")?.to_string(),
        num("bytes_key")?,
        num("bytes_value")?,
        num("max_entries")?,
    ))
}

/// Pins a new, empty map of the given shape at `path` (bpftool's type names).
pub fn pin_new_map(path: &Path, kind: &str, key: u64, value: u64, entries: u64) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("map name")?
        .chars()
        .take(15)
        .collect::<String>();
    let (key, value, entries) = (key.to_string(), value.to_string(), entries.to_string());
    let out = sh(
        "bpftool",
        &[
            "map",
            "create",
            &path.display().to_string(),
            "type",
            kind,
            "key",
            &key,
            "value",
            &value,
            "entries",
            &entries,
            "name",
            &name,
        ],
    )?;
    ensure!(
        out.status.success(),
        "bpftool map create {}: {out:?}",
        path.display()
    );
    Ok(())
}

/// Writes `value` at key 0 (4 bytes) of the array pinned at `path`.
pub fn write_first(path: &Path, value: &[u8]) -> Result<()> {
    let mut args: Vec<String> = ["map", "update", "pinned", &path.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["key", "hex", "00", "00", "00", "00", "value", "hex"].map(String::from));
    args.extend(value.iter().map(|b| format!("{b:02x}")));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sh("bpftool", &refs)?;
    ensure!(
        out.status.success(),
        "bpftool map update {}: {out:?}",
        path.display()
    );
    Ok(())
}
