//! GitHub's API: commit statuses, pull-request comments, webhook
//! subscriptions and a repository's branches, with a token or as a GitHub
//! App. It needs the `github` feature (on by default); a `decap` built
//! without it refuses a GitHub token or App with a message that says why.
//! Webhooks from GitHub and logging in with GitHub need no feature.

use std::sync::Arc;

use anyhow::Result;
use decap_core::ports::{CommitStatuses, PullRequestComments, RepositoryHooks, RepositoryRefs};

use crate::ServeArgs;

/// Why a GitHub token or App is refused by a build without it.
pub(crate) const LEFT_OUT: &str = "this decap was built without GitHub's API (commit statuses, \
     pull-request comments; the cargo feature `github`): build it with its default features, or \
     with `--features github`";

/// GitHub's API, as the ports that use it.
pub(crate) struct GitHub {
    pub(crate) statuses: Arc<dyn CommitStatuses>,
    pub(crate) comments: Arc<dyn PullRequestComments>,
    pub(crate) hooks: Arc<dyn RepositoryHooks>,
    pub(crate) refs: Arc<dyn RepositoryRefs>,
}

/// Whether a GitHub token or App is given.
pub(crate) fn configured(args: &ServeArgs) -> bool {
    args.github_token.as_deref().is_some_and(|t| !t.is_empty()) || args.github_app_id.is_some()
}

pub(crate) use imp::connect;

#[cfg(feature = "github")]
mod imp {
    use std::time::Duration;

    use anyhow::Context;

    use super::*;

    /// GitHub's API when a token or an App is given; `None` otherwise.
    pub(crate) fn connect(args: &ServeArgs) -> Result<Option<GitHub>> {
        if !configured(args) {
            return Ok(None);
        }
        let app = match (
            args.github_app_id,
            &args.github_app_key_file,
            args.github_app_installation_id,
        ) {
            (Some(app_id), Some(key), Some(installation_id)) => Some(decap_github::GitHubApp {
                app_id,
                private_key_pem: std::fs::read_to_string(key)
                    .with_context(|| format!("cannot read the GitHub App key {}", key.display()))?,
                installation_id,
            }),
            _ => None,
        };
        let github = Arc::new(
            decap_github::GitHubStatuses::new(&decap_github::GitHubConfig {
                api_url: args.github_api_url.clone(),
                token: args.github_token.clone().unwrap_or_default(),
                app,
                max_wait: Duration::from_secs(300),
            })
            .context("GitHub")?,
        );
        Ok(Some(GitHub {
            statuses: github.clone(),
            comments: github.clone(),
            hooks: github.clone(),
            refs: github,
        }))
    }
}

#[cfg(not(feature = "github"))]
mod imp {
    use super::*;

    /// `None`, or refused when a token or an App is given.
    pub(crate) fn connect(args: &ServeArgs) -> Result<Option<GitHub>> {
        if configured(args) {
            anyhow::bail!("{LEFT_OUT}");
        }
        Ok(None)
    }
}
