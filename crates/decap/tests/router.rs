//! The HTTP surface through `Router::oneshot`, on the real embedded adapters:
//! every bad input gets its status and loses nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{SECRET, TOKEN, project, push_payload, sign};
use decap_server::{AuthConfig, Controller, Server};
use http_body_util_shim::collect;
use secrecy::SecretString;
use tower::ServiceExt;

mod http_body_util_shim {
    use axum::body::Body;
    pub async fn collect(body: Body) -> Vec<u8> {
        axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }
}

struct TestApp {
    router: Router,
    controller: Arc<Controller>,
    _dir: tempfile::TempDir,
}

async fn app_with(secrets: &[&str]) -> TestApp {
    app_with_auth(secrets, false).await
}

async fn app_with_auth(secrets: &[&str], private_reads: bool) -> TestApp {
    let e = common::app::embedded("http://decap.test", 1, |scripts| {
        project(
            scripts,
            "acme/widgets",
            r#"{"buildImage": "x", "managedRefRegex": "main|release/.*"}"#,
            "echo built\n",
        );
        project(
            scripts,
            "acme/broken",
            r#"{"buildImage": "x", "managedRefRegex": "("}"#,
            "true\n",
        );
    })
    .await;
    // Builds stay deferred: these tests look at the HTTP surface, not at runs.
    e.controller.set_queue_open(false).await.unwrap();
    let server = Server {
        hub: Some(e.hub()),
        details: Some(Arc::new(decap_embedded::FileDetailStore::new(
            e.data.join("details"),
        ))),
        ..e.server(AuthConfig {
            api_token: Some(SecretString::from(TOKEN)),
            insecure_local: false,
            webhook_secrets: secrets.iter().map(|s| SecretString::from(*s)).collect(),
            private_reads,
        })
    };
    TestApp {
        router: decap_server::router(Arc::new(server)),
        controller: e.controller,
        _dir: e.dir,
    }
}

async fn app() -> TestApp {
    app_with(&[SECRET]).await
}

async fn call(app: &TestApp, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = collect(resp.into_body()).await;
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A webhook as GitHub sends it (it always says its Content-Length).
fn hook(event: &str, delivery: &str, body: &[u8], signature: Option<String>) -> Request<Body> {
    let mut b = Request::post("/hooks/github")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("content-length", body.len());
    if let Some(sig) = signature {
        b = b.header("x-hub-signature-256", sig);
    }
    b.body(Body::from(body.to_vec())).unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn authed(method: &str, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap()
}

async fn history(app: &TestApp) -> usize {
    let (status, v) = call(app, get("/api/v1/builds/acme/widgets?limit=500")).await;
    assert_eq!(status, StatusCode::OK);
    v["builds"].as_array().unwrap().len()
}

const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";

#[tokio::test]
async fn a_signed_push_is_accepted_durably_and_builds_once() {
    let app = app().await;
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let (status, v) = call(&app, hook("push", "d-1", &body, Some(sign(SECRET, &body)))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ids = v["builds"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 1);
    assert_eq!(v["delivery"], "d-1");
    // recorded before the answer: the build is there at once
    let id = ids[0].as_str().unwrap();
    let (status, b) = call(&app, get(&format!("/api/v1/build/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            b["branch"].as_str(),
            b["commit"].as_str(),
            b["trigger"].as_str()
        ),
        (Some("main"), Some(SHA), Some("webhook"))
    );

    // a repeated delivery answers 200 with the first builds and starts nothing
    let (status, again) = call(&app, hook("push", "d-1", &body, Some(sign(SECRET, &body)))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["builds"].as_array().unwrap(), &ids);
    assert_eq!(history(&app).await, 1);
}

#[tokio::test]
async fn wrong_or_missing_signatures_are_refused_and_record_nothing() {
    let app = app().await;
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let (status, v) = call(
        &app,
        hook("push", "d-2", &body, Some(sign("wrong secret", &body))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(v["error"].as_str().unwrap().contains("signature"));
    let (status, _) = call(&app, hook("push", "d-2", &body, None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&app, hook("push", "d-2", &body, Some("sha256=zz".into()))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(history(&app).await, 0, "nothing recorded");
    // the delivery id was not burnt: the genuine delivery still builds
    let (status, _) = call(&app, hook("push", "d-2", &body, Some(sign(SECRET, &body)))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(history(&app).await, 1);
}

#[tokio::test]
async fn a_previous_secret_is_accepted_during_rotation() {
    let app = app_with(&["new-secret", "old-secret"]).await;
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let (status, _) = call(
        &app,
        hook("push", "d-rot", &body, Some(sign("old-secret", &body))),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn webhooks_without_a_configured_secret_are_refused() {
    let app = app_with(&[]).await;
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let (status, v) = call(&app, hook("push", "d-3", &body, Some(sign(SECRET, &body)))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("DECAP_GITHUB_WEBHOOK_SECRET")
    );
}

#[tokio::test]
async fn malformed_and_incomplete_webhooks_are_bad_requests() {
    let app = app().await;
    let junk = b"{not json";
    let (status, v) = call(&app, hook("push", "d-4", junk, Some(sign(SECRET, junk)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("malformed"));
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let missing_event = Request::post("/hooks/github")
        .header("x-github-delivery", "d-5")
        .header("x-hub-signature-256", sign(SECRET, &body))
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, v) = call(&app, missing_event).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("x-github-event"));
    let missing_delivery = Request::post("/hooks/github")
        .header("x-github-event", "push")
        .header("x-hub-signature-256", sign(SECRET, &body))
        .body(Body::from(body.clone()))
        .unwrap();
    assert_eq!(
        call(&app, missing_delivery).await.0,
        StatusCode::BAD_REQUEST
    );
    // names that could escape a path
    for (team, project, git_ref) in [
        ("acme", "../../etc", "refs/heads/main"),
        ("ac me", "widgets", "refs/heads/main"),
        ("acme", "widgets", "refs/heads/../../x"),
        ("acme", "widgets", "refs/heads/a b"),
    ] {
        let body = push_payload(team, project, git_ref, SHA);
        let (status, _) = call(
            &app,
            hook(
                "push",
                &format!("d-{team}-{project}-{git_ref}"),
                &body,
                Some(sign(SECRET, &body)),
            ),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{team}/{project} {git_ref}"
        );
    }
    assert_eq!(history(&app).await, 0);
}

#[tokio::test]
async fn bodies_over_25_mib_are_refused() {
    let app = app().await;
    let body = vec![b' '; 25 * 1024 * 1024 + 1];
    let resp = app
        .router
        .clone()
        .oneshot(hook("push", "d-big", &body, Some(sign(SECRET, &body))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The size is known before a byte of the body is read: one that never
    // arrives is refused just the same.
    let stalled = Request::post("/hooks/github")
        .header("x-github-event", "push")
        .header("x-github-delivery", "d-stalled")
        .header("x-hub-signature-256", sign(SECRET, b"{}"))
        .header("content-length", 30 * 1024 * 1024)
        .body(Body::from_stream(futures::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >()))
        .unwrap();
    let resp = app.router.clone().oneshot(stalled).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Without a Content-Length, nothing is read.
    let chunked = Request::post("/hooks/github")
        .header("x-github-event", "push")
        .header("x-github-delivery", "d-chunked")
        .header("x-hub-signature-256", sign(SECRET, b"{}"))
        .body(Body::from_stream(futures::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >()))
        .unwrap();
    let resp = app.router.clone().oneshot(chunked).await.unwrap();
    assert_eq!(resp.status(), StatusCode::LENGTH_REQUIRED);
}

#[tokio::test]
async fn ignored_deliveries_say_why() {
    let app = app().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("issues", br#"{"action": "opened"}"#.to_vec(), "not handled"),
        (
            "push",
            push_payload("acme", "widgets", "refs/heads/experiment", SHA),
            "managedRefRegex",
        ),
        (
            "push",
            push_payload("acme", "unknown", "refs/heads/main", SHA),
            "no project",
        ),
        (
            "push",
            push_payload("acme", "broken", "refs/heads/main", SHA),
            "cannot build",
        ),
        (
            "push",
            {
                let mut v: serde_json::Value = serde_json::from_slice(&push_payload(
                    "acme",
                    "widgets",
                    "refs/heads/main",
                    SHA,
                ))
                .unwrap();
                v["deleted"] = true.into();
                v["after"] = "0000000000000000000000000000000000000000".into();
                serde_json::to_vec(&v).unwrap()
            },
            "deleted",
        ),
    ];
    for (i, (event, body, why)) in cases.into_iter().enumerate() {
        let (status, v) = call(
            &app,
            hook(event, &format!("ign-{i}"), &body, Some(sign(SECRET, &body))),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{why}");
        assert!(v["builds"].as_array().unwrap().is_empty());
        assert!(v["ignored"].as_str().unwrap().contains(why), "{v}");
    }
    assert_eq!(history(&app).await, 0);
    let ping = br#"{"zen": "Keep it logically awesome."}"#;
    let (status, _) = call(&app, hook("ping", "ping-1", ping, Some(sign(SECRET, ping)))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn create_and_pull_request_events_build() {
    let app = app().await;
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/github");
    let mut create: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("create-payload.json")).unwrap())
            .unwrap();
    create["ref"] = "release/1.0".into();
    create["ref_type"] = "branch".into();
    create["repository"]["name"] = "widgets".into();
    create["repository"]["owner"]["login"] = "acme".into();
    let body = serde_json::to_vec(&create).unwrap();
    let (status, v) = call(
        &app,
        hook("create", "c-1", &body, Some(sign(SECRET, &body))),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["builds"].as_array().unwrap().len(), 1);

    let mut pr: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures.join("pull_request-opened.payload.json")).unwrap(),
    )
    .unwrap();
    pr["pull_request"]["base"]["repo"]["name"] = "widgets".into();
    pr["pull_request"]["base"]["repo"]["owner"]["login"] = "acme".into();
    let body = serde_json::to_vec(&pr).unwrap();
    let (status, v) = call(
        &app,
        hook("pull_request", "pr-1", &body, Some(sign(SECRET, &body))),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let id = v["builds"][0].as_str().unwrap();
    let (_, b) = call(&app, get(&format!("/api/v1/build/{id}"))).await;
    assert_eq!(b["ref"], "refs/pull/2/head");
    assert_eq!(b["commit"], "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
    assert_eq!(b["fromFork"], false, "head and base are one repository");

    // From a fork: built, with no secrets.
    pr["pull_request"]["head"]["repo"]["full_name"] = "someone/Hello-World".into();
    pr["pull_request"]["head"]["sha"] = "aaaaaaa57ca3a959ca5aad62de7213c562f8c821".into();
    let body = serde_json::to_vec(&pr).unwrap();
    let (status, v) = call(
        &app,
        hook("pull_request", "pr-fork", &body, Some(sign(SECRET, &body))),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let fork = v["builds"][0].as_str().unwrap().to_owned();
    let (_, b) = call(&app, get(&format!("/api/v1/build/{fork}"))).await;
    assert_eq!(b["fromFork"], true);
    let (_, rerun) = call(&app, authed("POST", &format!("/api/v1/build/{fork}/rerun"))).await;
    assert_eq!(
        rerun["fromFork"], true,
        "a rerun of a fork's build is one too"
    );

    pr["action"] = "closed".into();
    let body = serde_json::to_vec(&pr).unwrap();
    let (_, v) = call(
        &app,
        hook("pull_request", "pr-2", &body, Some(sign(SECRET, &body))),
    )
    .await;
    assert!(v["builds"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_things_are_404_and_odd_names_400() {
    let app = app().await;
    let unknown = decap_core::build::BuildId::new();
    for path in [
        format!("/api/v1/build/{unknown}"),
        format!("/api/v1/logs/{unknown}"),
        format!("/api/v1/artifacts/{unknown}"),
        "/api/v1/builds/acme/nothing".to_owned(),
        "/api/v1/projects/acme/nothing/refs".to_owned(),
        "/api/v1/stats/acme/nothing".to_owned(),
        "/no/such/page".to_owned(),
    ] {
        let (status, v) = call(&app, get(&path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(v["error"].is_string(), "{path}: errors are JSON");
    }
    for path in [
        "/api/v1/build/not-a-uuid",
        "/api/v1/builds/acme/wid%20gets",
        "/api/v1/builds/..%2F..%2Fetc/x",
        "/api/v1/builds/acme/widgets?limit=abc",
        "/api/v1/builds/acme/widgets?limit=0",
        "/api/v1/builds/acme/widgets?status=done",
        "/api/v1/builds/acme/widgets?since=yesterday",
        "/api/v1/builds/acme/widgets?branch=../x",
        "/api/v1/builds/acme/widgets?cursor=garbage",
        "/api/v1/builds/acme/widgets?brnch=main",
        "/api/v1/stats/acme/widgets?last=0",
        "/api/v1/stats/acme/widgets?last=lots",
        "/api/v1/stats/acme/widgets?branch=../x",
        "/api/v1/stats/acme/widgets?limit=3",
    ] {
        let (status, v) = call(&app, get(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
    }
    let (status, v) = call(&app, get("/api/v1/builds/acme/widgets?limit=abc")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"].as_str().unwrap().contains("limit"),
        "the error names the parameter"
    );
    for (method, path) in [
        ("POST", "/api/v1/builds/acme/widgets?branch=../../etc"),
        ("POST", "/api/v1/builds/acme/widgets?branch=-rf"),
        ("DELETE", "/api/v1/locks?key=acme/../x/main"),
        ("DELETE", "/api/v1/locks?key=acme"),
    ] {
        let (status, _) = call(&app, authed(method, path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}");
    }
    let (status, _) = call(
        &app,
        authed("POST", "/api/v1/builds/acme/nothing?branch=main"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &app,
        authed("POST", "/api/v1/builds/acme/broken?branch=main"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an invalid project cannot build"
    );
    assert_eq!(history(&app).await, 0, "nothing is half-done on an error");
}

#[tokio::test]
async fn changes_need_the_token() {
    let app = app().await;
    let (status, v) = call(
        &app,
        Request::post("/api/v1/builds/acme/widgets?branch=main")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    let wrong = Request::post("/api/v1/builds/acme/widgets?branch=main")
        .header("authorization", "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let (status, v) = call(
        &app,
        authed(
            "POST",
            "/api/v1/builds/acme/widgets?branch=main&branch=feature/x",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        v["builds"].as_array().unwrap().len(),
        2,
        "manual builds take any ref"
    );
    assert_eq!(
        v["builds"][0]["status"], "deferred",
        "the queue is closed in these tests"
    );
    assert!(
        v["builds"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://decap.test/builds/")
    );
}

#[tokio::test]
async fn the_queue_lists_and_removes_deferred_builds_and_dedups_commits() {
    let app = app().await;
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let (_, first) = call(&app, hook("push", "q-1", &body, Some(sign(SECRET, &body)))).await;
    let (_, second) = call(&app, hook("push", "q-2", &body, Some(sign(SECRET, &body)))).await;
    let first_id = first["builds"][0].as_str().unwrap().to_owned();
    let second_id = second["builds"][0].as_str().unwrap().to_owned();
    // scheduling happens after the answer
    common::eventually("both deliveries scheduled", Duration::from_secs(5), || {
        let app = &app;
        let second_id = second_id.clone();
        async move {
            let (_, b) = call(app, get(&format!("/api/v1/build/{second_id}"))).await;
            (b["status"] != "queued").then_some(())
        }
    })
    .await;
    let (_, list) = call(&app, get("/api/v1/deferred")).await;
    let waiting: Vec<&str> = list["deferred"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        waiting,
        vec![first_id.as_str()],
        "the same commit never waits twice"
    );
    assert!(
        list["deferred"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("closed")
    );
    let (_, dup) = call(&app, get(&format!("/api/v1/build/{second_id}"))).await;
    assert_eq!(dup["status"], "cancelled");
    assert!(dup["message"].as_str().unwrap().contains(&first_id));

    let (status, _) = call(
        &app,
        authed("DELETE", &format!("/api/v1/deferred/{first_id}")),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = call(&app, get("/api/v1/deferred")).await;
    assert!(list["deferred"].as_array().unwrap().is_empty());
    let (status, _) = call(
        &app,
        authed("DELETE", &format!("/api/v1/deferred/{first_id}")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, b) = call(&app, get(&format!("/api/v1/build/{first_id}"))).await;
    assert_eq!(b["status"], "cancelled");
    let (status, _) = call(&app, authed("DELETE", &format!("/api/v1/build/{first_id}"))).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a finished build cannot be cancelled"
    );
}

#[tokio::test]
async fn queue_state_locks_and_health() {
    let app = app().await;
    let (_, q) = call(&app, get("/api/v1/queue")).await;
    assert_eq!(q["state"], "closed");
    let open = Request::put("/api/v1/queue")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"state": "open"}"#))
        .unwrap();
    assert_eq!(call(&app, open).await.0, StatusCode::OK);
    assert!(app.controller.queue_open().await);
    let bad = Request::put("/api/v1/queue")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"state": "ajar"}"#))
        .unwrap();
    assert_eq!(call(&app, bad).await.0, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &app,
        authed("DELETE", "/api/v1/locks?key=acme/widgets/main"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no such lock");
    let (_, locks) = call(&app, get("/api/v1/locks")).await;
    assert!(locks["locks"].as_array().unwrap().is_empty());
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/version",
        "/api/v1/teams",
        "/api/v1/projects?team=acme",
    ] {
        let resp = app.router.clone().oneshot(get(path)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let (_, projects) = call(&app, get("/api/v1/projects")).await;
    let broken = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project"] == "broken")
        .unwrap();
    assert!(
        broken["error"]
            .as_str()
            .unwrap()
            .contains("managedRefRegex")
    );
    let resp = app.router.clone().oneshot(get("/metrics")).await.unwrap();
    let text = String::from_utf8(collect(resp.into_body()).await).unwrap();
    for metric in [
        "decap_queue_depth",
        "decap_locks_held",
        "decap_webhook_duration_seconds",
        "decap_running_builds",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
}

async fn page(app: &TestApp, req: Request<Body>) -> (StatusCode, HeaderMapOf, String) {
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = collect(resp.into_body()).await;
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

type HeaderMapOf = axum::http::HeaderMap;

fn form(path: &str, body: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "decap.test");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn the_pages_render_and_escape_what_builds_and_names_carry() {
    let app = app().await;
    for path in [
        "/",
        "/projects",
        "/projects/acme/widgets",
        "/queue",
        "/login",
    ] {
        let (status, headers, html) = page(&app, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(html.contains("<title>"), "{path}");
        // every page names the version and commit serving it
        assert!(
            html.contains("<footer class=\"muted\">Decap test (test)</footer>"),
            "{path}"
        );
    }
    // the broken project shows its error
    let (_, _, projects) = page(&app, get("/projects")).await;
    assert!(projects.contains("Invalid:"), "{projects}");
    // a branch name with HTML in it is escaped wherever it shows
    app.controller
        .request_builds(
            &decap_core::names::ProjectKey::new("acme", "widgets").unwrap(),
            &["<b>x</b>".to_owned()],
            decap_core::build::Trigger::Manual,
        )
        .await
        .unwrap();
    for path in ["/", "/projects/acme/widgets", "/queue"] {
        let (_, _, html) = page(&app, get(path)).await;
        assert!(!html.contains("<b>x</b>"), "{path} must escape");
        assert!(
            html.contains("&#60;b&#62;x"),
            "{path} shows it as text: {html}"
        );
    }
    // assets are embedded
    let (status, headers, js) = page(&app, get("/assets/htmx-2.0.11.min.js")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
    assert!(js.contains("htmx"));
}

#[tokio::test]
async fn unknown_pages_are_friendly_and_actions_need_the_token_from_this_site() {
    let app = app().await;
    let browser = |path: &str| {
        Request::get(path)
            .header("accept", "text/html")
            .body(Body::empty())
            .unwrap()
    };
    for path in [
        "/builds/01a207a1-5040-7355-989f-9dabfedbee02",
        "/builds/not-an-id",
        "/projects/acme/nothing",
        "/no/such/page",
    ] {
        let (status, _, html) = page(&app, browser(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(html.contains("Not found"), "{path}: {html}");
    }
    // programs still get JSON
    let (status, v) = call(&app, get("/no/such/page")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());

    // no login: to the login page, nothing built
    let (status, headers, _) = page(
        &app,
        form("/ui/projects/acme/widgets/build", "branch=main", None),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/login");
    assert_eq!(history(&app).await, 0);
    // a wrong token does not log in
    let (status, headers, _) = page(&app, form("/login", "token=nope", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!headers.contains_key("set-cookie"));
    // the right one does, in an HttpOnly, SameSite cookie
    let (status, headers, _) = page(&app, form("/login", &format!("token={TOKEN}"), None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let jar = cookie.split(';').next().unwrap().to_owned();
    // another site's form is refused even with the cookie
    let mut cross = form("/ui/projects/acme/widgets/build", "branch=main", Some(&jar));
    cross
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let (status, _, _) = page(&app, cross).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(history(&app).await, 0);
    // this site's is done, and shows the build
    let (status, headers, _) = page(
        &app,
        form("/ui/projects/acme/widgets/build", "branch=main", Some(&jar)),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{headers:?}");
    assert!(
        headers["location"]
            .to_str()
            .unwrap()
            .starts_with("/builds/")
    );
    assert_eq!(history(&app).await, 1);
    // bad input is a clear page, not a crash
    let (status, _, html) = page(&app, form("/ui/locks/unlock", "key=acme/../x", Some(&jar))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("Not a lock key"));
    let (status, _, _) = page(&app, form("/ui/queue", "state=ajar", Some(&jar))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_private_server_lets_nothing_be_read_without_the_token() {
    let app = app_with_auth(&[SECRET], true).await;
    let browser = |path: &str, cookie: Option<&str>| {
        let mut b = Request::get(path).header("accept", "text/html");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(Body::empty()).unwrap()
    };
    for path in ["/", "/projects", "/queue", "/projects/acme/widgets"] {
        let (status, headers, _) = page(&app, browser(path, None)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(headers["location"], "/login", "{path}");
    }
    for path in [
        "/api/v1/projects",
        "/api/v1/builds/acme/widgets",
        "/api/v1/deferred",
    ] {
        let (status, v) = call(&app, get(path)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(v["error"].as_str().unwrap().contains("token"), "{path}");
        let (status, _) = call(&app, authed("GET", path)).await;
        assert_eq!(status, StatusCode::OK, "{path} with the bearer token");
    }
    for path in ["/login", "/healthz", "/assets/decap.css"] {
        let (status, _, _) = page(&app, browser(path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path} stays open");
    }
    let (_, headers, _) = page(&app, form("/login", &format!("token={TOKEN}"), None)).await;
    let jar = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (status, _, html) = page(&app, browser("/", Some(&jar))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Dashboard"));
}

fn hub_form(path: &str, fields: &[(&str, &str)]) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(serde_urlencoded::to_string(fields).unwrap()))
        .unwrap()
}

const REPO: &str = "git@github.com:acme/pipeline.git";

fn report<'a>(name: &'a str, revision: &'a str, status: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("token", TOKEN),
        ("name", name),
        ("repository", REPO),
        ("revision", revision),
        ("status_url", "https://ci.example.com/builds/1"),
        ("status", status),
    ]
}

#[tokio::test]
async fn other_ci_servers_report_builds_and_the_hub_derives_pending_and_fixed() {
    let app = app().await;
    for (name, rev, status) in [
        ("tests", "aaaa01", "building"),
        ("tests", "aaaa01", "failed"),
        ("deploy", "aaaa01", "successful"),
        ("tests", "bbbb02", "successful"),
    ] {
        let (code, v) = call(
            &app,
            hub_form("/api/build_status", &report(name, rev, status)),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{v}");
        assert_eq!(v["project"], "pipeline");
    }
    // JSON with a bearer token works too.
    let req = Request::post("/api/build_status")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(
            serde_json::json!({"name": "tests", "repository": REPO, "revision": "CCCC03",
                "status": "building", "status_url": "https://ci.example.com/builds/3"})
            .to_string(),
        ))
        .unwrap();
    let (code, v) = call(&app, req).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["revision"], "cccc03", "revisions are kept in lower case");

    let (code, v) = call(&app, get("/api/v1/hub")).await;
    assert_eq!(code, StatusCode::OK);
    let p = &v["projects"][0];
    assert_eq!(p["name"], "pipeline");
    let rows: Vec<(String, Vec<(String, String)>)> = p["latestRevisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["hash"].as_str().unwrap().to_owned(),
                r["builds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| {
                        (
                            b["name"].as_str().unwrap().to_owned(),
                            b["status"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let row = |h: &str, d: &str, t: &str| {
        (
            h.to_owned(),
            vec![
                ("deploy".to_owned(), d.to_owned()),
                ("tests".to_owned(), t.to_owned()),
            ],
        )
    };
    assert_eq!(
        rows,
        vec![
            row("cccc03", "pending", "building"),
            row("bbbb02", "pending", "fixed"),
            row("aaaa01", "successful", "failed"),
        ]
    );
    assert_eq!(
        p["latestRevisions"][0]["builds"][1]["statusUrl"],
        "https://ci.example.com/builds/3"
    );
    // The dashboard shows them beside Decap's own builds.
    let resp = app.router.clone().oneshot(get("/")).await.unwrap();
    let html = String::from_utf8(collect(resp.into_body()).await).unwrap();
    assert!(html.contains("Other CI servers"), "{html}");
    assert!(
        html.contains(r#"<code title="bbbb02">bbbb02</code>"#),
        "{html}"
    );
    assert!(html.contains("hub h-fixed"), "{html}");
    assert!(
        html.contains("(successful where the revision before failed)"),
        "the boxes' legend: {html}"
    );
    assert!(
        html.contains(r#"href="https://ci.example.com/builds/3""#),
        "{html}"
    );
}

#[tokio::test]
async fn bad_build_status_reports_are_refused_and_record_nothing() {
    let app = app().await;
    let mut wrong = report("tests", "aaaa01", "failed");
    wrong[0] = ("token", "not-the-token");
    type Case<'a> = (Vec<(&'a str, &'a str)>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (wrong, StatusCode::UNAUTHORIZED, "token"),
        (
            report("tests", "aaaa01", "failed")[1..].to_vec(),
            StatusCode::UNAUTHORIZED,
            "token",
        ),
        (
            report("tests", "aaaa01", "passed"),
            StatusCode::BAD_REQUEST,
            "building, successful, failed",
        ),
        (
            report("tests", "not-hex", "failed"),
            StatusCode::BAD_REQUEST,
            "revision",
        ),
        (
            report("", "aaaa01", "failed"),
            StatusCode::BAD_REQUEST,
            "name is required",
        ),
        (
            {
                let mut r = report("tests", "aaaa01", "failed");
                r[4] = ("status_url", "javascript:alert(1)");
                r
            },
            StatusCode::BAD_REQUEST,
            "status_url",
        ),
        (
            {
                let mut r = report("tests", "aaaa01", "failed");
                r[2] = ("repository", "git@github.com:acme/..");
                r
            },
            StatusCode::BAD_REQUEST,
            "repository",
        ),
    ];
    for (fields, want, says) in cases {
        let (code, v) = call(&app, hub_form("/api/build_status", &fields)).await;
        assert_eq!(code, want, "{fields:?}: {v}");
        assert!(
            v.to_string().contains(says),
            "{fields:?}: {v} should mention {says:?}"
        );
    }
    let req = Request::post("/api/build_status")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from("{not json"))
        .unwrap();
    assert_eq!(call(&app, req).await.0, StatusCode::BAD_REQUEST);
    let (_, v) = call(&app, get("/api/v1/hub")).await;
    assert_eq!(v["projects"], serde_json::json!([]), "nothing was recorded");
}

#[tokio::test]
async fn projects_are_removed_by_name_and_unknown_ones_are_404() {
    let app = app().await;
    call(
        &app,
        hub_form("/api/build_status", &report("tests", "aaaa01", "failed")),
    )
    .await;
    let del = |path: &str| Request::delete(path).body(Body::empty()).unwrap();
    assert_eq!(
        call(&app, del("/api/projects/pipeline")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A token in the URL is refused, right or wrong: URLs end up in logs.
    for token in ["wrong", TOKEN] {
        let (status, v) = call(&app, del(&format!("/api/projects/pipeline?token={token}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{v}"
        );
    }
    let (_, v) = call(&app, get("/api/v1/hub")).await;
    assert_eq!(v["projects"][0]["name"], "pipeline", "still there");
    let path = "/api/projects/pipeline";
    assert_eq!(call(&app, authed("DELETE", path)).await.0, StatusCode::OK);
    assert_eq!(
        call(&app, authed("DELETE", path)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, authed("DELETE", "/api/projects/..")).await.0,
        StatusCode::BAD_REQUEST
    );
    let (_, v) = call(&app, get("/api/v1/hub")).await;
    assert_eq!(v["projects"], serde_json::json!([]));
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let app = app().await;
    let mut refused = authed("PUT", "/api/v1/queue");
    refused.headers_mut().remove("authorization");
    let browser = |path: &str| {
        Request::get(path)
            .header("accept", "text/html")
            .body(Body::empty())
            .unwrap()
    };
    for (what, req) in [
        ("a page", get("/")),
        ("the login page", get("/login")),
        ("a project", get("/projects/acme/widgets")),
        ("the queue", get("/queue")),
        ("a missing page", browser("/no/such/page")),
        ("JSON", get("/api/v1/version")),
        ("a JSON error", get("/no/such/page")),
        ("a refusal", refused),
        ("a script", get("/assets/decap.js")),
        ("health", get("/healthz")),
    ] {
        let (_, headers, _) = page(&app, req).await;
        assert_eq!(
            headers["content-security-policy"],
            decap_server::CONTENT_SECURITY_POLICY,
            "{what}"
        );
        assert_eq!(headers["x-frame-options"], "DENY", "{what}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(headers["referrer-policy"], "same-origin", "{what}");
    }
    // The policy forbids inline code and styles: the pages have none, and
    // htmx is told not to add its own style element.
    for path in [
        "/",
        "/projects",
        "/projects/acme/widgets",
        "/queue",
        "/login",
    ] {
        let (_, _, html) = page(&app, get(path)).await;
        let lower = html.to_ascii_lowercase();
        assert!(!lower.contains("<style"), "{path}");
        assert!(!lower.contains(" style="), "{path}");
        assert!(!lower.contains("javascript:"), "{path}");
        for script in lower.split("<script").skip(1) {
            assert!(
                script.trim_start().starts_with("src="),
                "{path}: inline script"
            );
        }
        let handler = lower.split(" on").skip(1).find(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(handler.is_none(), "{path}: an event handler attribute");
        assert!(
            html.contains(r#""includeIndicatorStyles": false"#),
            "{path}"
        );
    }
    // A detail file keeps its own, stricter policy.
    let file = format!("/api/v1/details/acme/widgets/{SHA}/report.txt");
    let mut put = authed("PUT", &file);
    *put.body_mut() = Body::from("<script>alert(1)</script>");
    assert_eq!(call(&app, put).await.0, StatusCode::CREATED);
    let (status, headers, _) = page(
        &app,
        get(&format!("/details/acme/widgets/{SHA}/report.txt")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["content-security-policy"],
        "sandbox; default-src 'none'"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
}

#[tokio::test]
async fn the_login_cookie_holds_a_session_id_never_the_token() {
    let app = app().await;
    let (status, headers, _) = page(&app, form("/login", &format!("token={TOKEN}"), None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set: Vec<&str> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(set.iter().all(|c| !c.contains(TOKEN)), "{set:?}");
    let session = set
        .iter()
        .find(|c| c.starts_with("decap_session="))
        .unwrap();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let jar = session.split(';').next().unwrap().to_owned();
    let id = jar.split_once('=').unwrap().1;
    assert!(
        id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let build = |cookie: &str| {
        form(
            "/ui/projects/acme/widgets/build",
            "branch=main",
            Some(cookie),
        )
    };

    // The session acts.
    let (status, headers, _) = page(&app, build(&jar)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers["location"]
            .to_str()
            .unwrap()
            .starts_with("/builds/")
    );
    assert_eq!(history(&app).await, 1);
    // A forged id does not, nor does the token itself in the old cookie.
    for forged in [
        format!("decap_session={}", "0".repeat(64)),
        format!("decap_session={TOKEN}"),
        format!("decap_token={TOKEN}"),
    ] {
        let (status, headers, _) = page(&app, build(&forged)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{forged}");
        assert_eq!(headers["location"], "/login", "{forged}");
    }
    assert_eq!(history(&app).await, 1);

    // Logging out ends the session here, not only in the browser.
    let (status, headers, _) = page(&app, form("/logout", "", Some(&jar))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers
            .get_all("set-cookie")
            .iter()
            .any(|c| c.to_str().unwrap().starts_with("decap_session=;")),
        "{headers:?}"
    );
    let (status, headers, _) = page(&app, build(&jar)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/login", "the old cookie is dead");
    assert_eq!(history(&app).await, 1);
}

#[tokio::test]
async fn the_build_lock_names_the_revision_holding_it() {
    let app = app().await;
    let lock = |path: &'static str, rev: &'static str| {
        hub_form(
            path,
            &[
                ("token", TOKEN),
                ("name", "deploy"),
                ("repository", REPO),
                ("revision", rev),
            ],
        )
    };
    let (code, v) = call(&app, lock("/api/build/lock", "aaaa01")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["locked_by_revision"], "aaaa01");
    let (_, v) = call(&app, lock("/api/build/lock", "bbbb02")).await;
    assert_eq!(v["locked_by_revision"], "aaaa01", "held by the first");
    let (_, v) = call(&app, lock("/api/build/unlock", "bbbb02")).await;
    assert_eq!(v["unlocked"], false, "only the holder unlocks");
    let (_, v) = call(&app, lock("/api/build/unlock", "aaaa01")).await;
    assert_eq!(v["unlocked"], true);
    let (_, v) = call(&app, lock("/api/build/lock", "bbbb02")).await;
    assert_eq!(v["locked_by_revision"], "bbbb02");
    let no_token = hub_form(
        "/api/build/lock",
        &[
            ("name", "deploy"),
            ("repository", REPO),
            ("revision", "cccc03"),
        ],
    );
    assert_eq!(call(&app, no_token).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn detail_files_are_uploaded_with_the_token_and_read_by_link() {
    let app = app().await;
    let put = |path: &str, auth: bool, days: Option<&str>| {
        let mut b = Request::put(path);
        if auth {
            b = b.header("authorization", format!("Bearer {TOKEN}"));
        }
        if let Some(d) = days {
            b = b.header("x-decap-expire-days", d);
        }
        b.body(Body::from("<script>alert(1)</script>\n")).unwrap()
    };
    let path = "/api/v1/details/acme/widgets/cafe0001/logs/run.log";
    assert_eq!(
        call(&app, put(path, false, None)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, put(path, true, Some("400"))).await.0,
        StatusCode::BAD_REQUEST
    );
    let (code, v) = call(&app, put(path, true, Some("3"))).await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert!(
        v["url"]
            .as_str()
            .unwrap()
            .ends_with("/details/acme/widgets/cafe0001/logs/run.log"),
        "{v}"
    );
    for bad in [
        "/api/v1/details/acme/widgets/cafe0001/..%2F..%2Fetc/passwd",
        "/api/v1/details/acme/widgets/not-a-commit/x.log",
        "/api/v1/details/acme/widgets/cafe0001/.decap-expires",
    ] {
        assert_eq!(
            call(&app, put(bad, true, None)).await.0,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    let resp = app
        .router
        .clone()
        .oneshot(get("/details/acme/widgets/cafe0001/logs/run.log"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert!(
        resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox")
    );
    assert_eq!(
        collect(resp.into_body()).await,
        b"<script>alert(1)</script>\n"
    );
    assert_eq!(
        call(&app, get("/details/acme/widgets/cafe0001/nope.log"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_stopping_server_is_alive_but_not_ready_and_launches_nothing() {
    let app = app().await;
    app.controller.begin_stop();
    let ready = app.router.clone().oneshot(get("/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let alive = app.router.clone().oneshot(get("/healthz")).await.unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
    // What arrives now waits on the queue for the next process.
    let b = app
        .controller
        .request_builds(
            &decap_core::names::ProjectKey::new("acme", "widgets").unwrap(),
            &["main".to_owned()],
            decap_core::build::Trigger::Manual,
        )
        .await
        .unwrap();
    assert_eq!(b[0].status, decap_core::build::BuildStatus::Deferred);
    assert_eq!(b[0].message.as_deref(), Some("Decap is restarting"));
}
