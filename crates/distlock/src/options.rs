//! What a caller can ask of an acquire: TTL, wait, holder label, namespace, and renewal policy.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::{LockMode, Wait};
use crate::validate;

/// The TTL used when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Options of [`crate::Locker::acquire`]. Plain data with chaining setters; `Default` is
/// "30 s TTL, try once, renew automatically every TTL/3, safety margin TTL/10".
///
/// ```
/// use std::time::Duration;
/// use distlock::AcquireOptions;
///
/// let opts = AcquireOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait(Duration::from_secs(60))
///     .holder("deployer@host-1")
///     .namespace("deploys");
/// assert_eq!(opts.full_key("web").unwrap(), "deploys:web");
/// assert_eq!(opts.wait, distlock::Wait::For(Duration::from_secs(60)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireOptions {
    /// Time to live of the lease, from 100 ms to 24 h. Default 30 s.
    pub ttl: Duration,
    /// How long to wait while someone else holds the key. Default [`Wait::TryOnce`]. Waiting is
    /// FIFO and woken by the release or expiry itself.
    pub wait: Wait,
    /// Free text shown in status, e.g. host and pid. Default `pid-<pid>`.
    pub holder: String,
    /// Prefix that separates uses of one store ("deploys", "billing"): the stored key is
    /// `namespace:key`. Default none.
    pub namespace: Option<String>,
    /// How many leases may hold the key at once: 1 (default) for a lock, N for a semaphore of N
    /// permits (up to 10,000). Every holder of a key must name the same N
    /// ([`Error::LimitMismatch`] otherwise). Offered by `memory://`, Redis (not Redlock), `etcd://`
    /// and the lock server (`http://`) over any store but Redlock; other backends refuse it with
    /// [`Error::InvalidInput`].
    pub limit: u32,
    /// Exclusive (default) or shared with other shared holders (a read lock, `flock -s`); see
    /// [`LockMode`]. Offered where semaphores are.
    pub mode: LockMode,
    /// What the lease publishes for others to read in status (a leader's address or id; at
    /// most 4 KiB, never secret). Default none. [`crate::Locker::campaign`] sets it; offered
    /// where elections are ([`crate::Offers::elections`]).
    pub value: Option<String>,
    /// Renew the lease automatically while it is held. Default `true`.
    pub auto_renew: bool,
    /// Interval of automatic renewal. Default TTL/3.
    pub renew_every: Option<Duration>,
    /// How long before its deadline the holder gives a lease up as lost when renewal has not
    /// succeeded, to absorb clock-rate differences and scheduling delay. Default TTL/10.
    pub safety_margin: Option<Duration>,
}

impl Default for AcquireOptions {
    fn default() -> Self {
        AcquireOptions {
            ttl: DEFAULT_TTL,
            wait: Wait::TryOnce,
            holder: format!("pid-{}", std::process::id()),
            namespace: None,
            limit: 1,
            mode: LockMode::Exclusive,
            value: None,
            auto_renew: true,
            renew_every: None,
            safety_margin: None,
        }
    }
}

impl AcquireOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Waits up to `wait` for the key: a [`Duration`] (zero tries once) or a [`Wait`].
    pub fn wait(mut self, wait: impl Into<Wait>) -> Self {
        self.wait = wait.into();
        self
    }

    /// Lets up to `n` leases hold the key at once (a semaphore); see [`AcquireOptions::limit`].
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = n;
        self
    }

    /// Holds the key shared with other shared holders (a read lock); see [`LockMode::Shared`].
    pub fn shared(mut self) -> Self {
        self.mode = LockMode::Shared;
        self
    }

    /// Publishes `value` with the lease (see [`AcquireOptions::value`]).
    pub fn value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Waits for the key as long as it takes.
    pub fn wait_forever(mut self) -> Self {
        self.wait = Wait::Forever;
        self
    }

    /// Sets the holder label.
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// Sets the namespace prefix.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Turns automatic renewal on or off. Off, the loss signal still fires at the deadline.
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Sets the automatic renewal interval.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Sets the safety margin.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The key as stored: `namespace:key`, or `key` without a namespace. Validated.
    pub fn full_key(&self, key: &str) -> Result<String> {
        let full = match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => format!("{ns}:{key}"),
            _ => key.to_owned(),
        };
        if key.is_empty() {
            return Err(Error::InvalidInput("key must not be empty".into()));
        }
        validate::key(&full)?;
        Ok(full)
    }

    /// Checks every option; called by [`crate::Locker::acquire`].
    pub fn validate(&self) -> Result<()> {
        validate::ttl(self.ttl)?;
        validate::holder(&self.holder)?;
        if let Some(value) = &self.value {
            validate::value(value)?;
        }
        if let Some(every) = self.renew_every {
            if every.is_zero() || every >= self.ttl {
                return Err(Error::InvalidInput(format!(
                    "renew interval {every:?} must be above zero and below the ttl {:?}",
                    self.ttl
                )));
            }
        }
        if let Some(margin) = self.safety_margin {
            if margin >= self.ttl {
                return Err(Error::InvalidInput(format!(
                    "safety margin {margin:?} must be below the ttl {:?}",
                    self.ttl
                )));
            }
        }
        Ok(())
    }
}
