//! Language presets, through a real `decap serve`: small real projects of
//! each language (made here, with nothing to download) built by their
//! preset with no build.sh; overrides that drop, add and fail; an override
//! file that is not valid; a repository that cannot be cloned; a private
//! repository (served by `git http-backend`) fetched with the project's
//! token, which the build never sees.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::presets::{go_project, node_project, python_project, repo, rust_project, sh};
use common::{Decap, TOKEN};

const WAIT: Duration = Duration::from_secs(180);

/// A project of `language` building `repo_url`, with no build.sh.
fn preset_project(scripts: &Path, key: &str, language: &str, repo_url: &str, env: &str) {
    let dir = scripts.join(key);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("project.json"),
        format!(
            r#"{{"language": "{language}", "repoUrl": "{repo_url}", "buildTimeoutSeconds": 300, "env": {{{env}}}}}"#
        ),
    )
    .unwrap();
}

/// Everything under `root` readable by the sandbox's build users.
fn readable(root: &Path) {
    sh(root, "chmod -R a+rX .");
}

fn phases(b: &serde_json::Value) -> Vec<(String, Option<i64>)> {
    b["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_owned(),
                        p["exitCode"].as_i64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_passed() -> Vec<(String, Option<i64>)> {
    ["machine", "setup", "test"]
        .iter()
        .map(|p| ((*p).to_owned(), Some(0)))
        .collect()
}

async fn build_of(d: &Decap, project: &str) -> (serde_json::Value, String) {
    let id = d.api().request(project, &["main"]).await.remove(0);
    let b = d.api().finished(&id, WAIT).await;
    let log = d.api().log(&id).await;
    (b, log)
}

fn tool(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("{cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_language_builds_with_its_preset_and_no_build_sh() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let repos = tmp.path().join("repos");
    let mut projects: Vec<(&str, PathBuf)> = Vec::new();
    let shell = repos.join("shell");
    repo(
        &shell,
        &[(
            "test.sh",
            "echo \"shell tests pass in $(basename \"$(pwd)\") with CI=$CI\"\n",
        )],
    );
    projects.push(("shell", shell));
    let python = repos.join("python");
    python_project(&python);
    projects.push(("python", python));
    let node = repos.join("node");
    node_project(&node);
    projects.push(("node", node));
    let go = repos.join("go");
    go_project(&go);
    projects.push(("go", go));
    let rust = repos.join("rust");
    rust_project(&rust);
    projects.push(("rust", rust));
    let java = repos.join("java");
    repo(
        &java,
        &[
            (
                "pom.xml",
                r#"<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>example</groupId>
  <artifactId>greet</artifactId>
  <version>1.0</version>
  <properties>
    <maven.compiler.source>17</maven.compiler.source>
    <maven.compiler.target>17</maven.compiler.target>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencies>
    <dependency><groupId>junit</groupId><artifactId>junit</artifactId><version>4.13.2</version><scope>test</scope></dependency>
  </dependencies>
</project>
"#,
            ),
            (
                "src/main/java/g/Greet.java",
                "package g;\npublic class Greet { public static String greet(String n) { return \"hello \" + n; } }\n",
            ),
            (
                "src/test/java/g/GreetTest.java",
                "package g;\nimport org.junit.Test;\nimport static org.junit.Assert.assertEquals;\npublic class GreetTest { @Test public void greets() { assertEquals(\"hello x\", Greet.greet(\"x\")); } }\n",
            ),
        ],
    );
    projects.push(("java", java));
    // Maven's plugins and junit come from Maven Central once, then from
    // the test bed's cache (outside the checkout).
    let m2 = format!(
        "{}/.cache/decap/m2",
        std::env::var("HOME").unwrap_or_default()
    );
    // The toolchains as this machine has them (rustup's in the test's home).
    let rustup_home = std::env::var("RUSTUP_HOME")
        .unwrap_or_else(|_| format!("{}/.rustup", std::env::var("HOME").unwrap_or_default()));
    let path = std::env::var("PATH").unwrap_or_default();
    for (language, dir) in &projects {
        let env = match *language {
            "rust" => format!(r#""RUSTUP_HOME": "{rustup_home}", "CARGO_TARGET_DIR": "target""#),
            "java" => format!(r#""MAVEN_OPTS": "-Dmaven.repo.local={m2}""#),
            _ => String::new(),
        };
        preset_project(
            &scripts,
            &format!("langs/{language}"),
            language,
            &dir.to_string_lossy(),
            &env,
        );
    }
    readable(tmp.path());
    // Unsandboxed, the builds see this machine's toolchains where they are
    // (rustup's and pyenv's under the home folder).
    let d = Decap::start_with_env(
        &tmp.path().join("data"),
        &scripts,
        &["--max-builds", "2"],
        &[("PATH", &path)],
    );
    for (language, _) in &projects {
        let needs = match *language {
            "python" => "python3 -m pytest --version",
            "node" => "npm --version",
            "go" => "go version",
            "rust" => "cargo --version",
            "java" => "mvn --version",
            _ => "true",
        };
        assert!(
            tool(needs),
            "this machine lacks {needs} (tests/run installs it)"
        );
        let (b, log) = build_of(&d, &format!("langs/{language}")).await;
        assert_eq!(b["status"], "succeeded", "{language}: {b}\n{log}");
        assert_eq!(phases(&b), all_passed(), "{language}: {b}");
        assert!(
            log.contains(&format!("[decap: the {language} preset, at commit ")),
            "{language}: {log}"
        );
        for phase in ["machine", "setup", "test"] {
            assert!(
                log.contains(&format!("── phase {phase} ──\n")),
                "{language}: {log}"
            );
            assert!(
                log.contains(&format!("── phase {phase}: passed in ")),
                "{language}: {log}"
            );
        }
        assert!(log.contains("CI=true (default)"), "{log}");
        let test_cmd = decap_core::preset::Language::from_name(language)
            .unwrap()
            .preset()
            .test[0];
        assert!(
            log.contains(&format!("$ {test_cmd}\n")),
            "{language}: {log}"
        );
    }
    // The shell project's test ran in the checkout.
    let (_, log) = build_of(&d, "langs/shell").await;
    assert!(
        log.contains("shell tests pass in src with CI=true"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_sandbox_a_preset_build_fetches_its_tree_from_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let shell = tmp.path().join("repos/shell");
    let commit = repo(
        &shell,
        &[
            (
                "test.sh",
                "echo \"tests of $(cat VERSION) pass at $COMMIT_SHA\"; ls -a\n",
            ),
            ("VERSION", "1.2.3\n"),
        ],
    );
    preset_project(&scripts, "acme/sh", "shell", &shell.to_string_lossy(), "");
    // Toolchains under /usr are the sandbox's too.
    let node = tmp.path().join("repos/node");
    node_project(&node);
    preset_project(&scripts, "acme/node", "node", &node.to_string_lossy(), "");
    let go = tmp.path().join("repos/go");
    go_project(&go);
    preset_project(&scripts, "acme/go", "go", &go.to_string_lossy(), "");
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &["--sandbox", "auto"]);
    for project in ["acme/node", "acme/go"] {
        let (b, log) = build_of(&d, project).await;
        assert_eq!(b["status"], "succeeded", "{project}: {b}\n{log}");
        assert_eq!(b["sandbox"], "bubblewrap", "{b}");
        assert_eq!(phases(&b), all_passed(), "{project}: {b}");
    }
    let (b, log) = build_of(&d, "acme/sh").await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert_eq!(b["sandbox"], "bubblewrap", "{b}");
    assert!(
        log.contains(&format!("tests of 1.2.3 pass at {commit}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("at commit {}]", &commit[..12])),
        "{log}"
    );
    // The tree, not the repository: no .git, and the host's folder is not there.
    assert!(!log.contains(".git\n"), "{log}");
    assert!(
        !log.contains(&tmp.path().to_string_lossy().into_owned()),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_file_drops_adds_and_fails_and_an_invalid_one_fails_first() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let adjusted = tmp.path().join("repos/adjusted");
    repo(
        &adjusted,
        &[
            ("test.sh", "echo default test ran\n"),
            (
                ".decap.json",
                r#"{
  "machine": {"custom": ["export FROM_MACHINE=kept"]},
  "setup": {"custom": ["echo setting up; cd sub"]},
  "test": {"override": true, "custom": ["echo \"own test with $GREETING in $(basename $(pwd)), $FROM_MACHINE\"", "exit 3", "echo never"]},
  "env": {"GREETING": "hi there"}
}"#,
            ),
            ("sub/keep", ""),
        ],
    );
    let invalid = tmp.path().join("repos/invalid");
    repo(
        &invalid,
        &[
            ("test.sh", "echo should not run\n"),
            (
                ".decap.json",
                "{\n  \"test\": {\"custom\": \"not a list\"}\n}\n",
            ),
        ],
    );
    let huge = tmp.path().join("repos/huge");
    let big = format!(r#"{{"env": {{"PAD": "{}"}}}}"#, "x".repeat(70 * 1024));
    repo(
        &huge,
        &[("test.sh", "echo should not run\n"), (".decap.json", &big)],
    );
    let passing = tmp.path().join("repos/passing");
    repo(
        &passing,
        &[
            ("test.sh", "echo default test ran\n"),
            (
                ".decap.json",
                r#"{"test": {"custom": ["echo and mine after it", "echo \"redis at $REDIS_URL\""]}, "services": ["redis"]}"#,
            ),
        ],
    );
    preset_project(
        &scripts,
        "acme/adjusted",
        "shell",
        &adjusted.to_string_lossy(),
        "",
    );
    preset_project(
        &scripts,
        "acme/invalid",
        "shell",
        &invalid.to_string_lossy(),
        "",
    );
    preset_project(&scripts, "acme/huge", "shell", &huge.to_string_lossy(), "");
    preset_project(
        &scripts,
        "acme/passing",
        "shell",
        &passing.to_string_lossy(),
        "",
    );
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &[]);

    let (b, log) = build_of(&d, "acme/adjusted").await;
    assert_eq!(b["status"], "failed", "{b}\n{log}");
    assert_eq!(b["exitCode"], 3, "{b}");
    assert_eq!(
        phases(&b),
        vec![
            ("machine".to_owned(), Some(0)),
            ("setup".to_owned(), Some(0)),
            ("test".to_owned(), Some(3))
        ]
    );
    assert!(log.contains("GREETING=hi there (override)"), "{log}");
    assert!(log.contains("own test with hi there in sub, kept"), "{log}");
    assert!(!log.contains("default test ran"), "{log}");
    assert!(!log.contains("never\n"), "{log}");
    assert!(
        log.contains("── phase test: failed (exit code 3) in "),
        "{log}"
    );
    let test = &b["phases"][2]["commands"];
    assert_eq!(test[0]["from"], "override", "{test}");
    assert_eq!(test.as_array().unwrap().len(), 3, "{test}");

    let (b, log) = build_of(&d, "acme/passing").await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    let at_default = log.find("default test ran").unwrap();
    let at_mine = log.find("and mine after it").unwrap();
    assert!(at_default < at_mine, "{log}");
    // On one machine the service is not started, and the console says so;
    // its variables are set all the same.
    assert!(
        log.contains("this project's sidecars (redis) do not run under the local executor"),
        "{log}"
    );
    assert!(log.contains("redis at redis://127.0.0.1:6379/0"), "{log}");

    let (b, log) = build_of(&d, "acme/invalid").await;
    assert_eq!(b["status"], "failed", "{b}\n{log}");
    assert!(
        log.contains(".decap.json, line 2, column 33: invalid type: string \"not a list\", expected a sequence"),
        "{log}"
    );
    assert!(!log.contains("── phase"), "no phase runs: {log}");
    assert!(!log.contains("should not run"), "{log}");

    let (b, log) = build_of(&d, "acme/huge").await;
    assert_eq!(b["status"], "failed", "{b}\n{log}");
    assert!(
        log.contains(".decap.json is larger than 65536 bytes, the most Decap reads"),
        "{log}"
    );
    assert!(!log.contains("should not run"), "{log}");

    // The project page says which commands ran and where each came from.
    let page = d
        .api()
        .get("/projects/acme/adjusted")
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("The shell preset"), "{page}");
    assert!(
        page.contains("<code>exit 3</code> <span class=\"muted\">(.decap.json)</span>"),
        "{page}"
    );
    let id = b["id"].as_str().unwrap();
    let page = d
        .api()
        .get(&format!("/builds/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("id=\"phases-h\""),
        "a build that ran no phase shows none: {page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_checked_out_or_is_missing_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let nowhere = tmp.path().join("repos/nowhere");
    preset_project(&scripts, "acme/gone", "go", &nowhere.to_string_lossy(), "");
    // A language without a repository, and a build.sh that wins.
    std::fs::create_dir_all(scripts.join("acme/norepo")).unwrap();
    std::fs::write(
        scripts.join("acme/norepo/project.json"),
        r#"{"language": "python"}"#,
    )
    .unwrap();
    common::project(
        &scripts,
        "acme/own",
        r#"{"language": "node"}"#,
        "echo my own build.sh; test ! -f \"$DECAP_BUILD_SCRIPTS/decap-preset.json\"\n",
    );
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &[]);
    let (b, _) = build_of(&d, "acme/gone").await;
    assert_eq!(b["status"], "errored", "{b}");
    let message = b["message"].as_str().unwrap();
    assert!(
        message.contains("the repository could not be checked out: ")
            && message.contains("cannot fetch refs/heads/main of "),
        "{message}"
    );
    let projects = d.api().json("/api/v1/projects").await;
    let norepo = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["project"] == "norepo")
        .unwrap();
    assert!(
        norepo["error"]
            .as_str()
            .unwrap()
            .contains("a python project with no build.sh needs its repoUrl"),
        "{norepo}"
    );
    let (b, log) = build_of(&d, "acme/own").await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("my own build.sh"), "{log}");
    assert!(b["phases"].is_null(), "{b}");
    assert!(
        log.contains("not in its buildImage docker.io/library/node:lts-slim"),
        "the preset chose the image: {log}"
    );
}

/// The bare repositories under `root`, served by git's own smart HTTP
/// server (`git http-backend`, as a CGI program), only to requests with
/// `Authorization: Basic x-access-token:TOKEN` (what GitHub takes).
async fn private_http_repo(root: PathBuf, token: &str) -> String {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
    );
    let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let root = root.clone();
        let expected = expected.clone();
        async move {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            if header("authorization") != expected {
                return (
                    StatusCode::UNAUTHORIZED,
                    [("www-authenticate", "Basic realm=\"git\"")],
                )
                    .into_response();
            }
            let mut cgi = tokio::process::Command::new("git")
                .arg("http-backend")
                .env_clear()
                .env("GIT_PROJECT_ROOT", &root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env("REQUEST_METHOD", method.as_str())
                .env("PATH_INFO", uri.path())
                .env("QUERY_STRING", uri.query().unwrap_or_default())
                .env("CONTENT_TYPE", header("content-type"))
                .env("CONTENT_LENGTH", body.len().to_string())
                .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
                .env("GIT_PROTOCOL", header("git-protocol"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = cgi.stdin.take().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stdin, &body)
                .await
                .unwrap();
            drop(stdin);
            let out = cgi.wait_with_output().await.unwrap().stdout;
            // CGI: headers, a blank line, the body.
            let split = out
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| (i, 4))
                .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
                .unwrap();
            let head = String::from_utf8_lossy(&out[..split.0]).into_owned();
            let mut status = StatusCode::OK;
            let mut response_headers = HeaderMap::new();
            for line in head.lines() {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                let v = v.trim();
                if k.eq_ignore_ascii_case("status") {
                    status = StatusCode::from_u16(v[..3].parse().unwrap()).unwrap();
                } else if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::try_from(k.trim()),
                    axum::http::HeaderValue::try_from(v),
                ) {
                    response_headers.insert(k, v);
                }
            }
            (status, response_headers, out[split.0 + split.1..].to_vec()).into_response()
        }
    };
    let app = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/private.git")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_fetched_with_the_token_the_build_never_sees() {
    const REPO_TOKEN: &str = "ghs_private-repository-token-0123456789";
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let work = tmp.path().join("repos/private");
    repo(
        &work,
        &[(
            "test.sh",
            "echo private tests pass; env | sort; cat /proc/$PPID/environ 2>/dev/null | tr '\\0' '\\n'; echo end of env\n",
        )],
    );
    let served = tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let bare = served.join("private.git");
    sh(
        tmp.path(),
        &format!("git clone -q --bare {} {}", work.display(), bare.display()),
    );
    let url = private_http_repo(served, REPO_TOKEN).await;
    preset_project(&scripts, "acme/private", "shell", &url, "");
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &[]);

    // Without the token: GitHub's answer to a stranger, said plainly.
    let (b, _) = build_of(&d, "acme/private").await;
    assert_eq!(b["status"], "errored", "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("could not be checked out"),
        "{b}"
    );

    let r = d
        .api()
        .http
        .put(format!("{}/api/v1/secrets/acme/private/REPO_TOKEN", d.url))
        .bearer_auth(TOKEN)
        .body(REPO_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (b, log) = build_of(&d, "acme/private").await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("private tests pass"), "{log}");
    assert!(log.contains("end of env"), "{log}");
    assert!(
        !log.contains("REPO_TOKEN"),
        "the build has no such variable: {log}"
    );
    assert!(!log.contains("private-repository-token"), "{log}");
    assert!(!log.contains("x-access-token"), "{log}");

    // A push of a new commit: the mirror fetches it, with the token.
    std::fs::write(work.join("test.sh"), "echo second commit tests pass\n").unwrap();
    let commit = sh(
        &work,
        &format!(
            "git commit -qam second && git push -q {} main && git rev-parse HEAD",
            bare.display()
        ),
    );
    let body = common::push_payload("acme", "private", "refs/heads/main", &commit);
    let r = d.api().webhook("push", "private-push-1", &body).await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    let b = d.api().finished(&id, WAIT).await;
    let log = d.api().log(&id).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("second commit tests pass"), "{log}");
    assert!(
        log.contains(&format!("at commit {}]", &commit[..12])),
        "{log}"
    );

    // A pull request from a fork: its build gets no secrets, but Decap
    // fetches its head with the token all the same (the build never sees it).
    std::fs::write(work.join("test.sh"), "echo \"the fork's tests pass\"\n").unwrap();
    let head = sh(
        &work,
        &format!(
            "git commit -qam fork && git push -q {} HEAD:refs/pull/7/head && git rev-parse HEAD",
            bare.display()
        ),
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/github/pull_request-opened.payload.json");
    let mut pr: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    pr["number"] = 7.into();
    pr["pull_request"]["number"] = 7.into();
    pr["pull_request"]["head"]["sha"] = head.clone().into();
    pr["pull_request"]["base"]["repo"]["name"] = "private".into();
    pr["pull_request"]["base"]["repo"]["owner"]["login"] = "acme".into();
    pr["pull_request"]["base"]["repo"]["full_name"] = "acme/private".into();
    pr["pull_request"]["head"]["repo"]["full_name"] = "mallory/private".into();
    let body = serde_json::to_vec(&pr).unwrap();
    let r = d
        .api()
        .webhook("pull_request", "private-fork-1", &body)
        .await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    let b = d.api().finished(&id, WAIT).await;
    let log = d.api().log(&id).await;
    assert_eq!(b["fromFork"], true, "{b}");
    assert_eq!(b["ref"], "refs/pull/7/head", "{b}");
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(log.contains("the fork's tests pass"), "{log}");
    assert!(!log.contains("private-repository-token"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_build_stopped_by_its_timeout_records_the_phase_it_was_in() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let slow = tmp.path().join("repos/slow");
    repo(
        &slow,
        &[
            ("test.sh", "echo testing; sleep 60; echo never\n"),
            (".decap.json", r#"{"setup": {"custom": ["echo ready"]}}"#),
        ],
    );
    let dir = scripts.join("acme/slow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("project.json"),
        format!(
            r#"{{"language": "shell", "repoUrl": "{}", "buildTimeoutSeconds": 2}}"#,
            slow.display()
        ),
    )
    .unwrap();
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &[]);
    let (b, log) = build_of(&d, "acme/slow").await;
    assert_eq!(b["status"], "timed_out", "{b}\n{log}");
    assert_eq!(
        phases(&b),
        vec![
            ("machine".to_owned(), Some(0)),
            ("setup".to_owned(), Some(0)),
            ("test".to_owned(), Some(143))
        ],
        "{b}"
    );
    assert!(log.contains("testing\n"), "{log}");
    assert!(!log.contains("never"), "{log}");
    assert!(
        log.contains("── phase test: failed (exit code 143) in "),
        "{log}"
    );
}

#[test]
fn the_readme_shows_the_presets_and_services_as_the_code_has_them() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    for table in [
        decap_core::preset::markdown_table(),
        decap_core::preset::services_table(),
    ] {
        assert!(
            readme.contains(&table),
            "README.md should hold this table, as the code has it:\n{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_too_large_to_hold_in_memory_is_streamed_to_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    let big = tmp.path().join("repos/big");
    repo(
        &big,
        &[(
            "test.sh",
            "echo \"the blob has $(wc -c < blob) bytes, sha256 $(sha256sum < blob | cut -c1-16)\"\n",
        )],
    );
    // 6 MiB that do not compress: more than the server holds in memory.
    let sum = sh(
        &big,
        "head -c 6291456 /dev/urandom > blob && git add blob && git commit -qm blob && sha256sum < blob | cut -c1-16",
    );
    preset_project(&scripts, "acme/big", "shell", &big.to_string_lossy(), "");
    readable(tmp.path());
    let d = Decap::start(&tmp.path().join("data"), &scripts, &[]);
    let (b, log) = build_of(&d, "acme/big").await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert!(
        log.contains(&format!("the blob has 6291456 bytes, sha256 {sum}")),
        "{log}"
    );
}
