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
use distlock::{AcquireOptions, ListQuery, Locker};
use distlock_server::cli::{self, Output, WaitPolicy, EXIT_HELD, EXIT_USAGE};
use distlock_server::run::RunConfig;
use distlock_server::serve::{self, ServerConfig};
use distlock_server::store::Limits;

/// Distributed locks: a lock server, and a client for every distlock backend.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    /// Where locks live: http://host:7878 (a distlock server; https:// with TLS), redis://
    /// (rediss:// with TLS), redis-sentinel://s1,s2,s3/MASTER, redlock://h1,h2,h3 (redlocks://),
    /// etcd://h1,h2,h3.
    #[arg(long, global = true, env = "DISTLOCK_BACKEND", default_value = "http://127.0.0.1:7878")]
    backend: String,
    /// File holding the bearer token for a server started with --auth-token-file (first line
    /// that is not empty or a # comment). The DISTLOCK_TOKEN variable may hold the token itself.
    #[arg(long, global = true, env = "DISTLOCK_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Print results as JSON on stdout (one object per result; errors as {"error":{…}}).
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

const EXIT_CODES: &str = "Exit codes of distlock itself:\n  \
    0   success (run: the command's own code; 128+N when a signal N killed it)\n  \
    64  invalid input or usage\n  \
    69  backend unavailable\n  \
    75  not acquired: held by someone else, or not within --wait (change it with -E/--conflict-exit-code)\n  \
    76  lease lost (run, hold), or the lease id does not hold the key (renew, release)\n  \
    77  unauthorized: pass a token with --token-file PATH or DISTLOCK_TOKEN\n  \
    1   other failures (serve: cannot start; bench: a check failed or nothing was measured)\n  \
    126/127 (run) the command cannot be executed / was not found\n\n\
    Durations are written like 30s, 500ms, 2m, 1h30m (--wait also takes bare seconds: -w 10).";

/// A duration with a unit: `30s`, `500ms`, `2m`.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write a unit, e.g. 30s, 500ms, 2m)"))
}

/// A duration as `duration`, or bare seconds as flock's `-w` takes them (`10`, `0.5`).
fn wait_duration(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=1e9).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err("must be a duration of 0s or more".into()),
        Err(_) => duration(s),
    }
}

/// Lock options shared by run, acquire and hold.
#[derive(clap::Args)]
struct LockArgs {
    /// Lease TTL, from 100ms to 24h; renewed automatically while held by `run` and `hold`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    ttl: Duration,
    /// Holder label shown in status (default: host/pid).
    #[arg(long)]
    holder: Option<String>,
}

/// How to wait (flock's -w/-n/-E, consul lock's -monitor-retry).
#[derive(clap::Args)]
struct WaitArgs {
    /// How long to wait for the lock: 30s, 2m, or bare seconds (-w 10).
    #[arg(short, long, value_parser = wait_duration, conflicts_with = "nonblock")]
    wait: Option<Duration>,
    /// Do not wait: fail at once if the lock is held (same as --wait 0).
    #[arg(short, long)]
    nonblock: bool,
    /// Exit code when the lock is not acquired (default 75), so it cannot be mistaken for one of
    /// the command's own codes.
    #[arg(short = 'E', long, value_name = "N", value_parser = clap::value_parser!(u8))]
    conflict_exit_code: Option<u8>,
    /// While waiting, how long to keep retrying a backend that is unavailable (a server restart,
    /// a short store outage), with capped back-off (default: as long as the wait).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    retry_unavailable: Option<Duration>,
}

impl WaitArgs {
    /// The policy, with `default` as the wait when none is given (`None`: forever).
    fn policy(&self, default: Option<Duration>) -> WaitPolicy {
        let wait = if self.nonblock { Some(Duration::ZERO) } else { self.wait.or(default) };
        WaitPolicy {
            wait,
            retry_unavailable: self.retry_unavailable,
            conflict_exit_code: self.conflict_exit_code.unwrap_or(EXIT_HELD),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the lock server (HTTP JSON API, durable embedded store by default).
    #[command(after_help = "Examples:\n  \
        distlock serve\n  \
        distlock serve --listen 0.0.0.0:7878 --data-dir /var/lib/distlock --auth-token-file /etc/distlock/tokens\n  \
        distlock serve --store redis://10.0.0.5:6379    # several stateless servers in front of one Redis\n\n\
        Exit status: 0 after a clean shutdown (SIGTERM/SIGINT); 1 when the server cannot start \
        (port in use, unreadable token file, corrupt data directory); 64 for invalid flags.")]
    Serve(ServeArgs),
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
        /// Time between SIGTERM and SIGKILL when the lock is lost.
        #[arg(long, default_value = "10s", value_parser = duration)]
        kill_after: Duration,
        /// Run this string with /bin/sh -c instead of a command after `--` (flock -c).
        #[arg(short = 'c', long = "command", value_name = "STRING", conflicts_with = "argv")]
        shell: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required_unless_present = "shell")]
        argv: Vec<String>,
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
        distlock bench --workload mixed --concurrency 16 --keys 1000 --zipf 1.1 --hold 1ms\n\n\
        Every run checks what it measures: per key, no two holders were inside at once and fencing \
        tokens rose with every grant. Exit status 1 when a check failed, when no cycle completed, or \
        when more calls failed than --max-error-rate allows.")]
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
    /// How long to run (more than 0s).
    #[arg(long, short = 'd', default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Lease TTL.
    #[arg(long, default_value = "10s", value_parser = duration)]
    ttl: Duration,
    /// How long a contended or mixed acquire waits before counting a wait timeout.
    #[arg(long, default_value = "30s", value_parser = duration)]
    wait: Duration,
    /// Time inside the lock before releasing (held as asked, to about 50 µs; the report gives
    /// the hold measured).
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
    /// Fail (exit 1) when more than this percentage of calls failed.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
    max_error_rate: f64,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (host:port, e.g. 127.0.0.1:7878 or 0.0.0.0:7878).
    #[arg(long, env = "DISTLOCK_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "DISTLOCK_DATA_DIR", default_value = "./distlock-data")]
    data_dir: PathBuf,
    /// Keep locks in this store instead of the embedded one: a redis://, redis-sentinel://,
    /// redis-cluster://, redlock:// or etcd:// URL.
    #[arg(long, env = "DISTLOCK_STORE")]
    store: Option<String>,
    /// File of bearer tokens, one per line; when given, every /v1 call and /metrics needs one.
    #[arg(long, env = "DISTLOCK_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// File of admin tokens, one per line: they may force-release any lock (web page, `distlock
    /// force-release`, or POST /v1/admin/locks/{key}/release). Without it force-release is off.
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
    /// How long requests in flight may run after SIGTERM/SIGINT, e.g. 5s.
    #[arg(long, env = "DISTLOCK_SHUTDOWN_GRACE", default_value = "5s", value_parser = duration)]
    shutdown_grace: Duration,
    /// Serve HTTPS only, with this certificate chain (PEM, leaf first); re-read on SIGHUP.
    #[arg(long, env = "DISTLOCK_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM); re-read on SIGHUP.
    #[arg(long, env = "DISTLOCK_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "DISTLOCK_TLS_CLIENT_CA", value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Close a connection that has not sent a whole request's headers this long after it was
    /// accepted or its request began (slow or stalled clients).
    #[arg(long, env = "DISTLOCK_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_timeout: Duration,
    /// Close a kept-alive connection that sends no new request for this long (a request being
    /// answered, such as a waiting acquire, is not idle).
    #[arg(long, env = "DISTLOCK_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    idle_timeout: Duration,
    /// Most connections open at once; more are closed as soon as they are accepted.
    #[arg(long, env = "DISTLOCK_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Requests per second to /v1/* per token (per client IP without --auth-token-file), with
    /// bursts of twice that, e.g. 100/s; more answer 429 with Retry-After. Default: no limit.
    #[arg(long, env = "DISTLOCK_RATE_LIMIT", value_name = "N/s")]
    rate_limit: Option<distlock_server::ratelimit::RateLimit>,
    /// Events kept in memory for the web page and `GET /v1/events?since=` (the timeline keeps its
    /// own bounded spans for up to an hour besides), 1 to 1,000,000.
    #[arg(long, env = "DISTLOCK_EVENT_HISTORY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    event_history: u32,
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

/// The token in a token file: its first line that is neither empty nor a `#` comment.
fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_owned())
        .ok_or_else(|| format!("--token-file {}: no token in the file", path.display()))
}

/// Why the CLI refuses a backend URL before opening it, if it does.
fn refused_backend(url: &str) -> Option<String> {
    if !url.contains("://") {
        return Some(format!(
            "{} is not a backend URL; for a distlock server write http://{url} (or redis://, etcd://…)",
            cli::shown(url)
        ));
    }
    url.starts_with("memory://").then(|| {
        "memory:// keeps locks inside this one distlock process, where no other process can see \
         them; use a lock server (http://HOST:PORT), redis://, redlock:// or etcd://"
            .to_owned()
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; every other parse error is a
            // usage error (64, as documented), not clap's own 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    // The client subcommands report what matters themselves (a lost lease, a retry); the
    // library's own warnings would say it twice.
    let default_log = if matches!(cli.command, Command::Serve(_)) { "info" } else { "error" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    let out = Output { json: cli.json, quiet: cli.quiet, verbose: cli.verbose };
    if let Some(path) = &cli.token_file {
        match read_token_file(path) {
            // Before any thread starts: the http:// backend reads DISTLOCK_TOKEN when it opens.
            Ok(token) => std::env::set_var("DISTLOCK_TOKEN", token),
            Err(e) => return ExitCode::from(out.fail(&distlock::Error::InvalidInput(e))),
        }
    }
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            out.say(format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::Serve(a) => return serve_command(&runtime, a),
        command => runtime.block_on(client(cli.backend, command, out, cli.token_file.is_some())),
    };
    ExitCode::from(code)
}

fn serve_command(runtime: &tokio::runtime::Runtime, a: ServeArgs) -> ExitCode {
    let config_has_tokens = a.auth_token_file.is_some();
    let config = ServerConfig {
        data_dir: a.data_dir,
        store: a.store,
        auth_token_file: a.auth_token_file,
        admin_token_file: a.admin_token_file,
        limits: Limits { max_leases: a.max_leases, max_waiters: a.max_waiters },
        compact_bytes: a.compact_bytes,
        shutdown_grace: a.shutdown_grace,
        net: distlock_server::listener::NetConfig {
            tls: a.tls_cert.zip(a.tls_key).map(|(cert, key)| distlock_server::tls::TlsFiles {
                cert,
                key,
                client_ca: a.tls_client_ca,
            }),
            header_timeout: a.header_timeout,
            idle_timeout: a.idle_timeout,
            max_connections: a.max_connections as usize,
            rate_limit: a.rate_limit,
            rate_limit_by_token: config_has_tokens,
        },
        event_history: a.event_history as usize,
    };
    match runtime.block_on(serve::run(a.listen, config, serve::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "distlock: the server cannot start or stopped with an error: {e:#}"
            );
            ExitCode::FAILURE
        }
    }
}

fn lock_opts(lock: LockArgs) -> AcquireOptions {
    AcquireOptions::new().ttl(lock.ttl).holder(lock.holder.unwrap_or_else(cli::default_holder))
}

/// The client subcommands: open the backend, then one call (or `run`, `hold`, `bench`).
async fn client(backend: String, command: Command, out: Output, token_from_file: bool) -> u8 {
    let bench = matches!(command, Command::Bench(_));
    let refused = refused_backend(&backend).filter(|_| !bench || !backend.starts_with("memory://"));
    if let Some(why) = refused {
        return out.fail(&distlock::Error::InvalidInput(why));
    }
    if let Command::Bench(b) = &command {
        if let Some(e) = bench_input_error(b) {
            return out.fail(&e);
        }
    }
    let locker = match Locker::open(&backend).await {
        Ok(l) => l,
        Err(e) => return out.fail(&e),
    };
    match command {
        Command::Serve(_) => EXIT_USAGE,
        Command::Run { key, lock, wait, kill_after, shell, argv } => {
            let command = match shell {
                Some(s) => vec!["/bin/sh".to_owned(), "-c".to_owned(), s],
                None => argv,
            };
            // A token read from --token-file stays with distlock, not the command it runs.
            let hide_token = token_from_file;
            let config = RunConfig { policy: wait.policy(None), kill_after, command, hide_token };
            distlock_server::run::run(&locker, &key, lock_opts(lock), &config, &out).await
        }
        Command::Acquire { key, lock, wait } => {
            cli::acquire(&locker, &key, lock_opts(lock), &wait.policy(Some(Duration::ZERO)), &out).await
        }
        Command::Hold { key, lock, wait } => {
            cli::hold(&locker, &key, lock_opts(lock), &wait.policy(None), &out).await
        }
        Command::Renew { key, lease, ttl } => cli::renew(&locker, &key, &lease, ttl, &out).await,
        Command::Release { key, lease } => cli::release(&locker, &key, &lease, &out).await,
        Command::ForceRelease { key } => cli::force_release(&locker, &key, &out).await,
        Command::Status { key } => cli::status(&locker, &key, &out).await,
        Command::List { prefix, limit, after } => {
            let query = ListQuery { prefix, after, limit: limit.map(|l| l as usize) };
            cli::list(&locker, &query, &out).await
        }
        Command::Bench(b) => {
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
                max_error_rate: b.max_error_rate / 100.0,
            };
            distlock_server::bench::command(&locker, &backend, &config, b.background_leases, &out).await
        }
    }
}

/// What is wrong with bench's flags beyond what clap checks, if anything.
fn bench_input_error(b: &BenchArgs) -> Option<distlock::Error> {
    let invalid = |m: String| Some(distlock::Error::InvalidInput(m));
    if b.duration.is_zero() {
        return invalid("--duration must be more than 0s".into());
    }
    if let Some(s) = b.zipf.filter(|s| !(s.is_finite() && *s > 0.0)) {
        return invalid(format!("--zipf {s}: must be above 0"));
    }
    if b.hold >= b.duration {
        return invalid(format!("--hold must be shorter than --duration ({})", cli::human(b.duration)));
    }
    if !(b.max_error_rate.is_finite() && (0.0..=100.0).contains(&b.max_error_rate)) {
        return invalid(format!("--max-error-rate {}: must be a percentage from 0 to 100", b.max_error_rate));
    }
    AcquireOptions::new().ttl(b.ttl).validate().err()
}
