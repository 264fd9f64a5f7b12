//! What the web page (and scripts) watch: `GET /v1/events` (the live stream, or one page of the
//! buffered events with `since`), a key's timeline, and `GET /v1/info`. Every event and span is
//! filtered by what the caller's token may read. The events themselves are kept by
//! [`crate::events`] and [`crate::history`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use distlock::wire::Info;
use serde::{Deserialize, Serialize};

use super::errors::{checked_key, ApiError};
use super::AppState;
use crate::auth::{Action, Caller, Lookup};
use crate::events;
use crate::history::Since;

/// Server facts for the web page and scripts.
fn facts(state: &AppState) -> Info {
    let stats = state.embedded.as_ref().map(|s| s.stats());
    Info {
        store: state.backend.name().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: state.events.uptime().as_secs(),
        leases: stats.map(|s| s.leases),
        waiters: stats.map(|s| s.waiters),
        grants_total: state.events.grants_total(),
        auth: state.auth.table().required(),
        force_release: state.auth.table().any_admin()
            && (state.embedded.is_some() || state.backend.offers().force_release),
    }
}

/// `GET /v1/info`.
async fn info(State(state): State<Arc<AppState>>) -> Json<Info> {
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
    // The limit is checked with or without `since` (without, it has no use, but a bad one is
    // still a bad request).
    if q.limit.is_some_and(|n| !(1..=MAX_EVENTS_PAGE).contains(&n)) {
        return ApiError::invalid(format!("limit must be from 1 to {MAX_EVENTS_PAGE}")).into_response();
    }
    // An empty `since` is no `since`, as an empty `after` is no cursor.
    if let Some(since) = q.since.filter(|s| !s.is_empty()) {
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
            let mut f = serde_json::to_value(facts(&state)).unwrap_or_default();
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
type Timeline = distlock::wire::Timeline<crate::history::Span>;

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

/// The routes of the web page's data.
pub(super) fn api() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/locks/{key}/timeline", get(timeline))
        .route("/v1/info", get(info))
        .route("/v1/events", get(events_stream))
}
