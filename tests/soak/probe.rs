//! meshd's resources over time: open file descriptors (`/proc/PID/fd`) and resident memory
//! (`VmRSS` in `/proc/PID/status`), sampled every two seconds, per meshd process (each restart
//! is a new one).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

/// One sample.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the soak started.
    pub at: f64,
    pub pid: u32,
    pub fds: usize,
    pub rss_kib: u64,
}

/// The sampler: reads the process whose id is in `pid` (0: none, meshd is restarting).
pub struct Probe {
    pub pid: Arc<AtomicU32>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Reads one sample of `pid`, if it still runs.
pub fn sample(pid: u32, at: f64) -> Option<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(Sample {
        at,
        pid,
        fds,
        rss_kib,
    })
}

impl Probe {
    /// Starts sampling every two seconds.
    pub fn start(started: Instant) -> Probe {
        let pid = Arc::new(AtomicU32::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (pid.clone(), samples.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let current = p.load(Ordering::Relaxed);
                if current != 0 {
                    if let Some(x) = sample(current, started.elapsed().as_secs_f64()) {
                        s.lock().expect("lock").push(x);
                    }
                }
                thread::sleep(Duration::from_secs(2));
            }
        });
        Probe {
            pid,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the samples.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().expect("lock").clone()
    }
}

/// Per process: (pid, first sample, last sample, most fds, most RSS).
pub fn per_process(samples: &[Sample]) -> Vec<(u32, Sample, Sample, usize, u64)> {
    let mut out: Vec<(u32, Sample, Sample, usize, u64)> = Vec::new();
    for s in samples {
        match out.last_mut() {
            Some(last) if last.0 == s.pid => {
                last.2 = *s;
                last.3 = last.3.max(s.fds);
                last.4 = last.4.max(s.rss_kib);
            }
            _ => out.push((s.pid, *s, *s, s.fds, s.rss_kib)),
        }
    }
    out
}
