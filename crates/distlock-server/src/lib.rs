//! The distlock lock server (`distlock serve`) and the pieces it is made of.
//!
//! # Layout
//! - [`serve`]: settings and the run loop (listener, store, shutdown).
//! - [`http`]: the JSON API (routes, errors, auth, metrics).
//! - [`store`]: the embedded store — the in-process lease table made durable by [`wal`].
//! - [`wal`]: the write-ahead log with group commit, snapshots and crash recovery.

pub mod http;
pub mod serve;
pub mod store;
pub mod wal;
