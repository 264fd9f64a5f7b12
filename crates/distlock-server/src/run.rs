//! `distlock run KEY -- CMD...`: hold a lock while a command runs, like `flock(1)` across hosts.
//!
//! Acquires (waiting up to `--wait`, default forever), starts CMD with `DISTLOCK_KEY`,
//! `DISTLOCK_FENCING_TOKEN` and `DISTLOCK_LEASE_ID` in its environment, keeps the lease renewed,
//! passes SIGINT/SIGTERM/SIGHUP on to CMD, releases when CMD exits and exits with CMD's code
//! (128+N if a signal N killed it). If the lease is lost while CMD runs: SIGTERM to CMD, SIGKILL
//! after `--kill-after`, a message, exit 76. Unlike `etcdctl lock`, a lost lock stops the command.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use distlock::{AcquireOptions, Error, Locker};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{acquire_showing_wait, exit_code, Output, EXIT_HELD, EXIT_LOST};

/// Runs `command` under the lock on `key`; returns the exit code for distlock.
pub async fn run(
    locker: &Locker,
    key: &str,
    opts: AcquireOptions,
    kill_after: Duration,
    command: &[String],
    out: &Output,
) -> u8 {
    let Some((program, args)) = command.split_first() else {
        out.say("no command given: distlock run KEY -- CMD [ARGS...]");
        return crate::cli::EXIT_USAGE;
    };
    let lease = match acquire_showing_wait(locker, key, &opts, out).await {
        Ok(lease) => lease,
        Err(e @ (Error::Held { .. } | Error::WaitTimeout { .. })) => {
            out.say(format!("not acquired: {e}"));
            return EXIT_HELD;
        }
        Err(e) => {
            out.say(format!("cannot acquire {key}: {e}"));
            return exit_code(&e);
        }
    };
    if out.verbose {
        out.say(format!(
            "acquired {} (fencing token {}); running {program}",
            lease.key(),
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
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .env("DISTLOCK_KEY", lease.key())
        .env("DISTLOCK_FENCING_TOKEN", lease.fencing_token().to_string())
        .env("DISTLOCK_LEASE_ID", lease.lease_id().as_str())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            out.say(format!("cannot run {program}: {e}"));
            let _ = lease.release().await;
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill(pid, sig);
        }
    };
    let mut watch = lease.watch();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = sigint.recv() => send(Signal::SIGINT),
            _ = sigterm.recv() => send(Signal::SIGTERM),
            _ = sighup.recv() => send(Signal::SIGHUP),
            reason = watch.lost() => {
                let reason = reason.map_or_else(|| "released".to_owned(), |r| r.to_string());
                out.say(format!("lost the lock on {key} while {program} was running ({reason}); stopping it"));
                send(Signal::SIGTERM);
                if tokio::time::timeout(kill_after, child.wait()).await.is_err() {
                    out.say(format!("{program} did not stop within {}; killing it", humantime::format_duration(kill_after)));
                    send(Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                let _ = lease.release().await;
                return EXIT_LOST;
            }
        }
    };
    if let Err(e) = lease.release().await {
        out.say(format!("releasing {key} after {program} exited: {e}"));
    }
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code.clamp(0, 255) as u8,
            (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
            _ => 1,
        },
        Err(e) => {
            out.say(format!("waiting for {program}: {e}"));
            1
        }
    }
}
