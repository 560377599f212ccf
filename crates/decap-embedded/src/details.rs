//! Detail files of CI runs under the data dir:
//! `ROOT/<owner>/<repo>/<commit>/<file>`, with the commit's expiry (unix
//! seconds) in `ROOT/<owner>/<repo>/<commit>/.decap-expires`.

use std::path::PathBuf;

use async_trait::async_trait;
use decap_core::Result;
use decap_core::ports::{ByteStream, DetailPath, DetailStore};
use time::OffsetDateTime;

use crate::blobs::{io_err, read_stream, write_atomically};

const EXPIRES: &str = ".decap-expires";

/// [`DetailStore`] on the local file system.
#[derive(Clone)]
pub struct FileDetailStore {
    root: PathBuf,
}

impl FileDetailStore {
    /// A store under `root` (created on first write).
    pub fn new(root: PathBuf) -> Self {
        FileDetailStore { root }
    }

    fn commit_dir(&self, p: &DetailPath) -> PathBuf {
        // Every part was checked by DetailPath::new: plain names only.
        self.root.join(&p.owner).join(&p.repo).join(&p.commit)
    }

    async fn expires(dir: &std::path::Path) -> Option<i64> {
        tokio::fs::read_to_string(dir.join(EXPIRES))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[async_trait]
impl DetailStore for FileDetailStore {
    async fn put(
        &self,
        path: &DetailPath,
        data: ByteStream,
        expires_at: OffsetDateTime,
    ) -> Result<u64> {
        let dir = self.commit_dir(path);
        let size = write_atomically(&dir.join(&path.file), data).await?;
        let until = expires_at.unix_timestamp();
        if Self::expires(&dir).await.is_none_or(|e| e < until) {
            tokio::fs::write(dir.join(EXPIRES), until.to_string())
                .await
                .map_err(io_err)?;
        }
        Ok(size)
    }

    async fn get(
        &self,
        path: &DetailPath,
        now: OffsetDateTime,
    ) -> Result<Option<(u64, ByteStream)>> {
        let dir = self.commit_dir(path);
        match Self::expires(&dir).await {
            Some(until) if until > now.unix_timestamp() => read_stream(&dir.join(&path.file)).await,
            _ => Ok(None),
        }
    }

    async fn sweep(&self, now: OffsetDateTime) -> Result<usize> {
        let mut removed = 0;
        let now = now.unix_timestamp();
        let level = |p: PathBuf| async move {
            let mut out = Vec::new();
            if let Ok(mut rd) = tokio::fs::read_dir(&p).await {
                while let Ok(Some(e)) = rd.next_entry().await {
                    if e.file_type().await.is_ok_and(|t| t.is_dir()) {
                        out.push(e.path());
                    }
                }
            }
            out
        };
        for owner in level(self.root.clone()).await {
            for repo in level(owner).await {
                for commit in level(repo).await {
                    if Self::expires(&commit).await.is_none_or(|e| e <= now) {
                        tokio::fs::remove_dir_all(&commit).await.map_err(io_err)?;
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}
