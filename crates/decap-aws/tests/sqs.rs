//! The deferral queue contract on SQS FIFO with its DynamoDB index, against
//! the test bed's ElasticMQ and DynamoDB Local.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;
use decap_aws::{SqsConfig, SqsDeferralQueue};
use decap_core::build::BuildId;
use decap_core::names::ProjectKey;
use decap_core::ports::{DeferralQueue, DeferredEntry};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need SQS and DynamoDB. Start the test bed's with \
             `eval \"$(tests/bed/elasticmq.sh start)\"; eval \"$(tests/bed/dynamodb.sh start)\"` \
             (tests/run does this)."
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

async fn queue(visibility: Duration) -> SqsDeferralQueue {
    let sdk = sdk().await;
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let sqs = env("DECAP_TEST_SQS_ENDPOINT");
    let ddb = env("DECAP_TEST_DYNAMODB_ENDPOINT");
    let queue_url =
        SqsDeferralQueue::create_queue(&sdk, Some(&sqs), &format!("deferred-{tag}.fifo"))
            .await
            .unwrap();
    SqsDeferralQueue::create_index_table(&sdk, Some(&ddb), &format!("index-{tag}"))
        .await
        .unwrap();
    SqsDeferralQueue::connect(
        &sdk,
        SqsConfig {
            queue_url,
            index_table: format!("index-{tag}"),
            sqs_endpoint: Some(sqs),
            dynamodb_endpoint: Some(ddb),
            visibility,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn sqs_deferral_queue_keeps_the_contract() {
    decap_contract_tests::deferral_queue_suite(Arc::new(queue(Duration::from_secs(30)).await))
        .await;
}

#[tokio::test]
async fn a_taker_that_dies_loses_nothing() {
    let q = queue(Duration::from_secs(1)).await;
    let entry = DeferredEntry {
        build_id: BuildId::new(),
        project: ProjectKey::new("acme", "widgets").unwrap(),
        branch: "main".into(),
        git_ref: "refs/heads/main".into(),
        commit: Some("abc".into()),
        deferred_at: time::OffsetDateTime::now_utc(),
        reason: "locked".into(),
    };
    q.push(&entry).await.unwrap();
    let taken = q.receive_heads(10).await.unwrap();
    assert_eq!(taken.len(), 1);
    // The taker dies here: no ack, no release. Another taker sees nothing
    // while the lease runs, and the entry once it lapses.
    assert!(
        q.receive_heads(10).await.unwrap().is_empty(),
        "a taken entry is hidden while leased"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = q.receive_heads(10).await.unwrap();
    assert_eq!(
        again.iter().map(|r| r.entry.build_id).collect::<Vec<_>>(),
        vec![entry.build_id]
    );
    q.ack(&again[0]).await.unwrap();
    assert!(q.list().await.unwrap().is_empty());
}
