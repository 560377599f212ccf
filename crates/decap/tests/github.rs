//! Commit statuses back on GitHub, against a local stub of GitHub's API that
//! records each request (method, path, headers, body) and answers as GitHub
//! does, rate limit included.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{Decap, project, push_payload};

const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";
const GITHUB_TOKEN: &str = "ghp_decaptesttoken";

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    if_none_match: String,
    authorization: String,
    user_agent: String,
    body: serde_json::Value,
    answered: u16,
}

#[derive(Clone, Default)]
struct Stub {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Rate-limited answers still to give.
    limited: Arc<Mutex<u32>>,
    /// Webhooks created.
    hooks: Arc<Mutex<u32>>,
    /// The URL of the webhook that exists.
    hook_url: Arc<Mutex<String>>,
}

async fn github(
    State(stub): State<Stub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let limited = {
        let mut left = stub.limited.lock().unwrap();
        let now = *left > 0;
        if now {
            *left -= 1;
        }
        now
    };
    let (status, answer) = if limited {
        (
            StatusCode::FORBIDDEN,
            (
                StatusCode::FORBIDDEN,
                [("retry-after", "1"), ("x-ratelimit-remaining", "0")],
                r#"{"message":"API rate limit exceeded","documentation_url":"https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting"}"#,
            )
                .into_response(),
        )
    } else {
        let path = uri.path().to_owned();
        let ok = method == Method::POST && path.starts_with("/repos/acme/widgets/statuses/");
        let comment_post = method == Method::POST
            && path.starts_with("/repos/acme/widgets/issues/")
            && path.ends_with("/comments");
        let comment_edit =
            method == Method::PATCH && path == "/repos/acme/widgets/issues/comments/4242";
        let hooks = "/repos/acme/widgets/hooks".to_owned();
        if path == "/login/oauth/access_token" && method == Method::POST {
            let form: std::collections::HashMap<String, String> =
                serde_urlencoded::from_bytes(&body).unwrap_or_default();
            let ok = form.get("client_id").map(String::as_str) == Some("decap-client")
                && form.get("client_secret").map(String::as_str) == Some("oauth-secret");
            let token = match form.get("code").map(String::as_str) {
                Some("bob-code") if ok => Some("gho_bob"),
                Some("rita-code") if ok => Some("gho_rita"),
                _ => None,
            };
            let answer = match token {
                Some(t) => {
                    serde_json::json!({"access_token": t, "token_type": "bearer", "scope": "read:user"})
                }
                None => serde_json::json!({"error": "bad_verification_code",
                    "error_description": "The code passed is incorrect or expired."}),
            };
            stub.seen.lock().unwrap().push(Seen {
                method: method.clone(),
                path: path.clone(),
                if_none_match: String::new(),
                authorization: String::new(),
                user_agent: header("user-agent"),
                body: serde_json::to_value(&form).unwrap_or_default(),
                answered: 200,
            });
            return axum::Json(answer).into_response();
        }
        if path == "/user" && method == Method::GET {
            let login = match header("authorization").as_str() {
                "Bearer gho_bob" => "Builder-Bob",
                "Bearer gho_rita" => "reader-rita",
                _ => {
                    return (StatusCode::UNAUTHORIZED, r#"{"message":"Bad credentials"}"#)
                        .into_response();
                }
            };
            return axum::Json(serde_json::json!({"login": login, "id": 1})).into_response();
        }
        if let Some(sha) = path
            .strip_prefix("/repos/acme/widgets/commits/")
            .and_then(|p| p.strip_suffix("/pulls"))
            && method == Method::GET
        {
            let code = StatusCode::OK;
            let pulls = if sha.starts_with("cafe") {
                serde_json::json!([
                    {"number": 3, "state": "closed", "head": {"sha": sha}},
                    {"number": 7, "state": "open", "head": {"sha": sha}}
                ])
            } else {
                serde_json::json!([])
            };
            let resp = (code, axum::Json(pulls)).into_response();
            stub.seen.lock().unwrap().push(Seen {
                method,
                path: uri.path().to_owned(),
                if_none_match: String::new(),
                authorization: header("authorization"),
                user_agent: header("user-agent"),
                body: serde_json::Value::Null,
                answered: 200,
            });
            return resp;
        }
        let page = uri.query().unwrap_or("").contains("page=2");
        let listing = match (path.as_str(), page) {
            ("/repos/acme/widgets/branches", false) => Some((
                "\"b1\"",
                serde_json::json!([{"name": "main"}, {"name": "feature/x"}]),
                true,
            )),
            ("/repos/acme/widgets/branches", true) => Some((
                "\"b2\"",
                serde_json::json!([{"name": "release/1.0"}]),
                false,
            )),
            ("/repos/acme/widgets/tags", _) => {
                Some(("\"t1\"", serde_json::json!([{"name": "v1.0"}]), false))
            }
            _ => None,
        };
        if let (Some((etag, items, more)), true) = (listing, method == Method::GET) {
            if header("if-none-match") == etag {
                let code = StatusCode::NOT_MODIFIED;
                (code, (code, [("etag", etag)]).into_response())
            } else {
                let code = StatusCode::OK;
                let next = format!(
                    "<http://{}{path}?per_page=100&page=2>; rel=\"next\"",
                    header("host")
                );
                let mut resp = (code, [("etag", etag)], axum::Json(items)).into_response();
                if more {
                    resp.headers_mut().insert("link", next.parse().unwrap());
                }
                (code, resp)
            }
        } else if path == "/app/installations/99/access_tokens" && method == Method::POST {
            let code = StatusCode::CREATED;
            let answer = serde_json::json!({"token": "ghs_installationtoken",
                "expires_at": "2099-01-01T00:00:00Z", "permissions": {"statuses": "write"}});
            (code, (code, axum::Json(answer)).into_response())
        } else if path == hooks && method == Method::POST {
            let first = {
                let mut n = stub.hooks.lock().unwrap();
                *n += 1;
                *n == 1
            };
            if first {
                let code = StatusCode::CREATED;
                (
                    code,
                    (
                        code,
                        axum::Json(serde_json::json!({"id": 77, "active": true})),
                    )
                        .into_response(),
                )
            } else {
                let code = StatusCode::UNPROCESSABLE_ENTITY;
                let answer = serde_json::json!({"message": "Validation Failed",
                    "errors": [{"resource": "Hook", "code": "custom", "message": "Hook already exists on this repository"}]});
                (code, (code, axum::Json(answer)).into_response())
            }
        } else if path == hooks && method == Method::GET {
            let url = stub.hook_url.lock().unwrap().clone();
            let code = StatusCode::OK;
            let answer = serde_json::json!([{"id": 12, "config": {"url": "https://elsewhere.example.com/hook"}},
                {"id": 77, "config": {"url": url, "content_type": "json"}}]);
            (code, (code, axum::Json(answer)).into_response())
        } else if path == format!("{hooks}/77") && method == Method::PATCH {
            let code = StatusCode::OK;
            (
                code,
                (code, axum::Json(serde_json::json!({"id": 77}))).into_response(),
            )
        } else if comment_post || comment_edit {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = if comment_post {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let answer = serde_json::json!({
                "id": 4242, "body": v["body"],
                "html_url": "https://github.com/acme/widgets/pull/2#issuecomment-4242"
            });
            (code, (code, axum::Json(answer)).into_response())
        } else if ok {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let created = serde_json::json!({
                "id": 1, "state": v["state"], "context": v["context"],
                "target_url": v["target_url"], "description": v["description"],
                "url": format!("https://api.github.com{path}")
            });
            (
                StatusCode::CREATED,
                (StatusCode::CREATED, axum::Json(created)).into_response(),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                (StatusCode::NOT_FOUND, r#"{"message":"Not Found"}"#).into_response(),
            )
        }
    };
    stub.seen.lock().unwrap().push(Seen {
        method,
        path: uri.path().to_owned(),
        if_none_match: header("if-none-match"),
        authorization: header("authorization"),
        user_agent: header("user-agent"),
        body: serde_json::from_slice(&body).unwrap_or_default(),
        answered: status.as_u16(),
    });
    answer
}

/// A GitHub stub, and build scripts holding `acme/widgets`.
async fn setup(
    descriptor: &str,
    script: &str,
) -> (Stub, String, tempfile::TempDir, std::path::PathBuf) {
    let stub = Stub::default();
    let github_url = start_stub(stub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(&scripts, "acme/widgets", descriptor, script);
    (stub, github_url, dir, scripts)
}

async fn start_stub(stub: Stub) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(github).with_state(stub);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn told(stub: &Stub) -> Vec<(String, String)> {
    stub.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.answered == 201)
        .map(|s| {
            (
                s.body["context"].as_str().unwrap_or("").to_owned(),
                s.body["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_push_build_reports_pending_then_success_once_each_even_across_a_restart() {
    let (stub, github_url, dir, scripts) = setup(
        r#"{"buildImage": "x", "managedRefRegex": "main"}"#,
        "echo built\n",
    )
    .await;
    *stub.limited.lock().unwrap() = 1; // the first call meets the rate limit
    let args = [
        "--github-token",
        GITHUB_TOKEN,
        "--github-api-url",
        &github_url,
    ];
    let data = dir.path().join("data");
    let mut decap = Decap::start(&data, &scripts, &args);
    let api = decap.api();
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let answer = api.webhook("push", "delivery-1", &body).await;
    assert_eq!(answer.status(), 202);
    let v: serde_json::Value = answer.json().await.unwrap();
    let id = v["builds"][0]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v["builds"][0]["id"].as_str().unwrap().to_owned());
    let expected = vec![
        ("decap/acme/widgets".to_owned(), "pending".to_owned()),
        ("decap/all".to_owned(), "pending".to_owned()),
        ("decap/acme/widgets".to_owned(), "success".to_owned()),
        ("decap/all".to_owned(), "success".to_owned()),
    ];
    for _ in 0..300 {
        if told(&stub).len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let build = api.build(&id).await;
    let seen_so_far = stub.seen.lock().unwrap().clone();
    assert!(
        told(&stub).len() >= 4,
        "GitHub was told: {seen_so_far:#?}; the build: {build}"
    );
    assert_eq!(told(&stub), expected, "each state once, in order");

    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(seen[0].answered, 403, "the rate limit was met first");
    assert_eq!(seen.len(), 5, "and waited out once: {seen:#?}");
    for s in &seen {
        assert_eq!(s.method, Method::POST);
        assert_eq!(s.path, format!("/repos/acme/widgets/statuses/{SHA}"));
        assert!(
            s.authorization.contains(GITHUB_TOKEN),
            "{}",
            s.authorization
        );
        assert!(!s.user_agent.is_empty());
    }
    let success = seen.last().unwrap();
    assert_eq!(
        success.body["target_url"],
        format!("{}/builds/{id}", decap.url)
    );
    assert!(
        success.body["description"]
            .as_str()
            .unwrap()
            .contains("1 of 1"),
        "{}",
        success.body
    );

    // A restart tells GitHub nothing it was told already.
    decap.kill();
    let decap = Decap::start(&data, &scripts, &args);
    decap.api().json("/api/v1/version").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stub.seen.lock().unwrap().len(), 5, "nothing sent twice");
}

#[tokio::test]
async fn each_stage_of_a_pipeline_gets_its_status_and_the_aggregate_waits_for_the_last() {
    let (stub, github_url, dir, scripts) = setup(
        r#"{"buildImage": "x", "managedRefRegex": "main"}"#,
        "echo built\n",
    )
    .await;
    std::fs::write(
        scripts.join("acme/widgets/pipeline.json"),
        r#"{"stages": [{"name": "build", "script": "build.sh"}, {"name": "test", "script": "test.sh"}]}"#,
    )
    .unwrap();
    std::fs::write(scripts.join("acme/widgets/test.sh"), "sleep 1\n").unwrap();
    let args = [
        "--github-token",
        GITHUB_TOKEN,
        "--github-api-url",
        &github_url,
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    let api = decap.api();
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let answer = api.webhook("push", "delivery-stages", &body).await;
    assert_eq!(answer.status(), 202);
    let v: serde_json::Value = answer.json().await.unwrap();
    assert!(v["pipelineRun"].is_string(), "{v}");
    let done = |t: &[(String, String)]| t.iter().any(|(c, s)| c == "decap/all" && s == "success");
    for _ in 0..300 {
        if done(&told(&stub)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = told(&stub);
    let at = |context: &str, state: &str| {
        t.iter()
            .position(|(c, s)| c == context && s == state)
            .unwrap_or_else(|| panic!("{context} {state} was never told: {t:#?}"))
    };
    at("decap/acme/widgets/build", "pending");
    let built = at("decap/acme/widgets/build", "success");
    let tested = at("decap/acme/widgets/test", "success");
    let all = at("decap/all", "success");
    assert!(built < tested && tested < all, "{t:#?}");
    assert_eq!(
        t.iter()
            .filter(|(c, s)| c == "decap/all" && s == "success")
            .count(),
        1,
        "green once, after the last stage: {t:#?}"
    );
    assert!(
        !t.iter().any(|(c, _)| c == "decap/acme/widgets"),
        "a pipeline's statuses are per stage: {t:#?}"
    );
}

fn pr_payload(action: &str, head: &str) -> Vec<u8> {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/github");
    let mut pr: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures.join("pull_request-opened.payload.json")).unwrap(),
    )
    .unwrap();
    pr["action"] = action.into();
    pr["number"] = 2.into();
    pr["pull_request"]["number"] = 2.into();
    pr["pull_request"]["head"]["sha"] = head.into();
    pr["pull_request"]["base"]["repo"]["name"] = "widgets".into();
    pr["pull_request"]["base"]["repo"]["owner"]["login"] = "acme".into();
    pr["repository"]["name"] = "widgets".into();
    pr["repository"]["owner"]["login"] = "acme".into();
    serde_json::to_vec(&pr).unwrap()
}

fn comment_calls(stub: &Stub) -> Vec<Seen> {
    stub.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.contains("/issues/"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_pull_request_gets_one_comment_with_the_failing_tail_edited_in_place_by_later_builds() {
    let (stub, github_url, dir, scripts) = setup(r#"{"buildImage": "x"}"#, "echo compiling\ncase \"$COMMIT_SHA\" in\n  aaaa*) echo \"error: it broke\"; exit 3;;\nesac\necho all good\n").await;
    let args = [
        "--github-token",
        GITHUB_TOKEN,
        "--github-api-url",
        &github_url,
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    let api = decap.api();
    let failing = "aaaa000000000000000000000000000000000001";
    let answer = api
        .webhook("pull_request", "pr-open", &pr_payload("opened", failing))
        .await;
    assert_eq!(answer.status(), 202);
    let v: serde_json::Value = answer.json().await.unwrap();
    let first = v["builds"][0].as_str().unwrap().to_owned();
    let b = api.finished(&first, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "failed", "{b}");
    common::eventually("the comment", Duration::from_secs(30), || {
        let n = comment_calls(&stub).len();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let calls = comment_calls(&stub);
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let posted = &calls[0];
    assert_eq!(posted.method, Method::POST);
    assert_eq!(posted.path, "/repos/acme/widgets/issues/2/comments");
    assert!(posted.authorization.contains(GITHUB_TOKEN));
    let body = posted.body["body"].as_str().unwrap();
    assert!(body.contains("<!-- decap:acme/widgets -->"), "{body}");
    assert!(body.contains("acme/widgets failed"), "{body}");
    assert!(body.contains("exit code 3"), "{body}");
    assert!(body.contains("error: it broke"), "the failing tail: {body}");
    assert!(
        body.contains(&format!("{}/api/v1/logs/{first}", decap.url)),
        "{body}"
    );
    assert!(
        body.contains(&format!("{}/api/v1/artifacts/{first}", decap.url)),
        "{body}"
    );

    // A new head: the same comment is edited, not a second one posted.
    let fixed = "bbbb000000000000000000000000000000000002";
    let answer = api
        .webhook("pull_request", "pr-sync", &pr_payload("synchronize", fixed))
        .await;
    let v: serde_json::Value = answer.json().await.unwrap();
    let second = v["builds"][0].as_str().unwrap().to_owned();
    assert_eq!(
        api.finished(&second, Duration::from_secs(60)).await["status"],
        "succeeded"
    );
    common::eventually("the edit", Duration::from_secs(30), || {
        let n = comment_calls(&stub).len();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = comment_calls(&stub);
    assert_eq!(calls.len(), 2, "one post, one edit: {calls:#?}");
    assert_eq!(calls[1].method, Method::PATCH);
    assert_eq!(calls[1].path, "/repos/acme/widgets/issues/comments/4242");
    let body = calls[1].body["body"].as_str().unwrap();
    assert!(body.contains("acme/widgets succeeded"), "{body}");
    assert!(body.contains(&second), "{body}");
    assert!(!body.contains("error: it broke"), "{body}");

    // The pull request's commits got their statuses too.
    let expected = [
        (failing.to_owned(), "pending".to_owned()),
        (failing.to_owned(), "failure".to_owned()),
        (fixed.to_owned(), "pending".to_owned()),
        (fixed.to_owned(), "success".to_owned()),
    ];
    let statuses = || -> Vec<(String, String)> {
        stub.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.contains("/statuses/") && s.body["context"] == "decap/acme/widgets")
            .map(|s| {
                (
                    s.path.rsplit('/').next().unwrap().to_owned(),
                    s.body["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    for _ in 0..300 {
        if expected.iter().all(|e| statuses().contains(e)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let told = statuses();
    for e in &expected {
        assert!(told.contains(e), "{e:?} in {told:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decapctl_subscribes_a_repository_and_the_ping_builds_its_default_branch() {
    let (stub, github_url, dir, scripts) = setup(
        r#"{"buildImage": "x", "managedRefRegex": "release/.*"}"#,
        "echo \"first build of $BRANCH_TO_BUILD\"\n",
    )
    .await;
    let args = [
        "--github-token",
        GITHUB_TOKEN,
        "--github-api-url",
        &github_url,
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    *stub.hook_url.lock().unwrap() = format!("{}/hooks/github", decap.url);
    let decapctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
            .args(args)
            .env("DECAP_URL", &decap.url)
            .env("DECAP_API_TOKEN", common::TOKEN)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = decapctl(&["github", "subscribe", "acme/widgets"]);
    assert!(ok, "{said}");
    assert!(said.contains("subscribed acme/widgets"), "{said}");
    let created = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.path == "/repos/acme/widgets/hooks")
        .cloned()
        .unwrap();
    assert_eq!(created.method, Method::POST);
    assert!(created.authorization.contains(GITHUB_TOKEN));
    assert_eq!(
        created.body["config"]["url"],
        format!("{}/hooks/github", decap.url)
    );
    assert_eq!(created.body["config"]["content_type"], "json");
    assert_eq!(created.body["config"]["secret"], common::SECRET);
    assert_eq!(
        created.body["events"],
        serde_json::json!(["push", "pull_request", "create"])
    );

    // Again: GitHub answers 422 (it exists); Decap finds it and updates it.
    let (ok, said) = decapctl(&["github", "subscribe", "acme/widgets"]);
    assert!(ok, "{said}");
    assert!(said.contains("already subscribed"), "{said}");
    assert!(
        stub.seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.method == Method::PATCH && s.path == "/repos/acme/widgets/hooks/77"),
        "the existing webhook was updated"
    );
    // The project page's button does the same for a logged-in user.
    let login = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/login", decap.url))
        .form(&[("token", common::TOKEN)])
        .send()
        .await
        .unwrap();
    let session = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .find(|c| c.starts_with("decap_session="))
        .unwrap();
    let page = |cookie: bool| {
        let api = decap.api();
        let session = session.clone();
        async move {
            let mut rb = api.http.get(format!("{}/projects/acme/widgets", api.base));
            if cookie {
                rb = rb.header("cookie", session);
            }
            rb.send().await.unwrap().text().await.unwrap()
        }
    };
    assert!(page(true).await.contains("Subscribe on GitHub"));
    assert!(!page(false).await.contains("Subscribe on GitHub"));
    let before = stub.seen.lock().unwrap().len();
    let r = decap
        .api()
        .http
        .post(format!("{}/ui/projects/acme/widgets/subscribe", decap.url))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(r.url().as_str().contains("subscribed=1"), "{}", r.url());
    assert!(stub.seen.lock().unwrap().len() > before, "GitHub was asked");

    let (ok, said) = decapctl(&["github", "subscribe", "not-a-repo"]);
    assert!(!ok && said.contains("owner/repo"), "{said}");

    // GitHub's ping builds the default branch, whatever managedRefRegex says.
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/github");
    let mut ping: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("ping-payload.json")).unwrap())
            .unwrap();
    ping["repository"]["name"] = "widgets".into();
    ping["repository"]["owner"]["login"] = "acme".into();
    ping["repository"]["default_branch"] = "main".into();
    let answer = decap
        .api()
        .webhook("ping", "ping-1", &serde_json::to_vec(&ping).unwrap())
        .await;
    assert_eq!(answer.status(), 202);
    let v: serde_json::Value = answer.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    let b = decap.api().finished(&id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["branch"], "main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_github_app_decap_trades_a_signed_jwt_for_an_installation_token_once() {
    let stub = Stub::default();
    let github_url = start_stub(stub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("app.pem");
    let made = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/widgets",
        r#"{"buildImage": "x"}"#,
        "echo built\n",
    );
    let args = [
        "--github-app-id",
        "12345",
        "--github-app-key-file",
        key.to_str().unwrap(),
        "--github-app-installation-id",
        "99",
        "--github-api-url",
        &github_url,
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    let api = decap.api();
    let body = push_payload("acme", "widgets", "refs/heads/main", SHA);
    let answer = api.webhook("push", "app-1", &body).await;
    let v: serde_json::Value = answer.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    api.finished(&id, Duration::from_secs(60)).await;
    common::eventually("the statuses", Duration::from_secs(30), || {
        let n = told(&stub).len();
        async move { (n >= 4).then_some(()) }
    })
    .await;
    let seen = stub.seen.lock().unwrap().clone();
    let tokens: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == "/app/installations/99/access_tokens")
        .collect();
    assert_eq!(tokens.len(), 1, "one installation token, reused: {seen:#?}");
    let jwt = tokens[0].authorization.trim_start_matches("Bearer ");
    assert_eq!(jwt.split('.').count(), 3, "a JWT: {jwt}");
    for s in seen.iter().filter(|s| s.path.contains("/statuses/")) {
        assert_eq!(s.authorization, "Bearer ghs_installationtoken");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_and_tags_come_from_github_and_are_asked_again_only_by_etag() {
    let (stub, github_url, dir, scripts) =
        setup(r#"{"buildImage": "x", "repoManager": "github"}"#, "true\n").await;
    let args = [
        "--github-token",
        GITHUB_TOKEN,
        "--github-api-url",
        &github_url,
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    let api = decap.api();
    let want = serde_json::json!([
        {"ref": "feature/x", "type": "branch"},
        {"ref": "main", "type": "branch"},
        {"ref": "release/1.0", "type": "branch"},
        {"ref": "v1.0", "type": "tag"},
    ]);
    let first = api.json("/api/v1/projects/acme/widgets/refs").await;
    assert_eq!(first["refs"], want, "every page of branches, and the tags");
    let listed = |stub: &Stub| -> Vec<Seen> {
        stub.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.ends_with("/branches") || s.path.ends_with("/tags"))
            .cloned()
            .collect()
    };
    let calls = listed(&stub);
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(
        calls
            .iter()
            .all(|c| c.if_none_match.is_empty() && c.answered == 200)
    );

    let again = api.json("/api/v1/projects/acme/widgets/refs").await;
    assert_eq!(again["refs"], want, "the same refs, from the cache");
    let calls = listed(&stub);
    assert_eq!(calls.len(), 6, "{calls:#?}");
    for c in &calls[3..] {
        assert!(!c.if_none_match.is_empty(), "asked by ETag: {c:?}");
        assert_eq!(c.answered, 304, "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_pr_uploads_details_that_expire_and_comments_on_the_open_pull_request() {
    let stub = Stub::default();
    let github_url = start_stub(stub.clone()).await;
    let s3 = common::aws::env("DECAP_TEST_S3_ENDPOINT");
    let sdk = common::aws::sdk().await;
    let admin = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(&s3)
            .force_path_style(true)
            .build(),
    );
    let bucket = format!("notify-{}", std::process::id());
    admin.create_bucket().bucket(&bucket).send().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let details = dir.path().join("details");
    std::fs::create_dir_all(details.join("sub")).unwrap();
    std::fs::write(details.join("sub/a.log"), "all 120 tests passed\n").unwrap();
    let extra = dir.path().join("b.txt");
    std::fs::write(&extra, "marvin\n").unwrap();
    let summary = dir.path().join("summary.txt");
    std::fs::write(&summary, "Simulator run: 120 passed, 0 failed\n").unwrap();
    let commit = "cafe000000000000000000000000000000000001";
    let ini = dir.path().join("notify.ini");
    std::fs::write(
        &ini,
        format!(
            "token = {GITHUB_TOKEN}\nowner = acme\nrepo = widgets\ncommit = {commit}\n\
             summary_file = {}\nfull_detail_dir = {}\nfull_detail_files = {}\n\
             store_api = s3\nstore_endpoint = {s3}\nstore_identity = decaptest\n\
             store_secret = decaptestsecret\nstore_bucket = {bucket}\nexpire_days = 9\n",
            summary.display(),
            details.display(),
            extra.display()
        ),
    )
    .unwrap();
    let decapctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
            .args(args)
            .env_remove("DECAP_GITHUB_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Flags win over the file: three days, not nine.
    let (ok, said) = decapctl(&[
        "notify-pr",
        "--config",
        ini.to_str().unwrap(),
        "--expire-days",
        "3",
        "--github-api-url",
        &github_url,
    ]);
    assert!(ok, "{said}");
    assert!(said.contains("commented on acme/widgets#7"), "{said}");

    let posted = comment_calls(&stub);
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert_eq!(posted[0].path, "/repos/acme/widgets/issues/7/comments");
    assert!(posted[0].authorization.contains(GITHUB_TOKEN));
    let body = posted[0].body["body"].as_str().unwrap().to_owned();
    assert!(
        body.contains("Simulator run: 120 passed, 0 failed"),
        "{body}"
    );
    assert!(body.contains("kept 3 days"), "{body}");
    let link = |name: &str| -> String {
        let start = body.find(&format!("[{name}](")).unwrap() + name.len() + 3;
        body[start..].split(')').next().unwrap().to_owned()
    };
    let got = reqwest::get(link("sub/a.log")).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "all 120 tests passed\n");
    let got = reqwest::get(link("b.txt")).await.unwrap();
    assert_eq!(got.text().await.unwrap(), "marvin\n");
    let listed = admin
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(
        keys,
        vec![
            format!("notify-pr/acme/widgets/{commit}/b.txt"),
            format!("notify-pr/acme/widgets/{commit}/sub/a.log")
        ]
    );
    let rules = admin
        .get_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let rule = &rules.rules()[0];
    assert_eq!(rule.expiration().and_then(|e| e.days()), Some(3));

    // A commit no open pull request has: a clear error, nothing uploaded.
    let (ok, said) = decapctl(&[
        "notify-pr",
        "--config",
        ini.to_str().unwrap(),
        "--commit",
        "beef000000000000000000000000000000000002",
        "--github-api-url",
        &github_url,
    ]);
    assert!(!ok);
    assert!(said.contains("no open pull request"), "{said}");
    let (ok, said) = decapctl(&["notify-pr", "--owner", "acme"]);
    assert!(!ok && said.contains("repo is required"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_pr_can_keep_the_details_in_decaps_own_store() {
    let (stub, github_url, dir, scripts) = setup(r#"{"buildImage": "x"}"#, "true\n").await;
    let decap = Decap::start(&dir.path().join("data"), &scripts, &[]);
    let summary = dir.path().join("summary.txt");
    std::fs::write(&summary, "3 passed\n").unwrap();
    let report = dir.path().join("report.txt");
    std::fs::write(&report, "every test passed\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["notify-pr", "--owner", "acme", "--repo", "widgets"])
        .args(["--commit", "cafe000000000000000000000000000000000003"])
        .arg("--summary-file")
        .arg(&summary)
        .arg("--full-detail-files")
        .arg(&report)
        .args(["--store-api", "decap", "--github-api-url", &github_url])
        .args(["--github-token", GITHUB_TOKEN])
        .env("DECAP_URL", &decap.url)
        .env("DECAP_API_TOKEN", common::TOKEN)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let posted = comment_calls(&stub);
    assert_eq!(posted.len(), 1, "{posted:#?}");
    let body = posted[0].body["body"].as_str().unwrap().to_owned();
    let link = format!(
        "{}/details/acme/widgets/cafe000000000000000000000000000000000003/report.txt",
        decap.url
    );
    assert!(body.contains(&format!("[report.txt]({link})")), "{body}");
    let got = reqwest::get(&link).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "every test passed\n");
}

/// A cookie's value from a response's Set-Cookie headers.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .map(|rest| rest.split(';').next().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_users_log_in_and_may_do_what_they_are_mapped_to() {
    let (stub, github_url, dir, scripts) = setup(r#"{"buildImage": "x"}"#, "true\n").await;
    let args = [
        "--github-oauth-client-id",
        "decap-client",
        "--github-oauth-client-secret",
        "oauth-secret",
        "--github-web-url",
        &github_url,
        "--github-api-url",
        &github_url,
        "--github-builders",
        "builder-bob",
    ];
    let decap = Decap::start(&dir.path().join("data"), &scripts, &args);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http
        .get(format!("{}/login", decap.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Log in with GitHub"), "{page}");

    // Off to GitHub with a state, and back.
    let login = |code: &'static str| {
        let (http, base, github_url) = (http.clone(), decap.url.clone(), github_url.clone());
        async move {
            let start = http
                .get(format!("{base}/login/github"))
                .send()
                .await
                .unwrap();
            assert!(start.status().is_redirection(), "{}", start.status());
            let to = start.headers()["location"].to_str().unwrap().to_owned();
            assert!(
                to.starts_with(&format!(
                    "{github_url}/login/oauth/authorize?client_id=decap-client"
                )),
                "{to}"
            );
            assert!(to.contains("redirect_uri="), "{to}");
            let state = set_cookie(&start, "decap_oauth_state").unwrap();
            assert!(to.contains(&format!("state={state}")), "{to}");
            let back = http
                .get(format!(
                    "{base}/login/github/callback?code={code}&state={state}"
                ))
                .header("cookie", format!("decap_oauth_state={state}"))
                .send()
                .await
                .unwrap();
            (back.status(), set_cookie(&back, "decap_session"), state)
        }
    };
    let (status, bob, state) = login("bob-code").await;
    assert!(status.is_redirection(), "{status}");
    let bob = bob.expect("a session");
    // A callback whose state is not ours, or a bad code, is refused.
    let forged = http
        .get(format!(
            "{}/login/github/callback?code=bob-code&state=forged",
            decap.url
        ))
        .header("cookie", format!("decap_oauth_state={state}"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    assert!(set_cookie(&forged, "decap_session").is_none());
    let (status, none, _) = login("wrong-code").await;
    assert_eq!(status, 502);
    assert!(none.is_none());

    // Bob may build, not unlock.
    let as_user = |session: String, path: &str, form: &[(&str, &str)]| {
        http.post(format!("{}{path}", decap.url))
            .header("cookie", format!("decap_session={session}"))
            .form(form)
            .send()
    };
    let project_page = http
        .get(format!("{}/projects/acme/widgets", decap.url))
        .header("cookie", format!("decap_session={bob}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(project_page.contains("Builder-Bob"), "the user is named");
    let built = as_user(
        bob.clone(),
        "/ui/projects/acme/widgets/build",
        &[("branch", "main")],
    )
    .await
    .unwrap();
    assert!(built.status().is_redirection(), "{}", built.status());
    assert!(
        built.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/builds/")
    );
    let unlock = as_user(
        bob.clone(),
        "/ui/locks/unlock",
        &[("key", "acme/widgets/main")],
    )
    .await
    .unwrap();
    assert_eq!(unlock.status(), 403);

    // Rita is no builder: she may read, not build.
    let (_, rita, _) = login("rita-code").await;
    let refused = as_user(
        rita.unwrap(),
        "/ui/projects/acme/widgets/build",
        &[("branch", "main")],
    )
    .await
    .unwrap();
    assert_eq!(refused.headers()["location"], "/login");

    // Logging out ends the session.
    http.post(format!("{}/logout", decap.url))
        .header("cookie", format!("decap_session={bob}"))
        .send()
        .await
        .unwrap();
    let after = as_user(
        bob,
        "/ui/projects/acme/widgets/build",
        &[("branch", "main")],
    )
    .await
    .unwrap();
    assert_eq!(after.headers()["location"], "/login");
    let exchanged = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/login/oauth/access_token")
        .count();
    assert_eq!(exchanged, 3, "one code exchange per login");
}
