//! The server's memory of what happened, over HTTP against a server in the test process: the history a new
//! `GET /v1/events` subscriber gets first (bounded by `--event-history`), `GET /v1/events?since=…`
//! for scripts, a key's timeline (`GET /v1/locks/{key}/timeline`), release events that name the
//! holder and token, and `GET /v1/locks?sort=held_for|waiters|key` with paging, scopes included.

mod common;

use std::time::Duration;

use common::InProcess;
use serde_json::{json, Value};

struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<&'static str>,
}

impl Api {
    fn new(server: &InProcess, token: Option<&'static str>) -> Api {
        Api { base: server.url(), http: reqwest::Client::new(), token }
    }

    fn as_token(&self, token: &'static str) -> Api {
        Api { base: self.base.clone(), http: self.http.clone(), token: Some(token) }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(&url),
            _ => self.http.post(&url).json(&body.unwrap_or_else(|| json!({}))),
        };
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn acquire(&self, key: &str, body: Value) -> Value {
        let (status, lease) = self.call("POST", &format!("/v1/locks/{}/acquire", enc(key)), Some(body)).await;
        assert_eq!(status, 200, "acquire {key}: {lease}");
        lease
    }

    async fn release(&self, key: &str, lease: &Value) {
        let body = json!({"lease_id": lease["lease_id"]});
        let (status, answer) =
            self.call("POST", &format!("/v1/locks/{}/release", enc(key)), Some(body)).await;
        assert_eq!(status, 200, "release {key}: {answer}");
    }

    /// The first message of a new event stream (`history`), parsed.
    async fn history(&self) -> Value {
        let mut req = self.http.get(format!("{}/v1/events", self.base));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let mut stream = req.send().await.expect("events");
        assert_eq!(stream.status().as_u16(), 200);
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(at) = text.find("\n\n") {
                let block = &text[..at];
                assert!(
                    block.starts_with("event: history\n"),
                    "the stream starts with the history: {block:.200}"
                );
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
                    .collect();
                return serde_json::from_str(&data).expect("history JSON");
            }
            assert!(tokio::time::Instant::now() < deadline, "no history message: {text:.300}");
            match tokio::time::timeout(Duration::from_secs(1), stream.chunk()).await {
                Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => panic!("the stream ended: {text}"),
                _ => {}
            }
        }
    }
}

fn enc(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F").replace(' ', "%20")
}

fn kinds(events: &Value) -> Vec<(String, String)> {
    events
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["kind"].as_str().unwrap_or("").to_owned(), e["key"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// What happened before anyone watched is sent first to a new subscriber: the events (bounded by
/// `--event-history`), release events with holder, token and time held, and the timeline spans
/// of a hand-off, an expiry and a force-release.
#[tokio::test]
async fn a_new_subscriber_gets_the_history_first() {
    let dir = tempfile::tempdir().expect("dir");
    let admins = dir.path().join("admins");
    std::fs::write(&admins, "ops-admin\n").expect("admins");
    let server = InProcess::with(|c| {
        c.event_history = 40;
        c.admin_token_file = Some(admins.clone());
    });
    let api = Api::new(&server, None);

    // Acquire, a waiter, the hand-off on release, an expiry, a force-release.
    let first = api.acquire("deploy/web", json!({"holder": "alice", "ttl_ms": 30_000})).await;
    let waiter = {
        let api = Api::new(&server, None);
        tokio::spawn(async move {
            api.acquire("deploy/web", json!({"holder": "bob", "ttl_ms": 600, "wait_ms": 10_000})).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.release("deploy/web", &first).await;
    let second = waiter.await.expect("waiter");
    assert_eq!(second["fencing_token"], 2);
    tokio::time::sleep(Duration::from_millis(1_000)).await; // bob's 600 ms lease expires
    let third = api.acquire("nightly", json!({"holder": "cron"})).await;
    let forced = api.as_token("ops-admin").call("POST", "/v1/admin/locks/nightly/release", None).await;
    assert_eq!(forced.0, 200, "{}", forced.1);

    let history = api.history().await;
    let events = &history["events"];
    let mut seen = kinds(events);
    // The release and the hand-off grant it caused are published by two requests: either first.
    if seen.len() > 3 && seen[2].0 == "release" {
        seen.swap(2, 3);
    }
    let want: Vec<(String, String)> = [
        ("grant", "deploy/web"),
        ("wait", "deploy/web"),
        ("grant", "deploy/web"),
        ("release", "deploy/web"),
        ("expiry", "deploy/web"),
        ("grant", "nightly"),
        ("force_release", "nightly"),
    ]
    .iter()
    .map(|(k, key)| (k.to_string(), key.to_string()))
    .collect();
    assert_eq!(seen, want, "{events}");
    let find = |kind: &str, token: u64| {
        events.as_array().and_then(|a| {
            a.iter().find(|e| e["kind"] == kind && e["fencing_token"].as_u64() == Some(token)).cloned()
        })
    };
    let release = find("release", 1).expect("the release names alice's token");
    assert_eq!(release["holder"].as_str(), Some("alice"));
    assert!(release["held_ms"].as_u64().is_some_and(|h| (250..5_000).contains(&h)), "{release}");
    let handoff = find("grant", 2).expect("the hand-off");
    assert!(handoff["waited_ms"].as_u64().is_some_and(|w| (250..5_000).contains(&w)), "{handoff}");
    let expiry = find("expiry", 2).expect("bob's expiry");
    assert_eq!((expiry["holder"].as_str(), expiry["held_ms"].as_u64().is_some()), (Some("bob"), true));
    assert_eq!(third["fencing_token"], 3);

    // The timeline: alice's holding released, bob's wait granted, bob's holding expired,
    // cron's holding force-released.
    let spans: Vec<(String, String, String, Option<u64>, String)> = history["spans"]
        .as_array()
        .expect("spans")
        .iter()
        .map(|s| {
            (
                s["key"].as_str().unwrap_or("").to_owned(),
                s["kind"].as_str().unwrap_or("").to_owned(),
                s["holder"].as_str().unwrap_or("").to_owned(),
                s["fencing_token"].as_u64(),
                s["end"].as_str().unwrap_or("open").to_owned(),
            )
        })
        .collect();
    for want in [
        ("deploy/web", "hold", "alice", Some(1), "release"),
        ("deploy/web", "wait", "bob", None, "granted"),
        ("deploy/web", "hold", "bob", Some(2), "expiry"),
        ("nightly", "hold", "cron", Some(3), "force_release"),
    ] {
        let want = (want.0.to_owned(), want.1.to_owned(), want.2.to_owned(), want.3, want.4.to_owned());
        assert!(spans.contains(&want), "{want:?} not in {spans:?}");
    }
    assert_eq!(history["event_history"], 40);
    assert!(history["series"]["grants"].as_array().is_some_and(|g| g.len() == 90));
    let grants: u64 =
        history["series"]["grants"].as_array().expect("grants").iter().filter_map(Value::as_u64).sum();
    assert_eq!(grants, 3);
    let handoffs: u64 =
        history["series"]["handoffs"].as_array().expect("handoffs").iter().filter_map(Value::as_u64).sum();
    assert_eq!(handoffs, 1);

    // The same key's timeline on its own route.
    let timeline = api.get("/v1/locks/deploy%2Fweb/timeline").await;
    assert_eq!(timeline["spans"].as_array().map(Vec::len), Some(3), "{timeline}");

    // At most --event-history events are kept: the oldest go first.
    for i in 0..30 {
        let lease = api.acquire(&format!("burst/{i}"), json!({})).await;
        api.release(&format!("burst/{i}"), &lease).await;
    }
    let history = api.history().await;
    let events = history["events"].as_array().expect("events");
    assert_eq!(events.len(), 40);
    assert_eq!(events[0]["id"], 28, "ids are consecutive from 1; the first 27 are gone");
    assert_eq!(events[39]["id"], 67);
}

/// `GET /v1/events?since=ID|TIME` pages through the buffered events, says when some were missed,
/// and shows a token only the keys it may read.
#[tokio::test]
async fn events_since_for_scripts() {
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "all\nnarrow read:deploy/\nlocker lock:deploy/\n").expect("tokens");
    let server = InProcess::with(|c| {
        c.event_history = 20;
        c.auth_token_file = Some(tokens.clone());
    });
    let api = Api::new(&server, Some("all"));
    let before = humantime::format_rfc3339_millis(std::time::SystemTime::now() - Duration::from_secs(1));
    for key in ["deploy/web", "db/main", "deploy/api"] {
        let lease = api.acquire(key, json!({"holder": "h"})).await;
        api.release(key, &lease).await;
    }
    let page = api.get("/v1/events?since=0").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(6));
    assert_eq!(
        (page["next"].as_u64(), page["more"].as_bool(), page["missed"].as_bool()),
        (Some(6), Some(false), Some(false))
    );
    let page = api.get("/v1/events?since=2&limit=2").await;
    let ids: Vec<u64> =
        page["events"].as_array().expect("events").iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids, [3, 4]);
    assert_eq!((page["next"].as_u64(), page["more"].as_bool()), (Some(4), Some(true)));
    let page = api.get("/v1/events?since=6").await;
    assert_eq!((page["events"].as_array().map(Vec::len), page["next"].as_u64()), (Some(0), Some(6)));
    let page = api.get(&format!("/v1/events?since={before}")).await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(6), "by time: {page}");
    let far = api.get("/v1/events?since=2999-01-01T00:00:00Z").await;
    assert_eq!(far["events"].as_array().map(Vec::len), Some(0));

    // Scopes: a deploy/ reader sees only deploy/ events; a lock: scope may read its keys too.
    let narrow = api.as_token("narrow").get("/v1/events?since=0").await;
    let keys: Vec<(String, String)> = kinds(&narrow["events"]);
    assert_eq!(keys.len(), 4);
    assert!(keys.iter().all(|(_, k)| k.starts_with("deploy/")), "{keys:?}");
    assert_eq!(
        api.as_token("locker").get("/v1/events?since=0").await["events"].as_array().map(Vec::len),
        Some(4)
    );

    // Past the buffer: the oldest are gone, and the page says so.
    for i in 0..12 {
        let lease = api.acquire(&format!("deploy/{i}"), json!({})).await;
        api.release(&format!("deploy/{i}"), &lease).await;
    }
    let page = api.get("/v1/events?since=0").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(20));
    assert_eq!((page["missed"].as_bool(), page["oldest_id"].as_u64()), (Some(true), Some(11)));

    for bad in ["since=yesterday", "since=1&limit=0", "since=1&limit=10001", "since=99999999999999999999999"]
    {
        let (status, body) = api.call("GET", &format!("/v1/events?{bad}"), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}: {body}");
    }
    assert_eq!(Api::new(&server, None).call("GET", "/v1/events?since=0", None).await.0, 401);
}

/// `sort=held_for` puts the longest held first even when they are last in key order, pages
/// through more than a page without losing or repeating a lock, and `sort=waiters` puts the most
/// waited-for first.
#[tokio::test]
async fn lists_sorted_and_paged_on_the_server() {
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "all\nzz read:zz/\nnoread admin:*\n").expect("tokens");
    let server = InProcess::with(|c| c.auth_token_file = Some(tokens.clone()));
    let api = Api::new(&server, Some("all"));
    // The oldest locks sort last by key.
    for i in 0..5 {
        api.acquire(&format!("zz/old-{i}"), json!({"ttl_ms": 600_000})).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for chunk in 0..3 {
        let ops: Vec<Value> = (0..400)
            .map(|i| json!({"op": "acquire", "key": format!("a/{:04}", chunk * 400 + i), "ttl_ms": 600_000}))
            .collect();
        let (status, _) = api.call("POST", "/v1/batch", Some(json!({ "ops": ops }))).await;
        assert_eq!(status, 200);
    }
    // Waiters on two keys.
    let mut waiting = Vec::new();
    for (key, n) in [("a/0100", 3), ("a/0200", 1)] {
        for _ in 0..n {
            let api = Api::new(&server, Some("all"));
            waiting.push(tokio::spawn(async move {
                api.call("POST", &format!("/v1/locks/{}/acquire", enc(key)), Some(json!({"wait_ms": 20_000})))
                    .await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The first 1,000 by key miss the old locks; sorted by held time they come first.
    let by_key = api.get("/v1/locks?limit=1000").await;
    assert!(!by_key["locks"].to_string().contains("zz/old"));
    let page = api.get("/v1/locks?limit=1000&sort=held_for").await;
    let keys: Vec<&str> =
        page["locks"].as_array().expect("locks").iter().filter_map(|l| l["key"].as_str()).collect();
    assert_eq!(&keys[..5], ["zz/old-0", "zz/old-1", "zz/old-2", "zz/old-3", "zz/old-4"]);
    let held: Vec<u64> =
        page["locks"].as_array().expect("locks").iter().filter_map(|l| l["held_for_ms"].as_u64()).collect();
    assert!(held.windows(2).all(|w| w[0] >= w[1]), "held_for_ms descends");
    assert!(
        page["locks"][0]["ttl_ms"].as_u64() == Some(600_000),
        "locks carry their TTL: {}",
        page["locks"][0]
    );

    // Every lock exactly once across pages, in the same order as one big page.
    let all = api.get("/v1/locks?limit=10000&sort=held_for").await;
    let all: Vec<String> = all["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .filter_map(|l| l["key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(all.len(), 1_205);
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = api.get(&format!("/v1/locks?limit=300&sort=held_for&after={}", urlenc(&after))).await;
        paged.extend(
            page["locks"]
                .as_array()
                .expect("locks")
                .iter()
                .filter_map(|l| l["key"].as_str().map(str::to_owned)),
        );
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(paged, all);

    let page = api.get("/v1/locks?limit=2&sort=waiters").await;
    let top: Vec<(&str, u64)> = page["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .map(|l| (l["key"].as_str().unwrap_or(""), l["waiters"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(top, [("a/0100", 3), ("a/0200", 1)]);
    let next = page["next"].as_str().expect("more follow").to_owned();
    assert!(next.starts_with("waiters:1:a/0200"), "{next}");
    let rest = api.get(&format!("/v1/locks?limit=10000&sort=waiters&after={}", urlenc(&next))).await;
    assert_eq!(rest["locks"].as_array().map(Vec::len), Some(1_203));
    assert!(rest["next"].is_null());

    // Prefix and scopes narrow a sorted listing like a key-ordered one.
    let zz = api.as_token("zz").get("/v1/locks?sort=held_for").await;
    assert_eq!(zz["locks"].as_array().map(Vec::len), Some(5));
    let pre = api.get("/v1/locks?sort=held_for&prefix=a/01").await;
    assert_eq!(pre["locks"].as_array().map(Vec::len), Some(100));
    let (status, body) = api.as_token("noread").call("GET", "/v1/locks?sort=held_for", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));

    for bad in [
        "sort=age",
        "sort=held_for&after=deploy/web",
        "sort=waiters&after=held_for:3:a",
        "sort=held_for&limit=0",
    ] {
        let (status, body) = api.call("GET", &format!("/v1/locks?{bad}"), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}: {body}");
    }
    // Key order is what it was.
    let page = api.get("/v1/locks?limit=2&sort=key").await;
    assert_eq!(page["next"], "a/0001");
    for w in waiting {
        w.abort();
    }
}

fn urlenc(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The OpenAPI document describes what this file tests.
#[tokio::test]
async fn openapi_describes_history_sort_and_timeline() {
    let server = InProcess::start();
    let spec = Api::new(&server, None).get("/openapi.json").await;
    let params = |path: &str| -> Vec<String> {
        spec["paths"][path]["get"]["parameters"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    assert!(params("/v1/locks").contains(&"sort".to_owned()));
    assert_eq!(
        spec["paths"]["/v1/locks"]["get"]["parameters"][3]["schema"]["enum"],
        json!(["key", "held_for", "waiters", ""])
    );
    assert_eq!(params("/v1/events"), ["since", "limit"]);
    assert_eq!(params("/v1/locks/{key}/timeline"), ["key", "from_ms"]);
    for schema in ["Event", "Span", "EventPage", "Timeline"] {
        assert!(spec["components"]["schemas"][schema].is_object(), "{schema}");
    }
    assert!(spec["components"]["schemas"]["LockInfo"]["properties"]["ttl_ms"].is_object());
    let kinds = &spec["components"]["schemas"]["Event"]["properties"]["kind"]["enum"];
    assert!(kinds.as_array().is_some_and(|k| k.contains(&json!("wait_cancelled"))));
}
