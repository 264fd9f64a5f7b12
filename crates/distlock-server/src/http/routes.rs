//! The lock routes: acquire (with its long poll), renew, release, status and the list of held
//! locks. The checks and the store call of acquire, renew and release are written once
//! (`do_acquire`, `do_renew`, `do_release`) and shared with [`super::batch`].

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::routing::{get, post};
use axum::Json;
use axum::Router;
use distlock::wire::{AcquireBody, LeaseBody, ReleaseBody, Released, RenewBody};
use distlock::{validate, AcquireRequest, Error, LeaseId, ListQuery, LockInfo, LockPage};
use serde::Deserialize;
use std::sync::Arc;

use super::errors::{checked_key, checked_ttl, parse_body, parse_required, ApiError};
use super::AppState;
use crate::auth::{Action, Caller, Forbidden};
use crate::events::{EventKind, SharedEvents};
use crate::listing::{self, Sort};

/// Longest server-side wait one acquire may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The answer for a granted or renewed lease; `received` is when the request came in.
fn lease_body(key: String, grant: &distlock::Grant, received: tokio::time::Instant) -> LeaseBody {
    LeaseBody {
        key,
        lease_id: grant.lease_id.to_string(),
        fencing_token: grant.fencing_token,
        ttl_ms: grant.ttl.as_millis() as u64,
        waited_ms: grant.counted_from.saturating_duration_since(received).as_millis() as u64,
    }
}

/// The checks a lock route (acquire, renew, release) makes before anything else, in this order:
/// the key, the caller's right to lock it, then its body, read by `parse`.
pub(super) fn lock_call<B>(
    caller: &Caller,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8]) -> Result<B, ApiError>,
) -> Result<(String, B), ApiError> {
    let key = checked_key(path)?;
    caller.check(Action::Lock, &key)?;
    let body = parse(&body?)?;
    Ok((key, body))
}

async fn acquire(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseBody>, ApiError> {
    let started = tokio::time::Instant::now();
    let (key, body) = lock_call::<AcquireBody>(&caller, path, body, parse_body)?;
    Ok(Json(do_acquire(&state, key, body, started).await?))
}

/// An acquire of a checked key: what the route and a batch both run.
pub(super) async fn do_acquire(
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
    let (limit, mode) = (body.limit.unwrap_or(1), body.mode.unwrap_or_default());
    distlock::backend::check_holders(state.backend.as_ref(), limit, mode)?;
    if let Some(value) = &body.value {
        validate::value(value)?;
        distlock::backend::check_elections(state.backend.as_ref())?;
    }
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
    let req = AcquireRequest {
        key: key.clone(),
        lease_id: LeaseId::generate(),
        holder,
        ttl,
        wait: wait.into(),
        limit,
        mode,
        value: body.value,
    };
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
                state.events.publish(EventKind::WaitTimeout, &key, label.as_deref(), None);
            }
            return Err(e.into());
        }
    };
    metrics::counter!("distlock_grants_total").increment(1);
    state.events.publish_lease(
        EventKind::Grant,
        &key,
        label.as_deref(),
        Some(grant.fencing_token),
        &grant.lease_id,
    );
    Ok(lease_body(key, &grant, started))
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
            self.events.publish(EventKind::WaitCancelled, &self.key, Some(&self.holder), None);
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
    let (key, body) = lock_call::<RenewBody>(&caller, path, body, parse_required)?;
    Ok(Json(do_renew(&state, key, body, started).await?))
}

/// A renew of a checked key.
pub(super) async fn do_renew(
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
    Ok(lease_body(key, &grant, started))
}

async fn release(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Released>, ApiError> {
    let (key, body) = lock_call::<ReleaseBody>(&caller, path, body, parse_required)?;
    Ok(Json(do_release(&state, key, body).await?))
}

/// A release of a checked key.
pub(super) async fn do_release(
    state: &AppState,
    key: String,
    body: ReleaseBody,
) -> Result<Released, ApiError> {
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
    state.events.publish_lease(EventKind::Release, &key, holder.as_deref(), token, &lease_id);
    Ok(Released { key, released: true })
}

/// Publishes a `lost` event when a renew or release found its lease gone.
fn lost(state: &AppState, key: &str, lease: &LeaseId, e: &Error) {
    if matches!(e, Error::LeaseLost { .. }) {
        state.events.publish_lease(EventKind::Lost, key, None, None, lease);
    }
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

/// The lock routes.
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/locks", get(list))
        .route("/v1/locks/{key}", get(status))
        .route("/v1/locks/{key}/acquire", post(acquire))
        .route("/v1/locks/{key}/renew", post(renew))
        .route("/v1/locks/{key}/release", post(release))
}
