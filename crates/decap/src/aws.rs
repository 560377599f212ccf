//! The AWS backends: S3, DynamoDB and SQS for the server, bctool's direct
//! path, and `decap aws-resources`. They need the `aws` feature (on by
//! default); a `decap` built without it says so when a flag asks for them,
//! before anything is touched.

use std::sync::Arc;

use anyhow::Result;
use decap_core::ports::{
    BlobStore, BuildStore, DeferralQueue, DetailStore, LockStore, RunStore, SessionStore,
    StatusHub, StatusLedger,
};

use crate::{AwsResourcesArgs, StorageArgs};

/// Why a flag that needs AWS is refused by a build without it.
pub(crate) const LEFT_OUT: &str = "this decap was built without its AWS backends (S3, DynamoDB, SQS; \
     the cargo feature `aws`): build it with its default features, or with `--features aws`";

pub(crate) use imp::{Aws, resources};

#[cfg(feature = "aws")]
mod imp {
    use std::time::Duration;

    use anyhow::{Context, bail};

    use super::*;
    use crate::{BlobBackend, PolicyFor, ResourcesAction, TableBackend};

    /// The AWS SDK's settings, loaded once for every store that uses AWS.
    pub(crate) struct Aws {
        sdk: aws_config::SdkConfig,
    }

    impl Aws {
        /// The SDK's settings when a store uses AWS or bctool takes its
        /// direct path; `None` otherwise.
        pub(crate) async fn connect(st: &StorageArgs) -> Result<Option<Aws>> {
            if !st.uses_aws() {
                return Ok(None);
            }
            Ok(Some(Aws { sdk: sdk(st).await }))
        }

        /// The S3 blob store (its buckets checked).
        pub(crate) async fn blobs(&self, st: &StorageArgs) -> Result<Arc<dyn BlobStore>> {
            Ok(Arc::new(
                decap_aws::S3BlobStore::connect(&self.sdk, st.s3())
                    .await
                    .context("S3 blob store")?,
            ))
        }

        /// Detail files of CI runs beside the artifacts in S3 (shared by
        /// the replicas; the buckets were checked by [`Aws::blobs`]).
        pub(crate) fn details(&self, st: &StorageArgs) -> Arc<dyn DetailStore> {
            Arc::new(decap_aws::S3DetailStore::new(decap_aws::S3BlobStore::new(
                &self.sdk,
                st.s3(),
            )))
        }

        /// The DynamoDB build store (its tables checked).
        pub(crate) async fn builds(&self, st: &StorageArgs) -> Result<Arc<dyn BuildStore>> {
            Ok(Arc::new(
                decap_aws::DynamoDbBuildStore::connect(&self.sdk, st.dynamodb())
                    .await
                    .context("DynamoDB build store")?,
            ))
        }

        /// Pipeline runs in the DynamoDB build records' table.
        pub(crate) async fn runs(&self, st: &StorageArgs) -> Result<Arc<dyn RunStore>> {
            Ok(Arc::new(
                decap_aws::DynamoDbRunStore::connect(&self.sdk, st.dynamodb())
                    .await
                    .context("DynamoDB run store")?,
            ))
        }

        /// The DynamoDB lock store (its table checked).
        pub(crate) async fn locks(&self, st: &StorageArgs) -> Result<Arc<dyn LockStore>> {
            Ok(Arc::new(
                decap_aws::DynamoDbLockStore::connect(&self.sdk, st.dynamodb())
                    .await
                    .context("DynamoDB lock store")?,
            ))
        }

        /// The SQS FIFO deferral queue with its DynamoDB index.
        pub(crate) async fn queue(&self, st: &StorageArgs) -> Result<Arc<dyn DeferralQueue>> {
            let queue_url = st
                .sqs_queue_url
                .clone()
                .context("--deferral-queue sqs needs --sqs-queue-url (DECAP_SQS_QUEUE_URL)")?;
            let config = decap_aws::SqsConfig {
                queue_url,
                index_table: st.dynamodb_deferred_table.clone(),
                sqs_endpoint: st.sqs_endpoint.clone(),
                dynamodb_endpoint: st.dynamodb_endpoint.clone(),
                visibility: Duration::from_secs(60),
            };
            Ok(Arc::new(
                decap_aws::SqsDeferralQueue::connect(&self.sdk, config)
                    .await
                    .context("SQS deferral queue")?,
            ))
        }

        /// What Decap told GitHub, in DynamoDB (shared by the replicas).
        pub(crate) async fn ledger(&self, st: &StorageArgs) -> Result<Arc<dyn StatusLedger>> {
            Ok(Arc::new(
                decap_aws::DynamoDbStatusLedger::connect(
                    &self.sdk,
                    &st.dynamodb_ledger_table,
                    st.dynamodb_endpoint.as_deref(),
                )
                .await
                .context("DynamoDB status ledger")?,
            ))
        }

        /// The CI status hub's records, in DynamoDB (shared by the
        /// replicas).
        pub(crate) async fn hub(&self, st: &StorageArgs) -> Result<Arc<dyn StatusHub>> {
            Ok(Arc::new(
                decap_aws::DynamoDbStatusHub::connect(
                    &self.sdk,
                    &st.dynamodb_hub_table,
                    st.dynamodb_endpoint.as_deref(),
                )
                .await
                .context("DynamoDB status hub")?,
            ))
        }

        /// The web UI's login sessions, in DynamoDB (shared by the
        /// replicas).
        pub(crate) async fn sessions(&self, st: &StorageArgs) -> Result<Arc<dyn SessionStore>> {
            Ok(Arc::new(
                decap_aws::DynamoDbSessionStore::connect(
                    &self.sdk,
                    &st.dynamodb_sessions_table,
                    st.dynamodb_endpoint.as_deref(),
                )
                .await
                .context("DynamoDB login sessions")?,
            ))
        }

        /// bctool's settings for its direct path, or none.
        pub(crate) fn bctool_env(
            st: &StorageArgs,
            aws: Option<&Aws>,
        ) -> Result<Vec<(String, String)>> {
            st.bctool_env(aws.map(|a| &a.sdk))
        }
    }

    async fn sdk(st: &StorageArgs) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &st.aws_region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        loader.load().await
    }

    impl StorageArgs {
        fn s3(&self) -> decap_aws::S3Config {
            decap_aws::S3Config {
                logs_bucket: self.s3_logs_bucket.clone(),
                artifacts_bucket: self.s3_artifacts_bucket.clone(),
                key_prefix: self.s3_prefix.clone(),
                force_path_style: self.s3_path_style,
                endpoint_url: self.s3_endpoint.clone(),
            }
        }

        /// bctool's settings for its direct path, or none.
        fn bctool_env(&self, sdk: Option<&aws_config::SdkConfig>) -> Result<Vec<(String, String)>> {
            if !self.bctool_direct {
                return Ok(Vec::new());
            }
            if self.blob_store != BlobBackend::S3
                || self.build_store != TableBackend::Dynamodb
                || self.lock_store != TableBackend::Dynamodb
            {
                bail!(
                    "--bctool-direct needs --blob-store s3, --build-store dynamodb and --lock-store dynamodb: bctool writes where the server reads"
                );
            }
            let credentials = match (
                &self.bctool_aws_access_key_id,
                &self.bctool_aws_secret_access_key,
            ) {
                (Some(id), Some(secret)) => Some(decap_aws::direct::StaticCredentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: None,
                }),
                (None, None) => None,
                _ => bail!(
                    "--bctool-aws-access-key-id and --bctool-aws-secret-access-key go together"
                ),
            };
            let region = self.aws_region.clone().or_else(|| {
                sdk.and_then(aws_config::SdkConfig::region)
                    .map(ToString::to_string)
            });
            Ok(decap_aws::DirectConfig {
                region,
                s3: self.s3(),
                dynamodb: self.dynamodb(),
                credentials,
            }
            .to_vars())
        }

        fn dynamodb(&self) -> decap_aws::DynamoDbConfig {
            decap_aws::DynamoDbConfig {
                builds_table: self.dynamodb_builds_table.clone(),
                deliveries_table: self.dynamodb_deliveries_table.clone(),
                locks_table: self.dynamodb_locks_table.clone(),
                endpoint_url: self.dynamodb_endpoint.clone(),
            }
        }
    }

    pub(crate) async fn resources(args: AwsResourcesArgs) -> Result<()> {
        let st = &args.storage;
        let sdk = sdk(st).await;
        let resources = decap_aws::resources::Resources {
            s3: st.s3(),
            dynamodb: st.dynamodb(),
            deferred_table: st.dynamodb_deferred_table.clone(),
            ledger_table: st.dynamodb_ledger_table.clone(),
            hub_table: st.dynamodb_hub_table.clone(),
            sessions_table: st.dynamodb_sessions_table.clone(),
            queue_name: args.sqs_queue_name.clone(),
            sqs_endpoint: st.sqs_endpoint.clone(),
            log_retention_days: args.log_retention_days,
        };
        let account_and_region = || async {
            let account = match &args.account_id {
                Some(a) => a.clone(),
                None => decap_aws::resources::account_id(&sdk).await?,
            };
            let region = sdk
                .region()
                .map(|r| r.as_ref().to_owned())
                .context("no region: pass --aws-region or set AWS_REGION")?;
            anyhow::Ok((account, region))
        };
        let mut identities = decap_aws::iam::Identities {
            user: args.iam_user.clone(),
            role: None,
            bctool_user: args.iam_bctool_user.clone(),
            endpoint: args.iam_endpoint.clone(),
        };
        match args.action {
            ResourcesAction::Create => {
                let created = decap_aws::resources::create(&sdk, &resources).await?;
                if let Some(role) = &args.iam_role {
                    let (account, _) = account_and_region().await?;
                    let trust = match (&args.iam_trust_policy, &args.iam_oidc_provider) {
                        (Some(file), _) => {
                            let text = std::fs::read_to_string(file)
                                .with_context(|| format!("cannot read {}", file.display()))?;
                            serde_json::from_str(&text).with_context(|| {
                                format!("{} is not a JSON trust policy", file.display())
                            })?
                        }
                        (None, Some(provider)) => decap_aws::iam::service_account_trust_policy(
                            &account,
                            provider,
                            &args.iam_service_account,
                        )?,
                        (None, None) => bail!(
                            "--iam-role needs --iam-trust-policy FILE or --iam-oidc-provider ISSUER"
                        ),
                    };
                    identities.role = Some((role.clone(), trust));
                }
                if !identities.is_empty() {
                    let (account, region) = account_and_region().await?;
                    let arns = decap_aws::iam::create(
                        &sdk,
                        &identities,
                        &decap_aws::resources::policy(&account, &region, &resources)?,
                        &decap_aws::resources::bctool_policy(&account, &region, &resources)?,
                    )
                    .await?;
                    for arn in arns {
                        println!("identity {arn} holds its policy");
                    }
                }
                println!(
                    "created; run decap with --deferral-queue sqs --sqs-queue-url {}",
                    created.queue_url
                );
            }
            ResourcesAction::Delete => {
                if let Some(role) = &args.iam_role {
                    identities.role = Some((role.clone(), serde_json::Value::Null));
                }
                decap_aws::iam::delete(&sdk, &identities).await?;
                decap_aws::resources::delete(&sdk, &resources).await?;
                println!("deleted");
            }
            ResourcesAction::Policy => {
                let (account, region) = account_and_region().await?;
                let policy = match args.policy_for {
                    PolicyFor::Decap => {
                        decap_aws::resources::policy(&account, &region, &resources)?
                    }
                    PolicyFor::Bctool => {
                        decap_aws::resources::bctool_policy(&account, &region, &resources)?
                    }
                };
                println!("{}", serde_json::to_string_pretty(&policy)?);
            }
        }
        Ok(())
    }
}

#[cfg(not(feature = "aws"))]
mod imp {
    use anyhow::bail;

    use super::*;

    /// No AWS backend exists in this build.
    pub(crate) enum Aws {}

    impl Aws {
        /// `None`, or the reason a store that needs AWS cannot be had.
        pub(crate) async fn connect(st: &StorageArgs) -> Result<Option<Aws>> {
            if st.uses_aws() || st.bctool_direct {
                bail!("{LEFT_OUT}");
            }
            Ok(None)
        }

        pub(crate) async fn blobs(&self, _: &StorageArgs) -> Result<Arc<dyn BlobStore>> {
            match *self {}
        }

        pub(crate) fn details(&self, _: &StorageArgs) -> Arc<dyn DetailStore> {
            match *self {}
        }

        pub(crate) async fn builds(&self, _: &StorageArgs) -> Result<Arc<dyn BuildStore>> {
            match *self {}
        }

        pub(crate) async fn locks(&self, _: &StorageArgs) -> Result<Arc<dyn LockStore>> {
            match *self {}
        }

        pub(crate) async fn runs(&self, _: &StorageArgs) -> Result<Arc<dyn RunStore>> {
            match *self {}
        }

        pub(crate) async fn queue(&self, _: &StorageArgs) -> Result<Arc<dyn DeferralQueue>> {
            match *self {}
        }

        pub(crate) async fn ledger(&self, _: &StorageArgs) -> Result<Arc<dyn StatusLedger>> {
            match *self {}
        }

        pub(crate) async fn hub(&self, _: &StorageArgs) -> Result<Arc<dyn StatusHub>> {
            match *self {}
        }

        pub(crate) async fn sessions(&self, _: &StorageArgs) -> Result<Arc<dyn SessionStore>> {
            match *self {}
        }

        /// No direct path: bctool ships through the server.
        pub(crate) fn bctool_env(
            st: &StorageArgs,
            _: Option<&Aws>,
        ) -> Result<Vec<(String, String)>> {
            if st.bctool_direct {
                bail!("--bctool-direct: {LEFT_OUT}");
            }
            Ok(Vec::new())
        }
    }

    /// `decap aws-resources` needs the AWS SDK.
    pub(crate) async fn resources(_: AwsResourcesArgs) -> Result<()> {
        bail!("{LEFT_OUT}")
    }
}
