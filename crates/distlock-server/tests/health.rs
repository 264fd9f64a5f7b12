//! Health that tells the truth: `/healthz` is 200 only while the store answers, `/livez` while
//! the process serves; a server whose store is down at start starts anyway and becomes ready
//! when the store comes.

mod common;

use std::time::{Duration, Instant};

use common::{support, InProcess};
use serde_json::Value;

async fn get(url: &str) -> (u16, Value, Duration) {
    let start = Instant::now();
    let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await.expect("request");
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, start.elapsed())
}

async fn until_status(url: &str, want: u16, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (s, body, _) = get(url).await;
        if s == want {
            return body;
        }
        assert!(start.elapsed() < within, "{url} stayed {s} ({body}), wanted {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn healthz_follows_the_store() {
    let mut redis = support::RedisServer::start();
    let server = InProcess::with(|c| c.store = Some(redis.url()));
    let base = server.url();
    let (s, body, _) = get(&format!("{base}/healthz")).await;
    assert_eq!((s, body["status"].as_str(), body["store"].as_str()), (200, Some("ok"), Some("redis")));

    redis.kill();
    let body = until_status(&format!("{base}/healthz"), 503, Duration::from_secs(5)).await;
    assert_eq!(body["status"], "unavailable", "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    let (_, _, took) = get(&format!("{base}/healthz")).await;
    assert!(took < Duration::from_secs(3), "healthz answers within its 1 s bound (took {took:?})");
    let (s, _, _) = get(&format!("{base}/livez")).await;
    assert_eq!(s, 200, "alive while the store is down");

    redis.restart();
    until_status(&format!("{base}/healthz"), 200, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_store_down_at_start_is_not_fatal() {
    let mut redis = support::RedisServer::start();
    redis.kill();
    // Before the fix the server exited at start when its store did not answer.
    let server = InProcess::with_live(|c| c.store = Some(redis.url()));
    let base = server.url();
    let (s, body, _) = get(&format!("{base}/healthz")).await;
    assert_eq!((s, body["status"].as_str()), (503, Some("unavailable")), "{body}");
    let locker = server.locker().await;
    assert!(matches!(
        locker.acquire("k", &distlock::AcquireOptions::new()).await,
        Err(distlock::Error::Unavailable(_))
    ));
    redis.restart();
    until_status(&format!("{base}/healthz"), 200, Duration::from_secs(10)).await;
    let lease =
        locker.acquire("k", &distlock::AcquireOptions::new()).await.expect("served once the store is up");
    lease.release().await.unwrap();
}

#[tokio::test]
async fn embedded_store_is_ready_and_livez_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t\n").unwrap();
    let server = InProcess::with(|c| c.auth_token_file = Some(tokens.clone()));
    let (s, body, _) = get(&format!("{}/healthz", server.url())).await;
    assert_eq!((s, body["store"].as_str()), (200, Some("embedded")));
    assert_eq!(get(&format!("{}/livez", server.url())).await.0, 200);
}
