//! Property test of the lease table against a simple model.
//!
//! Random sequences of acquire / renew / release / time passing, from several holders on a few
//! keys, including holders replaying lease ids of grants that are long gone. After every step:
//! the table and the model agree on who holds each key (so there is never more than one live
//! holder), tokens of each key strictly increase, and stale leases can neither renew nor release.

use std::collections::HashMap;
use std::time::Duration;

use distlock::engine::LeaseTable;
use distlock::{Error, LeaseId};
use proptest::prelude::*;
use tokio::time::Instant;

const HOLDERS: usize = 3;
const KEYS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        holder: usize,
        key: usize,
        ttl_ms: u64,
    },
    Renew {
        holder: usize,
        key: usize,
        ttl_ms: u64,
    },
    Release {
        holder: usize,
        key: usize,
    },
    /// Use one of the holder's *old* lease ids (from any earlier grant) to renew or release.
    Stale {
        holder: usize,
        key: usize,
        pick: usize,
        release: bool,
    },
    /// Time passes; the expiry task may or may not have run (`purge`).
    Advance {
        ms: u64,
        purge: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let h = 0..HOLDERS;
    let k = 0..KEYS;
    prop_oneof![
        3 => (h.clone(), k.clone(), 100u64..1_000).prop_map(|(holder, key, ttl_ms)| Op::Acquire { holder, key, ttl_ms }),
        2 => (h.clone(), k.clone(), 100u64..1_000).prop_map(|(holder, key, ttl_ms)| Op::Renew { holder, key, ttl_ms }),
        2 => (h.clone(), k.clone()).prop_map(|(holder, key)| Op::Release { holder, key }),
        1 => (h, k, any::<usize>(), any::<bool>()).prop_map(|(holder, key, pick, release)| Op::Stale { holder, key, pick, release }),
        2 => (0u64..1_200, any::<bool>()).prop_map(|(ms, purge)| Op::Advance { ms, purge }),
    ]
}

/// The model: for each key, the live lease (holder, id, deadline in ms).
#[derive(Default)]
struct Model {
    live: HashMap<usize, (usize, LeaseId, u64)>,
}

impl Model {
    fn holder_of(&self, key: usize, now: u64) -> Option<&(usize, LeaseId, u64)> {
        self.live.get(&key).filter(|(_, _, exp)| now < *exp)
    }
}

fn key_name(k: usize) -> String {
    format!("key-{k}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let base = Instant::now();
        let mut now_ms = 0u64;
        let mut table = LeaseTable::new();
        let mut model = Model::default();
        // Each holder's current id per key, and every id it was ever granted.
        let mut current: HashMap<(usize, usize), LeaseId> = HashMap::new();
        let mut history: HashMap<(usize, usize), Vec<LeaseId>> = HashMap::new();
        let mut last_token: HashMap<usize, u64> = HashMap::new();
        let at = |ms: u64| base + Duration::from_millis(ms);

        for op in ops {
            match op {
                Op::Acquire { holder, key, ttl_ms } => {
                    let id = LeaseId::generate();
                    let r = table.try_acquire(&key_name(key), &id, &format!("h{holder}"), Duration::from_millis(ttl_ms), at(now_ms));
                    match model.holder_of(key, now_ms) {
                        Some((h, _, _)) => {
                            let expected = format!("h{h}");
                            prop_assert!(matches!(&r, Err(Error::Held { holder: Some(x), .. }) if *x == expected), "{r:?}");
                        }
                        None => {
                            let grant = r.expect("free key must be granted");
                            let prev = last_token.insert(key, grant.fencing_token).unwrap_or(0);
                            prop_assert!(grant.fencing_token > prev, "token {} after {}", grant.fencing_token, prev);
                            model.live.insert(key, (holder, id.clone(), now_ms + ttl_ms));
                            current.insert((holder, key), id.clone());
                            history.entry((holder, key)).or_default().push(id);
                        }
                    }
                }
                Op::Renew { holder, key, ttl_ms } => {
                    let Some(id) = current.get(&(holder, key)).cloned() else { continue };
                    let r = table.renew(&key_name(key), &id, Some(Duration::from_millis(ttl_ms)), at(now_ms));
                    let owns = matches!(model.holder_of(key, now_ms), Some((_, live, _)) if *live == id);
                    prop_assert_eq!(r.is_ok(), owns, "renew by h{} on key {}: {:?}", holder, key, r);
                    if owns {
                        model.live.insert(key, (holder, id, now_ms + ttl_ms));
                    } else {
                        prop_assert!(matches!(r, Err(Error::LeaseLost { .. })), "expected LeaseLost, got {:?}", r);
                    }
                }
                Op::Release { holder, key } => {
                    let Some(id) = current.get(&(holder, key)).cloned() else { continue };
                    let r = table.release(&key_name(key), &id, at(now_ms));
                    let owns = matches!(model.holder_of(key, now_ms), Some((_, live, _)) if *live == id);
                    prop_assert_eq!(r.is_ok(), owns, "release by h{} on key {}: {:?}", holder, key, r);
                    if owns {
                        model.live.remove(&key);
                    }
                }
                Op::Stale { holder, key, pick, release } => {
                    let Some(ids) = history.get(&(holder, key)) else { continue };
                    let id = ids[pick % ids.len()].clone();
                    let owns = matches!(model.holder_of(key, now_ms), Some((_, live, _)) if *live == id);
                    if owns {
                        continue; // not stale after all
                    }
                    let before = table.info(&key_name(key), at(now_ms));
                    let r = if release {
                        table.release(&key_name(key), &id, at(now_ms)).map(|_| ())
                    } else {
                        table.renew(&key_name(key), &id, Some(Duration::from_millis(500)), at(now_ms)).map(|_| ())
                    };
                    prop_assert!(matches!(r, Err(Error::LeaseLost { .. })), "stale id accepted: {r:?}");
                    prop_assert_eq!(table.info(&key_name(key), at(now_ms)), before, "stale op changed the lock");
                }
                Op::Advance { ms, purge } => {
                    now_ms += ms;
                    if purge {
                        for (key, _, _) in table.purge_expired(at(now_ms)) {
                            let k: usize = key.trim_start_matches("key-").parse().expect("test key");
                            prop_assert!(model.holder_of(k, now_ms).is_none(), "purged a live lease on {}", key);
                        }
                    }
                }
            }
            // Table and model agree on every key: one live holder at most, the right one.
            for key in 0..KEYS {
                let live = table.live(&key_name(key), at(now_ms)).map(|e| e.lease_id.clone());
                let expected = model.holder_of(key, now_ms).map(|(_, id, _)| id.clone());
                prop_assert_eq!(live, expected, "key {} at {}ms", key, now_ms);
            }
        }
    }
}

/// Tokens keep rising across release and re-acquire, and across purge.
#[test]
fn tokens_survive_release_and_expiry() {
    let now = Instant::now();
    let mut table = LeaseTable::new();
    let mut last = 0;
    for round in 0..10u64 {
        let id = LeaseId::generate();
        let t = now + Duration::from_secs(round * 10);
        let grant = table.try_acquire("k", &id, "h", Duration::from_secs(1), t).unwrap();
        assert!(grant.fencing_token > last);
        last = grant.fencing_token;
        if round % 2 == 0 {
            table.release("k", &id, t).unwrap();
        } else {
            let purged: Vec<String> =
                table.purge_expired(t + Duration::from_secs(2)).into_iter().map(|(k, _, _)| k).collect();
            assert_eq!(purged, vec!["k".to_string()]);
        }
        assert!(table.is_empty());
    }
    // A table restored with a last token continues above it.
    let mut restored = LeaseTable::with_last_token(last);
    let grant = restored.try_acquire("k", &LeaseId::generate(), "h", Duration::from_secs(1), now).unwrap();
    assert_eq!(grant.fencing_token, last + 1);
}
