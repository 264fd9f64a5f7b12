//! The distlock lock server as a library: a program (the `distlock` command's `serve`, or a
//! test) hands [`serve::serve`] a listener and a shutdown future and gets the whole server —
//! HTTP API, web page, durable embedded store or a fronted Redis/etcd, auth, TLS, limits.
//! Argument parsing, `distlock run`, the client subcommands and `bench` are in `distlock-cli`.
//!
//! # Layout
//! - [`error`]: why a server did not start or stopped ([`Error`]).
//! - [`serve`]: settings and the entry points: [`serve::serve`] on a listener the caller bound,
//!   [`serve::run`] on an address; both stop gracefully when the caller's shutdown future ends.
//! - [`auth`]: bearer tokens and their scopes (operation and key prefix).
//! - [`listener`]: the accept loop (TLS from [`tls`], header and idle timeouts, connection cap,
//!   the [`ratelimit`] in front of the API).
//! - [`http`]: the JSON API and the web page: the lock routes, batch, the operator routes, the
//!   live events, metrics and health, and the one error shape (a file each).
//! - [`lazy`]: a `--store` opened on first use, so the server starts while its store is down.
//! - [`events`]: the live event stream behind the web page; [`history`]: the last events, the
//!   timeline and the series it sends first; [`listing`]: `GET /v1/locks` sorted and paged.
//! - [`store`]: the embedded store — the in-process lease table made durable by [`wal`].
//! - [`wal`]: the write-ahead log: its frames and files, crash recovery, and the writer (group
//!   commit, preallocated segments, snapshots).

pub mod auth;
pub mod error;
pub mod events;
pub mod history;
pub mod http;
pub mod lazy;
pub mod listener;
pub mod listing;
pub mod ratelimit;
pub mod serve;
pub mod store;
pub mod tls;
pub mod wal;

pub use error::{Error, Result};
