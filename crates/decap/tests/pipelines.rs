//! Pipelines on the embedded adapters and the local executor (no sandbox),
//! served over HTTP: stages run in order as their needs succeed, each as a
//! build of its own with its inputs, a manual stage waits for Promote, a
//! run is started again from the stage that failed, and no stage starts
//! twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use decap_core::build::{BuildStatus, Trigger};
use decap_core::pipeline::StageStatus;
use decap_core::ports::BlobKind;
use decap_core::schedule::Caps;
use decap_core::{Error, ProjectKey};
use decap_server::controller::RunView;
use decap_server::{AuthConfig, Controller};
use secrecy::SecretString;

use common::TOKEN;
use common::app::{Embedded, Options, embedded_with};

const PIPELINE: &str = r#"{"stages": [
    {"name": "build", "script": "build.sh"},
    {"name": "test", "script": "test.sh"},
    {"name": "deploy", "script": "deploy.sh", "manual": true, "lock": "production"}
]}"#;

/// `build` leaves an artifact naming its run; `test` checks it got that
/// artifact, and fails its first attempt when `FLAKY` is in the project's
/// folder; `deploy` checks its variables.
fn write_project(root: &std::path::Path, flaky: bool) {
    let dir = root.join("acme/flow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("project.json"), r#"{"buildImage": "x"}"#).unwrap();
    std::fs::write(dir.join("pipeline.json"), PIPELINE).unwrap();
    std::fs::write(
        dir.join("build.sh"),
        "set -e\n[ \"$DECAP_STAGE\" = build ] && [ \"$DECAP_ATTEMPT\" -ge 1 ]\n\
         echo \"built-$DECAP_PIPELINE_RUN_ID\" > \"$ARTIFACTS_DIR/out.txt\"\n",
    )
    .unwrap();
    let fail_first = if flaky {
        "[ \"$DECAP_ATTEMPT\" -ge 2 ] || { echo flaky; exit 3; }\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("test.sh"),
        format!(
            "#!/bin/sh\nset -e\n[ \"$DECAP_STAGE\" = test ]\n\
             [ \"$(cat \"$DECAP_INPUTS/build/out.txt\")\" = \"built-$DECAP_PIPELINE_RUN_ID\" ]\n\
             {fail_first}echo tested\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("deploy.sh"),
        "set -e\n[ \"$DECAP_STAGE\" = deploy ]\n[ -d \"$DECAP_INPUTS/test\" ]\n",
    )
    .unwrap();
}

async fn served(flaky: bool) -> Embedded {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = Options {
        public_url: &url,
        caps: Caps::default(),
        decap_url: &url,
        drain_interval: Duration::from_millis(100),
        ..Options::default()
    };
    let e = embedded_with(options, |scripts| write_project(scripts, flaky)).await;
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

fn flow() -> ProjectKey {
    ProjectKey::new("acme", "flow").unwrap()
}

async fn request(c: &Arc<Controller>) -> uuid::Uuid {
    let (runs, builds) = c
        .request_runs(&flow(), &["main".to_owned()], Trigger::Api)
        .await
        .unwrap();
    assert_eq!(builds.len(), 1, "only the first stage starts: {builds:?}");
    assert_eq!(builds[0].stage_name(), "build");
    assert_eq!(builds[0].pipeline_run_id, runs[0]);
    runs[0]
}

/// Waits until the run's status is `status`, or fails after 30 s.
async fn until(c: &Controller, id: uuid::Uuid, status: &str) -> RunView {
    let start = Instant::now();
    loop {
        let v = c.pipeline_run(id).await.unwrap();
        if v.plan.status == status {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "run {id} never became {status}: {:#?}",
            v.plan
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stores `run` with its first stage's attempt, succeeded and claimed, as
/// a controller that stopped right after that stage ended leaves it.
async fn stored_with_first_stage_ended(
    c: &Controller,
    run: &decap_core::pipeline::PipelineRun,
) -> decap_core::Build {
    c.ports.runs.insert(run).await.unwrap();
    let first = decap_core::pipeline::plan(run, &[]).start.remove(0);
    let mut b = run.attempt(&first, Trigger::Api, time::OffsetDateTime::now_utc());
    b.status = BuildStatus::Succeeded;
    c.ports.builds.insert(&b).await.unwrap();
    c.ports
        .runs
        .claim(&decap_core::pipeline::StageClaim::of(&b).unwrap())
        .await
        .unwrap();
    b
}

fn statuses(v: &RunView) -> Vec<&'static str> {
    v.plan.stages.iter().map(|s| s.status.as_str()).collect()
}

#[tokio::test]
async fn stages_run_in_order_with_their_inputs_and_a_manual_one_waits_for_promote() {
    let e = served(false).await;
    let c = &e.controller;
    let id = request(c).await;
    let first = c.pipeline_run(id).await.unwrap();
    assert_eq!(
        first.plan.stages.len(),
        3,
        "every stage is there from the start"
    );
    assert_eq!(first.plan.stages[2].status, StageStatus::Pending);
    let v = until(c, id, "waiting").await;
    assert_eq!(statuses(&v), ["succeeded", "succeeded", "waiting"]);
    // The project page draws the stages and the run's boxes; the API
    // shows the same run.
    let page = reqwest::get(format!("{}/projects/acme/flow", c.config.public_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<h2 id="pipeline-h">Pipeline</h2>"#),
        "{page}"
    );
    assert!(page.contains(r#"<td class="stage s-waiting">"#), "{page}");
    assert_eq!(page.matches(r#"<td class="stage s-succeeded">"#).count(), 2);
    let api: decap_api_types::PipelineRunView =
        reqwest::get(format!("{}/api/v1/pipeline-runs/{id}", c.config.public_url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(api.status, "waiting");
    assert_eq!(api.stages[2].name, "deploy");
    assert_eq!(api.stages[2].status, "waiting");
    assert_eq!(api.stages[1].attempts[0].stage, "test");
    let approve = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/pipeline-runs/{id}/stages/build/approve",
            c.config.public_url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(approve.status(), 409, "build is not waiting");
    let test = &v.plan.stages[1].attempts[0];
    assert_eq!(test.lock_key().as_str(), "acme/flow/main:test");
    assert!(
        matches!(c.rerun_stage(id, "nope").await, Err(Error::NotFound(_))),
        "an unknown stage"
    );
    assert!(matches!(
        c.approve_stage(id, "test").await,
        Err(Error::Conflict(_))
    ));
    // decapctl's client: the runs, one run, Promote.
    let client = decap_client::Client::new(&c.config.public_url, Some(TOKEN.into())).unwrap();
    let page = client.pipeline_runs("acme", "flow", 5, None).await.unwrap();
    assert_eq!(page.runs.len(), 1);
    assert_eq!(page.runs[0].id, id.to_string());
    let shown = client.pipeline_run(&id.to_string()).await.unwrap();
    assert_eq!(shown.stages.len(), 3);
    let promoted = client
        .stage_action(&id.to_string(), "deploy", true)
        .await
        .unwrap();
    assert_eq!((promoted.stage.as_str(), promoted.attempt), ("deploy", 1));
    let deploy = c
        .build(decap_core::BuildId::parse(&promoted.id).unwrap())
        .await
        .unwrap();
    assert_eq!(deploy.trigger, Trigger::Manual);
    assert_eq!(deploy.lock_key().as_str(), "acme/flow/:production");
    assert!(
        matches!(c.approve_stage(id, "deploy").await, Err(Error::Conflict(_))),
        "approved once"
    );
    let v = until(c, id, "succeeded").await;
    assert_eq!(statuses(&v), ["succeeded", "succeeded", "succeeded"]);
    let (runs, _) = c.pipeline_runs(&flow(), None, 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run.id, id);
}

#[tokio::test]
async fn a_failed_run_starts_again_from_the_stage_that_failed_once_however_often_asked() {
    let e = served(true).await;
    let c = &e.controller;
    let id = request(c).await;
    let v = until(c, id, "failed").await;
    assert_eq!(statuses(&v), ["succeeded", "failed", "pending"]);
    let build_attempt = v.plan.stages[0].attempts[0].id;
    // Asked twice at once: one attempt.
    let (a, b) = tokio::join!(c.rerun_stage(id, "test"), c.rerun_stage(id, "test"));
    let started: Vec<_> = [a, b].into_iter().filter_map(Result::ok).collect();
    assert_eq!(started.len(), 1, "one rerun starts");
    assert_eq!(started[0].attempt(), 2);
    let v = until(c, id, "waiting").await;
    assert_eq!(statuses(&v), ["succeeded", "succeeded", "waiting"]);
    assert_eq!(
        v.plan.stages[0].attempts.len(),
        1,
        "the first stage is reused"
    );
    assert_eq!(v.plan.stages[0].attempts[0].id, build_attempt);
    assert_eq!(v.plan.stages[1].attempts.len(), 2, "attempts are kept");
    assert_eq!(v.plan.stages[1].attempts[0].status, BuildStatus::Failed);

    // The first stage's artifacts gone: a rerun of the second is refused.
    c.ports
        .blobs
        .delete(build_attempt, BlobKind::ArtifactsTarGz)
        .await
        .unwrap();
    match c.rerun_stage(id, "test").await {
        Err(Error::Conflict(m)) => assert!(m.contains("no longer stored"), "{m}"),
        other => panic!("a rerun without its inputs: {other:?}"),
    }
    // From the first stage, the run starts again: the later ones wait
    // for it.
    let again = c.rerun_stage(id, "build").await.unwrap();
    assert_eq!(again.attempt(), 2);
    let v = until(c, id, "waiting").await;
    assert_eq!(v.plan.stages[1].attempts.len(), 3);
}

#[tokio::test]
async fn a_stage_that_ended_before_a_stop_starts_the_next_once() {
    let e = served(false).await;
    let c = &e.controller;
    let id = request(c).await;
    until(c, id, "waiting").await;
    // As if the controller stopped between a stage's end and the next
    // stage's start: a second run whose first stage ended, and nothing
    // more, then two looks at it at once.
    let run = c.ports.runs.get(id).await.unwrap().unwrap();
    let mut copy = run.clone();
    copy.id = uuid::Uuid::now_v7();
    let b = stored_with_first_stage_ended(c, &copy).await;
    // Its artifact, as the first stage would have left it.
    let tarball = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut tar = tar::Builder::new(&mut gz);
            let body = format!("built-{}\n", copy.id);
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, "out.txt", body.as_bytes()).unwrap();
            tar.finish().unwrap();
        }
        gz.finish().unwrap()
    };
    let stream: decap_core::ports::ByteStream = Box::pin(futures::stream::once(async move {
        Ok(bytes::Bytes::from(tarball))
    }));
    c.ports
        .blobs
        .put(b.id, BlobKind::ArtifactsTarGz, stream)
        .await
        .unwrap();
    let (one, two) = tokio::join!(c.advance_run(copy.id), c.advance_run(copy.id));
    // At most one of the two starts it (the start's look at recent runs
    // may have been first); the run shows it started once.
    assert!(
        one.unwrap().len() + two.unwrap().len() <= 1,
        "the next stage starts once"
    );
    let v = until(c, copy.id, "waiting").await;
    assert_eq!(v.plan.stages[1].attempts.len(), 1);
    assert!(c.advance_run(copy.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_invalid_pipeline_is_the_projects_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let e = embedded_with(
        Options {
            public_url: &url,
            decap_url: &url,
            ..Options::default()
        },
        |root| {
            write_project(root, false);
            std::fs::write(
                root.join("acme/flow/pipeline.json"),
                r#"{"stages": [{"name": "a", "script": "build.sh", "needs": ["b"]}, {"name": "b", "script": "test.sh", "needs": ["a"]}]}"#,
            )
            .unwrap();
        },
    )
    .await;
    let entry = e.controller.project(&flow()).unwrap();
    assert!(
        entry.error.as_deref().unwrap().contains("cycle"),
        "{entry:?}"
    );
    match e
        .controller
        .request_builds(&flow(), &["main".to_owned()], Trigger::Api)
        .await
    {
        Err(Error::Invalid { reason, .. }) => assert!(reason.contains("cycle"), "{reason}"),
        other => panic!("a request of a project with a cycle: {other:?}"),
    }
}

#[tokio::test]
async fn later_stages_run_the_scripts_their_run_was_pinned_to() {
    let e = served(false).await;
    let c = &e.controller;
    let dir = e.dir.path().join("scripts/acme/flow");
    std::fs::write(
        dir.join("build.sh"),
        "sleep 1\necho \"built-$DECAP_PIPELINE_RUN_ID\" > \"$ARTIFACTS_DIR/out.txt\"\n",
    )
    .unwrap();
    c.ports.scripts.refresh().await.unwrap();
    let id = request(c).await;
    let pinned = c.ports.runs.get(id).await.unwrap().unwrap().scripts_commit;
    // While the first stage runs, the second's script changes (to one
    // that fails) and goes on to a new commit of the scripts.
    std::fs::write(dir.join("test.sh"), "exit 7\n").unwrap();
    let now = c.ports.scripts.refresh().await.unwrap();
    assert_ne!(now.commit, pinned);
    let v = until(c, id, "waiting").await;
    let test = &v.plan.stages[1].attempts[0];
    assert_eq!(test.status, BuildStatus::Succeeded, "{test:?}");
    assert_eq!(test.scripts_commit.as_deref(), Some(pinned.as_str()));
}

#[tokio::test]
async fn later_stages_run_their_pinned_scripts_once_the_server_no_longer_holds_them() {
    let e = served(false).await;
    let c = &e.controller;
    let dir = e.dir.path().join("scripts/acme/flow");
    let gate = e.dir.path().join("gate");
    std::fs::write(
        dir.join("build.sh"),
        format!(
            "while [ ! -e {} ]; do sleep 0.05; done\n\
             echo \"built-$DECAP_PIPELINE_RUN_ID\" > \"$ARTIFACTS_DIR/out.txt\"\n",
            gate.display()
        ),
    )
    .unwrap();
    c.ports.scripts.refresh().await.unwrap();
    let id = request(c).await;
    let pinned = c.ports.runs.get(id).await.unwrap().unwrap().scripts_commit;
    // While the first stage runs, the scripts move on through more commits
    // than a server keeps in memory, the second stage's script failing in
    // each: only the scripts kept beside the run still hold the pinned one.
    for i in 0..20 {
        std::fs::write(dir.join("test.sh"), format!("exit {}\n", 10 + i)).unwrap();
        let catalog = c.ports.scripts.refresh().await.unwrap();
        // As requests at each commit leave it.
        c.remember_catalog(&catalog);
    }
    assert!(
        e.data
            .join("blobs")
            .join(id.to_string())
            .join(BlobKind::Scripts.file_name())
            .is_file(),
        "the run's scripts are kept beside it"
    );
    std::fs::write(&gate, "").unwrap();
    let v = until(c, id, "waiting").await;
    let test = &v.plan.stages[1].attempts[0];
    assert_eq!(test.status, BuildStatus::Succeeded, "{test:?}");
    assert_eq!(test.scripts_commit.as_deref(), Some(pinned.as_str()));
}

#[tokio::test]
async fn a_stage_whose_script_is_missing_at_its_pinned_commit_errors_saying_so() {
    let e = served(false).await;
    let c = &e.controller;
    // A run pinned to scripts this process no longer has, whose second
    // stage names a script the current ones lack; its first stage ended.
    let template = decap_core::Build::new(
        flow(),
        &decap_core::refs::GitRef::branch("main").unwrap(),
        None,
        Trigger::Api,
        time::OffsetDateTime::now_utc(),
    );
    let mut def = c.project(&flow()).unwrap().pipeline.unwrap();
    def.stages[1].script = "gone.sh".into();
    let run = decap_core::pipeline::PipelineRun::new(&template, "sha256:gone".into(), def);
    stored_with_first_stage_ended(c, &run).await;
    // Started here, or already by the start's look at recent runs.
    assert!(c.advance_run(run.id).await.unwrap().len() <= 1);
    let v = until(c, run.id, "errored").await;
    assert_eq!(statuses(&v), ["succeeded", "errored", "pending"]);
    assert_eq!(v.plan.stages[1].attempts.len(), 1, "started once");
    let message = v.plan.stages[1].attempts[0]
        .message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("gone.sh"), "{message}");
}

#[tokio::test]
async fn a_run_asked_for_a_branch_records_the_commit_the_branch_points_at() {
    let e = served(false).await;
    let c = &e.controller;
    // The project's repository, on this machine.
    let repo = e.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "--quiet", "--initial-branch", "main"]);
    std::fs::write(repo.join("README"), "hello\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "one"]);
    let head = git(&["rev-parse", "HEAD"]);
    std::fs::write(
        e.dir.path().join("scripts/acme/flow/project.json"),
        format!(r#"{{"buildImage": "x", "repoUrl": "{}"}}"#, repo.display()),
    )
    .unwrap();
    c.ports.scripts.refresh().await.unwrap();
    c.set_presets(
        Arc::new(decap_scripts::source::Sources::new(&e.data)),
        Default::default(),
        Default::default(),
    );
    let id = request(c).await;
    let run = c.ports.runs.get(id).await.unwrap().unwrap();
    assert_eq!(run.commit.as_deref(), Some(head.as_str()));
    let v = c.pipeline_run(id).await.unwrap();
    assert_eq!(
        v.plan.stages[0].attempts[0].commit.as_deref(),
        Some(head.as_str()),
        "its stages build that commit"
    );
}

#[tokio::test]
async fn a_project_lists_its_builds_from_before_and_after_its_pipeline_as_runs() {
    let e = served(false).await;
    let c = &e.controller;
    let pipeline = e.dir.path().join("scripts/acme/flow/pipeline.json");
    // Two builds while the project has only build.sh …
    std::fs::remove_file(&pipeline).unwrap();
    c.ports.scripts.refresh().await.unwrap();
    let mut earlier = Vec::new();
    for branch in ["one", "two"] {
        let (runs, builds) = c
            .request_runs(&flow(), &[branch.to_owned()], Trigger::Api)
            .await
            .unwrap();
        assert_eq!(runs, [builds[0].id.0], "a build is its own run");
        earlier.push(builds[0].id.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // … then a run once it has a pipeline.
    std::fs::write(&pipeline, PIPELINE).unwrap();
    c.ports.scripts.refresh().await.unwrap();
    let id = request(c).await;
    until(c, id, "waiting").await;

    let ids = |views: &[RunView]| views.iter().map(|v| v.run.id).collect::<Vec<_>>();
    let (page, next) = c.pipeline_runs(&flow(), None, 2).await.unwrap();
    assert_eq!(
        ids(&page),
        [id, earlier[1]],
        "newest first, runs then builds"
    );
    assert!(!page[0].single && page[1].single);
    let (page, next) = c.pipeline_runs(&flow(), next.as_deref(), 2).await.unwrap();
    assert_eq!(ids(&page), [earlier[0]]);
    assert_eq!(next, None);
    // One at a time, the same.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = c
            .pipeline_runs(&flow(), cursor.as_deref(), 1)
            .await
            .unwrap();
        seen.extend(ids(&page));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, [id, earlier[1], earlier[0]]);
    // The per-stage figures count the pipeline's runs only.
    let (stats, _) = c.pipeline_stats(&flow(), None, 50).await.unwrap();
    assert_eq!(stats.runs, 1, "{stats:?}");

    // Without its pipeline again, the run is still one run (its stages
    // together), beside the builds from before.
    std::fs::remove_file(&pipeline).unwrap();
    c.ports.scripts.refresh().await.unwrap();
    let (page, next) = c.pipeline_runs(&flow(), None, 10).await.unwrap();
    assert_eq!(ids(&page), [id, earlier[1], earlier[0]]);
    assert_eq!(next, None);
    assert_eq!(page[0].plan.stages.len(), 3, "{:?}", page[0].plan);
    assert_eq!(statuses(&page[0]), ["succeeded", "succeeded", "waiting"]);
    assert!(
        c.pipeline_runs(&flow(), Some("older.x."), 1).await.is_err(),
        "a bad cursor is an error"
    );
}
