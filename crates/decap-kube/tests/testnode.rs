//! The test node against the test bed's real kube-apiserver: pods are bound,
//! run under bubblewrap, and reported as a kubelet would.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use decap_kube::k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerStateTerminated, ContainerStatus, EnvVar,
    EnvVarSource, Namespace, ObjectFieldSelector, Pod, PodSpec, Volume, VolumeMount,
};
use decap_kube::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use decap_kube::kube::api::{DeleteParams, PostParams};
use decap_kube::kube::{Api, Client};
use decap_kube::testnode::{self, TestNode, TestNodeConfig};

const WAIT: Duration = Duration::from_secs(30);

fn kubeconfig() -> PathBuf {
    PathBuf::from(std::env::var("DECAP_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_KUBECONFIG is not set: run the tests through tests/run, which starts \
             the Kubernetes test bed (tests/bed/kube.sh)"
        )
    }))
}

/// A fresh namespace and a test node running its pods.
async fn setup(test: &str) -> (Client, String, TestNode) {
    static N: AtomicU32 = AtomicU32::new(0);
    let client = decap_kube::client(Some(&kubeconfig())).await.unwrap();
    let ns = format!(
        "tn-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    namespaces.create(&PostParams::default(), &n).await.unwrap();
    let node = testnode::start(
        client.clone(),
        TestNodeConfig {
            node_name: format!("node-{ns}"),
            namespaces: vec![ns.clone()],
        },
    )
    .await
    .unwrap();
    (client, ns, node)
}

fn container(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        image: Some("debian:stable-slim".into()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..Container::default()
    }
}

fn pod(name: &str, spec: PodSpec) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            ..spec
        }),
        ..Pod::default()
    }
}

/// Polls the pod until `done` holds, or panics with its last state.
async fn wait_for(api: &Api<Pod>, name: &str, what: &str, done: impl Fn(&Pod) -> bool) -> Pod {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < WAIT {
        if let Some(p) = api.get_opt(name).await.unwrap() {
            if done(&p) {
                return p;
            }
            last = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "pod {name}: {what} not reached in {WAIT:?}; last seen: {:#?}",
        last.map(|p| p.status)
    );
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn terminal(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

fn statuses(p: &Pod, init: bool) -> &[ContainerStatus] {
    let s = p.status.as_ref().unwrap();
    if init {
        s.init_container_statuses.as_deref().unwrap_or_default()
    } else {
        s.container_statuses.as_deref().unwrap_or_default()
    }
}

fn terminated<'a>(p: &'a Pod, init: bool, name: &str) -> &'a ContainerStateTerminated {
    let st = statuses(p, init)
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for container {name}"));
    st.state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .unwrap_or_else(|| panic!("container {name} is not terminated: {st:#?}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a process whose command line holds `marker` runs on the host.
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
            .unwrap_or(false)
    })
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "{what} not reached in {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_container_sidecar_and_config_map_work_together() {
    let (client, ns, node) = setup("full").await;
    let port = free_port();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("scripts".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "hello.sh".to_owned(),
            "#!/bin/sh\necho \"script ran in $(pwd)\"\n".to_owned(),
        )])),
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();

    let shared = VolumeMount {
        name: "shared".into(),
        mount_path: "/shared".into(),
        ..VolumeMount::default()
    };
    let prepare = Container {
        volume_mounts: Some(vec![shared.clone()]),
        ..container("prepare", "echo from-init > /shared/init.txt")
    };
    let web = Container {
        restart_policy: Some("Always".into()),
        command: Some(vec![
            "python3".into(),
            "-m".into(),
            "http.server".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            "/shared".into(),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            read_only: Some(true),
            ..shared.clone()
        }]),
        ..container("web", "")
    };
    let script = format!(
        r#"set -eu
test "$(cat /shared/init.txt)" = from-init
for i in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:{port}/init.txt > /tmp/got 2>/dev/null; then break; fi
  sleep 0.1
done
test "$(cat /tmp/got)" = from-init
out="$(/decap/scripts/hello.sh)"
test "$out" = "script ran in /decap/work/src"
test "$POD_NAME" = full
test "$POD_NAMESPACE" = "$EXPECTED_NS"
test "$GREETING" = "hello {ns}"
echo all good
"#
    );
    let main = Container {
        working_dir: Some("/decap/work/src".into()),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: "POD_NAMESPACE".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.namespace".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: "EXPECTED_NS".into(),
                value: Some(ns.clone()),
                ..EnvVar::default()
            },
            EnvVar {
                name: "GREETING".into(),
                value: Some("hello $(EXPECTED_NS)".into()),
                ..EnvVar::default()
            },
        ]),
        volume_mounts: Some(vec![
            VolumeMount {
                read_only: Some(true),
                ..shared.clone()
            },
            VolumeMount {
                name: "scripts".into(),
                mount_path: "/decap/scripts".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "work".into(),
                mount_path: "/decap/work".into(),
                ..VolumeMount::default()
            },
        ]),
        ..container("main", &script)
    };
    let spec = PodSpec {
        init_containers: Some(vec![prepare, web]),
        containers: vec![main],
        volumes: Some(vec![
            Volume {
                name: "shared".into(),
                empty_dir: Some(Default::default()),
                ..Volume::default()
            },
            Volume {
                name: "work".into(),
                empty_dir: Some(Default::default()),
                ..Volume::default()
            },
            Volume {
                name: "scripts".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: "scripts".into(),
                    default_mode: Some(0o755),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod("full", spec))
        .await
        .unwrap();

    let p = wait_for(&pods, "full", "a terminal phase", terminal).await;
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(
        spec.node_name.as_deref(),
        Some(node.node_name()),
        "bound to the node"
    );
    let main = terminated(&p, false, "main");
    assert_eq!(phase(&p), "Succeeded", "main: {main:#?}");
    assert_eq!(main.exit_code, 0);
    assert_eq!(main.reason.as_deref(), Some("Completed"));
    let prepare = terminated(&p, true, "prepare");
    assert_eq!(prepare.exit_code, 0);
    let web = terminated(&p, true, "web");
    let (main_end, web_end) = (
        main.finished_at.as_ref().unwrap().0,
        web.finished_at.as_ref().unwrap().0,
    );
    assert!(web_end >= main_end, "the sidecar stopped after the build");
    let web_start = web.started_at.as_ref().unwrap().0;
    let main_start = main.started_at.as_ref().unwrap().0;
    assert!(web_start <= main_start, "the sidecar started first");
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
    assert!(status.start_time.is_some());
    let cond = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    assert_eq!(cond("PodScheduled").as_deref(), Some("True"));
    assert_eq!(cond("Initialized").as_deref(), Some("True"));
    assert_eq!(cond("Ready").as_deref(), Some("False"));
    wait_until("no pod running on the node", || node.running_pods() == 0).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_container_fails_the_pod_with_its_output() {
    let (client, ns, node) = setup("fail").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let spec = PodSpec {
        containers: vec![container(
            "main",
            "echo some output; echo 'it broke here' >&2; exit 3",
        )],
        ..PodSpec::default()
    };
    pods.create(&PostParams::default(), &pod("fail", spec))
        .await
        .unwrap();
    let p = wait_for(&pods, "fail", "a terminal phase", terminal).await;
    assert_eq!(phase(&p), "Failed");
    let main = terminated(&p, false, "main");
    assert_eq!(main.exit_code, 3, "{main:#?}");
    assert_eq!(main.reason.as_deref(), Some("Error"));
    let message = main.message.as_deref().unwrap_or_default();
    assert!(message.contains("it broke here"), "message: {message:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_is_stopped_and_removed() {
    let (client, ns, node) = setup("delete").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // A duration nobody else sleeps, to find the process on the host.
    let marker = format!("300.{}{}", std::process::id(), ns.len());
    let spec = PodSpec {
        termination_grace_period_seconds: Some(30),
        containers: vec![Container {
            command: Some(vec!["sleep".into(), marker.clone()]),
            ..container("main", "")
        }],
        ..PodSpec::default()
    };
    pods.create(&PostParams::default(), &pod("sleeper", spec))
        .await
        .unwrap();
    wait_for(&pods, "sleeper", "Running", |p| phase(p) == "Running").await;
    wait_until("the process runs", || process_with(&marker)).await;
    assert_eq!(node.running_pods(), 1);

    let deleted = Instant::now();
    pods.delete(
        "sleeper",
        &DeleteParams {
            grace_period_seconds: Some(2),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    loop {
        if pods.get_opt("sleeper").await.unwrap().is_none() {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "the pod is still there 10 s after its deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!process_with(&marker), "the container's process is gone");
    wait_until("no pod running on the node", || node.running_pods() == 0).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_deadline_fails_the_pod() {
    let (client, ns, node) = setup("deadline").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let marker = format!("300.{}{}1", std::process::id(), ns.len());
    let spec = PodSpec {
        active_deadline_seconds: Some(1),
        containers: vec![Container {
            command: Some(vec!["sleep".into(), marker.clone()]),
            ..container("main", "")
        }],
        ..PodSpec::default()
    };
    pods.create(&PostParams::default(), &pod("late", spec))
        .await
        .unwrap();
    let p = wait_for(&pods, "late", "a terminal phase", terminal).await;
    assert_eq!(phase(&p), "Failed");
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("deadline")
    );
    assert_ne!(terminated(&p, false, "main").exit_code, 0);
    assert!(!process_with(&marker), "the container's process is gone");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_config_map_fails_the_pod_and_an_optional_one_does_not() {
    let (client, ns, node) = setup("missing").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let with_cm = |optional: bool| PodSpec {
        containers: vec![Container {
            volume_mounts: Some(vec![VolumeMount {
                name: "cfg".into(),
                mount_path: "/cfg".into(),
                ..VolumeMount::default()
            }]),
            ..container("main", "test -d /cfg && test -z \"$(ls -A /cfg)\"")
        }],
        volumes: Some(vec![Volume {
            name: "cfg".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "nope".into(),
                optional: Some(optional),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };
    pods.create(&PostParams::default(), &pod("required", with_cm(false)))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("optional", with_cm(true)))
        .await
        .unwrap();

    let p = wait_for(&pods, "required", "a terminal phase", terminal).await;
    assert_eq!(phase(&p), "Failed");
    let waiting = statuses(&p, false)[0]
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .unwrap();
    assert_eq!(
        waiting.reason.as_deref(),
        Some("CreateContainerConfigError")
    );
    assert!(
        waiting
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("nope")
    );

    let p = wait_for(&pods, "optional", "a terminal phase", terminal).await;
    assert_eq!(phase(&p), "Succeeded", "{:#?}", p.status);
    node.shutdown().await;
}
