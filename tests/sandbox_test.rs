//! The sandbox (the README's main job) runs unattended and checks its own steps; running it twice
//! in a row works; interrupted with SIGINT it leaves no namespace, link, pinned map or process.
//! The fleet variant (`--fleet`: three nodes and three etcd members) runs unattended and leaves
//! nothing either.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("mt{pid}x")))
        .map(str::to_string)
        .collect()
}

fn processes_named(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(name) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs the sandbox with `args` to its end: its pid, whether it succeeded, stdout and stderr.
fn run_sandbox(args: &[&str]) -> (u32, bool, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-sandbox"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running mesh-sandbox");
    let pid = child.id();
    let out = child.wait_with_output().expect("mesh-sandbox output");
    (
        pid,
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sandbox_runs_twice_unattended() {
    for round in 1..=2 {
        let (pid, ok, stdout, stderr) = run_sandbox(&["--no-wait", "--requests", "1000"]);
        assert!(ok, "round {round} failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("Step 5/5"),
            "round {round} did not reach the last step:\n{stdout}"
        );
        assert!(stdout.contains("matched its rules"), "{stdout}");
        assert!(
            namespaces_of(pid).is_empty(),
            "round {round} left namespaces: {:?}",
            namespaces_of(pid)
        );
    }
}

#[test]
fn fleet_demo_runs_unattended() {
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-sandbox"))
        .args(["--fleet", "--no-wait", "--requests", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running mesh-sandbox --fleet");
    let pid = child.id();
    let out = child.wait_with_output().expect("mesh-sandbox output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fleet demo failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("Step 5/5"), "{stdout}");
    assert!(
        stdout.contains("matched its rules on every node"),
        "{stdout}"
    );
    for node in ["n1", "n2", "n3"] {
        assert!(
            stdout.contains(&format!("{node}  runs revision")),
            "no revision shown for {node}:\n{stdout}"
        );
    }
    assert!(
        namespaces_of(pid).is_empty(),
        "the fleet demo left namespaces: {:?}",
        namespaces_of(pid)
    );
    let left = processes_named(&format!("mt{pid}x"));
    assert!(left.is_empty(), "processes left (etcd, meshd?): {left:?}");
}

#[test]
fn sigint_leaves_nothing_behind() {
    interrupt_when(&["--requests", "100"], "stays up until Ctrl-C", true);
}

/// The fleet demo interrupted in the middle of its steps (the failure path: it exits non-zero
/// saying it was interrupted) leaves nothing behind either: no namespace, no etcd, no meshd.
#[test]
fn fleet_sigint_mid_step_leaves_nothing_behind() {
    interrupt_when(&["--fleet", "--requests", "60"], "Step 2/5", false);
}

/// Runs the sandbox with `args`, sends SIGINT once a stdout line contains `marker`, and checks
/// its exit (`clean`: success, else a failure that says it was interrupted) and that nothing of
/// it is left.
fn interrupt_when(args: &[&str], marker: &str, clean: bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-sandbox"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running mesh-sandbox");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut up = false;
    for line in lines.by_ref() {
        if line.expect("line").contains(marker) {
            up = true;
            break;
        }
        assert!(Instant::now() < deadline, "sandbox never came up");
    }
    assert!(up, "sandbox ended before staying up");
    assert!(
        !namespaces_of(pid).is_empty(),
        "the sandbox should have namespaces while up"
    );
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "sandbox ignored SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    for _ in lines {}
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr);
    if clean {
        assert!(
            status.success(),
            "sandbox exited with {status} after SIGINT"
        );
    } else {
        assert!(
            !status.success() && stderr.contains("interrupted"),
            "sandbox exited with {status} after SIGINT mid-step: {stderr}"
        );
    }
    assert!(
        namespaces_of(pid).is_empty(),
        "namespaces left: {:?}",
        namespaces_of(pid)
    );
    // Its meshd and Bookinfo processes ran with paths under this sandbox's rules directory.
    let marker = format!("mt{pid}x");
    let left: Vec<u32> = processes_named(&marker);
    assert!(left.is_empty(), "processes left: {left:?}");
    // Nothing pinned: the sandbox runs meshd with --no-pin, so no pin directory may exist.
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/{marker}0")).exists());
}
