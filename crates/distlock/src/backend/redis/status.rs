//! The status script's answer made into a [`LockInfo`], shaped as the lease engine shapes it
//! (memory://, the embedded store): for holders of several, the newest grant in the top-level
//! fields and every holder in `holders`; a lease that publishes a value shows it.

use std::time::Duration;

use crate::types::{HolderInfo, LockInfo, LockMode};

/// One holder entry as the status script returns it: holder label, token, ms left, TTL in ms,
/// value, limit, mode (`X` or `S`).
pub(super) type Entry = (String, u64, i64, u64, Option<String>, u32, String);

/// The status of `key` from the script's `{held, holder, token, pttl, waiters, entries}` (see
/// `scripts::STATUS`).
pub(super) fn info(
    key: &str,
    held: i64,
    holder: String,
    token: u64,
    pttl: i64,
    waiters: u64,
    mut entries: Vec<Entry>,
) -> LockInfo {
    let ms = |n: i64| Duration::from_millis(n.max(0) as u64);
    // Taken, though no lease is there to describe (being handed to the first waiter: a try-once
    // acquire is refused meanwhile, its lease and token do not exist yet).
    let taken = LockInfo { held: true, ..LockInfo::free(key, waiters) };
    match held {
        0 => LockInfo::free(key, waiters),
        1 => {
            LockInfo { holder: Some(holder), fencing_token: Some(token), expires_in: Some(ms(pttl)), ..taken }
        }
        3 => {
            // Oldest grant first, as the engine lists them.
            entries.sort_by_key(|e| e.1);
            let Some((holder, token, left, ttl, value, limit, mode)) = entries.last().cloned() else {
                return taken;
            };
            let shared = mode == "S";
            let holders = if limit > 1 || shared {
                entries
                    .iter()
                    .map(|e| HolderInfo { holder: e.0.clone(), fencing_token: e.1, expires_in: ms(e.2) })
                    .collect()
            } else {
                Vec::new()
            };
            LockInfo {
                holder: Some(holder),
                fencing_token: Some(token),
                expires_in: Some(ms(left)),
                ttl: Some(Duration::from_millis(ttl)),
                limit: (limit > 1).then_some(limit),
                mode: shared.then_some(LockMode::Shared),
                holders,
                value,
                ..taken
            }
        }
        _ => taken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(holder: &str, token: u64, limit: u32, mode: &str) -> Entry {
        (holder.into(), token, 900, 1000, None, limit, mode.into())
    }

    #[test]
    fn permits_are_listed_oldest_first_with_the_newest_on_top() {
        let entries = vec![entry("b", 20, 3, "X"), entry("a", 10, 3, "X")];
        let info = info("k", 3, String::new(), 0, -2, 1, entries);
        assert_eq!((info.holder.as_deref(), info.fencing_token, info.limit), (Some("b"), Some(20), Some(3)));
        assert_eq!(info.holders.iter().map(|h| h.fencing_token).collect::<Vec<_>>(), [10, 20]);
        assert_eq!((info.mode, info.waiters), (None, 1));
    }

    #[test]
    fn a_leader_has_a_value_and_no_holder_list() {
        let mut leader = entry("a", 7, 1, "X");
        leader.4 = Some("10.0.0.7:80".into());
        let info = info("k", 3, String::new(), 0, -2, 0, vec![leader]);
        assert_eq!((info.value.as_deref(), info.limit, info.mode), (Some("10.0.0.7:80"), None, None));
        assert!(info.holders.is_empty());
        let shared = info_of_shared();
        assert_eq!((shared.mode, shared.holders.len()), (Some(LockMode::Shared), 2));
    }

    fn info_of_shared() -> LockInfo {
        info("k", 3, String::new(), 0, -2, 0, vec![entry("r1", 1, 1, "S"), entry("r2", 2, 1, "S")])
    }
}
