//! What a build's containers are made of: pure functions from a launch to
//! the Docker Engine API's create bodies.
//!
//! Layout inside the build container, the same as in a build pod:
//!
//! | path | what |
//! | --- | --- |
//! | `/decap/bin/bctool` | bctool, bind-mounted read-only from the host |
//! | `/decap/run/` | the folder of Decap's build socket, bind-mounted (bctool serves it on the container's loopback, at `DECAP_URL`) |
//! | `/decap/scripts` | the project's folder at the pinned scripts commit (copied in) |
//! | `/decap/workspace/{src,artifacts,home,tmp}` | the build's workspace, in the container's own layer; `src` is the working directory |
//!
//! Sidecars run beside the build in one network namespace (the first
//! sidecar's), so they answer on `localhost` as in a pod.

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{ContainerCreateBody, HostConfig};
use decap_core::build::BuildId;
use decap_core::descriptor::Network;
use decap_core::limits::{self, Limits};
use decap_core::ports::LaunchSpec;
use decap_kube::k8s_openapi::api::core::v1::Container;

/// Where bctool is inside the build container.
pub const BCTOOL: &str = "/decap/bin/bctool";
/// Where the build socket's folder is bound.
pub const RUN_DIR: &str = "/decap/run";
/// Where the scripts are.
pub const SCRIPTS_DIR: &str = "/decap/scripts";
/// The workspace.
pub const WORKSPACE_DIR: &str = "/decap/workspace";
/// The user a build runs as unless its project says otherwise (as in a pod).
pub const BUILD_USER: u32 = 1000;

/// Labels on every container of a build.
pub const LABEL_INSTANCE: &str = "decap.instance";
/// The build a container belongs to.
pub const LABEL_BUILD: &str = "decap.build-id";
/// `build` or `sidecar`.
pub const LABEL_ROLE: &str = "decap.role";
/// A sidecar's name.
pub const LABEL_SIDECAR: &str = "decap.sidecar";

/// The build container's name.
pub fn build_container(id: BuildId) -> String {
    format!("decap-{id}")
}

/// A sidecar container's name.
pub fn sidecar_container(id: BuildId, sidecar: &str) -> String {
    format!("decap-{id}-{sidecar}")
}

fn labels(
    instance: &str,
    spec: &LaunchSpec,
    role: &str,
    sidecar: Option<&str>,
) -> HashMap<String, String> {
    let b = &spec.build;
    let mut l = HashMap::from([
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
        (LABEL_BUILD.to_owned(), b.id.to_string()),
        (LABEL_ROLE.to_owned(), role.to_owned()),
        ("decap.project".to_owned(), b.project.to_string()),
        ("decap.branch".to_owned(), b.branch.clone()),
    ]);
    if let Some(s) = sidecar {
        l.insert(LABEL_SIDECAR.to_owned(), s.to_owned());
    }
    l
}

/// The user and group a build runs as: `runAsUser`/`runAsGroup` of the
/// project's `securityContext`, else [`BUILD_USER`].
pub fn build_user(spec: &LaunchSpec) -> (u32, u32) {
    let sc = spec
        .project
        .valid_descriptor()
        .and_then(|d| d.descriptor.security_context.as_ref());
    let field = |name: &str| {
        sc.and_then(|v| v.get(name))
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    let uid = field("runAsUser").unwrap_or(BUILD_USER);
    let gid = field("runAsGroup").unwrap_or(uid);
    (uid, gid)
}

/// The build's limits: project.json's, else the defaults.
pub fn limits(spec: &LaunchSpec, defaults: limits::DefaultLimits) -> Limits {
    Limits::resolve(spec.project.valid_descriptor(), defaults)
}

/// Limits as the engine takes them.
fn host_limits(h: &mut HostConfig, l: &Limits) {
    if let Some(m) = l.memory_bytes.and_then(|m| i64::try_from(m).ok()) {
        h.memory = Some(m);
        // No swap beyond the limit: a build that needs more says so.
        h.memory_swap = Some(m);
    }
    if let Some(c) = l.cpu_millis.and_then(|c| i64::try_from(c).ok()) {
        h.nano_cpus = Some(c.saturating_mul(1_000_000));
    }
    if let Some(p) = l.pids.and_then(|p| i64::try_from(p).ok()) {
        h.pids_limit = Some(p);
    }
}

/// Restricted, as a pod under the `restricted` Pod Security Standard: no
/// capabilities, no privilege escalation.
fn restricted(h: &mut HostConfig) {
    h.cap_drop = Some(vec!["ALL".into()]);
    h.security_opt = Some(vec!["no-new-privileges".into()]);
}

/// The build's environment: the documented variables, the descriptor's
/// `env`, the secrets, and bctool's own settings.
pub fn build_env(
    spec: &LaunchSpec,
    url_port: u16,
    notices: &[String],
    memory_limited: bool,
) -> Vec<String> {
    let b = &spec.build;
    let ws = |sub: &str| format!("{WORKSPACE_DIR}/{sub}");
    let mut vars: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/decap/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), ws("home")),
        ("TMPDIR".into(), ws("tmp")),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if let Some(d) = spec.project.valid_descriptor() {
        vars.extend(d.descriptor.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    vars.extend(spec.secrets.iter().cloned());
    vars.extend([
        ("BUILD_ID".into(), b.id.to_string()),
        ("PROJECT_KEY".into(), b.project.to_string()),
        ("BRANCH_TO_BUILD".into(), b.branch.clone()),
        ("BUILD_LOCK_KEY".into(), b.lock_key().to_string()),
        ("COMMIT_SHA".into(), b.commit.clone().unwrap_or_default()),
        ("ARTIFACTS_DIR".into(), ws("artifacts")),
        ("DECAP_URL".into(), format!("http://127.0.0.1:{url_port}")),
        ("DECAP_BUILD_TOKEN".into(), spec.build_token.clone()),
        (
            "DECAP_SCRIPTS_COMMIT".into(),
            b.scripts_commit.clone().unwrap_or_default(),
        ),
        ("DECAP_BUILD_SCRIPTS".into(), SCRIPTS_DIR.into()),
    ]);
    if !notices.is_empty() {
        vars.push(("DECAP_NOTICES".into(), notices.join("\n")));
    }
    // A container with a memory limit has a memory cgroup of its own:
    // bctool reads from it whether a process was killed for memory.
    if memory_limited {
        vars.push(("DECAP_BCTOOL_CGROUP_MEMORY".into(), "1".into()));
    }
    vars.extend(spec.bctool_env.iter().cloned());
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The file that tells a build waiting on its sidecars to start.
pub const START_FILE: &str = "/decap/start";

/// bctool's command line in the build container; with `start_within`, the
/// script starts only once [`START_FILE`] is written (within that many
/// seconds).
pub fn build_command(
    spec: &LaunchSpec,
    url_port: u16,
    kill_grace_secs: u64,
    start_within: Option<u64>,
) -> Vec<String> {
    let mut cmd: Vec<String> = vec![
        BCTOOL.into(),
        // The console is echoed to the container's output too, as in a
        // pod: `podman logs` shows a kept build's console.
        "run".into(),
        "--timeout-secs".into(),
        spec.timeout.as_secs().max(1).to_string(),
        "--kill-grace-secs".into(),
        kill_grace_secs.max(1).to_string(),
        "--max-log-bytes".into(),
        spec.max_log_bytes.to_string(),
        "--serve-socket".into(),
        format!("{RUN_DIR}/build.sock"),
        "--serve-port".into(),
        url_port.to_string(),
    ];
    let mut masked: Vec<&str> = spec.secrets.iter().map(|(k, _)| k.as_str()).collect();
    masked.push("DECAP_BUILD_TOKEN");
    for m in masked {
        cmd.extend(["--mask-env".into(), m.into()]);
    }
    if let Some(secs) = start_within {
        cmd.extend([
            "--start-when".into(),
            START_FILE.into(),
            "--start-within-secs".into(),
            secs.to_string(),
        ]);
    }
    cmd.push("--".into());
    let shebang = spec
        .project
        .files
        .iter()
        .find(|f| f.path == "build.sh")
        .is_some_and(|f| f.content.starts_with(b"#!"));
    let script = format!("{SCRIPTS_DIR}/build.sh");
    if !shebang {
        cmd.push("/bin/sh".into());
    }
    cmd.push(script);
    cmd
}

/// What the engine needs to make a build container.
pub struct BuildContainer<'a> {
    /// The Decap instance (labels).
    pub instance: &'a str,
    /// The host's bctool.
    pub bctool: &'a Path,
    /// The host folder of the build socket.
    pub socket_dir: &'a Path,
    /// Where bctool serves the socket inside.
    pub url_port: u16,
    /// Seconds between TERM and KILL.
    pub kill_grace_secs: u64,
    /// The network the build joins: an engine network, or
    /// `container:NAME` (the first sidecar's).
    pub network: String,
    /// Lines for the top of the build's console.
    pub notices: &'a [String],
    /// Wait this many seconds at most for [`START_FILE`] before the script
    /// (a build with sidecars to wait for).
    pub start_within: Option<u64>,
}

/// The build container's create body.
pub fn build_body(spec: &LaunchSpec, c: &BuildContainer<'_>, l: &Limits) -> ContainerCreateBody {
    let (uid, gid) = build_user(spec);
    let image = spec
        .project
        .valid_descriptor()
        .map(|d| d.descriptor.build_image.clone())
        .unwrap_or_default();
    let mut host = HostConfig {
        binds: Some(vec![
            format!("{}:{BCTOOL}:ro", c.bctool.display()),
            format!("{}:{RUN_DIR}:ro", c.socket_dir.display()),
        ]),
        network_mode: Some(c.network.clone()),
        // An init as PID 1 reaps what the build leaves behind and passes
        // the stop signal on to bctool.
        init: Some(true),
        ..HostConfig::default()
    };
    host_limits(&mut host, l);
    if spec
        .project
        .valid_descriptor()
        .and_then(|d| d.descriptor.security_context.as_ref())
        .is_none()
    {
        restricted(&mut host);
    }
    ContainerCreateBody {
        image: Some(image),
        user: Some(format!("{uid}:{gid}")),
        env: Some(build_env(
            spec,
            c.url_port,
            c.notices,
            l.memory_bytes.is_some(),
        )),
        cmd: Some(build_command(
            spec,
            c.url_port,
            c.kill_grace_secs,
            c.start_within,
        )),
        entrypoint: Some(Vec::new()),
        working_dir: Some(format!("{WORKSPACE_DIR}/src")),
        labels: Some(labels(c.instance, spec, "build", None)),
        host_config: Some(host),
        ..ContainerCreateBody::default()
    }
}

/// A sidecar's create body, or why its spec cannot run here.
pub fn sidecar_body(
    spec: &LaunchSpec,
    instance: &str,
    sidecar: &Container,
    network: String,
    l: &Limits,
) -> Result<ContainerCreateBody, String> {
    let mut env = Vec::new();
    for v in sidecar.env.iter().flatten() {
        if v.value_from.is_some() {
            return Err(format!(
                "sidecar {:?}: env {} uses valueFrom, which the container executor cannot resolve (give a value)",
                sidecar.name, v.name
            ));
        }
        env.push(format!(
            "{}={}",
            v.name,
            v.value.clone().unwrap_or_default()
        ));
    }
    let mut host = HostConfig {
        network_mode: Some(network),
        ..HostConfig::default()
    };
    // A sidecar's own memory limit, else none of its own (it shares the
    // machine with its build, as in a pod without limits).
    let own = sidecar
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|m| m.get("memory"))
        .map(|q| limits::parse_bytes("sidecar memory limit", &q.0))
        .transpose()
        .map_err(|e| format!("sidecar {:?}: {e}", sidecar.name))?;
    if let Some(m) = own.and_then(|m| i64::try_from(m).ok()) {
        host.memory = Some(m);
        host.memory_swap = Some(m);
    }
    if let Some(p) = l.pids.and_then(|p| i64::try_from(p).ok()) {
        host.pids_limit = Some(p);
    }
    let sc = sidecar.security_context.as_ref();
    let asked_more = sc.is_some_and(|s| {
        s.capabilities
            .as_ref()
            .is_some_and(|c| c.add.as_ref().is_some_and(|a| !a.is_empty()))
            || s.privileged == Some(true)
    });
    if asked_more {
        if let Some(add) = sc.and_then(|s| s.capabilities.as_ref()?.add.clone()) {
            host.cap_add = Some(add);
        }
    } else {
        restricted(&mut host);
    }
    let user = sc.and_then(|s| {
        let uid = s.run_as_user?;
        Some(match s.run_as_group {
            Some(g) => format!("{uid}:{g}"),
            None => uid.to_string(),
        })
    });
    Ok(ContainerCreateBody {
        image: sidecar.image.clone(),
        user,
        env: Some(env),
        entrypoint: sidecar.command.clone(),
        cmd: sidecar.args.clone(),
        working_dir: sidecar.working_dir.clone(),
        labels: Some(labels(instance, spec, "sidecar", Some(&sidecar.name))),
        host_config: Some(host),
        ..ContainerCreateBody::default()
    })
}

/// The engine network a build's namespace joins.
pub fn base_network(l: &Limits, network: &str) -> String {
    match l.network {
        Network::None => "none".into(),
        Network::Outbound => network.to_owned(),
    }
}

/// [`START_FILE`] as a tar to unpack at `/`: the notes for the console,
/// then a line `.` that says it is whole.
pub fn start_tar(notices: &[String]) -> std::io::Result<Vec<u8>> {
    let mut text = String::new();
    for n in notices {
        text.push_str(n);
        text.push('\n');
    }
    text.push_str(".\n");
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(text.len() as u64);
    t.append_data(&mut h, START_FILE.trim_start_matches('/'), text.as_bytes())?;
    t.into_inner()
}

/// The scripts and the workspace's folders, as a tar to unpack at `/`,
/// owned by the build's user.
pub fn workspace_tar(spec: &LaunchSpec) -> std::io::Result<Vec<u8>> {
    let (uid, gid) = build_user(spec);
    let mut t = tar::Builder::new(Vec::new());
    let dir = |t: &mut tar::Builder<Vec<u8>>, path: &str, uid: u32, gid: u32, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_size(0);
        t.append_data(&mut h, path, std::io::empty())
    };
    dir(&mut t, "decap", 0, 0, 0o755)?;
    dir(&mut t, "decap/scripts", 0, 0, 0o755)?;
    dir(&mut t, "decap/workspace", uid, gid, 0o755)?;
    for sub in ["src", "artifacts", "home", "tmp"] {
        dir(&mut t, &format!("decap/workspace/{sub}"), uid, gid, 0o755)?;
    }
    let mut made = std::collections::HashSet::new();
    for f in &spec.project.files {
        // Paths come from the catalog, which only holds plain relative
        // paths; check again all the same.
        if f.path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(std::io::Error::other(format!(
                "unsafe script path {:?}",
                f.path
            )));
        }
        // Folders of the scripts, made once each.
        let parts: Vec<&str> = f.path.split('/').collect();
        for i in 1..parts.len() {
            let d = format!("decap/scripts/{}", parts[..i].join("/"));
            if made.insert(d.clone()) {
                dir(&mut t, &d, 0, 0, 0o755)?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        // build.sh is run, whatever its mode in the scripts repo.
        h.set_mode(if f.executable || f.path == "build.sh" {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(f.content.len() as u64);
        t.append_data(
            &mut h,
            format!("decap/scripts/{}", f.path),
            f.content.as_ref(),
        )?;
    }
    t.into_inner()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_workspace_tar_holds_the_scripts_and_folders_owned_by_the_build_user() {
        let spec = decap_contract_tests::launch_spec(
            "#!/bin/sh\necho hi\n",
            std::time::Duration::from_secs(5),
        );
        let bytes = workspace_tar(&spec).unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            seen.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.uid().unwrap(),
                h.mode().unwrap(),
            ));
        }
        assert!(seen.contains(&("decap/workspace/src".into(), 1000, 0o755)));
        assert!(seen.contains(&("decap/scripts/build.sh".into(), 0, 0o755)));
    }

    #[test]
    fn the_build_command_masks_the_token_and_runs_a_script_without_a_shebang_with_sh() {
        let mut spec =
            decap_contract_tests::launch_spec("echo hi\n", std::time::Duration::from_secs(5));
        spec.secrets = vec![("API_KEY".into(), "s3cr3t-value".into())];
        let cmd = build_command(&spec, 7000, 3, None);
        let tail: Vec<&str> = cmd.iter().rev().take(3).map(String::as_str).collect();
        assert_eq!(tail, ["/decap/scripts/build.sh", "/bin/sh", "--"]);
        let joined = cmd.join(" ");
        assert!(joined.contains("--mask-env API_KEY --mask-env DECAP_BUILD_TOKEN"));
        assert!(
            !joined.contains("s3cr3t-value"),
            "a secret's value is never on the command line"
        );
    }
}
