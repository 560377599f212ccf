//! [`Executor`] that runs each build as a pod.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use decap_core::build::BuildId;
use decap_core::ports::{EnvironmentExit, Executor, ExecutorEvents, LaunchSpec};
use decap_core::{Error, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::KubeExecutorConfig;
use crate::pod::{self, BUILD_CONTAINER, TYPE_LABEL};

fn kube_err(e: impl std::fmt::Display) -> Error {
    Error::backend("kubernetes", e)
}

/// Whether an error means the API server could not be reached at all (as
/// opposed to an answer refusing the request).
pub(crate) fn is_unreachable(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(_))
}

/// The API's own words for an error, without the client's wrapping.
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

fn selector() -> String {
    format!("{}={}", TYPE_LABEL.0, TYPE_LABEL.1)
}

/// The build a pod runs, from its name.
fn build_of(pod: &Pod) -> Option<BuildId> {
    pod.metadata
        .name
        .as_deref()
        .and_then(|n| BuildId::parse(n).ok())
}

/// Why a pod's build environment is over, or `None` while it runs.
pub fn ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let build = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == BUILD_CONTAINER);
    let terminated = build
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let phase = status.phase.as_deref().unwrap_or("");
    if terminated.is_none() && !matches!(phase, "Succeeded" | "Failed") {
        return unstartable(status);
    }
    let pod_reason = status.reason.as_deref().unwrap_or("");
    let pod_message = status.message.as_deref().unwrap_or("");
    let reason = match (pod_reason, terminated) {
        ("Evicted", _) => format!("the build pod was evicted: {pod_message}"),
        ("DeadlineExceeded", _) => {
            "the build pod ran past its deadline (activeDeadlineSeconds) and was stopped".into()
        }
        ("NodeLost" | "NodeShutdown" | "Terminated", _) => {
            format!("the build pod was lost with its node ({pod_reason}): {pod_message}")
        }
        (_, Some(t)) if t.reason.as_deref() == Some("OOMKilled") => format!(
            "the build container used more memory than its limit and was killed (OOMKilled, exit code {})",
            t.exit_code
        ),
        (_, Some(t)) => format!(
            "the build container exited with code {}{}",
            t.exit_code,
            t.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        (_, None) => {
            // Failed before the build container ran: an init container or a
            // sidecar failed.
            let init = status
                .init_container_statuses
                .iter()
                .flatten()
                .find_map(|c| {
                    let t = c.state.as_ref()?.terminated.as_ref()?;
                    (t.exit_code != 0).then(|| {
                        format!(
                            "container {} exited with code {}{}",
                            c.name,
                            t.exit_code,
                            t.message
                                .as_deref()
                                .map(|m| format!(": {}", m.trim()))
                                .unwrap_or_default()
                        )
                    })
                });
            match init {
                Some(why) => format!("the build pod failed before the build started: {why}"),
                None => format!("the build pod ended ({phase}) {pod_message}")
                    .trim()
                    .to_owned(),
            }
        }
    };
    Some(reason)
}

/// Why a pod that has not ended can never start, if so: a container whose
/// image cannot be pulled (the kubelet would retry with a growing back-off
/// until the build's deadline; the build ends now, naming the image).
fn unstartable(status: &PodStatus) -> Option<String> {
    const NEVER: [&str; 4] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
    ];
    let all = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    all.into_iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref()?;
        NEVER.contains(&reason).then(|| {
            format!(
                "the build pod cannot start: the image {:?} of container {} cannot be pulled ({reason}){}",
                c.image,
                c.name,
                waiting
                    .message
                    .as_deref()
                    .map(|m| format!(": {}", m.trim()))
                    .unwrap_or_default()
            )
        })
    })
}

/// [`Executor`] that runs each build as one pod in the build namespace.
///
/// The pod is named after the build id, so a launch of a build that already
/// has a pod adopts it. A watcher follows the build pods: the end of each is
/// reported once through [`ExecutorEvents`] with its reason (exit code,
/// eviction, OOM kill, deadline, deletion), and finished pods are deleted
/// after [`KubeExecutorConfig::finished_pod_ttl`].
pub struct KubeExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    config: KubeExecutorConfig,
    events: Arc<dyn ExecutorEvents>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Builds with a pod, as last seen.
    live: HashSet<BuildId>,
    /// Builds whose end was reported (until their pod is gone).
    reported: HashSet<BuildId>,
    /// Pods whose deletion is scheduled.
    reaping: HashSet<BuildId>,
    /// Launches waiting for the API server to come back.
    pending: HashMap<BuildId, tokio::task::AbortHandle>,
    /// Why the API server cannot be used now.
    unavailable: Option<String>,
}

impl KubeExecutor {
    /// An executor over `client`; starts its pod watcher.
    pub async fn new(
        client: Client,
        config: KubeExecutorConfig,
        events: Arc<dyn ExecutorEvents>,
    ) -> Result<Self> {
        let inner = Arc::new(Inner {
            pods: Api::namespaced(client.clone(), &config.namespace),
            config_maps: Api::namespaced(client.clone(), &config.namespace),
            secrets: Api::namespaced(client, &config.namespace),
            config,
            events,
            state: Mutex::new(State::default()),
        });
        // Check access now rather than at the first build.
        let pods = inner
            .pods
            .list(&ListParams::default().labels(&selector()))
            .await
            .map_err(|e| {
                kube_err(format!(
                    "cannot list build pods in namespace {}: {}",
                    inner.config.namespace,
                    describe(&e)
                ))
            })?;
        {
            let mut s = inner.lock();
            s.live = pods.items.iter().filter_map(build_of).collect();
        }
        inner.sweep_config_maps(&pods.items).await;
        let watched = inner.clone();
        tokio::spawn(async move { watched.watch().await });
        Ok(KubeExecutor { inner })
    }

    /// Why the API server cannot be used now, if it cannot.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.inner.lock().unavailable.clone()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_unavailable(&self, why: Option<String>) {
        let mut s = self.lock();
        if s.unavailable.is_some() != why.is_some() {
            match &why {
                Some(w) => tracing::warn!(reason = %w, "the Kubernetes API is unreachable"),
                None => tracing::info!("the Kubernetes API is reachable again"),
            }
        }
        s.unavailable = why;
    }

    /// Deletes scripts ConfigMaps and token Secrets whose build pod is gone
    /// (left by a controller that stopped between the deletions).
    async fn sweep_config_maps(&self, pods: &[Pod]) {
        let names: HashSet<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if let Ok(tokens) = self
            .secrets
            .list(&ListParams::default().labels("type=decap-build-token"))
            .await
        {
            for t in tokens.items {
                let Some(name) = t.metadata.name else {
                    continue;
                };
                if !names.contains(name.trim_end_matches("-token")) {
                    let _ = self.secrets.delete(&name, &DeleteParams::default()).await;
                }
            }
        }
        let Ok(cms) = self
            .config_maps
            .list(&ListParams::default().labels("type=decap-build-scripts"))
            .await
        else {
            return;
        };
        for cm in cms.items {
            let Some(name) = cm.metadata.name else {
                continue;
            };
            let pod = name.trim_end_matches("-scripts");
            if !names.contains(pod) {
                let _ = self
                    .config_maps
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
        }
    }

    /// Creates the ConfigMap, the token Secret and the pod; all already
    /// existing is success (the launch adopts them).
    async fn create(&self, r: &pod::Rendered) -> std::result::Result<(), kube::Error> {
        let pp = PostParams::default();
        match self.config_maps.create(&pp, &r.scripts).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
        match self.secrets.create(&pp, &r.token).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e),
        }
        let pod = &r.pod;
        match self.pods.create(&pp, pod).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reports a build's end once.
    fn report(&self, id: BuildId, reason: String) {
        let first = self.lock().reported.insert(id);
        if first {
            tracing::info!(build_id = %id, reason = %reason, "build pod ended");
            self.events.environment_exited(EnvironmentExit {
                build_id: id,
                reason,
                limits: Vec::new(),
            });
        }
    }

    /// Deletes a finished pod (and its ConfigMap) after the configured time.
    fn reap_later(self: &Arc<Self>, id: BuildId) {
        if !self.lock().reaping.insert(id) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.config.finished_pod_ttl).await;
            let name = id.to_string();
            if let Err(e) = this.pods.delete(&name, &DeleteParams::default()).await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404)
            {
                tracing::warn!(build_id = %id, error = %describe(&e), "cannot delete a finished build pod");
                this.lock().reaping.remove(&id);
                return;
            }
            this.delete_companions(&name).await;
        });
    }

    /// Deletes a build's scripts ConfigMap and token Secret.
    async fn delete_companions(&self, pod_name: &str) {
        let dp = DeleteParams::default();
        let _ = self
            .config_maps
            .delete(&pod::scripts_config_map_name(pod_name), &dp)
            .await;
        let _ = self
            .secrets
            .delete(&pod::token_secret_name(pod_name), &dp)
            .await;
    }

    fn seen(self: &Arc<Self>, pod: &Pod) {
        let Some(id) = build_of(pod) else { return };
        self.lock().live.insert(id);
        if let Some(reason) = ended(pod) {
            self.report(id, reason);
            self.reap_later(id);
        }
    }

    fn gone(self: &Arc<Self>, id: BuildId, reason: &str) {
        {
            let mut s = self.lock();
            s.live.remove(&id);
            s.reaping.remove(&id);
        }
        self.report(id, reason.to_owned());
        self.lock().reported.remove(&id);
        let this = self.clone();
        tokio::spawn(async move { this.delete_companions(&id.to_string()).await });
    }

    async fn watch(self: Arc<Self>) {
        let config = watcher::Config::default().labels(&selector());
        let mut stream = watcher(self.pods.clone(), config).boxed();
        let mut relisted: HashSet<BuildId> = HashSet::new();
        let mut failures = 0u32;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    failures = 0;
                    self.set_unavailable(None);
                    match event {
                        watcher::Event::Apply(pod) => self.seen(&pod),
                        watcher::Event::Delete(pod) => {
                            if let Some(id) = build_of(&pod) {
                                let reason = ended(&pod).unwrap_or_else(|| {
                                    "the build pod was deleted before the build finished".into()
                                });
                                self.gone(id, &reason);
                            }
                        }
                        watcher::Event::Init => relisted.clear(),
                        watcher::Event::InitApply(pod) => {
                            if let Some(id) = build_of(&pod) {
                                relisted.insert(id);
                            }
                            self.seen(&pod);
                        }
                        watcher::Event::InitDone => {
                            // Pods that went while the watch was down.
                            let vanished: Vec<BuildId> = self
                                .lock()
                                .live
                                .iter()
                                .filter(|id| !relisted.contains(id))
                                .copied()
                                .collect();
                            for id in vanished {
                                self.gone(
                                    id,
                                    "the build pod was deleted before the build finished",
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.set_unavailable(Some(e.to_string()));
                    let delay = Duration::from_millis(100 * 2u64.pow(failures.min(4)));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Keeps creating a build's pod until the API server answers, giving up
    /// after the build's timeout.
    fn launch_when_reachable(self: &Arc<Self>, spec: &LaunchSpec, rendered: pod::Rendered) {
        let id = spec.build.id;
        let give_up = tokio::time::Instant::now() + spec.timeout;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                tokio::time::sleep(delay).await;
                match this.create(&rendered).await {
                    Ok(()) => {
                        tracing::info!(build_id = %id, "build pod created after the API server came back");
                        this.set_unavailable(None);
                        break;
                    }
                    Err(e) if is_unreachable(&e) && tokio::time::Instant::now() < give_up => {
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        this.report(
                            id,
                            format!("the build pod could not be created: {}", describe(&e)),
                        );
                        this.lock().reported.remove(&id);
                        break;
                    }
                }
            }
            this.lock().pending.remove(&id);
        });
        self.lock().pending.insert(id, task.abort_handle());
    }
}

#[async_trait]
impl Executor for KubeExecutor {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn sandbox(&self) -> &'static str {
        "pod"
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable_reason()
            .map(|why| format!("the Kubernetes API server is unreachable ({why})"))
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<()> {
        let inner = &self.inner;
        let rendered =
            pod::render(&spec, &inner.config).map_err(|e| Error::invalid("build pod", e))?;
        match inner.create(&rendered).await {
            Ok(()) => {
                inner.lock().live.insert(spec.build.id);
                Ok(())
            }
            Err(e) if is_unreachable(&e) => {
                // The build keeps its place: its pod is created as soon as
                // the API server answers again. Builds that come meanwhile
                // wait deferred (see `unavailable`).
                inner.set_unavailable(Some(e.to_string()));
                inner.lock().live.insert(spec.build.id);
                inner.launch_when_reachable(&spec, rendered);
                Ok(())
            }
            Err(e) => Err(kube_err(format!(
                "the API server refused the build pod: {}",
                describe(&e)
            ))),
        }
    }

    async fn cancel(&self, build: BuildId) -> Result<()> {
        let inner = &self.inner;
        if let Some(task) = inner.lock().pending.remove(&build) {
            task.abort();
            inner.gone(build, "the build was cancelled before its pod was created");
            return Ok(());
        }
        let grace = u32::try_from(inner.config.kill_grace.as_secs()).unwrap_or(30);
        let dp = DeleteParams {
            grace_period_seconds: Some(grace),
            ..DeleteParams::default()
        };
        match inner.pods.delete(&build.to_string(), &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => {
                return Err(kube_err(format!(
                    "cannot delete the build pod: {}",
                    describe(&e)
                )));
            }
        }
        // The build ends once its containers have: wait for the pod to be
        // gone (its grace period, then the kubelet's kill), within bounds.
        let limit = tokio::time::Instant::now() + inner.config.kill_grace + Duration::from_secs(30);
        while tokio::time::Instant::now() < limit {
            match inner.pods.get_opt(&build.to_string()).await {
                Ok(None) => return Ok(()),
                Ok(Some(p)) if ended(&p).is_some() => return Ok(()),
                Ok(Some(_)) => {}
                Err(e) if is_unreachable(&e) => {}
                Err(_) => return Ok(()),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::warn!(build_id = %build, "the build pod is still terminating");
        Ok(())
    }

    async fn live(&self) -> Result<Vec<BuildId>> {
        let pods = self
            .inner
            .pods
            .list(&ListParams::default().labels(&selector()))
            .await
            .map_err(|e| kube_err(format!("cannot list build pods: {}", describe(&e))))?;
        // A pod that has ended is not live, even before it is deleted.
        let mut ids: HashSet<BuildId> = pods
            .items
            .iter()
            .filter(|p| ended(p).is_none() && p.metadata.deletion_timestamp.is_none())
            .filter_map(build_of)
            .collect();
        ids.extend(self.inner.lock().pending.keys().copied());
        Ok(ids.into_iter().collect())
    }
}

impl Drop for KubeExecutor {
    fn drop(&mut self) {
        for (_, task) in self.inner.lock().pending.drain() {
            task.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "01900000-0000-7000-8000-000000000001"},
            "status": status,
        }))
        .unwrap()
    }

    fn terminated(code: i32, reason: &str) -> serde_json::Value {
        serde_json::json!([{
            "name": "build", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}}
        }])
    }

    #[test]
    fn a_running_pod_has_not_ended() {
        assert_eq!(ended(&pod(serde_json::json!({"phase": "Running"}))), None);
        assert_eq!(ended(&pod(serde_json::json!({"phase": "Pending"}))), None);
    }

    #[test]
    fn each_way_a_pod_ends_has_its_reason() {
        let cases = [
            (
                serde_json::json!({"phase": "Succeeded", "containerStatuses": terminated(0, "Completed")}),
                "exited with code 0 (Completed)",
            ),
            (
                serde_json::json!({"phase": "Failed", "containerStatuses": terminated(137, "OOMKilled")}),
                "OOMKilled",
            ),
            (
                serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
                "evicted: The node was low on resource: memory.",
            ),
            (
                serde_json::json!({"phase": "Failed", "reason": "DeadlineExceeded"}),
                "deadline",
            ),
            (
                serde_json::json!({"phase": "Failed", "reason": "NodeLost", "message": "node n1 is gone"}),
                "lost with its node",
            ),
            (
                serde_json::json!({"phase": "Failed", "initContainerStatuses": [{
                    "name": "decap-bctool", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 1, "message": "no space left"}}
                }]}),
                "before the build started: container decap-bctool exited with code 1: no space left",
            ),
        ];
        for (status, want) in cases {
            let why = ended(&pod(status.clone())).unwrap_or_default();
            assert!(why.contains(want), "{status}: {why:?} lacks {want:?}");
        }
    }

    #[test]
    fn a_pod_whose_image_cannot_be_pulled_has_ended_naming_it() {
        for reason in ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"] {
            let why = ended(&pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "build", "image": "registry.example/nope:1", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": "not found"}}
            }]})))
            .unwrap_or_default();
            assert!(
                why.contains(&format!("\"registry.example/nope:1\" of container build cannot be pulled ({reason}): not found")),
                "{why}"
            );
        }
        // A sidecar's image too; other waits are not ends.
        let sidecar = ended(&pod(
            serde_json::json!({"phase": "Pending", "initContainerStatuses": [{
                "name": "db", "image": "db:9", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImagePull"}}
            }]}),
        ));
        assert!(sidecar.is_some_and(|w| w.contains("container db")));
        let creating = ended(&pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
                "name": "build", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}
            }]}),
        ));
        assert_eq!(creating, None);
    }

    #[test]
    fn a_pod_is_known_by_its_build() {
        let p = pod(serde_json::json!({}));
        assert!(build_of(&p).is_some());
        let mut other = p.clone();
        other.metadata.name = Some("not-a-build".into());
        assert!(build_of(&other).is_none());
    }
}
