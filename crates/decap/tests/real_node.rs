//! The test bed's real node (`tests/bed/node.sh`: a kubelet with
//! containerd, runc and the CNI plugins) against the bed's real API server:
//! a pod from an image imported into containerd runs in a container of its
//! own (its own cgroup with its memory limit, its own network), and its log
//! is read through the API server from the kubelet, as `kubectl logs` does.
//!
//! `tests/run` starts the node and sets `DECAP_TEST_REAL_NODE` (the Node's
//! name) and `DECAP_TEST_NODE_IMAGE`; without root it sets
//! `DECAP_TEST_REAL_NODE=skip:<why>`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use decap_kube::k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use decap_kube::kube::api::{DeleteParams, LogParams, PostParams};
use decap_kube::kube::{Api, Client};

/// The node's name and the image it holds, or `None` when this run has no
/// real node (said why).
fn real_node() -> Option<(String, String)> {
    let node = std::env::var("DECAP_TEST_REAL_NODE").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_REAL_NODE is not set: run the tests through tests/run, which starts \
             the real node (tests/bed/node.sh)"
        )
    });
    if let Some(why) = node.strip_prefix("skip:") {
        eprintln!("no real node in this run: {why}");
        return None;
    }
    let image = std::env::var("DECAP_TEST_NODE_IMAGE").unwrap();
    Some((node, image))
}

async fn admin() -> Client {
    let kubeconfig = std::env::var("DECAP_TEST_KUBECONFIG").unwrap();
    decap_kube::client(Some(std::path::Path::new(&kubeconfig)))
        .await
        .unwrap()
}

/// A fresh namespace with its `default` service account (no controller
/// manager runs to make it).
async fn namespace(client: &Client) -> String {
    let ns = format!(
        "real-node-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("default".into());
    sa.automount_service_account_token = Some(false);
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    ns
}

#[tokio::test]
async fn the_real_node_runs_a_pod_from_a_local_image_in_its_own_cgroup_and_serves_its_log() {
    let Some((node, image)) = real_node() else {
        return;
    };
    let client = admin().await;
    let ready = Api::<Node>::all(client.clone()).get(&node).await.unwrap();
    let conditions = ready.status.unwrap().conditions.unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{conditions:?}"
    );
    let ns = namespace(&client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Bound to the node by name (no scheduler runs); the image is never
    // pulled: it was imported into containerd.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hello"},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c",
                    "echo hello from $(hostname); \
                     echo memory limit $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max); \
                     echo pid one is $(cat /proc/1/comm); \
                     ip -4 -o addr show 2>/dev/null | grep -v ' lo ' || cat /proc/net/fib_trie | grep -m1 10.244"],
                "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let start = Instant::now();
    let phase = loop {
        let p = pods.get("hello").await.unwrap();
        let phase = p
            .status
            .and_then(|s| s.phase)
            .unwrap_or_else(|| "Pending".into());
        if phase == "Succeeded" || phase == "Failed" {
            break phase;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the pod is still {phase} after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = pods.logs("hello", &LogParams::default()).await.unwrap();
    assert_eq!(phase, "Succeeded", "{log}");
    // Its own hostname (the pod's), a real memory cgroup with its limit,
    // the pod's own pid namespace (the container's command is pid 1), and
    // an address on the bed's pod network.
    assert!(log.contains("hello from hello"), "{log}");
    assert!(log.contains(&format!("memory limit {}", 64 << 20)), "{log}");
    assert!(log.contains("pid one is sh"), "{log}");
    assert!(log.contains("10.244."), "{log}");
    // The kubelet confirms the deletion once the pod's containers are
    // gone (no namespace controller runs to delete a namespace's pods).
    pods.delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    let start = Instant::now();
    while pods.get_opt("hello").await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pod is not gone 60 s after its deletion"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
