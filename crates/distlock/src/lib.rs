//! distlock: distributed locks as leases with fencing tokens, over one async API for every store.
//!
//! A lock is a **lease**: it has a TTL, a secret [`LeaseId`] that alone allows renew and release,
//! and a **fencing token** that strictly increases with every grant of a key, so the resource you
//! protect can refuse writes from a holder that has lost the lock without knowing it. While held,
//! a lease is renewed automatically, and its holder can await its loss.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), distlock::Error> {
//! use std::time::Duration;
//! use distlock::{AcquireOptions, Locker};
//!
//! let locker = Locker::open("memory://").await?;
//! let opts = AcquireOptions::new().ttl(Duration::from_secs(30)).wait(Duration::from_secs(10));
//! let lease = locker.acquire("deploy/web", &opts).await?;
//! println!("holding {} with fencing token {}", lease.key(), lease.fencing_token());
//! lease.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`locker`]: [`Locker`], opened from a URL; turns grants into leases.
//! - [`lease`]: [`Lease`], renewal, the loss signal, release on drop — written once for all stores.
//! - [`election`]: leader election on a lease ([`Locker::campaign`], [`Locker::observe`]).
//! - [`backend`]: the [`Backend`] trait every store implements, and the backends.
//! - [`engine`]: the lease engine (table, FIFO queues, expiry, snapshot and restore) that
//!   `memory://` and the lock server's embedded store are built on.
//! - [`options`], [`types`], [`validate`], [`error`]: plain data, input checks, the error enum
//!   and [`ErrorCode`], the one table of error codes (HTTP status, CLI exit code).
//! - [`wire`]: the lock server's HTTP bodies, shared by the server and the `http://` client.
//!
//! # Guarantees
//! While the store is healthy, no key is ever granted to two live leases, and fencing tokens of
//! one key strictly increase. The holder's view is conservative: [`Lease::safe_until`] is counted
//! on the local monotonic clock from before the request that granted or renewed the lease, less a
//! safety margin, so the loss signal fires before the store could hand the lock to someone else
//! (provided the local clock does not run slower than the store's by more than the margin).
//! A process paused past its deadline can still act late: pass the fencing token to the resource.

pub mod backend;
pub mod election;
pub mod engine;
pub mod error;
mod error_code;
pub mod lease;
pub mod locker;
pub mod options;
#[doc(hidden)]
pub mod planted;
pub mod types;
pub mod validate;
pub mod wire;

/// The attribute backends implement [`Backend`] with, re-exported so they need no extra dependency.
pub use async_trait::async_trait;
pub use backend::{Backend, MemoryBackend, Offers, StatusWatch, StoreEvent, StoreEventKind, StoreObserver};
pub use election::{Leader, LeaderWatch, Leadership};
pub use error::{Error, ErrorCode, LossReason, Result};
pub use lease::{Lease, LeaseState, LeaseWatch};
pub use locker::{Fence, Locker};
pub use options::AcquireOptions;
pub use types::{AcquireRequest, Grant, HolderInfo, LeaseId, ListQuery, LockInfo, LockMode, LockPage, Wait};
