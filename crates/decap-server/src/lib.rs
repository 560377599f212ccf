//! Decap's controller webapp: the axum router (webhooks, REST API, live logs,
//! health and metrics) over the [`controller::Controller`], which drives the
//! core's ports.
//!
//! The server is a library so that tests can drive the router with
//! `oneshot` and the `decap` binary stays thin.

pub mod api;
pub mod auth;
pub mod comments;
pub mod controller;
pub mod details;
pub mod error;
pub mod github;
pub mod hub;
pub mod listen;
pub mod livelog;
pub mod metrics;
pub mod oauth;
pub mod secrets;
pub mod session;
pub mod statuses;
pub mod streams;
pub mod ui;
pub mod uploads;
pub mod webhook;

use std::sync::Arc;

use axum::Router;
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
    /// The CI status hub, when on.
    pub hub: Option<Arc<hub::Hub>>,
    /// Webhook subscriptions at GitHub, when a token is set.
    pub github_hooks: Option<Arc<dyn decap_core::ports::RepositoryHooks>>,
    /// Branches and tags from GitHub (ETag-cached), when a token is set;
    /// `git ls-remote` otherwise.
    pub github_refs: Option<Arc<dyn decap_core::ports::RepositoryRefs>>,
    /// Detail files of CI runs (`decapctl notify-pr`), when kept here.
    pub details: Option<Arc<dyn decap_core::ports::DetailStore>>,
    /// Logging in with GitHub, when an OAuth App is configured.
    pub oauth: Option<Arc<oauth::GitHubLogin>>,
    /// Builds' secrets, when kept (the secrets routes answer `503` without).
    pub secrets: Option<Arc<dyn decap_core::ports::SecretStore>>,
    /// Who is logged in to the web UI (with the token or with GitHub).
    pub sessions: session::Sessions,
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
        .route("/build/{id}/source", get(api::get_source))
        .route("/build/{id}/inputs/{stage}", get(api::get_input))
        .route("/pipelines/{team}/{project}", get(api::list_pipeline_runs))
        .route("/pipeline-runs/{id}", get(api::get_pipeline_run))
        .route(
            "/pipeline-runs/{id}/stages/{stage}/rerun",
            post(api::rerun_stage),
        )
        .route(
            "/pipeline-runs/{id}/stages/{stage}/approve",
            post(api::approve_stage),
        )
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
        .route("/loglevel", put(api::put_loglevel))
        .route("/hub", get(hub::states))
        .route(
            "/github/subscribe/{owner}/{repo}",
            post(github::subscribe_api),
        )
        .route(
            "/details/{owner}/{repo}/{commit}/{*file}",
            put(details::put),
        )
        .route(
            "/secrets/{team}/{project}",
            get(secrets::list_project_secrets),
        )
        .route(
            "/secrets/{team}/{project}/{name}",
            put(secrets::put_project_secret).delete(secrets::delete_project_secret),
        )
        .route("/team-secrets/{team}", get(secrets::list_team_secrets))
        .route(
            "/team-secrets/{team}/{name}",
            put(secrets::put_team_secret).delete(secrets::delete_team_secret),
        );
    let app = Router::new()
        .route("/hooks/github", post(webhook::github))
        .route("/hooks/buildscripts", post(webhook::buildscripts))
        .route(
            "/details/{owner}/{repo}/{commit}/{*file}",
            get(details::get),
        )
        .route("/api/build_status", post(hub::build_status))
        .route("/api/build/lock", post(hub::lock))
        .route("/api/build/unlock", post(hub::unlock))
        .route(
            "/api/projects/{name}",
            axum::routing::delete(hub::delete_project),
        )
        .nest("/api/v1", api)
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/", get(ui::dashboard))
        .route("/projects", get(ui::projects))
        .route("/projects/{team}/{project}", get(ui::project))
        .route("/builds/{id}", get(ui::build))
        .route("/queue", get(ui::queue))
        .route("/login", get(ui::login_form).post(ui::login))
        .route("/login/github", get(oauth::start))
        .route("/login/github/callback", get(oauth::callback))
        .route("/logout", post(ui::logout))
        .route("/assets/{name}", get(ui::asset))
        .route("/ui/events", get(ui::events))
        .route("/ui/refs/{team}/{project}", get(ui::refs_fragment))
        .route(
            "/ui/projects/{team}/{project}/build",
            post(ui::build_branch),
        )
        .route(
            "/ui/projects/{team}/{project}/subscribe",
            post(ui::subscribe),
        )
        .route("/ui/builds/{id}/rerun", post(ui::rerun))
        .route(
            "/ui/pipeline-runs/{id}/stages/{stage}/rerun",
            post(ui::rerun_stage),
        )
        .route(
            "/ui/pipeline-runs/{id}/stages/{stage}/approve",
            post(ui::approve_stage),
        )
        .route("/ui/builds/{id}/cancel", post(ui::cancel))
        .route("/ui/deferred/{id}/remove", post(ui::remove_deferred))
        .route("/ui/locks/unlock", post(ui::unlock))
        .route("/ui/queue", post(ui::set_queue))
        .fallback(|headers: axum::http::HeaderMap| async move {
            // Browsers get a page, programs JSON.
            let wants_html = headers
                .get(axum::http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
            if wants_html {
                ui::not_found_page("There is no such page.")
            } else {
                axum::response::IntoResponse::into_response(error::ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "no such page",
                ))
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ui::guard_reads,
        ))
        .layer(axum::middleware::map_request(body_timeout));
    with_security_headers(app)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The `Content-Security-Policy` of every response that sets none of its
/// own: the UI runs only its own scripts and styles from `/assets` (no
/// inline code, no inline style), talks only to this server (its event
/// streams), is never framed, and posts forms only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Gives every response of `router` the security headers it did not set
/// itself (the detail files keep their stricter sandbox policy).
fn with_security_headers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    use axum::http::{HeaderValue, header};
    use tower_http::set_header::SetResponseHeaderLayer as Set;
    router
        .layer(Set::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(Set::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(Set::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(Set::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ))
}

/// How long a request body may go without sending anything.
pub const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Request bodies that stall for [`BODY_IDLE`] fail, so that a client that
/// stops sending cannot hold a handler (and its buffers) forever; bctool's
/// live console stream, idle whenever the build prints nothing, is exempt.
async fn body_timeout(req: axum::extract::Request) -> axum::extract::Request {
    if req.uri().path().ends_with("/log/stream") {
        return req;
    }
    req.map(|b| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(BODY_IDLE, b)))
}
