//! Decap's GitHub adapter: commit statuses, through octocrab. This crate is
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
use decap_core::ports::{CommitStatus, CommitStatuses};
use decap_core::{Error, Result};
use http_body_util::BodyExt;
use octocrab::Octocrab;

/// How to reach GitHub.
#[derive(Clone)]
pub struct GitHubConfig {
    /// The API's base URL: `https://api.github.com`, or
    /// `https://HOST/api/v3` for GitHub Enterprise.
    pub api_url: String,
    /// A token that may write commit statuses (never printed).
    pub token: String,
    /// The longest a rate limit is waited out before giving up.
    pub max_wait: Duration,
}

impl std::fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubConfig")
            .field("api_url", &self.api_url)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// [`CommitStatuses`] on GitHub.
pub struct GitHubStatuses {
    crab: Octocrab,
    max_wait: Duration,
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
        let crab = Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .map_err(|e| Error::invalid("GitHub API URL", e))?
            .personal_token(config.token.clone())
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(gh_err)?;
        Ok(GitHubStatuses {
            crab,
            max_wait: config.max_wait,
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
        let mut backoff = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        for attempt in 1..=5 {
            let answer = self
                .crab
                ._post(route.as_str(), Some(&body))
                .await
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
            if status.is_success() {
                return Ok(());
            }
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
                _ => {
                    return Err(gh_err(format!(
                        "setting {} on {}/{}@{}: HTTP {status}: {text}",
                        s.context, s.owner, s.repo, s.sha
                    )));
                }
            }
        }
        Err(gh_err("GitHub kept failing"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
            max_wait: Duration::from_secs(60),
        };
        assert!(!format!("{c:?}").contains("ghp_secret"));
    }
}
