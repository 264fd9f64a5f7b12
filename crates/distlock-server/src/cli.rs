//! The client subcommands of `distlock` (acquire, renew, release, status, list), their output,
//! and the exit codes every subcommand shares.
//!
//! Exit codes (also in `distlock --help`):
//! - 0 success (for `run`: the command's own exit code; 128+N when it died of signal N);
//! - 75 the lock is held by someone else (not acquired within `--wait`), or a server limit;
//! - 76 the lease is lost (expired, released, revoked, or renewal failed while `run` held it);
//! - 69 the backend is unavailable; 77 unauthorized; 64 invalid input; 1 anything else.

use std::io::IsTerminal;
use std::time::Duration;

use distlock::{Error, LeaseId, LockInfo, Locker};
use serde::Serialize;

/// Exit code: held by another / not acquired in time.
pub const EXIT_HELD: u8 = 75;
/// Exit code: the lease is lost.
pub const EXIT_LOST: u8 = 76;
/// Exit code: backend unavailable.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code: bad input.
pub const EXIT_USAGE: u8 = 64;
/// Exit code: unauthorized.
pub const EXIT_NOPERM: u8 = 77;

/// The exit code for an error.
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Held { .. } | Error::WaitTimeout { .. } | Error::LimitExceeded(_) => EXIT_HELD,
        Error::LeaseLost { .. } => EXIT_LOST,
        Error::Unavailable(_) => EXIT_UNAVAILABLE,
        Error::InvalidInput(_) => EXIT_USAGE,
        Error::Unauthorized(_) => EXIT_NOPERM,
        _ => 1,
    }
}

/// How to print.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON object (or array) on stdout.
    pub json: bool,
    /// No messages on stderr.
    pub quiet: bool,
    /// More detail on stderr.
    pub verbose: bool,
}

impl Output {
    /// A message on stderr unless quiet.
    pub fn say(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("distlock: {msg}");
        }
    }

    /// Prints `e` and returns its exit code.
    pub fn fail(&self, e: &Error) -> u8 {
        if self.json {
            let body = serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}});
            println!("{body}");
        }
        self.say(e);
        exit_code(e)
    }
}

/// Host name and pid, the default holder label.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}/pid-{}", std::process::id())
}

/// A lease as printed by `acquire` and `renew --json`.
#[derive(Serialize)]
pub struct LeaseOut<'a> {
    /// The key.
    pub key: &'a str,
    /// The secret lease id.
    pub lease_id: &'a str,
    /// The fencing token.
    pub fencing_token: u64,
    /// The TTL in ms.
    pub ttl_ms: u64,
}

/// A spinner on stderr while waiting, only when stderr is a terminal and not quiet.
pub fn spinner(out: &Output, key: &str, holder: Option<&str>) -> Option<indicatif::ProgressBar> {
    if out.quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})").ok()?;
    bar.set_style(style);
    let by = holder.map(|h| format!(", held by {h}")).unwrap_or_default();
    bar.set_message(format!("waiting for {key}{by}"));
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// Acquires, with a spinner on the terminal while waiting (holder read once, up front).
pub async fn acquire_showing_wait(
    locker: &Locker,
    key: &str,
    opts: &distlock::AcquireOptions,
    out: &Output,
) -> distlock::Result<distlock::Lease> {
    let bar = if opts.wait != Some(Duration::ZERO) {
        let holder = locker.status(key).await.ok().and_then(|s| s.holder);
        spinner(out, key, holder.as_deref())
    } else {
        None
    };
    let result = locker.acquire(key, opts).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// `distlock acquire`: takes the lock and leaves it held (no renewal) for another command to
/// renew or release by its lease id.
pub async fn acquire(locker: &Locker, key: &str, opts: distlock::AcquireOptions, out: &Output) -> u8 {
    match acquire_showing_wait(locker, key, &opts.auto_renew(false), out).await {
        Ok(lease) => {
            let ttl_ms = lease.ttl().as_millis() as u64;
            if out.json {
                let o = LeaseOut {
                    key: lease.key(),
                    lease_id: lease.lease_id().as_str(),
                    fencing_token: lease.fencing_token(),
                    ttl_ms,
                };
                println!("{}", serde_json::to_string(&o).unwrap_or_default());
            } else {
                println!(
                    "key={} lease_id={} fencing_token={} ttl_ms={ttl_ms}",
                    lease.key(),
                    lease.lease_id(),
                    lease.fencing_token()
                );
            }
            // Leave the lease held: it is released by `distlock release` or expires by its TTL.
            std::mem::forget(lease);
            0
        }
        Err(e) => out.fail(&e),
    }
}

/// `distlock renew`.
pub async fn renew(locker: &Locker, key: &str, lease: &str, ttl: Duration, out: &Output) -> u8 {
    let lease_id = match LeaseId::parse(lease) {
        Ok(id) => id,
        Err(e) => return out.fail(&e),
    };
    match locker.renew_lease(key, &lease_id, ttl).await {
        Ok(grant) => {
            let ttl_ms = grant.ttl.as_millis() as u64;
            if out.json {
                let o =
                    LeaseOut { key, lease_id: lease_id.as_str(), fencing_token: grant.fencing_token, ttl_ms };
                println!("{}", serde_json::to_string(&o).unwrap_or_default());
            } else if out.verbose {
                out.say(format!("renewed {key} for {ttl_ms} ms (fencing token {})", grant.fencing_token));
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}

/// `distlock release`.
pub async fn release(locker: &Locker, key: &str, lease: &str, out: &Output) -> u8 {
    let lease_id = match LeaseId::parse(lease) {
        Ok(id) => id,
        Err(e) => return out.fail(&e),
    };
    match locker.release_lease(key, &lease_id).await {
        Ok(()) => {
            if out.json {
                println!("{}", serde_json::json!({"key": key, "released": true}));
            } else if out.verbose {
                out.say(format!("released {key}"));
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}

fn human(info: &LockInfo) -> String {
    if !info.held {
        return format!("{}: free ({} waiting)", info.key, info.waiters);
    }
    format!(
        "{}: held by {} (fencing token {}), expires in {}, {} waiting",
        info.key,
        info.holder.as_deref().unwrap_or("?"),
        info.fencing_token.unwrap_or(0),
        humantime::format_duration(Duration::from_millis(
            info.expires_in.map_or(0, |d| d.as_millis() as u64)
        )),
        info.waiters
    )
}

/// `distlock status`: exit 0 whether held or not.
pub async fn status(locker: &Locker, key: &str, out: &Output) -> u8 {
    match locker.status(key).await {
        Ok(info) if out.json => {
            println!("{}", serde_json::to_string(&info).unwrap_or_default());
            0
        }
        Ok(info) => {
            println!("{}", human(&info));
            0
        }
        Err(e) => out.fail(&e),
    }
}

/// `distlock list`: a table, or a JSON array with `--json`.
pub async fn list(locker: &Locker, prefix: &str, out: &Output) -> u8 {
    match locker.list(prefix).await {
        Ok(locks) if out.json => {
            println!("{}", serde_json::to_string(&locks).unwrap_or_default());
            0
        }
        Ok(locks) => {
            let width = locks.iter().map(|l| l.key.len()).max().unwrap_or(3).max(3);
            println!(
                "{:width$}  {:<24}  {:>8}  {:>10}  {:>7}",
                "KEY", "HOLDER", "TOKEN", "EXPIRES", "WAITING"
            );
            for l in &locks {
                let expires = format!("{:.1}s", l.expires_in.unwrap_or_default().as_secs_f64());
                println!(
                    "{:width$}  {:<24}  {:>8}  {:>10}  {:>7}",
                    l.key,
                    l.holder.as_deref().unwrap_or(""),
                    l.fencing_token.unwrap_or(0),
                    expires,
                    l.waiters
                );
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}
