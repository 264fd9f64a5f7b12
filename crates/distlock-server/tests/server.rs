//! Black-box tests of `distlock serve` over real HTTP: the binary is started as a process on a
//! free loopback port with its own data directory, and killed with SIGKILL where the test says so.

mod common;

use common::{support, Server};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, LeaseId, Locker, LossReason};
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let r =
        http().post(format!("{}{path}", server.url())).body(body.to_owned()).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let r = http().get(format!("{}{path}", server.url())).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn endpoints_and_error_codes() {
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
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

    // A malformed batch is refused whole and applies nothing, not even its good operations.
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"op":"acquire","key":format!("m{i}")})).collect();
    for bad in [
        r#"{"ops":[{"op":"acquire","key":"x"},{"op":"explode","key":"y"}]}"#.to_owned(),
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
    assert_eq!(keys, ["a", "b"], "only the good operations of good batches took effect");

    // The releases, batched, free both keys.
    let ops = json!({"ops":[
        {"op":"release","key":"a","lease_id":id_a},
        {"op":"release","key":"b","lease_id":id_b},
    ]});
    let (s, v) = post(&server, "/v1/batch", &ops.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(v["results"][0], json!({"status":200,"body":{"key":"a","released":true}}));
    assert_eq!(v["results"][1]["body"]["released"], true);
    assert_eq!(get(&server, "/v1/locks").await.1["locks"], json!([]));
}

/// The library client gives the same answers whether it coalesces calls into batches (the
/// default) or sends one request per call (`batch=off`).
#[tokio::test]
async fn library_clients_share_the_server() {
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
    let lockers = [server.locker().await, server.locker().await];
    support::hammer(&lockers, "counter", 16, 400).await;
}

/// Long-poll waiters are served in arrival order, woken by each release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_waiters_are_fifo() {
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
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
    let server = Server::start(&[]);
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

    let long = "k".repeat(1025);
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
    let server = Server::start(&[]);
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

/// A call made while no other is out goes alone to its single route: nothing to coalesce, so no
/// batch envelope (fails if the client sends every call through `/v1/batch`).
#[tokio::test]
async fn lone_calls_use_the_single_routes() {
    let server = Server::start(&[]);
    let locker = server.locker().await;
    for i in 0..10 {
        let lease = locker.acquire(&format!("alone-{i}"), &AcquireOptions::new()).await.unwrap();
        lease.renew().await.unwrap();
        lease.release().await.unwrap();
    }
    let text = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("distlock_batch_ops_total "), "no call went through a batch");
    for route in ["acquire", "renew", "release"] {
        let label = format!(
            r#"distlock_request_seconds_count{{route="/v1/locks/{{key}}/{route}",method="POST",status="200"}} 10"#
        );
        assert!(
            text.lines().any(|l| l.starts_with(&label)),
            "ten lone {route} calls on their route:\n{text}"
        );
    }
}

/// Many concurrent calls with the longest keys: the client splits them into batches under the
/// server's 64 KiB body limit (a batch over it would fail every call in it with 413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_batches_stay_under_the_body_limit() {
    let server = Server::start(&[]);
    let locker = server.locker().await;
    let holder = "h".repeat(distlock::validate::MAX_HOLDER_BYTES);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let (locker, holder) = (locker.clone(), holder.clone());
            tokio::spawn(async move {
                // 1024 bytes, and JSON-escaped ("\u0001") several times longer on the wire.
                let key = format!("{i:04}{}", "\u{1}".repeat(1020));
                let lease = locker.acquire(&key, &AcquireOptions::new().holder(holder)).await?;
                lease.release().await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every call succeeds");
    }
    let text = http().get(format!("{}/metrics", server.url())).send().await.unwrap().text().await.unwrap();
    let batched: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("distlock_batch_ops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // Nearly all: a call that finds the client idle goes alone to its single route.
    assert!(batched >= 550.0, "the calls went through batches: {batched}");
}

/// A server that is down, or up but silent, gives `Unavailable` within the client's timeout in both
/// client modes, and the client works again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_silent_server_is_unavailable() {
    let mut server = Server::start(&[]);
    // A listener that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    for mode in ["", "&batch=off"] {
        let locker = Locker::open(&format!("{}?timeout=300ms{mode}", server.url())).await.unwrap();
        let lease = locker.acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(60))).await.unwrap();
        let id = lease.lease_id().clone();
        server.kill9();
        let err = locker.acquire("other", &AcquireOptions::new()).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        let err = locker.release_lease("k", &id).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        server.restart_in_place();
        // Back: the acknowledged lease survived, and the same client releases it.
        locker.release_lease("k", &id).await.unwrap();
        drop(lease);

        let quiet = Locker::open(&format!("{silent_url}?timeout=300ms{mode}")).await.unwrap();
        let start = Instant::now();
        let err = quiet.acquire("k", &AcquireOptions::new()).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{mode}: {err:?}");
        assert!(start.elapsed() < Duration::from_secs(5), "{mode}: took {:?}", start.elapsed());
    }
}

/// The client keeps connections open between calls; after the server restarts, those are found
/// closed and replaced, so the first calls after the restart succeed (nothing is reported
/// unavailable, nothing is sent twice: the lease is still held by its owner alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_are_replaced_after_a_server_restart() {
    let mut server = Server::start(&[]);
    for mode in ["", "?batch=off"] {
        let locker = Locker::open(&format!("{}{mode}", server.url())).await.unwrap();
        let opts = AcquireOptions::new().ttl(Duration::from_secs(60)).auto_renew(false);
        let round = |round: usize| {
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let (locker, opts) = (locker.clone(), opts.clone());
                    tokio::spawn(async move {
                        let key = format!("kept{mode}-{round}-{i}");
                        let lease = locker.acquire(&key, &opts).await?;
                        lease.release().await
                    })
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            }
        };
        round(0).await;
        let held = locker.acquire(&format!("held{mode}"), &opts).await.unwrap();
        server.restart_in_place();
        round(1).await;
        // The lease acknowledged before the restart is still this client's, and only its.
        let err = locker.acquire(&format!("held{mode}"), &opts).await.unwrap_err();
        assert!(matches!(err, Error::Held { .. }), "{mode}: {err:?}");
        held.release().await.unwrap();
    }
}

/// The log segment written last (segments are preallocated full of zeros, so later ones may
/// exist unwritten) and where its records end.
fn segment(dir: &Path) -> (PathBuf, usize) {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.into_iter()
        .rev()
        .find_map(|p| {
            // Records are JSON, so the last byte of the last one is not zero.
            let end = std::fs::read(&p).unwrap().iter().rposition(|&b| b != 0)? + 1;
            Some((p, end))
        })
        .expect("a log segment with records")
}

/// kill -9 in the middle of load: every acknowledged, unreleased lease is still held after the
/// restart with its token, released ones are free, and new tokens are above every token issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_acknowledged_leases_and_tokens() {
    let mut server = Server::start(&[]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    let mut kept = Vec::new();
    for i in 0..50 {
        let lease = locker.acquire(&format!("held-{i}"), &opts).await.unwrap();
        kept.push((lease.key().to_owned(), lease.fencing_token(), lease.lease_id().clone()));
        std::mem::forget(lease);
    }
    for i in 0..20 {
        let lease = locker.acquire(&format!("gone-{i}"), &opts).await.unwrap();
        lease.release().await.unwrap();
    }
    // Load while the server dies: every acknowledged token is recorded.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for t in 0..8 {
        let (l, acked) = (server.locker().await, acked.clone());
        load.push(tokio::spawn(async move {
            let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
            for n in 0.. {
                match l.acquire(&format!("load-{t}-{n}"), &opts).await {
                    Ok(lease) => {
                        acked.lock().unwrap().push(lease.fencing_token());
                        std::mem::forget(lease);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9();
    for t in load {
        t.await.unwrap();
    }
    server.spawn();
    let locker = server.locker().await;
    for (key, token, id) in &kept {
        let st = locker.status(key).await.unwrap();
        assert!(st.held, "{key} lost across kill -9");
        assert_eq!(st.fencing_token, Some(*token));
        locker.renew_lease(key, id, Some(Duration::from_secs(60))).await.expect("the holder still owns it");
    }
    for i in 0..20 {
        assert!(!locker.status(&format!("gone-{i}")).await.unwrap().held);
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "load made progress before the kill ({})", acked.len());
    let max_acked = acked.iter().copied().max().unwrap();
    let fresh = locker.acquire("after-restart", &AcquireOptions::new()).await.unwrap();
    assert!(
        fresh.fencing_token() > max_acked,
        "token {} reissued or went back (max acked {max_acked})",
        fresh.fencing_token()
    );
}

/// A torn write at the end of the log is cut off with a warning; the rest survives. Damage in
/// the middle refuses to start with a clear message.
#[tokio::test]
async fn torn_tail_recovers_corrupt_middle_refuses() {
    let mut server = Server::start(&["--compact-bytes", "100000000"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    for i in 0..5 {
        std::mem::forget(locker.acquire(&format!("k{i}"), &opts).await.unwrap());
    }
    server.kill9();
    // A frame cut short where the next record would have gone.
    let (log, end) = segment(&server.dir);
    let mut bytes = std::fs::read(&log).unwrap();
    let torn = [200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'];
    bytes.truncate(end);
    bytes.extend_from_slice(&torn);
    bytes.resize(bytes.len().max(std::fs::metadata(&log).unwrap().len() as usize), 0);
    std::fs::write(&log, &bytes).unwrap();
    server.spawn();
    let locker = server.locker().await;
    for i in 0..5 {
        assert!(locker.status(&format!("k{i}")).await.unwrap().held);
    }
    let later = locker.acquire("k-later", &opts).await.unwrap();
    assert_eq!(later.fencing_token(), 6);
    std::mem::forget(later);
    for i in 0..3 {
        std::mem::forget(locker.acquire(&format!("k-more-{i}"), &opts).await.unwrap());
    }
    // Flip a byte inside the first record of the current segment (more records follow it).
    server.kill9();
    let (log, end) = segment(&server.dir);
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(end > 40, "segment has records");
    bytes[20] ^= 0x55;
    std::fs::write(&log, &bytes).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the server started on a log with a corrupt middle");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("corrupt") && stderr.contains("refusing to start"), "{stderr}");
}

/// Compaction keeps the data directory to the live leases: after many acquire/release cycles the
/// log is small, and a restart restores exactly the live leases.
#[tokio::test]
async fn compaction_follows_live_leases() {
    let mut server = Server::start(&["--compact-bytes", "20000"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(3600)).auto_renew(false);
    let keep = locker.acquire("keep", &opts).await.unwrap();
    let keep_token = keep.fencing_token();
    std::mem::forget(keep);
    for i in 0..400 {
        let l = locker.acquire(&format!("churn-{}", i % 7), &opts).await.unwrap();
        l.release().await.unwrap();
    }
    let total: u64 =
        std::fs::read_dir(&server.dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total < 60_000, "data dir is {total} bytes after compaction");
    server.restart();
    let locker = server.locker().await;
    let list = locker.list("").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].fencing_token, Some(keep_token));
    assert!(locker.acquire("new", &opts).await.unwrap().fencing_token() > 401);
}

#[tokio::test]
async fn auth_on_and_off() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "# team tokens\nsecret-one\n\nsecret-two\n").unwrap();
    let server = Server::start(&["--auth-token-file", tokens.to_str().unwrap()]);
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

    let open = Server::start(&[]);
    assert_eq!(http().get(format!("{}/v1/locks/k", open.url())).send().await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn limits_answer_429() {
    let server = Server::start(&["--max-leases", "2", "--max-waiters", "1"]);
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
    let mut server = Server::start(&[]);
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
    assert!(server.child.as_mut().unwrap().try_wait().unwrap().is_none(), "server still running");
}

/// SIGTERM shuts down cleanly (exit 0) and the data survives.
#[tokio::test]
async fn sigterm_is_graceful() {
    let mut server = Server::start(&[]);
    let locker = server.locker().await;
    std::mem::forget(
        locker
            .acquire("k", &AcquireOptions::new().ttl(Duration::from_secs(600)).auto_renew(false))
            .await
            .unwrap(),
    );
    let mut child = server.child.take().unwrap();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    server.spawn();
    assert!(server.locker().await.status("k").await.unwrap().held);
}

/// On SIGTERM a waiting acquire is answered at once with a retryable 503 `shutting_down`
/// (`Retry-After: 1`) — not held for the whole `--shutdown-grace` — and the library client reports
/// it as `Unavailable`, saying that the server is restarting; the server then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_waiting_acquires_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "30s"]);
    let locker = server.locker().await;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(600)).auto_renew(false).holder("holder");
    std::mem::forget(locker.acquire("k", &opts).await.unwrap());
    let url = server.url();
    let raw = tokio::spawn(async move {
        let r = http().post(format!("{url}/v1/locks/k/acquire")).body(r#"{"wait_ms":60000}"#).send().await;
        let r = r.expect("an answer, not a dropped connection");
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
        (r.status().as_u16(), retry_after, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    let waiter = server.locker().await;
    let library = tokio::spawn(async move {
        waiter.acquire("k", &AcquireOptions::new().wait(Duration::from_secs(60))).await
    });
    let start = Instant::now();
    while locker.status("k").await.unwrap().waiters != 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "the two waiters did not queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut child = server.child.take().unwrap();
    let stopped_at = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let (status, retry_after, body) = tokio::time::timeout(Duration::from_secs(5), raw)
        .await
        .expect("the waiting acquire was held instead of answered at once")
        .unwrap();
    assert_eq!((status, code(&body), retry_after.as_deref()), (503, "shutting_down", Some("1")), "{body}");
    let err = tokio::time::timeout(Duration::from_secs(5), library).await.expect("answered at once").unwrap();
    match err {
        Err(Error::Unavailable(m)) => assert!(m.contains("restarting"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped_at.elapsed() < Duration::from_secs(10), "did not stop well within the 30 s grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
}

/// A busy `--listen` port fails start-up before the data directory is touched: exit 1, and a data
/// directory that did not exist still does not.
#[tokio::test]
async fn busy_port_fails_before_touching_the_data_dir() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not-yet").join("data");
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&port.to_string()), "the message names the address: {stderr}");
    assert!(!tmp.path().join("not-yet").exists(), "the data directory was created: {stderr}");
}

/// `--store memory://` is refused by the server itself (not only by the command line): it would
/// lock nothing another process can see. Nothing is bound or created.
#[tokio::test]
async fn memory_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = distlock_server::serve::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.clone(),
        store: Some("memory://".into()),
        auth_token_file: None,
        admin_token_file: None,
        limits: distlock_server::store::Limits::default(),
        compact_bytes: 1 << 20,
        shutdown_grace: Duration::from_secs(1),
        net: Default::default(),
        event_history: 100,
    };
    let run = distlock_server::serve::run(config, std::future::pending());
    let err =
        tokio::time::timeout(Duration::from_secs(10), run).await.expect("refused, not served").unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("memory://") && message.contains("other process"), "{message}");
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--store", "memory://", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("memory://"), "{stderr}");
    assert!(!dir.exists(), "nothing was created");
}

/// With `--store redis://…` the server is a stateless front: two servers share one Redis.
#[tokio::test]
async fn servers_in_front_of_one_redis() {
    let redis = support::RedisServer::start();
    let store = format!("--store={}", redis.url());
    let (one, two) = (Server::start(&[&store]), Server::start(&[&store]));
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
    let store = format!("--store={}?timeout=5s", etcd.url());
    let server = Server::start(&[&store]);
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

/// Two servers on one data directory would each grant the same locks: the second refuses to
/// start while the first runs, and starts once the first is gone (even after `kill -9`).
#[tokio::test]
async fn one_server_per_data_directory() {
    let mut server = Server::start(&[]);
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another distlock server"), "{stderr}");
    assert!(server.locker().await.status("k").await.is_ok(), "the first server keeps serving");
    server.restart_in_place();
    assert!(server.locker().await.status("k").await.is_ok(), "free again after kill -9");
}
