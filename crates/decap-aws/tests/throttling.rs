//! DynamoDB throttling is retried, not reported: a proxy in front of the test
//! bed's DynamoDB Local answers the first attempts of each write with
//! `ProvisionedThroughputExceededException`, as DynamoDB does when a table's
//! capacity is exceeded, and forwards everything else.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use decap_aws::{DynamoDbBuildStore, DynamoDbConfig, DynamoDbLockStore};
use decap_core::build::{Build, BuildId, BuildStatus, Trigger};
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{BuildStore, LockStore};
use decap_core::refs::GitRef;

fn endpoint() -> String {
    std::env::var("DECAP_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!("DECAP_TEST_DYNAMODB_ENDPOINT is not set: start the test bed's DynamoDB with `eval \"$(tests/bed/dynamodb.sh start)\"` (tests/run does)")
    })
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    /// Throttled answers still to give, per operation.
    throttle: Arc<Mutex<HashMap<String, u32>>>,
    /// Requests seen, per operation.
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

async fn forward(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    let op = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split('.').nth(1))
        .unwrap_or("")
        .to_owned();
    *p.seen.lock().unwrap().entry(op.clone()).or_default() += 1;
    let throttled = {
        let mut left = p.throttle.lock().unwrap();
        match left.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    if throttled {
        return (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/x-amz-json-1.0")],
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded."}"#,
        )
            .into_response();
    }
    let mut req = p.client.post(&p.upstream).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    let answer = req.send().await.unwrap();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/x-amz-json-1.0")
        .to_owned();
    let bytes = answer.bytes().await.unwrap();
    (status, [("content-type", content_type)], bytes).into_response()
}

#[tokio::test]
async fn throttled_writes_are_retried_until_they_pass() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "decaptest",
            "decaptest",
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await;
    let direct = DynamoDbConfig {
        builds_table: format!("throttle-builds-{nanos:x}"),
        deliveries_table: format!("throttle-deliveries-{nanos:x}"),
        locks_table: format!("throttle-locks-{nanos:x}"),
        endpoint_url: Some(endpoint()),
    };
    DynamoDbBuildStore::create_tables(&sdk, &direct)
        .await
        .unwrap();

    let proxy = Proxy {
        upstream: endpoint(),
        client: reqwest::Client::new(),
        throttle: Arc::new(Mutex::new(HashMap::from([
            ("UpdateItem".to_owned(), 2),
            ("PutItem".to_owned(), 2),
        ]))),
        seen: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let through = DynamoDbConfig {
        endpoint_url: Some(url),
        ..direct
    };

    // A lock acquisition is one UpdateItem: throttled twice, then taken.
    let locks = DynamoDbLockStore::connect(&sdk, through.clone())
        .await
        .unwrap();
    let key = LockKey::parse("acme/app/main").unwrap();
    let owner = BuildId::new();
    let taken = locks
        .acquire(
            &key,
            owner,
            Duration::from_secs(60),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    assert!(taken.is_ok(), "the lock was free");
    assert_eq!(proxy.seen.lock().unwrap()["UpdateItem"], 3);
    let held = locks.list().await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].owner, owner);

    // A build record is one conditional PutItem: the same.
    let builds = DynamoDbBuildStore::connect(&sdk, through).await.unwrap();
    let build = Build::new(
        ProjectKey::new("acme", "app").unwrap(),
        &GitRef::branch("main").unwrap(),
        None,
        Trigger::Manual,
        time::OffsetDateTime::now_utc(),
    );
    builds.insert(&build).await.unwrap();
    assert_eq!(proxy.seen.lock().unwrap()["PutItem"], 3);
    let stored = builds.get(build.id).await.unwrap().unwrap();
    assert_eq!(stored.status, BuildStatus::Queued);
}
