//! Appending: one writer thread takes everything queued, writes it, and makes it durable with one
//! `fdatasync` for the whole batch (group commit); each caller is answered only after that.
//!
//! Segments are preallocated: each is created full of zeros (and synced) by a helper thread
//! before the writer needs it, and records overwrite the zeros in place. An `fdatasync` then has
//! only the records' own blocks to flush, not also the file's new size (one device write instead
//! of two, and on a journaling file system no journal commit; docs/BENCHMARKS.md has the
//! measurement). Zeros after the last frame are unused space, never damage. When `compact_bytes`
//! have been logged, a new segment starts with a snapshot (written by its own thread), and older
//! files are removed once the snapshot is durable.
//!
//! Fail-stop: a failed write or sync, or any failed step of a preallocation or a snapshot, stops
//! the log for good ([`WalStats::failed`]); nothing is retried, since after a failed `fsync` the
//! kernel may have dropped the writes it could not flush ("fsyncgate").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use distlock::engine::SavedLease;
use tokio::sync::{mpsc, oneshot};

use super::disk::{Disk, DiskFile, RealDisk};
use super::frames::{
    end_batch, frame, numbered, segment_head, segment_path, snapshot_path, sync_dir, Snapshot,
};
use super::{io_err, Record, WalError};

/// Largest segment: a segment ends when it is this full (or `compact_bytes`, if smaller), and the
/// next, preallocated meanwhile, takes over.
pub const MAX_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Creates segment `n` full of zeros, `size` bytes long, and makes it and its directory entry
/// durable, so that writing records into it never changes its size.
/// It begins with [`segment_head`], synced: every batch written into it then follows a closing
/// frame, which is how recovery tells a torn first batch from damage.
fn preallocate<D: Disk>(disk: &D, dir: &Path, n: u64, size: u64) -> Result<D::File, WalError> {
    let path = segment_path(dir, n);
    // A new file: a segment number is never used twice (recovery numbers past every file).
    let file = disk.preallocate(&path, size, &segment_head()).map_err(io_err(&path))?;
    sync_dir(disk, dir)?;
    Ok(file)
}

/// The next segment, being preallocated by its own thread.
type Preparing<F> = std::thread::JoinHandle<Result<F, WalError>>;

/// Starts preallocating segment `n`. A failure stops the log at once (`stats`), not when the
/// writer comes to need the segment: the disk failed, and nothing more is acknowledged.
fn prepare<D: Disk>(
    disk: &D,
    dir: &Path,
    n: u64,
    size: u64,
    stats: &Arc<WalStats>,
) -> Result<Preparing<D::File>, WalError> {
    let (disk, dir, stats) = (disk.clone(), dir.to_owned(), stats.clone());
    std::thread::Builder::new()
        .name("distlock-prealloc".into())
        .spawn(move || preallocate(&disk, &dir, n, size).inspect_err(|e| stats.fail(e)))
        .map_err(|e| WalError::Closed(format!("cannot start the segment preallocation thread: {e}")))
}

/// Writes a snapshot for segment `n` and removes everything older.
fn write_snapshot(
    disk: &impl Disk,
    dir: &Path,
    n: u64,
    last_token: u64,
    leases: Vec<SavedLease>,
) -> Result<(), WalError> {
    let payload = serde_json::to_vec(&Snapshot { last_token, leases })
        .map_err(|e| WalError::Closed(format!("snapshot does not serialize: {e}")))?;
    let mut buf = Vec::with_capacity(payload.len() + 8);
    frame(&payload, &mut buf);
    let tmp = dir.join("snapshot.tmp");
    let f = disk.create(&tmp).map_err(io_err(&tmp))?;
    f.write_all_at(&buf, 0).and_then(|()| f.sync_all()).map_err(io_err(&tmp))?;
    let path = snapshot_path(dir, n);
    disk.rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(disk, dir)?;
    let older =
        numbered(disk, dir, "snapshot-", ".bin")?.into_iter().chain(numbered(disk, dir, "wal-", ".log")?);
    for (m, old) in older {
        if m < n {
            disk.remove(&old).map_err(io_err(&old))?;
        }
    }
    Ok(())
}

/// Supplies the live state for a snapshot (the store's table).
pub type SnapshotSource = Arc<dyn Fn() -> (u64, Vec<SavedLease>) + Send + Sync>;

struct Append {
    record: Record,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the writer thread. Dropping it lets the writer finish what is queued and waits
/// for it (and for a snapshot in progress), so the files are quiet once it is gone.
pub struct Wal {
    tx: Option<mpsc::Sender<Append>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<WalStats>,
    ahead: Ahead,
}

/// Records to write at the front of the next batch (see [`Wal::log_ahead`]).
type Ahead = Arc<std::sync::Mutex<Vec<Record>>>;

/// A handle on [`Wal::log_ahead`] that does not keep the log open (for the table's observer,
/// which the table keeps as long as it lives).
#[derive(Clone)]
pub struct LogAhead(Ahead);

impl LogAhead {
    /// As [`Wal::log_ahead`].
    pub fn push(&self, record: Record) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(record);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counters of the writer, for metrics and tests.
#[derive(Debug, Default)]
pub struct WalStats {
    /// fdatasync calls made.
    pub syncs: std::sync::atomic::AtomicU64,
    /// Records written.
    pub records: std::sync::atomic::AtomicU64,
    /// Snapshots taken.
    pub snapshots: std::sync::atomic::AtomicU64,
    /// Appends queued and not yet answered by the writer. The simulation
    /// (`tests/simulation.rs`) waits for it to reach zero before it moves its paused clock, since
    /// the writer is a thread of its own that the clock does not wait for.
    pub pending: std::sync::atomic::AtomicU64,
    /// Why the log stopped accepting writes, once it has (it never starts again by itself).
    pub failed: std::sync::OnceLock<String>,
}

impl WalStats {
    /// Stops the log for good: a write or sync failed (a later sync can succeed without the
    /// lost writes, so nothing written since the last good sync can be trusted), or another step
    /// the log depends on did. Only the first cause is kept.
    fn fail(&self, e: &WalError) {
        if self.failed.set(e.to_string()).is_ok() {
            tracing::error!(error = %e, "write-ahead log failed; the store acknowledges no changes until it is restarted");
        }
    }
}

impl Wal {
    /// Starts a fresh segment `next` and spawns the writer. With `snapshot`, a snapshot of
    /// `source` is written for the new segment first and older files are removed; the store asks
    /// for it when the log it just replayed had grown past `compact_bytes`, so start-up cost
    /// follows live leases, not history. A new segment (with a snapshot) is also started whenever
    /// the current one passes `compact_bytes`.
    pub fn open(
        dir: &Path,
        next: u64,
        source: SnapshotSource,
        compact_bytes: u64,
        snapshot: bool,
    ) -> Result<(Wal, Arc<WalStats>), WalError> {
        Wal::open_on(RealDisk, dir, next, source, compact_bytes, snapshot)
    }

    /// [`Wal::open`] on `disk`.
    pub fn open_on<D: Disk>(
        disk: D,
        dir: &Path,
        next: u64,
        source: SnapshotSource,
        compact_bytes: u64,
        snapshot: bool,
    ) -> Result<(Wal, Arc<WalStats>), WalError> {
        if snapshot {
            let (last_token, leases) = source();
            write_snapshot(&disk, dir, next, last_token, leases)?;
        }
        let segment_bytes = compact_bytes.clamp(1, MAX_SEGMENT_BYTES);
        let file = preallocate(&disk, dir, next, segment_bytes)?;
        let (tx, rx) = mpsc::channel(65_536);
        let stats = Arc::new(WalStats::default());
        let preparing = Some(prepare(&disk, dir, next + 1, segment_bytes, &stats)?);
        let ahead = Ahead::default();
        let writer = Writer {
            ahead: ahead.clone(),
            disk,
            dir: dir.to_owned(),
            segment: next,
            file,
            written: segment_head().len() as u64,
            segment_bytes,
            since_snapshot: 0,
            preparing,
            source,
            compact_bytes,
            stats: stats.clone(),
            snapshotting: None,
        };
        let thread = std::thread::Builder::new()
            .name("distlock-wal".into())
            .spawn(move || run_writer(writer, rx))
            .map_err(|e| WalError::Closed(format!("cannot start the log writer thread: {e}")))?;
        Ok((Wal { tx: Some(tx), thread: Some(thread), stats: stats.clone(), ahead }, stats))
    }

    /// Queues `record` to be written at the front of the next batch, without waiting for it (nor
    /// making a batch of it): for a change the table made by itself, an expiry, which must be on
    /// disk before any change that followed it. An append queued after this call is written in
    /// the same batch or a later one, so a grant of the place an expiry freed is never durable
    /// without the expiry (else a restart would bring the expired lease back beside the new one:
    /// a semaphore over its limit once the expired holder renews). Callable under a lock.
    pub fn log_ahead(&self, record: Record) {
        self.ahead().push(record);
    }

    /// A handle on [`Wal::log_ahead`].
    pub fn ahead(&self) -> LogAhead {
        LogAhead(self.ahead.clone())
    }

    /// Queues `records` at once, without waiting: behind every append already queued, ahead of
    /// every later one. For changes that must reach the disk in that order but are made where no
    /// caller can wait (a drop guard, the table's critical section). The answer tells when they
    /// are on disk (dropping it is fine). Fails, queuing nothing, when the queue has no room for
    /// them all or the writer has stopped. Records queued together may still be written in
    /// different batches.
    pub fn queue(&self, records: Vec<Record>) -> Result<Written, WalError> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        if records.is_empty() {
            return Ok(Written(None));
        }
        let permits = tx.try_reserve_many(records.len()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => WalError::Closed("the log's queue is full".into()),
            mpsc::error::TrySendError::Closed(()) => closed(),
        })?;
        Ok(send_all(permits, records, &self.stats))
    }

    /// Waits for room for `n` records in the queue and holds it: taken before a critical section
    /// that must queue records without waiting ([`Reserved::queue`]), so that a backlog delays
    /// the call instead of failing it. Fails when `n` is more than the queue ever holds (65,536)
    /// or the writer has stopped.
    pub async fn reserve(&self, n: usize) -> Result<Reserved<'_>, WalError> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        if n > tx.max_capacity() {
            return Err(WalError::Closed(format!(
                "{n} records at once are more than the log's queue holds ({})",
                tx.max_capacity()
            )));
        }
        let permits = tx.reserve_many(n).await.map_err(|_| closed())?;
        Ok(Reserved { wal: self, permits, room: n })
    }

    /// Queues `record` once the queue has room, from a task of its own: for a drop guard that
    /// found the queue full. Holds no borrow of the log.
    pub fn queue_when_room(
        &self,
        record: Record,
    ) -> impl std::future::Future<Output = Result<Written, WalError>> + Send + 'static {
        let (tx, stats) = (self.tx.clone(), self.stats.clone());
        async move {
            let permit = tx.ok_or_else(closed)?.reserve_owned().await.map_err(|_| closed())?;
            let (done, rx) = oneshot::channel();
            stats.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            permit.send(Append { record, done });
            Ok(Written(Some(rx)))
        }
    }

    /// Appends `record` and returns once it is on disk.
    pub async fn append(&self, record: Record) -> Result<(), WalError> {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(|| WalError::Closed("writer stopped".into()))?;
        use std::sync::atomic::Ordering::SeqCst;
        // Counted before it is queued and uncounted by the writer once answered (here if it
        // never got queued), so zero means no append is anywhere between caller and disk.
        self.stats.pending.fetch_add(1, SeqCst);
        if tx.send(Append { record, done }).await.is_err() {
            self.stats.pending.fetch_sub(1, SeqCst);
            return Err(WalError::Closed("writer stopped".into()));
        }
        Written(Some(rx)).on_disk().await
    }
}

fn closed() -> WalError {
    WalError::Closed("writer stopped".into())
}

/// Sends `records` on `permits` (as many), counted as appends are.
fn send_all(permits: mpsc::PermitIterator<'_, Append>, records: Vec<Record>, stats: &WalStats) -> Written {
    stats.pending.fetch_add(records.len() as u64, std::sync::atomic::Ordering::SeqCst);
    let mut last = None;
    for (permit, record) in permits.zip(records) {
        let (done, rx) = oneshot::channel();
        permit.send(Append { record, done });
        last = Some(rx);
    }
    // The writer answers in order and fails for good: the last record on disk means all are.
    Written(last)
}

/// Room in the log's queue, held (see [`Wal::reserve`]); given back when dropped unused.
pub struct Reserved<'a> {
    wal: &'a Wal,
    permits: mpsc::PermitIterator<'a, Append>,
    room: usize,
}

impl Reserved<'_> {
    /// Queues `records`, without waiting, in the room held; records beyond it are queued as
    /// [`Wal::queue`] does, failing (and queuing nothing) when the queue has no room for them.
    pub fn queue(self, records: Vec<Record>) -> Result<Written, WalError> {
        if records.len() > self.room {
            let Reserved { wal, permits, .. } = self;
            drop(permits);
            return wal.queue(records);
        }
        Ok(send_all(self.permits, records, &self.wal.stats))
    }
}

/// Records queued by [`Wal::queue`], until they are on disk.
pub struct Written(Option<oneshot::Receiver<Result<(), String>>>);

impl Written {
    /// Returns once the records are on disk, or with why they never will be.
    pub async fn on_disk(self) -> Result<(), WalError> {
        let Some(rx) = self.0 else { return Ok(()) };
        if distlock::planted::active(distlock::planted::Bug::AnswerBeforeSync) {
            return Ok(());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(WalError::Closed(e)),
            Err(_) => Err(WalError::Closed("writer stopped".into())),
        }
    }
}

struct Writer<D: Disk> {
    /// Records queued by [`Wal::log_ahead`].
    ahead: Ahead,
    disk: D,
    dir: PathBuf,
    segment: u64,
    file: D::File,
    /// Bytes written in the current segment, its head and closing frames included (where the
    /// next batch goes).
    written: u64,
    /// Preallocated size of a segment.
    segment_bytes: u64,
    /// Bytes of records logged since the last snapshot was started.
    since_snapshot: u64,
    /// The segment after this one, being preallocated.
    preparing: Option<Preparing<D::File>>,
    source: SnapshotSource,
    compact_bytes: u64,
    stats: Arc<WalStats>,
    /// The snapshot being written in the background, if any.
    snapshotting: Option<std::thread::JoinHandle<()>>,
}

/// The writer thread: takes every append queued, writes and syncs them as one batch, then
/// answers each. After a failure — its own, or a background step's (preallocation, snapshot) —
/// it answers every append not yet answered with the error, and writes nothing more. A dedicated
/// thread (not a task plus a blocking-pool hand-off per batch) keeps one thread switch per batch.
fn run_writer<D: Disk>(mut writer: Writer<D>, mut rx: mpsc::Receiver<Append>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        // Taken after the batch: whatever was queued ahead of its appends is in it.
        let ahead = std::mem::take(&mut *writer.ahead.lock().unwrap_or_else(|e| e.into_inner()));
        if writer.stats.failed.get().is_none() {
            let records: Vec<&Record> = ahead.iter().chain(batch.iter().map(|a| &a.record)).collect();
            if let Err(e) = writer.write(&records) {
                writer.stats.fail(&e);
            }
        }
        // Checked again after the batch: a background step may have failed meanwhile.
        let result = match writer.stats.failed.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        let answered = batch.len() as u64;
        for a in batch.drain(..) {
            let _ = a.done.send(result.clone());
        }
        writer.stats.pending.fetch_sub(answered, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(snapshot) = writer.snapshotting.take() {
        let _ = snapshot.join();
    }
    if let Some(preparing) = writer.preparing.take() {
        let _ = preparing.join();
    }
}

impl<D: Disk> Writer<D> {
    /// Writes and syncs one batch, into the current segment's preallocated space when it fits
    /// (a segment with records in it that this batch would overflow hands over to the next one
    /// first); then starts a snapshot when `compact_bytes` have been logged since the last.
    fn write(&mut self, records: &[&Record]) -> Result<(), WalError> {
        let mut buf = Vec::with_capacity(records.len() * 160);
        for r in records {
            let payload = serde_json::to_vec(r)
                .map_err(|e| WalError::Closed(format!("record does not serialize: {e}")))?;
            frame(&payload, &mut buf);
        }
        // Room for the frame that closes the batch (its offset has at most 20 digits).
        if self.written > segment_head().len() as u64
            && self.written + buf.len() as u64 + 64 > self.segment_bytes
        {
            self.next_segment()?;
        }
        end_batch(self.written, &mut buf);
        let path = segment_path(&self.dir, self.segment);
        // A batch larger than a whole segment grows the file past its preallocated size: correct,
        // only that sync is slower.
        self.file
            .write_all_at(&buf, self.written)
            .and_then(|()| self.file.sync_data())
            .map_err(io_err(&path))?;
        self.written += buf.len() as u64;
        self.since_snapshot += buf.len() as u64;
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.syncs.fetch_add(1, Relaxed);
        self.stats.records.fetch_add(records.len() as u64, Relaxed);
        if self.since_snapshot >= self.compact_bytes {
            self.next_segment()?;
            self.snapshot()?;
        }
        Ok(())
    }

    /// Moves to the next segment, preallocated by now (if it is not, this waits for it: the log
    /// is then writing faster than the disk can prepare space, and waiting is the back-pressure),
    /// and starts preallocating the one after.
    fn next_segment(&mut self) -> Result<(), WalError> {
        let next = self.segment + 1;
        let prepared = match self.preparing.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| WalError::Closed("the segment preallocation thread panicked".into()))?,
            None => preallocate(&self.disk, &self.dir, next, self.segment_bytes),
        };
        self.file = prepared?;
        self.segment = next;
        self.written = segment_head().len() as u64;
        self.preparing = Some(prepare(&self.disk, &self.dir, next + 1, self.segment_bytes, &self.stats)?);
        Ok(())
    }

    /// Starts a snapshot for the current segment, which has just begun: every change whose
    /// record went to an older segment was applied to the table before it was logged, so the
    /// snapshot contains it. The snapshot is written by its own thread, so appends to the new
    /// segment go on meanwhile; until it is on disk the older snapshot and segments stay, and
    /// recovery replays from those (older files are removed only once the new snapshot is
    /// durable).
    fn snapshot(&mut self) -> Result<(), WalError> {
        // One snapshot at a time (the previous one is normally long done).
        if let Some(previous) = self.snapshotting.take() {
            let _ = previous.join();
        }
        self.since_snapshot = 0;
        let next = self.segment;
        let (last_token, leases) = (self.source)();
        let (disk, dir, stats) = (self.disk.clone(), self.dir.clone(), self.stats.clone());
        let thread = std::thread::Builder::new().name("distlock-snapshot".into()).spawn(move || {
            match write_snapshot(&disk, &dir, next, last_token, leases) {
                Ok(()) => {
                    stats.snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // The older snapshot and segments are still there, but the disk failed under
                // the log (an EIO here is as untrustworthy as one on an append's sync).
                Err(e) => stats.fail(&e),
            }
        });
        self.snapshotting =
            Some(thread.map_err(|e| WalError::Closed(format!("cannot start a snapshot thread: {e}")))?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{recover, test_lease, Recovered};
    use super::*;

    #[test]
    fn segments_roll_into_preallocated_files_and_replay_in_order() {
        use std::sync::Mutex;
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // The table the log makes durable: changed first, then logged, as the store does.
        let table = Arc::new(Mutex::new(Recovered::default()));
        let mut next = 0;
        for round in 0..2u64 {
            let t = table.clone();
            let source: SnapshotSource = Arc::new(move || {
                let t = t.lock().unwrap();
                (t.last_token, t.leases.values().flatten().cloned().collect())
            });
            // 1 KiB segments: 60 records of ~150 bytes fill several, with snapshots between.
            let (wal, stats) = Wal::open(dir.path(), next, source, 1 << 10, false).unwrap();
            runtime.block_on(async {
                for i in 0..60 {
                    let token = round * 60 + i + 1;
                    let record = if i % 3 == 2 {
                        let t = table.lock().unwrap();
                        let (key, held) = t.leases.iter().next().unwrap();
                        let l = &held[0];
                        Record::Release {
                            key: key.clone(),
                            lease_id: l.lease_id.clone(),
                            fencing_token: None,
                        }
                    } else {
                        test_lease(&format!("k{token}"), token)
                    };
                    table.lock().unwrap().apply(record.clone());
                    wal.append(record).await.unwrap();
                }
            });
            drop(wal);
            assert!(stats.snapshots.load(std::sync::atomic::Ordering::Relaxed) > 0);
            let (state, n, _) = recover(dir.path()).unwrap();
            assert!(n > next + 4, "several segments were used ({next} -> {n})");
            assert_eq!(state, *table.lock().unwrap());
            next = n;
        }
        assert_eq!(table.lock().unwrap().leases.len(), 40, "40 acquires and 20 releases a round");
    }
}
