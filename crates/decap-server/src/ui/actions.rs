//! What a person does from the pages: build a branch, rerun, cancel, unlock, open or close the queue.

use super::{Peer, core_error_page, error_page, not_found_page, refuse_action, refuse_unlock};
use crate::AppState;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use decap_core::build::{BuildId, Trigger};
use decap_core::names::{LockKey, ProjectKey};
use serde::Deserialize;

/// The Build button's form.
#[derive(Deserialize)]
pub struct BuildForm {
    /// The branch or tag.
    pub branch: String,
}

/// `POST /ui/projects/{team}/{project}/build` — builds a branch, then shows
/// the build.
pub async fn build_branch(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<BuildForm>,
) -> Response {
    if let Some(r) = refuse_action(&app, &headers, ci.0).await {
        return r;
    }
    let key = match ProjectKey::new(&team, &project) {
        Ok(k) => k,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a project name",
                &e.to_string(),
            );
        }
    };
    let branch = form.branch.trim().to_owned();
    match app
        .controller
        .request_builds(&key, &[branch], Trigger::Manual)
        .await
    {
        Ok(builds) => match builds.first() {
            Some(b) => go(&headers, &format!("/builds/{}", b.id)),
            None => go(&headers, &format!("/projects/{team}/{project}")),
        },
        Err(e) => core_error_page(e),
    }
}

/// `POST /ui/projects/{team}/{project}/subscribe` — registers Decap's
/// webhook on the project's GitHub repository, then shows the project.
pub async fn subscribe(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    if let Some(r) = refuse_action(&app, &headers, ci.0).await {
        return r;
    }
    match crate::github::subscribe(&app, &team, &project).await {
        Ok(_) => go(
            &headers,
            &format!("/projects/{team}/{project}?subscribed=1"),
        ),
        Err(e) => error_page(e.status, "GitHub did not take the webhook", &e.message),
    }
}

/// The common part of an action on one build: the check, the id, the
/// answer.
async fn on_build<F, Fut>(
    app: &AppState,
    id: &str,
    headers: &HeaderMap,
    ci: Peer,
    act: F,
) -> Response
where
    F: FnOnce(std::sync::Arc<crate::Controller>, BuildId) -> Fut,
    Fut: std::future::Future<Output = decap_core::Result<String>>,
{
    if let Some(r) = refuse_action(app, headers, ci.0).await {
        return r;
    }
    let Ok(id) = BuildId::parse(id) else {
        return not_found_page("That is not a build id.");
    };
    match act(app.controller.clone(), id).await {
        Ok(to) => go(headers, &to),
        Err(e) => core_error_page(e),
    }
}

/// Does `act` for a person who may act, then goes where it says.
pub(super) async fn act_on<F, Fut>(
    app: &AppState,
    headers: &HeaderMap,
    ci: Peer,
    act: F,
) -> Response
where
    F: FnOnce(std::sync::Arc<crate::Controller>) -> Fut,
    Fut: std::future::Future<Output = decap_core::Result<String>>,
{
    if let Some(r) = refuse_action(app, headers, ci.0).await {
        return r;
    }
    match act(app.controller.clone()).await {
        Ok(to) => go(headers, &to),
        Err(e) => core_error_page(e),
    }
}

/// `POST /ui/builds/{id}/rerun`.
pub async fn rerun(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        Ok(format!("/builds/{}", c.rerun(id).await?.id))
    })
    .await
}

/// `POST /ui/builds/{id}/cancel`.
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        Ok(format!("/builds/{}", c.cancel(id).await?.id))
    })
    .await
}

/// `POST /ui/deferred/{id}/remove`.
pub async fn remove_deferred(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ci: Peer,
) -> Response {
    on_build(&app, &id, &headers, ci, |c, id| async move {
        c.remove_deferred(id).await?;
        Ok("/queue".to_owned())
    })
    .await
}

/// The Unlock button's form.
#[derive(Deserialize)]
pub struct UnlockForm {
    /// `team/project/branch`.
    pub key: String,
}

/// `POST /ui/locks/unlock`.
pub async fn unlock(
    State(app): State<AppState>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<UnlockForm>,
) -> Response {
    if let Some(r) = refuse_unlock(&app, &headers, ci.0).await {
        return r;
    }
    let key = match LockKey::parse(&form.key) {
        Ok(k) => k,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, "Not a lock key", &e.to_string()),
    };
    match app.controller.force_unlock(&key).await {
        Ok(_) => go(&headers, "/queue"),
        Err(e) => core_error_page(e),
    }
}

/// The queue switch's form.
#[derive(Deserialize)]
pub struct QueueForm {
    /// `open` or `closed`.
    pub state: String,
}

/// `POST /ui/queue`.
pub async fn set_queue(
    State(app): State<AppState>,
    headers: HeaderMap,
    ci: Peer,
    Form(form): Form<QueueForm>,
) -> Response {
    if let Some(r) = refuse_unlock(&app, &headers, ci.0).await {
        return r;
    }
    let open = match form.state.as_str() {
        "open" => true,
        "closed" => false,
        other => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Not a queue state",
                &format!("{other:?} is neither open nor closed"),
            );
        }
    };
    match app.controller.set_queue_open(open).await {
        Ok(()) => go(&headers, "/queue"),
        Err(e) => core_error_page(e),
    }
}

/// After an action: htmx follows `HX-Location`, a plain form a 303.
fn go(headers: &HeaderMap, to: &str) -> Response {
    if headers.contains_key("hx-request") {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert("hx-location", v);
        }
        r
    } else {
        Redirect::to(to).into_response()
    }
}

// ------------------------------------------------------------------ login
