//! The command `distlock run` starts, and how the whole of it is stopped.
//!
//! A lock protects everything the command does, not only its first process: `sh -c 'a; b'` or a
//! script that starts helpers keeps working after a signal to the shell alone. So signals go to
//! the command's process group and to every other process descended from distlock; distlock is a
//! child subreaper, so processes that daemonise (double fork, `setsid`) are re-parented to it and
//! still found. The direct child gets `SIGKILL` when distlock dies (`PR_SET_PDEATHSIG`): a
//! `kill -9` of distlock does not leave the command running without renewals.
//!
//! Without a terminal (cron, CI, a service) the command gets its own process group. In the
//! foreground of a terminal it stays in distlock's group, as a pipeline's processes do: the
//! terminal's Ctrl-C and Ctrl-Z then reach both, the shell's job control works as usual (a
//! stopped `run` stops its command; one stopped past its TTL finds its lease lost when it
//! resumes and stops the command), and the command can read the terminal.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgrp, getpid, getppid, tcgetpgrp, Pid};

/// Whether stdin is a terminal whose foreground group is distlock's.
fn in_terminal_foreground() -> bool {
    // SAFETY: fd 0 stays open for the life of the process (it is only borrowed here).
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    std::io::stdin().is_terminal() && tcgetpgrp(stdin).ok() == Some(getpgrp())
}

/// Makes distlock a child subreaper (see the module doc). Fails only on kernels without it.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// How the command was started.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// Whether it shares distlock's process group and terminal (see the module doc): the
    /// terminal then delivers Ctrl-C itself, and distlock must not pass SIGINT on again.
    pub interactive: bool,
}

/// Prepares `cmd` to start as described in the module doc.
pub fn configure(cmd: &mut tokio::process::Command) -> Started {
    let parent = getpid();
    let interactive = in_terminal_foreground();
    if !interactive {
        cmd.process_group(0);
    }
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (prctl, getppid, getpid, kill); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // distlock may have died between fork and prctl: then nobody would send the signal.
            if getppid() != parent {
                let _ = kill(getpid(), Signal::SIGKILL);
            }
            Ok(())
        });
    }
    Started { interactive }
}

/// The process group signals go to as a whole: the command's own, or none when it shares
/// distlock's (then each process is signalled on its own).
pub fn group_of(started: Started, child: Pid) -> Option<Pid> {
    (!started.interactive).then_some(child)
}

/// One process as /proc shows it.
struct Process {
    pid: i32,
    parent: i32,
    /// Exited, waiting to be reaped (state `Z`), or dying (`X`).
    dead: bool,
}

/// Every process of the system, read from /proc (those that vanish meanwhile are skipped).
fn processes() -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold anything.
            let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
            let state = fields.next()?;
            let parent = fields.next()?.parse().ok()?;
            Some(Process { pid, parent, dead: state == "Z" || state == "X" })
        })
        .collect()
}

/// Every live process descended from `root` (children, their children, …).
pub fn descendants(root: Pid) -> Vec<Pid> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in processes().into_iter().filter(|p| !p.dead) {
        children.entry(p.parent).or_default().push(p.pid);
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

/// Sends `sig` to the command's process group (if it has its own) and to every other process
/// descended from distlock (daemonised ones included). Returns how many processes were signalled
/// one by one.
pub fn signal_all(group: Option<Pid>, sig: Signal) -> usize {
    if let Some(group) = group {
        let _ = killpg(group, sig);
    }
    let mut others = 0;
    for pid in descendants(getpid()) {
        let in_group = group.is_some() && nix::unistd::getpgid(Some(pid)).ok() == group;
        if !in_group && kill(pid, sig).is_ok() {
            others += 1;
        }
    }
    others
}

/// Reaps exited processes that were re-parented to distlock (it is their subreaper), leaving the
/// direct child `keep` to the runtime that waits for it.
pub fn reap_orphans(keep: Pid) {
    let me = getpid().as_raw();
    for p in processes().into_iter().filter(|p| p.dead && p.parent == me && p.pid != keep.as_raw()) {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(p.pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
}

/// Stops everything the command started: SIGTERM to all, then SIGKILL to whatever is still alive
/// after `grace`. Returns `true` when all stopped on SIGTERM. Afterwards nothing descended from
/// distlock is alive (the direct child may be left as a zombie for its `wait` to collect).
pub async fn stop_all(group: Option<Pid>, direct: Pid, grace: Duration) -> bool {
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
    // A grace too long to add to the clock has no end.
    let deadline = tokio::time::Instant::now().checked_add(within);
    loop {
        reap_orphans(direct);
        if descendants(getpid()).is_empty() {
            return true;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
