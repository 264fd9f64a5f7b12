//! A store opened on first use: `serve --store URL` starts even when the store is down.
//!
//! A server in front of Redis or etcd must come up while its store is away (after a power cut the
//! store may start later), report not ready on `/healthz`, and serve as soon as the store answers.
//! So the server holds this adapter: every call first makes sure the backend is open, trying again
//! (at most once a second, so a flood of calls does not become a flood of connection attempts)
//! and answering `Unavailable` meanwhile. Bad input in the URL is still refused at start.

use std::sync::Arc;
use std::time::Duration;

use distlock::async_trait;
use distlock::engine::WaiterInfo;
use distlock::{
    AcquireRequest, Backend, Error, Grant, LeaseId, ListQuery, LockInfo, LockPage, Offers, StatusWatch,
    StoreObserver,
};
use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

/// Fewest time between two attempts to open the store.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A backend opened from `url` on first use (see the module doc).
pub struct LazyBackend {
    url: String,
    name: &'static str,
    opened: OnceCell<Arc<dyn Backend>>,
    /// When the last attempt failed, and why.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// The observer to hand the store once it opens ([`Backend::observe`]).
    observer: std::sync::Mutex<Option<StoreObserver>>,
}

impl LazyBackend {
    /// Tries to open `url` once now. Invalid input fails; an unreachable store is logged and
    /// retried on use.
    pub async fn open(url: &str) -> distlock::Result<LazyBackend> {
        let lazy = LazyBackend {
            url: url.to_owned(),
            name: scheme_name(url),
            opened: OnceCell::new(),
            last_failure: Mutex::new(None),
            observer: std::sync::Mutex::new(None),
        };
        match lazy.backend().await {
            Ok(_) => {}
            Err(e @ Error::InvalidInput(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(store = %redacted(url), error = %e, "the store does not answer yet; not ready until it does")
            }
        }
        Ok(lazy)
    }

    /// The open backend, opening it if no attempt failed within the last second.
    async fn backend(&self) -> distlock::Result<&Arc<dyn Backend>> {
        if let Some(b) = self.opened.get() {
            return Ok(b);
        }
        // One attempt at a time; calls meanwhile answer at once instead of queueing behind it.
        let Ok(mut failure) = self.last_failure.try_lock() else {
            return Err(Error::Unavailable(format!("opening the store {} …", redacted(&self.url))));
        };
        if let Some(b) = self.opened.get() {
            return Ok(b);
        }
        if let Some((at, why)) = failure.as_ref() {
            if at.elapsed() < RETRY_EVERY {
                return Err(Error::Unavailable(why.clone()));
            }
        }
        match distlock::backend::open(&self.url).await {
            Ok(b) => {
                *failure = None;
                tracing::info!(store = %redacted(&self.url), "store opened");
                if let Some(observer) = self.observer.lock().ok().and_then(|mut o| o.take()) {
                    b.observe(observer);
                }
                Ok(self.opened.get_or_init(|| async { b }).await)
            }
            Err(e) => {
                let why = match &e {
                    Error::Unavailable(m) => m.clone(),
                    other => other.to_string(),
                };
                *failure = Some((Instant::now(), why));
                Err(e)
            }
        }
    }
}

/// The URL without credentials or parameters (a `password=` may be among them), for logs and
/// error messages.
pub fn redacted(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    let query = if base.len() < url.len() { "?…" } else { "" };
    match (base.split_once("://"), base.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…@{}{query}", &base[at + 1..]),
        _ => format!("{base}{query}"),
    }
}

fn scheme_name(url: &str) -> &'static str {
    match url.split_once("://").map_or("", |(s, _)| s) {
        "redis" | "rediss" | "redis-sentinel" | "redis-cluster" | "rediss-cluster" => "redis",
        "redlock" | "redlocks" => "redlock",
        "etcd" => "etcd",
        "http" | "https" => "http",
        _ => "store",
    }
}

#[async_trait]
impl Backend for LazyBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn acquire(&self, req: AcquireRequest) -> distlock::Result<Grant> {
        self.backend().await?.acquire(req).await
    }

    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> distlock::Result<Grant> {
        self.backend().await?.renew(key, lease_id, ttl).await
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> distlock::Result<()> {
        self.backend().await?.release(key, lease_id).await
    }

    async fn status(&self, key: &str) -> distlock::Result<LockInfo> {
        self.backend().await?.status(key).await
    }

    async fn list(&self, query: &ListQuery) -> distlock::Result<LockPage> {
        self.backend().await?.list(query).await
    }

    async fn force_release(&self, key: &str) -> distlock::Result<Option<LockInfo>> {
        self.backend().await?.force_release(key).await
    }

    /// What the store offers; known from its URL until it opens.
    fn offers(&self) -> Offers {
        self.opened.get().map_or_else(|| distlock::backend::offers_of(&self.url), |b| b.offers())
    }

    async fn waiters(&self, key: &str) -> distlock::Result<Vec<WaiterInfo>> {
        self.backend().await?.waiters(key).await
    }

    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> distlock::Result<()> {
        self.backend().await?.proclaim(key, lease_id, value).await
    }

    async fn watch(&self, key: &str) -> distlock::Result<Box<dyn StatusWatch>> {
        self.backend().await?.watch(key).await
    }

    /// Handed to the store now if it is open, else when it opens.
    fn observe(&self, observer: StoreObserver) -> bool {
        if !self.offers().events {
            return false;
        }
        if let Ok(mut slot) = self.observer.lock() {
            *slot = Some(observer);
        }
        // Opened meanwhile (or before): hand it over now; whoever takes it hands it over.
        if let Some(b) = self.opened.get() {
            if let Some(observer) = self.observer.lock().ok().and_then(|mut o| o.take()) {
                return b.observe(observer);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before a Redis store opens, the routes already know it offers semaphores, shared locks
    /// and elections (Redlock does not).
    #[test]
    fn a_store_not_yet_open_offers_what_its_url_says() {
        for url in
            ["redis://h:6379", "rediss://h:6380", "redis-sentinel://s:26379/m", "redis-cluster://a:7000"]
        {
            let offers = distlock::backend::offers_of(url);
            assert!(offers.many_holders && offers.elections, "{url}: {offers:?}");
        }
        let redlock = distlock::backend::offers_of("redlock://a:1,b:2,c:3");
        assert!(!redlock.many_holders && !redlock.elections);
    }

    #[test]
    fn credentials_stay_out_of_logs() {
        assert_eq!(redacted("redis://user:secret@10.0.0.5:6379"), "redis://…@10.0.0.5:6379");
        assert_eq!(redacted("etcd://h1:2379,h2:2379"), "etcd://h1:2379,h2:2379");
        assert_eq!(redacted("redis://h:6379?password=secret&prefix=p"), "redis://h:6379?…");
    }
}
