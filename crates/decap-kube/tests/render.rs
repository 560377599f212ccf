//! Build pods rendered from fixture scripts, compared with snapshots
//! (`tests/snapshots/`; after an intended change, review and accept them
//! with `INSTA_UPDATE=always cargo test -p decap-kube --test render`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::ProjectKey;
use decap_core::ports::LaunchSpec;
use decap_core::refs::GitRef;
use decap_kube::KubeExecutorConfig;
use decap_kube::labels::is_valid_label_value;
use decap_kube::pod::{render, sidecars};
use time::OffsetDateTime;

fn fixtures() -> decap_core::catalog::Catalog {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scripts");
    decap_scripts::load_catalog(
        &root,
        Some("0123456789abcdef0123456789abcdef01234567".into()),
    )
    .unwrap()
}

fn spec(project: &str, branch: &str) -> LaunchSpec {
    let catalog = fixtures();
    let key = ProjectKey::new("acme", project).unwrap();
    let entry = catalog.project(&key).unwrap().clone();
    let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    let mut build = Build::new(
        key,
        &GitRef::branch(branch).unwrap(),
        Some("feedfacefeedfacefeedfacefeedfacefeedface".into()),
        Trigger::Manual,
        at,
    );
    build.id = BuildId(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0001,
    ));
    build.transition(BuildStatus::Running, at).unwrap();
    build.scripts_commit = Some(catalog.commit.clone());
    LaunchSpec {
        timeout: Duration::from_secs(900),
        project: entry,
        build,
        build_token: "build-token-for-tests".into(),
        decap_url: "http://decap.decap-system.svc".into(),
        max_log_bytes: 32 << 20,
        bctool_env: vec![
            ("DECAP_BCTOOL_DIRECT".into(), "1".into()),
            ("DECAP_S3_LOGS_BUCKET".into(), "decap-console-logs".into()),
            ("DECAP_BCTOOL_AWS_ACCESS_KEY_ID".into(), "AKIDSECRET".into()),
            (
                "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY".into(),
                "very-secret".into(),
            ),
        ],
        secrets: Vec::new(),
    }
}

#[test]
fn build_pod_with_a_sidecar() {
    let (pod, cm) = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    insta::assert_json_snapshot!("widgets_pod", pod);
    insta::assert_json_snapshot!("widgets_scripts", cm);
}

#[test]
fn a_service_account_token_only_when_the_project_asks() {
    let (pod, _) = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    let ps = pod.spec.unwrap();
    assert_eq!(ps.service_account_name.as_deref(), Some("decap-build"));
    assert_eq!(ps.automount_service_account_token, Some(false));
    let mut asks = spec("widgets", "main");
    let mut d = asks.project.descriptor.clone().unwrap();
    d.descriptor.service_account_name = Some("deployer".into());
    asks.project.descriptor = Some(d);
    let (pod, _) = render(&asks, &KubeExecutorConfig::default()).unwrap();
    let ps = pod.spec.unwrap();
    assert_eq!(ps.service_account_name.as_deref(), Some("deployer"));
    assert_eq!(ps.automount_service_account_token, Some(true));
}

#[test]
fn credentials_never_reach_the_pod_spec() {
    let (pod, _) = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    let json = serde_json::to_string(&pod).unwrap();
    assert!(!json.contains("AKIDSECRET"));
    assert!(!json.contains("very-secret"));
    // The non-secret settings do.
    assert!(json.contains("decap-console-logs"));
}

#[test]
fn long_and_odd_branches_get_valid_distinct_labels() {
    let branches = [
        "feature/Login_ÜBER",
        "feature-login-uber",
        &format!("release/{}", "x".repeat(80)),
        &format!("release/{}", "x".repeat(81)),
    ];
    let mut labels = std::collections::HashSet::new();
    for branch in branches {
        let (pod, _) = render(&spec("widgets", branch), &KubeExecutorConfig::default()).unwrap();
        let meta = pod.metadata;
        let label = meta.labels.unwrap()["branch"].clone();
        assert!(is_valid_label_value(&label), "{branch:?} → {label:?}");
        assert!(labels.insert(label), "{branch:?} collided");
        assert_eq!(meta.annotations.unwrap()["decap.io/branch"], branch);
    }
}

#[test]
fn a_sidecar_that_is_not_a_container_is_refused() {
    let catalog = fixtures();
    let entry = catalog
        .project(&ProjectKey::new("acme", "badsidecar").unwrap())
        .unwrap();
    let err = sidecars(entry).unwrap_err();
    assert!(err.contains("not a valid Kubernetes Container"), "{err}");
    let err = render(&spec("badsidecar", "main"), &KubeExecutorConfig::default()).unwrap_err();
    assert!(err.contains("not a valid Kubernetes Container"), "{err}");
}
