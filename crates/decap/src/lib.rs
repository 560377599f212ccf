//! The `decap` binary's library: command-line parsing, validation into a
//! typed configuration, and the wiring of adapters into the server.

mod aws;
mod containers;
mod github;
mod handoff;
mod kube;
mod memory;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use decap_core::schedule::Caps;
use decap_embedded::{
    FileBlobStore, LocalExecutor, LocalExecutorConfig, NetworkMode, SandboxMode, SqliteBuildStore,
    SqliteDb, SqliteDeferralQueue, SqliteLockStore,
};
use decap_scripts::{FsScriptsRepo, ScriptsSource};
use decap_server::livelog::LiveLogs;
use decap_server::{
    AuthConfig, Controller, ControllerConfig, ExecutorEventsChannel, Ports, Server,
};
use secrecy::SecretString;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `decap`'s command line.
/// The version and the commit it was built from (`0.1.0 (1a2b3c4d5e6f)`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("DECAP_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "decap",
    version = VERSION,
    about = "Decap, a Kubernetes-native build orchestrator"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API, webhooks and UI, and run builds.
    Serve(Box<ServeArgs>),
    /// Create or delete the AWS resources Decap uses, or print its IAM policy.
    AwsResources(Box<AwsResourcesArgs>),
    /// The build-side tool, as builds call it: runs a build's script and
    /// ships its console, log, artifacts and result (`decap bctool --help`).
    #[command(disable_help_flag = true)]
    Bctool {
        /// bctool's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ResourcesAction {
    /// Create the buckets, tables and queue (what exists is kept).
    Create,
    /// Delete them, objects included (what is gone is skipped).
    Delete,
    /// Print the IAM policy of least privilege for them.
    Policy,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PolicyFor {
    /// The server: every bucket, table and queue it uses.
    Decap,
    /// bctool on its direct path: put objects, record results, free locks.
    Bctool,
}

/// `decap aws-resources`.
#[derive(Args, Debug)]
struct AwsResourcesArgs {
    /// What to do.
    #[arg(value_enum)]
    action: ResourcesAction,
    /// The SQS FIFO queue's name.
    #[arg(
        long,
        env = "DECAP_SQS_QUEUE_NAME",
        default_value = "decap-deferred-builds.fifo"
    )]
    sqs_queue_name: String,
    /// Console logs expire after this many days.
    #[arg(long, env = "DECAP_LOG_RETENTION_DAYS", default_value_t = 30)]
    log_retention_days: i32,
    /// The account id for the policy (default: asked of STS).
    #[arg(long, env = "DECAP_AWS_ACCOUNT_ID")]
    account_id: Option<String>,
    /// Whose policy to print.
    #[arg(long = "for", value_enum, default_value_t = PolicyFor::Decap)]
    policy_for: PolicyFor,
    /// Also create (delete) an IAM user holding Decap's policy.
    #[arg(long, env = "DECAP_IAM_USER")]
    iam_user: Option<String>,
    /// Also create (delete) an IAM role holding Decap's policy; its trust
    /// comes from --iam-trust-policy or --iam-oidc-provider.
    #[arg(long, env = "DECAP_IAM_ROLE")]
    iam_role: Option<String>,
    /// The role's trust policy: a JSON file saying who may assume it.
    #[arg(long, conflicts_with = "iam_oidc_provider")]
    iam_trust_policy: Option<PathBuf>,
    /// Or: trust this EKS cluster's OIDC issuer (IAM roles for service
    /// accounts), e.g. oidc.eks.eu-west-1.amazonaws.com/id/ABC…
    #[arg(long)]
    iam_oidc_provider: Option<String>,
    /// The service account (namespace/name) the issuer vouches for.
    #[arg(long, default_value = "decap-system/decap")]
    iam_service_account: String,
    /// Also create (delete) an IAM user holding bctool's policy.
    #[arg(long, env = "DECAP_IAM_BCTOOL_USER")]
    iam_bctool_user: Option<String>,
    /// An IAM endpoint instead of AWS.
    #[arg(long, env = "DECAP_IAM_ENDPOINT")]
    iam_endpoint: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ExecutorKind {
    /// Local processes in fresh workspaces (the embedded default).
    Local,
    /// One Kubernetes pod per build.
    Kubernetes,
    /// One container per build (its buildImage, its sidecars beside it),
    /// on Podman or Docker.
    Container,
}

/// The container executor's settings (`--executor container`).
#[derive(Args, Debug, Clone)]
struct ContainerArgs {
    /// The container engine's API socket (default: DOCKER_HOST or
    /// CONTAINER_HOST, then the rootless and rootful Podman sockets, then
    /// Docker's).
    #[arg(long, env = "DECAP_CONTAINER_SOCKET")]
    container_socket: Option<PathBuf>,
    /// The engine network builds join for outbound access.
    #[arg(long, env = "DECAP_CONTAINER_NETWORK", default_value = "bridge")]
    container_network: String,
    /// Keep the containers of a failed build this many seconds for a look
    /// (`podman logs`, `podman inspect`) before they are removed.
    #[arg(long, env = "DECAP_KEEP_FAILED_CONTAINERS_SECS", default_value_t = 0)]
    keep_failed_containers_secs: u64,
}

/// The Kubernetes executor's settings (`--executor kubernetes`).
#[derive(Args, Debug, Clone)]
struct KubeArgs {
    /// A kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the pod's service account).
    #[arg(long, env = "DECAP_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The namespace build pods run in.
    #[arg(long, env = "DECAP_KUBE_NAMESPACE", default_value = "decap")]
    kube_namespace: String,
    /// The image whose bctool is copied into each build pod (the Decap image).
    #[arg(long, env = "DECAP_KUBE_BCTOOL_IMAGE", default_value = "decap:latest")]
    kube_bctool_image: String,
    /// bctool's path inside that image.
    #[arg(
        long,
        env = "DECAP_KUBE_BCTOOL_PATH",
        default_value = "/usr/local/bin/bctool"
    )]
    kube_bctool_path: String,
    /// The service account of build pods (its token is not mounted).
    #[arg(
        long,
        env = "DECAP_KUBE_SERVICE_ACCOUNT",
        default_value = "decap-build"
    )]
    kube_service_account: String,
    /// The Secret mounted into build pods at /decap/credentials (when it exists).
    #[arg(
        long,
        env = "DECAP_KUBE_CREDENTIALS_SECRET",
        default_value = "decap-credentials"
    )]
    kube_credentials_secret: String,
    /// CPU a build requests when its project.json names none.
    #[arg(long, env = "DECAP_KUBE_DEFAULT_CPU", default_value = "500m")]
    kube_default_cpu: String,
    /// Memory a build requests (and is limited to) when its project.json names none.
    #[arg(long, env = "DECAP_KUBE_DEFAULT_MEMORY", default_value = "1Gi")]
    kube_default_memory: String,
    /// Seconds a finished build pod is kept (for `kubectl logs`) before it is deleted.
    #[arg(long, env = "DECAP_KUBE_FINISHED_POD_TTL_SECS", default_value_t = 300)]
    kube_finished_pod_ttl_secs: u64,
    /// The image pull policy of build pods (Always, IfNotPresent, Never).
    #[arg(long, env = "DECAP_KUBE_IMAGE_PULL_POLICY")]
    kube_image_pull_policy: Option<String>,
    /// Elect a leader among replicas with a Lease: only the leader launches builds.
    #[arg(long, env = "DECAP_LEADER_ELECTION")]
    leader_election: bool,
    /// The namespace of the leader-election Lease.
    #[arg(
        long,
        env = "DECAP_KUBE_LEASE_NAMESPACE",
        default_value = "decap-system"
    )]
    kube_lease_namespace: String,
    /// The leader-election Lease.
    #[arg(long, env = "DECAP_KUBE_LEASE_NAME", default_value = "decap-leader")]
    kube_lease_name: String,
    /// This replica's name in the election (the pod name; default: the host name).
    #[arg(long, env = "DECAP_KUBE_POD_NAME")]
    kube_pod_name: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Sandbox {
    /// The sandbox; Decap refuses to start when it cannot be made here.
    Auto,
    /// The same as auto.
    Bubblewrap,
    /// No sandbox: builds run as Decap's own user and see the host.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SandboxNetworkArg {
    /// Outbound connections through slirp4netns; no route to the host's
    /// loopback.
    Slirp4netns,
    /// Loopback only, for every build.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BlobBackend {
    /// Files under the data dir.
    Files,
    /// S3 (or an S3-compatible server).
    S3,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum QueueBackend {
    /// SQLite under the data dir.
    Sqlite,
    /// An SQS FIFO queue with a DynamoDB index.
    Sqs,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum TableBackend {
    /// SQLite under the data dir.
    Sqlite,
    /// DynamoDB.
    Dynamodb,
}

/// Where builds, locks, logs and artifacts are kept. The embedded default
/// needs no configuration; the AWS backends take the default credential
/// chain (environment, profile, web identity) and check at start-up that
/// their buckets and tables exist.
#[derive(Args, Debug)]
struct StorageArgs {
    /// Where console logs and artifacts go.
    #[arg(long, env = "DECAP_BLOB_STORE", value_enum, default_value_t = BlobBackend::Files)]
    blob_store: BlobBackend,
    /// Where build records and webhook deliveries go.
    #[arg(long, env = "DECAP_BUILD_STORE", value_enum, default_value_t = TableBackend::Sqlite)]
    build_store: TableBackend,
    /// Where branch locks go.
    #[arg(long, env = "DECAP_LOCK_STORE", value_enum, default_value_t = TableBackend::Sqlite)]
    lock_store: TableBackend,
    /// Where deferred builds wait.
    #[arg(long, env = "DECAP_DEFERRAL_QUEUE", value_enum, default_value_t = QueueBackend::Sqlite)]
    deferral_queue: QueueBackend,
    /// The SQS FIFO queue of deferred builds (its URL).
    #[arg(long, env = "DECAP_SQS_QUEUE_URL")]
    sqs_queue_url: Option<String>,
    /// An SQS endpoint instead of AWS (ElasticMQ).
    #[arg(long, env = "DECAP_SQS_ENDPOINT")]
    sqs_endpoint: Option<String>,
    /// The DynamoDB table indexing deferred builds (SQS cannot list).
    #[arg(
        long,
        env = "DECAP_DYNAMODB_DEFERRED_TABLE",
        default_value = "decap-deferred-builds"
    )]
    dynamodb_deferred_table: String,
    /// The DynamoDB table of what Decap told GitHub (used with
    /// `--build-store dynamodb`, so that replicas share it).
    #[arg(
        long,
        env = "DECAP_DYNAMODB_LEDGER_TABLE",
        default_value = "decap-status-ledger"
    )]
    dynamodb_ledger_table: String,
    /// The DynamoDB table of the CI status hub's records (used with
    /// `--build-store dynamodb`, so that replicas share them).
    #[arg(
        long,
        env = "DECAP_DYNAMODB_HUB_TABLE",
        default_value = "decap-status-hub"
    )]
    dynamodb_hub_table: String,
    /// The DynamoDB table of the web UI's login sessions (used with
    /// `--build-store dynamodb`, so that every replica knows every login).
    #[arg(
        long,
        env = "DECAP_DYNAMODB_SESSIONS_TABLE",
        default_value = "decap-sessions"
    )]
    dynamodb_sessions_table: String,
    /// The AWS region (default: the SDK's, from AWS_REGION or the profile).
    #[arg(long, env = "DECAP_AWS_REGION")]
    aws_region: Option<String>,
    /// The S3 bucket of console logs.
    #[arg(
        long,
        env = "DECAP_S3_LOGS_BUCKET",
        default_value = "decap-console-logs"
    )]
    s3_logs_bucket: String,
    /// The S3 bucket of artifacts.
    #[arg(
        long,
        env = "DECAP_S3_ARTIFACTS_BUCKET",
        default_value = "decap-build-artifacts"
    )]
    s3_artifacts_bucket: String,
    /// A prefix for every S3 key.
    #[arg(long, env = "DECAP_S3_PREFIX", default_value = "")]
    s3_prefix: String,
    /// An S3-compatible endpoint instead of AWS.
    #[arg(long, env = "DECAP_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Address S3 buckets by path (local S3 servers need it).
    #[arg(long, env = "DECAP_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// A DynamoDB endpoint instead of AWS (DynamoDB Local).
    #[arg(long, env = "DECAP_DYNAMODB_ENDPOINT")]
    dynamodb_endpoint: Option<String>,
    /// The table of build records.
    #[arg(
        long,
        env = "DECAP_DYNAMODB_BUILDS_TABLE",
        default_value = "decap-build-metadata"
    )]
    dynamodb_builds_table: String,
    /// The table of webhook deliveries.
    #[arg(
        long,
        env = "DECAP_DYNAMODB_DELIVERIES_TABLE",
        default_value = "decap-webhook-deliveries"
    )]
    dynamodb_deliveries_table: String,
    /// The table of branch locks.
    #[arg(
        long,
        env = "DECAP_DYNAMODB_LOCKS_TABLE",
        default_value = "decap-locks"
    )]
    dynamodb_locks_table: String,
    /// bctool ships logs, artifacts and results straight to S3 and DynamoDB
    /// instead of through the server (needs the S3 blob store and the
    /// DynamoDB build and lock stores). Without the two credentials below,
    /// bctool takes the default chain of its environment.
    #[arg(long, env = "DECAP_BCTOOL_DIRECT")]
    bctool_direct: bool,
    /// The access key id bctool uses on its direct path (least privilege:
    /// `decap aws-resources policy --for bctool`).
    #[arg(long, env = "DECAP_BCTOOL_AWS_ACCESS_KEY_ID")]
    bctool_aws_access_key_id: Option<String>,
    /// Its secret key.
    #[arg(
        long,
        env = "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    bctool_aws_secret_access_key: Option<String>,
}

impl StorageArgs {
    fn uses_aws(&self) -> bool {
        self.blob_store == BlobBackend::S3
            || self.build_store == TableBackend::Dynamodb
            || self.lock_store == TableBackend::Dynamodb
            || self.deferral_queue == QueueBackend::Sqs
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Plain,
    Json,
}

/// `SERVICE=IMAGE` of `--service-image`.
fn parse_service_image(v: &str) -> Result<(String, String), String> {
    let (name, image) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?}: expected SERVICE=IMAGE"))?;
    let service = decap_core::preset::Service::named(name.trim()).ok_or_else(|| {
        let known: Vec<&str> = decap_core::preset::SERVICES
            .iter()
            .map(|s| s.name)
            .collect();
        format!("unknown service {name:?} (known: {})", known.join(", "))
    })?;
    let image = image.trim();
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Err(format!("{v:?}: the image must be one word"));
    }
    Ok((service.name.to_owned(), image.to_owned()))
}

/// `LANGUAGE=IMAGE` of `--preset-image`.
fn parse_preset_image(v: &str) -> Result<(decap_core::preset::Language, String), String> {
    let (lang, image) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?}: expected LANGUAGE=IMAGE"))?;
    let language = decap_core::preset::Language::from_name(lang.trim()).ok_or_else(|| {
        let known: Vec<&str> = decap_core::preset::Language::ALL
            .iter()
            .map(|l| l.name())
            .collect();
        format!("unknown language {lang:?} (known: {})", known.join(", "))
    })?;
    let image = image.trim();
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Err(format!("{v:?}: the image must be one word"));
    }
    Ok((language, image.to_owned()))
}

/// `decap serve`.
#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "DECAP_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Where Decap keeps its database, logs, artifacts and workspaces.
    #[arg(long, env = "DECAP_DATA_DIR", default_value = "./.decap")]
    data_dir: PathBuf,
    /// The key that seals builds' secrets in the database (made on first
    /// start, mode 0600; not used with --executor kubernetes, where secrets
    /// are Kubernetes Secrets). Keep it out of the data dir and back it up
    /// apart from it: the database alone reveals no secret, and without the
    /// key the secrets are lost. Default: $XDG_CONFIG_HOME/decap/secrets.key,
    /// else ~/.config/decap/secrets.key.
    #[arg(long, env = "DECAP_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// The build-scripts repo: a folder or a git URL (default: the checkout's examples/build-scripts).
    #[arg(long, env = "DECAP_SCRIPTS")]
    scripts: Option<String>,
    /// The branch of a git build-scripts repo.
    #[arg(long, env = "DECAP_SCRIPTS_BRANCH", default_value = "main")]
    scripts_branch: String,
    /// How often the build scripts are read again, besides POST /hooks/buildscripts.
    #[arg(long, env = "DECAP_SCRIPTS_REFRESH_SECS", default_value_t = 300)]
    scripts_refresh_secs: u64,
    /// The URL people reach this server at (for links); default http://LISTEN.
    #[arg(long, env = "DECAP_PUBLIC_URL")]
    public_url: Option<String>,
    /// Let this machine's own browser and CLI make changes without the API
    /// token: a loopback client asking for a loopback Host (localhost,
    /// 127.x.y.z, [::1]), from no other site's Origin.
    #[arg(long, env = "DECAP_INSECURE_LOCAL")]
    insecure_local: bool,
    /// Reading needs the API token too: the web UI asks to log in, the API's
    /// reads need the bearer token (health and metrics stay open).
    #[arg(long, env = "DECAP_PRIVATE")]
    private: bool,
    /// Builds running at once.
    #[arg(long, env = "DECAP_MAX_BUILDS", default_value_t = 8)]
    max_builds: usize,
    /// Builds of one project running at once.
    #[arg(long, env = "DECAP_MAX_BUILDS_PER_PROJECT", default_value_t = 4)]
    max_builds_per_project: usize,
    /// Where builds run: local processes or Kubernetes pods.
    #[arg(long, env = "DECAP_EXECUTOR", value_enum, default_value_t = ExecutorKind::Local)]
    executor: ExecutorKind,
    /// How builds reach this server (`DECAP_URL` inside builds; default
    /// http://LISTEN). With Kubernetes, the Service's URL.
    #[arg(long, env = "DECAP_BUILDS_URL")]
    builds_url: Option<String>,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    container: ContainerArgs,
    /// The build sandbox (bubblewrap, a user namespace, slirp4netns, cgroup
    /// limits): auto or bubblewrap (Decap refuses to start when it cannot be
    /// made), or none (builds run as Decap's user and see the host; every
    /// page says so).
    #[arg(long, env = "DECAP_SANDBOX", value_enum, default_value_t = Sandbox::Auto)]
    sandbox: Sandbox,
    /// The network of sandboxed builds.
    #[arg(long, env = "DECAP_SANDBOX_NETWORK", value_enum, default_value_t = SandboxNetworkArg::Slirp4netns)]
    sandbox_network: SandboxNetworkArg,
    /// As root, sandboxed build n runs as user id BASE + n (an unused range).
    #[arg(long, env = "DECAP_SANDBOX_UID_BASE", default_value_t = 1_900_000_000)]
    sandbox_uid_base: u32,
    /// A build's memory when project.json's resources.memory does not say.
    #[arg(long, env = "DECAP_BUILD_MEMORY", default_value = "2Gi")]
    build_memory: String,
    /// A build's CPU when resources.cpu does not say (none: unlimited).
    #[arg(long, env = "DECAP_BUILD_CPU")]
    build_cpu: Option<String>,
    /// A build's processes at once when resources.pids does not say.
    #[arg(long, env = "DECAP_BUILD_PIDS", default_value_t = 1024)]
    build_pids: u64,
    /// A build's workspace size when resources.disk does not say.
    #[arg(long, env = "DECAP_BUILD_DISK", default_value = "10Gi")]
    build_disk: String,
    /// The bctool binary (default: this binary's own `bctool` subcommand).
    #[arg(long, env = "DECAP_BCTOOL")]
    bctool: Option<PathBuf>,
    /// What waits in warm environments for a build, then becomes bctool:
    /// a `decap-runner` binary, or `none` for a whole `bctool standby`
    /// (default: the `decap-runner` beside this binary, when there is one).
    #[arg(long, env = "DECAP_RUNNER")]
    runner: Option<PathBuf>,
    /// Connections served at once (capped at half the open-file limit,
    /// which Decap raises to its maximum at start).
    #[arg(long, env = "DECAP_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Warm bctools kept ready (each in a fresh workspace and sandbox), so
    /// builds start without waiting for bctool or the sandbox; 0 disables.
    #[arg(long, env = "DECAP_WARM_STANDBYS", default_value_t = 2)]
    warm_standbys: usize,
    /// Seconds a stopped build gets between TERM and KILL.
    #[arg(long, env = "DECAP_KILL_GRACE_SECS", default_value_t = 10)]
    kill_grace_secs: u64,
    /// How long bctool keeps trying to reach a server that is away (a
    /// restart, an upgrade, a crash) to ship a build's console, log,
    /// artifacts and result, before it gives up on them.
    #[arg(long, env = "DECAP_BCTOOL_RETRY_SECS", default_value_t = 300)]
    bctool_retry_secs: u64,
    /// The build image of a language's preset, in place of Decap's own
    /// (`python=registry.example.com/python:3.12`); repeat for each language.
    /// A project's `buildImage` still wins.
    #[arg(long = "preset-image", env = "DECAP_PRESET_IMAGES", value_delimiter = ',', value_parser = parse_preset_image, value_name = "LANGUAGE=IMAGE")]
    preset_images: Vec<(decap_core::preset::Language, String)>,
    /// The image of a service a preset project names in its `.decap.json`
    /// (`postgresql=registry.example.com/postgres:16`), in place of Decap's
    /// own; repeat for each service.
    #[arg(long = "service-image", env = "DECAP_SERVICE_IMAGES", value_delimiter = ',', value_parser = parse_service_image, value_name = "SERVICE=IMAGE")]
    service_images: Vec<(String, String)>,
    /// Stop running local builds when `decap serve` stops (not in an
    /// upgrade in place). By default they run on, and the next `decap
    /// serve` on the same data dir adopts them and records how they end.
    #[arg(long, env = "DECAP_STOP_BUILDS_ON_EXIT")]
    stop_builds_on_exit: bool,
    /// Console logs are kept up to this many bytes.
    #[arg(long, env = "DECAP_MAX_LOG_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_log_bytes: u64,
    /// A build's artifacts may hold this much, decompressed (uploads past it
    /// are refused with 413).
    #[arg(long, env = "DECAP_MAX_ARTIFACTS_BYTES", default_value = "8Gi")]
    max_artifacts_bytes: String,
    /// Log filter (`info`, `decap_server=debug,info`); changeable at run time.
    #[arg(long, env = "DECAP_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "DECAP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// The GitHub webhook secret.
    #[arg(long, env = "DECAP_GITHUB_WEBHOOK_SECRET", hide_env_values = true)]
    github_webhook_secret: Option<String>,
    /// A previous webhook secret, still accepted while GitHub is switched over.
    #[arg(
        long,
        env = "DECAP_GITHUB_WEBHOOK_SECRET_PREVIOUS",
        hide_env_values = true
    )]
    github_webhook_secret_previous: Option<String>,
    /// The API token for changes.
    #[arg(long, env = "DECAP_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// A GitHub token that may write commit statuses; without it, none are
    /// reported.
    #[arg(long, env = "DECAP_GITHUB_TOKEN", hide_env_values = true)]
    github_token: Option<String>,
    /// Act as a GitHub App instead of with a token: its id (with
    /// --github-app-key-file and --github-app-installation-id).
    #[arg(long, env = "DECAP_GITHUB_APP_ID", requires_all = ["github_app_key_file", "github_app_installation_id"])]
    github_app_id: Option<u64>,
    /// The GitHub App's private key (PEM).
    #[arg(long, env = "DECAP_GITHUB_APP_KEY_FILE")]
    github_app_key_file: Option<PathBuf>,
    /// The App's installation on the account owning the repositories.
    #[arg(long, env = "DECAP_GITHUB_APP_INSTALLATION_ID")]
    github_app_installation_id: Option<u64>,
    /// Log in to the web UI with GitHub: the OAuth App's client id (its
    /// callback URL is PUBLIC_URL/login/github/callback).
    #[arg(
        long,
        env = "DECAP_GITHUB_OAUTH_CLIENT_ID",
        requires = "github_oauth_client_secret"
    )]
    github_oauth_client_id: Option<String>,
    /// The OAuth App's client secret.
    #[arg(long, env = "DECAP_GITHUB_OAUTH_CLIENT_SECRET", hide_env_values = true)]
    github_oauth_client_secret: Option<String>,
    /// GitHub's web address (GitHub Enterprise: https://HOST).
    #[arg(
        long,
        env = "DECAP_GITHUB_WEB_URL",
        default_value = "https://github.com"
    )]
    github_web_url: String,
    /// GitHub logins that may build, rerun and cancel (comma-separated).
    #[arg(long, env = "DECAP_GITHUB_BUILDERS", value_delimiter = ',')]
    github_builders: Vec<String>,
    /// GitHub logins that may also unlock and run the queue.
    #[arg(long, env = "DECAP_GITHUB_UNLOCKERS", value_delimiter = ',')]
    github_unlockers: Vec<String>,
    /// GitHub's API (GitHub Enterprise: https://HOST/api/v3).
    #[arg(
        long,
        env = "DECAP_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    github_api_url: String,
    /// The CI status hub: minutes after which a build of another CI server
    /// still reported `building` shows as `pending` again.
    #[arg(long, env = "DECAP_HUB_BUILDING_TIMEOUT_MINS", default_value_t = 60)]
    hub_building_timeout_mins: u64,
    /// URLs each project's state in the CI status hub is posted to after
    /// every change (repeatable; comma-separated in the variable).
    #[arg(long, env = "DECAP_HUB_WEBHOOKS", value_delimiter = ',')]
    hub_webhook: Vec<String>,
    #[command(flatten)]
    storage: StorageArgs,
}

/// Runs the command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            // Before any thread starts: reading LISTEN_FDS clears it.
            let inherited = handoff::Inherited::take()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(64)
                .enable_all()
                .build()?;
            runtime.block_on(serve(*args, inherited))
        }
        Command::Bctool { args } => {
            // `main` hands `decap bctool …` to bctool before parsing; this
            // is the same for a caller of `run`.
            let mut argv = vec![std::ffi::OsString::from("bctool")];
            argv.extend(args);
            std::process::exit(run_bctool(argv));
        }
        Command::AwsResources(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(aws::resources(*args))
        }
    }
}

/// Finds `examples/build-scripts` above the working directory or the binary.
fn default_scripts() -> Option<PathBuf> {
    let mut starts = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join("examples/build-scripts");
            if candidate.is_dir() {
                return Some(candidate);
            }
        }
    }
    None
}

fn secret(s: Option<String>) -> Option<SecretString> {
    s.filter(|s| !s.is_empty()).map(SecretString::from)
}

/// Colour in the log only on a terminal, and not when `NO_COLOR` is set
/// (<https://no-color.org>): files and CI logs get plain text.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn install_tracing(level: &str, format: LogFormat) -> Result<decap_server::LogLevelSetter> {
    let filter =
        EnvFilter::try_new(level).with_context(|| format!("invalid log level {level:?}"))?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()?;
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour())
                    .with_writer(std::io::stderr),
            )
            .try_init()?;
    }
    Ok(Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

/// How builds run bctool: `--bctool PATH`, or this very binary, which
/// carries bctool as its hidden `bctool` subcommand (so the two never skew).
fn bctool_command(arg: Option<PathBuf>) -> Result<Vec<std::ffi::OsString>> {
    if let Some(p) = arg {
        return Ok(vec![p.into_os_string()]);
    }
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    Ok(vec![exe.into_os_string(), "bctool".into()])
}

/// What waits in warm environments: `--runner PATH` (`none`: no runner),
/// or the `decap-runner` installed beside this binary (cargo builds and
/// installs the two together).
fn runner_command(arg: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match arg {
        Some(p) if p.as_os_str() == "none" => Ok(None),
        Some(p) => Ok(Some(p)),
        None => {
            let exe = std::env::current_exe().context("cannot find this binary's path")?;
            let beside = exe.with_file_name("decap-runner");
            if beside.is_file() {
                Ok(Some(beside))
            } else {
                tracing::info!(
                    looked = %beside.display(),
                    "no decap-runner beside decap: warm environments hold a whole bctool"
                );
                Ok(None)
            }
        }
    }
}

/// Runs bctool from inside the `decap` binary (`decap bctool run -- …`);
/// returns the exit code.
pub fn run_bctool(args: Vec<std::ffi::OsString>) -> i32 {
    use clap::Parser;
    let cli = match decap_bctool::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bctool: cannot start: {e}");
            return 70;
        }
    };
    match runtime.block_on(decap_bctool::main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bctool: {e:#}");
            70
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Where the embedded secret store's key is: `--secrets-key-file`, else the
/// user's configuration folder; never in the data dir by default, so that a
/// copy of the database alone reveals no secret.
fn secrets_key_file(args: &ServeArgs) -> Result<PathBuf> {
    if let Some(path) = &args.secrets_key_file {
        return absolute(path);
    }
    let folder = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let config = folder("XDG_CONFIG_HOME")
        .or_else(|| folder("HOME").map(|home| home.join(".config")))
        .context(
            "cannot tell where to keep the key that seals builds' secrets: neither \
             XDG_CONFIG_HOME nor HOME names a folder; pass --secrets-key-file \
             (DECAP_SECRETS_KEY_FILE), outside the data dir",
        )?;
    Ok(config.join("decap").join("secrets.key"))
}

/// The builds' secret store: Kubernetes Secrets in the build namespace with
/// the Kubernetes executor, else SQLite sealed with the key file. Answers
/// the key file's folder too, which builds must not see.
async fn secret_store(
    args: &ServeArgs,
    data_dir: &Path,
    db: &SqliteDb,
    kube: Option<&kube::Kube>,
) -> Result<(Arc<dyn decap_core::ports::SecretStore>, Option<PathBuf>)> {
    if let Some(kube) = kube {
        let namespace = &args.kube.kube_namespace;
        let store = kube.secret_store(namespace).await?;
        tracing::info!(%namespace, "builds' secrets are Kubernetes Secrets in the build namespace");
        return Ok((store, None));
    }
    let path = secrets_key_file(args)?;
    if path.starts_with(data_dir) {
        tracing::warn!(
            key = %path.display(),
            data_dir = %data_dir.display(),
            "the key sealing builds' secrets is inside the data dir: a copy of the data dir reveals them; keep it apart with --secrets-key-file"
        );
    }
    let key = decap_embedded::SecretKey::load_or_create(&path)
        .context("the key sealing builds' secrets (--secrets-key-file)")?;
    let store = decap_embedded::SqliteSecretStore::open(db.clone(), key)
        .await
        .context("builds' secrets")?;
    tracing::info!(key = %path.display(), "builds' secrets are sealed with this key: back it up apart from the data dir");
    Ok((Arc::new(store), path.parent().map(Path::to_owned)))
}

/// The executor's checks of each project as the scripts are read.
fn project_check(kind: ExecutorKind) -> Option<decap_scripts::ProjectCheck> {
    match kind {
        ExecutorKind::Kubernetes | ExecutorKind::Container => kube::sidecar_check(),
        ExecutorKind::Local => None,
    }
}

/// Logging in with GitHub, when an OAuth App is configured.
fn oauth_config(args: &ServeArgs) -> Option<decap_server::oauth::OAuthConfig> {
    let id = args.github_oauth_client_id.clone()?;
    let secret = args.github_oauth_client_secret.clone()?;
    let logins = |v: &[String]| {
        v.iter()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !l.is_empty())
            .collect()
    };
    Some(decap_server::oauth::OAuthConfig {
        client_id: id,
        client_secret: secret,
        web_url: args.github_web_url.clone(),
        api_url: args.github_api_url.clone(),
        builders: logins(&args.github_builders),
        unlockers: logins(&args.github_unlockers),
    })
}

/// A replica's name in the leader election when no pod name is given.
fn host_identity() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("decap-{}", std::process::id()))
}

/// The limits builds get when `project.json` does not say.
fn default_limits(args: &ServeArgs) -> Result<decap_core::limits::DefaultLimits> {
    use decap_core::limits::{parse_bytes, parse_cpu_millis};
    Ok(decap_core::limits::DefaultLimits {
        memory_bytes: Some(parse_bytes("--build-memory", &args.build_memory)?),
        cpu_millis: args
            .build_cpu
            .as_deref()
            .map(|q| parse_cpu_millis("--build-cpu", q))
            .transpose()?,
        pids: Some(args.build_pids.max(1)),
        disk_bytes: Some(parse_bytes("--build-disk", &args.build_disk)?),
    })
}

async fn local_executor(
    args: &ServeArgs,
    data_dir: &Path,
    dir: decap_embedded::sandbox::SandboxDir,
    url_port: u16,
    events: Arc<ExecutorEventsChannel>,
) -> Result<LocalExecutor> {
    let executor = LocalExecutor::new(
        LocalExecutorConfig {
            dir,
            hide: std::iter::once(data_dir.to_owned())
                .chain(secrets_key_file(args)?.parent().map(Path::to_owned))
                .collect(),
            bctool: bctool_command(args.bctool.clone())?,
            // On bctool's direct path the launch carries AWS credentials:
            // a whole bctool waits then, and has read them before the
            // build's script starts (the runner hands the launch on after).
            runner: if args.storage.bctool_direct {
                None
            } else {
                runner_command(args.runner.clone())?
            },
            sandbox: match args.sandbox {
                Sandbox::Auto | Sandbox::Bubblewrap => SandboxMode::Bubblewrap,
                Sandbox::None => SandboxMode::None,
            },
            network: match args.sandbox_network {
                SandboxNetworkArg::Slirp4netns => NetworkMode::Slirp4netns,
                SandboxNetworkArg::None => NetworkMode::None,
            },
            uid_base: args.sandbox_uid_base,
            url_port,
            kill_grace: Duration::from_secs(args.kill_grace_secs.max(1)),
            path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            warm: args.warm_standbys,
            defaults: default_limits(args)?,
        },
        events,
    )
    .await?;
    tracing::info!(sandbox = %executor.describe(), "local executor ready");
    Ok(executor)
}

/// The socket sandboxed builds reach the server through (the sandbox dir
/// is reachable by build users, so they get it bound in; any user may
/// connect to it, and what arrives there is never taken for a local client).
fn build_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Lets the process hold as many descriptors as the system allows: every
/// connection is one.
fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Refuses, before anything is touched, what this build of `decap` left
/// out (its cargo features): each backend asked for must be in it.
fn built_in(args: &ServeArgs) -> Result<()> {
    let st = &args.storage;
    if args.executor == ExecutorKind::Kubernetes && !cfg!(feature = "kubernetes") {
        bail!("--executor kubernetes: {}", kube::LEFT_OUT);
    }
    if args.executor == ExecutorKind::Container && !cfg!(feature = "containers") {
        bail!("--executor container: {}", containers::LEFT_OUT);
    }
    if (st.uses_aws() || st.bctool_direct) && !cfg!(feature = "aws") {
        bail!("{}", aws::LEFT_OUT);
    }
    if github::configured(args) && !cfg!(feature = "github") {
        bail!("DECAP_GITHUB_TOKEN or a GitHub App: {}", github::LEFT_OUT);
    }
    Ok(())
}

/// Leader election is for more than one replica, and replicas share
/// nothing kept in their own data dirs: a build a follower accepted would
/// wait there forever, and results would reach a replica that never
/// launched the build. Refused before anything is touched unless builds,
/// locks, the queue and the blobs are in the shared stores.
fn shared_stores_for_replicas(args: &ServeArgs) -> Result<()> {
    if !args.kube.leader_election {
        return Ok(());
    }
    let st = &args.storage;
    let mut local = Vec::new();
    if st.build_store != TableBackend::Dynamodb {
        local.push("--build-store dynamodb");
    }
    if st.lock_store != TableBackend::Dynamodb {
        local.push("--lock-store dynamodb");
    }
    if st.deferral_queue != QueueBackend::Sqs {
        local.push("--deferral-queue sqs");
    }
    if st.blob_store != BlobBackend::S3 {
        local.push("--blob-store s3");
    }
    if local.is_empty() {
        return Ok(());
    }
    bail!(
        "--leader-election (DECAP_LEADER_ELECTION) is for more than one replica, and replicas cannot share the embedded stores in their own data dirs: set {} (DECAP_BUILD_STORE, DECAP_LOCK_STORE, DECAP_DEFERRAL_QUEUE, DECAP_BLOB_STORE; `decap aws-resources create` makes them), or run one replica without leader election",
        local.join(", ")
    )
}

async fn serve(args: ServeArgs, inherited: handoff::Inherited) -> Result<()> {
    memory::limit_arenas();
    let set_level = install_tracing(&args.log_level, args.log_format)?;
    built_in(&args)?;
    memory::keep_trimmed();
    // At once: a signal that comes before its handler would end the process.
    let signals = Signals::install()?;
    if args.max_builds == 0 || args.max_builds_per_project == 0 {
        bail!("--max-builds and --max-builds-per-project must be at least 1");
    }
    shared_stores_for_replicas(&args)?;
    let data_dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let scripts_spec = match args.scripts.clone() {
        Some(s) => s,
        None => default_scripts()
            .context("no build scripts: pass --scripts PATH_OR_GIT_URL (or run from a Decap checkout, which ships examples/build-scripts)")?
            .to_string_lossy()
            .into_owned(),
    };
    let source = ScriptsSource::parse(&scripts_spec, &args.scripts_branch, &data_dir)?;
    let scripts = Arc::new(
        FsScriptsRepo::open_checked(source, project_check(args.executor))
            .await
            .context("cannot read the build scripts")?,
    );

    let upgrade = handoff::Upgrade::capture(&data_dir)?;
    if let Some(predecessor) = &inherited.predecessor {
        // An upgrade in place: the old process stops now; its data dir,
        // locks and builds are free once it has exited. Connections wait
        // in the socket's backlog meanwhile.
        handoff::take_over(predecessor).await?;
    }

    let open_files = raise_open_files();
    let listener = match inherited.listener {
        Some(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = %l.local_addr()?, "serving the listening socket passed in LISTEN_FDS (--listen is not used)");
            l
        }
        None => tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?,
    };
    let listen_fd = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .context("cannot keep the listening socket for an upgrade")?;
    let local = listener.local_addr()?;
    let sandbox_dir = decap_embedded::sandbox::SandboxDir::for_data_dir(&data_dir)
        .context("the sandbox folder")?;
    let socket_path = sandbox_dir.socket();
    if matches!(args.executor, ExecutorKind::Local | ExecutorKind::Container) {
        // One server per data dir: refuse before touching its socket.
        drop(sandbox_dir.lock().context("the data dir")?);
    }
    let build_listener = build_socket(&socket_path)?;
    let socket_inode = inode(&socket_path);
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let decap_url = args
        .builds_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));

    let db = SqliteDb::open(&data_dir.join("decap.db"))?;
    let (events, exits) = ExecutorEventsChannel::new();
    let kube = match args.executor {
        ExecutorKind::Kubernetes => Some(kube::Kube::connect(&args).await?),
        ExecutorKind::Local | ExecutorKind::Container => None,
    };
    // Builds' secrets; the key's folder is hidden from sandboxed builds
    // (`local_executor` adds it to the sandbox's hidden folders).
    let (secrets, secrets_key_dir) = secret_store(&args, &data_dir, &db, kube.as_ref()).await?;
    if let Some(dir) = &secrets_key_dir {
        tracing::debug!(folder = %dir.display(), "the secrets key's folder is hidden from builds");
    }
    let mut local_builds: Option<Arc<LocalExecutor>> = None;
    let executor: Arc<dyn decap_core::ports::Executor> = match &kube {
        Some(kube) => kube.executor(&args, events).await?,
        None if matches!(args.executor, ExecutorKind::Container) => {
            containers::executor(&args, &data_dir, &socket_path, events).await?
        }
        None => {
            let local = Arc::new(
                local_executor(&args, &data_dir, sandbox_dir.clone(), local.port(), events).await?,
            );
            local_builds = Some(local.clone());
            local
        }
    };
    let st = &args.storage;
    let aws = aws::Aws::connect(st).await?;
    let blobs: Arc<dyn decap_core::ports::BlobStore> = match (st.blob_store, &aws) {
        (BlobBackend::S3, Some(aws)) => aws.blobs(st).await?,
        _ => Arc::new(FileBlobStore::new(data_dir.join("blobs"))),
    };
    let builds: Arc<dyn decap_core::ports::BuildStore> = match (st.build_store, &aws) {
        (TableBackend::Dynamodb, Some(aws)) => aws.builds(st).await?,
        _ => Arc::new(SqliteBuildStore::new(db.clone())),
    };
    // A project's pipeline runs live beside its build records.
    let runs: Arc<dyn decap_core::ports::RunStore> = match (st.build_store, &aws) {
        (TableBackend::Dynamodb, Some(aws)) => aws.runs(st).await?,
        _ => Arc::new(decap_embedded::SqliteRunStore::new(db.clone())),
    };
    let locks: Arc<dyn decap_core::ports::LockStore> = match (st.lock_store, &aws) {
        (TableBackend::Dynamodb, Some(aws)) => aws.locks(st).await?,
        _ => Arc::new(SqliteLockStore::new(db.clone())),
    };
    let queue: Arc<dyn decap_core::ports::DeferralQueue> = match (st.deferral_queue, &aws) {
        (QueueBackend::Sqs, Some(aws)) => aws.queue(st).await?,
        _ => Arc::new(SqliteDeferralQueue::new(db.clone())),
    };
    let mut bctool_env = aws::Aws::bctool_env(st, aws.as_ref())?;
    bctool_env.push((
        "DECAP_BCTOOL_RETRY_SECS".into(),
        args.bctool_retry_secs.to_string(),
    ));
    let ports = Ports {
        builds,
        runs,
        locks,
        queue,
        blobs,
        executor,
        scripts: scripts.clone(),
    };
    let live = LiveLogs::new(data_dir.join("live"), args.max_log_bytes)?;
    let controller = Controller::new(
        ports,
        ControllerConfig {
            public_url: public_url.clone(),
            decap_url,
            caps: Caps {
                global: args.max_builds,
                per_project: args.max_builds_per_project,
            },
            kill_grace: Duration::from_secs(args.kill_grace_secs.max(1)),
            lock_margin: Duration::from_secs(600),
            max_log_bytes: args.max_log_bytes,
            upload_caps: decap_server::uploads::UploadCaps::new(
                args.max_log_bytes,
                decap_core::limits::parse_bytes(
                    "--max-artifacts-bytes",
                    &args.max_artifacts_bytes,
                )?,
            ),
            bctool_env,
            drain_interval: Duration::from_secs(5),
        },
        live,
    );
    let leadership = match (&kube, args.kube.leader_election) {
        (Some(kube), true) => {
            let identity = args
                .kube
                .kube_pod_name
                .clone()
                .unwrap_or_else(host_identity);
            let leadership = kube.elect(&args, &identity, &controller).await?;
            tracing::info!(identity = %identity, lease = %args.kube.kube_lease_name, "leader election on");
            Some(leadership)
        }
        (None, true) => bail!("--leader-election needs --executor kubernetes"),
        _ => None,
    };
    controller.set_secrets(secrets.clone());
    controller.set_presets(
        Arc::new(decap_scripts::source::Sources::new(&args.data_dir)),
        args.preset_images.iter().cloned().collect(),
        args.service_images.iter().cloned().collect(),
    );
    controller.start(exits).await.context("recovering state")?;
    let mut github_hooks: Option<Arc<dyn decap_core::ports::RepositoryHooks>> = None;
    let mut github_refs: Option<Arc<dyn decap_core::ports::RepositoryRefs>> = None;
    if let Some(github) = github::connect(&args)? {
        github_hooks = Some(github.hooks);
        github_refs = Some(github.refs);
        // Shared by the replicas with the DynamoDB build store, so that
        // each state and comment is told once by whichever replica.
        let ledger: Arc<dyn decap_core::ports::StatusLedger> = match (st.build_store, &aws) {
            (TableBackend::Dynamodb, Some(aws)) => aws.ledger(st).await?,
            _ => Arc::new(decap_embedded::SqliteStatusLedger::new(db.clone())),
        };
        decap_server::statuses::StatusReporter::new(
            controller.clone(),
            github.statuses,
            ledger.clone(),
        )
        .spawn();
        decap_server::comments::PrCommenter::new(controller.clone(), github.comments, ledger)
            .spawn();
        tracing::info!(api = %args.github_api_url, "reporting commit statuses and pull-request comments to GitHub");
    }

    let webhook_secrets: Vec<SecretString> = [
        secret(args.github_webhook_secret.clone()),
        secret(args.github_webhook_secret_previous.clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if webhook_secrets.is_empty() {
        if args.insecure_local {
            // On one's own machine (deploy/serve) this is expected.
            tracing::info!(
                "GitHub webhooks are off: set DECAP_GITHUB_WEBHOOK_SECRET to accept them"
            );
        } else {
            tracing::warn!("no DECAP_GITHUB_WEBHOOK_SECRET: GitHub webhooks are refused");
        }
    }
    let api_token = secret(args.api_token.clone());
    if api_token.is_none() && !args.insecure_local {
        tracing::warn!("no DECAP_API_TOKEN and no --insecure-local: the API is read-only");
    }
    // Beside the artifacts in S3 (shared by the replicas), else in the
    // data dir.
    let details: Arc<dyn decap_core::ports::DetailStore> = match (st.blob_store, &aws) {
        (BlobBackend::S3, Some(aws)) => aws.details(st),
        _ => Arc::new(decap_embedded::FileDetailStore::new(
            data_dir.join("details"),
        )),
    };
    let details_sweeper = details.clone();
    // Shared by the replicas with the DynamoDB build store.
    let hub_store: Arc<dyn decap_core::ports::StatusHub> = match (st.build_store, &aws) {
        (TableBackend::Dynamodb, Some(aws)) => aws.hub(st).await?,
        _ => Arc::new(decap_embedded::SqliteStatusHub::new(db.clone())),
    };
    let sessions = match (st.build_store, &aws) {
        (TableBackend::Dynamodb, Some(aws)) => {
            decap_server::session::Sessions::new(aws.sessions(st).await?)
        }
        _ => decap_server::session::Sessions::default(),
    };
    let server = Arc::new(Server {
        controller: controller.clone(),
        auth: AuthConfig {
            api_token,
            insecure_local: args.insecure_local,
            webhook_secrets,
            private_reads: args.private,
        },
        version: decap_api_types::Version {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: env!("DECAP_GIT_COMMIT").to_owned(),
        },
        set_log_level: Some(set_level),
        hub: Some(Arc::new(decap_server::hub::Hub::new(
            hub_store,
            decap_server::hub::HubConfig {
                building_timeout: Duration::from_secs(args.hub_building_timeout_mins.max(1) * 60),
                webhooks: args.hub_webhook.clone(),
                ..decap_server::hub::HubConfig::default()
            },
        ))),
        github_hooks,
        github_refs,
        details: Some(details.clone()),
        oauth: oauth_config(&args).map(|c| Arc::new(decap_server::oauth::GitHubLogin::new(c))),
        sessions,
        secrets: Some(secrets.clone()),
    });

    // Expired detail files go, hourly.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match details_sweeper.sweep(time::OffsetDateTime::now_utc()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(commits = n, "expired detail files removed"),
                Err(e) => tracing::warn!(error = %e, "cannot remove expired detail files"),
            }
        }
    });

    // Periodic refresh of the build scripts.
    let refresh = Duration::from_secs(args.scripts_refresh_secs.max(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = decap_core::ports::ScriptsRepo::refresh(&*scripts).await {
                tracing::warn!(error = %e, "refreshing the build scripts failed; keeping the previous catalog");
            }
        }
    });

    let app = decap_server::router(server);
    tracing::info!(%local, %public_url, data_dir = %data_dir.display(), scripts = %scripts_spec, "decap is serving");
    let pid_file = data_dir.join("decap.pid");
    if let Err(e) = std::fs::write(&pid_file, format!("{}\n", std::process::id())) {
        tracing::warn!(file = %pid_file.display(), error = %e, "cannot write the pid file");
    }
    {
        // Whoever started decap may have stopped reading its output.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "decap: serving {public_url}");
        let _ = std::io::stdout().flush();
    }
    let limits = decap_server::listen::ListenLimits {
        // Leave room for files, sockets of builds and the stores.
        max_connections: args
            .max_connections
            .min(usize::try_from(open_files / 2).unwrap_or(usize::MAX))
            .max(64),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tcp = tokio::spawn(decap_server::listen::serve(
        listener,
        app.clone(),
        limits,
        stop_rx.clone(),
    ));
    let builds = tokio::spawn(decap_server::listen::serve(
        build_listener,
        app,
        limits,
        stop_rx,
    ));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let successor = signals.wait_for_stop(&upgrade, &listen_fd).await;
    drop(listen_fd);
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Nothing more is launched (what arrives waits in the deferral queue
    // for the next process), live streams end at once with a hint to
    // reconnect, and requests in flight finish, up to the drain time.
    controller.begin_stop();
    let _ = stop_tx.send(true);
    let _ = tokio::join!(tcp, builds);
    tracing::debug!("stopping: connections closed");
    // Another replica leads at once rather than when the Lease lapses.
    if let Some(leadership) = leadership {
        leadership.release(Duration::from_secs(5)).await;
    }
    // Local builds run on; the next start on this data dir adopts them.
    let mut builds_go_on = 0;
    if let Some(local) = &local_builds {
        // A launch already under way when the stop began (it holds the
        // scheduling lock) finishes first, so that its build is recorded
        // for the next server. Nothing new is launched once stopping.
        let _ = controller.drain().await;
        if args.stop_builds_on_exit && successor.is_none() {
            builds_go_on = local.stop_all().await;
            // Each stopped build ends (record, lock, log) before the exit.
            if !controller.quiesce(Duration::from_secs(10)).await {
                tracing::warn!(
                    "some stopped builds were not ended in time; the next start ends them"
                );
            }
        } else {
            builds_go_on = local.shutdown().await;
        }
        tracing::debug!("stopping: local executor let go");
        if builds_go_on > 0 {
            tracing::info!(
                builds = builds_go_on,
                "running builds go on; the next `decap serve` on this data dir adopts them and records how they end"
            );
        }
    }
    // The socket goes unless a newer server on the same data dir made its own.
    if socket_inode.is_some() && socket_inode == inode(&socket_path) {
        let _ = std::fs::remove_file(&socket_path);
        // Its folders too, when nothing else is in them, unless builds
        // that outlive this process have the socket's folder bound in
        // (local builds going on, containers): the next server's socket
        // appears there.
        if local_builds.is_some() && builds_go_on == 0 {
            if let Some(run) = socket_path.parent() {
                let _ = std::fs::remove_dir(run);
            }
            let _ = std::fs::remove_dir(&sandbox_dir.0);
        }
    }
    if std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(&pid_file);
    }
    tracing::info!("decap stopped");
    if let Some(successor) = successor {
        // Held until this process exits: the successor opens the data dir
        // once the connection closes.
        let _ = SUCCESSOR.set(successor);
    }
    Ok(())
}

/// The process that took over in an upgrade, whose connection stays open
/// until this process exits.
static SUCCESSOR: std::sync::OnceLock<handoff::Successor> = std::sync::OnceLock::new();

/// The signals `decap serve` answers: `SIGTERM` and Ctrl-C stop it,
/// `SIGUSR2` upgrades it in place.
struct Signals {
    term: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            usr2: signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?,
        })
    }

    /// Waits for `SIGTERM` or Ctrl-C (`None`), or for an upgrade in place
    /// (`SIGUSR2`) that a new process took over (`Some`). An upgrade that
    /// fails is logged, and serving goes on.
    async fn wait_for_stop(
        mut self,
        upgrade: &handoff::Upgrade,
        listener: &std::os::fd::OwnedFd,
    ) -> Option<handoff::Successor> {
        loop {
            tokio::select! {
                _ = self.term.recv() => return None,
                _ = tokio::signal::ctrl_c() => return None,
                _ = self.usr2.recv() => {
                    tracing::info!("upgrading in place (SIGUSR2)");
                    match upgrade.start(listener).await {
                        Ok(successor) => {
                            tracing::info!(pid = successor.pid, "the new decap takes over; stopping");
                            // Under systemd, the new process is the
                            // service's main process from now on.
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(successor.pid)]);
                            return Some(successor);
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "the upgrade failed; serving on"),
                    }
                }
            }
        }
    }
}
