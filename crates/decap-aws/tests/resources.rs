//! `aws-resources`: creating and deleting everything, twice each, against
//! the test bed.
#![allow(clippy::unwrap_used)]

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::Credentials;
use decap_aws::resources::{self, Resources};
use decap_aws::{DynamoDbConfig, S3Config};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test bed (tests/run does: tests/bed/minio.sh, dynamodb.sh, elasticmq.sh)")
    })
}

#[tokio::test]
async fn everything_is_created_and_deleted_idempotently() {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "decaptest",
            "decaptestsecret",
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await;
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let r = Resources {
        s3: S3Config {
            logs_bucket: format!("res-logs-{tag}"),
            artifacts_bucket: format!("res-artifacts-{tag}"),
            key_prefix: String::new(),
            force_path_style: true,
            endpoint_url: Some(env("DECAP_TEST_S3_ENDPOINT")),
        },
        dynamodb: DynamoDbConfig {
            builds_table: format!("res-builds-{tag}"),
            deliveries_table: format!("res-deliveries-{tag}"),
            locks_table: format!("res-locks-{tag}"),
            endpoint_url: Some(env("DECAP_TEST_DYNAMODB_ENDPOINT")),
        },
        deferred_table: format!("res-deferred-{tag}"),
        ledger_table: format!("res-ledger-{tag}"),
        hub_table: format!("res-hub-{tag}"),
        sessions_table: format!("res-sessions-{tag}"),
        queue_name: format!("res-{tag}.fifo"),
        sqs_endpoint: Some(env("DECAP_TEST_SQS_ENDPOINT")),
        log_retention_days: 14,
    };
    let first = resources::create(&sdk, &r).await.unwrap();
    let again = resources::create(&sdk, &r).await.unwrap();
    assert_eq!(first, again, "creating twice changes nothing");

    // Decap's adapters accept what was made.
    decap_aws::S3BlobStore::connect(&sdk, r.s3.clone())
        .await
        .unwrap();
    decap_aws::DynamoDbBuildStore::connect(&sdk, r.dynamodb.clone())
        .await
        .unwrap();
    decap_aws::DynamoDbLockStore::connect(&sdk, r.dynamodb.clone())
        .await
        .unwrap();
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(r.s3.endpoint_url.clone().unwrap())
            .force_path_style(true)
            .build(),
    );
    let lifecycle = s3
        .get_bucket_lifecycle_configuration()
        .bucket(&r.s3.logs_bucket)
        .send()
        .await
        .unwrap();
    let days = lifecycle
        .rules()
        .first()
        .and_then(|rule| rule.expiration())
        .and_then(|e| e.days());
    assert_eq!(days, Some(14), "console logs expire after the retention");
    let ddb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .endpoint_url(r.dynamodb.endpoint_url.clone().unwrap())
            .build(),
    );
    let ttl = ddb
        .describe_time_to_live()
        .table_name(&r.dynamodb.deliveries_table)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.attribute_name()),
        Some(resources::DELIVERY_TTL_ATTRIBUTE)
    );
    s3.put_object()
        .bucket(&r.s3.logs_bucket)
        .key("v1/x/console.log.gz")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();

    // The queue and its dead-letter queue.
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .endpoint_url(r.sqs_endpoint.clone().unwrap())
            .build(),
    );
    let dead = format!("res-{tag}-dead.fifo");
    assert!(sqs.get_queue_url().queue_name(&dead).send().await.is_ok());

    resources::delete(&sdk, &r).await.unwrap();
    resources::delete(&sdk, &r).await.unwrap();
    for name in [r.queue_name.as_str(), dead.as_str()] {
        assert!(
            sqs.get_queue_url().queue_name(name).send().await.is_err(),
            "{name} is deleted"
        );
    }
    assert!(
        s3.head_bucket()
            .bucket(&r.s3.logs_bucket)
            .send()
            .await
            .is_err(),
        "a non-empty bucket is deleted too"
    );
    assert!(
        ddb.describe_table()
            .table_name(&r.dynamodb.builds_table)
            .send()
            .await
            .is_err()
    );
    assert!(
        decap_aws::S3BlobStore::connect(&sdk, r.s3.clone())
            .await
            .is_err()
    );
}

#[test]
fn the_policy_names_exactly_decaps_resources_in_the_right_account() {
    let r = Resources {
        s3: S3Config::default(),
        dynamodb: DynamoDbConfig::default(),
        deferred_table: "decap-deferred-builds".into(),
        ledger_table: "decap-status-ledger".into(),
        hub_table: "decap-status-hub".into(),
        sessions_table: "decap-sessions".into(),
        queue_name: "decap-deferred.fifo".into(),
        sqs_endpoint: None,
        log_retention_days: 30,
    };
    let policy = resources::policy("123456789012", "eu-west-1", &r)
        .unwrap()
        .to_string();
    for arn in [
        "arn:aws:s3:::decap-console-logs/*",
        "arn:aws:s3:::decap-build-artifacts/*",
        "arn:aws:dynamodb:eu-west-1:123456789012:table/decap-build-metadata",
        "arn:aws:dynamodb:eu-west-1:123456789012:table/decap-build-metadata/index/*",
        "arn:aws:dynamodb:eu-west-1:123456789012:table/decap-locks",
        "arn:aws:sqs:eu-west-1:123456789012:decap-deferred.fifo",
    ] {
        assert!(policy.contains(arn), "{arn} missing from {policy}");
    }
    assert!(!policy.contains("\"*\""), "no wildcard resource");
    assert!(
        !policy.contains("dynamodb:*") && !policy.contains("s3:*"),
        "no wildcard action"
    );
    assert!(
        resources::policy("AIDAEXAMPLE", "eu-west-1", &r).is_err(),
        "a user id is not an account id"
    );
}
