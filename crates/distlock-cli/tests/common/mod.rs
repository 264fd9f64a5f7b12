//! Shared test harness: the `distlock serve` binary as a process on a free loopback port, for
//! tests that kill it, signal it, or count its metrics. (Tests that need no process start the
//! server inside themselves: `distlock-server`'s tests/common/in_process.rs.)

#![allow(dead_code)]

#[path = "../../../distlock/tests/support/mod.rs"]
pub mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distlock::Locker;

pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
    /// Environment added to its process, kept for restarts (the clock nemesis's libfaketime).
    env: Vec<(String, String)>,
    /// Ready means serving (`/livez`), not store answering (`/healthz`).
    live_only: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, Vec::new())
    }

    /// Starts it (and every restart) with `env` added to its environment.
    pub fn start_with_env(extra: &[&str], env: Vec<(String, String)>) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
            live_only: false,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        for _ in 0..5 {
            if self.spawn_on(support::free_port()) {
                return;
            }
        }
        panic!("distlock serve did not start");
    }

    /// Starts the server on `port`; `false` if it did not come up (e.g. the port was taken).
    fn spawn_on(&mut self, port: u16) -> bool {
        self.port = port;
        let child = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DISTLOCK_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn distlock serve");
        self.child = Some(child);
        if self.wait_ready() {
            return true;
        }
        self.kill9();
        false
    }

    /// `kill -9`, then start again on the same port and data directory.
    pub fn restart_in_place(&mut self) {
        self.kill9();
        let port = self.port;
        let start = Instant::now();
        while !self.spawn_on(port) {
            assert!(start.elapsed() < Duration::from_secs(20), "distlock serve did not restart on {port}");
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server and waits only until it serves (`/livez`), not until its store answers.
    pub fn start_live(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            live_only: true,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    pub fn wait_ready(&mut self) -> bool {
        let path = if self.live_only { "/livez" } else { "/healthz" };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            // A TLS server cannot be asked in plain HTTP: it is ready once it accepts (the
            // server binds only after reading its certificate; the store opens just after).
            let tls = self.extra.iter().any(|a| a == "--tls-cert");
            if tls && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub async fn locker(&self) -> Locker {
        Locker::open(&self.url()).await.expect("open http backend")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}
