//! What operators watch from outside: `/metrics` (Prometheus text; request latency recorded by
//! route, method and status with bounded labels), `/healthz` (the store answers) and `/livez` (the
//! process serves).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use distlock::wire::Health;

use super::AppState;

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
            let ok = Health { status: "ok".into(), store: Some(store.into()), error: None };
            return (StatusCode::OK, Json(ok)).into_response();
        }
        Ok(Err(e)) => e,
        Err(_) => format!("the store did not answer within {} ms", HEALTH_TIMEOUT.as_millis()),
    };
    let body = Health { status: "unavailable".into(), store: Some(store.into()), error: Some(failure) };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// `GET /livez`: the process serves HTTP (whatever the store does).
async fn livez() -> Json<Health> {
    Json(Health { status: "ok".into(), store: None, error: None })
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

/// Records request latency by route (the route's pattern, as the router matched it). Method and
/// common status labels are static strings, and made-up methods share one label, so that they
/// cannot grow the metrics without bound.
pub(super) async fn observe(req: Request, next: Next) -> Response {
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

/// `/metrics` (behind the token check, as the API is).
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics_text))
}

/// The health probes (no token needed).
pub(super) fn probes() -> Router<Arc<AppState>> {
    Router::new().route("/healthz", get(healthz)).route("/livez", get(livez))
}
