//! The one table of error codes: each stable `code` string of the HTTP API with its HTTP status,
//! the exit code of the `distlock` CLI, and the [`Error`] a client makes of it.
//!
//! The server builds its error answers from it, the `http://` client maps an error body back to
//! an [`Error`] through it, [`Error::code`] names a variant with it, and the CLI exits with its
//! [`ErrorCode::exit_code`]; docs/SERVER.md (errors) and docs/CLI.md (exit codes) document it.

use crate::error::{Error, LossReason};

/// A stable, machine-readable error code of the HTTP API (`{"error":{"code":…}}`) and of the
/// CLI's `--json` errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: a bad key, TTL, wait, holder, body or query; nothing was changed.
    InvalidRequest,
    /// 401: no or an unknown bearer token (or force-release without an admin token).
    Unauthorized,
    /// 403: a known token whose scopes do not cover this operation on this key.
    Forbidden,
    /// 403: force-release on a server where no token has an `admin:` scope.
    AdminDisabled,
    /// 404: no such route.
    NotFound,
    /// 404: force-release of a lock nobody holds.
    NotHeld,
    /// 409: the lock is held by someone else (also after a wait that ran out).
    LockHeld,
    /// 409: the lease expired, was released, or never existed.
    LeaseLost,
    /// 409: the key is held with another limit (permits) than asked; the answer's `limit` is
    /// the current one.
    LimitMismatch,
    /// 413: the request body is over the server's limit.
    PayloadTooLarge,
    /// 429: a lease, waiter or request-rate limit of the server.
    LimitExceeded,
    /// 500: the server failed in a way none of the other codes describes.
    Internal,
    /// 501: the server's store cannot do this (waiters, force-release behind Redis).
    NotSupported,
    /// 503: the store is down or failed to write.
    BackendUnavailable,
    /// 503 (with `Retry-After: 1`): a waiting acquire answered because the server shuts down;
    /// nothing was granted, and the call may be made again at once.
    ShuttingDown,
}

/// CLI exit code: invalid input or usage.
const EXIT_USAGE: u8 = 64;
/// CLI exit code: the backend is unavailable.
const EXIT_UNAVAILABLE: u8 = 69;
/// CLI exit code: not acquired (held by someone else, or a server limit).
const EXIT_HELD: u8 = 75;
/// CLI exit code: the lease is lost.
const EXIT_LOST: u8 = 76;
/// CLI exit code: unauthorized or forbidden.
const EXIT_NOPERM: u8 = 77;

impl ErrorCode {
    /// Every code, in the order of docs/SERVER.md's table.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::AdminDisabled,
        ErrorCode::NotFound,
        ErrorCode::NotHeld,
        ErrorCode::LockHeld,
        ErrorCode::LeaseLost,
        ErrorCode::LimitMismatch,
        ErrorCode::PayloadTooLarge,
        ErrorCode::LimitExceeded,
        ErrorCode::Internal,
        ErrorCode::NotSupported,
        ErrorCode::BackendUnavailable,
        ErrorCode::ShuttingDown,
    ];

    /// The code string on the wire (`lock_held`, ...); never changes for a code.
    pub const fn as_str(self) -> &'static str {
        self.row().0
    }

    /// The HTTP status the server answers with this code.
    pub const fn http_status(self) -> u16 {
        self.row().1
    }

    /// The exit code of the `distlock` CLI when a call fails with this code (docs/CLI.md): the
    /// codes a client turns into [`Error::Unavailable`] exit 69 like it.
    pub const fn exit_code(self) -> u8 {
        self.row().2
    }

    /// The table: code string, HTTP status, CLI exit code.
    const fn row(self) -> (&'static str, u16, u8) {
        match self {
            ErrorCode::InvalidRequest => ("invalid_request", 400, EXIT_USAGE),
            ErrorCode::Unauthorized => ("unauthorized", 401, EXIT_NOPERM),
            ErrorCode::Forbidden => ("forbidden", 403, EXIT_NOPERM),
            ErrorCode::AdminDisabled => ("admin_disabled", 403, EXIT_NOPERM),
            ErrorCode::NotFound => ("not_found", 404, EXIT_UNAVAILABLE),
            ErrorCode::NotHeld => ("not_held", 404, EXIT_UNAVAILABLE),
            ErrorCode::LockHeld => ("lock_held", 409, EXIT_HELD),
            ErrorCode::LeaseLost => ("lease_lost", 409, EXIT_LOST),
            ErrorCode::LimitMismatch => ("limit_mismatch", 409, EXIT_USAGE),
            ErrorCode::PayloadTooLarge => ("payload_too_large", 413, EXIT_USAGE),
            ErrorCode::LimitExceeded => ("limit_exceeded", 429, EXIT_HELD),
            ErrorCode::Internal => ("internal", 500, EXIT_UNAVAILABLE),
            ErrorCode::NotSupported => ("not_supported", 501, EXIT_UNAVAILABLE),
            ErrorCode::BackendUnavailable => ("backend_unavailable", 503, EXIT_UNAVAILABLE),
            ErrorCode::ShuttingDown => ("shutting_down", 503, EXIT_UNAVAILABLE),
        }
    }

    /// The [`Error`] a client makes of an error answer with this code about `key`: `lock_held`
    /// is [`Error::Held`] (a client's wait loop turns it into [`Error::WaitTimeout`]), and the
    /// codes that say the server or its store failed are [`Error::Unavailable`].
    pub fn to_error(self, key: &str, detail: crate::wire::ErrorDetail) -> Error {
        let crate::wire::ErrorDetail { message, holder, limit, .. } = detail;
        match self {
            ErrorCode::LimitMismatch => match limit {
                Some(limit) => Error::LimitMismatch { key: key.to_owned(), limit },
                None => Error::InvalidInput(message),
            },
            ErrorCode::LockHeld => Error::Held { key: key.to_owned(), holder },
            ErrorCode::LeaseLost => Error::LeaseLost { key: key.to_owned(), reason: LossReason::NotOwner },
            ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge => Error::InvalidInput(message),
            ErrorCode::Unauthorized | ErrorCode::AdminDisabled => Error::Unauthorized(message),
            // A known token without the scope for this key: the token, not the call, must change.
            ErrorCode::Forbidden => Error::Unauthorized(format!("forbidden: {message}")),
            ErrorCode::LimitExceeded => Error::LimitExceeded(message),
            ErrorCode::ShuttingDown => Error::Unavailable(format!(
                "the server is shutting down or restarting (nothing was granted; retry): {message}"
            )),
            ErrorCode::NotFound
            | ErrorCode::NotHeld
            | ErrorCode::Internal
            | ErrorCode::NotSupported
            | ErrorCode::BackendUnavailable => Error::Unavailable(message),
        }
    }
}

/// A code string this version does not know (a newer server's, or not a code at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownCode(pub String);

impl std::str::FromStr for ErrorCode {
    type Err = UnknownCode;

    /// The code of a code string ([`ErrorCode::as_str`] backwards).
    fn from_str(code: &str) -> Result<ErrorCode, UnknownCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code).ok_or_else(|| UnknownCode(code.to_owned()))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/SERVER.md's error table and docs/CLI.md's exit codes, copied by hand: a change to
    /// either side must change this list too.
    const DOCUMENTED: [(&str, u16, u8); 15] = [
        ("invalid_request", 400, 64),
        ("unauthorized", 401, 77),
        ("forbidden", 403, 77),
        ("admin_disabled", 403, 77),
        ("not_found", 404, 69),
        ("not_held", 404, 69),
        ("lock_held", 409, 75),
        ("lease_lost", 409, 76),
        ("limit_mismatch", 409, 64),
        ("payload_too_large", 413, 64),
        ("limit_exceeded", 429, 75),
        ("internal", 500, 69),
        ("not_supported", 501, 69),
        ("backend_unavailable", 503, 69),
        ("shutting_down", 503, 69),
    ];

    #[test]
    fn every_code_round_trips_and_matches_the_documented_tables() {
        assert_eq!(ErrorCode::ALL.len(), DOCUMENTED.len());
        for (code, (name, status, exit)) in ErrorCode::ALL.into_iter().zip(DOCUMENTED) {
            assert_eq!(code.as_str(), name);
            assert_eq!(name.parse(), Ok(code));
            assert_eq!(code.to_string(), name);
            assert_eq!((code.http_status(), code.exit_code()), (status, exit), "{name}");
        }
        assert_eq!("wait_timeout".parse::<ErrorCode>(), Err(UnknownCode("wait_timeout".into())));
    }

    /// The error a client makes of a code exits the CLI with that code's exit code, and names a
    /// code of the same HTTP status (so it maps back to an answer of the same kind).
    #[test]
    fn the_error_of_a_code_keeps_its_exit_code() {
        for code in ErrorCode::ALL {
            let detail = crate::wire::ErrorDetail {
                code: code.as_str().into(),
                message: "why".into(),
                holder: Some("h".into()),
                limit: Some(3),
            };
            let e = code.to_error("k", detail);
            assert_eq!(e.code().exit_code(), code.exit_code(), "{code}");
        }
    }

    #[test]
    fn every_error_variant_has_a_code() {
        use std::time::Duration;
        let held = Error::Held { key: "k".into(), holder: None };
        let timeout = Error::WaitTimeout { key: "k".into(), holder: None, waited: Duration::ZERO };
        assert_eq!(held.code(), ErrorCode::LockHeld);
        assert_eq!(timeout.code(), ErrorCode::LockHeld);
        assert_eq!(Error::not_owner("k").code(), ErrorCode::LeaseLost);
        assert_eq!(Error::LimitMismatch { key: "k".into(), limit: 3 }.code(), ErrorCode::LimitMismatch);
        assert_eq!(Error::InvalidInput(String::new()).code(), ErrorCode::InvalidRequest);
        assert_eq!(Error::Unauthorized(String::new()).code(), ErrorCode::Unauthorized);
        assert_eq!(Error::LimitExceeded(String::new()).code(), ErrorCode::LimitExceeded);
        assert_eq!(Error::Unavailable(String::new()).code(), ErrorCode::BackendUnavailable);
    }
}
