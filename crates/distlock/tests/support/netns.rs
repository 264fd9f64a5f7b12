//! Network namespaces joined pairwise by veth links, so that the links between the members of a
//! cluster can be cut one by one while the test still reaches every member. On loopback that
//! cannot be done: etcd members dial their peers from 127.0.0.1 whatever address they bind, so
//! no proxy or packet rule can tell one pair's traffic from another's. Here each member has a
//! namespace of its own with its own peer address, one link to each other member (a cut is a
//! blackhole route at both ends of that link: packets vanish, as in a real partition), and one
//! link to the test's namespace, where a forwarder on a loopback port stands for its client
//! address. Needs root and `ip` (iproute2).

use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// The port members listen on for clients, inside their namespaces.
pub const CLIENT_PORT: u16 = 2379;
/// The port members listen on for peers, inside their namespaces.
pub const PEER_PORT: u16 = 2380;

/// `n` namespaces linked pairwise; removed (with every link) on drop.
pub struct Mesh {
    tag: String,
    n: usize,
    /// Third octet of member 0's link to the test's namespace (see [`Mesh::client_ip`]).
    base: u32,
    forwarders: Vec<Forwarder>,
}

/// Meshes made by this process, so that two at once get different link addresses.
static MESHES: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`, panicking with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` ({e}); install it with: sudo apt-get install -y iproute2")
    });
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Mesh {
    /// Creates `n` (at most 6) namespaces, their links and the forwarders to their members'
    /// client ports.
    pub fn new(n: usize) -> Mesh {
        assert!((1..=6).contains(&n), "a mesh of 1 to 6 members, not {n}");
        let made = MESHES.fetch_add(1, Ordering::Relaxed);
        let tag = format!("dl{}x{made}", std::process::id() % 100_000);
        let base = (std::process::id() + made * 7) % 40 * 6;
        let mut mesh = Mesh { tag, n, base, forwarders: Vec::new() };
        for i in 0..n {
            let ns = mesh.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/32", Mesh::peer_ip(i)), "dev", "lo"]);
            // The link to the test's namespace, for clients.
            let outside = format!("{}c{i}", mesh.tag);
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["addr", "add", &format!("{}/30", mesh.host_ip(i)), "dev", &outside]);
            ip(&["link", "set", &outside, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/30", mesh.client_ip(i)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (Mesh::link(i, j), Mesh::link(j, i));
                let (nsa, nsb) = (mesh.ns(i), mesh.ns(j));
                ip(&["link", "add", &a, "netns", &nsa, "type", "veth", "peer", "name", &b, "netns", &nsb]);
                ip(&["-n", &nsa, "link", "set", &a, "up"]);
                ip(&["-n", &nsb, "link", "set", &b, "up"]);
                mesh.heal(i, j);
            }
        }
        mesh.forwarders = (0..n).map(|i| Forwarder::start((mesh.client_ip(i), CLIENT_PORT))).collect();
        mesh
    }

    /// Member `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}m{i}", self.tag)
    }

    /// Member `i`'s peer address (on its loopback, reached over the links).
    pub fn peer_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, 0, i as u8 + 1)
    }

    /// Member `i`'s client address (its end of the link to the test's namespace).
    pub fn client_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, (self.base + i as u32) as u8, 2)
    }

    fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, (self.base + i as u32) as u8, 1)
    }

    /// The name of member `i`'s end of its link to member `j`.
    fn link(i: usize, j: usize) -> String {
        format!("p{i}to{j}")
    }

    /// The loopback port in the test's namespace that reaches member `i`'s client port.
    pub fn client_port(&self, i: usize) -> u16 {
        self.forwarders[i].port
    }

    /// A command that runs `program` inside member `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Cuts the link between members `i` and `j`: what either sends the other vanishes.
    pub fn cut(&self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            ip(&["-n", &self.ns(a), "route", "replace", "blackhole", &format!("{}/32", Mesh::peer_ip(b))]);
        }
    }

    /// Restores the link between members `i` and `j`.
    pub fn heal(&self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            ip(&[
                "-n",
                &self.ns(a),
                "route",
                "replace",
                &format!("{}/32", Mesh::peer_ip(b)),
                "dev",
                &Mesh::link(a, b),
                "src",
                &Mesh::peer_ip(a).to_string(),
            ]);
        }
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        for i in 0..self.n {
            for j in i + 1..self.n {
                self.heal(i, j);
            }
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.forwarders.clear();
        for i in 0..self.n {
            // Deleting a namespace deletes the links that end in it.
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
    }
}

/// A loopback port in the test's namespace forwarding each connection to `to`.
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(to: (Ipv4Addr, u16)) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                std::thread::spawn(move || {
                    let Ok(member) = TcpStream::connect(to) else { return };
                    let _ = (client.set_nodelay(true), member.set_nodelay(true));
                    let (Ok(c2), Ok(m2)) = (client.try_clone(), member.try_clone()) else { return };
                    let up = std::thread::spawn(move || pipe(client, member));
                    pipe(m2, c2);
                    let _ = up.join();
                });
            }
        });
        Forwarder { port, stop }
    }
}

/// Copies `from` to `to` until either ends, then ends both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
