//! The command line: every subcommand and flag (clap), with its help text. `main.rs` turns the
//! parsed arguments into calls; nothing here does any work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use distlock::Wait;
use distlock_cli::cli::{WaitPolicy, EXIT_HELD};
use distlock_cli::run::RunConfig;

/// Distributed locks: a lock server, and a client for every distlock backend.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    /// Where locks live: http://host:7878 (a distlock server; https:// with TLS), redis://
    /// (rediss:// with TLS), redis-sentinel://s1,s2,s3/MASTER, redis-cluster://h1,h2,h3
    /// (rediss-cluster://), redlock://h1,h2,h3 (redlocks://), etcd://h1,h2,h3.
    #[arg(long, global = true, env = "DISTLOCK_BACKEND", default_value = "http://127.0.0.1:7878")]
    pub backend: String,
    /// File holding the bearer token for a server started with --auth-token-file (first line
    /// that is not empty or a # comment). The DISTLOCK_TOKEN variable may hold the token itself.
    #[arg(long, global = true, env = "DISTLOCK_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Print results as JSON on stdout (one object per result; errors as {"error":{…}}).
    #[arg(long, global = true)]
    pub json: bool,
    /// No messages on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More detail on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

pub const EXIT_CODES: &str = "Exit codes of distlock itself:\n  \
    0   success (run: the command's own code; 128+N when a signal N killed it)\n  \
    64  invalid input or usage\n  \
    69  backend unavailable\n  \
    75  not acquired: held by someone else, or not within --wait (change it with -E/--conflict-exit-code)\n  \
    76  lease lost (run, hold), or the lease id does not hold the key (renew, release)\n  \
    77  unauthorized: pass a token with --token-file PATH or DISTLOCK_TOKEN\n  \
    1   other failures (serve: cannot start; bench: a check failed or nothing was measured; leader: nobody leads)\n  \
    126/127 (run) the command cannot be executed / was not found\n\n\
    Durations are written like 30s, 500ms, 2m, 1h30m (--wait also takes bare seconds: -w 10).";

/// A duration with a unit: `30s`, `500ms`, `2m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write a unit, e.g. 30s, 500ms, 2m)"))
}

/// A duration as `duration`, or bare seconds as flock's `-w` takes them (`10`, `0.5`).
pub fn wait_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=1e9).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err("must be a duration of 0s or more".into()),
        Err(_) => duration(s),
    }
}

/// Lock options shared by run, acquire and hold.
#[derive(clap::Args)]
pub struct LockArgs {
    /// Lease TTL, from 100ms to 24h; renewed automatically while held by `run` and `hold`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub ttl: Duration,
    /// Holder label shown in status (default: host/pid).
    #[arg(long)]
    pub holder: Option<String>,
    /// Let up to N holders share the key (a semaphore, like `consul lock -n N`); every holder
    /// must give the same N. Offered by memory://, Redis, etcd:// and the lock server over its
    /// embedded store, Redis or etcd.
    #[arg(short = 'l', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Hold the key shared with other `--shared` holders (a read lock, flock's -s); an exclusive
    /// holder waits for all of them, and they for it. Same backends as --limit.
    #[arg(short = 's', long, conflicts_with = "limit")]
    pub shared: bool,
}

/// The command `run` and `elect` start, and how it is stopped.
#[derive(clap::Args)]
pub struct CommandArgs {
    /// Time between SIGTERM and SIGKILL when the lock (or leadership) is lost.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub kill_after: Duration,
    /// Run this string with /bin/sh -c instead of a command after `--` (flock -c).
    #[arg(short = 'c', long = "command", value_name = "STRING", conflicts_with = "argv")]
    pub shell: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "shell")]
    pub argv: Vec<String>,
}

impl CommandArgs {
    /// What `run` is asked to do: this command, waiting as `wait` says (default: forever).
    pub fn config(self, wait: &WaitArgs, hide_token: bool) -> RunConfig {
        let command = match self.shell {
            Some(s) => vec!["/bin/sh".to_owned(), "-c".to_owned(), s],
            None => self.argv,
        };
        RunConfig { policy: wait.policy(Wait::Forever), kill_after: self.kill_after, command, hide_token }
    }
}

/// How to wait (flock's -w/-n/-E, consul lock's -monitor-retry).
#[derive(clap::Args)]
pub struct WaitArgs {
    /// How long to wait for the lock: 30s, 2m, or bare seconds (-w 10).
    #[arg(short, long, value_parser = wait_duration, conflicts_with = "nonblock")]
    pub wait: Option<Duration>,
    /// Do not wait: fail at once if the lock is held (same as --wait 0).
    #[arg(short, long)]
    pub nonblock: bool,
    /// Exit code when the lock is not acquired (default 75), so it cannot be mistaken for one of
    /// the command's own codes.
    #[arg(short = 'E', long, value_name = "N", value_parser = clap::value_parser!(u8))]
    pub conflict_exit_code: Option<u8>,
    /// While waiting, how long to keep retrying a backend that is unavailable (a server restart,
    /// a short store outage), with capped back-off (default: as long as the wait).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub retry_unavailable: Option<Duration>,
}

impl WaitArgs {
    /// The policy, with `default` as the wait when none is given.
    pub fn policy(&self, default: Wait) -> WaitPolicy {
        let wait = match (self.nonblock, self.wait) {
            (true, _) => Wait::TryOnce,
            (false, Some(w)) => Wait::For(w),
            (false, None) => default,
        };
        WaitPolicy {
            wait,
            retry_unavailable: self.retry_unavailable,
            conflict_exit_code: self.conflict_exit_code.unwrap_or(EXIT_HELD),
        }
    }
}

/// The subcommands: the server, or one of the client's.
#[derive(Subcommand)]
pub enum Command {
    /// Run the lock server (HTTP JSON API, durable embedded store by default).
    #[command(after_help = "Examples:\n  \
        distlock serve\n  \
        distlock serve --listen 0.0.0.0:7878 --data-dir /var/lib/distlock --auth-token-file /etc/distlock/tokens\n  \
        distlock serve --store redis://10.0.0.5:6379    # several stateless servers in front of one Redis\n\n\
        Exit status: 0 after a clean shutdown (SIGTERM/SIGINT); 1 when the server cannot start \
        (port in use, unreadable token file, corrupt data directory); 64 for invalid flags.")]
    Serve(ServeArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

/// The client subcommands: each opens the backend (`--backend`) and works with it.
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Run a command while holding a lock; release when it exits.
    #[command(after_help = "Examples:\n  \
        distlock run nightly-backup -- /usr/local/bin/backup.sh\n  \
        distlock run -n deploy -- make deploy                  # skip (exit 75) if someone else deploys\n  \
        distlock run -w 10 -E 0 report -c 'make report > out'  # shell string; exit 0 if busy for 10 s\n  \
        distlock --backend redis://10.0.0.5:6379 run --ttl 10s job -- ./job\n\n\
        The command sees DISTLOCK_KEY, DISTLOCK_LEASE_ID, DISTLOCK_FENCING_TOKEN and DISTLOCK_TTL_MS. \
        Without a terminal it runs in its own process group; SIGINT, SIGTERM and SIGHUP are passed on \
        to every process it started. If the lock is lost while it runs, all of them get SIGTERM \
        (SIGKILL after --kill-after) and distlock exits 76; if distlock itself is killed, the \
        command's first process gets SIGKILL. While waiting, \
        a line on stderr says who holds the lock (every 30 s). With --json, the last line on stdout is \
        {\"key\",\"outcome\":\"ok|not_acquired|lost|unavailable|error\",\"fencing_token\",\"waited_ms\",\
        \"held_ms\",\"exit_code\"}.")]
    Run {
        /// The lock to hold.
        key: String,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        command: CommandArgs,
    },
    /// Run a command only while this process is the leader of KEY, publishing VALUE (an
    /// address, an id) for `distlock leader KEY` and every observer to read.
    #[command(after_help = "Examples:\n  \
        distlock elect scheduler --value \"$(hostname):8080\" -- ./scheduler\n  \
        distlock leader scheduler            # prints the leader's value\n\n\
        Candidates wait in line (FIFO) until they lead (default: as long as it takes). The command \
        sees DISTLOCK_LEADER_VALUE and DISTLOCK_FENCING_TOKEN (pass the token to what it writes to) \
        besides run's variables; leadership is lost and the command stopped exactly as `run` does \
        with a lost lock (exit 76). Offered by memory://, Redis, etcd:// and the lock server over \
        its embedded store, Redis or etcd.")]
    Elect {
        /// The election key.
        key: String,
        /// What the leader publishes: at most 4096 bytes, readable by anyone who may read KEY.
        #[arg(long)]
        value: String,
        /// Lease TTL, from 100ms to 24h; renewed automatically while leading.
        #[arg(long, default_value = "30s", value_parser = duration)]
        ttl: Duration,
        /// Holder label shown in status (default: host/pid).
        #[arg(long)]
        holder: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        command: CommandArgs,
    },
    /// Print the leader's value of an election key; with --watch, every change of leader.
    #[command(after_help = "Output: the value alone on stdout (no leader: nothing, a message on stderr, \
        exit 1). With --json one line {\"key\",\"value\",\"holder\",\"fencing_token\"} (all but key \
        null when nobody leads). With --watch a line per change, starting with the leader now, until \
        SIGINT/SIGTERM (exit 0); human lines read `VALUE (holder H, fencing token N)` or `no leader`. \
        A watch follows reconnects by itself.")]
    Leader {
        /// The election key.
        key: String,
        /// Keep printing every change of leader (or of its value) until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Take a lock and leave it held; prints the lease for `eval` (renew or release it by its id).
    #[command(after_help = "Example:\n  \
        eval \"$(distlock acquire --ttl 5m migrate)\"   # sets DISTLOCK_KEY, DISTLOCK_LEASE_ID, DISTLOCK_FENCING_TOKEN, DISTLOCK_TTL_MS\n  \
        ./migrate --fencing-token \"$DISTLOCK_FENCING_TOKEN\"\n  \
        distlock release \"$DISTLOCK_KEY\" --lease \"$DISTLOCK_LEASE_ID\"\n\n\
        Every value is in single quotes, so eval is safe whatever the key holds. The lease is not \
        renewed: it ends at its TTL unless renewed (distlock renew) or released. Default: try once.")]
    Acquire {
        /// The lock.
        key: String,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Take a lock and keep it (renewed) until SIGINT/SIGTERM, then release it (etcdctl lock).
    #[command(after_help = "Example:\n  \
        distlock hold maintenance &      # prints the lease like acquire, then holds it\n  \
        ...; kill %1                     # released\n\n\
        Exit status 76 when the lease is lost while held. Default: wait as long as it takes.")]
    Hold {
        /// The lock.
        key: String,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Extend a held lease.
    Renew {
        /// The lock.
        key: String,
        /// The lease id printed by acquire (default: $DISTLOCK_LEASE_ID, as `run` sets it).
        #[arg(long, env = "DISTLOCK_LEASE_ID", hide_env_values = true)]
        lease: String,
        /// New TTL (default: the lease's own TTL).
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
    },
    /// Release a held lease.
    Release {
        /// The lock.
        key: String,
        /// The lease id printed by acquire (default: $DISTLOCK_LEASE_ID).
        #[arg(long, env = "DISTLOCK_LEASE_ID", hide_env_values = true)]
        lease: String,
    },
    /// Free a lock whoever holds it (needs an admin token of the server; the holder's next
    /// renewal fails and `run` stops its command).
    ForceRelease {
        /// The lock.
        key: String,
    },
    /// Show who holds a lock.
    Status {
        /// The lock.
        key: String,
    },
    /// List held locks, in key order.
    List {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many (1 to 10000); with --json, "next" names the key to continue after.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
        /// Only keys after this one (the "next" of the previous page).
        #[arg(long, value_name = "KEY")]
        after: Option<String>,
    },
    /// Load-test the backend: acquire + release cycles per second and their latency.
    #[command(after_help = "Examples:\n  \
        distlock bench --concurrency 32 --duration 10s\n  \
        distlock --backend redis://127.0.0.1:6379 bench --workload contended --concurrency 8 --json\n  \
        distlock bench --workload mixed --concurrency 16 --keys 1000 --zipf 1.1 --hold 1ms\n  \
        distlock bench --workload contended --limit 3 --concurrency 8 --hold 1ms   # a semaphore of 3\n  \
        distlock bench --workload contended --shared --writers 1 --concurrency 8   # readers and one writer\n\n\
        Every run checks what it measures: per key, no two holders were inside at once and fencing \
        tokens rose with every grant. Exit status 1 when a check failed, when no cycle completed, or \
        when more calls failed than --max-error-rate allows.")]
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// uncontended: a key per task, try once; contended: one key, waiting; mixed: random keys.
    #[arg(long, value_enum, default_value = "uncontended")]
    pub workload: distlock_cli::bench::Workload,
    /// Concurrent tasks.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Spread the tasks over this many independent clients (each its own connections and, for
    /// http://, its own batch queue), as if they were separate processes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub clients: u32,
    /// Keys of the mixed workload.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub keys: u32,
    /// How long to run (more than 0s).
    #[arg(long, short = 'd', default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Lease TTL.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub ttl: Duration,
    /// How long a contended or mixed acquire waits before counting a wait timeout.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub wait: Duration,
    /// Time inside the lock before releasing (held as asked, to about 50 µs; the report gives
    /// the hold measured).
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub hold: Duration,
    /// Mixed workload: choose keys by a zipf law with this exponent (e.g. 1.1) instead of uniformly.
    #[arg(long)]
    pub zipf: Option<f64>,
    /// Prefix of every key the run touches.
    #[arg(long, default_value = "bench/")]
    pub key_prefix: String,
    /// Seed of the random key choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hold this many extra leases (TTL: duration + 5m, left to expire) before measuring.
    #[arg(long, default_value_t = 0)]
    pub background_leases: u64,
    /// Fail (exit 1) when more than this percentage of calls failed.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
    pub max_error_rate: f64,
    /// Take every key as a semaphore of N permits (checks: never more than N inside).
    #[arg(short = 'l', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Take keys shared (read locks), except the first --writers tasks (checks: no reader beside
    /// a writer, writers alone).
    #[arg(short = 's', long, conflicts_with = "limit")]
    pub shared: bool,
    /// With --shared: how many tasks take their keys exclusively (writers among the readers).
    #[arg(long, default_value_t = 0, requires = "shared")]
    pub writers: u32,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (host:port, e.g. 127.0.0.1:7878 or 0.0.0.0:7878).
    #[arg(long, env = "DISTLOCK_LISTEN", default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "DISTLOCK_DATA_DIR", default_value = "./distlock-data")]
    pub data_dir: PathBuf,
    /// Keep locks in this store instead of the embedded one: a redis://, redis-sentinel://,
    /// redis-cluster://, redlock:// or etcd:// URL.
    #[arg(long, env = "DISTLOCK_STORE")]
    pub store: Option<String>,
    /// File of bearer tokens, one per line; when given, every /v1 call and /metrics needs one.
    #[arg(long, env = "DISTLOCK_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// File of admin tokens, one per line: they may force-release any lock (web page, `distlock
    /// force-release`, or POST /v1/admin/locks/{key}/release). Without it force-release is off.
    #[arg(long, env = "DISTLOCK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Most leases held at once (more acquires answer 429).
    #[arg(long, env = "DISTLOCK_MAX_LEASES", default_value_t = 1_000_000)]
    pub max_leases: u64,
    /// Most callers waiting at once (more waiting acquires answer 429).
    #[arg(long, env = "DISTLOCK_MAX_WAITERS", default_value_t = 100_000)]
    pub max_waiters: u64,
    /// Log segment size in bytes after which the log is compacted into a snapshot.
    #[arg(long, env = "DISTLOCK_COMPACT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub compact_bytes: u64,
    /// How long requests in flight may run after SIGTERM/SIGINT, e.g. 5s.
    #[arg(long, env = "DISTLOCK_SHUTDOWN_GRACE", default_value = "5s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Serve HTTPS only, with this certificate chain (PEM, leaf first); re-read on SIGHUP.
    #[arg(long, env = "DISTLOCK_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM); re-read on SIGHUP.
    #[arg(long, env = "DISTLOCK_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "DISTLOCK_TLS_CLIENT_CA", value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Close a connection that has not sent a whole request's headers this long after it was
    /// accepted or its request began (slow or stalled clients).
    #[arg(long, env = "DISTLOCK_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_timeout: Duration,
    /// Close a kept-alive connection that sends no new request for this long (a request being
    /// answered, such as a waiting acquire, is not idle).
    #[arg(long, env = "DISTLOCK_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Most connections open at once; more are closed as soon as they are accepted.
    #[arg(long, env = "DISTLOCK_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Requests per second to /v1/* per token (per client IP without --auth-token-file), with
    /// bursts of twice that, e.g. 100/s; more answer 429 with Retry-After. Default: no limit.
    #[arg(long, env = "DISTLOCK_RATE_LIMIT", value_name = "N/s")]
    pub rate_limit: Option<distlock_server::ratelimit::RateLimit>,
    /// Events kept in memory for the web page and `GET /v1/events?since=` (the timeline keeps its
    /// own bounded spans for up to an hour besides), 1 to 1,000,000.
    #[arg(long, env = "DISTLOCK_EVENT_HISTORY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub event_history: u32,
}
