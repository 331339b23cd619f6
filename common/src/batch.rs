//! Group commit: many callers' writes, one statement and one commit.
//!
//! Each message's handler asks for its own write and awaits its own answer;
//! a [`Batcher`] gathers the requests waiting at that moment into one call
//! of a batch function (one multi-row statement, one transaction). It never
//! waits for a batch to fill: an idle worker takes the first request at
//! once, so a lone message pays no extra latency, and under load each batch
//! holds whatever arrived while the previous one was being written. Up to
//! `workers` batches are written at once (each on its own connection).
//!
//! On this machine Postgres spends most of its time parsing, planning and
//! committing each statement; a batch of 64 rows costs about as much as a
//! single row, which is what lets two writes per message keep up with the
//! broker.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// The batcher has stopped (its workers ended): the process is shutting
/// down.
#[derive(Debug, thiserror::Error)]
#[error("the batch writer has stopped")]
pub struct Stopped;

type Job<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// A queue of requests written in batches by a few workers.
pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Job<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Start `workers` workers, each calling `write` with up to `max_batch`
    /// requests; `write` answers each request, in order. The workers end
    /// when every clone of the batcher is dropped.
    pub fn spawn<F, Fut>(workers: usize, max_batch: usize, write: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel::<Job<Req, Resp>>(max_batch * workers.max(1) * 2);
        let rx = Arc::new(Mutex::new(rx));
        let write = Arc::new(write);
        for _ in 0..workers.max(1) {
            let (rx, write) = (rx.clone(), write.clone());
            tokio::spawn(async move {
                let mut batch: Vec<Job<Req, Resp>> = Vec::with_capacity(max_batch);
                loop {
                    {
                        // One worker gathers at a time; the others are
                        // writing theirs meanwhile.
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        batch.push(first);
                        while batch.len() < max_batch {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) = batch.drain(..).unzip();
                    let answers = write(requests).await;
                    debug_assert_eq!(answers.len(), replies.len(), "a batch function answers every request");
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        // The caller may have gone (its handler was
                        // cancelled): the write stands, nobody to tell.
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Self { tx }
    }

    /// Queue `req` and wait for its answer.
    pub async fn call(&self, req: Req) -> Result<Resp, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((req, reply)).await.map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_lone_request_is_written_at_once_and_waiting_ones_share_a_batch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (c, l, g) = (calls.clone(), largest.clone(), gate.clone());
        let b: Batcher<u32, u32> = Batcher::spawn(1, 16, move |reqs: Vec<u32>| {
            let (c, l, g) = (c.clone(), l.clone(), g.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                l.fetch_max(reqs.len(), Ordering::SeqCst);
                // The first batch waits for the test's signal, so the next
                // requests queue up behind it.
                if let Ok(p) = g.acquire().await {
                    p.forget();
                }
                reqs.into_iter().map(|r| r * 10).collect()
            }
        });
        gate.add_permits(1);
        assert_eq!(b.call(1).await.ok(), Some(10));
        assert_eq!(largest.load(Ordering::SeqCst), 1);
        // One batch in progress (held by the gate), 40 waiting behind it:
        // they go in batches of at most 16, each answered with its own.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(2).await.ok() }
        });
        while calls.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        let waiting: Vec<_> = (100..140)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await.ok()) })
            })
            .collect();
        // Let every waiting request reach the queue before the gate opens.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(100);
        assert_eq!(first.await.ok().flatten(), Some(20));
        for w in waiting {
            let (i, got) = w.await.unwrap_or((0, None));
            assert_eq!(got, Some(i * 10));
        }
        assert_eq!(largest.load(Ordering::SeqCst), 16);
        assert!(calls.load(Ordering::SeqCst) <= 2 + 40usize.div_ceil(16) + 1, "{calls:?}");
    }
}
