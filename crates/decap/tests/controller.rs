//! The controller on the embedded adapters and the local executor (no
//! sandbox), with builds that reach it over HTTP: how builds end, what they
//! hold until then, and what a restart finds.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::lifecycle::outcome_of_result;
use decap_core::schedule::Caps;
use decap_core::{Error, ProjectKey};
use decap_server::{AuthConfig, Controller};
use secrecy::SecretString;

use common::app::{Embedded, Options, embedded_with};
use common::{TOKEN, project};

/// Room for one build at a time.
const ONE_AT_A_TIME: Caps = Caps {
    global: 1,
    per_project: 1,
};

/// A served controller with `caps` over one project, `acme/widgets`, whose
/// build runs `script`.
async fn served(caps: Caps, script: &str) -> Embedded {
    served_with(caps, script, false).await
}

/// [`served`], with or without the executor's exit events (`lose_exits`),
/// and its running builds looked at every 100 ms.
async fn served_with(caps: Caps, script: &str, lose_exits: bool) -> Embedded {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let script = script.to_owned();
    let options = Options {
        public_url: &url,
        caps,
        decap_url: &url,
        drain_interval: Duration::from_millis(100),
        lose_exits,
        ..Options::default()
    };
    let e = embedded_with(options, |scripts| {
        project(scripts, "acme/widgets", r#"{"buildImage": "x"}"#, &script)
    })
    .await;
    e.serve(
        listener,
        AuthConfig {
            api_token: Some(SecretString::from(TOKEN)),
            insecure_local: false,
            webhook_secrets: Vec::new(),
            private_reads: false,
        },
    );
    e
}

fn widgets() -> ProjectKey {
    ProjectKey::new("acme", "widgets").unwrap()
}

async fn request(c: &Arc<Controller>, branches: &[&str]) -> Vec<Build> {
    let refs: Vec<String> = branches.iter().map(|b| b.to_string()).collect();
    c.request_builds(&widgets(), &refs, Trigger::Api)
        .await
        .unwrap()
}

/// Waits until build `id` satisfies `done`, or fails after 30 s.
async fn until(c: &Controller, id: BuildId, what: &str, done: impl Fn(&Build) -> bool) -> Build {
    let start = Instant::now();
    loop {
        let b = c.build(id).await.unwrap();
        if done(&b) {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "build {id} never {what}: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ended(c: &Controller, id: BuildId) -> Build {
    until(c, id, "ended", |b| b.status.is_final()).await
}

/// Waits until no lock is held, or fails after 10 s: a build's end is
/// stored first and its lock released right after.
async fn all_released(c: &Controller) {
    let start = std::time::Instant::now();
    while !locks(c).await.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "locks still held: {:?}",
            locks(c).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn locks(c: &Controller) -> Vec<String> {
    c.ports
        .locks
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key.to_string())
        .collect()
}

#[tokio::test]
async fn a_build_holds_its_lock_and_place_until_it_ends_then_the_next_runs() {
    let e = served(ONE_AT_A_TIME, "echo hello\nsleep 0.3\n").await;
    let c = &e.controller;
    let builds = request(c, &["main", "second"]).await;
    assert_eq!(builds[0].status, BuildStatus::Running);
    assert_eq!(builds[1].status, BuildStatus::Deferred);
    assert_eq!(locks(c).await, ["acme/widgets/main"]);
    let first = ended(c, builds[0].id).await;
    let second = ended(c, builds[1].id).await;
    for b in [&first, &second] {
        assert_eq!(b.status, BuildStatus::Succeeded, "{b:?}");
        assert_eq!(b.exit_code, Some(0));
        assert_eq!(b.reported, Some(outcome_of_result(0, false, None)));
    }
    assert!(
        second.start_time.unwrap() >= first.end_time.unwrap(),
        "the second build ran only once the first had ended: {first:?} {second:?}"
    );
    assert_eq!(second.message, None, "no longer says why it waited");
    all_released(c).await;
    assert_eq!(c.waiting_count().await, 0);
    assert!(c.ports.queue.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_result_reported_while_the_script_goes_on_is_taken_once_it_is_stopped() {
    let e = served(Caps::default(), "sleep 60\n").await;
    let c = &e.controller;
    let b = request(c, &["main"]).await.remove(0);
    assert_eq!(b.status, BuildStatus::Running);
    let t0 = Instant::now();
    let now = c
        .report(b.id, outcome_of_result(0, false, Some("done".into())))
        .await
        .unwrap();
    assert_eq!(
        now.status,
        BuildStatus::Running,
        "its processes still run, so it still holds its lock"
    );
    assert_eq!(locks(c).await, ["acme/widgets/main"]);
    // A second report changes nothing: the first wins.
    c.report(b.id, outcome_of_result(1, false, None))
        .await
        .unwrap();
    let done = ended(c, b.id).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "stopped after the grace period"
    );
    assert_eq!(done.status, BuildStatus::Succeeded, "{done:?}");
    assert_eq!(done.message.as_deref(), Some("done"));
    assert!(!c.ports.executor.live().await.unwrap().contains(&b.id));
    all_released(c).await;
}

#[tokio::test]
async fn a_cancelled_build_is_stopped_before_its_lock_goes() {
    let e = served(ONE_AT_A_TIME, "sleep 60\n").await;
    let c = &e.controller;
    let builds = request(c, &["main", "second"]).await;
    let cancelled = c.cancel(builds[0].id).await.unwrap();
    assert_eq!(cancelled.status, BuildStatus::Cancelled);
    assert_eq!(cancelled.message.as_deref(), Some("cancelled"));
    assert!(
        !c.ports
            .executor
            .live()
            .await
            .unwrap()
            .contains(&builds[0].id)
    );
    // The freed room went to the waiting build at once.
    let second = c.build(builds[1].id).await.unwrap();
    assert_eq!(second.status, BuildStatus::Running, "{second:?}");
    assert_eq!(locks(c).await, ["acme/widgets/second"]);
    // Cancelling again is refused, and changes nothing.
    let again = c.cancel(builds[0].id).await.unwrap_err();
    assert!(matches!(again, Error::Conflict(_)), "{again}");
    c.cancel(builds[1].id).await.unwrap();
    assert!(locks(c).await.is_empty());
}

#[tokio::test]
async fn a_deferred_build_cancelled_leaves_the_queue() {
    let e = served(ONE_AT_A_TIME, "sleep 60\n").await;
    let c = &e.controller;
    let builds = request(c, &["main", "second"]).await;
    assert_eq!(c.waiting_count().await, 1);
    c.remove_deferred(builds[1].id).await.unwrap();
    let gone = c.build(builds[1].id).await.unwrap();
    assert_eq!(gone.status, BuildStatus::Cancelled);
    assert_eq!(gone.start_time, None, "it never ran");
    assert_eq!(c.waiting_count().await, 0);
    assert!(c.ports.queue.list().await.unwrap().is_empty());
    assert!(
        c.remove_deferred(builds[0].id).await.is_err(),
        "not deferred"
    );
    c.cancel(builds[0].id).await.unwrap();
}

#[tokio::test]
async fn a_script_that_unlocks_early_frees_its_branch_but_not_its_place() {
    let e = served(ONE_AT_A_TIME, "sleep 60\n").await;
    let c = &e.controller;
    let b = request(c, &["main"]).await.remove(0);
    assert!(c.release_own_lock(b.id).await.unwrap());
    assert!(locks(c).await.is_empty());
    assert!(!c.release_own_lock(b.id).await.unwrap(), "released once");
    // Still running, still counted under the cap of one.
    let next = request(c, &["main"]).await.remove(0);
    assert_eq!(next.status, BuildStatus::Deferred, "{next:?}");
    c.cancel(b.id).await.unwrap();
    let next = until(c, next.id, "ran", |b| b.status == BuildStatus::Running).await;
    c.cancel(next.id).await.unwrap();
    assert!(
        !c.release_own_lock(next.id).await.unwrap(),
        "an ended build holds nothing"
    );
}

#[tokio::test]
async fn a_restart_ends_builds_whose_environment_is_gone_with_what_they_reported() {
    let e = served(Caps::default(), "true\n").await;
    let c = &e.controller;
    let at = time::OffsetDateTime::now_utc();
    // Two builds recorded running by a process that is gone: one had
    // reported its result, one had not.
    let mut ids = Vec::new();
    for (branch, reported) in [("main", true), ("other", false)] {
        let git_ref = decap_core::refs::GitRef::branch(branch).unwrap();
        let mut b = Build::new(widgets(), &git_ref, None, Trigger::Api, at);
        c.ports.builds.insert(&b).await.unwrap();
        let lock = c
            .ports
            .locks
            .acquire(&b.lock_key(), b.id, Duration::from_secs(600), at)
            .await
            .unwrap()
            .unwrap();
        b.transition(BuildStatus::Running, at).unwrap();
        b.fencing_token = Some(lock.fencing_token);
        if reported {
            b.reported = Some(outcome_of_result(3, false, Some("exit 3".into())));
        }
        assert!(
            c.ports
                .builds
                .update(&b, BuildStatus::Queued)
                .await
                .unwrap()
        );
        ids.push(b.id);
    }
    assert_eq!(locks(c).await.len(), 2);
    c.recover().await.unwrap();
    let reported = c.build(ids[0]).await.unwrap();
    assert_eq!(reported.status, BuildStatus::Failed);
    assert_eq!(reported.exit_code, Some(3));
    assert_eq!(reported.message.as_deref(), Some("exit 3"));
    let lost = c.build(ids[1]).await.unwrap();
    assert_eq!(lost.status, BuildStatus::Errored);
    assert!(
        lost.message.as_deref().unwrap().contains("Decap stopped"),
        "{lost:?}"
    );
    assert!(locks(c).await.is_empty());
    // Recovering again finds nothing left to do.
    c.recover().await.unwrap();
    assert_eq!(c.build(ids[1]).await.unwrap(), lost);
}

#[tokio::test]
async fn a_build_whose_end_never_arrives_ends_when_its_environment_is_seen_gone() {
    let e = served_with(ONE_AT_A_TIME, "echo done\n", true).await;
    let c = &e.controller;
    let builds = request(c, &["main", "second"]).await;
    let first = ended(c, builds[0].id).await;
    assert_eq!(
        first.status,
        BuildStatus::Succeeded,
        "its reported result is taken: {first:?}"
    );
    assert_eq!(first.message, None);
    // The room it held went to the next build, which ends the same way.
    let second = ended(c, builds[1].id).await;
    assert_eq!(second.status, BuildStatus::Succeeded, "{second:?}");
    all_released(c).await;
}

#[tokio::test]
async fn a_restart_keeps_the_console_of_a_build_that_ended_before_its_log_was_stored() {
    let e = served(Caps::default(), "true\n").await;
    let c = &e.controller;
    let at = time::OffsetDateTime::now_utc();
    // An earlier run ended the build, then stopped before storing its log:
    // the record is final, the spool is still there.
    let git_ref = decap_core::refs::GitRef::branch("main").unwrap();
    let mut b = Build::new(widgets(), &git_ref, None, Trigger::Api, at);
    c.ports.builds.insert(&b).await.unwrap();
    b.transition(BuildStatus::Running, at).unwrap();
    b.transition(BuildStatus::Failed, at).unwrap();
    assert!(
        c.ports
            .builds
            .update(&b, BuildStatus::Queued)
            .await
            .unwrap()
    );
    let spool = c.live.open(b.id).unwrap();
    spool.append_at(0, b"the last words\n").unwrap();
    drop(spool);
    c.recover().await.unwrap();
    let (_, log) = c
        .ports
        .blobs
        .get(b.id, decap_core::ports::BlobKind::LogGz)
        .await
        .unwrap()
        .expect("the spool became the log");
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(log).await.unwrap();
    let bytes = chunks.concat();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .unwrap();
    assert_eq!(text, "the last words\n");
    assert!(c.live.spooled().is_empty(), "and the spool is gone");
}

/// A deferred build the queue lost (its entry gone behind the controller's
/// back, as an expired or purged message is) is put back by the leader's
/// periodic comparison of the queue with the records, and runs once when
/// there is room.
#[tokio::test]
async fn a_deferred_build_the_queue_lost_is_put_back_and_runs_once() {
    let e = served(ONE_AT_A_TIME, "sleep 60\n").await;
    let c = &e.controller;
    let builds = request(c, &["main", "second"]).await;
    assert_eq!(c.waiting_count().await, 1);
    let lost = builds[1].id;
    assert!(c.ports.queue.remove(lost).await.unwrap(), "it was queued");
    assert_eq!(
        c.build(lost).await.unwrap().status,
        BuildStatus::Deferred,
        "the record still says it waits"
    );
    // Drains every 100 ms here: compared every 1.2 s, builds accepted more
    // than 1.2 s before.
    let start = Instant::now();
    loop {
        let listed = c.ports.queue.list().await.unwrap();
        if listed.iter().any(|entry| entry.build_id == lost) {
            assert_eq!(listed.len(), 1, "put back once");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not put back in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.cancel(builds[0].id).await.unwrap();
    let ran = until(c, lost, "the lost build to run", |b| {
        b.status == BuildStatus::Running
    })
    .await;
    assert_eq!(ran.status, BuildStatus::Running);
    assert!(c.ports.queue.list().await.unwrap().is_empty());
    c.cancel(lost).await.unwrap();
    let over = ended(c, lost).await;
    assert_eq!(over.status, BuildStatus::Cancelled);
}
