//! Decap's router in this process, on the embedded adapters and with no
//! sandbox: for tests of the HTTP surface that need no `decap serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use decap_core::schedule::Caps;
use decap_embedded::{
    FileBlobStore, LocalExecutor, LocalExecutorConfig, SandboxMode, SqliteBuildStore, SqliteDb,
    SqliteDeferralQueue, SqliteLockStore,
};
use decap_scripts::{FsScriptsRepo, ScriptsSource};
use decap_server::livelog::LiveLogs;
use decap_server::{
    AuthConfig, Controller, ControllerConfig, ExecutorEventsChannel, Ports, Server,
};

/// A started controller and what it stands on.
pub struct Embedded {
    pub controller: Arc<Controller>,
    pub db: SqliteDb,
    /// The data dir.
    pub data: PathBuf,
    /// Holds the scripts and the data dir.
    pub dir: tempfile::TempDir,
}

/// Starts a controller over the projects `setup` writes into the scripts
/// folder it is given, with `warm` warm bctools, answering as `public_url`.
pub async fn embedded(public_url: &str, warm: usize, setup: impl FnOnce(&Path)) -> Embedded {
    embedded_with(
        Options {
            public_url,
            warm,
            ..Options::default()
        },
        setup,
    )
    .await
}

/// How [`embedded_with`] sets the controller up.
pub struct Options<'a> {
    pub public_url: &'a str,
    pub warm: usize,
    pub caps: Caps,
    /// Where builds reach the server (see [`Embedded::serve`]).
    pub decap_url: &'a str,
    pub drain_interval: Duration,
    /// The executor's exit events never reach the controller.
    pub lose_exits: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            public_url: "http://decap.test",
            warm: 0,
            caps: Caps::default(),
            decap_url: "http://127.0.0.1:9",
            drain_interval: Duration::from_secs(3600),
            lose_exits: false,
        }
    }
}

/// [`embedded`] with more of the controller's settings.
pub async fn embedded_with(o: Options<'_>, setup: impl FnOnce(&Path)) -> Embedded {
    let Options {
        public_url,
        warm,
        caps,
        decap_url,
        drain_interval,
        lose_exits,
    } = o;
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    setup(&scripts);
    let data = dir.path().join("data");
    let db = SqliteDb::open(&data.join("decap.db")).unwrap();
    let (events, exits) = ExecutorEventsChannel::new();
    let executor = LocalExecutor::new(
        LocalExecutorConfig {
            dir: decap_embedded::sandbox::SandboxDir(data.join("sandbox")),
            hide: vec![],
            bctool: vec![env!("CARGO_BIN_EXE_bctool").into()],
            runner: Some(env!("CARGO_BIN_EXE_decap-runner").into()),
            sandbox: SandboxMode::None,
            network: decap_embedded::NetworkMode::None,
            uid_base: 1_900_000_000,
            url_port: 0,
            kill_grace: Duration::from_secs(1),
            path: std::env::var("PATH").unwrap(),
            warm,
            defaults: Default::default(),
        },
        events,
    )
    .await
    .unwrap();
    let repo = FsScriptsRepo::open(ScriptsSource::Folder(scripts))
        .await
        .unwrap();
    let ports = Ports {
        builds: Arc::new(SqliteBuildStore::new(db.clone())),
        runs: Arc::new(decap_embedded::SqliteRunStore::new(db.clone())),
        locks: Arc::new(SqliteLockStore::new(db.clone())),
        queue: Arc::new(SqliteDeferralQueue::new(db.clone())),
        blobs: Arc::new(FileBlobStore::new(data.join("blobs"))),
        executor: Arc::new(executor),
        scripts: Arc::new(repo),
    };
    let controller = Controller::new(
        ports,
        ControllerConfig {
            public_url: public_url.into(),
            decap_url: decap_url.into(),
            caps,
            kill_grace: Duration::from_secs(1),
            lock_margin: Duration::from_secs(60),
            max_log_bytes: 1 << 20,
            upload_caps: decap_server::uploads::UploadCaps::new(1 << 20, 64 << 20),
            bctool_env: Vec::new(),
            drain_interval,
        },
        LiveLogs::new(data.join("live"), 1 << 20).unwrap(),
    );
    let exits = if lose_exits {
        drop(exits);
        tokio::sync::mpsc::unbounded_channel().1
    } else {
        exits
    };
    controller.start(exits).await.unwrap();
    Embedded {
        controller,
        db,
        data,
        dir,
    }
}

impl Embedded {
    /// A server with `auth` and nothing optional (no hub, GitHub, detail
    /// files or secrets): tests set the fields they need.
    pub fn server(&self, auth: AuthConfig) -> Server {
        Server {
            controller: self.controller.clone(),
            auth,
            version: decap_api_types::Version {
                version: "test".into(),
                commit: "test".into(),
            },
            set_log_level: None,
            hub: None,
            github_hooks: None,
            github_refs: None,
            details: None,
            oauth: None,
            sessions: Default::default(),
            secrets: None,
        }
    }

    /// Serves the router with `auth` on `listener` (the address builds were
    /// given as their `DECAP_URL`), in the background.
    pub fn serve(&self, listener: tokio::net::TcpListener, auth: AuthConfig) {
        let router = decap_server::router(Arc::new(self.server(auth)));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
    }

    /// The CI status hub on this database.
    pub fn hub(&self) -> Arc<decap_server::hub::Hub> {
        Arc::new(decap_server::hub::Hub::new(
            Arc::new(decap_embedded::SqliteStatusHub::new(self.db.clone())),
            decap_server::hub::HubConfig::default(),
        ))
    }
}
