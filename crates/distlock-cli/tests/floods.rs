//! Floods and slow clients against `distlock serve` as a process: half-open connections
//! (slowloris) closed by the header timeout while a flood of acquires runs, `/healthz` latency and
//! a holder's renewals meanwhile; the idle timeout and long polls; the connection cap; the rate
//! limit. The figures of the flood test are printed (run with `--nocapture`) and reported in
//! docs/RELIABILITY.md.

mod common;

use common::Server;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, Locker};

/// Half-open connections of the flood test.
const HALF_OPEN: usize = 2_000;
/// How long the flood test measures.
const MEASURE: Duration = Duration::from_secs(3);
/// The TTL of the flood test's holder: a renewal must land within it of the previous one.
const HOLDER_TTL: Duration = Duration::from_secs(2);

/// Lifts the test process's soft limit on open files to the hard limit (thousands of sockets).
/// The tests of this file run one at a time: the flood measures latency, and the others' servers
/// on the same two cores would be part of what it measures.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Sends `request` on a fresh connection and reads the whole answer (the request asks the server
/// to close); `None` when no answer came within 5 s.
fn exchange(port: u16, request: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

fn get(port: u16, path: &str) -> String {
    exchange(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        .unwrap_or_else(|| panic!("no answer to GET {path}"))
}

/// The value of a metric line (exact series name) in `/metrics`.
fn metric(port: u16, series: &str) -> f64 {
    let text = get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// Blocks until the peer closes `s` (or resets it); `false` if it is still open after `within`.
fn wait_closed(s: &mut TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(within));
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_and_an_acquire_flood_starve_neither_health_nor_renewals() {
    let _serial = ONE_AT_A_TIME.lock().await;
    raise_open_file_limit();
    let server = Server::start(&["--header-timeout", "1s"]);
    let port = server.port;

    // A holder with a short lease, on a client of its own (as another process would be): the
    // library renews it every TTL/3; the test also renews it by hand and times each renewal.
    let holder_locker = server.locker().await;
    let lease =
        holder_locker.acquire("holder", &AcquireOptions::new().ttl(HOLDER_TTL)).await.expect("holder");

    // A flood of acquires (and releases) from 32 tasks, one request each at a time (batch=off).
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for t in 0..32 {
        let locker = Locker::open(&format!("{}?batch=off", server.url())).await.expect("open");
        let (stop, cycles) = (stop.clone(), cycles.clone());
        flood.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(lease) =
                    locker.acquire(&format!("flood/{t}/{}", n % 8), &AcquireOptions::new()).await
                {
                    let _ = lease.release().await;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }

    // Meanwhile: /healthz on a fresh connection every 5 ms, for 3 s.
    let probe = std::thread::spawn(move || {
        let mut samples = Vec::new();
        let until = Instant::now() + MEASURE;
        while Instant::now() < until {
            let start = Instant::now();
            let answer = exchange(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            samples.push((start.elapsed(), answer.is_some_and(|a| a.starts_with("HTTP/1.1 200"))));
            std::thread::sleep(Duration::from_millis(5));
        }
        samples
    });

    // Half a second in, 2,000 connections that send half a request line and stop. A thread
    // watches them close, in the order they were opened, and notes how long after its own
    // opening each was seen closed.
    let slowloris = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let (opened_tx, opened_rx) = std::sync::mpsc::channel::<(TcpStream, Instant)>();
        let watcher = std::thread::spawn(move || {
            opened_rx
                .into_iter()
                .map(|(mut s, at)| {
                    let closed = wait_closed(&mut s, Duration::from_secs(10));
                    (closed, at.elapsed())
                })
                .collect::<Vec<_>>()
        });
        let opened = Instant::now();
        for _ in 0..HALF_OPEN {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect a half-open socket");
            s.write_all(b"GET /v1/lo").expect("half a request line");
            opened_tx.send((s, Instant::now())).expect("watcher");
        }
        drop(opened_tx);
        let open_time = opened.elapsed();
        (open_time, watcher.join().expect("watcher thread"))
    });

    // Meanwhile: the holder renews by hand every 250 ms; every renewal must land before the
    // lease would have expired (its TTL after the previous one).
    let mut renewals = Vec::new();
    let mut last_ok = Instant::now();
    let until = Instant::now() + MEASURE;
    while Instant::now() < until {
        let start = Instant::now();
        lease.renew().await.expect("a renewal failed during the flood");
        renewals.push(start.elapsed());
        assert!(
            last_ok.elapsed() < HOLDER_TTL,
            "a renewal missed the lease's deadline: {:?}",
            last_ok.elapsed()
        );
        last_ok = Instant::now();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let health = probe.join().expect("probe thread");
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.await.expect("flood task");
    }
    assert!(lease.is_held(), "the holder's lease was lost: {:?}", lease.state());
    lease.release().await.expect("the holder still held its lease at the end");

    let (open_time, closed) = slowloris.join().expect("slowloris thread");
    let still_open = closed.iter().filter(|(c, _)| !c).count();
    assert_eq!(still_open, 0, "{still_open} half-open connections were never closed");
    let mut after: Vec<Duration> = closed.iter().map(|(_, d)| *d).collect();
    after.sort();
    let counted = metric(port, "distlock_connections_closed_total{reason=\"header_timeout\"}");

    let failed = health.iter().filter(|(_, ok)| !ok).count();
    let mut health: Vec<Duration> = health.into_iter().map(|(d, _)| d).collect();
    health.sort();
    renewals.sort();
    let (p50, p99, max) = (percentile(&health, 0.5), percentile(&health, 0.99), percentile(&health, 1.0));
    println!(
        "flood: {HALF_OPEN} half-open sockets opened in {open_time:?}; {} acquire+release cycles by 32 tasks in {MEASURE:?}",
        cycles.load(Ordering::Relaxed)
    );
    println!("/healthz on fresh connections: {} probes, p50 {p50:?}, p99 {p99:?}, max {max:?}", health.len());
    println!(
        "holder (TTL {HOLDER_TTL:?}): {} renewals by hand, p50 {:?}, max {:?}; lease held throughout",
        renewals.len(),
        percentile(&renewals, 0.5),
        percentile(&renewals, 1.0)
    );
    println!(
        "half-open sockets: all {HALF_OPEN} closed, {:?} to {:?} after each was opened (median {:?}); \
         the server counted {counted} header timeouts",
        after[0],
        after[after.len() - 1],
        percentile(&after, 0.5)
    );
    assert_eq!(failed, 0, "{failed} /healthz probes got no 200");
    // p99 15-20 ms on a quiet machine (docs/RELIABILITY.md). On this 2-core VM a build running
    // beside the test pushed single probes to 600 ms (with ~30 probes p99 is the maximum), so the
    // test bounds the median tightly and the tail loosely: a starved listener (no header timer)
    // fails both at once, as every probe then waits for a socket.
    assert!(p50 < Duration::from_millis(100), "/healthz p50 {p50:?} under the flood");
    assert!(p99 < Duration::from_secs(2), "/healthz p99 {p99:?} under the flood");
    assert!(cycles.load(Ordering::Relaxed) > 0, "the flood did nothing");
    assert!(after[0] >= Duration::from_millis(900), "a half-open socket closed before the header timeout");
    assert!(
        after[after.len() - 1] < Duration::from_secs(3),
        "a half-open socket outlived the header timeout"
    );
    assert!(counted >= HALF_OPEN as f64, "only {counted} header timeouts counted");
}

#[tokio::test]
async fn idle_and_stalled_connections_close_long_polls_do_not() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = Server::start(&["--header-timeout", "1s", "--idle-timeout", "2s"]);
    let port = server.port;
    let request = |path: &str, body: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    let read_answer = |s: &mut TcpStream| {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    // A kept-alive connection with nothing more to say is closed after the idle timeout, not
    // the (shorter) header timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    idle.write_all(request("/v1/locks/a/acquire", "{}").as_bytes()).expect("write");
    assert!(read_answer(&mut idle).starts_with("HTTP/1.1 200"));
    let quiet = Instant::now();
    assert!(wait_closed(&mut idle, Duration::from_secs(6)), "an idle connection was never closed");
    let idle_for = quiet.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1800) && idle_for < Duration::from_secs(4),
        "closed after {idle_for:?}"
    );

    // Half a request after a response: the header timer runs from its first byte.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    slow.write_all(request("/v1/locks/b/acquire", "{}").as_bytes()).expect("write");
    assert!(read_answer(&mut slow).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(500));
    slow.write_all(b"POST /v1/lo").expect("half a request line");
    let started = Instant::now();
    assert!(wait_closed(&mut slow, Duration::from_secs(6)), "a stalled request was never closed");
    let stalled_for = started.elapsed();
    assert!(
        stalled_for >= Duration::from_millis(800) && stalled_for < Duration::from_millis(1900),
        "closed {stalled_for:?} after the request began (header timeout 1 s, idle 2 s)"
    );

    // A body that trickles: the request fails when the header timeout has passed since its
    // headers, and the connection closes.
    let mut trickle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    trickle.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    trickle
        .write_all(b"POST /v1/locks/c/acquire HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ttl")
        .expect("write");
    let started = Instant::now();
    let answer = read_answer(&mut trickle);
    let failed_after = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 400"), "a trickled body was not refused: {answer:?}");
    assert!(
        failed_after >= Duration::from_millis(800) && failed_after < Duration::from_millis(1900),
        "refused {failed_after:?} after the headers"
    );
    assert!(wait_closed(&mut trickle, Duration::from_secs(3)), "the connection stayed open");

    // A long poll of 3 s outlasts both timers: waiting is not idle.
    let mut poll = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    poll.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let start = Instant::now();
    poll.write_all(request("/v1/locks/a/acquire", r#"{"wait_ms":3000}"#).as_bytes()).expect("write");
    let answer = read_answer(&mut poll);
    assert!(answer.starts_with("HTTP/1.1 409"), "the long poll was not answered: {answer:?}");
    assert!(start.elapsed() >= Duration::from_millis(2900), "answered after {:?}", start.elapsed());
    assert!(metric(port, "distlock_connections_closed_total{reason=\"idle_timeout\"}") >= 1.0);
}

/// Reads one answer with a `Content-Length` from a kept-alive connection.
fn read_one_answer(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no content-length in {:?}", &text[..end]));
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = s.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed before the whole answer: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let server = Server::start(&["--max-connections", "20", "--header-timeout", "30s"]);
    let port = server.port;
    // First a kept-alive connection asks until it is the only one open: the readiness checks'
    // connections give their places back when their tasks end, which a loaded machine can put
    // off past any fixed sleep (CI: one of them still held a place, so the 20th below was the
    // one refused and the 21st was served).
    let mut probe = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    probe.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        probe.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        if read_one_answer(&mut probe).lines().any(|l| l == "distlock_connections_open 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the readiness checks' connections stayed open");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut held = vec![probe];
    held.extend((1..20).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")));
    // The 21st is accepted after them (in order) and closed without an answer, where a served
    // one would wait 30 s for its headers.
    let mut over = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    assert!(wait_closed(&mut over, Duration::from_secs(5)), "the connection over the cap was served");
    // The ones held are still open.
    held[0].set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1];
    assert!(
        matches!(held[0].read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a connection under the cap was closed"
    );
    // Room again once some close (once the server has seen them close).
    held.truncate(10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exchange(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    {
        assert!(Instant::now() < deadline, "no room after 10 connections closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(port, "distlock_connections_refused_total") >= 1.0);
    let open = metric(port, "distlock_connections_open");
    assert!((11.0..=20.0).contains(&open), "distlock_connections_open {open} (10 held, and this one)");
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let tokens = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(tokens.path(), "token-a\ntoken-b\n").expect("write tokens");
    let tokens_path = tokens.path().to_str().expect("utf-8").to_owned();
    let server = Server::start(&["--rate-limit", "5/s", "--auth-token-file", &tokens_path]);
    let port = server.port;
    let status = |token: &str| {
        let answer = exchange(
            port,
            &format!(
                "GET /v1/locks/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            ),
        )
        .expect("an answer");
        answer
    };
    // A burst of twice the rate, then 429 with Retry-After.
    let start = Instant::now();
    let answers: Vec<String> = (0..20).map(|_| status("token-a")).collect();
    let elapsed = start.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|a| a.starts_with("HTTP/1.1 200")).count();
    assert!(ok >= 10 && ok as f64 <= 10.0 + elapsed * 5.0 + 1.0, "{ok} of 20 allowed in {elapsed} s");
    let limited = answers.iter().find(|a| a.starts_with("HTTP/1.1 429")).expect("no 429 after the burst");
    assert!(limited.contains("limit_exceeded"), "{limited}");
    assert!(limited.to_ascii_lowercase().contains("retry-after: 1"), "{limited}");
    // Per token: another token has its own bucket; /healthz is not limited.
    assert!(status("token-b").starts_with("HTTP/1.1 200"));
    assert!(get(port, "/healthz").starts_with("HTTP/1.1 200"));
    // The library reports LimitExceeded.
    let locker = Locker::open(&format!("{}?token=token-a", server.url())).await.expect("open");
    assert!(matches!(locker.status("k").await, Err(Error::LimitExceeded(_))));
    // After a second, the rate is back.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(status("token-a").starts_with("HTTP/1.1 200"));
}
