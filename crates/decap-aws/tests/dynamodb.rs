//! The build store and lock store contracts on DynamoDB, against the test
//! bed's DynamoDB Local.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use decap_aws::{DynamoDbBuildStore, DynamoDbConfig, DynamoDbLockStore};

fn endpoint() -> String {
    std::env::var("DECAP_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "DECAP_TEST_DYNAMODB_ENDPOINT is not set: these tests need DynamoDB. Start the test \
             bed's with `eval \"$(tests/bed/dynamodb.sh start)\"` (tests/run does this)."
        )
    })
}

async fn sdk() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        // DynamoDB Local takes any key id made of letters and digits only.
        .credentials_provider(Credentials::new(
            "decaptest",
            "decaptest",
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await
}

/// Fresh tables for one test.
async fn tables() -> (aws_config::SdkConfig, DynamoDbConfig) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let config = DynamoDbConfig {
        builds_table: format!("builds-{nanos:x}"),
        deliveries_table: format!("deliveries-{nanos:x}"),
        locks_table: format!("locks-{nanos:x}"),
        endpoint_url: Some(endpoint()),
    };
    let sdk = sdk().await;
    DynamoDbBuildStore::create_tables(&sdk, &config)
        .await
        .unwrap();
    (sdk, config)
}

#[tokio::test]
async fn dynamodb_build_store_keeps_the_contract() {
    let (sdk, config) = tables().await;
    let store = DynamoDbBuildStore::connect(&sdk, config).await.unwrap();
    decap_contract_tests::build_store_suite(Arc::new(store)).await;
}

#[tokio::test]
async fn dynamodb_run_store_keeps_the_contract() {
    let (sdk, config) = tables().await;
    let runs = decap_aws::DynamoDbRunStore::connect(&sdk, config.clone())
        .await
        .unwrap();
    let builds = DynamoDbBuildStore::connect(&sdk, config).await.unwrap();
    decap_contract_tests::run_store_suite(Arc::new(runs), Arc::new(builds)).await;
}

#[tokio::test]
async fn dynamodb_lock_store_keeps_the_contract() {
    let (sdk, config) = tables().await;
    let store = DynamoDbLockStore::connect(&sdk, config).await.unwrap();
    decap_contract_tests::lock_store_suite(Arc::new(store)).await;
}

#[tokio::test]
async fn dynamodb_status_ledger_keeps_the_contract() {
    let sdk = sdk().await;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let table = format!("ledger-{nanos:x}");
    let endpoint = endpoint();
    decap_aws::DynamoDbStatusLedger::create_table(&sdk, &table, Some(&endpoint))
        .await
        .unwrap();
    let ledger = decap_aws::DynamoDbStatusLedger::connect(&sdk, &table, Some(&endpoint))
        .await
        .unwrap();
    decap_contract_tests::status_ledger_suite(Arc::new(ledger)).await;
    let missing =
        decap_aws::DynamoDbStatusLedger::connect(&sdk, "no-such-ledger", Some(&endpoint)).await;
    assert!(
        missing.is_err_and(|e| e.to_string().contains("no-such-ledger")),
        "a missing ledger table is named"
    );
}

#[tokio::test]
async fn a_missing_table_is_a_clear_error_at_start_up() {
    let sdk = sdk().await;
    let config = DynamoDbConfig {
        builds_table: "no-such-table".into(),
        endpoint_url: Some(endpoint()),
        ..DynamoDbConfig::default()
    };
    let err = DynamoDbBuildStore::connect(&sdk, config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no-such-table") && err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn a_build_item_reads_with_awscli_attribute_by_attribute() {
    use decap_core::build::{Build, BuildStatus, Trigger};
    use decap_core::ports::BuildStore;
    let (sdk, config) = tables().await;
    let table = config.builds_table.clone();
    let store = DynamoDbBuildStore::connect(&sdk, config).await.unwrap();
    let t0 = time::macros::datetime!(2026-11-29 10:00:00.250 UTC);
    let mut b = Build::new(
        decap_core::ProjectKey::new("acme", "widgets").unwrap(),
        &decap_core::refs::GitRef::branch("main").unwrap(),
        Some("0123abcd".into()),
        Trigger::Webhook,
        t0,
    );
    store.insert(&b).await.unwrap();
    let queued = b.status;
    b.transition(BuildStatus::Running, t0 + time::Duration::seconds(2))
        .unwrap();
    store.update(&b, queued).await.unwrap();
    b.exit_code = Some(3);
    b.message = Some("exited with code 3".into());
    b.transition(BuildStatus::Failed, t0 + time::Duration::milliseconds(4500))
        .unwrap();
    store.update(&b, BuildStatus::Running).await.unwrap();
    // As `aws dynamodb get-item` shows it.
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .endpoint_url(endpoint())
            .build(),
    );
    let item = client
        .get_item()
        .table_name(&table)
        .key(
            "build-id",
            aws_sdk_dynamodb::types::AttributeValue::S(b.id.to_string()),
        )
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let number = |k: &str| item.get(k).and_then(|v| v.as_n().ok()).cloned();
    assert_eq!(text("build-status").as_deref(), Some("failed"));
    assert_eq!(number("exit-code").as_deref(), Some("3"));
    assert_eq!(
        text("queued-at").as_deref(),
        Some("2026-11-29T10:00:00.25Z")
    );
    assert_eq!(
        text("started-at").as_deref(),
        Some("2026-11-29T10:00:02.25Z")
    );
    assert_eq!(text("ended-at").as_deref(), Some("2026-11-29T10:00:04.75Z"));
    assert_eq!(number("started-at-epoch").as_deref(), Some("1795946402.25"));
    assert_eq!(number("duration-ms").as_deref(), Some("2500"));
    assert_eq!(text("commit").as_deref(), Some("0123abcd"));
    assert_eq!(text("trigger").as_deref(), Some("webhook"));
    assert_eq!(text("message").as_deref(), Some("exited with code 3"));
    // And Decap reads it back whole.
    assert_eq!(store.get(b.id).await.unwrap().unwrap(), b);
}

#[tokio::test]
async fn dynamodb_status_hub_keeps_the_contract() {
    let sdk = sdk().await;
    let table = format!(
        "hub-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    decap_aws::DynamoDbStatusHub::create_table(&sdk, &table, Some(&endpoint()))
        .await
        .unwrap();
    let hub = decap_aws::DynamoDbStatusHub::connect(&sdk, &table, Some(&endpoint()))
        .await
        .unwrap();
    decap_contract_tests::status_hub_suite(Arc::new(hub)).await;
}

#[tokio::test]
async fn dynamodb_session_store_keeps_the_contract() {
    let sdk = sdk().await;
    let table = format!(
        "sessions-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    decap_aws::DynamoDbSessionStore::create_table(&sdk, &table, Some(&endpoint()))
        .await
        .unwrap();
    let store = decap_aws::DynamoDbSessionStore::connect(&sdk, &table, Some(&endpoint()))
        .await
        .unwrap();
    decap_contract_tests::session_store_suite(Arc::new(store)).await;
}
