//! The stores under test, started by the harness on loopback, with the faults it can inject into
//! them: `kill -9` and restart, SIGSTOP / SIGCONT. Each store also says how a client reaches it
//! through its own proxies. Lock servers in front of etcd count as one store: the cluster is the
//! store, the servers its stateless fronts, and clients name every server.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::clock::{http_time, redis_time, FakeClock};
use crate::common::support::topologies::{online_replica, raw, until, Cluster, Group, MASTER};
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
    /// A master and a replica behind three sentinels (no persistence); clients ask the sentinels
    /// and wait for one replica to acknowledge each grant (`min_replicas=1`).
    Sentinel,
    /// Redis Cluster: three masters with a replica each (no persistence); clients wait for this
    /// many replicas to acknowledge each grant and renewal (`min_replicas`).
    Cluster(u32),
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
            Kind::Sentinel => "redis-sentinel (master + replica, min_replicas=1)".into(),
            Kind::Cluster(n) => format!("redis-cluster (3 masters + 3 replicas, min_replicas={n})"),
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

    /// How long the store may take after a fault to be whole again, beyond the fault itself:
    /// Sentinel turns a demoted or restarted master into a replica only after it has seen it
    /// report itself master for 8 s (it asks each server every 10 s), and the full resync waits
    /// 5 s for company (measured: 16–19 s from the fault to a replica in sync); a Cluster
    /// promotes a replica after the node timeout (2 s) and an election.
    pub fn settle(self) -> Duration {
        match self {
            Kind::Sentinel => Duration::from_secs(35),
            Kind::Cluster(_) => Duration::from_secs(6),
            _ => Duration::ZERO,
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
    Sentinel(Group),
    Cluster(Cluster, u32),
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
    /// Starts the store; with `clock`, under it (the server and a single Redis only), checking
    /// that the clock reaches the process; `meshed`: an etcd cluster's members each in a network
    /// namespace of its own, so that [`Store::cut_peers`] can cut links between them.
    pub fn start(kind: Kind, clock: Option<&FakeClock>, meshed: bool) -> Store {
        if let Some(clock) = clock {
            return match kind {
                Kind::Server => {
                    let server = Server::start_with_env(&[], clock.env());
                    clock.assert_reaches("distlock serve", || http_time(server.port));
                    Store::Server(server)
                }
                Kind::Redis => {
                    let redis = RedisServer::start_with_env(clock.env());
                    clock.assert_reaches("redis-server", || redis_time(redis.port));
                    Store::Redis(redis)
                }
                other => panic!("the clock nemesis runs on the server and a single Redis, not {other:?}"),
            };
        }
        match kind {
            Kind::Server => Store::Server(Server::start(&[])),
            Kind::Redis => Store::Redis(RedisServer::start()),
            Kind::Redlock(n) => Store::Redlock((0..n).map(|_| RedisServer::start()).collect()),
            Kind::Sentinel => Store::Sentinel(Group::start()),
            Kind::Cluster(n) => Store::Cluster(Cluster::start_with_replicas(1), n),
            Kind::Etcd(n) if meshed => Store::Etcd(EtcdCluster::start_meshed(n)),
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
            // Clients reach the sentinels through their proxies, the master they name directly.
            Store::Sentinel(g) => g.sentinels.iter().map(|s| s.port).collect(),
            // The nodes clients start from; they then follow the cluster's slot map directly.
            Store::Cluster(c, _) => c.nodes.iter().map(|n| n.port).collect(),
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
            Store::Sentinel(_) => format!("redis-sentinel://{hosts}/{MASTER}?timeout=500ms&min_replicas=1"),
            Store::Cluster(_, n) => format!("redis-cluster://{hosts}?timeout=500ms&min_replicas={n}"),
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

    /// Index of the etcd leader, of the Sentinel group's master (0: the one started as master,
    /// 1: the replica), of the Cluster node that is master of `key`'s slot; 0 for other stores
    /// (the server, the Redis, the first Redlock master).
    pub async fn leader(&self, key: &str) -> usize {
        match self {
            Store::Sentinel(g) => return tokio::task::block_in_place(|| sentinel_master(g)),
            Store::Cluster(c, _) => return tokio::task::block_in_place(|| c.owner(slot_of(c, key))),
            _ => {}
        }
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

    /// How many members an etcd cluster has (0 for other stores).
    pub fn etcd_members(&self) -> usize {
        self.etcd().map_or(0, EtcdCluster::member_count)
    }

    /// Cuts the links between the etcd members of each pair (a store started meshed).
    pub fn cut_peers(&self, pairs: &[(usize, usize)]) {
        if let Some(e) = self.etcd() {
            tokio::task::block_in_place(|| pairs.iter().for_each(|&(i, j)| e.cut(i, j)));
        }
    }

    /// Restores every link between etcd members.
    pub fn heal_peers(&self) {
        if let Some(e) = self.etcd() {
            tokio::task::block_in_place(|| e.heal_all());
        }
    }

    /// `kill -9` of member `i` (the only process for the server and a single Redis).
    pub fn kill(&mut self, i: usize) {
        match self {
            Store::Server(s) => s.kill9(),
            Store::Redis(r) => r.kill(),
            Store::Redlock(m) => m[i].kill(),
            Store::Sentinel(g) => [&mut g.master, &mut g.replica][i].kill(),
            Store::Cluster(c, _) => c.nodes[i].kill(),
            Store::Etcd(e) | Store::ServersOverEtcd(_, e) => e.kill(i),
            Store::Broken => {}
        }
    }

    /// Starts member `i` again in place: the server recovers its log, a Redis comes back empty,
    /// an etcd member rejoins with its data. A killed Sentinel or Cluster master comes back
    /// (empty) only once another has taken its place, as an operator's restart policy would
    /// have it, and rejoins as a replica; this returns once it is one, in sync.
    pub fn restart(&mut self, i: usize) {
        match self {
            Store::Server(s) => s.restart_in_place(),
            Store::Redis(r) => r.restart(),
            Store::Redlock(m) => m[i].restart(),
            Store::Sentinel(g) => {
                until("the sentinels promote the replica", Duration::from_secs(60), || failed_over(g, i));
                [&mut g.master, &mut g.replica][i].restart();
                synced_replica(g, i);
            }
            Store::Cluster(c, _) => {
                let port = c.nodes[i].port;
                until("a replica takes over the dead master's slots", Duration::from_secs(60), || {
                    let mut alive = c.nodes.iter().filter(|n| n.port != port).map(|n| n.port);
                    let seen = alive.next().map(|p| raw(p, "CLUSTER NODES")).unwrap_or_default();
                    // `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots…>`
                    let dead = seen.lines().find(|l| l.contains(&format!(":{port}@"))).unwrap_or_default();
                    dead.contains("fail")
                        && !dead.contains("fail?")
                        && dead.split_whitespace().count() <= 8
                        && c.nodes
                            .iter()
                            .filter(|n| n.port != port)
                            .all(|n| raw(n.port, "CLUSTER INFO").contains("cluster_state:ok"))
                });
                c.nodes[i].restart();
                until("the old master rejoins as a replica", Duration::from_secs(60), || {
                    c.nodes.iter().any(|n| online_replica(n.port, port))
                });
            }
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
            Store::Sentinel(g) => [&g.master, &g.replica][i].pid(),
            Store::Cluster(c, _) => c.nodes[i].pid(),
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

    /// A failover the operator asks for (`SENTINEL FAILOVER`): the master is demoted, the
    /// replica promoted; returns once the old master is a replica of the new one, in sync.
    pub fn failover(&mut self) {
        if let Store::Sentinel(g) = self {
            let old = sentinel_master(g);
            // A failover Sentinel gives up on (its replica did not answer in time) is asked for
            // again once Sentinel takes requests again (`-INPROG` meanwhile).
            let mut asked = None::<std::time::Instant>;
            until("the sentinels promote the replica", Duration::from_secs(60), || {
                if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    let reply = raw(g.sentinels[0].port, &format!("SENTINEL FAILOVER {MASTER}"));
                    asked = reply.starts_with("+OK").then(std::time::Instant::now).or(asked);
                }
                failed_over(g, old)
            });
            synced_replica(g, old);
        }
    }
}

/// Which of the group's two servers the sentinels name as master (0: the one started as master).
fn sentinel_master(g: &Group) -> usize {
    // `*2 $9 127.0.0.1 $5 <port>`, one per line.
    let reply = raw(g.sentinels[0].port, &format!("SENTINEL get-master-addr-by-name {MASTER}"));
    usize::from(reply.lines().nth(4).map(str::trim) == Some(g.replica.port.to_string().as_str()))
}

/// Whether the sentinels have finished a failover away from server `old`: they name the other
/// as master *and* no failover is in progress. Sentinel names the replica it chose from the
/// moment it chooses it, and may still abort; a harness that restarted the old master on that
/// name alone (as it did) brought it back empty while it was still the master, and it kept
/// that role (a case outside the promise: the restart policy waits for a new master).
fn failed_over(g: &Group, old: usize) -> bool {
    let reply = raw(g.sentinels[0].port, &format!("SENTINEL master {MASTER}"));
    sentinel_master(g) != old && field(&reply, "flags").as_deref() == Some("master")
}

/// The value of field `name` in a flat RESP field / value array (`SENTINEL master`, `replicas`).
fn field(reply: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = reply.lines().map(str::trim).collect();
    lines.iter().position(|l| *l == name).and_then(|p| lines.get(p + 2)).map(|v| v.to_string())
}

/// Waits until server `i` of the group is a replica the other (the master) streams to.
fn synced_replica(g: &Group, i: usize) {
    let ports = [g.master.port, g.replica.port];
    until("the old master rejoins as a replica", Duration::from_secs(60), || {
        online_replica(ports[1 - i], ports[i])
    });
    // And the sentinels see it as a healthy replica, so that the next failover has one to promote.
    until("the sentinels see the new replica", Duration::from_secs(60), || {
        let reply = raw(g.sentinels[0].port, &format!("SENTINEL replicas {MASTER}"));
        field(&reply, "port") == Some(ports[i].to_string())
            && field(&reply, "flags").as_deref() == Some("slave")
            && field(&reply, "master-link-status").as_deref() == Some("ok")
    });
}

/// The hash slot of the lock keys of `key` (`distlock:{key}:…`).
fn slot_of(c: &Cluster, key: &str) -> u16 {
    let reply = raw(c.nodes[0].port, &format!("CLUSTER KEYSLOT distlock:{{{key}}}:lock"));
    reply.trim().trim_start_matches(':').parse().expect("CLUSTER KEYSLOT")
}

/// SIGSTOP / SIGCONT of a client process.
pub fn pause_process(pid: u32, stop: bool) {
    signal(Some(pid), if stop { Signal::SIGSTOP } else { Signal::SIGCONT });
}
