//! Decap's GitHub adapter: commit statuses and pull-request comments,
//! through octocrab. This crate is
//! the only one that imports `octocrab`.
//!
//! `POST /repos/{owner}/{repo}/statuses/{sha}` with a token; GitHub
//! Enterprise by its API base URL (`https://HOST/api/v3`). Rate limits are
//! respected: a `403` or `429` waits for `Retry-After`, or for
//! `x-ratelimit-reset` when the quota is spent (at most `max_wait`), then
//! tries again; a `5xx` is retried with backoff; anything else is an error
//! with GitHub's own message.
#![deny(missing_docs)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use decap_core::ports::{
    CommitStatus, CommitStatuses, PullRequestComment, PullRequestComments, RepositoryHooks,
    RepositoryRefs, Subscribed,
};
use decap_core::{Error, Result};
use http_body_util::BodyExt;
use octocrab::Octocrab;

/// How to reach GitHub.
#[derive(Clone)]
pub struct GitHubConfig {
    /// The API's base URL: `https://api.github.com`, or
    /// `https://HOST/api/v3` for GitHub Enterprise.
    pub api_url: String,
    /// A token that may write commit statuses (never printed); unused with
    /// `app`.
    pub token: String,
    /// Act as a GitHub App installation instead of with a token.
    pub app: Option<GitHubApp>,
    /// The longest a rate limit is waited out before giving up.
    pub max_wait: Duration,
}

/// A GitHub App installation: Decap signs a JWT with the App's private key
/// and trades it for installation tokens, renewed before they expire.
#[derive(Clone)]
pub struct GitHubApp {
    /// The App's id.
    pub app_id: u64,
    /// The App's private key (PEM; never printed).
    pub private_key_pem: String,
    /// The installation on the account that owns the repositories.
    pub installation_id: u64,
}

impl std::fmt::Debug for GitHubApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubApp")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubConfig")
            .field("api_url", &self.api_url)
            .field("app", &self.app)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// [`CommitStatuses`] on GitHub.
pub struct GitHubStatuses {
    crab: Octocrab,
    max_wait: Duration,
    /// GitHub's rate-limit quota as its last answer told it: calls left and
    /// when the quota resets (epoch seconds).
    quota: std::sync::Mutex<Option<(u64, u64)>>,
    /// Pages of branches and tags by URL, with their ETags: asked again
    /// with `If-None-Match`, a `304` (which costs no rate limit) answers
    /// from here.
    pages: std::sync::Mutex<std::collections::HashMap<String, CachedPage>>,
}

/// One page of a listing as GitHub last sent it.
#[derive(Clone)]
struct CachedPage {
    etag: String,
    names: Vec<String>,
    next: Option<String>,
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(headers: &http::HeaderMap) -> Option<String> {
    let link = headers.get(http::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, rel) = part.split_once(';')?;
        rel.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

fn gh_err(e: impl std::fmt::Display) -> Error {
    Error::backend("github", e)
}

impl GitHubStatuses {
    /// A client; no request is made.
    pub fn new(config: &GitHubConfig) -> Result<Self> {
        // Several TLS backends are linked in (the AWS SDK brings its own);
        // octocrab takes the process default, so there must be one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .map_err(|e| Error::invalid("GitHub API URL", e))?
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)));
        let crab = match &config.app {
            None => builder
                .personal_token(config.token.clone())
                .build()
                .map_err(gh_err)?,
            Some(app) => {
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(app.private_key_pem.as_bytes())
                    .map_err(|e| {
                    Error::invalid(
                        "GitHub App private key",
                        format!("not an RSA key in PEM: {e}"),
                    )
                })?;
                builder
                    .app(app.app_id.into(), key)
                    .build()
                    .map_err(gh_err)?
                    .installation(app.installation_id.into())
                    .map_err(gh_err)?
            }
        };
        Ok(GitHubStatuses {
            crab,
            max_wait: config.max_wait,
            pages: std::sync::Mutex::new(std::collections::HashMap::new()),
            quota: std::sync::Mutex::new(None),
        })
    }
}

/// How long GitHub asks us to wait, from a rate-limited answer.
fn wait_for(headers: &http::HeaderMap, now_epoch: u64) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secs) = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs));
    }
    if header("x-ratelimit-remaining") == Some("0") {
        let reset = header("x-ratelimit-reset")?.trim().parse::<u64>().ok()?;
        return Some(Duration::from_secs(reset.saturating_sub(now_epoch).max(1)));
    }
    None
}

impl GitHubStatuses {
    /// Remembers the quota an answer reports (`x-ratelimit-remaining`,
    /// `x-ratelimit-reset`).
    fn track_quota(&self, headers: &http::HeaderMap) {
        let num = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(left), Some(reset)) = (num("x-ratelimit-remaining"), num("x-ratelimit-reset"))
            && let Ok(mut q) = self.quota.lock()
        {
            *q = Some((left, reset));
        }
    }

    /// How long to wait before the next call: until the reset when no call
    /// is left.
    fn quota_wait(&self) -> Option<Duration> {
        let (left, reset) = (*self.quota.lock().ok()?)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        (left == 0 && reset > now).then(|| Duration::from_secs(reset - now))
    }
}

/// A call GitHub answered, after rate limits and server errors were waited
/// out: its status and body.
struct Answer {
    status: http::StatusCode,
    text: String,
}

impl GitHubStatuses {
    /// Sends one call, waiting out rate limits (`Retry-After`, a spent quota)
    /// up to `max_wait` and retrying server errors and unreachable servers
    /// with backoff; answers the first other answer.
    async fn call(
        &self,
        method: http::Method,
        route: &str,
        body: &serde_json::Value,
    ) -> Result<Answer> {
        let mut backoff = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        for attempt in 1..=5 {
            // The quota is spent: wait for its reset rather than be refused.
            if let Some(wait) = self.quota_wait()
                && waited + wait <= self.max_wait
            {
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "GitHub's rate limit is spent; waiting for its reset"
                );
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            let answer = match method {
                http::Method::PATCH => self.crab._patch(route, Some(body)).await,
                http::Method::GET => self.crab._get(route).await,
                _ => self.crab._post(route, Some(body)).await,
            }
            .map_err(gh_err);
            let resp = match answer {
                Ok(r) => r,
                Err(e) if attempt < 5 => {
                    tracing::warn!(error = %e, "GitHub could not be reached; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = resp.status();
            self.track_quota(resp.headers());
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let limited = matches!(status.as_u16(), 403 | 429);
            let wait = if limited {
                wait_for(resp.headers(), now)
            } else {
                None
            };
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            let retry = match wait {
                Some(w) if waited + w <= self.max_wait => Some(w),
                Some(w) => {
                    return Err(gh_err(format!(
                        "rate limited by GitHub for {}s, more than the {}s allowed: {text}",
                        w.as_secs(),
                        self.max_wait.as_secs()
                    )));
                }
                None if status.is_server_error() => Some(backoff),
                None => None,
            };
            match retry {
                Some(w) if attempt < 5 => {
                    tracing::warn!(status = %status, wait_ms = w.as_millis() as u64, "GitHub asked to wait; retrying");
                    tokio::time::sleep(w).await;
                    waited += w;
                    backoff *= 2;
                }
                _ => return Ok(Answer { status, text }),
            }
        }
        Err(gh_err("GitHub kept failing"))
    }
}

#[async_trait]
impl CommitStatuses for GitHubStatuses {
    async fn set(&self, s: &CommitStatus) -> Result<()> {
        let route = format!("/repos/{}/{}/statuses/{}", s.owner, s.repo, s.sha);
        let description: String = s.description.chars().take(140).collect();
        let body = serde_json::json!({
            "state": s.state.as_str(),
            "target_url": s.target_url,
            "description": description,
            "context": s.context,
        });
        let answer = self.call(http::Method::POST, &route, &body).await?;
        if answer.status.is_success() {
            return Ok(());
        }
        Err(gh_err(format!(
            "setting {} on {}/{}@{}: HTTP {}: {}",
            s.context, s.owner, s.repo, s.sha, answer.status, answer.text
        )))
    }
}

/// The id GitHub answered with (of a comment, of a webhook).
fn answered_id(answer: &Answer) -> Result<u64> {
    serde_json::from_str::<serde_json::Value>(&answer.text)
        .ok()
        .and_then(|v| v["id"].as_u64())
        .ok_or_else(|| gh_err(format!("GitHub's answer names no comment: {}", answer.text)))
}

#[async_trait]
impl PullRequestComments for GitHubStatuses {
    async fn upsert(&self, c: &PullRequestComment, previous: Option<u64>) -> Result<u64> {
        // GitHub refuses bodies over 65,536 characters.
        let text: String = c.body.chars().take(65_000).collect();
        let body = serde_json::json!({ "body": text });
        if let Some(id) = previous {
            let route = format!("/repos/{}/{}/issues/comments/{id}", c.owner, c.repo);
            let answer = self.call(http::Method::PATCH, &route, &body).await?;
            if answer.status.is_success() {
                return Ok(id);
            }
            if answer.status != http::StatusCode::NOT_FOUND {
                return Err(gh_err(format!(
                    "editing comment {id} on {}/{}#{}: HTTP {}: {}",
                    c.owner, c.repo, c.number, answer.status, answer.text
                )));
            }
            tracing::info!(comment = id, "the comment was deleted; posting a new one");
        }
        let route = format!("/repos/{}/{}/issues/{}/comments", c.owner, c.repo, c.number);
        let answer = self.call(http::Method::POST, &route, &body).await?;
        if !answer.status.is_success() {
            return Err(gh_err(format!(
                "commenting on {}/{}#{}: HTTP {}: {}",
                c.owner, c.repo, c.number, answer.status, answer.text
            )));
        }
        answered_id(&answer)
    }
}

#[async_trait]
impl RepositoryHooks for GitHubStatuses {
    async fn subscribe(
        &self,
        owner: &str,
        repo: &str,
        url: &str,
        secret: &str,
        events: &[&str],
    ) -> Result<Subscribed> {
        let config = serde_json::json!({
            "url": url, "content_type": "json", "secret": secret, "insecure_ssl": "0",
        });
        let body = serde_json::json!({
            "name": "web", "active": true, "events": events, "config": config,
        });
        let route = format!("/repos/{owner}/{repo}/hooks");
        let answer = self.call(http::Method::POST, &route, &body).await?;
        if answer.status.is_success() {
            return answered_id(&answer).map(Subscribed::Created);
        }
        // 422: a webhook to this URL exists already. Find it and bring its
        // events and secret up to date.
        if answer.status != http::StatusCode::UNPROCESSABLE_ENTITY {
            return Err(gh_err(format!(
                "subscribing {owner}/{repo}: HTTP {}: {}",
                answer.status, answer.text
            )));
        }
        let list = self
            .call(
                http::Method::GET,
                &format!("{route}?per_page=100"),
                &serde_json::Value::Null,
            )
            .await?;
        if !list.status.is_success() {
            return Err(gh_err(format!(
                "listing the webhooks of {owner}/{repo}: HTTP {}: {}",
                list.status, list.text
            )));
        }
        let hooks: Vec<serde_json::Value> = serde_json::from_str(&list.text).unwrap_or_default();
        let Some(id) = hooks
            .iter()
            .find(|h| h["config"]["url"].as_str() == Some(url))
            .and_then(|h| h["id"].as_u64())
        else {
            return Err(gh_err(format!(
                "GitHub refused the webhook of {owner}/{repo} and none to {url} is there: {}",
                answer.text
            )));
        };
        let edit = serde_json::json!({ "active": true, "events": events, "config": config });
        let edited = self
            .call(http::Method::PATCH, &format!("{route}/{id}"), &edit)
            .await?;
        if !edited.status.is_success() {
            return Err(gh_err(format!(
                "updating webhook {id} of {owner}/{repo}: HTTP {}: {}",
                edited.status, edited.text
            )));
        }
        Ok(Subscribed::Updated(id))
    }
}

impl GitHubStatuses {
    /// One page of names, conditionally on its cached ETag.
    async fn page(&self, url: &str) -> Result<CachedPage> {
        let cached = self.pages.lock().ok().and_then(|p| p.get(url).cloned());
        let mut headers = http::HeaderMap::new();
        if let Some(c) = &cached
            && let Ok(v) = http::HeaderValue::from_str(&c.etag)
        {
            headers.insert(http::header::IF_NONE_MATCH, v);
        }
        let resp = self
            .crab
            ._get_with_headers(url, Some(headers))
            .await
            .map_err(gh_err)?;
        let status = resp.status();
        if status == http::StatusCode::NOT_MODIFIED
            && let Some(c) = cached
        {
            return Ok(c);
        }
        let etag = resp
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let next = next_link(resp.headers());
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if !status.is_success() {
            return Err(gh_err(format!("GET {url}: HTTP {status}: {text}")));
        }
        let items: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| gh_err(format!("GET {url}: not a list: {e}")))?;
        let page = CachedPage {
            etag: etag.unwrap_or_default(),
            names: items
                .iter()
                .filter_map(|i| i["name"].as_str().map(str::to_owned))
                .collect(),
            next,
        };
        if !page.etag.is_empty()
            && let Ok(mut p) = self.pages.lock()
        {
            p.insert(url.to_owned(), page.clone());
        }
        Ok(page)
    }

    /// Every name of a listing, page after page (at most 20 pages).
    async fn names(&self, first: String) -> Result<Vec<String>> {
        let mut url = Some(first);
        let mut names = Vec::new();
        for _ in 0..20 {
            let Some(u) = url.take() else { break };
            let page = self.page(&u).await?;
            names.extend(page.names);
            url = page.next;
        }
        Ok(names)
    }
}

impl GitHubStatuses {
    /// The open pull request whose head is `sha` (GitHub's pull requests of
    /// a commit), if any.
    pub async fn open_pull_request_of(
        &self,
        owner: &str,
        repo: &str,
        sha: &str,
    ) -> Result<Option<u64>> {
        let route = format!("/repos/{owner}/{repo}/commits/{sha}/pulls");
        let answer = self
            .call(http::Method::GET, &route, &serde_json::Value::Null)
            .await?;
        if !answer.status.is_success() {
            return Err(gh_err(format!(
                "the pull requests of {owner}/{repo}@{sha}: HTTP {}: {}",
                answer.status, answer.text
            )));
        }
        let pulls: Vec<serde_json::Value> = serde_json::from_str(&answer.text)
            .map_err(|e| gh_err(format!("GitHub's list of pull requests: {e}")))?;
        let open = |p: &&serde_json::Value| p["state"].as_str() == Some("open");
        Ok(pulls
            .iter()
            .filter(open)
            .find(|p| p["head"]["sha"].as_str() == Some(sha))
            .or_else(|| pulls.iter().find(open))
            .and_then(|p| p["number"].as_u64()))
    }
}

#[async_trait]
impl RepositoryRefs for GitHubStatuses {
    async fn refs(&self, owner: &str, repo: &str) -> Result<Vec<(String, String)>> {
        let base = format!("/repos/{owner}/{repo}");
        let (branches, tags) = tokio::join!(
            self.names(format!("{base}/branches?per_page=100")),
            self.names(format!("{base}/tags?per_page=100"))
        );
        let mut refs: Vec<(String, String)> = branches?
            .into_iter()
            .map(|n| ("branch".to_owned(), n))
            .collect();
        refs.extend(tags?.into_iter().map(|n| ("tag".to_owned(), n)));
        Ok(refs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        let mut h = http::HeaderMap::new();
        assert_eq!(next_link(&h), None);
        h.insert(
            http::header::LINK,
            r#"<https://api.github.com/repositories/1/branches?per_page=100&page=2>; rel="next", <https://api.github.com/repositories/1/branches?per_page=100&page=5>; rel="last""#
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://api.github.com/repositories/1/branches?per_page=100&page=2")
        );
    }

    #[tokio::test]
    async fn a_spent_quota_is_waited_out_before_the_next_call() {
        let gh = GitHubStatuses::new(&GitHubConfig {
            api_url: "http://127.0.0.1:9".into(),
            token: "t".into(),
            app: None,
            max_wait: Duration::from_secs(60),
        })
        .unwrap();
        assert_eq!(gh.quota_wait(), None);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = http::HeaderMap::new();
        h.insert("x-ratelimit-remaining", "4".parse().unwrap());
        h.insert("x-ratelimit-reset", (now + 60).to_string().parse().unwrap());
        gh.track_quota(&h);
        assert_eq!(gh.quota_wait(), None, "calls are left");
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        gh.track_quota(&h);
        let wait = gh.quota_wait().unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
    }

    #[test]
    fn waits_as_github_says() {
        let mut h = http::HeaderMap::new();
        assert_eq!(wait_for(&h, 100), None);
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        h.insert("x-ratelimit-reset", "160".parse().unwrap());
        assert_eq!(wait_for(&h, 100), Some(Duration::from_secs(60)));
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            wait_for(&h, 100),
            Some(Duration::from_secs(7)),
            "Retry-After first"
        );
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let c = GitHubConfig {
            api_url: "https://api.github.com".into(),
            token: "ghp_secret".into(),
            app: Some(GitHubApp {
                app_id: 1,
                private_key_pem: "-----BEGIN RSA PRIVATE KEY-----secret".into(),
                installation_id: 2,
            }),
            max_wait: Duration::from_secs(60),
        };
        assert!(!format!("{c:?}").contains("ghp_secret"));
        assert!(!format!("{c:?}").contains("PRIVATE KEY"));
    }
}
