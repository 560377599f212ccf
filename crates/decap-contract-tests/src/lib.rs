//! The contract of each port, as a test suite that any adapter can run.
//!
//! The embedded adapters run these in their own tests; the cloud adapters run
//! the same functions against real servers. A suite panics on the first broken
//! promise, naming it.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{
    BlobKind, BlobStore, BuildQuery, BuildStore, ByteStream, DeferralQueue, DeferredEntry,
    Delivery, DeliveryOutcome, LockStore, PushOutcome,
};
use decap_core::refs::GitRef;
use futures::StreamExt;
use time::OffsetDateTime;

fn project(name: &str) -> ProjectKey {
    ProjectKey::new("contract", name).unwrap()
}

fn build_at(p: &str, branch: &str, queued_at: OffsetDateTime) -> Build {
    Build::new(
        project(p),
        &GitRef::branch(branch).unwrap(),
        Some(format!("{:040x}", queued_at.unix_timestamp_nanos())),
        Trigger::Api,
        queued_at,
    )
}

fn now() -> OffsetDateTime {
    // Whole microseconds, so that adapters storing less precision still round-trip.
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000).unwrap()
}

/// The [`BuildStore`] contract.
pub async fn build_store_suite(store: Arc<dyn BuildStore>) {
    let t0 = now();
    // insert and get round-trip the whole record
    let mut first = build_at("alpha", "main", t0);
    first.message = Some("hello".into());
    store.insert(&first).await.unwrap();
    assert_eq!(
        store.get(first.id).await.unwrap().as_ref(),
        Some(&first),
        "get returns what insert stored"
    );
    assert!(
        store.insert(&first).await.is_err(),
        "inserting an existing id is an error"
    );
    assert_eq!(
        store.get(BuildId::new()).await.unwrap(),
        None,
        "an unknown id is None"
    );

    // update is a compare-and-set on the status
    let mut running = first.clone();
    running.transition(BuildStatus::Running, t0).unwrap();
    assert!(
        store.update(&running, BuildStatus::Queued).await.unwrap(),
        "update from the stored status wins"
    );
    let mut stale = first.clone();
    stale.transition(BuildStatus::Cancelled, t0).unwrap();
    assert!(
        !store.update(&stale, BuildStatus::Queued).await.unwrap(),
        "update from a stale status loses"
    );
    assert_eq!(
        store.get(first.id).await.unwrap().unwrap().status,
        BuildStatus::Running
    );

    // history: newest first, filters, pagination to the end
    let mut ids = vec![first.id];
    for i in 0..24 {
        let branch = if i % 2 == 0 { "main" } else { "dev" };
        let b = build_at("alpha", branch, t0 + time::Duration::milliseconds(i + 1));
        store.insert(&b).await.unwrap();
        ids.push(b.id);
    }
    store.insert(&build_at("beta", "main", t0)).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&BuildQuery {
                project: Some(project("alpha")),
                limit: 10,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.builds.len() <= 10, "a page respects its limit");
        seen.extend(page.builds.iter().map(|b| b.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        seen, newest_first,
        "paging visits every build once, newest first"
    );
    let dev = store
        .list(&BuildQuery {
            project: Some(project("alpha")),
            branch: Some("dev".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dev.builds.len(), 12);
    assert!(dev.builds.iter().all(|b| b.branch == "dev"));
    let running_only = store
        .list(&BuildQuery {
            statuses: vec![BuildStatus::Running],
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        running_only.builds.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![first.id]
    );
    let since = store
        .list(&BuildQuery {
            project: Some(project("alpha")),
            since: Some(t0 + time::Duration::milliseconds(20)),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        since.builds.len(),
        5,
        "since keeps builds queued at or after it"
    );
    // before, paged
    let mut early = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&BuildQuery {
                project: Some(project("alpha")),
                before: Some(t0 + time::Duration::milliseconds(3)),
                limit: 2,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        early.extend(page.builds.iter().map(|b| b.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(
        early,
        vec![ids[2], ids[1], ids[0]],
        "before keeps builds queued before it, newest first"
    );
    let window = store
        .list(&BuildQuery {
            project: Some(project("alpha")),
            since: Some(t0 + time::Duration::milliseconds(20)),
            before: Some(t0 + time::Duration::milliseconds(22)),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        window.builds.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[21], ids[20]]
    );
    assert!(
        store
            .list(&BuildQuery {
                cursor: Some("garbage".into()),
                limit: 1,
                ..Default::default()
            })
            .await
            .is_err(),
        "a bad cursor is an error"
    );

    let with = store
        .with_status(&[BuildStatus::Running, BuildStatus::Queued])
        .await
        .unwrap();
    assert_eq!(with.len(), 26);
    assert_eq!(with.first().map(|b| b.id), Some(first.id), "oldest first");
    let counts = store.count_by_status().await.unwrap();
    let count = |s| {
        counts
            .iter()
            .find(|(st, _)| *st == s)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    assert_eq!(
        (count(BuildStatus::Running), count(BuildStatus::Queued)),
        (1, 25)
    );

    // deliveries: recorded with their builds atomically, once
    let delivery = Delivery {
        id: "d-1".into(),
        event: "push".into(),
        outcome: "built".into(),
        received_at: t0,
    };
    let b1 = build_at("gamma", "main", t0);
    assert_eq!(
        store
            .insert_delivery(&delivery, std::slice::from_ref(&b1))
            .await
            .unwrap(),
        DeliveryOutcome::New
    );
    assert!(
        store.get(b1.id).await.unwrap().is_some(),
        "the delivery's builds are stored"
    );
    let b2 = build_at("gamma", "main", t0);
    assert_eq!(
        store
            .insert_delivery(&delivery, std::slice::from_ref(&b2))
            .await
            .unwrap(),
        DeliveryOutcome::Duplicate(vec![b1.id]),
        "a repeated delivery returns the first delivery's builds"
    );
    assert!(
        store.get(b2.id).await.unwrap().is_none(),
        "a repeated delivery stores nothing"
    );
    // a failing delivery stores nothing either: its build collides with an existing id
    let bad = Delivery {
        id: "d-2".into(),
        ..delivery.clone()
    };
    assert!(
        store
            .insert_delivery(&bad, std::slice::from_ref(&first))
            .await
            .is_err()
    );
    let retry = build_at("gamma", "main", t0);
    assert_eq!(
        store
            .insert_delivery(&bad, std::slice::from_ref(&retry))
            .await
            .unwrap(),
        DeliveryOutcome::New,
        "a failed delivery left no trace"
    );

    // concurrent writers all land
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let b = build_at("delta", "main", t0 + time::Duration::microseconds(i));
            store.insert(&b).await.unwrap();
            b.id
        }));
    }
    let mut written = HashSet::new();
    for t in tasks {
        written.insert(t.await.unwrap());
    }
    for id in written {
        assert!(
            store.get(id).await.unwrap().is_some(),
            "a concurrent insert was lost"
        );
    }

    // stats: the last N finished builds of a project (or a branch), read
    // through the history query whatever the page size
    let ends = [
        (BuildStatus::Succeeded, 10),
        (BuildStatus::Failed, 40),
        (BuildStatus::Succeeded, 30),
        (BuildStatus::Errored, 5),
        (BuildStatus::Succeeded, 20),
    ];
    for (i, (status, secs)) in ends.iter().enumerate() {
        let at = t0 + time::Duration::seconds(i as i64);
        let branch = if i == 1 { "dev" } else { "main" };
        let mut b = build_at("stats", branch, at);
        store.insert(&b).await.unwrap();
        b.transition(BuildStatus::Running, at).unwrap();
        assert!(store.update(&b, BuildStatus::Queued).await.unwrap());
        b.transition(*status, at + time::Duration::seconds(*secs))
            .unwrap();
        assert!(store.update(&b, BuildStatus::Running).await.unwrap());
    }
    store
        .insert(&build_at("stats", "main", t0 + time::Duration::seconds(9)))
        .await
        .unwrap(); // still queued: not counted
    let all = store.stats(&project("stats"), None, 100).await.unwrap();
    assert_eq!(
        (all.builds, all.succeeded, all.failed, all.errored),
        (5, 3, 1, 1)
    );
    assert_eq!(all.failure_rate, Some(0.4));
    assert_eq!(
        all.average_duration_ms,
        Some(20_000),
        "the green builds' mean"
    );
    assert_eq!(all.points.len(), 5);
    let last_two = store.stats(&project("stats"), None, 2).await.unwrap();
    assert_eq!(
        last_two
            .points
            .iter()
            .map(|p| p.duration_ms)
            .collect::<Vec<_>>(),
        vec![Some(5_000), Some(20_000)],
        "the newest two, oldest first"
    );
    let main = store
        .stats(&project("stats"), Some("main"), 100)
        .await
        .unwrap();
    assert_eq!((main.builds, main.failed), (4, 0));
}

/// The [`LockStore`] contract.
pub async fn lock_store_suite(store: Arc<dyn LockStore>) {
    let t0 = now();
    let key = LockKey::parse("contract/locks/main").unwrap();
    let (a, b) = (BuildId::new(), BuildId::new());
    let ttl = Duration::from_secs(60);
    let la = store
        .acquire(&key, a, ttl, t0)
        .await
        .unwrap()
        .expect("a free key is taken");
    assert_eq!((la.owner, la.key.clone()), (a, key.clone()));
    let held = store
        .acquire(&key, b, ttl, t0)
        .await
        .unwrap()
        .expect_err("a held key is refused");
    assert_eq!(held.owner, a, "the refusal names the holder");
    assert_eq!(
        store
            .acquire(&key, a, ttl, t0)
            .await
            .unwrap()
            .map(|l| l.owner),
        Ok(a),
        "the owner re-acquiring keeps it"
    );
    assert!(
        !store.release(&key, b).await.unwrap(),
        "only the owner releases"
    );
    assert!(store.release(&key, a).await.unwrap());
    assert!(
        !store.release(&key, a).await.unwrap(),
        "a second release is a no-op"
    );

    // fencing tokens grow
    let lb = store
        .acquire(&key, b, ttl, t0)
        .await
        .unwrap()
        .expect("free again");
    assert!(
        lb.fencing_token > la.fencing_token,
        "fencing tokens increase"
    );

    // expiry: an expired lock can be taken over; renewal extends it
    let later = t0 + time::Duration::seconds(61);
    assert!(
        store
            .renew(&key, b, ttl, t0 + time::Duration::seconds(30))
            .await
            .unwrap(),
        "the owner renews"
    );
    assert!(
        store.acquire(&key, a, ttl, later).await.unwrap().is_err(),
        "a renewed lock is still held"
    );
    let much_later = t0 + time::Duration::seconds(200);
    let lc = store
        .acquire(&key, a, ttl, much_later)
        .await
        .unwrap()
        .expect("an expired lock is taken over");
    assert!(lc.fencing_token > lb.fencing_token);
    assert!(
        !store.renew(&key, b, ttl, much_later).await.unwrap(),
        "a former owner cannot renew"
    );

    // operators force-release
    let listed = store.list().await.unwrap();
    assert!(listed.iter().any(|l| l.key == key && l.owner == a));
    let released = store
        .force_release(&key)
        .await
        .unwrap()
        .expect("it was held");
    assert_eq!(released.owner, a);
    assert!(store.force_release(&key).await.unwrap().is_none());
    assert!(store.list().await.unwrap().iter().all(|l| l.key != key));

    // 64 concurrent contenders: exactly one wins
    let contended = LockKey::parse("contract/locks/contended").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        let key = contended.clone();
        tasks.push(tokio::spawn(async move {
            store
                .acquire(&key, BuildId::new(), ttl, t0)
                .await
                .unwrap()
                .is_ok()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1, "exactly one of 64 contenders holds the lock");
}

fn entry(branch: &str, commit: Option<&str>, at: OffsetDateTime) -> DeferredEntry {
    DeferredEntry {
        build_id: BuildId::new(),
        project: project("queue"),
        branch: branch.into(),
        git_ref: format!("refs/heads/{branch}"),
        commit: commit.map(str::to_owned),
        deferred_at: at,
        reason: "the branch is locked".into(),
    }
}

/// The [`DeferralQueue`] contract.
pub async fn deferral_queue_suite(queue: Arc<dyn DeferralQueue>) {
    let t0 = now();
    assert!(queue.is_open().await.unwrap(), "a new queue is open");
    let entries: Vec<DeferredEntry> = (0..20)
        .map(|i| {
            entry(
                if i % 2 == 0 { "main" } else { "dev" },
                Some(&format!("c{i}")),
                t0,
            )
        })
        .collect();
    for e in &entries {
        assert_eq!(queue.push(e).await.unwrap(), PushOutcome::Added);
    }
    let listed = queue.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.build_id).collect::<Vec<_>>(),
        entries.iter().map(|e| e.build_id).collect::<Vec<_>>(),
        "FIFO order"
    );
    assert_eq!(listed[0], entries[0], "entries round-trip");
    let again = entry("main", Some("c0"), t0);
    assert_eq!(
        queue.push(&again).await.unwrap(),
        PushOutcome::AlreadyWaiting(entries[0].build_id),
        "the same commit never waits twice"
    );
    let no_commit = entry("feature", None, t0);
    assert_eq!(queue.push(&no_commit).await.unwrap(), PushOutcome::Added);
    assert_eq!(
        queue.push(&entry("feature", None, t0)).await.unwrap(),
        PushOutcome::AlreadyWaiting(no_commit.build_id),
        "a branch without a commit waits once"
    );
    queue
        .set_reason(entries[3].build_id, "the queue is closed")
        .await
        .unwrap();
    assert!(queue.remove(entries[0].build_id).await.unwrap());
    assert!(
        !queue.remove(entries[0].build_id).await.unwrap(),
        "removing twice is a no-op"
    );
    let listed = queue.list().await.unwrap();
    assert_eq!(listed.len(), 20);
    assert_eq!(listed[0].build_id, entries[1].build_id);
    assert_eq!(
        listed
            .iter()
            .find(|e| e.build_id == entries[3].build_id)
            .unwrap()
            .reason,
        "the queue is closed"
    );
    assert_eq!(
        queue.push(&again).await.unwrap(),
        PushOutcome::Added,
        "once removed, the commit may wait again"
    );

    // taking heads: the oldest entry of each key, oldest first
    let heads = queue.receive_heads(100).await.unwrap();
    let listed = queue.list().await.unwrap();
    let mut expected = Vec::new();
    let mut keys = HashSet::new();
    for e in &listed {
        if keys.insert(e.lock_key()) {
            expected.push(e.build_id);
        }
    }
    assert_eq!(
        heads.iter().map(|h| h.entry.build_id).collect::<Vec<_>>(),
        expected,
        "the first of each key, in order"
    );
    let (launched, kept) = (&heads[0], &heads[1..]);
    queue.ack(launched).await.unwrap();
    for h in kept {
        queue.release(h).await.unwrap();
    }
    let after = queue.list().await.unwrap();
    assert!(
        after.iter().all(|e| e.build_id != launched.entry.build_id),
        "an acknowledged entry is gone"
    );
    assert_eq!(after.len(), listed.len() - 1, "released entries stay");
    let again = queue.receive_heads(100).await.unwrap();
    assert!(
        again
            .iter()
            .any(|h| h.entry.lock_key() == launched.entry.lock_key()),
        "the next of that key is offered"
    );
    for h in &again {
        queue.release(h).await.unwrap();
    }
    // a removed entry is not offered
    let victim = again[0].entry.build_id;
    assert!(queue.remove(victim).await.unwrap());
    let third = queue.receive_heads(100).await.unwrap();
    assert!(
        third.iter().all(|h| h.entry.build_id != victim),
        "a removed entry is not offered"
    );
    for h in &third {
        queue.release(h).await.unwrap();
    }
    let two = queue.receive_heads(1).await.unwrap();
    assert_eq!(two.len(), 1, "max is respected");
    queue.release(&two[0]).await.unwrap();

    queue.set_open(false).await.unwrap();
    assert!(!queue.is_open().await.unwrap());
    queue.set_open(true).await.unwrap();
    assert!(queue.is_open().await.unwrap());
    for e in queue.list().await.unwrap() {
        queue.remove(e.build_id).await.unwrap();
    }
    assert!(queue.list().await.unwrap().is_empty());

    // A pipeline's stages of one commit wait apart (their entries carry
    // `branch:stage`), and each is the head of its own key.
    let stages: Vec<DeferredEntry> = ["main:build", "main:test", ":production"]
        .iter()
        .map(|b| {
            let mut e = entry(b, Some("c-stages"), t0);
            e.git_ref = "refs/heads/main".into();
            e
        })
        .collect();
    for e in &stages {
        assert_eq!(
            queue.push(e).await.unwrap(),
            PushOutcome::Added,
            "stage {} waits apart",
            e.branch
        );
    }
    let heads = queue.receive_heads(100).await.unwrap();
    assert_eq!(heads.len(), 3, "one head per stage key");
    for h in &heads {
        queue.release(h).await.unwrap();
    }
    assert_eq!(stages[1].lock_key().as_str(), "contract/queue/main:test");
    for e in &stages {
        assert!(queue.remove(e.build_id).await.unwrap());
    }
}

fn stream_of(chunks: Vec<Bytes>) -> ByteStream {
    Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
}

async fn read_all(stream: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = stream;
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// The [`BlobStore`] contract.
pub async fn blob_store_suite(store: Arc<dyn BlobStore>) {
    let id = BuildId::new();
    assert!(
        store.get(id, BlobKind::LogGz).await.unwrap().is_none(),
        "a missing blob is None"
    );
    // several MiB in many chunks
    let chunk: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    let chunks: Vec<Bytes> = (0..80).map(|_| Bytes::from(chunk.clone())).collect();
    let total = 80 * chunk.len() as u64;
    assert_eq!(
        store
            .put(id, BlobKind::ArtifactsTarGz, stream_of(chunks))
            .await
            .unwrap(),
        total
    );
    let (size, stream) = store
        .get(id, BlobKind::ArtifactsTarGz)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(size, total);
    let back = read_all(stream).await;
    assert_eq!(back.len() as u64, total);
    assert!(
        back.chunks(chunk.len()).all(|c| c == chunk.as_slice()),
        "content round-trips"
    );
    assert!(
        store.get(id, BlobKind::LogGz).await.unwrap().is_none(),
        "kinds are separate"
    );
    // Every kind is a blob of its own.
    let kinds = [BlobKind::LogGz, BlobKind::ArtifactsIndex, BlobKind::Scripts];
    for (i, kind) in kinds.into_iter().enumerate() {
        let body = Bytes::from(format!("{i}:{}", kind.file_name()));
        store.put(id, kind, stream_of(vec![body])).await.unwrap();
    }
    for (i, kind) in kinds.into_iter().enumerate() {
        let (_, stream) = store.get(id, kind).await.unwrap().expect("stored");
        assert_eq!(
            read_all(stream).await,
            format!("{i}:{}", kind.file_name()).into_bytes(),
            "{kind:?} is its own blob"
        );
        assert!(store.delete(id, kind).await.unwrap());
    }

    // replace
    store
        .put(
            id,
            BlobKind::ArtifactsTarGz,
            stream_of(vec![Bytes::from_static(b"new")]),
        )
        .await
        .unwrap();
    let (_, s) = store
        .get(id, BlobKind::ArtifactsTarGz)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_all(s).await, b"new");

    // a failing upload leaves the previous blob
    let failing: ByteStream = Box::pin(futures::stream::iter(vec![
        Ok(Bytes::from_static(b"partial")),
        Err(std::io::Error::other("the client went away")),
    ]));
    assert!(
        store
            .put(id, BlobKind::ArtifactsTarGz, failing)
            .await
            .is_err()
    );
    let (_, s) = store
        .get(id, BlobKind::ArtifactsTarGz)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read_all(s).await,
        b"new",
        "a failed put leaves the old blob whole"
    );

    assert!(store.delete(id, BlobKind::ArtifactsTarGz).await.unwrap());
    assert!(!store.delete(id, BlobKind::ArtifactsTarGz).await.unwrap());
    assert!(
        store
            .get(id, BlobKind::ArtifactsTarGz)
            .await
            .unwrap()
            .is_none()
    );
}

/// The status ledger's contract: nothing at first, the last state after.
pub async fn status_ledger_suite(ledger: Arc<dyn decap_core::ports::StatusLedger>) {
    use decap_core::ports::CommitState;
    let key = "acme/widgets@6113728f27ae82c7b1a177c8d03f9e96e0adf246#decap/acme/widgets";
    assert_eq!(
        ledger.reported(key).await.unwrap(),
        None,
        "nothing at first"
    );
    ledger.record(key, CommitState::Pending).await.unwrap();
    assert_eq!(
        ledger.reported(key).await.unwrap(),
        Some(CommitState::Pending)
    );
    ledger.record(key, CommitState::Success).await.unwrap();
    assert_eq!(
        ledger.reported(key).await.unwrap(),
        Some(CommitState::Success),
        "the last state wins"
    );
    assert_eq!(
        ledger.reported(&format!("{key}-other")).await.unwrap(),
        None,
        "keys are separate"
    );
    for state in [CommitState::Failure, CommitState::Error] {
        ledger.record(key, state).await.unwrap();
        assert_eq!(ledger.reported(key).await.unwrap(), Some(state));
    }

    // Comments: one id per key, replaced when a comment is posted anew.
    let pr = "acme/widgets#2:acme/widgets";
    assert_eq!(ledger.comment(pr).await.unwrap(), None);
    ledger.record_comment(pr, 4242).await.unwrap();
    assert_eq!(ledger.comment(pr).await.unwrap(), Some(4242));
    ledger
        .record_comment(pr, u64::from(u32::MAX) + 7)
        .await
        .unwrap();
    assert_eq!(
        ledger.comment(pr).await.unwrap(),
        Some(u64::from(u32::MAX) + 7),
        "large ids survive"
    );
    assert_eq!(
        ledger.comment("acme/widgets#3:acme/widgets").await.unwrap(),
        None
    );
}

/// Collects what an executor reports, for [`executor_suite`].
#[derive(Default)]
pub struct RecordedExits(std::sync::Mutex<Vec<decap_core::ports::EnvironmentExit>>);

impl decap_core::ports::ExecutorEvents for RecordedExits {
    fn environment_exited(&self, exit: decap_core::ports::EnvironmentExit) {
        if let Ok(mut v) = self.0.lock() {
            v.push(exit);
        }
    }
}

impl RecordedExits {
    fn count(&self, id: BuildId) -> usize {
        self.0
            .lock()
            .map(|v| v.iter().filter(|e| e.build_id == id).count())
            .unwrap_or(0)
    }

    async fn wait_for(&self, id: BuildId, limit: Duration) {
        let start = std::time::Instant::now();
        while self.count(id) == 0 {
            assert!(
                start.elapsed() < limit,
                "the end of build {id}'s environment was never reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A launch of `script` (as `build.sh`) for a fresh build. The build reports
/// to nowhere (`decap_url` is a closed port, and bctool is told not to wait
/// for it): the suite is about environments, not results.
pub fn launch_spec(script: &str, timeout: Duration) -> decap_core::ports::LaunchSpec {
    launch_spec_in("debian:bookworm-slim", script, timeout)
}

/// [`launch_spec`] of a project whose `buildImage` is `image`.
pub fn launch_spec_in(
    image: &str,
    script: &str,
    timeout: Duration,
) -> decap_core::ports::LaunchSpec {
    use decap_core::catalog::{ProjectEntry, ScriptFile};
    let key = ProjectKey::new("contract", "executor").expect("valid");
    let descriptor = decap_core::descriptor::ProjectDescriptor::parse(
        serde_json::json!({ "buildImage": image })
            .to_string()
            .as_bytes(),
    )
    .expect("valid descriptor");
    let mut build = Build::new(
        key.clone(),
        &GitRef::branch("main").expect("valid"),
        None,
        Trigger::Manual,
        OffsetDateTime::now_utc(),
    );
    build
        .transition(BuildStatus::Running, OffsetDateTime::now_utc())
        .expect("queued builds can run");
    decap_core::ports::LaunchSpec {
        build,
        project: ProjectEntry {
            key,
            descriptor: Some(descriptor),
            sidecars: Vec::new(),
            files: vec![ScriptFile {
                path: "build.sh".into(),
                executable: true,
                content: Arc::from(script.as_bytes()),
            }],
            error: None,
            pipeline: None,
        },
        build_token: "contract-token".into(),
        decap_url: "http://127.0.0.1:9".into(),
        timeout,
        max_log_bytes: 1 << 20,
        bctool_env: vec![("DECAP_BCTOOL_RETRY_SECS".into(), "0".into())],
        secrets: Vec::new(),
    }
}

/// The [`decap_core::ports::Executor`] contract: a launch returns once the
/// environment exists and shows in `live`; a second launch of the same build
/// adopts it; every environment's end is reported once; `cancel` ends a
/// running one and is a no-op for an unknown build. `exits` must be the
/// events the executor was made with; `limit` bounds each wait (an
/// environment that has to start a pod is slower than a process).
pub async fn executor_suite(
    executor: Arc<dyn decap_core::ports::Executor>,
    exits: Arc<RecordedExits>,
    limit: Duration,
) {
    executor_suite_in(executor, exits, limit, "debian:bookworm-slim").await;
}

/// [`executor_suite`] with builds whose `buildImage` is `image` (for
/// executors that run it, with no registry to pull from).
pub async fn executor_suite_in(
    executor: Arc<dyn decap_core::ports::Executor>,
    exits: Arc<RecordedExits>,
    limit: Duration,
    image: &str,
) {
    let launch_spec = |script: &str, timeout| launch_spec_in(image, script, timeout);
    // A build that ends by itself: reported once.
    let spec = launch_spec("#!/bin/sh\necho contract\n", Duration::from_secs(60));
    let id = spec.build.id;
    executor.launch(spec.clone()).await.expect("launch");
    // Launching it again adopts it: still one environment, one end.
    executor.launch(spec).await.expect("a second launch adopts");
    exits.wait_for(id, limit).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(exits.count(id), 1, "an environment's end is reported once");
    let start = std::time::Instant::now();
    while executor.live().await.expect("live").contains(&id) {
        assert!(start.elapsed() < limit, "an ended build stays live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A build that would run for long: live until cancelled, then reported.
    let spec = launch_spec(
        "#!/bin/sh\necho waiting\nsleep 300\n",
        Duration::from_secs(600),
    );
    let id = spec.build.id;
    executor.launch(spec).await.expect("launch");
    assert!(
        executor.live().await.expect("live").contains(&id),
        "a launched build is live once launch returns"
    );
    assert!(
        executor.unavailable().is_none(),
        "a working executor says it can launch"
    );
    executor.cancel(id).await.expect("cancel");
    exits.wait_for(id, limit).await;
    let start = std::time::Instant::now();
    while executor.live().await.expect("live").contains(&id) {
        assert!(start.elapsed() < limit, "a cancelled build stays live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        exits.count(id),
        1,
        "a cancelled environment's end is reported once"
    );

    // Cancelling what does not exist is a no-op.
    executor
        .cancel(BuildId::new())
        .await
        .expect("cancelling an unknown build is a no-op");
}

/// The [`decap_core::ports::StatusHub`] contract.
pub async fn status_hub_suite(hub: Arc<dyn decap_core::ports::StatusHub>) {
    use decap_core::hub::{ExternalBuild, Reported};
    let t0 = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid");
    let at = |s: i64| t0 + time::Duration::seconds(s);
    let report = |rev: &str, name: &str, status: Reported, s: i64| ExternalBuild {
        project: "pipeline".into(),
        repository: "git@github.com:acme/pipeline.git".into(),
        revision: rev.into(),
        name: name.into(),
        status,
        status_url: Some(format!("https://ci.example.com/{rev}/{name}")),
        revision_seen_at: at(s),
        updated_at: at(s),
    };
    assert!(hub.projects().await.expect("projects").is_empty());
    hub.record(&report("aaaa01", "tests", Reported::Building, 0))
        .await
        .expect("record");
    hub.record(&report("aaaa01", "tests", Reported::Failed, 10))
        .await
        .expect("record");
    hub.record(&report("aaaa01", "deploy", Reported::Building, 20))
        .await
        .expect("record");
    hub.record(&report("bbbb02", "tests", Reported::Successful, 30))
        .await
        .expect("record");
    let mut other = report("cccc03", "tests", Reported::Building, 40);
    other.project = "other".into();
    hub.record(&other).await.expect("record");

    assert_eq!(
        hub.projects().await.expect("projects"),
        vec!["other".to_owned(), "pipeline".to_owned()]
    );
    let all = hub.latest("pipeline", 10).await.expect("latest");
    assert_eq!(all.len(), 3, "one record per revision and name: {all:?}");
    let tests_a = all
        .iter()
        .find(|b| b.revision == "aaaa01" && b.name == "tests")
        .expect("kept");
    assert_eq!(tests_a.status, Reported::Failed, "the last report wins");
    assert_eq!(tests_a.updated_at, at(10));
    let deploy_a = all
        .iter()
        .find(|b| b.revision == "aaaa01" && b.name == "deploy")
        .expect("kept");
    assert_eq!(
        deploy_a.revision_seen_at,
        at(0),
        "a revision keeps the time it was first reported"
    );
    let newest = hub.latest("pipeline", 1).await.expect("latest");
    assert!(
        newest.iter().all(|b| b.revision == "bbbb02") && !newest.is_empty(),
        "the latest revision only: {newest:?}"
    );
    assert!(hub.latest("nothing", 10).await.expect("latest").is_empty());

    // Locks: one revision at a time per build name; they lapse.
    let ttl = Duration::from_secs(1800);
    assert_eq!(
        hub.lock("pipeline", "deploy", "aaaa01", at(0), ttl)
            .await
            .expect("lock"),
        "aaaa01"
    );
    assert_eq!(
        hub.lock("pipeline", "deploy", "bbbb02", at(60), ttl)
            .await
            .expect("lock"),
        "aaaa01",
        "the holder is named"
    );
    assert_eq!(
        hub.lock("pipeline", "tests", "bbbb02", at(60), ttl)
            .await
            .expect("lock"),
        "bbbb02",
        "another name is another lock"
    );
    assert!(
        !hub.unlock("pipeline", "deploy", "bbbb02")
            .await
            .expect("unlock")
    );
    assert!(
        hub.unlock("pipeline", "deploy", "aaaa01")
            .await
            .expect("unlock")
    );
    assert_eq!(
        hub.lock("pipeline", "deploy", "bbbb02", at(61), ttl)
            .await
            .expect("lock"),
        "bbbb02"
    );
    assert_eq!(
        hub.lock("pipeline", "deploy", "cccc03", at(61 + 1801), ttl)
            .await
            .expect("lock"),
        "cccc03",
        "an expired lock is taken over"
    );

    // Removing a project removes its history and locks, and nothing else.
    assert!(hub.remove_project("pipeline").await.expect("remove"));
    assert!(!hub.remove_project("pipeline").await.expect("remove"));
    assert!(hub.latest("pipeline", 10).await.expect("latest").is_empty());
    assert_eq!(
        hub.projects().await.expect("projects"),
        vec!["other".to_owned()]
    );
    assert_eq!(
        hub.lock("pipeline", "deploy", "dddd04", at(100), ttl)
            .await
            .expect("lock"),
        "dddd04"
    );
}

/// The [`decap_core::ports::DetailStore`] contract.
pub async fn detail_store_suite(store: Arc<dyn decap_core::ports::DetailStore>) {
    use decap_core::ports::DetailPath;
    let t0 = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid");
    let day = time::Duration::days(1);
    let body = |s: &'static str| -> ByteStream {
        Box::pin(futures::stream::iter(vec![Ok(Bytes::from_static(
            s.as_bytes(),
        ))]))
    };
    let a = DetailPath::new("acme", "widgets", "CAFE0001", "logs/run.log").expect("valid");
    let b = DetailPath::new("acme", "widgets", "cafe0001", "summary.txt").expect("valid");
    let old = DetailPath::new("acme", "widgets", "beef0002", "old.txt").expect("valid");
    assert_eq!(a.commit, "cafe0001", "commits are kept in lower case");
    assert!(store.get(&a, t0).await.expect("get").is_none());
    assert_eq!(
        store
            .put(&a, body("run log\n"), t0 + day * 7)
            .await
            .expect("put"),
        8
    );
    store.put(&b, body("ok\n"), t0 + day).await.expect("put");
    store.put(&old, body("old\n"), t0 + day).await.expect("put");
    let (size, stream) = store.get(&a, t0).await.expect("get").expect("stored");
    assert_eq!(size, 8);
    assert_eq!(read_all(stream).await, b"run log\n");
    assert!(
        store
            .get(
                &DetailPath::new("acme", "widgets", "cafe0001", "nope").expect("valid"),
                t0
            )
            .await
            .expect("get")
            .is_none()
    );
    // A commit's files live as long as its longest expiry.
    assert!(store.get(&b, t0 + day * 2).await.expect("get").is_some());
    assert!(
        store.get(&old, t0 + day * 2).await.expect("get").is_none(),
        "expired"
    );
    assert_eq!(store.sweep(t0 + day * 2).await.expect("sweep"), 1);
    assert!(store.get(&a, t0 + day * 2).await.expect("get").is_some());
    assert_eq!(store.sweep(t0 + day * 8).await.expect("sweep"), 1);
    assert!(store.get(&a, t0).await.expect("get").is_none(), "swept");

    for (owner, repo, commit, file) in [
        ("acme", "widgets", "cafe0001", "../../etc/passwd"),
        ("acme", "widgets", "cafe0001", "/etc/passwd"),
        ("acme", "widgets", "cafe0001", "a//b"),
        ("acme", "widgets", "cafe0001", ".decap-expires"),
        ("..", "widgets", "cafe0001", "a"),
        ("acme", "widgets", "not-hex", "a"),
    ] {
        assert!(
            DetailPath::new(owner, repo, commit, file).is_err(),
            "{owner}/{repo}/{commit}/{file} must be refused"
        );
    }
}

/// The [`SecretStore`](decap_core::ports::SecretStore) contract: set,
/// replace, list, remove; a build gets its team's secrets and its project's,
/// the project's winning; scopes are apart; names never carry values.
pub async fn secret_store_suite(store: Arc<dyn decap_core::ports::SecretStore>) {
    use decap_core::Error;
    use decap_core::secrets::{MAX_SECRET_VALUE_BYTES, SecretName, SecretScope, SecretValue};

    fn name(n: &str) -> SecretName {
        SecretName::new(n).unwrap()
    }
    fn value(v: &str) -> SecretValue {
        SecretValue::new(v.to_owned()).unwrap()
    }
    fn shown(secrets: &[(String, SecretValue)]) -> Vec<(String, String)> {
        secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect()
    }
    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    // Names with capitals, '_' and '.', which adapters must keep apart and
    // store faithfully.
    let team = SecretScope::team("Acme_Corp").unwrap();
    let widgets_key = ProjectKey::new("Acme_Corp", "Widgets.js").unwrap();
    let widgets = SecretScope::Project(widgets_key.clone());
    let gadgets_key = ProjectKey::new("Acme_Corp", "gadgets").unwrap();
    let gadgets = SecretScope::Project(gadgets_key.clone());
    let rival_key = ProjectKey::new("acme_corp", "Widgets.js").unwrap();
    let rival_team = SecretScope::team("acme_corp").unwrap();

    // Nothing at first.
    assert!(
        store.names(&team).await.unwrap().is_empty(),
        "empty at first"
    );
    assert!(store.names(&widgets).await.unwrap().is_empty());
    assert!(store.for_build(&widgets_key).await.unwrap().is_empty());

    // set, then names sorted and values for builds.
    store
        .set(&widgets, &name("NPM_TOKEN"), &value("npm-1"))
        .await
        .unwrap();
    store
        .set(&widgets, &name("AWS_KEY"), &value("aws-1"))
        .await
        .unwrap();
    assert_eq!(
        store.names(&widgets).await.unwrap(),
        ["AWS_KEY", "NPM_TOKEN"],
        "names are sorted"
    );
    assert_eq!(
        shown(&store.for_build(&widgets_key).await.unwrap()),
        pairs(&[("AWS_KEY", "aws-1"), ("NPM_TOKEN", "npm-1")])
    );

    // set again replaces.
    store
        .set(&widgets, &name("NPM_TOKEN"), &value("npm-2"))
        .await
        .unwrap();
    assert_eq!(
        store.names(&widgets).await.unwrap(),
        ["AWS_KEY", "NPM_TOKEN"],
        "a replaced name is listed once"
    );
    assert_eq!(
        shown(&store.for_build(&widgets_key).await.unwrap()),
        pairs(&[("AWS_KEY", "aws-1"), ("NPM_TOKEN", "npm-2")]),
        "set replaces the value"
    );

    // Team-wide secrets reach every project of the team; the project's win.
    store
        .set(&team, &name("NPM_TOKEN"), &value("team-npm"))
        .await
        .unwrap();
    store
        .set(&team, &name("SLACK_HOOK"), &value("team-slack"))
        .await
        .unwrap();
    assert_eq!(
        store.names(&team).await.unwrap(),
        ["NPM_TOKEN", "SLACK_HOOK"]
    );
    assert_eq!(
        store.names(&widgets).await.unwrap(),
        ["AWS_KEY", "NPM_TOKEN"],
        "a project's names are its own, not the team's"
    );
    assert_eq!(
        shown(&store.for_build(&widgets_key).await.unwrap()),
        pairs(&[
            ("AWS_KEY", "aws-1"),
            ("NPM_TOKEN", "npm-2"),
            ("SLACK_HOOK", "team-slack"),
        ]),
        "team and project merged, the project winning, sorted"
    );
    assert_eq!(
        shown(&store.for_build(&gadgets_key).await.unwrap()),
        pairs(&[("NPM_TOKEN", "team-npm"), ("SLACK_HOOK", "team-slack")]),
        "another project of the team gets the team's secrets only"
    );
    assert!(store.names(&gadgets).await.unwrap().is_empty());

    // Other teams see nothing, even with names differing only in case.
    assert!(
        store.for_build(&rival_key).await.unwrap().is_empty(),
        "another team's project gets nothing"
    );
    assert!(store.names(&rival_team).await.unwrap().is_empty());
    assert!(
        store
            .names(&SecretScope::Project(rival_key.clone()))
            .await
            .unwrap()
            .is_empty()
    );

    // Names never carry values.
    for scope in [&team, &widgets] {
        for listed in store.names(scope).await.unwrap() {
            assert!(
                !["npm-1", "npm-2", "aws-1", "team-npm", "team-slack"]
                    .iter()
                    .any(|v| listed.contains(v)),
                "{listed:?} carries a value"
            );
        }
    }

    // Values round-trip exactly: whitespace, lines, any text, the largest.
    let odd = " leading and trailing \n\tline two\r\n=\"quoted\" 'x' $HOME ✓ ";
    store
        .set(&gadgets, &name("ODD"), &value(odd))
        .await
        .unwrap();
    let largest = "k".repeat(MAX_SECRET_VALUE_BYTES - 3) + "end";
    store
        .set(&gadgets, &name("LARGEST"), &value(&largest))
        .await
        .unwrap();
    let got = store.for_build(&gadgets_key).await.unwrap();
    let find = |k: &str| {
        got.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.expose().to_owned())
    };
    assert_eq!(find("ODD").as_deref(), Some(odd), "kept byte for byte");
    assert_eq!(find("LARGEST").as_deref(), Some(largest.as_str()));

    // remove: true once, then false; only in its own scope.
    assert!(
        !store.remove(&team, &name("AWS_KEY")).await.unwrap(),
        "a project's secret is not removed through its team"
    );
    assert!(
        !store.remove(&gadgets, &name("AWS_KEY")).await.unwrap(),
        "nor through another project"
    );
    assert!(store.remove(&widgets, &name("AWS_KEY")).await.unwrap());
    assert!(
        !store.remove(&widgets, &name("AWS_KEY")).await.unwrap(),
        "removing a missing name is false"
    );
    assert!(!store.remove(&widgets, &name("NEVER_SET")).await.unwrap());
    assert!(!store.remove(&rival_team, &name("NPM_TOKEN")).await.unwrap());
    assert_eq!(store.names(&widgets).await.unwrap(), ["NPM_TOKEN"]);

    // Removing the project's override shows the team's value again.
    assert!(store.remove(&widgets, &name("NPM_TOKEN")).await.unwrap());
    assert!(store.names(&widgets).await.unwrap().is_empty());
    assert_eq!(
        shown(&store.for_build(&widgets_key).await.unwrap()),
        pairs(&[("NPM_TOKEN", "team-npm"), ("SLACK_HOOK", "team-slack")]),
        "without the project's own, the team's value"
    );

    // A scope emptied can be filled again.
    store
        .set(&widgets, &name("AGAIN"), &value("again"))
        .await
        .unwrap();
    assert_eq!(store.names(&widgets).await.unwrap(), ["AGAIN"]);

    // Concurrent sets of different names in one scope all take effect.
    let concurrent = SecretScope::project("Acme_Corp", "busy").unwrap();
    let sets = (0..8).map(|i| {
        let store = store.clone();
        let concurrent = concurrent.clone();
        async move {
            store
                .set(
                    &concurrent,
                    &name(&format!("KEY_{i}")),
                    &value(&format!("v{i}")),
                )
                .await
        }
    });
    for r in futures::future::join_all(sets).await {
        r.unwrap();
    }
    let expected: Vec<String> = (0..8).map(|i| format!("KEY_{i}")).collect();
    assert_eq!(
        store.names(&concurrent).await.unwrap(),
        expected,
        "no concurrent set was lost"
    );
    let removes = (0..8).map(|i| {
        let store = store.clone();
        let concurrent = concurrent.clone();
        async move { store.remove(&concurrent, &name(&format!("KEY_{i}"))).await }
    });
    for r in futures::future::join_all(removes).await {
        assert!(r.unwrap(), "each concurrent remove found its name");
    }
    assert!(store.names(&concurrent).await.unwrap().is_empty());

    // What the port refuses, as Error::Invalid, before any adapter sees it.
    for bad in ["", "1ST", "A-B", "A B", "DECAP_X", "BUILD_ID", "PATH"] {
        match SecretName::new(bad) {
            Err(Error::Invalid { .. }) => {}
            other => panic!("secret name {bad:?}: {other:?}"),
        }
    }
    match SecretName::new(&"N".repeat(129)) {
        Err(Error::Invalid { .. }) => {}
        other => panic!("a 129-character name: {other:?}"),
    }
    for (bad, what) in [
        (String::new(), "an empty value"),
        ("x".repeat(MAX_SECRET_VALUE_BYTES + 1), "an oversized value"),
        ("a\0b".to_owned(), "a value with NUL"),
    ] {
        match SecretValue::new(bad) {
            Err(Error::Invalid { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    match SecretValue::from_bytes(vec![0xc3, 0x28]) {
        Err(Error::Invalid { .. }) => {}
        other => panic!("a value that is not UTF-8: {other:?}"),
    }

    // Leave the team clean for adapters that share storage across runs.
    for scope in [&team, &widgets, &gadgets] {
        for n in store.names(scope).await.unwrap() {
            assert!(store.remove(scope, &name(&n)).await.unwrap());
        }
    }
    assert!(store.for_build(&widgets_key).await.unwrap().is_empty());
}

/// The [`decap_core::ports::RunStore`] contract: a run is stored once and
/// read back whole; a project's runs list newest first and page; recovery
/// finds runs by time; a stage attempt's claim is granted once, the others
/// getting the claim that won, even when they ask at once; a run's claims
/// come back. `builds` is the same backend's build store: runs kept beside
/// builds do not show among them.
pub async fn run_store_suite(
    runs: Arc<dyn decap_core::ports::RunStore>,
    builds: Arc<dyn BuildStore>,
) {
    use decap_core::pipeline::{PipelineDef, PipelineRun, StageClaim};
    let def = PipelineDef::parse(
        br#"{"stages": [{"name": "build", "script": "build.sh"}, {"name": "test", "script": "build.sh"}]}"#,
        &["build.sh"].into_iter().collect(),
        &[],
    )
    .unwrap();
    let p = project(&format!("runs{}", now().unix_timestamp_nanos()));
    let start = now();
    let mut made = Vec::new();
    for i in 0..5i64 {
        let t = Build::new(
            p.clone(),
            &GitRef::branch("main").unwrap(),
            Some(format!("{i:040x}")),
            Trigger::Webhook,
            start + time::Duration::milliseconds(i),
        );
        let run = PipelineRun::new(&t, "scripts".into(), def.clone());
        runs.insert(&run).await.unwrap();
        made.push(run);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        matches!(
            runs.insert(&made[0]).await,
            Err(decap_core::Error::Conflict(_))
        ),
        "a run is stored once"
    );
    assert_eq!(runs.get(made[2].id).await.unwrap().as_ref(), Some(&made[2]));
    assert_eq!(runs.get(uuid::Uuid::now_v7()).await.unwrap(), None);
    let first = runs.list(&p, None, 3).await.unwrap();
    let ids: Vec<_> = first.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        vec![made[4].id, made[3].id, made[2].id],
        "newest first"
    );
    let rest = runs.list(&p, Some(made[2].id), 3).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![made[1].id, made[0].id], "the next page");
    assert!(
        runs.list(&project("elsewhere"), None, 3)
            .await
            .unwrap()
            .is_empty()
    );
    let recent = runs.since(start).await.unwrap();
    assert!(made.iter().all(|m| recent.iter().any(|r| r.id == m.id)));
    assert!(
        runs.since(start + time::Duration::hours(1))
            .await
            .unwrap()
            .iter()
            .all(|r| r.project != p)
    );

    let run = &made[0];
    let claim = |attempt: u32, build: BuildId| StageClaim {
        run: run.id,
        stage: "test".into(),
        attempt,
        build,
        trigger: Trigger::Rerun,
        inputs: [("build".to_owned(), BuildId::new())].into_iter().collect(),
    };
    let a = claim(1, BuildId::new());
    assert_eq!(runs.claim(&a).await.unwrap(), None, "the first claim wins");
    let b = claim(1, BuildId::new());
    assert_eq!(
        runs.claim(&b).await.unwrap(),
        Some(a.clone()),
        "the winner is told"
    );
    // Ten at once for the next attempt: one wins, the rest are told which.
    let contenders: Vec<StageClaim> = (0..10).map(|_| claim(2, BuildId::new())).collect();
    let results = futures::future::join_all(contenders.iter().map(|c| runs.claim(c))).await;
    let winners: Vec<&StageClaim> = contenders
        .iter()
        .zip(&results)
        .filter(|(_, r)| matches!(r, Ok(None)))
        .map(|(c, _)| c)
        .collect();
    assert_eq!(winners.len(), 1, "one claim of an attempt wins");
    for r in &results {
        match r {
            Ok(None) => {}
            Ok(Some(w)) => assert_eq!(w, winners[0]),
            Err(e) => panic!("a claim failed: {e}"),
        }
    }
    let mut got = runs.claims(run.id).await.unwrap();
    got.sort_by_key(|c| c.attempt);
    assert_eq!(got, vec![a, winners[0].clone()]);
    assert!(runs.claims(made[1].id).await.unwrap().is_empty());
    let mut of_two = runs.claims_of(&[run.id, made[1].id]).await.unwrap();
    of_two.sort_by_key(|c| c.attempt);
    assert_eq!(of_two, got, "the claims of several runs at once");

    // Builds read several at once.
    let stored: Vec<Build> = (0..3)
        .map(|i| build_at(&format!("many{i}"), "main", now()))
        .collect();
    for b in &stored {
        builds.insert(b).await.unwrap();
    }
    let mut wanted: Vec<BuildId> = stored.iter().map(|b| b.id).collect();
    wanted.push(BuildId::new());
    let mut many = builds.get_many(&wanted).await.unwrap();
    many.sort_by_key(|b| b.id);
    assert_eq!(many, stored, "the builds that exist, each once");

    let all = builds
        .list(&BuildQuery {
            limit: 500,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        all.builds.iter().all(|b| b.project != p),
        "runs are not builds"
    );
}

/// The [`SessionStore`](decap_core::ports::SessionStore) contract: a
/// session is found by its key until it ends, replaced by a second `put`,
/// gone once removed; keys are apart.
pub async fn session_store_suite(store: Arc<dyn decap_core::ports::SessionStore>) {
    use decap_core::ports::StoredSession;
    let t0 = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let token = StoredSession {
        github_login: None,
        can_build: true,
        can_unlock: true,
        expires_at: t0 + hour * 12,
    };
    let octocat = StoredSession {
        github_login: Some("octocat".into()),
        can_build: true,
        can_unlock: false,
        expires_at: t0 + hour,
    };
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    assert_eq!(store.get(&a, t0).await.expect("get"), None);
    store.put(&a, &token).await.expect("put");
    store.put(&b, &octocat).await.expect("put");
    assert_eq!(store.get(&a, t0).await.expect("get"), Some(token.clone()));
    assert_eq!(store.get(&b, t0).await.expect("get"), Some(octocat.clone()));
    assert_eq!(
        store.get(&b, t0 + hour * 2).await.expect("get"),
        None,
        "an ended session is not found"
    );
    assert_eq!(
        store.get(&a, t0 + hour * 2).await.expect("get"),
        Some(token.clone())
    );
    let fewer = StoredSession {
        can_unlock: false,
        ..token.clone()
    };
    store.put(&a, &fewer).await.expect("put");
    assert_eq!(store.get(&a, t0).await.expect("get"), Some(fewer));
    store.remove(&a).await.expect("remove");
    assert_eq!(store.get(&a, t0).await.expect("get"), None, "logged out");
    store.remove(&a).await.expect("removing again is no error");
    assert_eq!(
        store.get(&b, t0).await.expect("get"),
        Some(octocat),
        "keys are apart"
    );
}
