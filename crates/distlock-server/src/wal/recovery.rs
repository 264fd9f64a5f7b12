//! Start-up: the data directory's lock (one server per directory) and rebuilding the state from
//! the newest snapshot and the segments after it. A torn or corrupt frame at the end of the last
//! segment written (a crash mid-write) is cut off with a warning; anything else that does not
//! check out refuses to start, rather than guess.
//!
//! Replay is order-independent where appends may race: an acquire record of a lock replaces the
//! key's lease only if its fencing token is higher, an acquire of a lease already held (in the
//! snapshot, taken while the record was queued) is skipped, and a release or renewal applies
//! only to the lease it names. A semaphore's (or a shared lock's) acquire joins the key's other
//! leases of the same kind: a lease whose expiry went unlogged is restored too, and only takes a
//! permit until its TTL ends (never lose a live holder; a phantom one costs capacity, not
//! safety).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use distlock::engine::SavedLease;

use super::disk::{Disk, DiskFile, RealDisk};
use super::frames::{numbered, read_frames, Frames, Snapshot};
use super::{io_err, Record, WalError};

/// The state rebuilt from disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The highest fencing token ever logged.
    pub last_token: u64,
    /// Leases held at the crash (or shutdown), by key, in token order (one for a lock).
    pub leases: BTreeMap<String, Vec<SavedLease>>,
}

impl Recovered {
    /// Applies one record (see the module docs for why this is order-tolerant).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Acquire(lease) => {
                self.last_token = self.last_token.max(lease.fencing_token);
                let held = self.leases.entry(lease.key.clone()).or_default();
                if held.iter().any(|l| l.lease_id == lease.lease_id) {
                    // Already in the snapshot, which was taken from the table while this record
                    // was still queued for the new segment: the lease is held once, with the
                    // changes that followed.
                    return;
                }
                let newest = held.last().map_or(0, |l| l.fencing_token);
                let many = lease.limit > 1 || lease.shared;
                if many && held.iter().all(|l| l.limit == lease.limit && l.shared == lease.shared) {
                    let at = held.partition_point(|l| l.fencing_token < lease.fencing_token);
                    held.insert(at, lease);
                } else if newest < lease.fencing_token {
                    // A lock (or a new limit): granted only when the key was free, so what the
                    // key had before ended, logged or not.
                    *held = vec![lease];
                }
            }
            Record::Renew { key, lease_id, ttl_ms } => {
                if let Some(cur) =
                    self.leases.get_mut(&key).and_then(|h| h.iter_mut().find(|c| c.lease_id == lease_id))
                {
                    cur.ttl_ms = ttl_ms;
                }
            }
            Record::Proclaim { key, lease_id, value } => {
                if let Some(cur) =
                    self.leases.get_mut(&key).and_then(|h| h.iter_mut().find(|c| c.lease_id == lease_id))
                {
                    cur.value = Some(value);
                }
            }
            Record::Release { key, lease_id, fencing_token } => {
                self.last_token = self.last_token.max(fencing_token.unwrap_or(0));
                if let Some(held) = self.leases.get_mut(&key) {
                    held.retain(|c| c.lease_id != lease_id);
                    if held.is_empty() {
                        self.leases.remove(&key);
                    }
                }
            }
        }
    }
}

/// Takes the data directory for this process: an exclusive `flock` on `dir/LOCK`, held as long
/// as the returned guard lives (the kernel drops it when the process dies, even by `kill -9`).
pub fn lock_dir(dir: &Path) -> Result<DirLock, WalError> {
    use nix::fcntl::{Flock, FlockArg};
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join("LOCK");
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(WalError::InUse(dir.to_owned())),
        Err((_, e)) => Err(WalError::Io { path, source: io::Error::from(e) }),
    }
}

/// Holds the data directory's lock; see [`lock_dir`].
#[derive(Debug)]
pub struct DirLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Rebuilds the state from `dir` (created if missing). Returns it with the number the next
/// segment should have and the bytes of log replayed.
pub fn recover(dir: &Path) -> Result<(Recovered, u64, u64), WalError> {
    recover_on(&RealDisk, dir)
}

/// [`recover`] on `disk`.
pub fn recover_on(disk: &impl Disk, dir: &Path) -> Result<(Recovered, u64, u64), WalError> {
    disk.create_dir_all(dir).map_err(io_err(dir))?;
    let mut state = Recovered::default();
    let mut from = 0;
    // The newest snapshot wins; it is written to a temp file and renamed, so it is whole or absent.
    if let Some((n, path)) = numbered(disk, dir, "snapshot-", ".bin")?.pop() {
        let frames = read_frames(disk, &path)?;
        let payload = match (frames.payloads.as_slice(), frames.torn) {
            ([one], false) => one,
            _ => {
                return Err(WalError::Corrupt {
                    path,
                    offset: 0,
                    reason: "snapshot is not one whole frame".into(),
                })
            }
        };
        let snap: Snapshot = serde_json::from_slice(payload).map_err(|e| WalError::Corrupt {
            path: path.clone(),
            offset: 8,
            reason: format!("snapshot does not parse: {e}"),
        })?;
        state.last_token = snap.last_token;
        state.leases = BTreeMap::new();
        for l in snap.leases {
            state.leases.entry(l.key.clone()).or_default().push(l);
        }
        from = n;
    }
    let segments: Vec<(u64, PathBuf)> =
        numbered(disk, dir, "wal-", ".log")?.into_iter().filter(|(n, _)| *n >= from).collect();
    let last = segments.last().map(|(n, _)| *n);
    let read: Vec<Frames> =
        segments.iter().map(|(_, path)| read_frames(disk, path)).collect::<Result<_, _>>()?;
    // The segment written last is the last one with frames; after it come at most preallocated,
    // never-written ones. Only it can end in a torn frame.
    let written_last = read.iter().rposition(|f| !f.payloads.is_empty() || f.torn);
    let mut replayed = 0u64;
    for (i, ((_, path), frames)) in segments.iter().zip(&read).enumerate() {
        replayed += frames.payloads.iter().map(|p| p.len() as u64 + 8).sum::<u64>();
        for (j, payload) in frames.payloads.iter().enumerate() {
            let record: Record = serde_json::from_slice(payload).map_err(|e| WalError::Corrupt {
                path: path.clone(),
                offset: j as u64,
                reason: format!("record {j} does not parse: {e}"),
            })?;
            state.apply(record);
        }
        if frames.torn && Some(i) != written_last {
            return Err(WalError::Corrupt {
                path: path.clone(),
                offset: frames.end,
                reason: "damaged frame in a segment that is not the last".into(),
            });
        }
        if frames.torn {
            tracing::warn!(file = %path.display(), offset = frames.end, "cutting a torn tail off the write-ahead log");
        }
        if frames.end < frames.len {
            // The torn frame, or preallocated space that is no longer needed: this process
            // writes to a new segment.
            let f = disk.open_write(path).map_err(io_err(path))?;
            f.set_len(frames.end).and_then(|()| f.sync_all()).map_err(io_err(path))?;
        }
    }
    let next = last.map_or(from, |n| n + 1).max(from);
    Ok((state, next, replayed))
}

#[cfg(test)]
mod tests {
    use super::super::frames::{frame, segment_path};
    use super::super::test_lease;
    use super::*;

    fn framed(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            frame(&serde_json::to_vec(r).unwrap(), &mut out);
        }
        out
    }

    /// `batches` as the writer writes them: each closed by the frame naming where it began.
    fn batched(batches: Vec<Vec<Record>>) -> Vec<u8> {
        let mut out = super::super::frames::segment_head();
        for records in batches {
            let start = out.len() as u64;
            out.extend(framed(&records));
            super::super::frames::end_batch(start, &mut out);
        }
        out
    }

    /// Whether recovery of `data` as the only segment starts, and with which leases.
    fn leases_after(data: Vec<u8>) -> Result<Vec<String>, WalError> {
        let dir = tempfile::tempdir().unwrap();
        fs::write(segment_path(dir.path(), 0), with_zeros(data, 4096)).unwrap();
        recover(dir.path()).map(|(state, _, _)| state.leases.into_keys().collect())
    }

    /// The last batch with a lost sector ahead of one that landed is cut whole, the batches
    /// before it kept; a bad frame with a later batch after it is damage.
    #[test]
    fn batches_tell_a_torn_last_batch_from_damage() {
        let (a, b, c) = (test_lease("a", 1), test_lease("b", 2), test_lease("c", 3));
        let head = super::super::frames::segment_head().len();
        let first = batched(vec![vec![a.clone()]]).len();
        let whole = batched(vec![vec![a.clone()], vec![b.clone(), c.clone()]]);
        assert_eq!(leases_after(whole.clone()).unwrap(), ["a", "b", "c"]);
        let lose = |data: &[u8], from: usize, to: usize| {
            let mut d = data.to_vec();
            d[from..to].fill(0);
            d
        };
        // The last batch's first bytes lost (its closing frame landed): cut, records and all.
        assert_eq!(leases_after(lose(&whole, first, first + 20)).unwrap(), ["a"]);
        // Its middle lost, its end too (no closing frame after the bad one): cut as well.
        assert_eq!(leases_after(lose(&whole, first + 20, whole.len() - 10)).unwrap(), ["a"]);
        // The same in the first batch of the segment (it follows the segment's head).
        let one = batched(vec![vec![a.clone(), b.clone()]]);
        assert_eq!(leases_after(lose(&one, head, head + 20)).unwrap(), Vec::<String>::new());
        assert_eq!(leases_after(lose(&one, head + 20, one.len() - 10)).unwrap(), Vec::<String>::new());
        // Damage in the first batch, with a later batch after it: refused.
        let mut d = whole.clone();
        d[head + 10] ^= 0x55;
        assert!(matches!(leases_after(d), Err(WalError::Corrupt { .. })));
        // A frame length damaged to run past every later batch: refused, not cut as a torn tail.
        let mut d = whole.clone();
        d[head + 3] = 0x7f;
        assert!(matches!(leases_after(d), Err(WalError::Corrupt { .. })));
        // A closing frame that names another start is no licence to cut.
        let two = batched(vec![vec![a], vec![b], vec![c]]);
        let mut d = two.clone();
        d[first + 10] ^= 0x55;
        assert!(matches!(leases_after(d), Err(WalError::Corrupt { .. })));
    }

    fn with_zeros(mut bytes: Vec<u8>, zeros: usize) -> Vec<u8> {
        bytes.resize(bytes.len() + zeros, 0);
        bytes
    }

    /// A release the store made itself carries its token and raises the counter; a release
    /// written without one (a holder's, or any from a log older than the field) still reads.
    #[test]
    fn a_release_with_a_token_raises_the_counter_and_old_releases_still_read() {
        let old: Record =
            serde_json::from_str(r#"{"release":{"key":"a","lease_id":"00000000000000000000000000000001"}}"#)
                .expect("a release written before the token field");
        assert!(matches!(&old, Record::Release { fencing_token: None, .. }), "{old:?}");
        let mut state = Recovered::default();
        state.apply(test_lease("a", 1));
        state.apply(old);
        assert_eq!(state.last_token, 1);
        let lease_id = distlock::LeaseId::generate();
        state.apply(Record::Release { key: "b".into(), lease_id, fencing_token: Some(7) });
        assert_eq!(state.last_token, 7);
        let written = serde_json::to_string(&Record::Release {
            key: "c".into(),
            lease_id: distlock::LeaseId::generate(),
            fencing_token: None,
        })
        .expect("encode");
        assert!(!written.contains("fencing_token"), "a holder's release grew: {written}");
    }

    #[test]
    fn preallocated_zeros_end_a_segment_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let data = framed(&[test_lease("a", 1), test_lease("b", 2)]);
        let records = data.len() as u64;
        fs::write(segment_path(dir.path(), 0), with_zeros(data, 4096)).unwrap();
        fs::write(segment_path(dir.path(), 1), with_zeros(framed(&[test_lease("c", 3)]), 100)).unwrap();
        fs::write(segment_path(dir.path(), 2), vec![0; 4096]).unwrap();
        let (state, next, _) = recover(dir.path()).unwrap();
        assert_eq!((state.leases.len(), state.last_token, next), (3, 3, 3));
        // The unused space was given back.
        assert_eq!(fs::metadata(segment_path(dir.path(), 0)).unwrap().len(), records);
        assert_eq!(fs::metadata(segment_path(dir.path(), 2)).unwrap().len(), 0);
    }

    #[test]
    fn a_torn_frame_in_preallocated_space_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = framed(&[test_lease("a", 1)]);
        let good = data.len() as u64;
        let torn = framed(&[test_lease("b", 2)]);
        data.extend_from_slice(&torn[..torn.len() / 2]);
        fs::write(segment_path(dir.path(), 0), with_zeros(data, 4096)).unwrap();
        // The segment preallocated after it, never written.
        fs::write(segment_path(dir.path(), 1), vec![0; 4096]).unwrap();
        let (state, next, _) = recover(dir.path()).unwrap();
        assert_eq!((state.leases.len(), state.last_token, next), (1, 1, 2));
        assert_eq!(fs::metadata(segment_path(dir.path(), 0)).unwrap().len(), good);
    }

    /// A snapshot is taken from the table, which already holds changes whose records are still
    /// queued for the new segment; replaying such an acquire again must not hold its lease twice
    /// (the engine would restore the copy without the later renewal: a shorter TTL than the
    /// holder was told).
    #[test]
    fn an_acquire_both_in_the_snapshot_and_the_next_segment_is_held_once() {
        use super::super::frames::{snapshot_path, Snapshot};
        for (limit, shared) in [(1, true), (3, false), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let Record::Acquire(mut lease) = test_lease("k", 5) else { unreachable!() };
            (lease.limit, lease.shared) = (limit, shared);
            let snapshot = Snapshot { last_token: 5, leases: vec![lease.clone()] };
            let mut bytes = Vec::new();
            frame(&serde_json::to_vec(&snapshot).unwrap(), &mut bytes);
            fs::write(snapshot_path(dir.path(), 1), bytes).unwrap();
            let renew = Record::Renew { key: "k".into(), lease_id: lease.lease_id.clone(), ttl_ms: 900_000 };
            fs::write(segment_path(dir.path(), 1), framed(&[Record::Acquire(lease.clone()), renew])).unwrap();
            let (state, _, _) = recover(dir.path()).unwrap();
            let held = &state.leases["k"];
            assert_eq!(held.len(), 1, "limit {limit}, shared {shared}: {held:?}");
            assert_eq!(held[0].ttl_ms, 900_000);
        }
    }

    #[test]
    fn damage_before_more_records_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = framed(&[test_lease("a", 1), test_lease("b", 2)]);
        data[10] ^= 0x55;
        fs::write(segment_path(dir.path(), 0), with_zeros(data, 4096)).unwrap();
        assert!(matches!(recover(dir.path()), Err(WalError::Corrupt { .. })));
        // A torn frame is only possible in the segment written last.
        let dir = tempfile::tempdir().unwrap();
        let torn = framed(&[test_lease("a", 1)]);
        fs::write(segment_path(dir.path(), 0), with_zeros(torn[..torn.len() - 3].to_vec(), 64)).unwrap();
        fs::write(segment_path(dir.path(), 1), framed(&[test_lease("b", 2)])).unwrap();
        assert!(matches!(recover(dir.path()), Err(WalError::Corrupt { .. })));
        // A zero header with records after it (a frame never written) is damage too.
        let dir = tempfile::tempdir().unwrap();
        let data = [vec![0; 16], framed(&[test_lease("a", 1)])].concat();
        fs::write(segment_path(dir.path(), 0), data).unwrap();
        assert!(matches!(recover(dir.path()), Err(WalError::Corrupt { .. })));
    }
}
