//! `memory://`: the lease engine ([`crate::engine`]) offered as a [`Backend`], for one process.
//!
//! All the work — the table, FIFO waiting, expiry, the hand-off — is the engine's; this adapter
//! only maps the trait's calls onto it. Leases live and die with the process.

use std::time::Duration;

use async_trait::async_trait;

use crate::backend::Backend;
use crate::engine::Engine;
use crate::error::Result;
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockPage};

/// Leases kept in this process. Cheap to share behind an `Arc`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use distlock::{AcquireOptions, Locker, MemoryBackend};
///
/// let locker = Locker::with_backend(Arc::new(MemoryBackend::new().unwrap()));
/// let lease = locker.acquire("job", &AcquireOptions::new()).await.unwrap();
/// assert_eq!(lease.fencing_token(), 1);
/// # }
/// ```
pub struct MemoryBackend {
    engine: Engine,
}

impl MemoryBackend {
    /// A new, empty table with its expiry task. Fails outside a Tokio runtime.
    pub fn new() -> Result<MemoryBackend> {
        Ok(MemoryBackend { engine: Engine::new()? })
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        self.engine.acquire(req).await
    }

    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        self.engine.renew(key, lease_id, ttl)
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        self.engine.release(key, lease_id)
    }

    async fn status(&self, key: &str) -> Result<LockInfo> {
        Ok(self.engine.status(key))
    }

    /// Ranges over the ordered table from the cursor: a page costs what it returns.
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        Ok(self.engine.list(query))
    }

    fn offers(&self) -> crate::Offers {
        crate::Offers { many_holders: true, elections: true, ..Default::default() }
    }

    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        self.engine.proclaim(key, lease_id, value)
    }

    async fn watch(&self, key: &str) -> Result<Box<dyn crate::backend::StatusWatch>> {
        Ok(Box::new(self.engine.watch(key)))
    }
}
