//! How the log sits on disk: a frame per record, `[len: u32 LE][crc32 of payload: u32 LE][payload:
//! JSON]`, each batch (one write, one sync) closed by a frame that says where the batch began (a
//! new segment starts with one, closing an empty batch), and the numbered files (`wal-<n>.log`,
//! `snapshot-<n>.bin`) that hold them. Reading tells a torn last batch (a crash mid-write, which
//! can keep a later sector of the write and lose an earlier one) from damage, because recovery
//! cuts the one and refuses the other: no batch is written before the one ahead of it is synced,
//! so a bad frame with data of a later batch after it is damage.

use std::path::{Path, PathBuf};

use distlock::engine::SavedLease;
use serde::{Deserialize, Serialize};

use super::disk::Disk;
use super::{io_err, WalError};

#[derive(Serialize, Deserialize)]
pub(super) struct Snapshot {
    pub(super) last_token: u64,
    pub(super) leases: Vec<SavedLease>,
}

pub(super) fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The frame that closes a batch: `{"batch_start":<offset of the batch's first byte>}`. No record
/// starts with this key (a record is `{"acquire":…}`, `{"release":…}`, …).
#[derive(Serialize, Deserialize)]
struct BatchEnd {
    batch_start: u64,
}

const BATCH_END_PREFIX: &[u8] = b"{\"batch_start\":";

/// Appends the frame that closes a batch which began at `start` in its segment.
pub(super) fn end_batch(start: u64, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(&BatchEnd { batch_start: start }).unwrap_or_default();
    frame(&payload, out);
}

/// What a new segment starts with: the frame closing an empty batch at its start, so that the
/// first real batch too begins after a closing frame (see [`read_frames`]).
pub(super) fn segment_head() -> Vec<u8> {
    let mut out = Vec::new();
    end_batch(0, &mut out);
    out
}

/// Where the batch a closing frame ends began; `None` for a record.
fn batch_start(payload: &[u8]) -> Option<u64> {
    if !payload.starts_with(BATCH_END_PREFIX) {
        return None;
    }
    serde_json::from_slice::<BatchEnd>(payload).ok().map(|b| b.batch_start)
}

/// The frame at the start of `rest`, when its header and checksum hold: its payload.
fn whole_frame(rest: &[u8]) -> Option<&[u8]> {
    let header = rest.get(..8)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let payload = rest.get(8..8usize.checked_add(len)?)?;
    (len > 0 && crc32fast::hash(payload) == crc).then_some(payload)
}

/// The longest payload of a frame that closes a batch (`{"batch_start":` + 20 digits + `}`).
const MAX_CLOSE: usize = 36;

/// The first frame after a bad one at `at` that closes a batch: where that batch began, and
/// where the closing frame ends. Looks at every offset up to `data_end` (past it only zeros) for
/// a frame short enough to close a batch, so the scan is linear whatever the damage; a record's
/// bytes cannot pass for one (its JSON has no zero byte, a short frame's header has three).
fn first_close_after(bytes: &[u8], at: usize, data_end: usize) -> Option<(u64, usize)> {
    (at + 1..data_end).find_map(|i| {
        let rest = &bytes[i..];
        let len = rest.get(..4).map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)?;
        if len > MAX_CLOSE {
            return None;
        }
        let payload = whole_frame(rest)?;
        batch_start(payload).map(|start| (start, i + 8 + payload.len()))
    })
}

/// Result of reading one file of frames.
pub(super) struct Frames {
    pub(super) payloads: Vec<Vec<u8>>,
    /// Where the valid frames end.
    pub(super) end: u64,
    /// The file's length: past `end` there are only zeros (unused preallocated space) or, with
    /// `torn`, a torn frame or the whole torn batch it was in.
    pub(super) len: u64,
    /// A frame cut short or damaged follows `end` (a crash mid-write).
    pub(super) torn: bool,
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads the frames of a file: its records, in order (the frames that close batches are not
/// records and are left out). The frames end where only zeros follow (preallocated space never
/// written). A bad frame is torn, and cut, when it is in the last batch written: nothing was
/// written past it (its header or payload runs past the data: a write cut short; cut there), or
/// its own batch's closing frame landed after it with nothing after that, or data but no closing
/// frame follows it in a file with batches (a sector lost before one that landed; the whole batch
/// is cut). A bad frame with a later batch after it is damage, and an error, and so is one with
/// data after it in a log written before batches were closed. (No frame is empty, so a zero
/// header is never a frame.)
pub(super) fn read_frames(disk: &impl Disk, path: &Path) -> Result<Frames, WalError> {
    let bytes = disk.read(path).map_err(io_err(path))?;
    let mut payloads = Vec::new();
    let mut at = 0usize;
    // Where the batch being read began (the end of the last closing frame), and how many records
    // came before it; `None` until a batch has closed in this file.
    let mut batch: Option<(usize, usize)> = None;
    let done =
        |payloads, at: usize, torn| Ok(Frames { payloads, end: at as u64, len: bytes.len() as u64, torn });
    while at < bytes.len() {
        let rest = &bytes[at..];
        if all_zero(rest) {
            return done(payloads, at, false);
        }
        let Some(payload) = whole_frame(rest) else {
            let len = rest.get(..4).map_or(0, |h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize);
            let data_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
            // Nothing written past the bad frame's own extent: a write cut short.
            let tail = at.saturating_add(8).saturating_add(len) >= data_end;
            let cut = match (first_close_after(&bytes, at, data_end), batch) {
                // The bad frame's own batch closed after it, and nothing after that: the batch
                // was written last, and lost a sector before one that landed.
                (Some((start, end)), batch)
                    if end >= data_end && start == batch.map_or(0, |(b, _)| b as u64) =>
                {
                    Some(batch.unwrap_or((0, 0)))
                }
                // A later batch after the bad frame: its own batch was synced, so this is damage.
                (Some(_), _) => None,
                (None, _) if tail => Some((at, payloads.len())),
                // Data after the bad frame but no closing frame: the last batch, with a sector
                // lost and its end too (in a file with batches; an older log has none).
                (None, Some(open)) => Some(open),
                (None, None) => None,
            };
            let Some((end, records)) = cut else {
                return Err(WalError::Corrupt {
                    path: path.to_owned(),
                    offset: at as u64,
                    reason: "checksum mismatch with more data after it".into(),
                });
            };
            payloads.truncate(records);
            return done(payloads, end, true);
        };
        at += 8 + payload.len();
        if batch_start(payload).is_some() {
            batch = Some((at, payloads.len()));
        } else {
            payloads.push(payload.to_vec());
        }
    }
    done(payloads, at, false)
}

pub(super) fn numbered(
    disk: &impl Disk,
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for path in disk.list(dir).map_err(io_err(dir))? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(n) = name.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix)) {
            if let Ok(n) = n.parse::<u64>() {
                out.push((n, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:020}.log"))
}

pub(super) fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:020}.bin"))
}

pub(super) fn sync_dir(disk: &impl Disk, dir: &Path) -> Result<(), WalError> {
    disk.sync_dir(dir).map_err(io_err(dir))
}
