//! `distlock run KEY -- CMD...`: hold a lock while a command runs, like `flock(1)` across hosts.
//!
//! Acquires (waiting up to `--wait`, default forever, retrying an unavailable backend meanwhile),
//! starts CMD with `DISTLOCK_KEY`, `DISTLOCK_FENCING_TOKEN`, `DISTLOCK_LEASE_ID` and
//! `DISTLOCK_TTL_MS` in its environment, keeps the lease renewed, passes SIGINT/SIGTERM/SIGHUP on
//! to everything CMD started, releases when CMD exits and exits with CMD's code (128+N if a signal
//! N killed it). If the lease is lost while CMD runs, every process CMD started gets SIGTERM, then
//! SIGKILL after `--kill-after`, and distlock exits 76 (see [`crate::child`] for how "every
//! process" is found). Unlike `etcdctl lock`, a lost lock stops the command.
//!
//! `distlock elect KEY --value V -- CMD...` is the same with a value published: CMD runs only
//! while this process leads, and also sees `DISTLOCK_LEADER_VALUE`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use distlock::{AcquireOptions, Error, Locker};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::child;
use distlock::wire::ErrorBody;

use crate::cli::{acquire_waiting, describe, error_body, not_acquired, shown, Output, WaitPolicy, EXIT_LOST};

/// What `run` is asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// How long to wait, retry and what "not acquired" exits with.
    pub policy: WaitPolicy,
    /// Time between SIGTERM and SIGKILL when the lease is lost.
    pub kill_after: Duration,
    /// The program and its arguments (`-c STRING` becomes `/bin/sh -c STRING`).
    pub command: Vec<String>,
    /// Keep `DISTLOCK_TOKEN` out of the command's environment (distlock set it from
    /// `--token-file`, so the command never had it).
    pub hide_token: bool,
}

/// The one JSON line `run --json` prints when it ends.
#[derive(Serialize)]
struct RunReport<'a> {
    key: &'a str,
    /// `ok` (the command ran; its code is `exit_code`), `not_acquired`, `lost`, `unavailable`,
    /// or `error` (any other failure, described by `error`).
    outcome: &'static str,
    fencing_token: Option<u64>,
    waited_ms: u64,
    held_ms: Option<u64>,
    exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

/// Runs the command under the lock on `key`; returns the exit code for distlock.
pub async fn run(locker: &Locker, key: &str, opts: AcquireOptions, config: &RunConfig, out: &Output) -> u8 {
    let started = Instant::now();
    let Some((program, args)) = config.command.split_first() else {
        out.say(
            "no command given: distlock run KEY -- CMD [ARGS...]  or  distlock run KEY -c 'shell command'",
        );
        return crate::cli::EXIT_USAGE;
    };
    // Human messages go to stderr; with --json the one report line is the only thing on stdout.
    let quiet_out = Output { json: false, ..*out };
    let report = |outcome, token, held: Option<Duration>, code, error: Option<&Error>| {
        if !out.json {
            return;
        }
        let message = error.map(describe);
        let r = RunReport {
            key,
            outcome,
            fencing_token: token,
            waited_ms: 0,
            held_ms: held.map(|h| h.as_millis() as u64),
            exit_code: code,
            error: error.zip(message.as_deref()).map(|(e, m)| error_body(e, m)),
        };
        let waited = held.map_or(started.elapsed(), |h| started.elapsed().saturating_sub(h));
        let _ = out.json_line(&RunReport { waited_ms: waited.as_millis() as u64, ..r });
    };
    let lease = match acquire_waiting(locker, key, &opts, &config.policy, &quiet_out).await {
        Ok(lease) => lease,
        Err(e) => {
            let code = not_acquired(&e, &config.policy, &quiet_out);
            let outcome = match e {
                Error::Held { .. } | Error::WaitTimeout { .. } => "not_acquired",
                Error::Unavailable(_) => "unavailable",
                _ => "error",
            };
            report(outcome, None, None, code, Some(&e));
            return code;
        }
    };
    let held_since = Instant::now();
    let token = Some(lease.fencing_token());
    if out.verbose {
        out.say(format!(
            "acquired {} (fencing token {}); running {program}",
            shown(key),
            lease.fencing_token()
        ));
    }
    // Listen before starting the child, so no signal between the two is lost.
    let (Ok(mut sigint), Ok(mut sigterm), Ok(mut sighup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        out.say("cannot install signal handlers");
        let _ = lease.release().await;
        return 1;
    };
    if let Err(e) = child::become_subreaper() {
        tracing::debug!(error = %e, "cannot become a child subreaper; daemonised processes are not tracked");
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("DISTLOCK_KEY", lease.key())
        .env("DISTLOCK_FENCING_TOKEN", lease.fencing_token().to_string())
        .env("DISTLOCK_LEASE_ID", lease.lease_id().as_str())
        .env("DISTLOCK_TTL_MS", lease.ttl().as_millis().to_string());
    if let Some(value) = &opts.value {
        cmd.env("DISTLOCK_LEADER_VALUE", value);
    }
    if config.hide_token {
        cmd.env_remove("DISTLOCK_TOKEN");
    }
    let started_as = child::configure(&mut cmd);
    let mut process = match cmd.spawn() {
        Ok(p) => p,
        Err(e) => {
            out.say(format!("cannot run {program}: {e}"));
            let _ = lease.release().await;
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            report("error", token, Some(held_since.elapsed()), code, None);
            return code;
        }
    };
    let Some(pid) = process.id().map(|id| Pid::from_raw(id as i32)) else {
        out.say(format!("{program} exited before it could be watched"));
        let _ = lease.release().await;
        return 1;
    };
    let group = child::group_of(started_as, pid);
    let forward = |sig: Signal| {
        child::signal_all(group, sig);
    };
    // Orphans re-parented to distlock are reaped as they exit, not only at the end.
    let mut reap = tokio::time::interval(Duration::from_secs(1));
    let mut watch = lease.watch();
    let status = loop {
        tokio::select! {
            status = process.wait() => break status,
            // On a terminal, Ctrl-C already reached the whole foreground group.
            _ = sigint.recv() => if !started_as.interactive { forward(Signal::SIGINT) },
            _ = reap.tick() => child::reap_orphans(pid),
            _ = sigterm.recv() => forward(Signal::SIGTERM),
            _ = sighup.recv() => forward(Signal::SIGHUP),
            reason = watch.lost() => {
                let reason = reason.unwrap_or(distlock::LossReason::NotOwner);
                out.say(format!("lost the lock on {} while {program} was running ({reason}); stopping it", shown(key)));
                if !child::stop_all(group, pid, config.kill_after).await {
                    out.say(format!("{program} did not stop within {} of SIGTERM; killing it", crate::cli::human(config.kill_after)));
                }
                let _ = process.wait().await;
                let _ = lease.release().await;
                let lost = Error::LeaseLost { key: key.to_owned(), reason };
                report("lost", token, Some(held_since.elapsed()), EXIT_LOST, Some(&lost));
                return EXIT_LOST;
            }
        }
    };
    child::reap_orphans(pid);
    let left = child::descendants(nix::unistd::getpid()).len();
    if left > 0 {
        out.say(format!(
            "{program} exited but left {left} process(es) running; releasing {} anyway",
            shown(key)
        ));
    }
    if let Err(e) = lease.release().await {
        out.say(format!("releasing {} after {program} exited: {}", shown(key), describe(&e)));
    }
    let code = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code.clamp(0, 255) as u8,
            (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
            _ => 1,
        },
        Err(e) => {
            out.say(format!("waiting for {program}: {e}"));
            1
        }
    };
    report("ok", token, Some(held_since.elapsed()), code, None);
    code
}
