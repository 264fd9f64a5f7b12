//! The client side of `GET /v1/locks/{key}/watch`: reads the server's server-sent events and
//! answers each `status` event as a [`LockInfo`].
//!
//! The server sends a keep-alive comment every few seconds, so a stream that stays silent for
//! [`SILENCE`] is taken as dead (a partition, a server paused or gone) and reported as
//! `Unavailable`; [`crate::LeaderWatch`] then opens a new one, through the next server if the
//! URL names several.

use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt;

use crate::backend::StatusWatch;
use crate::error::{Error, ErrorCode, Result};
use crate::types::LockInfo;
use crate::wire::ErrorBody;

/// Longest silence on a watch stream before it is given up (the server's keep-alive comes
/// every 5 s).
pub(super) const SILENCE: Duration = Duration::from_secs(20);
/// Largest event accepted: a status with every holder of a full semaphore fits well inside.
const MAX_EVENT_BYTES: usize = 4 << 20;

/// One open watch stream.
pub(super) struct SseWatch {
    body: hyper::body::Incoming,
    key: String,
    base: String,
    events: SseBuffer,
}

impl SseWatch {
    pub(super) fn new(body: hyper::body::Incoming, key: String, base: String) -> SseWatch {
        SseWatch { body, key, base, events: SseBuffer::default() }
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("lock server {}: watching {}: {why}", self.base, self.key))
    }
}

/// The bytes of a server-sent event stream, cut into events.
#[derive(Default)]
struct SseBuffer {
    /// What has arrived and is not yet an event, line ends made `\n`.
    buf: Vec<u8>,
    /// How far `buf` has been searched for a blank line (the end of an event).
    scanned: usize,
    /// The last byte that arrived was a `\r` (its `\n`, if any, may come in the next frame).
    after_cr: bool,
}

impl SseBuffer {
    /// Adds what arrived. Lines end with LF, CRLF or CR (the format allows all three): all
    /// become LF, even when a CRLF is split between two frames.
    fn push(&mut self, data: &[u8]) {
        for &b in data {
            match (b, self.after_cr) {
                (b'\n', true) => {}
                (b'\r', _) => self.buf.push(b'\n'),
                (b, _) => self.buf.push(b),
            }
            self.after_cr = b == b'\r';
        }
    }

    /// Bytes waiting to become an event.
    fn len(&self) -> usize {
        self.buf.len()
    }

    /// The next whole event, if one has arrived: its name (`message` unless named) and its data
    /// (`data:` lines joined with `\n`). Comments and events without data are skipped.
    fn take_event(&mut self) -> Option<(String, String)> {
        loop {
            let from = self.scanned.saturating_sub(1);
            let Some(at) = self.buf[from..].windows(2).position(|w| w == b"\n\n") else {
                self.scanned = self.buf.len();
                return None;
            };
            let raw: Vec<u8> = self.buf.drain(..from + at + 2).collect();
            self.scanned = 0;
            let text = String::from_utf8_lossy(&raw);
            let (mut name, mut data) = (String::from("message"), None::<String>);
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.strip_prefix(' ').unwrap_or(v).to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(v);
                        }
                        None => data = Some(v.to_owned()),
                    }
                }
            }
            if let Some(data) = data {
                return Some((name, data));
            }
        }
    }
}

#[async_trait]
impl StatusWatch for SseWatch {
    async fn next(&mut self) -> Result<LockInfo> {
        loop {
            if let Some((name, data)) = self.events.take_event() {
                return match name.as_str() {
                    "status" => serde_json::from_str(&data)
                        .map_err(|e| self.unavailable(format_args!("unreadable status: {e}"))),
                    "error" => Err(match serde_json::from_str::<ErrorBody>(&data) {
                        Ok(body) => {
                            let code = body.error.code.parse().unwrap_or(ErrorCode::Internal);
                            code.to_error(&self.key, body.error)
                        }
                        Err(e) => self.unavailable(format_args!("unreadable error: {e}")),
                    }),
                    _ => continue,
                };
            }
            let frame = match tokio::time::timeout(SILENCE, self.body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => return Err(self.unavailable(e)),
                Ok(None) => return Err(self.unavailable("the server ended the stream")),
                Err(_) => return Err(self.unavailable(format_args!("nothing heard for {SILENCE:?}"))),
            };
            if let Ok(data) = frame.into_data() {
                self.events.push(&data);
                if self.events.len() > MAX_EVENT_BYTES {
                    return Err(self.unavailable("an event over 4 MiB"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SseBuffer;

    fn events(frames: &[&[u8]]) -> Vec<(String, String)> {
        let mut b = SseBuffer::default();
        let mut out = Vec::new();
        for f in frames {
            b.push(f);
            while let Some(e) = b.take_event() {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn events_across_frames_and_line_endings() {
        let status = |d: &str| ("status".to_owned(), d.to_owned());
        // LF, a keep-alive comment, an event cut in the middle of its data.
        assert_eq!(events(&[b": keep\n\nevent: status\ndata: {\"a\"", b":1}\n\n"]), [status("{\"a\":1}")]);
        // CRLF split between frames, CR alone, several data lines, an unnamed event.
        assert_eq!(
            events(&[b"event: status\r", b"\ndata: x\r\ndata: y\r\n\r\n", b"data: z\r\r"]),
            [status("x\ny"), ("message".to_owned(), "z".to_owned())]
        );
        // An empty data line is data; an event with none is skipped; nothing whole yet is kept.
        assert_eq!(
            events(&[b"data:\n\nevent: x\n\n", b"data: half"]),
            [("message".to_owned(), String::new())]
        );
    }
}
