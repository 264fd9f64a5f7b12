//! A 30-second tour of the lease API on the in-process backend:
//! `cargo run -p distlock --example quickstart`.

use std::time::Duration;

use distlock::{AcquireOptions, Error, Locker};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let locker = Locker::open("memory://").await?;
    let opts =
        AcquireOptions::new().ttl(Duration::from_secs(2)).holder("quickstart/worker-a").namespace("demo");

    let lease = locker.acquire("nightly-backup", &opts).await?;
    println!("worker-a holds {} with fencing token {}", lease.key(), lease.fencing_token());

    // A second worker tries once, then waits in line.
    match locker.acquire("nightly-backup", &opts.clone().holder("worker-b")).await {
        Err(e @ Error::Held { .. }) => println!("worker-b, trying once: {e}"),
        other => println!("unexpected: {other:?}"),
    }
    let waiter = {
        let locker = locker.clone();
        let opts = opts.clone().holder("quickstart/worker-b").wait(Duration::from_secs(10));
        tokio::spawn(async move { locker.acquire("nightly-backup", &opts).await })
    };

    // worker-a works for three TTLs; automatic renewal keeps the lease alive meanwhile.
    lease.run(tokio::time::sleep(Duration::from_secs(6))).await?;
    println!("status while held: {:?}", locker.status("demo:nightly-backup").await?);
    lease.release().await?;

    let lease_b = waiter.await.map_err(|e| Error::Unavailable(e.to_string()))??;
    println!("worker-b got it on release, token {} (always higher)", lease_b.fencing_token());
    lease_b.release().await?;
    Ok(())
}
