//! Test harness: real servers started on free loopback ports in temp dirs, stopped on drop.
//! A missing binary fails the test loudly with the command that installs it.

#![allow(dead_code)]

pub mod netns;
pub mod topologies;

/// The shared checks live in the contract suite's crate; these names stay for the tests that
/// call them directly (not every test binary does).
#[allow(unused_imports)]
pub use distlock_testkit::contract::{
    hammer, pages_of_ten, renew_keeps_ttl as renew_without_ttl_keeps_the_lease_ttl,
};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds `name` on PATH or panics with the install command.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; the tests need a real server.\n\
                 Install it with: sudo apt-get install -y {package}   (./scripts/test.sh does this when run as root)"
            )
        })
}

/// After a store fault: takes `key` (retrying while the store recovers, up to 20 s) with a 30 s
/// TTL, queues a waiter behind it, releases, and asserts the waiter was woken by the release —
/// within 5 s, where a backend opened with `queue_ttl=30s` would fall back to a timer after 10 s.
pub async fn release_wakes_its_waiter(locker: &distlock::Locker, key: &str) {
    use distlock::AcquireOptions;
    let opts = AcquireOptions::new().ttl(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder = loop {
        match locker.acquire(key, &opts).await {
            Ok(l) => break l,
            Err(e) => assert!(Instant::now() < deadline, "acquire after the fault: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let waiter = tokio::spawn({
        let (locker, key) = (locker.clone(), key.to_owned());
        async move { locker.acquire(&key, &AcquireOptions::new().wait(Duration::from_secs(30))).await }
    });
    while locker.status(key).await.map_or(0, |s| s.waiters) == 0 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the waiter's first registration: it sleeps on whatever that got it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    waiter.await.unwrap().expect("the waiter gets the lock");
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "woken by the release, not the 10 s fallback timer ({:?})",
        released.elapsed()
    );
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind a free port")
}

/// Waits until something accepts connections on 127.0.0.1:`port`; panics after `within`.
pub fn wait_for_port(port: u16, within: Duration, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < within, "{what} did not start on port {port} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of a child process, if it runs, and waits for it (no zombie is left).
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A `redis-server` with no persistence, on its own port and temp dir.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Environment of its process, kept for restarts (the clock nemesis's libfaketime).
    env: Vec<(String, String)>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with_env(Vec::new())
    }

    /// Starts it (and every restart) with `env` added to its environment.
    pub fn start_with_env(env: Vec<(String, String)>) -> RedisServer {
        let bin = require_binary("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer { child: None, port: 0, dir, env };
        for _ in 0..5 {
            server.port = free_port();
            server.spawn(&bin);
            if server.wait_ready(Duration::from_secs(5)) {
                return server;
            }
            server.kill();
        }
        panic!("redis-server did not start on a free port");
    }

    fn spawn(&mut self, bin: &PathBuf) {
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
    }

    fn wait_ready(&mut self, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            if ping(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9` the server.
    pub fn kill(&mut self) {
        kill9(&mut self.child);
    }

    /// Starts it again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let bin = require_binary("redis-server", "redis-server");
        self.spawn(&bin);
        assert!(self.wait_ready(Duration::from_secs(5)), "redis-server did not restart");
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server runs").to_string();
        let ok = Command::new("kill").args([signal, &pid]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pid}");
    }

    /// Sends one raw command (inline protocol) and returns the raw reply.
    pub fn raw(&self, command: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        s.write_all(format!("{command}\r\n").as_bytes()).expect("write");
        let mut buf = vec![0u8; 1 << 16];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An `etcd` member (or a cluster of them) on free loopback ports, each in its own temp dir.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    /// With [`EtcdCluster::start_meshed`]: each member in a namespace of its own, so that the
    /// links between members can be cut.
    mesh: Option<netns::Mesh>,
}

struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster and waits until every client port answers.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, None)
    }

    /// Starts `n` members each in a network namespace of its own (see [`netns`]), their client
    /// ports reached through loopback forwarders: [`EtcdCluster::cut`] then cuts the link between
    /// two members while clients still reach both. Needs root.
    pub fn start_meshed(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, Some(netns::Mesh::new(n)))
    }

    fn start_with(n: usize, mesh: Option<netns::Mesh>) -> EtcdCluster {
        let bin = require_binary("etcd", "etcd-server");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: mesh.as_ref().map_or_else(free_port, |m| m.client_port(i)),
                peer_port: if mesh.is_some() { netns::PEER_PORT } else { free_port() },
                dir: tempfile::tempdir().expect("temp dir"),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { members, mesh };
        for i in 0..n {
            cluster.spawn(i, &bin, "new");
        }
        cluster.wait_ready();
        cluster
    }

    /// Member `i`'s peer URL.
    fn peer_url(&self, i: usize) -> String {
        match &self.mesh {
            Some(_) => format!("http://{}:{}", netns::Mesh::peer_ip(i), netns::PEER_PORT),
            None => format!("http://127.0.0.1:{}", self.members[i].peer_port),
        }
    }

    fn initial_cluster(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("{}={}", self.members[i].name, self.peer_url(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, bin: &PathBuf, state: &str) {
        let initial = self.initial_cluster();
        let peer = self.peer_url(i);
        let (mut command, client) = match &self.mesh {
            Some(mesh) => {
                (mesh.command(i, bin), format!("http://{}:{}", mesh.client_ip(i), netns::CLIENT_PORT))
            }
            None => (Command::new(bin), format!("http://127.0.0.1:{}", self.members[i].client_port)),
        };
        let m = &mut self.members[i];
        let child = command
            .args(["--name", &m.name, "--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "distlock-test", "--log-level", "error"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .arg("--data-dir")
            .arg(m.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        for (i, m) in self.members.iter().enumerate() {
            // The member's own address: a forwarder in front of it answers at once.
            let addr = match &self.mesh {
                Some(mesh) => std::net::SocketAddr::from((mesh.client_ip(i), netns::CLIENT_PORT)),
                None => std::net::SocketAddr::from(([127, 0, 0, 1], m.client_port)),
            };
            while TcpStream::connect(addr).is_err() {
                assert!(start.elapsed() < Duration::from_secs(20), "etcd {} did not start", m.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `etcd://` URL naming every member.
    pub fn url(&self) -> String {
        let hosts: Vec<String> =
            self.members.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// Client ports of the members, in order.
    pub fn client_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.client_port).collect()
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data directory (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let bin = require_binary("etcd", "etcd-server");
        self.spawn(i, &bin, "new");
        self.wait_ready();
    }

    /// Process id of member `i`, while running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Cuts the link between members `i` and `j` (a cluster from [`EtcdCluster::start_meshed`]).
    pub fn cut(&self, i: usize, j: usize) {
        self.mesh.as_ref().expect("cuts need a cluster started meshed").cut(i, j);
    }

    /// Restores every link between members.
    pub fn heal_all(&self) {
        if let Some(mesh) = &self.mesh {
            mesh.heal_all();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // The namespaces go after their members (`mesh` is dropped after this).
    }
}

/// Writes a test CA (`ca.pem`, `ca.key`), a server certificate for 127.0.0.1 (`server.pem`,
/// `server.key`) and a client certificate (`client.pem`, `client.key`), both signed by the CA,
/// into `dir`, with the `openssl` command.
pub fn make_certs(dir: &std::path::Path) {
    let openssl = require_binary("openssl", "openssl");
    let sh = |args: &[&str]| {
        let ok = Command::new(&openssl)
            .current_dir(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(ok.success(), "openssl {args:?}");
    };
    let days = ["-days", "1"];
    sh(&[
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem"][..],
        &days,
        &["-subj", "/CN=distlock-test-ca"],
    ]
    .concat());
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext.cnf");
    for name in ["server", "client"] {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        sh(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ]);
        sh(&[
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
            ][..],
            &days,
            &["-extfile", "ext.cnf"],
        ]
        .concat());
    }
}
