//! Builds' secrets over HTTP: set, list names, remove. No route answers a
//! value: values go only to builds, at launch.
//!
//! | route | answer |
//! | --- | --- |
//! | `PUT /api/v1/secrets/{team}/{project}/{name}` | `204`; the body is the value |
//! | `GET /api/v1/secrets/{team}/{project}` | `{"secrets": [names]}` |
//! | `DELETE /api/v1/secrets/{team}/{project}/{name}` | `204`, `404` when there is none |
//! | `PUT`, `GET`, `DELETE` `/api/v1/team-secrets/{team}[/{name}]` | the same for a whole team |
//!
//! Every route needs the API token, listing too: which secrets exist is
//! not public. A value is refused from its `Content-Length` before it is
//! read when it is too large, and cut off at the cap otherwise.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use decap_api_types::SecretNames;
use decap_core::ports::SecretStore;
use decap_core::secrets::{MAX_SECRET_VALUE_BYTES, SecretName, SecretScope, SecretValue};

use crate::AppState;
use crate::auth::peer;
use crate::error::{ApiError, ApiResult};

fn store(app: &AppState) -> ApiResult<&Arc<dyn SecretStore>> {
    app.secrets.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server keeps no secrets: it was started without a secret store",
        )
    })
}

fn bad(e: decap_core::Error) -> ApiError {
    ApiError::bad_request(e.to_string())
}

fn project_scope(team: &str, project: &str) -> ApiResult<SecretScope> {
    SecretScope::project(team, project).map_err(bad)
}

fn team_scope(team: &str) -> ApiResult<SecretScope> {
    SecretScope::team(team).map_err(bad)
}

/// Checks the store, the name and the value, then stores it. The caller
/// was checked first, so that nothing is told about the request to others.
async fn set(
    app: AppState,
    scope: SecretScope,
    name: String,
    req: Request,
) -> ApiResult<StatusCode> {
    let store = store(&app)?;
    let name = SecretName::new(&name).map_err(bad)?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a secret's value is at most {MAX_SECRET_VALUE_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_SECRET_VALUE_BYTES as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(req.into_body(), MAX_SECRET_VALUE_BYTES)
        .await
        .map_err(|e| {
            let past_cap = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if past_cap {
                too_large()
            } else {
                // It stalled or broke off.
                ApiError::bad_request(format!("cannot read the value: {e}"))
            }
        })?;
    let value = SecretValue::from_bytes(body.into()).map_err(bad)?;
    store.set(&scope, &name, &value).await?;
    tracing::info!(scope = %scope, name = %name, "secret set");
    Ok(StatusCode::NO_CONTENT)
}

async fn list(app: AppState, scope: SecretScope) -> ApiResult<Json<SecretNames>> {
    let store = store(&app)?;
    Ok(Json(SecretNames {
        secrets: store.names(&scope).await?,
    }))
}

async fn remove(app: AppState, scope: SecretScope, name: String) -> ApiResult<StatusCode> {
    let store = store(&app)?;
    let name = SecretName::new(&name).map_err(bad)?;
    if store.remove(&scope, &name).await? {
        tracing::info!(scope = %scope, name = %name, "secret removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("secret {name} of {scope}")))
    }
}

/// `PUT /api/v1/secrets/{team}/{project}/{name}`: the body is the value.
pub async fn put_project_secret(
    State(app): State<AppState>,
    Path((team, project, name)): Path<(String, String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    set(app, project_scope(&team, &project)?, name, req).await
}

/// `GET /api/v1/secrets/{team}/{project}`: the names only.
pub async fn list_project_secrets(
    State(app): State<AppState>,
    Path((team, project)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Json<SecretNames>> {
    app.auth.authorize(req.headers(), peer(&req))?;
    list(app, project_scope(&team, &project)?).await
}

/// `DELETE /api/v1/secrets/{team}/{project}/{name}`.
pub async fn delete_project_secret(
    State(app): State<AppState>,
    Path((team, project, name)): Path<(String, String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    remove(app, project_scope(&team, &project)?, name).await
}

/// `PUT /api/v1/team-secrets/{team}/{name}`: a secret of every project of
/// the team (a project's own secret of the same name wins).
pub async fn put_team_secret(
    State(app): State<AppState>,
    Path((team, name)): Path<(String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    set(app, team_scope(&team)?, name, req).await
}

/// `GET /api/v1/team-secrets/{team}`: the names only.
pub async fn list_team_secrets(
    State(app): State<AppState>,
    Path(team): Path<String>,
    req: Request,
) -> ApiResult<Json<SecretNames>> {
    app.auth.authorize(req.headers(), peer(&req))?;
    list(app, team_scope(&team)?).await
}

/// `DELETE /api/v1/team-secrets/{team}/{name}`.
pub async fn delete_team_secret(
    State(app): State<AppState>,
    Path((team, name)): Path<(String, String)>,
    req: Request,
) -> ApiResult<StatusCode> {
    app.auth.authorize(req.headers(), peer(&req))?;
    remove(app, team_scope(&team)?, name).await
}
