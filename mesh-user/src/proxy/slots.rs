//! A cluster's circuit breaker on requests: at most `limit` in flight (`maxConnections`, as
//! Envoy counts it for HTTP) and at most `max_pending` waiting for one
//! (`http1MaxPendingRequests`); beyond that the request overflows (503).
//!
//! The common case (a slot is free) is one compare-and-swap to take it and one subtraction
//! to give it back: no lock and no `Arc` count, so the workers do not contend for a mutex on
//! every request as they would with a semaphore. Waiters park on a [`Notify`] that a release
//! only touches when someone waits.

use std::{
    pin::pin,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use tokio::sync::Notify;

/// Slots of one cluster.
#[derive(Debug)]
pub struct Slots {
    in_use: AtomicUsize,
    limit: usize,
    pending: AtomicU32,
    max_pending: u32,
    waiting: AtomicUsize,
    freed: Notify,
}

/// A taken slot, given back on drop (or kept by [`Slot::keep`] for a later [`Slots::release`]).
#[must_use]
pub struct Slot<'a>(&'a Slots);

impl Slot<'_> {
    /// Keeps the slot beyond this guard: the caller calls [`Slots::release`] once.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Counts a waiter in `pending` and `waiting` until it is done or cancelled.
struct Waiting<'a>(&'a Slots);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    /// `limit` requests in flight (at least 1), `max_pending` waiting.
    pub fn new(limit: usize, max_pending: u32) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            limit: limit.max(1),
            pending: AtomicU32::new(0),
            max_pending,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    fn try_take(&self) -> bool {
        self.in_use
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A slot at once if one is free, else after waiting in the bounded queue; `None`
    /// (overflow) when the queue is full too.
    pub async fn acquire(&self) -> Option<Slot<'_>> {
        if self.try_take() {
            return Some(Slot(self));
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            // Registered before the check: a release between the check and the wait is not
            // lost (it finds `waiting` > 0 and notifies, which this future then sees).
            let mut notified = pin!(self.freed.notified());
            notified.as_mut().enable();
            if self.try_take() {
                return Some(Slot(self));
            }
            notified.await;
        }
    }

    /// Gives a slot back (one kept with [`Slot::keep`]).
    pub fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// Requests in flight.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    #[tokio::test]
    async fn a_full_cluster_queues_up_to_max_pending_then_overflows() {
        let slots = Arc::new(Slots::new(2, 1));
        let a = slots.acquire().await.unwrap();
        let b = slots.acquire().await.unwrap();
        assert_eq!(slots.in_use(), 2);
        // The third waits (the queue holds one); the fourth overflows at once.
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire().await.map(Slot::keep).is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(slots.acquire().await.is_none());
        drop(a);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap());
        assert_eq!(slots.in_use(), 2);
        drop(b);
        slots.release();
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_release_is_lost_between_workers() {
        let slots = Arc::new(Slots::new(3, 10_000));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let slots = slots.clone();
                tokio::spawn(async move {
                    for _ in 0..2_000 {
                        let slot = slots.acquire().await.expect("queue is large enough");
                        assert!(slots.in_use() <= 3);
                        tokio::task::yield_now().await;
                        drop(slot);
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a waiter was never woken")
                .unwrap();
        }
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let slots = Slots::new(1, 1);
        let held = slots.acquire().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(10), slots.acquire())
                .await
                .is_err()
        );
        // The cancelled waiter's place in the queue is free again.
        let again = tokio::time::timeout(Duration::from_millis(10), slots.acquire()).await;
        assert!(again.is_err(), "still full, but queued rather than refused");
        drop(held);
        assert!(slots.acquire().await.is_some());
    }
}
