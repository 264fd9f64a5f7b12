//! A linearizability checker for histories of one fenced lock (a WGL search, as etcd's
//! robustness tests use porcupine for), and the model it checks against.
//!
//! A history is what clients saw: each operation's call and answer times (one clock for every
//! client) and its answer. The checker searches for one order of the operations that respects
//! real time (an operation answered before another was called comes first) and in which every
//! answer is what the model gives. The model is a fenced mutex with leases:
//! - an acquire is granted only when the lock is free, with a token above every token granted
//!   before (`Held` only while it is held; a wait that timed out says nothing);
//! - a release or renew succeeds only with the holder's lease id (`LeaseLost` otherwise);
//! - a status answer names the holder's token, or that the lock is free;
//! - a lease may expire, but not before its TTL has run from the moment it was granted or last
//!   renewed (less a small allowance for clocks), and expiry is not required to be prompt;
//! - an operation whose answer was lost (an error that leaves the outcome unknown) may have
//!   taken effect at any time after its call, or never.
//!
//! The search is Wing & Gong's with Lowe's memo of (linearized set, state) pairs; per key, so
//! histories stay small (locks of different keys are independent).

use std::collections::HashSet;

/// Nanoseconds on one clock shared by every client of the history.
pub type Nanos = u64;

/// What an operation did and what it got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// An acquire (try-once or waiting).
    Acquire(AcquireOutcome),
    /// A release of `lease`.
    Release {
        /// Which lease (an index the history assigns to each lease id).
        lease: u32,
        /// The answer.
        outcome: Outcome,
    },
    /// A renew of `lease` for `ttl`.
    Renew {
        /// Which lease.
        lease: u32,
        /// The TTL asked for, in nanoseconds.
        ttl: Nanos,
        /// The answer.
        outcome: Outcome,
    },
    /// A status read: the holder's fencing token, or `None` for a free lock.
    Status(Option<u64>),
    /// A status read that found the lock taken with no token yet (Redis: being handed to the
    /// first waiter, whose grant is under way).
    StatusTaken,
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// Granted: the lease (index), its fencing token and TTL.
    Granted {
        /// Which lease.
        lease: u32,
        /// Its fencing token.
        token: u64,
        /// Its TTL in nanoseconds.
        ttl: Nanos,
    },
    /// Refused at once: the lock was held.
    Held,
    /// The wait ended without a grant (the lock may have been free for moments, granted to
    /// someone ahead in the queue).
    TimedOut,
    /// No answer: it may have been granted, to a lease nobody saw, with a TTL of `ttl`.
    Unknown {
        /// The TTL asked for, in nanoseconds.
        ttl: Nanos,
    },
}

/// The answer to a release or renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused: not the holder's lease.
    LeaseLost,
    /// No answer: it may have taken effect, or not.
    Unknown,
}

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Which client made it (for messages).
    pub client: u32,
    /// When it was called.
    pub call: Nanos,
    /// When its answer arrived (`Nanos::MAX` when it never did).
    pub answer: Nanos,
    /// What it was and what it got.
    pub op: Op,
}

/// Why a history is not linearizable: the longest prefix the search could explain, and the
/// operations none of which could come next.
#[derive(Debug, Clone)]
pub struct Violation {
    /// How many operations the deepest explanation placed.
    pub placed: usize,
    /// The operations that could not come next from there (each explained in `Debug`).
    pub stuck: Vec<Event>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "not linearizable: {} operations explained, then none of these fits:", self.placed)?;
        for e in &self.stuck {
            writeln!(f, "  client {} [{} .. {}] {:?}", e.client, e.call, e.answer, e.op)?;
        }
        Ok(())
    }
}

/// How much earlier than its TTL a lease may be seen to expire (clocks, rounding).
fn allowance(ttl: Nanos) -> Nanos {
    ttl / 100 + 2_000_000
}

/// The lock as the model sees it between operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct State {
    /// The holder: its lease (`u32::MAX` for a grant nobody saw), token (0 when unknown) and the
    /// earliest time it may expire.
    holder: Option<(u32, u64, Nanos)>,
    /// The highest token seen granted.
    last_token: u64,
    /// No later operation can take effect before this (linearization points do not go back).
    now: Nanos,
}

const GHOST: u32 = u32::MAX;

impl State {
    /// The states `event` can lead to when it takes effect next, at a point no earlier than
    /// `self.now` within its call and answer, the lease expiring first where it may.
    fn next(&self, e: &Event) -> Vec<State> {
        let start = self.now.max(e.call);
        if start > e.answer {
            return Vec::new();
        }
        // Points to try: as early as possible, and just when the holder may expire (if that
        // falls within the operation), so that the expiry can come first.
        let mut befores = vec![(start, *self)];
        if let Some((_, _, expires)) = self.holder {
            let at = expires.max(start);
            if at <= e.answer {
                befores.push((at, State { holder: None, now: at, ..*self }));
            }
        }
        let mut out = Vec::new();
        for (at, mut s) in befores {
            s.now = at;
            s.apply(e, at, &mut out);
        }
        out
    }

    /// Every state `e` taking effect at `at` can give from `self` (none if its answer is
    /// impossible here).
    fn apply(self, e: &Event, at: Nanos, out: &mut Vec<State>) {
        match &e.op {
            Op::Acquire(AcquireOutcome::Granted { lease, token, ttl }) => {
                if self.holder.is_none() && *token > self.last_token {
                    out.push(State {
                        holder: Some((*lease, *token, at + ttl - allowance(*ttl).min(*ttl))),
                        last_token: *token,
                        ..self
                    });
                }
            }
            Op::Acquire(AcquireOutcome::Held) => {
                if self.holder.is_some() {
                    out.push(self);
                }
            }
            Op::Acquire(AcquireOutcome::TimedOut) => out.push(self),
            Op::Acquire(AcquireOutcome::Unknown { ttl }) => {
                out.push(self);
                if self.holder.is_none() {
                    out.push(State {
                        holder: Some((GHOST, 0, at + ttl - allowance(*ttl).min(*ttl))),
                        ..self
                    });
                }
            }
            Op::Release { lease, outcome } => {
                let holds = self.holder.is_some_and(|(l, _, _)| l == *lease);
                match outcome {
                    Outcome::Ok if holds => out.push(State { holder: None, ..self }),
                    Outcome::LeaseLost if !holds => out.push(self),
                    Outcome::Unknown => {
                        out.push(self);
                        if holds {
                            out.push(State { holder: None, ..self });
                        }
                    }
                    _ => {}
                }
            }
            Op::Renew { lease, ttl, outcome } => {
                let renewed = |s: State| State {
                    holder: s.holder.map(|(l, t, _)| (l, t, at + ttl - allowance(*ttl).min(*ttl))),
                    ..s
                };
                let holds = self.holder.is_some_and(|(l, _, _)| l == *lease);
                match outcome {
                    Outcome::Ok if holds => out.push(renewed(self)),
                    Outcome::LeaseLost if !holds => out.push(self),
                    Outcome::Unknown => {
                        out.push(self);
                        if holds {
                            out.push(renewed(self));
                        }
                    }
                    _ => {}
                }
            }
            Op::StatusTaken => {
                if self.holder.is_some() {
                    out.push(self);
                }
            }
            Op::Status(seen) => match (seen, self.holder) {
                (None, None) => out.push(self),
                (Some(token), Some((l, t, _))) if t == *token || (l == GHOST && *token > self.last_token) => {
                    // A ghost grant is learnt from its token.
                    out.push(State {
                        holder: self.holder.map(|(l, _, x)| (l, *token, x)),
                        last_token: self.last_token.max(*token),
                        ..self
                    })
                }
                _ => {}
            },
        }
    }
}

/// Checks one key's history; `Ok` when some order of its operations explains every answer.
pub fn check(events: &[Event]) -> Result<(), Violation> {
    let mut events: Vec<Event> = events.to_vec();
    events.sort_by_key(|e| (e.call, e.answer));
    let n = events.len();
    let words = n.div_ceil(64);
    let start = State { holder: None, last_token: 0, now: 0 };
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    // Depth-first: (placed set, state); the deepest point reached, for the report.
    let mut stack = vec![(vec![0u64; words], start, 0usize)];
    let mut deepest = (0usize, vec![0u64; words]);
    while let Some((done, state, count)) = stack.pop() {
        if count == n {
            return Ok(());
        }
        if count > deepest.0 {
            deepest = (count, done.clone());
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        // Candidates: operations not placed whose call precedes every unplaced answer.
        let first_answer =
            (0..n).filter(|&i| !is_done(i)).map(|i| events[i].answer).min().unwrap_or(Nanos::MAX);
        for i in (0..n).filter(|&i| !is_done(i) && events[i].call <= first_answer) {
            for next in state.next(&events[i]) {
                let mut placed = done.clone();
                placed[i / 64] |= 1 << (i % 64);
                if seen.insert((placed.clone(), next)) {
                    stack.push((placed, next, count + 1));
                }
            }
        }
    }
    let (placed, done) = deepest;
    let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
    let first_answer = (0..n).filter(|&i| !is_done(i)).map(|i| events[i].answer).min().unwrap_or(Nanos::MAX);
    let stuck = (0..n)
        .filter(|&i| !is_done(i) && events[i].call <= first_answer)
        .map(|i| events[i].clone())
        .collect();
    Err(Violation { placed, stuck })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Nanos = 30_000_000_000;

    fn ev(client: u32, call: Nanos, answer: Nanos, op: Op) -> Event {
        Event { client, call, answer, op }
    }
    fn granted(lease: u32, token: u64) -> Op {
        Op::Acquire(AcquireOutcome::Granted { lease, token, ttl: TTL })
    }
    fn release(lease: u32, outcome: Outcome) -> Op {
        Op::Release { lease, outcome }
    }

    #[test]
    fn a_plain_sequence_is_linearizable() {
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(1, 20, 30, Op::Acquire(AcquireOutcome::Held)),
            ev(1, 25, 35, Op::Status(Some(1))),
            ev(0, 40, 50, release(0, Outcome::Ok)),
            ev(1, 60, 70, granted(1, 2)),
            ev(0, 80, 90, release(0, Outcome::LeaseLost)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The release and the second grant overlap: the release first explains it.
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, 60, release(0, Outcome::Ok)),
            ev(1, 30, 50, granted(1, 2)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn two_holders_at_once_are_caught() {
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(1, 20, 30, granted(1, 2)),
            ev(0, 40, 50, release(0, Outcome::Ok)),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.placed, 1, "{v}");
    }

    #[test]
    fn a_token_that_does_not_rise_is_caught() {
        let h = [
            ev(0, 0, 10, granted(0, 5)),
            ev(0, 20, 30, release(0, Outcome::Ok)),
            ev(1, 40, 50, granted(1, 5)),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn a_release_by_a_stranger_is_caught() {
        let h = [ev(0, 0, 10, granted(0, 1)), ev(1, 20, 30, release(7, Outcome::Ok))];
        check(&h).unwrap_err();
    }

    #[test]
    fn the_holder_refused_is_caught() {
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, 30, Op::Renew { lease: 0, ttl: TTL, outcome: Outcome::LeaseLost }),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn a_stale_status_is_caught() {
        // Released and re-granted before the status was called: it must not show the old token.
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, 30, release(0, Outcome::Ok)),
            ev(1, 40, 50, granted(1, 2)),
            ev(2, 60, 70, Op::Status(Some(1))),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn a_lock_in_hand_off_reads_taken_until_the_waiter_answers() {
        // The waiter called long before; its grant can take effect right after the release, so
        // "taken" and a refusal in between are explained.
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(1, 5, 100, granted(1, 2)),
            ev(0, 20, 30, release(0, Outcome::Ok)),
            ev(2, 40, 50, Op::StatusTaken),
            ev(2, 60, 70, Op::Acquire(AcquireOutcome::Held)),
        ];
        check(&h).unwrap();
        // Taken while nobody holds or waits is not.
        let free = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, 30, release(0, Outcome::Ok)),
            ev(2, 40, 50, Op::StatusTaken),
        ];
        check(&free).unwrap_err();
    }

    #[test]
    fn held_while_free_is_caught() {
        let h = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, 30, release(0, Outcome::Ok)),
            ev(1, 40, 50, Op::Acquire(AcquireOutcome::Held)),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn expiry_frees_the_lock_but_not_before_the_ttl() {
        let ttl = 1_000_000_000;
        let grant = Op::Acquire(AcquireOutcome::Granted { lease: 0, token: 1, ttl });
        // A second grant 1.5 TTLs later, the first holder silent: expiry explains it.
        let late = [ev(0, 0, 10, grant.clone()), ev(1, 1_500_000_000, 1_500_000_010, granted(1, 2))];
        check(&late).unwrap();
        // Half a TTL later: nothing explains it.
        let early = [ev(0, 0, 10, grant), ev(1, 500_000_000, 500_000_010, granted(1, 2))];
        check(&early).unwrap_err();
    }

    #[test]
    fn a_lost_answer_may_or_may_not_have_taken_effect() {
        // A release whose answer was lost: the next grant may follow it…
        let took = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, Nanos::MAX, release(0, Outcome::Unknown)),
            ev(1, 40, 50, granted(1, 2)),
        ];
        check(&took).unwrap();
        // …or the holder may still hold.
        let not = [
            ev(0, 0, 10, granted(0, 1)),
            ev(0, 20, Nanos::MAX, release(0, Outcome::Unknown)),
            ev(1, 40, 50, Op::Acquire(AcquireOutcome::Held)),
        ];
        check(&not).unwrap();
        // An acquire whose answer was lost may hold the lock for its TTL, seen by its token.
        let ghost = [
            ev(0, 0, Nanos::MAX, Op::Acquire(AcquireOutcome::Unknown { ttl: TTL })),
            ev(1, 20, 30, Op::Status(Some(1))),
            ev(1, 40, 50, Op::Acquire(AcquireOutcome::Held)),
        ];
        check(&ghost).unwrap();
    }

    #[test]
    fn many_clients_on_one_key_check_quickly() {
        // 8 clients taking turns, 2,000 operations, every answer overlapping its neighbours.
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..500u32 {
            let c = i % 8;
            h.push(ev(c, t, t + 15, granted(i, u64::from(i) + 1)));
            h.push(ev((c + 1) % 8, t + 5, t + 20, Op::Acquire(AcquireOutcome::Held)));
            h.push(ev((c + 2) % 8, t + 6, t + 21, Op::Status(Some(u64::from(i) + 1))));
            h.push(ev(c, t + 22, t + 30, release(i, Outcome::Ok)));
            t += 31;
        }
        check(&h).unwrap();
    }
}
