//! The test node: scheduler and kubelet of one node for the test bed.
//!
//! The test bed runs a real kube-apiserver (and etcd) but no scheduler,
//! controller manager or kubelet. [`start`] registers a Node, binds the
//! unscheduled pods of the namespaces it watches to it, and runs them as
//! local processes, reporting their status through the API as a kubelet
//! would:
//!
//! - the image is ignored: a container's `command` and `args` run host
//!   binaries (there is no image entrypoint);
//! - each container runs under bubblewrap, over a read-only view of the
//!   host's root, with its own `/proc`, `/dev` and `/tmp`, and the pod's
//!   volumes (`emptyDir`, `configMap`, `secret`, `downwardAPI`, `projected`
//!   — service account tokens included — and `hostPath`) mounted at their
//!   `mountPath`s; the containers of a pod share the host network, so
//!   sidecars are on `localhost` as in a real pod;
//! - init containers run in order; those with `restartPolicy: Always` are
//!   native sidecars, stopped (TERM, then KILL after 5 s) once every main
//!   container has exited;
//! - `activeDeadlineSeconds` and graceful deletion are honoured.
//!
//! It also stands in for the controllers the test bed lacks where pods need
//! them: it creates each watched namespace's `default` service account.
//!
//! Containers are never restarted: the test node suits pods with
//! `restartPolicy: Never`, which is what Decap runs.

mod runner;
mod sandbox;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Binding, ContainerState, ContainerStateTerminated, ContainerStatus, Namespace, Node,
    NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, ObjectReference, Pod, PodStatus,
    ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use runner::Runner;
use sandbox::{RootEntry, find_in_path, host_root_entries, signal_container};

/// The address of the node, of its pods and of their containers.
const NODE_IP: &str = "127.0.0.1";
/// The namespace of node heartbeats.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the node's Lease is renewed.
const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How long sidecars get between TERM and KILL once the main containers are done.
const SIDECAR_GRACE: Duration = Duration::from_secs(5);
/// How much of a failed container's output its terminated state keeps.
const MESSAGE_TAIL: u64 = 4096;
/// `PATH` of containers that set none (images usually set this one).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The ConfigMap of the cluster's CA that service account volumes mount.
const KUBE_ROOT_CA: &str = "kube-root-ca.crt";
/// Top-level entries of the host's root that a sandbox does not share.
const PRIVATE_ROOT_ENTRIES: &[&str] = &["proc", "dev", "sys", "tmp", "run"];

/// What the test node is and what it watches.
#[derive(Debug, Clone)]
pub struct TestNodeConfig {
    /// The Node's name (pods are bound to it).
    pub node_name: String,
    /// The namespaces whose pods the node schedules and runs.
    pub namespaces: Vec<String>,
}

impl Default for TestNodeConfig {
    fn default() -> Self {
        TestNodeConfig {
            node_name: "decap-test-node".into(),
            namespaces: vec!["decap".into()],
        }
    }
}

/// Why the test node could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestNodeError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Bubblewrap is missing.
    #[error("the test node runs containers under bubblewrap: `bwrap` is not on PATH")]
    NoBubblewrap,
    /// The host's root could not be listed.
    #[error("cannot list the host's root folder: {0}")]
    Io(#[from] std::io::Error),
}

/// A running test node. Dropping it (or [`TestNode::shutdown`]) kills every
/// process it started.
pub struct TestNode {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("node_name", &self.shared.node)
            .field("running_pods", &self.running_pods())
            .finish()
    }
}

/// Registers the node and starts scheduling and running the pods of
/// `config.namespaces`.
pub async fn start(
    client: kube::Client,
    config: TestNodeConfig,
) -> Result<TestNode, TestNodeError> {
    let bwrap = find_in_path("bwrap").ok_or(TestNodeError::NoBubblewrap)?;
    let root_entries = host_root_entries()?;
    ensure_namespace(&client, NODE_LEASE_NAMESPACE).await?;
    register_node(&client, &config.node_name).await?;
    renew_lease(&client, &config.node_name).await?;

    let shared = Arc::new(Shared {
        client,
        node: config.node_name.clone(),
        bwrap,
        root_entries,
        pods: Mutex::new(HashMap::new()),
        finished: Mutex::new(HashMap::new()),
        procs: Procs::default(),
    });
    let mut tasks = vec![tokio::spawn(heartbeat(shared.clone()))];
    let mut namespaces = config.namespaces.clone();
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        // What the controller manager would do: the namespace's `default`
        // service account, without which no pod can be created.
        ensure_namespace(&shared.client, &ns).await?;
        ensure_default_service_account(&shared.client, &ns).await?;
        tasks.push(tokio::spawn(watch_namespace(shared.clone(), ns)));
    }
    info!(node = %config.node_name, namespaces = ?config.namespaces, "test node started");
    Ok(TestNode { shared, tasks })
}

impl TestNode {
    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.node
    }

    /// How many pods are running (or being stopped) on the node.
    pub fn running_pods(&self) -> usize {
        lock(&self.shared.pods).len()
    }

    /// Stops watching, kills every process the node started and removes the
    /// pods' folders. Pods keep their last reported status.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let runners: Vec<JoinHandle<()>> = lock(&self.shared.pods)
            .drain()
            .filter_map(|(_, h)| h.task)
            .collect();
        for t in &runners {
            t.abort();
        }
        self.shared.procs.kill_all();
        for t in runners {
            let _ = t.await;
        }
        info!(node = %self.shared.node, "test node stopped");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, h) in lock(&self.shared.pods).drain() {
            if let Some(t) = h.task {
                t.abort();
            }
        }
        self.shared.procs.kill_all();
    }
}

// ---------------------------------------------------------------------------
// Shared state

struct Shared {
    client: kube::Client,
    node: String,
    bwrap: PathBuf,
    root_entries: Vec<RootEntry>,
    /// Pods running here, by uid.
    pods: Mutex<HashMap<String, PodHandle>>,
    /// Pods this node ran and finished (never run twice): uid → namespace.
    finished: Mutex<HashMap<String, String>>,
    procs: Procs,
}

struct PodHandle {
    namespace: String,
    ctl: mpsc::UnboundedSender<Ctl>,
    /// The grace period of a deletion already passed on to the pod.
    grace: Option<i64>,
    task: Option<JoinHandle<()>>,
}

/// What the watcher tells a pod's runner.
#[derive(Debug)]
enum Ctl {
    /// The pod is being deleted with this grace period (seconds).
    Delete(i64),
    /// The pod is gone from the API.
    Gone,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The bubblewrap processes of every container, so that everything can be
/// killed at once.
#[derive(Default)]
struct Procs(Mutex<HashSet<u32>>);

impl Procs {
    fn add(&self, pid: u32) {
        lock(&self.0).insert(pid);
    }
    fn remove(&self, pid: u32) {
        lock(&self.0).remove(&pid);
    }
    fn kill_all(&self) {
        let pids: Vec<u32> = lock(&self.0).drain().collect();
        for pid in pids {
            signal_container(pid, Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// ---------------------------------------------------------------------------
// The node

/// The host's architecture as Kubernetes names it.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn node_status() -> NodeStatus {
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity("64".into())),
        ("memory".to_owned(), Quantity("256Gi".into())),
        ("pods".to_owned(), Quantity("1000".into())),
        ("ephemeral-storage".to_owned(), Quantity("1Ti".into())),
    ]);
    let t = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(t.clone()),
        last_transition_time: Some(t.clone()),
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: NODE_IP.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: "localhost".into(),
            },
        ]),
        conditions: Some(vec![
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "the Decap test node is ready",
            ),
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "no memory pressure",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "no PID pressure",
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: arch().into(),
            operating_system: "linux".into(),
            os_image: "Decap test node".into(),
            kubelet_version: "decap-test-node".into(),
            container_runtime_version: "bubblewrap".into(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Err(e) if api_code(&e) != Some(409) => Err(e),
        _ => Ok(()),
    }
}

async fn ensure_default_service_account(
    client: &kube::Client,
    namespace: &str,
) -> Result<(), kube::Error> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    if api.get_opt("default").await?.is_some() {
        return Ok(());
    }
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Err(e) if api_code(&e) != Some(409) => Err(e),
        _ => Ok(()),
    }
}

/// Creates the Node unless it exists, and reports it ready.
async fn register_node(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    if api.get_opt(name).await?.is_none() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_owned(), name.to_owned()),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ("kubernetes.io/arch".to_owned(), arch().to_owned()),
                    ("decap.io/test-node".to_owned(), "true".to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            // A scheduler, where one runs, places nothing here: this node
            // binds the pods of its namespaces itself, and outlives its
            // test as an object.
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                unschedulable: Some(true),
                ..Default::default()
            }),
            ..Node::default()
        };
        match api.create(&PostParams::default(), &node).await {
            Err(e) if api_code(&e) != Some(409) => return Err(e),
            _ => {}
        }
    }
    let patch = serde_json::json!({ "status": node_status() });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Renews the node's Lease in `kube-node-lease` (creating it when missing).
async fn renew_lease(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let spec = LeaseSpec {
        holder_identity: Some(name.into()),
        lease_duration_seconds: Some(40),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    };
    let patch = serde_json::json!({ "spec": spec });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if api_code(&e) == Some(404) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(NODE_LEASE_NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            match api.create(&PostParams::default(), &lease).await {
                Err(e) if api_code(&e) != Some(409) => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

/// Keeps the node fresh: its Lease every 10 s, its status every minute
/// (which also brings it back if it was deleted).
async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(LEASE_RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(6) {
            let registered = async {
                ensure_namespace(&shared.client, NODE_LEASE_NAMESPACE).await?;
                register_node(&shared.client, &shared.node).await
            };
            if let Err(e) = registered.await {
                warn!(node = %shared.node, "cannot refresh the node's status: {e}");
            }
        }
        if let Err(e) = renew_lease(&shared.client, &shared.node).await {
            warn!(node = %shared.node, "cannot renew the node's lease: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Scheduling

async fn watch_namespace(shared: Arc<Shared>, ns: String) {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    // uid → name of pods whose binding failed, retried on a timer.
    let mut unbound: HashMap<String, String> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(Event::Init) => listed.clear(),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            listed.insert(uid.clone());
                        }
                        handle_pod(&shared, &api, pod, &mut unbound).await;
                    }
                    Ok(Event::InitDone) => {
                        // Pods running here that the new listing lacks are gone.
                        for (uid, h) in lock(&shared.pods).iter() {
                            if h.namespace == ns && !listed.contains(uid) {
                                let _ = h.ctl.send(Ctl::Gone);
                            }
                        }
                        lock(&shared.finished).retain(|uid, n| *n != ns || listed.contains(uid));
                        unbound.retain(|uid, _| listed.contains(uid));
                    }
                    Ok(Event::Apply(pod)) => handle_pod(&shared, &api, pod, &mut unbound).await,
                    Ok(Event::Delete(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            pod_gone(&shared, uid);
                            unbound.remove(uid);
                        }
                    }
                    Err(e) => warn!(namespace = %ns, "watching pods: {e}"),
                }
            }
            _ = retry.tick(), if !unbound.is_empty() => {
                let pending: Vec<(String, String)> = unbound.drain().collect();
                for (uid, name) in pending {
                    if !bind(&shared, &api, &name, &uid).await {
                        unbound.insert(uid, name);
                    }
                }
            }
        }
    }
}

fn pod_gone(shared: &Shared, uid: &str) {
    if let Some(h) = lock(&shared.pods).get(uid) {
        let _ = h.ctl.send(Ctl::Gone);
    }
    lock(&shared.finished).remove(uid);
}

/// Binds a pod to the node; false when it should be tried again.
async fn bind(shared: &Shared, api: &Api<Pod>, name: &str, uid: &str) -> bool {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(shared.node.clone()),
            ..ObjectReference::default()
        },
    };
    let res: Result<serde_json::Value, _> = api
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await;
    match res {
        Ok(_) => {
            debug!(pod = name, node = %shared.node, "bound");
            true
        }
        // Bound already, or gone.
        Err(e) if matches!(api_code(&e), Some(404 | 409)) => true,
        Err(e) => {
            warn!(pod = name, "cannot bind the pod to {}: {e}", shared.node);
            false
        }
    }
}

async fn handle_pod(
    shared: &Arc<Shared>,
    api: &Api<Pod>,
    pod: Pod,
    unbound: &mut HashMap<String, String>,
) {
    let (Some(uid), Some(name)) = (pod.metadata.uid.clone(), pod.metadata.name.clone()) else {
        return;
    };
    let Some(spec) = &pod.spec else { return };
    let namespace = api.namespace().unwrap_or_default().to_owned();
    let node = spec.node_name.as_deref().unwrap_or_default();
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if node.is_empty() {
        if !deleting && !bind(shared, api, &name, &uid).await {
            unbound.insert(uid, name);
        }
        return;
    }
    unbound.remove(&uid);
    if node != shared.node {
        return;
    }
    {
        let mut pods = lock(&shared.pods);
        if let Some(h) = pods.get_mut(&uid) {
            if deleting {
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
                if h.grace.is_none_or(|g| grace < g) {
                    h.grace = Some(grace);
                    let _ = h.ctl.send(Ctl::Delete(grace));
                }
            }
            return;
        }
    }
    if deleting {
        // Nothing of it runs here: let the API server remove it.
        force_delete(api, &name, &uid).await;
        return;
    }
    let status = pod.status.clone().unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
        || lock(&shared.finished).contains_key(&uid)
    {
        return;
    }
    if status.start_time.is_some() {
        // Started by an earlier run of the node, whose processes are gone.
        mark_lost(api, &name, status).await;
        lock(&shared.finished).insert(uid, namespace);
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut pods = lock(&shared.pods);
    let runner = Runner::new(shared.clone(), api.clone(), pod, rx);
    let task = tokio::spawn(runner.run());
    pods.insert(
        uid,
        PodHandle {
            namespace,
            ctl: tx,
            grace: None,
            task: Some(task),
        },
    );
}

/// Deletes a pod at once (its processes are gone), unless it was replaced.
async fn force_delete(api: &Api<Pod>, name: &str, uid: &str) -> bool {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => true,
        Err(e) if matches!(api_code(&e), Some(404 | 409)) => true,
        Err(e) => {
            warn!(pod = name, "cannot delete the pod: {e}");
            false
        }
    }
}

/// Fails a pod that an earlier run of the node started.
async fn mark_lost(api: &Api<Pod>, name: &str, mut status: PodStatus) {
    let t = now();
    let lost = |statuses: &mut Option<Vec<ContainerStatus>>| {
        for s in statuses.iter_mut().flatten() {
            if s.state.as_ref().is_none_or(|st| st.terminated.is_none()) {
                let started_at = s
                    .state
                    .as_ref()
                    .and_then(|st| st.running.as_ref())
                    .and_then(|r| r.started_at.clone());
                s.ready = false;
                s.started = Some(false);
                s.state = Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 137,
                        reason: Some("Error".into()),
                        message: Some("the test node restarted while the container ran".into()),
                        started_at,
                        finished_at: Some(t.clone()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                });
            }
        }
    };
    lost(&mut status.init_container_statuses);
    lost(&mut status.container_statuses);
    status.phase = Some("Failed".into());
    status.reason = Some("NodeRestarted".into());
    status.message = Some("the test node restarted while the pod ran".into());
    let patch = serde_json::json!({ "status": status });
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        warn!(pod = name, "cannot fail the pod: {e}");
    }
}
