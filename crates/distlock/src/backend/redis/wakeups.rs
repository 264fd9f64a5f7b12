//! Wake-ups for waiters, over one pub/sub connection per backend.
//!
//! A release publishes the lease id of the first waiter in line on the lock's channel; the
//! subscriber task wakes exactly that waiter if it lives in this process. A waiter registers
//! (and the SUBSCRIBE is acknowledged) *before* it runs its acquire script, so a release in
//! between cannot be missed. If the pub/sub connection drops, every waiter is woken to re-check
//! and re-register; waiters also keep a fallback timer, so a lost message delays but never
//! strands them.
//!
//! Where the connection goes ([`Source`]): the one server; behind Sentinel, the master the
//! sentinels name now (a `PUBLISH` is replicated, so the subscription keeps working on a master
//! demoted to a replica, and moves when that node is gone); on a cluster, sharded pub/sub
//! (`SSUBSCRIBE` on the master of each lock's slot, through the redis crate's cluster client,
//! which moves the subscriptions when slots move or a master fails over; the scripts wake with
//! `SPUBLISH`, so a wake-up stays on its shard instead of crossing the cluster bus).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::Notify;

/// The message that wakes every waiter of a lock.
pub const BROADCAST: &str = "*";

/// Registered waiters: channel -> lease id -> its wake-up.
type Subscribers = HashMap<String, HashMap<String, Arc<Notify>>>;

/// Where the pub/sub connection goes.
pub enum Source {
    /// Any of these servers (one for `redis://`): the one that answered last, else the next in
    /// turn.
    Nodes(Vec<redis::Client>),
    /// The master the sentinels name now.
    Sentinel(Arc<super::sentinel::Master>),
    /// A cluster, sharded: a RESP3 cluster client whose connections send their pushes (the
    /// shard messages) to `pushes`, read by one task for the backend's life.
    Shards {
        client: Box<redis::cluster::ClusterClient>,
        pushes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>>>,
    },
}

/// The subscribe side: a pub/sub connection's sink, or a cluster connection that subscribes to
/// shard channels.
enum Sink {
    Plain(PubSubSink),
    Sharded(redis::cluster_async::ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Plain(s) => s.subscribe(channel).await,
            Sink::Sharded(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Plain(s) => s.unsubscribe(channel).await,
            Sink::Sharded(c) => c.sunsubscribe(channel).await,
        }
    }
}

pub struct Wakeups {
    source: Source,
    /// The node of [`Source::Nodes`] to try first.
    next: AtomicUsize,
    connect_timeout: Duration,
    subs: Mutex<Subscribers>,
    /// The subscribe side of the connection; also orders SUBSCRIBE / UNSUBSCRIBE calls.
    sink: tokio::sync::Mutex<Option<Sink>>,
}

/// A waiter's registration; dropping it unregisters.
pub struct Registration {
    wakeups: Arc<Wakeups>,
    channel: String,
    lease_id: String,
    pub notify: Arc<Notify>,
}

impl Wakeups {
    pub fn new(source: Source, connect_timeout: Duration) -> Arc<Wakeups> {
        Arc::new(Wakeups {
            source,
            next: AtomicUsize::new(0),
            connect_timeout,
            subs: Mutex::new(HashMap::new()),
            sink: tokio::sync::Mutex::new(None),
        })
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `lease_id` for wake-ups on `channel`; returns once the server has acknowledged
    /// the subscription. On error the caller falls back to its timer.
    pub async fn register(
        self: &Arc<Self>,
        channel: &str,
        lease_id: &str,
    ) -> redis::RedisResult<Registration> {
        self.register_with(channel, lease_id, Arc::new(Notify::new())).await
    }

    /// As [`Wakeups::register`], waking `notify` (which may be shared with other registrations).
    pub async fn register_with(
        self: &Arc<Self>,
        channel: &str,
        lease_id: &str,
        notify: Arc<Notify>,
    ) -> redis::RedisResult<Registration> {
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            *sink = Some(self.connect().await?);
        }
        let first = {
            let mut subs = self.subs();
            let waiters = subs.entry(channel.to_owned()).or_default();
            waiters.insert(lease_id.to_owned(), notify.clone());
            waiters.len() == 1
        };
        let registration = Registration {
            wakeups: self.clone(),
            channel: channel.to_owned(),
            lease_id: lease_id.to_owned(),
            notify,
        };
        if first {
            if let Some(s) = sink.as_mut() {
                // On failure, `registration` is dropped and unregisters itself.
                s.subscribe(channel).await?;
            }
        }
        Ok(registration)
    }

    /// A pub/sub connection where [`Source`] says, its messages delivered by a task.
    async fn connect(self: &Arc<Self>) -> redis::RedisResult<Sink> {
        let timed_out = || redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out"));
        if let Source::Shards { client, pushes } = &self.source {
            let conn = tokio::time::timeout(self.connect_timeout, client.get_async_connection())
                .await
                .map_err(|_| timed_out())??;
            // Every connection of the client pushes to the one receiver: one task reads it.
            if let Some(rx) = pushes.lock().unwrap_or_else(|p| p.into_inner()).take() {
                tokio::spawn(deliver_pushes(Arc::downgrade(self), rx));
            }
            return Ok(Sink::Sharded(conn));
        }
        let pubsub = self.connect_plain().await?;
        let (sink, stream) = pubsub.split();
        tokio::spawn(deliver(Arc::downgrade(self), stream));
        Ok(Sink::Plain(sink))
    }

    /// A pub/sub connection to one server ([`Source::Nodes`], [`Source::Sentinel`]).
    async fn connect_plain(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let attempt = |client: redis::Client| async move {
            tokio::time::timeout(self.connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out")))?
        };
        match &self.source {
            Source::Nodes(clients) => {
                let first = self.next.load(Ordering::Relaxed);
                let mut last = redis::RedisError::from((redis::ErrorKind::Io, "no node to subscribe at"));
                for i in 0..clients.len() {
                    let at = (first + i) % clients.len();
                    match attempt(clients[at].clone()).await {
                        Ok(pubsub) => {
                            self.next.store(at, Ordering::Relaxed);
                            return Ok(pubsub);
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Source::Sentinel(master) => {
                let (_, address) = master.conn().await.map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no master", e.to_string()))
                })?;
                attempt(redis::Client::open(master.url_for(&address))?).await
            }
            Source::Shards { .. } => {
                Err(redis::RedisError::from((redis::ErrorKind::Io, "a cluster subscribes by shard")))
            }
        }
    }

    /// The connection ended: forget it and wake everyone so they re-register (on a cluster,
    /// starting with the next node: this one may be gone).
    async fn disconnected(&self) {
        if let Source::Nodes(clients) = &self.source {
            let at = self.next.load(Ordering::Relaxed);
            self.next.store((at + 1) % clients.len().max(1), Ordering::Relaxed);
        }
        *self.sink.lock().await = None;
        let subs = std::mem::take(&mut *self.subs());
        for n in subs.values().flat_map(|m| m.values()) {
            n.notify_one();
        }
    }
}

impl Registration {
    /// `false` once the connection this registration was made on has gone.
    pub fn is_current(&self) -> bool {
        self.wakeups.subs().get(&self.channel).is_some_and(|m| m.contains_key(&self.lease_id))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let now_empty = {
            let mut subs = self.wakeups.subs();
            match subs.get_mut(&self.channel) {
                Some(m) => {
                    if m.get(&self.lease_id).is_some_and(|n| Arc::ptr_eq(n, &self.notify)) {
                        m.remove(&self.lease_id);
                    }
                    let empty = m.is_empty();
                    if empty {
                        subs.remove(&self.channel);
                    }
                    empty
                }
                None => false,
            }
        };
        if now_empty {
            let (wakeups, channel) = (self.wakeups.clone(), self.channel.clone());
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let mut sink = wakeups.sink.lock().await;
                    // Re-check under the sink lock: a new waiter may have registered meanwhile.
                    if wakeups.subs().contains_key(&channel) {
                        return;
                    }
                    if let Some(s) = sink.as_mut() {
                        let _ = s.unsubscribe(&channel).await;
                    }
                });
            }
        }
    }
}

/// Wakes the waiters `lease_id` names on `channel` (all of them for [`BROADCAST`]).
fn wake(wakeups: &Wakeups, channel: &str, lease_id: &str) {
    let to_wake: Vec<Arc<Notify>> = match wakeups.subs().get(channel) {
        Some(m) if lease_id == BROADCAST => m.values().cloned().collect(),
        Some(m) => m.get(lease_id).cloned().into_iter().collect(),
        None => Vec::new(),
    };
    for n in to_wake {
        n.notify_one();
    }
}

/// The subscriber task of a cluster: routes each shard message to the waiter it names. A
/// connection that dropped (the client reconnects and subscribes again by itself) wakes every
/// waiter to re-check, as a message may have been missed meanwhile.
async fn deliver_pushes(
    wakeups: Weak<Wakeups>,
    mut pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    while let Some(push) = pushes.recv().await {
        let Some(wakeups) = wakeups.upgrade() else { return };
        match push.kind {
            redis::PushKind::SMessage | redis::PushKind::Message => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else { continue };
                let (Ok(channel), Ok(lease_id)) =
                    (redis::from_redis_value::<String>(channel), redis::from_redis_value::<String>(payload))
                else {
                    continue;
                };
                wake(&wakeups, &channel, &lease_id);
            }
            redis::PushKind::Disconnection => {
                let all: Vec<Arc<Notify>> =
                    wakeups.subs().values().flat_map(|m| m.values().cloned()).collect();
                for n in all {
                    n.notify_one();
                }
            }
            _ => {}
        }
    }
}

/// The subscriber task: routes each message to the waiter it names.
async fn deliver(wakeups: Weak<Wakeups>, mut stream: redis::aio::PubSubStream) {
    while let Some(msg) = stream.next().await {
        let Some(wakeups) = wakeups.upgrade() else { return };
        let channel = msg.get_channel_name();
        let Ok(lease_id) = msg.get_payload::<String>() else { continue };
        // A message names the waiter to wake, or is "*" to wake every waiter of the lock.
        wake(&wakeups, channel, &lease_id);
    }
    if let Some(wakeups) = wakeups.upgrade() {
        tracing::debug!("redis pub/sub connection closed; waiters fall back to timers and re-register");
        wakeups.disconnected().await;
    }
}
