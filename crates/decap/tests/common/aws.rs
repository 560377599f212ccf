//! The AWS side of the test bed (MinIO, DynamoDB Local, ElasticMQ): a
//! fresh set of buckets, tables and queue per test.

use aws_config::{BehaviorVersion, Region};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the test bed. Start it with \
             `eval \"$(tests/bed/minio.sh start)\"; eval \"$(tests/bed/dynamodb.sh start)\"` \
             (tests/run does this)."
        )
    })
}

pub const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "decaptest"),
    ("AWS_SECRET_ACCESS_KEY", "decaptestsecret"),
    ("AWS_REGION", "us-east-1"),
];

pub async fn sdk() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "decaptest",
            "decaptestsecret",
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await
}

/// Buckets, tables and a queue of this test's own, and the `decap serve`
/// flags that use them all.
pub struct World {
    pub s3: String,
    pub sdk: aws_config::SdkConfig,
    pub admin: aws_sdk_s3::Client,
    pub logs: String,
    pub artifacts: String,
    pub tables: decap_aws::DynamoDbConfig,
    pub args: Vec<String>,
}

impl World {
    pub async fn create() -> World {
        let (s3, ddb) = (
            env("DECAP_TEST_S3_ENDPOINT"),
            env("DECAP_TEST_DYNAMODB_ENDPOINT"),
        );
        let tag = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let sdk = sdk().await;
        let (logs, artifacts) = (format!("e2e-logs-{tag}"), format!("e2e-artifacts-{tag}"));
        let admin = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .endpoint_url(&s3)
                .force_path_style(true)
                .build(),
        );
        for bucket in [&logs, &artifacts] {
            admin.create_bucket().bucket(bucket).send().await.unwrap();
        }
        let tables = decap_aws::DynamoDbConfig {
            builds_table: format!("e2e-builds-{tag}"),
            deliveries_table: format!("e2e-deliveries-{tag}"),
            locks_table: format!("e2e-locks-{tag}"),
            endpoint_url: Some(ddb.clone()),
        };
        decap_aws::DynamoDbBuildStore::create_tables(&sdk, &tables)
            .await
            .unwrap();
        let hub_table = format!("e2e-hub-{tag}");
        decap_aws::DynamoDbStatusHub::create_table(&sdk, &hub_table, Some(&ddb))
            .await
            .unwrap();
        let sessions_table = format!("e2e-sessions-{tag}");
        decap_aws::DynamoDbSessionStore::create_table(&sdk, &sessions_table, Some(&ddb))
            .await
            .unwrap();
        let sqs = env("DECAP_TEST_SQS_ENDPOINT");
        let queue_url =
            decap_aws::SqsDeferralQueue::create_queue(&sdk, Some(&sqs), &format!("e2e-{tag}.fifo"))
                .await
                .unwrap();
        let deferred_table = format!("e2e-deferred-{tag}");
        decap_aws::SqsDeferralQueue::create_index_table(&sdk, Some(&ddb), &deferred_table)
            .await
            .unwrap();
        let args = vec![
            "--blob-store".into(),
            "s3".into(),
            "--s3-endpoint".into(),
            s3.clone(),
            "--s3-path-style".into(),
            "--s3-logs-bucket".into(),
            logs.clone(),
            "--s3-artifacts-bucket".into(),
            artifacts.clone(),
            "--build-store".into(),
            "dynamodb".into(),
            "--lock-store".into(),
            "dynamodb".into(),
            "--dynamodb-endpoint".into(),
            ddb.clone(),
            "--dynamodb-builds-table".into(),
            tables.builds_table.clone(),
            "--dynamodb-deliveries-table".into(),
            tables.deliveries_table.clone(),
            "--dynamodb-locks-table".into(),
            tables.locks_table.clone(),
            "--dynamodb-hub-table".into(),
            hub_table,
            "--dynamodb-sessions-table".into(),
            sessions_table,
            "--deferral-queue".into(),
            "sqs".into(),
            "--sqs-endpoint".into(),
            sqs,
            "--sqs-queue-url".into(),
            queue_url,
            "--dynamodb-deferred-table".into(),
            deferred_table,
        ];
        World {
            s3,
            sdk,
            admin,
            logs,
            artifacts,
            tables,
            args,
        }
    }
}
