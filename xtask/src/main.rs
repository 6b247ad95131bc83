//! Project automation, run as `cargo xtask <command>`.
//!
//! Every command installs what it needs first (see [`toolchain`]), so the README's two commands
//! work on a fresh machine.

mod fuzz;
mod toolchain;
mod vm;

use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and demo mesh",
    long_about = "Build, test and demo mesh.\n\nEvery command first installs what is missing \
                  (Debian's rustc-web with the BPF core library, LLVM 22, bpf-linker, iproute2, \
                  ethtool); that needs root. Tests and the demo create network namespaces and \
                  attach XDP programs, which also need root."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the BPF toolchain and test tools when missing (idempotent).
    Setup,
    /// Build meshd and meshctl (release) with the embedded kernel programs.
    Build,
    /// Run the whole test suite: format, lints, unit tests, golden packets, namespace tests, demo,
    /// then the VM step (the kernel-path tests in a qemu VM on Debian 12's 6.1 kernel).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only run tests whose name contains this filter (passed to cargo test).
        filter: Option<String>,
        /// Skip the VM step (golden packets, L4, control-plane, container-host and virtio-net
        /// tests inside a qemu VM on Debian 12's 6.1 kernel, within a time budget; also
        /// `MESH_TEST_VM=0`).
        #[arg(long)]
        no_vm: bool,
    },
    /// Run the integration tests as root inside qemu VMs on Debian 12's 6.1 and 6.12 kernels and
    /// the host's kernel, with a real NIC driver (virtio-net); prints a kernel x test matrix.
    #[command(
        long_about = "Run mesh's integration test binaries as root inside qemu VMs booting the kernels \
                      users run: Debian 12's 6.1 and 6.12 cloud kernels (fetched with apt-get download \
                      into target/vm/kernels, never installed) and the host's own kernel when its image \
                      is readable. KVM when it works, TCG otherwise (said in the output). Each guest has \
                      two virtio-net NICs joined back to back, for native XDP on a real driver.\n\n\
                      Prints a matrix (kernel x test binary: passed/failed/skipped with reason), writes \
                      it to target/vm/matrix.md and, for a full run (--kernel all, no filter), to \
                      docs/kernels.md. Logs: target/vm/<kernel>/console.log.\n\n\
                      Examples:\n  cargo xtask vm-test --kernel 6.1\n  \
                      cargo xtask vm-test --kernel 6.12 --tests golden_packets -- ipv6"
    )]
    VmTest(vm::VmTestArgs),
    /// Format and lint checks only (cargo fmt --check, clippy -D warnings).
    Lint,
    /// Run the sandbox: namespaces, meshd, backends, and the traffic split live.
    Demo {
        /// Three nodes sharing the rules through a three-member etcd cluster: each step applied on
        /// one node, then every node's revision and observed split.
        #[arg(long)]
        fleet: bool,
        /// Arguments for the sandbox (see `cargo xtask demo -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the config YAML path, the admin API and the packet pipeline for longer than `test`
    /// does; failing inputs are saved into tests/fuzz-corpus/.
    #[command(
        long_about = "Fuzz mesh for longer than `cargo xtask test` does (there each target runs a few \
                      hundred cases). Three targets, proptest harnesses in tests/fuzz_*.rs:\n  \
                      config   Istio YAML (mutated config/ examples and bad inputs) through parse, \
                      validate and compile: no panic, precise errors, accepted rules compile and \
                      round-trip\n  \
                      admin    raw HTTP requests to a real meshd's admin socket: well-formed answers, \
                      meshd stays responsive, a rejected apply changes nothing\n  \
                      packets  damaged frames through the XDP and TC programs (BPF_PROG_TEST_RUN): \
                      only service or tracked-flow frames are translated, checksums stay valid\n\n\
                      Each target first replays its corpus (tests/fuzz-corpus/<target>/: seeds and \
                      regressions), then generates inputs for --seconds. A failing input is shrunk \
                      and saved as tests/fuzz-corpus/<target>/regression-<hash>, so every later \
                      `cargo xtask test` replays it; commit it with the fix. Prints cases run and \
                      failures per target; exits non-zero when something failed.\n\n\
                      Examples:\n  cargo xtask fuzz --seconds 30\n  \
                      cargo xtask fuzz --target packets --seconds 600\n  \
                      MESH_FUZZ_SEED=1234 cargo xtask fuzz --target config   (replay one generator seed)"
    )]
    Fuzz(fuzz::FuzzArgs),
    /// Soak: mixed L4/L7 load against a real meshd with rule changes every second, a restart
    /// every minute and a flood; writes docs/reliability.md from the figures.
    #[command(
        long_about = "Soak mesh: a real meshd in network namespaces under mixed load for --minutes: \
                      new TCP connections through the kernel path (connect, identity, echo), HTTP \
                      requests through meshd's proxy, long-lived connections echoing every two \
                      seconds; the weights of both services shift every second (meshctl apply) and \
                      meshd restarts once a minute on the same pins and state file. Then a flood \
                      phase: established connections, spoofed SYN/ACK/UDP floods overflowing the \
                      connection table, weight changes; every established connection must still \
                      echo.\n\n\
                      Before the load, every fuzz target runs for --fuzz-seconds (as `cargo xtask \
                      fuzz`), so the report also says how many bad inputs were tried.\n\n\
                      Reports requests, errors by kind (and whether during a restart), restarts \
                      (time to ready, rules kept), meshd's open fds and RSS over time, the flood \
                      figures and the fuzz counts, and writes them to target/soak/report.md and \
                      docs/reliability.md: that file is only ever produced by this command.\n\n\
                      Examples:\n  cargo xtask soak --minutes 3\n  \
                      cargo xtask soak --minutes 60 --fuzz-seconds 300"
    )]
    Soak {
        /// Minutes of mixed load (meshd restarts once a minute).
        #[arg(long, default_value_t = 3)]
        minutes: u64,
        /// Seconds per fuzz target before the load (0: skip; the report then says "not run").
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
        /// Write the report to target/soak/report.md only, not docs/reliability.md.
        #[arg(long)]
        no_docs: bool,
    },
    /// Run the benchmark suite; the report goes to target/bench/ (and docs/benchmarks.md in full
    /// mode).
    Bench {
        /// Small counts, done in well under a minute (a smoke run; numbers not to quote).
        #[arg(long)]
        quick: bool,
        /// Run one section only (`l7`: the L7 proxies; prints one line per ratio). The report
        /// goes to target/bench/ only.
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
        /// More arguments for the benchmark (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => toolchain::ensure(),
        Cmd::Build => {
            toolchain::ensure()?;
            cargo(&["build", "--release", "-p", "mesh-user", "--bins"])
        }
        Cmd::Lint => {
            toolchain::ensure()?;
            lint()
        }
        Cmd::VmTest(args) => {
            toolchain::ensure()?;
            require_root("the guests' tests create namespaces and load BPF programs as root")?;
            vm::run(&args, &repo_root())
        }
        Cmd::Test {
            no_lint,
            filter,
            no_vm,
        } => {
            toolchain::ensure()?;
            require_root("the tests create network namespaces and load BPF programs")?;
            if !no_lint {
                lint()?;
            }
            step("building meshd and meshctl");
            cargo(&["build", "-p", "mesh-user", "--bins"])?;
            step("running the tests");
            let mut args = vec!["test", "--workspace"];
            if let Some(f) = filter.as_deref() {
                args.push(f);
            }
            cargo(&args)?;
            let vm_off = std::env::var("MESH_TEST_VM").is_ok_and(|v| v == "0" || v == "false");
            vm_step(!no_vm && !vm_off, filter.as_deref())?;
            eprintln!("==> all tests passed");
            Ok(())
        }
        Cmd::Demo { fleet, args } => {
            toolchain::ensure()?;
            require_root("the sandbox creates network namespaces and attaches XDP programs")?;
            step("building meshd, meshctl, the sandbox and the Bookinfo services (release)");
            cargo(&["build", "--release", "-p", "mesh-user", "--bins"])?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "mesh-tests",
                "--bin",
                "mesh-sandbox",
                "--bin",
                "mesh-bookinfo",
            ])?;
            let mut cmd = Command::new("target/release/mesh-sandbox");
            cmd.args(fleet.then_some("--fleet")).args(&args);
            cmd.env("MESH_BIN_DIR", "target/release");
            run(&mut cmd)
        }
        Cmd::Fuzz(args) => {
            toolchain::ensure()?;
            require_root("the packet and admin targets load BPF programs and start meshd")?;
            step("building meshd and meshctl (the admin target runs a real meshd)");
            cargo(&["build", "-p", "mesh-user", "--bins"])?;
            fuzz::run(&args, &repo_root())
        }
        Cmd::Soak {
            minutes,
            fuzz_seconds,
            no_docs,
        } => {
            toolchain::ensure()?;
            require_root("the soak creates network namespaces and runs meshd")?;
            step("building meshd, meshctl and the soak");
            cargo(&["build", "-p", "mesh-user", "--bins"])?;
            cargo(&["build", "-p", "mesh-tests", "--bin", "mesh-soak"])?;
            let root = repo_root();
            let _ = std::fs::remove_dir_all(root.join("target/fuzz"));
            if fuzz_seconds > 0 {
                let args = fuzz::FuzzArgs {
                    target: None,
                    seconds: fuzz_seconds,
                    no_save: false,
                };
                // Failures are in the report; the soak still runs.
                if let Err(e) = fuzz::run(&args, &root) {
                    eprintln!("==> fuzzing: {e:#}");
                }
            }
            step(&format!("soaking for {minutes} minutes"));
            let mut cmd = Command::new(root.join("target/debug/mesh-soak"));
            cmd.args(["--minutes", &minutes.to_string()])
                .arg("--out")
                .arg(root.join("target/soak"))
                .env("MESH_BIN_DIR", root.join("target/debug"));
            if !no_docs {
                cmd.arg("--docs").arg(root.join("docs/reliability.md"));
            }
            run(&mut cmd)
        }
        Cmd::Bench { quick, only, args } => {
            toolchain::ensure()?;
            require_root("the benchmark creates network namespaces and attaches XDP programs")?;
            step("building meshd, meshctl and the benchmark (release)");
            cargo(&["build", "--release", "-p", "mesh-user", "--bins"])?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "mesh-tests",
                "--bin",
                "mesh-bench",
            ])?;
            let mut cmd = Command::new("target/release/mesh-bench");
            if quick {
                cmd.arg("--quick");
            }
            if let Some(section) = &only {
                cmd.args(["--only", section]);
            } else if !quick {
                cmd.args(["--docs", "docs/benchmarks.md"]);
            }
            cmd.args(&args).env("MESH_BIN_DIR", "target/release");
            run(&mut cmd)
        }
    }
}

/// The VM part of `cargo xtask test`: the CI subset on Debian 12's 6.1 kernel.
fn vm_step(enabled: bool, filter: Option<&str>) -> Result<()> {
    if !enabled {
        eprintln!("==> VM step skipped (--no-vm / MESH_TEST_VM=0); cargo xtask vm-test runs it");
        return Ok(());
    }
    step("running the VM suite on Debian 12's 6.1 kernel (cargo xtask vm-test --kernel 6.1)");
    let args = vm::VmTestArgs::ci(filter);
    vm::run(&args, &repo_root())
}

/// The workspace root (xtask lives one level below it).
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn lint() -> Result<()> {
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    let mut fmt_ebpf = Command::new("cargo");
    fmt_ebpf
        .args(["fmt", "--check", "--manifest-path", "mesh-ebpf/Cargo.toml"])
        .env_remove("RUSTUP_TOOLCHAIN");
    run(&mut fmt_ebpf).context("cargo fmt --check (mesh-ebpf)")?;
    step("cargo clippy --all-targets -- -D warnings");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

fn require_root(why: &str) -> Result<()> {
    if !toolchain::is_root() {
        bail!("this needs root: {why}; run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args);
    run(&mut cmd)
}

/// Runs a command with inherited output (so progress shows) and fails on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status: ExitStatus = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
