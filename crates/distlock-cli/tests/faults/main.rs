//! A Jepsen-style safety suite: client processes loop acquire → write → hold → write → release
//! against one backend while a nemesis injects faults, and checkers go over the merged history
//! (see `check.rs`). Runs under `cargo test` with the short profile (one fault per case, fixed
//! seed); by hand with longer runs:
//!
//! ```text
//! cargo test --release -p distlock-cli --test faults -- --duration 10m [--only etcd] [--seed 7]
//! cargo test --release -p distlock-cli --test faults -- --big --only "8 keys" --duration 1h
//! cargo test --release -p distlock-cli --test faults -- --recheck /tmp/.tmpXXXX --ttl 2s [--key 3]
//! ```
//!
//! `--big` runs the big, mixed cases instead (10 clients over 8 keys, faults of every kind the
//! store promises to survive drawn at random), which no other profile runs. A failed case keeps
//! its clients' histories ("histories kept in DIR"; `--keep`: every case's); `--recheck DIR`
//! runs the checks on them again (with the TTL and limit the case wrote in `case.json`;
//! `--ttl`, `--limit` for older runs), without the fenced resource's log.
//!
//! Prints a table (also written to `target/faults-report.md`) and fails when a case whose backend
//! promises safety under that fault shows an overlap, a stale write accepted, the current holder
//! refused, tokens out of order, an acknowledged lease lost, a history no order of operations
//! explains (linearizability), or no recovery within 2 TTLs.

mod check;
mod client;
mod clock;
#[path = "../common/mod.rs"]
mod common;
mod fence;
mod history;
mod proxy;
mod stores;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use check::Findings;
use fence::FencedResource;
use history::now_ns;
use proxy::{Mode, Proxy};
use stores::{pause_process, Kind, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nemesis {
    /// SIGSTOP the current holder for 2.5 TTLs, then SIGCONT.
    PauseHolder,
    /// `kill -9` the store (the etcd leader; the first Redlock master) and start it again.
    KillStore,
    /// Cut the current holder off from the store through its proxies: requests vanish, then (in
    /// longer runs) connections reset, then everything arrives a TTL late.
    Partition,
    /// SIGSTOP the store (the etcd leader) for 2.5 TTLs.
    PauseStore,
    /// `kill -9` the lock server the current holder talks to (of several in front of one store),
    /// and start it again a TTL later: its clients go on through another.
    KillServer,
    /// `SENTINEL FAILOVER`: the replica is promoted, the master demoted to its replica.
    Failover,
    /// The store's wall clock jumps every TTL/4 to ±2^k ms off the real one (k in 2..=18,
    /// drawn each time), then back (see `clock.rs`).
    ClockJump,
    /// The store's wall clock flips between the real one and 2^k ms ahead (k drawn per fault)
    /// every 10 ms.
    ClockStrobe,
    /// Redlock: cuts between clients and some masters through the clients' per-master proxies,
    /// in turn: the holder from a minority of masters, the holder from a majority, and a bridge
    /// (even clients cut from the last ⌊(N−1)/2⌋ masters, odd ones from the first: the two sides
    /// share the middle master and each still reaches a majority).
    Cut,
    /// etcd: cuts links between members (each in a network namespace of its own) while every
    /// client still reaches every member, in turn: the leader from all its peers, the leader and
    /// one peer from the others, and a bridge (one member linked to both sides, the leader on
    /// one; each side with the bridge a majority).
    PeerCut,
    /// Each fault drawn from the store's list (`Kind::mixed`): pauses, kills, partitions, cuts
    /// and clock jumps in one run.
    Mixed,
}

impl Nemesis {
    fn name(self) -> &'static str {
        match self {
            Nemesis::PauseHolder => "pause holder (SIGSTOP > TTL)",
            Nemesis::KillStore => "kill -9 + restart store",
            Nemesis::Partition => "partition holder from store",
            Nemesis::PauseStore => "pause store (SIGSTOP > TTL)",
            Nemesis::KillServer => "kill -9 + restart the holder's server",
            Nemesis::Failover => "forced failover (SENTINEL FAILOVER)",
            Nemesis::ClockJump => "wall clock jumps (±2^2..2^18 ms)",
            Nemesis::ClockStrobe => "wall clock strobe (0 / +2^k ms, 10 ms)",
            Nemesis::Cut => "cut from masters (minority / majority / bridge)",
            Nemesis::PeerCut => "cuts between members (leader alone / minority / bridge)",
            Nemesis::Mixed => "mixed",
        }
    }

    /// Whether it needs the etcd members in network namespaces of their own.
    fn cuts_peers(self, kind: Kind) -> bool {
        match self {
            Nemesis::PeerCut => true,
            Nemesis::Mixed => kind.mixed().contains(&Nemesis::PeerCut),
            _ => false,
        }
    }

    /// Whether it runs the store under a fake clock.
    fn moves_clock(self, kind: Kind) -> bool {
        match self {
            Nemesis::ClockJump | Nemesis::ClockStrobe => true,
            Nemesis::Mixed => kind.mixed().contains(&Nemesis::ClockJump),
            _ => false,
        }
    }
}

impl Kind {
    /// The faults a mixed run of this store draws from: every one it promises to be safe under.
    fn mixed(self) -> Vec<Nemesis> {
        use Nemesis::*;
        match self {
            Kind::Server => vec![PauseHolder, KillStore, Partition, PauseStore, ClockJump, ClockStrobe],
            Kind::Redis => vec![PauseHolder, Partition, PauseStore],
            Kind::Redlock(_) => vec![PauseHolder, Partition, Cut],
            Kind::Etcd(_) if etcd_revokes_only_as_leader() => {
                vec![PauseHolder, KillStore, Partition, PeerCut, PauseStore]
            }
            Kind::Etcd(_) => vec![PauseHolder, KillStore, Partition, PeerCut],
            Kind::ServersOverEtcd(_) => vec![PauseHolder, KillServer, KillStore, Partition],
            _ => vec![PauseHolder],
        }
    }
}

struct Case {
    kind: Kind,
    nemesis: Nemesis,
    /// Whether the backend promises mutual exclusion and fencing under this fault.
    promised: bool,
    /// What the clients take: `lock`, `semaphore:N` or `election` (see `client.rs`).
    primitive: &'static str,
    /// A big run: at least [`BIG_CLIENTS`] clients over [`BIG_KEYS`] keys; by hand only (`--big`
    /// or `--only`).
    big: bool,
}

/// Clients and keys of a big run (issue 22 §5).
const BIG_CLIENTS: u32 = 10;
const BIG_KEYS: u32 = 8;

/// The primitives the clients can take.
const LOCK: &str = "lock";
const SEMAPHORE: &str = "semaphore:2";
const ELECTION: &str = "election";

impl Case {
    /// Permits per key: N for a semaphore, else 1.
    fn limit(&self) -> u32 {
        self.primitive.strip_prefix("semaphore:").and_then(|n| n.parse().ok()).unwrap_or(1)
    }

    /// The backend column of the report: the store, and the primitive unless a lock.
    fn label(&self) -> String {
        let label = match self.primitive {
            LOCK => self.kind.name(),
            SEMAPHORE => format!("{}, semaphore N={}", self.kind.name(), self.limit()),
            other => format!("{}, {other}", self.kind.name()),
        };
        match self.big {
            true => format!("{label}, {BIG_KEYS} keys"),
            false => label,
        }
    }

    /// Client processes and keys: the settings', or a big run's.
    fn scale(&self, s: &Settings) -> (u32, u32) {
        match self.big {
            true => (s.clients.max(BIG_CLIENTS), BIG_KEYS),
            false => (s.clients, 1),
        }
    }

    /// Whether the backend promises to serve every waiter soon after a fault heals: not Redlock,
    /// whose waiters race (no queue across independent masters).
    fn fair(&self) -> bool {
        !matches!(self.kind, Kind::Redlock(_) | Kind::Broken)
    }

    /// Whether `cargo test` runs it (the short profile). A Sentinel group is whole again only
    /// when Sentinel has turned the old master into a replica and it has resynced (see
    /// `Kind::settle`), so each such case costs about 50 s: the short profile keeps the harsher
    /// one (the master killed), the forced failover runs with `--duration` or `--only`.
    fn in_short_profile(&self) -> bool {
        let long_failover = self.kind == Kind::Sentinel && self.nemesis == Nemesis::Failover;
        !long_failover && !self.big
    }
}

fn cases() -> Vec<Case> {
    use Nemesis::*;
    let all = [PauseHolder, KillStore, Partition, PauseStore];
    // First, proof that the checkers catch a lock that excludes nobody.
    let mut v =
        vec![Case { kind: Kind::Broken, nemesis: PauseHolder, promised: false, primitive: LOCK, big: false }];
    for n in all {
        v.push(Case { kind: Kind::Server, nemesis: n, promised: true, primitive: LOCK, big: false });
    }
    // A semaphore of 2 (never more than 2 entitled at once) and a leader election (only the
    // current leader's writes accepted), with holders paused past their TTL and the store killed.
    for primitive in [SEMAPHORE, ELECTION] {
        for n in [PauseHolder, KillStore] {
            v.push(Case { kind: Kind::Server, nemesis: n, promised: true, primitive, big: false });
        }
    }
    for n in all {
        // A Redis without persistence forgets every lock and fencing counter when it restarts.
        v.push(Case { kind: Kind::Redis, nemesis: n, promised: n != KillStore, primitive: LOCK, big: false });
    }
    // The same primitives over Redis (holders paused past their TTL) and over etcd (its leader
    // killed under them): no backend offers them with weaker promises than a lock's.
    for primitive in [SEMAPHORE, ELECTION] {
        v.push(Case { kind: Kind::Redis, nemesis: PauseHolder, promised: true, primitive, big: false });
        v.push(Case { kind: Kind::Etcd(3), nemesis: KillStore, promised: true, primitive, big: false });
    }
    for n in [PauseHolder, Partition] {
        v.push(Case { kind: Kind::Redlock(3), nemesis: n, promised: true, primitive: LOCK, big: false });
    }
    // A master restarted empty at once is outside Redlock's assumptions (delayed restarts).
    v.push(Case { kind: Kind::Redlock(3), nemesis: KillStore, promised: false, primitive: LOCK, big: false });
    v.push(Case { kind: Kind::Redlock(5), nemesis: KillStore, promised: false, primitive: LOCK, big: false });
    // With min_replicas=1 every acknowledged grant is on the replica before the answer, so a
    // failover (asked for, or after the master's kill -9) forgets none.
    for n in [Failover, KillStore] {
        v.push(Case { kind: Kind::Sentinel, nemesis: n, promised: true, primitive: LOCK, big: false });
    }
    // A Cluster master that dies fails over to its asynchronously replicated replica, which can
    // miss the latest grants: as documented, not promised. With min_replicas=1 every
    // acknowledged grant and renewal is on the replica first, as behind Sentinel: promised.
    v.push(Case { kind: Kind::Cluster(0), nemesis: KillStore, promised: false, primitive: LOCK, big: false });
    v.push(Case { kind: Kind::Cluster(1), nemesis: KillStore, promised: true, primitive: LOCK, big: false });
    for n in all {
        // A leader paused past the TTLs: etcd before 3.4.28 / 3.5.11 revokes leases on resume
        // that the new leader kept alive (etcd-io/etcd#15247, fixed by #16822), freeing locks
        // early. Promised only on an etcd with the fix.
        let promised = n != PauseStore || etcd_revokes_only_as_leader();
        v.push(Case { kind: Kind::Etcd(3), nemesis: n, promised, primitive: LOCK, big: false });
    }
    // Wall-clock jumps and strobes on the store: the server counts deadlines on the monotonic
    // clock and promises safety; Redis expires keys by its wall clock, so a jump ahead frees a
    // lock early (what breaks, and how often, is the row's finding).
    for n in [ClockJump, ClockStrobe] {
        v.push(Case { kind: Kind::Server, nemesis: n, promised: true, primitive: LOCK, big: false });
        v.push(Case { kind: Kind::Redis, nemesis: n, promised: false, primitive: LOCK, big: false });
    }
    // Stateless servers in front of etcd: losing one, or the etcd leader, loses no lock.
    for n in [KillServer, KillStore] {
        v.push(Case {
            kind: Kind::ServersOverEtcd(3),
            nemesis: n,
            promised: true,
            primitive: LOCK,
            big: false,
        });
    }
    // Five etcd members cut from one another (the leader alone, a minority, a bridge) while
    // clients still reach them all: only a majority commits, so no lock is lost or doubled.
    v.push(Case { kind: Kind::Etcd(5), nemesis: PeerCut, promised: true, primitive: LOCK, big: false });
    // Five Redlock masters, clients cut from a minority, a majority, or bridged across them.
    v.push(Case { kind: Kind::Redlock(5), nemesis: Cut, promised: true, primitive: LOCK, big: false });
    // Big and mixed (by hand: `--big`): 10 clients over 8 keys, every fault the store promises
    // to survive drawn at random, on 5 etcd members and 5 Redlock masters among others.
    for kind in [Kind::Server, Kind::Redis, Kind::Redlock(5), Kind::Etcd(5), Kind::ServersOverEtcd(3)] {
        v.push(Case { kind, nemesis: Mixed, promised: true, primitive: LOCK, big: true });
    }
    v
}

/// Whether the `etcd` on the PATH has the fix for etcd-io/etcd#15247 (a leader that was paused or
/// stuck past lease TTLs revokes them on resume although a new leader kept them alive): 3.4.28,
/// 3.5.11, or later.
fn etcd_revokes_only_as_leader() -> bool {
    let out = Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let version = out.ok().and_then(|o| {
        let v = o.lines().next()?.rsplit(' ').next()?.to_owned();
        let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    });
    matches!(version, Some((3, 4, p)) if p >= 28)
        || matches!(version, Some((3, 5, p)) if p >= 11)
        || matches!(version, Some((3, m, _)) if m >= 6)
        || matches!(version, Some((major, _, _)) if major > 3)
}

struct Settings {
    duration: Option<Duration>,
    only: Option<String>,
    seed: u64,
    clients: u32,
    /// Run the big cases too.
    big: bool,
    /// Only check the histories kept in this directory (`--recheck DIR`), with `ttl` and `limit`.
    recheck: Option<std::path::PathBuf>,
    /// The TTL the kept run's clients used (`--ttl`, default 1s).
    ttl: Duration,
    /// The kept run's key limit (`--limit`: 1 for a lock, N for a semaphore).
    limit: u32,
    /// Recheck only this key (`--key N`).
    key: Option<u32>,
    /// Keep every case's histories, passed or not (`--keep`), for `--recheck` later.
    keep: bool,
}

fn settings() -> Settings {
    let mut s = Settings {
        duration: None,
        only: None,
        seed: 1,
        clients: 3,
        big: false,
        recheck: None,
        ttl: Duration::from_secs(1),
        limit: 1,
        keep: false,
        key: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--duration" => s.duration = args.next().and_then(|d| humantime::parse_duration(&d).ok()),
            "--only" => s.only = args.next(),
            "--seed" => s.seed = args.next().and_then(|d| d.parse().ok()).unwrap_or(1),
            "--clients" => s.clients = args.next().and_then(|d| d.parse().ok()).unwrap_or(3),
            "--big" => s.big = true,
            "--keep" => s.keep = true,
            "--key" => s.key = args.next().and_then(|k| k.parse().ok()),
            "--recheck" => s.recheck = args.next().map(Into::into),
            "--ttl" => s.ttl = args.next().and_then(|d| humantime::parse_duration(&d).ok()).unwrap_or(s.ttl),
            "--limit" => s.limit = args.next().and_then(|d| d.parse().ok()).unwrap_or(1),
            _ => {} // cargo test's own flags
        }
    }
    s
}

struct Row {
    backend: String,
    nemesis: &'static str,
    promised: bool,
    fair: bool,
    faults: u32,
    findings: Findings,
}

impl Row {
    fn live(&self) -> bool {
        self.findings.live
    }

    fn passed(&self) -> bool {
        (!self.promised || self.findings.safe()) && (!self.fair || self.live())
    }
}

struct ClientSpec<'a> {
    url: String,
    primitive: &'a str,
    key: &'a str,
    keys: u32,
    clients: u32,
    ttl: Duration,
    dir: &'a std::path::Path,
    fence: &'a str,
    until: i64,
    seed: u64,
}

fn spawn_client(c: u32, spec: &ClientSpec) -> Child {
    let ClientSpec { url, primitive, key, keys, clients, ttl, dir, fence, until, seed } = spec;
    Command::new(std::env::current_exe().expect("own path"))
        .env("FAULTS_CLIENT", c.to_string())
        .env("FAULTS_BACKEND", url)
        .env("FAULTS_KEY", key)
        .env("FAULTS_PRIMITIVE", primitive)
        .env("FAULTS_TTL_MS", ttl.as_millis().to_string())
        .env("FAULTS_WAIT_MS", check::all_served_within(*ttl, *clients).as_millis().to_string())
        .env("FAULTS_HOLD_MS", "50")
        .env("FAULTS_SEED", seed.to_string())
        .env("FAULTS_UNTIL_NS", until.to_string())
        .env("FAULTS_FENCE", fence)
        .env("FAULTS_KEYS", keys.to_string())
        .env("FAULTS_HISTORY_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join(format!("client-{c}.err")))
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn()
        .expect("spawn a client process")
}

async fn run_case(case: &Case, s: &Settings, rng: &mut rand::rngs::StdRng) -> Row {
    let ttl = case.kind.ttl();
    let fault_len = ttl * 5 / 2;
    // Long enough for every client to be served after the heal: 2 TTLs plus the long critical
    // sections of the clients queued ahead.
    let quiet = ttl * 5;
    let strike_wait = Duration::from_secs(2);
    let warmup = Duration::from_millis(1500);
    // A store that takes a while to be whole again after a fault (a failover to complete, the
    // old master to come back as a replica) needs that much more room before the quiet.
    let settle = case.kind.settle();
    let duration =
        s.duration.unwrap_or(warmup + strike_wait + fault_len + settle + quiet + Duration::from_millis(500));
    let (n_clients, keys) = case.scale(s);
    let clock = case.nemesis.moves_clock(case.kind).then(clock::FakeClock::new);
    let meshed = case.nemesis.cuts_peers(case.kind);
    let mut store = tokio::task::block_in_place(|| Store::start(case.kind, clock.as_ref(), meshed));
    let fence = FencedResource::start().await;
    let ports = store.ports();
    let mut proxies = Vec::new();
    for _ in 0..n_clients {
        let mut mine = Vec::new();
        for &p in &ports {
            mine.push(Proxy::start(p).await);
        }
        proxies.push(mine);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let start = now_ns();
    let until = start + duration.as_nanos() as i64;
    let key = "faults/the-lock";
    let mut clients: Vec<Child> = (0..n_clients)
        .map(|c| {
            let url = store.url(c, &proxies[c as usize].iter().map(|p| p.port).collect::<Vec<_>>());
            spawn_client(
                c,
                &ClientSpec {
                    url,
                    primitive: case.primitive,
                    key,
                    keys,
                    clients: n_clients,
                    ttl,
                    dir: dir.path(),
                    fence: &fence.addr,
                    until,
                    seed: s.seed,
                },
            )
        })
        .collect();

    tokio::time::sleep(warmup + Duration::from_millis(rng.random_range(0..300))).await;
    let mut heal = None;
    let mut faults = 0;
    let left = |now: i64| Duration::from_nanos((until - now).max(0) as u64);
    while left(now_ns()) >= strike_wait + fault_len + settle + quiet {
        faults += 1;
        // Strike while a holder is inside a long critical section, if one comes along soon.
        let since = std::time::Instant::now();
        let holder = loop {
            match fence.in_long_hold() {
                Some(c) => break c,
                None if since.elapsed() > strike_wait => break fence.last_writer().unwrap_or(0),
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        } as usize;
        let nemesis = match case.nemesis {
            Nemesis::Mixed => {
                let all = case.kind.mixed();
                let n = all[rng.random_range(0..all.len())];
                eprintln!("    fault {faults}: {}", n.name());
                n
            }
            n => n,
        };
        match nemesis {
            Nemesis::Mixed => {}
            Nemesis::Cut => {
                // Member m of client c's connections is proxies[c][m].
                let members = ports.len();
                let few = (members - 1) / 2;
                // In turn from the first fault: a bridge, a minority, a majority.
                let cut: Vec<(usize, std::ops::Range<usize>)> = match faults % 3 {
                    2 => vec![(holder, 0..few)],
                    0 => vec![(holder, 0..few + 1)],
                    _ => (0..proxies.len())
                        .map(|c| (c, if c % 2 == 0 { members - few..members } else { 0..few }))
                        .collect(),
                };
                for (c, range) in &cut {
                    proxies[*c][range.clone()].iter().for_each(|p| p.set(Mode::Blackhole));
                }
                tokio::time::sleep(fault_len).await;
                for (c, range) in &cut {
                    proxies[*c][range.clone()].iter().for_each(|p| p.set(Mode::Pass));
                }
            }
            Nemesis::PeerCut => {
                let leader = store.leader(key).await;
                let others: Vec<usize> = (0..store.etcd_members()).filter(|&m| m != leader).collect();
                // The two sides of the cut; every link between them goes.
                let (one, two): (Vec<usize>, Vec<usize>) = match faults % 3 {
                    1 => (vec![leader], others.clone()),
                    2 => (vec![leader, others[0]], others[1..].to_vec()),
                    _ => {
                        // others[0] is the bridge, on neither side.
                        let rest = &others[1..];
                        let half = rest.len().saturating_sub(1) / 2;
                        ([&[leader][..], &rest[..half]].concat(), rest[half..].to_vec())
                    }
                };
                let pairs: Vec<(usize, usize)> =
                    one.iter().flat_map(|&a| two.iter().map(move |&b| (a, b))).collect();
                eprintln!("    members cut: {one:?} from {two:?} (leader {leader})");
                store.cut_peers(&pairs);
                tokio::time::sleep(fault_len / 2).await;
                // Proof that the cut is real: a leader alone loses its office to the others (asked
                // a few times: a member that does not answer in time is not "another leader").
                let mut during = store.leader(key).await;
                for _ in 0..5 {
                    if faults % 3 != 1 || during != leader {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    during = store.leader(key).await;
                }
                eprintln!("    leader during the cut: {during}");
                assert!(
                    faults % 3 != 1 || during != leader,
                    "leader {leader} kept its office cut off from every peer"
                );
                tokio::time::sleep(fault_len / 2).await;
                store.heal_peers();
            }
            Nemesis::PauseHolder => {
                pause_process(clients[holder].id(), true);
                tokio::time::sleep(fault_len).await;
                pause_process(clients[holder].id(), false);
            }
            Nemesis::Partition => {
                // In turn: a half-open network (requests vanish), one that resets connections, and
                // one that delivers everything a TTL late.
                let mode = match faults % 3 {
                    1 => Mode::Blackhole,
                    2 => Mode::Drop,
                    _ => Mode::Delay(ttl),
                };
                proxies[holder].iter().for_each(|p| p.set(mode));
                tokio::time::sleep(fault_len).await;
                proxies[holder].iter().for_each(|p| p.set(Mode::Pass));
            }
            Nemesis::PauseStore => {
                let i = store.leader(key).await;
                store.pause(i, true);
                tokio::time::sleep(fault_len).await;
                store.pause(i, false);
            }
            Nemesis::KillStore => {
                let i = store.leader(key).await;
                store.kill(i);
                tokio::time::sleep(if case.kind.is_etcd() { ttl } else { ttl / 3 }).await;
                tokio::task::block_in_place(|| store.restart(i));
            }
            Nemesis::Failover => tokio::task::block_in_place(|| store.failover()),
            Nemesis::ClockJump | Nemesis::ClockStrobe => {
                let clock = clock.as_ref().expect("a clock nemesis starts the store under a clock");
                let end = std::time::Instant::now() + fault_len;
                let strobe = 1i64 << rng.random_range(2..=18);
                let mut ahead = false;
                let mut jumps = Vec::new();
                while std::time::Instant::now() < end {
                    if nemesis == Nemesis::ClockJump {
                        let ms = 1i64 << rng.random_range(2..=18);
                        let ms = if rng.random_bool(0.5) { ms } else { -ms };
                        clock.set(ms);
                        jumps.push(ms);
                        tokio::time::sleep(ttl / 4).await;
                    } else {
                        ahead = !ahead;
                        clock.set(if ahead { strobe } else { 0 });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                clock.set(0);
                match nemesis {
                    Nemesis::ClockJump => eprintln!("    clock offsets, ms: {jumps:?}, 0"),
                    _ => eprintln!("    clock strobe: 0 / +{strobe} ms"),
                }
            }
            Nemesis::KillServer => {
                // The server the holder's connections went to last.
                let used = proxies[holder].iter().map(|p| p.last_used());
                let i = used.enumerate().max_by_key(|&(_, t)| t).map_or(0, |(i, _)| i);
                store.kill_server(i);
                tokio::time::sleep(ttl).await;
                tokio::task::block_in_place(|| store.restart_server(i));
            }
        }
        heal = Some(now_ns());
        tokio::time::sleep(quiet + Duration::from_millis(rng.random_range(0..300))).await;
    }
    // Clients stop at `until` after their current cycle.
    let deadline = std::time::Instant::now() + left(now_ns()) + ttl * 6 + Duration::from_secs(5);
    for c in clients.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                _ if std::time::Instant::now() > deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    for c in 0..n_clients {
        let err = std::fs::read_to_string(dir.path().join(format!("client-{c}.err"))).unwrap_or_default();
        if !err.trim().is_empty() {
            eprintln!("client {c} stderr:\n{err}");
        }
    }
    let ttl_ns = ttl.as_nanos() as i64;
    let judged = fence.log();
    let mut findings: Option<check::Findings> = None;
    let mut per_key = Vec::new();
    for i in 0..keys {
        let paths: Vec<_> = (0..n_clients).map(|c| history::history_path(dir.path(), c, i, keys)).collect();
        let events = history::load(&paths);
        let name = history::key_name(key, i, keys);
        let judged: Vec<_> = judged.iter().filter(|j| j.key == name).cloned().collect();
        let found = check::check(&events, &judged, ttl_ns, case.limit());
        match findings.as_mut() {
            Some(f) => f.merge(found),
            None => findings = Some(found),
        }
        per_key.push(events);
    }
    let mut findings = findings.unwrap_or_default();
    check::liveness(&mut findings, &per_key, heal, ttl, n_clients);
    let row = Row {
        backend: case.label(),
        nemesis: case.nemesis.name(),
        promised: case.promised,
        fair: case.fair(),
        faults,
        findings,
    };
    if !row.passed() || s.keep {
        // Kept for a look at what happened: the clients' histories (one JSON event per line).
        let kept = dir.keep();
        // What `--recheck` needs to judge them alike, so it needs no flags.
        let meta = serde_json::json!({ "case": format!("{} / {}", case.label(), case.nemesis.name()), "ttl_ms": ttl.as_millis() as u64, "limit": case.limit() });
        if let Err(e) = std::fs::write(kept.join("case.json"), meta.to_string()) {
            eprintln!("    cannot write case.json: {e}");
        }
        eprintln!("    histories kept in {}", kept.display());
    }
    row
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| backend | nemesis | safety promised | faults | grants | overlaps | stale writes refused | \
         stale writes accepted | current holder refused | token order violations | acked leases lost | \
         linearizable (ops) | longest unavailable ms | after heal: first grant / all clients ms | result |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let f = &r.findings;
        let safety = match (f.safe(), r.promised) {
            (true, _) => "safe",
            (false, true) => "**UNSAFE: FAILED**",
            (false, false) => "unsafe (as documented)",
        };
        let liveness = match (r.live(), r.fair) {
            (true, _) => "",
            (false, true) => ", **LIVENESS FAILED**",
            (false, false) => ", slow recovery (not fair)",
        };
        let ms = |v: Option<f64>| v.map_or("never".into(), |v| format!("{v:.0}"));
        let lin = match f.linearizable {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "undecided",
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {lin} ({}) | {:.0} | {} / {} | {safety}{liveness} |\n",
            r.backend,
            r.nemesis,
            if r.promised { "yes" } else { "no" },
            r.faults,
            f.grants,
            f.overlaps,
            f.stale_refused,
            match f.stale_raced {
                0 => f.stale_accepted.to_string(),
                n => format!("{} (+{n} raced)", f.stale_accepted),
            },
            f.current_refused,
            f.token_violations,
            f.acked_lost,
            f.lin_ops,
            f.longest_unavailable_ms,
            ms(f.first_grant_after_heal_ms),
            ms(f.recovery_ms),
        ));
    }
    t
}

/// Checks the histories a failed case kept (`histories kept in DIR`) again, key by key, without
/// the fenced resource's log (so no stale-write counts): for work on the checkers, and for a run
/// stopped before its report. Prints each key's findings and how long its linearizability check
/// took.
fn recheck(dir: &std::path::Path, ttl: Duration, limit: u32, only_key: Option<u32>) {
    // The case's own TTL and limit, when the run wrote them (runs since `case.json`).
    let meta: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("case.json")).ok().and_then(|m| serde_json::from_str(&m).ok());
    let ttl = meta.as_ref().and_then(|m| m["ttl_ms"].as_u64()).map_or(ttl, Duration::from_millis);
    let limit = meta.as_ref().and_then(|m| m["limit"].as_u64()).map_or(limit, |l| l as u32);
    if let Some(case) = meta.as_ref().and_then(|m| m["case"].as_str()) {
        println!("{case}: TTL {ttl:?}, limit {limit}");
    }
    let Ok(entries) = std::fs::read_dir(dir) else { panic!("cannot read {}", dir.display()) };
    let names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let number = |n: &str, tag: &str| -> Option<u32> { n.split(tag).nth(1)?.split('.').next()?.parse().ok() };
    let clients = names.iter().filter_map(|n| number(n, "client-")).max().map_or(0, |c| c + 1);
    let keys = names.iter().filter_map(|n| number(n, "key-")).max().map_or(1, |k| k + 1);
    for i in (0..keys).filter(|i| only_key.is_none_or(|k| k == *i)) {
        let paths: Vec<_> = (0..clients).map(|c| history::history_path(dir, c, i, keys)).collect();
        let events = history::load(&paths);
        let started = std::time::Instant::now();
        let f = check::check(&events, &[], ttl.as_nanos() as i64, limit);
        let verdict = match f.linearizable {
            Some(true) => "yes",
            Some(false) => "no",
            None => "undecided (budget spent; FAULTS_LIN_BUDGET raises it)",
        };
        println!(
            "key {i}: {} events, {} grants, {} overlaps, {} token order violations, {} acked leases \
             lost, longest unavailable {:.0} ms, {} ops, linearizable: {verdict} in {:.2?}",
            events.len(),
            f.grants,
            f.overlaps,
            f.token_violations,
            f.acked_lost,
            f.longest_unavailable_ms,
            f.lin_ops,
            started.elapsed()
        );
        for e in &f.examples {
            println!("    {e}");
        }
    }
}

fn main() {
    if std::env::var_os("FAULTS_CLIENT").is_some() {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(client::main());
        return;
    }
    let s = settings();
    if let Some(dir) = &s.recheck {
        recheck(dir, s.ttl, s.limit, s.key);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let mut rows = Vec::new();
    for case in cases() {
        let label = format!("{} / {}", case.label(), case.nemesis.name());
        if s.only.as_ref().is_some_and(|o| !label.contains(o.as_str())) {
            continue;
        }
        // `--big` runs the big cases (with or without `--only`, `--duration`) and only them; the
        // others outside the short profile run with `--only` or `--duration`.
        if case.big != s.big {
            continue;
        }
        if s.duration.is_none() && s.only.is_none() && !case.in_short_profile() && !case.big {
            continue;
        }
        eprintln!("faults: {label} ...");
        let row = rt.block_on(run_case(&case, &s, &mut rng));
        for e in &row.findings.examples {
            eprintln!("    {e}");
        }
        rows.push(row);
    }
    let report = table(&rows);
    println!("{report}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../faults-report.md");
    let _ = std::fs::write(&path, &report);
    // Each failed case with its findings: CI keeps only the tail of the output, where the
    // table's row and the examples printed during the run may already be cut off.
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| {
            let f = &r.findings;
            format!("{} / {}: safe {}, live {}; {f:?}", r.backend, r.nemesis, f.safe(), f.live)
        })
        .collect();
    assert!(failed.is_empty(), "safety or liveness broken where promised:\n{}", failed.join("\n"));
    for r in rows.iter().filter(|r| r.backend == Kind::Broken.name()) {
        let f = &r.findings;
        assert!(
            f.overlaps > 0 && f.token_violations > 0 && f.stale_accepted > 0 && f.linearizable == Some(false),
            "the checkers missed a lock that excludes nobody: {f:?}"
        );
    }
}
