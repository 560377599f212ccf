//! bctool: the companion binary inside every build environment.
//!
//! `bctool run -- CMD…` runs the build script in its own process group,
//! captures its console (stdout and stderr, interleaved as written) to a
//! local file, streams that file to the server as it grows (so live logs work
//! for every executor and outlive the environment), enforces the timeout
//! (TERM, then KILL after a grace period), then uploads the gzipped log and
//! the artifacts tarball, records the result and exits with the script's own
//! exit code. An upload that fails is noted on the result; the result is
//! always recorded if its store can be reached at all.
//!
//! Logs, artifacts and the result go through the server, or, when the build
//! environment has AWS settings (`DECAP_BCTOOL_DIRECT=1`, see
//! `decap_aws::direct`), straight to S3 and DynamoDB as the original
//! bctool did; the live console still streams to the server when the build
//! has a token for it. Uploads are packed while they are sent (see [`pack`]),
//! so no output is ever whole in memory or copied to a temporary file.
//!
//! bctool never prints its token, its credentials or the environment.

mod direct;
pub mod pack;
pub mod phases;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use decap_api_types::BuildResult;
use decap_client::{Client, ClientError};
use decap_core::build::BuildId;
use decap_core::lifecycle;
use decap_core::ports::BlobKind;
use decap_tail::Progress;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

/// Writes a line to bctool's standard error and never fails (where
/// `eprintln!` panics): a build outlives the server that started it, whose
/// standard error it may share.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// bctool's command line.
#[derive(Parser, Debug)]
#[command(
    name = "bctool",
    version,
    about = "Decap's build companion: runs a build script and ships its log, artifacts and result"
)]
pub struct Cli {
    #[command(flatten)]
    build: BuildArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct BuildArgs {
    /// The Decap server.
    #[arg(
        long,
        env = "DECAP_URL",
        global = true,
        default_value = "http://127.0.0.1:9090"
    )]
    server: String,
    /// The build.
    #[arg(long, env = "BUILD_ID", global = true)]
    build_id: Option<String>,
    /// The build's own token (never printed).
    #[arg(long, env = "DECAP_BUILD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Serve the server's build socket (bound into the sandbox) on the
    /// sandbox's own loopback, at `--serve-port`, for the build's
    /// `DECAP_URL`.
    #[arg(long, global = true, hide = true, requires = "serve_port")]
    serve_socket: Option<PathBuf>,
    /// The port for `--serve-socket`.
    #[arg(long, global = true, hide = true)]
    serve_port: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a build command and ships everything it produces.
    Run(RunArgs),
    /// Releases the build's branch lock early, so the next build of the branch may start.
    Unlock,
    /// Uploads a file as the build's console log (gzipped on the way).
    PutLog {
        /// The log file.
        file: PathBuf,
    },
    /// Uploads a folder as the build's artifacts (a tar.gz).
    PutArtifacts {
        /// The folder.
        dir: PathBuf,
    },
    /// Waits, warm, for the local executor to send a build on standard input
    /// (one JSON line), then runs it as `run` would.
    #[command(hide = true)]
    Standby {
        /// Stop the build if bctool's parent dies.
        #[arg(long)]
        exit_with_parent: bool,
    },
    /// Takes over a build that `decap-runner` started (the runner becomes
    /// bctool with this; the launch is on standard input again) and
    /// carries it on as `run` would.
    #[command(hide = true)]
    Adopt(AdoptArgs),
    /// Copies bctool into a folder and makes a build's workspace folders
    /// (`src`, `artifacts`, `home`, `tmp`). The Kubernetes executor's init
    /// container runs this from the Decap image, so that any build image
    /// can run bctool.
    Install {
        /// Where bctool is copied (as `DIR/bctool`).
        dir: PathBuf,
        /// The build's workspace, whose folders are made writable for any user.
        #[arg(long)]
        workspace: Option<PathBuf>,
    },
    /// Runs a preset build's phases (the `build.sh` Decap writes for a
    /// project with a `language` runs this): fetches the project's tree,
    /// then runs machine, setup and test, each a section of the console.
    Phases {
        /// The plan Decap wrote beside the build's scripts.
        plan: PathBuf,
    },
    /// Fetches a pipeline stage's inputs: the artifacts of each stage it
    /// needs (named in `DECAP_INPUT_STAGES`), unpacked into `DIR/<stage>/`.
    /// The `build.sh` Decap writes for a stage with needs runs this first.
    Inputs {
        /// Where the inputs go (`$DECAP_INPUTS`).
        dir: PathBuf,
    },
    /// Records the build's result.
    RecordBuildMetadata {
        /// The script's exit code.
        #[arg(long)]
        exit_code: i32,
        /// The build ran out of time.
        #[arg(long)]
        timed_out: bool,
        /// A note to keep on the build.
        #[arg(long)]
        message: Option<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Files left here become the artifacts.
    #[arg(long, env = "ARTIFACTS_DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Stop the command after this many seconds.
    #[arg(long, env = "DECAP_BUILD_TIMEOUT_SECS", default_value_t = 1800)]
    timeout_secs: u64,
    /// Seconds between TERM and KILL when stopping the command.
    #[arg(long, default_value_t = 10)]
    kill_grace_secs: u64,
    /// The console log is kept up to this many bytes, then marked truncated.
    #[arg(long, env = "DECAP_MAX_LOG_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_log_bytes: u64,
    /// Stop the build if bctool's parent dies (the local executor sets this).
    #[arg(long)]
    exit_with_parent: bool,
    /// Also copy the console to bctool's own stdout.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    echo: bool,
    /// A variable whose value is masked in the console (the build's token,
    /// its secrets); repeat for each.
    #[arg(long = "mask-env", value_name = "NAME")]
    mask_env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    /// The command's whole environment (standby launches); inherited when unset.
    #[arg(skip)]
    env: Option<Vec<(String, String)>>,
    /// The command's working directory (standby launches).
    #[arg(skip)]
    cwd: Option<PathBuf>,
    /// Secrets this build does not get (a pull request from a fork), to
    /// say so in its console.
    #[arg(skip)]
    withheld: Option<String>,
    /// Lines for the top of the console, from the executor (a pulled
    /// image, a setting it cannot honour).
    #[arg(skip)]
    notices: Vec<String>,
    /// Start the command only once this file exists and ends with a line
    /// `.` (the container executor writes it when the build's sidecars are
    /// ready); the lines before are notes for the top of the console.
    #[arg(long, hide = true)]
    start_when: Option<PathBuf>,
    /// How long to wait for `--start-when`'s file before giving up.
    #[arg(long, hide = true, default_value_t = 600)]
    start_within_secs: u64,
}

/// What `decap-runner` hands over as it becomes bctool.
#[derive(Args, Debug)]
struct AdoptArgs {
    /// The build's command, started (its own process group).
    #[arg(long, conflicts_with = "spawn_error")]
    pid: Option<u32>,
    /// Why the command could not start.
    #[arg(long)]
    spawn_error: Option<String>,
    /// The read end of the command's console pipe.
    #[arg(long)]
    console_fd: i32,
    /// The runner's private folder (the console file and phase records).
    #[arg(long)]
    work: PathBuf,
    /// The runner's parent when it started (for `--exit-with-parent`).
    #[arg(long)]
    parent: u32,
    /// The sandbox's end of the build socket, listening.
    #[arg(long)]
    listen_fd: Option<i32>,
    /// Stop the build if the parent dies.
    #[arg(long)]
    exit_with_parent: bool,
}

/// Reads the launch from standard input and runs it.
async fn standby(exit_with_parent: bool, serve: Option<(PathBuf, u16)>) -> Result<i32> {
    use tokio::io::AsyncBufReadExt;
    let prepared = prepare(serve)?;
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    if stdin.read_line(&mut line).await? == 0 {
        // The executor went away without a build for us.
        return Ok(0);
    }
    run_launch(prepared, &line, exit_with_parent).await
}

/// Takes over what `decap-runner` started, and runs it to its end. A
/// command that bctool cannot carry on is not left running unwatched: its
/// group is killed.
async fn adopt(a: AdoptArgs, serve_socket: Option<PathBuf>) -> Result<i32> {
    let pid = a.pid;
    let adopted = adopt_and_run(a, serve_socket).await;
    if adopted.is_err()
        && let Some(pid) = pid
    {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    adopted
}

async fn adopt_and_run(a: AdoptArgs, serve_socket: Option<PathBuf>) -> Result<i32> {
    let handed = handed::take(a.console_fd, a.listen_fd)?;
    if let (Some(listener), Some(socket)) = (handed.listener, serve_socket) {
        serve_listener(listener, socket)?;
    }
    let started = match (a.pid, a.spawn_error) {
        (Some(pid), _) => Ok(pid),
        (None, Some(e)) => Err(e),
        (None, None) => bail!("adopt needs --pid or --spawn-error"),
    };
    let prepared = prepare_in(Work(a.work), handed.console, None, a.parent, Some(started))?;
    // The runner held TERM and INT back until here; any that came are
    // delivered now, to the handlers just made.
    handed::unblock_stop_signals()?;
    let mut line = String::new();
    std::io::stdin()
        .read_to_string(&mut line)
        .context("cannot read the launch")?;
    // Read once, and no longer there to be read.
    let null = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("cannot close the launch")?;
    run_launch(prepared, &line, a.exit_with_parent).await
}

/// Runs a standby launch (one JSON line) on what was prepared for it.
async fn run_launch(prepared: Prepared, line: &str, exit_with_parent: bool) -> Result<i32> {
    let launch: decap_api_types::StandbyLaunch =
        serde_json::from_str(line).context("the standby launch is not valid JSON")?;
    if launch.command.is_empty() {
        bail!("the standby launch has no command");
    }
    let args = RunArgs {
        artifacts_dir: Some(PathBuf::from(&launch.artifacts_dir)),
        timeout_secs: launch.timeout_secs,
        kill_grace_secs: launch.kill_grace_secs,
        max_log_bytes: launch.max_log_bytes,
        exit_with_parent,
        echo: false,
        mask_env: launch.masked,
        withheld: launch
            .bctool_env
            .iter()
            .find(|(k, _)| k == WITHHELD_VAR)
            .map(|(_, v)| v.clone()),
        start_when: None,
        start_within_secs: 0,
        notices: launch
            .bctool_env
            .iter()
            .find(|(k, _)| k == NOTICES_VAR)
            .map(|(_, v)| notices(v))
            .unwrap_or_default(),
        command: launch.command,
        env: Some(launch.env),
        cwd: Some(PathBuf::from(&launch.cwd)),
    };
    let (server, token) = (launch.server, launch.token);
    let vars: std::collections::HashMap<String, String> = launch.bctool_env.into_iter().collect();
    let direct = direct::config(|k| vars.get(k).cloned())?;
    run_prepared(
        prepared,
        Shipper::connect(
            &server,
            Some(token),
            direct,
            retry_budget(vars.get(RETRY_VAR).cloned(), exit_with_parent),
        ),
        launch.build_id,
        args,
    )
    .await
}

/// Runs bctool; returns the process exit code.
pub async fn main(cli: Cli) -> Result<i32> {
    let serve = cli.build.serve_socket.clone().zip(cli.build.serve_port);
    let command = match cli.command {
        Command::Standby { exit_with_parent } => return standby(exit_with_parent, serve).await,
        Command::Adopt(a) => return adopt(a, cli.build.serve_socket.clone()).await,
        Command::Install { dir, workspace } => {
            install(&dir, workspace.as_deref())?;
            return Ok(0);
        }
        other => other,
    };
    let credentials = std::env::var_os("DECAP_CREDENTIALS_DIR").map(PathBuf::from);
    let direct = direct::config(|k| {
        std::env::var(k)
            .ok()
            .or_else(|| credential_file(credentials.as_deref()?, k))
    })?;
    let connect = Shipper::connect(
        &cli.build.server,
        cli.build.token.clone(),
        direct,
        retry_budget(
            std::env::var(RETRY_VAR).ok(),
            matches!(&command, Command::Run(a) if a.exit_with_parent),
        ),
    );
    let id = cli
        .build
        .build_id
        .clone()
        .context("no build id: set BUILD_ID or pass --build-id")?;
    match command {
        // The shipper is made after the command starts: the build's first
        // line should not wait for TLS roots or credentials to load.
        Command::Run(mut args) => {
            args.withheld = std::env::var(WITHHELD_VAR).ok();
            args.notices = std::env::var(NOTICES_VAR)
                .map(|v| notices(&v))
                .unwrap_or_default();
            let prepared = prepare(serve)?;
            if let Some(file) = args.start_when.clone() {
                let more = start_when(&file, Duration::from_secs(args.start_within_secs)).await?;
                args.notices.extend(more);
            }
            run_prepared(prepared, connect, id, args).await
        }
        Command::Standby { .. } | Command::Adopt(_) | Command::Install { .. } => {
            unreachable!("handled above")
        }
        Command::Unlock => {
            let released = connect.await?.unlock(&id).await?;
            note!(
                "bctool: {}",
                if released {
                    "lock released"
                } else {
                    "the lock was not held"
                }
            );
            Ok(0)
        }
        Command::PutLog { file } => {
            connect.await?.put_log(&id, &file).await?;
            Ok(0)
        }
        Command::PutArtifacts { dir } => {
            if !pack::has_files(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
                bail!("{} holds no files", dir.display());
            }
            connect.await?.put_artifacts(&id, &dir).await?;
            Ok(0)
        }
        Command::Phases { plan } => {
            let shipper = connect.await?;
            phases::run(shipper.client.clone(), &id, &plan).await
        }
        Command::Inputs { dir } => {
            let shipper = connect.await?;
            phases::inputs(&shipper.client, &id, &dir).await
        }
        Command::RecordBuildMetadata {
            exit_code,
            timed_out,
            message,
        } => {
            let result = BuildResult {
                exit_code,
                timed_out,
                message,
                memory_limit_hit: None,
                phases: Vec::new(),
                stopped: false,
            };
            connect.await?.record_result(&id, &result).await?;
            Ok(0)
        }
    }
}

/// A setting read from the mounted credentials Secret (the Kubernetes
/// executor mounts it at `/decap/credentials`): its keys `aws-key`,
/// `aws-secret` and `aws-region`, as the original Decap secret named them.
fn credential_file(dir: &Path, var: &str) -> Option<String> {
    let file = match var {
        "DECAP_BCTOOL_AWS_ACCESS_KEY_ID" => "aws-key",
        "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY" => "aws-secret",
        "DECAP_AWS_REGION" => "aws-region",
        _ => return None,
    };
    let value = std::fs::read_to_string(dir.join(file)).ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// `bctool install`: copies this executable to `dir/bctool` and makes the
/// workspace folders.
fn install(dir: &Path, workspace: Option<&Path>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("cannot find bctool's own executable")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let to = dir.join("bctool");
    // Copied beside, then renamed: a half-copied bctool is never run.
    let partial = dir.join(".bctool.partial");
    std::fs::copy(&me, &partial)
        .with_context(|| format!("cannot copy {} to {}", me.display(), partial.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &to)?;
    if let Some(ws) = workspace {
        for sub in ["src", "artifacts", "home", "tmp"] {
            let d = ws.join(sub);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            // The build image may run as another user than this container.
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777))?;
        }
    }
    note!("bctool: installed {}", to.display());
    Ok(())
}

/// Where a build's output goes: the server, or S3 and DynamoDB directly.
pub struct Shipper {
    client: Client,
    /// How long calls are retried while the server is unreachable.
    retry_budget: Duration,
    /// The build has a token, so its console can stream to the server.
    live: bool,
    direct: Option<direct::DirectStores>,
}

impl Shipper {
    async fn connect(
        server: &str,
        token: Option<String>,
        direct: Option<direct::Config>,
        retry_budget: Duration,
    ) -> Result<Shipper> {
        let live = token.is_some();
        let client = Client::new(server, token)?;
        let direct = match direct {
            Some(config) => Some(direct::stores(config).await),
            None => None,
        };
        Ok(Shipper {
            client,
            retry_budget,
            live,
            direct,
        })
    }

    async fn put_log(&self, id: &str, file: &Path) -> Result<()> {
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        let packed = || pack::log(file.to_owned());
        self.put(id, BlobKind::LogGz, packed).await
    }

    async fn put_artifacts(&self, id: &str, dir: &Path) -> Result<()> {
        let packed = || pack::artifacts(dir.to_owned());
        self.put(id, BlobKind::ArtifactsTarGz, packed).await
    }

    async fn put(&self, id: &str, kind: BlobKind, packed: impl Fn() -> pack::Packed) -> Result<()> {
        match &self.direct {
            Some(d) => {
                let build = BuildId::parse(id)?;
                retry_direct(|| d.blobs.put(build, kind, Box::pin(packed()))).await?;
            }
            None => {
                let body = || reqwest::Body::wrap_stream(packed());
                match kind {
                    BlobKind::LogGz => {
                        retry(self.retry_budget, || self.client.put_log(id, body())).await?
                    }
                    BlobKind::ArtifactsTarGz => {
                        retry(self.retry_budget, || self.client.put_artifacts(id, body())).await?
                    }
                    BlobKind::ArtifactsIndex | BlobKind::Scripts => {
                        bail!("the server writes {} itself", kind.file_name())
                    }
                }
            }
        }
        Ok(())
    }

    /// Records how the build ended. On the direct path the outcome is kept
    /// on the running build's record, as the server keeps it
    /// ([`decap_core::lifecycle`] decides for both): the first outcome
    /// reported wins, and the server ends the build, frees its lock and its
    /// place once its environment is gone, so that no process of this build
    /// runs beside the next build of the branch.
    async fn record_result(&self, id: &str, result: &BuildResult) -> Result<()> {
        let Some(d) = &self.direct else {
            retry(self.retry_budget, || self.client.post_result(id, result)).await?;
            return Ok(());
        };
        let build = BuildId::parse(id)?;
        let outcome = result.outcome();
        for _ in 0..5 {
            let Some(b) = retry_direct(|| d.builds.get(build)).await? else {
                bail!("build {id} is not in the build store");
            };
            let step = lifecycle::decide(
                &b,
                false,
                lifecycle::Event::Report(outcome.clone()),
                time::OffsetDateTime::now_utc(),
            )?;
            let Some(reported) = step.write else {
                if b.status.is_final() {
                    note!(
                        "bctool: the build is already {}; its result stays",
                        b.status
                    );
                } else {
                    note!("bctool: the build's result was already reported; it stays");
                }
                return Ok(());
            };
            if retry_direct(|| d.builds.update(&reported, b.status)).await? {
                return Ok(());
            }
            // Changed meanwhile (cancelled, or ended): decide again on what
            // is recorded now.
        }
        bail!("build {id} kept changing while its result was recorded")
    }

    async fn unlock(&self, id: &str) -> Result<bool> {
        let Some(d) = &self.direct else {
            return Ok(retry(self.retry_budget, || self.client.unlock_build(id)).await?);
        };
        let build = BuildId::parse(id)?;
        let Some(b) = retry_direct(|| d.builds.get(build)).await? else {
            bail!("build {id} is not in the build store");
        };
        let key = b.lock_key();
        Ok(retry_direct(|| d.locks.release(&key, build)).await?)
    }
}

/// Retries a direct call that failed after the SDK's own retries (a server
/// down for longer than they last): twice more, a second apart.
async fn retry_direct<T, F, Fut>(mut f: F) -> Result<T, decap_core::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, decap_core::Error>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e @ decap_core::Error::Backend { .. }) if attempt < 2 => {
                attempt += 1;
                note!("bctool: {e}; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// How long bctool keeps retrying a call while the server is unreachable or
/// failing: long enough for a controller to restart (a pod rescheduled, a
/// rollout), so that the build's log and result are not lost meanwhile.
///
/// A build that dies with its parent (the local executor's) has no server to
/// wait for once the parent is gone: it does not wait.
fn retry_budget(setting: Option<String>, exit_with_parent: bool) -> Duration {
    if exit_with_parent {
        return Duration::ZERO;
    }
    setting
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs)
}

/// Names of secrets a build does not get (a pull request from a fork).
const WITHHELD_VAR: &str = "DECAP_SECRETS_WITHHELD";

/// Set by executors whose build has a memory cgroup of its own (a
/// container): bctool tells from it whether a process was killed for
/// memory.
const CGROUP_MEMORY_VAR: &str = "DECAP_BCTOOL_CGROUP_MEMORY";

/// The memory limit, when the build's own cgroup (cgroup v1 or v2, as a
/// container sees it) counts a process killed for going past it.
fn memory_limit_hit() -> Option<u64> {
    if std::env::var(CGROUP_MEMORY_VAR).ok().as_deref() != Some("1") {
        return None;
    }
    let count = |file: &str| -> Option<u64> {
        std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse().ok())
        })
    };
    let read =
        |file: &str| -> Option<u64> { std::fs::read_to_string(file).ok()?.trim().parse().ok() };
    if let Some(kills) = count("/sys/fs/cgroup/memory/memory.oom_control") {
        return (kills > 0)
            .then(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes").unwrap_or(0));
    }
    let kills = count("/sys/fs/cgroup/memory.events")?;
    (kills > 0).then(|| read("/sys/fs/cgroup/memory.max").unwrap_or(0))
}

/// Waits for the executor's go: `file` complete (ending with a line `.`);
/// returns the lines before it.
async fn start_when(file: &Path, within: Duration) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Some(body) = text.strip_suffix(".\n")
        {
            return Ok(notices(body));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the build was never told to start ({} did not appear within {} s): its sidecars did not get ready",
                file.display(),
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Lines from the executor for the top of the console, one per line.
const NOTICES_VAR: &str = "DECAP_NOTICES";

fn notices(v: &str) -> Vec<String> {
    v.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The setting of [`retry_budget`], in seconds.
const RETRY_VAR: &str = "DECAP_BCTOOL_RETRY_SECS";

/// Retries transient failures (server down, 5xx, 429) with backoff, for up
/// to `budget`.
async fn retry<T, F, Fut>(budget: Duration, mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + budget;
    let mut answered_failures = 0;
    loop {
        match f().await {
            // A server that answers with an error is up: its failure (a
            // store behind it) is retried a few times only.
            Err(e @ ClientError::Api { .. }) if e.is_transient() && answered_failures < 6 => {
                answered_failures += 1;
                note!("bctool: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            // A server that does not answer may be restarting: keep trying.
            Err(e @ ClientError::Unreachable { .. })
                if tokio::time::Instant::now() + delay < give_up =>
            {
                note!("bctool: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// The local console file: appended by the reader, followed by the streamer.
struct Console {
    path: PathBuf,
    progress: watch::Sender<Progress>,
}

/// bctool's private folder (the console file, the phases' records): made
/// by bctool or handed over by the runner, removed when the run is over
/// unless the environment goes with it.
struct Work(PathBuf);

impl Work {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var_os(decap_api_types::TMPDIR_DISCARDED_VAR).is_some_and(|v| v == "1") {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The build's command: started here, or by `decap-runner` before it
/// became bctool (then waited for on a thread, as tokio cannot adopt it).
enum Proc {
    Tokio(tokio::process::Child),
    Adopted {
        pid: u32,
        waiter: tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>,
        status: Option<std::process::ExitStatus>,
    },
}

impl Proc {
    fn adopted(pid: u32) -> Self {
        let waiter = tokio::task::spawn_blocking(move || handed::wait(pid));
        Proc::Adopted {
            pid,
            waiter,
            status: None,
        }
    }

    fn id(&self) -> Option<u32> {
        match self {
            Proc::Tokio(c) => c.id(),
            Proc::Adopted { pid, status, .. } => status.is_none().then_some(*pid),
        }
    }

    /// Waits for the command to exit; cancel-safe, and may be called again.
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Proc::Tokio(c) => c.wait().await,
            Proc::Adopted { waiter, status, .. } => {
                if let Some(s) = status {
                    return Ok(*s);
                }
                let s = waiter.await.map_err(std::io::Error::other)??;
                *status = Some(s);
                Ok(s)
            }
        }
    }
}

/// Taking over what `decap-runner` hands on across `execve`.
#[allow(unsafe_code)]
mod handed {
    use std::os::fd::{FromRawFd, OwnedFd};

    use anyhow::{Context, Result, bail};
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

    pub(super) struct Handed {
        pub console: std::io::PipeReader,
        pub listener: Option<std::net::TcpListener>,
    }

    /// Owns the descriptors the runner named. Each must be open, and is
    /// taken once: they are checked before they are owned.
    pub(super) fn take(console_fd: i32, listen_fd: Option<i32>) -> Result<Handed> {
        let check = |fd: i32| -> Result<()> {
            if fd <= 2 {
                bail!("descriptor {fd} is not one the runner hands on");
            }
            nix::fcntl::fcntl(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                nix::fcntl::FcntlArg::F_GETFD,
            )
            .with_context(|| format!("descriptor {fd} is not open"))?;
            Ok(())
        };
        check(console_fd)?;
        if let Some(l) = listen_fd {
            check(l)?;
            if l == console_fd {
                bail!("the console and the listener are one descriptor");
            }
        }
        // SAFETY: both are open (checked above), distinct, not standard
        // streams, and owned by nothing else in this process: the runner
        // left them open across `execve` for bctool to take.
        let console = std::io::PipeReader::from(unsafe { OwnedFd::from_raw_fd(console_fd) });
        let listener =
            listen_fd.map(|fd| std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        Ok(Handed { console, listener })
    }

    /// Lets TERM and INT through again (the runner blocked them).
    pub(super) fn unblock_stop_signals() -> Result<()> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None).context("cannot unblock signals")
    }

    /// Waits for a child this process did not spawn through tokio.
    pub(super) fn wait(pid: u32) -> std::io::Result<std::process::ExitStatus> {
        use nix::sys::wait::{WaitStatus, waitpid};
        use std::os::unix::process::ExitStatusExt;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        loop {
            match waitpid(pid, None) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(std::process::ExitStatus::from_raw((code & 0xff) << 8));
                }
                Ok(WaitStatus::Signaled(_, sig, core)) => {
                    let raw = sig as i32 | if core { 0x80 } else { 0 };
                    return Ok(std::process::ExitStatus::from_raw(raw));
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(std::io::Error::from(e)),
            }
        }
    }
}

/// What a run needs before its command starts: made ahead of time by a
/// warm bctool, so that the build's first line waits for none of it.
struct Prepared {
    started_parent: u32,
    _work: Work,
    console: Arc<Console>,
    log_file: std::fs::File,
    reader: std::io::PipeReader,
    /// The pipe's write end, for a command still to start; `None` when the
    /// runner started it (`started`).
    writer: Option<std::io::PipeWriter>,
    /// The command the runner started (its pid), or why it could not.
    started: Option<std::result::Result<u32, String>>,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// Installs the SIGCHLD handler tokio's child reaping needs before the
    /// command starts, rather than while it starts.
    _child: tokio::signal::unix::Signal,
}

/// Serves the server's build socket on the sandbox's loopback: every
/// connection to `127.0.0.1:port` is carried to the socket.
fn serve_socket(socket: PathBuf, port: u16) -> Result<()> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot serve Decap's socket on 127.0.0.1:{port}"))?;
    serve_listener(listener, socket)
}

/// The buffer each way of a connection carried to the build socket.
const PROXY_BYTES: usize = 256 * 1024;

/// Serves the build socket on a listener already bound.
fn serve_listener(listener: std::net::TcpListener, socket: PathBuf) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let socket = socket.clone();
            tokio::spawn(async move {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(mut unix) => {
                        // The console's live stream passes here: large
                        // buffers (tokio's default is 8 KiB) save syscalls.
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut tcp,
                            &mut unix,
                            PROXY_BYTES,
                            PROXY_BYTES,
                        )
                        .await;
                    }
                    Err(e) => note!("bctool: cannot reach Decap's socket: {e}"),
                }
            });
        }
    });
    Ok(())
}

fn prepare(serve: Option<(PathBuf, u16)>) -> Result<Prepared> {
    if let Some((socket, port)) = serve {
        serve_socket(socket, port)?;
    }
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    // One pipe for stdout and stderr, so the log interleaves them as written.
    let (reader, writer) = decap_runner::console_pipe()?;
    prepare_in(
        Work(work.keep()),
        reader,
        Some(writer),
        std::os::unix::process::parent_id(),
        None,
    )
}

fn prepare_in(
    work: Work,
    reader: std::io::PipeReader,
    writer: Option<std::io::PipeWriter>,
    started_parent: u32,
    started: Option<std::result::Result<u32, String>>,
) -> Result<Prepared> {
    let console = Arc::new(Console {
        path: work.path().join("console.log"),
        progress: watch::channel(Progress::default()).0,
    });
    let log_file = std::fs::File::create(&console.path)?;
    Ok(Prepared {
        started_parent,
        _work: work,
        console,
        log_file,
        reader,
        writer,
        started,
        term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        int: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        _child: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?,
    })
}

async fn run_prepared(
    prepared: Prepared,
    connect: impl std::future::Future<Output = Result<Shipper>>,
    id: String,
    args: RunArgs,
) -> Result<i32> {
    let Prepared {
        started_parent,
        _work,
        console,
        mut log_file,
        mut reader,
        writer,
        started,
        mut term,
        mut int,
        _child,
    } = prepared;
    let phases_file = _work.path().join("phases.json");
    let spawned = match (started, writer) {
        (Some(Ok(pid)), _) => Ok(Proc::adopted(pid)),
        (Some(Err(e)), _) => Err(e),
        (None, None) => Err("bctool has no console for the command".to_owned()),
        (None, Some(writer)) => {
            let mut cmd = tokio::process::Command::new(&args.command[0]);
            if let Some(env) = &args.env {
                cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
            } else {
                // bctool's own settings (credentials among them) are not the script's.
                for var in direct::VARS {
                    cmd.env_remove(var);
                }
            }
            if let Some(cwd) = &args.cwd {
                cmd.current_dir(cwd);
            }
            cmd.env(phases::PHASES_VAR, &phases_file);
            cmd.args(&args.command[1..])
                .stdin(Stdio::null())
                .stdout(writer.try_clone()?)
                .stderr(writer)
                .process_group(0);
            let spawned = decap_runner::spawn_when_free(|| cmd.spawn());
            drop(cmd); // closes bctool's copies of the pipe's write end
            spawned
                .map(Proc::Tokio)
                .map_err(|e| format!("bctool could not start {:?}: {e}", args.command[0]))
        }
    };
    let shipper = connect.await?;
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let note = format!("{e}\n");
            log_file.write_all(note.as_bytes())?;
            let len = note.len() as u64;
            console
                .progress
                .send_replace(Progress { len, closed: true });
            {
                let _ = std::io::stderr().write_all(note.as_bytes());
            }
            return finish(
                &shipper,
                &id,
                &console,
                args.artifacts_dir.as_deref(),
                127,
                false,
                false,
                vec![note.trim().to_owned()],
                None,
                Vec::new(),
            )
            .await;
        }
    };
    let pgid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));

    // Reader: pipe → masking → local file (capped) → watchers; echo to stdout.
    let cap = args.max_log_bytes;
    let echo = args.echo;
    let reader_console = console.clone();
    let masker = masker(&args);
    let mut notes_at_start = String::new();
    for line in &args.notices {
        notes_at_start.push_str(&format!("[decap: {line}]\n"));
    }
    if let Some(names) = args.withheld.as_deref().filter(|n| !n.is_empty()) {
        notes_at_start.push_str(&format!(
            "[decap: this build is of a pull request from a fork, so it gets no secrets: {} are empty]\n",
            names.replace(',', ", ")
        ));
    }
    if masker.skipped() > 0 {
        notes_at_start.push_str(&format!(
            "[decap: {} secret value(s) shorter than {} characters are not masked in this log]\n",
            masker.skipped(),
            decap_mask::MIN_MASKED_LEN
        ));
    }
    if !notes_at_start.is_empty() {
        log_file.write_all(notes_at_start.as_bytes())?;
        console.progress.send_replace(Progress {
            len: notes_at_start.len() as u64,
            closed: false,
        });
    }
    let reader_task = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let mut sink = ConsoleSink {
            file: log_file,
            console: reader_console,
            stored: 0,
            cap,
            truncated: false,
            echo,
        };
        sink.stored = sink.console.progress.borrow().len;
        let mut buf = vec![0u8; READ_BYTES];
        let mut masked = Vec::with_capacity(READ_BYTES);
        let mut stream = (!masker.is_empty()).then(|| masker.stream());
        loop {
            // With secrets, a tail that may begin one is held back until
            // more comes; after 100 ms of quiet it is shown as it is.
            if let Some(st) = &mut stream
                && st.held() > 0
                && !readable_within(&reader, 100)?
            {
                masked.clear();
                st.flush(&mut masked);
                sink.write(&masked)?;
                continue;
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match &mut stream {
                Some(st) => {
                    masked.clear();
                    st.push(&buf[..n], &mut masked);
                    sink.write(&masked)?;
                }
                None => sink.write(&buf[..n])?,
            }
        }
        if let Some(st) = &mut stream {
            masked.clear();
            st.flush(&mut masked);
            sink.write(&masked)?;
        }
        sink.console.progress.send_modify(|p| p.closed = true);
        Ok(sink.truncated)
    });

    let streamer = shipper.live.then(|| {
        tokio::spawn(stream_console(
            shipper.client.clone(),
            id.clone(),
            console.clone(),
            shipper.retry_budget,
        ))
    });

    // Wait for the command, its timeout, a cancel (TERM), or the parent's death.
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let grace = Duration::from_secs(args.kill_grace_secs.max(1));
    let parent_gone = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if args.exit_with_parent && std::os::unix::process::parent_id() != started_parent {
                return;
            }
        }
    };
    let mut notes = Vec::new();
    let mut timed_out = false;
    // Stopped from outside (a signal, or the parent gone), not by the
    // script's own end or its timeout.
    let mut stopped = false;
    let status = tokio::select! {
        s = child.wait() => s?,
        () = tokio::time::sleep(timeout) => {
            timed_out = true;
            notes.push(format!("the build ran past its timeout of {}s and was stopped", timeout.as_secs()));
            stop(&mut child, pgid, grace).await?
        }
        _ = term.recv() => {
            notes.push("stopped from outside by a TERM signal (a cancel, a deleted pod or a drained node)".into());
            stopped = true;
            stop(&mut child, pgid, grace).await?
        }
        _ = int.recv() => {
            notes.push("stopped from outside by an INT signal".into());
            stopped = true;
            stop(&mut child, pgid, grace).await?
        }
        () = parent_gone => {
            notes.push("the process that started bctool died; the build was stopped".into());
            stopped = true;
            stop(&mut child, pgid, grace).await?
        }
    };
    // Background processes the script left behind would hold the pipe open
    // and outlive the build; end them.
    let _ = killpg(pgid, Signal::SIGKILL);
    let exit_code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    let truncated = reader_task.await?.unwrap_or_else(|e| {
        notes.push(format!("reading the console failed: {e}"));
        false
    });
    if truncated {
        notes.push(format!(
            "the console log was truncated at {} bytes",
            args.max_log_bytes
        ));
    }
    let phases = phases::read_records(&phases_file);
    finish(
        &shipper,
        &id,
        &console,
        args.artifacts_dir.as_deref(),
        exit_code,
        timed_out,
        stopped,
        notes,
        streamer,
        phases,
    )
    .await
}

/// The most the console reader takes from the pipe at once: a script that
/// prints fast fills the (widened) pipe between reads, and larger reads
/// mean fewer system calls for the same bytes.
const READ_BYTES: usize = 256 * 1024;

/// The masker of a run: the values of its `--mask-env` variables, from the
/// command's environment.
fn masker(args: &RunArgs) -> decap_mask::Masker {
    let values: Vec<String> = args
        .mask_env
        .iter()
        .filter_map(|name| match &args.env {
            Some(env) => env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            None => std::env::var(name).ok(),
        })
        .filter(|v| !v.is_empty())
        .collect();
    decap_mask::Masker::new(values)
}

/// Whether the pipe has something to read within `ms` milliseconds.
fn readable_within(pipe: &std::io::PipeReader, ms: u16) -> std::io::Result<bool> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pipe.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// Where the console goes: the local file (capped) and its followers, and
/// bctool's stdout when echoing.
struct ConsoleSink {
    file: std::fs::File,
    console: Arc<Console>,
    stored: u64,
    cap: u64,
    truncated: bool,
    echo: bool,
}

impl ConsoleSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
        if self.truncated {
            return Ok(());
        }
        let room = self.cap.saturating_sub(self.stored) as usize;
        let take = room.min(data.len());
        self.file.write_all(&data[..take])?;
        self.stored += take as u64;
        if take < data.len() {
            let marker = format!(
                "\n[decap: the console log reached its cap of {} bytes; the rest is not kept]\n",
                self.cap
            );
            self.file.write_all(marker.as_bytes())?;
            self.stored += marker.len() as u64;
            self.truncated = true;
        }
        self.console.progress.send_replace(Progress {
            len: self.stored,
            closed: false,
        });
        Ok(())
    }
}

/// TERM the process group, wait the grace period, then KILL it.
async fn stop(child: &mut Proc, pgid: Pid, grace: Duration) -> Result<std::process::ExitStatus> {
    let _ = killpg(pgid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            Ok(child.wait().await?)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    shipper: &Shipper,
    id: &str,
    console: &Console,
    artifacts_dir: Option<&Path>,
    exit_code: i32,
    timed_out: bool,
    stopped: bool,
    mut notes: Vec<String>,
    streamer: Option<tokio::task::JoinHandle<()>>,
    phases: Vec<decap_core::preset::PhaseRecord>,
) -> Result<i32> {
    if let Some(s) = streamer {
        // The live stream ends once the reader has closed the console.
        if tokio::time::timeout(Duration::from_secs(15), s)
            .await
            .is_err()
        {
            notes.push("the live console stream did not finish in time".into());
        }
    }
    let (log, artifacts) = tokio::join!(shipper.put_log(id, &console.path), async {
        match artifacts_dir {
            None => Ok(()),
            Some(dir) => match pack::has_files(dir) {
                Ok(false) => Ok(()),
                Ok(true) => shipper.put_artifacts(id, dir).await,
                Err(e) => Err(anyhow::Error::new(e).context("reading the artifacts folder")),
            },
        }
    });
    if let Err(e) = log {
        notes.push(format!("uploading the console log failed: {e:#}"));
    }
    if let Err(e) = artifacts {
        notes.push(format!("uploading the artifacts failed: {e:#}"));
    }
    for n in &notes {
        note!("bctool: {n}");
    }
    let result = BuildResult {
        exit_code,
        timed_out,
        message: (!notes.is_empty()).then(|| notes.join("; ")),
        memory_limit_hit: memory_limit_hit(),
        phases,
        stopped,
    };
    if let Err(e) = shipper.record_result(id, &result).await {
        note!("bctool: recording the result failed: {e:#}");
    }
    Ok(exit_code)
}

/// Streams the console file to the server as it grows. A stream that
/// breaks (the server restarting or killed, the network) is taken up again
/// where the server's copy ends, for as long as the build runs and a
/// `budget` after; the whole log is uploaded at the end in any case.
async fn stream_console(client: Client, id: String, console: Arc<Console>, budget: Duration) {
    let not_running =
        |e: &ClientError| matches!(e, ClientError::Api { status, .. } if status.as_u16() == 409);
    let mut from = Some(0u64);
    let mut delay = RESUME_FIRST;
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = from.take() {
            let rx = console.progress.subscribe();
            let file = match std::fs::File::open(&console.path) {
                Ok(f) => f,
                Err(e) => {
                    note!("bctool: cannot read the console file: {e}");
                    return;
                }
            };
            let began = tokio::time::Instant::now();
            let body = reqwest::Body::wrap_stream(decap_tail::follow(file, at, rx));
            match client.stream_log(&id, at, body).await {
                Ok(()) => return,
                Err(e) if not_running(&e) => return, // cancelled, or ended
                Err(e) => note!("bctool: live console stream broke ({e}); resuming"),
            }
            if began.elapsed() > Duration::from_secs(5) {
                delay = RESUME_FIRST; // it had been streaming: a new break
            }
        }
        if console.progress.borrow().closed {
            let deadline = *give_up.get_or_insert_with(|| tokio::time::Instant::now() + budget);
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESUME_MAX);
        match client.log_received(&id).await {
            Ok(n) => from = Some(n),
            Err(e) if not_running(&e) => return,
            Err(_) => {} // still away: try again
        }
    }
}

/// The first wait before a broken console stream is taken up again; it
/// doubles up to [`RESUME_MAX`] while the server stays away.
const RESUME_FIRST: Duration = Duration::from_millis(50);
const RESUME_MAX: Duration = Duration::from_secs(1);
