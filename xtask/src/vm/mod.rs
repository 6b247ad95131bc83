//! `cargo xtask vm-test`: mesh's integration test binaries, as root, inside qemu VMs booting the
//! kernels users run (Debian 12's 6.1 and 6.12 cloud kernels, and the host's own when its image is
//! readable), with two virtio-net NICs joined back to back so the kernel path also runs in native
//! XDP on a real NIC driver. Prints a kernel x test-binary matrix and writes it to
//! `target/vm/matrix.md` (and to `docs/kernels.md` for a full run).
//!
//! Pieces: [`kernels`] (fetch and unpack), [`initramfs`] (busybox, modules, `init.sh`), [`disk`]
//! (binaries, libraries, tools, `run-suite.sh` in an ext4 image), [`qemu`] (accelerator probe,
//! boot, deadline), [`report`] (parsing the results channel, the matrix).

mod disk;
mod initramfs;
mod kernels;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub use kernels::KernelChoice;
use report::{Column, Outcome};

/// Test binaries run by default, and why the others are not.
const DEFAULT_TESTS: &[&str] = &[
    "golden_packets",
    "l4_forwarding",
    "control_plane",
    "vm_nic",
    "container_host",
    "node_local",
    "trace",
    "l7_proxy",
    "shift",
];
/// What `cargo xtask test` runs in its VM step (golden packets, L4, control plane, the NIC pair
/// and the container-host tests): chosen to fit CI's time.
pub const CI_TESTS: &[&str] = &[
    "golden_packets",
    "vm_nic",
    "l4_forwarding",
    "control_plane",
    "container_host",
];
const NOT_IN_VMS: &[(&str, &str)] = &[
    (
        "bench_quick",
        "a benchmark: timings under emulation mean nothing",
    ),
    (
        "sandbox",
        "the demo; its namespaces and services are covered by l4_forwarding and l7_proxy",
    ),
];

/// In-guest limit per test binary, seconds.
const DEFAULT_TIMEOUT: u64 = 3600;

/// Guest time `cargo xtask test` gives the VM step to start binaries (CI runs everything in 90
/// minutes; the set-up and the rest of the suite take about 20): binaries not started by then are
/// skipped and say so, and one still running [`BUDGET_GRACE`] later is stopped.
const CI_BUDGET: u64 = 40 * 60;
/// How long past the budget a binary started within it may run.
const BUDGET_GRACE: u64 = 15 * 60;
/// Per binary in `cargo xtask test`'s VM step (each took 8 to 25 minutes under TCG on a loaded
/// 2-core machine).
const CI_TIMEOUT: u64 = 30 * 60;

/// Options of `cargo xtask vm-test`.
#[derive(clap::Args, Debug)]
pub struct VmTestArgs {
    /// Kernel(s) to boot.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: KernelChoice,
    /// Test binaries to run (comma-separated cargo target names); default: all but the benchmark
    /// and the demo.
    #[arg(long, value_delimiter = ',')]
    pub tests: Vec<String>,
    /// Seconds a test binary may take inside the guest before it is killed (emulation is slow;
    /// nothing asserts on time).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT)]
    pub timeout: u64,
    /// Seconds after the guest booted from which the test binaries not started yet are skipped
    /// (reported as skipped with this reason, not failed); one started before may run 15 minutes
    /// more, then it is stopped and its cell lists what passed until then. 0: no budget.
    #[arg(long, default_value_t = 0)]
    pub budget: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Also write the matrix to docs/kernels.md (default when every kernel runs without a filter).
    #[arg(long)]
    pub docs: bool,
    /// Arguments for every test binary, e.g. a test name filter.
    #[arg(last = true)]
    pub filter: Vec<String>,
}

impl VmTestArgs {
    /// `cargo xtask test`'s VM step: [`CI_TESTS`] on 6.1.
    pub fn ci(filter: Option<&str>) -> Self {
        Self {
            kernel: KernelChoice::V6_1,
            tests: CI_TESTS.iter().map(|s| s.to_string()).collect(),
            timeout: CI_TIMEOUT,
            budget: CI_BUDGET,
            memory: 2048,
            cpus: 2,
            docs: false,
            filter: filter.map(|f| vec![f.to_string()]).unwrap_or_default(),
        }
    }
}

/// Runs the VM suite; fails when any cell failed.
pub fn run(args: &VmTestArgs, repo: &Path) -> Result<()> {
    let target = repo.join("target");
    let vm_dir = target.join("vm");
    fs::create_dir_all(&vm_dir)?;
    let selected: Vec<String> = if args.tests.is_empty() {
        DEFAULT_TESTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.tests.clone()
    };

    crate::step("vm: building meshd, meshctl and the test binaries");
    crate::cargo(&["build", "-p", "mesh-user", "--bins"])?;
    let all_tests = test_binaries(repo)?;
    for name in &selected {
        if !all_tests.iter().any(|t| &t.name == name) && !is_optional(name) {
            bail!(
                "no test binary named {name}; there are: {}",
                names(&all_tests)
            );
        }
    }
    let mut to_run: Vec<disk::TestBinary> = all_tests
        .iter()
        .filter(|t| selected.contains(&t.name))
        .cloned()
        .collect();
    to_run.sort_by_key(|t| selected.iter().position(|s| *s == t.name));
    let programs: Vec<PathBuf> = [
        "meshd",
        "meshctl",
        "mesh-sandbox",
        "mesh-bookinfo",
        "mesh-bench",
    ]
    .iter()
    .map(|p| target.join("debug").join(p))
    .filter(|p| p.exists())
    .collect();

    let kernels_dir = vm_dir.join("kernels");
    let mut columns = Vec::new();
    let mut bootable = Vec::new();
    for choice in args.kernel.expand() {
        match kernels::resolve(choice, &kernels_dir)? {
            Ok(k) => bootable.push(k),
            Err(u) => columns.push((u.label, Err(u.reason))),
        }
    }

    crate::step("vm: writing the suite's disk image");
    let disk = disk::build(
        &vm_dir,
        &disk::Contents {
            repo,
            programs,
            tests: &to_run,
            args: &args.filter,
            timeout_secs: args.timeout,
            budget_secs: args.budget,
            grace_secs: BUDGET_GRACE,
        },
    )?;

    // Initramfs per kernel, the accelerator once, then all kernels boot at the same time (each
    // VM is mostly one busy emulation thread; the run takes as long as the slowest kernel).
    let mut prepared = Vec::new();
    for kernel in &bootable {
        let dir = vm_dir.join(kernel.label);
        fs::create_dir_all(&dir)?;
        let initrd = initramfs::build(kernel, &dir)?;
        if !initrd.absent.is_empty() {
            eprintln!(
                "    {}: not in this kernel: {}",
                kernel.label,
                initrd.absent.join(" ")
            );
        }
        prepared.push((kernel, dir, initrd));
    }
    let accel = prepared.first().map(|(kernel, _, initrd)| {
        crate::step("vm: probing KVM");
        qemu::probe_accel(&kernel.vmlinuz, &initrd.path, &vm_dir)
    });
    let mut booted = Vec::new();
    if let Some(accel) = &accel {
        let results: Vec<Result<qemu::Finished>> = std::thread::scope(|scope| {
            let handles: Vec<_> = prepared
                .iter()
                .map(|(kernel, dir, initrd)| {
                    crate::step(&format!(
                        "vm: booting {} ({}, {}) with {}; {} modules loaded, log in {}",
                        kernel.label,
                        kernel.release,
                        kernel.source,
                        accel.describe(),
                        initrd.loaded.len(),
                        dir.display()
                    ));
                    let disk = &disk;
                    let to_run = &to_run;
                    scope.spawn(move || {
                        let label = kernel.label;
                        let finished = qemu::Boot {
                            accel,
                            vmlinuz: &kernel.vmlinuz,
                            initramfs: &initrd.path,
                            disk,
                            dir,
                            deadline: Duration::from_secs(600 + args.timeout * to_run.len() as u64),
                            memory_mib: args.memory,
                            cpus: args.cpus,
                        }
                        .run(|line| progress(label, line, args.timeout))?;
                        append_results_to_console(&finished)?;
                        eprintln!(
                            "    {label}: VM finished after {} s{}",
                            finished.elapsed.as_secs(),
                            finished
                                .killed
                                .as_deref()
                                .map(|k| format!(" ({k})"))
                                .unwrap_or_default()
                        );
                        Ok(finished)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("VM thread panicked")))
                })
                .collect()
        });
        for ((kernel, _, _), finished) in prepared.iter().zip(results) {
            let finished = finished?;
            let outcomes: Vec<(String, Outcome)> = to_run
                .iter()
                .map(|t| {
                    let o = report::outcome(
                        &finished.results,
                        &t.name,
                        args.timeout,
                        finished.killed.as_deref(),
                    );
                    (t.name.clone(), o)
                })
                .collect();
            booted.push((*kernel, outcomes));
            columns.push((kernel.label, Ok(booted.len() - 1)));
        }
    }

    // Rows: every integration test binary, run or not (with why not).
    let mut rows: Vec<String> = all_tests.iter().map(|t| t.name.clone()).collect();
    rows.sort_by_key(|r| {
        DEFAULT_TESTS
            .iter()
            .position(|d| d == r)
            .unwrap_or(usize::MAX)
    });
    let mut cols = Vec::new();
    for (label, col) in &columns {
        let (about, outcomes): (String, Vec<Outcome>) = match col {
            Err(reason) => (
                format!("not booted: {reason}"),
                rows.iter()
                    .map(|_| Outcome::Skipped(format!("kernel not available ({reason})")))
                    .collect(),
            ),
            Ok(i) => {
                let (kernel, outcomes) = &booted[*i];
                (
                    format!("{} ({})", kernel.release, kernel.source),
                    rows.iter()
                        .map(|r| {
                            outcomes
                                .iter()
                                .find(|(n, _)| n == r)
                                .map(|(_, o)| o.clone())
                                .unwrap_or_else(|| Outcome::Skipped(not_selected(r)))
                        })
                        .collect(),
                )
            }
        };
        cols.push(Column {
            label: label.to_string(),
            about,
            outcomes,
        });
    }
    let accel_text = accel
        .as_ref()
        .map(|a| a.describe())
        .unwrap_or_else(|| "none (no kernel booted)".into());
    let doc = document(&cols, &rows, &accel_text, args);
    print!("\n{}", report::table(&rows, &cols));
    let matrix = vm_dir.join("matrix.md");
    fs::write(&matrix, &doc)?;
    eprintln!("==> vm: matrix written to {}", matrix.display());
    let full = args.kernel == KernelChoice::All && args.filter.is_empty() && args.tests.is_empty();
    if args.docs || full {
        fs::write(repo.join("docs/kernels.md"), &doc)?;
        eprintln!("==> vm: matrix written to docs/kernels.md");
    }
    let failures: usize = cols
        .iter()
        .flat_map(|c| &c.outcomes)
        .filter(|o| o.is_failure())
        .count();
    if failures > 0 {
        bail!(
            "{failures} test binaries failed in VMs (logs under {})",
            vm_dir.display()
        );
    }
    if booted.is_empty() {
        bail!("no kernel could be booted");
    }
    Ok(())
}

fn is_optional(name: &str) -> bool {
    // Named in the defaults before they exist: not an error to ask for them.
    ["container_host", "node_local", "vm_nic", "trace"].contains(&name)
}

fn not_selected(name: &str) -> String {
    NOT_IN_VMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| format!("not run in VMs ({why})"))
        .unwrap_or_else(|| "not selected in this run".into())
}

fn names(tests: &[disk::TestBinary]) -> String {
    tests
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line of progress per results marker.
fn progress(label: &str, line: &str, timeout: u64) {
    let Some(rest) = line.strip_prefix("MESH-VM: ") else {
        return;
    };
    if let Some(name) = rest.strip_prefix("BEGIN ") {
        eprintln!("    {label}: running {name} (in-guest limit {timeout} s)");
    } else if let Some(end) = rest.strip_prefix("END ") {
        eprintln!("    {label}: finished {end}");
    } else {
        eprintln!("    {label}: {rest}");
    }
}

/// Keeps one log per kernel with both channels: the console, then the results.
fn append_results_to_console(f: &qemu::Finished) -> Result<()> {
    use std::io::Write;
    let mut log = fs::OpenOptions::new().append(true).open(&f.console_log)?;
    writeln!(log, "\n===== results channel (ttyS1) =====")?;
    log.write_all(f.results.as_bytes())?;
    Ok(())
}

/// The integration test executables, built by `cargo test --no-run`.
fn test_binaries(repo: &Path) -> Result<Vec<disk::TestBinary>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(repo)
        .args([
            "test",
            "-p",
            "mesh-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
        ) {
            tests.push(disk::TestBinary {
                name: name.to_string(),
                path: PathBuf::from(exe),
            });
        }
    }
    Ok(tests)
}

/// docs/kernels.md: the matrix with what produced it.
fn document(cols: &[Column], rows: &[String], accel: &str, args: &VmTestArgs) -> String {
    let mut cmd = format!("cargo xtask vm-test --kernel {}", args.kernel.label());
    if !args.tests.is_empty() {
        cmd.push_str(&format!(" --tests {}", args.tests.join(",")));
    }
    if args.timeout != DEFAULT_TIMEOUT {
        cmd.push_str(&format!(" --timeout {}", args.timeout));
    }
    if !args.filter.is_empty() {
        cmd.push_str(&format!(" -- {}", args.filter.join(" ")));
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut s = String::from("# Kernels mesh is tested on\n\n");
    s.push_str(&format!(
        "Written by `{cmd}` on {date} (host kernel {}, accelerator: {accel}). Each cell comes from \
         the test runner's own summary inside the guest: `passed` means libtest reported N passed \
         and 0 failed and the binary exited 0. Logs: `target/vm/<kernel>/console.log`.\n\n",
        host.trim()
    ));
    s.push_str("Kernels:\n\n");
    for c in cols {
        s.push_str(&format!("- **{}**: {}\n", c.label, c.about));
    }
    s.push('\n');
    s.push_str(&report::table(rows, cols));
    s.push_str(
        "\nThe guest boots an initramfs (busybox and the kernel's own modules) and mounts an ext4 \
         image holding the test binaries, meshd, meshctl, their libraries and the tools they call \
         (no 9p: Debian's cloud kernels lack it). It has two virtio-net NICs joined back to back \
         by a qemu socket netdev on 127.0.0.1; `vm_nic` puts one in a client namespace and one \
         in the node namespace, so the kernel path runs in native XDP on `virtio_net`.\n",
    );
    s
}
