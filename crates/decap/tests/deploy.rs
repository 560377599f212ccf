//! Decap deployed as a user deploys it, on the test bed's real node: its
//! controller image built from `deploy/Dockerfile`, `kubectl apply -k` of
//! an overlay of `k8s-resources/` (the test image, the bed's S3, DynamoDB
//! and SQS), two replicas Ready; a signed webhook through the Service runs
//! a build pod from the base build image with its sidecar beside it, bctool
//! inside; its log and artifacts land in S3 and its result in DynamoDB, and
//! either replica shows the same build; `kubectl logs` works.
//!
//! These tests need the whole cluster (`tests/bed/node.sh cluster`: a
//! scheduler, a controller manager and kube-proxy), which would race the
//! other tests' stand-in nodes, so they are ignored by a plain `cargo test`
//! and `tests/run` runs them on their own after the rest:
//!
//! ```text
//! cargo test -p decap --test deploy -- --ignored
//! ```
#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, project, push_payload};
use decap_core::build::BuildId;
use decap_core::ports::BuildStore;
use decap_kube::k8s_openapi::api::core::v1::Pod;
use decap_kube::kube::api::ListParams;
use decap_kube::kube::{Api, Client};

const MINUTE: Duration = Duration::from_secs(60);
/// The Service's address, fixed by the overlay: the bed has no cluster DNS,
/// so build pods reach Decap by this address rather than by its name.
const SERVICE_IP: &str = "10.0.0.80";
const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the test bed's real node and cluster \
             (tests/bed/node.sh start, cluster and image); tests/run starts them"
        )
    })
}

async fn admin() -> Client {
    let kubeconfig = PathBuf::from(env("DECAP_TEST_KUBECONFIG"));
    decap_kube::client(Some(&kubeconfig)).await.unwrap()
}

/// `kubectl` with the bed's admin credentials, to be given its arguments.
fn kubectl_command() -> Command {
    let mut c = Command::new(env("KUBECTL"));
    c.arg("--kubeconfig").arg(env("DECAP_TEST_KUBECONFIG"));
    c
}

/// `kubectl` with the bed's admin credentials; its output, or a panic
/// with what it said.
fn kubectl(args: &[&str]) -> String {
    let out = kubectl_command().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a server on loopback reachable from pods: a TCP relay on the
/// node's address (pods reach the node, not its loopback). Returns the
/// URL to give pods.
async fn relay(upstream: &str) -> String {
    let url = reqwest::Url::parse(upstream).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let ip: IpAddr = env("DECAP_TEST_NODE_IP").parse().unwrap();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    format!("http://{ip}:{port}")
}

/// A build-scripts repository served over `git://` on the node's address
/// (stopped when dropped).
struct GitDaemon {
    child: std::process::Child,
    url: String,
}

impl GitDaemon {
    fn start(base: &Path, repo: &str) -> GitDaemon {
        let ip = env("DECAP_TEST_NODE_IP");
        let port = std::net::TcpListener::bind((ip.as_str(), 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // git-daemon itself, not `git daemon`, which would run it as a
        // child that outlives a kill.
        let exec_path = Command::new("git").arg("--exec-path").output().unwrap();
        let exec_path = String::from_utf8(exec_path.stdout).unwrap();
        let child = Command::new(Path::new(exec_path.trim()).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg(format!("--base-path={}", base.display()))
            .arg(format!("--listen={ip}"))
            .arg(format!("--port={port}"))
            .arg(base)
            .spawn()
            .unwrap();
        let daemon = GitDaemon {
            child,
            url: format!("git://{ip}:{port}/{repo}"),
        };
        for _ in 0..100 {
            let ok = Command::new("git")
                .args(["ls-remote", &daemon.url])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("git daemon did not serve {}", daemon.url);
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// `decap serve` flags as the environment variables the ConfigMap gives
/// (every flag has one: `--s3-endpoint` is `DECAP_S3_ENDPOINT`), with the
/// bed's servers behind relays pods can reach.
async fn settings(args: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let name = format!(
            "DECAP_{}",
            args[i]
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        match args.get(i + 1).filter(|v| !v.starts_with("--")) {
            Some(value) => {
                let value = if value.starts_with("http://127.0.0.1:") {
                    let url = reqwest::Url::parse(value).unwrap();
                    let base = format!("http://127.0.0.1:{}", url.port().unwrap());
                    format!("{}{}", relay(&base).await, &value[base.len()..])
                } else {
                    value.clone()
                };
                out.push((name, value));
                i += 2;
            }
            None => {
                out.push((name, "true".into()));
                i += 1;
            }
        }
    }
    out
}

/// The overlay a user writes: their image, their endpoints and secrets.
fn overlay(dir: &Path, image: &str, settings: &[(String, String)], scripts: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    // Kustomize takes a base by a relative path only.
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../k8s-resources")
        .canonicalize()
        .unwrap();
    let depth = dir.canonicalize().unwrap().components().count() - 1;
    let base = format!(
        "{}{}",
        "../".repeat(depth),
        base.display().to_string().trim_start_matches('/')
    );
    let (name, tag) = image.rsplit_once(':').unwrap();
    let mut config = String::new();
    for (k, v) in settings {
        config.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    let kustomization = format!(
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: decap
    newName: {name}
    newTag: "{tag}"
replacements:
  - source:
      kind: Deployment
      name: decap
      fieldPath: spec.template.spec.containers.[name=decap].image
    targets:
      - select:
          kind: Deployment
          name: decap
        fieldPaths:
          - spec.template.spec.containers.[name=decap].env.[name=DECAP_KUBE_BCTOOL_IMAGE].value
patches:
  - patch: |-
      apiVersion: v1
      kind: ConfigMap
      metadata:
        name: decap
        namespace: decap-system
      data:
        DECAP_SCRIPTS: "{scripts}"
        DECAP_AWS_REGION: us-east-1
        DECAP_LOG: info
{config_indented}
  - patch: |-
      apiVersion: v1
      kind: Secret
      metadata:
        name: decap
        namespace: decap-system
      stringData:
        webhook-secret: {secret}
        admin-token: {token}
        aws-access-key-id: decaptest
        aws-secret-access-key: decaptestsecret
  # No GitHub here: no token, so no commit statuses are sent.
  - patch: |-
      - op: remove
        path: /stringData/github-token
    target:
      kind: Secret
      name: decap
      namespace: decap-system
  - patch: |-
      apiVersion: v1
      kind: Service
      metadata:
        name: decap
        namespace: decap-system
      spec:
        clusterIP: {SERVICE_IP}
  - patch: |-
      - op: test
        path: /spec/template/spec/containers/0/env/2/name
        value: DECAP_BUILDS_URL
      - op: replace
        path: /spec/template/spec/containers/0/env/2/value
        value: http://{SERVICE_IP}
    target:
      kind: Deployment
      name: decap
"#,
        secret = common::SECRET,
        token = common::TOKEN,
        config_indented = config
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
            .trim_end(),
    );
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();
    dir.to_owned()
}

/// The controller pods' addresses, once `n` are Ready.
async fn ready_replicas(client: &Client, n: usize) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "decap-system");
    eventually(&format!("{n} Ready replicas"), 3 * MINUTE, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
                .await
                .unwrap();
            let ready: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            (ready.len() == n).then_some(ready)
        }
    })
    .await
}

/// What `kubectl apply -k` made, deleted when dropped (also when the test
/// fails, so the next run starts clean).
struct Deployed(PathBuf);

impl Drop for Deployed {
    fn drop(&mut self) {
        let _ = kubectl_command()
            .args(["delete", "-k"])
            .arg(&self.0)
            .args(["--wait=true", "--timeout=120s", "--ignore-not-found"])
            .output();
    }
}

fn api(base: String) -> common::Api {
    common::Api {
        http: reqwest::Client::new(),
        base,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the bed's whole cluster: tests/run runs it after the other tests"]
async fn deployed_as_shipped_two_replicas_build_a_webhook_in_a_pod_and_share_the_result() {
    let client = admin().await;
    let world = common::aws::World::create().await;
    let dir = tempfile::tempdir().unwrap();

    // The build-scripts repo, served over git:// to the replicas.
    let scripts = dir.path().join("repos/scripts");
    let build_image = env("DECAP_TEST_NODE_BUILD_IMAGE");
    project(
        &scripts,
        "acme/widgets",
        &format!(r#"{{"buildImage": "{build_image}", "managedRefRegex": "main|feature/.*"}}"#),
        "#!/bin/bash\nset -e\necho \"in pod $BUILD_ID $BRANCH_TO_BUILD as $(id -u)\"\n\
         for i in $(seq 1 100); do\n  if (exec 3<>/dev/tcp/127.0.0.1/9418) 2>/dev/null; then echo sidecar answered; break; fi\n  sleep 0.1\ndone\n\
         echo report > \"$ARTIFACTS_DIR/report.txt\"\n\
         sleep 4\necho done\n",
    );
    std::fs::write(
        scripts.join("acme/widgets/gitd-sidecar.json"),
        format!(
            r#"{{"name": "gitd", "image": "{build_image}", "command": ["git", "daemon", "--listen=127.0.0.1", "--port=9418", "--base-path=/tmp", "--export-all"]}}"#
        ),
    )
    .unwrap();
    project(
        &scripts,
        "acme/roll",
        &format!(r#"{{"buildImage": "{build_image}", "managedRefRegex": "roll/.*"}}"#),
        "echo rolled\n",
    );
    git(&scripts, &["init", "-q", "-b", "main"]);
    git(&scripts, &["add", "."]);
    git(&scripts, &["commit", "-q", "-m", "scripts"]);
    let daemon = GitDaemon::start(&dir.path().join("repos"), "scripts");

    let mut settings = settings(&world.args).await;
    // Two builds at once: the rolling update below makes hundreds, which
    // wait their turn in the queue rather than crowd one small node.
    settings.push(("DECAP_MAX_BUILDS".into(), "2".into()));
    let overlay = overlay(
        &dir.path().join("overlay"),
        &env("DECAP_TEST_DECAP_IMAGE"),
        &settings,
        &daemon.url,
    );
    let applied = kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    let _deployed = Deployed(overlay.clone());
    assert!(
        applied.contains("deployment.apps/decap created"),
        "{applied}"
    );
    let rollout = kubectl(&[
        "-n",
        "decap-system",
        "rollout",
        "status",
        "deployment/decap",
        "--timeout=180s",
    ]);
    assert!(rollout.contains("successfully rolled out"), "{rollout}");
    let replicas = ready_replicas(&client, 2).await;

    // A signed push through the Service, once kube-proxy forwards it to
    // the Ready replicas (a moment after they are Ready).
    // A new connection each time, as GitHub's deliveries are: a pooled one
    // made before kube-proxy forwards the address would stay with whatever
    // answered it then (here, the machine's own network answers 404).
    let service = common::Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        base: format!("http://{SERVICE_IP}"),
    };
    let mut answered = false;
    for _ in 0..300 {
        let r = service
            .http
            .get(format!("http://{SERVICE_IP}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if r.is_ok_and(|r| r.status().is_success()) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answered,
        "the Service did not answer in a minute:\n{}\n{}",
        kubectl(&["get", "pods,endpointslices,services", "-A", "-o", "wide"]),
        std::process::Command::new("iptables")
            .args(["-t", "nat", "-S"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    );
    let body = push_payload("acme", "widgets", "refs/heads/feature/deploy", SHA);
    let resp = service.webhook("push", "deploy-1", &body).await;
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();

    // Its pod runs on the real node, from the base build image, with the
    // sidecar beside it; `kubectl logs` shows its console while it runs.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "decap");
    let pod = eventually("the build pod, scheduled", MINUTE, || {
        let (pods, id) = (pods.clone(), id.clone());
        async move {
            let pod = pods.get_opt(&id).await.unwrap()?;
            pod.spec.as_ref()?.node_name.as_ref()?;
            Some(pod)
        }
    })
    .await;
    let spec = pod.spec.clone().unwrap();
    assert_eq!(
        spec.node_name.as_deref(),
        Some(env("DECAP_TEST_REAL_NODE").as_str())
    );
    let images: Vec<_> = spec
        .containers
        .iter()
        .map(|c| (c.name.clone(), c.image.clone()))
        .collect();
    assert!(
        images.contains(&("build".into(), Some(build_image.clone()))),
        "{images:?}"
    );
    // The sidecar is a native one (an init container that keeps running).
    let init: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.restart_policy.clone()))
        .collect();
    assert!(
        init.contains(&("gitd".into(), Some("Always".into()))),
        "{init:?}"
    );
    let console = eventually("the build's console through kubectl logs", MINUTE, || {
        let id = id.clone();
        async move {
            let out = kubectl_command()
                .args(["-n", "decap", "logs", &id, "-c", "build"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("sidecar answered").then_some(text)
        }
    })
    .await;
    assert!(
        console.contains(&format!("in pod {id} feature/deploy as 1000")),
        "{console}"
    );

    // The same build through either replica.
    for ip in &replicas {
        let replica = api(format!("http://{ip}:8080"));
        let b = replica.finished(&id, 2 * MINUTE).await;
        assert_eq!(b["status"], "succeeded", "through {ip}: {b}");
        assert_eq!(b["executor"], "kubernetes");
        let log = replica.log(&id).await;
        assert!(log.contains("sidecar answered"), "through {ip}: {log}");
        assert!(log.contains("done"), "through {ip}: {log}");
        let file = replica
            .get(&format!("/api/v1/artifacts/{id}/report.txt"))
            .await;
        assert_eq!(file.status(), 200, "through {ip}");
        assert_eq!(file.text().await.unwrap(), "report\n");
    }

    // The log and artifacts in S3, the result in DynamoDB.
    for bucket in [&world.logs, &world.artifacts] {
        let objects = world
            .admin
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        let keys: Vec<_> = objects.contents().iter().filter_map(|o| o.key()).collect();
        assert!(keys.iter().any(|k| k.contains(&id)), "{bucket}: {keys:?}");
    }
    let store = decap_aws::DynamoDbBuildStore::connect(&world.sdk, world.tables.clone())
        .await
        .unwrap();
    let record = store
        .get(BuildId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status.as_str(), "succeeded");

    // The controllers' own logs: the leader launched the build.
    let logs = kubectl(&[
        "-n",
        "decap-system",
        "logs",
        "-l",
        "app.kubernetes.io/component=controller",
        "--tail=-1",
        "--prefix",
    ]);
    assert!(logs.contains(&id), "{logs}");

    rolling_update_drops_nothing(&world).await;
}

/// The Deployment's image changes while signed webhooks arrive through the
/// Service at 20 a second, each a new connection as GitHub's are: every
/// one is answered 2xx, and each makes exactly one build.
async fn rolling_update_drops_nothing(world: &common::aws::World) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut sent = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let http = http.clone();
                sent.push(tokio::spawn(async move {
                    let body = push_payload("acme", "roll", &format!("refs/heads/roll/{n}"), SHA);
                    let answer = http
                        .post(format!("http://{SERVICE_IP}/hooks/github"))
                        .header("x-github-event", "push")
                        .header("x-github-delivery", format!("roll-{n}"))
                        .header("x-hub-signature-256", common::sign(common::SECRET, &body))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status().is_success() => {
                            let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
                            Ok(v["builds"][0].as_str().unwrap_or_default().to_owned())
                        }
                        Ok(r) => Err(format!("webhook {n}: {}", r.status())),
                        Err(e) => Err(format!("webhook {n}: {e}")),
                    }
                }));
            }
            let mut out = Vec::new();
            for s in sent {
                out.push(s.await.unwrap());
            }
            out
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    kubectl(&[
        "-n",
        "decap-system",
        "set",
        "image",
        "deployment/decap",
        &format!("decap={}", env("DECAP_TEST_DECAP_NEXT_IMAGE")),
    ]);
    let rollout = kubectl(&[
        "-n",
        "decap-system",
        "rollout",
        "status",
        "deployment/decap",
        "--timeout=300s",
    ]);
    assert!(rollout.contains("successfully rolled out"), "{rollout}");
    // The rollout is done before the old pods are gone (each waits out its
    // preStop, then drains): the webhooks go on until they are, and a
    // little after.
    let client = admin().await;
    let pods: Api<Pod> = Api::namespaced(client, "decap-system");
    let next = env("DECAP_TEST_DECAP_NEXT_IMAGE");
    eventually("the old replicas to be gone", 2 * MINUTE, || {
        let (pods, next) = (pods.clone(), next.clone());
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
                .await
                .ok()?;
            list.items
                .iter()
                .all(|p| {
                    p.spec
                        .as_ref()
                        .is_some_and(|s| s.containers[0].image.as_deref() == Some(next.as_str()))
                })
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = sender.await.unwrap();
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let ids: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    eprintln!(
        "rolling update: {} webhooks sent, {} answered 2xx, {} refused or failed",
        answers.len(),
        ids.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        answers.len() >= 200,
        "only {} webhooks were sent",
        answers.len()
    );
    let unique: std::collections::HashSet<&&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a webhook's build id came twice");

    // Exactly one build per webhook in the shared store, none errored by
    // the rollout.
    let store = decap_aws::DynamoDbBuildStore::connect(&world.sdk, world.tables.clone())
        .await
        .unwrap();
    let mut builds = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&decap_core::ports::BuildQuery {
                project: Some(decap_core::names::ProjectKey::parse("acme/roll").unwrap()),
                limit: 500,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap();
        builds.extend(page.builds);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(builds.len(), ids.len(), "one build per webhook");
    let errored: Vec<String> = builds
        .iter()
        .filter(|b| b.status.as_str() == "errored")
        .map(|b| format!("{} {:?}", b.id, b.message))
        .collect();
    assert!(errored.is_empty(), "{errored:?}");
}

/// A build namespace with the build service account, restricted as the
/// shipped `decap` namespace's pods are.
async fn build_namespace(client: &Client) -> String {
    use decap_kube::k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use decap_kube::kube::api::PostParams;
    let ns = format!("ends-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    n.metadata.labels = Some(
        [(
            "pod-security.kubernetes.io/enforce".to_owned(),
            "restricted".to_owned(),
        )]
        .into(),
    );
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("decap-build".into());
    sa.automount_service_account_token = Some(false);
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    ns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the bed's whole cluster: tests/run runs it after the other tests"]
async fn real_pods_end_by_their_memory_limit_timeout_deletion_or_missing_image_each_named() {
    use decap_kube::kube::api::DeleteParams;
    let client = admin().await;
    let ns = build_namespace(&client).await;
    let _gone = NamespaceGuard(ns.clone());
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    let image = env("DECAP_TEST_NODE_BUILD_IMAGE");
    project(
        &scripts,
        "acme/oom",
        &format!(r#"{{"buildImage": "{image}", "resources": {{"memory": "48Mi"}}}}"#),
        "set -e\necho started\nhead -c 400000000 /dev/zero | tail\necho survived\n",
    );
    project(
        &scripts,
        "acme/slow",
        &format!(r#"{{"buildImage": "{image}", "buildTimeoutSeconds": 3}}"#),
        "echo started\nsleep 300\n",
    );
    project(
        &scripts,
        "acme/deleted",
        &format!(r#"{{"buildImage": "{image}"}}"#),
        "echo started\nsleep 300\n",
    );
    project(
        &scripts,
        "acme/noimage",
        r#"{"buildImage": "localhost/decap-no-such-image:1"}"#,
        "echo never\n",
    );
    // Decap on the host; build pods reach it through a relay on the node's
    // address.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let builds_url = relay(&format!("http://127.0.0.1:{port}")).await;
    let listen = format!("127.0.0.1:{port}");
    let kubeconfig = env("DECAP_TEST_KUBECONFIG");
    let bctool_image = env("DECAP_TEST_DECAP_IMAGE");
    let decap = common::Decap::start_with_env(
        &dir.path().join("data"),
        &scripts,
        &[
            "--executor",
            "kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--kube-namespace",
            &ns,
            "--kube-bctool-image",
            &bctool_image,
            "--builds-url",
            &builds_url,
            "--kube-finished-pod-ttl-secs",
            "1",
        ],
        &[("DECAP_LISTEN", listen.as_str())],
    );
    let api = decap.api();
    let ids: Vec<String> = ["acme/oom", "acme/slow", "acme/deleted", "acme/noimage"]
        .iter()
        .map(|p| async { api.request(p, &["main"]).await.remove(0) })
        .collect::<futures::future::JoinAll<_>>()
        .await;
    let [oom, slow, deleted, noimage] = [&ids[0], &ids[1], &ids[2], &ids[3]];

    // A pod deleted by hand while it builds.
    eventually("the build to start in its pod", MINUTE, || {
        let (api, id) = (api.clone(), deleted.clone());
        async move { api.log(&id).await.contains("started").then_some(()) }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(1),
        ..DeleteParams::default()
    };
    pods.delete(deleted, &dp).await.unwrap();

    let b = api.finished(noimage, MINUTE).await;
    assert_eq!(b["status"], "errored", "{b}");
    let why = b["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("\"localhost/decap-no-such-image:1\" of container build cannot be pulled"),
        "{b}"
    );
    let b = api.finished(deleted, MINUTE).await;
    assert_eq!(b["status"], "errored", "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deleted"),
        "{b}"
    );
    let b = api.finished(slow, MINUTE).await;
    assert_eq!(b["status"], "timed_out", "{b}");
    let b = api.finished(oom, MINUTE).await;
    let log = api.log(oom).await;
    assert_eq!(b["status"], "failed", "{b} {log}");
    assert!(!log.contains("survived"), "{log}");
    let why = b["message"].as_str().unwrap_or_default();
    assert!(why.contains("memory"), "{b} {log}");

    // Every pod goes, and every lock.
    eventually("the build pods to be deleted", MINUTE, || {
        let pods = pods.clone();
        async move {
            let left = pods.list(&ListParams::default()).await.unwrap().items;
            left.is_empty().then_some(())
        }
    })
    .await;
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
}

/// A namespace deleted (with its pods) when dropped, also when the test
/// fails.
struct NamespaceGuard(String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let _ = kubectl_command()
            .args(["delete", "namespace", &self.0, "--wait=false"])
            .output();
    }
}
