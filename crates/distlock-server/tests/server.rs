//! Black-box tests of the server over real HTTP: each test starts its servers inside the test
//! process, on listeners bound to `127.0.0.1:0`, each with its own data directory. What needs the
//! server as a process (kill -9, signals, exit codes, metrics counted exactly) is in
//! `process.rs`.

mod common;

use common::{support, InProcess};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, LeaseId, Locker, LossReason};
use distlock_server::serve::ServerConfig;
use distlock_server::store::Limits;
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(server: &InProcess, path: &str, body: &str) -> (u16, Value) {
    let r =
        http().post(format!("{}{path}", server.url())).body(body.to_owned()).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(server: &InProcess, path: &str) -> (u16, Value) {
    let r = http().get(format!("{}{path}", server.url())).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn endpoints_and_error_codes() {
    let server = InProcess::start();
    let (s, lease) =
        post(&server, "/v1/locks/deploy%2Fweb/acquire", r#"{"ttl_ms":5000,"holder":"host-1/pid-42"}"#).await;
    assert_eq!(s, 200, "{lease}");
    assert_eq!(lease["key"], "deploy/web");
    assert_eq!(lease["fencing_token"], 1);
    assert_eq!(lease["ttl_ms"], 5000);
    let id = lease["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);

    let (s, held) = post(&server, "/v1/locks/deploy%2Fweb/acquire", "").await;
    assert_eq!((s, code(&held)), (409, "lock_held"));
    assert_eq!(held["error"]["holder"], "host-1/pid-42");

    let (s, st) = get(&server, "/v1/locks/deploy%2Fweb").await;
    assert_eq!(s, 200);
    assert_eq!(st["held"], true);
    assert_eq!(st["holder"], "host-1/pid-42");
    assert_eq!(st["fencing_token"], 1);
    assert!(st["expires_in_ms"].as_u64().unwrap() <= 5000);
    assert_eq!(st["waiters"], 0);
    assert!(!st.to_string().contains(&id), "status must never show the lease id");
    let (s, free) = get(&server, "/v1/locks/nobody").await;
    assert_eq!((s, &free["held"]), (200, &json!(false)));
    let (s, list) = get(&server, "/v1/locks?prefix=deploy").await;
    assert_eq!(s, 200);
    assert_eq!(list["locks"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&id));

    let stranger = LeaseId::generate();
    let (s, e) =
        post(&server, "/v1/locks/deploy%2Fweb/renew", &json!({"lease_id": stranger.as_str()}).to_string())
            .await;
    assert_eq!((s, code(&e)), (409, "lease_lost"));
    let (s, e) =
        post(&server, "/v1/locks/deploy%2Fweb/release", &json!({"lease_id": stranger.as_str()}).to_string())
            .await;
    assert_eq!((s, code(&e)), (409, "lease_lost"));
    let (s, r) =
        post(&server, "/v1/locks/deploy%2Fweb/renew", &json!({"lease_id": id, "ttl_ms": 9000}).to_string())
            .await;
    assert_eq!((s, &r["ttl_ms"], &r["fencing_token"]), (200, &json!(9000), &json!(1)));
    let (s, _) = post(&server, "/v1/locks/deploy%2Fweb/release", &json!({"lease_id": id}).to_string()).await;
    assert_eq!(s, 200);
    let (s, e) = post(&server, "/v1/locks/deploy%2Fweb/release", &json!({"lease_id": id}).to_string()).await;
    assert_eq!((s, code(&e)), (409, "lease_lost"), "released twice");

    // Bad input: 400 invalid_request, and nothing changes.
    let long_key = "k".repeat(1025);
    for (path, body) in [
        (format!("/v1/locks/{long_key}/acquire"), ""),
        ("/v1/locks/a%00b/acquire".to_owned(), ""),
        ("/v1/locks/%FF/acquire".to_owned(), ""),
        ("/v1/locks/k/acquire".to_owned(), r#"{"ttl_ms":99}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"ttl_ms":86400001}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"ttl_ms":"30s"}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"ttl_ms":-1}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"wait_ms":3600001}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"holder":"a\nb"}"#),
        ("/v1/locks/k/acquire".to_owned(), r#"{"tll_ms":1000}"#),
        ("/v1/locks/k/acquire".to_owned(), "{not json"),
        ("/v1/locks/k/renew".to_owned(), ""),
        ("/v1/locks/k/renew".to_owned(), r#"{"lease_id":""}"#),
        ("/v1/locks/k/release".to_owned(), r#"{"lease_id":42}"#),
    ] {
        let (s, e) = post(&server, &path, body).await;
        assert_eq!((s, code(&e)), (400, "invalid_request"), "{path} {body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (s, e) = post(&server, "/v1/locks/k/acquire", &"x".repeat(70_000)).await;
    assert_eq!((s, code(&e)), (413, "payload_too_large"));
    let (s, e) = get(&server, "/v2/nothing").await;
    assert_eq!((s, code(&e)), (404, "not_found"));
    let (_, list) = get(&server, "/v1/locks").await;
    assert_eq!(list["locks"], json!([]), "bad requests changed nothing");

    let (s, _) = get(&server, "/v1/locks/".to_owned().as_str()).await;
    assert!(s == 404 || s == 400);
    let (s, spec) = get(&server, "/openapi.json").await;
    assert_eq!(s, 200);
    assert!(spec["paths"]["/v1/locks/{key}/acquire"].is_object(), "openapi describes acquire");
    assert!(spec["paths"]["/v1/batch"].is_object(), "openapi describes batch");
    let metrics = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    for name in [
        "distlock_grants_total",
        "distlock_releases_total",
        "distlock_expiries_total",
        "distlock_waiters",
        "distlock_request_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    for label in [r#"route="/v1/locks/{key}/acquire""#, r#"status="413""#, r#"route="other""#] {
        assert!(metrics.contains(label), "request metrics lack the label {label}");
    }
}

/// Two clients on one key through the library: ownership is enforced by the server.
/// `POST /v1/batch`: every operation answers as its single route would; a bad one fails alone; a
/// malformed batch changes nothing.
#[tokio::test]
async fn batch_endpoint() {
    let server = InProcess::start();
    let (s, v) = post(
        &server,
        "/v1/batch",
        r#"{"ops":[{"op":"acquire","key":"a","ttl_ms":5000,"holder":"h1"},
                   {"op":"acquire","key":"b"},
                   {"op":"acquire","key":"","ttl_ms":5000},
                   {"op":"acquire","key":"c","wait_ms":100},
                   {"op":"acquire","key":"d","ttl_ms":1}]}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!((r[0]["status"].as_u64(), &r[0]["body"]["key"]), (Some(200), &json!("a")));
    assert_eq!(r[0]["body"]["ttl_ms"], 5000);
    assert_eq!(r[1]["status"], 200);
    assert_ne!(r[0]["body"]["fencing_token"], Value::Null);
    for (i, why) in [(2, "empty key"), (3, "a batch never waits"), (4, "ttl too short")] {
        assert_eq!((r[i]["status"].as_u64(), code(&r[i]["body"])), (Some(400), "invalid_request"), "{why}");
    }
    let id_a = r[0]["body"]["lease_id"].as_str().unwrap().to_owned();
    let id_b = r[1]["body"]["lease_id"].as_str().unwrap().to_owned();
    let stranger = LeaseId::generate().to_string();

    let ops = json!({"ops":[
        {"op":"acquire","key":"a"},
        {"op":"renew","key":"a","lease_id":id_a,"ttl_ms":9000},
        {"op":"release","key":"b","lease_id":stranger},
        {"op":"release","key":"b","lease_id":"not a lease id"},
    ]});
    let (s, v) = post(&server, "/v1/batch", &ops.to_string()).await;
    assert_eq!(s, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!((r[0]["status"].as_u64(), code(&r[0]["body"])), (Some(409), "lock_held"));
    assert_eq!(r[0]["body"]["error"]["holder"], "h1");
    assert_eq!((r[1]["status"].as_u64(), &r[1]["body"]["ttl_ms"]), (Some(200), &json!(9000)));
    assert_eq!((r[2]["status"].as_u64(), code(&r[2]["body"])), (Some(409), "lease_lost"));
    assert_eq!((r[3]["status"].as_u64(), code(&r[3]["body"])), (Some(400), "invalid_request"));
    assert_eq!(get(&server, "/v1/locks/b").await.1["held"], true, "a stranger's release changed nothing");

    // A malformed operation fails alone: the good one beside it runs.
    let (s, v) =
        post(&server, "/v1/batch", r#"{"ops":[{"op":"acquire","key":"x-ok"},{"op":"explode","key":"y"}]}"#)
            .await;
    assert_eq!(s, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"].as_u64(), Some(200), "{v}");
    assert_eq!((r[1]["status"].as_u64(), code(&r[1]["body"])), (Some(400), "invalid_request"));

    // A malformed batch is refused whole and applies nothing, not even its good operations.
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"op":"acquire","key":format!("m{i}")})).collect();
    for bad in [
        r#"{"ops":[{"op":"acquire","key":"x"},"not an object"]}"#.to_owned(),
        r#"{"ops":[{"op":"acquire","key":"x"}],"extra":1}"#.to_owned(),
        r#"{"ops":{"op":"acquire","key":"x"}}"#.to_owned(),
        r#"{"ops":[{"op":"acquire","key":"x"},"#.to_owned(),
        String::new(),
        json!({ "ops": too_many }).to_string(),
    ] {
        let (s, v) = post(&server, "/v1/batch", &bad).await;
        assert_eq!((s, code(&v)), (400, "invalid_request"), "{bad:.80}: {v}");
    }
    let (s, v) = post(&server, "/v1/batch", &format!(r#"{{"ops":[],"pad":"{}"}}"#, "x".repeat(70_000))).await;
    assert_eq!((s, code(&v)), (413, "payload_too_large"));
    let (_, list) = get(&server, "/v1/locks").await;
    let keys: Vec<&str> =
        list["locks"].as_array().unwrap().iter().map(|l| l["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["a", "b", "x-ok"], "only the good operations of well-formed batches took effect");

    // The releases, batched, free both keys.
    let ops = json!({"ops":[
        {"op":"release","key":"a","lease_id":id_a},
        {"op":"release","key":"b","lease_id":id_b},
    ]});
    let (s, v) = post(&server, "/v1/batch", &ops.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(v["results"][0], json!({"status":200,"body":{"key":"a","released":true}}));
    assert_eq!(v["results"][1]["body"]["released"], true);
    let (_, list) = get(&server, "/v1/locks").await;
    assert_eq!(list["locks"].as_array().map(Vec::len), Some(1), "only x-ok is left: {list}");
}

/// The library client gives the same answers whether it coalesces calls into batches (the
/// default) or sends one request per call (`batch=off`).
#[tokio::test]
async fn library_clients_share_the_server() {
    let server = InProcess::start();
    for url in [server.url(), format!("{}?batch=off", server.url())] {
        let key = if url.contains("batch=off") { "k-single" } else { "k" };
        library_client_answers(&url, key).await;
    }
}

async fn library_client_answers(url: &str, key: &str) {
    let (a, b) = (Locker::open(url).await.unwrap(), Locker::open(url).await.unwrap());
    let lease = a.acquire(key, &AcquireOptions::new().holder("alpha")).await.unwrap();
    assert_eq!(
        b.acquire(key, &AcquireOptions::new()).await.unwrap_err(),
        Error::Held { key: key.into(), holder: Some("alpha".into()) }
    );
    let stranger = LeaseId::generate();
    assert_eq!(
        b.release_lease(key, &stranger).await.unwrap_err(),
        Error::LeaseLost { key: key.into(), reason: LossReason::NotOwner }
    );
    let err = b.acquire(key, &AcquireOptions::new().wait(Duration::from_millis(300))).await.unwrap_err();
    assert!(matches!(&err, Error::WaitTimeout { holder: Some(h), .. } if h == "alpha"), "{err:?}");
    assert_eq!(b.status(key).await.unwrap().fencing_token, Some(lease.fencing_token()));
    let renewed = b.renew_lease(key, &stranger, Some(Duration::from_secs(5))).await.unwrap_err();
    assert!(matches!(renewed, Error::LeaseLost { .. }), "{renewed:?}");
    let bad = a.acquire("", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(bad, Error::InvalidInput(_)), "{bad:?}");
    // Keys with characters that need encoding in a path arrive intact.
    let odd = format!("{key}/deploy web/é?#%2F");
    let odd_lease = a.acquire(&odd, &AcquireOptions::new()).await.unwrap();
    let info = b.status(&odd).await.unwrap();
    assert_eq!((info.key.as_str(), info.held), (odd.as_str(), true));
    assert_eq!(b.list(&format!("{key}/deploy ")).await.unwrap().len(), 1);
    odd_lease.release().await.unwrap();
    lease.release().await.unwrap();
    let next = b.acquire(key, &AcquireOptions::new()).await.unwrap();
    assert!(next.fencing_token() > 1);
    next.release().await.unwrap();
    // Many tasks at once, on their own keys and on one key: coalesced or not, never two holders.
    let locker = Locker::open(url).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..32 {
        let locker = locker.clone();
        let key = format!("{key}-{t}");
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..20 {
                let lease = locker.acquire(&key, &AcquireOptions::new()).await.expect("own key is free");
                assert!(lease.fencing_token() > last, "tokens rise per key");
                last = lease.fencing_token();
                lease.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    support::hammer(&[locker.clone(), locker], &format!("{key}-shared"), 8, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_over_http() {
    let server = InProcess::start();
    let lockers = [server.locker().await, server.locker().await];
    support::hammer(&lockers, "counter", 16, 400).await;
}

/// Long-poll waiters are served in arrival order, woken by each release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_waiters_are_fifo() {
    let server = InProcess::start();
    let locker = server.locker().await;
    let first = locker.acquire("q", &AcquireOptions::new()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let (l, order) = (server.locker().await, order.clone());
        tasks.push(tokio::spawn(async move {
            let lease = l.acquire("q", &AcquireOptions::new().wait(Duration::from_secs(30))).await.unwrap();
            order.lock().unwrap().push(i);
            lease.release().await.unwrap();
        }));
        let start = Instant::now();
        while locker.status("q").await.unwrap().waiters != i + 1 {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let start = Instant::now();
    first.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..6).collect::<Vec<_>>());
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// A long-polling client that goes away does not keep the lock from the next one.
#[tokio::test]
async fn abandoned_long_poll_does_not_hold_the_lock() {
    let server = InProcess::start();
    let locker = server.locker().await;
    let held = locker.acquire("k", &AcquireOptions::new()).await.unwrap();
    let url = server.url();
    // A raw client that asks to wait 60 s but gives up after 300 ms.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/locks/k/acquire"))
        .body(r#"{"wait_ms":60000}"#)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(r.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = locker.acquire("k", &AcquireOptions::new()).await;
    assert!(next.is_ok(), "the lock went to the abandoned request: {next:?}");
}

/// Automatic renewal through the server keeps a short lease past five TTLs.
#[tokio::test]
async fn renewal_over_http() {
    let server = InProcess::start();
    let (a, b) = (server.locker().await, server.locker().await);
    let lease = a.acquire("k", &AcquireOptions::new().ttl(Duration::from_millis(500))).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(matches!(b.acquire("k", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    }
    assert!(lease.is_held());
}

/// A renew without `ttl_ms` (absent or null, alone or in a batch) keeps the lease's own TTL — the
/// one granted, then the last one renewed with — instead of the 30 s default; so does the
/// library's `renew_lease(…, None)`, alone or coalesced with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_without_ttl_keeps_the_lease_ttl() {
    let server = InProcess::start();
    let (s, lease) = post(&server, "/v1/locks/keep/acquire", r#"{"ttl_ms":600000}"#).await;
    assert_eq!(s, 200, "{lease}");
    let id = lease["lease_id"].as_str().unwrap().to_owned();
    for body in [json!({"lease_id": id}), json!({"lease_id": id, "ttl_ms": null})] {
        let (s, r) = post(&server, "/v1/locks/keep/renew", &body.to_string()).await;
        assert_eq!((s, &r["ttl_ms"]), (200, &json!(600_000)), "{body}: {r}");
        let (_, st) = get(&server, "/v1/locks/keep").await;
        assert!(st["expires_in_ms"].as_u64().unwrap() > 590_000, "{body}: {st}");
    }
    let ops = json!({"ops":[{"op":"renew","key":"keep","lease_id":id}]});
    let (s, r) = post(&server, "/v1/batch", &ops.to_string()).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (&r["results"][0]["status"], &r["results"][0]["body"]["ttl_ms"]),
        (&json!(200), &json!(600_000))
    );
    let renew = |ttl: Value| json!({"lease_id": id, "ttl_ms": ttl}).to_string();
    let (s, r) = post(&server, "/v1/locks/keep/renew", &renew(json!(60_000))).await;
    assert_eq!((s, &r["ttl_ms"]), (200, &json!(60_000)));
    let (s, r) = post(&server, "/v1/locks/keep/renew", &json!({"lease_id": id}).to_string()).await;
    assert_eq!((s, &r["ttl_ms"]), (200, &json!(60_000)), "the last TTL renewed with is kept");
    for bad in [json!(99), json!(86_400_001), json!("60s")] {
        let (s, e) = post(&server, "/v1/locks/keep/renew", &renew(bad.clone())).await;
        assert_eq!((s, code(&e)), (400, "invalid_request"), "{bad}");
    }

    for (i, url) in [server.url(), format!("{}?batch=off", server.url())].iter().enumerate() {
        let locker = Locker::open(url).await.unwrap();
        support::renew_without_ttl_keeps_the_lease_ttl(&locker, &format!("keep-{i}"), Duration::ZERO, true)
            .await;
        // Many at once: the client coalesces them into batches whose renew ops carry no ttl_ms.
        let opts = AcquireOptions::new().ttl(Duration::from_secs(600)).auto_renew(false);
        let mut leases = Vec::new();
        for k in 0..16 {
            leases.push(locker.acquire(&format!("many-{i}-{k}"), &opts).await.unwrap());
        }
        let renewals = leases.iter().map(|l| locker.renew_lease(l.key(), l.lease_id(), None));
        for grant in futures_util::future::join_all(renewals).await {
            assert_eq!(grant.unwrap().ttl, Duration::from_secs(600));
        }
    }
}

/// `GET /v1/locks` pages from a cursor: 25 locks 10 at a time answer 10, 10 and 5, each `next`
/// the page's last key and `null` after the last page; bad limits and cursors are 400; the
/// library client passes `after` and `limit` through (coalescing or not).
#[tokio::test]
async fn list_pages_follow_the_cursor() {
    let server = InProcess::start();
    for i in 0..25 {
        let (s, v) = post(&server, &format!("/v1/locks/pages%2F{i:02}/acquire"), r#"{"ttl_ms":60000}"#).await;
        assert_eq!(s, 200, "{v}");
    }
    post(&server, "/v1/locks/pages0/acquire", "").await;
    let (mut after, mut sizes, mut keys) = (String::new(), Vec::new(), Vec::new());
    loop {
        let (s, v) = get(&server, &format!("/v1/locks?prefix=pages%2F&limit=10&after={after}")).await;
        assert_eq!(s, 200, "{v}");
        let page: Vec<String> =
            v["locks"].as_array().unwrap().iter().map(|l| l["key"].as_str().unwrap().to_owned()).collect();
        sizes.push(page.len());
        assert!(v.as_object().unwrap().contains_key("next"), "next is always there: {v}");
        let next = v["next"].as_str().map(str::to_owned);
        keys.extend(page.iter().cloned());
        match next {
            Some(next) => {
                assert_eq!(Some(&next), page.last(), "next is the last key returned");
                after = next.replace('/', "%2F");
            }
            None => break,
        }
        assert!(sizes.len() < 5, "{sizes:?}");
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(keys, (0..25).map(|i| format!("pages/{i:02}")).collect::<Vec<_>>());
    let (_, v) = get(&server, "/v1/locks?prefix=pages%2F&after=pages%2F19&limit=5").await;
    assert_eq!((v["locks"].as_array().unwrap().len(), &v["next"]), (5, &Value::Null));

    let long = "k".repeat(distlock::types::MAX_AFTER_CHARS + 1);
    for query in [
        "limit=0".to_owned(),
        "limit=10001".to_owned(),
        "limit=ten".to_owned(),
        "limit=-1".to_owned(),
        "after=a%00b".to_owned(),
        format!("after={long}"),
        "prefix=p%00".to_owned(),
    ] {
        let (s, e) = get(&server, &format!("/v1/locks?{query}")).await;
        assert_eq!((s, code(&e)), (400, "invalid_request"), "{query}: {e}");
    }
    let (s, v) = get(&server, "/v1/locks?limit=10000").await;
    assert_eq!((s, v["locks"].as_array().unwrap().len()), (200, 26));

    for (i, url) in [server.url(), format!("{}?batch=off", server.url())].iter().enumerate() {
        let locker = Locker::open(url).await.unwrap();
        support::pages_of_ten(&locker, &format!("lib-{i}/")).await;
        let err = locker.list_page(&distlock::ListQuery::prefix("").limit(10_001)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
}

/// Without a limit the server answers pages of at most 10,000 locks (never the whole table at
/// once), and `Locker::list` follows the pages to the end.
#[tokio::test]
async fn list_without_a_limit_answers_pages_of_ten_thousand() {
    let server = InProcess::start();
    for batch in 0..11 {
        let ops: Vec<Value> = (0..1000)
            .map(|i| json!({"op":"acquire","key":format!("bulk/{:05}", batch * 1000 + i)}))
            .collect();
        let (s, v) = post(&server, "/v1/batch", &json!({ "ops": ops }).to_string()).await;
        assert_eq!(s, 200);
        assert!(v["results"].as_array().unwrap().iter().all(|r| r["status"] == 200));
    }
    let (s, v) = get(&server, "/v1/locks").await;
    assert_eq!((s, v["locks"].as_array().unwrap().len(), &v["next"]), (200, 10_000, &json!("bulk/09999")));
    let (_, v) = get(&server, "/v1/locks?after=bulk%2F09999").await;
    assert_eq!((v["locks"].as_array().unwrap().len(), &v["next"]), (1000, &Value::Null));
    let all = server.locker().await.list("bulk/").await.unwrap();
    assert_eq!(all.len(), 11_000);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key), "in key order, each once");
}

#[tokio::test]
async fn auth_on_and_off() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "# team tokens\nsecret-one\n\nsecret-two\n").unwrap();
    let server = InProcess::with(|c| c.auth_token_file = Some(tokens.clone()));
    let url = format!("{}/v1/locks/k", server.url());
    for header in [None, Some("Bearer wrong"), Some("secret-one")] {
        let mut req = http().get(&url);
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{header:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(code(&v), "unauthorized");
    }
    let r = http().get(&url).bearer_auth("secret-two").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(http().get(format!("{}/healthz", server.url())).send().await.unwrap().status().as_u16(), 200);
    // The library: without a token it gets Unauthorized; with one in the URL it works.
    let err =
        Locker::open(&server.url()).await.unwrap().acquire("k", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    let locker = Locker::open(&format!("{}?token=secret-one", server.url())).await.unwrap();
    locker.acquire("k", &AcquireOptions::new()).await.unwrap();

    let open = InProcess::start();
    assert_eq!(http().get(format!("{}/v1/locks/k", open.url())).send().await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn limits_answer_429() {
    let server = InProcess::with(|c| c.limits = Limits { max_leases: 2, max_waiters: 1 });
    let locker = server.locker().await;
    let _a = locker.acquire("a", &AcquireOptions::new()).await.unwrap();
    let _b = locker.acquire("b", &AcquireOptions::new()).await.unwrap();
    let err = locker.acquire("c", &AcquireOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::LimitExceeded(_)), "{err:?}");
    let (s, e) = post(&server, "/v1/locks/c/acquire", "").await;
    assert_eq!((s, code(&e)), (429, "limit_exceeded"));
    let l2 = server.locker().await;
    let waiter =
        tokio::spawn(
            async move { l2.acquire("a", &AcquireOptions::new().wait(Duration::from_secs(5))).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = locker.acquire("b", &AcquireOptions::new().wait(Duration::from_secs(1))).await.unwrap_err();
    assert!(matches!(err, Error::LimitExceeded(_)), "{err:?}");
    waiter.abort();
}

/// Garbage in every shape: the server answers 4xx, never 5xx, never crashes, changes nothing.
#[tokio::test]
async fn garbage_sweep() {
    let server = InProcess::start();
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let paths = [
        "/v1/locks/k/acquire",
        "/v1/locks/k/renew",
        "/v1/locks/k/release",
        "/v1/locks/%/acquire",
        "/v1/locks/k/acquire?x=%zz",
        "/v1/locks?prefix=%00",
        "/v1/batch",
    ];
    for i in 0..300 {
        // Never empty or blank (an empty acquire body is a valid request for all defaults).
        let len = 1 + (next() % 300) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        body[0] |= 0x80;
        let path = paths[i % paths.len()];
        let r = http().post(format!("{}{path}", server.url())).body(body).send().await.unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }
    // Raw malformed HTTP on the socket.
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /v1/locks/k/acquire HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"\x00\xff\x13\x37",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(raw);
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }
    // Made-up methods: refused, and they share one metrics label instead of adding series.
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("X{i}").as_bytes()).unwrap();
        let r = http().request(method, format!("{}/v1/locks/k/acquire", server.url())).send().await.unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let metrics = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("method=\"X1\""), "a made-up method became a label");
    assert!(metrics.contains("method=\"OTHER\""), "made-up methods are counted as OTHER");
    let (s, list) = get(&server, "/v1/locks").await;
    assert_eq!(s, 200, "server still answers");
    assert_eq!(list["locks"], json!([]), "garbage changed nothing");
    assert_eq!(http().get(format!("{}/livez", server.url())).send().await.unwrap().status().as_u16(), 200);
}

/// `--store memory://` is refused by the server itself (not only by the command line): it would
/// lock nothing another process can see. Nothing is created.
#[tokio::test]
async fn memory_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut config = ServerConfig::new(&dir);
    config.store = Some("memory://".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = distlock_server::serve::serve(listener, config, std::future::pending());
    let err =
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("refused, not served").unwrap_err();
    assert!(matches!(err, distlock_server::Error::Settings(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("memory://") && message.contains("other process"), "{message}");
    assert!(!dir.exists(), "nothing was created");
}

/// What a program embedding the server can act on when it does not start: the error says which
/// part is at fault (a data directory another server has, a token file, an address in use).
#[tokio::test]
async fn start_failures_name_their_cause() {
    let first = InProcess::start();
    let serve = |config: ServerConfig| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let run = distlock_server::serve::serve(listener, config, std::future::pending());
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("refused, not served").unwrap_err()
    };
    let err = serve(ServerConfig::new(&first.dir)).await;
    match &err {
        distlock_server::Error::Store { dir, source: distlock_server::wal::WalError::InUse(_) } => {
            assert_eq!(dir, &first.dir)
        }
        other => panic!("expected Store(InUse), got {other:?}"),
    }
    assert!(err.to_string().contains("in use by another distlock server"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "# no token here\n").unwrap();
    let mut config = ServerConfig::new(tmp.path().join("data"));
    config.auth_token_file = Some(tokens);
    let err = serve(config).await;
    assert!(matches!(err, distlock_server::Error::File(_)), "{err:?}");
    assert!(err.to_string().contains("holds no tokens"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let run =
        distlock_server::serve::run(addr, ServerConfig::new(tmp.path().join("data")), std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(10), run).await.expect("refused").unwrap_err();
    assert!(matches!(err, distlock_server::Error::Bind { addr: a, .. } if a == addr), "{err:?}");
    assert!(!tmp.path().join("data").exists(), "nothing was created");
}

/// With `--store redis://…` the server is a stateless front: two servers share one Redis.
#[tokio::test]
async fn servers_in_front_of_one_redis() {
    let redis = support::RedisServer::start();
    let front = |c: &mut ServerConfig| c.store = Some(redis.url());
    let (one, two) = (InProcess::with(front), InProcess::with(front));
    let (a, b) = (one.locker().await, two.locker().await);
    let lease = a.acquire("shared", &AcquireOptions::new().holder("via-one")).await.unwrap();
    assert_eq!(
        b.acquire("shared", &AcquireOptions::new()).await.unwrap_err(),
        Error::Held { key: "shared".into(), holder: Some("via-one".into()) }
    );
    let direct = Locker::open(&redis.url()).await.unwrap();
    assert_eq!(direct.status("shared").await.unwrap().fencing_token, Some(lease.fencing_token()));
    let waiter = tokio::spawn(async move {
        b.acquire("shared", &AcquireOptions::new().wait(Duration::from_secs(5))).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    lease.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert!(next.fencing_token() > 1);
    let (s, h) = get(&one, "/healthz").await;
    assert_eq!((s, &h["store"]), (200, &json!("redis")));
}

/// With `--store etcd://…` the server is a stateless front for an etcd cluster.
#[tokio::test]
async fn server_in_front_of_etcd() {
    let etcd = support::EtcdCluster::start(1);
    let server = InProcess::with(|c| c.store = Some(format!("{}?timeout=5s", etcd.url())));
    let (a, b) = (server.locker().await, server.locker().await);
    let lease = a.acquire("shared", &AcquireOptions::new().holder("via-http")).await.unwrap();
    assert_eq!(
        b.acquire("shared", &AcquireOptions::new()).await.unwrap_err(),
        Error::Held { key: "shared".into(), holder: Some("via-http".into()) }
    );
    let direct = Locker::open(&etcd.url()).await.unwrap();
    assert_eq!(direct.status("shared").await.unwrap().fencing_token, Some(lease.fencing_token()));
    lease.release().await.unwrap();
    assert!(b.acquire("shared", &AcquireOptions::new()).await.unwrap().fencing_token() > 1);
    let (s, h) = get(&server, "/healthz").await;
    assert_eq!((s, &h["store"]), (200, &json!("etcd")));
}

/// A semaphore's holders (and a shared lock's) are logged and recovered like locks: after a
/// restart every holder is back with its token, the limit (or the mode) still binds, and the
/// next grant's token is higher.
#[tokio::test]
async fn semaphore_holders_survive_a_restart() {
    let mut server = InProcess::start();
    let locker = server.locker().await;
    let opts = distlock::AcquireOptions::new().limit(3).ttl(Duration::from_secs(60)).auto_renew(false);
    let a = locker.acquire("pool", &opts.clone().holder("a")).await.unwrap();
    let b = locker.acquire("pool", &opts.clone().holder("b")).await.unwrap();
    let (a_token, b_token) = (a.fencing_token(), b.fencing_token());
    let (a_id, b_id) = (a.lease_id().clone(), b.lease_id().clone());
    let read = distlock::AcquireOptions::new().shared().ttl(Duration::from_secs(60)).auto_renew(false);
    let r1 = locker.acquire("rw", &read.clone().holder("r1")).await.unwrap();
    let r2 = locker.acquire("rw", &read.clone().holder("r2")).await.unwrap();
    // Forget the leases without releasing them: the restart is what is tested.
    std::mem::forget(a);
    std::mem::forget(b);
    std::mem::forget(r1);
    std::mem::forget(r2);
    server.restart();
    let locker = server.locker().await;
    let rw = locker.status("rw").await.unwrap();
    assert_eq!((rw.mode, rw.holders.len()), (Some(distlock::LockMode::Shared), 2), "{rw:?}");
    locker.acquire("rw", &read.clone().holder("r3")).await.expect("readers still share it");
    let write = locker.acquire("rw", &distlock::AcquireOptions::new()).await;
    assert!(matches!(write, Err(Error::Held { .. })), "{write:?}");
    let info = locker.status("pool").await.unwrap();
    assert_eq!(info.limit, Some(3), "{info:?}");
    let holders: Vec<(&str, u64)> =
        info.holders.iter().map(|h| (h.holder.as_str(), h.fencing_token)).collect();
    assert_eq!(holders, [("a", a_token), ("b", b_token)]);
    let c = locker.acquire("pool", &opts.clone().holder("c")).await.expect("the third permit");
    assert!(c.fencing_token() > b_token, "tokens continue above the recovered ones");
    let full = locker.acquire("pool", &opts.clone().holder("d")).await;
    assert!(matches!(full, Err(Error::Held { .. })), "{full:?}");
    let other = locker.acquire("pool", &opts.clone().limit(2)).await;
    assert!(matches!(other, Err(Error::LimitMismatch { limit: 3, .. })), "{other:?}");
    // The recovered leases are still their holders': each can be released by its id.
    let backend = locker.backend().clone();
    backend.release("pool", &a_id).await.expect("a's lease was recovered");
    backend.release("pool", &b_id).await.expect("b's lease was recovered");
    c.release().await.unwrap();
    assert!(!locker.status("pool").await.unwrap().held);
}

/// A leader's value is logged with its lease and its proclamations: after a restart status shows
/// the last proclaimed value with the same token, the recovered lease can still proclaim, and an
/// observer that was following the key before the restart reconnects by itself and sees it.
#[tokio::test]
async fn a_leaders_value_survives_a_restart() {
    let mut server = InProcess::start();
    let locker = server.locker().await;
    let opts = distlock::AcquireOptions::new().ttl(Duration::from_secs(60)).auto_renew(false);
    let mut term = locker.campaign("svc", "10.0.0.1:80", &opts).await.unwrap();
    term.proclaim("10.0.0.1:81").await.unwrap();
    let (token, id) = (term.fencing_token(), term.lease().lease_id().clone());
    std::mem::forget(term);
    let mut changes = locker.observe("svc");
    assert_eq!(changes.next().await.unwrap().map(|l| l.value).as_deref(), Some("10.0.0.1:81"));
    server.restart_on_same_port();
    let locker = server.locker().await;
    let leader = locker.leader("svc").await.unwrap().expect("the leader was recovered");
    assert_eq!((leader.value.as_str(), leader.fencing_token), ("10.0.0.1:81", token));
    locker.backend().proclaim("svc", &id, "10.0.0.1:82").await.expect("the recovered lease proclaims");
    let seen = tokio::time::timeout(Duration::from_secs(10), changes.next()).await.unwrap().unwrap();
    assert_eq!(seen.map(|l| (l.value, l.fencing_token)), Some(("10.0.0.1:82".to_owned(), token)));
    server.restart();
    let locker = server.locker().await;
    assert_eq!(locker.leader("svc").await.unwrap().map(|l| l.value).as_deref(), Some("10.0.0.1:82"));
    let big = locker.backend().proclaim("svc", &id, &"x".repeat(5000)).await;
    assert!(matches!(big, Err(Error::InvalidInput(_))), "{big:?}");
    assert_eq!(locker.leader("svc").await.unwrap().map(|l| l.value).as_deref(), Some("10.0.0.1:82"));
}
