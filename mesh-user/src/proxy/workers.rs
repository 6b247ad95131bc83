//! The proxy's worker model, nginx-style: `N` threads, each running its own current-thread
//! tokio runtime (optionally pinned to one CPU). Every worker has its own listening socket per
//! service address (`SO_REUSEPORT`: the kernel spreads new connections over the workers) and
//! its own upstream connection pools, so a request is accepted, routed, forwarded and answered
//! on one thread: no lock is contended and no task is woken across threads on the request path.
//!
//! The route table, counters and cluster limits are shared (atomics and an `ArcSwap` read).

use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// How many proxy workers, and whether to pin them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Worker threads (at least 1).
    pub count: usize,
    /// Pin worker `i` to the `i`-th CPU meshd may use (round robin when there are more
    /// workers than CPUs).
    pub pin: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            count: available_cpus().len().max(1),
            pin: false,
        }
    }
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity(0) reads the calling thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: as above; sched_setaffinity(0) changes the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, "could not pin a proxy worker");
        }
    }
}

/// Running workers; stopped (threads joined) on drop.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `options.count` workers.
    pub fn start(options: WorkerOptions) -> std::io::Result<Self> {
        let cpus = available_cpus();
        let mut workers = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..options.count.max(1) {
            let cpu = options.pin.then(|| cpus[i % cpus.len().max(1)]);
            let (ready, handle) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other("proxy worker thread died"))??;
            workers.handles.push(handle);
            workers.stops.push(stop);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The workers' runtimes, by worker index.
    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true (at least one worker runs).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_run_tasks_on_their_own_threads() {
        let workers = Workers::start(WorkerOptions {
            count: 2,
            pin: true,
        })
        .unwrap();
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    let _ = tx.send(std::thread::current().name().unwrap_or("").to_string());
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(names, ["proxy-0", "proxy-1"]);
    }
}
