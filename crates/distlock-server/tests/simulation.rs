//! Deterministic simulation of the lease core (issue 22, section 2): many clients against the
//! server's engine and log (the embedded store on `wal::sim::SimDisk`, so a crash loses what was
//! not synced), over a simulated network that delays and drops messages, on tokio's paused clock
//! with one seeded random source. The same seed replays the same history exactly.
//!
//! Why our own driver rather than turmoil or madsim: the engine is already in-process and its only
//! I/O is the `Disk` trait (which `SimDisk` fills), time is `tokio::time` (which tokio pauses and
//! advances for us), and the network is ours to model as a queue of timed events — so a loop of
//! about the size of either crate's glue does the whole job, adds no dependency, and needs no
//! change to how the server is built (madsim replaces tokio at compile time; turmoil simulates
//! sockets the store never opens). The one thing neither would have spared us: the log's writer
//! is an OS thread, which a paused clock does not wait for; the driver waits for it
//! (`StoreStats::appends_pending`) before it moves the clock, and moves it in steps of at most
//! `QUANTUM_MS` so that the engine's timers fire close to their time.
//!
//! Modelled: clients that acquire (try-once and waiting) locks, semaphore permits (limit 2–3) and
//! shared or exclusive leases, renew (with a new TTL or the same), release, read status, pause
//! past their TTL and renew afterwards, and release leases whose grant they never heard of;
//! messages delayed 1–30 ms (so reordered) and dropped both ways (a dropped reply leaves the
//! client in doubt); the server's disk stalling its syncs, then the power failing (everything
//! unsynced lost, the in-flight changes unacknowledged), the server down a while and restarted on
//! what survived. Not modelled here (the power-loss suite covers them): torn writes, EIO/ENOSPC,
//! crashes inside one step of the log.
//!
//! Checks, from the clients' side: a client is entitled from its grant's answer to its deadline
//! (send time of the grant or last acknowledged renewal plus its TTL, shortened at once by a
//! renewal in flight with a shorter TTL) or until it sends its release; no more entitled holders
//! of a key than it allows (one writer, or readers; N permits); a lease entitled before another
//! on a lock has a lower token; tokens never repeat on a key and, after a restart, are above every
//! token answered before; a renewal that reaches the server before its holder's deadline is never
//! answered "lost" (no acknowledged lease lost by a crash); the locks' histories are linearizable
//! (`distlock_testkit::linearizable`).
//!
//! Two known behaviours are set aside rather than reported, and counted in the summary line: an
//! expired lease back after a restart (its expiry not yet logged; a lock key where it happens is
//! left out of the linearizability check for that seed), and answers that changed nothing (status
//! reads, refusals) served while the disk stalled before a power loss, which may have read a
//! change that was never made durable (left out of the histories). docs/RELIABILITY.md says why.
//!
//! `DISTLOCK_SIM_SEEDS=n` runs n seeds from `DISTLOCK_SIM_FIRST` (default 1; n defaults to
//! `DEFAULT_SEEDS`), `DISTLOCK_SIM_SEED=s` one seed, `DISTLOCK_SIM_TRACE=1` prints the histories.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use distlock::{AcquireRequest, Backend, Error, LeaseId, LockMode, Wait};
use distlock_server::store::{EmbeddedStore, Limits};
use distlock_server::wal::sim::{SimDisk, SimFile};
use distlock_server::wal::{Disk, DiskFile};
use distlock_testkit::linearizable::{self, AcquireOutcome, Event, Op, Outcome};

/// The longest the clock moves at once: the engine's expiries and wait timeouts fire at most this
/// late (a later expiry is always allowed; a client's deadline never depends on it).
const QUANTUM_MS: u64 = 5;
/// Simulated time a seed runs.
const RUN_MS: u64 = 10_000;
const CLIENTS: usize = 7;
/// Seeds a plain `cargo test` runs: about 30 s in debug on a loaded 2-core machine.
const DEFAULT_SEEDS: u64 = 250;
const MAX_DELAY_MS: u64 = 30;
/// How long a client waits for an answer beyond the wait it asked for.
const PATIENCE_MS: u64 = 2 * MAX_DELAY_MS + 40;
const TTLS_MS: [u64; 3] = [300, 600, 1000];

fn dir() -> &'static Path {
    Path::new("/sim/data")
}

/// splitmix64: small, fast, and the whole state is the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// A disk that can hold every sync until the power fails: the window in which the server has
/// applied changes to its table but not yet made them durable, made wide and deterministic (a
/// sync that simply ran on the writer thread would race the clock).
#[derive(Clone)]
struct StallDisk {
    inner: SimDisk,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool)>, // (stalled, dead)
    moved: Condvar,
}

impl Gate {
    fn pass(&self) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        while s.0 && !s.1 {
            s = self.moved.wait(s).unwrap();
        }
        if s.1 {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(())
    }

    fn set(&self, stalled: bool, dead: bool) {
        *self.state.lock().unwrap() = (stalled, dead);
        self.moved.notify_all();
    }
}

struct StallFile {
    inner: SimFile,
    gate: Arc<Gate>,
}

impl DiskFile for StallFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.gate.pass()?;
        self.inner.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.gate.pass()?;
        self.inner.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl StallDisk {
    fn wrap(&self, inner: SimFile) -> StallFile {
        StallFile { inner, gate: self.gate.clone() }
    }
}

impl Disk for StallDisk {
    type File = StallFile;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create_new(&self, path: &Path) -> io::Result<StallFile> {
        self.inner.create_new(path).map(|f| self.wrap(f))
    }
    fn create(&self, path: &Path) -> io::Result<StallFile> {
        self.inner.create(path).map(|f| self.wrap(f))
    }
    fn open_write(&self, path: &Path) -> io::Result<StallFile> {
        self.inner.open_write(path).map(|f| self.wrap(f))
    }
    fn preallocate(&self, path: &Path, size: u64, head: &[u8]) -> io::Result<StallFile> {
        self.gate.pass()?;
        self.inner.preallocate(path, size, head).map(|f| self.wrap(f))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.gate.pass()?;
        self.inner.sync_dir(dir)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lock,
    Semaphore(u32),
    ReadWrite,
}

#[derive(Debug, Clone)]
enum Req {
    Acquire { key: usize, lease: LeaseId, ttl: u64, wait: Option<u64>, shared: bool },
    Renew { key: usize, lease: LeaseId, ttl: Option<u64> },
    Release { key: usize, lease: LeaseId },
    Status { key: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Res {
    Granted { token: u64, ttl: u64 },
    Renewed { ttl: u64 },
    Released,
    Status(Option<u64>),
    Held,
    TimedOut,
    Lost,
    Failed(String),
}

#[derive(Debug)]
enum Ev {
    Wake(usize),
    Deliver { client: usize, op: u64, req: Req },
    Reply { client: usize, op: u64, res: Res, life: u32, received: u64 },
    GiveUp { client: usize, op: u64 },
    Stall,
    PowerLoss,
    Restart,
}

struct Outgoing {
    client: usize,
    op: u64,
    res: Res,
    life: u32,
    received: u64,
}

/// The client's request awaiting its answer.
struct Pending {
    op: u64,
    sent: u64,
    req: Req,
    /// The hold's deadline when the request was sent (renewals).
    deadline_at_send: Option<u64>,
    /// Index of its event in its key's history (locks).
    history: Option<usize>,
}

struct Hold {
    key: usize,
    lease: LeaseId,
    token: u64,
    /// The shortest TTL the server may hold for it (a renewal in doubt may have changed it).
    ttl_lo: u64,
    deadline: u64,
    /// Start of the current entitlement, `None` once lapsed.
    since: Option<u64>,
    shared: bool,
}

#[derive(Default)]
struct Client {
    pending: Option<Pending>,
    hold: Option<Hold>,
    /// Leases whose grant was never heard of.
    in_doubt: Vec<(usize, LeaseId)>,
}

struct Entitlement {
    key: usize,
    client: usize,
    token: u64,
    start: u64,
    end: u64,
    shared: bool,
}

struct Server {
    store: Arc<EmbeddedStore>,
    disk: StallDisk,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a seed did, for the totals.
#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    ops: u64,
    grants: u64,
    power_losses: u64,
    in_doubt: u64,
    renewed_after_lapse: u64,
    /// Expired leases back after a restart (their expiry never logged: the known issue).
    came_back: u64,
    /// Lock histories not checked for linearizability because of one.
    unchecked: u64,
    /// Answers that changed nothing, served in a stall before a power loss, left out of the
    /// lock histories.
    dirty_reads: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    keys: Vec<(&'static str, Kind)>,
    clients: Vec<Client>,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    now: u64,
    start: tokio::time::Instant,
    server: Option<Server>,
    life: u32,
    outbox: Arc<Mutex<Vec<Outgoing>>>,
    next_op: u64,
    trace: Vec<String>,
    entitlements: Vec<Entitlement>,
    /// Per key: (token, life that answered it).
    grants: Vec<Vec<(u64, u32, usize)>>,
    histories: Vec<Vec<Event>>,
    lease_index: HashMap<LeaseId, u32>,
    violations: Vec<String>,
    summary: Summary,
    /// The disk as the power loss left it, until the restart.
    survived: Option<SimDisk>,
    /// Per key, the tokens of the live leases just before the power loss (the server's view).
    before_loss: Vec<BTreeSet<u64>>,
    /// Leases whose release reached the server in its current life.
    released: BTreeSet<u32>,
    /// Per key, the lease of each token the server answered (the server's view, answer sent
    /// or not).
    token_lease: Arc<Mutex<BTreeMap<(usize, u64), LeaseId>>>,
    /// Where the disk stalled: (server life, when); each stall ends in a power loss.
    stalled: Vec<(u32, u64)>,
    /// Answers that changed nothing (status reads, refusals) in the lock histories: (key,
    /// index, server life, when the server received the request).
    reads: Vec<(usize, usize, u32, u64)>,
    /// Lock keys on which an expired lease came back after a restart (the known issue): their
    /// histories are not checked for linearizability.
    excused: BTreeSet<usize>,
}

fn ns(ms: u64) -> u64 {
    ms * 1_000_000
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let limit = rng.range(2, 3) as u32;
        let keys = vec![
            ("lock/a", Kind::Lock),
            ("lock/b", Kind::Lock),
            ("sem", Kind::Semaphore(limit)),
            ("rw", Kind::ReadWrite),
        ];
        let n = keys.len();
        Sim {
            seed,
            rng,
            keys,
            clients: (0..CLIENTS).map(|_| Client::default()).collect(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            now: 0,
            start: tokio::time::Instant::now(),
            server: None,
            life: 0,
            outbox: Arc::default(),
            next_op: 0,
            trace: Vec::new(),
            entitlements: Vec::new(),
            grants: vec![Vec::new(); n],
            histories: vec![Vec::new(); n],
            lease_index: HashMap::new(),
            violations: Vec::new(),
            summary: Summary::default(),
            survived: None,
            before_loss: vec![BTreeSet::new(); n],
            released: BTreeSet::new(),
            token_lease: Arc::default(),
            excused: BTreeSet::new(),
            stalled: Vec::new(),
            reads: Vec::new(),
        }
    }

    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(std::cmp::Reverse((time, self.seq)));
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("{:>6} {line}", self.now));
    }

    fn violation(&mut self, what: String) {
        self.log(format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    fn open(&mut self, disk: SimDisk) {
        let disk = StallDisk { inner: disk, gate: Arc::default() };
        let store = EmbeddedStore::open_on(disk.clone(), dir(), Limits::default(), 64 << 10)
            .unwrap_or_else(|e| panic!("seed {}: the store does not start: {e}", self.seed));
        self.life += 1;
        self.server = Some(Server { store: Arc::new(store), disk, tasks: Vec::new() });
        let life = self.life;
        self.log(format!("server life {life} up"));
    }

    /// Runs every task that can run, and waits for the log's writer to answer everything queued
    /// (unless the disk is stalled), so that nothing is left in flight when the clock moves.
    async fn settle(&mut self) {
        loop {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            let busy = match &self.server {
                Some(s) => !s.disk.gate.state.lock().unwrap().0 && s.store.stats().appends_pending > 0,
                None => false,
            };
            if busy {
                std::thread::yield_now();
                continue;
            }
            for _ in 0..2 {
                tokio::task::yield_now().await;
            }
            let busy = match &self.server {
                Some(s) => !s.disk.gate.state.lock().unwrap().0 && s.store.stats().appends_pending > 0,
                None => false,
            };
            if !busy {
                break;
            }
        }
        let mut out = std::mem::take(&mut *self.outbox.lock().unwrap());
        // Answers made at the same instant are pushed in whatever order the writer thread woke
        // their tasks: put them in one order before the random source assigns their delays.
        out.sort_by_key(|o| o.op);
        for o in out {
            if o.life != self.life || self.server.is_none() {
                continue; // answered by a server that has since lost power: never sent
            }
            if self.rng.percent(3) {
                self.log(format!("reply to c{} op {} dropped", o.client, o.op));
                continue;
            }
            let delay = self.rng.range(1, MAX_DELAY_MS);
            let time = self.now + delay;
            self.at(
                time,
                Ev::Reply { client: o.client, op: o.op, res: o.res, life: o.life, received: o.received },
            );
        }
    }

    async fn run(mut self) -> (Summary, Vec<String>, Vec<String>) {
        self.start = tokio::time::Instant::now();
        self.open(SimDisk::new());
        for c in 0..CLIENTS {
            let t = self.rng.range(0, 200);
            self.at(t, Ev::Wake(c));
        }
        let first = self.rng.range(500, 4000);
        self.at(first, Ev::Stall);
        loop {
            self.settle().await;
            let mut did = false;
            while let Some(&std::cmp::Reverse((time, seq))) = self.queue.peek() {
                if time > self.now {
                    break;
                }
                self.queue.pop();
                let ev = self.events.remove(&seq).expect("queued event");
                self.handle(ev);
                did = true;
            }
            if did {
                continue;
            }
            if self.now >= RUN_MS {
                break;
            }
            let next = self.queue.peek().map_or(u64::MAX, |r| r.0 .0);
            let to = next.min(self.now + QUANTUM_MS).min(RUN_MS);
            tokio::time::advance(Duration::from_millis(to - self.now)).await;
            self.now = to;
            // Nothing else moves the clock (the driver never waits on anything but the writer).
            assert_eq!(
                (tokio::time::Instant::now() - self.start).as_millis() as u64,
                to,
                "the clock moved by itself"
            );
        }
        self.finish();
        if let Some(server) = self.server.take() {
            server.disk.gate.set(false, true);
            for t in &server.tasks {
                t.abort();
            }
        }
        (self.summary, self.violations, self.trace)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(c) => self.wake(c),
            Ev::Deliver { client, op, req } => self.deliver(client, op, req),
            Ev::Reply { client, op, res, life, received } => self.reply(client, op, res, life, received),
            Ev::GiveUp { client, op } => self.give_up(client, op),
            Ev::Stall => {
                if let Some(s) = &self.server {
                    s.disk.gate.set(true, false);
                    self.stalled.push((self.life, self.now));
                    self.log("disk stalls".into());
                    let t = self.now + self.rng.range(0, 150);
                    self.at(t, Ev::PowerLoss);
                }
            }
            Ev::PowerLoss => self.power_loss(),
            Ev::Restart => {
                let survived = self.survived.take().expect("a disk to restart on");
                self.open(survived);
                self.came_back();
                let next = self.now + self.rng.range(1500, 6000);
                self.at(next, Ev::Stall);
            }
        }
    }
}

impl Sim {
    fn power_loss(&mut self) {
        let Some(server) = self.server.take() else { return };
        self.before_loss = self.live_tokens(&server.store);
        // What the disk holds at this instant; then the stalled syncs fail and the process is
        // gone: nothing it answers from now on reaches anyone.
        let survived = server.disk.inner.power_loss(None);
        server.disk.gate.set(false, true);
        for t in &server.tasks {
            t.abort();
        }
        drop(server);
        self.summary.power_losses += 1;
        self.survived = Some(survived);
        let down = self.rng.range(0, 400);
        self.log(format!("power lost; server down for {down} ms"));
        self.at(self.now + down, Ev::Restart);
    }

    /// Ends the client's entitlement once its deadline has passed.
    fn lapse(&mut self, c: usize) {
        let now = self.now;
        if let Some(h) = &mut self.clients[c].hold {
            if let Some(since) = h.since {
                if now >= h.deadline {
                    h.since = None;
                    let e = Entitlement {
                        key: h.key,
                        client: c,
                        token: h.token,
                        start: since,
                        end: h.deadline,
                        shared: h.shared,
                    };
                    self.entitlements.push(e);
                }
            }
        }
    }

    fn lease_index(&mut self, lease: &LeaseId) -> u32 {
        let n = self.lease_index.len() as u32;
        *self.lease_index.entry(lease.clone()).or_insert(n)
    }

    fn new_lease(&mut self) -> LeaseId {
        let id = format!("{:016x}{:016x}", self.rng.next(), self.rng.next());
        LeaseId::parse(&id).expect("hex is a valid lease id")
    }

    fn wake(&mut self, c: usize) {
        self.lapse(c);
        if self.clients[c].pending.is_some() {
            return; // its answer (or giving up on it) schedules what comes next
        }
        let now = self.now;
        if let Some(h) = &self.clients[c].hold {
            let (key, lease, lapsed, deadline) = (h.key, h.lease.clone(), h.since.is_none(), h.deadline);
            if lapsed {
                // Woke up after a pause past its deadline: tries to renew, as a client whose
                // renewal timer fires late does. An answer "renewed" entitles it again.
                self.send(c, Req::Renew { key, lease, ttl: None });
                return;
            }
            let r = self.rng.range(0, 99);
            if r < 15 {
                if let Some(h) = self.clients[c].hold.take() {
                    self.entitlements.push(Entitlement {
                        key: h.key,
                        client: c,
                        token: h.token,
                        start: h.since.unwrap_or(now),
                        end: now,
                        shared: h.shared,
                    });
                }
                self.send(c, Req::Release { key, lease });
            } else if r < 23 {
                let t = deadline + self.rng.range(0, 600);
                self.log(format!("c{c} pauses until {t}"));
                self.at(t, Ev::Wake(c));
            } else {
                let ttl = if self.rng.percent(40) { None } else { Some(self.rng.pick(&TTLS_MS)) };
                self.send(c, Req::Renew { key, lease, ttl });
            }
        } else if !self.clients[c].in_doubt.is_empty() && self.rng.percent(50) {
            let (key, lease) = self.clients[c].in_doubt.remove(0);
            self.send(c, Req::Release { key, lease });
        } else if self.rng.percent(10) {
            let key = self.rng.range(0, 1) as usize;
            self.send(c, Req::Status { key });
        } else {
            let key = self.rng.range(0, self.keys.len() as u64 - 1) as usize;
            let shared = self.keys[key].1 == Kind::ReadWrite && self.rng.percent(60);
            let wait = if self.rng.percent(50) { None } else { Some(self.rng.range(50, 1500)) };
            let ttl = self.rng.pick(&TTLS_MS);
            let lease = self.new_lease();
            self.send(c, Req::Acquire { key, lease, ttl, wait, shared });
        }
    }

    fn send(&mut self, c: usize, req: Req) {
        let (now, op) = (self.now, self.next_op);
        self.next_op += 1;
        self.summary.ops += 1;
        let mut deadline_at_send = None;
        let mut wait = 0;
        // The request's place in its key's history (locks only), answer unknown until it comes.
        let placeholder = match &req {
            Req::Acquire { lease, ttl, wait: w, .. } => {
                wait = w.unwrap_or(0);
                let lease = self.lease_index(lease);
                Some(Op::Acquire(AcquireOutcome::UnknownFor { lease, ttl: ns(*ttl) }))
            }
            Req::Renew { lease, ttl, .. } => {
                let h = self.clients[c].hold.as_mut().expect("renews only what it holds");
                let asked = ttl.unwrap_or(h.ttl_lo);
                if h.since.is_some() {
                    // Conservative: the renewal may take effect as soon as it is sent.
                    h.deadline = h.deadline.min(now + asked);
                    deadline_at_send = Some(h.deadline);
                }
                let lease = self.lease_index(lease);
                Some(Op::Renew { lease, ttl: ns(asked), outcome: Outcome::Unknown })
            }
            Req::Release { lease, .. } => {
                let lease = self.lease_index(lease);
                Some(Op::Release { lease, outcome: Outcome::Unknown })
            }
            Req::Status { .. } => None,
        };
        let key = req_key(&req);
        let history = match placeholder {
            Some(op) if self.keys[key].1 == Kind::Lock => {
                self.histories[key].push(Event { client: c as u32, call: ns(now), answer: u64::MAX, op });
                Some(self.histories[key].len() - 1)
            }
            _ => None,
        };
        let what = self.describe(&req);
        self.log(format!("c{c} op {op} sends {what}"));
        self.at(now + wait + PATIENCE_MS, Ev::GiveUp { client: c, op });
        if self.rng.percent(3) {
            self.log(format!("c{c} op {op} request dropped"));
        } else {
            let t = now + self.rng.range(1, MAX_DELAY_MS);
            self.at(t, Ev::Deliver { client: c, op, req: req.clone() });
        }
        self.clients[c].pending = Some(Pending { op, sent: now, req, deadline_at_send, history });
    }

    fn deliver(&mut self, client: usize, op: u64, req: Req) {
        if self.server.is_none() {
            self.log(format!("c{client} op {op} reaches a server that is down"));
            return;
        }
        if let Req::Release { lease, .. } = &req {
            let l = self.lease_index(lease);
            self.released.insert(l);
        }
        let server = self.server.as_mut().expect("checked");
        server.tasks.retain(|t| !t.is_finished());
        let store = server.store.clone();
        let outbox = self.outbox.clone();
        let (life, received) = (self.life, self.now);
        let key_index = req_key(&req);
        let (name, kind) = self.keys[key_index];
        let key = name.to_owned();
        let token_lease = self.token_lease.clone();
        let task = tokio::spawn(async move {
            let res = match req {
                Req::Acquire { lease, ttl, wait, shared, .. } => {
                    let request = AcquireRequest {
                        key,
                        lease_id: lease,
                        holder: format!("c{client}"),
                        ttl: Duration::from_millis(ttl),
                        wait: wait.map_or(Wait::TryOnce, |w| Wait::For(Duration::from_millis(w))),
                        limit: match kind {
                            Kind::Semaphore(n) => n,
                            _ => 1,
                        },
                        mode: if shared { LockMode::Shared } else { LockMode::Exclusive },
                        value: None,
                    };
                    match store.acquire(request).await {
                        Ok(g) => {
                            token_lease
                                .lock()
                                .unwrap()
                                .insert((key_index, g.fencing_token), g.lease_id.clone());
                            Res::Granted { token: g.fencing_token, ttl: g.ttl.as_millis() as u64 }
                        }
                        Err(Error::Held { .. }) => Res::Held,
                        Err(Error::WaitTimeout { .. }) => Res::TimedOut,
                        Err(e) => Res::Failed(e.to_string()),
                    }
                }
                Req::Renew { lease, ttl, .. } => {
                    match store.renew(&key, &lease, ttl.map(Duration::from_millis)).await {
                        Ok(g) => Res::Renewed { ttl: g.ttl.as_millis() as u64 },
                        Err(Error::LeaseLost { .. }) => Res::Lost,
                        Err(e) => Res::Failed(e.to_string()),
                    }
                }
                Req::Release { lease, .. } => match store.release(&key, &lease).await {
                    Ok(()) => Res::Released,
                    Err(Error::LeaseLost { .. }) => Res::Lost,
                    Err(e) => Res::Failed(e.to_string()),
                },
                Req::Status { .. } => match store.status(&key).await {
                    Ok(info) => Res::Status(info.fencing_token),
                    Err(e) => Res::Failed(e.to_string()),
                },
            };
            outbox.lock().unwrap().push(Outgoing { client, op, res, life, received });
        });
        server.tasks.push(task);
    }

    fn reply(&mut self, c: usize, op: u64, res: Res, life: u32, received: u64) {
        self.lapse(c);
        let now = self.now;
        if self.clients[c].pending.as_ref().is_none_or(|p| p.op != op) {
            self.log(format!("c{c} op {op} answer {res:?} comes after it gave up: ignored"));
            return;
        }
        let p = self.clients[c].pending.take().expect("checked");
        self.log(format!("c{c} op {op} answered {res:?} (server life {life}, received at {received})"));
        let answer = ns(now);
        let mut outcome = None;
        match (&p.req, res) {
            (Req::Acquire { key, lease, shared, .. }, Res::Granted { token, ttl }) => {
                let (key, shared) = (*key, *shared);
                self.grants[key].push((token, life, c));
                self.summary.grants += 1;
                let deadline = p.sent + ttl;
                if self.keys[key].1 == Kind::Lock {
                    let lease = self.lease_index(lease);
                    outcome = Some(Op::Acquire(AcquireOutcome::Granted { lease, token, ttl: ns(ttl) }));
                }
                self.clients[c].hold = Some(Hold {
                    key,
                    lease: lease.clone(),
                    token,
                    ttl_lo: ttl,
                    deadline,
                    since: (now < deadline).then_some(now),
                    shared,
                });
            }
            (Req::Acquire { .. }, Res::Held) => outcome = Some(Op::Acquire(AcquireOutcome::Held)),
            (Req::Acquire { .. }, Res::TimedOut) => outcome = Some(Op::Acquire(AcquireOutcome::TimedOut)),
            (Req::Renew { .. }, Res::Renewed { ttl }) => {
                let h = self.clients[c].hold.as_mut().expect("renewed what it holds");
                h.deadline = p.sent + ttl;
                h.ttl_lo = ttl;
                if h.since.is_none() && now < h.deadline {
                    h.since = Some(now);
                    self.summary.renewed_after_lapse += 1;
                }
                if let Op::Renew { lease, .. } = self.history_op(&p) {
                    outcome = Some(Op::Renew { lease, ttl: ns(ttl), outcome: Outcome::Ok });
                }
            }
            (Req::Renew { key, .. }, Res::Lost) => {
                let h = self.clients[c].hold.take().expect("renewed what it holds");
                if let Some(d) = p.deadline_at_send {
                    if received < d {
                        self.violation(format!(
                            "acknowledged lease lost: c{c}'s renewal of {} (token {}) reached the server at {received} ms, before its deadline {d} ms, and was answered 'lost'",
                            self.keys[*key].0, h.token
                        ));
                    }
                }
                if let Some(since) = h.since {
                    self.entitlements.push(Entitlement {
                        key: h.key,
                        client: c,
                        token: h.token,
                        start: since,
                        end: now,
                        shared: h.shared,
                    });
                }
                if let Op::Renew { lease, ttl, .. } = self.history_op(&p) {
                    outcome = Some(Op::Renew { lease, ttl, outcome: Outcome::LeaseLost });
                }
            }
            (Req::Release { .. }, res @ (Res::Released | Res::Lost)) => {
                if let Op::Release { lease, .. } = self.history_op(&p) {
                    let o = if res == Res::Released { Outcome::Ok } else { Outcome::LeaseLost };
                    outcome = Some(Op::Release { lease, outcome: o });
                }
            }
            (Req::Status { key }, Res::Status(token)) => {
                if self.keys[*key].1 == Kind::Lock {
                    let e = Event { client: c as u32, call: ns(p.sent), answer, op: Op::Status(token) };
                    self.histories[*key].push(e);
                    self.reads.push((*key, self.histories[*key].len() - 1, life, received));
                }
            }
            (req, res) => self.violation(format!("c{c} op {op}: unexpected answer {res:?} to {req:?}")),
        }
        if let (Some(i), Some(op)) = (p.history, outcome) {
            let key = req_key(&p.req);
            let refused = matches!(
                op,
                Op::Acquire(AcquireOutcome::Held | AcquireOutcome::TimedOut)
                    | Op::Release { outcome: Outcome::LeaseLost, .. }
                    | Op::Renew { outcome: Outcome::LeaseLost, .. }
            );
            if refused {
                self.reads.push((key, i, life, received));
            }
            self.histories[key][i].answer = answer;
            self.histories[key][i].op = op;
        }
        self.schedule_wake(c);
    }
}

fn req_key(req: &Req) -> usize {
    match req {
        Req::Acquire { key, .. }
        | Req::Renew { key, .. }
        | Req::Release { key, .. }
        | Req::Status { key } => *key,
    }
}

impl Sim {
    /// Per key, the tokens of the leases `store` holds, including grants not yet on disk (read
    /// in-process: the server's table).
    fn live_tokens(&self, store: &EmbeddedStore) -> Vec<BTreeSet<u64>> {
        self.keys.iter().map(|(name, _)| store.held_tokens(name).into_iter().collect()).collect()
    }

    /// After a restart: a lease held now that was not live at the power loss, and whose release
    /// never reached the server, is an expired lease back (its expiry was never logged; the
    /// known issue in docs/RELIABILITY.md). It blocks its key until its TTL passes again; a lock's
    /// history then shows a lease seen gone and back, which the linearizability check would
    /// flag, so that key's history is left unchecked (the entitlement checks still run).
    fn came_back(&mut self) {
        let Some(server) = &self.server else { return };
        let now = self.live_tokens(&server.store);
        let released = std::mem::take(&mut self.released);
        for (k, tokens) in now.iter().enumerate() {
            let back: Vec<u64> = tokens.difference(&self.before_loss[k]).copied().collect();
            for token in back {
                let lease = self.token_lease.lock().unwrap().get(&(k, token)).cloned();
                let lease = lease.map(|l| self.lease_index(&l));
                if lease.is_some_and(|l| released.contains(&l)) {
                    continue; // a release lost with the power: in doubt, rightly back
                }
                self.summary.came_back += 1;
                self.log(format!("{} token {token} (lease {lease:?}) expired and came back", self.keys[k].0));
                if self.keys[k].1 == Kind::Lock {
                    self.excused.insert(k);
                }
            }
        }
    }

    /// A request as the trace shows it: the key's name and the lease's number.
    fn describe(&mut self, req: &Req) -> String {
        let name = self.keys[req_key(req)].0;
        match req {
            Req::Acquire { lease, ttl, wait, shared, .. } => {
                let l = self.lease_index(lease);
                format!("acquire {name} lease {l} ttl {ttl} wait {wait:?} shared {shared}")
            }
            Req::Renew { lease, ttl, .. } => {
                let l = self.lease_index(lease);
                format!("renew {name} lease {l} ttl {ttl:?}")
            }
            Req::Release { lease, .. } => {
                let l = self.lease_index(lease);
                format!("release {name} lease {l}")
            }
            Req::Status { .. } => format!("status {name}"),
        }
    }

    /// The placeholder of `p`'s event in its key's history (`Status(None)` when it has none).
    fn history_op(&self, p: &Pending) -> Op {
        match p.history {
            Some(i) => self.histories[req_key(&p.req)][i].op.clone(),
            None => Op::Status(None),
        }
    }

    fn schedule_wake(&mut self, c: usize) {
        let now = self.now;
        let t = match &self.clients[c].hold {
            Some(h) if h.since.is_some() => {
                // Renews well before its deadline, as a client library does (a third of the TTL).
                let latest = h.deadline.saturating_sub(h.ttl_lo / 3).max(now + 1);
                now + self.rng.range(1, (latest - now).max(1))
            }
            _ => now + self.rng.range(1, 300),
        };
        self.at(t, Ev::Wake(c));
    }

    fn give_up(&mut self, c: usize, op: u64) {
        self.lapse(c);
        if self.clients[c].pending.as_ref().is_none_or(|p| p.op != op) {
            return;
        }
        let p = self.clients[c].pending.take().expect("checked");
        self.log(format!("c{c} op {op} gives up waiting for an answer"));
        match &p.req {
            Req::Acquire { key, lease, .. } => {
                self.summary.in_doubt += 1;
                self.clients[c].in_doubt.push((*key, lease.clone()));
            }
            Req::Renew { ttl, .. } => {
                if let Some(h) = &mut self.clients[c].hold {
                    h.ttl_lo = h.ttl_lo.min(ttl.unwrap_or(h.ttl_lo));
                }
            }
            Req::Release { .. } | Req::Status { .. } => {}
        }
        self.schedule_wake(c);
    }

    /// Closes the open entitlements and runs the checks over the whole run.
    fn finish(&mut self) {
        for c in 0..CLIENTS {
            if let Some(h) = &self.clients[c].hold {
                if let Some(since) = h.since {
                    let end = h.deadline.min(self.now);
                    self.entitlements.push(Entitlement {
                        key: h.key,
                        client: c,
                        token: h.token,
                        start: since,
                        end,
                        shared: h.shared,
                    });
                }
            }
        }
        // Answers that changed nothing, served while the disk stalled before a power loss, may
        // have read changes that were never made durable (a release in flight, undone by the
        // restart: a dirty read, see docs/RELIABILITY.md; grants are read only once on disk);
        // they leave the histories.
        let mut dirty: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); self.keys.len()];
        for &(k, i, life, received) in &self.reads {
            if self.stalled.iter().any(|&(l, from)| l == life && received >= from) {
                dirty[k].insert(i);
                self.summary.dirty_reads += 1;
            }
        }
        for (k, skip) in dirty.iter().enumerate() {
            if !skip.is_empty() {
                let kept = self.histories[k].iter().enumerate().filter(|(i, _)| !skip.contains(i));
                self.histories[k] = kept.map(|(_, e)| e.clone()).collect();
            }
        }
        let mut found = Vec::new();
        for (k, &(name, kind)) in self.keys.iter().enumerate() {
            let mine: Vec<&Entitlement> =
                self.entitlements.iter().filter(|e| e.key == k && e.start < e.end).collect();
            found.extend(check_entitlements(name, kind, &mine));
            // Tokens: never twice on a key, and above every earlier life's after a restart.
            let mut seen = BTreeSet::new();
            let mut before: BTreeMap<u32, u64> = BTreeMap::new();
            for &(token, life, c) in &self.grants[k] {
                if !seen.insert(token) {
                    found.push(format!(
                        "{name}: token {token} granted twice (the second to c{c}, life {life})"
                    ));
                }
                let top = before.entry(life).or_default();
                *top = (*top).max(token);
            }
            for &(token, life, c) in &self.grants[k] {
                if let Some((&l, &top)) = before.range(..life).max_by_key(|(_, &t)| t) {
                    if token <= top {
                        found.push(format!(
                            "{name}: token {token} granted to c{c} in life {life} is not above token {top} answered in life {l}"
                        ));
                    }
                }
            }
            if kind == Kind::Lock && self.excused.contains(&k) {
                self.summary.unchecked += 1;
            } else if kind == Kind::Lock {
                if let Err(v) = linearizable::check(&self.histories[k]) {
                    found.push(format!("{name}: {v}"));
                }
            }
        }
        for f in found {
            self.violation(f);
        }
    }
}

/// Never more entitled holders of a key than it allows (one exclusive, or any number of shared
/// ones; `n` permits of a semaphore), and on a key held alone a later entitlement carries a
/// higher token than an earlier one (what a fenced resource relies on).
fn check_entitlements(name: &str, kind: Kind, es: &[&Entitlement]) -> Vec<String> {
    let mut found = Vec::new();
    // Ends sort before starts at the same instant: [start, end) intervals.
    let mut points: Vec<(u64, bool, usize)> = Vec::new();
    for (i, e) in es.iter().enumerate() {
        points.push((e.start, true, i));
        points.push((e.end, false, i));
    }
    points.sort();
    let limit = match kind {
        Kind::Semaphore(n) => n as usize,
        _ => 1,
    };
    let (mut exclusive, mut shared) = (BTreeSet::new(), BTreeSet::new());
    for (t, starts, i) in points {
        let set = if es[i].shared { &mut shared } else { &mut exclusive };
        if !starts {
            set.remove(&i);
            continue;
        }
        set.insert(i);
        if exclusive.len() > limit || (!exclusive.is_empty() && !shared.is_empty()) {
            let who: Vec<String> = exclusive
                .iter()
                .chain(shared.iter())
                .map(|&j| {
                    let e = es[j];
                    let mode = if e.shared { "shared" } else { "exclusive" };
                    format!("c{} token {} {mode} [{}, {})", e.client, e.token, e.start, e.end)
                })
                .collect();
            found.push(format!("{name}: {} entitled holders at {t} ms: {}", who.len(), who.join(", ")));
        }
    }
    if limit == 1 {
        for a in es {
            for b in es {
                let alone = !a.shared || !b.shared;
                if alone && a.token != b.token && a.end <= b.start && a.token > b.token {
                    found.push(format!(
                        "{name}: c{} entitled [{}, {}) with token {} before c{} entitled [{}, {}) with the lower token {}",
                        a.client, a.start, a.end, a.token, b.client, b.start, b.end, b.token
                    ));
                }
            }
        }
    }
    found
}

/// What one seed did: its totals, the violations found, and its history.
struct SeedOutcome {
    summary: Summary,
    violations: Vec<String>,
    trace: Vec<String>,
}

fn simulate(seed: u64) -> SeedOutcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let run =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(Sim::new(seed).run())));
    match run {
        Ok((summary, violations, trace)) => SeedOutcome { summary, violations, trace },
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            SeedOutcome {
                summary: Summary::default(),
                violations: vec![format!("panicked: {why}")],
                trace: Vec::new(),
            }
        }
    }
}

/// FNV-1a over the history's lines: equal digests, equal histories (for the replay check).
fn digest(trace: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in trace {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn replay_command(seed: u64) -> String {
    format!("DISTLOCK_SIM_SEED={seed} cargo test -p distlock-server --test simulation")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

#[test]
fn seeds_keep_every_promise() {
    let seeds: Vec<u64> = match env_u64("DISTLOCK_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("DISTLOCK_SIM_FIRST").unwrap_or(1);
            (first..first + env_u64("DISTLOCK_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect()
        }
    };
    let trace = std::env::var_os("DISTLOCK_SIM_TRACE").is_some();
    let started = std::time::Instant::now();
    let mut total = Summary::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let out = simulate(seed);
        if trace {
            for line in &out.trace {
                eprintln!("seed {seed} {line}");
            }
        }
        if !out.violations.is_empty() {
            eprintln!("seed {seed} FAILED:");
            for v in &out.violations {
                eprintln!("  {v}");
            }
            eprintln!("  replay: {}", replay_command(seed));
            failed.push(seed);
        }
        let s = out.summary;
        total.ops += s.ops;
        total.grants += s.grants;
        total.power_losses += s.power_losses;
        total.in_doubt += s.in_doubt;
        total.renewed_after_lapse += s.renewed_after_lapse;
        total.came_back += s.came_back;
        total.unchecked += s.unchecked;
        total.dirty_reads += s.dirty_reads;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation: {} seeds in {secs:.1} s ({:.1} seeds/s): {} requests, {} grants answered, {} power losses, {} grants in doubt, {} leases renewed after a lapse, {} expired leases back after a restart (known issue; {} lock histories left unchecked), {} reads and refusals served in a stall before a power loss (left out of the histories)",
        seeds.len(),
        seeds.len() as f64 / secs,
        total.ops,
        total.grants,
        total.power_losses,
        total.in_doubt,
        total.renewed_after_lapse,
        total.came_back,
        total.unchecked,
        total.dirty_reads
    );
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {failed:?}; replay one with {}",
        failed.len(),
        seeds.len(),
        replay_command(failed[0])
    );
}

#[test]
fn the_entitlement_checker_fires() {
    let e = |client, token, start, end, shared| Entitlement { key: 0, client, token, start, end, shared };
    let check = |kind, es: &[Entitlement]| check_entitlements("k", kind, &es.iter().collect::<Vec<_>>());
    // Back to back is fine; overlapping is not; a later entitlement with a lower token is not.
    assert!(check(Kind::Lock, &[e(0, 1, 0, 10, false), e(1, 2, 10, 20, false)]).is_empty());
    assert_eq!(check(Kind::Lock, &[e(0, 1, 0, 10, false), e(1, 2, 9, 20, false)]).len(), 1);
    assert_eq!(check(Kind::Lock, &[e(0, 2, 0, 10, false), e(1, 1, 10, 20, false)]).len(), 1);
    // Readers together, a writer alone; N permits.
    assert!(check(Kind::ReadWrite, &[e(0, 1, 0, 10, true), e(1, 2, 5, 20, true)]).is_empty());
    assert_eq!(check(Kind::ReadWrite, &[e(0, 1, 0, 10, true), e(1, 2, 5, 20, false)]).len(), 1);
    let permits = [e(0, 1, 0, 10, false), e(1, 2, 0, 10, false), e(2, 3, 5, 10, false)];
    assert!(check(Kind::Semaphore(3), &permits).is_empty());
    assert_eq!(check(Kind::Semaphore(2), &permits).len(), 1);
}

/// Seeds that found a defect, run whatever `DISTLOCK_SIM_SEEDS` says.
const FOUND_DEFECTS: [(u64, &str); 3] = [
    // An expired semaphore permit came back after a restart beside the permit granted in its
    // place, and its holder renewed it: 3 holders of a limit-2 key (fixed: expiries are logged
    // ahead of the next change).
    (62, "expired permit back and renewed"),
    (64, "expired permit back and renewed"),
    // A renewal changing the TTL stalled in the log; a second renewal of the lease found the new
    // TTL in the table and was answered without logging; the power failed and the lease came
    // back with its logged, shorter TTL: lost before its holder's deadline (fixed: a renewal
    // with another of its lease under way is logged).
    (175, "acknowledged renewal rested on an unlogged one"),
];

#[test]
fn seeds_that_found_defects_stay_fixed() {
    for (seed, what) in FOUND_DEFECTS {
        let out = simulate(seed);
        assert!(
            out.violations.is_empty(),
            "seed {seed} ({what}) fails again: {:?}; replay: {}",
            out.violations,
            replay_command(seed)
        );
    }
}

#[test]
fn a_seed_replays_the_same_history() {
    let seed = env_u64("DISTLOCK_SIM_SEED").unwrap_or(7);
    let (a, b) = (simulate(seed), simulate(seed));
    assert!(a.trace.len() > 100, "seed {seed} did little: {} events", a.trace.len());
    if let Some(i) = (0..a.trace.len().min(b.trace.len())).find(|&i| a.trace[i] != b.trace[i]) {
        panic!("seed {seed} diverged at event {i}:\n  {}\n  {}", a.trace[i], b.trace[i]);
    }
    assert_eq!(digest(&a.trace), digest(&b.trace), "seed {seed}: the histories differ in length");
}

/// Issue 22, section 6: every bug `distlock::planted` can plant back in the server must be caught
/// by the simulation within `PLANTED_SEEDS` seeds; the test fails naming any that goes unnoticed,
/// and any bug that no test claims (the client library's are caught in `crates/distlock/tests`:
/// `memory.rs`, `planted_renewal_from_answer_is_caught`; `redis.rs`,
/// `planted_abandoned_queue_place_is_caught`).
/// Runs only with the feature: `cargo test -p distlock-server --features planted-bugs --test
/// simulation planted -- --nocapture` (scripts/test.sh runs it).
#[cfg(feature = "planted-bugs")]
#[test]
fn planted_bugs_are_caught() {
    use distlock::planted::{self, Bug};
    const PLANTED_SEEDS: u64 = 60;
    let elsewhere = [Bug::RenewalFromAnswer, Bug::AbandonedQueuePlace];
    let mut missed = Vec::new();
    for bug in Bug::ALL.into_iter().filter(|b| !elsewhere.contains(b)) {
        // The simulation runs the store on this thread, where the bug is planted.
        planted::plant(Some(bug));
        let caught = (1..=PLANTED_SEEDS).find_map(|seed| {
            let out = simulate(seed);
            out.violations.first().map(|v| (seed, v.clone()))
        });
        planted::plant(None);
        match caught {
            Some((seed, v)) => {
                let v: String = v.chars().take(200).collect();
                eprintln!("planted {}: caught by seed {seed}: {v}", bug.name());
            }
            None => {
                eprintln!("planted {}: NOT caught in {PLANTED_SEEDS} seeds", bug.name());
                missed.push(bug.name());
            }
        }
    }
    assert!(missed.is_empty(), "planted bugs the simulation did not notice: {missed:?}");
}
