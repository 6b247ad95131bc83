//! Booting one kernel in qemu: the accelerator probe (KVM when it really works, TCG otherwise),
//! the machine (the suite's disk, two virtio-net NICs joined back to back by a socket netdev on
//! 127.0.0.1, two serial ports: console log and results), and watching the run with a deadline.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// The accelerator the VMs run with.
#[derive(Clone, Debug)]
pub enum Accel {
    Kvm,
    /// Software emulation, with why KVM was not used.
    Tcg(String),
}

impl Accel {
    fn args(&self) -> Vec<&'static str> {
        match self {
            Accel::Kvm => vec!["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg(_) => vec!["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Accel::Kvm => "KVM".to_string(),
            Accel::Tcg(why) => format!("TCG (software emulation; {why})"),
        }
    }
}

const QEMU: &str = "qemu-system-x86_64";
/// MAC addresses of the two back-to-back NICs; the guest's run script finds them by these.
const NIC_MACS: [&str; 2] = ["52:54:00:12:34:01", "52:54:00:12:34:02"];

/// Boots `vmlinuz` with `mesh.probe` under KVM and reports whether it reached the initramfs.
pub fn probe_accel(vmlinuz: &Path, initramfs: &Path, dir: &Path) -> Accel {
    if std::env::var_os("MESH_VM_TCG").is_some() {
        return Accel::Tcg("MESH_VM_TCG is set".into());
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Accel::Tcg(format!("/dev/kvm: {e}"));
    }
    let log = dir.join("kvm-probe.log");
    let mut cmd = Command::new(QEMU);
    cmd.args(Accel::Kvm.args())
        .args([
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 mesh.probe"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let Ok(mut child) = cmd.spawn() else {
        return Accel::Tcg(format!("{QEMU} did not start"));
    };
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let console = fs::read_to_string(&log).unwrap_or_default();
    if console.contains("MESH-VM-PROBE-OK") {
        return Accel::Kvm;
    }
    match status {
        None => Accel::Tcg("a KVM test boot did not finish within 60 s".into()),
        Some(s) => Accel::Tcg(format!("a KVM test boot failed ({s})")),
    }
}

/// One boot of the suite.
pub struct Boot<'a> {
    pub accel: &'a Accel,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub disk: &'a Path,
    /// Directory for this kernel's logs.
    pub dir: &'a Path,
    /// The VM is killed after this long.
    pub deadline: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
}

/// What a boot left behind.
pub struct Finished {
    /// The results channel (second serial port), complete.
    pub results: String,
    pub console_log: PathBuf,
    /// Set when the host had to kill the VM.
    pub killed: Option<String>,
    pub elapsed: Duration,
}

impl Boot<'_> {
    /// Runs the VM to the end; `on_line` sees every results line as it arrives.
    pub fn run(&self, mut on_line: impl FnMut(&str)) -> Result<Finished> {
        fs::create_dir_all(self.dir)?;
        let console_log = self.dir.join("console.log");
        let results_log = self.dir.join("results.log");
        let qemu_log = self.dir.join("qemu.log");
        for f in [&console_log, &results_log] {
            fs::write(f, "")?;
        }
        let port = free_port()?;
        let mut cmd = Command::new(QEMU);
        cmd.args(self.accel.args())
            .args([
                "-m",
                &self.memory_mib.to_string(),
                "-smp",
                &self.cpus.to_string(),
            ])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .arg("-kernel")
            .arg(self.vmlinuz)
            .arg("-initrd")
            .arg(self.initramfs)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=5 net.ifnames=0"])
            .arg("-serial")
            .arg(format!("file:{}", console_log.display()))
            .arg("-serial")
            .arg(format!("file:{}", results_log.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,snapshot=on",
                self.disk.display()
            ))
            // Two NICs, back to back over TCP on loopback: frames leave one virtio-net device
            // and arrive at the other, through the guest's real virtio_net driver.
            .arg("-netdev")
            .arg(format!("socket,id=nic0,listen=127.0.0.1:{port}"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=nic0,mac={}", NIC_MACS[0]))
            .arg("-netdev")
            .arg(format!("socket,id=nic1,connect=127.0.0.1:{port}"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=nic1,mac={}", NIC_MACS[1]))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&qemu_log)?)
            .stderr(fs::File::create(self.dir.join("qemu.stderr"))?);
        fs::write(self.dir.join("qemu.cmdline"), format!("{cmd:?}\n"))?;
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {QEMU}"))?;
        let mut reader = LineTail::new(&results_log);
        let killed = loop {
            reader.poll(&mut on_line)?;
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let stderr =
                        fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default();
                    if !stderr.trim().is_empty() {
                        eprintln!("==> vm: qemu: {}", stderr.trim());
                    }
                }
                break None;
            }
            if started.elapsed() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Some(format!(
                    "the VM was killed after {} s (host deadline)",
                    self.deadline.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(500));
        };
        reader.poll(&mut on_line)?;
        reader.finish(&mut on_line);
        Ok(Finished {
            results: fs::read_to_string(&results_log).unwrap_or_default(),
            console_log,
            killed,
            elapsed: started.elapsed(),
        })
    }
}

/// A free TCP port on 127.0.0.1 for the NIC pair's socket netdev.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Follows a growing file line by line.
struct LineTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LineTail {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
        }
    }

    fn poll(&mut self, on_line: &mut impl FnMut(&str)) -> Result<()> {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Ok(());
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            on_line(line.trim_end_matches(['\r', '\n']));
        }
        Ok(())
    }

    fn finish(&mut self, on_line: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() {
            on_line(&std::mem::take(&mut self.partial));
        }
    }
}
