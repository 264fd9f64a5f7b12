//! The bodies of the lock server's HTTP API, written once: the server (`distlock-server`) reads
//! the requests and writes the answers with these types, and the `http://` client writes the
//! requests and reads the answers with the same ones, so a renamed field is a compile error on
//! both sides. docs/SERVER.md shows each shape; `openapi.json` describes them, and a test of the
//! server crate compares its schemas with these types.
//!
//! Serde types only: the checks (TTL bounds, key rules) belong to the server's routes and
//! [`crate::validate`]. An optional field that is `None` is left out when written, so the JSON
//! is what docs/SERVER.md shows. Error codes are [`crate::ErrorCode`].

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::engine::WaiterInfo;
pub use crate::types::{LockInfo, LockMode, LockPage};

/// Body of `POST /v1/locks/{key}/acquire`; every field optional (an empty body is all defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    /// Lease TTL in ms (100 ..= 86,400,000; default 30,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// How long the server may wait for the key, in ms (default 0: try once; at most 3,600,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Holder label shown in status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// How many leases may hold the key at once (1 ..= 10,000; default 1, a lock): a semaphore
    /// of N permits. Every holder of a key names the same N (`limit_mismatch` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `exclusive` (default) or `shared`: a read lock, held with any number of other shared
    /// holders and never with an exclusive one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<LockMode>,
    /// What the lease publishes for others to read in status (a leader's address or id; at
    /// most 4,096 bytes; never secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Body of `POST /v1/locks/{key}/proclaim`: a leader replaces the value its lease publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProclaimBody {
    /// The lease that holds the key.
    pub lease_id: String,
    /// The new value (at most 4,096 bytes).
    pub value: String,
}

/// Body of `POST /v1/locks/{key}/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// The lease to renew.
    pub lease_id: String,
    /// New TTL in ms (100 ..= 86,400,000); absent: the TTL the lease was granted or last renewed
    /// with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// Body of `POST /v1/locks/{key}/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The lease to release.
    pub lease_id: String,
}

/// Answer of an acquire or a renew: a granted or renewed lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    /// The key.
    pub key: String,
    /// The lease's secret.
    pub lease_id: String,
    /// The grant's fencing token.
    pub fencing_token: u64,
    /// The TTL applied, in ms.
    pub ttl_ms: u64,
    /// How long after receiving the request the server granted or renewed it, in ms (for the
    /// client's conservative deadline; 0 when absent).
    #[serde(default)]
    pub waited_ms: u64,
}

/// Answer of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The key.
    pub key: String,
    /// Always `true` (a release that did not happen is an error).
    pub released: bool,
}

/// Answer of `POST /v1/admin/locks/{key}/release`: whose lease was freed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForceReleased {
    /// The key.
    pub key: String,
    /// Always `true` (a lock nobody held is `404 not_held`).
    pub released: bool,
    /// The holder label of the freed lease.
    pub holder: String,
    /// The fencing token of the freed lease.
    pub fencing_token: u64,
}

/// Answer of `GET /v1/locks/{key}/waiters`: the queue, first in line first (written by the
/// server; the client does not read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiters {
    /// The key.
    pub key: String,
    /// Who waits, first in line first.
    pub waiters: Vec<WaiterInfo>,
}

/// Answer of `GET /v1/info`: facts about the server, for the web page and scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The store's backend name (`embedded`, `redis`, `etcd`, ...).
    pub store: String,
    /// The server's version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_s: u64,
    /// Leases in the embedded store's table; `null` for other stores.
    pub leases: Option<u64>,
    /// Waiters queued in the embedded store; `null` for other stores.
    pub waiters: Option<u64>,
    /// Grants this server made since it started.
    pub grants_total: u64,
    /// Whether a bearer token is required.
    pub auth: bool,
    /// Whether force-release is possible (an admin token exists and the store offers it).
    pub force_release: bool,
}

/// Answer of `GET /healthz` (`{"status":"ok","store"}`, or `"unavailable"` with `error`) and of
/// `GET /livez` (`{"status":"ok"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    /// The store's backend name (`/healthz` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Why the store is not ready (`/healthz` when `unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One operation of `POST /v1/batch`: the body of its single route plus `op` and `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchOp {
    /// As `POST /v1/locks/{key}/acquire`, without waiting (`wait_ms` must be 0 or absent).
    Acquire {
        /// The key (not percent-encoded).
        key: String,
        /// Lease TTL in ms.
        #[serde(skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
        /// Must be 0 or absent: a batch never waits.
        #[serde(skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
        /// Holder label.
        #[serde(skip_serializing_if = "Option::is_none")]
        holder: Option<String>,
        /// Permits of a semaphore (default 1, a lock).
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// `exclusive` (default) or `shared`.
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<LockMode>,
        /// What the lease publishes (a leader's value).
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<String>,
    },
    /// As `POST /v1/locks/{key}/renew`.
    Renew {
        /// The key.
        key: String,
        /// The lease to renew.
        lease_id: String,
        /// New TTL in ms; absent: the lease's own TTL.
        #[serde(skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// As `POST /v1/locks/{key}/release`.
    Release {
        /// The key.
        key: String,
        /// The lease to release.
        lease_id: String,
    },
}

/// Body of `POST /v1/batch`. `Op` is a [`BatchOp`], or one already written as JSON (the
/// client's batcher: each caller serializes its own operation, the dispatcher only frames them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<Op = BatchOp> {
    /// The operations; they run concurrently, in no set order.
    pub ops: Vec<Op>,
}

/// Answer of `POST /v1/batch`: one result per operation, in the order asked.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// The results, in the order of the operations.
    pub results: Vec<BatchResult>,
}

/// What one operation of a batch answered: the status and body its single route would have.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResult {
    /// HTTP status the single route would have answered.
    pub status: u16,
    /// The body it would have answered (a [`LeaseBody`], a [`Released`] or an [`ErrorBody`]),
    /// as it was written.
    pub body: Box<RawValue>,
}

/// Every error answer: `{"error":{"code","message","holder"?}}` (also the CLI's `--json` errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The stable code ([`crate::ErrorCode::as_str`]); a string, so that a client reads a code
    /// a newer server added (and treats it as the server failing).
    pub code: String,
    /// A message for people.
    pub message: String,
    /// For `lock_held`: the current holder's label, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// For `limit_mismatch`: the limit the key's current holders were granted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// What happened, in an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A lease was granted.
    Grant,
    /// A holder released its lease.
    Release,
    /// A lease ran out its TTL.
    Expiry,
    /// A renew or release came too late: the lease was gone.
    Lost,
    /// A caller joined the queue of a held lock.
    Wait,
    /// A waiting acquire gave up.
    WaitTimeout,
    /// An operator freed the lock with the admin token.
    ForceRelease,
    /// A waiting caller left the queue without the lock: it disconnected, or the server shut down.
    WaitCancelled,
}

/// One event of the server's live stream (`GET /v1/events`) and of its pages
/// (`GET /v1/events?since=…`). `Text` is how the server holds its strings (borrowed when it
/// writes them); a reader gets `String`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event<Text = String> {
    /// Consecutive from 1 in the server's run: the cursor of `GET /v1/events?since=ID`.
    pub id: u64,
    /// What happened.
    pub kind: EventKind,
    /// The lock.
    pub key: Text,
    /// The holder label (of the lease; of the caller for waits), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Text>,
    /// The lease's fencing token, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Server wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
    /// How long the lease was held, on the end of a holding (release, expiry, lost,
    /// force-release), when the server saw the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
    /// How long the caller waited in the queue: on a grant after waiting (a hand-off), and on
    /// `wait_timeout` and `wait_cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

/// A page of `GET /v1/events?since=…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPage<E = Event> {
    /// Events after the cursor that the caller may read, oldest first.
    pub events: Vec<E>,
    /// Pass as `since` to continue: the id of the last event returned, else the newest buffered
    /// (0 when none).
    pub next: u64,
    /// Whether more events follow (ask again with `since=next`).
    pub more: bool,
    /// Whether events after the cursor were already dropped from the buffer.
    pub missed: bool,
    /// Id of the oldest event still buffered (0 when none).
    pub oldest_id: u64,
    /// Events the server keeps at most (`--event-history`).
    pub event_history: usize,
}

/// A bar (or mark) on a key's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// A lease held the key.
    Hold,
    /// A caller waited in the key's queue.
    Wait,
    /// An end (expiry, lost lease, release, force-release) of a holding the server did not see
    /// begin, e.g. one restored from disk.
    Mark,
}

/// How a [`Span`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanEnd {
    /// The holder released it.
    Release,
    /// It ran out its TTL.
    Expiry,
    /// Its holder found it gone (a renew or release came too late).
    Lost,
    /// An operator freed it.
    ForceRelease,
    /// Another lease was granted the key before the server saw the end (behind Redis or etcd:
    /// an expiry, or a release through another server).
    Unseen,
    /// The waiter got the lock.
    Granted,
    /// The waiter gave up when its wait ran out.
    Timeout,
    /// The waiter disconnected, or the server shut down, while it waited.
    Cancelled,
}

/// One span of a key's timeline: a holding, a wait, or a lone mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span<Text = String> {
    /// Unique within the server's run; a later version of a span (it ended, or how it ended
    /// became known) carries the same id.
    pub id: u64,
    /// The lock.
    pub key: Text,
    /// Holding, wait or mark.
    pub kind: SpanKind,
    /// The holder label (of the lease or the waiter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Text>,
    /// The fencing token of a holding, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// When it began, ms since the Unix epoch.
    pub start_ms: u64,
    /// When it ended; `null` while open.
    pub end_ms: Option<u64>,
    /// How it ended, once it has.
    pub end: Option<SpanEnd>,
    /// On a holding: how long its holder waited in the queue for it, when it queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

/// Answer of `GET /v1/locks/{key}/timeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline<S = Span> {
    /// The key.
    pub key: String,
    /// Its holdings, waits and marks the server kept, in start order.
    pub spans: Vec<S>,
    /// The timeline is complete from here on (ms since the Unix epoch).
    pub timeline_from_ms: u64,
    /// Server time of the answer.
    pub now_ms: u64,
}

#[cfg(test)]
mod tests {
    //! Each body against the JSON docs/SERVER.md (and README.md's curl tour) shows.
    use super::*;

    fn written<T: Serialize>(body: &T) -> String {
        serde_json::to_string(body).unwrap()
    }

    /// Writes `body`, checks the JSON, and reads it back to the same value.
    fn exact<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(body: T, json: &str) {
        assert_eq!(written(&body), json);
        assert_eq!(serde_json::from_str::<T>(json).unwrap(), body);
    }

    #[test]
    fn acquire_renew_release_bodies() {
        let acquire = AcquireBody {
            ttl_ms: Some(30_000),
            wait_ms: Some(0),
            holder: Some("host-1/pid-42".into()),
            limit: None,
            mode: None,
            value: None,
        };
        exact(acquire, r#"{"ttl_ms":30000,"wait_ms":0,"holder":"host-1/pid-42"}"#);
        let semaphore = AcquireBody { limit: Some(3), ..AcquireBody::default() };
        exact(semaphore, r#"{"limit":3}"#);
        exact(AcquireBody::default(), "{}");
        exact(RenewBody { lease_id: "9f1c".into(), ttl_ms: None }, r#"{"lease_id":"9f1c"}"#);
        exact(
            RenewBody { lease_id: "9f1c".into(), ttl_ms: Some(5000) },
            r#"{"lease_id":"9f1c","ttl_ms":5000}"#,
        );
        exact(ReleaseBody { lease_id: "9f1c".into() }, r#"{"lease_id":"9f1c"}"#);
        assert!(serde_json::from_str::<AcquireBody>(r#"{"ttl":1}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn lease_and_release_answers() {
        let lease = LeaseBody {
            key: "deploy/web".into(),
            lease_id: "9f1c".into(),
            fencing_token: 4,
            ttl_ms: 30_000,
            waited_ms: 0,
        };
        exact(
            lease.clone(),
            r#"{"key":"deploy/web","lease_id":"9f1c","fencing_token":4,"ttl_ms":30000,"waited_ms":0}"#,
        );
        let without_waited = r#"{"key":"deploy/web","lease_id":"9f1c","fencing_token":4,"ttl_ms":30000}"#;
        assert_eq!(serde_json::from_str::<LeaseBody>(without_waited).unwrap(), lease);
        exact(
            Released { key: "deploy/web".into(), released: true },
            r#"{"key":"deploy/web","released":true}"#,
        );
        let forced =
            ForceReleased { key: "k".into(), released: true, holder: "ci-7".into(), fencing_token: 3 };
        exact(forced, r#"{"key":"k","released":true,"holder":"ci-7","fencing_token":3}"#);
    }

    #[test]
    fn error_body() {
        let held = ErrorBody {
            error: ErrorDetail {
                code: crate::ErrorCode::LockHeld.as_str().into(),
                message: "lock \"deploy/web\" is held by \"ci-7\"".into(),
                holder: Some("ci-7".into()),
                limit: None,
            },
        };
        exact(
            held,
            r#"{"error":{"code":"lock_held","message":"lock \"deploy/web\" is held by \"ci-7\"","holder":"ci-7"}}"#,
        );
        let lost = ErrorBody {
            error: ErrorDetail {
                code: "lease_lost".into(),
                message: "gone".into(),
                holder: None,
                limit: None,
            },
        };
        exact(lost, r#"{"error":{"code":"lease_lost","message":"gone"}}"#);
        let mismatch = ErrorBody {
            error: ErrorDetail {
                code: "limit_mismatch".into(),
                message: "m".into(),
                holder: None,
                limit: Some(3),
            },
        };
        exact(mismatch, r#"{"error":{"code":"limit_mismatch","message":"m","limit":3}}"#);
    }

    #[test]
    fn batch_bodies() {
        let ops = BatchBody {
            ops: vec![
                BatchOp::Acquire {
                    key: "a".into(),
                    ttl_ms: Some(30_000),
                    wait_ms: None,
                    holder: None,
                    limit: None,
                    mode: None,
                    value: None,
                },
                BatchOp::Renew { key: "c".into(), lease_id: "9f1c".into(), ttl_ms: None },
                BatchOp::Release { key: "b".into(), lease_id: "9f1c".into() },
            ],
        };
        exact(
            ops,
            r#"{"ops":[{"op":"acquire","key":"a","ttl_ms":30000},{"op":"renew","key":"c","lease_id":"9f1c"},{"op":"release","key":"b","lease_id":"9f1c"}]}"#,
        );
        let json = r#"{"results":[{"status":200,"body":{"key":"b","released":true}},{"status":409,"body":{"error":{"code":"lease_lost","message":"gone"}}}]}"#;
        let answer: BatchAnswer = serde_json::from_str(json).unwrap();
        assert_eq!(answer.results[1].status, 409);
        assert_eq!(written(&answer), json);
    }
}
