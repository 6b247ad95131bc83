//! The process-wide trace hub: who is tracing what, and fan-out of events to them.
//!
//! Each `meshctl trace` is one [`Subscription`] (a bounded channel of NDJSON lines). The kernel
//! filter follows the subscribers: none, tracing off; one, its filter is pushed into the kernel
//! so unrelated packets never cost a ring-buffer event; several, the kernel reports everything
//! and each subscriber's filter is applied here. A slow reader loses events (counted), it never
//! slows the data path or the other readers.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{kernel, Kind, TraceEvent, TraceFilter};
use crate::compile::ServiceAddress;

/// Lines buffered per subscriber before events are dropped for it.
const SUBSCRIBER_BUFFER: usize = 4096;
/// A blank line goes to every subscriber this often, so a gone client is noticed.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// The hub of this process.
pub fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(Hub::default)
}

/// Subscribers, the kernel filter and the counters.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    /// True while someone traces: the proxy checks this before building an event.
    active: AtomicBool,
    /// Kernel events read from the ring buffer since start.
    kernel_events: AtomicU64,
    /// Proxy events reported since start.
    proxy_events: AtomicU64,
    /// Events a subscriber was too slow to take.
    dropped: AtomicU64,
    kernel: OnceLock<kernel::KernelFilter>,
}

struct Subscriber {
    id: u64,
    filter: TraceFilter,
    tx: mpsc::Sender<Bytes>,
}

/// One `meshctl trace`: its lines arrive on `lines`; dropping it ends the trace.
pub struct Subscription {
    id: u64,
    /// NDJSON lines (and blank heartbeat lines).
    pub lines: mpsc::Receiver<Bytes>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        hub().unsubscribe(self.id);
    }
}

/// Counters shown by `GET /v1/trace/stats`.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TraceStats {
    /// Active `meshctl trace` sessions.
    pub subscribers: u64,
    /// Kernel events read since meshd started.
    pub kernel_events: u64,
    /// Proxy request events since meshd started.
    pub proxy_events: u64,
    /// Events lost to slow readers.
    pub dropped: u64,
}

/// What the proxy decided for one request (built only while someone traces).
pub struct ProxyDecision<'a> {
    /// Service address the request came in on.
    pub service: &'a ServiceAddress,
    /// Service name.
    pub service_name: String,
    /// Client.
    pub client: std::net::SocketAddr,
    /// `GET host/path`.
    pub request: String,
    /// Route name.
    pub route: &'a str,
    /// Subset.
    pub subset: &'a str,
    /// Backend address (empty: local answer).
    pub backend: &'a str,
    /// Status.
    pub status: u16,
}

impl Hub {
    /// Starts a trace for `filter`.
    pub fn subscribe(&self, filter: TraceFilter) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.push(Subscriber { id, filter, tx });
        self.refilter(&subs);
        Subscription { id, lines: rx }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.id != id);
        self.refilter(&subs);
    }

    /// Pushes the filter the subscribers need into the kernel.
    fn refilter(&self, subs: &[Subscriber]) {
        self.active.store(!subs.is_empty(), Ordering::Relaxed);
        if let Some(kernel) = self.kernel.get() {
            let wanted = match subs {
                [] => None,
                [only] => Some(only.filter.clone()),
                _ => Some(TraceFilter::default()),
            };
            kernel.set(wanted.as_ref());
        }
    }

    /// Installs the kernel's filter map (once, at start).
    pub(crate) fn set_kernel_filter(&self, filter: kernel::KernelFilter) {
        if self.kernel.set(filter).is_ok() {
            let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            self.refilter(&subs);
        }
    }

    /// True while at least one trace runs.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts one kernel event read from the ring buffer.
    pub(crate) fn count_kernel_event(&self) {
        self.kernel_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends `event` to every subscriber whose filter selects it.
    pub fn publish(&self, event: &TraceEvent) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let line = Bytes::from(line);
        let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for sub in subs.iter().filter(|s| s.filter.matches(event)) {
            if sub.tx.try_send(line.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A blank line to everyone, so the admin server notices clients that went away.
    pub(crate) fn heartbeat(&self) {
        let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for sub in subs.iter() {
            let _ = sub.tx.try_send(Bytes::from_static(b"\n"));
        }
    }

    /// Reports one proxied request; `decision` runs only while someone traces.
    pub fn proxy(&self, decision: impl FnOnce() -> Option<TraceEvent>) {
        if !self.active() {
            return;
        }
        if let Some(event) = decision() {
            self.proxy_events.fetch_add(1, Ordering::Relaxed);
            self.publish(&event);
        }
    }

    /// Counters.
    pub fn stats(&self) -> TraceStats {
        TraceStats {
            subscribers: self
                .subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            kernel_events: self.kernel_events.load(Ordering::Relaxed),
            proxy_events: self.proxy_events.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl ProxyDecision<'_> {
    /// The event for this request.
    pub fn event(self) -> Option<TraceEvent> {
        let service_addr = std::net::SocketAddr::new(self.service.ip, self.service.port);
        Some(TraceEvent {
            at: super::kernel::epoch_now(),
            hook: "proxy".into(),
            kind: Kind::Request,
            flags: String::new(),
            client: self.client,
            service: self.service_name,
            service_addr,
            backend: self.backend.parse().ok(),
            subset: (!self.subset.is_empty()).then(|| self.subset.to_string()),
            version: None,
            slot: None,
            action: format!("HTTP {}", self.status),
            reason: None,
            interface: None,
            request: Some(self.request),
            route: Some(self.route.to_string()),
            status: Some(self.status),
        })
    }
}

/// Reports one proxied request to the hub (a relaxed atomic load when nobody traces).
pub fn proxy_request<'a>(decision: impl FnOnce() -> ProxyDecision<'a>) {
    hub().proxy(|| decision().event());
}
