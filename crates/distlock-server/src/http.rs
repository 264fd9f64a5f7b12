//! The HTTP JSON API: routes, request checks, error mapping, auth, metrics.
//!
//! Errors are always `{"error":{"code":"...","message":"..."}}` (plus `"holder"` for
//! `lock_held`) with a stable `code`: `invalid_request` (400), `unauthorized` (401),
//! `not_found` (404), `payload_too_large` (413), `lock_held` / `lease_lost` (409),
//! `limit_exceeded` (429), `backend_unavailable` (503), `shutting_down` (503 with `Retry-After: 1`:
//! a waiting acquire when the server shuts down; retryable), `internal` (500); for the operator
//! routes also `admin_disabled` (403), `not_held` (404) and `not_supported` (501).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use distlock::{validate, AcquireRequest, Backend, Error, LeaseId, ListQuery, LockInfo, LockPage};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::auth::{Action, Auth, Caller, Forbidden, Lookup};
use crate::events::{self, Kind, SharedEvents};
use crate::history::Since;
use crate::listing::{self, Sort};
use crate::store::EmbeddedStore;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest server-side wait one acquire may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// What every handler shares.
pub struct AppState {
    /// The store locks live in.
    pub backend: Arc<dyn Backend>,
    /// The embedded store, when that is the backend (for its metrics).
    pub embedded: Option<Arc<EmbeddedStore>>,
    /// Bearer tokens and their scopes (auth is off when no token file was given).
    pub auth: Arc<Auth>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Live events for the web page.
    pub events: SharedEvents,
    /// Turns `true` when the server shuts down (ends event streams).
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The router with every route and layer.
pub fn router(state: AppState) -> Router {
    // One shared state: every request clones an `Arc`, not the fields.
    let state = Arc::new(state);
    let api = Router::new()
        .route("/v1/locks", get(list))
        .route("/v1/locks/{key}", get(status))
        .route("/v1/locks/{key}/acquire", post(acquire))
        .route("/v1/locks/{key}/renew", post(renew))
        .route("/v1/locks/{key}/release", post(release))
        .route("/v1/locks/{key}/waiters", get(waiters))
        .route("/v1/locks/{key}/timeline", get(timeline))
        .route("/v1/batch", post(batch))
        .route("/v1/info", get(info))
        .route("/v1/events", get(events_stream))
        .route("/metrics", get(metrics_text))
        .route("/v1/admin/locks/{key}/release", post(force_release))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
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

    /// The answer to a waiting acquire when the server shuts down: nothing was granted, and the
    /// same call may be made again at once (on this server once restarted, or another).
    fn shutting_down() -> ApiError {
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
    /// New TTL in ms (100 ..= 86,400,000); absent or `null`: the TTL the lease was granted or
    /// last renewed with.
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
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseBody>, ApiError> {
    let started = tokio::time::Instant::now();
    let key = checked_key(path)?;
    caller.check(Action::Lock, &key)?;
    let body: AcquireBody = parse_body(&body?)?;
    Ok(Json(do_acquire(&state, key, body, started).await?))
}

/// An acquire of a checked key: what the route and a batch both run.
async fn do_acquire(
    state: &AppState,
    key: String,
    body: AcquireBody,
    started: tokio::time::Instant,
) -> Result<LeaseBody, ApiError> {
    let ttl = checked_ttl(body.ttl_ms)?;
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0));
    if wait > MAX_WAIT {
        return Err(ApiError::invalid(format!("wait_ms is over the maximum of {}", MAX_WAIT.as_millis())));
    }
    let holder = body.holder.unwrap_or_default();
    validate::holder(&holder)?;
    // The label goes into the event history, kept whether anyone watches or not.
    let label = Some(holder.clone());
    // A waiting caller that leaves without an answer (it disconnected, or the server shut down)
    // ends its wait on the timeline.
    let mut left = (!wait.is_zero()).then(|| WaitGuard {
        events: state.events.clone(),
        key: key.clone(),
        holder: holder.clone(),
        armed: true,
    });
    let req =
        AcquireRequest { key: key.clone(), lease_id: LeaseId::generate(), holder, ttl, wait: Some(wait) };
    let acquire = state.backend.acquire(req);
    let outcome = if wait.is_zero() {
        acquire.await
    } else {
        // A long poll ends the moment the server starts shutting down (the acquire is dropped:
        // the caller leaves the queue, and a grant that raced with it is taken back), instead of
        // holding the caller for the whole grace period.
        let mut stopping = state.stopping.clone();
        let stopped = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            outcome = acquire => outcome,
            () = stopped => return Err(ApiError::shutting_down()),
        }
    };
    if let Some(guard) = left.as_mut() {
        guard.armed = false;
    }
    let grant = match outcome {
        Ok(g) => g,
        Err(e) => {
            if matches!(e, Error::WaitTimeout { .. }) {
                state.events.publish(Kind::WaitTimeout, &key, label.as_deref(), None);
            }
            return Err(e.into());
        }
    };
    metrics::counter!("distlock_grants_total").increment(1);
    state.events.publish_lease(
        Kind::Grant,
        &key,
        label.as_deref(),
        Some(grant.fencing_token),
        &grant.lease_id,
    );
    Ok(LeaseBody::new(key, &grant, started))
}

/// Publishes `wait_cancelled` when a waiting acquire is dropped before its store answered (the
/// client disconnected) or is answered `shutting_down`.
struct WaitGuard {
    events: SharedEvents,
    key: String,
    holder: String,
    armed: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.armed {
            self.events.publish(Kind::WaitCancelled, &self.key, Some(&self.holder), None);
        }
    }
}

async fn renew(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseBody>, ApiError> {
    let started = tokio::time::Instant::now();
    let key = checked_key(path)?;
    caller.check(Action::Lock, &key)?;
    let body: RenewBody = parse_required(&body?)?;
    Ok(Json(do_renew(&state, key, body, started).await?))
}

/// A renew of a checked key.
async fn do_renew(
    state: &AppState,
    key: String,
    body: RenewBody,
    started: tokio::time::Instant,
) -> Result<LeaseBody, ApiError> {
    let lease_id = LeaseId::parse(&body.lease_id)?;
    // Absent (or null): the store keeps the lease's own TTL.
    let ttl = body.ttl_ms.map(|ms| checked_ttl(Some(ms))).transpose()?;
    let grant =
        state.backend.renew(&key, &lease_id, ttl).await.inspect_err(|e| lost(state, &key, &lease_id, e))?;
    metrics::counter!("distlock_renewals_total").increment(1);
    Ok(LeaseBody::new(key, &grant, started))
}

/// Answer of a release.
#[derive(Debug, Serialize, Deserialize)]
pub struct Released {
    /// The key.
    pub key: String,
    /// Always `true` (a release that did not happen is an error).
    pub released: bool,
}

async fn release(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Released>, ApiError> {
    let key = checked_key(path)?;
    caller.check(Action::Lock, &key)?;
    let body: ReleaseBody = parse_required(&body?)?;
    Ok(Json(do_release(&state, key, body).await?))
}

/// A release of a checked key.
async fn do_release(state: &AppState, key: String, body: ReleaseBody) -> Result<Released, ApiError> {
    let lease_id = LeaseId::parse(&body.lease_id)?;
    // The embedded store tells whose lease it freed (for the event); for other stores the history
    // knows it when this server saw the grant.
    let freed = match &state.embedded {
        Some(store) => store.release_reporting(&key, &lease_id).await.map(Some),
        None => state.backend.release(&key, &lease_id).await.map(|()| None),
    };
    let freed = freed.inspect_err(|e| lost(state, &key, &lease_id, e))?;
    metrics::counter!("distlock_releases_total").increment(1);
    let (holder, token) = freed.map_or((None, None), |l| (Some(l.holder), Some(l.fencing_token)));
    state.events.publish_lease(Kind::Release, &key, holder.as_deref(), token, &lease_id);
    Ok(Released { key, released: true })
}

/// Most operations one batch may carry.
pub const MAX_BATCH_OPS: usize = 1000;

/// One operation of `POST /v1/batch`: the body of the single route plus `op` and `key`.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchOp {
    /// As `POST /v1/locks/{key}/acquire`, without waiting (`wait_ms` must be 0 or absent).
    Acquire {
        /// The key (not percent-encoded).
        key: String,
        /// Lease TTL in ms.
        ttl_ms: Option<u64>,
        /// Must be 0 or absent: a batch never waits.
        wait_ms: Option<u64>,
        /// Holder label.
        holder: Option<String>,
    },
    /// As `POST /v1/locks/{key}/renew`.
    Renew {
        /// The key.
        key: String,
        /// The lease to renew.
        lease_id: String,
        /// New TTL in ms; absent or `null`: the lease's own TTL.
        ttl_ms: Option<u64>,
    },
    /// As `POST /v1/locks/{key}/release`.
    Release {
        /// The key.
        key: String,
        /// The lease to release.
        lease_id: String,
    },
}

/// Body of `POST /v1/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The operations, at most [`MAX_BATCH_OPS`]; they run concurrently, in no set order.
    pub ops: Vec<BatchOp>,
}

/// What one operation of a batch answered: the status and body its single route would have.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    /// HTTP status the single route would have answered.
    pub status: u16,
    /// The body it would have answered (a lease, a release, or `{"error":{...}}`), as it would
    /// have been written.
    pub body: Box<serde_json::value::RawValue>,
}

#[derive(Serialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

fn batch_result<T: Serialize>(outcome: Result<T, ApiError>) -> BatchResult {
    let (status, body) = match outcome {
        Ok(body) => (200, serde_json::value::to_raw_value(&body)),
        Err(e) => {
            metrics::counter!("distlock_errors_total", "code" => e.code).increment(1);
            let detail = ErrorDetail { code: e.code, message: &e.message, holder: e.holder.as_deref() };
            (e.status.as_u16(), serde_json::value::to_raw_value(&ErrorBody { error: detail }))
        }
    };
    // Serializing these plain structs cannot fail; `null` stands in if it ever did.
    let body = body.unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    BatchResult { status, body }
}

async fn run_op(
    state: &AppState,
    caller: &Caller,
    op: BatchOp,
    started: tokio::time::Instant,
) -> BatchResult {
    match op {
        BatchOp::Acquire { key, ttl_ms, wait_ms, holder } => batch_result(
            async {
                validate::key(&key)?;
                caller.check(Action::Lock, &key)?;
                if wait_ms.unwrap_or(0) != 0 {
                    return Err(ApiError::invalid(
                        "an acquire in a batch cannot wait: use POST /v1/locks/{key}/acquire",
                    ));
                }
                do_acquire(state, key, AcquireBody { ttl_ms, wait_ms: None, holder }, started).await
            }
            .await,
        ),
        BatchOp::Renew { key, lease_id, ttl_ms } => batch_result(
            async {
                validate::key(&key)?;
                caller.check(Action::Lock, &key)?;
                do_renew(state, key, RenewBody { lease_id, ttl_ms }, started).await
            }
            .await,
        ),
        BatchOp::Release { key, lease_id } => batch_result(
            async {
                validate::key(&key)?;
                caller.check(Action::Lock, &key)?;
                do_release(state, key, ReleaseBody { lease_id }).await
            }
            .await,
        ),
    }
}

/// `POST /v1/batch`: several acquires (without waiting), renewals and releases in one request.
///
/// Each operation is checked and run on its own, exactly as its single route would run it (a bad
/// one fails alone); they run concurrently, so their log writes share one group commit, and the
/// answer comes when all are done, in the order asked. A malformed batch changes nothing.
async fn batch(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchAnswer>, ApiError> {
    let started = tokio::time::Instant::now();
    let body: BatchBody = parse_required(&body?)?;
    if body.ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::invalid(format!("a batch carries at most {MAX_BATCH_OPS} operations")));
    }
    metrics::counter!("distlock_batch_ops_total").increment(body.ops.len() as u64);
    let results =
        futures_util::future::join_all(body.ops.into_iter().map(|op| run_op(&state, &caller, op, started)))
            .await;
    Ok(Json(BatchAnswer { results }))
}

/// Publishes a `lost` event when a renew or release found its lease gone.
fn lost(state: &AppState, key: &str, lease: &LeaseId, e: &Error) {
    if matches!(e, Error::LeaseLost { .. }) {
        state.events.publish_lease(Kind::Lost, key, None, None, lease);
    }
}

/// `501 not_supported` unless the store offers the operation (`offered`).
fn offered(state: &AppState, offered: bool) -> Result<(), ApiError> {
    if offered {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_supported",
        format!("the {} store does not support this; the embedded store and etcd do", state.backend.name()),
    ))
}

#[derive(Serialize)]
struct Waiters {
    key: String,
    waiters: Vec<distlock::WaiterInfo>,
}

/// `GET /v1/locks/{key}/waiters`: the queue of one lock (the embedded store and etcd).
async fn waiters(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Waiters>, ApiError> {
    let key = checked_key(path)?;
    caller.check(Action::Read, &key)?;
    let waiters = match &state.embedded {
        Some(store) => store.waiting_on(&key),
        None => {
            offered(&state, state.backend.offers().waiters)?;
            state.backend.waiters(&key).await?
        }
    };
    Ok(Json(Waiters { key, waiters }))
}

#[derive(Serialize)]
struct ForceReleased {
    key: String,
    released: bool,
    holder: String,
    fencing_token: u64,
}

/// `POST /v1/admin/locks/{key}/release`: frees a lock whoever holds it; needs an admin token.
async fn force_release(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ForceReleased>, ApiError> {
    if !state.auth.table().any_admin() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "force-release is off: give a token an admin: scope, or start the server with --admin-token-file",
        ));
    }
    let key = checked_key(path)?;
    // No token, or one nobody knows (auth off lets such calls through to here): 401, as with auth
    // on; a known token without the scope: 403.
    if caller.is_anonymous() {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "an admin token is required"));
    }
    caller.check(Action::Admin, &key)?;
    let not_held = || ApiError::new(StatusCode::NOT_FOUND, "not_held", format!("lock {key:?} is not held"));
    let (holder, fencing_token) = match &state.embedded {
        Some(store) => {
            let lease = store.force_release(&key).await?.ok_or_else(not_held)?;
            let (holder, token) = (lease.holder, lease.fencing_token);
            state.events.publish_lease(Kind::ForceRelease, &key, Some(&holder), Some(token), &lease.lease_id);
            (holder, token)
        }
        None => {
            offered(&state, state.backend.offers().force_release)?;
            let freed = state.backend.force_release(&key).await?.ok_or_else(not_held)?;
            let (holder, token) = (freed.holder.unwrap_or_default(), freed.fencing_token.unwrap_or(0));
            state.events.publish(Kind::ForceRelease, &key, Some(&holder), Some(token));
            (holder, token)
        }
    };
    tracing::warn!(key = %key, holder = %holder, token = fencing_token, "lock force-released by an admin");
    Ok(Json(ForceReleased { key, released: true, holder, fencing_token }))
}

/// Server facts for the web page and scripts.
fn facts(state: &AppState) -> serde_json::Value {
    let stats = state.embedded.as_ref().map(|s| s.stats());
    serde_json::json!({
        "store": state.backend.name(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.events.uptime().as_secs(),
        "leases": stats.map(|s| s.leases),
        "waiters": stats.map(|s| s.waiters),
        "grants_total": state.events.grants_total(),
        "auth": state.auth.table().required(),
        "force_release": state.auth.table().any_admin()
            && (state.embedded.is_some() || state.backend.offers().force_release),
    })
}

/// `GET /v1/info`.
async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(facts(&state))
}

/// Query of `GET /v1/events`.
#[derive(Deserialize)]
struct EventsParams {
    /// Answer one JSON page of the buffered events instead of a stream: those after this event
    /// id, or at or after this UTC time (RFC 3339, e.g. `2026-12-02T10:41:00Z`).
    since: Option<String>,
    /// With `since`: at most this many events (1 ..= [`MAX_EVENTS_PAGE`]; default the maximum).
    limit: Option<usize>,
}

/// Most events one `GET /v1/events?since=…` answers.
pub const MAX_EVENTS_PAGE: usize = 10_000;

/// One live `events` message of the stream.
#[derive(Serialize)]
struct LiveBatch<'a> {
    events: Vec<&'a events::Event>,
    spans: Vec<&'a crate::history::Span>,
    dropped: u64,
}

/// `GET /v1/events`: server-sent events (see [`crate::events`]): first `history` (the buffered
/// events, the timeline of the busiest and longest-held keys, the series), then live `events` and
/// `stats`. With `since`, one JSON page of the buffered events instead (for scripts).
async fn events_stream(
    State(state): State<Arc<AppState>>,
    Extension(mut caller): Extension<Caller>,
    query: Result<Query<EventsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(r) => return ApiError::invalid(r.body_text()).into_response(),
    };
    if let Some(since) = q.since {
        return events_since(&state, &caller, &since, q.limit).map(Json).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
    let reader = caller.clone();
    let may_read = move |key: &str| reader.may(Action::Read, key);
    let (history, mut sub) = state.events.subscribe_with(|h| h.snapshot(&may_read, events::now_ms()));
    let mut stopping = state.stopping.clone();
    tokio::spawn(async move {
        let history = serde_json::to_string(&history).unwrap_or_else(|_| "{}".into());
        if tx.send(SseEvent::default().event("history").data(history)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let (mut ticks, mut last_grants, mut last_at) = (0u64, state.events.grants_total(), Instant::now());
        let stats = |last_grants: u64, last_at: Instant| {
            let mut f = facts(&state);
            let grants = state.events.grants_total();
            f["grants_per_s"] =
                serde_json::json!((grants - last_grants) as f64 / last_at.elapsed().as_secs_f64().max(1e-3));
            let series = state.events.with_history(|h| h.series(events::now_ms()));
            f["series"] = serde_json::to_value(series).unwrap_or_default();
            (f, grants)
        };
        let (f, _) = stats(last_grants, last_at);
        if tx.send(SseEvent::default().event("stats").data(f.to_string())).await.is_err() {
            return;
        }
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.wait_for(|s| *s) => break,
            }
            ticks += 1;
            batch.clear();
            let dropped = events::drain(&mut sub, &mut batch, 5_000);
            // Only events of keys this caller may read; a span sent once per batch, as it is now.
            let mut live = LiveBatch { events: Vec::new(), spans: Vec::new(), dropped };
            let mut at = std::collections::HashMap::new();
            for update in batch.iter().filter(|u| caller.may(Action::Read, &u.event.key)) {
                live.events.push(&update.event);
                for span in &update.spans {
                    match at.get(&span.id) {
                        Some(&i) => live.spans[i] = span,
                        None => {
                            at.insert(span.id, live.spans.len());
                            live.spans.push(span);
                        }
                    }
                }
            }
            if !live.events.is_empty() || dropped > 0 {
                let data = serde_json::to_string(&live).unwrap_or_else(|_| "{}".into());
                if tx.send(SseEvent::default().event("events").data(data)).await.is_err() {
                    break;
                }
            }
            if ticks % 10 == 0 {
                // Every second: the token files may have been re-read (SIGHUP) since the stream
                // began; a revoked token's stream ends, a changed one's scopes apply from now.
                match state.auth.table().recheck(&caller) {
                    Lookup::Caller(now) => caller = now,
                    Lookup::Unknown => break,
                }
                let (f, grants) = stats(last_grants, last_at);
                (last_grants, last_at) = (grants, Instant::now());
                if tx.send(SseEvent::default().event("stats").data(f.to_string())).await.is_err() {
                    break;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// `GET /v1/events?since=…`: the buffered events after an event id, or at or after a time.
fn events_since(
    state: &AppState,
    caller: &Caller,
    since: &str,
    limit: Option<usize>,
) -> Result<crate::history::EventPage, ApiError> {
    let limit = limit.unwrap_or(MAX_EVENTS_PAGE);
    if !(1..=MAX_EVENTS_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be from 1 to {MAX_EVENTS_PAGE}")));
    }
    let since = if !since.is_empty() && since.bytes().all(|b| b.is_ascii_digit()) {
        Since::Id(since.parse().map_err(|_| ApiError::invalid("since: event id out of range"))?)
    } else {
        let at = humantime::parse_rfc3339_weak(since).map_err(|e| {
            ApiError::invalid(format!(
                "since must be an event id or a UTC time such as 2026-12-02T10:41:00Z ({e})"
            ))
        })?;
        let ms = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Since::Time(ms)
    };
    let may_read = |key: &str| caller.may(Action::Read, key);
    Ok(state.events.with_history(|h| h.events_since(since, limit, &may_read)))
}

/// Most spans one `GET /v1/locks/{key}/timeline` answers (the newest).
pub const MAX_TIMELINE_SPANS: usize = 5_000;

/// Query of `GET /v1/locks/{key}/timeline`.
#[derive(Deserialize)]
struct TimelineParams {
    /// Only spans open now or ending at or after this time (ms since the Unix epoch).
    from_ms: Option<u64>,
}

/// Answer of `GET /v1/locks/{key}/timeline`.
#[derive(Serialize)]
struct Timeline {
    key: String,
    spans: Vec<crate::history::Span>,
    timeline_from_ms: u64,
    now_ms: u64,
}

/// `GET /v1/locks/{key}/timeline`: the key's holdings, waits and marks this server kept (up to an
/// hour, at most [`MAX_TIMELINE_SPANS`] of the newest), in start order.
async fn timeline(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<TimelineParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Timeline>, ApiError> {
    let key = checked_key(path)?;
    caller.check(Action::Read, &key)?;
    let Query(q) = query.map_err(|r| ApiError::invalid(r.body_text()))?;
    let now_ms = events::now_ms();
    let (spans, timeline_from_ms) = state.events.with_history(|h| {
        (h.spans_of(&key, q.from_ms.unwrap_or(0), MAX_TIMELINE_SPANS), h.timeline_from(now_ms))
    });
    Ok(Json(Timeline { key, spans, timeline_from_ms, now_ms }))
}

async fn status(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LockInfo>, ApiError> {
    let key = checked_key(path)?;
    caller.check(Action::Read, &key)?;
    Ok(Json(state.backend.status(&key).await?))
}

/// Most locks one `GET /v1/locks` answers, and the page size when `limit` is absent.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Query of `GET /v1/locks`.
#[derive(Deserialize)]
struct ListParams {
    /// Only keys starting with this.
    #[serde(default)]
    prefix: String,
    /// Only keys after this one, in byte order (the previous page's `next`).
    after: Option<String>,
    /// At most this many locks (1 ..= [`MAX_LIST_LIMIT`]; default the maximum).
    limit: Option<usize>,
    /// `key` (default), `held_for` (longest held first) or `waiters` (most first); see
    /// [`crate::listing`] for how it pages.
    sort: Option<String>,
}

/// `GET /v1/locks`: one page of held locks, `{"locks":[…],"next":KEY|null}`. The store pages from
/// the cursor (the embedded store ranges over its ordered table from `after`).
async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LockPage>, ApiError> {
    let Query(q) = query.map_err(|r| ApiError::invalid(r.body_text()))?;
    let limit = q.limit.unwrap_or(MAX_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be from 1 to {MAX_LIST_LIMIT}")));
    }
    let sort = Sort::parse(q.sort.as_deref().unwrap_or("key")).map_err(ApiError::invalid)?;
    if sort != Sort::Key {
        return Ok(Json(list_sorted(&state, &caller, q.prefix, q.after, limit, sort).await?));
    }
    let query = ListQuery { prefix: q.prefix, after: q.after, limit: Some(limit) };
    query.validate()?;
    match caller.readable_prefixes() {
        None => Ok(Json(state.backend.list(&query).await?)),
        Some(readable) if readable.is_empty() => Err(Forbidden {
            message: "this token may not list locks (it has no read: or lock: scope)".into(),
        }
        .into()),
        Some(readable) => Ok(Json(list_readable(&state, query, &readable).await?)),
    }
}

/// A page of held locks in `sort` order (not by key): every matching lock the caller may read is
/// walked, in chunks on the embedded store (see [`crate::listing`]).
async fn list_sorted(
    state: &AppState,
    caller: &Caller,
    prefix: String,
    after: Option<String>,
    limit: usize,
    sort: Sort,
) -> Result<LockPage, ApiError> {
    ListQuery { prefix: prefix.clone(), after: None, limit: Some(limit) }.validate()?;
    let after = after.filter(|a| !a.is_empty());
    let cursor = after.map(|a| listing::Cursor::parse(sort, &a)).transpose().map_err(ApiError::invalid)?;
    let prefixes = match caller.readable_prefixes() {
        None => vec![prefix],
        Some(readable) if readable.is_empty() => {
            return Err(Forbidden {
                message: "this token may not list locks (it has no read: or lock: scope)".into(),
            }
            .into())
        }
        Some(readable) => listing::narrow(&prefix, &readable),
    };
    // The embedded store's table lock is taken for one chunk at a time.
    let chunk = state.embedded.is_some().then_some(4_096);
    Ok(listing::sorted_page(state.backend.as_ref(), &prefixes, sort, cursor.as_ref(), limit, chunk).await?)
}

/// A page of `query` holding only keys under one of `readable`: the query is narrowed to each
/// readable prefix inside it, in key order, so the store never lists keys the caller may not see.
async fn list_readable(state: &AppState, query: ListQuery, readable: &[&str]) -> Result<LockPage, ApiError> {
    let limit = query.limit.unwrap_or(MAX_LIST_LIMIT);
    // Disjoint prefixes, whose key ranges are ordered as the prefixes are.
    let prefixes = listing::narrow(&query.prefix, readable);
    let mut page = LockPage { locks: Vec::new(), next: None };
    for (i, prefix) in prefixes.iter().enumerate() {
        let left = limit - page.locks.len();
        let sub = ListQuery { prefix: prefix.clone(), after: query.after.clone(), limit: Some(left) };
        let got = state.backend.list(&sub).await?;
        page.locks.extend(got.locks);
        if page.locks.len() >= limit {
            let more = got.next.is_some() || i + 1 < prefixes.len();
            page.next = more.then(|| page.locks.last().map(|l| l.key.clone())).flatten();
            break;
        }
    }
    Ok(page)
}

/// How long `/healthz` waits for the store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// The key `/healthz` reads to see that the store answers (a read: nothing is written).
const HEALTH_KEY: &str = "distlock/healthz";

/// `GET /healthz`: ready, i.e. the store answers: the embedded log still accepts writes and a
/// status read answers within [`HEALTH_TIMEOUT`] (Redis: a script round trip; etcd: a
/// linearizable read, which needs a quorum). Else 503 with the reason.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let store = state.backend.name();
    let check = async {
        if let Some(why) = state.embedded.as_ref().and_then(|e| e.log_failure()) {
            return Err(format!("the write-ahead log failed and accepts no writes until a restart: {why}"));
        }
        state.backend.status(HEALTH_KEY).await.map(drop).map_err(|e| e.to_string())
    };
    let failure = match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
        Ok(Ok(())) => {
            return (StatusCode::OK, Json(serde_json::json!({"status": "ok", "store": store})))
                .into_response()
        }
        Ok(Err(e)) => e,
        Err(_) => format!("the store did not answer within {} ms", HEALTH_TIMEOUT.as_millis()),
    };
    let body = serde_json::json!({"status": "unavailable", "store": store, "error": failure});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// `GET /livez`: the process serves HTTP (whatever the store does).
async fn livez() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
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

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Authenticates the API routes: no or an unknown token is 401 (when a token file is in force);
/// a known one becomes the request's [`Caller`], whose scopes each handler checks for its own
/// operation and key.
async fn auth(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    match state.auth.table().lookup(bearer(req.headers())) {
        Lookup::Caller(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Lookup::Unknown => {
            tracing::info!(route = %req.uri().path(), "refused: no token or an unknown one");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
                .into_response()
        }
    }
}

/// Records request latency by route (the route's pattern, as the router matched it). Method and
/// common status labels are static strings, and made-up methods share one label, so that they
/// cannot grow the metrics without bound.
async fn observe(req: Request, next: Next) -> Response {
    let route: metrics::SharedString = match req.extensions().get::<axum::extract::MatchedPath>() {
        Some(p) => p.as_str().to_owned().into(),
        None => "other".into(),
    };
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "OTHER",
    };
    let start = Instant::now();
    let response = next.run(req).await;
    let status: metrics::SharedString = match response.status().as_u16() {
        200 => "200".into(),
        409 => "409".into(),
        other => other.to_string().into(),
    };
    metrics::histogram!("distlock_request_seconds", "route" => route, "method" => method, "status" => status)
        .record(start.elapsed().as_secs_f64());
    response
}
