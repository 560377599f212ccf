//! decapctl: the operator CLI. Tables for people, `--json` for scripts.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use decap_api_types::{BuildView, QueueOpen};
use decap_client::Client;
use futures::StreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

#[cfg(feature = "github")]
mod notify;

/// `notify-pr` without GitHub's API: refused, whatever its settings.
#[cfg(not(feature = "github"))]
mod notify {
    /// Any settings: this decapctl cannot act on them.
    #[derive(clap::Args, Debug)]
    pub struct NotifyArgs {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        _settings: Vec<std::ffi::OsString>,
    }

    /// Says why `notify-pr` cannot run.
    pub async fn notify_pr(_: NotifyArgs, _: bool, _: &decap_client::Client) -> anyhow::Result<()> {
        anyhow::bail!(
            "notify-pr comments on pull requests through GitHub's API, which this decapctl \
             was built without (the cargo feature `github`): build Decap with its default features"
        )
    }
}

/// decapctl's command line.
#[derive(Parser, Debug)]
#[command(
    name = "decapctl",
    version,
    about = "Operate a Decap server: builds, logs, artifacts, the queue, locks and secrets"
)]
pub struct Cli {
    /// The Decap server.
    #[arg(
        long,
        env = "DECAP_URL",
        global = true,
        default_value = "http://127.0.0.1:9090"
    )]
    server: String,
    /// The API token (needed for changes).
    #[arg(long, env = "DECAP_API_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build history and single builds.
    #[command(subcommand)]
    Builds(BuildsCmd),
    /// Build branches of a project now: `decapctl build acme/widgets main dev`.
    Build {
        /// team/project
        project: String,
        /// Branches or tags (`refs/tags/v1` or a short name).
        #[arg(required = true)]
        branches: Vec<String>,
    },
    /// Cancel a running or waiting build.
    Cancel {
        /// The build id.
        id: String,
    },
    /// Build the same ref and commit again.
    Rerun {
        /// The build id.
        id: String,
    },
    /// Pipeline runs: a project's runs, one run's stages, a rerun from a
    /// stage, Promote of a manual stage.
    #[command(subcommand)]
    Pipeline(PipelineCmd),
    /// The projects in the build scripts.
    Projects,
    /// Deferred builds.
    #[command(subcommand)]
    Deferred(DeferredCmd),
    /// Branch locks.
    #[command(subcommand)]
    Locks(LocksCmd),
    /// Open or close the queue for maintenance.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Change the server's log level (`info`, `debug`, or a filter such as `decap_server=debug,info`).
    Loglevel {
        /// The level or filter.
        level: String,
    },
    /// The server's version.
    Version,
    /// Print a shell completion script: `decapctl completion bash >
    /// /etc/bash_completion.d/decapctl` (or zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Comment a CI run's summary on the open pull request of its commit,
    /// with its detail files uploaded to S3 for a number of days.
    NotifyPr(Box<notify::NotifyArgs>),
    /// GitHub: `decapctl github subscribe owner/repo`.
    #[command(subcommand)]
    Github(GithubCmd),
    /// Builds' secrets: set one (its value from standard input), list the
    /// names, remove one. Values are never shown again.
    #[command(subcommand)]
    Secrets(SecretsCmd),
}

#[derive(Subcommand, Debug)]
enum PipelineCmd {
    /// A project's runs, newest first, a column per stage.
    Runs {
        /// team/project
        project: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run: every stage with its status and attempts.
    Show {
        /// The pipeline run id.
        id: String,
    },
    /// Run a stage again, and the stages after it.
    Rerun {
        /// The pipeline run id.
        id: String,
        /// The stage to start again from.
        stage: String,
    },
    /// Promote a manual stage that waits.
    Approve {
        /// The pipeline run id.
        id: String,
        /// The stage.
        stage: String,
    },
}

/// The help shown after `decapctl secrets --help`.
const SECRETS_HELP: &str = "\
A secret reaches the builds of its project (acme/widgets) as an environment
variable of its name, masked in their logs; builds of pull requests from
forks get none. With --team, the secret is the whole team's: every project
of the team gets it, and a project's own secret of the same name wins.

Examples:
  printf %s \"$NPM_TOKEN\" | decapctl secrets set acme/widgets NPM_TOKEN
  decapctl secrets set --team acme SLACK_WEBHOOK < webhook-url.txt
  decapctl secrets list acme/widgets
  decapctl secrets rm acme/widgets NPM_TOKEN";

#[derive(Subcommand, Debug)]
#[command(after_help = SECRETS_HELP)]
enum SecretsCmd {
    /// Set (create or replace) a secret. Its value is read from standard
    /// input, which must not be a terminal; one trailing newline is dropped,
    /// so `echo "$VALUE" | decapctl secrets set …` works.
    #[command(after_help = SECRETS_HELP)]
    Set {
        #[command(flatten)]
        scope: SecretScopeArgs,
        /// The secret's name: the variable builds see (letters, digits and
        /// `_`, not starting with a digit, nor with `DECAP_`).
        name: String,
    },
    /// The names of the secrets (never their values), one a line.
    #[command(after_help = SECRETS_HELP)]
    List {
        #[command(flatten)]
        scope: SecretScopeArgs,
    },
    /// Remove a secret.
    #[command(alias = "remove", after_help = SECRETS_HELP)]
    Rm {
        #[command(flatten)]
        scope: SecretScopeArgs,
        /// The secret's name.
        name: String,
    },
}

#[derive(Args, Debug)]
struct SecretScopeArgs {
    /// team/project; with --team, a team.
    #[arg(value_name = "TEAM/PROJECT")]
    scope: String,
    /// The secret is the whole team's (the argument names a team): every
    /// project of the team gets it; a project's own secret of the same name
    /// wins.
    #[arg(long)]
    team: bool,
}

impl SecretScopeArgs {
    fn parse(&self) -> Result<decap_client::SecretScope<'_>> {
        if self.team {
            if self.scope.contains('/') {
                bail!(
                    "--team takes a team, not {:?}; leave --team out for a project's secret",
                    self.scope
                );
            }
            decap_core::names::validate_name("team", &self.scope)?;
            return Ok(decap_client::SecretScope::Team(&self.scope));
        }
        if !self.scope.contains('/') {
            bail!(
                "{:?} is not team/project; for a secret of the whole team, pass --team {}",
                self.scope,
                self.scope
            );
        }
        let (team, project) = split_project(&self.scope)?;
        decap_core::ProjectKey::new(team, project)?;
        Ok(decap_client::SecretScope::Project(team, project))
    }
}

/// How a scope reads in messages.
fn scope_words(scope: decap_client::SecretScope<'_>) -> String {
    match scope {
        decap_client::SecretScope::Team(t) => format!("team {t}"),
        decap_client::SecretScope::Project(t, p) => format!("{t}/{p}"),
    }
}

/// A secret's value from standard input: all of it, less one trailing
/// newline; refused from a terminal, and when empty or too large.
fn read_secret_value(
    stdin: impl std::io::Read,
    is_terminal: bool,
) -> Result<decap_core::secrets::SecretValue> {
    use decap_core::secrets::{MAX_SECRET_VALUE_BYTES, SecretValue};
    use std::io::Read;
    if is_terminal {
        bail!(
            "the value is read from standard input, which is a terminal here: pipe it in \
             (printf %s \"$VALUE\" | decapctl secrets set …) or redirect a file (< value.txt)"
        );
    }
    let mut bytes = Vec::new();
    // A newline and a carriage return past the limit may still be dropped.
    stdin
        .take(MAX_SECRET_VALUE_BYTES as u64 + 3)
        .read_to_end(&mut bytes)
        .context("cannot read the value from standard input")?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        bail!("the value on standard input is empty: a secret needs a value");
    }
    if bytes.len() > MAX_SECRET_VALUE_BYTES {
        bail!("the value on standard input is larger than {MAX_SECRET_VALUE_BYTES} bytes");
    }
    Ok(SecretValue::from_bytes(bytes)?)
}

#[derive(Subcommand, Debug)]
enum GithubCmd {
    /// Register Decap's webhook on a repository (push, pull_request and
    /// create events, signed with Decap's secret); GitHub's ping then builds
    /// the default branch.
    Subscribe {
        /// owner/repo
        repository: String,
    },
}

#[derive(Subcommand, Debug)]
enum BuildsCmd {
    /// Builds of a project, newest first.
    List {
        /// team/project
        project: String,
        /// Only this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only these statuses (comma-separated).
        #[arg(long)]
        status: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue from a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One build.
    Show {
        /// The build id.
        id: String,
    },
    /// A build's console log.
    Logs {
        /// The build id.
        id: String,
        /// Keep streaming until the build ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// A build's artifacts: the tarball, one file, or the list of files.
    Artifacts(ArtifactsArgs),
}

#[derive(Args, Debug)]
struct ArtifactsArgs {
    /// The build id.
    id: String,
    /// One file out of the artifacts.
    path: Option<String>,
    /// List the files instead of downloading.
    #[arg(long)]
    list: bool,
    /// Where to write (default: `<id>-artifacts.tar.gz`, or the file's name; `-` for stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum DeferredCmd {
    /// Waiting builds, oldest first.
    List,
    /// Remove a waiting build (it ends cancelled).
    Remove {
        /// The build id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum LocksCmd {
    /// Held locks.
    List,
    /// Force-release a lock: `decapctl locks unlock acme/widgets/main`.
    Unlock {
        /// team/project/branch
        key: String,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// Whether the queue is open.
    Status,
    /// Let builds run again.
    Open,
    /// Defer every new build until opened.
    Close,
}

fn split_project(p: &str) -> Result<(&str, &str)> {
    p.split_once('/')
        .filter(|(t, p)| !t.is_empty() && !p.is_empty() && !p.contains('/'))
        .context(format!("{p:?} is not team/project"))
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A plain aligned table.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn time_of(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

fn duration(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn build_rows(builds: &[BuildView]) -> Vec<Vec<String>> {
    builds
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.branch.clone(),
                b.status.clone(),
                b.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                b.trigger.clone(),
                time_of(Some(b.queued_at)),
                duration(b.duration_ms),
            ]
        })
        .collect()
}

const BUILD_HEADERS: &[&str] = &[
    "id", "branch", "status", "exit", "trigger", "queued", "duration",
];

fn show_build(b: &BuildView) {
    let rows = [
        ("id", b.id.clone()),
        ("project", b.project_key.clone()),
        ("branch", b.branch.clone()),
        ("ref", b.git_ref.clone()),
        ("commit", b.commit.clone().unwrap_or_else(|| "-".into())),
        ("trigger", b.trigger.clone()),
        ("status", b.status.clone()),
        (
            "exit code",
            b.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("queued", time_of(Some(b.queued_at))),
        ("started", time_of(b.start_time)),
        ("ended", time_of(b.end_time)),
        ("duration", duration(b.duration_ms)),
        (
            "scripts commit",
            b.scripts_commit.clone().unwrap_or_else(|| "-".into()),
        ),
        ("executor", b.executor.clone().unwrap_or_else(|| "-".into())),
        ("sandbox", b.sandbox.clone().unwrap_or_else(|| "-".into())),
        ("message", b.message.clone().unwrap_or_else(|| "-".into())),
        ("url", b.url.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
}

/// How long `logs --follow` keeps trying to reach a server that went away
/// (a restart, an upgrade) before it gives up.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Follows a build's console to its end. When the stream breaks (the
/// server restarted or was upgraded) it resumes from the last byte shown:
/// nothing is shown twice and nothing is missed.
async fn follow_log(client: &Client, id: &str, out: &mut tokio::io::Stdout) -> Result<()> {
    let mut offset: u64 = 0;
    let mut broken_since: Option<std::time::Instant> = None;
    loop {
        let result = match client.log_from(id, true, offset).await {
            Err(e) => Err(e),
            Ok(stream) => {
                let mut stream = Box::pin(stream);
                let mut result = Ok(());
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => {
                            out.write_all(&c).await?;
                            out.flush().await?;
                            offset += c.len() as u64;
                            broken_since = None;
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
        };
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let broken = matches!(e, decap_client::ClientError::Protocol(_)) || e.is_transient();
        if !broken {
            return Err(e.into());
        }
        let since = *broken_since.get_or_insert_with(|| {
            eprintln!("decapctl: the log stream broke ({e}); resuming at byte {offset}");
            std::time::Instant::now()
        });
        if since.elapsed() > RECONNECT_FOR {
            return Err(anyhow::Error::new(e).context(format!(
                "the log stream stayed broken for {} s",
                RECONNECT_FOR.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn write_stream<S>(mut stream: S, output: &std::path::Path) -> Result<u64>
where
    S: futures::Stream<Item = decap_client::Result<bytes::Bytes>> + Unpin,
{
    let mut written = 0u64;
    if output == std::path::Path::new("-") {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        return Ok(written);
    }
    let tmp = output.with_extension("part");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
        };
        written += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    tokio::fs::rename(&tmp, output).await?;
    Ok(written)
}

/// Runs decapctl; returns the exit code.
pub async fn main(cli: Cli) -> Result<i32> {
    if let Command::Completion { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "decapctl", &mut script);
        // A reader that stops early (`| head`) is not an error.
        return match std::io::Write::write_all(&mut std::io::stdout(), &script) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(0),
        };
    }
    let client = Client::new(&cli.server, cli.token.clone())?;
    let json = cli.json;
    match cli.command {
        Command::Builds(BuildsCmd::List {
            project,
            branch,
            status,
            limit,
            cursor,
        }) => {
            let (team, project) = split_project(&project)?;
            let page = client
                .builds(
                    team,
                    project,
                    branch.as_deref(),
                    status.as_deref(),
                    limit,
                    cursor.as_deref(),
                )
                .await?;
            if json {
                print_json(&page)?;
            } else {
                table(BUILD_HEADERS, build_rows(&page.builds));
                if let Some(c) = page.next_cursor {
                    println!("\nmore: --cursor {c}");
                }
            }
        }
        Command::Builds(BuildsCmd::Show { id }) => {
            let b = client.build(&id).await?;
            if json {
                print_json(&b)?
            } else {
                show_build(&b)
            }
        }
        Command::Builds(BuildsCmd::Logs { id, follow }) => {
            let mut out = tokio::io::stdout();
            if !follow {
                let mut stream = Box::pin(client.log(&id, false).await?);
                while let Some(chunk) = stream.next().await {
                    out.write_all(&chunk?).await?;
                    out.flush().await?;
                }
            } else {
                follow_log(&client, &id, &mut out).await?;
            }
            if follow {
                let b = client.build(&id).await?;
                eprintln!("decapctl: build {} ended {}", b.id, b.status);
                return Ok(if b.status == "succeeded" { 0 } else { 1 });
            }
        }
        Command::Builds(BuildsCmd::Artifacts(a)) => {
            if a.list {
                let names = client.artifact_names(&a.id).await?;
                if json {
                    print_json(&names)?
                } else {
                    names.iter().for_each(|n| println!("{n}"))
                }
            } else if let Some(path) = a.path {
                let name = path.rsplit('/').next().unwrap_or("artifact").to_owned();
                let output = a.output.unwrap_or_else(|| PathBuf::from(name));
                let stream = Box::pin(client.artifact_file(&a.id, &path).await?);
                let n = write_stream(stream, &output).await?;
                if output != std::path::Path::new("-") {
                    eprintln!("decapctl: wrote {} ({n} bytes)", output.display());
                }
            } else {
                let output = a
                    .output
                    .unwrap_or_else(|| PathBuf::from(format!("{}-artifacts.tar.gz", a.id)));
                let stream = Box::pin(client.artifacts(&a.id).await?);
                let n = write_stream(stream, &output).await?;
                if output != std::path::Path::new("-") {
                    eprintln!("decapctl: wrote {} ({n} bytes)", output.display());
                }
            }
        }
        Command::Build { project, branches } => {
            let (team, project) = split_project(&project)?;
            let created = client.create_builds(team, project, &branches).await?;
            if json {
                print_json(&created)?
            } else {
                table(BUILD_HEADERS, build_rows(&created.builds))
            }
        }
        Command::Cancel { id } => {
            let b = client.cancel(&id).await?;
            if json {
                print_json(&b)?
            } else {
                println!("build {} is {}", b.id, b.status)
            }
        }
        Command::Rerun { id } => {
            let b = client.rerun(&id).await?;
            if json {
                print_json(&b)?
            } else {
                println!("build {} ({}) reruns {id}", b.id, b.status)
            }
        }
        Command::Pipeline(cmd) => match cmd {
            PipelineCmd::Rerun { ref id, ref stage }
            | PipelineCmd::Approve { ref id, ref stage } => {
                let approve = matches!(cmd, PipelineCmd::Approve { .. });
                let b = client.stage_action(id, stage, approve).await?;
                if json {
                    print_json(&b)?
                } else {
                    println!(
                        "stage {} of run {id}: attempt {} is build {} ({})",
                        b.stage, b.attempt, b.id, b.status
                    )
                }
            }
            PipelineCmd::Runs { project, limit } => {
                let (team, project) = split_project(&project)?;
                let page = client.pipeline_runs(team, project, limit, None).await?;
                if json {
                    print_json(&page)?
                } else {
                    let rows = page
                        .runs
                        .iter()
                        .map(|r| {
                            let stages: Vec<String> = r
                                .stages
                                .iter()
                                .map(|s| format!("{}:{}", s.name, s.status))
                                .collect();
                            vec![
                                r.id.clone(),
                                r.branch.clone(),
                                r.status.clone(),
                                stages.join(" "),
                            ]
                        })
                        .collect();
                    table(&["RUN", "BRANCH", "STATUS", "STAGES"], rows)
                }
            }
            PipelineCmd::Show { id } => {
                let r = client.pipeline_run(&id).await?;
                if json {
                    print_json(&r)?
                } else {
                    println!("run {} of {} {}: {}", r.id, r.project, r.branch, r.status);
                    let rows = r
                        .stages
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.status.clone(),
                                s.attempts.len().to_string(),
                                s.attempts.last().map(|b| b.id.clone()).unwrap_or_default(),
                            ]
                        })
                        .collect();
                    table(&["STAGE", "STATUS", "ATTEMPTS", "LATEST BUILD"], rows)
                }
            }
        },
        Command::Projects => {
            let p = client.projects().await?;
            if json {
                print_json(&p)?;
            } else {
                let rows = p
                    .projects
                    .iter()
                    .map(|p| {
                        vec![
                            format!("{}/{}", p.team, p.project),
                            p.descriptor
                                .as_ref()
                                .and_then(|d| d.managed_ref_regex.clone())
                                .unwrap_or_else(|| "(all)".into()),
                            p.error
                                .clone()
                                .map(|e| format!("ERROR: {e}"))
                                .unwrap_or_else(|| {
                                    p.descriptor
                                        .as_ref()
                                        .and_then(|d| d.repo_description.clone())
                                        .unwrap_or_default()
                                }),
                        ]
                    })
                    .collect();
                table(&["project", "managed refs", "description"], rows);
            }
        }
        Command::Deferred(DeferredCmd::List) => {
            let d = client.deferred().await?;
            if json {
                print_json(&d)?;
            } else {
                let rows = d
                    .deferred
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.clone(),
                            format!("{}/{}", e.team, e.project),
                            e.branch.clone(),
                            time_of(Some(e.deferred_at)),
                            e.reason.clone(),
                        ]
                    })
                    .collect();
                table(&["id", "project", "branch", "deferred", "reason"], rows);
            }
        }
        Command::Deferred(DeferredCmd::Remove { id }) => {
            client.remove_deferred(&id).await?;
            if !json {
                println!("removed {id}");
            }
        }
        Command::Locks(LocksCmd::List) => {
            let l = client.locks().await?;
            if json {
                print_json(&l)?;
            } else {
                let rows = l
                    .locks
                    .iter()
                    .map(|l| {
                        vec![
                            l.key.clone(),
                            l.build_id.clone(),
                            l.fencing_token.to_string(),
                            time_of(Some(l.acquired_at)),
                            time_of(Some(l.expires_at)),
                        ]
                    })
                    .collect();
                table(&["key", "build", "token", "acquired", "expires"], rows);
            }
        }
        Command::Locks(LocksCmd::Unlock { key }) => {
            if key.split('/').count() < 3 {
                bail!("{key:?} is not team/project/branch");
            }
            client.unlock(&key).await?;
            if !json {
                println!("unlocked {key}");
            }
        }
        Command::Queue(cmd) => {
            let state = match cmd {
                QueueCmd::Status => client.queue().await?,
                QueueCmd::Open => client.set_queue(QueueOpen::Open).await?,
                QueueCmd::Close => client.set_queue(QueueOpen::Closed).await?,
            };
            if json {
                print_json(&state)?;
            } else {
                println!(
                    "queue is {}",
                    if state.state == QueueOpen::Open {
                        "open"
                    } else {
                        "closed"
                    }
                );
            }
        }
        Command::Loglevel { level } => {
            let l = client.set_log_level(&level).await?;
            if json {
                print_json(&l)?
            } else {
                println!("log level: {}", l.level)
            }
        }
        Command::NotifyPr(args) => notify::notify_pr(*args, json, &client).await?,
        Command::Github(GithubCmd::Subscribe { repository }) => {
            let Some((owner, repo)) = repository.split_once('/') else {
                bail!("{repository:?} is not owner/repo");
            };
            if repo.contains('/') || owner.is_empty() || repo.is_empty() {
                bail!("{repository:?} is not owner/repo");
            }
            let answer = client.github_subscribe(owner, repo).await?;
            if json {
                print_json(&answer)?;
            } else {
                println!(
                    "{} {repository}: GitHub sends {} to {}",
                    if answer["created"] == true {
                        "subscribed"
                    } else {
                        "already subscribed, brought up to date:"
                    },
                    answer["events"]
                        .as_array()
                        .map(|e| e
                            .iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default(),
                    answer["url"].as_str().unwrap_or_default()
                );
            }
        }
        Command::Secrets(SecretsCmd::Set { scope, name }) => {
            let scope = scope.parse()?;
            let name = decap_core::secrets::SecretName::new(&name)?;
            use std::io::IsTerminal;
            let stdin = std::io::stdin();
            let is_terminal = stdin.is_terminal();
            let value = read_secret_value(stdin.lock(), is_terminal)?;
            client
                .set_secret(scope, name.as_str(), value.expose().to_owned())
                .await?;
            if !json {
                println!("secret {name} of {} set", scope_words(scope));
            }
        }
        Command::Secrets(SecretsCmd::List { scope }) => {
            let scope = scope.parse()?;
            let names = client.secret_names(scope).await?;
            if json {
                print_json(&names)?;
            } else if names.secrets.is_empty() {
                eprintln!("decapctl: {} has no secrets", scope_words(scope));
            } else {
                names.secrets.iter().for_each(|n| println!("{n}"));
            }
        }
        Command::Secrets(SecretsCmd::Rm { scope, name }) => {
            let scope = scope.parse()?;
            let name = decap_core::secrets::SecretName::new(&name)?;
            client.remove_secret(scope, name.as_str()).await?;
            if !json {
                println!("secret {name} of {} removed", scope_words(scope));
            }
        }
        Command::Completion { .. } => {}
        Command::Version => {
            let v = client.version().await?;
            if json {
                print_json(&v)?
            } else {
                println!("decap {} ({})", v.version, v.commit)
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scope(s: &str, team: bool) -> SecretScopeArgs {
        SecretScopeArgs {
            scope: s.into(),
            team,
        }
    }

    #[test]
    fn secret_scopes_are_a_project_or_with_team_a_team() {
        assert_eq!(
            scope("acme/widgets", false).parse().unwrap(),
            decap_client::SecretScope::Project("acme", "widgets")
        );
        assert_eq!(
            scope("acme", true).parse().unwrap(),
            decap_client::SecretScope::Team("acme")
        );
        let e = scope("acme", false).parse().unwrap_err().to_string();
        assert!(e.contains("--team acme"), "{e}");
        let e = scope("acme/widgets", true).parse().unwrap_err().to_string();
        assert!(e.contains("--team takes a team"), "{e}");
        assert!(scope("../x", true).parse().is_err());
        assert!(scope("acme/wid gets", false).parse().is_err());
    }

    #[test]
    fn a_value_is_read_whole_less_one_newline() {
        let read = |input: &[u8]| read_secret_value(input, false).map(|v| v.expose().to_owned());
        assert_eq!(read(b"s3cr3t\n").unwrap(), "s3cr3t");
        assert_eq!(read(b"s3cr3t\r\n").unwrap(), "s3cr3t");
        assert_eq!(read(b"s3cr3t").unwrap(), "s3cr3t");
        assert_eq!(
            read(b"two\nlines\n\n").unwrap(),
            "two\nlines\n",
            "one newline only"
        );
        assert_eq!(read(b" spaced ").unwrap(), " spaced ");
        assert!(read(b"").unwrap_err().to_string().contains("empty"));
        assert!(read(b"\n").unwrap_err().to_string().contains("empty"));
        let max = decap_core::secrets::MAX_SECRET_VALUE_BYTES;
        assert_eq!(read(&vec![b'x'; max]).unwrap().len(), max);
        let mut at_max = vec![b'x'; max];
        at_max.push(b'\n');
        assert_eq!(read(&at_max).unwrap().len(), max);
        assert!(
            read(&vec![b'x'; max + 1])
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
        assert!(
            read(&[0xff, 0xfe])
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        let e = read_secret_value(&b"x"[..], true).unwrap_err().to_string();
        assert!(e.contains("terminal"), "{e}");
    }
}
