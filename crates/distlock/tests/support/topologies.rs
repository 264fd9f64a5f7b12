//! Redis as teams run it, for tests: a master with a replica behind three sentinels, and a
//! 3-master cluster, all on loopback (`redis-server`, `redis-server --sentinel`, `redis-cli
//! --cluster create`), stopped on drop. Any node can be killed with `kill -9` and started again
//! in place (empty: no persistence), as the fault suite does.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, kill9, require_binary, wait_for_port};

pub const MASTER: &str = "mymaster";

pub struct Node {
    child: Option<Child>,
    pub port: u16,
    /// The command line that started it, to start it again in place.
    argv: Vec<OsString>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Runs `argv` (the server listening on `port`) and waits until it accepts connections.
    fn launch(argv: Vec<OsString>, port: u16, dir: tempfile::TempDir) -> Node {
        let mut node = Node { child: None, port, argv, _dir: dir };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(5), "redis-server");
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        kill9(&mut self.child);
    }

    /// Starts it again on its port and directory: empty (no persistence), with its own
    /// configuration (a sentinel's as it rewrote it, a cluster node's `nodes.conf`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`-STOP`, `-CONT`) with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the node runs").to_string();
        let ok = Command::new("kill").args([signal, &pid]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pid}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One raw command (inline protocol) to 127.0.0.1:`port`; the raw reply.
pub fn raw(port: u16, command: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let _ = s.write_all(format!("{command}\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(30));
    let mut buf = vec![0u8; 1 << 16];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

pub fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn spawn(args: &[String], conf: Option<&str>) -> Node {
    let bin = require_binary("redis-server", "redis-server");
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut argv: Vec<OsString> = vec![bin.into()];
    if let Some(conf) = conf {
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, format!("port {port}\nbind 127.0.0.1\ndir {}\n{conf}", dir.path().display()))
            .expect("write sentinel.conf");
        argv.extend([path.into(), "--sentinel".into()]);
    } else {
        argv.extend(server_args(port, dir.path()));
        argv.extend(args.iter().map(OsString::from));
    }
    Node::launch(argv, port, dir)
}

/// A `redis-server` on 127.0.0.1:`port` with no persistence, in `dir`.
fn server_args(port: u16, dir: &std::path::Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]
        .into_iter()
        .chain(["--appendonly", "no"])
        .map(OsString::from)
        .collect();
    argv.extend(["--dir".into(), dir.into()]);
    argv
}

/// A master, one replica in sync with it, three sentinels that know both.
pub struct Group {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
}

impl Group {
    pub fn start() -> Group {
        let master = spawn(&[], None);
        let replica = spawn(&["--replicaof".into(), "127.0.0.1".into(), master.port.to_string()], None);
        until("replication link up", Duration::from_secs(10), || {
            raw(replica.port, "INFO replication").contains("master_link_status:up")
        });
        let conf = format!(
            "sentinel monitor {MASTER} 127.0.0.1 {} 2\nsentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 5000\n",
            master.port
        );
        let sentinels: Vec<Node> = (0..3).map(|_| spawn(&[], Some(&conf))).collect();
        let replica_port = replica.port.to_string();
        until("sentinels know the replica", Duration::from_secs(20), || {
            sentinels
                .iter()
                .all(|s| raw(s.port, &format!("SENTINEL replicas {MASTER}")).contains(&replica_port))
        });
        Group { master, replica, sentinels }
    }

    /// The URL through the sentinels with `params`; the call timeout is 1 s unless they set it.
    pub fn url(&self, params: &str) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let timeout = if params.split('&').any(|p| p.starts_with("timeout=")) { "" } else { "timeout=1s&" };
        format!("redis-sentinel://{}/{MASTER}?{timeout}{params}", hosts.join(","))
    }

    pub fn master_port(&self) -> String {
        raw(self.sentinels[0].port, &format!("SENTINEL get-master-addr-by-name {MASTER}"))
    }
}

/// Whether the master on `master` streams to the replica on `replica` (and so counts it for
/// `WAIT`): the master's view, which lags the replica's `master_link_status:up` by up to a
/// second after a sync (the master waits for the replica's first acknowledgement).
pub fn online_replica(master: u16, replica: u16) -> bool {
    raw(master, "INFO replication").contains(&format!("port={replica},state=online"))
}

/// The text of a bulk-string reply (`$n\r\ntext\r\n`).
pub fn bulk(reply: &str) -> String {
    reply.lines().nth(1).unwrap_or_default().trim().to_owned()
}

pub struct Cluster {
    /// The masters first (`redis-cli --cluster create` makes the first three masters), then
    /// their replicas.
    pub nodes: Vec<Node>,
    /// With TLS: each node's TLS port, in the order of `nodes` (their plain ports stay open on
    /// loopback for the harness's own commands).
    pub tls_ports: Vec<u16>,
}

impl Cluster {
    /// Three masters, no replicas.
    pub fn start() -> Cluster {
        Cluster::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each: a master that fails is replaced by one.
    pub fn start_with_replicas(replicas: usize) -> Cluster {
        Cluster::launch(replicas, None)
    }

    /// Three masters that also speak TLS with the certificates of [`super::make_certs`] in
    /// `certs` (clients must present one), on the cluster bus and to clients; a TLS client is
    /// told the nodes' TLS ports.
    pub fn start_tls(certs: &std::path::Path) -> Cluster {
        Cluster::launch(0, Some(certs))
    }

    fn launch(replicas: usize, tls: Option<&std::path::Path>) -> Cluster {
        let mut tls_ports = Vec::new();
        let server = require_binary("redis-server", "redis-server");
        let cli = require_binary("redis-cli", "redis-tools");
        let nodes: Vec<Node> = (0..3 * (1 + replicas))
            .map(|_| {
                let dir = tempfile::tempdir().expect("temp dir");
                let port = cluster_port();
                let mut argv: Vec<OsString> = vec![server.clone().into()];
                argv.extend(server_args(port, dir.path()));
                // A replica's full sync starts at once (the default waits 5 s for more replicas
                // to share it): a restarted master is a replica again seconds sooner.
                for a in [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--repl-diskless-sync-delay",
                    "0",
                ] {
                    argv.push(a.into());
                }
                argv.extend(["--cluster-config-file".into(), dir.path().join("nodes.conf").into()]);
                if let Some(certs) = tls {
                    let tls_port = free_port();
                    tls_ports.push(tls_port);
                    argv.extend(["--tls-port".into(), tls_port.to_string().into()]);
                    for (flag, file) in [
                        ("--tls-cert-file", "server.pem"),
                        ("--tls-key-file", "server.key"),
                        ("--tls-ca-cert-file", "ca.pem"),
                    ] {
                        argv.extend([flag.into(), certs.join(file).into()]);
                    }
                    for a in ["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "yes"]
                    {
                        argv.push(a.into());
                    }
                }
                Node::launch(argv, port, dir)
            })
            .collect();
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let start = Instant::now();
        while !nodes.iter().all(|n| raw(n.port, "CLUSTER INFO").contains("cluster_state:ok")) {
            assert!(start.elapsed() < Duration::from_secs(20), "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        // A replica that never finished its first sync does not stand for election.
        until("the replicas in sync", Duration::from_secs(20), || {
            nodes[3..].iter().all(|r| nodes[..3].iter().any(|m| online_replica(m.port, r.port)))
        });
        Cluster { nodes, tls_ports }
    }

    pub fn url(&self) -> String {
        self.url_with("timeout=2s")
    }

    /// The URL with `params` (instead of `timeout=2s`).
    pub fn url_with(&self, params: &str) -> String {
        format!("redis-cluster://127.0.0.1:{},127.0.0.1:{}?{params}", self.nodes[0].port, self.nodes[1].port)
    }

    /// The node (index) that serves `slot` now.
    pub fn owner(&self, slot: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                raw(n.port, "CLUSTER NODES").lines().any(|l| l.contains("myself") && serves(l, slot))
            })
            .expect("a node serves the slot")
    }

    /// Moves `slot` with its keys from node `from` to node `to` (as `redis-cli --cluster reshard`
    /// does, step by step).
    pub fn migrate(&self, slot: u16, from: usize, to: usize) {
        let (src, dst) = (self.nodes[from].port, self.nodes[to].port);
        let (src_id, dst_id) = (bulk(&raw(src, "CLUSTER MYID")), bulk(&raw(dst, "CLUSTER MYID")));
        assert!(raw(dst, &format!("CLUSTER SETSLOT {slot} IMPORTING {src_id}")).starts_with("+OK"));
        assert!(raw(src, &format!("CLUSTER SETSLOT {slot} MIGRATING {dst_id}")).starts_with("+OK"));
        let keys: Vec<String> = raw(src, &format!("CLUSTER GETKEYSINSLOT {slot} 100"))
            .lines()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .map(str::to_owned)
            .collect();
        if !keys.is_empty() {
            let reply = raw(src, &format!("MIGRATE 127.0.0.1 {dst} \"\" 0 5000 KEYS {}", keys.join(" ")));
            assert!(reply.starts_with("+OK"), "MIGRATE: {reply}");
        }
        for n in &self.nodes {
            let reply = raw(n.port, &format!("CLUSTER SETSLOT {slot} NODE {dst_id}"));
            assert!(reply.starts_with("+OK"), "SETSLOT NODE: {reply}");
        }
    }
}

/// A free port for a cluster node: its bus port (port + 10000) must exist and be free too.
pub fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
pub fn serves(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| match range.split_once('-') {
        Some((a, b)) => {
            a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
        }
        None => range.parse::<u16>() == Ok(slot),
    })
}

/// While the replicas lag, `WAIT` answers only after `wait_timeout`, and the answer of the
/// script sent before it comes with it: a `NOSCRIPT` from a master without the script (a
/// promoted replica starts with none) must still reach the backend, or the script is never
/// loaded there. Here the `replicas` are stopped and the `masters`' scripts flushed; a caller
/// gives up waiting before its first answer, and the clean-up of its queue place needs the
/// dequeue script. With the grant connection cut at the plain call timeout (500 ms, shorter than
/// `wait_timeout`), every clean-up lost its answer and the place blocked the queue for
/// `queue_ttl` (the fault suite's Sentinel kill case saw the queue blocked 6 s after a
/// failover). `url(params)` opens the topology; the queue of the key `k` lives on `queue_port`.
pub async fn abandoned_place_is_cleaned(
    url: impl Fn(&str) -> String,
    replicas: &[Node],
    masters: &[Node],
    queue_port: u16,
) {
    use distlock::{AcquireOptions, Error, Locker};
    let holder = Locker::open(&url("timeout=1s&min_replicas=1")).await.expect("open");
    // A replica that has just finished its first sync counts for WAIT only from its first
    // acknowledgement, up to a second later.
    let (opts, counted) = (AcquireOptions::new().ttl(Duration::from_secs(30)), Instant::now());
    let held = loop {
        match holder.acquire("k", &opts).await {
            Ok(lease) => break lease,
            Err(Error::Unavailable(_)) if counted.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("acquire, acknowledged by a replica: {e}"),
        }
    };
    // Both callers below connect before the replicas stop: the cluster client connects to every
    // node it is told of, replicas too, and a stopped one holds a new client up past its timeout
    // (CI, 2026-12-06: "open: no answer within 2s").
    let patient = Locker::open(&url("timeout=2s&min_replicas=1&wait_timeout=1s")).await.expect("open");
    let waiter =
        Locker::open(&url("timeout=500ms&min_replicas=1&wait_timeout=1s&queue_ttl=30s")).await.expect("open");
    for replica in replicas {
        replica.signal("-STOP");
    }
    for master in masters {
        let flushed = raw(master.port, "SCRIPT FLUSH");
        assert!(flushed.starts_with("+OK"), "SCRIPT FLUSH: {flushed}");
    }
    // A caller whose call timeout outlasts WAIT loads the acquire script again (the key is held).
    assert!(matches!(patient.acquire("k", &AcquireOptions::new()).await, Err(Error::Held { .. })));

    // A caller queues, then gives up before WAIT lets its answer come back.
    let wait = AcquireOptions::new().wait(Duration::from_secs(3));
    let gave_up = tokio::time::timeout(Duration::from_millis(400), waiter.acquire("k", &wait)).await;
    assert!(gave_up.is_err(), "still waiting after 400 ms: {gave_up:?}");
    let places = raw(queue_port, "ZCARD distlock:{k}:queue");
    assert_eq!(places.trim(), ":1", "the caller had a place in the queue");
    // Its clean-up loads the dequeue script and takes the place out, long before queue_ttl.
    tokio::task::spawn_blocking(move || {
        until("the abandoned place taken out", Duration::from_secs(8), || {
            raw(queue_port, "ZCARD distlock:{k}:queue").trim() == ":0"
        })
    })
    .await
    .expect("the check");

    for replica in replicas {
        replica.signal("-CONT");
    }
    held.release().await.expect("release");
    let next = Locker::open(&url("timeout=1s&min_replicas=1")).await.expect("open");
    let lease = next.acquire("k", &wait).await.expect("the next caller is not held up by the place");
    assert!(lease.fencing_token() > 1);
}
