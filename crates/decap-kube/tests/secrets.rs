//! `KubeSecretStore` against the test bed's real kube-apiserver: the secret
//! store's contract, and what the Secrets look like to Kubernetes.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use decap_core::ports::SecretStore;
use decap_core::secrets::{SecretName, SecretScope, SecretValue};
use decap_kube::k8s_openapi::api::core::v1::{Namespace, Secret};
use decap_kube::kube::api::{Patch, PatchParams, PostParams};
use decap_kube::kube::{Api, Client};
use decap_kube::{KubeSecretStore, secret_name_for};

fn kubeconfig() -> PathBuf {
    PathBuf::from(std::env::var("DECAP_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_KUBECONFIG is not set: run the tests through tests/run, which starts \
             the Kubernetes test bed (tests/bed/kube.sh), or start it yourself with \
             `eval \"$(tests/bed/kube.sh start)\"`"
        )
    }))
}

/// A client of the bed and a fresh namespace.
async fn setup(test: &str) -> (Client, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let client = decap_kube::client(Some(&kubeconfig())).await.unwrap();
    let ns = format!(
        "sec-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    namespaces.create(&PostParams::default(), &n).await.unwrap();
    (client, ns)
}

fn value(v: &str) -> SecretValue {
    SecretValue::new(v.to_owned()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_secret_store_keeps_the_contract() {
    let (client, ns) = setup("contract").await;
    let store = KubeSecretStore::connect(client.clone(), &ns).await.unwrap();
    decap_contract_tests::secret_store_suite(Arc::new(store)).await;
    // The suite cleans up after itself: no Secret is left.
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let left = secrets
        .list(&decap_kube::kube::api::ListParams::default().labels("type=decap-secrets"))
        .await
        .unwrap();
    assert!(
        left.items.is_empty(),
        "an emptied scope loses its Secret: {:?}",
        left.items
            .iter()
            .map(|s| &s.metadata.name)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_is_one_labelled_secret_a_pod_can_reference() {
    let (client, ns) = setup("shape").await;
    let store = KubeSecretStore::connect(client.clone(), &ns).await.unwrap();
    let project = SecretScope::project("Acme", "Widgets.js").unwrap();
    let team = SecretScope::team("Acme").unwrap();
    store
        .set(
            &project,
            &SecretName::new("NPM_TOKEN").unwrap(),
            &value("npm"),
        )
        .await
        .unwrap();
    store
        .set(&team, &SecretName::new("SLACK").unwrap(), &value("slack"))
        .await
        .unwrap();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let s = secrets.get(&secret_name_for(&project)).await.unwrap();
    let labels = s.metadata.labels.clone().unwrap();
    assert_eq!(labels["type"], "decap-secrets");
    assert_eq!(labels["scope"], "project");
    assert_eq!(labels["team"], "Acme");
    assert_eq!(labels["project"], "Widgets.js");
    let annotations = s.metadata.annotations.clone().unwrap();
    assert_eq!(
        annotations["decap.io/secret-scope"],
        "project:Acme/Widgets.js"
    );
    let data = s.data.unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["NPM_TOKEN"],
        "data keys are the secrets' names, for secretKeyRef"
    );
    assert_eq!(data["NPM_TOKEN"].0, b"npm");

    let t = secrets.get(&secret_name_for(&team)).await.unwrap();
    let labels = t.metadata.labels.unwrap();
    assert_eq!(labels["scope"], "team");
    assert!(!labels.contains_key("project"));
    assert_eq!(t.data.unwrap()["SLACK"].0, b"slack");

    // A key written by hand that is no valid name is not given to builds.
    let patch = serde_json::json!({"stringData": {"not-a-variable": "x"}});
    secrets
        .patch(
            &secret_name_for(&team),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    assert_eq!(store.names(&team).await.unwrap(), ["SLACK"]);
    let key = decap_core::ProjectKey::new("Acme", "Widgets.js").unwrap();
    let got: Vec<String> = store
        .for_build(&key)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(got, ["NPM_TOKEN", "SLACK"]);
    // Removing the last valid name keeps the Secret with the hand-made key.
    assert!(
        store
            .remove(&team, &SecretName::new("SLACK").unwrap())
            .await
            .unwrap()
    );
    assert!(store.names(&team).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_of_that_name_not_made_by_decap_is_left_alone() {
    let (client, ns) = setup("foreign").await;
    let store = KubeSecretStore::connect(client.clone(), &ns).await.unwrap();
    let scope = SecretScope::project("acme", "widgets").unwrap();
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let mut foreign = Secret::default();
    foreign.metadata.name = Some(secret_name_for(&scope));
    foreign.string_data = Some([("KEEP".to_owned(), "mine".to_owned())].into());
    secrets
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let name = SecretName::new("NPM_TOKEN").unwrap();
    let e = store
        .set(&scope, &name, &value("npm"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not made by Decap"), "{e}");
    assert!(store.names(&scope).await.is_err());
    let kept = secrets.get(&secret_name_for(&scope)).await.unwrap();
    assert_eq!(
        kept.data.unwrap().keys().collect::<Vec<_>>(),
        ["KEEP"],
        "untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_is_a_clear_error_at_start() {
    use decap_kube::k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use decap_kube::k8s_openapi::api::core::v1::ServiceAccount;
    let (client, ns) = setup("denied").await;
    // A service account with no permissions at all.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("nobody".into());
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let request = TokenRequest {
        metadata: Default::default(),
        spec: TokenRequestSpec {
            audiences: vec!["https://kubernetes.default.svc".into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        status: None,
    };
    let token: TokenRequest = sas
        .create_subresource("token", "nobody", &PostParams::default(), &request)
        .await
        .unwrap();
    let token = token.status.unwrap().token;
    let admin = std::fs::read_to_string(kubeconfig()).unwrap();
    let field = |key: &str| {
        admin
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nobody.kubeconfig");
    std::fs::write(
        &config,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            field("server: "),
            field("certificate-authority: ")
        ),
    )
    .unwrap();
    let nobody = decap_kube::client(Some(&config)).await.unwrap();
    let e = match KubeSecretStore::connect(nobody, &ns).await {
        Ok(_) => panic!("a service account without access must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&ns) && e.contains("rbac.yaml"), "{e}");
}
