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
    buf: Vec<u8>,
}

impl SseWatch {
    pub(super) fn new(body: hyper::body::Incoming, key: String, base: String) -> SseWatch {
        SseWatch { body, key, base, buf: Vec::new() }
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("lock server {}: watching {}: {why}", self.base, self.key))
    }

    /// The next whole event in the buffer, if one has arrived: its name and its data.
    fn take_event(&mut self) -> Option<(String, String)> {
        loop {
            let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
            let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&raw);
            let (mut name, mut data) = (String::from("message"), String::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            // A comment alone (the keep-alive) is no event.
            if !data.is_empty() {
                return Some((name, data));
            }
        }
    }
}

#[async_trait]
impl StatusWatch for SseWatch {
    async fn next(&mut self) -> Result<LockInfo> {
        loop {
            if let Some((name, data)) = self.take_event() {
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
                // Servers may end lines with CRLF; events are split on blank lines.
                self.buf.extend(data.iter().filter(|&&b| b != b'\r'));
                if self.buf.len() > MAX_EVENT_BYTES {
                    return Err(self.unavailable("an event over 4 MiB"));
                }
            }
        }
    }
}
