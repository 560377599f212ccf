//! [`Executor`] that runs each build in a container of its `buildImage`,
//! with its sidecars beside it, through the Docker Engine API: Podman's
//! service (`podman system service`) or Docker.
//!
//! A launch checks the project's sidecars and returns; the build's start
//! goes on in the background: the images (pulled when missing, with the
//! pull in the build's console), the sidecars (the first one's network
//! namespace is the build's, so they answer on `localhost`), their
//! readiness probes, then the build container with bctool and the scripts.
//! Whatever fails on the way is the build's error, named.
//!
//! Every container is labelled with its build and this Decap's instance:
//! a restarted controller adopts the builds still running and cleans up
//! the rest. An environment ends when its build container does; the
//! sidecars are removed before the end is reported.

pub mod probe;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use decap_core::build::BuildId;
use decap_core::limits::DefaultLimits;
use decap_core::ports::{EnvironmentExit, Executor, ExecutorEvents, LaunchSpec};
use decap_core::{Error, Result};
use decap_kube::k8s_openapi::api::core::v1::Container;
use futures::StreamExt;

use crate::spec::{LABEL_BUILD, LABEL_INSTANCE, LABEL_ROLE, LABEL_SIDECAR};

/// How the container executor runs builds.
#[derive(Debug, Clone)]
pub struct ContainerExecutorConfig {
    /// The engine's API socket.
    pub engine: PathBuf,
    /// This Decap (labels on its containers: another Decap's are left alone).
    pub instance: String,
    /// Decap's build socket on the host; its folder is bound into builds.
    pub build_socket: PathBuf,
    /// bctool on the host, bound into builds.
    pub bctool: PathBuf,
    /// The port bctool serves the build socket on, inside the build.
    pub url_port: u16,
    /// How long a stopped build gets between TERM and KILL.
    pub kill_grace: Duration,
    /// Limits for what `project.json` does not set.
    pub defaults: DefaultLimits,
    /// How long the containers of a failed build are kept for a look
    /// before they are removed (0: at once).
    pub keep_failed: Duration,
    /// The engine network builds join for outbound access.
    pub network: String,
}

/// The engine's socket as Docker and Podman clients find it: `DOCKER_HOST`
/// or `CONTAINER_HOST` (`unix://`), the rootless Podman socket, the rootful
/// one, Docker's.
pub fn find_engine() -> std::result::Result<PathBuf, String> {
    let mut tried = Vec::new();
    for var in ["DOCKER_HOST", "CONTAINER_HOST"] {
        if let Ok(v) = std::env::var(var) {
            match v.strip_prefix("unix://") {
                Some(p) => return Ok(PathBuf::from(p)),
                None => {
                    return Err(format!(
                        "{var}={v}: only unix:// sockets are supported (name one with --container-socket)"
                    ));
                }
            }
        }
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.push(PathBuf::from(dir).join("podman/podman.sock"));
    }
    candidates.push(PathBuf::from("/run/podman/podman.sock"));
    candidates.push(PathBuf::from("/var/run/docker.sock"));
    for c in candidates {
        if c.exists() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(format!(
        "no container engine socket found (tried {}): start one (`systemctl start podman.socket`, or `podman system service --time=0 &`) or name it with --container-socket",
        tried.join(", ")
    ))
}

fn engine_err(e: impl std::fmt::Display) -> Error {
    Error::backend("container engine", e)
}

/// Why a build's start failed: the build's own error, or the engine gone
/// (the start is tried again once it answers).
#[derive(Debug)]
enum Failure {
    Build(String),
    Engine(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Build(s)
    }
}

/// Whether an error is the engine not answering (rather than answering no).
fn engine_gone(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::HyperLegacyError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
            | E::HttpClientError { .. }
    )
}

/// The failure for an engine error, said as `what`.
fn failed(what: String, e: &bollard::errors::Error) -> Failure {
    let text = format!("{what}: {e}");
    if engine_gone(e) {
        Failure::Engine(text)
    } else {
        Failure::Build(text)
    }
}

/// Whether the engine is a rootless Podman. Its Docker-compatible `/info`
/// does not say (Docker's lists `name=rootless` among its security
/// options), so Podman's own `/libpod/info` is asked; Docker answers that
/// with 404.
async fn podman_rootless(socket: &Path) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
        s.write_all(b"GET /v4.0.0/libpod/info HTTP/1.0\r\nHost: d\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["host"]["security"]["rootless"].as_bool()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ask).await,
        Ok(Some(true))
    )
}

/// [`Executor`] over a container engine: see the crate's documentation.
pub struct ContainerExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    config: ContainerExecutorConfig,
    events: Arc<dyn ExecutorEvents>,
    state: Mutex<State>,
    /// Wakes the reconciler (an engine event, a cancel).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// The engine's client, once it answered.
    docker: Option<Docker>,
    /// Builds whose containers are being made.
    starting: HashMap<BuildId, tokio::task::AbortHandle>,
    /// Builds with a build container, as last seen.
    live: HashSet<BuildId>,
    /// Builds whose end was reported.
    reported: HashSet<BuildId>,
    /// Why a build ended, when something other than its container said so
    /// (a sidecar that exited).
    reasons: HashMap<BuildId, String>,
    /// Why the engine cannot be used now.
    unavailable: Option<String>,
    /// The engine ignores resource limits (rootless on cgroup v1).
    no_limits: bool,
}

impl ContainerExecutor {
    /// An executor over the engine at `config.engine`. An engine that does
    /// not answer (now or later) is not an error: builds wait, deferred
    /// with the reason, until it does, and its running builds are adopted
    /// then.
    pub async fn new(
        config: ContainerExecutorConfig,
        events: Arc<dyn ExecutorEvents>,
    ) -> Result<Self> {
        let inner = Arc::new(Inner {
            config,
            events,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
        });
        inner.connect().await;
        if inner.lock().docker.is_some() {
            inner.reconcile().await;
        }
        let watched = inner.clone();
        tokio::spawn(async move { watched.watch().await });
        let evented = inner.clone();
        tokio::spawn(async move { evented.follow_events().await });
        Ok(ContainerExecutor { inner })
    }

    /// The engine and what builds get, for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "containers through the engine at {} (network {})",
            self.inner.config.engine.display(),
            self.inner.config.network
        )
    }
}

/// The build a container belongs to, from its labels.
fn build_of(labels: Option<&HashMap<String, String>>) -> Option<BuildId> {
    labels
        .and_then(|l| l.get(LABEL_BUILD))
        .and_then(|v| BuildId::parse(v).ok())
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn docker(&self) -> Result<Docker> {
        let s = self.lock();
        s.docker.clone().ok_or_else(|| {
            engine_err(
                s.unavailable
                    .clone()
                    .unwrap_or_else(|| "the container engine is not connected".into()),
            )
        })
    }

    /// Connects (again) to the engine; records why not.
    async fn connect(&self) {
        let path = self.config.engine.to_string_lossy().into_owned();
        let answer = async {
            let d = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)
                .map_err(|e| e.to_string())?;
            let d = d.negotiate_version().await.map_err(|e| e.to_string())?;
            d.ping().await.map_err(|e| e.to_string())?;
            // Rootless on cgroup v1, the engine cannot apply limits (Podman
            // ignores them with a warning): builds are told, not misled.
            let info = d.info().await.map_err(|e| e.to_string())?;
            let rootless = info
                .security_options
                .iter()
                .flatten()
                .any(|o| o.contains("name=rootless"))
                || podman_rootless(&self.config.engine).await;
            let v1 = info
                .cgroup_version
                .as_ref()
                .is_some_and(|v| v.to_string() == "1");
            Ok::<_, String>((d, rootless && v1))
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .unwrap_or_else(|_| Err("no answer within 5 s".into()));
        let mut s = self.lock();
        match answer {
            Ok((d, no_limits)) => {
                s.no_limits = no_limits;
                if s.unavailable.take().is_some() {
                    tracing::info!(engine = %path, "the container engine answers again");
                }
                s.docker = Some(d);
            }
            Err(e) => {
                let why = format!("the container engine at {path} is not answering: {e}");
                if s.unavailable.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        "{why}; builds wait until it does (start it: `systemctl start podman.socket`, or `podman system service --time=0 &`)"
                    );
                }
                s.docker = None;
                s.unavailable = Some(why);
            }
        }
    }

    /// Every second (or when woken): checks the engine and reconciles.
    async fn watch(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
            let ok = match self.docker() {
                Ok(d) => d.ping().await.is_ok(),
                Err(_) => false,
            };
            if !ok {
                self.connect().await;
            }
            if self.lock().docker.is_some() {
                self.reconcile().await;
            }
        }
    }

    /// Follows the engine's `die` events of this instance's containers, to
    /// notice ends at once rather than at the next look.
    async fn follow_events(self: Arc<Self>) {
        loop {
            let Ok(docker) = self.docker() else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let filters = HashMap::from([
                ("type", vec!["container".to_owned()]),
                ("event", vec!["die".to_owned()]),
                (
                    "label",
                    vec![format!("{LABEL_INSTANCE}={}", self.config.instance)],
                ),
            ]);
            let mut events =
                docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
            while let Some(e) = events.next().await {
                if e.is_err() {
                    break;
                }
                self.wake.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn filters(&self) -> HashMap<&'static str, Vec<String>> {
        HashMap::from([(
            "label",
            vec![format!("{LABEL_INSTANCE}={}", self.config.instance)],
        )])
    }

    /// One look at every container of this instance: builds running are
    /// live, ended ones are reported (once) and removed, sidecars without
    /// a build are removed, a sidecar that exited under a running build
    /// ends it.
    async fn reconcile(self: &Arc<Self>) {
        let Ok(docker) = self.docker() else { return };
        // What was starting or live before the look: a build whose start
        // ends during the look is judged at the next one.
        let (starting, known): (HashSet<BuildId>, HashSet<BuildId>) = {
            let s = self.lock();
            (s.starting.keys().copied().collect(), s.live.clone())
        };
        let listed = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&self.filters())
                    .build(),
            ))
            .await;
        let Ok(listed) = listed else { return };
        let mut builds: HashMap<BuildId, Option<ContainerSummaryStateEnum>> = HashMap::new();
        let mut sidecars: HashMap<BuildId, Vec<(String, Option<ContainerSummaryStateEnum>)>> =
            HashMap::new();
        for c in &listed {
            let Some(id) = build_of(c.labels.as_ref()) else {
                continue;
            };
            let role = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .map(String::as_str);
            match role {
                Some("build") => {
                    builds.insert(id, c.state);
                }
                _ => {
                    let name = c
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_SIDECAR))
                        .cloned()
                        .unwrap_or_default();
                    sidecars.entry(id).or_default().push((name, c.state));
                }
            }
        }
        let running = |st: &Option<ContainerSummaryStateEnum>| {
            matches!(
                st,
                Some(
                    ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::CREATED
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING
                )
            )
        };
        let mut ended = Vec::new();
        {
            let mut s = self.lock();
            for (id, st) in &builds {
                // One reported meanwhile (a cancel) stays ended.
                if starting.contains(id) || s.reported.contains(id) {
                    continue;
                }
                if running(st) {
                    s.live.insert(*id);
                } else {
                    s.live.remove(id);
                    ended.push(*id);
                }
            }
            // A build container that vanished (removed from outside): it
            // was live before the look, and is in no list now.
            for id in known.iter().filter(|id| !builds.contains_key(id)) {
                if !s.reported.contains(id) && s.live.remove(id) {
                    s.reasons.entry(*id).or_insert_with(|| {
                        "the build container was removed while the build ran".into()
                    });
                    ended.push(*id);
                }
            }
            // Forget what the engine no longer has.
            s.reported
                .retain(|id| builds.contains_key(id) || sidecars.contains_key(id));
        }
        for (id, sc) in &sidecars {
            if starting.contains(id) {
                continue;
            }
            match builds.get(id) {
                None => {
                    // Left from a start that never finished; not one that
                    // began, or got its build container, during the look
                    // (a build is starting before any container of it is
                    // made).
                    let busy = {
                        let s = self.lock();
                        s.starting.contains_key(id) || s.live.contains(id)
                    };
                    if !busy && !ended.contains(id) {
                        self.remove_all(&docker, *id).await;
                    }
                }
                Some(st) if running(st) => {
                    if let Some((name, _)) = sc.iter().find(|(_, st)| !running(st)) {
                        let why = self.sidecar_exit(&docker, *id, name).await;
                        tracing::warn!(build_id = %id, sidecar = %name, "{why}");
                        self.lock().reasons.entry(*id).or_insert(why);
                        // Its build cannot go on without it.
                        let _ = docker
                            .kill_container(
                                &spec::build_container(*id),
                                Some(KillContainerOptionsBuilder::new().signal("KILL").build()),
                            )
                            .await;
                    }
                }
                Some(_) => {}
            }
        }
        for id in ended {
            self.ended(&docker, id).await;
        }
    }

    /// Why a sidecar stopped, in words.
    async fn sidecar_exit(&self, docker: &Docker, id: BuildId, name: &str) -> String {
        let state = docker
            .inspect_container(
                &spec::sidecar_container(id, name),
                None::<InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|i| i.state);
        match state {
            Some(st) if st.oom_killed == Some(true) => format!(
                "sidecar {name} used more memory than its limit and was killed (OOMKilled) while the build ran"
            ),
            Some(st) => format!(
                "sidecar {name} exited with code {} while the build ran",
                st.exit_code.unwrap_or(-1)
            ),
            None => format!("sidecar {name} stopped while the build ran"),
        }
    }

    /// A build container has ended: its reason, its sidecars removed, the
    /// end reported once, its containers removed (or kept for a while when
    /// it failed and that is asked for).
    async fn ended(self: &Arc<Self>, docker: &Docker, id: BuildId) {
        {
            let mut s = self.lock();
            if !s.reported.insert(id) {
                return;
            }
            s.live.remove(&id);
        }
        let inspected = docker
            .inspect_container(&spec::build_container(id), None::<InspectContainerOptions>)
            .await
            .ok();
        let memory = inspected
            .as_ref()
            .and_then(|i| i.host_config.as_ref()?.memory)
            .and_then(|m| u64::try_from(m).ok())
            .unwrap_or(0);
        let state = inspected.and_then(|i| i.state);
        let code = state.as_ref().and_then(|s| s.exit_code);
        let mut limits = Vec::new();
        let own = match &state {
            Some(st) if st.oom_killed == Some(true) => {
                limits.push(decap_core::limits::LimitHit::Memory(memory));
                format!(
                    "the build container used more memory than its limit and was killed (OOMKilled, exit code {})",
                    code.unwrap_or(-1)
                )
            }
            Some(st) => match st.error.as_deref().filter(|e| !e.is_empty()) {
                Some(e) => format!("the build container failed: {e}"),
                None => format!(
                    "the build container exited with code {}",
                    code.unwrap_or(-1)
                ),
            },
            None => "the build container is gone".into(),
        };
        let reason = self.lock().reasons.remove(&id).unwrap_or(own);
        let keep = self.config.keep_failed;
        if code != Some(0) && !keep.is_zero() {
            // Sidecars stop now; everything is removed after the look.
            self.stop_sidecars(docker, id).await;
            let later = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(keep).await;
                if let Ok(d) = later.docker() {
                    later.remove_all(&d, id).await;
                }
            });
        } else {
            self.remove_all(docker, id).await;
        }
        self.events.environment_exited(EnvironmentExit {
            build_id: id,
            reason,
            limits,
        });
    }

    async fn containers_of(&self, docker: &Docker, id: BuildId) -> Vec<(String, bool)> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_INSTANCE}={}", self.config.instance),
                format!("{LABEL_BUILD}={id}"),
            ],
        )]);
        docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| {
                let is_build = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_ROLE))
                    .map(String::as_str)
                    == Some("build");
                Some((c.id?, is_build))
            })
            .collect()
    }

    async fn stop_sidecars(&self, docker: &Docker, id: BuildId) {
        for (c, is_build) in self.containers_of(docker, id).await {
            if !is_build {
                let _ = docker
                    .kill_container(
                        &c,
                        Some(KillContainerOptionsBuilder::new().signal("KILL").build()),
                    )
                    .await;
            }
        }
    }

    /// Removes every container of a build (the build's last, so a sidecar
    /// that owns the network namespace goes after those that joined it).
    async fn remove_all(&self, docker: &Docker, id: BuildId) {
        let mut all = self.containers_of(docker, id).await;
        all.sort_by_key(|(_, is_build)| !is_build);
        for (c, _) in all {
            let _ = docker
                .remove_container(
                    &c,
                    Some(
                        RemoveContainerOptionsBuilder::new()
                            .force(true)
                            .v(true)
                            .build(),
                    ),
                )
                .await;
        }
    }

    /// Makes sure `image` is present: pulls it when missing, with the
    /// pull's progress kept for the build's console.
    async fn ensure_image(
        &self,
        docker: &Docker,
        image: &str,
        notices: &mut Vec<String>,
    ) -> std::result::Result<(), Failure> {
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if engine_gone(&e) => {
                return Err(failed(format!("cannot look for image {image}"), &e));
            }
            Err(_) => {}
        }
        notices.push(format!("image {image} is not present here: pulling it"));
        let started = std::time::Instant::now();
        let mut pull = docker.create_image(
            Some(CreateImageOptionsBuilder::new().from_image(image).build()),
            None,
            None,
        );
        let mut last = String::new();
        while let Some(step) = pull.next().await {
            match step {
                Ok(info) => {
                    if let Some(status) = info.status {
                        // One line per layer and stage, not per progress tick.
                        let line = match info.id {
                            Some(id) => format!("{id}: {status}"),
                            None => status,
                        };
                        if line != last
                            && !line.contains("Downloading")
                            && !line.contains("Extracting")
                        {
                            notices.push(line.clone());
                        }
                        last = line;
                    }
                }
                Err(e) => {
                    return Err(failed(
                        format!("image {image} is not present here and cannot be pulled"),
                        &e,
                    ));
                }
            }
        }
        if let Err(e) = docker.inspect_image(image).await {
            return Err(failed(
                format!("image {image} is not present here and the pull did not bring it"),
                &e,
            ));
        }
        notices.push(format!(
            "pulled {image} in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Makes and starts a build's containers; `Err` is the build's error.
    async fn start(
        self: &Arc<Self>,
        spec: &LaunchSpec,
        sidecars: &[Container],
    ) -> std::result::Result<(), Failure> {
        let docker = self.docker().map_err(|e| Failure::Engine(e.to_string()))?;
        let id = spec.build.id;
        let mut limits = spec::limits(spec, self.config.defaults);
        let mut notices = Vec::new();
        if self.lock().no_limits {
            notices.push(
                "the container engine runs rootless on cgroup v1 and cannot limit a build: resources.memory, cpu and pids are not enforced here"
                    .to_owned(),
            );
            limits.memory_bytes = None;
            limits.cpu_millis = None;
            limits.pids = None;
        }
        let asks_disk = spec
            .project
            .valid_descriptor()
            .and_then(|d| d.descriptor.resources.as_ref())
            .is_some_and(|r| r.disk.is_some());
        if asks_disk {
            notices.push(
                "the container executor does not limit a build's disk: resources.disk is not enforced here"
                    .to_owned(),
            );
        }
        let image = spec
            .project
            .valid_descriptor()
            .map(|d| d.descriptor.build_image.trim().to_owned())
            .unwrap_or_default();
        if image.is_empty() {
            return Err(Failure::Build(
                "the project has no buildImage: the container executor needs one".into(),
            ));
        }
        self.ensure_image(&docker, &image, &mut notices).await?;
        for s in sidecars {
            let img = s.image.clone().unwrap_or_default();
            self.ensure_image(&docker, &img, &mut notices)
                .await
                .map_err(|e| match e {
                    Failure::Build(m) => Failure::Build(format!("sidecar {}: {m}", s.name)),
                    engine => engine,
                })?;
        }
        let base = spec::base_network(&limits, &self.config.network);
        let mut network = base.clone();
        let mut address: Option<IpAddr> = None;
        for (i, s) in sidecars.iter().enumerate() {
            let name = spec::sidecar_container(id, &s.name);
            let body =
                spec::sidecar_body(spec, &self.config.instance, s, network.clone(), &limits)?;
            docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                    body,
                )
                .await
                .map_err(|e| failed(format!("sidecar {} cannot be created", s.name), &e))?;
            docker
                .start_container(&name, None)
                .await
                .map_err(|e| failed(format!("sidecar {} cannot start", s.name), &e))?;
            if i == 0 {
                network = format!("container:{name}");
                address = docker
                    .inspect_container(&name, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .and_then(|c| c.network_settings)
                    .and_then(|n| n.networks)
                    .and_then(|n| {
                        n.into_values()
                            .find_map(|e| e.ip_address.filter(|a| !a.is_empty()))
                    })
                    .and_then(|a| a.parse().ok());
            }
        }
        // The build container starts while the sidecars get ready, its
        // script held until they are: the build's first line follows the
        // last probe by the time bctool takes to see a file.
        let probes: Vec<u64> = sidecars
            .iter()
            .filter_map(|s| {
                s.readiness_probe
                    .as_ref()
                    .map(|p| probe::deadline(p).as_secs())
            })
            .collect();
        let start_within = probes.iter().max().map(|d| d + 60);
        let socket_dir = self
            .config
            .build_socket
            .parent()
            .unwrap_or(Path::new("/"))
            .to_owned();
        let body = spec::build_body(
            spec,
            &spec::BuildContainer {
                instance: &self.config.instance,
                bctool: &self.config.bctool,
                socket_dir: &socket_dir,
                url_port: self.config.url_port,
                kill_grace_secs: self.config.kill_grace.as_secs(),
                network,
                notices: &notices,
                start_within,
            },
            &limits,
        );
        let name = spec::build_container(id);
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| {
                failed(
                    format!("the build container cannot be created from {image}"),
                    &e,
                )
            })?;
        let tar = spec::workspace_tar(spec)
            .map_err(|e| Failure::Build(format!("cannot pack the scripts: {e}")))?;
        docker
            .upload_to_container(
                &name,
                Some(UploadToContainerOptionsBuilder::new().path("/").build()),
                bollard::body_full(tar.into()),
            )
            .await
            .map_err(|e| {
                failed(
                    "cannot copy the scripts into the build container".into(),
                    &e,
                )
            })?;
        docker
            .start_container(&name, None)
            .await
            .map_err(|e| failed("the build container cannot start".into(), &e))?;
        if start_within.is_none() {
            return Ok(());
        }
        let mut ready = Vec::new();
        for s in sidecars {
            if let Some(p) = &s.readiness_probe {
                let waited = std::time::Instant::now();
                self.wait_ready(&docker, id, s, p, address)
                    .await
                    .map_err(Failure::Build)?;
                let at = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                ready.push(format!(
                    "sidecar {} passed its readinessProbe at {at}, {:.1} s after it started",
                    s.name,
                    waited.elapsed().as_secs_f64()
                ));
            }
        }
        let go = spec::start_tar(&ready)
            .map_err(|e| Failure::Build(format!("cannot pack the start file: {e}")))?;
        docker
            .upload_to_container(
                &name,
                Some(UploadToContainerOptionsBuilder::new().path("/").build()),
                bollard::body_full(go.into()),
            )
            .await
            .map_err(|e| failed("cannot tell the build container to start".into(), &e))?;
        Ok(())
    }

    /// Waits for a sidecar's readiness probe; `Err` when it exits, or does
    /// not pass in time.
    async fn wait_ready(
        &self,
        docker: &Docker,
        id: BuildId,
        s: &Container,
        p: &decap_kube::k8s_openapi::api::core::v1::Probe,
        address: Option<IpAddr>,
    ) -> std::result::Result<(), String> {
        let name = spec::sidecar_container(id, &s.name);
        let deadline = tokio::time::Instant::now() + probe::deadline(p);
        tokio::time::sleep(probe::initial_delay(p)).await;
        loop {
            let state = docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|i| i.state);
            if state.as_ref().is_some_and(|st| st.running != Some(true)) {
                return Err(format!(
                    "sidecar {} exited with code {} before it was ready",
                    s.name,
                    state.and_then(|st| st.exit_code).unwrap_or(-1)
                ));
            }
            match probe::check(docker, &name, s, p, address).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => return Err(format!("sidecar {}: {why}", s.name)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "sidecar {} did not pass its readinessProbe within {} s",
                    s.name,
                    probe::deadline(p).as_secs()
                ));
            }
            tokio::time::sleep(probe::INTERVAL).await;
        }
    }

    /// Waits until the engine answers again.
    async fn wait_for_engine(&self) {
        loop {
            if let Ok(d) = self.docker()
                && d.ping().await.is_ok()
            {
                return;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The end of a build that never got its build container.
    async fn start_failed(&self, id: BuildId, reason: String) {
        if let Ok(d) = self.docker() {
            self.remove_all(&d, id).await;
        }
        let first = {
            let mut s = self.lock();
            s.starting.remove(&id);
            s.reported.insert(id)
        };
        if first {
            tracing::warn!(build_id = %id, "{reason}");
            self.events.environment_exited(EnvironmentExit {
                build_id: id,
                reason,
                limits: Vec::new(),
            });
        }
    }
}

#[async_trait]
impl Executor for ContainerExecutor {
    fn name(&self) -> &'static str {
        "container"
    }

    fn sandbox(&self) -> &'static str {
        "container"
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<()> {
        let id = spec.build.id;
        {
            let s = self.inner.lock();
            if s.starting.contains_key(&id) || s.live.contains(&id) {
                return Ok(());
            }
        }
        let docker = self.inner.docker()?;
        if docker
            .inspect_container(&spec::build_container(id), None::<InspectContainerOptions>)
            .await
            .is_ok()
        {
            // Its container exists: adopt it.
            self.inner.lock().live.insert(id);
            return Ok(());
        }
        let sidecars =
            decap_kube::pod::sidecars(&spec.project).map_err(|e| Error::invalid("sidecar", e))?;
        // What the engine would refuse of a sidecar is refused now, before
        // anything of the build is made.
        let limits = spec::limits(&spec, self.inner.config.defaults);
        for s in &sidecars {
            spec::sidecar_body(
                &spec,
                &self.inner.config.instance,
                s,
                String::new(),
                &limits,
            )
            .map_err(|e| Error::invalid("sidecar", e))?;
        }
        let inner = self.inner.clone();
        let mut s = self.inner.lock();
        s.reported.remove(&id);
        let task = tokio::spawn(async move {
            loop {
                match inner.start(&spec, &sidecars).await {
                    Ok(()) => {
                        let mut s = inner.lock();
                        s.starting.remove(&id);
                        s.live.insert(id);
                        drop(s);
                        inner.wake.notify_one();
                        return;
                    }
                    Err(Failure::Build(reason)) => return inner.start_failed(id, reason).await,
                    Err(Failure::Engine(why)) => {
                        // The engine went away: the build waits for it and
                        // starts afresh (what was made of it goes first).
                        tracing::warn!(build_id = %id, "{why}; the build starts once the engine answers");
                        inner.wait_for_engine().await;
                        if let Ok(d) = inner.docker() {
                            inner.remove_all(&d, id).await;
                        }
                    }
                }
            }
        });
        s.starting.insert(id, task.abort_handle());
        Ok(())
    }

    async fn cancel(&self, build: BuildId) -> Result<()> {
        let starting = self.inner.lock().starting.remove(&build);
        if let Some(task) = starting {
            task.abort();
            self.inner
                .start_failed(build, "the build was stopped before it started".into())
                .await;
            return Ok(());
        }
        let docker = self.inner.docker()?;
        let name = spec::build_container(build);
        if docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
            .is_err()
        {
            return Ok(());
        }
        let grace = i32::try_from(self.inner.config.kill_grace.as_secs().max(1)).unwrap_or(10);
        docker
            .stop_container(
                &name,
                Some(StopContainerOptionsBuilder::new().t(grace).build()),
            )
            .await
            .map_err(engine_err)?;
        self.inner.ended(&docker, build).await;
        Ok(())
    }

    async fn live(&self) -> Result<Vec<BuildId>> {
        let s = self.inner.lock();
        if let Some(why) = &s.unavailable {
            return Err(engine_err(why));
        }
        Ok(s.live.iter().chain(s.starting.keys()).copied().collect())
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.lock().unavailable.clone()
    }
}
