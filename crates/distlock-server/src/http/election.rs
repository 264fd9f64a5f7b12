//! The routes of leader elections: `POST /v1/locks/{key}/proclaim` (a leader replaces the value
//! its lease publishes) and `GET /v1/locks/{key}/watch` (a key's status, then every change of
//! it, as server-sent events). A leader campaigns with an ordinary acquire that carries a
//! `value`. Stores without elections (Redlock behind `--store`) answer `not_supported`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Extension, Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use axum::Router;
use distlock::wire::ProclaimBody;
use distlock::{validate, ErrorCode, LeaseId, LockInfo};

use super::errors::{checked_key, parse_required, ApiError};
use super::routes::lock_call;
use super::AppState;
use crate::auth::{Action, Caller, Lookup};

/// How often an idle watch stream carries a comment, so that a client (and every proxy on the
/// way) can tell a quiet key from a dead connection.
pub const WATCH_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// `501 not_supported` unless the store offers elections.
fn offered(state: &AppState) -> Result<(), ApiError> {
    if state.backend.offers().elections {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::NotSupported,
        format!(
            "the {} store does not offer leader elections (proclaim, watch); the embedded store and Redis do",
            state.backend.name()
        ),
    ))
}

/// `POST /v1/locks/{key}/proclaim` `{lease_id, value}`: answers the key's status with the new
/// value, once it is on disk.
async fn proclaim(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LockInfo>, ApiError> {
    let (key, body) = lock_call::<ProclaimBody>(&caller, path, body, parse_required)?;
    let lease_id = LeaseId::parse(&body.lease_id)?;
    validate::value(&body.value)?;
    offered(&state)?;
    state.backend.proclaim(&key, &lease_id, &body.value).await?;
    Ok(Json(state.backend.status(&key).await?))
}

/// `GET /v1/locks/{key}/watch`: `status` events, each a whole status of the key (the first one
/// at once, then one after every grant, release, expiry, force-release or proclamation; quick
/// successions may come as one). Ends when the client leaves, the server stops, or the token is
/// revoked or loses its right to read the key (re-checked every second).
async fn watch(
    State(state): State<Arc<AppState>>,
    Extension(mut caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let opened = async {
        let key = checked_key(path)?;
        caller.check(Action::Read, &key)?;
        offered(&state)?;
        let feed = state.backend.watch(&key).await?;
        Ok::<_, ApiError>((key, feed))
    };
    let (key, mut feed) = match opened.await {
        Ok(opened) => opened,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(4);
    let mut stopping = state.stopping.clone();
    tokio::spawn(async move {
        let mut recheck = tokio::time::interval(Duration::from_secs(1));
        // The status read last and not yet sent: while a slow client has not taken it, the feed
        // is not read (it keeps the latest change for later), and tokens are still re-checked.
        let mut pending: Option<SseEvent> = None;
        loop {
            tokio::select! {
                next = feed.next(), if pending.is_none() => {
                    let event = match next {
                        Ok(info) => SseEvent::default().event("status").json_data(&info),
                        Err(e) => SseEvent::default().event("error").json_data(ApiError::from(e).into_body()),
                    };
                    let Ok(event) = event else { break };
                    pending = Some(event);
                }
                permit = tx.reserve(), if pending.is_some() => match (permit, pending.take()) {
                    (Ok(permit), Some(event)) => permit.send(event),
                    _ => break,
                },
                _ = recheck.tick() => match state.auth.table().recheck(&caller) {
                    Lookup::Caller(now) if now.may(Action::Read, &key) => caller = now,
                    _ => break,
                },
                // (The guard `wait_for` answers is dropped at once: it must not live across the
                // awaits above.)
                () = async { drop(stopping.wait_for(|s| *s).await) } => break,
                () = tx.closed() => break,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(WATCH_KEEP_ALIVE)).into_response()
}

/// The election routes.
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new().route("/v1/locks/{key}/proclaim", post(proclaim)).route("/v1/locks/{key}/watch", get(watch))
}
