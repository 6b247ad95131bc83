//! The sandbox (the README's main job) runs unattended and checks its own splits; running it
//! twice in a row must work, and it must leave nothing behind.

use std::process::Command;

fn run_sandbox() -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-sandbox"))
        .args(["--no-wait", "--connections", "1000"])
        .output()
        .expect("running mesh-sandbox")
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn sandbox_runs_twice_and_cleans_up() {
    for round in 1..=2 {
        let out = run_sandbox();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "round {round} failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("Step 4/4"),
            "round {round} did not reach the last step:\n{stdout}"
        );
        assert!(stdout.contains("matched its rules"), "{stdout}");
    }
    // The sandbox process is gone, so none of its namespaces may remain.
    let left: Vec<String> = namespaces()
        .lines()
        .filter(|l| l.contains("-sandbox") || l.contains("-node"))
        .filter(|l| !l.starts_with(&format!("mt{}x", std::process::id())))
        .map(str::to_string)
        .collect();
    assert!(
        left.iter().all(|l| !is_dead_run(l)),
        "leftover namespaces: {left:?}"
    );
}

/// True for a namespace of a finished run (its pid no longer exists).
fn is_dead_run(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("mt") else {
        return false;
    };
    let Some((pid, _)) = rest.split_once('x') else {
        return false;
    };
    pid.parse::<u32>()
        .map(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .unwrap_or(false)
}
