//! `--insecure-local` through `Router::oneshot`, on the real embedded
//! adapters: it trusts this machine's own browser and CLI (a loopback peer,
//! a loopback `Host`, no other site's `Origin`), never a page of another
//! site open in a local browser, a DNS-rebound name or a build; the API
//! token works whatever the request looks like.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use common::{TOKEN, project};
use decap_server::listen::FromBuild;
use decap_server::{AuthConfig, Controller, Server};
use secrecy::SecretString;
use tower::ServiceExt;

struct TestApp {
    router: Router,
    controller: Arc<Controller>,
    _dir: tempfile::TempDir,
}

/// A server started with `--insecure-local` and an API token; its queue is
/// closed (builds stay deferred: these tests look at who may act).
async fn app() -> TestApp {
    let e = common::app::embedded("http://localhost:9090", 1, |scripts| {
        project(
            scripts,
            "acme/widgets",
            r#"{"buildImage": "x", "managedRefRegex": "main|release/.*"}"#,
            "echo built\n",
        )
    })
    .await;
    e.controller.set_queue_open(false).await.unwrap();
    let server = Server {
        hub: Some(e.hub()),
        ..e.server(AuthConfig {
            api_token: Some(SecretString::from(TOKEN)),
            insecure_local: true,
            webhook_secrets: vec![],
            private_reads: false,
        })
    };
    TestApp {
        router: decap_server::router(Arc::new(server)),
        controller: e.controller,
        _dir: e.dir,
    }
}

const LOOPBACK: &str = "127.0.0.1:53000";

/// How a request reaches the server: its peer (`None`: no TCP address),
/// whether it came over the build socket, and its headers.
struct Client<'a> {
    peer: Option<&'a str>,
    build_socket: bool,
    headers: &'a [(&'a str, &'a str)],
}

/// This machine's own CLI: loopback, `Host: localhost:9090`, no `Origin`.
const CLI: Client<'static> = Client {
    peer: Some(LOOPBACK),
    build_socket: false,
    headers: &[("host", "localhost:9090")],
};

fn request(method: &str, path: &str, body: &str, from: &Client<'_>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in from.headers {
        b = b.header(*k, *v);
    }
    if !body.is_empty() {
        let kind = if body.starts_with('{') {
            "application/json"
        } else {
            "application/x-www-form-urlencoded"
        };
        b = b.header("content-type", kind);
    }
    let mut req = b.body(Body::from(body.to_owned())).unwrap();
    if let Some(p) = from.peer {
        req.extensions_mut()
            .insert(ConnectInfo(p.parse::<SocketAddr>().unwrap()));
    }
    if from.build_socket {
        req.extensions_mut().insert(FromBuild);
    }
    req
}

async fn call(app: &TestApp, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

async fn history(app: &TestApp) -> usize {
    let (status, v) = call(
        app,
        request("GET", "/api/v1/builds/acme/widgets?limit=500", "", &CLI),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    v["builds"].as_array().unwrap().len()
}

const BUILD: &str = "/api/v1/builds/acme/widgets?branch=main";

/// Each way a request can look local without being so, with what the
/// refusal must name.
fn impostors() -> Vec<(&'static str, Client<'static>, &'static str)> {
    vec![
        (
            "another host name",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[("host", "evil.example")],
            },
            "Host evil.example",
        ),
        (
            "another site's page in a local browser",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[
                    ("host", "localhost:9090"),
                    ("origin", "https://evil.example"),
                ],
            },
            "requests from another site (Origin https://evil.example) are not trusted as local",
        ),
        (
            "a DNS-rebinding pair",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[
                    ("host", "evil.example:9090"),
                    ("origin", "http://evil.example:9090"),
                ],
            },
            "Host evil.example:9090",
        ),
        (
            "an opaque origin",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[("host", "localhost:9090"), ("origin", "null")],
            },
            "Origin null",
        ),
        (
            "a cross-site fetch",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[("host", "localhost:9090"), ("sec-fetch-site", "cross-site")],
            },
            "Sec-Fetch-Site: cross-site",
        ),
        (
            "a build, even one that carried a loopback address",
            Client {
                peer: Some(LOOPBACK),
                build_socket: true,
                headers: &[("host", "localhost:9090")],
            },
            "do not come over TCP from this machine",
        ),
        (
            "another machine",
            Client {
                peer: Some("192.0.2.7:53000"),
                build_socket: false,
                headers: &[("host", "localhost:9090")],
            },
            "requests from 192.0.2.7",
        ),
        (
            "no Host",
            Client {
                peer: Some(LOOPBACK),
                build_socket: false,
                headers: &[],
            },
            "without a Host",
        ),
    ]
}

#[tokio::test]
async fn the_local_cli_and_browser_act_without_the_token() {
    let app = app().await;
    let (status, v) = call(&app, request("POST", BUILD, "", &CLI)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    // A browser on this machine, at this server: same-origin is fine.
    for (host, origin) in [
        ("localhost:9090", "http://localhost:9090"),
        ("127.0.0.1:9090", "http://127.0.0.1:9090"),
        ("[::1]:9090", "http://[::1]:9090"),
    ] {
        let browser = Client {
            peer: Some(LOOPBACK),
            build_socket: false,
            headers: &[
                ("host", host),
                ("origin", origin),
                ("sec-fetch-site", "same-origin"),
            ],
        };
        let (status, v) = call(&app, request("POST", BUILD, "", &browser)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{host}: {v}");
    }
    assert_eq!(history(&app).await, 4);
}

#[tokio::test]
async fn nothing_else_is_local_and_the_refusal_says_why() {
    let app = app().await;
    for (what, from, why) in impostors() {
        let (status, v) = call(&app, request("POST", BUILD, "", &from)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {v}");
        let message = v["error"].as_str().unwrap();
        assert!(message.contains(why), "{what}: {message}");
        assert!(message.contains("API token"), "{what}: {message}");
    }
    assert_eq!(history(&app).await, 0, "nothing was built");
}

#[tokio::test]
async fn a_dns_rebinding_pair_cannot_close_the_queue() {
    let app = app().await;
    app.controller.set_queue_open(true).await.unwrap();
    let rebound = Client {
        peer: Some(LOOPBACK),
        build_socket: false,
        headers: &[
            ("host", "attacker.example:9090"),
            ("origin", "http://attacker.example:9090"),
        ],
    };
    let closed = r#"{"state": "closed"}"#;
    let (status, v) = call(&app, request("PUT", "/api/v1/queue", closed, &rebound)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(app.controller.queue_open().await, "the queue stays open");
    // The local CLI still can.
    let (status, v) = call(&app, request("PUT", "/api/v1/queue", closed, &CLI)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(!app.controller.queue_open().await);
}

#[tokio::test]
async fn other_sites_cannot_set_a_result_or_post_to_the_hub() {
    let app = app().await;
    let (_, created) = call(&app, request("POST", BUILD, "", &CLI)).await;
    let id = created["builds"][0]["id"].as_str().unwrap().to_owned();
    let result = r#"{"exitCode": 0, "timedOut": false}"#;
    let report =
        "name=tests&repository=git@github.com:acme/pipeline.git&revision=aaaa01&status=successful";
    for (what, from, why) in impostors() {
        let (status, v) = call(
            &app,
            request("POST", &format!("/api/v1/build/{id}/result"), result, &from),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "result, {what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{what}: {v}");
        let (status, v) = call(&app, request("POST", "/api/build_status", report, &from)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "hub, {what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{what}: {v}");
    }
    let (_, b) = call(
        &app,
        request("GET", &format!("/api/v1/build/{id}"), "", &CLI),
    )
    .await;
    assert_eq!(b["status"], "deferred", "no result was taken");
    let (status, v) = call(&app, request("POST", "/api/build_status", report, &CLI)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn the_api_token_works_whatever_the_request_looks_like() {
    let app = app().await;
    for (what, from, _) in impostors() {
        let mut headers = from.headers.to_vec();
        let bearer = format!("Bearer {TOKEN}");
        headers.push(("authorization", bearer.as_str()));
        let with_token = Client {
            peer: from.peer,
            build_socket: from.build_socket,
            headers: &headers,
        };
        let (status, v) = call(&app, request("POST", BUILD, "", &with_token)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{what}: {v}");
        let (status, v) = call(
            &app,
            request(
                "PUT",
                "/api/v1/queue",
                r#"{"state": "closed"}"#,
                &with_token,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
    }
    assert_eq!(history(&app).await, impostors().len());
}

#[tokio::test]
async fn the_ui_acts_for_the_local_browser_only() {
    let app = app().await;
    let form = |from: &Client<'_>| {
        request(
            "POST",
            "/ui/projects/acme/widgets/build",
            "branch=main",
            from,
        )
    };
    let local = Client {
        peer: Some(LOOPBACK),
        build_socket: false,
        headers: &[
            ("host", "localhost:9090"),
            ("origin", "http://localhost:9090"),
        ],
    };
    let resp = app.router.clone().oneshot(form(&local)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/builds/")
    );
    assert_eq!(history(&app).await, 1);
    for (what, from, _) in impostors() {
        let resp = app.router.clone().oneshot(form(&from)).await.unwrap();
        assert!(
            matches!(resp.status(), StatusCode::SEE_OTHER | StatusCode::FORBIDDEN),
            "{what}: {}",
            resp.status()
        );
        if resp.status() == StatusCode::SEE_OTHER {
            assert_eq!(resp.headers()["location"], "/login", "{what}");
        }
    }
    assert_eq!(history(&app).await, 1, "only the local browser built");
    // A browser of this machine that is refused is told why on the login
    // page.
    let rebound = Client {
        peer: Some(LOOPBACK),
        build_socket: false,
        headers: &[("host", "attacker.example:9090")],
    };
    let resp = app
        .router
        .clone()
        .oneshot(request("GET", "/login", "", &rebound))
        .await
        .unwrap();
    let html = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(html.contains("Host attacker.example:9090"), "{html}");
    assert!(!html.contains(">local<"), "not shown as local: {html}");
}
