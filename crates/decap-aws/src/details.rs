//! Detail files of CI runs (`decapctl notify-pr`), in S3 under a prefix that
//! a lifecycle rule of the bucket expires after a number of days; linked
//! from pull requests by presigned URLs.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter,
};
use decap_core::{Error, Result};

/// The lifecycle rule Decap owns on the bucket.
const RULE_ID: &str = "decap-notify-pr-details";
/// The longest a SigV4 presigned URL may be valid.
const MAX_PRESIGNED: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where details go.
#[derive(Debug, Clone)]
pub struct DetailsConfig {
    /// The bucket.
    pub bucket: String,
    /// The key prefix (`notify-pr/`); the lifecycle rule covers it.
    pub prefix: String,
    /// An S3-compatible server instead of AWS.
    pub endpoint_url: Option<String>,
    /// Path-style addressing (MinIO).
    pub force_path_style: bool,
}

/// Detail files in S3.
pub struct S3Details {
    client: Client,
    config: DetailsConfig,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend("s3", format!("{what}: {e}"))
}

impl S3Details {
    /// A store; no request is made.
    pub fn new(sdk: &aws_config::SdkConfig, config: DetailsConfig) -> Self {
        S3Details {
            client: crate::s3::client(sdk, config.endpoint_url.as_deref(), config.force_path_style),
            config,
        }
    }

    /// Makes the bucket expire what is under the prefix after `days`,
    /// keeping the bucket's other lifecycle rules.
    pub async fn expire_after(&self, days: u32) -> Result<()> {
        let bucket = &self.config.bucket;
        let mut rules: Vec<LifecycleRule> = match self
            .client
            .get_bucket_lifecycle_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(current) => current
                .rules()
                .iter()
                .filter(|r| r.id() != Some(RULE_ID))
                .cloned()
                .collect(),
            // No configuration yet.
            Err(_) => Vec::new(),
        };
        let rule = LifecycleRule::builder()
            .id(RULE_ID)
            .status(ExpirationStatus::Enabled)
            .filter(
                LifecycleRuleFilter::builder()
                    .prefix(self.config.prefix.clone())
                    .build(),
            )
            .expiration(
                LifecycleExpiration::builder()
                    .days(i32::try_from(days.max(1)).unwrap_or(i32::MAX))
                    .build(),
            )
            .build()
            .map_err(|e| err("the lifecycle rule", e))?;
        rules.push(rule);
        let config = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| err("the lifecycle configuration", e))?;
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(bucket)
            .lifecycle_configuration(config)
            .send()
            .await
            .map_err(|e| {
                err(
                    &format!("setting the expiry of {bucket}"),
                    crate::sdk_message(&e),
                )
            })?;
        Ok(())
    }

    /// The key of a detail file: prefix, owner, repo, commit, path.
    pub fn key(&self, owner: &str, repo: &str, commit: &str, path: &str) -> String {
        format!("{}{owner}/{repo}/{commit}/{path}", self.config.prefix)
    }

    /// Uploads a file; answers a presigned URL valid `valid_for` (at most
    /// seven days, the most S3 allows).
    pub async fn upload(&self, key: &str, file: &Path, valid_for: Duration) -> Result<String> {
        let body = ByteStream::from_path(file)
            .await
            .map_err(|e| err(&format!("reading {}", file.display()), e))?;
        let content_type = match file.extension().and_then(|e| e.to_str()) {
            Some("txt" | "log" | "out") => "text/plain; charset=utf-8",
            Some("html" | "htm") => "text/html; charset=utf-8",
            Some("json") => "application/json",
            Some("xml") => "application/xml",
            _ => "application/octet-stream",
        };
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| err(&format!("storing {key}"), crate::sdk_message(&e)))?;
        let presigning =
            aws_sdk_s3::presigning::PresigningConfig::expires_in(valid_for.min(MAX_PRESIGNED))
                .map_err(|e| err("presigning", e))?;
        let url = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .presigned(presigning)
            .await
            .map_err(|e| err(&format!("presigning {key}"), e))?;
        Ok(url.uri().to_owned())
    }
}
