//! The fenced resource: a tiny store inside the harness that accepts a write only with a token at
//! least as high as the highest it has seen for that key, and logs every write it judged.
//! Protocol over TCP, one line each way: `key token client long` → `1` (accepted) or `0`
//! (refused); `long` = 1 marks the first write of a long critical section, so the nemesis can
//! strike while a holder is inside one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::history::now_ns;

/// One judged write.
#[derive(Debug, Clone)]
pub struct Judged {
    pub key: String,
    pub t: i64,
    pub token: u64,
    pub client: u32,
    pub accepted: bool,
}

#[derive(Default)]
struct State {
    highest: HashMap<String, u64>,
    log: Vec<Judged>,
    /// Per key, the client inside a long critical section, as of the key's last accepted write.
    in_long_hold: HashMap<String, u32>,
}

/// A running fenced resource.
#[derive(Clone)]
pub struct FencedResource {
    pub addr: String,
    state: Arc<Mutex<State>>,
}

impl FencedResource {
    pub async fn start() -> FencedResource {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fenced resource");
        let addr = listener.local_addr().expect("addr").to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut parts = line.split(' ');
                        let (Some(key), Some(Ok(token)), Some(Ok(client))) =
                            (parts.next(), parts.next().map(str::parse), parts.next().map(str::parse))
                        else {
                            break;
                        };
                        let long = parts.next() == Some("1");
                        let accepted = {
                            let mut s = state.lock().expect("fence state");
                            let highest = s.highest.entry(key.to_owned()).or_insert(0);
                            let accepted = token >= *highest;
                            if accepted {
                                *highest = token;
                                match long {
                                    true => s.in_long_hold.insert(key.to_owned(), client),
                                    false => s.in_long_hold.remove(key),
                                };
                            }
                            s.log.push(Judged { key: key.to_owned(), t: now_ns(), token, client, accepted });
                            accepted
                        };
                        if w.write_all(if accepted { b"1\n" } else { b"0\n" }).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        FencedResource { addr, state }
    }

    /// The client whose write was accepted last: the current holder, as far as the resource knows.
    pub fn last_writer(&self) -> Option<u32> {
        self.state.lock().ok()?.log.iter().rev().find(|j| j.accepted).map(|j| j.client)
    }

    /// A client that has just begun a long critical section (on any key), if one is inside one now.
    pub fn in_long_hold(&self) -> Option<u32> {
        self.state.lock().ok()?.in_long_hold.values().next().copied()
    }

    /// Every judged write so far.
    pub fn log(&self) -> Vec<Judged> {
        self.state.lock().map(|s| s.log.clone()).unwrap_or_default()
    }
}
