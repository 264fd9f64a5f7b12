//! The HTTP JSON API: routes, request checks, error mapping, auth, metrics.
//!
//! Errors are always `{"error":{"code":"...","message":"..."}}` (plus `"holder"` for
//! `lock_held`) with a stable `code`: `invalid_request` (400), `unauthorized` (401),
//! `not_found` (404), `payload_too_large` (413), `lock_held` / `lease_lost` (409),
//! `limit_exceeded` (429), `backend_unavailable` (503), `internal` (500).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use distlock::{validate, AcquireRequest, Backend, Error, LeaseId, LockInfo};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::store::EmbeddedStore;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest server-side wait one acquire may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The store locks live in.
    pub backend: Arc<dyn Backend>,
    /// The embedded store, when that is the backend (for its metrics).
    pub embedded: Option<Arc<EmbeddedStore>>,
    /// Accepted bearer tokens; `None` turns auth off.
    pub tokens: Option<Arc<HashSet<String>>>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The router with every route and layer.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/locks", get(list))
        .route("/v1/locks/{key}", get(status))
        .route("/v1/locks/{key}/acquire", post(acquire))
        .route("/v1/locks/{key}/renew", post(renew))
        .route("/v1/locks/{key}/release", post(release))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    holder: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), holder: None }
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("distlock_errors_total", "code" => self.code).increment(1);
        let body = ErrorBody {
            error: ErrorDetail { code: self.code, message: &self.message, holder: self.holder.as_deref() },
        };
        (self.status, Json(body)).into_response()
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
fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad JSON body: {e}")))
}

/// Parses a JSON body that must be there.
fn parse_required<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("bad JSON body: {e}")))
}

fn checked_key(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path?;
    validate::key(&key)?;
    Ok(key)
}

fn checked_ttl(ttl_ms: Option<u64>) -> Result<Duration, ApiError> {
    let ttl = ttl_ms.map_or(distlock::options::DEFAULT_TTL, Duration::from_millis);
    validate::ttl(ttl)?;
    Ok(ttl)
}

/// Body of `POST /v1/locks/{key}/acquire`; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    /// Lease TTL in ms (100 ..= 86,400,000; default 30,000).
    pub ttl_ms: Option<u64>,
    /// How long the server may wait for the key, in ms (default 0: try once; at most 3,600,000).
    pub wait_ms: Option<u64>,
    /// Holder label shown in status.
    pub holder: Option<String>,
}

/// Body of `POST /v1/locks/{key}/renew`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// The lease to renew.
    pub lease_id: String,
    /// New TTL in ms (default 30,000).
    pub ttl_ms: Option<u64>,
}

/// Body of `POST /v1/locks/{key}/release`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The lease to release.
    pub lease_id: String,
}

/// A granted or renewed lease.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseBody {
    /// The key.
    pub key: String,
    /// The lease's secret.
    pub lease_id: String,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The TTL applied, in ms.
    pub ttl_ms: u64,
    /// How long after receiving the request the server granted or renewed it, in ms (for the
    /// client's conservative deadline).
    pub waited_ms: u64,
}

impl LeaseBody {
    fn new(key: String, grant: &distlock::Grant, received: tokio::time::Instant) -> LeaseBody {
        LeaseBody {
            key,
            lease_id: grant.lease_id.to_string(),
            fencing_token: grant.fencing_token,
            ttl_ms: grant.ttl.as_millis() as u64,
            waited_ms: grant.counted_from.saturating_duration_since(received).as_millis() as u64,
        }
    }
}

async fn acquire(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseBody>, ApiError> {
    let started = tokio::time::Instant::now();
    let key = checked_key(path)?;
    let body: AcquireBody = parse_body(&body?)?;
    let ttl = checked_ttl(body.ttl_ms)?;
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(ApiError::invalid(format!("wait_ms is over the maximum of {}", MAX_WAIT.as_millis())));
    }
    let holder = body.holder.unwrap_or_default();
    validate::holder(&holder)?;
    let req =
        AcquireRequest { key: key.clone(), lease_id: LeaseId::generate(), holder, ttl, wait: Some(wait) };
    let grant = state.backend.acquire(req).await?;
    metrics::counter!("distlock_grants_total").increment(1);
    Ok(Json(LeaseBody::new(key, &grant, started)))
}

async fn renew(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseBody>, ApiError> {
    let started = tokio::time::Instant::now();
    let key = checked_key(path)?;
    let body: RenewBody = parse_required(&body?)?;
    let lease_id = LeaseId::parse(&body.lease_id)?;
    let ttl = checked_ttl(body.ttl_ms)?;
    let grant = state.backend.renew(&key, &lease_id, ttl).await?;
    metrics::counter!("distlock_renewals_total").increment(1);
    Ok(Json(LeaseBody::new(key, &grant, started)))
}

#[derive(Serialize)]
struct Released {
    key: String,
    released: bool,
}

async fn release(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Released>, ApiError> {
    let key = checked_key(path)?;
    let body: ReleaseBody = parse_required(&body?)?;
    let lease_id = LeaseId::parse(&body.lease_id)?;
    state.backend.release(&key, &lease_id).await?;
    metrics::counter!("distlock_releases_total").increment(1);
    Ok(Json(Released { key, released: true }))
}

async fn status(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LockInfo>, ApiError> {
    let key = checked_key(path)?;
    Ok(Json(state.backend.status(&key).await?))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
}

#[derive(Serialize)]
struct LockList {
    locks: Vec<LockInfo>,
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LockList>, ApiError> {
    let Query(q) = query.map_err(|r| ApiError::invalid(r.body_text()))?;
    if q.prefix.len() > validate::MAX_KEY_BYTES || q.prefix.contains('\0') {
        return Err(ApiError::invalid("prefix must be at most 1024 bytes without NUL"));
    }
    Ok(Json(LockList { locks: state.backend.list(&q.prefix).await? }))
}

async fn healthz(State(state): State<AppState>) -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok", "store": state.backend.name()}))).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    if let Some(store) = &state.embedded {
        let s = store.stats();
        metrics::gauge!("distlock_leases").set(s.leases as f64);
        metrics::gauge!("distlock_waiters").set(s.waiters as f64);
        metrics::counter!("distlock_expiries_total").absolute(s.expired_total);
        metrics::counter!("distlock_wal_syncs_total").absolute(s.syncs_total);
        metrics::counter!("distlock_wal_records_total").absolute(s.records_total);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
}

/// Bearer-token check for the API routes when tokens are configured.
async fn auth(State(state): State<AppState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(tokens) = &state.tokens {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|t| tokens.contains(t)) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Records request latency by route.
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".to_owned());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("distlock_request_seconds", "route" => route, "method" => method, "status" => status)
        .record(start.elapsed().as_secs_f64());
    response
}
