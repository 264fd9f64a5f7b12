//! The client subcommands of `distlock` (acquire, hold, renew, release, force-release, status,
//! list), how they print, and the exit codes every subcommand shares.
//!
//! Scripts read this output, so each form has one shape: `acquire` and `hold` print shell-safe
//! assignments for `eval` (every value in POSIX single quotes), `--json` prints one JSON object per
//! result and errors as `{"error":{"code","message","holder"?}}` (the HTTP API's error body), and
//! a closed stdout (`distlock list | head -1`) ends the command quietly instead of panicking.
//!
//! Exit codes (also in `distlock --help`):
//! - 0 success (for `run`: the command's own exit code; 128+N when it died of signal N);
//! - 75 the lock is held by someone else (not acquired within `--wait`), or a server limit;
//!   `-E/--conflict-exit-code` chooses another code for "not acquired";
//! - 76 the lease is lost (expired, released, revoked, or renewal failed while `run` held it),
//!   or the given lease id does not hold the key;
//! - 69 the backend is unavailable; 77 unauthorized or forbidden; 64 invalid input or usage;
//! - 1 anything else (and `serve`: the server cannot start; `bench`: a check failed).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use distlock::wire::ErrorBody;
use distlock::{AcquireOptions, Error, ErrorCode, Lease, LeaseId, ListQuery, LockInfo, Locker, Wait};
use serde::Serialize;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// Exit code: held by another / not acquired in time (the default of `--conflict-exit-code`).
pub const EXIT_HELD: u8 = ErrorCode::LockHeld.exit_code();
/// Exit code: the lease is lost, or the lease id does not hold the key.
pub const EXIT_LOST: u8 = ErrorCode::LeaseLost.exit_code();
/// Exit code: bad input or usage.
pub const EXIT_USAGE: u8 = ErrorCode::InvalidRequest.exit_code();
/// Exit code: any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code when stdout was closed before a lease could be handed over (as a shell reports a
/// process killed by SIGPIPE); the lease is released first.
pub const EXIT_CLOSED_PIPE: u8 = 141;

/// How often a waiting command repeats its "waiting for KEY" line when stderr is not a terminal.
const WAIT_NOTICE_EVERY: Duration = Duration::from_secs(30);
/// How long a wait lasts before it is mentioned at all.
const WAIT_NOTICE_AFTER: Duration = Duration::from_millis(250);
/// First and longest pause between acquire attempts while the backend is unavailable.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A failed attempt that lasted longer than this was connected (calls give up on a silent backend
/// sooner), so the outage it ended is a new one.
const OUTAGE_RESET: Duration = Duration::from_secs(30);

/// The exit code for an error: its code's, from the one table ([`ErrorCode::exit_code`]).
pub fn exit_code(e: &Error) -> u8 {
    e.code().exit_code()
}

/// A duration for people: `850ms`, `1.2s`, `42s`, `4m59s`, `2h5m`, `3d4h`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..=9 => format!("{:.1}s", d.as_secs_f64()),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A key or label as shown in a message: as is, unless it holds spaces or control characters
/// (then quoted and escaped, so a message stays one readable line).
pub fn shown(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| !c.is_whitespace() && !c.is_control()) {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// `s` in POSIX single quotes: safe in `eval` whatever it holds (quotes, `;`, `$()`, newlines).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn held_by(holder: &Option<String>) -> String {
    match holder.as_deref() {
        Some(h) if !h.is_empty() => format!(" (held by {})", shown(h)),
        _ => String::new(),
    }
}

/// One line that says what an error means and, where it helps, what to do.
pub fn describe(e: &Error) -> String {
    match e {
        Error::Held { key, holder: Some(h) } if !h.is_empty() => {
            format!("{} is held by {}", shown(key), shown(h))
        }
        Error::Held { key, .. } => format!("{} is held", shown(key)),
        Error::WaitTimeout { key, holder, waited } => {
            format!("timed out after {} waiting for {}{}", human(*waited), shown(key), held_by(holder))
        }
        Error::LeaseLost { key, reason } => format!("lost the lease on {}: {reason}", shown(key)),
        Error::InvalidInput(m) => format!("invalid input: {m}"),
        Error::Unauthorized(m) if m.starts_with("forbidden") => m.clone(),
        Error::Unauthorized(m) => {
            format!("unauthorized: {m} (pass a token with --token-file PATH or the DISTLOCK_TOKEN variable)")
        }
        Error::LimitExceeded(m) => format!("server limit reached: {m}"),
        Error::LimitMismatch { key, limit } => format!(
            "{} is held with --limit {limit}; every holder of a key must give the same limit",
            shown(key)
        ),
        Error::Unavailable(m) => format!("backend unavailable: {m}"),
        other => other.to_string(),
    }
}

/// How to print.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// One JSON object per result on stdout.
    pub json: bool,
    /// No messages on stderr.
    pub quiet: bool,
    /// More detail on stderr.
    pub verbose: bool,
}

/// Stdout was closed by its reader (EPIPE): nobody reads what follows.
#[derive(Debug)]
pub struct Closed;

impl Output {
    /// A message on stderr unless quiet (a closed stderr is ignored, never a panic).
    pub fn say(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "distlock: {msg}");
        }
    }

    /// One line on stdout, flushed. `Err(Closed)` when the reader has gone.
    pub fn line(&self, text: &str) -> Result<(), Closed> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}").and_then(|()| stdout.flush()).map_err(|_| Closed)
    }

    /// One JSON value as a line on stdout.
    pub fn json_line(&self, value: &impl Serialize) -> Result<(), Closed> {
        // Serializing the plain structs printed here cannot fail.
        self.line(&serde_json::to_string(value).unwrap_or_default())
    }

    /// Prints `e` (its description on stderr; with `--json` also the HTTP API's error body on
    /// stdout) and returns its exit code.
    pub fn fail(&self, e: &Error) -> u8 {
        self.fail_as(e, &describe(e), exit_code(e))
    }

    /// Like [`Output::fail`] with a message and exit code of the caller's choosing.
    pub fn fail_as(&self, e: &Error, message: &str, code: u8) -> u8 {
        if self.json {
            let _ = self.json_line(&error_body(e, message));
        }
        self.say(message);
        code
    }
}

/// The error body of the HTTP API for `e`, with `message` as its text (for `--json`).
pub fn error_body(e: &Error, message: &str) -> ErrorBody {
    ErrorBody { error: e.detail(message) }
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

/// A lease as printed by `acquire`, `hold` and `renew --json`.
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

impl<'a> LeaseOut<'a> {
    /// What to print of `lease`.
    pub fn of(lease: &'a Lease) -> LeaseOut<'a> {
        LeaseOut {
            key: lease.key(),
            lease_id: lease.lease_id().as_str(),
            fencing_token: lease.fencing_token(),
            ttl_ms: lease.ttl().as_millis() as u64,
        }
    }

    /// The shell assignments `eval` reads, named as `run` names its variables.
    pub fn shell(&self) -> String {
        format!(
            "DISTLOCK_KEY={}\nDISTLOCK_LEASE_ID={}\nDISTLOCK_FENCING_TOKEN={}\nDISTLOCK_TTL_MS={}",
            sh_quote(self.key),
            sh_quote(self.lease_id),
            sh_quote(&self.fencing_token.to_string()),
            sh_quote(&self.ttl_ms.to_string())
        )
    }
}

/// Prints a lease for a script: one JSON object, or the shell assignments.
pub fn print_lease(out: &Output, lease: &Lease) -> Result<(), Closed> {
    let o = LeaseOut::of(lease);
    if out.json {
        out.json_line(&o)
    } else {
        out.line(&o.shell())
    }
}

/// How long an acquire waits, and how it treats an unavailable backend meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    /// How long to wait for the lock.
    pub wait: Wait,
    /// How long to keep retrying while the backend is unavailable (`None`: as long as the wait).
    pub retry_unavailable: Option<Duration>,
    /// Exit code for "not acquired".
    pub conflict_exit_code: u8,
}

/// Tells a waiting caller why it sits still: a spinner on a terminal, else a line on stderr once
/// the wait has lasted [`WAIT_NOTICE_AFTER`] and every [`WAIT_NOTICE_EVERY`] after (so cron logs
/// show it too).
fn wait_notices(locker: &Locker, key: &str, out: &Output) -> tokio::task::JoinHandle<()> {
    let (locker, key, out) = (locker.clone(), key.to_owned(), *out);
    tokio::spawn(async move {
        // Quiet when the lock comes at once: this task is aborted before it says anything.
        tokio::time::sleep(WAIT_NOTICE_AFTER).await;
        let holder = locker.status(&key).await.ok().and_then(|s| s.holder);
        let by = holder.map(|h| format!(", held by {}", shown(&h))).unwrap_or_default();
        let what = format!("waiting for {}{by}", shown(&key));
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.set_message(what);
            // The bar clears itself when this task is aborted and the bar dropped.
            let _clear = ClearOnDrop(bar.clone());
            loop {
                bar.tick();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        out.say(&what);
        let start = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(WAIT_NOTICE_EVERY).await;
            let holder = locker.status(&key).await.ok().and_then(|s| s.holder);
            out.say(format!(
                "still waiting for {}{} after {}",
                shown(&key),
                held_by(&holder),
                human(start.elapsed())
            ));
        }
    })
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Acquires `key`, waiting as `policy` says: status lines while waiting (unless quiet), and
/// `Unavailable` retried with capped back-off while the wait and the retry budget last.
pub async fn acquire_waiting(
    locker: &Locker,
    key: &str,
    opts: &AcquireOptions,
    policy: &WaitPolicy,
    out: &Output,
) -> distlock::Result<Lease> {
    let start = tokio::time::Instant::now();
    // A wait too long to add to the clock is a wait forever.
    let deadline = policy.wait.deadline(start);
    let waits = policy.wait.waits();
    let notices = (waits && !out.quiet).then(|| wait_notices(locker, key, out));
    let mut backoff = RETRY_FIRST;
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut said: Option<tokio::time::Instant> = None;
    let result = loop {
        let now = tokio::time::Instant::now();
        let attempt_started = now;
        let opts = match deadline {
            Some(d) => opts.clone().wait(d.saturating_duration_since(now)),
            None => opts.clone().wait_forever(),
        };
        match locker.acquire(key, &opts).await {
            Err(Error::Unavailable(cause)) => {
                let now = tokio::time::Instant::now();
                // An attempt that waited a long time before failing was connected: the backend
                // was up, so a new outage (and a new retry budget) starts here.
                if now - attempt_started > OUTAGE_RESET {
                    (down_since, backoff) = (None, RETRY_FIRST);
                }
                let since = *down_since.get_or_insert(now);
                let budget = policy.retry_unavailable.or(policy.wait.limit());
                let retry_until = budget.and_then(|b| since.checked_add(b));
                let next = now + backoff;
                let in_wait = deadline.is_none_or(|d| next < d);
                let in_budget = retry_until.is_none_or(|r| next < r);
                if !(waits && in_wait && in_budget) {
                    break Err(Error::Unavailable(cause));
                }
                // Once when the outage starts, then as often as the waiting line, not every retry.
                if said.is_none_or(|t: tokio::time::Instant| t.elapsed() >= WAIT_NOTICE_EVERY) {
                    out.say(format!("backend unavailable ({cause}); retrying in {}", human(backoff)));
                    said = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(Error::WaitTimeout { key, holder, .. }) => {
                break Err(Error::WaitTimeout { key, holder, waited: start.elapsed() })
            }
            other => break other,
        }
    };
    if let Some(n) = notices {
        n.abort();
        let _ = n.await;
    }
    result
}

/// `distlock acquire`: takes the lock and leaves it held (no renewal) for another command to
/// renew or release by its lease id.
pub async fn acquire(
    locker: &Locker,
    key: &str,
    opts: AcquireOptions,
    policy: &WaitPolicy,
    out: &Output,
) -> u8 {
    match acquire_waiting(locker, key, &opts.auto_renew(false), policy, out).await {
        Ok(lease) => {
            if print_lease(out, &lease).is_err() {
                // Nobody received the lease id, so nobody could ever release it: give it back.
                let _ = lease.release().await;
                return EXIT_CLOSED_PIPE;
            }
            // Leave the lease held: it is released by `distlock release` or expires by its TTL.
            std::mem::forget(lease);
            0
        }
        Err(e) => not_acquired(&e, policy, out),
    }
}

/// Reports a failed acquire; "not acquired" exits with the caller's conflict code.
pub fn not_acquired(e: &Error, policy: &WaitPolicy, out: &Output) -> u8 {
    match e {
        Error::Held { .. } | Error::WaitTimeout { .. } => {
            out.fail_as(e, &format!("not acquired: {}", describe(e)), policy.conflict_exit_code)
        }
        _ => out.fail(e),
    }
}

/// `distlock hold`: acquires, prints the lease as `acquire` does, keeps it renewed until
/// SIGINT/SIGTERM/SIGHUP (then releases, exit 0) or until it is lost (exit 76).
pub async fn hold(locker: &Locker, key: &str, opts: AcquireOptions, policy: &WaitPolicy, out: &Output) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut sigint), Ok(mut sigterm), Ok(mut sighup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        out.say("cannot install signal handlers");
        return EXIT_FAILURE;
    };
    // A signal while waiting ends the wait (nothing is held yet, nothing to release).
    let acquired = tokio::select! {
        r = acquire_waiting(locker, key, &opts, policy, out) => r,
        _ = sigint.recv() => return 128 + 2,
        _ = sigterm.recv() => return 128 + 15,
        _ = sighup.recv() => return 128 + 1,
    };
    let lease = match acquired {
        Ok(lease) => lease,
        Err(e) => return not_acquired(&e, policy, out),
    };
    if print_lease(out, &lease).is_err() {
        let _ = lease.release().await;
        return EXIT_CLOSED_PIPE;
    }
    if out.verbose {
        out.say(format!("holding {} until SIGINT or SIGTERM", shown(lease.key())));
    }
    let mut watch = lease.watch();
    tokio::select! {
        reason = watch.lost() => {
            let reason = reason.map_or_else(|| "released".to_owned(), |r| r.to_string());
            out.say(format!("lost the lock on {}: {reason}", shown(key)));
            return EXIT_LOST;
        }
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        _ = sighup.recv() => {}
    }
    match lease.release().await {
        Ok(()) => {
            if out.verbose {
                out.say(format!("released {}", shown(key)));
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}

/// A renew or release refused because `lease_id` does not hold `key`: says who holds it now.
async fn not_holder(locker: &Locker, key: &str, e: &Error, out: &Output) -> u8 {
    if !e.is_lease_lost() {
        return out.fail(e);
    }
    let now = match locker.status(key).await {
        Ok(info) if info.held => held_by(&info.holder).replacen(" (", " (now ", 1),
        Ok(_) => " (it is free now)".to_owned(),
        Err(_) => String::new(),
    };
    out.fail_as(e, &format!("this lease id does not hold {}{now}", shown(key)), EXIT_LOST)
}

fn lease_id(lease: &str) -> distlock::Result<LeaseId> {
    LeaseId::parse(lease).map_err(|_| {
        Error::InvalidInput("--lease: not a lease id (32 hex characters, as acquire prints)".into())
    })
}

/// `distlock renew`: `ttl` `None` keeps the lease's own TTL.
pub async fn renew(locker: &Locker, key: &str, lease: &str, ttl: Option<Duration>, out: &Output) -> u8 {
    let lease_id = match lease_id(lease) {
        Ok(id) => id,
        Err(e) => return out.fail(&e),
    };
    match locker.renew_lease(key, &lease_id, ttl).await {
        Ok(grant) => {
            let ttl_ms = grant.ttl.as_millis() as u64;
            if out.json {
                let o =
                    LeaseOut { key, lease_id: lease_id.as_str(), fencing_token: grant.fencing_token, ttl_ms };
                let _ = out.json_line(&o);
            } else if out.verbose {
                out.say(format!(
                    "renewed {} for {} (fencing token {})",
                    shown(key),
                    human(grant.ttl),
                    grant.fencing_token
                ));
            }
            0
        }
        Err(e) => not_holder(locker, key, &e, out).await,
    }
}

/// `distlock release`.
pub async fn release(locker: &Locker, key: &str, lease: &str, out: &Output) -> u8 {
    let lease_id = match lease_id(lease) {
        Ok(id) => id,
        Err(e) => return out.fail(&e),
    };
    match locker.release_lease(key, &lease_id).await {
        Ok(()) => {
            if out.json {
                let _ = out.json_line(&serde_json::json!({"key": key, "released": true}));
            } else if out.verbose {
                out.say(format!("released {}", shown(key)));
            }
            0
        }
        Err(e) => not_holder(locker, key, &e, out).await,
    }
}

/// `distlock force-release`: frees the lock whoever holds it (needs the server's admin token).
/// Exit 0 also when the lock was already free (it is free either way).
pub async fn force_release(locker: &Locker, key: &str, out: &Output) -> u8 {
    match locker.force_release(key).await {
        Ok(freed) => {
            let holder = freed.as_ref().and_then(|f| f.holder.clone());
            let token = freed.as_ref().and_then(|f| f.fencing_token);
            if out.json {
                let body = serde_json::json!({
                    "key": key, "released": freed.is_some(), "holder": holder, "fencing_token": token
                });
                let _ = out.json_line(&body);
            } else if freed.is_some() {
                out.say(format!(
                    "released {}{} (fencing token {})",
                    shown(key),
                    held_by(&holder).replacen("held", "was held", 1),
                    token.unwrap_or(0)
                ));
            } else {
                out.say(format!("{} was not held", shown(key)));
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}

fn human_status(info: &LockInfo) -> String {
    if !info.held {
        return format!("{}: free ({} waiting)", shown(&info.key), info.waiters);
    }
    if info.limit.is_some() || info.mode.is_some() {
        let holders: Vec<String> = info
            .holders
            .iter()
            .map(|h| {
                format!(
                    "{} (token {}, expires in {})",
                    shown(&h.holder),
                    h.fencing_token,
                    human(h.expires_in)
                )
            })
            .collect();
        let count = match info.limit {
            Some(limit) => format!("{} / {limit} held", info.holders.len()),
            None => format!("held shared ({})", info.holders.len()),
        };
        return format!("{}: {count} by {}, {} waiting", shown(&info.key), holders.join(", "), info.waiters);
    }
    let held_for = info.held_for.map(|d| format!(" for {}", human(d))).unwrap_or_default();
    let value = info.value.as_deref().map(|v| format!(", value {}", shown(v))).unwrap_or_default();
    format!(
        "{}: held by {}{held_for} (fencing token {}){value}, expires in {}, {} waiting",
        shown(&info.key),
        shown(info.holder.as_deref().unwrap_or("?")),
        info.fencing_token.unwrap_or(0),
        human(info.expires_in.unwrap_or_default()),
        info.waiters
    )
}

/// `distlock status`: exit 0 whether held or not.
pub async fn status(locker: &Locker, key: &str, out: &Output) -> u8 {
    match locker.status(key).await {
        Ok(info) => {
            let _ = if out.json { out.json_line(&info) } else { out.line(&human_status(&info)) };
            0
        }
        Err(e) => out.fail(&e),
    }
}

/// The one JSON shape of `leader --json`: the key, and the leader's value, holder and fencing
/// token (`null` when nobody leads).
#[derive(Serialize)]
struct LeaderLine<'a> {
    key: &'a str,
    value: Option<&'a str>,
    holder: Option<&'a str>,
    fencing_token: Option<u64>,
}

/// Prints one leader (or none) as `leader` does; `Err` when stdout is closed.
fn print_leader(
    key: &str,
    leader: Option<&distlock::Leader>,
    watching: bool,
    out: &Output,
) -> Result<(), Closed> {
    if out.json {
        return out.json_line(&LeaderLine {
            key,
            value: leader.map(|l| l.value.as_str()),
            holder: leader.map(|l| l.holder.as_str()),
            fencing_token: leader.map(|l| l.fencing_token),
        });
    }
    match (leader, watching) {
        // The value alone, as published, for `$(distlock leader KEY)`.
        (Some(l), false) => out.line(&l.value),
        // One line per change: control characters in the value are shown escaped.
        (Some(l), true) => out.line(&format!(
            "{} (holder {}, fencing token {})",
            shown(&l.value),
            shown(&l.holder),
            l.fencing_token
        )),
        (None, true) => out.line("no leader"),
        (None, false) => Ok(()),
    }
}

/// `distlock leader KEY [--watch]`: the leader's value now, or every change until a signal.
pub async fn leader(locker: &Locker, key: &str, watch: bool, out: &Output) -> u8 {
    if let Err(e) = distlock::validate::key(key) {
        return out.fail(&e);
    }
    if !watch {
        return match locker.leader(key).await {
            Ok(leader) => {
                if print_leader(key, leader.as_ref(), false, out).is_err() {
                    return 0;
                }
                if leader.is_none() {
                    out.say(format!("no leader of {}", shown(key)));
                    return 1;
                }
                0
            }
            Err(e) => out.fail(&e),
        };
    }
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut sigint), Ok(mut sigterm)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        out.say("cannot install signal handlers");
        return 1;
    };
    let quiet = *out;
    let mut changes = locker.observe(key).on_outage(move |why, retry| {
        quiet.say(format!("cannot reach the store ({why}); trying again in {}", human(retry)));
    });
    loop {
        let next = tokio::select! {
            next = changes.next() => next,
            _ = sigint.recv() => return 0,
            _ = sigterm.recv() => return 0,
        };
        match next {
            Ok(leader) => {
                if print_leader(key, leader.as_ref(), true, out).is_err() {
                    // Nobody reads any more (`| head -1`): done.
                    return 0;
                }
            }
            Err(e) => return out.fail(&e),
        }
    }
}

/// `s` cut to at most `width` display columns, ending in `…` when cut.
pub fn fit(s: &str, width: usize) -> String {
    if s.width() <= width {
        return s.to_owned();
    }
    let mut cut = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        cut.push(c);
        used += w;
    }
    cut.push('…');
    cut
}

/// `s` padded with spaces to `width` display columns.
fn pad(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.width())))
}

/// Widest key and holder columns of the `list` table.
const KEY_COLUMN: usize = 48;
const HOLDER_COLUMN: usize = 32;

/// The `list` table: columns aligned by display width, long keys and holders cut with `…`.
pub fn table(locks: &[LockInfo]) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>();
    let rows: Vec<[String; 5]> = locks
        .iter()
        .map(|l| {
            [
                fit(&clean(&l.key), KEY_COLUMN),
                fit(&clean(l.holder.as_deref().unwrap_or("")), HOLDER_COLUMN),
                l.fencing_token.map(|t| t.to_string()).unwrap_or_default(),
                l.expires_in.map(human).unwrap_or_default(),
                l.waiters.to_string(),
            ]
        })
        .collect();
    let head = ["KEY", "HOLDER", "TOKEN", "EXPIRES", "WAITING"].map(str::to_owned);
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().chain([&head]).map(|r| r[i].width()).max().unwrap_or(0)).collect();
    let mut text = String::new();
    for row in [&head].into_iter().chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| if i < 2 { pad(c, *w) } else { format!("{}{c}", " ".repeat(w - c.width())) })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text.pop();
    text
}

/// `distlock list`: a table, or with `--json` the HTTP API's shape `{"locks":[…],"next":…}`.
pub async fn list(locker: &Locker, query: &ListQuery, out: &Output) -> u8 {
    match locker.list_page(query).await {
        Ok(page) => {
            let _ = if out.json { out.json_line(&page) } else { out.line(&table(&page.locks)) };
            if let (Some(next), false) = (&page.next, out.json) {
                out.say(format!("more locks follow: list --after {}", sh_quote(next)));
            }
            0
        }
        Err(e) => out.fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        let d = Duration::from_millis;
        assert_eq!(human(d(850)), "850ms");
        assert_eq!(human(d(1_240)), "1.2s");
        assert_eq!(human(d(2_000)), "2.0s");
        assert_eq!(human(d(42_000)), "42s");
        assert_eq!(human(d(299_000)), "4m59s");
        assert_eq!(human(d(7_500_000)), "2h5m");
        assert_eq!(human(d(100_000_000)), "1d3h");
    }

    #[test]
    fn single_quotes_survive_everything() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote("$(x);y"), "'$(x);y'");
    }

    #[test]
    fn cut_by_display_width() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("日本語のキー", 5), "日本…");
        assert_eq!(fit("short", 10), "short");
        let t = table(&[LockInfo::free("日本", 0), LockInfo::free("ab", 3)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[1].width(), lines[2].width(), "{t}");
    }
}
