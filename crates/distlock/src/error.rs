//! The one error type of the crate: each variant is an outcome a caller can act on.

use std::time::Duration;

pub use crate::error_code::{ErrorCode, UnknownCode};

/// Why a lease stopped protecting its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The store no longer knows this lease: it expired there, was released, or never existed.
    NotOwner,
    /// The holder's own conservative deadline passed without a successful renewal
    /// (the store may be unreachable; someone else may be granted the lock from now on).
    Expired,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::NotOwner => f.write_str("the store does not hold this lease any more"),
            LossReason::Expired => f.write_str("the lease deadline passed without a successful renewal"),
        }
    }
}

/// Everything that can go wrong when taking, keeping or giving back a lock.
///
/// The variants are the decisions a caller makes: try later ([`Error::Held`],
/// [`Error::WaitTimeout`]), stop the work the lock protected ([`Error::LeaseLost`]), fix the call
/// ([`Error::InvalidInput`]), or treat the store as down ([`Error::Unavailable`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use distlock::{AcquireOptions, Error, Locker};
///
/// let locker = Locker::open("memory://").await.unwrap();
/// let _held = locker.acquire("deploy", &AcquireOptions::new().holder("ci-1")).await.unwrap();
/// match locker.acquire("deploy", &AcquireOptions::new()).await {
///     Err(Error::Held { holder, .. }) => assert_eq!(holder.as_deref(), Some("ci-1")),
///     other => panic!("expected Held, got {other:?}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock is held by someone else and the caller asked not to wait.
    #[error("lock {key:?} is held{}", holder_suffix(.holder))]
    Held {
        /// The key asked for.
        key: String,
        /// The current holder's label, where the backend knows it.
        holder: Option<String>,
    },
    /// The lock stayed held by someone else for the whole wait.
    #[error("timed out after {:.1}s waiting for lock {key:?}{}", .waited.as_secs_f64(), holder_suffix(.holder))]
    WaitTimeout {
        /// The key asked for.
        key: String,
        /// The holder's label when the wait ended, where the backend knows it.
        holder: Option<String>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lease is no longer held by the caller: it expired, was released, was never granted,
    /// or could not be renewed before its deadline. Work protected by it must stop.
    #[error("lease on {key:?} lost: {reason}")]
    LeaseLost {
        /// The key of the lost lease.
        key: String,
        /// Why it was lost.
        reason: LossReason,
    },
    /// The key is held with another number of permits than the caller asked for (a semaphore of
    /// `limit`, or a lock when `limit` is 1): every holder of a key must name the same limit.
    /// Nothing was changed.
    #[error("lock {key:?} is held with limit {limit}; every holder of a key must ask for the same limit")]
    LimitMismatch {
        /// The key asked for.
        key: String,
        /// The limit its current holders were granted with.
        limit: u32,
    },
    /// The request itself is wrong (key, TTL, URL, ...); nothing was changed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The server refused the credentials (missing or wrong bearer token); nothing was changed.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A server-side limit (number of leases or waiters) refused the request; nothing was changed.
    #[error("limit reached: {0}")]
    LimitExceeded(String),
    /// The store could not be reached or answered with an error; the outcome is unknown only
    /// for renew and release (for acquire, a lease the caller never saw expires by its TTL).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

fn holder_suffix(holder: &Option<String>) -> String {
    match holder {
        Some(h) if !h.is_empty() => format!(" by {h:?}"),
        _ => String::new(),
    }
}

impl Error {
    /// The stable code of this error, as the HTTP API and `--json` write it (see [`ErrorCode`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Held { .. } | Error::WaitTimeout { .. } => ErrorCode::LockHeld,
            Error::LeaseLost { .. } => ErrorCode::LeaseLost,
            Error::LimitMismatch { .. } => ErrorCode::LimitMismatch,
            Error::InvalidInput(_) => ErrorCode::InvalidRequest,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Error::Unavailable(_) => ErrorCode::BackendUnavailable,
        }
    }

    /// The error body of the HTTP API (and of the CLI's `--json`) for this error, with `message`
    /// as its text: the code, and the holder or limit a caller can act on.
    pub fn detail(&self, message: impl Into<String>) -> crate::wire::ErrorDetail {
        let (holder, limit) = match self {
            Error::Held { holder, .. } | Error::WaitTimeout { holder, .. } => (holder.clone(), None),
            Error::LimitMismatch { limit, .. } => (None, Some(*limit)),
            _ => (None, None),
        };
        crate::wire::ErrorDetail {
            code: self.code().as_str().to_owned(),
            message: message.into(),
            holder,
            limit,
        }
    }

    /// `true` for [`Error::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }

    pub(crate) fn not_owner(key: &str) -> Error {
        Error::LeaseLost { key: key.to_owned(), reason: LossReason::NotOwner }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
