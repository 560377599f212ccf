//! End to end on Kubernetes: the real `decap` binary with the Kubernetes
//! executor, against the test bed's real kube-apiserver and etcd, with the
//! test node running the build pods (bctool and the scripts really run).
//!
//! `tests/run` starts the bed and sets `DECAP_TEST_KUBECONFIG`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Decap, eventually, project, push_payload};
use decap_kube::k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use decap_kube::kube::api::{DeleteParams, ListParams, PostParams};
use decap_kube::kube::{Api, Client};
use decap_kube::testnode::{TestNode, TestNodeConfig};

const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";
const MINUTE: Duration = Duration::from_secs(60);

fn admin_kubeconfig() -> PathBuf {
    PathBuf::from(std::env::var("DECAP_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_KUBECONFIG is not set: run the tests through tests/run, which starts \
             the Kubernetes test bed (tests/bed/kube.sh)"
        )
    }))
}

async fn admin() -> Client {
    decap_kube::client(Some(&admin_kubeconfig())).await.unwrap()
}

/// A fresh build namespace with the build service account, and a test node
/// running its pods.
struct Bed {
    client: Client,
    ns: String,
    _node: TestNode,
    dir: tempfile::TempDir,
}

impl Bed {
    async fn new(prefix: &str) -> Bed {
        let client = admin().await;
        let ns = format!("{prefix}-{}", &uuid_suffix());
        create_namespace(&client, &ns).await;
        let node = decap_kube::testnode::start(
            client.clone(),
            TestNodeConfig {
                node_name: format!("node-{ns}"),
                namespaces: vec![ns.clone()],
            },
        )
        .await
        .unwrap();
        Bed {
            client,
            ns,
            _node: node,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn scripts(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// `decap serve` flags for the Kubernetes executor in this namespace.
    fn args(&self, kubeconfig: &Path) -> Vec<String> {
        vec![
            "--executor".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.to_string_lossy().into_owned(),
            "--kube-namespace".into(),
            self.ns.clone(),
            "--kube-bctool-image".into(),
            "decap:test".into(),
            "--kube-bctool-path".into(),
            env!("CARGO_BIN_EXE_bctool").into(),
            "--kube-finished-pod-ttl-secs".into(),
            "1".into(),
        ]
    }

    fn start(&self, kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)]) -> Decap {
        let mut args = self.args(kubeconfig);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Decap::start_with_env(&self.data(), &self.scripts(), &args, env)
    }
}

fn uuid_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn create_namespace(client: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.to_owned());
    // The API server's Pod Security admission checks every build pod: they
    // pass the restricted level.
    n.metadata.labels = Some(
        [(
            "pod-security.kubernetes.io/enforce".to_owned(),
            "restricted".to_owned(),
        )]
        .into(),
    );
    match namespaces.create(&PostParams::default(), &n).await {
        Ok(_) => {}
        Err(decap_kube::kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create namespace {ns}: {e}"),
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("decap-build".into());
    sa.automount_service_account_token = Some(false);
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(decap_kube::kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create the build service account: {e}"),
    }
}

fn sidecar(scripts: &Path, key: &str, file: &str, json: &str) {
    std::fs::write(scripts.join(key).join(file), json).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_runs_in_a_pod_with_its_sidecar_and_everything_comes_back() {
    let bed = Bed::new("e2e-push").await;
    let port = free_port();
    project(
        &bed.scripts(),
        "acme/widgets",
        r#"{"buildImage": "debian:bookworm-slim", "managedRefRegex": "main|feature/.*"}"#,
        &format!(
            "#!/bin/sh\nset -e\necho \"in pod $BUILD_ID $BRANCH_TO_BUILD $COMMIT_SHA cwd=$(pwd)\"\n\
             for i in $(seq 1 100); do\n  if answer=$(python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:{port}/\").status)' 2>/dev/null); then break; fi\n  sleep 0.1\ndone\n\
             echo \"sidecar answered $answer\"\n\
             echo report > \"$ARTIFACTS_DIR/report.txt\"\n"
        ),
    );
    sidecar(
        &bed.scripts(),
        "acme/widgets",
        "web-sidecar.json",
        &format!(
            r#"{{"name": "web", "image": "python:3-slim", "command": ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]}}"#
        ),
    );
    let decap = bed.start(&admin_kubeconfig(), &[], &[]);
    let api = decap.api();
    let body = push_payload("acme", "widgets", "refs/heads/feature/login", SHA);
    let resp = api.webhook("push", "kube-e2e-1", &body).await;
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();

    // The pod, as the API server accepted it.
    let pods = bed.pods();
    let pod = eventually("the build pod", MINUTE, || {
        let pods = pods.clone();
        let id = id.clone();
        async move { pods.get_opt(&id).await.unwrap() }
    })
    .await;
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["type"], "decap-build");
    assert_eq!(labels["team"], "acme");
    assert_eq!(labels["project"], "widgets");
    assert!(labels["branch"].starts_with("feature-login-"), "{labels:?}");
    assert_eq!(
        pod.metadata.annotations.clone().unwrap()["decap.io/branch"],
        "feature/login"
    );
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(spec.active_deadline_seconds.is_some());

    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["executor"], "kubernetes");
    assert_eq!(b["sandbox"], "pod");
    let log = api
        .get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        log.contains(&format!(
            "in pod {id} feature/login {SHA} cwd=/decap/workspace/src"
        )),
        "{log}"
    );
    assert!(log.contains("sidecar answered 200"), "{log}");
    let file = api.get(&format!("/api/v1/artifacts/{id}/report.txt")).await;
    assert_eq!(file.status(), 200);
    assert_eq!(file.text().await.unwrap(), "report\n");
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");

    // The finished pod and its scripts are cleaned up.
    let cms: Api<ConfigMap> = Api::namespaced(bed.client.clone(), &bed.ns);
    eventually("the pod and its scripts to be deleted", MINUTE, || {
        let (pods, cms, id) = (pods.clone(), cms.clone(), id.clone());
        async move {
            let pod = pods.get_opt(&id).await.unwrap();
            let cm = cms.get_opt(&format!("{id}-scripts")).await.unwrap();
            (pod.is_none() && cm.is_none()).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_sidecar_shows_on_the_project_and_nothing_launches() {
    let bed = Bed::new("e2e-badsidecar").await;
    project(
        &bed.scripts(),
        "acme/broken",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "true\n",
    );
    sidecar(
        &bed.scripts(),
        "acme/broken",
        "redis-sidecar.json",
        r#"{"name": "redis", "image": "redis:7", "ports": [{"containerPort": "not-a-number"}]}"#,
    );
    let decap = bed.start(&admin_kubeconfig(), &[], &[]);
    let api = decap.api();
    let projects = api.json("/api/v1/projects").await;
    let p = projects["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["team"] == "acme" && p["project"] == "broken")
        .unwrap()
        .clone();
    let error = p["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("not a valid Kubernetes Container"),
        "the project shows why: {p}"
    );
    let body = push_payload("acme", "broken", "refs/heads/main", SHA);
    let resp = api.webhook("push", "kube-bad-1", &body).await;
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(
        v["builds"].as_array().is_none_or(|b| b.is_empty()),
        "no build for a project that cannot build: {v}"
    );
    let pods = bed.pods().list(&ListParams::default()).await.unwrap();
    assert!(pods.items.is_empty(), "no pod was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_by_hand_ends_its_build_errored_and_frees_the_lock() {
    let bed = Bed::new("e2e-deleted").await;
    project(
        &bed.scripts(),
        "acme/slow",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo started\nsleep 300\n",
    );
    let decap = bed.start(&admin_kubeconfig(), &[], &[]);
    let api = decap.api();
    let id = api.request("acme/slow", &["main"]).await.remove(0);
    let pods = bed.pods();
    eventually("the build to start in its pod", MINUTE, || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let log = api
                .get(&format!("/api/v1/logs/{id}"))
                .await
                .text()
                .await
                .ok()?;
            log.contains("started").then_some(())
        }
    })
    .await;
    let dp = DeleteParams {
        grace_period_seconds: Some(1),
        ..DeleteParams::default()
    };
    pods.delete(&id, &dp).await.unwrap();
    let b = api.finished(&id, MINUTE).await;
    assert_ne!(b["status"], "succeeded", "{b}");
    assert!(
        matches!(b["status"].as_str(), Some("errored" | "failed")),
        "{b}"
    );
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
}

/// A TCP proxy in front of the API server that can be cut and restored.
struct Cut {
    up: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    port: u16,
}

impl Cut {
    async fn start(upstream: String) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Cut { up, conns, port }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The admin kubeconfig, pointed at another server address.
fn kubeconfig_via(dir: &Path, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(admin_kubeconfig()).unwrap();
    let server = std::env::var("DECAP_TEST_KUBE_SERVER").unwrap();
    let text = text.replace(&server, &format!("https://127.0.0.1:{port}"));
    let path = dir.join("via-proxy.kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_wait_deferred_while_the_api_server_is_unreachable_and_resume_when_it_returns() {
    let bed = Bed::new("e2e-unreachable").await;
    project(
        &bed.scripts(),
        "acme/widgets",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo \"built $BRANCH_TO_BUILD\"\n",
    );
    let server = std::env::var("DECAP_TEST_KUBE_SERVER").unwrap();
    let upstream = server.trim_start_matches("https://").to_owned();
    let proxy = Cut::start(upstream).await;
    let kubeconfig = kubeconfig_via(bed.dir.path(), proxy.port);
    let decap = bed.start(&kubeconfig, &[], &[]);
    let api = decap.api();
    let first = api.request("acme/widgets", &["before"]).await.remove(0);
    assert_eq!(api.finished(&first, MINUTE).await["status"], "succeeded");

    proxy.cut();
    // Until Decap notices, a build may still be launched (its pod is then
    // created once the API server answers); once it has, builds wait
    // deferred.
    let (ids, b) = api.request_until_deferred("acme/widgets", "during").await;
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{b}"
    );

    proxy.restore();
    for id in &ids {
        let b = api.finished(id, MINUTE).await;
        assert_eq!(
            b["status"], "succeeded",
            "resumed once the API server returned: {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_builds_running_when_decap_is_killed_finish_with_their_true_results() {
    const N: usize = 50;
    let bed = Bed::new("e2e-restart").await;
    project(
        &bed.scripts(),
        "acme/many",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo \"started $BRANCH_TO_BUILD\"\nsleep 20\ncase \"$BRANCH_TO_BUILD\" in fail-*) exit 3;; esac\necho done\n",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [("DECAP_LISTEN", listen.as_str())];
    let extra = ["--max-builds", "64", "--max-builds-per-project", "64"];
    let mut decap = bed.start(&admin_kubeconfig(), &extra, &env);
    let api = decap.api();
    let branches: Vec<String> = (0..N)
        .map(|i| {
            if i % 2 == 0 {
                format!("ok-{i}")
            } else {
                format!("fail-{i}")
            }
        })
        .collect();
    let refs: Vec<&str> = branches.iter().map(String::as_str).collect();
    let ids = api.request("acme/many", &refs).await;
    assert_eq!(ids.len(), N);
    let pods = bed.pods();
    eventually("every build pod to run", MINUTE, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (running == N).then_some(())
        }
    })
    .await;

    decap.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let decap = bed.start(&admin_kubeconfig(), &extra, &env);
    let api = decap.api();
    for (id, branch) in ids.iter().zip(&branches) {
        let b = api.finished(id, 2 * MINUTE).await;
        if branch.starts_with("ok-") {
            assert_eq!(b["status"], "succeeded", "{b}");
            assert_eq!(b["exitCode"], 0, "{b}");
        } else {
            assert_eq!(b["status"], "failed", "{b}");
            assert_eq!(b["exitCode"], 3, "{b}");
        }
    }
    let locks = api.json("/api/v1/locks").await;
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
}

/// Applies a YAML file's documents with server-side apply; `dry_run` only
/// validates them.
async fn apply_file(client: &Client, path: &Path, dry_run: bool) {
    use decap_kube::kube::api::{DynamicObject, Patch, PatchParams};
    use decap_kube::kube::core::GroupVersionKind;
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let types = obj.types.clone().unwrap();
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), types.api_version.clone()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &types.kind);
        let (ar, caps) = decap_kube::kube::discovery::pinned_kind(client, &gvk)
            .await
            .unwrap();
        let name = obj.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match (&caps.scope, &obj.metadata.namespace) {
            (decap_kube::kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            (decap_kube::kube::discovery::Scope::Namespaced, None) => {
                panic!(
                    "{} {name} in {} names no namespace",
                    types.kind,
                    path.display()
                )
            }
            _ => Api::all_with(client.clone(), &ar),
        };
        let mut pp = PatchParams::apply("decap-tests").force();
        pp.dry_run = dry_run;
        if let Err(e) = api.patch(&name, &pp, &Patch::Apply(&doc)).await {
            panic!("{} {name} from {}: {e}", types.kind, path.display());
        }
    }
}

fn k8s_resources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../k8s-resources")
}

/// The files the kustomization lists.
fn kustomization_files() -> Vec<PathBuf> {
    let text = std::fs::read_to_string(k8s_resources().join("kustomization.yaml")).unwrap();
    let k: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| k8s_resources().join(r.as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_are_valid_and_their_rbac_is_enough_and_no_more() {
    let client = admin().await;
    let files = kustomization_files();
    // Namespaces first, for real: the rest is checked in them.
    let namespaces = k8s_resources().join("namespaces.yaml");
    apply_file(&client, &namespaces, false).await;
    for f in &files {
        apply_file(&client, f, true).await;
    }
    // The controller's identity and its permissions, for real.
    apply_file(
        &client,
        &k8s_resources().join("serviceaccounts.yaml"),
        false,
    )
    .await;
    apply_file(&client, &k8s_resources().join("rbac.yaml"), false).await;

    // A token of the controller's service account, as its pod would have.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "decap-system");
    let request = decap_kube::k8s_openapi::api::authentication::v1::TokenRequest {
        metadata: Default::default(),
        spec: decap_kube::k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec!["https://kubernetes.default.svc".into()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        status: None,
    };
    let token: decap_kube::k8s_openapi::api::authentication::v1::TokenRequest = sas
        .create_subresource("token", "decap", &PostParams::default(), &request)
        .await
        .unwrap();
    let token = token.status.unwrap().token;
    let dir = tempfile::tempdir().unwrap();
    let admin_text = std::fs::read_to_string(admin_kubeconfig()).unwrap();
    let ca = admin_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .unwrap()
        .to_owned();
    let server = std::env::var("DECAP_TEST_KUBE_SERVER").unwrap();
    let kubeconfig = dir.path().join("decap-sa.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: decap\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: decap}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let sa_client = decap_kube::client(Some(&kubeconfig)).await.unwrap();

    // Outside its permissions: denied.
    let secrets: Api<Secret> = Api::all(sa_client.clone());
    match secrets.list(&ListParams::default()).await {
        Err(decap_kube::kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("listing secrets cluster-wide must be denied: {other:?}"),
    }
    let system_pods: Api<Pod> = Api::namespaced(sa_client.clone(), "kube-system");
    match system_pods.list(&ListParams::default()).await {
        Err(decap_kube::kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("pods outside the build namespace must be denied: {other:?}"),
    }

    // Within them: a whole build, with leader election on.
    let node = decap_kube::testnode::start(
        client.clone(),
        TestNodeConfig {
            node_name: "node-decap-rbac".into(),
            namespaces: vec!["decap".into()],
        },
    )
    .await
    .unwrap();
    let scripts = dir.path().join("scripts");
    project(
        &scripts,
        "acme/rbac",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo within-rbac\n",
    );
    // Leader election asks for the shared stores, as the manifests set.
    let world = common::aws::World::create().await;
    let mut args: Vec<String> = [
        "--executor",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--kube-bctool-path",
        env!("CARGO_BIN_EXE_bctool"),
        "--kube-finished-pod-ttl-secs",
        "1",
        "--leader-election",
        "--kube-pod-name",
        "decap-test-replica",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(world.args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let decap = Decap::start_with_env(
        &dir.path().join("data"),
        &scripts,
        &args,
        &common::aws::CREDENTIALS,
    );
    let api = decap.api();
    let id = api.request("acme/rbac", &["main"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    let log = api
        .get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("within-rbac"), "{log}");
    drop(decap);
    node.shutdown().await;

    // Builds' secrets in the build namespace: the Role is enough for the
    // whole contract; the controller's own Secret stays out of reach.
    let store = decap_kube::KubeSecretStore::connect(sa_client.clone(), "decap")
        .await
        .unwrap();
    decap_contract_tests::secret_store_suite(Arc::new(store)).await;
    let system_secrets: Api<Secret> = Api::namespaced(sa_client.clone(), "decap-system");
    match system_secrets.get_opt("decap").await {
        Err(decap_kube::kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("Secrets outside the build namespace must be denied: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_executor_keeps_the_executor_contract() {
    use decap_contract_tests::{RecordedExits, executor_suite};
    let bed = Bed::new("e2e-contract").await;
    let exits = Arc::new(RecordedExits::default());
    let config = decap_kube::KubeExecutorConfig {
        namespace: bed.ns.clone(),
        bctool_command: vec![env!("CARGO_BIN_EXE_bctool").into()],
        finished_pod_ttl: Duration::from_secs(1),
        kill_grace: Duration::from_secs(1),
        ..decap_kube::KubeExecutorConfig::default()
    };
    let executor = decap_kube::KubeExecutor::new(bed.client.clone(), config, exits.clone())
        .await
        .unwrap();
    executor_suite(Arc::new(executor), exits, MINUTE).await;
}

/// Who holds the leader Lease.
async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    use decap_kube::k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease = leases.get_opt("decap-leader").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_launches_and_another_takes_over_when_it_stops_or_dies() {
    let bed = Bed::new("e2e-replicas").await;
    let world = common::aws::World::create().await;
    project(
        &bed.scripts(),
        "acme/ha",
        r#"{"buildImage": "debian:bookworm-slim"}"#,
        "echo \"built $BRANCH_TO_BUILD\"\n",
    );
    let start = |name: &str| {
        let mut args = bed.args(&admin_kubeconfig());
        args.extend(world.args.iter().cloned());
        args.extend(
            [
                "--leader-election",
                "--kube-lease-namespace",
                &bed.ns,
                "--kube-pod-name",
                name,
            ]
            .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Decap::start_with_env(
            &bed.dir.path().join(name),
            &bed.scripts(),
            &args,
            &common::aws::CREDENTIALS,
        )
    };
    let first = start("replica-a");
    let leader = eventually("a leader", MINUTE, || {
        let client = bed.client.clone();
        let ns = bed.ns.clone();
        async move { lease_holder(&client, &ns).await }
    })
    .await;
    assert_eq!(leader, "replica-a", "the only replica leads");
    let second = start("replica-b");

    // A build asked of the follower is run once, by the leader.
    let id = second
        .api()
        .request("acme/ha", &["via-follower"])
        .await
        .remove(0);
    let b = second.api().finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(
        lease_holder(&bed.client, &bed.ns).await.as_deref(),
        Some("replica-a")
    );
    let log = second
        .api()
        .get(&format!("/api/v1/logs/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(log.contains("built via-follower"), "{log}");

    // Another CI server reports to one replica; the other shows it, and a
    // lock taken through one holds through the other.
    let report = serde_json::json!({
        "name": "tests",
        "repository": "git@github.com:acme/ha.git",
        "revision": "abcd1234",
        "status_url": "https://ci.example.com/1",
        "status": "successful",
    });
    let r = first
        .api()
        .http
        .post(format!("{}/api/build_status", first.url))
        .bearer_auth(common::TOKEN)
        .json(&report)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let hub = second.api().json("/api/v1/hub").await;
    assert_eq!(
        hub["projects"][0]["latestRevisions"][0]["hash"], "abcd1234",
        "{hub}"
    );
    let lock = |api: common::Api, revision: &'static str| async move {
        let r = api
            .http
            .post(format!("{}/api/build/lock", api.base))
            .bearer_auth(common::TOKEN)
            .json(&serde_json::json!({
                "name": "deploy",
                "repository": "git@github.com:acme/ha.git",
                "revision": revision,
            }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.json::<serde_json::Value>().await.unwrap()["locked_by_revision"].clone()
    };
    assert_eq!(lock(first.api(), "abcd1234").await, "abcd1234");
    assert_eq!(
        lock(second.api(), "ef015678").await,
        "abcd1234",
        "the lock taken through the other replica holds"
    );

    // A login on one replica is known to the other, and so is its logout.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = browser
        .post(format!("{}/login", first.url))
        .form(&[("token", common::TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("decap_session="))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let page = |url: String| {
        let (browser, cookie) = (browser.clone(), cookie.clone());
        async move {
            browser
                .get(url)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert!(
        page(format!("{}/queue", second.url))
            .await
            .contains("Log out"),
        "logged in through the other replica"
    );
    let r = browser
        .post(format!("{}/logout", second.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    assert!(
        !page(format!("{}/queue", first.url))
            .await
            .contains("Log out"),
        "logged out through the other replica"
    );

    // The leader stops (a rolling update): it lets go of the Lease as it
    // stops, so the other takes over without waiting for it to lapse.
    drop(first);
    let released = lease_holder(&bed.client, &bed.ns).await;
    assert_ne!(
        released.as_deref(),
        Some("replica-a"),
        "a leader that stopped still holds the Lease"
    );
    let api = second.api();
    eventually("the follower to take the lead", MINUTE, || {
        let client = bed.client.clone();
        let ns = bed.ns.clone();
        async move {
            (lease_holder(&client, &ns).await.as_deref() == Some("replica-b")).then_some(())
        }
    })
    .await;
    let id = api.request("acme/ha", &["after-handover"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");

    // The leader dies without letting go: the other takes over once the
    // Lease lapses, and launches.
    let third = start("replica-c");
    let mut second = second;
    second.kill();
    let api = third.api();
    eventually("the follower to take the lead", 2 * MINUTE, || {
        let client = bed.client.clone();
        let ns = bed.ns.clone();
        async move {
            (lease_holder(&client, &ns).await.as_deref() == Some("replica-c")).then_some(())
        }
    })
    .await;
    let id = api.request("acme/ha", &["after-failover"]).await.remove(0);
    let b = api.finished(&id, MINUTE).await;
    assert_eq!(b["status"], "succeeded", "{b}");
}

/// The same project, with a sidecar answering on localhost, built by the
/// Kubernetes executor (in a pod on the test node) and by the container
/// executor (in containers on the bed's Podman): the same layout, the same
/// variables, the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_project_with_a_sidecar_runs_alike_in_a_pod_and_in_containers() {
    let image =
        std::env::var("DECAP_TEST_BUILD_IMAGE").expect("tests/run starts tests/bed/podman.sh");
    let engine =
        std::env::var("DECAP_TEST_CONTAINER_SOCKET").expect("tests/run starts tests/bed/podman.sh");
    let bed = Bed::new("e2e-parity").await;
    let port = free_port();
    // Perl and bash are in every Debian (and on the test node's host).
    let serve = format!(
        "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => {port}, Listen => 5, ReuseAddr => 1) or die $!; while (my $c = $s->accept) {{ print $c \"pong\\n\"; close $c }}"
    );
    project(
        &bed.scripts(),
        "acme/parity",
        &serde_json::json!({"buildImage": image}).to_string(),
        &format!(
            "#!/bin/bash\nset -e\necho \"layout: $(pwd) $HOME $ARTIFACTS_DIR $DECAP_BUILD_SCRIPTS\"\n\
             for i in $(seq 1 100); do\n  if exec 3<>/dev/tcp/127.0.0.1/{port}; then break; fi 2>/dev/null\n  sleep 0.1\ndone\n\
             read -r answer <&3\necho \"sidecar said $answer\"\necho kept > \"$ARTIFACTS_DIR/kept.txt\"\nexit 4\n"
        ),
    );
    sidecar(
        &bed.scripts(),
        "acme/parity",
        "echo-sidecar.json",
        &serde_json::json!({"name": "echo", "image": image, "command": ["perl", "-e", serve]})
            .to_string(),
    );
    let mut results = Vec::new();
    for executor in ["kubernetes", "container"] {
        let decap = if executor == "kubernetes" {
            bed.start(&admin_kubeconfig(), &[], &[])
        } else {
            let data = bed.dir.path().join("data-containers");
            Decap::start(
                &data,
                &bed.scripts(),
                &["--executor", "container", "--container-socket", &engine],
            )
        };
        let api = decap.api();
        let id = api.request("acme/parity", &["main"]).await.remove(0);
        let b = api.finished(&id, MINUTE).await;
        let log = api
            .get(&format!("/api/v1/logs/{id}"))
            .await
            .text()
            .await
            .unwrap();
        let kept = api
            .get(&format!("/api/v1/artifacts/{id}/kept.txt"))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(b["executor"], executor, "{b}");
        results.push((b["status"].clone(), b["exitCode"].clone(), log, kept));
    }
    let (pod, containers) = (&results[0], &results[1]);
    assert_eq!(pod.0, "failed", "{:?}", pod);
    assert_eq!(pod.1, 4, "{:?}", pod);
    assert!(pod.2.contains("sidecar said pong"), "{}", pod.2);
    assert!(
        pod.2.contains("layout: /decap/workspace/src /decap/workspace/home /decap/workspace/artifacts /decap/scripts"),
        "{}",
        pod.2
    );
    assert_eq!(
        pod, containers,
        "a pod and containers give the same result, log and artifacts"
    );
}

/// A `shell` preset project pushed at a real commit: the pod runs the
/// driver Decap wrote into its scripts, and bctool fetches the tree from the
/// server, so no credential or clone tool is needed in the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_project_builds_in_a_pod_with_its_tree_from_the_server() {
    let bed = Bed::new("preset").await;
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("test.sh"),
        "echo \"pod tests of $(cat VERSION) pass in $(pwd)\"\n",
    )
    .unwrap();
    std::fs::write(repo.path().join("VERSION"), "2.0\n").unwrap();
    let out = std::process::Command::new("sh")
        .args([
            "-ec",
            "git init -q -b main . && git add -A && git -c user.name=Dev -c user.email=dev@example.com commit -qm one && git rev-parse HEAD",
        ])
        .current_dir(repo.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let commit = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let dir = bed.scripts().join("acme/preset");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("project.json"),
        serde_json::json!({"language": "shell", "repoUrl": repo.path().to_string_lossy()})
            .to_string(),
    )
    .unwrap();
    let decap = bed.start(&admin_kubeconfig(), &[], &[]);
    let api = decap.api();
    let body = push_payload("acme", "preset", "refs/heads/main", &commit);
    let resp = api.webhook("push", "kube-preset-1", &body).await;
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let id = v["builds"][0].as_str().unwrap().to_owned();
    let b = api.finished(&id, MINUTE).await;
    let log = api.log(&id).await;
    assert_eq!(b["status"], "succeeded", "{b}\n{log}");
    assert_eq!(b["executor"], "kubernetes");
    assert!(
        log.contains("pod tests of 2.0 pass in /decap/workspace/src"),
        "{log}"
    );
    assert!(
        log.contains(&format!("at commit {}]", &commit[..12])),
        "{log}"
    );
    let phases = common::presets::phase_exit_codes(&b);
    assert_eq!(phases, [0, 0, 0], "{b}");
}
