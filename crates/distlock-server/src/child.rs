//! The command `distlock run` starts, and how the whole of it is stopped.
//!
//! A lock protects everything the command does, not only its first process: `sh -c 'a; b'` or a
//! script that starts helpers keeps working after a signal to the shell alone. So the command
//! runs in its own process group and every signal goes to the group and to every other process
//! descended from distlock; distlock is a child subreaper, so processes that daemonise (double
//! fork, `setsid`) are re-parented to it and still found. The direct child gets `SIGKILL` when
//! distlock dies (`PR_SET_PDEATHSIG`): a `kill -9` of distlock does not leave the command
//! running without renewals. On a terminal the group is made the foreground group, so the command
//! can read the terminal and gets Ctrl-C itself, as under a shell.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, signal, SigHandler, Signal};
use nix::unistd::{getpgrp, getpid, getppid, tcgetpgrp, tcsetpgrp, Pid};

/// The terminal on stdin when distlock runs in its foreground group.
fn foreground_terminal() -> Option<BorrowedFd<'static>> {
    // SAFETY: fd 0 stays open for the life of the process (it is only borrowed here).
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    (std::io::stdin().is_terminal() && tcgetpgrp(stdin).ok() == Some(getpgrp())).then_some(stdin)
}

/// Makes distlock a child subreaper (see the module doc). Fails only on kernels without it.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Prepares `cmd` to start as described in the module doc.
pub fn configure(cmd: &mut tokio::process::Command) {
    let parent = getpid();
    let terminal = foreground_terminal().is_some();
    if terminal {
        // A background group that changes the terminal's foreground group gets SIGTTOU: ignore it
        // in distlock (it hands the terminal over and takes it back); the child resets it.
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        let _ = unsafe { signal(Signal::SIGTTOU, SigHandler::SigIgn) };
    }
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (prctl, getppid, kill, tcsetpgrp, signal, getpid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // distlock may have died between fork and prctl: then nobody would send the signal.
            if getppid() != parent {
                let _ = kill(getpid(), Signal::SIGKILL);
            }
            if terminal {
                let stdin = BorrowedFd::borrow_raw(0);
                let _ = tcsetpgrp(stdin, getpid());
                let _ = signal(Signal::SIGTTOU, SigHandler::SigDfl);
            }
            Ok(())
        });
    }
}

/// Gives the terminal back to distlock's group after the command ended.
pub fn take_terminal_back() {
    if let Some(stdin) = foreground_terminal().or_else(terminal_of_stdin) {
        let _ = tcsetpgrp(stdin, getpgrp());
    }
}

fn terminal_of_stdin() -> Option<BorrowedFd<'static>> {
    // SAFETY: as in `foreground_terminal`.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    std::io::stdin().is_terminal().then_some(stdin)
}

/// Every live process descended from `root` (children, their children, …), read from /proc.
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name, which is in parentheses and may hold anything.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if state != "Z" && state != "X" {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let (mut found, mut seen, mut todo) = (Vec::new(), HashSet::new(), vec![root.as_raw()]);
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                found.push(Pid::from_raw(c));
                todo.push(c);
            }
        }
    }
    found
}

/// Sends `sig` to the command's process group and to every other process descended from distlock
/// (daemonised ones included). Returns how many processes outside the group were signalled.
pub fn signal_all(group: Pid, sig: Signal) -> usize {
    let _ = killpg(group, sig);
    let mut others = 0;
    for pid in descendants(getpid()) {
        if nix::unistd::getpgid(Some(pid)).ok() != Some(group) && kill(pid, sig).is_ok() {
            others += 1;
        }
    }
    others
}

/// Reaps exited processes that were re-parented to distlock (it is their subreaper), leaving the
/// direct child `keep` to the runtime that waits for it.
pub fn reap_orphans(keep: Pid) {
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    let me = getpid().as_raw().to_string();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == keep.as_raw() {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut fields = rest.split_whitespace();
        if fields.next() == Some("Z") && fields.next() == Some(me.as_str()) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }
}

/// Stops everything the command started: SIGTERM to all, then SIGKILL to whatever is still alive
/// after `grace`. Returns `true` when all stopped on SIGTERM. Afterwards nothing descended from
/// distlock is alive (the direct child may be left as a zombie for its `wait` to collect).
pub async fn stop_all(group: Pid, direct: Pid, grace: Duration) -> bool {
    signal_all(group, Signal::SIGTERM);
    if all_gone(direct, grace).await {
        return true;
    }
    signal_all(group, Signal::SIGKILL);
    all_gone(direct, Duration::from_secs(1)).await;
    false
}

/// Waits up to `within` until no process descended from distlock is alive.
async fn all_gone(direct: Pid, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        reap_orphans(direct);
        if descendants(getpid()).is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
