//! Everything Decap needs in an AWS account, created and deleted completely
//! and idempotently (`decap aws-resources create|delete|policy`).

use std::time::Duration;

use aws_sdk_dynamodb::types::TimeToLiveSpecification;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter,
};
use decap_core::{Error, Result};
use serde_json::json;

use crate::{DynamoDbBuildStore, DynamoDbConfig, S3Config, SqsDeferralQueue};

/// The attribute of webhook deliveries that DynamoDB's TTL expires them by.
pub const DELIVERY_TTL_ATTRIBUTE: &str = "expires-at-epoch";

/// What to create.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Buckets.
    pub s3: S3Config,
    /// Tables.
    pub dynamodb: DynamoDbConfig,
    /// The deferred builds' index table.
    pub deferred_table: String,
    /// What Decap told GitHub, shared by its replicas.
    pub ledger_table: String,
    /// The CI status hub's records, shared by the replicas.
    pub hub_table: String,
    /// The web UI's login sessions, shared by the replicas.
    pub sessions_table: String,
    /// The FIFO queue's name (ends in `.fifo`).
    pub queue_name: String,
    /// An SQS endpoint instead of AWS.
    pub sqs_endpoint: Option<String>,
    /// Console logs expire after this many days.
    pub log_retention_days: i32,
}

/// What exists after `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The queue's URL (what `--sqs-queue-url` takes).
    pub queue_url: String,
}

fn s3_client(sdk: &aws_config::SdkConfig, cfg: &S3Config) -> aws_sdk_s3::Client {
    let mut b = aws_sdk_s3::config::Builder::from(sdk).force_path_style(cfg.force_path_style);
    if let Some(url) = &cfg.endpoint_url {
        b = b.endpoint_url(url);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

fn sqs_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_sqs::Client {
    let mut b = aws_sdk_sqs::config::Builder::from(sdk);
    if let Some(url) = endpoint {
        b = b.endpoint_url(url);
    }
    aws_sdk_sqs::Client::from_conf(b.build())
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend("aws", format!("{what}: {e}"))
}

/// Creates the buckets (console logs expiring after the retention), the
/// tables with their indexes (deliveries expiring by TTL), the deferred
/// builds' index and the FIFO queue with its dead-letter queue (both
/// keeping messages 14 days). What exists already is kept (the queues are
/// brought to those settings).
pub async fn create(sdk: &aws_config::SdkConfig, r: &Resources) -> Result<Created> {
    let s3 = s3_client(sdk, &r.s3);
    let region = sdk.region().map(|r| r.as_ref().to_owned());
    for bucket in [&r.s3.logs_bucket, &r.s3.artifacts_bucket] {
        let mut req = s3.create_bucket().bucket(bucket);
        if let Some(region) = region.as_deref().filter(|r| *r != "us-east-1") {
            req = req.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error().is_some_and(|se| {
                    se.is_bucket_already_owned_by_you() || se.is_bucket_already_exists()
                }) => {}
            Err(e) => {
                return Err(fail(
                    &format!("creating bucket {bucket}"),
                    crate::sdk_message(&e),
                ));
            }
        }
    }
    let rule = LifecycleRule::builder()
        .id("decap-expire-console-logs")
        .status(ExpirationStatus::Enabled)
        .filter(
            LifecycleRuleFilter::builder()
                .prefix(r.s3.key_prefix.clone())
                .build(),
        )
        .expiration(
            LifecycleExpiration::builder()
                .days(r.log_retention_days)
                .build(),
        )
        .build()
        .map_err(|e| fail("lifecycle rule", e))?;
    s3.put_bucket_lifecycle_configuration()
        .bucket(&r.s3.logs_bucket)
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(rule)
                .build()
                .map_err(|e| fail("lifecycle rule", e))?,
        )
        .send()
        .await
        .map_err(|e| fail("setting the console logs' expiry", crate::sdk_message(&e)))?;

    DynamoDbBuildStore::create_tables(sdk, &r.dynamodb).await?;
    crate::DynamoDbStatusLedger::create_table(
        sdk,
        &r.ledger_table,
        r.dynamodb.endpoint_url.as_deref(),
    )
    .await?;
    crate::DynamoDbStatusHub::create_table(sdk, &r.hub_table, r.dynamodb.endpoint_url.as_deref())
        .await?;
    crate::DynamoDbSessionStore::create_table(
        sdk,
        &r.sessions_table,
        r.dynamodb.endpoint_url.as_deref(),
    )
    .await?;
    let ddb = crate::dynamodb::client_at(sdk, r.dynamodb.endpoint_url.as_deref());
    for (table, attribute) in [
        (&r.dynamodb.deliveries_table, DELIVERY_TTL_ATTRIBUTE),
        (&r.sessions_table, crate::SESSION_TTL_ATTRIBUTE),
    ] {
        enable_ttl(&ddb, table, attribute).await?;
    }
    SqsDeferralQueue::create_index_table(
        sdk,
        r.dynamodb.endpoint_url.as_deref(),
        &r.deferred_table,
    )
    .await?;
    let queue_url =
        SqsDeferralQueue::create_queue(sdk, r.sqs_endpoint.as_deref(), &r.queue_name).await?;
    Ok(Created { queue_url })
}

/// Deletes everything `create` makes, objects included. What is gone
/// already is skipped.
pub async fn delete(sdk: &aws_config::SdkConfig, r: &Resources) -> Result<()> {
    let s3 = s3_client(sdk, &r.s3);
    for bucket in [&r.s3.logs_bucket, &r.s3.artifacts_bucket] {
        let mut token = None;
        loop {
            let page = match s3
                .list_objects_v2()
                .bucket(bucket)
                .set_continuation_token(token.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_no_such_bucket()) =>
                {
                    break;
                }
                Err(e) => {
                    return Err(fail(&format!("listing {bucket}"), crate::sdk_message(&e)));
                }
            };
            for object in page.contents() {
                if let Some(key) = object.key() {
                    s3.delete_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .map_err(|e| fail(&format!("emptying {bucket}"), crate::sdk_message(&e)))?;
                }
            }
            match page.next_continuation_token() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        match s3.delete_bucket().bucket(bucket).send().await {
            Ok(_) => {}
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {}
            Err(e) => {
                return Err(fail(&format!("deleting {bucket}"), crate::sdk_message(&e)));
            }
        }
    }
    let ddb = crate::dynamodb::client_at(sdk, r.dynamodb.endpoint_url.as_deref());
    for table in [
        &r.dynamodb.builds_table,
        &r.dynamodb.deliveries_table,
        &r.dynamodb.locks_table,
        &r.deferred_table,
        &r.ledger_table,
        &r.hub_table,
        &r.sessions_table,
    ] {
        match ddb.delete_table().table_name(table).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(fail(
                    &format!("deleting table {table}"),
                    crate::sdk_message(&e),
                ));
            }
        }
    }
    let sqs = sqs_client(sdk, r.sqs_endpoint.as_deref());
    for name in [
        r.queue_name.clone(),
        crate::sqs::dead_letter_name(&r.queue_name),
    ] {
        match sqs.get_queue_url().queue_name(&name).send().await {
            Ok(found) => {
                if let Some(url) = found.queue_url() {
                    sqs.delete_queue()
                        .queue_url(url)
                        .send()
                        .await
                        .map_err(|e| {
                            fail(&format!("deleting queue {name}"), crate::sdk_message(&e))
                        })?;
                }
            }
            Err(e)
                if e.as_service_error().is_some_and(|se| {
                    use aws_sdk_sqs::error::ProvideErrorMetadata;
                    se.is_queue_does_not_exist()
                        || se.code().is_some_and(|c| {
                            c.contains("QueueDoesNotExist") || c.contains("NonExistentQueue")
                        })
                }) => {}
            Err(e) => {
                return Err(fail(
                    &format!("finding queue {name}"),
                    crate::sdk_message(&e),
                ));
            }
        }
    }
    Ok(())
}

/// The account the credentials belong to: the `Account` field of STS
/// `GetCallerIdentity` (not the user id, which is a different number).
pub async fn account_id(sdk: &aws_config::SdkConfig) -> Result<String> {
    let me = aws_sdk_sts::Client::new(sdk)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| fail("asking STS who we are", crate::sdk_message(&e)))?;
    me.account()
        .map(str::to_owned)
        .ok_or_else(|| fail("asking STS who we are", "no account in the answer"))
}

fn check_account(account: &str) -> Result<()> {
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::invalid(
            "account",
            format!("{account:?} is not a 12-digit AWS account id"),
        ));
    }
    Ok(())
}

/// The IAM policy of least privilege for bctool on its direct path: put
/// (and abort) objects under the versioned key layout of the two buckets,
/// read build records and replace them (a conditional put, only from
/// `running`), update locks (a release is an update that removes the
/// owner). Nothing is listed, deleted or described.
pub fn bctool_policy(account: &str, region: &str, r: &Resources) -> Result<serde_json::Value> {
    check_account(account)?;
    let table = |t: &str| format!("arn:aws:dynamodb:{region}:{account}:table/{t}");
    Ok(json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "BctoolBlobs",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": [
                    format!("arn:aws:s3:::{}/{}v1/*", r.s3.logs_bucket, r.s3.key_prefix),
                    format!("arn:aws:s3:::{}/{}v1/*", r.s3.artifacts_bucket, r.s3.key_prefix),
                ],
            },
            {
                "Sid": "BctoolBuildRecords",
                "Effect": "Allow",
                "Action": ["dynamodb:GetItem", "dynamodb:PutItem"],
                "Resource": [table(&r.dynamodb.builds_table)],
            },
            {
                "Sid": "BctoolLocks",
                "Effect": "Allow",
                "Action": ["dynamodb:UpdateItem"],
                "Resource": [table(&r.dynamodb.locks_table)],
            },
        ],
    }))
}

/// The IAM policy of least privilege for Decap: these buckets' objects,
/// these tables and their indexes, this queue; nothing else. `account` is
/// the 12-digit account id (from STS `GetCallerIdentity`'s `Account`).
pub fn policy(account: &str, region: &str, r: &Resources) -> Result<serde_json::Value> {
    check_account(account)?;
    let table = |t: &str| format!("arn:aws:dynamodb:{region}:{account}:table/{t}");
    let tables: Vec<String> = [
        &r.dynamodb.builds_table,
        &r.dynamodb.deliveries_table,
        &r.dynamodb.locks_table,
        &r.deferred_table,
        &r.ledger_table,
        &r.hub_table,
        &r.sessions_table,
    ]
    .iter()
    .flat_map(|t| [table(t), format!("{}/index/*", table(t))])
    .collect();
    Ok(json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DecapBlobs",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": [
                    format!("arn:aws:s3:::{}/*", r.s3.logs_bucket),
                    format!("arn:aws:s3:::{}/*", r.s3.artifacts_bucket),
                ],
            },
            {
                "Sid": "DecapBuckets",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [
                    format!("arn:aws:s3:::{}", r.s3.logs_bucket),
                    format!("arn:aws:s3:::{}", r.s3.artifacts_bucket),
                ],
            },
            {
                "Sid": "DecapTables",
                "Effect": "Allow",
                "Action": [
                    "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                    "dynamodb:Query", "dynamodb:Scan", "dynamodb:DescribeTable", "dynamodb:ConditionCheckItem",
                ],
                "Resource": tables,
            },
            {
                "Sid": "DecapQueue",
                "Effect": "Allow",
                "Action": [
                    "sqs:SendMessage", "sqs:ReceiveMessage", "sqs:DeleteMessage",
                    "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes",
                ],
                "Resource": [format!("arn:aws:sqs:{region}:{account}:{}", r.queue_name)],
            },
        ],
    }))
}

/// Turns on a table's time to live by `attribute` (a table being created
/// answers "in use" for a moment: tried again for up to ten seconds).
async fn enable_ttl(ddb: &aws_sdk_dynamodb::Client, table: &str, attribute: &str) -> Result<()> {
    let mut tries = 0;
    loop {
        let ttl = ddb
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(attribute)
                    .enabled(true)
                    .build()
                    .map_err(|e| fail("TTL", e))?,
            )
            .send()
            .await;
        match ttl {
            Ok(_) => return Ok(()),
            Err(e) => {
                let text = crate::sdk_message(&e);
                if text.contains("already enabled") {
                    return Ok(());
                }
                tries += 1;
                if tries > 20 {
                    return Err(fail(&format!("enabling the time to live of {table}"), text));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
