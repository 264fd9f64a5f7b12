//! Coalescing for the `http://` backend: concurrent calls share `POST /v1/batch` requests.
//!
//! Acquires that do not wait, renewals and releases from many tasks go into one queue. A
//! dispatcher task takes whatever is queued (up to a size cap) and sends it as one batch; while
//! that batch is out, new calls queue up for the next one. One
//! caller alone gets a batch of one, so nothing waits for company: coalescing only happens when
//! calls arrive faster than the server answers. This is how the Redis client pipelines commands
//! over one connection, done at the HTTP level: per call, the server's log write still reaches
//! disk before the answer, and each operation is answered exactly as its single route would.
//!
//! A call that finds nothing queued or in flight does not go through the queue at all: it is sent
//! on its own, by its caller, to its single route ([`Batcher::alone`]). So one task alone, or a
//! program with one call at a time, pays neither the hop to the dispatcher nor the batch
//! envelope, and 64 separate processes each with one call out send 64 plain requests. Such a
//! call counts as the one request in flight: calls made meanwhile form the next batch, sent once
//! it is answered, as they would behind a batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Semaphore, SemaphorePermit};

use super::client::Client;
use crate::error::{Error, Result};
use crate::wire::{BatchAnswer, BatchBody, BatchResult};

/// Most operations sent in one batch.
const MAX_OPS: usize = 256;
/// Most bytes of operations in one batch (the server accepts bodies up to 64 KiB).
const MAX_BYTES: usize = 48 * 1024;

/// What one operation got back: the status and body its single route would have answered.
pub(super) type Reply = Result<(u16, Box<RawValue>)>;

struct Pending {
    /// The operation as JSON (a [`crate::wire::BatchOp`]: `{"op":"release","key":...}`).
    op: Box<RawValue>,
    reply: oneshot::Sender<Reply>,
}

/// The queue in front of the dispatcher task (started on first use, on the caller's runtime,
/// and started again if that runtime has gone).
pub(super) struct Batcher {
    client: Arc<Client>,
    /// Bounds each call, and each batch.
    timeout: Duration,
    queue: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    /// Calls queued or in flight, batched or alone.
    busy: AtomicUsize,
    /// One permit: held by the batch or the lone call that is out, so that one request is in
    /// flight at a time.
    wire: Arc<Semaphore>,
}

/// Counts a call as busy while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl Busy<'_> {
    /// Counts one more call; also says whether none was busy before it.
    fn enter(count: &AtomicUsize) -> (Busy<'_>, bool) {
        let idle = count.fetch_add(1, Ordering::AcqRel) == 0;
        (Busy(count), idle)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A call sent on its own (see [`Batcher::alone`]): busy, and the request in flight.
pub(super) struct Alone<'a> {
    _busy: Busy<'a>,
    _wire: SemaphorePermit<'a>,
}

impl Batcher {
    pub(super) fn new(client: Arc<Client>, timeout: Duration) -> Batcher {
        Batcher {
            client,
            timeout,
            queue: Mutex::new(None),
            busy: AtomicUsize::new(0),
            wire: Arc::new(Semaphore::new(1)),
        }
    }

    /// When no other call is queued or in flight, a guard under which the caller sends its call
    /// to the single route itself (there is nothing to coalesce it with); calls made meanwhile
    /// are batched. `None` when others are busy: then use [`Batcher::call`].
    pub(super) fn alone(&self) -> Option<Alone<'_>> {
        let (busy, idle) = Busy::enter(&self.busy);
        if !idle {
            return None;
        }
        // The last batch may still be handing out its answers.
        let wire = self.wire.try_acquire().ok()?;
        Some(Alone { _busy: busy, _wire: wire })
    }

    /// Sends one operation with the next batch and waits for its answer.
    pub(super) async fn call(&self, op: Box<RawValue>) -> Reply {
        let (_busy, _) = Busy::enter(&self.busy);
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { op, reply };
        // Two tries: the first may find a dispatcher whose runtime has shut down.
        for _ in 0..2 {
            let tx = self.sender();
            match tx.send(pending) {
                Ok(()) => break,
                Err(mpsc::error::SendError(p)) => {
                    pending = p;
                    self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
            }
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(self.client.unavailable("request dropped")),
            Err(_) => Err(self.client.unavailable("timed out")),
        }
    }

    fn sender(&self) -> mpsc::UnboundedSender<Pending> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match queue.as_ref() {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(dispatch(rx, self.client.clone(), self.timeout, self.wire.clone()));
                *queue = Some(tx.clone());
                tx
            }
        }
    }
}

/// Forms batches from the queue and sends them one at a time; ends when every sender is gone.
///
/// One batch in flight, not several: one gave the best throughput and by far the best tail of
/// the counts measured (docs/BENCHMARKS.md), because the next batch then forms while the
/// server's log write for this one is on its way to disk, which is the server's own group-commit
/// rhythm.
async fn dispatch(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    client: Arc<Client>,
    timeout: Duration,
    wire: Arc<Semaphore>,
) {
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // A call whose caller has gone (cancelled, timed out) is not sent at all.
        if first.reply.is_closed() {
            continue;
        }
        // Behind a lone call in flight, if any; what is queued meanwhile joins this batch. (The
        // semaphore is never closed; were it, batches would simply not wait.)
        let _wire = wire.acquire().await.ok();
        let mut bytes = first.op.get().len();
        let mut batch = vec![first];
        while batch.len() < MAX_OPS {
            match rx.try_recv() {
                Ok(p) if p.reply.is_closed() => {}
                Ok(p) if bytes + p.op.get().len() + 1 > MAX_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.op.get().len() + 1;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        send(&client, timeout, batch, bytes).await;
    }
}

/// Sends one batch and hands every operation its answer.
async fn send(client: &Client, timeout: Duration, batch: Vec<Pending>, bytes: usize) {
    let mut body = Vec::with_capacity(bytes + 16);
    let ops = BatchBody { ops: batch.iter().map(|p| &*p.op).collect() };
    if let Err(e) = serde_json::to_writer(&mut body, &ops) {
        // Unreachable (each operation is JSON already); answered, not panicked, all the same.
        let error = Error::InvalidInput(format!("batch: {e}"));
        for p in batch {
            let _ = p.reply.send(Err(error.clone()));
        }
        return;
    }
    let n = batch.len();
    let answers = post(client, timeout, body, n).await;
    match answers {
        Ok(results) => {
            for (p, r) in batch.into_iter().zip(results) {
                let _ = p.reply.send(Ok((r.status, r.body)));
            }
        }
        Err(Failure::Whole(status, body)) => {
            // The server refused the batch as a whole (auth, limits): every operation gets that answer.
            for p in batch {
                let _ = p.reply.send(Ok((status, body.clone())));
            }
        }
        Err(Failure::Transport(error)) => {
            for p in batch {
                let _ = p.reply.send(Err(error.clone()));
            }
        }
    }
}

enum Failure {
    /// A non-2xx answer to the whole batch, with its error body.
    Whole(u16, Box<RawValue>),
    /// No usable answer (`Unavailable`).
    Transport(Error),
}

async fn post(
    client: &Client,
    timeout: Duration,
    body: Vec<u8>,
    n: usize,
) -> std::result::Result<Vec<BatchResult>, Failure> {
    let answer = client.call("/v1/batch", Some(body), timeout).await.map_err(Failure::Transport)?;
    if !(200..300).contains(&answer.status) {
        // Not JSON (a proxy's page, say): `null`, and the error maps by status alone.
        let body = serde_json::from_slice(&answer.body).unwrap_or_else(|_| RawValue::NULL.to_owned());
        return Err(Failure::Whole(answer.status, body));
    }
    let unavailable = |why: String| Failure::Transport(client.unavailable(why));
    let answer: BatchAnswer = serde_json::from_slice(&answer.body)
        .map_err(|e| unavailable(format!("unreadable batch answer: {e}")))?;
    if answer.results.len() != n {
        return Err(unavailable(format!(
            "batch answer has {} results for {n} operations",
            answer.results.len()
        )));
    }
    Ok(answer.results)
}
