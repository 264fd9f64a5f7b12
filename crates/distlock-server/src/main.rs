//! The `distlock` binary: command-line parsing only; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use distlock_server::serve::{self, ServeConfig};
use distlock_server::store::Limits;

/// Distributed locks: a lock server, and a client for every distlock backend.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DISTLOCK_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "DISTLOCK_DATA_DIR", default_value = "./distlock-data")]
    data_dir: PathBuf,
    /// Keep locks in this store instead of the embedded one: a redis:// or redlock:// URL.
    #[arg(long, env = "DISTLOCK_STORE")]
    store: Option<String>,
    /// File of bearer tokens, one per line; when given, every /v1 call and /metrics needs one.
    #[arg(long, env = "DISTLOCK_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(a) => {
                let config = ServeConfig {
                    listen: a.listen,
                    data_dir: a.data_dir,
                    store: a.store,
                    auth_token_file: a.auth_token_file,
                    limits: Limits { max_leases: a.max_leases, max_waiters: a.max_waiters },
                    compact_bytes: a.compact_bytes,
                    shutdown_grace: a.shutdown_grace,
                };
                serve::run(config, serve::shutdown_signal()).await
            }
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
