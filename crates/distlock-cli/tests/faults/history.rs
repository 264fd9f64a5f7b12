//! What every client process records: one JSON event per line, stamped with the machine-wide
//! monotonic clock (CLOCK_MONOTONIC, shared by all processes and unaffected by SIGSTOP or a
//! wall-clock jump), so histories of several processes merge into one timeline.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Nanoseconds on the machine-wide monotonic clock.
pub fn now_ns() -> i64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// A Tokio instant on the same clock.
pub fn ns_of(instant: tokio::time::Instant) -> i64 {
    let now = tokio::time::Instant::now();
    if instant >= now {
        now_ns() + (instant - now).as_nanos() as i64
    } else {
        now_ns() - (now - instant).as_nanos() as i64
    }
}

/// The key of index `i` of `keys` named after `base`: `base` itself when there is one key.
pub fn key_name(base: &str, i: u32, keys: u32) -> String {
    if keys <= 1 {
        base.to_owned()
    } else {
        format!("{base}-{i}")
    }
}

/// Where client `c` records its history of key `i` (of `keys`) in `dir`: one file per client and
/// key, so that each key's checks read only its own.
pub fn history_path(dir: &Path, c: u32, i: u32, keys: u32) -> std::path::PathBuf {
    if keys <= 1 {
        dir.join(format!("client-{c}.jsonl"))
    } else {
        dir.join(format!("client-{c}.key-{i}.jsonl"))
    }
}

/// One thing a client did or saw. `c` is the client number, times are [`now_ns`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Event {
    /// An acquire succeeded: requested at `t_req`, answered at `t`.
    Grant { c: u32, t_req: i64, t: i64, token: u64, safe_until: i64 },
    /// An acquire failed with error `code`.
    Fail { c: u32, t_req: i64, t: i64, code: String },
    /// A write to the fenced resource with the lease's token. `believed`: the holder checked its
    /// lease valid at `t_check` just before sending; `safe_until`: its deadline then.
    Write { c: u32, token: u64, believed: bool, t_check: i64, t_ack: i64, accepted: bool, safe_until: i64 },
    /// The lease was lost while held, for `reason`; `safe_until` is where the holder's deadline
    /// stood when it noticed (later than `t` means the store dropped a lease it should have kept).
    Lost { c: u32, token: u64, t: i64, reason: String, safe_until: i64 },
    /// A release sent at `t_req`: `ok` or the error code.
    Release { c: u32, token: u64, t_req: i64, t: i64, code: Option<String> },
    /// A status read sent at `t_req`, answered at `t`: the fencing tokens of every holder it
    /// named (empty: free; `taken`: held with no token yet, a Redis hand-off under way).
    Status { c: u32, t_req: i64, t: i64, tokens: Vec<u64>, taken: bool },
}

/// Appends events to a file, one line each, written through at once (a client may be killed).
pub struct Recorder {
    file: std::fs::File,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        Ok(Recorder { file: std::fs::OpenOptions::new().create(true).append(true).open(path)? })
    }

    pub fn record(&mut self, event: &Event) {
        if let Ok(mut line) = serde_json::to_vec(event) {
            line.push(b'\n');
            let _ = self.file.write_all(&line);
        }
    }
}

/// Reads every client's history file into one list.
pub fn load(paths: &[std::path::PathBuf]) -> Vec<Event> {
    let mut events = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else { continue };
        // A torn last line (a client killed mid-write) is skipped.
        events.extend(text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()));
    }
    events
}
