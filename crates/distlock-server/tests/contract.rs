//! The backend contract suite (crates/distlock-testkit) against the lock server, started in
//! this process: over its embedded store, over Redis and over etcd. One line each, as for the
//! library's backends: a client of the server must see every behaviour a backend promises.

mod common;

use common::support::{EtcdCluster, RedisServer};
use common::InProcess;
use distlock::Locker;
use distlock_testkit::Caps;

/// A client of `server`.
async fn client(server: &InProcess) -> Locker {
    Locker::open(&format!("http://127.0.0.1:{}", server.port)).await.expect("open the server")
}

/// A server started off the async runtime (its start waits for `/healthz`).
async fn start(store: Option<String>) -> InProcess {
    tokio::task::spawn_blocking(move || InProcess::with(|c| c.store = store)).await.expect("start")
}

mod embedded {
    use super::*;
    distlock_testkit::contract_tests!(
        Caps { many_holders: true, elections: true, ..Default::default() },
        async {
            let server = start(None).await;
            (client(&server).await, server)
        }
    );
}

mod over_redis {
    use super::*;
    distlock_testkit::contract_tests!(
        Caps { many_holders: true, elections: true, ..Default::default() },
        async {
            let redis = RedisServer::start();
            let server = start(Some(redis.url())).await;
            (client(&server).await, (server, redis))
        }
    );
}

mod over_etcd {
    use super::*;
    distlock_testkit::contract_tests!(
        Caps { many_holders: true, elections: true, ..Default::default() },
        async {
            let etcd = EtcdCluster::start(1);
            let server = start(Some(etcd.url())).await;
            (client(&server).await, (server, etcd))
        }
    );
}
