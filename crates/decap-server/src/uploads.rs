//! A build's uploads (its log and its artifacts) checked while they arrive,
//! and its artifacts listed once rather than on every view.
//!
//! * An upload larger than its cap is refused from its `Content-Length`
//!   before anything is read, and cut off when a body without one grows past
//!   it.
//! * Each upload is decompressed once, on the way into the blob store: a log
//!   must be valid gzip and expand to no more than the console cap; an
//!   artifacts tarball must be valid and expand to no more than the
//!   artifacts cap. A bad upload is answered with why and stores nothing.
//! * The artifacts' file list (the index) is written beside the tarball, so
//!   that a build page or a listing reads a small JSON document instead of
//!   decompressing the whole tarball again. Artifacts that bctool shipped
//!   straight to S3 get their index made once, on first view, under the same
//!   bound.
//! * Reading a stored log or an artifact file decompresses under the same
//!   bounds, so no stored blob can make the server expand it without limit.

use std::io::Read;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use decap_core::build::BuildId;
use decap_core::ports::{BlobKind, ByteStream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;

/// The most files an index lists (the tarball may hold more).
pub const MAX_INDEXED_FILES: usize = 100_000;

/// The file list of a build's artifacts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactIndex {
    /// The regular files, in archive order.
    pub files: Vec<ArtifactFile>,
    /// Whether the archive held more files than were listed.
    #[serde(default)]
    pub truncated: bool,
    /// The archive's size once decompressed.
    pub expanded_bytes: u64,
}

/// One file of the artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// Its path in the archive (no leading `./`).
    pub path: String,
    /// Its size.
    pub size: u64,
}

/// Why an upload or a stored blob could not be read.
#[derive(Debug)]
enum Invalid {
    /// Not valid gzip or tar.
    Corrupt(String),
    /// It expands past its cap.
    TooLarge(u64),
}

impl Invalid {
    fn api(&self, what: &str) -> ApiError {
        match self {
            Invalid::Corrupt(e) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the {what} is corrupt: {e}"),
            ),
            Invalid::TooLarge(cap) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the {what} expands to more than {} once decompressed",
                    decap_core::limits::HumanBytes(*cap)
                ),
            ),
        }
    }
}

/// Counts what a reader yields and fails past a cap (`over` says so, since
/// the tar reader wraps the error).
struct Bounded<R> {
    inner: R,
    read: u64,
    cap: u64,
    over: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Bounded<R> {
    fn new(inner: R, cap: u64) -> Self {
        Bounded {
            inner,
            read: 0,
            cap,
            over: Default::default(),
        }
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.cap {
            self.over.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "past the cap",
            ));
        }
        Ok(n)
    }
}

fn classify(e: std::io::Error, cap: u64, over: &std::cell::Cell<bool>) -> Invalid {
    if over.get() {
        Invalid::TooLarge(cap)
    } else {
        Invalid::Corrupt(e.to_string())
    }
}

/// Lists a gzip-compressed tar read from `gz`, expanding at most `cap` bytes.
fn index_tarball(gz: impl Read, cap: u64) -> Result<ArtifactIndex, Invalid> {
    let expanded = Bounded::new(flate2::read::MultiGzDecoder::new(gz), cap);
    let over = expanded.over.clone();
    let classify = |e| classify(e, cap, &over);
    let mut archive = tar::Archive::new(expanded);
    let mut index = ArtifactIndex::default();
    let entries = archive.entries().map_err(classify)?;
    for entry in entries {
        let entry = entry.map_err(classify)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if index.files.len() >= MAX_INDEXED_FILES {
            index.truncated = true;
            continue;
        }
        let path = entry.path().map_err(classify)?;
        index.files.push(ArtifactFile {
            path: path.to_string_lossy().trim_start_matches("./").to_owned(),
            size: entry.size(),
        });
    }
    // Whatever follows the archive's end marker is read too, so that the
    // count covers the whole upload.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(classify)?;
    index.expanded_bytes = rest.read;
    Ok(index)
}

/// Reads gzip from `gz` to its end, expanding at most `cap` bytes.
fn check_gzip(gz: impl Read, cap: u64) -> Result<u64, Invalid> {
    let mut expanded = Bounded::new(flate2::read::MultiGzDecoder::new(gz), cap);
    let over = expanded.over.clone();
    std::io::copy(&mut expanded, &mut std::io::sink()).map_err(|e| classify(e, cap, &over))?;
    Ok(expanded.read)
}

/// A `Read` over chunks sent from the async side.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// The caps of uploads.
#[derive(Debug, Clone, Copy)]
pub struct UploadCaps {
    /// A log, decompressed (the console cap plus room for Decap's markers).
    pub log_bytes: u64,
    /// Artifacts, decompressed.
    pub artifacts_bytes: u64,
}

impl UploadCaps {
    /// The caps for a console cap and an artifacts cap.
    pub fn new(max_log_bytes: u64, max_artifacts_bytes: u64) -> Self {
        UploadCaps {
            log_bytes: max_log_bytes.saturating_add(64 << 10),
            artifacts_bytes: max_artifacts_bytes,
        }
    }

    /// How large the compressed upload of `kind` may be: gzip of stored
    /// members is a little larger than its input, never much.
    fn compressed(&self, kind: BlobKind) -> u64 {
        let expanded = match kind {
            BlobKind::LogGz => self.log_bytes,
            _ => self.artifacts_bytes,
        };
        expanded
            .saturating_add(expanded / 50)
            .saturating_add(1 << 20)
    }
}

/// Stores an upload of `kind` for build `id`, checking it on the way; for
/// artifacts, stores its index too. Answers the stored size.
pub async fn store(
    app: &AppState,
    id: BuildId,
    kind: BlobKind,
    content_length: Option<u64>,
    body: Body,
) -> Result<u64, ApiError> {
    let caps = app.controller.config.upload_caps;
    let limit = caps.compressed(kind);
    let what = match kind {
        BlobKind::LogGz => "console log",
        _ => "artifacts archive",
    };
    if let Some(len) = content_length
        && len > limit
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the {what} is {} and may be at most {}",
                decap_core::limits::HumanBytes(len),
                decap_core::limits::HumanBytes(limit)
            ),
        ));
    }
    let (check_tx, check_rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let checker = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx: check_rx,
            current: Bytes::new(),
        };
        match kind {
            BlobKind::LogGz => check_gzip(reader, caps.log_bytes).map(|_| None),
            _ => index_tarball(reader, caps.artifacts_bytes).map(Some),
        }
    });
    // The blob store reads from a channel, so the request body stays here:
    // a refused upload is still read to its end (within bounds) before the
    // answer, and the client, still sending, gets the answer rather than a
    // reset connection. The store sees the end of the stream only once the
    // check has passed: a refused upload replaces nothing.
    let (put_tx, put_rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let blobs = app.controller.ports.blobs.clone();
    let put = tokio::spawn(async move {
        let stream: ByteStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(put_rx));
        blobs.put(id, kind, stream).await
    });
    let mut body = body.into_data_stream();
    let mut received = 0u64;
    let mut refusal: Option<ApiError> = None;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                refusal = Some(ApiError::bad_request(format!("the {what} broke off: {e}")));
                break;
            }
        };
        received += chunk.len() as u64;
        if received > limit {
            refusal = Some(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the {what} may be at most {}",
                    decap_core::limits::HumanBytes(limit)
                ),
            ));
            break;
        }
        // A checker that stopped found the upload bad; its verdict follows.
        if check_tx.send(chunk.clone()).await.is_err() {
            break;
        }
        if put_tx.send(Ok(chunk)).await.is_err() {
            break;
        }
    }
    drop(check_tx);
    let checked = checker
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let refusal = refusal.or_else(|| checked.as_ref().err().map(|invalid| invalid.api(what)));
    if let Some(refusal) = refusal {
        let _ = put_tx
            .send(Err(std::io::Error::other("the upload was refused")))
            .await;
        drop(put_tx);
        let _ = put.await;
        drain(
            &mut body,
            content_length.map(|l| l.saturating_sub(received)),
        )
        .await;
        return Err(refusal);
    }
    drop(put_tx);
    let size = put
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let index = checked.ok().flatten();
    if let Some(index) = index {
        save_index(app, id, &index).await?;
    }
    Ok(size)
}

/// Reads and drops what is left of a refused body: at most what its
/// `Content-Length` announced (and 64 MiB), for at most 5 s.
async fn drain(
    body: &mut (impl futures::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
    announced: Option<u64>,
) {
    let mut left = announced.unwrap_or(1 << 20).min(64 << 20);
    let reading = async {
        while left > 0 {
            match body.next().await {
                Some(Ok(c)) => left = left.saturating_sub(c.len() as u64),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reading).await;
}

async fn save_index(app: &AppState, id: BuildId, index: &ArtifactIndex) -> Result<(), ApiError> {
    let json = serde_json::to_vec(index)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let stream: ByteStream = Box::pin(futures::stream::once(async move { Ok(Bytes::from(json)) }));
    app.controller
        .ports
        .blobs
        .put(id, BlobKind::ArtifactsIndex, stream)
        .await?;
    Ok(())
}

async fn read_all(s: ByteStream, cap: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
        if out.len() + chunk.len() > cap {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the artifacts index is too large",
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The index of a build's artifacts: stored at upload, or made now (once)
/// from the tarball; `None` when the build has no artifacts.
pub async fn index(app: &AppState, id: BuildId) -> Result<Option<ArtifactIndex>, ApiError> {
    let blobs = &app.controller.ports.blobs;
    if let Some((_, s)) = blobs.get(id, BlobKind::ArtifactsIndex).await? {
        let json = read_all(s, 64 << 20).await?;
        if let Ok(index) = serde_json::from_slice(&json) {
            return Ok(Some(index));
        }
    }
    let Some((_, tarball)) = blobs.get(id, BlobKind::ArtifactsTarGz).await? else {
        return Ok(None);
    };
    let cap = app.controller.config.upload_caps.artifacts_bytes;
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(tarball));
    let index = tokio::task::spawn_blocking(move || index_tarball(reader, cap))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| e.api("artifacts archive"))?;
    save_index(app, id, &index).await?;
    Ok(Some(index))
}

/// Decompresses a stored log, at most `cap` bytes of it; past that the
/// stream ends with a note (a stored log never expands without limit).
pub fn gunzip_bounded(gz: ByteStream, cap: u64) -> ByteStream {
    let reader = tokio_util::io::StreamReader::new(gz);
    let mut decoder =
        async_compression::tokio::bufread::GzipDecoder::new(tokio::io::BufReader::new(reader));
    // A gzip file may hold several members; all of them are the log.
    decoder.multiple_members(true);
    let mut sent = 0u64;
    let mut done = false;
    Box::pin(
        tokio_util::io::ReaderStream::new(decoder).filter_map(move |chunk| {
            let out = match chunk {
                _ if done => None,
                Err(e) => {
                    done = true;
                    Some(Ok(Bytes::from(format!(
                        "\n[decap: the rest of the stored log cannot be read: {e}]\n"
                    ))))
                }
                Ok(c) => {
                    let room = cap.saturating_sub(sent);
                    if (c.len() as u64) <= room {
                        sent += c.len() as u64;
                        Some(Ok(c))
                    } else {
                        done = true;
                        let mut v = c.slice(..room as usize).to_vec();
                        v.extend_from_slice(
                            b"\n[decap: the stored log is longer than the console cap; the rest is not shown]\n",
                        );
                        Some(Ok(Bytes::from(v)))
                    }
                }
            };
            async move { out }
        }),
    )
}

/// Copies one file out of an artifacts tarball read from `gz`, expanding at
/// most `cap` bytes; sends its size first, then its bytes.
pub fn extract_file(
    gz: impl Read,
    wanted: &str,
    cap: u64,
    found: tokio::sync::oneshot::Sender<Result<u64, ApiError>>,
    data: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    let expanded = Bounded::new(flate2::read::MultiGzDecoder::new(gz), cap);
    let over = expanded.over.clone();
    let fail = |e: std::io::Error| classify(e, cap, &over).api("artifacts archive");
    let mut archive = tar::Archive::new(expanded);
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            let _ = found.send(Err(fail(e)));
            return;
        }
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let _ = found.send(Err(fail(e)));
                return;
            }
        };
        let name = entry
            .path()
            .ok()
            .map(|p| p.to_string_lossy().trim_start_matches("./").to_owned());
        if !entry.header().entry_type().is_file() || name.as_deref() != Some(wanted) {
            continue;
        }
        let _ = found.send(Ok(entry.size()));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match entry.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if data
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = data.blocking_send(Err(e));
                    return;
                }
            }
        }
    }
    let _ = found.send(Err(ApiError::not_found(format!("artifact {wanted:?}"))));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data.as_slice())
                .expect("append");
        }
        tar.into_inner().expect("tar").finish().expect("gzip")
    }

    #[test]
    fn an_archive_is_indexed_once_with_sizes() {
        let gz = tarball(&[("a.txt", b"hello".to_vec()), ("dir/b.bin", vec![0; 1000])]);
        let index = index_tarball(gz.as_slice(), 1 << 20).expect("valid");
        assert_eq!(
            index.files,
            vec![
                ArtifactFile {
                    path: "a.txt".into(),
                    size: 5
                },
                ArtifactFile {
                    path: "dir/b.bin".into(),
                    size: 1000
                }
            ]
        );
        assert!(index.expanded_bytes >= 1005);
    }

    #[test]
    fn a_bomb_stops_at_the_cap_and_garbage_is_corrupt() {
        let gz = tarball(&[("zeros", vec![0; 8 << 20])]);
        assert!(gz.len() < 1 << 20, "it compresses well: {}", gz.len());
        assert!(matches!(
            index_tarball(gz.as_slice(), 1 << 20),
            Err(Invalid::TooLarge(_))
        ));
        assert!(matches!(
            index_tarball(&b"this is not a tarball"[..], 1 << 20),
            Err(Invalid::Corrupt(_))
        ));
        assert!(matches!(
            check_gzip(&b"not gzip"[..], 1 << 20),
            Err(Invalid::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn a_stored_log_expands_to_the_cap_only() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![b'x'; 4 << 20]).expect("write");
        let gz = enc.finish().expect("gzip");
        let stream: ByteStream =
            Box::pin(futures::stream::once(async move { Ok(Bytes::from(gz)) }));
        let out: Vec<u8> = gunzip_bounded(stream, 1000)
            .map(|c| c.expect("chunk").to_vec())
            .concat()
            .await;
        assert!(out.starts_with(&[b'x'; 1000]));
        assert!(String::from_utf8_lossy(&out).contains("longer than the console cap"));
        assert!(out.len() < 1200);
    }
}
