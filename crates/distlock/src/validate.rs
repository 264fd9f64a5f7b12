//! Checks of everything a caller hands in, done once at the boundary so backends can trust it.
//!
//! The bounds are part of the API and documented here:
//! - a key is 1 to [`MAX_KEY_CHARS`] characters (Unicode scalar values, so at most 4 KiB of
//!   UTF-8) and contains no NUL character (namespace prefix included);
//! - a TTL is from [`MIN_TTL`] (100 ms) to [`MAX_TTL`] (24 h);
//! - a holder label is at most [`MAX_HOLDER_CHARS`] characters with no control characters.
//!
//! Lengths count characters, as JSON Schema's `maxLength` does, so the published OpenAPI
//! document states the exact bounds (a byte bound cannot be written there).

use std::time::Duration;

use crate::error::{Error, Result};

/// The longest key, in characters, including the namespace prefix.
pub const MAX_KEY_CHARS: usize = 1024;
/// The shortest TTL a lease may have.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// The longest TTL a lease may have.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest holder label, in characters.
pub const MAX_HOLDER_CHARS: usize = 256;
/// The most permits a semaphore may have (`limit`).
pub const MAX_LIMIT: u32 = 10_000;
/// The longest value a lease may publish (a leader's address or id), in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Checks a full key (namespace included).
///
/// ```
/// assert!(distlock::validate::key("jobs/nightly-backup").is_ok());
/// assert!(distlock::validate::key("").is_err());
/// assert!(distlock::validate::key("a\0b").is_err());
/// ```
pub fn key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidInput("key must not be empty".into()));
    }
    let chars = key.chars().count();
    if chars > MAX_KEY_CHARS {
        return Err(Error::InvalidInput(format!("key is {chars} characters; the limit is {MAX_KEY_CHARS}")));
    }
    if key.contains('\0') {
        return Err(Error::InvalidInput("key must not contain NUL".into()));
    }
    Ok(())
}

/// Checks a TTL against [`MIN_TTL`] and [`MAX_TTL`].
///
/// ```
/// use std::time::Duration;
/// assert!(distlock::validate::ttl(Duration::from_secs(30)).is_ok());
/// assert!(distlock::validate::ttl(Duration::from_millis(99)).is_err());
/// ```
pub fn ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(Error::InvalidInput(format!(
            "ttl {ttl:?} is out of bounds; it must be from 100ms to 24h"
        )));
    }
    Ok(())
}

/// Checks a semaphore's permits: 1 (a lock) to [`MAX_LIMIT`].
///
/// ```
/// assert!(distlock::validate::limit(3).is_ok());
/// assert!(distlock::validate::limit(0).is_err());
/// ```
pub fn limit(limit: u32) -> Result<()> {
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Error::InvalidInput(format!(
            "limit {limit} is out of bounds; it must be from 1 to {MAX_LIMIT}"
        )));
    }
    Ok(())
}

/// Checks a holder label.
pub fn holder(holder: &str) -> Result<()> {
    let chars = holder.chars().count();
    if chars > MAX_HOLDER_CHARS {
        return Err(Error::InvalidInput(format!(
            "holder label is {chars} characters; the limit is {MAX_HOLDER_CHARS}"
        )));
    }
    if holder.chars().any(char::is_control) {
        return Err(Error::InvalidInput("holder label must not contain control characters".into()));
    }
    Ok(())
}

/// Checks a value a lease publishes: at most [`MAX_VALUE_BYTES`] bytes of UTF-8 (any text,
/// control characters included: it is data, never a label in a log line).
///
/// ```
/// assert!(distlock::validate::value("10.0.0.7:8080").is_ok());
/// assert!(distlock::validate::value(&"x".repeat(5000)).is_err());
/// ```
pub fn value(value: &str) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::InvalidInput(format!(
            "value is {} bytes; the limit is {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}
