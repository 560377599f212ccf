//! Builds' secrets over HTTP, through `Router::oneshot` on the real embedded
//! adapters: every route needs the API token, bad names and values are
//! refused with why, large values before they are read, and no route ever
//! answers a value.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{TOKEN, project};
use decap_core::ports::SecretStore;
use decap_core::secrets::MAX_SECRET_VALUE_BYTES;
use decap_embedded::{SecretKey, SqliteDb, SqliteSecretStore};
use decap_server::{AuthConfig, Server};
use secrecy::SecretString;
use tower::ServiceExt;

/// What every test checks no answer ever holds.
const VALUE: &str = "s3cr3t-value-that-must-never-come-back";

struct TestApp {
    router: Router,
    store: Option<Arc<dyn SecretStore>>,
    _dir: tempfile::TempDir,
}

/// A server on the embedded adapters, with a secret store or without.
async fn app_with(secrets: bool) -> TestApp {
    let e = common::app::embedded("http://decap.test", 0, |scripts| {
        project(scripts, "acme/widgets", r#"{"buildImage": "x"}"#, "true\n")
    })
    .await;
    let store: Option<Arc<dyn SecretStore>> = if secrets {
        // The key apart from the data dir, as `decap serve` keeps it.
        let key = SecretKey::load_or_create(&e.dir.path().join("config/secrets.key")).unwrap();
        Some(Arc::new(
            SqliteSecretStore::open(e.db.clone(), key).await.unwrap(),
        ))
    } else {
        None
    };
    let server = Server {
        secrets: store.clone(),
        ..e.server(AuthConfig {
            api_token: Some(SecretString::from(TOKEN)),
            insecure_local: false,
            webhook_secrets: Vec::new(),
            private_reads: false,
        })
    };
    TestApp {
        router: decap_server::router(Arc::new(server)),
        store,
        _dir: e.dir,
    }
}

/// The status and the body, which is checked never to hold a value.
async fn call(app: &TestApp, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(
        !text.contains(VALUE),
        "an answer ({status}) holds a secret's value: {text}"
    );
    (status, text)
}

fn request(method: &str, path: &str, token: Option<&str>, body: Body) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(body).unwrap()
}

/// `PUT` with the token and a body of known length.
fn put(path: &str, value: &[u8]) -> Request<Body> {
    Request::put(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", value.len())
        .body(Body::from(value.to_vec()))
        .unwrap()
}

fn authed(method: &str, path: &str) -> Request<Body> {
    request(method, path, Some(TOKEN), Body::empty())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn built_with(app: &TestApp, team: &str, project: &str) -> Vec<(String, String)> {
    let key = decap_core::ProjectKey::new(team, project).unwrap();
    app.store
        .as_ref()
        .unwrap()
        .for_build(&key)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.expose().to_owned()))
        .collect()
}

#[tokio::test]
async fn every_secrets_route_needs_the_api_token() {
    let app = app_with(true).await;
    let routes = [
        ("PUT", "/api/v1/secrets/acme/widgets/NPM_TOKEN"),
        ("GET", "/api/v1/secrets/acme/widgets"),
        ("DELETE", "/api/v1/secrets/acme/widgets/NPM_TOKEN"),
        ("PUT", "/api/v1/team-secrets/acme/NPM_TOKEN"),
        ("GET", "/api/v1/team-secrets/acme"),
        ("DELETE", "/api/v1/team-secrets/acme/NPM_TOKEN"),
        // Even a bad name is not judged before the caller is.
        ("PUT", "/api/v1/secrets/acme/widgets/1BAD"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token")] {
            let (status, text) = call(
                &app,
                request(method, path, token, Body::from(VALUE.as_bytes().to_vec())),
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {text}");
            assert!(
                json(&text)["error"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .contains("token"),
                "{text}"
            );
        }
    }
    assert!(
        built_with(&app, "acme", "widgets").await.is_empty(),
        "nothing was stored"
    );
}

#[tokio::test]
async fn secrets_are_set_listed_by_name_and_removed() {
    let app = app_with(true).await;
    let (status, text) = call(
        &app,
        put("/api/v1/secrets/acme/widgets/NPM_TOKEN", VALUE.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert!(text.is_empty(), "a set answers nothing: {text}");
    let (status, _) = call(&app, put("/api/v1/secrets/acme/widgets/AWS_KEY", b"aws")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, text) = call(&app, authed("GET", "/api/v1/secrets/acme/widgets")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json(&text),
        serde_json::json!({"secrets": ["AWS_KEY", "NPM_TOKEN"]}),
        "names only, sorted"
    );

    // Replaced; the body is the value, byte for byte (a trailing newline too).
    let replaced = format!("{VALUE}-2\n");
    let (status, _) = call(
        &app,
        put(
            "/api/v1/secrets/acme/widgets/NPM_TOKEN",
            replaced.as_bytes(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Team-wide: every project of the team; the project's own wins.
    let (status, _) = call(
        &app,
        put("/api/v1/team-secrets/acme/NPM_TOKEN", b"team-npm"),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&app, put("/api/v1/team-secrets/acme/SLACK", b"team-slack")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, text) = call(&app, authed("GET", "/api/v1/team-secrets/acme")).await;
    assert_eq!(
        json(&text),
        serde_json::json!({"secrets": ["NPM_TOKEN", "SLACK"]})
    );
    let (_, text) = call(&app, authed("GET", "/api/v1/secrets/acme/widgets")).await;
    assert_eq!(
        json(&text),
        serde_json::json!({"secrets": ["AWS_KEY", "NPM_TOKEN"]})
    );
    assert_eq!(
        built_with(&app, "acme", "widgets").await,
        [
            ("AWS_KEY".to_owned(), "aws".to_owned()),
            ("NPM_TOKEN".to_owned(), replaced.clone()),
            ("SLACK".to_owned(), "team-slack".to_owned()),
        ]
    );
    assert_eq!(
        built_with(&app, "acme", "gadgets").await,
        [
            ("NPM_TOKEN".to_owned(), "team-npm".to_owned()),
            ("SLACK".to_owned(), "team-slack".to_owned()),
        ]
    );

    // Removed once; a second time is 404.
    let (status, _) = call(
        &app,
        authed("DELETE", "/api/v1/secrets/acme/widgets/NPM_TOKEN"),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, text) = call(
        &app,
        authed("DELETE", "/api/v1/secrets/acme/widgets/NPM_TOKEN"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    assert!(text.contains("NPM_TOKEN"), "{text}");
    let (status, _) = call(&app, authed("DELETE", "/api/v1/team-secrets/acme/SLACK")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&app, authed("DELETE", "/api/v1/team-secrets/acme/SLACK")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, text) = call(&app, authed("GET", "/api/v1/secrets/acme/widgets")).await;
    assert_eq!(json(&text), serde_json::json!({"secrets": ["AWS_KEY"]}));
    assert_eq!(
        built_with(&app, "acme", "widgets").await,
        [
            ("AWS_KEY".to_owned(), "aws".to_owned()),
            ("NPM_TOKEN".to_owned(), "team-npm".to_owned()),
        ],
        "without its own, the project gets the team's"
    );

    // A scope with none lists none.
    let (status, text) = call(&app, authed("GET", "/api/v1/secrets/other/project")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&text), serde_json::json!({"secrets": []}));
}

#[tokio::test]
async fn bad_names_and_values_are_refused_with_why() {
    let app = app_with(true).await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "/api/v1/secrets/acme/widgets/1BAD",
            b"x".to_vec(),
            "environment variable",
        ),
        (
            "/api/v1/secrets/acme/widgets/A-B",
            b"x".to_vec(),
            "environment variable",
        ),
        (
            "/api/v1/secrets/acme/widgets/DECAP_X",
            b"x".to_vec(),
            "DECAP_",
        ),
        (
            "/api/v1/secrets/acme/widgets/BUILD_ID",
            b"x".to_vec(),
            "set by Decap",
        ),
        (
            "/api/v1/team-secrets/acme/PATH",
            b"x".to_vec(),
            "set by Decap",
        ),
        ("/api/v1/secrets/acme/widgets/EMPTY", Vec::new(), "empty"),
        ("/api/v1/secrets/acme/widgets/NUL", b"a\0b".to_vec(), "NUL"),
        (
            "/api/v1/secrets/acme/widgets/BINARY",
            vec![0xff, 0xfe],
            "UTF-8",
        ),
        ("/api/v1/secrets/.hidden/widgets/OK", b"x".to_vec(), "team"),
        (
            "/api/v1/secrets/acme/wid%20gets/OK",
            b"x".to_vec(),
            "project",
        ),
        ("/api/v1/team-secrets/-rf/OK", b"x".to_vec(), "team"),
    ];
    for (path, body, why) in cases {
        let (status, text) = call(&app, put(path, &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {text}");
        let message = json(&text)["error"].as_str().unwrap().to_owned();
        assert!(message.contains(why), "{path}: {message}");
    }
    let (status, _) = call(&app, authed("DELETE", "/api/v1/secrets/acme/widgets/1BAD")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(&app, authed("GET", "/api/v1/team-secrets/a%2Fb")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(built_with(&app, "acme", "widgets").await.is_empty());
}

#[tokio::test]
async fn a_value_too_large_is_refused_before_it_is_read() {
    let app = app_with(true).await;
    // Declared too large: 413 without reading a byte of it.
    let polled = Arc::new(AtomicBool::new(false));
    let seen = polled.clone();
    let never = futures::stream::poll_fn(move |_| {
        seen.store(true, Ordering::SeqCst);
        std::task::Poll::<Option<Result<bytes::Bytes, std::io::Error>>>::Pending
    });
    let req = Request::put("/api/v1/secrets/acme/widgets/BIG")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", MAX_SECRET_VALUE_BYTES + 1)
        .body(Body::from_stream(never))
        .unwrap();
    let (status, text) = tokio::time::timeout(Duration::from_secs(10), call(&app, req))
        .await
        .expect("answered without waiting for the body");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains(&MAX_SECRET_VALUE_BYTES.to_string()), "{text}");
    assert!(!polled.load(Ordering::SeqCst), "the body was read");

    // Without a length, cut off at the cap.
    let chunks = (0..9).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 8 * 1024])));
    let req = request(
        "PUT",
        "/api/v1/secrets/acme/widgets/BIG",
        Some(TOKEN),
        Body::from_stream(futures::stream::iter(chunks)),
    );
    let (status, text) = call(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");

    // At the cap: stored.
    let largest = vec![b'x'; MAX_SECRET_VALUE_BYTES];
    let (status, text) = call(&app, put("/api/v1/secrets/acme/widgets/BIG", &largest)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(
        built_with(&app, "acme", "widgets").await[0].1.len(),
        MAX_SECRET_VALUE_BYTES
    );
}

#[tokio::test]
async fn no_route_answers_a_value() {
    let app = app_with(true).await;
    let (status, _) = call(
        &app,
        put("/api/v1/secrets/acme/widgets/NPM_TOKEN", VALUE.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &app,
        put("/api/v1/team-secrets/acme/NPM_TOKEN", VALUE.as_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // `call` checks every answer for the value; these are the likely places.
    for path in [
        "/api/v1/secrets/acme/widgets/NPM_TOKEN",
        "/api/v1/team-secrets/acme/NPM_TOKEN",
    ] {
        for token in [None, Some(TOKEN)] {
            let (status, text) = call(&app, request("GET", path, token, Body::empty())).await;
            assert!(
                status == StatusCode::METHOD_NOT_ALLOWED || status == StatusCode::NOT_FOUND,
                "GET {path}: {status} {text}"
            );
        }
    }
    for path in [
        "/api/v1/secrets/acme/widgets/NPM_TOKEN/value",
        "/api/v1/secrets/acme/widgets?name=NPM_TOKEN",
        "/api/v1/secrets/acme",
        "/api/v1/secrets",
        "/api/v1/team-secrets",
        "/api/v1/projects",
        "/api/v1/projects?team=acme",
    ] {
        let (status, text) = call(&app, authed("GET", path)).await;
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {text}");
    }
    let (_, text) = call(&app, authed("GET", "/api/v1/secrets/acme/widgets")).await;
    assert_eq!(json(&text), serde_json::json!({"secrets": ["NPM_TOKEN"]}));
    let (_, text) = call(&app, authed("GET", "/api/v1/team-secrets/acme")).await;
    assert_eq!(json(&text), serde_json::json!({"secrets": ["NPM_TOKEN"]}));
}

#[tokio::test]
async fn a_server_without_a_secret_store_says_so() {
    let app = app_with(false).await;
    for (method, path) in [
        ("PUT", "/api/v1/secrets/acme/widgets/NPM_TOKEN"),
        ("GET", "/api/v1/secrets/acme/widgets"),
        ("DELETE", "/api/v1/team-secrets/acme/NPM_TOKEN"),
    ] {
        let (status, text) = call(&app, request(method, path, Some(TOKEN), Body::from("x"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
        assert!(text.contains("keeps no secrets"), "{text}");
    }
    // The caller is still checked first.
    let (status, _) = call(
        &app,
        request("GET", "/api/v1/secrets/acme/widgets", None, Body::empty()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// `decapctl secrets …` with its standard input.
fn ctl(url: &str, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["--server", url, "--token", TOKEN])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn decapctl_keeps_secrets_on_a_real_server_sealed_with_its_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(&scripts, "acme/widgets", r#"{"buildImage": "x"}"#, "true\n");
    let data = dir.path().join("data");
    let mut decap = common::Decap::start(&data, &scripts, &[]);
    let url = decap.url.clone();

    let out = ctl(
        &url,
        &["secrets", "set", "acme/widgets", "NPM_TOKEN"],
        Some(format!("{VALUE}\n").as_bytes()),
    );
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "secret NPM_TOKEN of acme/widgets set\n"
    );
    let out = ctl(
        &url,
        &["secrets", "set", "--team", "acme", "SLACK"],
        Some(b"team-slack"),
    );
    assert!(out.status.success(), "{}", said(&out));
    let out = ctl(&url, &["--json", "secrets", "list", "acme/widgets"], None);
    assert!(out.status.success(), "{}", said(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!({"secrets": ["NPM_TOKEN"]}));
    let out = ctl(&url, &["secrets", "list", "--team", "acme"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SLACK\n");
    assert!(!said(&out).contains("team-slack"));

    // Refused with why, and nothing sent.
    let out = ctl(&url, &["secrets", "set", "acme", "NPM"], Some(b"x"));
    assert!(!out.status.success());
    assert!(said(&out).contains("--team acme"), "{}", said(&out));
    let out = ctl(
        &url,
        &["secrets", "set", "acme/widgets", "EMPTY"],
        Some(b"\n"),
    );
    assert!(!out.status.success());
    assert!(said(&out).contains("empty"), "{}", said(&out));
    let out = ctl(
        &url,
        &["secrets", "set", "acme/widgets", "DECAP_X"],
        Some(b"x"),
    );
    assert!(!out.status.success());
    assert!(said(&out).contains("DECAP_"), "{}", said(&out));
    let out = ctl(&url, &["secrets", "rm", "acme/widgets", "NEVER_SET"], None);
    assert!(!out.status.success());
    assert!(said(&out).contains("HTTP 404"), "{}", said(&out));
    let out = ctl(&url, &["secrets", "set", "--help"], None);
    assert!(said(&out).contains("--team"), "{}", said(&out));
    assert!(said(&out).contains("standard input"), "{}", said(&out));

    // The key is beside, not in, the data dir, private; the database alone
    // does not hold the value.
    let key = dir.path().join("secrets-key/secrets.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    decap.kill();
    for file in std::fs::read_dir(&data).unwrap() {
        let file = file.unwrap().path();
        if let Ok(bytes) = std::fs::read(&file) {
            assert!(
                !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                "{} holds the value in the clear",
                file.display()
            );
        }
    }

    // The value as builds get it: stdin less its trailing newline.
    {
        let store = SqliteSecretStore::open(
            SqliteDb::open(&data.join("decap.db")).unwrap(),
            SecretKey::load_or_create(&key).unwrap(),
        )
        .await
        .unwrap();
        let got = store
            .for_build(&decap_core::ProjectKey::new("acme", "widgets").unwrap())
            .await
            .unwrap();
        let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
        assert_eq!(got, [("NPM_TOKEN", VALUE), ("SLACK", "team-slack")]);
    }

    // Started again with another key: refused, naming the key file.
    let other = dir.path().join("other/secrets.key");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_decap"))
        .args(["serve", "--listen", "127.0.0.1:0", "--sandbox", "none"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--scripts")
        .arg(&scripts)
        .arg("--secrets-key-file")
        .arg(&other)
        .env("DECAP_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("decap started with another key than its secrets'");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&other.display().to_string()) && err.contains("another key"),
        "{err}"
    );
}
