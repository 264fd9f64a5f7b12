//! The embeddable server: its settings, start-up (recovery, auth tokens, metrics) and graceful
//! shutdown. [`serve`] takes a listener the caller bound and a shutdown future, so a program (or a
//! test, on `127.0.0.1:0`) can run a lock server inside itself; [`run`] binds the address first,
//! as `distlock serve` does.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use distlock::engine::TableEvent;

use crate::auth::Auth;
use crate::events::{EventKind, Events};
use crate::http::{router, AppState};
use crate::lazy::LazyBackend;
use crate::store::{EmbeddedStore, Limits};
use crate::{Error, Result};

/// Everything the server can be told, except where it listens (see [`serve`] and [`run`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// `None` for the embedded store, or a backend URL (`redis://`, `redlock://`, `etcd://`) to front.
    pub store: Option<String>,
    /// File of accepted bearer tokens, one per line, each optionally followed by its scopes
    /// (see [`crate::auth`]); re-read on SIGHUP.
    pub auth_token_file: Option<PathBuf>,
    /// File of admin tokens (force-release), one per line; `None` disables force-release.
    pub admin_token_file: Option<PathBuf>,
    /// Lease and waiter caps.
    pub limits: Limits,
    /// Log segment size that triggers compaction.
    pub compact_bytes: u64,
    /// How long in-flight requests (long polls) may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// TLS, connection timeouts, the connection cap and the rate limit.
    pub net: crate::listener::NetConfig,
    /// Events kept for late subscribers and `GET /v1/events?since=` (see [`crate::history`]).
    pub event_history: usize,
}

impl ServerConfig {
    /// The defaults of `distlock serve`, with the embedded store in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            store: None,
            auth_token_file: None,
            admin_token_file: None,
            limits: Limits::default(),
            compact_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            net: crate::listener::NetConfig::default(),
            event_history: 10_000,
        }
    }

    /// Refuses settings the server cannot serve: a `memory://` store lives inside one process, so
    /// it would lock nothing that any other process could see or rely on after a restart.
    pub fn check(&self) -> Result<()> {
        if let Some(url) = &self.store {
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            if scheme == "memory" {
                return Err(Error::Settings(format!(
                    "--store {url} is refused: a memory:// store lives inside one process and locks \
                     nothing any other process can see (nor anything after a restart); leave --store \
                     out for the durable embedded store, or give a redis://, redlock:// or etcd:// URL"
                )));
            }
        }
        Ok(())
    }
}

/// The process-wide metrics recorder, installed by the first server of the process. Servers
/// starting at once (several in one process) wait for that one install rather than race it: a
/// second install would fail.
pub fn metrics_handle() -> Result<PrometheusHandle> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let buckets =
        [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("distlock_request_seconds".into()), &buckets)
        .map_err(|e| Error::Metrics(format!("buckets: {e}")))?
        .install_recorder()
        .map_err(|e| Error::Metrics(format!("installing the recorder: {e}")))?;
    Ok(installed.insert(handle).clone())
}

/// Checks the settings, binds `listen` (first, so that a busy port fails before the data
/// directory is touched) and serves as [`serve`] does: what `distlock serve` runs.
pub async fn run(
    listen: SocketAddr,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check()?;
    // TLS files are read first: a bad one stops the server before it binds or opens its store.
    let tls = crate::listener::prepare(&config.net)?;
    let listener = crate::listener::bind(listen).map_err(|source| Error::Bind { addr: listen, source })?;
    serve_prepared(listener, config, tls, shutdown).await
}

/// Serves on `listener` (bound by the caller, e.g. to `127.0.0.1:0`) until `shutdown` completes:
/// checks the settings, reads the TLS files, opens the store, then answers. After `shutdown`,
/// waiting acquires are answered at once with 503 `shutting_down` (retryable), and other
/// requests in flight may finish for at most `shutdown_grace`. Token files (and TLS files) are
/// re-read on SIGHUP. Metrics go to the process-wide recorder ([`metrics_handle`]), so servers
/// in one process share them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check()?;
    let tls = crate::listener::prepare(&config.net)?;
    serve_prepared(listener, config, tls, shutdown).await
}

/// [`serve`] once the settings are checked and the TLS files read.
async fn serve_prepared(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    tls: Option<Arc<crate::tls::Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let auth = Arc::new(Auth::open(config.auth_token_file.clone(), config.admin_token_file.clone())?);
    let (backend, embedded): (Arc<dyn distlock::Backend>, _) = match &config.store {
        None => {
            let dir = config.data_dir.clone();
            let (limits, compact) = (config.limits, config.compact_bytes);
            let opened = tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir, limits, compact))
                .await
                .map_err(|e| Error::Serving(std::io::Error::other(format!("the recovery task: {e}"))))?;
            let store = opened.map_err(|source| Error::Store { dir: config.data_dir.clone(), source })?;
            let store = Arc::new(store);
            (store.clone(), Some(store))
        }
        Some(url) => {
            // Opened on first use: an unreachable store is reported by /healthz, not fatal.
            let lazy = LazyBackend::open(url)
                .await
                .map_err(|source| Error::Backend { url: crate::lazy::redacted(url), source })?;
            (Arc::new(lazy), None)
        }
    };
    let events = Arc::new(Events::new(config.event_history));
    if let Some(store) = &embedded {
        let events = events.clone();
        store.observe(Arc::new(move |event| match event {
            TableEvent::Expired(lease) => events.publish_lease(
                EventKind::Expiry,
                &lease.key,
                Some(&lease.holder),
                Some(lease.fencing_token),
                &lease.lease_id,
            ),
            TableEvent::Queued { key, holder } => events.publish(EventKind::Wait, key, Some(holder), None),
        }));
    } else {
        // A store that watches itself (etcd) reports what every client of it does: every server
        // in front of it shows every expiry and queued caller, and the grants and releases made
        // through the others (its own handlers publish their own, with the lease).
        let events = events.clone();
        backend.observe(Arc::new(move |e: distlock::StoreEvent| {
            use distlock::StoreEventKind as S;
            let kind = match (e.kind, e.local) {
                (S::Expired, _) => EventKind::Expiry,
                (S::Queued, _) => EventKind::Wait,
                (S::Granted, false) => EventKind::Grant,
                (S::Released, false) => EventKind::Release,
                (S::ForceReleased, false) => EventKind::ForceRelease,
                _ => return,
            };
            events.publish(kind, &e.key, Some(&e.holder), e.fencing_token);
        }));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    auth.clone().reload_on_sighup();
    let state = AppState {
        backend: backend.clone(),
        embedded,
        auth: auth.clone(),
        metrics: metrics_handle()?,
        events,
        stopping: stop_rx.clone(),
    };
    let addr = listener.local_addr().map_err(Error::Serving)?;
    tracing::info!(%addr, store = backend.name(), auth = state.auth.table().required(), "distlock server listening");
    let mut stop_rx = stop_rx;
    let server = crate::listener::serve(listener, router(state), config.net.clone(), tls, async move {
        shutdown.await;
        tracing::info!(
            "shutting down: no new connections; waiting acquires answered 503 shutting_down; \
             finishing other requests in flight"
        );
        let _ = stop_tx.send(true);
    });
    let grace = config.shutdown_grace;
    tokio::select! {
        result = server => result.map_err(Error::Serving)?,
        _ = async {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "requests still in flight after the grace period; stopping anyway"),
    }
    Ok(())
}
