//! `decap-bench-aws`: the AWS adapters against the test bed's DynamoDB Local
//! and ElasticMQ: lock acquire/release latency, and 10,000 deferred builds
//! enqueued and drained in FIFO order per branch, none lost or duplicated.
//!
//! ```sh
//! for s in dynamodb elasticmq; do eval "$(tests/bed/$s.sh start)"; done
//! cargo run --release -p decap-bench --bin decap-bench-aws          # both
//! cargo run --release -p decap-bench --bin decap-bench-aws -- locks # the locks only
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_config::{BehaviorVersion, Region};
use decap_aws::{
    DynamoDbBuildStore, DynamoDbConfig, DynamoDbLockStore, SqsConfig, SqsDeferralQueue,
};
use decap_core::build::BuildId;
use decap_core::names::{LockKey, ProjectKey};
use decap_core::ports::{DeferralQueue, DeferredEntry, LockStore};
use time::OffsetDateTime;

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!(
            "{name} is not set: start the test bed (tests/bed/dynamodb.sh, tests/bed/elasticmq.sh)"
        )
    })
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let ddb = env("DECAP_TEST_DYNAMODB_ENDPOINT")?;
    let sqs = env("DECAP_TEST_SQS_ENDPOINT")?;
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "decaptest",
            "decaptest",
            None,
            None,
            "bench",
        ))
        .load()
        .await;
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );

    // Locks: acquire and release one key, one after the other.
    let tables = DynamoDbConfig {
        builds_table: format!("bench-builds-{tag}"),
        deliveries_table: format!("bench-deliveries-{tag}"),
        locks_table: format!("bench-locks-{tag}"),
        endpoint_url: Some(ddb.clone()),
    };
    DynamoDbBuildStore::create_tables(&sdk, &tables).await?;
    let locks = DynamoDbLockStore::connect(&sdk, tables).await?;
    let key = LockKey::parse("bench/app/main")?;
    let (mut acquire, mut release) = (Vec::new(), Vec::new());
    // The first 500 rounds warm the server's JIT and are not counted.
    for round in 0..1500 {
        let owner = BuildId::new();
        let t = Instant::now();
        if locks
            .acquire(
                &key,
                owner,
                Duration::from_secs(60),
                OffsetDateTime::now_utc(),
            )
            .await?
            .is_err()
        {
            bail!("the lock was held");
        }
        let took = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        if !locks.release(&key, owner).await? {
            bail!("the lock was not released");
        }
        if round >= 500 {
            acquire.push(took);
            release.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary("DynamoDB Local lock acquire", acquire);
    summary("DynamoDB Local lock release", release);

    if std::env::args().nth(1).as_deref() == Some("locks") {
        return Ok(());
    }

    // The deferral queue: 10,000 entries over 100 branches.
    let queue_url =
        SqsDeferralQueue::create_queue(&sdk, Some(&sqs), &format!("bench-{tag}.fifo")).await?;
    let index = format!("bench-deferred-{tag}");
    SqsDeferralQueue::create_index_table(&sdk, Some(&ddb), &index).await?;
    let queue = Arc::new(
        SqsDeferralQueue::connect(
            &sdk,
            SqsConfig {
                queue_url,
                index_table: index,
                sqs_endpoint: Some(sqs),
                dynamodb_endpoint: Some(ddb),
                visibility: Duration::from_secs(60),
            },
        )
        .await?,
    );
    let (total, keys, workers) = (10_000usize, 100usize, 16usize);
    let pushed_at = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            // Each worker owns some branches and pushes their builds in order.
            let mut order: Vec<(LockKey, BuildId)> = Vec::new();
            for i in (0..total).filter(|i| (i % keys) % workers == w) {
                let project = ProjectKey::new("bench", &format!("p{}", (i % keys) / 5))?;
                let entry = DeferredEntry {
                    build_id: BuildId::new(),
                    project,
                    branch: format!("b{}", (i % keys) % 5),
                    git_ref: "refs/heads/x".into(),
                    commit: Some(format!("{i:040x}")),
                    deferred_at: OffsetDateTime::now_utc(),
                    reason: "bench".into(),
                };
                queue.push(&entry).await?;
                order.push((entry.lock_key(), entry.build_id));
            }
            anyhow::Ok(order)
        }));
    }
    let mut expected: HashMap<LockKey, Vec<BuildId>> = HashMap::new();
    for t in tasks {
        for (key, id) in t.await?? {
            expected.entry(key).or_default().push(id);
        }
    }
    let push_secs = pushed_at.elapsed().as_secs_f64();
    let drained_at = Instant::now();
    let mut seen: HashMap<LockKey, Vec<BuildId>> = HashMap::new();
    let mut all = HashSet::new();
    let mut duplicates = 0;
    loop {
        let heads = queue.receive_heads(1000).await?;
        if heads.is_empty() {
            break;
        }
        let acks = futures::future::join_all(heads.iter().map(|h| queue.ack(h))).await;
        for (h, ack) in heads.iter().zip(acks) {
            ack?;
            if !all.insert(h.entry.build_id) {
                duplicates += 1;
            }
            seen.entry(h.entry.lock_key())
                .or_default()
                .push(h.entry.build_id);
        }
    }
    let drain_secs = drained_at.elapsed().as_secs_f64();
    let in_order = expected.iter().all(|(k, ids)| seen.get(k) == Some(ids));
    println!(
        "SQS FIFO + DynamoDB index: {total} deferred builds over {keys} branches enqueued in {push_secs:.1} s ({workers} writers), drained in {drain_secs:.1} s; {} delivered, {} lost, {duplicates} duplicated, FIFO per branch: {}",
        all.len(),
        total - all.len(),
        if in_order { "kept" } else { "BROKEN" }
    );
    if !in_order || all.len() != total || duplicates > 0 {
        bail!("the queue lost, duplicated or reordered builds");
    }
    Ok(())
}
