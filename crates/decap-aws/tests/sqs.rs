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
use decap_core::ports::Received;
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

fn waiting(branch: &str, commit: &str) -> DeferredEntry {
    DeferredEntry {
        build_id: BuildId::new(),
        project: ProjectKey::new("acme", "widgets").unwrap(),
        branch: branch.into(),
        git_ref: format!("refs/heads/{branch}"),
        commit: Some(commit.into()),
        deferred_at: time::OffsetDateTime::now_utc(),
        reason: "locked".into(),
    }
}

async fn release_all(q: &SqsDeferralQueue, taken: &[Received]) {
    for r in taken {
        q.release(r).await.unwrap();
    }
}

#[tokio::test]
async fn a_message_the_queue_lost_is_sent_again_from_its_index() {
    let q = queue(Duration::from_secs(1)).await;
    let lost = waiting("main", "a1");
    let behind = waiting("main", "a2");
    let other = waiting("dev", "b1");
    for e in [&lost, &behind, &other] {
        q.push(e).await.unwrap();
    }
    // The queue loses the oldest message of main behind Decap's back (past
    // its retention, moved to the dead-letter queue, deleted by hand).
    let sdk = sdk().await;
    let raw = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .endpoint_url(env("DECAP_TEST_SQS_ENDPOINT"))
            .build(),
    );
    let url = q.queue_url().to_owned();
    let mut deleted = false;
    for _ in 0..5 {
        let got = raw
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
        if let Some(m) = got
            .messages()
            .iter()
            .find(|m| m.body() == Some(&lost.build_id.to_string()))
        {
            raw.delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the message to lose was found");
    let ids = |t: &[Received]| {
        let mut v: Vec<BuildId> = t.iter().map(|r| r.entry.build_id).collect();
        v.sort_by_key(|id| id.to_string());
        v
    };
    let sorted = |mut v: Vec<BuildId>| {
        v.sort_by_key(|id| id.to_string());
        v
    };
    // Still listed, never offered; too soon to call it lost.
    assert_eq!(q.list().await.unwrap().len(), 3);
    let taken = q.receive_heads(10).await.unwrap();
    assert_eq!(ids(&taken), sorted(vec![behind.build_id, other.build_id]));
    release_all(&q, &taken).await;
    assert!(
        q.requeue_lost().await.unwrap().is_empty(),
        "not yet: it may be held by a taker"
    );
    // Past any hold, a receive that took all on offer still lacks it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let taken = q.receive_heads(10).await.unwrap();
    release_all(&q, &taken).await;
    assert_eq!(q.requeue_lost().await.unwrap(), vec![lost.build_id]);
    assert!(
        q.requeue_lost().await.unwrap().is_empty(),
        "sent again once, not at every look"
    );
    // Offered again, each entry once, and main's oldest first when SQS
    // hands its group over together.
    let mut offered = Vec::new();
    for _ in 0..10 {
        let taken = q.receive_heads(10).await.unwrap();
        if taken.is_empty() && offered.len() == 3 {
            break;
        }
        for r in &taken {
            offered.push(r.entry.build_id);
            q.ack(r).await.unwrap();
        }
    }
    assert_eq!(
        sorted(offered.clone()),
        sorted(vec![lost.build_id, behind.build_id, other.build_id]),
        "{offered:?}"
    );
    assert!(q.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_queue_keeps_messages_fourteen_days_with_a_dead_letter_queue() {
    let q = queue(Duration::from_secs(30)).await;
    let sdk = sdk().await;
    let raw = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .endpoint_url(env("DECAP_TEST_SQS_ENDPOINT"))
            .build(),
    );
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let attrs = raw
        .get_queue_attributes()
        .queue_url(q.queue_url())
        .attribute_names(A::All)
        .send()
        .await
        .unwrap();
    let attrs = attrs.attributes().unwrap();
    // ElasticMQ takes the retention without reporting it; SQS reports it.
    if let Some(retention) = attrs.get(&A::MessageRetentionPeriod) {
        assert_eq!(retention, "1209600");
    }
    let redrive: serde_json::Value =
        serde_json::from_str(attrs.get(&A::RedrivePolicy).expect("a redrive policy")).unwrap();
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "1000"
    );
    let dead_arn = redrive["deadLetterTargetArn"].as_str().unwrap();
    let dead_name = dead_arn.rsplit(':').next().unwrap();
    assert!(dead_name.ends_with("-dead.fifo"), "{dead_arn}");
    // The dead-letter queue exists, a FIFO queue like its source.
    let dead_url = raw
        .get_queue_url()
        .queue_name(dead_name)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let dead = raw
        .get_queue_attributes()
        .queue_url(&dead_url)
        .attribute_names(A::FifoQueue)
        .send()
        .await
        .unwrap();
    assert_eq!(
        dead.attributes()
            .unwrap()
            .get(&A::FifoQueue)
            .map(String::as_str),
        Some("true")
    );
    // Made again over what exists, the queue keeps its settings.
    let again = SqsDeferralQueue::create_queue(
        &sdk,
        Some(&env("DECAP_TEST_SQS_ENDPOINT")),
        q.queue_url().rsplit('/').next().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(again, q.queue_url());
}
