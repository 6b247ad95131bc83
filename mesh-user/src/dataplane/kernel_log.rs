//! Kernel debug logging for developers (`meshd --kernel-log LEVEL`): the level the programs are
//! loaded with, and a reader that drains aya-log's ring buffer into meshd's log.
//!
//! The kernel checks aya-log's `.rodata` level, so with logging off (the default) the verifier
//! removes every log point and the ring buffer stays empty. Records arrive through aya-log's
//! `log` interface and are re-emitted as `tracing` events with the target `kernel`, which
//! [`init_logging`](crate::daemon::init_logging) always lets through: the kernel already
//! filtered by level.

use std::os::fd::AsRawFd;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tracing::{debug, error, info, trace, warn};

/// aya-log's level global in the kernel object.
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// The `tracing` target kernel records are logged under.
pub const TARGET: &str = "kernel";

/// How much the kernel programs log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum KernelLogLevel {
    /// Nothing (the log points are removed by the verifier).
    #[default]
    Off,
    /// Table inconsistencies (packets dropped).
    Error,
    /// As error (no log point at this level yet).
    Warn,
    /// As error (no log point at this level yet).
    Info,
    /// Also refused connections and connection-table repairs.
    Debug,
    /// Everything (as debug: no log point at this level yet).
    Trace,
}

impl KernelLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` (its `Level` numbering: 1 error .. 5 trace).
    pub fn global(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Error => aya_log::Level::Error as u8,
            KernelLogLevel::Warn => aya_log::Level::Warn as u8,
            KernelLogLevel::Info => aya_log::Level::Info as u8,
            KernelLogLevel::Debug => aya_log::Level::Debug as u8,
            KernelLogLevel::Trace => aya_log::Level::Trace as u8,
        }
    }
}

/// Forwards aya-log's records to `tracing` under [`TARGET`].
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let module = record.module_path().unwrap_or("mesh");
        let line = record.line().unwrap_or(0);
        let message = record.args();
        match record.level() {
            log::Level::Error => error!(target: TARGET, %module, line, "{message}"),
            log::Level::Warn => warn!(target: TARGET, %module, line, "{message}"),
            log::Level::Info => info!(target: TARGET, %module, line, "{message}"),
            log::Level::Debug => debug!(target: TARGET, %module, line, "{message}"),
            log::Level::Trace => trace!(target: TARGET, %module, line, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Starts draining the kernel log of `ebpf` into meshd's log, when `level` is not off.
///
/// A log ring that cannot be opened is reported and meshd runs on without kernel logs.
pub fn start(ebpf: &mut Ebpf, level: KernelLogLevel) {
    if level == KernelLogLevel::Off {
        return;
    }
    let mut logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(logger) => logger,
        Err(e) => {
            warn!("--kernel-log {level:?}: the kernel log ring cannot be read ({e}); running without kernel logs");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || loop {
            let mut pfd = libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    warn!("kernel log ring poll: {err}; kernel logs stop");
                    return;
                }
            }
            logger.flush();
        });
    match spawned {
        Ok(_) => info!("kernel log at {level:?} level: records appear with target `{TARGET}`"),
        Err(e) => {
            warn!("--kernel-log: starting the reader thread: {e}; running without kernel logs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_aya_logs_numbering() {
        assert_eq!(KernelLogLevel::Off.global(), 0);
        assert_eq!(KernelLogLevel::Error.global(), 1);
        assert_eq!(KernelLogLevel::Debug.global(), 4);
        assert_eq!(KernelLogLevel::Trace.global(), 5);
        assert_eq!(KernelLogLevel::default(), KernelLogLevel::Off);
    }
}
