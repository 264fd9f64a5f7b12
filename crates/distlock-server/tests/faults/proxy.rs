//! A TCP proxy the harness controls, one per client and store endpoint, to cut a client off from
//! its store: `Pass` forwards; `Drop` resets every connection and refuses new ones; `Blackhole`
//! keeps connections open but forwards nothing (a half-open network: requests vanish). Healing
//! (back to `Pass`) closes the connections that were held, so clients reconnect.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Drop,
    Blackhole,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (a loopback port).
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let modes = mode.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut rx = modes.subscribe();
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
                        Mode::Pass => {}
                    }
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = async {
                            while rx.changed().await.is_ok() && *rx.borrow() == Mode::Pass {}
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
        Proxy { port, mode }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}
