//! Running one pod: its volumes, its containers in order, its status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, DownwardAPIVolumeFile, HostIP, KeyToPath, Pod,
    PodCondition, PodIP, PodStatus, ProjectedVolumeSource, Secret, ServiceAccount,
    ServiceAccountTokenProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::sandbox::{RootEntry, expand, log_tail, safe_relative, sandbox_path, signal_container};
use super::{
    Ctl, DEFAULT_PATH, KUBE_ROOT_CA, NODE_IP, SIDECAR_GRACE, Shared, api_code, force_delete, lock,
    now,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Cid {
    Init(usize),
    Main(usize),
}

#[derive(Debug)]
struct Exit {
    cid: Cid,
    code: i32,
}

#[derive(Debug)]
enum Ev {
    Exit(Exit),
    Delete(i64),
    Gone,
    Deadline,
}

/// Why a pod stopped before it completed.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Deleted(i64),
    Gone,
    Deadline,
}

/// The object a configMap or secret volume (or projection) reads.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    ConfigMap(&'a str),
    Secret(&'a str),
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ConfigMap(n) => write!(f, "configmap {n:?}"),
            Source::Secret(n) => write!(f, "secret {n:?}"),
        }
    }
}

/// A volume's folder.
#[derive(Debug, Clone)]
struct VolumeDir {
    path: PathBuf,
    /// configMap and secret volumes are always read-only.
    read_only: bool,
}

pub(super) struct Runner {
    shared: Arc<Shared>,
    api: Api<Pod>,
    namespace: String,
    name: String,
    uid: String,
    pod: Pod,
    init: Vec<Container>,
    main: Vec<Container>,
    ctl: mpsc::UnboundedReceiver<Ctl>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    /// The bubblewrap pid of each running container.
    live: HashMap<Cid, u32>,
    deadline: Option<Instant>,
    dir: Option<tempfile::TempDir>,
    // The pod's status as last computed.
    phase: &'static str,
    reason: Option<String>,
    message: Option<String>,
    start_time: Time,
    init_statuses: Vec<ContainerStatus>,
    main_statuses: Vec<ContainerStatus>,
    initialized: bool,
    conditions: Vec<PodCondition>,
    /// The last status could not be written: try again.
    dirty: bool,
    /// The pod is gone from the API.
    gone: bool,
}

impl Runner {
    pub(super) fn new(
        shared: Arc<Shared>,
        api: Api<Pod>,
        pod: Pod,
        ctl: mpsc::UnboundedReceiver<Ctl>,
    ) -> Runner {
        let spec = pod.spec.clone().unwrap_or_default();
        let init = spec.init_containers.clone().unwrap_or_default();
        let main = spec.containers.clone();
        let waiting = |c: &Container, reason: &str| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready: false,
            restart_count: 0,
            started: Some(false),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: None,
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        };
        let main_reason = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let init_statuses = init.iter().map(|c| waiting(c, "PodInitializing")).collect();
        let main_statuses = main.iter().map(|c| waiting(c, main_reason)).collect();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let deadline = spec
            .active_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(|s| Instant::now() + Duration::from_secs(s));
        Runner {
            shared,
            namespace: api.namespace().unwrap_or_default().to_owned(),
            api,
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod,
            init,
            main,
            ctl,
            exits_tx,
            exits_rx,
            live: HashMap::new(),
            deadline,
            dir: None,
            phase: "Pending",
            reason: None,
            message: None,
            start_time: now(),
            init_statuses,
            main_statuses,
            initialized: false,
            conditions: Vec::new(),
            dirty: false,
            gone: false,
        }
    }

    fn container(&self, cid: Cid) -> &Container {
        match cid {
            Cid::Init(i) => &self.init[i],
            Cid::Main(i) => &self.main[i],
        }
    }

    fn status_mut(&mut self, cid: Cid) -> &mut ContainerStatus {
        match cid {
            Cid::Init(i) => &mut self.init_statuses[i],
            Cid::Main(i) => &mut self.main_statuses[i],
        }
    }

    fn status(&self, cid: Cid) -> &ContainerStatus {
        match cid {
            Cid::Init(i) => &self.init_statuses[i],
            Cid::Main(i) => &self.main_statuses[i],
        }
    }

    fn is_sidecar(&self, cid: Cid) -> bool {
        matches!(cid, Cid::Init(i) if self.init[i].restart_policy.as_deref() == Some("Always"))
    }

    fn is_terminated(&self, cid: Cid) -> bool {
        self.status(cid)
            .state
            .as_ref()
            .is_some_and(|s| s.terminated.is_some())
    }

    fn exit_code(&self, cid: Cid) -> Option<i32> {
        self.status(cid)
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code)
    }

    fn log_path(&self, cid: Cid) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?.path().join("logs");
        Some(match cid {
            Cid::Init(i) => dir.join(format!("init-{}.log", self.init[i].name)),
            Cid::Main(i) => dir.join(format!("{}.log", self.main[i].name)),
        })
    }

    pub(super) async fn run(mut self) {
        info!(pod = %self.name, namespace = ?self.api.namespace(), "starting pod");
        let end = self.run_pod().await;
        match end {
            Ok(()) => {}
            Err(Stop::Deadline) => {
                self.terminate(|_| true, Duration::ZERO).await;
                self.phase = "Failed";
                self.reason = Some("DeadlineExceeded".into());
                self.message = Some(format!(
                    "Pod was active on the node longer than the specified deadline ({} s)",
                    self.pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.active_deadline_seconds)
                        .unwrap_or_default()
                ));
                self.publish_final().await;
            }
            Err(Stop::Deleted(grace)) => {
                let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
                self.terminate(|_| true, grace).await;
                self.finish_phase();
                self.publish_final().await;
                if !self.gone {
                    let mut delay = Duration::from_millis(500);
                    while !force_delete(&self.api, &self.name, &self.uid).await {
                        if self.wait_or_gone(delay).await {
                            break;
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
            Err(Stop::Gone) => {
                self.terminate(|_| true, Duration::ZERO).await;
            }
        }
        info!(pod = %self.name, phase = self.phase, "pod ended");
        lock(&self.shared.finished).insert(self.uid.clone(), self.namespace.clone());
        lock(&self.shared.pods).remove(&self.uid);
        if let Some(dir) = self.dir.take() {
            let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
        }
    }

    /// Runs the pod to its end; Err when it was stopped from outside.
    async fn run_pod(&mut self) -> Result<(), Stop> {
        self.publish().await;
        let dir = tempfile::Builder::new()
            .prefix("decap-test-pod-")
            .tempdir()
            .and_then(|d| {
                std::fs::create_dir_all(d.path().join("logs"))?;
                std::fs::create_dir_all(d.path().join("volumes"))?;
                Ok(d)
            });
        match dir {
            Ok(d) => self.dir = Some(d),
            Err(e) => {
                self.fail_before_start(
                    "CreateContainerError",
                    &format!("cannot make the pod's folder: {e}"),
                );
                self.publish_final().await;
                return Ok(());
            }
        }
        let volumes = match self.prepare_volumes().await {
            Ok(v) => v,
            Err(msg) => {
                self.fail_before_start("CreateContainerConfigError", &msg);
                self.publish_final().await;
                return Ok(());
            }
        };

        // Init containers in order; sidecars start and stay.
        for i in 0..self.init.len() {
            let cid = Cid::Init(i);
            self.start(cid, &volumes).await;
            self.publish().await;
            if self.is_sidecar(cid) {
                if self.is_terminated(cid) {
                    self.stop_sidecars().await?;
                    self.phase = "Failed";
                    self.message = Some(format!("sidecar {} could not start", self.init[i].name));
                    self.publish_final().await;
                    return Ok(());
                }
                continue;
            }
            while !self.is_terminated(cid) {
                let ev = self.next_event().await;
                self.on_event(ev)?;
                self.publish().await;
            }
            if self.exit_code(cid) != Some(0) {
                self.stop_sidecars().await?;
                self.phase = "Failed";
                self.message = Some(format!("init container {} failed", self.init[i].name));
                self.publish_final().await;
                return Ok(());
            }
        }
        self.initialized = true;

        // Main containers, all at once.
        for i in 0..self.main.len() {
            self.start(Cid::Main(i), &volumes).await;
        }
        self.phase = "Running";
        self.publish().await;
        while !(0..self.main.len()).all(|i| self.is_terminated(Cid::Main(i))) {
            let ev = self.next_event().await;
            self.on_event(ev)?;
            self.publish().await;
        }

        self.stop_sidecars().await?;
        self.finish_phase();
        self.publish_final().await;
        Ok(())
    }

    /// Succeeded when every main container exited 0, else Failed.
    fn finish_phase(&mut self) {
        let ok = !self.main.is_empty()
            && (0..self.main.len()).all(|i| self.exit_code(Cid::Main(i)) == Some(0));
        self.phase = if ok { "Succeeded" } else { "Failed" };
    }

    /// Fails the pod before any container started.
    fn fail_before_start(&mut self, reason: &str, msg: &str) {
        warn!(pod = %self.name, "{msg}");
        for s in self
            .init_statuses
            .iter_mut()
            .chain(self.main_statuses.iter_mut())
        {
            s.state = Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(msg.into()),
                }),
                ..ContainerState::default()
            });
        }
        self.phase = "Failed";
        self.message = Some(msg.into());
    }

    /// Handles an event while the pod runs: exits are recorded, anything
    /// else stops the pod.
    fn on_event(&mut self, ev: Ev) -> Result<(), Stop> {
        match ev {
            Ev::Exit(e) => {
                self.record_exit(e);
                Ok(())
            }
            Ev::Delete(g) => Err(Stop::Deleted(g)),
            Ev::Gone => Err(Stop::Gone),
            Ev::Deadline => Err(Stop::Deadline),
        }
    }

    /// The next thing that happens to the pod (retrying an unwritten status
    /// meanwhile).
    async fn next_event(&mut self) -> Ev {
        loop {
            if self.gone {
                return Ev::Gone;
            }
            let deadline = self.deadline;
            let dirty = self.dirty;
            tokio::select! {
                Some(e) = self.exits_rx.recv() => return Ev::Exit(e),
                c = self.ctl.recv() => return match c {
                    Some(Ctl::Delete(g)) => Ev::Delete(g),
                    Some(Ctl::Gone) | None => Ev::Gone,
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Ev::Deadline
                }
                _ = sleep(Duration::from_secs(1)), if dirty => self.publish().await,
            }
        }
    }

    /// Waits `d` unless the pod goes; true when it went.
    async fn wait_or_gone(&mut self, d: Duration) -> bool {
        tokio::select! {
            c = self.ctl.recv() => {
                if matches!(c, Some(Ctl::Gone) | None) {
                    self.gone = true;
                }
                self.gone
            }
            _ = sleep(d) => false,
        }
    }

    /// TERMs the chosen running containers, KILLs them after `grace`, and
    /// records their exits.
    async fn terminate(&mut self, which: impl Fn(Cid) -> bool, grace: Duration) {
        let chosen = |live: &HashMap<Cid, u32>| -> Vec<(Cid, u32)> {
            live.iter()
                .filter(|(c, _)| which(**c))
                .map(|(c, p)| (*c, *p))
                .collect()
        };
        if chosen(&self.live).is_empty() {
            return;
        }
        if !grace.is_zero() {
            for (_, pid) in chosen(&self.live) {
                signal_container(pid, Signal::SIGTERM);
            }
            let mut until = Instant::now() + grace;
            while !chosen(&self.live).is_empty() {
                tokio::select! {
                    Some(e) = self.exits_rx.recv() => self.record_exit(e),
                    c = self.ctl.recv() => match c {
                        Some(Ctl::Delete(g)) => {
                            let g = Duration::from_secs(u64::try_from(g).unwrap_or(0));
                            until = until.min(Instant::now() + g);
                        }
                        Some(Ctl::Gone) | None => {
                            self.gone = true;
                            break;
                        }
                    },
                    _ = sleep_until(until) => break,
                }
            }
        }
        for (_, pid) in chosen(&self.live) {
            signal_container(pid, Signal::SIGKILL);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while !chosen(&self.live).is_empty() {
            tokio::select! {
                Some(e) = self.exits_rx.recv() => self.record_exit(e),
                _ = sleep_until(until) => break,
            }
        }
        // Not reaped in time (should not happen): recorded as killed.
        for (cid, pid) in chosen(&self.live) {
            warn!(pod = %self.name, pid, "a container did not exit after KILL");
            self.record_exit(Exit { cid, code: 137 });
        }
    }

    /// Stops the sidecars once the rest is done.
    async fn stop_sidecars(&mut self) -> Result<(), Stop> {
        let sidecars: HashSet<Cid> = (0..self.init.len())
            .map(Cid::Init)
            .filter(|c| self.is_sidecar(*c))
            .collect();
        self.terminate(|c| sidecars.contains(&c), SIDECAR_GRACE)
            .await;
        if self.gone {
            return Err(Stop::Gone);
        }
        Ok(())
    }

    fn record_exit(&mut self, e: Exit) {
        self.live.remove(&e.cid);
        let message = if e.code != 0 {
            self.log_path(e.cid).map(|p| log_tail(&p))
        } else {
            None
        };
        let init_done = matches!(e.cid, Cid::Init(_)) && !self.is_sidecar(e.cid) && e.code == 0;
        let name = self.container(e.cid).name.clone();
        debug!(pod = %self.name, container = %name, code = e.code, "container exited");
        let st = self.status_mut(e.cid);
        let started_at = st
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone());
        st.ready = init_done;
        st.started = Some(false);
        st.state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: e.code,
                reason: Some(if e.code == 0 { "Completed" } else { "Error" }.into()),
                message: message.filter(|m| !m.is_empty()),
                started_at,
                finished_at: Some(now()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        });
    }

    /// Starts a container; a container that cannot start is recorded as
    /// terminated with the reason.
    async fn start(&mut self, cid: Cid, volumes: &HashMap<String, VolumeDir>) {
        let sidecar = self.is_sidecar(cid);
        let name = self.container(cid).name.clone();
        let started = match self.secret_env(cid).await {
            Ok(secrets) => self.spawn(cid, volumes, &secrets),
            Err(e) => Err(e),
        };
        match started {
            Ok(pid) => {
                debug!(pod = %self.name, container = %name, pid, "container started");
                self.live.insert(cid, pid);
                let st = self.status_mut(cid);
                st.started = Some(true);
                st.ready = !matches!(cid, Cid::Init(_)) || sidecar;
                st.state = Some(ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(now()),
                    }),
                    ..ContainerState::default()
                });
            }
            Err(msg) => {
                warn!(pod = %self.name, container = %name, "{msg}");
                let st = self.status_mut(cid);
                st.started = Some(false);
                st.ready = false;
                st.state = Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 128,
                        reason: Some("StartError".into()),
                        message: Some(msg),
                        finished_at: Some(now()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                });
            }
        }
    }

    /// The values of the Secret keys a container's environment refers to
    /// (`valueFrom.secretKeyRef`), as a kubelet reads them before starting
    /// it; a required one that is missing keeps the container from starting.
    async fn secret_env(&self, cid: Cid) -> Result<HashMap<(String, String), String>, String> {
        let refs: Vec<k8s_openapi::api::core::v1::SecretKeySelector> = self
            .container(cid)
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.clone())
            .collect();
        let mut out = HashMap::new();
        if refs.is_empty() {
            return Ok(out);
        }
        let namespace = self.api.namespace().unwrap_or_default().to_owned();
        let api: Api<Secret> = Api::namespaced(self.shared.client.clone(), &namespace);
        let mut fetched: HashMap<String, Option<Secret>> = HashMap::new();
        for r in refs {
            if !fetched.contains_key(&r.name) {
                let s = get_with_retries(&api, &r.name).await?;
                fetched.insert(r.name.clone(), s);
            }
            let value = fetched
                .get(&r.name)
                .and_then(|s| s.as_ref())
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get(&r.key))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned());
            match value {
                Some(v) => {
                    out.insert((r.name, r.key), v);
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(format!(
                        "CreateContainerConfigError: secret {:?} has no key {:?}",
                        r.name, r.key
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The container's environment, in the order Kubernetes builds it.
    fn environment(
        &self,
        c: &Container,
        secrets: &HashMap<(String, String), String>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOSTNAME".into(), self.name.clone()),
            ("HOME".into(), "/root".into()),
        ];
        let mut vars: HashMap<String, String> = HashMap::new();
        for e in c.env.iter().flatten() {
            // A container here has no memory cgroup of its own: bctool
            // would read the host's.
            if e.name == "DECAP_BCTOOL_CGROUP_MEMORY" {
                continue;
            }
            let value = if let Some(v) = &e.value {
                Some(expand(v, &vars))
            } else if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            {
                secrets.get(&(r.name.clone(), r.key.clone())).cloned()
            } else if let Some(from) = &e.value_from {
                let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                let value = field.and_then(|f| self.field_value(f));
                if value.is_none() {
                    warn!(
                        pod = %self.name,
                        container = %c.name,
                        "env {}: the test node supports fieldRef values of metadata.name, \
                         metadata.namespace, metadata.uid, metadata.labels/annotations, \
                         spec.nodeName, spec.serviceAccountName, status.podIP and status.hostIP \
                         only (got {:?}); left out",
                        e.name,
                        field.map_or_else(|| format!("{from:?}"), str::to_owned)
                    );
                }
                value
            } else {
                Some(String::new())
            };
            if let Some(v) = value {
                vars.insert(e.name.clone(), v.clone());
                env.push((e.name.clone(), v));
            }
        }
        if c.env_from.as_ref().is_some_and(|f| !f.is_empty()) {
            warn!(pod = %self.name, container = %c.name, "envFrom is not supported by the test node; ignored");
        }
        env
    }

    /// Starts a container's process under bubblewrap; its pid.
    fn spawn(
        &self,
        cid: Cid,
        volumes: &HashMap<String, VolumeDir>,
        secrets: &HashMap<(String, String), String>,
    ) -> Result<u32, String> {
        let c = self.container(cid);
        let command = c.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(format!(
                "container {} has no command: the test node runs host binaries and has no image \
                 entrypoint to fall back on",
                c.name
            ));
        }
        let env = self.environment(c, secrets);
        let vars: HashMap<String, String> = env.iter().cloned().collect();
        let argv: Vec<String> = command
            .iter()
            .chain(c.args.iter().flatten())
            .map(|a| expand(a, &vars))
            .collect();

        // Mounts, parents before children.
        let mut mounts: Vec<(PathBuf, PathBuf, bool)> = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = volumes
                .get(&m.name)
                .ok_or_else(|| format!("volume mount {}: no volume {:?}", m.mount_path, m.name))?;
            let mut source = v.path.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                let rel = safe_relative(sub).ok_or_else(|| format!("invalid subPath {sub:?}"))?;
                source = source.join(rel);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| format!("cannot make subPath {sub:?}: {e}"))?;
                }
            }
            let read_only = v.read_only || m.read_only == Some(true);
            mounts.push((source, sandbox_path(Path::new(&m.mount_path)), read_only));
        }
        mounts.sort_by_key(|(_, target, _)| target.components().count());

        let working_dir = PathBuf::from(
            c.working_dir
                .as_deref()
                .filter(|w| !w.is_empty())
                .unwrap_or("/"),
        );
        if !working_dir.is_absolute() {
            return Err(format!(
                "workingDir {} is not absolute",
                working_dir.display()
            ));
        }
        let working_dir = sandbox_path(&working_dir);
        // A workingDir inside a volume is made in the volume; elsewhere, in the sandbox.
        let in_volume = mounts.iter().rev().find_map(|(src, target, _)| {
            working_dir.strip_prefix(target).ok().map(|r| src.join(r))
        });
        if let Some(host_dir) = &in_volume {
            std::fs::create_dir_all(host_dir)
                .map_err(|e| format!("cannot make workingDir {}: {e}", working_dir.display()))?;
        }

        let mut cmd = tokio::process::Command::new(&self.shared.bwrap);
        for entry in &self.shared.root_entries {
            match entry {
                RootEntry::Bind(p) => {
                    cmd.arg("--ro-bind").arg(p).arg(p);
                }
                RootEntry::Symlink { path, target } => {
                    cmd.arg("--symlink").arg(target).arg(path);
                }
            }
        }
        cmd.args([
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
        ]);
        for (source, target, read_only) in &mounts {
            cmd.arg(if *read_only { "--ro-bind" } else { "--bind" })
                .arg(source)
                .arg(target);
        }
        if in_volume.is_none() && working_dir != Path::new("/") {
            cmd.arg("--dir").arg(&working_dir);
        }
        cmd.arg("--chdir").arg(&working_dir);
        cmd.args(["--unshare-pid", "--die-with-parent", "--new-session", "--"]);
        cmd.args(&argv);

        let log_path = self.log_path(cid).ok_or("the pod has no folder")?;
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot make the log {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot share the log file: {e}"))?;
        cmd.env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.shared.bwrap.display()))?;
        let pid = child.id().ok_or("the container exited at once")?;
        self.shared.procs.add(pid);
        let procs_owner = self.shared.clone();
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(9)),
                Err(_) => 137,
            };
            procs_owner.procs.remove(pid);
            let _ = tx.send(Exit { cid, code });
        });
        Ok(pid)
    }

    /// Makes each volume's folder.
    async fn prepare_volumes(&self) -> Result<HashMap<String, VolumeDir>, String> {
        let mut out = HashMap::new();
        let Some(root) = self.dir.as_ref().map(|d| d.path().join("volumes")) else {
            return Err("the pod has no folder".into());
        };
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in volumes {
            let path = root.join(&v.name);
            let mkdir = |p: &Path| {
                std::fs::create_dir_all(p)
                    .map_err(|e| format!("volume {}: cannot make its folder: {e}", v.name))
            };
            let dir = if v.empty_dir.is_some() {
                mkdir(&path)?;
                VolumeDir {
                    path,
                    read_only: false,
                }
            } else if let Some((source, items, mode, optional)) = v
                .config_map
                .as_ref()
                .map(|c| {
                    let source = Source::ConfigMap(&c.name);
                    (source, c.items.as_deref(), c.default_mode, c.optional)
                })
                .or_else(|| {
                    v.secret.as_ref().map(|s| {
                        let source = Source::Secret(s.secret_name.as_deref().unwrap_or_default());
                        (source, s.items.as_deref(), s.default_mode, s.optional)
                    })
                })
            {
                mkdir(&path)?;
                self.project(&path, source, items, mode, optional)
                    .await
                    .map_err(|e| format!("volume {}: {e}", v.name))?;
                VolumeDir {
                    path,
                    read_only: true,
                }
            } else if let Some(src) = &v.downward_api {
                mkdir(&path)?;
                self.downward(
                    &path,
                    src.items.as_deref().unwrap_or_default(),
                    src.default_mode,
                )
                .map_err(|e| format!("volume {}: {e}", v.name))?;
                VolumeDir {
                    path,
                    read_only: true,
                }
            } else if let Some(src) = &v.projected {
                mkdir(&path)?;
                self.projected(&path, src)
                    .await
                    .map_err(|e| format!("volume {}: {e}", v.name))?;
                VolumeDir {
                    path,
                    read_only: true,
                }
            } else if let Some(host) = &v.host_path {
                let path = PathBuf::from(&host.path);
                if matches!(host.type_.as_deref(), Some("DirectoryOrCreate")) {
                    mkdir(&path)?;
                }
                VolumeDir {
                    path,
                    read_only: false,
                }
            } else {
                return Err(format!(
                    "volume {}: the test node supports emptyDir, configMap, secret, downwardAPI, \
                     projected and hostPath volumes only",
                    v.name
                ));
            };
            out.insert(v.name.clone(), dir);
        }
        Ok(out)
    }

    /// Writes a ConfigMap's or Secret's keys (or its `items`) into `dir`.
    async fn project(
        &self,
        dir: &Path,
        source: Source<'_>,
        items: Option<&[KeyToPath]>,
        default_mode: Option<i32>,
        optional: Option<bool>,
    ) -> Result<(), String> {
        let optional = optional == Some(true);
        let namespace = self.api.namespace().unwrap_or_default().to_owned();
        let client = self.shared.client.clone();
        let data: Option<BTreeMap<String, Vec<u8>>> = match source {
            Source::ConfigMap(name) => {
                let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
                get_with_retries(&api, name).await?.map(|cm| {
                    let mut data: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    data.extend(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    data
                })
            }
            Source::Secret(name) => {
                let api: Api<Secret> = Api::namespaced(client, &namespace);
                get_with_retries(&api, name).await?.map(|secret| {
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect()
                })
            }
        };
        match data {
            Some(data) => write_keys(dir, &data, items, default_mode, optional)
                .map_err(|e| format!("{source}: {e}")),
            None if optional => Ok(()),
            // Nothing publishes the cluster's CA on the test bed (no
            // controller manager): pods that mount it get none.
            None if matches!(source, Source::ConfigMap(KUBE_ROOT_CA)) => {
                debug!(pod = %self.name, "{KUBE_ROOT_CA} is not published: left out");
                Ok(())
            }
            None => Err(format!("{source} not found")),
        }
    }

    /// Writes downward API files.
    fn downward(
        &self,
        dir: &Path,
        items: &[DownwardAPIVolumeFile],
        default_mode: Option<i32>,
    ) -> Result<(), String> {
        let mut data = BTreeMap::new();
        let mut keyed = Vec::new();
        for item in items {
            let Some(field) = item.field_ref.as_ref().map(|f| f.field_path.as_str()) else {
                warn!(pod = %self.name, path = %item.path, "only fieldRef downward API files are supported; left out");
                continue;
            };
            let value = self
                .field_value(field)
                .ok_or_else(|| format!("downward API field {field:?} is not supported"))?;
            data.insert(item.path.clone(), value.into_bytes());
            keyed.push(KeyToPath {
                key: item.path.clone(),
                path: item.path.clone(),
                mode: item.mode,
            });
        }
        write_keys(dir, &data, Some(&keyed), default_mode, false)
    }

    /// Writes a projected volume's sources.
    async fn projected(&self, dir: &Path, src: &ProjectedVolumeSource) -> Result<(), String> {
        for p in src.sources.iter().flatten() {
            if let Some(cm) = &p.config_map {
                self.project(
                    dir,
                    Source::ConfigMap(&cm.name),
                    cm.items.as_deref(),
                    src.default_mode,
                    cm.optional,
                )
                .await?;
            } else if let Some(secret) = &p.secret {
                self.project(
                    dir,
                    Source::Secret(&secret.name),
                    secret.items.as_deref(),
                    src.default_mode,
                    secret.optional,
                )
                .await?;
            } else if let Some(d) = &p.downward_api {
                self.downward(
                    dir,
                    d.items.as_deref().unwrap_or_default(),
                    src.default_mode,
                )?;
            } else if let Some(t) = &p.service_account_token {
                let token = self.token(t).await?;
                let data = BTreeMap::from([(t.path.clone(), token.into_bytes())]);
                write_keys(dir, &data, None, src.default_mode, false)?;
            } else {
                return Err("only configMap, secret, downwardAPI and serviceAccountToken projections are supported".into());
            }
        }
        Ok(())
    }

    /// A token of the pod's service account, bound to the pod.
    async fn token(&self, t: &ServiceAccountTokenProjection) -> Result<String, String> {
        let namespace = self.api.namespace().unwrap_or_default().to_owned();
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: t.audience.iter().cloned().collect(),
                expiration_seconds: t.expiration_seconds,
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: Some(self.uid.clone()),
                }),
            },
            ..TokenRequest::default()
        };
        let made: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("cannot get a token of service account {sa:?}: {e}"))?;
        made.status
            .map(|s| s.token)
            .ok_or_else(|| format!("no token came for service account {sa:?}"))
    }

    /// A `fieldRef` value (environment variables, downward API files).
    fn field_value(&self, field: &str) -> Option<String> {
        let meta = &self.pod.metadata;
        let lines = |m: &Option<BTreeMap<String, String>>| {
            m.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        };
        Some(match field {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.api.namespace()?.to_owned(),
            "metadata.uid" => self.uid.clone(),
            "metadata.labels" => lines(&meta.labels),
            "metadata.annotations" => lines(&meta.annotations),
            "spec.nodeName" => self.shared.node.clone(),
            "spec.serviceAccountName" => self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => NODE_IP.into(),
            _ => {
                let label = |prefix: &str, m: &Option<BTreeMap<String, String>>| {
                    let key = field.strip_prefix(prefix)?.strip_suffix("']")?;
                    m.as_ref()?.get(key).cloned()
                };
                return label("metadata.labels['", &meta.labels)
                    .or_else(|| label("metadata.annotations['", &meta.annotations));
            }
        })
    }

    fn conditions(&mut self) -> Vec<PodCondition> {
        let terminal = matches!(self.phase, "Succeeded" | "Failed");
        let all_ready = (0..self.main.len()).all(|i| self.status(Cid::Main(i)).ready)
            && (0..self.init.len())
                .map(Cid::Init)
                .filter(|c| self.is_sidecar(*c))
                .all(|c| self.status(c).ready);
        let ready = !terminal && self.initialized && all_ready;
        let not_ready_reason = if terminal {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let want: [(&str, bool, &str); 4] = [
            ("PodScheduled", true, ""),
            (
                "Initialized",
                self.initialized,
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotInitialized"
                },
            ),
            ("ContainersReady", ready, not_ready_reason),
            ("Ready", ready, not_ready_reason),
        ];
        let t = now();
        for (type_, ok, reason) in want {
            let status = if ok { "True" } else { "False" };
            let reason = (!ok).then(|| reason.to_owned());
            match self.conditions.iter_mut().find(|c| c.type_ == type_) {
                Some(c) if c.status == status => c.reason = reason,
                Some(c) => {
                    c.status = status.into();
                    c.reason = reason;
                    c.last_transition_time = Some(t.clone());
                }
                None => self.conditions.push(PodCondition {
                    type_: type_.into(),
                    status: status.into(),
                    reason,
                    last_transition_time: Some(t.clone()),
                    ..PodCondition::default()
                }),
            }
        }
        self.conditions.clone()
    }

    fn pod_status(&mut self) -> PodStatus {
        PodStatus {
            phase: Some(self.phase.into()),
            reason: self.reason.clone(),
            message: self.message.clone(),
            host_ip: Some(NODE_IP.into()),
            host_ips: Some(vec![HostIP { ip: NODE_IP.into() }]),
            pod_ip: Some(NODE_IP.into()),
            pod_ips: Some(vec![PodIP { ip: NODE_IP.into() }]),
            start_time: Some(self.start_time.clone()),
            conditions: Some(self.conditions()),
            init_container_statuses: Some(self.init_statuses.clone()),
            container_statuses: Some(self.main_statuses.clone()),
            ..PodStatus::default()
        }
    }

    /// Writes the pod's status; on failure, `dirty` says to try again.
    async fn publish(&mut self) {
        if self.gone {
            return;
        }
        let patch = serde_json::json!({ "status": self.pod_status() });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.dirty = false,
            Err(e) if api_code(&e) == Some(404) => {
                self.gone = true;
                self.dirty = false;
            }
            Err(e) if api_code(&e) == Some(422) => {
                warn!(pod = %self.name, "the API server refused the pod's status: {e}");
                self.dirty = false;
            }
            Err(e) => {
                debug!(pod = %self.name, "cannot write the pod's status (will retry): {e}");
                self.dirty = true;
            }
        }
    }

    /// Writes the final status, retrying until it lands or the pod goes.
    async fn publish_final(&mut self) {
        let mut delay = Duration::from_millis(500);
        loop {
            self.publish().await;
            if !self.dirty || self.gone {
                return;
            }
            if self.wait_or_gone(delay).await {
                return;
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// Reads an object, retrying briefly when the API server cannot answer.
async fn get_with_retries<K>(api: &Api<K>, name: &str) -> Result<Option<K>, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            sleep(Duration::from_secs(1)).await;
        }
        match api.get_opt(name).await {
            Ok(found) => return Ok(found),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("cannot read {name:?}: {last}"))
}

/// Writes a configMap's or secret's keys into a volume's folder: every key,
/// or the `items` at their paths.
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
) -> Result<(), String> {
    let mode_of = |m: Option<i32>| {
        m.or(default_mode)
            .and_then(|m| u32::try_from(m).ok())
            .map_or(0o644, |m| m & 0o7777)
    };
    let mut files: Vec<(PathBuf, &[u8], u32)> = Vec::new();
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!("no key {:?}", item.key));
                };
                let rel = safe_relative(&item.path)
                    .ok_or_else(|| format!("invalid path {:?}", item.path))?;
                files.push((rel, value, mode_of(item.mode)));
            }
        }
        _ => {
            for (key, value) in data {
                let rel = safe_relative(key).ok_or_else(|| format!("invalid key {key:?}"))?;
                files.push((rel, value, mode_of(None)));
            }
        }
    }
    for (rel, value, mode) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_and_items_are_written_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let data = BTreeMap::from([
            ("a".to_owned(), b"A".to_vec()),
            ("b".to_owned(), b"B".to_vec()),
        ]);
        write_keys(dir.path(), &data, None, Some(0o755), false).unwrap();
        let mode = std::fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let items = [KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o600),
        }];
        let dir2 = tempfile::tempdir().unwrap();
        write_keys(dir2.path(), &data, Some(&items), None, false).unwrap();
        assert_eq!(std::fs::read(dir2.path().join("sub/b.txt")).unwrap(), b"B");
        assert!(!dir2.path().join("a").exists());
        let bad = [KeyToPath {
            key: "a".into(),
            path: "../x".into(),
            mode: None,
        }];
        assert!(write_keys(dir2.path(), &data, Some(&bad), None, false).is_err());
    }
}
