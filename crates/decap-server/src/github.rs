//! Subscribing a repository: Decap registers its own webhook on the
//! repository (`POST /api/v1/github/subscribe/{owner}/{repo}`, `decapctl
//! github subscribe`, the project page's button), with the events it builds
//! and its webhook secret. GitHub's `ping` then triggers a first build of the
//! repository's default branch.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use decap_core::names::ProjectKey;
use decap_core::ports::Subscribed;
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The events Decap builds.
pub const EVENTS: &[&str] = &["push", "pull_request", "create"];

/// `POST /api/v1/github/subscribe/{owner}/{repo}`'s answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeAnswer {
    /// `owner/repo`.
    pub repository: String,
    /// The webhook's id at GitHub.
    pub hook: u64,
    /// Whether it was created (else: brought up to date).
    pub created: bool,
    /// Where GitHub sends deliveries.
    pub url: String,
    /// The events sent.
    pub events: Vec<String>,
}

/// Registers Decap's webhook on `owner/repo`.
pub async fn subscribe(app: &AppState, owner: &str, repo: &str) -> ApiResult<SubscribeAnswer> {
    let key = ProjectKey::new(owner, repo).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Some(hooks) = &app.github_hooks else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no GitHub token: start Decap with DECAP_GITHUB_TOKEN (a token that may manage the repository's webhooks)",
        ));
    };
    let Some(secret) = app.auth.webhook_secrets.first() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no webhook secret: start Decap with DECAP_GITHUB_WEBHOOK_SECRET, which GitHub will sign deliveries with",
        ));
    };
    let url = format!(
        "{}/hooks/github",
        app.controller.config.public_url.trim_end_matches('/')
    );
    let outcome = hooks
        .subscribe(
            &key.team,
            &key.project,
            &url,
            secret.expose_secret(),
            EVENTS,
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let (hook, created) = match outcome {
        Subscribed::Created(id) => (id, true),
        Subscribed::Updated(id) => (id, false),
    };
    tracing::info!(repository = %key, hook, created, "subscribed to the repository's webhooks");
    Ok(SubscribeAnswer {
        repository: key.to_string(),
        hook,
        created,
        url,
        events: EVENTS.iter().map(|e| (*e).to_owned()).collect(),
    })
}

/// `POST /api/v1/github/subscribe/{owner}/{repo}`.
pub async fn subscribe_api(
    State(app): State<AppState>,
    headers: HeaderMap,
    crate::ui::Peer(peer): crate::ui::Peer,
    Path((owner, repo)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<SubscribeAnswer>)> {
    app.auth.authorize(&headers, peer)?;
    let answer = subscribe(&app, &owner, &repo).await?;
    let code = if answer.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(answer)))
}
