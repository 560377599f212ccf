//! Decap's controller webapp: the axum router (webhooks, REST API, live logs,
//! health and metrics) over the [`controller::Controller`], which drives the
//! core's ports.
//!
//! The server is a library so that tests can drive the router with
//! `oneshot` and the `decap` binary stays thin.

pub mod api;
pub mod auth;
pub mod controller;
pub mod error;
pub mod livelog;
pub mod metrics;
pub mod webhook;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use decap_api_types::Version;

pub use auth::AuthConfig;
pub use controller::{Controller, ControllerConfig, ExecutorEventsChannel, Finish, Ports};

/// The largest webhook body accepted (GitHub sends at most 25 MiB).
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// Sets the log filter at run time (`PUT /api/v1/loglevel`).
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Everything the handlers share.
pub struct Server {
    /// The controller.
    pub controller: Arc<Controller>,
    /// Credentials.
    pub auth: AuthConfig,
    /// The version answered by `/api/v1/version`.
    pub version: Version,
    /// The log filter, when reloadable.
    pub set_log_level: Option<LogLevelSetter>,
}

/// The handlers' state.
pub type AppState = Arc<Server>;

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/version", get(api::version))
        .route("/teams", get(api::teams))
        .route("/projects", get(api::projects))
        .route("/projects/{team}/{project}/refs", get(api::refs))
        .route(
            "/builds/{team}/{project}",
            get(api::list_builds).post(api::create_builds),
        )
        .route("/stats/{team}/{project}", get(api::project_stats))
        .route("/build/{id}", get(api::get_build).delete(api::cancel_build))
        .route("/build/{id}/rerun", post(api::rerun_build))
        .route("/build/{id}/result", post(api::put_result))
        .route("/build/{id}/metadata", post(api::record_metadata))
        .route("/build/{id}/unlock", post(api::unlock_build))
        .route("/build/{id}/log/stream", post(api::stream_log))
        .route("/logs/{id}", get(api::get_log).put(api::put_log))
        .route("/logs/{id}/events", get(api::log_events))
        .route(
            "/artifacts/{id}",
            get(api::get_artifacts).put(api::put_artifacts),
        )
        .route("/artifacts/{id}/{*path}", get(api::get_artifact_file))
        .route("/deferred", get(api::list_deferred))
        .route(
            "/deferred/{id}",
            axum::routing::delete(api::remove_deferred),
        )
        .route("/locks", get(api::list_locks).delete(api::unlock))
        .route("/queue", get(api::get_queue).put(api::put_queue))
        .route("/loglevel", put(api::put_loglevel));
    Router::new()
        .route(
            "/hooks/github",
            post(webhook::github).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES)),
        )
        .route("/hooks/buildscripts", post(webhook::buildscripts))
        .nest("/api/v1", api)
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .fallback(|| async {
            error::ApiError::new(axum::http::StatusCode::NOT_FOUND, "no such page")
        })
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
