//! The HTTP JSON API (axum): the router, its layers and the bearer-token check in front of the
//! API routes. Each kind of route has its own file: `routes.rs` the lock operations, `batch.rs`
//! `POST /v1/batch`, `election.rs` proclaim and a key's watch stream, `admin.rs` the operator
//! routes, `live.rs` the web page's data (events, timeline, facts), `metrics.rs` `/metrics` and
//! the health probes; `errors.rs` is the one error shape they all answer. Token scopes
//! themselves are in [`crate::auth`].

mod admin;
mod batch;
mod election;
mod errors;
mod live;
mod metrics;
mod routes;
#[cfg(test)]
mod spec_check;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use distlock::Backend;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{Auth, Lookup};
use crate::events::SharedEvents;
use crate::store::EmbeddedStore;

pub use batch::MAX_BATCH_OPS;
pub use errors::{ApiError, SHUTTING_DOWN};
pub use live::{MAX_EVENTS_PAGE, MAX_TIMELINE_SPANS};
pub use routes::{MAX_LIST_LIMIT, MAX_WAIT};

use errors::not_found;
use metrics::observe;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
        .merge(routes::api())
        .merge(batch::api())
        .merge(admin::api())
        .merge(election::api())
        .merge(live::api())
        .merge(metrics::api())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .merge(metrics::probes())
        .route("/", get(index))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
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
            ApiError::new(distlock::ErrorCode::Unauthorized, "a valid bearer token is required")
                .into_response()
        }
    }
}

/// The OpenAPI document served at `/openapi.json` (its schemas are checked against
/// [`distlock::wire`] and [`distlock::ErrorCode`] by the tests in `spec_check.rs`).
const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../index.html"))
}
