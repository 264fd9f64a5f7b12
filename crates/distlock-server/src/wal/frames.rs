//! How the log sits on disk: a frame per record, `[len: u32 LE][crc32 of payload: u32 LE][payload:
//! JSON]`, and the numbered files (`wal-<n>.log`, `snapshot-<n>.bin`) that hold them. Reading
//! tells a torn tail (a crash mid-write, nothing after it) from damage (a bad frame with data
//! after it), because recovery cuts the one and refuses the other.

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

/// Result of reading one file of frames.
pub(super) struct Frames {
    pub(super) payloads: Vec<Vec<u8>>,
    /// Where the valid frames end.
    pub(super) end: u64,
    /// The file's length: past `end` there are only zeros (unused preallocated space) or, with
    /// `torn`, a torn frame.
    pub(super) len: u64,
    /// A frame cut short or damaged follows `end` (a crash mid-write).
    pub(super) torn: bool,
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads the frames of a file. The frames end where only zeros follow (preallocated space never
/// written). A bad frame is a torn tail when nothing was written after it: its header or payload
/// runs past the end of the file, or only zeros follow its payload. A bad frame with data after
/// it is damage, and an error. (No frame is empty, so a zero header is never a frame.)
pub(super) fn read_frames(disk: &impl Disk, path: &Path) -> Result<Frames, WalError> {
    let bytes = disk.read(path).map_err(io_err(path))?;
    let mut payloads = Vec::new();
    let mut at = 0usize;
    let done =
        |payloads, at: usize, torn| Ok(Frames { payloads, end: at as u64, len: bytes.len() as u64, torn });
    while at < bytes.len() {
        let rest = &bytes[at..];
        if all_zero(rest) {
            return done(payloads, at, false);
        }
        if rest.len() < 8 {
            return done(payloads, at, true);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if rest.len() - 8 < len {
            return done(payloads, at, true);
        }
        let payload = &rest[8..8 + len];
        if len == 0 || crc32fast::hash(payload) != crc {
            if all_zero(&rest[8 + len..]) {
                return done(payloads, at, true);
            }
            return Err(WalError::Corrupt {
                path: path.to_owned(),
                offset: at as u64,
                reason: "checksum mismatch with more data after it".into(),
            });
        }
        payloads.push(payload.to_vec());
        at += 8 + len;
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
