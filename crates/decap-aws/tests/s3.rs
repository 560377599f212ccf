//! The blob store contract on S3, against the test bed's S3 server.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::Credentials;
use bytes::Bytes;
use decap_aws::{S3BlobStore, S3Config};
use decap_core::build::BuildId;
use decap_core::ports::{BlobKind, BlobStore, ByteStream};
use futures::StreamExt;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need an S3 server. Start the test bed's with \
             `eval \"$(tests/bed/minio.sh start)\"` (tests/run does this), or point \
             DECAP_TEST_S3_ENDPOINT, DECAP_TEST_S3_ACCESS_KEY and DECAP_TEST_S3_SECRET_KEY at one."
        )
    })
}

async fn sdk() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            env("DECAP_TEST_S3_ACCESS_KEY"),
            env("DECAP_TEST_S3_SECRET_KEY"),
            None,
            None,
            "decap-test-bed",
        ))
        .load()
        .await
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("decap-test-{name}-{nanos:x}")
}

/// A store on two fresh buckets.
async fn store() -> S3BlobStore {
    let sdk = sdk().await;
    let endpoint = env("DECAP_TEST_S3_ENDPOINT");
    let admin = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .build(),
    );
    let config = S3Config {
        logs_bucket: unique("logs"),
        artifacts_bucket: unique("artifacts"),
        key_prefix: "contract/".into(),
        force_path_style: true,
        endpoint_url: Some(endpoint),
    };
    for bucket in [&config.logs_bucket, &config.artifacts_bucket] {
        admin.create_bucket().bucket(bucket).send().await.unwrap();
    }
    S3BlobStore::connect(&sdk, config).await.unwrap()
}

#[tokio::test]
async fn s3_blob_store_keeps_the_contract() {
    decap_contract_tests::blob_store_suite(Arc::new(store().await)).await;
}

#[tokio::test]
async fn s3_detail_store_keeps_the_contract() {
    decap_contract_tests::detail_store_suite(Arc::new(decap_aws::S3DetailStore::new(
        store().await,
    )))
    .await;
}

#[tokio::test]
async fn large_blobs_upload_in_parts_and_read_back_whole() {
    let store = store().await;
    let id = BuildId::new();
    // 20 MiB and a bit, in 64 KiB chunks: three parts, the last one short.
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let count = 20 * 16 + 3;
    let chunks: Vec<std::io::Result<Bytes>> =
        (0..count).map(|_| Ok(Bytes::from(chunk.clone()))).collect();
    let data: ByteStream = Box::pin(futures::stream::iter(chunks));
    let size = store.put(id, BlobKind::ArtifactsTarGz, data).await.unwrap();
    assert_eq!(size, (count * chunk.len()) as u64);
    let (len, mut back) = store
        .get(id, BlobKind::ArtifactsTarGz)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(len, size);
    let mut seen = 0usize;
    while let Some(c) = back.next().await {
        let c = c.unwrap();
        for (i, b) in c.iter().enumerate() {
            assert_eq!(
                *b,
                chunk[(seen + i) % chunk.len()],
                "byte {} differs",
                seen + i
            );
        }
        seen += c.len();
    }
    assert_eq!(seen as u64, size);
    // the layout is the documented one
    let key = format!("contract/v1/{id}/artifacts.tar.gz");
    let listed = store
        .client()
        .list_objects_v2()
        .bucket(&store.config().artifacts_bucket)
        .prefix(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.key_count(),
        Some(1),
        "{key} is where the artifacts are"
    );
}

#[tokio::test]
async fn a_missing_bucket_is_a_clear_error_at_start_up() {
    let sdk = sdk().await;
    let config = S3Config {
        logs_bucket: unique("absent"),
        artifacts_bucket: unique("absent"),
        key_prefix: String::new(),
        force_path_style: true,
        endpoint_url: Some(env("DECAP_TEST_S3_ENDPOINT")),
    };
    let err = S3BlobStore::connect(&sdk, config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let sdk = sdk().await;
    let config = S3Config {
        endpoint_url: Some("http://127.0.0.1:9".into()),
        force_path_style: true,
        ..S3Config::default()
    };
    let err = S3BlobStore::connect(&sdk, config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("decap-console-logs"), "{err}");
}
