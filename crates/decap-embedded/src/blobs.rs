//! Logs and artifacts as files under the data dir.

use std::path::PathBuf;

use async_trait::async_trait;
use decap_core::build::BuildId;
use decap_core::ports::{BlobKind, BlobStore, ByteStream};
use decap_core::{Error, Result};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// [`BlobStore`] on the local file system: `ROOT/<build id>/<blob name>`.
/// A put writes a temporary file beside the target, syncs it and renames it
/// into place, so readers see the old blob or the new one, never a part.
#[derive(Clone)]
pub struct FileBlobStore {
    root: PathBuf,
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> Error {
    Error::backend("files", e)
}

impl FileBlobStore {
    /// A store under `root` (created on first write).
    pub fn new(root: PathBuf) -> Self {
        FileBlobStore { root }
    }

    fn path(&self, build: BuildId, kind: BlobKind) -> PathBuf {
        // Build ids are UUIDs, so the path cannot escape the root.
        self.root.join(build.to_string()).join(kind.file_name())
    }
}

/// Writes a stream to a temporary file beside `target`, syncs it and renames
/// it into place, so readers see the old file or the new one, never a part.
pub(crate) async fn write_atomically(
    target: &std::path::Path,
    mut data: ByteStream,
) -> Result<u64> {
    let dir = target
        .parent()
        .ok_or_else(|| io_err("the path has no parent"))?
        .to_owned();
    tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::now_v7()));
    let result: Result<u64> = async {
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
        let mut size = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| io_err(format!("reading the upload: {e}")))?;
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io_err)?;
        }
        file.sync_all().await.map_err(io_err)?;
        Ok(size)
    }
    .await;
    match result {
        Ok(size) => {
            tokio::fs::rename(&tmp, target).await.map_err(io_err)?;
            Ok(size)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Opens a file as a stream, or `None` when it does not exist.
pub(crate) async fn read_stream(path: &std::path::Path) -> Result<Option<(u64, ByteStream)>> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let meta = file.metadata().await.map_err(io_err)?;
    if !meta.is_file() {
        return Ok(None);
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
    Ok(Some((meta.len(), Box::pin(stream))))
}

#[async_trait]
impl BlobStore for FileBlobStore {
    async fn put(&self, build: BuildId, kind: BlobKind, data: ByteStream) -> Result<u64> {
        write_atomically(&self.path(build, kind), data).await
    }

    async fn get(&self, build: BuildId, kind: BlobKind) -> Result<Option<(u64, ByteStream)>> {
        read_stream(&self.path(build, kind)).await
    }

    async fn delete(&self, build: BuildId, kind: BlobKind) -> Result<bool> {
        match tokio::fs::remove_file(self.path(build, kind)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }
}
