//! [`Locker`]: the entry point. Opens a backend from a URL and turns grants into [`Lease`]s.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{self, Backend};
use crate::error::Result;
use crate::lease::{Lease, Policy};
use crate::options::AcquireOptions;
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};
use crate::validate;

/// A handle on one lock store. Cheap to clone; clones share the store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), distlock::Error> {
/// use std::time::Duration;
/// use distlock::{AcquireOptions, Locker};
///
/// let locker = Locker::open("memory://").await?;
/// let opts = AcquireOptions::new().ttl(Duration::from_secs(10)).wait(Duration::from_secs(5));
/// let total = locker
///     .with_lock("payments", &opts, |fence| async move {
///         // ... write to the resource, passing fence.fencing_token along ...
///         fence.fencing_token
///     })
///     .await?;
/// assert_eq!(total, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locker {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Locker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locker").field("backend", &self.backend.name()).finish()
    }
}

/// What protected work gets from [`Locker::with_lock`]: the key and the grant's fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The key as stored.
    pub key: String,
    /// The grant's fencing token.
    pub fencing_token: u64,
}

impl Locker {
    /// Opens the store a URL names (see [`backend::open`] for the schemes).
    pub async fn open(url: &str) -> Result<Locker> {
        Ok(Locker { backend: backend::open(url).await? })
    }

    /// Uses a backend built by hand.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Locker {
        Locker { backend }
    }

    /// The backend behind this locker.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Takes the lock on `key`, waiting as `opts.wait` says.
    ///
    /// Errors: [`crate::Error::Held`] (try once, held), [`crate::Error::WaitTimeout`],
    /// [`crate::Error::InvalidInput`], [`crate::Error::Unavailable`].
    pub async fn acquire(&self, key: &str, opts: &AcquireOptions) -> Result<Lease> {
        let full_key = opts.full_key(key)?;
        opts.validate()?;
        crate::backend::check_holders(self.backend.as_ref(), opts.limit, opts.mode)?;
        if opts.value.is_some() {
            crate::backend::check_elections(self.backend.as_ref())?;
        }
        let req = AcquireRequest {
            key: full_key.clone(),
            lease_id: LeaseId::generate(),
            holder: opts.holder.clone(),
            ttl: opts.ttl,
            wait: opts.wait,
            limit: opts.limit,
            mode: opts.mode,
            value: opts.value.clone(),
        };
        let sent = Instant::now();
        let mut grant = self.backend.acquire(req).await?;
        // Never trust a backend to be conservative beyond what we can see ourselves: the TTL
        // cannot have started before the request was sent, nor after the answer arrived.
        grant.counted_from = grant.counted_from.clamp(sent, Instant::now());
        let policy = Policy {
            auto_renew: opts.auto_renew,
            renew_every: opts.renew_every,
            safety_margin: opts.safety_margin,
        };
        Ok(Lease::start(self.backend.clone(), full_key, grant, policy))
    }

    /// Acquires `key`, runs `work` under the lock, releases it, and returns what `work`
    /// returned. If the lease is lost first, `work` is cancelled and [`crate::Error::LeaseLost`]
    /// is returned.
    pub async fn with_lock<F, Fut, T>(&self, key: &str, opts: &AcquireOptions, work: F) -> Result<T>
    where
        F: FnOnce(Fence) -> Fut,
        Fut: Future<Output = T>,
    {
        let lease = self.acquire(key, opts).await?;
        let fence = Fence { key: lease.key().to_owned(), fencing_token: lease.fencing_token() };
        let out = lease.run(work(fence)).await?;
        if let Err(e) = lease.release().await {
            // The work finished while the lease was held (or `run` would have cancelled it);
            // a failed release only means the lock frees itself by TTL.
            tracing::warn!(key, error = %e, "release after with_lock failed");
        }
        Ok(out)
    }

    /// The state of `key` (namespace included), held or not.
    pub async fn status(&self, key: &str) -> Result<LockInfo> {
        validate::key(key)?;
        self.backend.status(key).await
    }

    /// Every held lock whose key starts with `prefix`, in key order (following the pages of
    /// [`Locker::list_page`] to the end).
    pub async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        let mut query = ListQuery::prefix(prefix);
        query.validate()?;
        let mut locks = Vec::new();
        loop {
            let page = self.backend.list(&query).await?;
            locks.extend(page.locks);
            match page.next {
                // A cursor that does not move forward would loop for ever.
                Some(next) if query.after.as_ref().is_none_or(|after| next > *after) => {
                    query.after = Some(next)
                }
                Some(_) => {
                    return Err(crate::Error::Unavailable(format!(
                        "the {} backend answered a list page whose cursor does not advance",
                        self.backend.name()
                    )))
                }
                None => return Ok(locks),
            }
        }
    }

    /// One page of held locks: keys starting with `query.prefix`, strictly after `query.after`
    /// (byte order), at most `query.limit`, in key order; [`LockPage::next`] is the last key of
    /// the page when more follow (pass it as `after` to continue), else `None`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), distlock::Error> {
    /// use distlock::{AcquireOptions, ListQuery, Locker};
    ///
    /// let locker = Locker::open("memory://").await?;
    /// let mut held = Vec::new();
    /// for key in ["jobs/a", "jobs/b", "jobs/c"] {
    ///     held.push(locker.acquire(key, &AcquireOptions::new()).await?);
    /// }
    /// let first = locker.list_page(&ListQuery::prefix("jobs/").limit(2)).await?;
    /// assert_eq!(first.locks.len(), 2);
    /// assert_eq!(first.next.as_deref(), Some("jobs/b"));
    /// let rest = locker.list_page(&ListQuery::prefix("jobs/").after("jobs/b").limit(2)).await?;
    /// assert_eq!((rest.locks.len(), rest.next), (1, None));
    /// # Ok(()) }
    /// ```
    pub async fn list_page(&self, query: &ListQuery) -> Result<LockPage> {
        query.validate()?;
        self.backend.list(query).await
    }

    /// Renews a lease known only by its key and id (e.g. taken by another process of the same
    /// holder) for `ttl` from now, or with `None` for the TTL the lease was granted or last
    /// renewed with (on etcd the lease's TTL is fixed at grant, so `ttl` is not used there). The
    /// returned [`Grant::ttl`] is the TTL the store applied. Most callers use [`Lease::renew`]
    /// or automatic renewal instead.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), distlock::Error> {
    /// use std::time::Duration;
    /// use distlock::{AcquireOptions, Locker};
    ///
    /// let locker = Locker::open("memory://").await?;
    /// let lease = locker.acquire("job", &AcquireOptions::new().ttl(Duration::from_secs(600))).await?;
    /// let grant = locker.renew_lease("job", lease.lease_id(), None).await?;
    /// assert_eq!(grant.ttl, Duration::from_secs(600));
    /// # Ok(()) }
    /// ```
    pub async fn renew_lease(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        validate::key(key)?;
        if let Some(ttl) = ttl {
            validate::ttl(ttl)?;
        }
        self.backend.renew(key, lease_id, ttl).await
    }

    /// Frees `key` whoever holds it (see [`Backend::force_release`]): the lock server with an
    /// admin token. Returns the lease that was freed, or `None` when the key was free.
    pub async fn force_release(&self, key: &str) -> Result<Option<LockInfo>> {
        validate::key(key)?;
        self.backend.force_release(key).await
    }

    /// Releases a lease known only by its key and id. Most callers use [`Lease::release`].
    pub async fn release_lease(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        validate::key(key)?;
        self.backend.release(key, lease_id).await
    }
}
