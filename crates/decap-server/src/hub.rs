//! The CI status hub's HTTP side: other CI servers report their builds
//! (`POST /api/build_status`), take locks to serialise deploys
//! (`POST /api/build/lock`, `/api/build/unlock`) and remove projects
//! (`DELETE /api/projects/{name}`), as the original pipeline dashboard
//! accepted them; every change is posted to the project status webhooks in
//! the background.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use decap_core::hub::{
    ExternalBuild, Reported, RevisionRow, latest_revisions, project_name, validate_build_name,
    validate_project_name, validate_revision, validate_status_url,
};
use decap_core::ports::StatusHub;
use serde::Serialize;
use time::OffsetDateTime;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::ui::Peer;

/// How the hub behaves.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// A build reported `building` for longer shows as `pending` again.
    pub building_timeout: Duration,
    /// Locks free themselves after this long.
    pub lock_ttl: Duration,
    /// Revisions shown per project (and sent to webhooks).
    pub revisions: usize,
    /// URLs each project's state is posted to after every change.
    pub webhooks: Vec<String>,
    /// How long one webhook post may take.
    pub webhook_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            building_timeout: Duration::from_secs(60 * 60),
            lock_ttl: Duration::from_secs(30 * 60),
            revisions: 10,
            webhooks: Vec::new(),
            webhook_timeout: Duration::from_secs(10),
        }
    }
}

/// The hub: its store, settings and webhook client.
pub struct Hub {
    store: Arc<dyn StatusHub>,
    config: HubConfig,
    http: reqwest::Client,
}

/// A project's state as the webhooks receive it (never with status URLs).
#[derive(Debug, Clone, Serialize)]
pub struct ProjectPayload {
    /// The project.
    pub project_name: String,
    /// Whether the project was just removed.
    pub project_removed: bool,
    /// Its latest revisions, newest first.
    pub latest_revisions: Vec<RevisionRow>,
}

/// A project's state as the API and the UI show it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectState {
    /// The project.
    pub name: String,
    /// Its latest revisions, newest first.
    pub latest_revisions: Vec<RevisionState>,
}

/// One revision in [`ProjectState`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionState {
    /// The revision.
    pub hash: String,
    /// Its first six characters.
    pub short_name: String,
    /// Each build name's state.
    pub builds: Vec<BuildState>,
}

/// One build in [`RevisionState`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildState {
    /// The build's name.
    pub name: String,
    /// `pending`, `building`, `successful`, `failed` or `fixed`.
    pub status: String,
    /// Where its CI server shows it.
    pub status_url: Option<String>,
}

impl Hub {
    /// A hub over `store`.
    pub fn new(store: Arc<dyn StatusHub>, config: HubConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.webhook_timeout)
            .build()
            .unwrap_or_default();
        Hub {
            store,
            config,
            http,
        }
    }

    async fn rows(&self, project: &str) -> decap_core::Result<Vec<RevisionRow>> {
        // One revision more than shown: `fixed` looks at the one before.
        let builds = self
            .store
            .latest(project, self.config.revisions + 1)
            .await?;
        Ok(latest_revisions(
            &builds,
            OffsetDateTime::now_utc(),
            self.config.building_timeout,
            self.config.revisions,
        ))
    }

    /// Every project's state, by name.
    pub async fn states(&self) -> decap_core::Result<Vec<ProjectState>> {
        let mut out = Vec::new();
        for name in self.store.projects().await? {
            let rows = self.rows(&name).await?;
            out.push(ProjectState {
                name,
                latest_revisions: rows
                    .into_iter()
                    .map(|r| RevisionState {
                        hash: r.hash,
                        short_name: r.short_name,
                        builds: r
                            .builds
                            .into_iter()
                            .map(|b| BuildState {
                                name: b.name,
                                status: b.status.to_string(),
                                status_url: b.status_url,
                            })
                            .collect(),
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Posts a project's state to every webhook, in the background: once,
    /// within the timeout, never holding up the caller.
    fn notify(self: &Arc<Self>, project: String, removed: bool) {
        if self.config.webhooks.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let latest_revisions = if removed {
                Vec::new()
            } else {
                match this.rows(&project).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(project = %project, error = %e, "cannot read the project for its webhooks");
                        return;
                    }
                }
            };
            let payload = ProjectPayload {
                project_name: project.clone(),
                project_removed: removed,
                latest_revisions,
            };
            let Ok(json) = serde_json::to_string(&payload) else {
                return;
            };
            for url in &this.config.webhooks {
                let sent = this
                    .http
                    .post(url)
                    .form(&[("payload", json.as_str())])
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        tracing::debug!(project = %project, url = %url, "project status posted");
                    }
                    Ok(r) => {
                        tracing::warn!(project = %project, url = %url, status = %r.status(), "the project status webhook refused the post");
                    }
                    Err(e) => {
                        tracing::warn!(project = %project, url = %url, error = %e, "cannot post the project status");
                    }
                }
            }
        });
    }
}

/// The fields of a report, as a form or as JSON.
fn fields(headers: &HeaderMap, body: &Bytes) -> ApiResult<HashMap<String, String>> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if json {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
        Ok(obj
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
            .collect())
    } else {
        serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not a valid form: {e}")))
    }
}

fn required<'a>(f: &'a HashMap<String, String>, name: &str) -> ApiResult<&'a str> {
    f.get(name)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("{name} is required")))
}

/// The API token, as the `token` field of a POST's body (as the original
/// accepted it) or as a bearer token; or this machine's own CLI under
/// `--insecure-local`.
fn authorize(
    app: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
    peer: Option<std::net::SocketAddr>,
) -> ApiResult<()> {
    match token {
        Some(t) if app.auth.token_matches(t) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("the API token is wrong")),
        None => app.auth.authorize(headers, peer).map_err(|e| {
            if headers.contains_key(header::AUTHORIZATION) {
                return e;
            }
            let why = app.auth.local_refusal_note(headers, peer);
            ApiError::unauthorized(format!(
                "this call needs the API token: send it as the token field, or as Authorization: Bearer <DECAP_API_TOKEN>{why}"
            ))
        }),
    }
}

fn hub(app: &AppState) -> ApiResult<&Arc<Hub>> {
    app.hub
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "the CI status hub is off"))
}

/// `POST /api/build_status`.
pub async fn build_status(
    State(app): State<AppState>,
    headers: HeaderMap,
    Peer(peer): Peer,
    body: Bytes,
) -> ApiResult<Response> {
    let f = fields(&headers, &body)?;
    authorize(&app, &headers, f.get("token").map(String::as_str), peer)?;
    let hub = hub(&app)?;
    let name = required(&f, "name")?;
    validate_build_name(name)?;
    let repository = required(&f, "repository")?;
    if repository.len() > 500 {
        return Err(ApiError::bad_request(
            "repository is longer than 500 characters",
        ));
    }
    let project = project_name(repository)?;
    let revision = required(&f, "revision")?.to_ascii_lowercase();
    validate_revision(&revision)?;
    let status = Reported::parse(required(&f, "status")?)?;
    let status_url = match f
        .get("status_url")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        Some(u) => {
            validate_status_url(u)?;
            Some(u.to_owned())
        }
        None => None,
    };
    let now = OffsetDateTime::now_utc();
    let build = ExternalBuild {
        project: project.clone(),
        repository: repository.to_owned(),
        revision: revision.clone(),
        name: name.to_owned(),
        status,
        status_url,
        revision_seen_at: now,
        updated_at: now,
    };
    hub.store.record(&build).await?;
    hub.notify(project.clone(), false);
    Ok(Json(serde_json::json!({
        "project": project,
        "revision": revision,
        "name": name,
        "status": status.as_str(),
    }))
    .into_response())
}

/// `DELETE /api/projects/{name}`, with the token as a bearer token: one in
/// the query string (`?token=`, which the original took) is refused, since
/// URLs end up in logs, proxies and shell histories.
pub async fn delete_project(
    State(app): State<AppState>,
    headers: HeaderMap,
    Peer(peer): Peer,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    if q.contains_key("token") {
        return Err(ApiError::bad_request(
            "the API token does not go in the URL (URLs end up in logs and histories): send it as Authorization: Bearer <DECAP_API_TOKEN>, and change it if it was sent this way",
        ));
    }
    authorize(&app, &headers, None, peer)?;
    let hub = hub(&app)?;
    validate_project_name(&name)?;
    if !hub.store.remove_project(&name).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no project {name} in the CI status hub"),
        ));
    }
    hub.notify(name.clone(), true);
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

/// The lock's coordinates from a lock or unlock call.
fn lock_fields(
    app: &AppState,
    headers: &HeaderMap,
    peer: Option<std::net::SocketAddr>,
    body: &Bytes,
) -> ApiResult<(String, String, String)> {
    let f = fields(headers, body)?;
    authorize(app, headers, f.get("token").map(String::as_str), peer)?;
    let name = required(&f, "name")?.to_owned();
    validate_build_name(&name)?;
    let project = project_name(required(&f, "repository")?)?;
    let revision = required(&f, "revision")?.to_ascii_lowercase();
    validate_revision(&revision)?;
    Ok((project, name, revision))
}

/// `POST /api/build/lock`: answers the revision holding the lock.
pub async fn lock(
    State(app): State<AppState>,
    headers: HeaderMap,
    Peer(peer): Peer,
    body: Bytes,
) -> ApiResult<Response> {
    let (project, name, revision) = lock_fields(&app, &headers, peer, &body)?;
    let hub = hub(&app)?;
    let holder = hub
        .store
        .lock(
            &project,
            &name,
            &revision,
            OffsetDateTime::now_utc(),
            hub.config.lock_ttl,
        )
        .await?;
    Ok(Json(serde_json::json!({ "locked_by_revision": holder })).into_response())
}

/// `POST /api/build/unlock`.
pub async fn unlock(
    State(app): State<AppState>,
    headers: HeaderMap,
    Peer(peer): Peer,
    body: Bytes,
) -> ApiResult<Response> {
    let (project, name, revision) = lock_fields(&app, &headers, peer, &body)?;
    let hub = hub(&app)?;
    let unlocked = hub.store.unlock(&project, &name, &revision).await?;
    Ok(Json(serde_json::json!({ "unlocked": unlocked })).into_response())
}

/// `GET /api/v1/hub`: every project's latest revisions.
pub async fn states(State(app): State<AppState>) -> ApiResult<Response> {
    let hub = hub(&app)?;
    Ok(Json(serde_json::json!({ "projects": hub.states().await? })).into_response())
}
