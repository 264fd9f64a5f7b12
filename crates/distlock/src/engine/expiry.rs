//! The engine's one expiry task: it sleeps until the earliest deadline in the table, expires what
//! is due (handing each freed key to its next waiter), and is woken early only when an earlier
//! deadline appears — so expiry costs what expires, not what is held, and nothing polls.

use std::sync::Arc;

use tokio::time::Instant;

use super::state::Shared;

/// The expiry task: sleeps until the earliest deadline, purges, repeats; exits on shutdown.
pub(super) async fn expire_leases(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut state = shared.lock();
            if state.shutdown {
                return;
            }
            state.purge(Instant::now());
            state.table.next_expiry()
        };
        match next {
            Some(when) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(when) => {}
                    _ = shared.expiry_changed.notified() => {}
                }
            }
            None => shared.expiry_changed.notified().await,
        }
    }
}
