//! The single-Redis backend: `redis://[user:password@]host:port[/db][?prefix=P&timeout=D&queue_ttl=D&meta_ttl=D]`,
//! or `rediss://…` for TLS (rustls): the system's root certificates, or `ca=PATH` (a PEM file),
//! and `cert=PATH&key=PATH` for a client certificate when Redis asks for one.
//!
//! One Lua script per operation (`scripts.rs`): acquire sets the lock and increments the key's
//! fencing counter in the same step; renew is compare-and-PEXPIRE; release is compare-and-delete.
//! Waiting is FIFO through a per-key queue in Redis, woken by the release over pub/sub
//! (`wakeups.rs`) and, for expiry (which publishes nothing), by a fallback timer set to the lock's
//! remaining TTL. One multiplexed, self-reconnecting connection per backend; every call is
//! bounded by `timeout` (default 2 s) and fails with [`Error::Unavailable`] past it.
//!
//! Semaphores, shared locks and leader elections (a lease with a value, proclaim, watch) are
//! offered too: a plain lock keeps its one string, every other lease is an entry of a hash beside
//! it, judged by the same kind of script (`many.rs`); `watch.rs` follows a key's changes over
//! pub/sub. Redlock does not offer them.

mod many;
pub mod redlock;
mod scripts;
pub mod sentinel;
mod status;
mod wakeups;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use self::scripts::{LeaseCall, LeaseScript, ScriptCall, Scripts};
use self::wakeups::{Registration, Source, Wakeups};
use crate::backend::params::Params;
use crate::backend::waiting::{Refused, Waiting};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::types::{AcquireRequest, Grant, LeaseId, ListQuery, LockInfo, LockMode, LockPage};

/// Settings of a Redis backend, parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The URL handed to the redis crate (of the parameters, only `protocol` stays).
    pub url: String,
    /// Prefix of every key the backend writes (`prefix` parameter; default `distlock`).
    pub prefix: String,
    /// Bound on every call to Redis (`timeout` parameter, e.g. `500ms`; default 2 s).
    pub timeout: Duration,
    /// PEM files for TLS (`ca`, `cert`, `key` parameters; `rediss://` only).
    pub tls: TlsFiles,
    /// How long a waiter's place in the queue lasts unless refreshed: a waiter that crashed
    /// holds up the queue at most this long (`queue_ttl` parameter; default 6 s).
    pub queue_ttl: Duration,
    /// How long a key's fencing counter and queue order stay after their last use (`meta_ttl`
    /// parameter; default 7 days). Safe to expire: tokens never go below the server's clock.
    pub meta_ttl: Duration,
}

/// PEM files for a `rediss://` connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates to trust instead of the system's roots.
    pub ca: Option<String>,
    /// Client certificate (with `key`), for servers that verify clients.
    pub cert: Option<String>,
    /// The client certificate's private key.
    pub key: Option<String>,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Reads the files into what the redis crate takes.
    fn load(&self) -> Result<redis::TlsCertificates> {
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| Error::InvalidInput(format!("cannot read {path}: {e}")))
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? })
            }
            (None, None) => None,
            _ => return Err(Error::InvalidInput("cert= and key= go together".into())),
        };
        Ok(redis::TlsCertificates { client_tls, root_cert: self.ca.as_deref().map(read).transpose()? })
    }
}

/// The parameters of a `redis://` URL (also read by `redis-cluster://`, `redis-sentinel://` and
/// `redlock://`): ours, and `protocol` (`resp2` or `resp3`), which the redis crate reads.
pub(crate) const PARAMS: &[&str] =
    &["prefix", "timeout", "queue_ttl", "meta_ttl", "ca", "cert", "key", "protocol"];

impl RedisConfig {
    /// Parses a `redis://` or `rediss://` URL with the optional parameters above (see
    /// [`crate::backend`] for the rule on unknown, empty and repeated parameters).
    ///
    /// ```
    /// use distlock::backend::redis::RedisConfig;
    /// let c = RedisConfig::parse("redis://127.0.0.1:6379/2?prefix=billing&timeout=500ms").unwrap();
    /// assert_eq!(c.url, "redis://127.0.0.1:6379/2");
    /// assert_eq!(c.prefix, "billing");
    /// assert_eq!(c.timeout, std::time::Duration::from_millis(500));
    /// ```
    pub fn parse(url: &str) -> Result<RedisConfig> {
        let (base, params) = Params::split(url, PARAMS)?;
        RedisConfig::with_params(base, &params)
    }

    /// The config of the server at `base` (a `redis://` or `rediss://` URL without its query),
    /// with the parameters of [`PARAMS`] read from `params`.
    pub(crate) fn with_params(base: &str, params: &Params<'_>) -> Result<RedisConfig> {
        let url = match params.get("protocol") {
            Some(protocol) => format!("{base}?protocol={protocol}"),
            None => base.to_owned(),
        };
        let config = RedisConfig {
            url,
            prefix: params.string("prefix").unwrap_or_else(|| "distlock".to_owned()),
            timeout: params.duration("timeout")?.unwrap_or(Duration::from_secs(2)),
            queue_ttl: params
                .duration("queue_ttl")?
                .map_or(Duration::from_secs(6), |d| d.max(Duration::from_millis(300))),
            meta_ttl: params.duration("meta_ttl")?.unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            tls: TlsFiles { ca: params.string("ca"), cert: params.string("cert"), key: params.string("key") },
        };
        if config.tls.any() && !base.starts_with("rediss://") {
            return Err(Error::InvalidInput("ca=, cert= and key= need a rediss:// URL".into()));
        }
        if config.prefix.is_empty() || config.prefix.contains(['{', '}', '\0']) {
            return Err(Error::InvalidInput(
                "redis key prefix must be non-empty, without '{', '}' or NUL".into(),
            ));
        }
        Ok(config)
    }
}

/// Leases kept in one Redis server. See the module docs.
pub struct RedisBackend {
    store: Store,
    wakeups: Arc<Wakeups>,
}

/// The connection, the scripts and the settings: everything needed to run a script.
#[derive(Clone)]
struct Store {
    conn: Conn,
    scripts: Arc<Scripts>,
    config: RedisConfig,
}

/// Where calls go: one server, whichever master the sentinels name, or a cluster (each call to
/// the master of its key's slot, following MOVED/ASK).
#[derive(Clone)]
enum Conn {
    Direct(ConnectionManager),
    Sentinel(Arc<sentinel::Master>),
    Cluster(redis::cluster_async::ClusterConnection, Option<ClusterReplicas>),
}

/// A cluster's `min_replicas`: each grant and renewal is followed by `WAIT` on the master of its
/// key's slot, as behind Sentinel, on connections of their own (`WAIT` blocks the connection it
/// is sent on).
#[derive(Clone)]
struct ClusterReplicas {
    grants: redis::cluster_async::ClusterConnection,
    min_replicas: u32,
    wait_timeout: Duration,
}

/// A connection of either kind, for the calls that work the same on both.
enum Live {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Live {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Live::Single(c) => c.req_packed_command(cmd),
            Live::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Live::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Live::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Live::Single(c) => c.get_db(),
            Live::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis names of one lock; they share the hash tag `{key}` (see `scripts.rs`, `many.rs`).
#[derive(Clone)]
struct LockKeys {
    lock: String,
    meta: String,
    queue: String,
    alive: String,
    holders: String,
    deadlines: String,
    asks: String,
    /// Wakes waiters: a message names the one whose turn has come (`*`: every waiter).
    channel: String,
    /// Announces every grant, release and proclamation, for [`Backend::watch`].
    changes: String,
}

impl LockKeys {
    fn new(prefix: &str, key: &str) -> LockKeys {
        let base = format!("{prefix}:{{{key}}}");
        LockKeys {
            lock: format!("{base}:lock"),
            meta: format!("{base}:meta"),
            queue: format!("{base}:queue"),
            alive: format!("{base}:alive"),
            holders: format!("{base}:holders"),
            deadlines: format!("{base}:deadlines"),
            asks: format!("{base}:asks"),
            channel: format!("{base}:wake"),
            changes: format!("{base}:watch"),
        }
    }

    /// The KEYS of every lock script, in the order `lock_keys()` reads them.
    fn all(&self) -> Vec<&str> {
        vec![&self.lock, &self.meta, &self.queue, &self.alive, &self.holders, &self.deadlines, &self.asks]
    }
}

impl RedisBackend {
    /// Connects lazily: an unreachable Redis shows up as [`Error::Unavailable`] on first use.
    pub async fn open(config: RedisConfig) -> Result<RedisBackend> {
        let client = if config.tls.any() {
            redis::Client::build_with_tls(config.url.as_str(), config.tls.load()?)
        } else {
            redis::Client::open(config.url.as_str())
        }
        .map_err(|e| Error::InvalidInput(format!("bad redis URL: {e}")))?;
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config(config.timeout))
            .map_err(|e| unavailable(&config, e))?;
        Ok(RedisBackend {
            wakeups: Wakeups::new(Source::Nodes(vec![client]), config.timeout),
            store: Store { conn: Conn::Direct(conn), scripts: Arc::new(Scripts::new()), config },
        })
    }

    /// Opens `redis-cluster://[user:pass@]h1:p1,h2:p2,…[?…]` (`rediss-cluster://` with TLS and
    /// `ca`/`cert`/`key`): every call goes to the master of its key's slot (all keys of one lock
    /// share a hash tag, so each script touches one slot); MOVED and ASK are followed and the slot
    /// map refreshed by the redis crate's cluster client. Wake-ups use sharded pub/sub
    /// (`SPUBLISH`/`SSUBSCRIBE` on the master of the lock's slot, followed across slot moves and
    /// failovers by the cluster client).
    /// `min_replicas=N` (and `wait_timeout`, default 500 ms) make every grant and renewal wait for
    /// N replicas of its master, as behind Sentinel (see [`sentinel`]).
    pub async fn open_cluster(url: &str) -> Result<RedisBackend> {
        let (scheme, rest) =
            match (url.strip_prefix("redis-cluster://"), url.strip_prefix("rediss-cluster://")) {
                (Some(rest), _) => ("redis", rest),
                (_, Some(rest)) => ("rediss", rest),
                _ => return Err(Error::InvalidInput(format!("{url:?} is not a redis-cluster:// URL"))),
            };
        let (auth, hosts, query) = split_url(rest);
        let hosts: Vec<&str> = hosts.trim_end_matches('/').split(',').filter(|h| !h.is_empty()).collect();
        let Some(first) = hosts.first() else {
            return Err(Error::InvalidInput(format!("{url:?} names no cluster node")));
        };
        // The parameters (prefix, timeout, TLS files…) read as for one node, and min_replicas
        // and wait_timeout as behind Sentinel.
        let params = Params::parse(query, &[PARAMS, &["min_replicas", "wait_timeout"]].concat())?;
        let config = RedisConfig::with_params(&format!("{scheme}://{auth}{first}"), &params)?;
        let min_replicas: u32 = params.value("min_replicas", "a number of replicas", |_| true)?.unwrap_or(0);
        let wait_timeout = params.duration("wait_timeout")?.unwrap_or(Duration::from_millis(500));
        let node_urls: Vec<String> = hosts.iter().map(|h| format!("{scheme}://{auth}{h}")).collect();
        let client = |response_timeout: Duration| -> Result<redis::cluster::ClusterClient> {
            let mut builder = redis::cluster::ClusterClientBuilder::new(node_urls.clone())
                .connection_timeout(config.timeout)
                .response_timeout(response_timeout)
                .retries(2);
            if config.tls.any() {
                builder = builder.certs(config.tls.load()?);
            }
            builder.build().map_err(|e| Error::InvalidInput(format!("bad redis-cluster URL: {e}")))
        };
        let settings = &config;
        let connect = |client: redis::cluster::ClusterClient| async move {
            tokio::time::timeout(settings.timeout, client.get_async_connection())
                .await
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "redis cluster {first}: no answer within {:?}",
                        settings.timeout
                    ))
                })?
                .map_err(|e| unavailable(settings, e))
        };
        let conn = connect(client(config.timeout)?).await?;
        // `WAIT` answers only after `wait_timeout` while the replicas lag, and brings the answer
        // of the script before it (a `NOSCRIPT` from a promoted replica, say): the grants
        // connection waits that much longer, as behind Sentinel (see `sentinel.rs`).
        let replicas = match min_replicas {
            0 => None,
            _ => Some(ClusterReplicas {
                grants: connect(client(config.timeout + wait_timeout)?).await?,
                min_replicas,
                wait_timeout,
            }),
        };
        // Wake-ups by sharded pub/sub: a RESP3 client of its own whose connections push the
        // shard messages to one channel (see `wakeups.rs`).
        let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut pubsub = redis::cluster::ClusterClientBuilder::new(node_urls)
            .connection_timeout(config.timeout)
            .response_timeout(config.timeout)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push_tx);
        if config.tls.any() {
            pubsub = pubsub.certs(config.tls.load()?);
        }
        let pubsub =
            pubsub.build().map_err(|e| Error::InvalidInput(format!("bad redis-cluster URL: {e}")))?;
        let source =
            Source::Shards { client: Box::new(pubsub), pushes: std::sync::Mutex::new(Some(push_rx)) };
        Ok(RedisBackend {
            wakeups: Wakeups::new(source, config.timeout),
            store: Store {
                conn: Conn::Cluster(conn, replicas),
                scripts: Arc::new(Scripts::sharded()),
                config,
            },
        })
    }

    /// Opens `redis-sentinel://…` (see [`sentinel`]): asks the sentinels for the master now, so
    /// that unreachable sentinels show up as [`Error::Unavailable`] at once.
    pub async fn open_sentinel(url: &str) -> Result<RedisBackend> {
        let (sentinel_config, config) = sentinel::parse(url)?;
        let master = Arc::new(sentinel::Master::new(sentinel_config, config.clone()));
        master.conn().await?;
        Ok(RedisBackend {
            wakeups: Wakeups::new(Source::Sentinel(master.clone()), config.timeout),
            store: Store { conn: Conn::Sentinel(master), scripts: Arc::new(Scripts::new()), config },
        })
    }

    /// One run of the acquire script that fits the request: the lock's for a plain lock (limit
    /// 1, exclusive, no value: its storage stays what it always was), else the one of holders
    /// of several (`many.rs`). Answers `((granted, token or ms, holder), acknowledged)`.
    async fn attempt(
        &self,
        keys: &LockKeys,
        req: &AcquireRequest,
        enqueue: bool,
    ) -> Result<((i64, i64, String), bool)> {
        let config = &self.store.config;
        let lock = scripts::Acquire {
            keys,
            lease_id: req.lease_id.as_str(),
            ttl: req.ttl,
            holder: &req.holder,
            enqueue,
            queue_ttl: config.queue_ttl,
            meta_ttl: config.meta_ttl,
        };
        if req.limit == 1 && req.mode == LockMode::Exclusive && req.value.is_none() {
            return self.store.replicated(&lock).await;
        }
        let call = many::AcquireMany { lock, mode: req.mode, limit: req.limit, value: req.value.as_deref() };
        self.store.replicated(&call).await
    }

    /// The answer to a call that was granted `token` (sent at `sent`): the grant, or, when a
    /// failover could forget it (too few replicas acknowledged), `Unavailable` once it is taken
    /// back.
    async fn granted(
        &self,
        keys: &LockKeys,
        req: &AcquireRequest,
        token: u64,
        acknowledged: bool,
        sent: Instant,
    ) -> Result<Grant> {
        if !acknowledged {
            // A grant a failover could forget is no grant (the caller's guard also takes it back,
            // in the background, if this call fails or is dropped meanwhile).
            self.store.release_keys(keys, &req.lease_id).await?;
            return Err(Error::Unavailable(format!(
                "redis: fewer replicas than min_replicas acknowledged the grant of {:?} in time; \
                 it was undone",
                req.key
            )));
        }
        Ok(Grant { lease_id: req.lease_id.clone(), fencing_token: token, ttl: req.ttl, counted_from: sent })
    }

    async fn register(&self, keys: &LockKeys, lease_id: &LeaseId) -> Option<Registration> {
        match self.wakeups.register(&keys.channel, lease_id.as_str()).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "redis pub/sub unavailable; waiting on timers only");
                None
            }
        }
    }
}

impl Store {
    fn keys(&self, key: &str) -> LockKeys {
        LockKeys::new(&self.config.prefix, key)
    }

    /// The connection calls go to now.
    async fn connection(&self) -> Result<Live> {
        match &self.conn {
            Conn::Direct(c) => Ok(Live::Single(c.clone())),
            Conn::Sentinel(m) => m.conn().await.map(|(c, _)| Live::Single(c)),
            Conn::Cluster(c, _) => Ok(Live::Cluster(c.clone())),
        }
    }

    /// A call failed: behind Sentinel, ask which server is master before the next one.
    fn failed(&self) {
        if let Conn::Sentinel(m) = &self.conn {
            m.suspect();
        }
    }

    /// Runs one script invocation under the call timeout.
    async fn eval<T: redis::FromRedisValue>(&self, invocation: redis::ScriptInvocation<'_>) -> Result<T> {
        let mut conn = self.connection().await?;
        let result = match tokio::time::timeout(self.config.timeout, invocation.invoke_async(&mut conn)).await
        {
            Ok(result) => result.map_err(|e| unavailable(&self.config, e)),
            Err(_) => Err(Error::Unavailable(format!(
                "redis {}: no answer within {:?}",
                server_name(&self.config),
                self.config.timeout
            ))),
        };
        if result.is_err() {
            self.failed();
        }
        result
    }

    /// Runs `call`. Behind Sentinel with `min_replicas`, the script and `WAIT` go as one
    /// pipeline on the master's grant connection (so `WAIT` counts this write, and blocks none of
    /// the calls on the shared connection), and the answer says whether enough replicas
    /// acknowledged; elsewhere the acknowledgement is not asked for (`true`).
    async fn replicated<T: redis::FromRedisValue>(&self, call: &impl ScriptCall) -> Result<(T, bool)> {
        if let Conn::Cluster(_, Some(replicas)) = &self.conn {
            return self.cluster_replicated(call, replicas).await;
        }
        let replicas = match &self.conn {
            Conn::Sentinel(m) if m.sentinel().min_replicas > 0 => Some(m),
            _ => None,
        };
        let Some(m) = replicas else {
            return Ok((self.eval(call.invocation(&self.scripts)).await?, true));
        };
        let (script, keys) = (call.script(&self.scripts), call.keys());
        let (wanted, within) = (m.sentinel().min_replicas, m.sentinel().wait_timeout);
        let mut conn = m.grant_conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len()).arg(keys).arg(call.args());
        pipe.cmd("WAIT").arg(wanted).arg(millis(within));
        let bound = within + self.config.timeout;
        let mut result = tokio::time::timeout(bound, pipe.query_async::<(T, i64)>(&mut conn)).await;
        if matches!(&result, Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // First use on this master: load the script, then once more.
            let load = script.prepare_invoke().load_async(&mut conn).await;
            load.map_err(|e| unavailable(&self.config, e))?;
            result = tokio::time::timeout(bound, pipe.query_async(&mut conn)).await;
        }
        match result {
            Ok(Ok((answer, acked))) => Ok((answer, acked.max(0) as u32 >= wanted)),
            Ok(Err(e)) => {
                self.failed();
                Err(unavailable(&self.config, e))
            }
            Err(_) => {
                self.failed();
                Err(Error::Unavailable(format!(
                    "redis master of {:?}: no answer within {bound:?}",
                    m.sentinel().master
                )))
            }
        }
    }

    /// [`Store::replicated`] on a cluster: the script and `WAIT` go as one pipeline to the master
    /// of the call's slot (every key of a call shares one hash tag), on the grants connection.
    async fn cluster_replicated<T: redis::FromRedisValue>(
        &self,
        call: &impl ScriptCall,
        replicas: &ClusterReplicas,
    ) -> Result<(T, bool)> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
        let (script, keys) = (call.script(&self.scripts), call.keys());
        let slot = Slot::for_key(keys.first().copied().unwrap_or_default());
        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len()).arg(&keys).arg(call.args());
        pipe.cmd("WAIT").arg(replicas.min_replicas).arg(millis(replicas.wait_timeout));
        let mut conn = replicas.grants.clone();
        let bound = replicas.wait_timeout + self.config.timeout;
        let send = |conn: &mut redis::cluster_async::ClusterConnection| {
            let (pipe, route) = (pipe.clone(), route.clone());
            let mut conn = conn.clone();
            async move { tokio::time::timeout(bound, conn.route_pipeline(pipe, 0, 2, route)).await }
        };
        // A routed pipeline answers a command's error in its place among the values.
        let no_script = |r: &std::result::Result<redis::RedisResult<Vec<redis::Value>>, _>| match r {
            Ok(Err(e)) => e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
            Ok(Ok(values)) => matches!(values.first(), Some(redis::Value::ServerError(e))
                if e.kind() == Some(redis::ServerErrorKind::NoScript)),
            Err(_) => false,
        };
        let mut result = send(&mut conn).await;
        if no_script(&result) {
            // First use on this master: load the script (on every master), then once more.
            let load = script.prepare_invoke().load_async(&mut conn).await;
            load.map_err(|e| unavailable(&self.config, e))?;
            result = send(&mut conn).await;
        }
        match result {
            Ok(Ok(values)) => {
                if let Some(redis::Value::ServerError(e)) =
                    values.iter().find(|v| matches!(v, redis::Value::ServerError(_)))
                {
                    return Err(unavailable(&self.config, redis::RedisError::from(e.clone())));
                }
                let (answer, acked) = redis::from_redis_value::<(T, i64)>(redis::Value::Array(values))
                    .map_err(|e| Error::Unavailable(format!("redis cluster: unreadable answer: {e}")))?;
                Ok((answer, acked.max(0) as u32 >= replicas.min_replicas))
            }
            Ok(Err(e)) => Err(unavailable(&self.config, e)),
            Err(_) => Err(Error::Unavailable(format!(
                "redis cluster, master of {:?}: no answer within {bound:?}",
                keys.first().copied().unwrap_or_default()
            ))),
        }
    }

    /// Takes `lease_id` out of the queue: `(Some(token), acknowledged)` when the key was handed
    /// to it before it left (it holds the key, its deadline counted from this call), else `None`.
    async fn dequeue(&self, keys: &LockKeys, lease_id: &LeaseId) -> Result<(Option<u64>, bool)> {
        let call = LeaseCall { script: LeaseScript::Dequeue, keys, lease_id: lease_id.as_str() };
        let (token, acknowledged): (i64, bool) = self.replicated(&call).await?;
        Ok(((token > 0).then_some(token as u64), acknowledged))
    }

    /// Runs the renew script: `(token, ttl ms applied)`, token 0 when `lease_id` does not hold the
    /// lock. `ttl` `None` keeps the TTL stored with the lease.
    ///
    /// Behind Sentinel with `min_replicas`, a renewal counts only once that many replicas hold
    /// it: one the master applied but no replica has would be forgotten by a failover, and the
    /// promoted replica would then free the lock at the earlier deadline while the holder counts
    /// on the later one. Not acknowledged in time: `Unavailable` (the holder keeps its deadline
    /// and its keeper tries again; the longer expiry left on the master only delays others).
    async fn renew(&self, keys: &LockKeys, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<(u64, u64)> {
        let call = scripts::Renew {
            keys,
            lease_id: lease_id.as_str(),
            ttl,
            fallback_ttl: crate::options::DEFAULT_TTL,
        };
        let ((token, ttl_ms), acked): ((i64, i64), bool) = self.replicated(&call).await?;
        if token > 0 && !acked {
            return Err(Error::Unavailable(format!(
                "redis: fewer replicas than min_replicas acknowledged the renewal of {:?} in time; \
                 it does not count",
                keys.lock
            )));
        }
        Ok((token.max(0) as u64, ttl_ms.max(0) as u64))
    }

    async fn release_keys(&self, keys: &LockKeys, lease_id: &LeaseId) -> Result<bool> {
        let call = LeaseCall { script: LeaseScript::Release, keys, lease_id: lease_id.as_str() };
        Ok(self.eval::<i64>(call.invocation(&self.scripts)).await? == 1)
    }

    pub(crate) async fn status(&self, key: &str) -> Result<LockInfo> {
        let keys = self.keys(key);
        let call = scripts::Status { keys: &keys };
        let (held, holder, token, pttl, waiters, entries): (i64, String, u64, i64, u64, Vec<status::Entry>) =
            self.eval(call.invocation(&self.scripts)).await?;
        Ok(status::info(key, held, holder, token, pttl, waiters, entries))
    }

    /// Runs the proclaim script: `false` when `lease_id` holds nothing on the key.
    async fn proclaim(&self, keys: &LockKeys, lease_id: &LeaseId, value: &str) -> Result<bool> {
        let call = many::Proclaim {
            keys,
            lease_id: lease_id.as_str(),
            value,
            fallback_ttl: crate::options::DEFAULT_TTL,
        };
        let (done, acked): (i64, bool) = self.replicated(&call).await?;
        if done == 1 && !acked {
            return Err(Error::Unavailable(format!(
                "redis: fewer replicas than min_replicas acknowledged the proclamation on {:?} in time",
                keys.lock
            )));
        }
        Ok(done == 1)
    }

    /// The keys (as the user named them) of lock entries starting with `prefix`, sorted.
    async fn scan_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        // A plain lock is a string `lock`; every other lease an entry of `holders`.
        for kind in ["lock", "holders"] {
            keys.extend(self.scan_kind(prefix, kind).await?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// The keys whose `kind` (`lock` or `holders`) exists, starting with `prefix`, unsorted.
    async fn scan_kind(&self, prefix: &str, kind: &str) -> Result<Vec<String>> {
        let pattern = format!("{}:{{{}*}}:{kind}", glob_escape(&self.config.prefix), glob_escape(prefix));
        // A cluster keeps keys on several masters: scan each of them.
        let nodes = match &self.conn {
            Conn::Cluster(c, _) => self.cluster_primaries(c.clone()).await?.into_iter().map(Some).collect(),
            _ => vec![None],
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut conn = self.connection().await?;
            let mut cursor = 0u64;
            loop {
                let scan = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .to_owned();
                let (next, batch) =
                    tokio::time::timeout(self.config.timeout, scan_on(&mut conn, scan, &node))
                        .await
                        .map_err(|_| {
                            Error::Unavailable(format!("redis {}: SCAN timed out", server_name(&self.config)))
                        })?
                        .map_err(|e| unavailable(&self.config, e))?;
                let named = batch.iter().filter_map(|k| self.key_of(k, kind));
                keys.extend(named.filter(|k| k.starts_with(prefix)));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// `(host, port)` of every master of the cluster, from `CLUSTER SLOTS`.
    async fn cluster_primaries(
        &self,
        mut conn: redis::cluster_async::ClusterConnection,
    ) -> Result<Vec<(String, u16)>> {
        // Each range: [start, end, [ip, port, id, …] of the master, replicas…].
        let ask = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let slots: Vec<Vec<redis::Value>> =
            tokio::time::timeout(self.config.timeout, ask.query_async(&mut conn))
                .await
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "redis {}: CLUSTER SLOTS timed out",
                        server_name(&self.config)
                    ))
                })?
                .map_err(|e| unavailable(&self.config, e))?;
        let master_of = |range: Vec<redis::Value>| -> Option<(String, u16)> {
            let node: Vec<redis::Value> = redis::from_redis_value(range.into_iter().nth(2)?).ok()?;
            let mut node = node.into_iter();
            Some((redis::from_redis_value(node.next()?).ok()?, redis::from_redis_value(node.next()?).ok()?))
        };
        let mut masters: Vec<(String, u16)> = slots.into_iter().filter_map(master_of).collect();
        masters.sort();
        masters.dedup();
        Ok(masters)
    }

    fn key_of(&self, redis_key: &str, kind: &str) -> Option<String> {
        let inner = redis_key.strip_prefix(&self.config.prefix)?.strip_prefix(":{")?;
        Some(inner.strip_suffix(kind)?.strip_suffix("}:")?.to_owned())
    }
}

/// One `SCAN` step on `node` (a cluster master by address), or on the single server.
async fn scan_on(
    conn: &mut Live,
    scan: redis::Cmd,
    node: &Option<(String, u16)>,
) -> redis::RedisResult<(u64, Vec<String>)> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    match (conn, node) {
        (Live::Cluster(c), Some((host, port))) => {
            let route = SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port };
            let value = c.route_command(scan, RoutingInfo::SingleNode(route)).await?;
            Ok(redis::from_redis_value(value)?)
        }
        (conn, _) => scan.query_async(conn).await,
    }
}

/// The server's `host:port[/db]` for messages (never the credentials).
fn server_name(config: &RedisConfig) -> &str {
    let url = config.url.split('@').next_back().unwrap_or_default();
    let url = url.split('?').next().unwrap_or(url);
    url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://")).unwrap_or(url)
}

/// `Unavailable`, in one line naming the server and the cause.
fn unavailable(config: &RedisConfig, e: redis::RedisError) -> Error {
    let cause = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    Error::Unavailable(format!("redis {}: {cause}", server_name(config)))
}

/// The settings of every connection manager: bounded connects and answers, one quick retry.
fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Splits what follows `scheme://` in a multi-host URL: `(credentials with their '@' or "",
/// hosts and path, query without its '?')`.
fn split_url(rest: &str) -> (String, &str, &str) {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts, query),
        None => (String::new(), rest, query),
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Escapes a prefix for a Redis glob pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// While armed, dropping this (the acquire was cancelled, or failed without a definite answer)
/// leaves the queue and releases a grant that may have been made but never seen, in the
/// background. When Redis cannot be reached (down, paused, cut off), a call that timed out may
/// still run once it is back — queue the caller or even grant it — so the clean-up keeps trying
/// until Redis answers, then once more after a round-trip timeout for a command that arrived late;
/// otherwise an abandoned place at the head of the queue would hold every waiter up for
/// `queue_ttl`. It gives up after `queue_ttl` (by then the abandoned place has lapsed anyway).
struct WaitGuard<'a> {
    store: &'a Store,
    keys: &'a LockKeys,
    lease_id: &'a LeaseId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let (store, keys, lease_id) = (self.store.clone(), self.keys.clone(), self.lease_id.clone());
        let once = crate::planted::active(crate::planted::Bug::AbandonedQueuePlace);
        handle.spawn(async move {
            if once {
                let _ = store.release_keys(&keys, &lease_id).await;
                let _ = store.dequeue(&keys, &lease_id).await;
                return;
            }
            let give_up = Instant::now() + store.config.queue_ttl;
            let (mut confirmed, mut pause) = (false, Duration::from_millis(100));
            while Instant::now() < give_up {
                // Handed the key between the two: not clean yet (the next round releases it).
                let cleaned = store.release_keys(&keys, &lease_id).await.is_ok()
                    && matches!(store.dequeue(&keys, &lease_id).await, Ok((None, _)));
                if cleaned && confirmed {
                    return;
                }
                if cleaned {
                    confirmed = true;
                    tokio::time::sleep(store.config.timeout).await;
                } else {
                    // Backing off: many callers may be failing at once while Redis is away.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        });
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant> {
        let keys = self.store.keys(&req.key);
        let turns = Waiting::start(req.wait);
        let waiting = turns.waits();
        let store = &self.store;
        let mut guard = WaitGuard { store, keys: &keys, lease_id: &req.lease_id, armed: true };
        let mut registration: Option<Registration> = None;
        loop {
            // Register for the wake-up before looking, so a release in between is not missed.
            if waiting && !registration.as_ref().is_some_and(Registration::is_current) {
                registration = self.register(&keys, &req.lease_id).await;
            }
            let sent = Instant::now();
            let ((granted, n, holder), acknowledged) = self.attempt(&keys, &req, waiting).await?;
            if granted == -1 {
                // Held with another limit: refused at once (the script took the caller out of the
                // queue), as waiting would not change it.
                guard.armed = false;
                return Err(Error::LimitMismatch {
                    key: req.key.clone(),
                    limit: n.clamp(1, i64::from(u32::MAX)) as u32,
                });
            }
            if granted == 1 {
                // Not acknowledged: the guard also takes the grant back, should `granted` fail to.
                guard.armed = !acknowledged;
                return self.granted(&keys, &req, n as u64, acknowledged, sent).await;
            }
            let holder = (!holder.is_empty()).then_some(holder);
            // Expiry publishes nothing: wake when the lock's TTL runs out, and in any case in time
            // to refresh our place in the queue.
            let refresh = self.store.config.queue_ttl / 3;
            let retry_in = if n > 0 { Duration::from_millis(n as u64 + 1).min(refresh) } else { refresh };
            let wake = registration.as_ref().map(|r| &*r.notify);
            if let Err(e) = turns.next_turn(&req.key, Refused { holder, retry_in, wake }).await {
                // A definite "held" (a try-once acquire never joins the queue) or a timeout.
                if matches!(e, Error::WaitTimeout { .. }) {
                    let sent = Instant::now();
                    // A failed call leaves the guard armed: it cleans up in the background.
                    let (handed, acknowledged) = self.store.dequeue(&keys, &req.lease_id).await?;
                    if let Some(token) = handed {
                        // The key was handed on to this waiter before it could leave.
                        guard.armed = !acknowledged;
                        return self.granted(&keys, &req, token, acknowledged, sent).await;
                    }
                }
                guard.armed = false;
                return Err(e);
            }
        }
    }

    async fn renew(&self, key: &str, lease_id: &LeaseId, ttl: Option<Duration>) -> Result<Grant> {
        let keys = self.store.keys(key);
        let sent = Instant::now();
        let (token, ttl_ms) = self.store.renew(&keys, lease_id, ttl).await?;
        if token == 0 {
            return Err(Error::not_owner(key));
        }
        Ok(Grant {
            lease_id: lease_id.clone(),
            fencing_token: token,
            ttl: Duration::from_millis(ttl_ms),
            counted_from: sent,
        })
    }

    async fn release(&self, key: &str, lease_id: &LeaseId) -> Result<()> {
        if self.store.release_keys(&self.store.keys(key), lease_id).await? {
            Ok(())
        } else {
            Err(Error::not_owner(key))
        }
    }

    async fn status(&self, key: &str) -> Result<LockInfo> {
        self.store.status(key).await
    }

    /// Redis keeps no ordered index of lock keys: this SCANs every key under the prefix, sorts
    /// them, and then reads the status of those after the cursor, in order, only until the page
    /// is full (one more tells whether more follow).
    async fn list(&self, query: &ListQuery) -> Result<LockPage> {
        let mut held = Vec::new();
        let keys = self.store.scan_keys(&query.prefix).await?;
        for key in keys.into_iter().filter(|k| query.matches(k)) {
            if query.limit.is_some_and(|n| held.len() > n) {
                break;
            }
            let info = self.store.status(&key).await?;
            if info.held {
                held.push(info);
            }
        }
        Ok(query.page(held))
    }

    /// Semaphores, shared locks and elections, each in one script per operation (`many.rs`).
    fn offers(&self) -> crate::Offers {
        crate::Offers { many_holders: true, elections: true, ..crate::Offers::default() }
    }

    async fn proclaim(&self, key: &str, lease_id: &LeaseId, value: &str) -> Result<()> {
        match self.store.proclaim(&self.store.keys(key), lease_id, value).await? {
            true => Ok(()),
            false => Err(Error::not_owner(key)),
        }
    }

    async fn watch(&self, key: &str) -> Result<Box<dyn crate::backend::StatusWatch>> {
        let keys = self.store.keys(key);
        Ok(Box::new(watch::RedisWatch::open(self.store.clone(), self.wakeups.clone(), key, keys).await?))
    }
}
