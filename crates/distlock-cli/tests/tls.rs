//! TLS end to end: `distlock serve --tls-cert/--tls-key[/--tls-client-ca]` as a process, and the
//! library's `https://` client (and the CLI) against it. Certificates are made by `openssl` at
//! test time (`support::make_certs`: a CA, a server certificate for 127.0.0.1 and a client
//! certificate, all signed by that CA).

mod common;

use common::{support, Server};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{AcquireOptions, Error, Locker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// A directory of certificates from one CA.
fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    support::make_certs(dir.path());
    dir
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).to_str().expect("utf-8 temp path").to_owned()
}

/// `distlock serve` with the server certificate of `dir` (and `extra` flags).
fn tls_server(dir: &Path, extra: &[&str]) -> Server {
    let (cert, key) = (path(dir, "server.pem"), path(dir, "server.key"));
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The server's `https://` URL trusting the CA of `ca_dir`, plus `more` parameters.
fn url(server: &Server, ca_dir: &Path, more: &str) -> String {
    format!("https://127.0.0.1:{}?ca={}{more}", server.port, path(ca_dir, "ca.pem"))
}

async fn open(url: &str) -> Locker {
    Locker::open(url).await.expect("open https backend")
}

/// The `Unavailable` message of a call that must fail with it.
fn unavailable<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::Unavailable(message)) => message,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// `GET path` over TLS trusting `ca`, the raw answer (HTTP/1.0: the server closes after it).
async fn https_get(port: u16, ca: &Path, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca pem")).expect("ca cert");
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake");
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn plain_http_to_a_tls_port_fails() {
    let dir = certs();
    let server = tls_server(dir.path(), &[]);
    // Over TLS it answers...
    open(&url(&server, dir.path(), "")).await.status("k").await.expect("status over https");
    // ...but a plain HTTP request gets no HTTP answer: the bytes are not a TLS handshake.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered: {:?}", String::from_utf8_lossy(&answer));
    // The library's http:// client says what is wrong.
    let plain = open(&format!("http://127.0.0.1:{}", server.port)).await;
    let message = unavailable(plain.status("k").await);
    assert!(message.contains("https://"), "{message}");
}

#[tokio::test]
async fn a_client_with_the_wrong_ca_is_unavailable_and_told_why() {
    let (dir, other) = (certs(), certs());
    let server = tls_server(dir.path(), &[]);
    let wrong = open(&url(&server, other.path(), "")).await;
    let message = unavailable(wrong.acquire("k", &AcquireOptions::new()).await);
    assert!(message.contains(&format!("https://127.0.0.1:{}", server.port)), "names the server: {message}");
    assert!(message.contains("not trusted"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    // Without ca= the system's roots are used, and they do not know the test CA either.
    let system = open(&format!("https://127.0.0.1:{}", server.port)).await;
    assert!(unavailable(system.status("k").await).contains("not trusted"));
    // The right CA works.
    let right = open(&url(&server, dir.path(), "")).await;
    right
        .acquire("k", &AcquireOptions::new())
        .await
        .expect("acquire with the right CA")
        .release()
        .await
        .expect("release");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let (dir, other) = (certs(), certs());
    let ca = path(dir.path(), "ca.pem");
    let server = tls_server(dir.path(), &["--tls-client-ca", &ca]);

    let anonymous = open(&url(&server, dir.path(), "")).await;
    let message = unavailable(anonymous.status("k").await);
    assert!(message.contains("client certificate"), "{message}");

    let stranger_cert =
        format!("&cert={}&key={}", path(other.path(), "client.pem"), path(other.path(), "client.key"));
    let stranger = open(&url(&server, dir.path(), &stranger_cert)).await;
    let message = unavailable(stranger.acquire("k", &AcquireOptions::new()).await);
    assert!(message.contains("refused") && message.contains("certificate"), "{message}");

    let member_cert =
        format!("&cert={}&key={}", path(dir.path(), "client.pem"), path(dir.path(), "client.key"));
    let member = open(&url(&server, dir.path(), &member_cert)).await;
    let lease = member.acquire("k", &AcquireOptions::new()).await.expect("acquire with a client certificate");
    assert!(member.status("k").await.expect("status").held);
    lease.release().await.expect("release");
}

#[tokio::test]
async fn sighup_loads_a_new_certificate_and_keeps_open_connections() {
    let (old, new) = (certs(), certs());
    // The server reads its certificate from files the test replaces.
    let live = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (live.path().join("server.pem"), live.path().join("server.key"));
    std::fs::copy(old.path().join("server.pem"), &cert).expect("copy cert");
    std::fs::copy(old.path().join("server.key"), &key).expect("copy key");
    let (cert_s, key_s) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let server = Server::start(&["--tls-cert", cert_s, "--tls-key", key_s]);

    // A client that trusts only the old CA: a waiting acquire (a long poll on one connection)
    // and a second connection kept open in its pool.
    let before = open(&url(&server, old.path(), "")).await;
    let ttl = AcquireOptions::new().ttl(Duration::from_secs(60));
    let holder = before.acquire("wait", &ttl).await.expect("holder");
    let waiting = {
        let before = before.clone();
        tokio::spawn(async move {
            before.acquire("wait", &AcquireOptions::new().wait(Duration::from_secs(20))).await
        })
    };
    let start = Instant::now();
    while before.status("wait").await.expect("status").waiters == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    std::fs::copy(new.path().join("server.pem"), &cert).expect("replace cert");
    std::fs::copy(new.path().join("server.key"), &key).expect("replace key");
    let pid = nix::unistd::Pid::from_raw(server.pid().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");

    // New connections get the new certificate: a client trusting only the new CA works...
    let after = open(&url(&server, new.path(), "")).await;
    let start = Instant::now();
    while after.status("wait").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "the new certificate was not loaded after SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and one trusting only the old CA cannot connect any more...
    let fresh_old = open(&url(&server, old.path(), "")).await;
    assert!(unavailable(fresh_old.status("wait").await).contains("not trusted"));
    // ...while the old client's open connections still work: its pooled connection answers (a
    // new one would be refused), and the long poll started before the reload gets its grant.
    assert!(before.status("wait").await.expect("status on a connection opened before SIGHUP").held);
    holder.release().await.expect("release on a connection opened before SIGHUP");
    let granted = waiting.await.expect("task").expect("long poll across the reload");
    granted.release().await.expect("release");
    assert!(server.pid().is_some(), "the server is still running");
}

#[tokio::test]
async fn acquire_release_batch_and_long_poll_over_https() {
    let dir = certs();
    let server = tls_server(dir.path(), &[]);
    let locker = open(&url(&server, dir.path(), "")).await;

    let lease = locker.acquire("a", &AcquireOptions::new().holder("tls")).await.expect("acquire");
    assert_eq!(locker.status("a").await.expect("status").holder.as_deref(), Some("tls"));
    lease.renew().await.expect("renew");

    // A long poll: the waiter is granted when the holder releases.
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move {
            locker.acquire("a", &AcquireOptions::new().wait(Duration::from_secs(10))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    lease.release().await.expect("release");
    let second = waiter.await.expect("task").expect("waiter granted");
    assert!(second.fencing_token() > 1);
    second.release().await.expect("release");

    // Many tasks at once: their acquires and releases are coalesced into batches.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let locker = locker.clone();
            tokio::spawn(async move {
                let lease = locker.acquire(&format!("batch/{i}"), &AcquireOptions::new()).await?;
                lease.release().await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("acquire and release");
    }
    let metrics = https_get(server.port, &dir.path().join("ca.pem"), "/metrics").await;
    let batched: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("distlock_batch_ops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(batched > 0.0, "no batch went over https:\n{metrics}");

    // The CLI takes the same URL.
    let status = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", &url(&server, dir.path(), ""), "status", "a"])
        .output()
        .expect("run distlock status");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let bench = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["--backend", &url(&server, dir.path(), ""), "bench", "--concurrency", "4", "--duration", "1s"])
        .output()
        .expect("run distlock bench");
    assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
}

/// Bad TLS files stop the server at start with a message naming the file, before it binds.
#[test]
fn bad_tls_files_stop_the_server_at_start() {
    let dir = certs();
    let data = tempfile::tempdir().expect("temp dir");
    let missing: PathBuf = dir.path().join("no-such.pem");
    let cases = [
        (missing.to_str().expect("utf-8").to_owned(), path(dir.path(), "server.key"), "no-such.pem"),
        // A key that is not the certificate's.
        (path(dir.path(), "server.pem"), path(dir.path(), "client.key"), "do not go together"),
    ];
    for (cert, key, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key, "--data-dir"])
            .arg(data.path().join("d"))
            .output()
            .expect("run distlock serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!data.path().join("d").exists(), "the data directory was created: {stderr}");
    }
}
