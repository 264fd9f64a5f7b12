//! The operator routes: a lock's queue of waiters and force-release (admin tokens only). Both
//! need more than the `Backend` trait offers, so a store that cannot answer them says
//! `not_supported` (501).

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::routing::{get, post};
use axum::Json;
use axum::Router;
use distlock::wire::{ForceReleased, Waiters};
use distlock::ErrorCode;

use super::errors::{checked_key, ApiError};
use super::AppState;
use crate::auth::{Action, Caller};
use crate::events::EventKind;

/// `501 not_supported` unless the store offers the operation (`offered`).
fn offered(state: &AppState, offered: bool) -> Result<(), ApiError> {
    if offered {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::NotSupported,
        format!("the {} store does not support this; the embedded store and etcd do", state.backend.name()),
    ))
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

/// `POST /v1/admin/locks/{key}/release`: frees a lock whoever holds it; needs an admin token.
async fn force_release(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ForceReleased>, ApiError> {
    if !state.auth.table().any_admin() {
        return Err(ApiError::new(
            ErrorCode::AdminDisabled,
            "force-release is off: give a token an admin: scope, or start the server with --admin-token-file",
        ));
    }
    let key = checked_key(path)?;
    // No token, or one nobody knows (auth off lets such calls through to here): 401, as with auth
    // on; a known token without the scope: 403.
    if caller.is_anonymous() {
        return Err(ApiError::new(ErrorCode::Unauthorized, "an admin token is required"));
    }
    caller.check(Action::Admin, &key)?;
    let not_held = || ApiError::new(ErrorCode::NotHeld, format!("lock {key:?} is not held"));
    let (holder, fencing_token) = match &state.embedded {
        Some(store) => {
            let lease = store.force_release(&key).await?.ok_or_else(not_held)?;
            let (holder, token) = (lease.holder, lease.fencing_token);
            state.events.publish_lease(
                EventKind::ForceRelease,
                &key,
                Some(&holder),
                Some(token),
                &lease.lease_id,
            );
            (holder, token)
        }
        None => {
            offered(&state, state.backend.offers().force_release)?;
            let freed = state.backend.force_release(&key).await?.ok_or_else(not_held)?;
            let (holder, token) = (freed.holder.unwrap_or_default(), freed.fencing_token.unwrap_or(0));
            state.events.publish(EventKind::ForceRelease, &key, Some(&holder), Some(token));
            (holder, token)
        }
    };
    tracing::warn!(key = %key, holder = %holder, token = fencing_token, "lock force-released by an admin");
    Ok(Json(ForceReleased { key, released: true, holder, fencing_token }))
}

/// The operator routes.
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/locks/{key}/waiters", get(waiters))
        .route("/v1/admin/locks/{key}/release", post(force_release))
}
