//! `POST /v1/batch`: many acquires (without waiting), renewals and releases in one request, so
//! that their log writes share one group commit. Each operation runs exactly as its single route
//! (in [`super::routes`]) would, and answers what that route would have answered.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::routing::post;
use axum::Json;
use axum::Router;
use distlock::validate;
use distlock::wire::{AcquireBody, BatchAnswer, BatchOp, BatchResult, ReleaseBody, RenewBody};
use serde::{Deserialize, Serialize};

use super::errors::{parse_required, ApiError};
use super::routes::{do_acquire, do_release, do_renew};
use super::AppState;
use crate::auth::{Action, Caller};

/// Most operations one batch may carry.
pub const MAX_BATCH_OPS: usize = 1000;

/// How the server reads a batch ([`distlock::wire::BatchBody`] as received): an object whose
/// `ops` is an array of objects, each read as a [`BatchOp`] on its own, so that a malformed one
/// (unknown op or field, wrong type) fails in its own result and the others still run.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceivedBatch {
    ops: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn batch_result<T: Serialize>(outcome: Result<T, ApiError>) -> BatchResult {
    let (status, body) = match outcome {
        Ok(body) => (200, serde_json::value::to_raw_value(&body)),
        Err(e) => (e.status().as_u16(), serde_json::value::to_raw_value(&e.into_body())),
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
        BatchOp::Acquire { key, ttl_ms, wait_ms, holder, limit, mode, value } => batch_result(
            async {
                validate::key(&key)?;
                caller.check(Action::Lock, &key)?;
                if wait_ms.unwrap_or(0) != 0 {
                    return Err(ApiError::invalid(
                        "an acquire in a batch cannot wait: use POST /v1/locks/{key}/acquire",
                    ));
                }
                do_acquire(
                    state,
                    key,
                    AcquireBody { ttl_ms, wait_ms: None, holder, limit, mode, value },
                    started,
                )
                .await
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
    let body: ReceivedBatch = parse_required(&body?)?;
    if body.ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::invalid(format!("a batch carries at most {MAX_BATCH_OPS} operations")));
    }
    metrics::counter!("distlock_batch_ops_total").increment(body.ops.len() as u64);
    let results = futures_util::future::join_all(body.ops.into_iter().map(|op| {
        let (state, caller) = (&state, &caller);
        async move {
            match serde_json::from_value::<BatchOp>(serde_json::Value::Object(op)) {
                Ok(op) => run_op(state, caller, op, started).await,
                Err(e) => batch_result::<()>(Err(ApiError::invalid(format!("bad operation: {e}")))),
            }
        }
    }))
    .await;
    Ok(Json(BatchAnswer { results }))
}

/// The batch route.
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new().route("/v1/batch", post(batch))
}
