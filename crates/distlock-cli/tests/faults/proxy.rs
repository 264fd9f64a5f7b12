//! A TCP proxy the harness controls, one per client and store endpoint, to cut a client off from
//! its store: `Pass` forwards; `Delay` forwards every chunk late (a congested or flapping link);
//! `Drop` resets every connection and refuses new ones; `Blackhole` keeps connections open but
//! forwards nothing (a half-open network: requests vanish). Healing from `Drop` or `Blackhole`
//! (back to `Pass`) closes the connections that were held, so clients reconnect.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(std::time::Duration),
    Drop,
    Blackhole,
}

/// Copies one direction, late by the current delay, until either side closes; notes when it
/// last forwarded something in `used`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
    used: Arc<AtomicI64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = match *mode.borrow() {
            Mode::Delay(d) => Some(d),
            _ => None,
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        used.store(crate::history::now_ns(), Ordering::Relaxed);
    }
}

fn forwarding(mode: Mode) -> bool {
    matches!(mode, Mode::Pass | Mode::Delay(_))
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// When it last forwarded bytes ([`crate::history::now_ns`]; 0: never): of a client's
    /// proxies to several servers, the one it talks to now is the latest.
    used: Arc<AtomicI64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let modes = mode.clone();
        let used = Arc::new(AtomicI64::new(0));
        let noted = used.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut rx = modes.subscribe();
                let used = noted.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let mode = *rx.borrow_and_update();
                    match mode {
                        Mode::Drop => return,
                        Mode::Blackhole => {
                            // Hold the connection silently until healed, then close it.
                            while rx.changed().await.is_ok() && *rx.borrow() != Mode::Pass {}
                            return;
                        }
                        Mode::Pass | Mode::Delay(_) => {}
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let _ = server.set_nodelay(true);
                    let (client_r, client_w) = client.into_split();
                    let (server_r, server_w) = server.into_split();
                    let (up, down) = (rx.clone(), rx.clone());
                    // Pinned here so that the sockets outlive the select: a blackholed
                    // connection stays open, silent, until healed.
                    let pumps = async {
                        tokio::join!(
                            pump(client_r, server_w, up, used.clone()),
                            pump(server_r, client_w, down, used)
                        )
                    };
                    tokio::pin!(pumps);
                    tokio::select! {
                        _ = &mut pumps => {}
                        _ = async {
                            while rx.changed().await.is_ok() && forwarding(*rx.borrow()) {}
                        } => {
                            let mode = *rx.borrow();
                            if mode == Mode::Blackhole {
                                while rx.changed().await.is_ok() && *rx.borrow() != Mode::Pass {}
                            }
                            // Dropping both sockets closes them.
                        }
                    }
                });
            }
        });
        Proxy { port, mode, used }
    }

    /// When this proxy last forwarded bytes.
    pub fn last_used(&self) -> i64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}
