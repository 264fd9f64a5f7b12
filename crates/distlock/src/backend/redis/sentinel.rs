//! Redis behind Sentinel: `redis-sentinel://[user:password@]s1:26379,s2:26379/MASTER[?…]`.
//!
//! The sentinels name the current master (`SENTINEL get-master-addr-by-name`); the backend talks
//! to it like to a standalone Redis and asks again when a call fails (the master died, or was
//! demoted and answers `READONLY`) and at most once a second otherwise, so it follows a failover
//! within about a second of the sentinels' decision. Replication is asynchronous: a lock written to
//! the master and not yet to a replica is forgotten by a failover. With `min_replicas=N`, every
//! grant is followed by `WAIT N` on the same connection; a grant not acknowledged by N replicas
//! within `wait_timeout` is undone and the caller gets `Unavailable`. Renewals wait the same way
//! and count only when acknowledged: a renewal the promoted replica never got would leave the
//! store's deadline earlier than the holder's. So while fewer than N replicas follow the master
//! (after a failover, until the old master rejoins as a replica), holders cannot renew and lose
//! their leases at their deadlines rather than risk an overlap.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::RedisConfig;
use crate::backend::params::Params;
use crate::error::{Error, Result};

/// How often the master's address is checked when nothing failed.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Settings of a Sentinel URL beyond those of a plain Redis one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// `host:port` of every sentinel.
    pub sentinels: Vec<String>,
    /// The master's name in the sentinels' configuration.
    pub master: String,
    /// Replicas that must acknowledge each grant (`min_replicas`; default 0: no waiting).
    pub min_replicas: u32,
    /// How long a grant waits for them (`wait_timeout`; default 500 ms).
    pub wait_timeout: Duration,
}

/// Splits a `redis-sentinel://` URL into the sentinel settings and a plain Redis config (its URL
/// a placeholder until the master is known; `prefix`, `timeout`, `queue_ttl`, `meta_ttl` as for
/// `redis://`, credentials used for the master).
///
/// ```
/// use distlock::backend::redis::sentinel::parse;
/// let (s, c) = parse("redis-sentinel://s1:26379,s2:26379/mymaster?min_replicas=1&prefix=p").unwrap();
/// assert_eq!((s.sentinels.len(), s.master.as_str(), s.min_replicas), (2, "mymaster", 1));
/// assert_eq!(c.prefix, "p");
/// assert!(parse("redis-sentinel://s1:26379").is_err());
/// ```
pub fn parse(url: &str) -> Result<(SentinelConfig, RedisConfig)> {
    let rest = url
        .strip_prefix("redis-sentinel://")
        .ok_or_else(|| Error::InvalidInput(format!("{url:?} is not a redis-sentinel:// URL")))?;
    let (auth, rest, query) = super::split_url(rest);
    let (hosts, master) = rest.split_once('/').ok_or_else(|| {
        Error::InvalidInput(format!("{url:?} names no master: redis-sentinel://HOST:PORT,…/MASTER_NAME"))
    })?;
    if master.is_empty() || master.contains('/') {
        return Err(Error::InvalidInput(format!("{url:?}: the master name must follow the hosts, once")));
    }
    let sentinels: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(str::to_owned).collect();
    if sentinels.is_empty() {
        return Err(Error::InvalidInput(format!("{url:?} names no sentinel")));
    }
    let params = Params::parse(query, &[super::PARAMS, &["min_replicas", "wait_timeout"]].concat())?;
    let sentinel = SentinelConfig {
        sentinels,
        master: master.to_owned(),
        min_replicas: params.value("min_replicas", "a number of replicas", |_| true)?.unwrap_or(0),
        wait_timeout: params.duration("wait_timeout")?.unwrap_or(Duration::from_millis(500)),
    };
    // The host is replaced by the master's address once the sentinels name it.
    let config = RedisConfig::with_params(&format!("redis://{auth}sentinel-master"), &params)?;
    Ok((sentinel, config))
}

/// The master as the sentinels last named it, and the connection to it.
pub(super) struct Master {
    sentinel: SentinelConfig,
    /// The plain config, its URL's host replaced for each master.
    config: RedisConfig,
    current: tokio::sync::Mutex<Option<Current>>,
    /// Set when a call failed: ask the sentinels before the next one.
    suspect: Mutex<bool>,
}

struct Current {
    address: String,
    conn: ConnectionManager,
    /// A second connection for grants that wait for replicas: `WAIT` blocks the connection it is
    /// sent on, and must not hold up renewals and releases on the shared one.
    grants: ConnectionManager,
    checked: Instant,
}

impl Master {
    pub(super) fn new(sentinel: SentinelConfig, config: RedisConfig) -> Master {
        Master { sentinel, config, current: tokio::sync::Mutex::new(None), suspect: Mutex::new(false) }
    }

    pub(super) fn sentinel(&self) -> &SentinelConfig {
        &self.sentinel
    }

    /// A call failed: the master may have changed.
    pub(super) fn suspect(&self) {
        if let Ok(mut s) = self.suspect.lock() {
            *s = true;
        }
    }

    /// The redis URL of the master at `address`, with the configured credentials and db.
    pub(super) fn url_for(&self, address: &str) -> String {
        self.config.url.replacen("sentinel-master", address, 1)
    }

    /// The grant connection to the current master (see [`Current`]).
    pub(super) async fn grant_conn(&self) -> Result<ConnectionManager> {
        self.conn().await?;
        let current = self.current.lock().await;
        current
            .as_ref()
            .map(|c| c.grants.clone())
            .ok_or_else(|| Error::Unavailable(format!("no master known for {:?}", self.sentinel.master)))
    }

    /// The connection to the current master, asking the sentinels first when a call failed or
    /// the last answer is older than [`RECHECK_EVERY`].
    pub(super) async fn conn(&self) -> Result<(ConnectionManager, String)> {
        let mut current = self.current.lock().await;
        let suspect = self.suspect.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or(true);
        if let Some(c) = current.as_mut() {
            if !suspect && c.checked.elapsed() < RECHECK_EVERY {
                return Ok((c.conn.clone(), c.address.clone()));
            }
        }
        let address = match self.ask_sentinels().await {
            Ok(a) => a,
            // The sentinels are away: keep using the last master rather than failing every call.
            Err(e) => match current.as_ref() {
                Some(c) => return Ok((c.conn.clone(), c.address.clone())),
                None => return Err(e),
            },
        };
        if let Some(c) = current.as_mut() {
            if c.address == address && !suspect {
                c.checked = Instant::now();
                return Ok((c.conn.clone(), address));
            }
        }
        // A new address, or a call failed: make sure it is a master (a sentinel that has not yet
        // seen a failover names the demoted one).
        self.check_master(&address).await?;
        if let Some(c) = current.as_mut() {
            if c.address == address {
                c.checked = Instant::now();
                return Ok((c.conn.clone(), address));
            }
            tracing::warn!(from = %c.address, to = %address, master = %self.sentinel.master, "redis master changed");
        }
        let client = redis::Client::open(self.url_for(&address))
            .map_err(|e| Error::InvalidInput(format!("bad redis URL for master {address}: {e}")))?;
        let open = |client: redis::Client, timeout: Duration| {
            ConnectionManager::new_lazy_with_config(client, super::manager_config(timeout))
                .map_err(|e| Error::Unavailable(format!("redis master {address}: {e}")))
        };
        // `WAIT` answers only after `wait_timeout` while the replicas lag: with the plain call
        // timeout the grant connection dropped that answer, and with it a `NOSCRIPT` from a
        // promoted replica (which starts with no scripts), so the script was never reloaded
        // there; every clean-up of an abandoned queue place then failed, and places blocked the
        // queue for `queue_ttl` after a failover (the fault suite's Sentinel kill case).
        let conn = open(client.clone(), self.config.timeout)?;
        let grants = open(client, self.config.timeout + self.sentinel.wait_timeout)?;
        *current =
            Some(Current { address: address.clone(), conn: conn.clone(), grants, checked: Instant::now() });
        Ok((conn, address))
    }

    /// `host:port` of the master: the first sentinel to answer (all are asked at once, so one
    /// that hangs costs nothing while another answers).
    async fn ask_sentinels(&self) -> Result<String> {
        let asks = self.sentinel.sentinels.iter().map(|s| {
            Box::pin(async move {
                match tokio::time::timeout(self.config.timeout, self.ask(s)).await {
                    Ok(Ok(address)) => Ok(address),
                    Ok(Err(e)) => Err(format!("{s}: {e}")),
                    Err(_) => Err(format!("{s}: no answer within {:?}", self.config.timeout)),
                }
            })
        });
        let address = match futures_util::future::select_ok(asks).await {
            Ok((address, _)) => address,
            Err(last) => {
                return Err(Error::Unavailable(format!(
                    "no sentinel names master {:?} ({last})",
                    self.sentinel.master
                )))
            }
        };
        Ok(address)
    }

    /// `Ok` when `address` is a master now (`ROLE`).
    async fn check_master(&self, address: &str) -> Result<()> {
        let role = tokio::time::timeout(self.config.timeout, self.role(address)).await;
        match role {
            Ok(Ok(role)) if role == "master" => Ok(()),
            Ok(Ok(role)) => Err(Error::Unavailable(format!(
                "the sentinels name {address} as master of {:?}, but it is a {role} (failover under way?)",
                self.sentinel.master
            ))),
            Ok(Err(e)) => Err(Error::Unavailable(format!("redis master {address}: {e}"))),
            Err(_) => Err(Error::Unavailable(format!("redis master {address}: no answer to ROLE"))),
        }
    }

    /// The first field of `ROLE` at `address`: `master`, `slave` or `sentinel`.
    async fn role(&self, address: &str) -> std::result::Result<String, String> {
        let client = redis::Client::open(self.url_for(address)).map_err(|e| e.to_string())?;
        let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        let reply: Vec<redis::Value> =
            redis::cmd("ROLE").query_async(&mut conn).await.map_err(|e| e.to_string())?;
        let first = reply.into_iter().next().ok_or_else(|| "empty ROLE reply".to_owned())?;
        redis::from_redis_value(first).map_err(|e| e.to_string())
    }

    async fn ask(&self, sentinel: &str) -> std::result::Result<String, String> {
        let client = redis::Client::open(format!("redis://{sentinel}")).map_err(|e| e.to_string())?;
        let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        let reply: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.sentinel.master)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let (host, port) = reply.ok_or_else(|| "does not know this master".to_owned())?;
        Ok(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
    }
}
