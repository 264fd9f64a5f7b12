//! The outer loop of an acquire that waits by trying again, written once for the backends that
//! do (Redis, Redlock, the HTTP client): after each refused attempt, a try-once call answers
//! [`Error::Held`], a wait whose deadline has passed answers [`Error::WaitTimeout`], and any other
//! sleeps until the backend's wake-up (a release it was told of), its retry time or the deadline,
//! whichever comes first. The backend's loop is then: attempt, return a grant, else
//! [`Waiting::next_turn`].

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::types::Wait;

/// One acquire's wait: what it was asked for and when it started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiting {
    wait: Wait,
    start: Instant,
    deadline: Option<Instant>,
}

/// What a refused attempt tells the loop about the next one.
pub(crate) struct Refused<'a> {
    /// The key's holder, where the store said.
    pub holder: Option<String>,
    /// Try again after this long at the latest (e.g. when the holder's TTL runs out: an expiry
    /// wakes nobody).
    pub retry_in: Duration,
    /// Try again as soon as this is notified (a release published to this waiter).
    pub wake: Option<&'a Notify>,
}

impl Waiting {
    /// A wait as `wait` says, starting now.
    pub(crate) fn start(wait: Wait) -> Waiting {
        let start = Instant::now();
        Waiting { wait, start, deadline: wait.deadline(start) }
    }

    /// Whether the call joins the queue (see [`Wait::waits`]).
    pub(crate) fn waits(&self) -> bool {
        self.wait.waits()
    }

    /// Time left until the deadline, at most `cap` (`cap` when the wait is endless).
    pub(crate) fn left(&self, cap: Duration) -> Duration {
        self.deadline.map_or(cap, |d| d.saturating_duration_since(Instant::now()).min(cap))
    }

    /// After a refused attempt on `key`: [`Error::Held`] when the call does not wait,
    /// [`Error::WaitTimeout`] when its deadline has passed; otherwise sleeps until `refused.wake`
    /// is notified, `refused.retry_in` has passed or the deadline comes, and returns for the
    /// next attempt.
    pub(crate) async fn next_turn(&self, key: &str, refused: Refused<'_>) -> Result<()> {
        let Refused { holder, retry_in, wake } = refused;
        if !self.waits() {
            return Err(Error::Held { key: key.to_owned(), holder });
        }
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(Error::WaitTimeout { key: key.to_owned(), holder, waited: now - self.start });
        }
        let wake_at = self.deadline.map_or(now + retry_in, |d| d.min(now + retry_in));
        if wake_at <= now {
            return Ok(());
        }
        match wake {
            Some(wake) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(wake_at) => {}
                }
            }
            None => tokio::time::sleep_until(wake_at).await,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(retry_in: Duration, wake: Option<&Notify>) -> Refused<'_> {
        Refused { holder: Some("h".into()), retry_in, wake }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_does_not_wait_is_refused_at_once() {
        for wait in [Wait::TryOnce, Wait::For(Duration::ZERO)] {
            let err = Waiting::start(wait).next_turn("k", refused(Duration::from_secs(1), None)).await;
            assert!(
                matches!(&err, Err(Error::Held { holder: Some(h), .. }) if h == "h"),
                "{wait:?}: {err:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_sleeps_until_the_retry_time_and_times_out_at_its_deadline() {
        let turns = Waiting::start(Wait::For(Duration::from_millis(250)));
        let started = Instant::now();
        turns.next_turn("k", refused(Duration::from_millis(100), None)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        // The deadline comes before the retry time: sleep only until it.
        turns.next_turn("k", refused(Duration::from_secs(10), None)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        let err = turns.next_turn("k", refused(Duration::from_secs(10), None)).await;
        assert!(
            matches!(err, Err(Error::WaitTimeout { waited, .. }) if waited == Duration::from_millis(250)),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_ends_the_sleep_and_forever_never_times_out() {
        let turns = Waiting::start(Wait::Forever);
        let wake = Notify::new();
        wake.notify_one();
        let started = Instant::now();
        turns.next_turn("k", refused(Duration::from_secs(3600), Some(&wake))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
        turns.next_turn("k", refused(Duration::from_millis(1), None)).await.unwrap();
        assert_eq!(turns.left(Duration::from_secs(7)), Duration::from_secs(7));
    }
}
