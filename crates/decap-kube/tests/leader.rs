//! Leader election against the test bed's real kube-apiserver.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use decap_kube::k8s_openapi::api::core::v1::Namespace;
use decap_kube::kube::Api;
use decap_kube::kube::api::PostParams;
use decap_kube::leader::elect;

fn kubeconfig() -> PathBuf {
    PathBuf::from(std::env::var("DECAP_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_KUBECONFIG is not set: run the tests through tests/run, which starts \
             the Kubernetes test bed (tests/bed/kube.sh)"
        )
    }))
}

/// A client of the test bed and a namespace of this test's own.
async fn namespace(prefix: &str) -> (decap_kube::kube::Client, Api<Namespace>, String) {
    let client = decap_kube::client(Some(&kubeconfig())).await.unwrap();
    let ns = format!("{prefix}-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    let _ = namespaces.create(&PostParams::default(), &n).await;
    (client, namespaces, ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_another_takes_over_when_it_goes() {
    let (client, _, ns) = namespace("leader").await;

    let (duration, grace) = (Duration::from_secs(3), Duration::from_secs(1));
    let a = elect(
        client.clone(),
        &ns,
        "decap-leader",
        "replica-a",
        duration,
        grace,
    )
    .await
    .unwrap();
    let b = elect(
        client.clone(),
        &ns,
        "decap-leader",
        "replica-b",
        duration,
        grace,
    )
    .await
    .unwrap();

    // Exactly one leads, and goes on leading while it renews.
    let start = Instant::now();
    let first_a = loop {
        let (la, lb) = (*a.leading.borrow(), *b.leading.borrow());
        assert!(!(la && lb), "two leaders at once");
        if la || lb {
            break la;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "nobody leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..40 {
        let (la, lb) = (*a.leading.borrow(), *b.leading.borrow());
        assert!(!(la && lb), "two leaders at once");
        assert_eq!(la, first_a, "the lead moved while its holder renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The leader goes; the other takes over.
    let (gone, stays) = if first_a { (a, b) } else { (b, a) };
    drop(gone);
    let start = Instant::now();
    while !*stays.leading.borrow() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the other replica never took the lead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_cleanly_gives_its_lease_up() {
    use decap_kube::k8s_openapi::api::coordination::v1::Lease;
    let (client, namespaces, ns) = namespace("release").await;
    let (duration, grace) = (Duration::from_secs(6), Duration::from_secs(2));
    let a = elect(
        client.clone(),
        &ns,
        "decap-leader",
        "replica-a",
        duration,
        grace,
    )
    .await
    .unwrap();
    let start = Instant::now();
    while !*a.leading.borrow() {
        assert!(start.elapsed() < Duration::from_secs(20), "a never leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = elect(
        client.clone(),
        &ns,
        "decap-leader",
        "replica-b",
        duration,
        grace,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!*b.leading.borrow(), "b waits while a leads");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get("decap-leader").await.unwrap()).as_deref(),
        Some("replica-a")
    );
    let mut a_leading = a.leading.clone();
    a.release(Duration::from_secs(5)).await;
    assert!(
        !*a_leading.borrow_and_update(),
        "a no longer leads once released"
    );
    let after = leases.get("decap-leader").await.unwrap();
    assert!(
        holder(after.clone()).as_deref() != Some("replica-a"),
        "the Lease still names a: {after:?}"
    );
    // b takes it when it looks again, within the Lease's duration.
    let released = Instant::now();
    while !*b.leading.borrow() {
        assert!(
            released.elapsed() < duration + Duration::from_secs(5),
            "b never took the released lead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = namespaces.delete(&ns, &Default::default()).await;
}
