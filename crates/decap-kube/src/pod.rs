//! The pod (and the scripts ConfigMap) of one build.
//!
//! Layout inside the pod, the same for every build image:
//!
//! | path | what |
//! | --- | --- |
//! | `/decap/bin/bctool` | bctool, copied in by the `decap-bctool` init container from the Decap image |
//! | `/decap/scripts` | the project's folder of the build-scripts repo at the commit pinned at launch (a ConfigMap, read-only) |
//! | `/decap/workspace/{src,artifacts,home,tmp}` | the build's workspace (an emptyDir); `src` is the working directory |
//! | `/decap/credentials` | the `decap-credentials` Secret, when it exists (read-only, build container only) |
//!
//! Sidecars are native sidecars (init containers with `restartPolicy:
//! Always`): they start before the build, share its network (so they are on
//! `localhost`), and are stopped once the build container ends, so the pod
//! completes.

use std::collections::BTreeMap;

use decap_core::catalog::ProjectEntry;
use decap_core::ports::LaunchSpec;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, KeyToPath,
    Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::KubeExecutorConfig;
use crate::labels::label_value;

/// The label every build pod (and scripts ConfigMap) carries.
pub const TYPE_LABEL: (&str, &str) = ("type", "decap-build");
/// Annotations with the full, unsanitized values.
pub const ANNOTATION_PREFIX: &str = "decap.io/";
/// The build container's name.
pub const BUILD_CONTAINER: &str = "build";
/// The init container that brings bctool.
pub const BCTOOL_CONTAINER: &str = "decap-bctool";
/// Where bctool is copied.
pub const BIN_DIR: &str = "/decap/bin";
/// Where the project's scripts are mounted.
pub const SCRIPTS_DIR: &str = "/decap/scripts";
/// The build's workspace.
pub const WORKSPACE_DIR: &str = "/decap/workspace";
/// Where the credentials Secret is mounted (documented for build images).
pub const CREDENTIALS_DIR: &str = "/decap/credentials";
/// Seconds of slack between bctool's own timeout and the pod's deadline.
const DEADLINE_SLACK_SECS: u64 = 120;

/// bctool's settings that are secrets: never written into a pod spec (the
/// pod reads its credentials from the mounted Secret instead).
const SECRET_VARS: &[&str] = &[
    "DECAP_BCTOOL_AWS_ACCESS_KEY_ID",
    "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY",
    "DECAP_BCTOOL_AWS_SESSION_TOKEN",
];

/// The name of a build's scripts ConfigMap.
pub fn scripts_config_map_name(pod_name: &str) -> String {
    format!("{pod_name}-scripts")
}

/// The name of the Secret holding a build's token: the token is never
/// written into the pod spec, where anyone who may read pods would see it.
pub fn token_secret_name(pod_name: &str) -> String {
    format!("{pod_name}-token")
}

/// The user build pods run as unless their image or project says otherwise.
pub const BUILD_USER: i64 = 1000;

/// A container's settings for the `restricted` Pod Security Standard: no
/// privilege escalation, no capabilities.
fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The pod's settings for the `restricted` Pod Security Standard: not root,
/// the runtime's seccomp profile.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(BUILD_USER),
        run_as_group: Some(BUILD_USER),
        fs_group: Some(BUILD_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The build container's security settings: restricted, unless the project
/// asks for more with `securityContext` in project.json.
fn build_security(
    descriptor: &decap_core::descriptor::Descriptor,
) -> Result<SecurityContext, String> {
    match &descriptor.security_context {
        None => Ok(restricted()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| format!("securityContext is not a Kubernetes SecurityContext: {e}")),
    }
}

/// The project's sidecars as Kubernetes containers, or why they are not.
pub fn sidecars(entry: &ProjectEntry) -> Result<Vec<Container>, String> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entry.sidecars.len());
    for raw in &entry.sidecars {
        let mut c: Container = serde_json::from_value(raw.clone())
            .map_err(|e| format!("a sidecar is not a valid Kubernetes Container: {e}"))?;
        if c.name == BUILD_CONTAINER || c.name == BCTOOL_CONTAINER {
            return Err(format!(
                "sidecar name {:?} is reserved for Decap's own containers",
                c.name
            ));
        }
        if !names.insert(c.name.clone()) {
            return Err(format!("two sidecars are named {:?}", c.name));
        }
        if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
            return Err(format!("sidecar {:?} has no image", c.name));
        }
        // A sidecar that says nothing of its security runs restricted too;
        // one that says something has asked for it.
        if c.security_context.is_none() {
            c.security_context = Some(restricted());
        }
        if let Some(policy) = &c.restart_policy
            && policy != "Always"
        {
            return Err(format!(
                "sidecar {:?}: restartPolicy {policy:?} is not allowed (sidecars run for the whole build)",
                c.name
            ));
        }
        c.restart_policy = Some("Always".into());
        out.push(c);
    }
    Ok(out)
}

fn labels(spec: &LaunchSpec) -> BTreeMap<String, String> {
    let b = &spec.build;
    let mut labels = BTreeMap::from([
        (TYPE_LABEL.0.to_owned(), TYPE_LABEL.1.to_owned()),
        ("team".to_owned(), label_value(&b.project.team)),
        ("project".to_owned(), label_value(&b.project.project)),
        ("branch".to_owned(), label_value(&b.branch)),
    ]);
    // A pipeline's stage: `kubectl get pods -l stage=deploy`.
    if let Some(s) = &b.stage {
        labels.insert("stage".to_owned(), label_value(&s.name));
        labels.insert(
            "pipeline-run".to_owned(),
            label_value(&b.pipeline_run_id.to_string()),
        );
    }
    labels
}

fn annotations(spec: &LaunchSpec) -> BTreeMap<String, String> {
    let b = &spec.build;
    let mut a = BTreeMap::from([
        (format!("{ANNOTATION_PREFIX}build-id"), b.id.to_string()),
        (format!("{ANNOTATION_PREFIX}team"), b.project.team.clone()),
        (
            format!("{ANNOTATION_PREFIX}project"),
            b.project.project.clone(),
        ),
        (format!("{ANNOTATION_PREFIX}branch"), b.branch.clone()),
        (
            format!("{ANNOTATION_PREFIX}lock-key"),
            b.lock_key().to_string(),
        ),
    ]);
    if let Some(c) = &b.scripts_commit {
        a.insert(format!("{ANNOTATION_PREFIX}scripts-commit"), c.clone());
    }
    if let Some(c) = &b.commit {
        a.insert(format!("{ANNOTATION_PREFIX}commit"), c.clone());
    }
    a
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The build container's environment: the documented variables, the
/// descriptor's `env`, and bctool's own (non-secret) settings.
fn build_env(spec: &LaunchSpec) -> Vec<EnvVar> {
    let b = &spec.build;
    let ws = |sub: &str| format!("{WORKSPACE_DIR}/{sub}");
    let mut vars = vec![
        // bctool is on the build's PATH (`bctool unlock`, a preset's phases).
        env(
            "PATH",
            format!("{BIN_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ),
        env("HOME", ws("home")),
        env("TMPDIR", ws("tmp")),
        env("LANG", "C.UTF-8"),
    ];
    if let Some(d) = &spec.project.descriptor {
        vars.extend(d.descriptor.env.iter().map(|(k, v)| env(k, v.clone())));
    }
    // Secrets come from the build's own Secret, never from the pod spec; a
    // build that gets none (a fork's) sees their names, empty.
    vars.extend(spec.secrets.iter().map(|(name, value)| {
        if value.is_empty() {
            env(name, "")
        } else {
            EnvVar {
                name: name.clone(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_secret_name(&b.id.to_string()),
                        key: secret_key(name),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            }
        }
    }));
    vars.extend([
        env("BUILD_ID", b.id.to_string()),
        env("PROJECT_KEY", b.project.to_string()),
        env("BRANCH_TO_BUILD", b.branch.clone()),
        env("BUILD_LOCK_KEY", b.lock_key().to_string()),
        env("COMMIT_SHA", b.commit.clone().unwrap_or_default()),
        env("ARTIFACTS_DIR", ws("artifacts")),
        env("DECAP_URL", spec.decap_url.clone()),
        EnvVar {
            name: "DECAP_BUILD_TOKEN".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: token_secret_name(&b.id.to_string()),
                    key: "token".into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        },
        env(
            "DECAP_SCRIPTS_COMMIT",
            b.scripts_commit.clone().unwrap_or_default(),
        ),
        env("DECAP_BUILD_SCRIPTS", SCRIPTS_DIR),
        env("DECAP_CREDENTIALS_DIR", CREDENTIALS_DIR),
        // The build container always has a memory limit, so a memory
        // cgroup of its own: bctool reads from it whether a process was
        // killed for memory, and names the limit.
        env("DECAP_BCTOOL_CGROUP_MEMORY", "1"),
    ]);
    vars.extend(
        spec.bctool_env
            .iter()
            .filter(|(k, _)| !SECRET_VARS.contains(&k.as_str()))
            .map(|(k, v)| env(k, v.clone())),
    );
    vars
}

fn resources(spec: &LaunchSpec, config: &KubeExecutorConfig) -> ResourceRequirements {
    let asked = spec
        .project
        .descriptor
        .as_ref()
        .and_then(|d| d.descriptor.resources.clone())
        .unwrap_or_default();
    let cpu = asked.cpu.unwrap_or_else(|| config.default_cpu.clone());
    let memory = asked
        .memory
        .unwrap_or_else(|| config.default_memory.clone());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu)),
            ("memory".to_owned(), Quantity(memory.clone())),
        ])),
        // Memory is limited at what was asked for: a build that needs more
        // says so in project.json rather than starving its node.
        limits: Some(BTreeMap::from([("memory".to_owned(), Quantity(memory))])),
        ..ResourceRequirements::default()
    }
}

/// The script's command line: run directly when it has a shebang, with `sh`
/// otherwise.
fn script_command(entry: &ProjectEntry) -> Vec<String> {
    let shebang = entry
        .files
        .iter()
        .find(|f| f.path == "build.sh")
        .is_some_and(|f| f.content.starts_with(b"#!"));
    let script = format!("{SCRIPTS_DIR}/build.sh");
    if shebang {
        vec![script]
    } else {
        vec!["/bin/sh".into(), script]
    }
}

/// The scripts ConfigMap: one key per file (keys cannot hold `/`, so files
/// are `f0`, `f1`, … and the volume's items put them at their paths with
/// their modes).
fn scripts_config_map(
    spec: &LaunchSpec,
    name: &str,
    namespace: &str,
) -> Result<(ConfigMap, Vec<KeyToPath>), String> {
    let mut data = BTreeMap::new();
    let mut binary = BTreeMap::new();
    let mut items = Vec::new();
    for (i, file) in spec.project.files.iter().enumerate() {
        if file
            .path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!("unsafe script path {:?}", file.path));
        }
        let key = format!("f{i}");
        match std::str::from_utf8(&file.content) {
            Ok(text) => {
                data.insert(key.clone(), text.to_owned());
            }
            Err(_) => {
                binary.insert(key.clone(), ByteString(file.content.to_vec()));
            }
        }
        let executable = file.executable || file.path == "build.sh";
        items.push(KeyToPath {
            key,
            path: file.path.clone(),
            mode: Some(if executable { 0o755 } else { 0o644 }),
        });
    }
    let mut labels = labels(spec);
    labels.insert(TYPE_LABEL.0.to_owned(), "decap-build-scripts".to_owned());
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(scripts_config_map_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations(spec)),
            ..ObjectMeta::default()
        },
        data: Some(data),
        binary_data: (!binary.is_empty()).then_some(binary),
        immutable: Some(true),
    };
    Ok((cm, items))
}

/// The key of a build secret in the build's Secret (apart from `token`).
fn secret_key(name: &str) -> String {
    format!("secret.{name}")
}

/// The Secret holding a build's token and the values of its secrets.
fn token_secret(spec: &LaunchSpec, name: &str, namespace: &str) -> Secret {
    let mut data = BTreeMap::from([("token".to_owned(), spec.build_token.clone())]);
    data.extend(
        spec.secrets
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (secret_key(k), v.clone())),
    );
    let mut labels = labels(spec);
    labels.insert(TYPE_LABEL.0.to_owned(), "decap-build-token".to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations(spec)),
            ..ObjectMeta::default()
        },
        string_data: Some(data),
        immutable: Some(true),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// What a build needs created: its pod, its scripts ConfigMap and the
/// Secret holding its token.
pub struct Rendered {
    /// The pod.
    pub pod: Pod,
    /// The scripts.
    pub scripts: ConfigMap,
    /// The token.
    pub token: Secret,
}

/// The pod, scripts ConfigMap and token Secret of a build.
pub fn render(spec: &LaunchSpec, config: &KubeExecutorConfig) -> Result<Rendered, String> {
    let name = spec.build.id.to_string();
    let namespace = config.namespace.clone();
    let descriptor = spec
        .project
        .valid_descriptor()
        .ok_or_else(|| format!("project {} has no valid project.json", spec.build.project))?;
    let sidecars = sidecars(&spec.project)?;
    let (cm, items) = scripts_config_map(spec, &name, &namespace)?;
    let token = token_secret(spec, &name, &namespace);
    let build_security = build_security(&descriptor.descriptor)?;

    let bctool = format!("{BIN_DIR}/bctool");
    let mut command = vec![
        bctool,
        "run".into(),
        "--timeout-secs".into(),
        spec.timeout.as_secs().max(1).to_string(),
        "--kill-grace-secs".into(),
        config.kill_grace.as_secs().max(1).to_string(),
        "--max-log-bytes".into(),
        spec.max_log_bytes.to_string(),
    ];
    for name in
        std::iter::once("DECAP_BUILD_TOKEN").chain(spec.secrets.iter().map(|(k, _)| k.as_str()))
    {
        command.extend(["--mask-env".into(), name.to_owned()]);
    }
    command.push("--".into());
    command.extend(script_command(&spec.project));

    let mut install = config.bctool_command.clone();
    install.extend([
        "install".into(),
        BIN_DIR.into(),
        "--workspace".into(),
        WORKSPACE_DIR.into(),
    ]);
    let bctool_init = Container {
        name: BCTOOL_CONTAINER.into(),
        image: Some(config.bctool_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(install),
        volume_mounts: Some(vec![
            mount("decap-bin", BIN_DIR, false),
            mount("decap-workspace", WORKSPACE_DIR, false),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".into())),
                ("memory".to_owned(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("64Mi".into()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted()),
        ..Container::default()
    };
    let build = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(descriptor.descriptor.build_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(command),
        working_dir: Some(format!("{WORKSPACE_DIR}/src")),
        env: Some(build_env(spec)),
        resources: Some(resources(spec, config)),
        volume_mounts: Some(vec![
            mount("decap-bin", BIN_DIR, true),
            mount("decap-scripts", SCRIPTS_DIR, true),
            mount("decap-workspace", WORKSPACE_DIR, false),
            mount("decap-credentials", CREDENTIALS_DIR, true),
        ]),
        security_context: Some(build_security),
        ..Container::default()
    };
    let mut init = vec![bctool_init];
    init.extend(sidecars);

    let deadline = spec.timeout.as_secs() + config.kill_grace.as_secs() + DEADLINE_SLACK_SECS;
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels(spec)),
            annotations: Some(annotations(spec)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(i64::try_from(deadline).unwrap_or(i64::MAX)),
            termination_grace_period_seconds: Some(
                i64::try_from(config.kill_grace.as_secs()).unwrap_or(30),
            ),
            // No token unless the project asks for a service account.
            service_account_name: Some(
                descriptor
                    .descriptor
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| config.service_account.clone()),
            ),
            automount_service_account_token: Some(
                descriptor.descriptor.service_account_name.is_some(),
            ),
            enable_service_links: Some(false),
            security_context: Some(restricted_pod()),
            init_containers: Some(init),
            containers: vec![build],
            volumes: Some(vec![
                Volume {
                    name: "decap-bin".into(),
                    empty_dir: Some(Default::default()),
                    ..Volume::default()
                },
                Volume {
                    name: "decap-workspace".into(),
                    empty_dir: Some(Default::default()),
                    ..Volume::default()
                },
                Volume {
                    name: "decap-scripts".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: scripts_config_map_name(&spec.build.id.to_string()),
                        items: Some(items),
                        optional: Some(false),
                        default_mode: None,
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "decap-credentials".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(config.credentials_secret.clone()),
                        optional: Some(true),
                        default_mode: Some(0o400),
                        items: None,
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
        status: None,
    };
    Ok(Rendered {
        pod,
        scripts: cm,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_pod_is_labelled_with_its_stage_and_run() {
        let mut spec =
            decap_contract_tests::launch_spec("true\n", std::time::Duration::from_secs(5));
        assert!(
            !labels(&spec).contains_key("stage"),
            "a build of no pipeline"
        );
        spec.build.stage = Some(decap_core::pipeline::StageRef {
            name: "deploy".into(),
            attempt: 2,
            inputs: Default::default(),
            lock: None,
        });
        let l = labels(&spec);
        assert_eq!(l["stage"], "deploy");
        assert_eq!(l["pipeline-run"], spec.build.pipeline_run_id.to_string());
    }
}
