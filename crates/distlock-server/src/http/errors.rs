//! The one error shape of the API and the request checks that produce it.
//!
//! Errors are always `{"error":{"code":"...","message":"..."}}` (plus `"holder"` for
//! `lock_held`) with a stable `code`: `invalid_request` (400), `unauthorized` (401),
//! `not_found` (404), `payload_too_large` (413), `lock_held` / `lease_lost` (409),
//! `limit_exceeded` (429), `backend_unavailable` (503), `shutting_down` (503 with `Retry-After: 1`:
//! a waiting acquire when the server shuts down; retryable), `internal` (500); for the operator
//! routes also `admin_disabled` (403), `not_held` (404) and `not_supported` (501). Every variant
//! of [`distlock::Error`] maps to one code here, so the client can map it back.

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use distlock::{validate, Error};
use serde::{Deserialize, Serialize};

use super::MAX_BODY_BYTES;
use crate::auth::Forbidden;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) holder: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), holder: None }
    }

    pub(super) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// The answer to a waiting acquire when the server shuts down: nothing was granted, and the
    /// same call may be made again at once (on this server once restarted, or another).
    pub(super) fn shutting_down() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SHUTTING_DOWN,
            "the lock server is shutting down (restarting?); nothing was granted: retry the acquire",
        )
    }
}

/// Error code of a waiting acquire answered because the server shuts down (503, `Retry-After: 1`).
pub const SHUTTING_DOWN: &str = "shutting_down";

#[derive(Serialize)]
pub(super) struct ErrorBody<'a> {
    pub(super) error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub(super) struct ErrorDetail<'a> {
    pub(super) code: &'a str,
    pub(super) message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) holder: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("distlock_errors_total", "code" => self.code).increment(1);
        let body = ErrorBody {
            error: ErrorDetail { code: self.code, message: &self.message, holder: self.holder.as_deref() },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.code == SHUTTING_DOWN {
            response.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<Forbidden> for ApiError {
    fn from(f: Forbidden) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", f.message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let message = e.to_string();
        match e {
            Error::Held { holder, .. } | Error::WaitTimeout { holder, .. } => {
                ApiError { holder, ..ApiError::new(StatusCode::CONFLICT, "lock_held", message) }
            }
            Error::LeaseLost { .. } => ApiError::new(StatusCode::CONFLICT, "lease_lost", message),
            Error::InvalidInput(_) => ApiError::invalid(message),
            Error::Unauthorized(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message),
            Error::LimitExceeded(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
            }
            Error::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
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
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body over {MAX_BODY_BYTES} bytes"),
            )
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
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
}
