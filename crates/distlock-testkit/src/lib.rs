//! The backend contract suite, for tests only (not published).
//!
//! Every behaviour a backend promises through [`distlock::Locker`] — mutual exclusion with rising
//! fencing tokens, FIFO waiting, wake-up on release and on expiry, a timed-out or cancelled waiter
//! leaving the queue, ownership, status and listing, paging — is written once in [`contract`], and
//! each backend's test file runs all of it with one line. [`linearizable`] checks histories of
//! concurrent clients against a model of a fenced lock, semaphore or shared/exclusive lock; the
//! contract runs it on every backend.
//!
//!
//! ```ignore
//! distlock_testkit::contract_tests!(Caps::default(), async { (Locker::open("memory://").await.unwrap(), ()) });
//! ```
//!
//! The setup block returns the `Locker` and anything that must live as long as the test (a
//! server process, say). Adding a backend then costs one adapter file and one line of tests.

pub mod contract;
pub mod linearizable;

pub use contract::Caps;

/// Expands to a module `contract` with one `#[tokio::test]` per behaviour of [`contract`], each
/// running against a fresh `(Locker, keep-alive)` from the async `$setup` expression. `$caps` (a
/// [`Caps`]) says what the backend does not promise (e.g. Redlock's waiters race rather than
/// queue); those tests check the weaker promise instead.
#[macro_export]
macro_rules! contract_tests {
    ($caps:expr, $setup:expr) => {
        mod contract {
            #[allow(unused_imports)]
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let (locker, _keep) = $setup.await;
                        $crate::contract::$name(&locker, &$caps).await;
                    }
                };
            }

            case!(mutual_exclusion_and_rising_tokens);
            case!(try_once_names_the_holder);
            case!(waiters_are_served_in_order);
            case!(release_wakes_the_waiter);
            case!(expiry_wakes_the_waiter);
            case!(a_timed_out_waiter_leaves_the_queue);
            case!(a_cancelled_waiter_leaves_the_queue);
            case!(only_the_owner_renews_or_releases);
            case!(renew_without_ttl_keeps_the_lease_ttl);
            case!(status_and_list);
            case!(list_pages_follow_the_cursor);
            case!(histories_are_linearizable);
            case!(primitive_histories_are_linearizable);
            case!(semaphore_never_exceeds_its_limit);
            case!(shared_and_exclusive_are_fair);
            case!(leader_changes_are_observed_in_order);
        }
    };
}
