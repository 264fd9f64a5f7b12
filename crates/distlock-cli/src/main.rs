//! The `distlock` binary: parses the command line (`args.rs`) and dispatches once, to the server
//! (`distlock serve`: [`distlock_server::serve::run`]) or to a client subcommand
//! ([`distlock_cli`]).

mod args;

use std::process::ExitCode;

use clap::Parser;

use args::{BenchArgs, Cli, ClientCommand, Command, LockArgs, ServeArgs};
use distlock::{AcquireOptions, ListQuery, Locker, Wait};
use distlock_cli::cli::{self, Output, EXIT_USAGE};
use distlock_server::serve::{self, ServerConfig};
use distlock_server::store::Limits;

/// mimalloc: the server and the bench allocate small, short-lived buffers per request, where
/// glibc's allocator cost a noticeable share of the server's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    match cli.command {
        Command::Serve(a) => serve_command(&runtime, a),
        Command::Client(command) => {
            ExitCode::from(runtime.block_on(client(cli.backend, command, out, cli.token_file.is_some())))
        }
    }
}

fn serve_command(runtime: &tokio::runtime::Runtime, a: ServeArgs) -> ExitCode {
    let listen = a.listen;
    let config = server_config(a);
    match runtime.block_on(serve::run(listen, config, shutdown_signal())) {
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

/// The server's settings from `serve`'s flags.
fn server_config(a: ServeArgs) -> ServerConfig {
    let config_has_tokens = a.auth_token_file.is_some();
    ServerConfig {
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
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn lock_opts(lock: LockArgs) -> AcquireOptions {
    let opts = AcquireOptions::new()
        .ttl(lock.ttl)
        .limit(lock.limit)
        .holder(lock.holder.unwrap_or_else(cli::default_holder));
    if lock.shared {
        opts.shared()
    } else {
        opts
    }
}

/// The client subcommands: open the backend, then one call (or `run`, `hold`, `bench`).
async fn client(backend: String, command: ClientCommand, out: Output, token_from_file: bool) -> u8 {
    let bench = matches!(command, ClientCommand::Bench(_));
    let refused = refused_backend(&backend).filter(|_| !bench || !backend.starts_with("memory://"));
    if let Some(why) = refused {
        return out.fail(&distlock::Error::InvalidInput(why));
    }
    if let ClientCommand::Bench(b) = &command {
        if let Some(e) = bench_input_error(b) {
            return out.fail(&e);
        }
    }
    let locker = match Locker::open(&backend).await {
        Ok(l) => l,
        Err(e) => return out.fail(&e),
    };
    match command {
        ClientCommand::Run { key, lock, wait, command } => {
            // A token read from --token-file stays with distlock, not the command it runs.
            let config = command.config(&wait, token_from_file);
            distlock_cli::run::run(&locker, &key, lock_opts(lock), &config, &out).await
        }
        ClientCommand::Elect { key, value, ttl, holder, wait, command } => {
            let config = command.config(&wait, token_from_file);
            let opts = AcquireOptions::new()
                .ttl(ttl)
                .holder(holder.unwrap_or_else(cli::default_holder))
                .value(value);
            distlock_cli::run::run(&locker, &key, opts, &config, &out).await
        }
        ClientCommand::Leader { key, watch } => cli::leader(&locker, &key, watch, &out).await,
        ClientCommand::Acquire { key, lock, wait } => {
            cli::acquire(&locker, &key, lock_opts(lock), &wait.policy(Wait::TryOnce), &out).await
        }
        ClientCommand::Hold { key, lock, wait } => {
            cli::hold(&locker, &key, lock_opts(lock), &wait.policy(Wait::Forever), &out).await
        }
        ClientCommand::Renew { key, lease, ttl } => cli::renew(&locker, &key, &lease, ttl, &out).await,
        ClientCommand::Release { key, lease } => cli::release(&locker, &key, &lease, &out).await,
        ClientCommand::ForceRelease { key } => cli::force_release(&locker, &key, &out).await,
        ClientCommand::Status { key } => cli::status(&locker, &key, &out).await,
        ClientCommand::List { prefix, limit, after } => {
            let query = ListQuery { prefix, after, limit: limit.map(|l| l as usize) };
            cli::list(&locker, &query, &out).await
        }
        ClientCommand::Bench(b) => {
            let config = distlock_cli::bench::BenchConfig {
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
                limit: b.limit,
                shared: b.shared,
                writers: b.writers as usize,
            };
            distlock_cli::bench::command(&locker, &backend, &config, b.background_leases, &out).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `distlock serve` without flags and `ServerConfig::new` (what a program embedding the
    /// server starts from) are the same server: the defaults are written twice and must agree.
    #[test]
    fn serve_flag_defaults_are_the_library_defaults() {
        let Command::Serve(a) = Cli::try_parse_from(["distlock", "serve"]).expect("parses").command else {
            panic!("not serve");
        };
        assert_eq!(a.listen.to_string(), "127.0.0.1:7878");
        let (flags, library) = (server_config(a), ServerConfig::new("./distlock-data"));
        assert_eq!(format!("{flags:?}"), format!("{library:?}"));
    }
}
