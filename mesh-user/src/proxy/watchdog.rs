//! A side future polled only when its own waker fired, not on every wake-up of the task that
//! owns it. A client connection's task wakes several times per request (socket readiness,
//! the upstream's answer); its drain signal is a `watch` shared by every connection of a
//! listener on every worker, and polling a pending `watch::changed()` takes that channel's
//! lock: polled on every wake-up, the workers would contend for it several times per request.
//! Behind a [`SideWaker`] it is polled once when the connection starts and again only when
//! the drain or the idle timer fires.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
};

use atomic_waker::AtomicWaker;

/// Whether the side future's waker fired, and the task to wake when it does.
struct Side {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Side {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls a side future only after its own waker fired (and on the first poll).
pub struct SideWaker {
    side: Arc<Side>,
    waker: Waker,
}

impl Default for SideWaker {
    fn default() -> Self {
        let side = Arc::new(Side {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(side.clone()),
            side,
        }
    }
}

impl SideWaker {
    /// Polls `side` if its waker fired since its last poll; else `Pending` at no cost. The
    /// task behind `cx` is woken when it fires.
    pub fn poll<F: Future + ?Sized>(
        &self,
        side: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        self.side.task.register(cx.waker());
        if !self.side.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        side.poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::atomic::AtomicUsize, time::Duration};

    /// Counts its polls; ready once `ready` is set.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        rx: tokio::sync::oneshot::Receiver<()>,
    }

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.rx).poll(cx).map(|_| ())
        }
    }

    #[tokio::test]
    async fn the_side_future_is_polled_only_when_it_woke() {
        let polls = AtomicUsize::new(0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let side = Counted { polls: &polls, rx };
        tokio::pin!(side);
        let waker = SideWaker::default();
        let mut main_polls = 0;
        let (main_tx, mut main_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let feeder = tokio::spawn(async move {
            for _ in 0..20 {
                let _ = main_tx.send(());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = tx.send(());
        });
        std::future::poll_fn(|cx| {
            // The "main" future: woken by every message.
            while let Poll::Ready(Some(())) = main_rx.poll_recv(cx) {
                main_polls += 1;
            }
            waker.poll(side.as_mut(), cx)
        })
        .await;
        feeder.await.unwrap();
        assert_eq!(main_polls, 20);
        // Once at the start, once when the oneshot fired.
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
