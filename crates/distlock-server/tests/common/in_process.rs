//! The server inside the test process: `serve` on a listener the test bound itself on
//! `127.0.0.1:0`, so no free port is raced for. Each server runs on a runtime of its own (a thread),
//! as a process would, so a test's blocking calls cannot stall it. Metrics are process-wide: a
//! test that counts them needs the server as a process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distlock::Locker;
use distlock_server::serve::{serve, ServerConfig};
use tokio::sync::oneshot;

/// A server running in this process; stopped (gracefully) when dropped.
pub struct InProcess {
    /// The port it listens on.
    pub port: u16,
    /// Its data directory.
    pub dir: PathBuf,
    config: ServerConfig,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    _tmp: tempfile::TempDir,
}

impl InProcess {
    /// A server with the defaults of `distlock serve` and a fresh data directory, ready
    /// (`/healthz` answers 200).
    pub fn start() -> InProcess {
        InProcess::with(|_| {})
    }

    /// As [`InProcess::start`], with the settings `configure` changes.
    pub fn with(configure: impl FnOnce(&mut ServerConfig)) -> InProcess {
        InProcess::try_with(configure, "/healthz").unwrap_or_else(|e| panic!("the server did not start: {e}"))
    }

    /// As [`InProcess::with`], ready once it serves (`/livez`), whether its store answers or not.
    pub fn with_live(configure: impl FnOnce(&mut ServerConfig)) -> InProcess {
        InProcess::try_with(configure, "/livez").unwrap_or_else(|e| panic!("the server did not start: {e}"))
    }

    /// Starts a server; its start-up error (`{:#}`) if it stops before `ready` answers 200.
    pub fn try_with(configure: impl FnOnce(&mut ServerConfig), ready: &str) -> Result<InProcess, String> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut config = ServerConfig::new(&dir);
        configure(&mut config);
        let mut server = InProcess { port: 0, dir, config, stop: None, thread: None, _tmp: tmp };
        server.spawn(ready)?;
        Ok(server)
    }

    fn spawn(&mut self, ready: &str) -> Result<(), String> {
        self.spawn_on(0, ready)
    }

    /// Starts the server on `port` (0: any free one).
    fn spawn_on(&mut self, port: u16, ready: &str) -> Result<(), String> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("non-blocking listener");
        self.port = listener.local_addr().expect("local address").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                let shutdown = async move {
                    let _ = stopped.await;
                };
                serve(listener, config, shutdown).await.map_err(|e| format!("{e:#}"))
            })
        });
        self.stop = Some(stop);
        self.thread = Some(thread);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                return Err(self.stop_now().err().unwrap_or_else(|| "stopped at once".into()));
            }
            if answers_200(self.port, ready) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{ready} did not answer 200 within 10 s"))
    }

    /// Shuts the server down (as SIGTERM would) and waits for it; its error, if it had one.
    pub fn stop_now(&mut self) -> Result<(), String> {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the server thread panicked".into()),
        }
    }

    /// Shuts the server down and starts it again on the same data directory (a new port).
    pub fn restart(&mut self) {
        self.stop_now().expect("the server stopped cleanly");
        self.spawn("/healthz").expect("the server restarted");
    }

    /// As [`InProcess::restart`], on the same port (for clients that reconnect by themselves).
    #[allow(dead_code)]
    pub fn restart_on_same_port(&mut self) {
        self.stop_now().expect("the server stopped cleanly");
        self.spawn_on(self.port, "/healthz").expect("the server restarted");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client of this server.
    pub async fn locker(&self) -> Locker {
        Locker::open(&self.url()).await.expect("open http backend")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

/// Whether `GET path` on the port answers 200.
fn answers_200(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}
