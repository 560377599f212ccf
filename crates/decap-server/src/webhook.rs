//! `POST /hooks/github`: verified, de-duplicated, recorded, answered at once.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use decap_api_types::WebhookAnswer;
use decap_core::build::{Build, Trigger};
use decap_core::catalog::Catalog;
use decap_core::names::ProjectKey;
use decap_core::ports::{Delivery, DeliveryOutcome};
use decap_core::refs::GitRef;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::AppState;
use crate::error::ApiError;

#[derive(Deserialize)]
struct Owner {
    login: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    name: String,
    owner: Owner,
}

impl Repository {
    fn key(&self) -> Result<ProjectKey, ApiError> {
        let team = self
            .owner
            .login
            .as_deref()
            .or(self.owner.name.as_deref())
            .ok_or_else(|| ApiError::bad_request("repository.owner has neither login nor name"))?;
        ProjectKey::new(team, &self.name).map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// A repository as a ping names it, with its default branch.
#[derive(Deserialize)]
struct PingRepository {
    #[serde(flatten)]
    repository: Repository,
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct PingEvent {
    repository: Option<PingRepository>,
}

#[derive(Deserialize)]
struct PushEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    after: Option<String>,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
}

#[derive(Deserialize)]
struct CreateEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    ref_type: String,
    repository: Repository,
}

#[derive(Deserialize)]
struct Head {
    sha: String,
    /// The repository the pull request's commits come from; absent when it
    /// was deleted.
    repo: Option<HeadRepository>,
}

#[derive(Deserialize)]
struct HeadRepository {
    full_name: String,
}

#[derive(Deserialize)]
struct BaseRepository {
    full_name: Option<String>,
    #[serde(flatten)]
    repository: Repository,
}

#[derive(Deserialize)]
struct Base {
    repo: BaseRepository,
}

#[derive(Deserialize)]
struct PullRequest {
    head: Head,
    base: Base,
}

#[derive(Deserialize)]
struct PullRequestEvent {
    action: String,
    number: u64,
    pull_request: PullRequest,
}

enum Plan {
    Build(Box<Build>),
    Ignore(String),
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed payload: {e}")))
}

fn valid_commit(sha: &str) -> Result<String, ApiError> {
    if (7..=64).contains(&sha.len()) && sha.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(sha.to_ascii_lowercase())
    } else {
        Err(ApiError::bad_request(format!("{sha:?} is not a commit id")))
    }
}

/// What a delivery asks for, checked against the build scripts.
fn plan(
    event: &str,
    body: &[u8],
    catalog: &Catalog,
    now: OffsetDateTime,
) -> Result<Plan, ApiError> {
    let bad = |e: decap_core::Error| ApiError::bad_request(e.to_string());
    let mut from_fork = false;
    let (key, git_ref, commit, gated) = match event {
        "push" => {
            let p: PushEvent = parse(body)?;
            let key = p.repository.key()?;
            let deleted = p.deleted
                || p.after
                    .as_deref()
                    .is_some_and(|a| a.chars().all(|c| c == '0'));
            if deleted {
                return Ok(Plan::Ignore(format!("{} was deleted", p.git_ref)));
            }
            let git_ref = GitRef::parse(&p.git_ref).map_err(bad)?;
            let commit = p.after.as_deref().map(valid_commit).transpose()?;
            (key, git_ref, commit, true)
        }
        "create" => {
            let c: CreateEvent = parse(body)?;
            let key = c.repository.key()?;
            let git_ref = match c.ref_type.as_str() {
                "branch" => GitRef::branch(&c.git_ref).map_err(bad)?,
                "tag" => GitRef::tag(&c.git_ref).map_err(bad)?,
                other => return Ok(Plan::Ignore(format!("ref type {other:?} is not built"))),
            };
            (key, git_ref, None, true)
        }
        "ping" => {
            let ping: PingEvent = parse(body)?;
            let Some(repo) = ping.repository else {
                return Ok(Plan::Ignore("a ping names no repository".into()));
            };
            let key = repo.repository.key()?;
            let branch = repo.default_branch.as_deref().unwrap_or("main");
            (key, GitRef::branch(branch).map_err(bad)?, None, false)
        }
        "pull_request" => {
            let pr: PullRequestEvent = parse(body)?;
            if !matches!(pr.action.as_str(), "opened" | "synchronize" | "reopened") {
                return Ok(Plan::Ignore(format!(
                    "pull request action {:?} is not built",
                    pr.action
                )));
            }
            let key = pr.pull_request.base.repo.repository.key()?;
            let commit = valid_commit(&pr.pull_request.head.sha)?;
            // A pull request from another repository (a fork, or one whose
            // repository is gone) is someone else's code: it gets no secrets.
            let base = pr.pull_request.base.repo.full_name.as_deref();
            let head = pr
                .pull_request
                .head
                .repo
                .as_ref()
                .map(|r| r.full_name.as_str());
            from_fork = head.is_none() || head != base;
            (key, GitRef::pull(pr.number), Some(commit), false)
        }
        other => return Ok(Plan::Ignore(format!("event {other:?} is not handled"))),
    };
    let Some(entry) = catalog.project(&key) else {
        return Ok(Plan::Ignore(format!(
            "no project {key} in the build scripts"
        )));
    };
    let Some(descriptor) = entry.valid_descriptor() else {
        return Ok(Plan::Ignore(format!(
            "project {key} cannot build: {}",
            entry.error.as_deref().unwrap_or("invalid")
        )));
    };
    if gated && !descriptor.manages(&git_ref.name) {
        return Ok(Plan::Ignore(format!(
            "{} does not match managedRefRegex",
            git_ref.name
        )));
    }
    let mut build = Build::new(key, &git_ref, commit, Trigger::Webhook, now);
    build.from_fork = from_fork;
    Ok(Plan::Build(Box::new(build)))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("missing header {name}")))
}

/// The handler.
/// The memory all webhook bodies being read may hold together, in KiB.
const BODY_BUDGET_KIB: usize = 64 * 1024;
/// Bodies up to this size are read without taking from the budget (a
/// thousand of them at once hold 64 MiB at most).
const SMALL_BODY: u64 = 64 * 1024;
/// How long a webhook body may take to arrive (GitHub gives up after 10 s).
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(10);

fn body_budget() -> &'static tokio::sync::Semaphore {
    static BUDGET: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    BUDGET.get_or_init(|| tokio::sync::Semaphore::new(BODY_BUDGET_KIB))
}

/// Reads a webhook's body only once its headers could be from GitHub: a
/// secret is set, the event, delivery and signature headers are there, and
/// `Content-Length` says a size under the cap. A large body takes its size
/// from a shared budget while it is read, so held connections cannot make
/// the server buffer without bound; every body must arrive within 10 s.
async fn read_body(
    app: &AppState,
    req: axum::extract::Request,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let headers = req.headers().clone();
    if app.auth.webhook_secrets.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhooks are refused: no secret is configured (set DECAP_GITHUB_WEBHOOK_SECRET)",
        ));
    }
    header(&headers, "x-github-event")?;
    header(&headers, "x-github-delivery")?;
    let sig = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing X-Hub-Signature-256"))?;
    if !sig.starts_with("sha256=") || sig.len() != 71 {
        return Err(ApiError::unauthorized(
            "X-Hub-Signature-256 must be sha256=<64 hex digits>",
        ));
    }
    let length: u64 = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "a webhook must say its Content-Length",
            )
        })?;
    if length > crate::MAX_WEBHOOK_BYTES as u64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a webhook body is at most {} bytes",
                crate::MAX_WEBHOOK_BYTES
            ),
        ));
    }
    let _permit = if length > SMALL_BODY {
        let kib = u32::try_from(length.div_ceil(1024)).unwrap_or(u32::MAX);
        let taken = tokio::time::timeout(BODY_TIME, body_budget().acquire_many(kib)).await;
        match taken {
            Ok(Ok(p)) => Some(p),
            _ => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many large webhook bodies are arriving at once; try again",
                ));
            }
        }
    } else {
        None
    };
    let limit = usize::try_from(length).unwrap_or(usize::MAX);
    let body = tokio::time::timeout(BODY_TIME, axum::body::to_bytes(req.into_body(), limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the webhook body did not arrive within 10 s",
            )
        })?
        .map_err(|e| ApiError::bad_request(format!("the webhook body could not be read: {e}")))?;
    Ok((headers, body))
}

pub async fn github(State(app): State<AppState>, req: axum::extract::Request) -> Response {
    let started = Instant::now();
    let read = read_body(&app, req).await;
    let handled = match read {
        Ok((headers, body)) => handle(&app, &headers, &body).await,
        Err(e) => Err(e),
    };
    let (outcome, response) = match handled {
        Ok((outcome, r)) => (outcome, r),
        Err(e) => {
            let outcome = match e.status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::BAD_REQUEST => "malformed",
                _ => "error",
            };
            (outcome, e.into_response())
        }
    };
    app.controller.metrics.webhook(outcome);
    app.controller
        .metrics
        .webhook_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(&'static str, Response), ApiError> {
    if app.auth.webhook_secrets.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhooks are refused: no secret is configured (set DECAP_GITHUB_WEBHOOK_SECRET)",
        ));
    }
    let event = header(headers, "x-github-event")?.to_owned();
    let delivery = header(headers, "x-github-delivery")?.to_owned();
    if delivery.len() > 128 {
        return Err(ApiError::bad_request(
            "X-GitHub-Delivery is longer than 128 characters",
        ));
    }
    app.auth.verify_signature(headers, body)?;
    // A ping of a repository hook whose repository is a project builds its
    // default branch: the first build after subscribing. Other pings only
    // get an answer.
    let first_build = event == "ping" && {
        let ping: PingEvent = parse(body)?;
        ping.repository.is_some_and(|r| {
            r.repository
                .key()
                .is_ok_and(|k| app.controller.ports.scripts.catalog().project(&k).is_some())
        })
    };
    if event == "ping" && !first_build {
        let answer = WebhookAnswer {
            delivery,
            builds: vec![],
            pipeline_run: None,
            ignored: Some("ping".into()),
        };
        return Ok(("ping", (StatusCode::OK, Json(answer)).into_response()));
    }
    let now = OffsetDateTime::now_utc();
    let catalog = app.controller.ports.scripts.catalog();
    let plan = plan(&event, body, &catalog, now)?;
    let (run, builds, ignored) = match plan {
        Plan::Build(mut b) => {
            b.delivery = Some(delivery.clone());
            // A project with a pipeline gets a run, and its first stages.
            let (run, builds) = match catalog.project(&b.project) {
                Some(entry) => {
                    if entry.pipeline.is_some() {
                        app.controller.remember_catalog(&catalog);
                    }
                    crate::controller::builds_for(entry, *b, &catalog.commit)
                }
                None => (None, vec![*b]),
            };
            (run, builds, None)
        }
        Plan::Ignore(reason) => (None, vec![], Some(reason)),
    };
    let record = Delivery {
        id: delivery.clone(),
        event,
        outcome: match &ignored {
            None => "built".into(),
            Some(r) => format!("ignored: {r}"),
        },
        received_at: now,
    };
    match app
        .controller
        .ports
        .builds
        .insert_delivery(&record, &builds)
        .await?
    {
        DeliveryOutcome::Duplicate(first) => {
            let answer = WebhookAnswer {
                delivery,
                builds: first.iter().map(|id| id.to_string()).collect(),
                pipeline_run: None,
                ignored: Some("repeated delivery".into()),
            };
            Ok(("duplicate", (StatusCode::OK, Json(answer)).into_response()))
        }
        DeliveryOutcome::New => {
            if let Some(run) = &run {
                // Made again from its builds if this fails (they are stored).
                if let Err(e) = app
                    .controller
                    .record_runs(std::slice::from_ref(run), &builds)
                    .await
                {
                    tracing::warn!(run = %run.id, error = %e, "cannot store a pipeline run yet");
                }
            }
            let answer_ids: Vec<String> = builds.iter().map(|b| b.id.to_string()).collect();
            if !builds.is_empty() {
                app.controller.schedule_soon(builds);
            }
            let outcome = if ignored.is_some() {
                "ignored"
            } else {
                "built"
            };
            let answer = WebhookAnswer {
                delivery,
                builds: answer_ids,
                pipeline_run: run.map(|r| r.id.to_string()),
                ignored,
            };
            Ok((
                outcome,
                (StatusCode::ACCEPTED, Json(answer)).into_response(),
            ))
        }
    }
}

/// `POST /hooks/buildscripts`: refresh the build scripts now. Accepted when
/// signed with a webhook secret or authorized like any mutating call.
pub async fn buildscripts(
    State(app): State<AppState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let peer = crate::auth::peer(&req);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB"))?;
    let signed = parts.headers.contains_key("x-hub-signature-256")
        && app.auth.verify_signature(&parts.headers, &body).is_ok();
    if !signed {
        app.auth.authorize(&parts.headers, peer)?;
    }
    let scripts = app.controller.ports.scripts.clone();
    tokio::spawn(async move {
        if let Err(e) = scripts.refresh().await {
            tracing::warn!(error = %e, "refreshing the build scripts failed; keeping the previous catalog");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"refresh": "started"})),
    )
        .into_response())
}
