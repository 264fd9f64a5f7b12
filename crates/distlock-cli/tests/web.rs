//! The live web page in a real browser: headless Chromium driven through chromedriver (WebDriver).
//! Against a server with auth on and an admin token: holders, waiters, events and force-release
//! live, and the page under load. Then: the history a page gets on arrival (events before it
//! opened) and the timeline's lanes and bars for a scripted acquire, wait, hand-off, expiry and
//! force-release, before and while the page is open; sorting by held time with more than 1,000
//! locks, paging, renewal health, the detail panel refreshing; the auth empty states (no token, a
//! refused token, a token without read scope). Saves screenshots to `target/web-page.png`,
//! `target/web-timeline.png` and `target/web-timeline-full.png`. Needs Debian's `chromium` and
//! `chromium-driver` (`./scripts/test.sh` installs them).

mod common;

use std::os::unix::process::CommandExt;
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
        // Its own process group, which the browser it starts joins: dropping the driver ends
        // them all, even when a test fails before it closes the browser.
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
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
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
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

/// Text of the first element matching `css`, if any (read in one script: the page redraws parts
/// of itself several times a second, which would make a found element stale before it is read).
async fn text(page: &Client, css: &str) -> Option<String> {
    let script = "const e = document.querySelector(arguments[0]); \
                  return e ? (e.innerText === undefined ? e.textContent : e.innerText).trim() : null;";
    page.execute(script, vec![serde_json::json!(css)]).await.ok()?.as_str().map(str::to_owned)
}

/// Clicks `key`'s row of the locks table unless its detail is already open. A click found and
/// sent from here can land on a row the page has just redrawn (the old row, detached, takes the
/// click and nothing opens), so callers repeat this until the detail shows what they wait for.
async fn select_row(page: &Client, key: &str) {
    let script = "const d = document.getElementById('detail'); \
                  if (d.hidden || document.getElementById('detail-key').textContent !== arguments[0]) { \
                    const r = document.querySelector('#locks tr[data-key=\"' + arguments[0] + '\"]'); \
                    if (r) r.click(); \
                  }";
    let _ = page.execute(script, vec![serde_json::json!(key)]).await;
}

fn row(key: &str, cell: &str) -> String {
    format!("#locks tr[data-key=\"{key}\"] td.{cell}")
}

/// One browser at a time: the machine may have two cores, and each test starts a Chromium.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An attribute of the first element matching `css`, if any (in one script, as [`text`]).
async fn attr(page: &Client, css: &str, name: &str) -> Option<String> {
    let script =
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;";
    let value = page.execute(script, vec![serde_json::json!(css), serde_json::json!(name)]).await.ok()?;
    value.as_str().map(str::to_owned)
}

/// How many elements match `css`.
async fn count(page: &Client, css: &str) -> usize {
    page.find_all(Locator::Css(css)).await.map_or(0, |v| v.len())
}

/// The HTTP API without the library (whose leases renew themselves: these must expire).
struct Http {
    base: String,
    http: reqwest::Client,
}

impl Http {
    fn new(server: &Server) -> Http {
        Http { base: server.url(), http: reqwest::Client::new() }
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    async fn acquire(&self, key: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, lease) =
            self.post(&format!("/v1/locks/{}/acquire", key.replace('/', "%2F")), None, body).await;
        assert_eq!(status, 200, "acquire {key}: {lease}");
        lease
    }

    async fn release(&self, key: &str, lease: &serde_json::Value) {
        let body = serde_json::json!({"lease_id": lease["lease_id"]});
        let (status, answer) =
            self.post(&format!("/v1/locks/{}/release", key.replace('/', "%2F")), None, body).await;
        assert_eq!(status, 200, "release {key}: {answer}");
    }
}

/// Acquire (alice), a waiter (bob), the hand-off on release, bob's lease expiring, and carol's
/// lock force-released, on `P/deploy` and `P/batch`. Returns the three fencing tokens.
async fn scripted_sequence(api: &Http, prefix: &str) -> [u64; 3] {
    let (deploy, batch) = (format!("{prefix}/deploy"), format!("{prefix}/batch"));
    let alice = api.acquire(&deploy, serde_json::json!({"holder": "alice", "ttl_ms": 30_000})).await;
    let waiter = {
        let (api, deploy) = (Http { base: api.base.clone(), http: api.http.clone() }, deploy.clone());
        tokio::spawn(async move {
            api.acquire(&deploy, serde_json::json!({"holder": "bob", "ttl_ms": 1_200, "wait_ms": 10_000}))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    api.release(&deploy, &alice).await;
    let bob = waiter.await.expect("waiter");
    tokio::time::sleep(Duration::from_millis(1_700)).await; // bob does not renew: his lease expires
    let carol = api.acquire(&batch, serde_json::json!({"holder": "carol", "ttl_ms": 30_000})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = api
        .post(
            &format!("/v1/admin/locks/{}/release", batch.replace('/', "%2F")),
            Some(ADMIN),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "force-release: {body}");
    let token = |v: &serde_json::Value| v["fencing_token"].as_u64().expect("token");
    [token(&alice), token(&bob), token(&carol)]
}

/// Waits until the timeline shows the scripted sequence's lanes, bars and marks.
async fn timeline_shows(page: &Client, prefix: &str, [alice, bob, carol]: [u64; 3]) {
    let (deploy, batch) = (format!("{prefix}/deploy"), format!("{prefix}/batch"));
    let wanted = [
        format!("#timeline g.lane[data-key=\"{deploy}\"]"),
        format!("#timeline g.lane[data-key=\"{batch}\"]"),
        format!("rect.hold[data-key=\"{deploy}\"][data-holder=\"alice\"][data-token=\"{alice}\"][data-end=\"release\"]"),
        format!("rect.wait[data-key=\"{deploy}\"][data-holder=\"bob\"][data-end=\"granted\"]"),
        format!("rect.hold[data-key=\"{deploy}\"][data-holder=\"bob\"][data-token=\"{bob}\"][data-end=\"expiry\"]"),
        format!("path.mark.expiry[data-key=\"{deploy}\"]"),
        format!("rect.hold[data-key=\"{batch}\"][data-holder=\"carol\"][data-token=\"{carol}\"][data-end=\"force_release\"]"),
        format!("path.mark.force_release[data-key=\"{batch}\"]"),
    ];
    for css in &wanted {
        until(Duration::from_secs(3), css, || async { (count(page, css).await > 0).then_some(()) }).await;
    }
    // Exactly these bars on the two lanes: two holdings and a wait, one holding.
    let on = |key: &str, what: &str| format!("#timeline g.lane[data-key=\"{key}\"] rect.{what}");
    assert_eq!(count(page, &on(&deploy, "hold")).await, 2, "two holdings on {deploy}");
    assert_eq!(count(page, &on(&deploy, "wait")).await, 1, "one wait on {deploy}");
    assert_eq!(count(page, &on(&batch, "hold")).await, 1, "one holding on {batch}");
    // Alice's bar ends where bob's begins (the hand-off), and bob's wait spans alice's holding.
    // Bob asks once alice's grant is answered, so his wait may begin in the same millisecond.
    // One script, so that the three come from the same drawing (it redraws as time passes).
    let spans = page
        .execute(
            "return arguments[0].map((css) => { const r = document.querySelector(css); \
             return [Number(r.getAttribute('x')), Number(r.getAttribute('x')) + Number(r.getAttribute('width'))]; });",
            vec![serde_json::json!([
                format!("rect.hold[data-key=\"{deploy}\"][data-holder=\"alice\"]"),
                format!("rect.hold[data-key=\"{deploy}\"][data-holder=\"bob\"]"),
                format!("rect.wait[data-key=\"{deploy}\"][data-holder=\"bob\"]"),
            ])],
        )
        .await
        .expect("bar geometry");
    let at = |i: usize| -> (f64, f64) {
        let v = &spans[i];
        (v[0].as_f64().unwrap_or(f64::NAN), v[1].as_f64().unwrap_or(f64::NAN))
    };
    let (a, b, w) = (at(0), at(1), at(2));
    assert!((a.1 - b.0).abs() < 2.0, "the hand-off: alice ends at {}, bob begins at {}", a.1, b.0);
    assert!(
        (w.1 - b.0).abs() < 2.0 && w.0 >= a.0 && w.0 < a.1,
        "bob waited during alice's holding: {w:?} {a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_holders_waiters_and_events_live() {
    let _one = BROWSER.lock().await;
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
            let config = distlock_cli::bench::BenchConfig {
                concurrency: 32,
                duration: Duration::from_secs(3),
                key_prefix: "load/".into(),
                ..Default::default()
            };
            distlock_cli::bench::run(std::slice::from_ref(&locker), &config, Default::default()).await
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

/// Events from before the page opened are listed on arrival, with 24-hour times; the timeline
/// draws the scripted acquire, wait, hand-off, expiry and force-release with the right lanes and
/// bars, from the history and then live; hovering a bar tells holder, token, held and waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_arrival_and_the_timeline() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("{ADMIN}\n")).expect("admins");
    let server = Server::start(&["--admin-token-file", admins.to_str().expect("path")]);
    let api = Http::new(&server);

    // Before anyone watches.
    let before = scripted_sequence(&api, "tl").await;
    let driver = Driver::start();
    let page = driver.browser().await;
    page.goto(&server.url()).await.expect("open the page");

    // The events that happened before the page opened are there at once.
    let (_, took) = until(Duration::from_secs(3), "the events of before", || async {
        let events = text(&page, "#events").await.unwrap_or_default();
        ["grant", "wait", "release", "expiry", "force release"]
            .iter()
            .all(|k| events.contains(k))
            .then_some(())
    })
    .await;
    println!("history shown {took:?} after the page opened");
    let events = text(&page, "#events").await.unwrap_or_default();
    assert!(
        events.contains("tl/deploy · alice · fencing token 1 · held"),
        "a release names holder, token and time held:\n{events}"
    );
    assert!(
        events.contains("tl/deploy · bob · fencing token 2 · waited"),
        "the hand-off says how long bob waited:\n{events}"
    );
    let time = text(&page, "#events li span.muted").await.unwrap_or_default();
    let clock = time.trim();
    assert!(
        clock.len() == 8
            && clock.bytes().enumerate().all(|(i, b)| if i == 2 || i == 5 {
                b == b':'
            } else {
                b.is_ascii_digit()
            }),
        "24-hour time with seconds, got {clock:?}"
    );
    let title = attr(&page, "#events li span.muted", "title").await.unwrap_or_default();
    assert!(title.contains(" UTC") && title.contains('.'), "the absolute time in the tooltip: {title:?}");

    // The timeline at 1 minute: the lanes, bars and marks of the sequence.
    page.find(Locator::Css("#zoom button[data-zoom=\"60000\"]"))
        .await
        .expect("zoom")
        .click()
        .await
        .expect("click");
    timeline_shows(&page, "tl", before).await;

    // Hover: holder, fencing token, how long held, how long the next one waited.
    let tip = page
        .execute(
            "const r = document.querySelector('rect.hold[data-holder=\"bob\"]'); const b = r.getBoundingClientRect(); \
             r.dispatchEvent(new MouseEvent('mousemove', {bubbles: true, clientX: b.x + b.width / 2, clientY: b.y + 5})); \
             return document.getElementById('tip').textContent;",
            vec![],
        )
        .await
        .expect("hover");
    let tip = tip.as_str().unwrap_or_default().to_owned();
    assert!(tip.starts_with("bob · fencing token 2\nheld 1."), "{tip}");
    assert!(tip.contains("waited ") && tip.contains("expired"), "{tip}");

    // The same sequence while the page watches: drawn live.
    let live = scripted_sequence(&api, "live").await;
    timeline_shows(&page, "live", live).await;
    // A holding in progress is an open bar that grows with time (the timeline scrolls).
    let dave = api.acquire("live/deploy", serde_json::json!({"holder": "dave", "ttl_ms": 30_000})).await;
    let open = "rect.hold[data-key=\"live/deploy\"][data-holder=\"dave\"][data-end=\"open\"]";
    let width = |page: &Client| {
        let page = page.clone();
        async move {
            let script = format!("const r = document.querySelector('{open}'); return r ? Number(r.getAttribute('width')) : null;");
            page.execute(&script, vec![]).await.ok().and_then(|v| v.as_f64())
        }
    };
    let (first, _) = until(Duration::from_secs(2), "dave's open bar", || width(&page)).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = width(&page).await.expect("still open");
    assert!(later > first + 10.0, "the open bar grows as time passes: {first} then {later}");
    api.release("live/deploy", &dave).await;
    until(Duration::from_secs(2), "dave's released bar", || async {
        attr(&page, "rect.hold[data-holder=\"dave\"]", "data-end").await.filter(|e| e == "release")
    })
    .await;

    // The header charts: grants and hand-offs of the last minutes.
    until(Duration::from_secs(3), "the grants chart", || async {
        attr(&page, "#chart-grants", "data-total")
            .await
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t >= 7)
    })
    .await;
    let cap = text(&page, "#wait-cap").await.unwrap_or_default();
    assert!(cap.contains("p50") && cap.contains("p99"), "{cap}");

    // Screenshots: the timeline alone, and the whole page.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("..");
    let shot =
        page.find(Locator::Id("tl-section")).await.expect("timeline").screenshot().await.expect("screenshot");
    std::fs::write(target.join("web-timeline.png"), shot).expect("write");
    let shot = page.screenshot().await.expect("screenshot");
    std::fs::write(target.join("web-timeline-full.png"), shot).expect("write");
    println!("screenshots: {}", target.join("web-timeline.png").display());
    page.close().await.expect("close the browser");
}

/// More than 1,000 locks: the server sorts by held time before it pages, so the longest held are
/// on the first page even though they are last by key; paging; keys keep their case; the TTL
/// colour follows renewal; the detail panel refreshes; the fencing token is explained; the
/// server version is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_by_held_time_with_more_than_1000_locks() {
    let _one = BROWSER.lock().await;
    let server = Server::start(&[]);
    let api = Http::new(&server);
    for i in 0..5 {
        api.acquire(&format!("zz/old-{i}"), serde_json::json!({"ttl_ms": 600_000, "holder": "old"})).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for chunk in 0..3 {
        let ops: Vec<serde_json::Value> = (0..400)
            .map(|i| serde_json::json!({"op": "acquire", "key": format!("a/{:04}", chunk * 400 + i), "ttl_ms": 600_000}))
            .collect();
        let (status, _) = api.post("/v1/batch", None, serde_json::json!({ "ops": ops })).await;
        assert_eq!(status, 200);
    }
    // A renewing holder (the library renews at a third of the TTL) and one that does not renew.
    let locker = Locker::open(&server.url()).await.expect("locker");
    let renewing = locker
        .acquire("Deploy/Web", &AcquireOptions::new().ttl(Duration::from_millis(1_500)).holder("ci-7"))
        .await
        .expect("acquire");
    api.acquire("manual", serde_json::json!({"ttl_ms": 12_000, "holder": "someone"})).await;

    let driver = Driver::start();
    let page = driver.browser().await;
    page.goto(&server.url()).await.expect("open the page");
    let (_, took) = until(Duration::from_secs(5), "the first page of locks", || async {
        (count(&page, "#locks tbody tr").await == 1000).then_some(())
    })
    .await;
    println!("1,000 rows of 1,207 locks drawn {took:?} after the page opened");
    let first: Vec<String> = page
        .execute(
            "return [...document.querySelectorAll('#locks tbody tr')].slice(0, 5).map((tr) => tr.dataset.key);",
            vec![],
        )
        .await
        .expect("rows")
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    assert_eq!(first, ["zz/old-0", "zz/old-1", "zz/old-2", "zz/old-3", "zz/old-4"], "longest held first");
    let shown = text(&page, "#count").await.unwrap_or_default();
    assert!(shown.contains("1–1,000") && shown.contains("more"), "{shown}");
    page.find(Locator::Id("next-page")).await.expect("next").click().await.expect("click");
    until(Duration::from_secs(3), "the second page", || async {
        (count(&page, "#locks tbody tr").await == 207).then_some(())
    })
    .await;
    assert!(text(&page, "#count").await.unwrap_or_default().contains("1,001–1,207"));
    let last_key = page
        .execute(
            "const r = document.querySelectorAll('#locks tbody tr'); return r[r.length - 1].dataset.key;",
            vec![],
        )
        .await
        .expect("last row");
    assert_eq!(last_key.as_str(), Some("manual"), "the most recent grant is last");

    // Renewal health: a renewing 1.5 s lease is green ("renewing"), not red; an unrenewed one warns.
    until(Duration::from_secs(4), "the renewing lease in green", || async {
        let class = attr(&page, &row("Deploy/Web", "ttl"), "class").await?;
        let t = text(&page, &row("Deploy/Web", "ttl")).await?;
        (class.contains("ok") && t.contains("renewing")).then_some(())
    })
    .await;
    until(Duration::from_secs(10), "the unrenewed lease warned", || async {
        let class = attr(&page, &row("manual", "ttl"), "class").await?;
        let t = text(&page, &row("manual", "ttl")).await?;
        ((class.contains("warn") || class.contains("bad")) && t.contains("not renewed for")).then_some(())
    })
    .await;

    // The detail panel: the key as it is (no upper-casing), refreshed without a click.
    page.find(Locator::Css("#locks tr[data-key=\"Deploy/Web\"]"))
        .await
        .expect("row")
        .click()
        .await
        .expect("click");
    until(Duration::from_secs(2), "the detail", || async {
        text(&page, "#detail-facts .d-holder").await.filter(|h| h == "ci-7")
    })
    .await;
    assert_eq!(text(&page, "#detail-key").await.as_deref(), Some("Deploy/Web"), "the key keeps its case");
    let held = |page: &Client| {
        let page = page.clone();
        async move {
            page.execute("return document.querySelector('#detail-facts .d-held').textContent;", vec![])
                .await
                .ok()
        }
    };
    let h1 = held(&page).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_ne!(held(&page).await, h1, "the detail's held time moves");
    let token_before = text(&page, "#detail-facts .d-token").await.unwrap_or_default();
    renewing.release().await.expect("release");
    let _ci8 = locker.acquire("Deploy/Web", &AcquireOptions::new().holder("ci-8")).await.expect("reacquire");
    until(Duration::from_secs(3), "the detail refreshed with the new holder", || async {
        let holder = text(&page, "#detail-facts .d-holder").await?;
        let token = text(&page, "#detail-facts .d-token").await?;
        (holder == "ci-8" && token != token_before).then_some(())
    })
    .await;
    // The fencing token is named and explained apart from the API token; the server version shows.
    let help = attr(&page, "#fencing-help", "title").await.unwrap_or_default();
    assert!(help.starts_with("Fencing token:") && help.contains("Not the API token"), "{help}");
    assert_eq!(text(&page, "#locks thead th:nth-child(3)").await.as_deref(), Some("fencing token"));
    let version = text(&page, "#version").await.unwrap_or_default();
    assert_eq!(version, format!("v{}", env!("CARGO_PKG_VERSION")));
    page.close().await.expect("close the browser");
}

/// With auth on, the page says what it needs instead of "No locks held": a token at all, a token
/// the server accepts, a token that may read locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_empty_states() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "reader read:*\nops-only admin:*\n").expect("tokens");
    let server = Server::start(&["--auth-token-file", tokens.to_str().expect("path")]);
    let plain = Http::new(&server);
    let (status, _) = plain.post("/v1/locks/held/acquire", Some("reader"), serde_json::json!({})).await;
    assert_eq!(status, 403, "a read-only token may not lock");

    let driver = Driver::start();
    let page = driver.browser().await;
    page.goto(&server.url()).await.expect("open the page");
    let empty = |want: &'static str| {
        let page = page.clone();
        async move {
            until(Duration::from_secs(5), want, || async {
                text(&page, "#empty").await.filter(|t| t.contains(want))
            })
            .await
            .0
        }
    };
    let said = empty("needs an API token").await;
    assert!(!said.contains("No locks held"), "{said}");
    assert!(page.find(Locator::Id("token-form")).await.expect("form").is_displayed().await.expect("shown"));
    assert_eq!(text(&page, "#conn").await.as_deref(), Some("needs an API token"));
    let tl = text(&page, "#timeline").await.unwrap_or_default();
    assert!(tl.contains("needs an API token"), "the timeline says so too: {tl}");

    let submit = |token: &'static str| {
        let page = page.clone();
        async move {
            let field = page.find(Locator::Id("token")).await.expect("field");
            field.clear().await.expect("clear");
            field.send_keys(token).await.expect("type");
            page.find(Locator::Css("#token-form button"))
                .await
                .expect("button")
                .click()
                .await
                .expect("submit");
        }
    };
    submit("wrong").await;
    empty("refused (401 unauthorized)").await;
    submit("ops-only").await;
    let said = empty("may not list locks (403 forbidden").await;
    assert!(said.contains("read: or lock: scope"), "{said}");
    assert!(page.find(Locator::Id("token-form")).await.expect("form").is_displayed().await.expect("shown"));
    submit("reader").await;
    until(Duration::from_secs(5), "no locks, said plainly", || async {
        text(&page, "#empty").await.filter(|t| t == "No locks held.")
    })
    .await;
    until(Duration::from_secs(3), "a live connection", || async {
        text(&page, "#conn").await.filter(|t| t == "live")
    })
    .await;
    page.close().await.expect("close the browser");
}

/// Not a check: draws the picture in docs/SERVER.md. A 50-second scenario (a hand-off chain on
/// `deploy/web`, an expiry, a force-release, workers taking turns, a long holding), then the
/// header and the timeline at 1 minute. Run it with
/// `cargo test -p distlock-cli --test web -- --ignored docs_screenshot`; it writes
/// `target/docs-timeline.png` (copy it to `docs/web-timeline.png`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn docs_screenshot() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let admins = dir.path().join("admins");
    std::fs::write(&admins, format!("{ADMIN}\n")).expect("admins");
    let server = Server::start(&["--admin-token-file", admins.to_str().expect("path")]);
    let base = server.url();
    let at = |s: f64| tokio::time::sleep(Duration::from_secs_f64(s));
    let http = || Http { base: base.clone(), http: reqwest::Client::new() };
    let take = |key: &'static str, holder: &'static str, ttl_ms: u64, wait_ms: u64| {
        let api = http();
        async move {
            api.acquire(key, serde_json::json!({"holder": holder, "ttl_ms": ttl_ms, "wait_ms": wait_ms}))
                .await
        }
    };
    let mut tasks = Vec::new();
    // deploy/web: ci-7 holds, ci-8 and ci-9 queue; each hands off to the next.
    tasks.push(tokio::spawn({
        let api = http();
        let (t7, t8, t9) = (
            take("deploy/web", "ci-7", 60_000, 0),
            take("deploy/web", "ci-8", 60_000, 60_000),
            take("deploy/web", "ci-9", 60_000, 60_000),
        );
        async move {
            let l7 = t7.await;
            at(5.0).await;
            let w8 = tokio::spawn(t8);
            at(7.0).await;
            let w9 = tokio::spawn(t9);
            at(8.0).await;
            api.release("deploy/web", &l7).await;
            let l8 = w8.await.expect("ci-8");
            at(12.0).await;
            api.release("deploy/web", &l8).await;
            let _l9 = w9.await.expect("ci-9");
        }
    }));
    // nightly-backup: held, then force-released, then taken again.
    tasks.push(tokio::spawn({
        let api = http();
        let (a, b) = (
            take("nightly-backup", "cron@db-1", 120_000, 0),
            take("nightly-backup", "cron@db-2", 120_000, 0),
        );
        async move {
            at(2.0).await;
            a.await;
            at(28.0).await;
            let (s, _) =
                api.post("/v1/admin/locks/nightly-backup/release", Some(ADMIN), serde_json::json!({})).await;
            assert_eq!(s, 200);
            at(3.0).await;
            b.await;
        }
    }));
    // db/migrate: a migrator that stops renewing (expiry), then another that finishes.
    tasks.push(tokio::spawn({
        let api = http();
        let (a, b) =
            (take("db/migrate", "migrator-1", 8_000, 0), take("db/migrate", "migrator-2", 30_000, 0));
        async move {
            at(4.0).await;
            a.await;
            at(11.0).await;
            let l = b.await;
            at(10.0).await;
            api.release("db/migrate", &l).await;
        }
    }));
    // payments/batch: three workers taking turns.
    for (i, worker) in ["worker-1", "worker-2", "worker-3"].into_iter().enumerate() {
        tasks.push(tokio::spawn({
            let api = http();
            async move {
                at(i as f64 * 0.7).await;
                for round in 0..4u64 {
                    let lease = api
                        .acquire(
                            "payments/batch",
                            serde_json::json!({"holder": worker, "ttl_ms": 30_000, "wait_ms": 60_000}),
                        )
                        .await;
                    at(1.5 + ((round + i as u64) % 3) as f64).await;
                    api.release("payments/batch", &lease).await;
                    at(0.5).await;
                }
            }
        }));
    }
    tasks.push(tokio::spawn({
        let t = take("reports/daily", "report-gen", 120_000, 0);
        async move {
            at(9.0).await;
            t.await;
        }
    }));
    let driver = Driver::start();
    let page = driver.browser().await;
    page.set_window_size(1200, 900).await.expect("window");
    page.goto(&server.url()).await.expect("open the page");
    for t in tasks {
        t.await.expect("scenario");
    }
    at(4.0).await;
    page.find(Locator::Css("#zoom button[data-zoom=\"60000\"]"))
        .await
        .expect("zoom")
        .click()
        .await
        .expect("click");
    // The workers' lock is no longer held: select it from its lane for the hold-time chart.
    page.execute(
        "document.querySelector('#timeline text.lane-label[data-key=\"payments/batch\"]').dispatchEvent(new MouseEvent('click', {bubbles: true}));",
        vec![],
    )
    .await
    .expect("select");
    at(1.5).await;
    page.execute("document.querySelector('main').style.display = 'none'; window.scrollTo(0, 0);", vec![])
        .await
        .expect("hide");
    let height = page
        .execute(
            "return Math.ceil(document.getElementById('tl-section').getBoundingClientRect().bottom) + 8;",
            vec![],
        )
        .await
        .expect("height")
        .as_u64()
        .unwrap_or(400);
    page.set_window_size(1200, height as u32 + 140).await.expect("window");
    at(0.5).await;
    let shot = page.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../docs-timeline.png");
    std::fs::write(&path, shot).expect("write");
    println!("{}", path.display());
    page.close().await.expect("close the browser");
}

/// A semaphore's row reads "3 / 5 held", a shared lock's "shared by 2", and a leader's detail
/// shows the value it published (and the new one after a proclamation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphores_shared_locks_and_leaders_on_the_page() {
    let _one = BROWSER.lock().await;
    let server = Server::start(&[]);
    let locker = Locker::open(&server.url()).await.expect("locker");
    let pool = AcquireOptions::new().limit(5).ttl(Duration::from_secs(60));
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(locker.acquire("pool", &pool.clone().holder(format!("enc-{i}"))).await.expect("a permit"));
    }
    for r in ["r1", "r2"] {
        held.push(
            locker.acquire("catalog", &AcquireOptions::new().shared().holder(r)).await.expect("shared"),
        );
    }
    let mut term =
        locker.campaign("scheduler", "10.0.0.7:8080", &AcquireOptions::new()).await.expect("leads");
    let driver = Driver::start();
    let page = driver.browser().await;
    page.goto(&server.url()).await.expect("open the page");
    until(Duration::from_secs(5), "3 / 5 held", || async {
        text(&page, &row("pool", "holder")).await.filter(|h| h == "3 / 5 held")
    })
    .await;
    assert_eq!(text(&page, &row("catalog", "holder")).await.as_deref(), Some("shared by 2"));
    until(Duration::from_secs(5), "the leader's value", || async {
        select_row(&page, "scheduler").await;
        text(&page, "#detail-facts .d-value").await.filter(|v| v == "10.0.0.7:8080")
    })
    .await;
    term.proclaim("10.0.0.7:9090").await.expect("proclaim");
    until(Duration::from_secs(5), "the proclaimed value", || async {
        text(&page, "#detail-facts .d-value").await.filter(|v| v == "10.0.0.7:9090")
    })
    .await;
    until(Duration::from_secs(5), "every permit holder", || async {
        select_row(&page, "pool").await;
        text(&page, "#detail-facts .d-holder").await.filter(|h| h.starts_with("3 / 5 held: enc-0 #"))
    })
    .await;
    let _ = page.close().await;
}
