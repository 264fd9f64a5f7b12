//! Tokens scoped by operation and key prefix, against the real server: every route × every
//! scope × a key inside and outside the prefix, asserting the status and that nothing changed
//! where access was denied; events filtered by scope; the token file re-read on SIGHUP.

mod common;

use std::time::Duration;

use common::InProcess;
use serde_json::{json, Value};

const TOKENS: &str = "\
# token   scopes
ci        lock:deploy/ read:*
dash      read:*
ops       admin:*
legacy                        # no scopes = lock:* read:*
narrow    read:deploy/
";

const INSIDE: &str = "deploy/web";
const OUTSIDE: &str = "db/main";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, token: Option<&str>, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(&url),
            _ => self.http.post(&url).json(&body.unwrap_or_else(|| json!({}))),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Who holds `key` now, seen with the all-powerful legacy token.
    async fn holder_token(&self, key: &str) -> Option<u64> {
        let (_, v) = self.call(Some("legacy"), "GET", &path(key, ""), None).await;
        v["fencing_token"].as_u64()
    }
}

fn path(key: &str, action: &str) -> String {
    format!("/v1/locks/{}{action}", key.replace('/', "%2F"))
}

/// What each token may do to a key, by the rules of the token file (lock implies status).
fn may(token: &str, action: &str, key: &str) -> bool {
    let inside = key.starts_with("deploy/");
    match (token, action) {
        ("legacy", "lock" | "read") => true,
        ("ci", "lock") => inside,
        ("ci" | "dash", "read") => true,
        ("narrow", "read") => inside,
        ("ops", "admin") => true,
        _ => false,
    }
}

#[tokio::test]
async fn every_route_every_scope_inside_and_outside() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let server = InProcess::with(|c| c.auth_token_file = Some(tokens.clone()));
    let api = Api { base: server.url(), http: reqwest::Client::new() };

    // The legacy token holds both keys; everyone else tries to touch them.
    let mut ids = std::collections::HashMap::new();
    for key in [INSIDE, OUTSIDE] {
        let (s, v) =
            api.call(Some("legacy"), "POST", &path(key, "/acquire"), Some(json!({"ttl_ms": 600_000}))).await;
        assert_eq!(s, 200, "{v}");
        ids.insert(key, v["lease_id"].as_str().unwrap().to_owned());
    }
    let bogus = "0".repeat(32);

    for token in [None, Some("nobody")] {
        for (method, p) in [
            ("GET", "/v1/locks".to_owned()),
            ("GET", path(INSIDE, "")),
            ("POST", path(INSIDE, "/acquire")),
            ("POST", path(INSIDE, "/release")),
            ("GET", path(INSIDE, "/waiters")),
            ("POST", "/v1/batch".to_owned()),
            ("GET", "/v1/info".to_owned()),
            ("GET", "/metrics".to_owned()),
            ("POST", format!("/v1/admin/locks/{}/release", INSIDE.replace('/', "%2F"))),
        ] {
            let body = json!({"lease_id": ids[INSIDE], "ops": []});
            let (s, v) = api.call(token, method, &p, Some(body)).await;
            assert_eq!(s, 401, "{token:?} {method} {p}: {v}");
        }
    }

    for token in ["ci", "dash", "narrow", "legacy", "ops"] {
        for key in [INSIDE, OUTSIDE] {
            let before = api.holder_token(key).await;
            let want = |allowed: bool, ok: u16| if allowed { ok } else { 403 };
            let ctx = format!("{token} on {key}");

            let (s, v) = api.call(Some(token), "GET", &path(key, ""), None).await;
            assert_eq!(s, want(may(token, "read", key), 200), "status, {ctx}: {v}");
            let (s, v) = api.call(Some(token), "GET", &path(key, "/waiters"), None).await;
            assert_eq!(s, want(may(token, "read", key), 200), "waiters, {ctx}: {v}");
            if s == 403 {
                assert_eq!(v["error"]["code"], "forbidden", "{v}");
            }
            // Allowed: refused by the lock itself (held / not this lease); denied: 403.
            let (s, v) = api.call(Some(token), "POST", &path(key, "/acquire"), Some(json!({}))).await;
            assert_eq!(s, want(may(token, "lock", key), 409), "acquire, {ctx}: {v}");
            let (s, v) =
                api.call(Some(token), "POST", &path(key, "/renew"), Some(json!({"lease_id": bogus}))).await;
            assert_eq!(s, want(may(token, "lock", key), 409), "renew, {ctx}: {v}");
            if !may(token, "lock", key) {
                // Even with the real lease id, a token without the scope changes nothing.
                let (s, v) = api
                    .call(Some(token), "POST", &path(key, "/release"), Some(json!({"lease_id": ids[key]})))
                    .await;
                assert_eq!(s, 403, "release, {ctx}: {v}");
                let ops = json!({"ops": [{"op": "release", "key": key, "lease_id": ids[key]},
                                         {"op": "renew", "key": key, "lease_id": ids[key], "ttl_ms": 100}]});
                let (s, v) = api.call(Some(token), "POST", "/v1/batch", Some(ops)).await;
                assert_eq!(s, 200, "{v}");
                assert_eq!(
                    (v["results"][0]["status"].as_u64(), v["results"][1]["status"].as_u64()),
                    (Some(403), Some(403)),
                    "batch, {ctx}: {v}"
                );
            } else {
                let (s, v) = api
                    .call(Some(token), "POST", &path(key, "/release"), Some(json!({"lease_id": bogus})))
                    .await;
                assert_eq!(s, 409, "release, {ctx}: {v}");
            }
            if token != "ops" {
                let p = format!("/v1/admin/locks/{}/release", key.replace('/', "%2F"));
                let (s, v) = api.call(Some(token), "POST", &p, None).await;
                // No admin token exists in this file but ops: force-release is on, and refused here.
                assert_eq!(s, 403, "force-release, {ctx}: {v}");
            }
            assert_eq!(api.holder_token(key).await, before, "nothing changed, {ctx}");
        }
        // Keys-free routes: any valid token.
        for p in ["/v1/info", "/metrics"] {
            assert_eq!(api.call(Some(token), "GET", p, None).await.0, 200, "{token} {p}");
        }
        // list shows only what the token may read.
        let (s, v) = api.call(Some(token), "GET", "/v1/locks", None).await;
        let listed: Vec<String> = v["locks"].as_array().map_or_else(Vec::new, |l| {
            l.iter().map(|x| x["key"].as_str().unwrap_or_default().to_owned()).collect()
        });
        let expected: Vec<String> =
            [OUTSIDE, INSIDE].iter().filter(|k| may(token, "read", k)).map(|k| k.to_string()).collect();
        if expected.is_empty() {
            assert_eq!(s, 403, "list, {token}: {v}");
        } else {
            assert_eq!((s, listed), (200, expected), "list, {token}");
        }
    }
    // Paging through a narrowed list: only readable keys, each once.
    for i in 0..5 {
        api.call(Some("legacy"), "POST", &path(&format!("deploy/{i}"), "/acquire"), None).await;
        api.call(Some("legacy"), "POST", &path(&format!("db/{i}"), "/acquire"), None).await;
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/locks?limit=2&after={}", a.replace('/', "%2F")),
            None => "/v1/locks?limit=2".to_owned(),
        };
        let (s, v) = api.call(Some("narrow"), "GET", &q, None).await;
        assert_eq!(s, 200, "{v}");
        seen.extend(v["locks"].as_array().unwrap().iter().map(|l| l["key"].as_str().unwrap().to_owned()));
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["deploy/0", "deploy/1", "deploy/2", "deploy/3", "deploy/4", "deploy/web"]);

    // ops, the admin: force-release inside and outside; nothing else.
    for key in [INSIDE, OUTSIDE] {
        let p = format!("/v1/admin/locks/{}/release", key.replace('/', "%2F"));
        let (s, v) = api.call(Some("ops"), "POST", &p, None).await;
        assert_eq!((s, v["released"].as_bool()), (200, Some(true)), "{v}");
        assert_eq!(api.holder_token(key).await, None);
    }
}

#[tokio::test]
async fn events_only_of_readable_keys_and_sighup_rereads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let server = InProcess::with(|c| c.auth_token_file = Some(tokens.clone()));
    let api = Api { base: server.url(), http: reqwest::Client::new() };
    let mut events =
        api.http.get(format!("{}/v1/events", server.url())).bearer_auth("narrow").send().await.unwrap();
    assert_eq!(events.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for key in [OUTSIDE, INSIDE] {
        let (s, _) = api.call(Some("legacy"), "POST", &path(key, "/acquire"), None).await;
        assert_eq!(s, 200);
    }
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !text.contains(INSIDE) && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(500), events.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(text.contains(INSIDE), "the readable key's grant arrives: {text}");
    assert!(!text.contains(OUTSIDE), "no event of a key outside the scope: {text}");

    // A new token works after SIGHUP; a removed one stops working; a broken file keeps the old.
    assert_eq!(api.call(Some("fresh"), "GET", "/v1/info", None).await.0, 401);
    std::fs::write(&tokens, "fresh read:*\n").unwrap();
    // The server runs inside this process: the signal goes to it.
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while api.call(Some("fresh"), "GET", "/v1/info", None).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not re-read the token file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.call(Some("legacy"), "GET", "/v1/info", None).await.0, 401, "removed token refused");
    // The stream opened with a token that is gone now ends (it was allowed when it began).
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the revoked token's event stream still runs");
    std::fs::write(&tokens, "broken write:x\n").unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.call(Some("fresh"), "GET", "/v1/info", None).await.0,
        200,
        "a broken file keeps the old tokens"
    );
}
