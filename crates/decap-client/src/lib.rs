//! A typed client of Decap's HTTP API.
//!
//! Errors say what a person can do about them: an unreachable server names
//! the URL and how to start or point at one; an API error carries the
//! server's own message.
#![deny(missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use decap_api_types::{
    BuildResult, BuildView, BuildsCreated, BuildsPage, DeferredList, ErrorBody, Locks, LogLevel,
    Projects, QueueOpen, QueueState, SecretNames, Version,
};
use futures::{Stream, TryStreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

/// What went wrong talking to Decap.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error(
        "cannot reach Decap at {url}: {reason}. Is `decap serve` running there? Point at another server with --server or DECAP_URL."
    )]
    Unreachable {
        /// The server URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The status.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from Decap: {0}")]
    Protocol(String),
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// Whether trying again may help (the server is down or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// The client's result.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Whose secrets a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretScope<'a> {
    /// Every project of a team.
    Team(&'a str),
    /// One project: team and project.
    Project(&'a str, &'a str),
}

impl SecretScope<'_> {
    fn path(&self) -> String {
        match self {
            SecretScope::Team(team) => format!("/api/v1/team-secrets/{}", enc(team)),
            SecretScope::Project(team, project) => {
                format!("/api/v1/secrets/{}/{}", enc(team), enc(project))
            }
        }
    }
}

/// A client of one Decap server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

fn enc(segment: &str) -> String {
    // Path segments here are validated names and UUIDs; escape anything else.
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query_value(v: &str) -> String {
    enc(v)
}

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:9090`), sending
    /// `token` as a bearer token when given.
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The server URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = format!("{reason}: {s}");
                source = s.source();
            }
            ClientError::Unreachable {
                url: self.base.clone(),
                reason,
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                if text.is_empty() {
                    status.to_string()
                } else {
                    text.trim().to_owned()
                }
            });
        Err(ClientError::Api { status, message })
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET /api/v1/version`.
    pub async fn version(&self) -> Result<Version> {
        self.json(self.request(Method::GET, "/api/v1/version"))
            .await
    }

    /// `GET /api/v1/projects`.
    pub async fn projects(&self) -> Result<Projects> {
        self.json(self.request(Method::GET, "/api/v1/projects"))
            .await
    }

    /// `GET /api/v1/builds/{team}/{project}`.
    pub async fn builds(
        &self,
        team: &str,
        project: &str,
        branch: Option<&str>,
        status: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<BuildsPage> {
        let mut q = vec![format!("limit={limit}")];
        if let Some(b) = branch {
            q.push(format!("branch={}", query_value(b)));
        }
        if let Some(s) = status {
            q.push(format!("status={}", query_value(s)));
        }
        if let Some(c) = cursor {
            q.push(format!("cursor={}", query_value(c)));
        }
        let path = format!(
            "/api/v1/builds/{}/{}?{}",
            enc(team),
            enc(project),
            q.join("&")
        );
        self.json(self.request(Method::GET, &path)).await
    }

    /// `POST /api/v1/builds/{team}/{project}?branch=…`.
    pub async fn create_builds(
        &self,
        team: &str,
        project: &str,
        branches: &[String],
    ) -> Result<BuildsCreated> {
        let q: Vec<String> = branches
            .iter()
            .map(|b| format!("branch={}", query_value(b)))
            .collect();
        let path = format!(
            "/api/v1/builds/{}/{}?{}",
            enc(team),
            enc(project),
            q.join("&")
        );
        self.json(self.request(Method::POST, &path)).await
    }

    /// `GET /api/v1/pipelines/{team}/{project}`: a project's runs, newest
    /// first.
    pub async fn pipeline_runs(
        &self,
        team: &str,
        project: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<decap_api_types::PipelineRunsPage> {
        let mut path = format!(
            "/api/v1/pipelines/{}/{}?limit={limit}",
            enc(team),
            enc(project)
        );
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={}", query_value(c)));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `GET /api/v1/pipeline-runs/{id}`.
    pub async fn pipeline_run(&self, id: &str) -> Result<decap_api_types::PipelineRunView> {
        self.json(self.request(Method::GET, &format!("/api/v1/pipeline-runs/{}", enc(id))))
            .await
    }

    /// `POST /api/v1/pipeline-runs/{id}/stages/{stage}/rerun` or
    /// `…/approve` (`approve`).
    pub async fn stage_action(&self, id: &str, stage: &str, approve: bool) -> Result<BuildView> {
        let path = format!(
            "/api/v1/pipeline-runs/{}/stages/{}/{}",
            enc(id),
            enc(stage),
            if approve { "approve" } else { "rerun" }
        );
        self.json(self.request(Method::POST, &path)).await
    }

    /// `GET /api/v1/build/{id}`.
    pub async fn build(&self, id: &str) -> Result<BuildView> {
        self.json(self.request(Method::GET, &format!("/api/v1/build/{}", enc(id))))
            .await
    }

    /// `DELETE /api/v1/build/{id}`.
    pub async fn cancel(&self, id: &str) -> Result<BuildView> {
        self.json(self.request(Method::DELETE, &format!("/api/v1/build/{}", enc(id))))
            .await
    }

    /// `POST /api/v1/build/{id}/rerun`.
    pub async fn rerun(&self, id: &str) -> Result<BuildView> {
        self.json(self.request(Method::POST, &format!("/api/v1/build/{}/rerun", enc(id))))
            .await
    }

    /// `GET /api/v1/logs/{id}`, as a byte stream.
    pub async fn log(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        self.log_from(id, follow, 0).await
    }

    /// `GET /api/v1/logs/{id}?offset=…`: the log from byte `offset` on
    /// (to resume a follow that broke).
    pub async fn log_from(
        &self,
        id: &str,
        follow: bool,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let path = format!("/api/v1/logs/{}?follow={follow}&offset={offset}", enc(id));
        let resp = self.send(self.request(Method::GET, &path)).await?;
        Ok(resp
            .bytes_stream()
            .map_err(|e| ClientError::Protocol(format!("the log stream broke: {e}"))))
    }

    /// `GET /api/v1/artifacts/{id}`, as a byte stream.
    pub async fn artifacts(&self, id: &str) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let resp = self
            .send(self.request(Method::GET, &format!("/api/v1/artifacts/{}", enc(id))))
            .await?;
        Ok(resp
            .bytes_stream()
            .map_err(|e| ClientError::Protocol(format!("the download broke: {e}"))))
    }

    /// `GET /api/v1/build/{id}/inputs/{stage}`: the artifacts (a `tar.gz`
    /// byte stream) of the attempt of `stage` that a pipeline stage's build
    /// needs; `None` when that attempt stored none.
    pub async fn input(
        &self,
        id: &str,
        stage: &str,
    ) -> Result<Option<impl Stream<Item = Result<Bytes>> + use<>>> {
        let path = format!("/api/v1/build/{}/inputs/{}", enc(id), enc(stage));
        let resp = self.send(self.request(Method::GET, &path)).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.bytes_stream().map_err(|e| {
            ClientError::Protocol(format!("the download broke: {e}"))
        })))
    }

    /// `GET /api/v1/build/{id}/source?commit=C`: a preset build's tree, a
    /// `tar.gz` byte stream.
    pub async fn source(
        &self,
        id: &str,
        commit: &str,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let resp = self
            .send(self.request(
                Method::GET,
                &format!(
                    "/api/v1/build/{}/source?commit={}",
                    enc(id),
                    query_value(commit)
                ),
            ))
            .await?;
        Ok(resp
            .bytes_stream()
            .map_err(|e| ClientError::Protocol(format!("the download broke: {e}"))))
    }

    /// `GET /api/v1/artifacts/{id}` with `Accept: text/plain`.
    pub async fn artifact_names(&self, id: &str) -> Result<Vec<String>> {
        let rb = self
            .request(Method::GET, &format!("/api/v1/artifacts/{}", enc(id)))
            .header(reqwest::header::ACCEPT, "text/plain");
        let text = self
            .send(rb)
            .await?
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// `GET /api/v1/artifacts/{id}/{path}`, as a byte stream.
    pub async fn artifact_file(
        &self,
        id: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let p: Vec<String> = path.split('/').map(enc).collect();
        let resp = self
            .send(self.request(
                Method::GET,
                &format!("/api/v1/artifacts/{}/{}", enc(id), p.join("/")),
            ))
            .await?;
        Ok(resp
            .bytes_stream()
            .map_err(|e| ClientError::Protocol(format!("the download broke: {e}"))))
    }

    /// `GET /api/v1/deferred`.
    pub async fn deferred(&self) -> Result<DeferredList> {
        self.json(self.request(Method::GET, "/api/v1/deferred"))
            .await
    }

    /// `DELETE /api/v1/deferred/{id}`.
    pub async fn remove_deferred(&self, id: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/deferred/{}", enc(id))))
            .await
            .map(|_| ())
    }

    /// `GET /api/v1/locks`.
    pub async fn locks(&self) -> Result<Locks> {
        self.json(self.request(Method::GET, "/api/v1/locks")).await
    }

    /// `DELETE /api/v1/locks?key=…`.
    pub async fn unlock(&self, key: &str) -> Result<()> {
        let path = format!("/api/v1/locks?key={}", query_value(key));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(|_| ())
    }

    /// `POST /api/v1/github/subscribe/{owner}/{repo}`: Decap registers its
    /// webhook on the repository.
    pub async fn github_subscribe(&self, owner: &str, repo: &str) -> Result<serde_json::Value> {
        let path = format!(
            "/api/v1/github/subscribe/{}/{}",
            query_value(owner),
            query_value(repo)
        );
        self.json(self.request(Method::POST, &path)).await
    }

    /// `GET /api/v1/queue`.
    pub async fn queue(&self) -> Result<QueueState> {
        self.json(self.request(Method::GET, "/api/v1/queue")).await
    }

    /// `PUT /api/v1/queue`.
    pub async fn set_queue(&self, state: QueueOpen) -> Result<QueueState> {
        self.json(
            self.request(Method::PUT, "/api/v1/queue")
                .json(&QueueState { state }),
        )
        .await
    }

    /// `PUT /api/v1/loglevel`.
    pub async fn set_log_level(&self, level: &str) -> Result<LogLevel> {
        self.json(
            self.request(Method::PUT, "/api/v1/loglevel")
                .json(&LogLevel {
                    level: level.to_owned(),
                }),
        )
        .await
    }

    /// How many bytes of a running build's console stream the server has
    /// (where bctool resumes a broken stream): `POST
    /// /api/v1/build/{id}/log/stream` with nothing to add.
    pub async fn log_received(&self, id: &str) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Received {
            received: u64,
        }
        let rb = self
            .request(
                Method::POST,
                &format!("/api/v1/build/{}/log/stream", enc(id)),
            )
            .header(decap_api_types::LOG_OFFSET_HEADER, "0")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(Vec::new());
        let r: Received = self.json(rb).await?;
        Ok(r.received)
    }

    /// bctool: streams console bytes starting at `offset`.
    pub async fn stream_log(&self, id: &str, offset: u64, body: reqwest::Body) -> Result<()> {
        let rb = self
            .request(
                Method::POST,
                &format!("/api/v1/build/{}/log/stream", enc(id)),
            )
            .header(decap_api_types::LOG_OFFSET_HEADER, offset.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(rb).await.map(|_| ())
    }

    /// `PUT /api/v1/details/{owner}/{repo}/{commit}/{file}`: a detail file of
    /// a CI run, kept `days`; answers its link.
    pub async fn put_detail(
        &self,
        owner: &str,
        repo: &str,
        commit: &str,
        file: &str,
        days: u32,
        body: reqwest::Body,
    ) -> Result<String> {
        let file: Vec<String> = file.split('/').map(enc).collect();
        let path = format!(
            "/api/v1/details/{}/{}/{}/{}",
            enc(owner),
            enc(repo),
            enc(commit),
            file.join("/")
        );
        let rb = self
            .request(Method::PUT, &path)
            .header("x-decap-expire-days", days.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let v: serde_json::Value = self.json(rb).await?;
        Ok(v["url"].as_str().unwrap_or_default().to_owned())
    }

    /// bctool: uploads the gzipped console log.
    pub async fn put_log(&self, id: &str, body: reqwest::Body) -> Result<()> {
        let rb = self
            .request(Method::PUT, &format!("/api/v1/logs/{}", enc(id)))
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(body);
        self.send(rb).await.map(|_| ())
    }

    /// bctool: uploads the artifacts tar.gz.
    pub async fn put_artifacts(&self, id: &str, body: reqwest::Body) -> Result<()> {
        let rb = self
            .request(Method::PUT, &format!("/api/v1/artifacts/{}", enc(id)))
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(body);
        self.send(rb).await.map(|_| ())
    }

    /// bctool: records the result.
    pub async fn post_result(&self, id: &str, result: &BuildResult) -> Result<BuildView> {
        self.json(
            self.request(Method::POST, &format!("/api/v1/build/{}/result", enc(id)))
                .json(result),
        )
        .await
    }

    /// `PUT /api/v1/secrets/{team}/{project}/{name}` (or the team's): sets
    /// a secret; the value is the request's body and is never answered back.
    pub async fn set_secret(
        &self,
        scope: SecretScope<'_>,
        name: &str,
        value: String,
    ) -> Result<()> {
        let rb = self
            .request(Method::PUT, &format!("{}/{}", scope.path(), enc(name)))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(value);
        self.send(rb).await.map(|_| ())
    }

    /// `GET /api/v1/secrets/{team}/{project}` (or the team's): the names of
    /// a scope's secrets.
    pub async fn secret_names(&self, scope: SecretScope<'_>) -> Result<SecretNames> {
        self.json(self.request(Method::GET, &scope.path())).await
    }

    /// `DELETE /api/v1/secrets/{team}/{project}/{name}` (or the team's).
    pub async fn remove_secret(&self, scope: SecretScope<'_>, name: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("{}/{}", scope.path(), enc(name))))
            .await
            .map(|_| ())
    }

    /// bctool: releases the build's lock early.
    pub async fn unlock_build(&self, id: &str) -> Result<bool> {
        let v: serde_json::Value = self
            .json(self.request(Method::POST, &format!("/api/v1/build/{}/unlock", enc(id))))
            .await?;
        Ok(v.get("released").and_then(|r| r.as_bool()).unwrap_or(false))
    }
}
