//! The live web page in a real browser: headless Chromium driven through chromedriver (WebDriver),
//! against a server with auth on and an admin token. Saves a screenshot to
//! `target/web-page.png`. Needs Debian's `chromium` and `chromium-driver` (`./scripts/test.sh`
//! installs them).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{support, Server};
use distlock::{AcquireOptions, Error, Locker};
use fantoccini::{Client, ClientBuilder, Locator};

const TOKEN: &str = "page-test-token";
const ADMIN: &str = "page-test-admin";

struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let bin = support::require_binary("chromedriver", "chromium-driver");
        support::require_binary("chromium", "chromium");
        let port = support::free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        support::wait_for_port(port, Duration::from_secs(20), "chromedriver");
        Driver { child, port, _profile: tempfile::tempdir().expect("profile dir") }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                    format!("--user-data-dir={}", self._profile.path().display()),
                ]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 25 ms until it gives `Some`, for at most `within`; returns the value and
/// how long it took.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < within, "the page did not show {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Text of the first element matching `css`, if any.
async fn text(page: &Client, css: &str) -> Option<String> {
    page.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

fn row(key: &str, cell: &str) -> String {
    format!("#locks tr[data-key=\"{key}\"] td.{cell}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_holders_waiters_and_events_live() {
    let dir = tempfile::tempdir().expect("dir");
    let (tokens, admins) = (dir.path().join("tokens"), dir.path().join("admins"));
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
    std::fs::write(&admins, format!("{ADMIN}\n")).expect("admins");
    let server = Server::start(&[
        "--auth-token-file",
        tokens.to_str().expect("path"),
        "--admin-token-file",
        admins.to_str().expect("path"),
    ]);
    let url = format!("{}?token={TOKEN}", server.url());
    let driver = Driver::start();
    let page = driver.browser().await;
    page.goto(&server.url()).await.expect("open the page");

    // Auth is on: the page asks for a token, and works once given one.
    let form = page.find(Locator::Id("token-form")).await.expect("token form");
    until(Duration::from_secs(5), "the token form", || async {
        form.is_displayed().await.ok().filter(|d| *d)
    })
    .await;
    page.find(Locator::Id("token")).await.expect("token field").send_keys(TOKEN).await.expect("type");
    page.find(Locator::Css("#token-form button"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit the token");
    until(Duration::from_secs(5), "a live connection", || async {
        text(&page, "#conn").await.filter(|t| t == "live")
    })
    .await;

    // A lock taken through the API appears within 1 s, with its holder and token.
    let locker = Locker::open(&url).await.expect("locker");
    let opts = AcquireOptions::new().ttl(Duration::from_secs(30));
    let lease = locker.acquire("deploy/web", &opts.clone().holder("ci-7")).await.expect("acquire");
    let (_, took) = until(Duration::from_secs(1), "the new lock", || async {
        text(&page, &row("deploy/web", "holder")).await.filter(|h| h == "ci-7")
    })
    .await;
    println!("lock visible {took:?} after the grant");
    assert_eq!(text(&page, &row("deploy/web", "token")).await.as_deref(), Some("1"));

    // A waiter: the waiters count changes within 1 s, and the detail lists it in queue order.
    let waiter = {
        let (locker, opts) = (locker.clone(), opts.clone());
        tokio::spawn(async move {
            locker.acquire("deploy/web", &opts.holder("ci-8").wait(Duration::from_secs(30))).await
        })
    };
    until(Duration::from_secs(1), "one waiter", || async {
        text(&page, &row("deploy/web", "waiters")).await.filter(|w| w == "1")
    })
    .await;
    page.find(Locator::Css("#locks tr[data-key=\"deploy/web\"]"))
        .await
        .expect("row")
        .click()
        .await
        .expect("click");
    until(Duration::from_secs(2), "the queue", || async {
        text(&page, "#queue li").await.filter(|q| q.starts_with("ci-8 — waiting"))
    })
    .await;

    // Release: the waiter holds it now (hand-off), then it goes away.
    lease.release().await.expect("release");
    let second = waiter.await.expect("task").expect("the waiter's grant");
    until(Duration::from_secs(1), "the hand-off", || async {
        text(&page, &row("deploy/web", "holder")).await.filter(|h| h == "ci-8")
    })
    .await;
    assert_eq!(text(&page, &row("deploy/web", "waiters")).await.as_deref(), Some("0"));
    second.release().await.expect("release");
    until(Duration::from_secs(1), "the lock gone", || async {
        page.find(Locator::Css("#locks tr[data-key=\"deploy/web\"]")).await.is_err().then_some(())
    })
    .await;

    // Force-release: refused without the admin token, done with it; the holder then loses.
    let held = locker.acquire("nightly-backup", &opts.clone().holder("cron@db-1")).await.expect("acquire");
    until(Duration::from_secs(1), "the backup lock", || async {
        text(&page, &row("nightly-backup", "holder")).await
    })
    .await;
    page.find(Locator::Css("#locks tr[data-key=\"nightly-backup\"]"))
        .await
        .expect("row")
        .click()
        .await
        .expect("click");
    page.find(Locator::Id("force")).await.expect("button").click().await.expect("click");
    page.find(Locator::Id("admin-token"))
        .await
        .expect("field")
        .send_keys("not-the-admin")
        .await
        .expect("type");
    page.find(Locator::Id("force-yes")).await.expect("confirm").click().await.expect("click");
    until(Duration::from_secs(2), "the refusal", || async {
        text(&page, "#force-msg").await.filter(|m| m.starts_with("Refused"))
    })
    .await;
    assert!(
        locker.status("nightly-backup").await.expect("status").held,
        "a refused force-release freed the lock"
    );
    page.find(Locator::Id("admin-token")).await.expect("field").clear().await.expect("clear");
    page.find(Locator::Id("admin-token")).await.expect("field").send_keys(ADMIN).await.expect("type");
    page.find(Locator::Id("force-yes")).await.expect("confirm").click().await.expect("click");
    until(Duration::from_secs(2), "the release", || async {
        text(&page, "#force-msg").await.filter(|m| m.starts_with("Released"))
    })
    .await;
    assert!(matches!(held.renew().await, Err(Error::LeaseLost { .. })), "the old holder must lose its lease");
    let next = locker.acquire("nightly-backup", &opts).await.expect("free again");
    assert!(next.fencing_token() > held.fencing_token(), "tokens still rise after a force-release");

    // Events arrived live (pushed in batches at most 100 ms apart).
    until(Duration::from_secs(1), "grant, wait, release and force-release events", || async {
        let events = text(&page, "#events").await.unwrap_or_default();
        ["grant", "release", "wait", "force release"].iter().all(|k| events.contains(k)).then_some(())
    })
    .await;

    // 1,000+ events a second: the page keeps drawing (no long stalls of its event loop).
    let load = {
        let locker = locker.clone();
        tokio::spawn(async move {
            let config = distlock_server::bench::BenchConfig {
                concurrency: 32,
                duration: Duration::from_secs(3),
                key_prefix: "load/".into(),
                ..Default::default()
            };
            distlock_server::bench::run(std::slice::from_ref(&locker), &config, Default::default()).await
        })
    };
    let stall = page
        .execute_async(
            "const done = arguments[arguments.length - 1]; let last = performance.now(), worst = 0; \
             const t = setInterval(() => { const now = performance.now(); worst = Math.max(worst, now - last); last = now; }, 20); \
             setTimeout(() => { clearInterval(t); done([worst, document.getElementById('event-rate').textContent]); }, 2500);",
            vec![],
        )
        .await
        .expect("measure the page's event loop");
    let (stall, shown) = (stall[0].as_f64().unwrap_or(f64::MAX), stall[1].as_str().unwrap_or("").to_owned());
    let report = load.await.expect("load");
    let rate = report.ops_per_s() * 2.0; // a grant and a release per cycle
    println!("load: {rate:.0} events/s (page shows {shown}); longest stall of the page's event loop: {stall:.0} ms");
    assert!(rate > 1000.0, "the load made only {rate:.0} events/s");
    assert!(stall < 500.0, "the page froze for {stall:.0} ms under {rate:.0} events/s");
    let listed = page.find_all(Locator::Css("#events li")).await.expect("events").len();
    assert!(listed <= 200, "the event list must stay bounded, has {listed}");

    let shot = page.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../web-page.png");
    std::fs::write(&path, shot).expect("write the screenshot");
    println!("screenshot: {}", path.display());
    page.close().await.expect("close the browser");
}

#[tokio::test]
async fn force_release_api_needs_the_admin_token() {
    let dir = tempfile::tempdir().expect("dir");
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("{ADMIN}\n")).expect("admins");
    let server = Server::start(&["--admin-token-file", admins.to_str().expect("path")]);
    let plain = Server::start(&[]);
    let http = reqwest::Client::new();
    let post = |base: String, key: &str, token: Option<&str>| {
        let mut req = http.post(format!("{base}/v1/admin/locks/{key}/release"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let code = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        (status, body["error"]["code"].as_str().unwrap_or("").to_owned())
    };
    let locker = Locker::open(&server.url()).await.expect("locker");
    let lease = locker.acquire("job", &AcquireOptions::new()).await.expect("acquire");

    assert_eq!(
        code(post(server.url(), "job", None).await.expect("send")).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        code(post(server.url(), "job", Some("wrong")).await.expect("send")).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        code(post(plain.url(), "job", Some(ADMIN)).await.expect("send")).await,
        (403, "admin_disabled".into())
    );
    assert!(lease.is_held() && locker.status("job").await.expect("status").held);
    let ok = post(server.url(), "job", Some(ADMIN)).await.expect("send");
    assert_eq!(ok.status().as_u16(), 200);
    assert!(!locker.status("job").await.expect("status").held);
    assert!(matches!(lease.renew().await, Err(Error::LeaseLost { .. })));
    assert_eq!(
        code(post(server.url(), "job", Some(ADMIN)).await.expect("send")).await,
        (404, "not_held".into())
    );
    assert_eq!(
        code(post(server.url(), "%00", Some(ADMIN)).await.expect("send")).await,
        (400, "invalid_request".into())
    );
}
