//! What a `decap` built with fewer cargo features does: it serves the
//! shipped examples and builds them on the embedded default, and refuses
//! every backend it was built without, with a message naming the feature,
//! before it touches the data dir. `tests/run` runs this file against the
//! build the README starts (`--no-default-features`) as well as the full
//! one, where the refusals do not apply.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::Decap;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/build-scripts")
}

/// `decap serve` with these flags and variables, on a fresh data dir; it
/// must exit by itself. Answers its output and whether the data dir exists.
fn serve_refused(extra: &[&str], env: &[(&str, &str)]) -> (Output, bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_decap"))
        .args(["serve", "--listen", "127.0.0.1:0", "--sandbox", "none"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--scripts")
        .arg(examples())
        .args(extra)
        .env("DECAP_LOG", "warn")
        .env("DECAP_SECRETS_KEY_FILE", dir.path().join("key/secrets.key"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out, data.exists())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A backend asked for by flags or variables, and whether this build has it.
struct Case {
    feature: &'static str,
    built_in: bool,
    flags: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// Each backend a build may leave out, asked for as an operator would.
/// (In the full build none is left out, and their own tests start them.)
#[test]
fn backends_left_out_are_refused_by_name_before_the_data_dir_is_touched() {
    let cases = [
        Case {
            feature: "kubernetes",
            built_in: cfg!(feature = "kubernetes"),
            flags: &["--executor", "kubernetes"],
            env: &[],
        },
        Case {
            feature: "containers",
            built_in: cfg!(feature = "containers"),
            flags: &["--executor", "container"],
            env: &[],
        },
        Case {
            feature: "aws",
            built_in: cfg!(feature = "aws"),
            flags: &["--blob-store", "s3"],
            env: &[],
        },
        Case {
            feature: "aws",
            built_in: cfg!(feature = "aws"),
            flags: &[],
            env: &[("DECAP_DEFERRAL_QUEUE", "sqs")],
        },
        Case {
            feature: "aws",
            built_in: cfg!(feature = "aws"),
            flags: &["--bctool-direct"],
            env: &[],
        },
        Case {
            feature: "github",
            built_in: cfg!(feature = "github"),
            flags: &[],
            env: &[("DECAP_GITHUB_TOKEN", "ghp_x")],
        },
    ];
    for case in cases.iter().filter(|c| !c.built_in) {
        let (flags, env) = (case.flags, case.env);
        let (out, touched) = serve_refused(flags, env);
        let err = stderr(&out);
        assert!(!out.status.success(), "{flags:?} {env:?} was served");
        assert!(
            err.contains("was built without") && err.contains(&format!("`{}`", case.feature)),
            "{flags:?} {env:?}: {err}"
        );
        assert!(
            !touched,
            "{flags:?} {env:?}: the data dir was made before the refusal"
        );
    }
}

#[test]
fn the_aws_commands_and_bctool_direct_path_say_when_they_were_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Command::new(env!("CARGO_BIN_EXE_decap"))
        .args([
            "aws-resources",
            "policy",
            "--account-id",
            "123456789012",
            "--aws-region",
            "eu-west-1",
        ])
        .output()
        .unwrap();
    let bctool = Command::new(env!("CARGO_BIN_EXE_decap"))
        .args(["bctool", "--server", "http://127.0.0.1:9", "--build-id"])
        .arg(uuid::Uuid::now_v7().to_string())
        .args(["run", "--", "true"])
        .current_dir(dir.path())
        .env("DECAP_BCTOOL_DIRECT", "1")
        .env("DECAP_BCTOOL_RETRY_SECS", "0")
        .output()
        .unwrap();
    if cfg!(feature = "aws") {
        assert!(policy.status.success(), "{}", stderr(&policy));
        let policy: serde_json::Value = serde_json::from_slice(&policy.stdout).unwrap();
        assert!(policy["Statement"].is_array(), "{policy}");
        assert!(!stderr(&bctool).contains("was built without"));
    } else {
        assert!(!policy.status.success());
        assert!(stderr(&policy).contains("`aws`"), "{}", stderr(&policy));
        assert_eq!(bctool.status.code(), Some(70), "{}", stderr(&bctool));
        assert!(
            stderr(&bctool).contains("direct path") && stderr(&bctool).contains("`aws`"),
            "{}",
            stderr(&bctool)
        );
    }
}

#[test]
fn decapctl_notify_pr_says_when_github_was_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.txt");
    std::fs::write(&summary, "all good\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_decapctl"))
        .args(["--server", "http://127.0.0.1:9", "notify-pr"])
        .args(["--owner", "acme", "--repo", "widgets"])
        .args(["--commit", "6113728f27ae82c7b1a177c8d03f9e96e0adf246"])
        .arg("--summary-file")
        .arg(&summary)
        .args(["--token", "ghp_x", "--github-api-url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    if cfg!(feature = "github") {
        // It got as far as asking GitHub, which is not there.
        assert!(
            !stderr(&out).contains("was built without"),
            "{}",
            stderr(&out)
        );
    } else {
        assert!(
            stderr(&out).contains("built without") && stderr(&out).contains("`github`"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn the_shipped_examples_build_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let decap = Decap::start(&dir.path().join("data"), &examples(), &["--insecure-local"]);
    let api = decap.api();
    let projects = api.json("/api/v1/projects").await;
    let keys: Vec<String> = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["team"].as_str().unwrap(),
                p["project"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        keys.iter().any(|k| k == "examples/hello-world"),
        "{projects}"
    );
    for (project, branch) in [
        ("examples/hello-world", "main"),
        ("examples/from-a-repository", "feature/shout"),
    ] {
        let id = api.request(project, &[branch]).await.remove(0);
        let b = api.finished(&id, Duration::from_secs(120)).await;
        assert_eq!(
            b["status"],
            "succeeded",
            "{project} {branch}: {}",
            api.log(&id).await
        );
    }
}

/// Two replicas on the stores in their own data dirs split every build
/// between them: leader election asks for the shared ones, or refuses,
/// naming each store still embedded, before the data dir is made. Any
/// store still embedded is refused, and also asked for by variable.
#[test]
fn leader_election_on_the_embedded_stores_is_refused_before_the_data_dir_is_touched() {
    // Flags, variables, and the stores the refusal must name.
    type Refused<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Refused; 3] = [
        (
            &["--leader-election"],
            &[],
            &[
                "--build-store dynamodb",
                "--lock-store dynamodb",
                "--deferral-queue sqs",
                "--blob-store s3",
            ],
        ),
        (
            &[],
            &[("DECAP_LEADER_ELECTION", "true")],
            &["--build-store dynamodb"],
        ),
        (
            &[
                "--leader-election",
                "--build-store",
                "dynamodb",
                "--lock-store",
                "dynamodb",
                "--blob-store",
                "s3",
            ],
            &[],
            &["--deferral-queue sqs"],
        ),
    ];
    for (flags, env, named) in cases {
        let (out, touched) = serve_refused(flags, env);
        let err = stderr(&out);
        assert!(!out.status.success(), "{flags:?} {env:?} was served");
        assert!(!touched, "{flags:?} {env:?}: the data dir was made first");
        if flags.len() > 1 && !cfg!(feature = "aws") {
            // Refused first for the stores this build lacks.
            assert!(err.contains("was built without"), "{err}");
            continue;
        }
        assert!(
            err.contains("--leader-election") && err.contains("one replica"),
            "{flags:?} {env:?}: {err}"
        );
        for store in named {
            assert!(
                err.contains(store),
                "{flags:?} {env:?}: {store} not named in {err}"
            );
        }
        if flags.len() > 1 {
            assert!(!err.contains("--build-store dynamodb"), "{err}");
        }
    }
}
