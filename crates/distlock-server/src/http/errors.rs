//! The one error shape of the API and the request checks that produce it.
//!
//! Errors are always [`distlock::wire::ErrorBody`], `{"error":{"code":"...","message":"..."}}`
//! (plus `"holder"` for `lock_held`), with a code of [`distlock::ErrorCode`], the one table that
//! also gives its HTTP status (`shutting_down` adds `Retry-After: 1`). Every variant of
//! [`distlock::Error`] names its code ([`distlock::Error::code`]), so the client maps it back.

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use distlock::wire::{ErrorBody, ErrorDetail};
use distlock::{validate, Error, ErrorCode};
use serde::Deserialize;

use super::MAX_BODY_BYTES;
use crate::auth::Forbidden;

/// An error answer: a code of [`ErrorCode`] (which gives the status) and a message.
#[derive(Debug)]
pub struct ApiError {
    pub(super) code: ErrorCode,
    pub(super) message: String,
    pub(super) holder: Option<String>,
    pub(super) limit: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), holder: None, limit: None }
    }

    pub(super) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    /// The answer to a waiting acquire when the server shuts down: nothing was granted, and the
    /// same call may be made again at once (on this server once restarted, or another).
    pub(super) fn shutting_down() -> ApiError {
        ApiError::new(
            ErrorCode::ShuttingDown,
            "the lock server is shutting down (restarting?); nothing was granted: retry the acquire",
        )
    }

    /// The HTTP status of this answer.
    pub(super) fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The body of this answer, counted in `distlock_errors_total`.
    pub(super) fn into_body(self) -> ErrorBody {
        metrics::counter!("distlock_errors_total", "code" => self.code.as_str()).increment(1);
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message,
                holder: self.holder,
                limit: self.limit,
            },
        }
    }
}

/// Error code of a waiting acquire answered because the server shuts down (503, `Retry-After: 1`).
pub const SHUTTING_DOWN: &str = ErrorCode::ShuttingDown.as_str();

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = (self.status(), self.code);
        let mut response = (status, Json(self.into_body())).into_response();
        if code == ErrorCode::ShuttingDown {
            response.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<Forbidden> for ApiError {
    fn from(f: Forbidden) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, f.message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let detail = e.detail(e.to_string());
        ApiError { code: e.code(), message: detail.message, holder: detail.holder, limit: detail.limit }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::invalid(format!("bad key in path: {}", r.body_text()))
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> ApiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, format!("request body over {MAX_BODY_BYTES} bytes"))
        } else {
            ApiError::invalid(format!("unreadable body: {}", r.body_text()))
        }
    }
}

/// Parses an optional JSON body: empty means all defaults.
pub(super) fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad JSON body: {e}")))
}

/// Parses a JSON body that must be there.
pub(super) fn parse_required<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad JSON body: {e}")))
}

pub(super) fn checked_key(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path?;
    validate::key(&key)?;
    Ok(key)
}

pub(super) fn checked_ttl(ttl_ms: Option<u64>) -> Result<Duration, ApiError> {
    let ttl = ttl_ms.map_or(distlock::options::DEFAULT_TTL, Duration::from_millis);
    validate::ttl(ttl)?;
    Ok(ttl)
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.json")
}
