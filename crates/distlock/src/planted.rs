//! Known bugs, planted back one at a time so that the test suites can prove they catch them
//! (issue 22, section 6; the table in docs/RELIABILITY.md). A bug is live only in a build with
//! the `planted-bugs` feature, which is off by default and in no release build: without it
//! [`active`] is the constant `false` and every planted branch compiles away.
//!
//! A test plants a bug for its own thread ([`plant`]: the simulation and the power-loss tests run
//! the store on one thread); `DISTLOCK_PLANTED_BUG=<name>` plants one for the whole process
//! (for a suite that runs a server on other threads).

use std::cell::Cell;
use std::sync::OnceLock;

/// A bug that can be planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The embedded store answers a change once it is queued for the log, before the log has
    /// synced it.
    AnswerBeforeSync,
    /// The embedded store's restart takes the fencing counter from the leases it recovered, not
    /// the counter it logged (as if the counter were not persisted).
    CounterNotPersisted,
    /// A release frees the key whoever holds it, without checking the lease id.
    ReleaseWithoutLeaseId,
    /// The hand-off grants the key to a waiter whose wait has already ended, and keeps the grant
    /// though nobody receives it (etcd#11456's kind: a lock granted to a waiter that is gone).
    LateWaiterGranted,
    /// The holder counts a renewed lease's deadline from when the answer arrived, not from
    /// before it sent the request: later than the store started counting, so the holder
    /// believes it holds after the store may have freed the key.
    RenewalFromAnswer,
    /// A Redis waiter whose acquire failed without a definite answer tries its clean-up (leave
    /// the queue, release a grant it never saw) once and gives up: when Redis was paused, the
    /// timed-out acquire still runs once Redis resumes and leaves a place nobody holds at the head
    /// of the queue, holding every waiter up for `queue_ttl` (found by the fault suite, 2026-11-23).
    AbandonedQueuePlace,
}

impl Bug {
    /// Every bug that can be planted.
    pub const ALL: [Bug; 6] = [
        Bug::AnswerBeforeSync,
        Bug::CounterNotPersisted,
        Bug::ReleaseWithoutLeaseId,
        Bug::LateWaiterGranted,
        Bug::RenewalFromAnswer,
        Bug::AbandonedQueuePlace,
    ];

    /// The bug's name (`DISTLOCK_PLANTED_BUG`, reports).
    pub fn name(self) -> &'static str {
        match self {
            Bug::AnswerBeforeSync => "answer-before-sync",
            Bug::CounterNotPersisted => "counter-not-persisted",
            Bug::ReleaseWithoutLeaseId => "release-without-lease-id",
            Bug::LateWaiterGranted => "late-waiter-granted",
            Bug::RenewalFromAnswer => "renewal-from-answer",
            Bug::AbandonedQueuePlace => "abandoned-queue-place",
        }
    }
}

thread_local! {
    static PLANTED: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Plants `bug` (or none) for the calling thread. Does nothing without the `planted-bugs`
/// feature.
pub fn plant(bug: Option<Bug>) {
    PLANTED.with(|p| p.set(bug));
}

/// Whether `bug` is planted for this thread or the process. Always `false` without the
/// `planted-bugs` feature.
#[inline(always)]
pub fn active(bug: Bug) -> bool {
    if !cfg!(feature = "planted-bugs") {
        return false;
    }
    static FROM_ENV: OnceLock<Option<String>> = OnceLock::new();
    let env = FROM_ENV.get_or_init(|| std::env::var("DISTLOCK_PLANTED_BUG").ok());
    PLANTED.with(|p| p.get()) == Some(bug) || env.as_deref() == Some(bug.name())
}
