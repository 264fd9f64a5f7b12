//! The stores under test, started by the harness on loopback, with the faults it can inject into
//! them: `kill -9` and restart, SIGSTOP / SIGCONT. Each store also says how a client reaches it
//! through its own proxies. Lock servers in front of etcd count as one store: the cluster is the
//! store, the servers its stateless fronts, and clients name every server.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::support::{EtcdCluster, RedisServer};
use crate::common::Server;

/// Which store, and how many members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `distlock serve` with its durable embedded store.
    Server,
    /// One `redis-server`, no persistence.
    Redis,
    /// Redlock over this many independent Redis masters (no persistence).
    Redlock(usize),
    /// An etcd cluster of this many members.
    Etcd(usize),
    /// Two `distlock serve --store etcd://…` in front of an etcd cluster of this many members;
    /// each client names both servers (`http://a,b`), its own first.
    ServersOverEtcd(usize),
    /// No lock at all: every client gets its own `memory://` table. The checkers must flag it.
    Broken,
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Server => "server (embedded)".into(),
            Kind::Redis => "redis".into(),
            Kind::Redlock(n) => format!("redlock ({n} masters)"),
            Kind::Etcd(n) => format!("etcd ({n} members)"),
            Kind::ServersOverEtcd(n) => format!("2 servers over etcd ({n} members)"),
            Kind::Broken => "self-test: a lock per client (memory://)".into(),
        }
    }

    /// The TTL clients use: etcd leases count whole seconds and need a few election timeouts.
    pub fn ttl(self) -> Duration {
        match self {
            Kind::Etcd(_) | Kind::ServersOverEtcd(_) => Duration::from_secs(2),
            _ => Duration::from_secs(1),
        }
    }

    /// Whether the store is an etcd cluster (with or without servers in front).
    pub fn is_etcd(self) -> bool {
        matches!(self, Kind::Etcd(_) | Kind::ServersOverEtcd(_))
    }
}

/// A running store.
pub enum Store {
    Server(Server),
    Redis(RedisServer),
    Redlock(Vec<RedisServer>),
    Etcd(EtcdCluster),
    /// The servers in front of the cluster (declared first: they stop before it).
    ServersOverEtcd(Vec<Server>, EtcdCluster),
    Broken,
}

fn signal(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

impl Store {
    pub fn start(kind: Kind) -> Store {
        match kind {
            Kind::Server => Store::Server(Server::start(&[])),
            Kind::Redis => Store::Redis(RedisServer::start()),
            Kind::Redlock(n) => Store::Redlock((0..n).map(|_| RedisServer::start()).collect()),
            Kind::Etcd(n) => Store::Etcd(EtcdCluster::start(n)),
            Kind::ServersOverEtcd(n) => {
                let etcd = EtcdCluster::start(n);
                // The servers' own etcd calls are bounded as the clients' are in the etcd cases.
                let store = format!("--store={}?timeout=1s", etcd.url());
                Store::ServersOverEtcd((0..2).map(|_| Server::start(&[&store])).collect(), etcd)
            }
            Kind::Broken => Store::Broken,
        }
    }

    /// The ports a client talks to, in the order `url` expects them.
    pub fn ports(&self) -> Vec<u16> {
        match self {
            Store::Server(s) => vec![s.port],
            Store::Redis(r) => vec![r.port],
            Store::Redlock(m) => m.iter().map(|r| r.port).collect(),
            Store::Etcd(e) => e.client_ports(),
            Store::ServersOverEtcd(servers, _) => servers.iter().map(|s| s.port).collect(),
            Store::Broken => Vec::new(),
        }
    }

    /// The backend URL for client `c`, whose connections go to `ports` (its proxies).
    pub fn url(&self, c: u32, ports: &[u16]) -> String {
        let mut ports = ports.to_vec();
        if let Store::ServersOverEtcd(..) = self {
            // Client c names server c first (then the others), so each server has clients of its
            // own until one dies.
            let first = c as usize % ports.len().max(1);
            ports.rotate_left(first);
        }
        let hosts = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        match self {
            Store::Server(_) => format!("http://{hosts}?timeout=500ms"),
            Store::Redis(_) => format!("redis://{hosts}?timeout=500ms"),
            Store::Redlock(_) => format!("redlock://{hosts}?timeout=300ms"),
            Store::Etcd(_) => format!("etcd://{hosts}?timeout=1s"),
            Store::ServersOverEtcd(..) => format!("http://{hosts}?timeout=1s"),
            Store::Broken => "memory://".into(),
        }
    }

    /// The etcd cluster, if the store is one.
    fn etcd(&self) -> Option<&EtcdCluster> {
        match self {
            Store::Etcd(e) | Store::ServersOverEtcd(_, e) => Some(e),
            _ => None,
        }
    }

    /// Index of the etcd leader (0 for other stores: the server, the Redis, the first master).
    pub async fn leader(&self) -> usize {
        let Some(e) = self.etcd() else { return 0 };
        for (i, port) in e.client_ports().into_iter().enumerate() {
            let Ok(mut c) = etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None).await
            else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                    return i;
                }
            }
        }
        0
    }

    /// `kill -9` of member `i` (the only process for the server and a single Redis).
    pub fn kill(&mut self, i: usize) {
        match self {
            Store::Server(s) => s.kill9(),
            Store::Redis(r) => r.kill(),
            Store::Redlock(m) => m[i].kill(),
            Store::Etcd(e) | Store::ServersOverEtcd(_, e) => e.kill(i),
            Store::Broken => {}
        }
    }

    /// Starts member `i` again in place: the server recovers its log, a Redis comes back empty,
    /// an etcd member rejoins with its data.
    pub fn restart(&mut self, i: usize) {
        match self {
            Store::Server(s) => s.restart_in_place(),
            Store::Redis(r) => r.restart(),
            Store::Redlock(m) => m[i].restart(),
            Store::Etcd(e) | Store::ServersOverEtcd(_, e) => e.restart(i),
            Store::Broken => {}
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) member `i`.
    pub fn pause(&self, i: usize, stop: bool) {
        let pid = match self {
            Store::Server(s) => s.pid(),
            Store::Redis(r) => r.pid(),
            Store::Redlock(m) => m[i].pid(),
            Store::Etcd(e) | Store::ServersOverEtcd(_, e) => e.pid(i),
            Store::Broken => None,
        };
        signal(pid, if stop { Signal::SIGSTOP } else { Signal::SIGCONT });
    }

    /// `kill -9` of lock server `i` in front of the store (none for other stores).
    pub fn kill_server(&mut self, i: usize) {
        if let Store::ServersOverEtcd(servers, _) = self {
            servers[i].kill9();
        }
    }

    /// Starts lock server `i` again on its port.
    pub fn restart_server(&mut self, i: usize) {
        if let Store::ServersOverEtcd(servers, _) = self {
            servers[i].restart_in_place();
        }
    }
}

/// SIGSTOP / SIGCONT of a client process.
pub fn pause_process(pid: u32, stop: bool) {
    signal(Some(pid), if stop { Signal::SIGSTOP } else { Signal::SIGCONT });
}
