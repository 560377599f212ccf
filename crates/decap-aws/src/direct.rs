//! How bctool reaches S3 and DynamoDB itself, without the server in
//! between: the settings travel as environment variables (the same names
//! `decap serve` reads), and give bctool stores that never check their
//! buckets and tables first, so that its credentials need only the few
//! actions it performs (see [`crate::resources::bctool_policy`]).

use std::time::Duration;

use aws_config::retry::RetryConfig;

use crate::{DynamoDbBuildStore, DynamoDbConfig, DynamoDbLockStore, S3BlobStore, S3Config};

/// Set to `1` to have bctool ship logs, artifacts and results straight to
/// AWS.
pub const DIRECT_VAR: &str = "DECAP_BCTOOL_DIRECT";

/// Every variable bctool reads for the direct path. bctool removes them
/// from the build script's environment.
pub const VARS: &[&str] = &[
    DIRECT_VAR,
    "DECAP_AWS_REGION",
    "DECAP_S3_LOGS_BUCKET",
    "DECAP_S3_ARTIFACTS_BUCKET",
    "DECAP_S3_PREFIX",
    "DECAP_S3_ENDPOINT",
    "DECAP_S3_PATH_STYLE",
    "DECAP_DYNAMODB_ENDPOINT",
    "DECAP_DYNAMODB_BUILDS_TABLE",
    "DECAP_DYNAMODB_LOCKS_TABLE",
    "DECAP_BCTOOL_AWS_ACCESS_KEY_ID",
    "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY",
    "DECAP_BCTOOL_AWS_SESSION_TOKEN",
];

/// Static credentials for bctool (otherwise the default chain: a web
/// identity, a mounted credentials file, the instance role).
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret key (never printed).
    pub secret_access_key: String,
    /// A session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Where bctool ships a build's output when it talks to AWS directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectConfig {
    /// The region (the SDK's default otherwise).
    pub region: Option<String>,
    /// The buckets.
    pub s3: S3Config,
    /// The tables (the deliveries table is not used).
    pub dynamodb: DynamoDbConfig,
    /// Credentials given explicitly.
    pub credentials: Option<StaticCredentials>,
}

/// bctool's stores on the direct path.
pub struct DirectStores {
    /// Logs and artifacts.
    pub blobs: S3BlobStore,
    /// Build records.
    pub builds: DynamoDbBuildStore,
    /// Branch locks.
    pub locks: DynamoDbLockStore,
}

impl DirectConfig {
    /// The settings from variables (`get` looks one up); `None` unless
    /// [`DIRECT_VAR`] is `1` or `true`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let on = get(DIRECT_VAR).unwrap_or_default();
        match on.as_str() {
            "" | "0" | "false" => return Ok(None),
            "1" | "true" => {}
            other => return Err(format!("{DIRECT_VAR} must be 1 or 0, not {other:?}")),
        }
        let nonempty = |name: &str| get(name).filter(|v| !v.is_empty());
        let s3_default = S3Config::default();
        let ddb_default = DynamoDbConfig::default();
        let credentials = match (
            nonempty("DECAP_BCTOOL_AWS_ACCESS_KEY_ID"),
            nonempty("DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(access_key_id), Some(secret_access_key)) => Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: nonempty("DECAP_BCTOOL_AWS_SESSION_TOKEN"),
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "DECAP_BCTOOL_AWS_ACCESS_KEY_ID and DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY go together"
                        .into(),
                );
            }
        };
        Ok(Some(DirectConfig {
            region: nonempty("DECAP_AWS_REGION"),
            s3: S3Config {
                logs_bucket: nonempty("DECAP_S3_LOGS_BUCKET").unwrap_or(s3_default.logs_bucket),
                artifacts_bucket: nonempty("DECAP_S3_ARTIFACTS_BUCKET")
                    .unwrap_or(s3_default.artifacts_bucket),
                key_prefix: get("DECAP_S3_PREFIX").unwrap_or_default(),
                force_path_style: matches!(
                    get("DECAP_S3_PATH_STYLE").as_deref(),
                    Some("1" | "true")
                ),
                endpoint_url: nonempty("DECAP_S3_ENDPOINT"),
            },
            dynamodb: DynamoDbConfig {
                builds_table: nonempty("DECAP_DYNAMODB_BUILDS_TABLE")
                    .unwrap_or(ddb_default.builds_table),
                deliveries_table: ddb_default.deliveries_table,
                locks_table: nonempty("DECAP_DYNAMODB_LOCKS_TABLE")
                    .unwrap_or(ddb_default.locks_table),
                endpoint_url: nonempty("DECAP_DYNAMODB_ENDPOINT"),
            },
            credentials,
        }))
    }

    /// The settings as variables, for a build environment.
    pub fn to_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (DIRECT_VAR.to_owned(), "1".to_owned()),
            ("DECAP_S3_LOGS_BUCKET".into(), self.s3.logs_bucket.clone()),
            (
                "DECAP_S3_ARTIFACTS_BUCKET".into(),
                self.s3.artifacts_bucket.clone(),
            ),
            ("DECAP_S3_PREFIX".into(), self.s3.key_prefix.clone()),
            (
                "DECAP_S3_PATH_STYLE".into(),
                if self.s3.force_path_style { "1" } else { "0" }.into(),
            ),
            (
                "DECAP_DYNAMODB_BUILDS_TABLE".into(),
                self.dynamodb.builds_table.clone(),
            ),
            (
                "DECAP_DYNAMODB_LOCKS_TABLE".into(),
                self.dynamodb.locks_table.clone(),
            ),
        ];
        let optional = [
            ("DECAP_AWS_REGION", &self.region),
            ("DECAP_S3_ENDPOINT", &self.s3.endpoint_url),
            ("DECAP_DYNAMODB_ENDPOINT", &self.dynamodb.endpoint_url),
        ];
        vars.extend(
            optional
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), v.clone()))),
        );
        if let Some(c) = &self.credentials {
            vars.push((
                "DECAP_BCTOOL_AWS_ACCESS_KEY_ID".into(),
                c.access_key_id.clone(),
            ));
            vars.push((
                "DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY".into(),
                c.secret_access_key.clone(),
            ));
            if let Some(t) = &c.session_token {
                vars.push(("DECAP_BCTOOL_AWS_SESSION_TOKEN".into(), t.clone()));
            }
        }
        vars
    }

    /// The stores, made without a network call. The SDK retries throttling,
    /// 5xx answers and broken connections with backoff, up to six attempts.
    pub async fn stores(&self) -> DirectStores {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(
            RetryConfig::standard()
                .with_max_attempts(6)
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(5)),
        );
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(c) = &self.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "decap-bctool",
            ));
        }
        let sdk = loader.load().await;
        DirectStores {
            blobs: S3BlobStore::new(&sdk, self.s3.clone()),
            builds: DynamoDbBuildStore::new(&sdk, self.dynamodb.clone()),
            locks: DynamoDbLockStore::new(&sdk, self.dynamodb.clone()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn vars_round_trip() {
        let config = DirectConfig {
            region: Some("eu-west-1".into()),
            s3: S3Config {
                logs_bucket: "logs".into(),
                artifacts_bucket: "arts".into(),
                key_prefix: "team-a/".into(),
                force_path_style: true,
                endpoint_url: Some("http://127.0.0.1:9000".into()),
            },
            dynamodb: DynamoDbConfig {
                endpoint_url: Some("http://127.0.0.1:8000".into()),
                ..DynamoDbConfig::default()
            },
            credentials: Some(StaticCredentials {
                access_key_id: "AKID".into(),
                secret_access_key: "s3cr3t".into(),
                session_token: None,
            }),
        };
        let vars: HashMap<String, String> = config.to_vars().into_iter().collect();
        assert!(vars.keys().all(|k| VARS.contains(&k.as_str())));
        let back = DirectConfig::from_vars(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(back, Some(config));
        assert!(!format!("{back:?}").contains("s3cr3t"));
    }

    #[test]
    fn off_unless_asked_and_half_credentials_refused() {
        assert_eq!(DirectConfig::from_vars(|_| None), Ok(None));
        assert!(DirectConfig::from_vars(|k| (k == DIRECT_VAR).then(|| "yes".into())).is_err());
        let half = |k: &str| match k {
            DIRECT_VAR => Some("1".into()),
            "DECAP_BCTOOL_AWS_ACCESS_KEY_ID" => Some("AKID".into()),
            _ => None,
        };
        assert!(DirectConfig::from_vars(half).is_err());
    }
}
