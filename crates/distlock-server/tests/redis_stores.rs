//! The lock server in front of Redis as teams run it: `serve --store redis-sentinel://…` and
//! `serve --store redis-cluster://…` serve the whole lock API.

mod common;

use std::time::Duration;

use common::support::topologies::{Cluster, Group};
use common::InProcess;
use distlock::{AcquireOptions, Error};

async fn exercise(server: &InProcess) {
    let locker = server.locker().await;
    let lease = locker.acquire("deploy/web", &AcquireOptions::new().holder("ci")).await.expect("acquire");
    assert!(matches!(locker.acquire("deploy/web", &AcquireOptions::new()).await, Err(Error::Held { .. })));
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("deploy/web", &AcquireOptions::new().wait(Duration::from_secs(10))).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = lease.fencing_token();
    lease.renew().await.expect("renew");
    lease.release().await.expect("release");
    let next = waiter.await.unwrap().expect("the waiter gets it");
    assert!(next.fencing_token() > token);
    assert_eq!(locker.list("deploy/").await.expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_over_sentinel() {
    let group = tokio::task::spawn_blocking(Group::start).await.unwrap();
    let server = InProcess::with(|c| c.store = Some(group.url("min_replicas=1")));
    exercise(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_over_a_cluster() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let server = InProcess::with(|c| c.store = Some(cluster.url()));
    exercise(&server).await;
}
