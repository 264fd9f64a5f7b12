//! The `distlock` binary: command-line parsing only; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc: the server and the bench allocate small, short-lived buffers per request, where
/// glibc's allocator showed up at ~15 % of the server's CPU in a profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use distlock::{AcquireOptions, Locker};
use distlock_server::cli::{self, Output};
use distlock_server::serve::{self, ServeConfig};
use distlock_server::store::Limits;

/// Distributed locks: a lock server, and a client for every distlock backend.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    /// Where locks live: http://host:7878 (a distlock server), redis:// (rediss:// with TLS),
    /// redlock://h1,h2,h3 (redlocks://), etcd://h1,h2,h3, memory://.
    #[arg(long, global = true, env = "DISTLOCK_BACKEND", default_value = "http://127.0.0.1:7878")]
    backend: String,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No messages on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More detail on stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success (run: the command's own code, 128+N if killed by signal N); \
75 held by someone else / not acquired within --wait; 76 lease lost; 69 backend unavailable; \
77 unauthorized; 64 invalid input; 1 other failure.";

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 500ms, 2m)"))
}

/// Lock options shared by run and acquire.
#[derive(clap::Args)]
struct LockArgs {
    /// Lease TTL, from 100ms to 24h; renewed automatically while held by `run`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    ttl: Duration,
    /// Holder label shown in status (default: host/pid).
    #[arg(long)]
    holder: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the lock server (HTTP JSON API, durable embedded store by default).
    #[command(after_help = "Examples:\n  \
        distlock serve\n  \
        distlock serve --listen 0.0.0.0:7878 --data-dir /var/lib/distlock --auth-token-file /etc/distlock/tokens\n  \
        distlock serve --store redis://10.0.0.5:6379    # several stateless servers in front of one Redis\n\n\
        Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the server cannot start \
        (bad flags, port in use, corrupt data directory).")]
    Serve(ServeArgs),
    /// Run a command while holding a lock; release when it exits.
    #[command(after_help = "Examples:\n  \
        distlock run nightly-backup -- /usr/local/bin/backup.sh\n  \
        distlock run --wait 0s deploy -- make deploy      # skip (exit 75) if someone else deploys\n  \
        distlock --backend redis://10.0.0.5:6379 run --ttl 10s job -- ./job\n\n\
        The command sees DISTLOCK_KEY, DISTLOCK_FENCING_TOKEN and DISTLOCK_LEASE_ID. SIGINT, SIGTERM and \
        SIGHUP are passed on to it. If the lock is lost while it runs, it gets SIGTERM (SIGKILL after \
        --kill-after) and distlock exits 76. distlock exits 75 when the lock is not acquired within --wait.")]
    Run {
        /// The lock to hold.
        key: String,
        #[command(flatten)]
        lock: LockArgs,
        /// How long to wait for the lock (default: as long as it takes).
        #[arg(long, value_parser = duration)]
        wait: Option<Duration>,
        /// Time between SIGTERM and SIGKILL when the lock is lost.
        #[arg(long, default_value = "10s", value_parser = duration)]
        kill_after: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Take a lock and leave it held; prints the lease (renew or release it by its id).
    #[command(after_help = "Example:\n  \
        eval \"$(distlock acquire --ttl 5m migrate)\"   # sets key, lease_id, fencing_token, ttl_ms\n  \
        distlock release migrate --lease \"$lease_id\"")]
    Acquire {
        /// The lock.
        key: String,
        #[command(flatten)]
        lock: LockArgs,
        /// How long to wait for the lock (default: try once).
        #[arg(long, default_value = "0s", value_parser = duration)]
        wait: Duration,
    },
    /// Extend a held lease.
    Renew {
        /// The lock.
        key: String,
        /// The lease id printed by acquire.
        #[arg(long)]
        lease: String,
        /// New TTL.
        #[arg(long, default_value = "30s", value_parser = duration)]
        ttl: Duration,
    },
    /// Release a held lease.
    Release {
        /// The lock.
        key: String,
        /// The lease id printed by acquire.
        #[arg(long)]
        lease: String,
    },
    /// Show who holds a lock.
    Status {
        /// The lock.
        key: String,
    },
    /// List held locks.
    List {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Load-test the backend: acquire + release cycles per second and their latency.
    #[command(after_help = "Examples:\n  \
        distlock bench --concurrency 32 --duration 10s\n  \
        distlock --backend redis://127.0.0.1:6379 bench --workload contended --concurrency 8 --json\n  \
        distlock bench --workload mixed --concurrency 16 --keys 1000 --zipf 1.1 --hold 1ms\n\n\
        Every run checks what it measures: per key, no two holders were inside at once and fencing \
        tokens rose with every grant. Exit status 1 when a check failed.")]
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// uncontended: a key per task, try once; contended: one key, waiting; mixed: random keys.
    #[arg(long, value_enum, default_value = "uncontended")]
    workload: distlock_server::bench::Workload,
    /// Concurrent tasks.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Spread the tasks over this many independent clients (each its own connections and, for
    /// http://, its own batch queue), as if they were separate processes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Keys of the mixed workload.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    keys: u32,
    /// How long to run.
    #[arg(long, short = 'd', default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Lease TTL.
    #[arg(long, default_value = "10s", value_parser = duration)]
    ttl: Duration,
    /// How long a contended or mixed acquire waits before counting a wait_timeout.
    #[arg(long, default_value = "30s", value_parser = duration)]
    wait: Duration,
    /// Time inside the lock before releasing.
    #[arg(long, default_value = "0s", value_parser = duration)]
    hold: Duration,
    /// Mixed workload: choose keys by a zipf law with this exponent (e.g. 1.1) instead of uniformly.
    #[arg(long)]
    zipf: Option<f64>,
    /// Prefix of every key the run touches.
    #[arg(long, default_value = "bench/")]
    key_prefix: String,
    /// Seed of the random key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hold this many extra leases (TTL: duration + 5m, left to expire) before measuring.
    #[arg(long, default_value_t = 0)]
    background_leases: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DISTLOCK_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "DISTLOCK_DATA_DIR", default_value = "./distlock-data")]
    data_dir: PathBuf,
    /// Keep locks in this store instead of the embedded one: a redis://, redlock:// or etcd:// URL.
    #[arg(long, env = "DISTLOCK_STORE")]
    store: Option<String>,
    /// File of bearer tokens, one per line; when given, every /v1 call and /metrics needs one.
    #[arg(long, env = "DISTLOCK_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// File of admin tokens, one per line: they may force-release any lock (web page, or
    /// POST /v1/admin/locks/{key}/release). Without it force-release is off.
    #[arg(long, env = "DISTLOCK_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Most leases held at once (more acquires answer 429).
    #[arg(long, env = "DISTLOCK_MAX_LEASES", default_value_t = 1_000_000)]
    max_leases: u64,
    /// Most callers waiting at once (more waiting acquires answer 429).
    #[arg(long, env = "DISTLOCK_MAX_WAITERS", default_value_t = 100_000)]
    max_waiters: u64,
    /// Log segment size in bytes after which the log is compacted into a snapshot.
    #[arg(long, env = "DISTLOCK_COMPACT_BYTES", default_value_t = 64 * 1024 * 1024)]
    compact_bytes: u64,
    /// How long requests in flight (long polls) may run after SIGTERM/SIGINT, e.g. 5s.
    #[arg(long, env = "DISTLOCK_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

/// Lifts the soft limit on open files to the hard limit: a server with many long polls, or a
/// bench with thousands of waiters, needs a descriptor per connection.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Output { json: cli.json, quiet: cli.quiet, verbose: cli.verbose };
    let backend = cli.backend.clone();
    let lock_opts = |lock: LockArgs| {
        AcquireOptions::new().ttl(lock.ttl).holder(lock.holder.unwrap_or_else(cli::default_holder))
    };
    let client = |command: Command| async move {
        let locker = match Locker::open(&backend).await {
            Ok(l) => l,
            Err(e) => return out.fail(&e),
        };
        match command {
            Command::Serve(_) => 0,
            Command::Run { key, lock, wait, kill_after, command } => {
                let opts = lock_opts(lock);
                let opts = match wait {
                    Some(w) => opts.wait(w),
                    None => opts.wait_forever(),
                };
                distlock_server::run::run(&locker, &key, opts, kill_after, &command, &out).await
            }
            Command::Acquire { key, lock, wait } => {
                cli::acquire(&locker, &key, lock_opts(lock).wait(wait), &out).await
            }
            Command::Renew { key, lease, ttl } => cli::renew(&locker, &key, &lease, ttl, &out).await,
            Command::Release { key, lease } => cli::release(&locker, &key, &lease, &out).await,
            Command::Status { key } => cli::status(&locker, &key, &out).await,
            Command::List { prefix } => cli::list(&locker, &prefix, &out).await,
            Command::Bench(b) => {
                if let Some(s) = b.zipf.filter(|s| !(s.is_finite() && *s > 0.0)) {
                    return out.fail(&distlock::Error::InvalidInput(format!("--zipf {s}: must be above 0")));
                }
                let config = distlock_server::bench::BenchConfig {
                    workload: b.workload,
                    concurrency: b.concurrency as usize,
                    clients: b.clients.min(b.concurrency) as usize,
                    keys: b.keys as usize,
                    duration: b.duration,
                    ttl: b.ttl,
                    wait: b.wait,
                    hold: b.hold,
                    zipf: b.zipf,
                    key_prefix: b.key_prefix,
                    seed: b.seed,
                };
                if let Err(e) = AcquireOptions::new().ttl(config.ttl).validate() {
                    return out.fail(&e);
                }
                distlock_server::bench::command(&locker, &backend, &config, b.background_leases, &out).await
            }
        }
    };
    if !matches!(cli.command, Command::Serve(_)) {
        return ExitCode::from(runtime.block_on(client(cli.command)));
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(a) => {
                let config = ServeConfig {
                    listen: a.listen,
                    data_dir: a.data_dir,
                    store: a.store,
                    auth_token_file: a.auth_token_file,
                    admin_token_file: a.admin_token_file,
                    limits: Limits { max_leases: a.max_leases, max_waiters: a.max_waiters },
                    compact_bytes: a.compact_bytes,
                    shutdown_grace: a.shutdown_grace,
                };
                serve::run(config, serve::shutdown_signal()).await
            }
            _ => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
