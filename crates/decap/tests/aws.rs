//! `decap serve` on the AWS backends, against the test bed's S3 server and
//! DynamoDB Local.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::aws::{CREDENTIALS, env, sdk};
use common::{Decap, project};
use decap_core::build::BuildId;
use decap_core::ports::BuildStore;

#[tokio::test]
async fn builds_keep_their_records_in_dynamodb_and_their_logs_and_artifacts_in_s3() {
    round_trip(Bctool::ThroughTheServer).await;
}

#[tokio::test]
async fn bctool_ships_straight_to_s3_and_dynamodb_with_its_own_credentials() {
    round_trip(Bctool::Direct {
        secret: "decaptestsecret",
    })
    .await;
}

/// MinIO checks signatures and DynamoDB Local does not: the uploads are
/// denied, the result is recorded all the same, with the failures noted.
#[tokio::test]
async fn bctool_denied_by_s3_still_records_the_result_with_the_failure_noted() {
    round_trip(Bctool::Direct {
        secret: "not-the-secret",
    })
    .await;
}

#[derive(Clone, Copy, PartialEq)]
enum Bctool {
    ThroughTheServer,
    Direct { secret: &'static str },
}

async fn round_trip(bctool: Bctool) {
    let world = common::aws::World::create().await;
    let common::aws::World {
        s3,
        sdk,
        admin,
        logs,
        artifacts,
        tables,
        ..
    } = &world;
    let (s3, sdk, admin, logs, artifacts, tables) = (
        s3.clone(),
        sdk.clone(),
        admin.clone(),
        logs.clone(),
        artifacts.clone(),
        tables.clone(),
    );

    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/cloud",
        r#"{"buildImage": "x"}"#,
        "echo to the cloud\nenv | grep -i -e decaptest -e DECAP_BCTOOL && echo LEAKED\n\
         echo kept > \"$ARTIFACTS_DIR/kept.txt\"\nsleep 0.5\n",
    );
    let mut args: Vec<&str> = world.args.iter().map(String::as_str).collect();
    args.extend(["--max-builds", "1"]);
    if let Bctool::Direct { secret } = bctool {
        args.extend([
            "--bctool-direct",
            "--bctool-aws-access-key-id",
            "decaptest",
            "--bctool-aws-secret-access-key",
            secret,
        ]);
    }
    let decap = Decap::start_with_env(&dir.path().join("data"), &scripts, &args, &CREDENTIALS);
    let api = decap.api();
    let denied = bctool
        == Bctool::Direct {
            secret: "not-the-secret",
        };
    // Three builds under a cap of one: two wait on the SQS queue and run in turn.
    let ids = api
        .request("acme/cloud", &["main", "second", "third"])
        .await;
    let deferred = api.json("/api/v1/deferred").await;
    assert_eq!(
        deferred["deferred"].as_array().unwrap().len(),
        2,
        "{deferred}"
    );
    for id in &ids {
        let b = api.finished(id, Duration::from_secs(60)).await;
        if denied {
            assert_eq!(b["status"], "succeeded", "{b}");
            let message = b["message"].as_str().unwrap();
            assert!(
                message.contains("uploading the console log failed")
                    && message.contains("uploading the artifacts failed")
                    && message.contains("SignatureDoesNotMatch (HTTP 403)"),
                "{b}"
            );
        } else {
            assert_eq!(b["status"], "succeeded", "{b}");
        }
    }
    assert!(
        api.json("/api/v1/deferred").await["deferred"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let log = api
        .get(&format!("/api/v1/logs/{}", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    // (denied: the server kept the live console as the log)
    assert_eq!(
        common::script_lines(&log),
        "to the cloud\n",
        "and no credentials in the script's env"
    );
    if denied {
        return;
    }
    let kept = api
        .get(&format!("/api/v1/artifacts/{}/kept.txt", ids[0]))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(kept, "kept\n");

    // a presigned download goes straight to S3
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = no_redirects
        .get(format!(
            "{}/api/v1/artifacts/{}?presigned=true",
            decap.url, ids[0]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 307);
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3), "{location}");
    let direct = reqwest::get(&location).await.unwrap();
    assert_eq!(direct.status(), 200);
    let through = api
        .get(&format!("/api/v1/artifacts/{}", ids[0]))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        direct.bytes().await.unwrap(),
        through,
        "the same tarball either way"
    );

    // where they really are
    let key = format!("v1/{}/console.log.gz", ids[0]);
    admin
        .head_object()
        .bucket(&logs)
        .key(&key)
        .send()
        .await
        .unwrap();
    admin
        .head_object()
        .bucket(&artifacts)
        .key(format!("v1/{}/artifacts.tar.gz", ids[0]))
        .send()
        .await
        .unwrap();
    let store = decap_aws::DynamoDbBuildStore::connect(&sdk, tables.clone())
        .await
        .unwrap();
    let record = store
        .get(BuildId::parse(&ids[0]).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status.as_str(), "succeeded");
    let locks = decap_aws::DynamoDbLockStore::connect(&sdk, tables)
        .await
        .unwrap();
    assert!(
        decap_core::ports::LockStore::list(&locks)
            .await
            .unwrap()
            .is_empty(),
        "the lock was released in DynamoDB"
    );
}

#[test]
fn a_missing_bucket_stops_decap_at_start_up_with_a_clear_error() {
    let s3 = env("DECAP_TEST_S3_ENDPOINT");
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    project(&scripts, "acme/x", r#"{"buildImage": "x"}"#, "true\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_decap"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--blob-store",
            "s3",
            "--s3-path-style",
            "--s3-endpoint",
            &s3,
        ])
        .args(["--s3-logs-bucket", "no-such-bucket-for-decap"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--scripts")
        .arg(&scripts)
        .envs(CREDENTIALS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-bucket-for-decap") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn aws_resources_are_created_described_and_deleted_from_the_command_line() {
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let (s3, ddb, sqs) = (
        env("DECAP_TEST_S3_ENDPOINT"),
        env("DECAP_TEST_DYNAMODB_ENDPOINT"),
        env("DECAP_TEST_SQS_ENDPOINT"),
    );
    let names = [
        ("DECAP_S3_LOGS_BUCKET", format!("cli-logs-{tag}")),
        ("DECAP_S3_ARTIFACTS_BUCKET", format!("cli-artifacts-{tag}")),
        ("DECAP_DYNAMODB_BUILDS_TABLE", format!("cli-builds-{tag}")),
        (
            "DECAP_DYNAMODB_DELIVERIES_TABLE",
            format!("cli-deliveries-{tag}"),
        ),
        ("DECAP_DYNAMODB_LOCKS_TABLE", format!("cli-locks-{tag}")),
        (
            "DECAP_DYNAMODB_DEFERRED_TABLE",
            format!("cli-deferred-{tag}"),
        ),
        ("DECAP_SQS_QUEUE_NAME", format!("cli-{tag}.fifo")),
        ("DECAP_S3_ENDPOINT", s3),
        ("DECAP_S3_PATH_STYLE", "true".to_owned()),
        ("DECAP_DYNAMODB_ENDPOINT", ddb),
        ("DECAP_SQS_ENDPOINT", sqs),
        ("DECAP_IAM_ENDPOINT", env("DECAP_TEST_IAM_ENDPOINT")),
        ("DECAP_IAM_USER", format!("cli-decap-{tag}")),
        ("DECAP_IAM_ROLE", format!("cli-decap-role-{tag}")),
        ("DECAP_IAM_BCTOOL_USER", format!("cli-bctool-{tag}")),
    ];
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_decap"))
            .arg("aws-resources")
            .args(args)
            .envs(CREDENTIALS)
            .envs(names.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let create = [
        "create",
        "--account-id",
        "123456789012",
        "--iam-oidc-provider",
        "oidc.eks.eu-west-1.amazonaws.com/id/TEST",
    ];
    let created = run(&create);
    assert!(created.contains("--sqs-queue-url http"), "{created}");
    for identity in [
        format!(":user/cli-decap-{tag} holds its policy"),
        format!(":user/cli-bctool-{tag} holds its policy"),
        format!(":role/cli-decap-role-{tag} holds its policy"),
    ] {
        assert!(created.contains(&identity), "{identity}: {created}");
    }
    assert_eq!(run(&create), created, "creating twice changes nothing");
    let policy: serde_json::Value = serde_json::from_str(&run(&[
        "policy",
        "--account-id",
        "123456789012",
        "--aws-region",
        "eu-west-1",
    ]))
    .unwrap();
    let text = policy.to_string();
    assert!(
        text.contains(&format!(
            "arn:aws:dynamodb:eu-west-1:123456789012:table/cli-builds-{tag}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("arn:aws:s3:::cli-logs-{tag}/*")),
        "{text}"
    );
    let bctool: serde_json::Value = serde_json::from_str(&run(&[
        "policy",
        "--for",
        "bctool",
        "--account-id",
        "123456789012",
        "--aws-region",
        "eu-west-1",
    ]))
    .unwrap();
    let text = bctool.to_string();
    assert!(
        text.contains(&format!("arn:aws:s3:::cli-artifacts-{tag}/v1/*"))
            && text.contains("s3:PutObject")
            && !text.contains("s3:GetObject")
            && !text.contains("dynamodb:DeleteItem")
            && !text.contains("sqs:"),
        "{text}"
    );
    run(&["delete"]);
    run(&["delete"]);
}

/// Runs a test-bed script with its own state folder, so this test's MinIO
/// can be stopped without touching the shared one.
fn bed(script: &str, action: &str, state: &std::path::Path) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/bed")
        .join(script);
    let out = std::process::Command::new(path)
        .arg(action)
        .env("DECAP_TEST_BED_DIR", state)
        .env_remove("DECAP_TEST_S3_PORT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn s3_going_down_mid_build_is_retried_and_the_result_is_recorded_with_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bed");
    let exports = bed("minio.sh", "start", &state);
    // Stopped however the test ends.
    struct Stop(std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bed/minio.sh"),
            )
            .arg("stop")
            .env("DECAP_TEST_BED_DIR", &self.0)
            .status();
        }
    }
    let _stop = Stop(state.clone());
    let endpoint = exports
        .lines()
        .find_map(|l| l.strip_prefix("export DECAP_TEST_S3_ENDPOINT="))
        .unwrap()
        .to_owned();
    let sdk = sdk().await;
    let admin = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .build(),
    );
    for bucket in ["down-logs", "down-artifacts"] {
        admin.create_bucket().bucket(bucket).send().await.unwrap();
    }
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/down",
        r#"{"buildImage": "x"}"#,
        "echo working\nsleep 1\necho done\n",
    );
    let args = [
        "--blob-store",
        "s3",
        "--s3-endpoint",
        &endpoint,
        "--s3-path-style",
        "--s3-logs-bucket",
        "down-logs",
        "--s3-artifacts-bucket",
        "down-artifacts",
    ];
    let decap = Decap::start_with_env(&dir.path().join("data"), &scripts, &args, &CREDENTIALS);
    let api = decap.api();
    let ids = api.request("acme/down", &["main"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bed("minio.sh", "stop", &state);
    let b = api.finished(&ids[0], Duration::from_secs(120)).await;
    assert_eq!(
        b["status"], "succeeded",
        "the build's own result stands: {b}"
    );
    let message = b["message"].as_str().unwrap_or("");
    assert!(
        message.contains("uploading the console log failed"),
        "the failure is noted: {b}"
    );
    assert!(
        api.json("/api/v1/locks").await["locks"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the lock is released"
    );
}
