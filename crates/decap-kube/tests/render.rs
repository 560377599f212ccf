//! Build pods rendered from fixture scripts, compared with snapshots
//! (`tests/snapshots/`; after an intended change, review and accept them
//! with `INSTA_UPDATE=always cargo test -p decap-kube --test render`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::ProjectKey;
use decap_core::ports::LaunchSpec;
use decap_core::refs::GitRef;
use decap_kube::KubeExecutorConfig;
use decap_kube::labels::is_valid_label_value;
use decap_kube::pod::{render, sidecars};
use time::OffsetDateTime;

/// Where this checkout is as the test runs (cargo sets it), not where the
/// binary was compiled: a target folder shared by two checkouts may hold a
/// test built in the other.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
        .into()
}

fn fixtures() -> decap_core::catalog::Catalog {
    let root = manifest_dir().join("tests/fixtures/scripts");
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
    let r = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    // The snapshots of this checkout, for the same reason as the fixtures.
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(manifest_dir().join("tests/snapshots"));
    settings.bind(|| {
        insta::assert_json_snapshot!("widgets_pod", r.pod);
        insta::assert_json_snapshot!("widgets_scripts", r.scripts);
    });
}

#[test]
fn the_build_token_lives_in_its_own_secret_never_in_the_pod_spec() {
    let r = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    let pod = serde_json::to_string(&r.pod).unwrap();
    assert!(!pod.contains("build-token-for-tests"), "{pod}");
    let name = r.token.metadata.name.clone().unwrap();
    assert!(pod.contains(&name), "the pod refers to the token's Secret");
    assert_eq!(
        r.token.string_data.unwrap()["token"],
        "build-token-for-tests"
    );
    assert!(
        pod.contains("\"--mask-env\",\"DECAP_BUILD_TOKEN\""),
        "{pod}"
    );
}

#[test]
fn pods_pass_the_restricted_pod_security_level_unless_the_project_asks_for_more() {
    let r = render(&spec("widgets", "main"), &KubeExecutorConfig::default()).unwrap();
    let ps = r.pod.spec.unwrap();
    let pod_sc = ps.security_context.unwrap();
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert_eq!(pod_sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    for c in ps
        .containers
        .iter()
        .chain(ps.init_containers.iter().flatten())
    {
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.unwrap().drop.unwrap(),
            vec!["ALL".to_owned()],
            "{}",
            c.name
        );
    }
    let mut asks = spec("widgets", "main");
    let mut d = asks.project.descriptor.clone().unwrap();
    d.descriptor.security_context =
        Some(serde_json::json!({"runAsUser": 0, "runAsNonRoot": false}));
    asks.project.descriptor = Some(d);
    let r = render(&asks, &KubeExecutorConfig::default()).unwrap();
    let build = &r.pod.spec.unwrap().containers[0];
    assert_eq!(
        build.security_context.as_ref().unwrap().run_as_user,
        Some(0)
    );
}

#[test]
fn a_service_account_token_only_when_the_project_asks() {
    let pod = render(&spec("widgets", "main"), &KubeExecutorConfig::default())
        .unwrap()
        .pod;
    let ps = pod.spec.unwrap();
    assert_eq!(ps.service_account_name.as_deref(), Some("decap-build"));
    assert_eq!(ps.automount_service_account_token, Some(false));
    let mut asks = spec("widgets", "main");
    let mut d = asks.project.descriptor.clone().unwrap();
    d.descriptor.service_account_name = Some("deployer".into());
    asks.project.descriptor = Some(d);
    let pod = render(&asks, &KubeExecutorConfig::default()).unwrap().pod;
    let ps = pod.spec.unwrap();
    assert_eq!(ps.service_account_name.as_deref(), Some("deployer"));
    assert_eq!(ps.automount_service_account_token, Some(true));
}

#[test]
fn credentials_never_reach_the_pod_spec() {
    let pod = render(&spec("widgets", "main"), &KubeExecutorConfig::default())
        .unwrap()
        .pod;
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
        let pod = render(&spec("widgets", branch), &KubeExecutorConfig::default())
            .unwrap()
            .pod;
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
    let err = render(&spec("badsidecar", "main"), &KubeExecutorConfig::default())
        .err()
        .unwrap();
    assert!(err.contains("not a valid Kubernetes Container"), "{err}");
}

#[test]
fn secrets_reach_the_build_through_its_secret_and_a_forks_build_gets_none() {
    let mut s = spec("widgets", "main");
    s.secrets = vec![("DEPLOY_KEY".into(), "hunter2-but-longer".into())];
    let r = render(&s, &KubeExecutorConfig::default()).unwrap();
    let pod = serde_json::to_string(&r.pod).unwrap();
    assert!(!pod.contains("hunter2"), "{pod}");
    assert!(pod.contains("secret.DEPLOY_KEY"), "{pod}");
    assert!(pod.contains("\"--mask-env\",\"DEPLOY_KEY\""), "{pod}");
    assert_eq!(
        r.token.string_data.unwrap()["secret.DEPLOY_KEY"],
        "hunter2-but-longer"
    );
    // A fork's build: the name, empty, in plain sight; nothing in its Secret.
    s.secrets = vec![("DEPLOY_KEY".into(), String::new())];
    let r = render(&s, &KubeExecutorConfig::default()).unwrap();
    let env = r.pod.spec.unwrap().containers[0].env.clone().unwrap();
    let var = env.iter().find(|e| e.name == "DEPLOY_KEY").unwrap();
    assert_eq!(var.value.as_deref(), Some(""));
    assert!(
        !r.token
            .string_data
            .unwrap()
            .contains_key("secret.DEPLOY_KEY")
    );
}

#[test]
fn the_services_of_the_preset_catalog_are_valid_restricted_sidecars() {
    let mut s = spec("widgets", "main");
    s.project.sidecars = decap_core::preset::SERVICES
        .iter()
        .map(|service| service.sidecar(None))
        .collect();
    let containers = sidecars(&s.project).unwrap();
    assert_eq!(containers.len(), decap_core::preset::SERVICES.len());
    for (c, service) in containers.iter().zip(decap_core::preset::SERVICES) {
        assert_eq!(c.name, service.name);
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        let probe = c.readiness_probe.clone().unwrap();
        assert!(probe.exec.is_some(), "{}", c.name);
    }
    let pod = render(&s, &KubeExecutorConfig::default()).unwrap().pod;
    let names: Vec<String> = pod
        .spec
        .unwrap()
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    for service in decap_core::preset::SERVICES {
        assert!(names.contains(&service.name.to_owned()), "{names:?}");
    }
}
