//! Checkers over a run's merged history and the fenced resource's log.
//!
//! - Mutual exclusion: each grant's interval runs from the grant to the end of its holder's
//!   entitlement as the holder saw it (its last write, its loss signal, or its deadline, whichever
//!   came first); no two such intervals of one key may overlap (for a semaphore of N: never more
//!   than N at once).
//! - Fencing: a grant answered before another was requested has the lower token, no token is
//!   granted twice; the current holder's writes are accepted by the fenced resource, and no write
//!   is accepted after a grant with a higher token was answered (a stale write). Not for a
//!   semaphore: N holders write at once, so "the highest token seen" cannot judge their writes.
//! - Durability: no lease was reported lost as `NotOwner` before its holder's safe deadline (the
//!   store forgot an acknowledged lease, e.g. across a restart).
//! - Liveness: after the last fault healed, every client got the lock again within 2 TTLs.
//! - Linearizability: the acquires, releases and status reads of every client, with the
//!   renewals their deadlines show, must be explained by one order against the model of a
//!   fenced lock or semaphore (crates/distlock-testkit's `linearizable`); see `linear_history`.
//!   A history judged not linearizable is unsafe; one the search could not decide within its
//!   budget is reported only.
//!
//! With several keys every check but liveness runs per key ([`check`]), and the findings add up
//! ([`Findings::merge`]); [`liveness`] judges each key's first grant after the heal and each
//! client's, on any key.

use std::collections::HashMap;
use std::time::Duration;

use distlock_testkit::linearizable::{
    self as lin, check_within, AcquireOutcome, Model, Nanos, Op, Outcome, Verdict,
};

use crate::fence::Judged;
use crate::history::Event;

/// States the linearizability search may expand per key: this many per operation, and at least
/// [`LIN_BUDGET_MIN`] (seconds, a few hundred MB at most); `FAULTS_LIN_BUDGET` sets another for
/// runs by hand (and `FAULTS_LIN_AROUND` prints a violation whole, with the operations around
/// it, to stderr). A linearizable history is decided in a few expansions per operation; a
/// violation may need the search to exhaust every explanation, which the budget bounds.
const LIN_BUDGET_PER_OP: usize = 30;
const LIN_BUDGET_MIN: usize = 300_000;

/// What one run found.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub grants: u64,
    pub overlaps: u64,
    pub stale_refused: u64,
    pub stale_accepted: u64,
    /// Stale writes the resource accepted because the newer holder had not written yet, sent by
    /// a holder that knew its lease gone or had checked it before the newer grant was answered:
    /// fencing allows them (reported, not failed).
    pub stale_raced: u64,
    pub current_refused: u64,
    pub token_violations: u64,
    pub acked_lost: u64,
    pub longest_unavailable_ms: f64,
    /// The linearizability check: `Some(true)` explained, `Some(false)` not, `None` undecided
    /// within its budget of states.
    pub linearizable: Option<bool>,
    /// Operations in the checked history, and the states the search visited when undecided.
    pub lin_ops: usize,
    /// From the last heal to the first grant (`None`: none came).
    pub first_grant_after_heal_ms: Option<f64>,
    /// Longest time from the last heal to a client's next grant (`None`: a client never got one).
    pub recovery_ms: Option<f64>,
    /// The lock was granted within 2 TTLs of the last heal, and every client within 2 TTLs plus
    /// the long critical sections of the others queued ahead of it (or no fault was injected).
    pub live: bool,
    pub examples: Vec<String>,
}

impl Findings {
    /// Safe: nothing a lock promises was broken.
    pub fn safe(&self) -> bool {
        self.overlaps == 0
            && self.stale_accepted == 0
            && self.current_refused == 0
            && self.token_violations == 0
            && self.acked_lost == 0
            // Undecided (the search's budget ran out) is not a finding; a history no order of
            // operations explains is.
            && self.linearizable != Some(false)
    }

    /// Adds another key's findings to these (liveness aside: see [`liveness`]).
    pub fn merge(&mut self, o: Findings) {
        self.grants += o.grants;
        self.overlaps += o.overlaps;
        self.stale_refused += o.stale_refused;
        self.stale_accepted += o.stale_accepted;
        self.stale_raced += o.stale_raced;
        self.current_refused += o.current_refused;
        self.token_violations += o.token_violations;
        self.acked_lost += o.acked_lost;
        self.longest_unavailable_ms = self.longest_unavailable_ms.max(o.longest_unavailable_ms);
        self.linearizable = match (self.linearizable, o.linearizable) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        self.lin_ops += o.lin_ops;
        for e in o.examples {
            self.note(e);
        }
    }

    fn note(&mut self, s: String) {
        if self.examples.len() < 5 {
            self.examples.push(s);
        }
    }
}

/// How long one critical section in four lasts: 1.2 TTLs, kept alive by renewal, so that faults
/// striking then cut a holder off mid-section.
pub fn long_hold(ttl: Duration) -> Duration {
    ttl * 6 / 5
}

/// How soon after the last heal each of `clients` must be served again, on any key: 2 TTLs (a
/// lease that outlived the fault runs out, then the grant) plus the long critical sections of the
/// others queued ahead. A client's wait is this long too, so that no wait runs out in the queue
/// and sends its client to the back of it (see `client.rs`).
pub fn all_served_within(ttl: Duration, clients: u32) -> Duration {
    ttl * 2 + long_hold(ttl) * clients.saturating_sub(1)
}

/// The checks of one key's history (see the module docs); `fence`: the resource's judgements of
/// that key's writes; `limit`: permits per key.
pub fn check(events: &[Event], fence: &[Judged], ttl_ns: i64, limit: u32) -> Findings {
    let mut f = Findings::default();
    // Grants in the order they were answered.
    let mut grants: Vec<(u32, i64, i64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Grant { c, t_req, t, token, .. } => Some((*c, *t_req, *t, *token)),
            _ => None,
        })
        .collect();
    grants.sort_by_key(|g| g.2);
    f.grants = grants.len() as u64;

    // Mutual exclusion over the holders' own view. A holder may act on its lease from the grant
    // until the first of: its last write (it stops acting there), the moment its loss signal
    // fired, and the latest deadline (`safe_until`, moved by renewals) it recorded. A client's
    // events are in the order it recorded them, so each event belongs to its latest grant.
    #[derive(Default)]
    struct View {
        last_write: Option<i64>,
        lost: Option<i64>,
        safe_until: i64,
    }
    let mut views: HashMap<(u32, i64), View> = HashMap::new();
    let mut current: HashMap<u32, i64> = HashMap::new();
    for e in events {
        let (c, safe_until) = match e {
            Event::Grant { c, t, safe_until, .. } => {
                current.insert(*c, *t);
                (c, *safe_until)
            }
            Event::Write { c, safe_until, .. } | Event::Lost { c, safe_until, .. } => (c, *safe_until),
            _ => continue,
        };
        let Some(&g) = current.get(c) else { continue };
        let v = views.entry((*c, g)).or_default();
        v.safe_until = v.safe_until.max(safe_until);
        match e {
            Event::Write { t_ack, .. } => v.last_write = Some(*t_ack),
            Event::Lost { t, .. } => v.lost = Some(v.lost.map_or(*t, |l| l.min(*t))),
            _ => {}
        }
    }
    let last_valid: HashMap<(u32, i64), i64> = views
        .iter()
        .filter_map(|(k, v)| {
            let end = [v.last_write, v.lost, Some(v.safe_until)].into_iter().flatten().min()?;
            Some((*k, end))
        })
        .collect();
    let mut intervals: Vec<(i64, i64, u32, u64)> = grants
        .iter()
        .filter_map(|&(c, _, t, token)| last_valid.get(&(c, t)).map(|&end| (t, end, c, token)))
        .collect();
    intervals.sort();
    if limit <= 1 {
        let mut reach: Option<(i64, u32, u64)> = None;
        // An entitlement that ended before its grant was answered (the answer came after the
        // holder's own deadline: a store paused or restarted meanwhile) held nothing.
        for &(start, end, c, token) in intervals.iter().filter(|&&(start, end, _, _)| end > start) {
            if let Some((r_end, r_c, r_token)) = reach {
                if start < r_end {
                    f.overlaps += 1;
                    f.note(format!(
                        "overlap: client {c} (token {token}) granted {:.1} ms before client {r_c} (token {r_token}) stopped counting on its lease",
                        (r_end - start) as f64 / 1e6
                    ));
                }
            }
            if reach.is_none_or(|r| end > r.0) {
                reach = Some((end, c, token));
            }
        }
    } else {
        // Entitlements at once: +1 at each start, -1 at each end (ends first at a tie).
        // An entitlement that ended before its grant was answered (its deadline passed during a
        // slow grant) held nothing: counted, its end would hide another holder.
        let mut marks: Vec<(i64, i32, u64)> = intervals
            .iter()
            .filter(|&&(start, end, _, _)| end > start)
            .flat_map(|&(start, end, _, token)| [(start, 1, token), (end, -1, token)])
            .collect();
        marks.sort_by_key(|&(t, d, _)| (t, d));
        let mut inside = 0;
        for (t, d, token) in marks {
            inside += d;
            if d > 0 && inside > limit as i32 {
                f.overlaps += 1;
                f.note(format!(
                    "{inside} holders entitled at once (limit {limit}) when token {token} was granted at {t}"
                ));
            }
        }
    }

    // Token order: everything answered before a request was sent has a lower token.
    let mut by_req: Vec<&(u32, i64, i64, u64)> = grants.iter().collect();
    by_req.sort_by_key(|g| g.1);
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let (mut i, mut max_before) = (0, None::<u64>);
    for g in by_req {
        while i < grants.len() && grants[i].2 < g.1 {
            max_before = max_before.max(Some(grants[i].3));
            i += 1;
        }
        if let Some(m) = max_before.filter(|&m| m >= g.3) {
            f.token_violations += 1;
            f.note(format!("token {} granted to client {} after token {m} had been granted", g.3, g.0));
        }
        if let Some(other) = seen.insert(g.3, g.0) {
            f.token_violations += 1;
            f.note(format!("token {} granted twice (clients {other} and {})", g.3, g.0));
        }
    }

    // Writes: the current holder's (the latest grant answered before the write was judged, if
    // its entitlement had not ended before it was answered) must be accepted; an older holder's
    // must be refused — unless it was checked before the newer grant was answered, or sent by a
    // holder that knew its lease gone: the resource cannot refuse it before it has seen the newer
    // token (the newer holder had not written yet), which is what fencing allows.
    let entitled: HashMap<(u32, u64), bool> =
        intervals.iter().map(|&(start, end, c, token)| ((c, token), end > start)).collect();
    let sent: Vec<(u32, u64, i64, i64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Write { c, token, believed, t_check, t_ack, .. } => {
                Some((*c, *token, *t_check, *t_ack, *believed))
            }
            _ => None,
        })
        .collect();
    for j in fence.iter().filter(|_| limit <= 1) {
        let latest = grants[..grants.partition_point(|g| g.2 < j.t)]
            .iter()
            .rev()
            .find(|g| entitled.get(&(g.0, g.3)).copied().unwrap_or(true));
        let is_current = latest.is_some_and(|g| g.0 == j.client && g.3 == j.token);
        match (j.accepted, is_current) {
            (true, false) => {
                // The writer's own record of this write: when it checked, and what it believed.
                let own = sent.iter().find(|w| w.0 == j.client && w.1 == j.token && w.2 <= j.t && j.t <= w.3);
                let raced = match (own, latest) {
                    (Some(&(_, _, t_check, _, believed)), Some(g)) => !believed || t_check <= g.2,
                    _ => false,
                };
                if raced {
                    f.stale_raced += 1;
                    continue;
                }
                f.stale_accepted += 1;
                f.note(format!(
                    "stale write accepted: client {} token {} after client {:?} was granted token {:?}",
                    j.client,
                    j.token,
                    latest.map(|g| g.0),
                    latest.map(|g| g.3)
                ));
            }
            (false, false) => f.stale_refused += 1,
            (false, true) => {
                f.current_refused += 1;
                f.note(format!(
                    "client {} holds the newest grant (token {}) but the resource had seen a higher token",
                    j.client, j.token
                ));
            }
            (true, true) => {}
        }
    }

    // Durability: a lease the store disowned before its holder's deadline.
    for e in events {
        if let Event::Lost { c, token, t, reason, safe_until } = e {
            if reason == "NotOwner" && t < safe_until {
                f.acked_lost += 1;
                f.note(format!(
                    "client {c}: store disowned token {token} {:.1} ms before its deadline",
                    (safe_until - t) as f64 / 1e6
                ));
            }
        }
    }

    let history = linear_history(events, ttl_ns, limit);
    f.lin_ops = history.len();
    let budget = std::env::var("FAULTS_LIN_BUDGET")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or((history.len() * LIN_BUDGET_PER_OP).max(LIN_BUDGET_MIN));
    f.linearizable = match check_within(&history, Model::semaphore(limit), budget) {
        Verdict::Linearizable => Some(true),
        Verdict::Violation(v) => {
            f.note(format!("{v}").lines().take(4).collect::<Vec<_>>().join(" | "));
            if std::env::var_os("FAULTS_LIN_AROUND").is_some() {
                eprintln!("{v}{}", v.around(&history));
            }
            Some(false)
        }
        Verdict::Undecided { states } => {
            f.note(format!("linearizability undecided after {states} states"));
            None
        }
    };

    f.longest_unavailable_ms = grants.windows(2).map(|w| (w[1].2 - w[0].2) as f64 / 1e6).fold(0.0, f64::max);

    f
}

/// Liveness after the last heal (`heal`, monotonic ns; none: no fault, nothing to judge), given
/// each key's events: on every key asked for after the heal, a grant within 2 TTLs of the heal
/// (or of the key's first request after it, if later); and each of `clients` served again, on any
/// key, within [`all_served_within`]. Its verdict is always among the examples, however many
/// safety findings came first.
pub fn liveness(f: &mut Findings, keys: &[Vec<Event>], heal: Option<i64>, ttl: Duration, clients: u32) {
    f.live = true;
    let Some(h) = heal else { return };
    let ms = |ns: i64| ns as f64 / 1e6;
    // Per key: from the heal (or the key's first request after it) to its first grant after it.
    let mut first: Option<f64> = Some(0.0);
    for events in keys {
        let asked = events
            .iter()
            .filter_map(|e| match e {
                Event::Grant { t_req, t, .. } | Event::Fail { t_req, t, .. } if *t > h => {
                    Some((*t_req).max(h))
                }
                _ => None,
            })
            .min();
        let Some(asked) = asked else { continue };
        let granted = events
            .iter()
            .filter_map(|e| match e {
                Event::Grant { t, .. } if *t > h => Some(*t),
                _ => None,
            })
            .min();
        first = match (first, granted) {
            (Some(w), Some(t)) => Some(w.max(ms(t - asked))),
            _ => None,
        };
    }
    // Per client, on any key.
    let mut worst = Some(0.0f64);
    for c in 0..clients {
        let served = keys
            .iter()
            .flatten()
            .filter_map(|e| match e {
                Event::Grant { c: gc, t, .. } if *t > h && *gc == c => Some(*t),
                _ => None,
            })
            .min();
        worst = match (worst, served) {
            (Some(w), Some(t)) => Some(w.max(ms(t - h))),
            _ => None,
        };
    }
    f.first_grant_after_heal_ms = first;
    f.recovery_ms = worst;
    let ttl_ms = ttl.as_secs_f64() * 1e3;
    let all_limit = all_served_within(ttl, clients).as_secs_f64() * 1e3;
    f.live = first.is_some_and(|v| v <= 2.0 * ttl_ms) && worst.is_some_and(|w| w <= all_limit);
    if !f.live {
        // Pushed past the cap of `note`: a row that failed must say why.
        f.examples.push(format!(
            "liveness: after the last heal the slowest key's first grant came after {first:?} ms \
             (limit {:.0}), the last client's after {worst:?} ms (limit {all_limit:.0})",
            2.0 * ttl_ms
        ));
    }
}

/// The run as a history for the linearizability checker. Each grant is a lease (its client and
/// token); renewals are automatic and not recorded as such, but every deadline a holder recorded
/// later than the one before shows one: a renewal sent `ttl` before that deadline (the keeper
/// counts from the send) and answered before the record. Requests whose outcome is unknown (an
/// error other than a refusal or a timed-out wait) never answered, as far as the model knows.
fn linear_history(events: &[Event], ttl_ns: i64, limit: u32) -> Vec<lin::Event> {
    let ttl = ttl_ns as Nanos;
    // (client, token) -> (lease, latest deadline seen, when its acquire was sent)
    let mut leases: HashMap<(u32, u64), (u32, i64, i64)> = HashMap::new();
    let mut out = Vec::new();
    let ev = |client: u32, call: i64, answer: i64, op: Op| lin::Event {
        client,
        call: call.max(0) as Nanos,
        answer: if answer == i64::MAX { Nanos::MAX } else { answer.max(0) as Nanos },
        op,
    };
    for e in events {
        match e {
            Event::Grant { c, t_req, t, token, safe_until } => {
                let lease = leases.len() as u32;
                leases.insert((*c, *token), (lease, *safe_until, *t_req));
                out.push(ev(
                    *c,
                    *t_req,
                    *t,
                    Op::Acquire(AcquireOutcome::Granted { lease, token: *token, ttl }),
                ));
            }
            Event::Fail { c, t_req, t, code } => {
                let op = match code.as_str() {
                    "lock_held" | "wait_timeout" => ev(*c, *t_req, *t, Op::Acquire(AcquireOutcome::TimedOut)),
                    _ => ev(*c, *t_req, i64::MAX, Op::Acquire(AcquireOutcome::Unknown { ttl })),
                };
                out.push(op);
            }
            Event::Write { c, token, t_check: t, safe_until, .. }
            | Event::Lost { c, token, t, safe_until, .. } => {
                if let Some((lease, known, granted)) = leases.get_mut(&(*c, *token)) {
                    if *safe_until > *known {
                        *known = *safe_until;
                        // Sent a TTL before the new deadline at the latest (earlier by the
                        // holder's safety margin), after its acquire and before this event. A
                        // store that applied a longer TTL than asked (etcd counts whole seconds)
                        // moves the deadline further: the renewal then lasts until it.
                        let call = (safe_until - ttl_ns).max(*granted).min(*t);
                        let ttl = ttl.max((safe_until - call).max(0) as Nanos);
                        let op = Op::Renew { lease: *lease, ttl, outcome: Outcome::Ok };
                        out.push(ev(*c, call, *t, op));
                    }
                }
            }
            Event::Release { c, token, t_req, t, code } => {
                let Some(&(lease, _, _)) = leases.get(&(*c, *token)) else { continue };
                let (outcome, answer) = match code.as_deref() {
                    None => (Outcome::Ok, *t),
                    Some("lease_lost") => (Outcome::LeaseLost, *t),
                    Some(_) => (Outcome::Unknown, i64::MAX),
                };
                out.push(ev(*c, *t_req, answer, Op::Release { lease, outcome }));
            }
            Event::Status { c, t_req, t, tokens, taken } => {
                let op = match (taken, limit) {
                    (true, _) => Op::StatusTaken,
                    (false, 1) => Op::Status(tokens.first().copied()),
                    (false, _) => Op::StatusHolders(tokens.clone()),
                };
                out.push(ev(*c, *t_req, *t, op));
            }
        }
    }
    out
}
