//! Logs and artifacts in S3.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Bytes;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use decap_core::build::BuildId;
use decap_core::ports::{BlobKind, BlobStore, ByteStream};
use decap_core::{Error, Result};
use futures::StreamExt;

/// The size of each part of a multipart upload (S3's minimum is 5 MiB).
pub const PART_BYTES: usize = 6 * 1024 * 1024;

/// How many parts of one multipart upload are sent at once.
pub const PARTS_IN_FLIGHT: usize = 4;

/// Where the blobs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket of console logs.
    pub logs_bucket: String,
    /// The bucket of artifacts.
    pub artifacts_bucket: String,
    /// A prefix for every key (e.g. `team-a/`), empty by default.
    pub key_prefix: String,
    /// Address buckets by path (`http://host/bucket/key`), as local S3
    /// servers need.
    pub force_path_style: bool,
    /// Talk to this endpoint instead of AWS (a local S3 server).
    pub endpoint_url: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            logs_bucket: "decap-console-logs".into(),
            artifacts_bucket: "decap-build-artifacts".into(),
            key_prefix: String::new(),
            force_path_style: false,
            endpoint_url: None,
        }
    }
}

/// An S3 client from an SDK configuration: another endpoint (an
/// S3-compatible server) and path-style addressing when asked for, and only
/// the checksums every S3-compatible server accepts.
pub(crate) fn client(
    sdk: &aws_config::SdkConfig,
    endpoint_url: Option<&str>,
    force_path_style: bool,
) -> Client {
    let mut builder = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(force_path_style)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
    if let Some(url) = endpoint_url {
        builder = builder.endpoint_url(url);
    }
    Client::from_conf(builder.build())
}

/// [`BlobStore`] on S3.
#[derive(Clone)]
pub struct S3BlobStore {
    client: Client,
    config: S3Config,
}

fn s3_err<E>(what: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Error
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    Error::backend("s3", format!("{what}: {}", crate::sdk_message(&e)))
}

impl S3BlobStore {
    /// A store from an SDK configuration (region, credentials), without
    /// touching the network: for bctool, whose credentials may allow only
    /// writing objects.
    pub fn new(sdk: &aws_config::SdkConfig, config: S3Config) -> Self {
        S3BlobStore {
            client: client(sdk, config.endpoint_url.as_deref(), config.force_path_style),
            config,
        }
    }

    /// A store from an SDK configuration (region, credentials), checking at
    /// once that both buckets exist and can be reached, so that a missing
    /// bucket or a denied access is a clear error at start-up.
    pub async fn connect(sdk: &aws_config::SdkConfig, config: S3Config) -> Result<Self> {
        let store = S3BlobStore::new(sdk, config);
        for bucket in [&store.config.logs_bucket, &store.config.artifacts_bucket] {
            store
                .client
                .head_bucket()
                .bucket(bucket)
                .send()
                .await
                .map_err(|e| {
                    let hint = match e.raw_response().map(|r| r.status().as_u16()) {
                        Some(404) => "it does not exist (aws-resources/ creates it)".to_owned(),
                        Some(403) => "access is denied to these credentials".to_owned(),
                        _ => DisplayErrorContext(&e).to_string(),
                    };
                    Error::backend("s3", format!("bucket {bucket}: {hint}"))
                })?;
        }
        Ok(store)
    }

    /// Where the blobs go.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// The underlying client (for set-up scripts and tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Stores an object from a stream (one `PutObject`, or a multipart
    /// upload past [`PART_BYTES`]); returns its size.
    pub(crate) async fn put_at(
        &self,
        bucket: &str,
        key: &str,
        mut data: ByteStream,
    ) -> Result<u64> {
        let key = key.to_owned();
        let mut parts = Parts::new(&mut data);
        let first = parts.next().await?;
        if parts.ended {
            let len = first.len() as u64;
            self.client
                .put_object()
                .bucket(bucket)
                .key(&key)
                .body(S3Bytes::from(first))
                .send()
                .await
                .map_err(|e| s3_err(&format!("storing {key}"), e))?;
            return Ok(len);
        }
        self.multipart(bucket, &key, first, &mut parts).await
    }

    /// Reads an object, with its size; `None` when there is none.
    pub(crate) async fn get_at(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(u64, ByteStream)>> {
        let key = key.to_owned();
        let object = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => {
                return Ok(None);
            }
            Err(e) => return Err(s3_err(&format!("reading {key}"), e)),
        };
        let size = object.content_length().unwrap_or(0).max(0) as u64;
        let reader = object.body.into_async_read();
        Ok(Some((
            size,
            Box::pin(tokio_util::io::ReaderStream::with_capacity(
                reader,
                64 * 1024,
            )),
        )))
    }

    fn location(&self, build: BuildId, kind: BlobKind) -> (&str, String) {
        let bucket = match kind {
            BlobKind::LogGz => &self.config.logs_bucket,
            BlobKind::ArtifactsTarGz | BlobKind::ArtifactsIndex | BlobKind::Scripts => {
                &self.config.artifacts_bucket
            }
        };
        let key = format!("{}v1/{build}/{}", self.config.key_prefix, kind.file_name());
        (bucket, key)
    }

    async fn multipart(
        &self,
        bucket: &str,
        key: &str,
        first: Bytes,
        parts: &mut Parts<'_>,
    ) -> Result<u64> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_err("starting a multipart upload", e))?;
        let upload_id = upload
            .upload_id()
            .ok_or_else(|| Error::backend("s3", "no upload id in the answer"))?
            .to_owned();
        let result = self
            .upload_parts(bucket, key, &upload_id, first, parts)
            .await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(bucket, key, error = %DisplayErrorContext(e), "cannot abort a failed multipart upload");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        first: Bytes,
        source: &mut Parts<'_>,
    ) -> Result<u64> {
        // Up to PARTS_IN_FLIGHT parts upload at once, each in a task of its
        // own so it progresses while the next one fills; memory stays
        // bounded at (PARTS_IN_FLIGHT + 1) parts.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut parts = Vec::new();
        let mut total = 0u64;
        let mut number = 1;
        let mut next = Some(first);
        loop {
            let Some(part) = next.take() else {
                break;
            };
            while in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(done) = in_flight.join_next().await {
                    let (part, len) = done.map_err(|e| Error::backend("s3", e))??;
                    parts.push(part);
                    total += len;
                }
            }
            in_flight.spawn(put_part(
                self.client.clone(),
                bucket.to_owned(),
                key.to_owned(),
                upload_id.to_owned(),
                number,
                part,
            ));
            number += 1;
            let following = source.next().await?;
            if !following.is_empty() {
                next = Some(following);
            }
        }
        while let Some(done) = in_flight.join_next().await {
            let (part, len) = done.map_err(|e| Error::backend("s3", e))??;
            parts.push(part);
            total += len;
        }
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_err("completing a multipart upload", e))?;
        Ok(total)
    }
}

async fn put_part(
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    number: i32,
    part: Bytes,
) -> Result<(CompletedPart, u64)> {
    let len = part.len() as u64;
    let done = client
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .body(S3Bytes::from(part))
        .send()
        .await
        .map_err(|e| s3_err(&format!("uploading part {number}"), e))?;
    Ok((
        CompletedPart::builder()
            .part_number(number)
            .set_e_tag(done.e_tag().map(str::to_owned))
            .build(),
        len,
    ))
}

/// Cuts a stream into parts of exactly [`PART_BYTES`] (the last one
/// shorter), copying each byte at most once and never growing a buffer past
/// one part.
struct Parts<'a> {
    data: &'a mut ByteStream,
    carry: Option<Bytes>,
    ended: bool,
}

impl<'a> Parts<'a> {
    fn new(data: &'a mut ByteStream) -> Self {
        Parts {
            data,
            carry: None,
            ended: false,
        }
    }

    /// The next part; empty once the stream has ended.
    async fn next(&mut self) -> Result<Bytes> {
        let mut buf = BytesMut::new();
        while !self.ended {
            let mut chunk = match self.carry.take() {
                Some(c) => c,
                None => match self.data.next().await {
                    None => {
                        self.ended = true;
                        break;
                    }
                    Some(Err(e)) => {
                        return Err(Error::backend("s3", format!("reading the upload: {e}")));
                    }
                    Some(Ok(chunk)) => chunk,
                },
            };
            if buf.is_empty() && chunk.len() >= PART_BYTES {
                let part = chunk.split_to(PART_BYTES);
                self.carry = (!chunk.is_empty()).then_some(chunk);
                return Ok(part);
            }
            if buf.capacity() == 0 {
                buf.reserve(PART_BYTES);
            }
            let take = (PART_BYTES - buf.len()).min(chunk.len());
            buf.extend_from_slice(&chunk[..take]);
            if take < chunk.len() {
                self.carry = Some(chunk.slice(take..));
            }
            if buf.len() == PART_BYTES {
                break;
            }
        }
        Ok(buf.freeze())
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, build: BuildId, kind: BlobKind, data: ByteStream) -> Result<u64> {
        let (bucket, key) = self.location(build, kind);
        self.put_at(bucket, &key, data).await
    }

    async fn get(&self, build: BuildId, kind: BlobKind) -> Result<Option<(u64, ByteStream)>> {
        let (bucket, key) = self.location(build, kind);
        self.get_at(bucket, &key).await
    }

    async fn presigned_url(
        &self,
        build: BuildId,
        kind: BlobKind,
        valid_for: std::time::Duration,
    ) -> Result<Option<String>> {
        let (bucket, key) = self.location(build, kind);
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(valid_for)
            .map_err(|e| Error::invalid("presigned URL lifetime", e))?;
        let request = self
            .client
            .get_object()
            .bucket(bucket)
            .key(&key)
            .presigned(config)
            .await
            .map_err(|e| s3_err(&format!("presigning {key}"), e))?;
        Ok(Some(request.uri().to_owned()))
    }

    async fn delete(&self, build: BuildId, kind: BlobKind) -> Result<bool> {
        let (bucket, key) = self.location(build, kind);
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|se| se.is_not_found()) => return Ok(false),
            Err(e) => return Err(s3_err(&format!("looking up {key}"), e)),
        }
        self.client
            .delete_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| s3_err(&format!("deleting {key}"), e))?;
        Ok(true)
    }
}

/// The file beside a commit's detail files holding their expiry (unix
/// seconds); no detail file can be named so.
const DETAILS_EXPIRES: &str = ".decap-expires";

/// [`DetailStore`](decap_core::ports::DetailStore) in the artifacts bucket,
/// shared by the replicas: `{prefix}details/<owner>/<repo>/<commit>/<file>`,
/// the commit's expiry in `…/<commit>/.decap-expires`.
#[derive(Clone)]
pub struct S3DetailStore {
    blobs: S3BlobStore,
    root: String,
}

impl S3DetailStore {
    /// Detail files beside `blobs`' artifacts.
    pub fn new(blobs: S3BlobStore) -> Self {
        let root = format!("{}details/", blobs.config.key_prefix);
        S3DetailStore { blobs, root }
    }

    fn bucket(&self) -> &str {
        &self.blobs.config.artifacts_bucket
    }

    fn commit_key(&self, p: &decap_core::ports::DetailPath) -> String {
        // Every part was checked by DetailPath::new: plain names only.
        format!("{}{}/{}/{}/", self.root, p.owner, p.repo, p.commit)
    }

    /// The expiry of the commit whose files are under `commit_key`.
    async fn expires(&self, commit_key: &str) -> Result<Option<i64>> {
        let key = format!("{commit_key}{DETAILS_EXPIRES}");
        let Some((_, mut body)) = self.blobs.get_at(self.bucket(), &key).await? else {
            return Ok(None);
        };
        let mut text = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::backend("s3", format!("reading {key}: {e}")))?;
            if text.len() + chunk.len() > 64 {
                return Ok(None);
            }
            text.extend_from_slice(&chunk);
        }
        Ok(std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse().ok()))
    }

    /// Every key under `prefix`.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .blobs
                .client
                .list_objects_v2()
                .bucket(self.bucket())
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| s3_err(&format!("listing {prefix}"), e))?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }
}

#[async_trait]
impl decap_core::ports::DetailStore for S3DetailStore {
    async fn put(
        &self,
        path: &decap_core::ports::DetailPath,
        data: ByteStream,
        expires_at: time::OffsetDateTime,
    ) -> Result<u64> {
        let commit = self.commit_key(path);
        let size = self
            .blobs
            .put_at(self.bucket(), &format!("{commit}{}", path.file), data)
            .await?;
        let until = expires_at.unix_timestamp();
        if self.expires(&commit).await?.is_none_or(|e| e < until) {
            self.blobs
                .client
                .put_object()
                .bucket(self.bucket())
                .key(format!("{commit}{DETAILS_EXPIRES}"))
                .body(S3Bytes::from(until.to_string().into_bytes()))
                .send()
                .await
                .map_err(|e| s3_err("storing a detail file's expiry", e))?;
        }
        Ok(size)
    }

    async fn get(
        &self,
        path: &decap_core::ports::DetailPath,
        now: time::OffsetDateTime,
    ) -> Result<Option<(u64, ByteStream)>> {
        let commit = self.commit_key(path);
        match self.expires(&commit).await? {
            Some(until) if until > now.unix_timestamp() => {
                self.blobs
                    .get_at(self.bucket(), &format!("{commit}{}", path.file))
                    .await
            }
            _ => Ok(None),
        }
    }

    async fn sweep(&self, now: time::OffsetDateTime) -> Result<usize> {
        let mut removed = 0;
        let markers: Vec<String> = self
            .keys(&self.root)
            .await?
            .into_iter()
            .filter(|k| k.ends_with(&format!("/{DETAILS_EXPIRES}")))
            .collect();
        for marker in markers {
            let commit = marker.trim_end_matches(DETAILS_EXPIRES).to_owned();
            if self
                .expires(&commit)
                .await?
                .is_some_and(|until| until > now.unix_timestamp())
            {
                continue;
            }
            // The files first, the expiry last: a sweep stopped midway
            // leaves the commit still to sweep.
            let mut files = self.keys(&commit).await?;
            files.retain(|k| k != &marker);
            files.push(marker);
            for key in files {
                self.blobs
                    .client
                    .delete_object()
                    .bucket(self.bucket())
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| s3_err(&format!("removing {key}"), e))?;
            }
            removed += 1;
        }
        Ok(removed)
    }
}
