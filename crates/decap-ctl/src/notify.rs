//! `decapctl notify-pr`: for any CI, not only Decap. Given a repository, a
//! commit, a summary and detail files, it uploads the details to S3 under a
//! prefix the bucket expires after some days, finds the open pull request
//! of the commit, and posts the summary there with a link to each file.
//! Settings come from flags, from an INI file (`--config`), or both (flags
//! win), with the names of the original `notify_pr`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

/// `decapctl notify-pr`'s settings.
#[derive(Args, Debug, Default)]
pub struct NotifyArgs {
    /// An INI file with any of the settings below (`owner = apache`,
    /// `summary_file = …`, `full_detail_dir = …`, `full_detail_files = a,b`,
    /// `store_endpoint`, `store_identity`, `store_secret`, `store_bucket`,
    /// `store_prefix`, `expire_days`, `token`, `github_api_url`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The repository's owner.
    #[arg(long)]
    owner: Option<String>,
    /// The repository.
    #[arg(long)]
    repo: Option<String>,
    /// The commit the CI ran against.
    #[arg(long)]
    commit: Option<String>,
    /// A text file: the summary shown in the comment.
    #[arg(long)]
    summary_file: Option<PathBuf>,
    /// A folder uploaded whole (recursively).
    #[arg(long)]
    full_detail_dir: Option<PathBuf>,
    /// Files uploaded (comma-separated).
    #[arg(long, value_delimiter = ',')]
    full_detail_files: Vec<PathBuf>,
    /// The object store: `s3`, or `decap` (this Decap server's own store,
    /// reached as the other commands reach it).
    #[arg(long)]
    store_api: Option<String>,
    /// An S3-compatible endpoint instead of AWS.
    #[arg(long)]
    store_endpoint: Option<String>,
    /// The access key id.
    #[arg(long)]
    store_identity: Option<String>,
    /// The secret key.
    #[arg(long, env = "DECAP_NOTIFY_STORE_SECRET", hide_env_values = true)]
    store_secret: Option<String>,
    /// The bucket.
    #[arg(long)]
    store_bucket: Option<String>,
    /// The key prefix the expiry covers (default `notify-pr/`).
    #[arg(long)]
    store_prefix: Option<String>,
    /// The region (default us-east-1).
    #[arg(long)]
    store_region: Option<String>,
    /// Days the details are kept (default 7).
    #[arg(long)]
    expire_days: Option<u32>,
    /// A GitHub token that may comment on pull requests.
    #[arg(
        long = "github-token",
        env = "DECAP_GITHUB_TOKEN",
        hide_env_values = true
    )]
    github_token: Option<String>,
    /// GitHub's API (GitHub Enterprise: https://HOST/api/v3).
    #[arg(long)]
    github_api_url: Option<String>,
}

/// The settings, flags over the INI file.
struct Settings(BTreeMap<String, String>);

impl Settings {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn need(&self, key: &str) -> Result<&str> {
        self.get(key).with_context(|| {
            format!(
                "{key} is required (as --{} or in the INI file)",
                key.replace('_', "-")
            )
        })
    }
}

fn settings(args: &NotifyArgs) -> Result<Settings> {
    let mut map = BTreeMap::new();
    if let Some(path) = &args.config {
        let ini = ini::Ini::load_from_file(path)
            .with_context(|| format!("cannot read the INI file {}", path.display()))?;
        for (_, props) in ini.iter() {
            for (k, v) in props.iter() {
                map.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
    }
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    let flags = [
        ("owner", args.owner.clone()),
        ("repo", args.repo.clone()),
        ("commit", args.commit.clone()),
        ("summary_file", path(&args.summary_file)),
        ("full_detail_dir", path(&args.full_detail_dir)),
        (
            "full_detail_files",
            (!args.full_detail_files.is_empty()).then(|| {
                args.full_detail_files
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        ),
        ("store_api", args.store_api.clone()),
        ("store_endpoint", args.store_endpoint.clone()),
        ("store_identity", args.store_identity.clone()),
        ("store_secret", args.store_secret.clone()),
        ("store_bucket", args.store_bucket.clone()),
        ("store_prefix", args.store_prefix.clone()),
        ("store_region", args.store_region.clone()),
        ("expire_days", args.expire_days.map(|d| d.to_string())),
        ("token", args.github_token.clone()),
        ("github_api_url", args.github_api_url.clone()),
    ];
    for (k, v) in flags {
        if let Some(v) = v {
            map.insert(k.to_owned(), v);
        }
    }
    Ok(Settings(map))
}

/// The files to upload, each with its name in the store (relative, `/`).
fn detail_files(s: &Settings) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    if let Some(dir) = s.get("full_detail_dir") {
        let dir = Path::new(dir);
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            let entries =
                std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
            for e in entries {
                let e = e?;
                let t = e.file_type()?;
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() {
                    let rel = e
                        .path()
                        .strip_prefix(dir)
                        .map(|r| r.to_string_lossy().replace('\\', "/"))
                        .unwrap_or_default();
                    files.push((rel, e.path()));
                }
                // Symlinks are not followed: they could point anywhere.
            }
        }
    }
    if let Some(list) = s.get("full_detail_files") {
        for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let p = PathBuf::from(f);
            if !p.is_file() {
                bail!("{f} is not a file");
            }
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("{f} has no file name"))?;
            files.push((name, p));
        }
    }
    files.sort();
    Ok(files)
}

fn valid_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 100
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("{what} {v:?} is not a GitHub name");
    }
    Ok(())
}

/// Runs `decapctl notify-pr`; prints what it did.
pub async fn notify_pr(args: NotifyArgs, json: bool, decap: &decap_client::Client) -> Result<()> {
    let s = settings(&args)?;
    let owner = s.need("owner")?;
    let repo = s.need("repo")?;
    valid_name("owner", owner)?;
    valid_name("repo", repo)?;
    let commit = s.need("commit")?.to_ascii_lowercase();
    if !(7..=64).contains(&commit.len()) || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("commit {commit:?} is not a commit id");
    }
    let summary_path = s.need("summary_file")?;
    let summary = std::fs::read_to_string(summary_path)
        .with_context(|| format!("cannot read the summary {summary_path}"))?;
    let token = s.need("token")?.to_owned();
    let files = detail_files(&s)?;
    let days = match s.get("expire_days") {
        Some(d) => d
            .parse::<u32>()
            .ok()
            .filter(|d| *d >= 1)
            .with_context(|| format!("expire_days {d:?} is not a number of days"))?,
        None => 7,
    };

    let github = decap_github::GitHubStatuses::new(&decap_github::GitHubConfig {
        api_url: s
            .get("github_api_url")
            .unwrap_or("https://api.github.com")
            .to_owned(),
        token,
        app: None,
        max_wait: Duration::from_secs(120),
    })?;
    // The pull request first: nothing is uploaded for a commit no open pull
    // request has.
    let number = github
        .open_pull_request_of(owner, repo, &commit)
        .await?
        .with_context(|| format!("no open pull request of {owner}/{repo} has commit {commit}"))?;

    let mut links = Vec::new();
    let api = s.get("store_api").unwrap_or("s3");
    if !matches!(api, "s3" | "decap") {
        bail!("store_api {api:?} is not supported (s3 or decap)");
    }
    if !files.is_empty() && api == "decap" {
        for (name, path) in &files {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            let url = decap
                .put_detail(owner, repo, &commit, name, days, reqwest::Body::from(file))
                .await?;
            links.push((name.clone(), url));
        }
    }
    if !files.is_empty() && api == "s3" {
        links.extend(upload_s3(&s, owner, repo, &commit, days, &files).await?);
    }

    let mut body = format!(
        "<!-- decap:notify-pr -->\n### CI results for `{}`\n\n```\n{}\n```\n",
        &commit[..commit.len().min(10)],
        summary.trim_end().replace("```", "ʼʼʼ")
    );
    if !links.is_empty() {
        body.push_str(&format!(
            "\n**Details** (kept {days} day{}):\n\n",
            if days == 1 { "" } else { "s" }
        ));
        for (name, url) in &links {
            body.push_str(&format!("- [{name}]({url})\n"));
        }
    }
    use decap_core::ports::PullRequestComments;
    let id = github
        .upsert(
            &decap_core::ports::PullRequestComment {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
                number,
                body,
            },
            None,
        )
        .await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"pullRequest": number, "comment": id, "files": links.iter().map(|(n, u)| serde_json::json!({"name": n, "url": u})).collect::<Vec<_>>()})
        );
    } else {
        println!(
            "commented on {owner}/{repo}#{number} (comment {id}) with {} detail file{}",
            links.len(),
            if links.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Uploads the detail files to S3 under a prefix that expires after `days`;
/// answers each file's name and a link to it.
#[cfg(feature = "aws")]
async fn upload_s3(
    s: &Settings,
    owner: &str,
    repo: &str,
    commit: &str,
    days: u32,
    files: &[(String, PathBuf)],
) -> Result<Vec<(String, String)>> {
    let mut links = Vec::new();
    let bucket = s.need("store_bucket")?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(
        aws_config::Region::new(s.get("store_region").unwrap_or("us-east-1").to_owned()),
    );
    if let (Some(id), Some(secret)) = (s.get("store_identity"), s.get("store_secret")) {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            id,
            secret,
            None,
            None,
            "decapctl-notify-pr",
        ));
    }
    let sdk = loader.load().await;
    let store = decap_aws::details::S3Details::new(
        &sdk,
        decap_aws::details::DetailsConfig {
            bucket: bucket.to_owned(),
            prefix: s.get("store_prefix").unwrap_or("notify-pr/").to_owned(),
            endpoint_url: s.get("store_endpoint").map(str::to_owned),
            force_path_style: s.get("store_endpoint").is_some(),
        },
    );
    store.expire_after(days).await?;
    let valid = Duration::from_secs(u64::from(days) * 24 * 3600);
    for (name, path) in files {
        let key = store.key(owner, repo, commit, name);
        let url = store.upload(&key, path, valid).await?;
        links.push((name.clone(), url));
    }
    Ok(links)
}

/// S3 needs the AWS SDK, which this decapctl was built without.
#[cfg(not(feature = "aws"))]
async fn upload_s3(
    _: &Settings,
    _: &str,
    _: &str,
    _: &str,
    _: u32,
    _: &[(String, PathBuf)],
) -> Result<Vec<(String, String)>> {
    bail!(
        "store_api s3: this decapctl was built without the AWS SDK (the cargo feature `aws`); \
         use store_api decap (this Decap server's own store), or build Decap with its default features"
    )
}
