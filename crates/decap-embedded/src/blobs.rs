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
///
/// Temporary files are named `.<blob name>.<uuid>` + [`PARTIAL_SUFFIX`]. A
/// put that fails, or whose future is dropped (the client went away), removes
/// its own; what a killed process left is removed when the store is opened
/// ([`FileBlobStore::sweep_partial`]).
#[derive(Clone)]
pub struct FileBlobStore {
    root: PathBuf,
}

/// How the names of temporary files end, so that leftovers are recognised.
pub const PARTIAL_SUFFIX: &str = ".decap-partial";

pub(crate) fn io_err(e: impl std::fmt::Display) -> Error {
    Error::backend("files", e)
}

/// Whether a file name is one of [`write_atomically`]'s temporary files (or
/// the `.tmp` ones of earlier versions). Blob names never start with `.`.
fn is_partial(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(PARTIAL_SUFFIX) || name.ends_with(".tmp"))
}

impl FileBlobStore {
    /// A store under `root` (created on first write). Temporary files that
    /// a killed process left under it are removed at once (the data dir is
    /// this process's alone, so none of them is being written).
    pub fn new(root: PathBuf) -> Self {
        let store = FileBlobStore { root };
        match store.sweep_partial() {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(files = n, root = %store.root.display(), "removed partial blob files left by an earlier run")
            }
            Err(e) => {
                tracing::warn!(error = %e, root = %store.root.display(), "cannot look for partial blob files")
            }
        }
        store
    }

    /// Removes the temporary files of puts that never finished (the process
    /// was killed mid-write): `ROOT/<build id>/.<name>.<uuid>.decap-partial`.
    /// Answers how many were removed. Synchronous: it runs once, at start.
    pub fn sweep_partial(&self) -> std::io::Result<usize> {
        let builds = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for build in builds {
            let build = build?;
            if !build.file_type()?.is_dir() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(build.path()) else {
                continue;
            };
            for file in files.flatten() {
                let partial = file.file_name().to_str().is_some_and(is_partial)
                    && file.file_type().is_ok_and(|t| t.is_file());
                if partial {
                    match std::fs::remove_file(file.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(removed)
    }

    fn path(&self, build: BuildId, kind: BlobKind) -> PathBuf {
        // Build ids are UUIDs, so the path cannot escape the root.
        self.root.join(build.to_string()).join(kind.file_name())
    }
}

/// A temporary file being written: removed when dropped unless
/// [`PartialFile::commit`] renamed it into place. So a write that fails, or
/// whose future is dropped half-way, leaves nothing behind.
struct PartialFile {
    path: PathBuf,
    committed: bool,
}

impl PartialFile {
    /// Renames the file to `target`; from then on it is no longer removed.
    async fn commit(mut self, target: &std::path::Path) -> Result<()> {
        tokio::fs::rename(&self.path, target)
            .await
            .map_err(io_err)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            // A single unlink: cheap enough to do in place, even when the
            // drop happens on the runtime's thread.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes a stream to a temporary file beside `target`, syncs it and renames
/// it into place, so readers see the old file or the new one, never a part.
/// The temporary file goes when the write fails or is abandoned.
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
    let partial = PartialFile {
        path: dir.join(format!(
            ".{name}.{}{PARTIAL_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        )),
        committed: false,
    };
    let mut file = tokio::fs::File::create(&partial.path)
        .await
        .map_err(io_err)?;
    let mut size = 0u64;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| io_err(format!("reading the upload: {e}")))?;
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(io_err)?;
    }
    file.sync_all().await.map_err(io_err)?;
    drop(file);
    partial.commit(target).await?;
    Ok(size)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use bytes::Bytes;
    use futures::stream;

    use super::*;

    /// The names of the files in `dir` (none when it does not exist).
    fn files(dir: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn opening_the_store_removes_what_a_killed_write_left() {
        let root = tempfile::tempdir().unwrap();
        let build = BuildId::new();
        let store = FileBlobStore::new(root.path().to_owned());
        let data: ByteStream = Box::pin(stream::once(async { Ok(Bytes::from("log")) }));
        store.put(build, BlobKind::LogGz, data).await.unwrap();
        let dir = root.path().join(build.to_string());
        let log = kind_name(BlobKind::LogGz);
        // What a kill mid-write leaves: this version's and an earlier one's.
        for leftover in [
            format!(".{log}.0123456789abcdef{PARTIAL_SUFFIX}"),
            format!(".{log}.01a2.tmp"),
        ] {
            std::fs::write(dir.join(leftover), "part").unwrap();
        }
        assert_eq!(files(&dir).len(), 3);

        let store = FileBlobStore::new(root.path().to_owned());
        assert_eq!(files(&dir), vec![log.clone()], "only the blob is left");
        assert_eq!(store.sweep_partial().unwrap(), 0);
        let (size, _) = store.get(build, BlobKind::LogGz).await.unwrap().unwrap();
        assert_eq!(size, 3);
        // A root that does not exist yet is fine.
        FileBlobStore::new(root.path().join("nothing"))
            .sweep_partial()
            .unwrap();
    }

    fn kind_name(kind: BlobKind) -> String {
        kind.file_name().to_owned()
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_partial_file() {
        let root = tempfile::tempdir().unwrap();
        let store = FileBlobStore::new(root.path().to_owned());
        let build = BuildId::new();
        let data: ByteStream = Box::pin(stream::iter([
            Ok(Bytes::from("part of a log")),
            Err(std::io::Error::other("the client went away")),
        ]));
        let e = store.put(build, BlobKind::LogGz, data).await.unwrap_err();
        assert!(e.to_string().contains("went away"), "{e}");
        assert_eq!(
            files(&root.path().join(build.to_string())),
            Vec::<String>::new()
        );
        assert!(store.get(build, BlobKind::LogGz).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_abandoned_write_leaves_no_partial_file() {
        let root = tempfile::tempdir().unwrap();
        let store = FileBlobStore::new(root.path().to_owned());
        let build = BuildId::new();
        let dir = root.path().join(build.to_string());
        // One chunk, then a stream that never ends; it says when the put
        // waits on it, so the temporary file is there and written to.
        let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel::<()>();
        let mut waiting_tx = Some(waiting_tx);
        let stalled = stream::poll_fn(move |_| {
            if let Some(tx) = waiting_tx.take() {
                let _ = tx.send(());
            }
            std::task::Poll::<Option<std::io::Result<Bytes>>>::Pending
        });
        let data: ByteStream =
            Box::pin(stream::once(async { Ok(Bytes::from("the first part")) }).chain(stalled));
        // async_trait boxes the future: dropping `put` drops the write.
        let mut put = store.put(build, BlobKind::LogGz, data);
        tokio::select! {
            _ = &mut put => panic!("the put cannot finish"),
            _ = waiting_rx => {}
        }
        assert_eq!(files(&dir).len(), 1, "the temporary file is being written");
        assert!(
            files(&dir)[0].ends_with(PARTIAL_SUFFIX),
            "{:?}",
            files(&dir)
        );
        // The client goes away: the handler's future is dropped.
        drop(put);
        assert_eq!(files(&dir), Vec::<String>::new());
    }
}
