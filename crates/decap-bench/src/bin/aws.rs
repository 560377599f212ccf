//! `decap-bench-aws`: the AWS adapters against the test bed: lock
//! acquire/release latency on DynamoDB Local; 10,000 deferred builds
//! enqueued and drained in FIFO order per branch on ElasticMQ, none lost or
//! duplicated; bctool uploading a 1 GiB artifact to the S3 server against
//! `aws s3 cp` of the same file, with both peak RSSs; the dashboard of a
//! `decap serve` on DynamoDB Local holding 10,000 builds.
//!
//! ```sh
//! for s in minio dynamodb elasticmq; do eval "$(tests/bed/$s.sh start)"; done
//! cargo build --release -p decap-bench -p decap
//! target/release/decap-bench-aws          # all three
//! target/release/decap-bench-aws locks    # one of them: locks, queue, upload, dashboard
//! ```
//!
//! `upload` needs the AWS CLI: `aws` on the PATH, or `DECAP_BENCH_AWS_CLI`
//! (`python3 -m venv ~/.cache/decap/awscli && ~/.cache/decap/awscli/bin/pip
//! install awscli`).

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
use futures::{StreamExt as _, TryStreamExt as _};
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

/// `rss -- CMD…`: runs a command and prints its wall time and peak RSS (its
/// only child, so the figure is its own).
fn rss(cmd: &[String]) -> Result<()> {
    let t = Instant::now();
    let status = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", cmd[0]))?;
    let secs = t.elapsed().as_secs_f64();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    if !status.success() {
        bail!("{} failed: {status}", cmd[0]);
    }
    println!("{secs} {}", usage.max_rss());
    Ok(())
}

/// Runs a command under `rss`; returns seconds and peak RSS in MiB.
fn measured(cmd: &[&str], env: &[(&str, &str)]) -> Result<(f64, f64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("rss")
        .arg("--")
        .args(cmd)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace();
    let secs: f64 = it.next().context("no time")?.parse()?;
    let kib: f64 = it.next().context("no rss")?.parse()?;
    Ok((secs, kib / 1024.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// bctool (direct to S3) against `aws s3 cp`, one after the other, in turns.
async fn upload(sdk: &aws_config::SdkConfig, tag: &str) -> Result<()> {
    let s3 = env("DECAP_TEST_S3_ENDPOINT")?;
    let aws_cli = std::env::var("DECAP_BENCH_AWS_CLI").unwrap_or_else(|_| "aws".into());
    let bctool = std::env::current_exe()?.with_file_name("bctool");
    if !bctool.exists() {
        bail!(
            "{} is missing: cargo build --release -p decap",
            bctool.display()
        );
    }
    let bucket = format!("bench-upload-{tag}");
    let admin = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(sdk)
            .endpoint_url(&s3)
            .force_path_style(true)
            .build(),
    );
    admin.create_bucket().bucket(&bucket).send().await?;
    let dir = tempfile::tempdir()?;
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir(&artifacts)?;
    let file = artifacts.join("big.bin");
    // 1 GiB of noise (the worst case: nothing to gain from compressing).
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            for chunk in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&block)?;
        }
        out.flush()?;
    }
    let creds = [
        ("AWS_ACCESS_KEY_ID", "decaptest"),
        ("AWS_SECRET_ACCESS_KEY", "decaptestsecret"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    let build_id = BuildId::new().to_string();
    let bctool_env = [
        ("DECAP_BCTOOL_DIRECT", "1"),
        ("DECAP_AWS_REGION", "us-east-1"),
        ("DECAP_S3_ENDPOINT", s3.as_str()),
        ("DECAP_S3_PATH_STYLE", "1"),
        ("DECAP_S3_ARTIFACTS_BUCKET", bucket.as_str()),
        ("DECAP_BCTOOL_AWS_ACCESS_KEY_ID", "decaptest"),
        ("DECAP_BCTOOL_AWS_SECRET_ACCESS_KEY", "decaptestsecret"),
        ("BUILD_ID", build_id.as_str()),
    ];
    let (file_s, dir_s, bctool_s) = (
        file.to_string_lossy().into_owned(),
        artifacts.to_string_lossy().into_owned(),
        bctool.to_string_lossy().into_owned(),
    );
    let target = format!("s3://{bucket}/aws-cli/big.bin");
    let (mut aws_t, mut aws_m, mut bc_t, mut bc_m) = (vec![], vec![], vec![], vec![]);
    let mut failed = 0;
    for round in 1..=5 {
        // The S3 server sometimes loses a multipart upload under concurrent
        // parts (NoSuchUpload) for either client; a failed run is counted,
        // not timed (bctool retries the whole upload by itself).
        let aws = measured(
            &[
                &aws_cli,
                "--endpoint-url",
                &s3,
                "s3",
                "cp",
                "--only-show-errors",
                &file_s,
                &target,
            ],
            &creds,
        );
        let bc = measured(&[&bctool_s, "put-artifacts", &dir_s], &bctool_env);
        let show = |r: &Result<(f64, f64)>| match r {
            Ok((t, m)) => format!("{t:.2} s ({m:.0} MiB)"),
            Err(e) => format!("failed: {e}"),
        };
        println!(
            "round {round}: aws s3 cp {}, bctool {}",
            show(&aws),
            show(&bc)
        );
        match aws {
            Ok((t, m)) => {
                aws_t.push(t);
                aws_m.push(m);
            }
            Err(_) => failed += 1,
        }
        match bc {
            Ok((t, m)) => {
                bc_t.push(t);
                bc_m.push(m);
            }
            Err(_) => failed += 1,
        }
    }
    if aws_t.is_empty() || bc_t.is_empty() {
        bail!("every run of one of the two failed");
    }
    let stored = admin
        .head_object()
        .bucket(&bucket)
        .key(format!("v1/{build_id}/artifacts.tar.gz"))
        .send()
        .await?
        .content_length()
        .unwrap_or(0);
    let (a, b) = (median(aws_t), median(bc_t));
    println!(
        "1 GiB artifact to S3 ({failed} failed runs left out): aws s3 cp median {a:.2} s (peak RSS {:.0} MiB); bctool put-artifacts median {b:.2} s (peak RSS, max of its runs, {:.0} MiB; {:.0} MiB stored); time ratio bctool/aws {:.2}",
        median(aws_m),
        bc_m.iter().copied().fold(0.0, f64::max),
        stored as f64 / (1024.0 * 1024.0),
        b / a
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rss") {
        return rss(&args[2..]);
    }
    let only = args.first().cloned();
    let wants = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "decaptest",
            "decaptestsecret",
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
    if wants("upload") {
        upload(&sdk, &tag).await?;
    }
    if !wants("locks") && !wants("queue") && !wants("dashboard") {
        return Ok(());
    }
    let ddb = env("DECAP_TEST_DYNAMODB_ENDPOINT")?;
    if wants("dashboard") {
        dashboard(&sdk, &ddb, &tag).await?;
    }

    if wants("locks") {
        locks(&sdk, &ddb, &tag).await?;
    }
    if wants("queue") {
        let sqs = env("DECAP_TEST_SQS_ENDPOINT")?;
        queue(&sdk, &ddb, &sqs, &tag).await?;
    }
    Ok(())
}

/// Acquires and releases one key, one after the other.
async fn locks(sdk: &aws_config::SdkConfig, ddb: &str, tag: &str) -> Result<()> {
    let tables = DynamoDbConfig {
        builds_table: format!("bench-builds-{tag}"),
        deliveries_table: format!("bench-deliveries-{tag}"),
        locks_table: format!("bench-locks-{tag}"),
        endpoint_url: Some(ddb.to_owned()),
    };
    DynamoDbBuildStore::create_tables(sdk, &tables).await?;
    let locks = DynamoDbLockStore::connect(sdk, tables).await?;
    let key = LockKey::parse("bench/app/main")?;
    let (mut acquire, mut release) = (Vec::new(), Vec::new());
    // The first 4,000 rounds warm the server's JIT (a long-running server is
    // warm) and are not counted.
    for round in 0..6000 {
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
        if round >= 4000 {
            acquire.push(took);
            release.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary("DynamoDB Local lock acquire", acquire);
    summary("DynamoDB Local lock release", release);
    Ok(())
}

/// The deferral queue: 10,000 entries over 100 branches.
async fn queue(sdk: &aws_config::SdkConfig, ddb: &str, sqs: &str, tag: &str) -> Result<()> {
    let queue_url =
        SqsDeferralQueue::create_queue(sdk, Some(sqs), &format!("bench-{tag}.fifo")).await?;
    let index = format!("bench-deferred-{tag}");
    SqsDeferralQueue::create_index_table(sdk, Some(ddb), &index).await?;
    let queue = Arc::new(
        SqsDeferralQueue::connect(
            sdk,
            SqsConfig {
                queue_url,
                index_table: index,
                sqs_endpoint: Some(sqs.to_owned()),
                dynamodb_endpoint: Some(ddb.to_owned()),
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

/// The dashboard of a `decap serve` whose build records are on DynamoDB
/// Local, holding 10,000 ended builds of 20 projects: 200 page loads.
async fn dashboard(sdk: &aws_config::SdkConfig, ddb: &str, tag: &str) -> Result<()> {
    use decap_core::build::{Build, BuildStatus, Trigger};
    use decap_core::ports::BuildStore;
    let tables = DynamoDbConfig {
        builds_table: format!("bench-dash-builds-{tag}"),
        deliveries_table: format!("bench-dash-deliveries-{tag}"),
        locks_table: format!("bench-dash-locks-{tag}"),
        endpoint_url: Some(ddb.to_owned()),
    };
    DynamoDbBuildStore::create_tables(sdk, &tables).await?;
    let hub_table = format!("bench-dash-hub-{tag}");
    decap_aws::DynamoDbStatusHub::create_table(sdk, &hub_table, Some(ddb)).await?;
    let sessions_table = format!("bench-dash-sessions-{tag}");
    decap_aws::DynamoDbSessionStore::create_table(sdk, &sessions_table, Some(ddb)).await?;
    let store = Arc::new(DynamoDbBuildStore::connect(sdk, tables.clone()).await?);
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(10);
    let started = Instant::now();
    let total = 10_000usize;
    futures::stream::iter(0..total)
        .map(|i| {
            let store = store.clone();
            async move {
                let project = ProjectKey::new("bench", &format!("app{}", i % 20))?;
                let at = t0 + time::Duration::seconds(i as i64 * 60);
                let mut b = Build::new(
                    project,
                    &decap_core::refs::GitRef::branch(&format!("b{}", i % 50))?,
                    Some(format!("{i:040x}")),
                    Trigger::Webhook,
                    at,
                );
                b.transition(BuildStatus::Running, at + time::Duration::seconds(1))?;
                let end = if i % 7 == 0 {
                    BuildStatus::Failed
                } else {
                    BuildStatus::Succeeded
                };
                b.exit_code = Some(i32::from(end == BuildStatus::Failed));
                b.transition(end, at + time::Duration::seconds(30 + (i % 40) as i64))?;
                store.insert(&b).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    println!(
        "stored {total} ended builds of 20 projects in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let server = decap_bench::start_with_env(
        |scripts| {
            decap_bench::write_project(scripts, "bench/app0", r#"{"buildImage": "x"}"#, "echo hi\n")
        },
        &[
            "--build-store",
            "dynamodb",
            "--aws-region",
            "us-east-1",
            "--dynamodb-endpoint",
            ddb,
            "--dynamodb-builds-table",
            &tables.builds_table,
            "--dynamodb-deliveries-table",
            &tables.deliveries_table,
            "--dynamodb-locks-table",
            &tables.locks_table,
            "--dynamodb-hub-table",
            &hub_table,
            "--dynamodb-sessions-table",
            &sessions_table,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "decaptest"),
            ("AWS_SECRET_ACCESS_KEY", "decaptestsecret"),
        ],
    )?;
    let http = reqwest::Client::new();
    let mut ms = Vec::new();
    for round in 0..240 {
        let t = Instant::now();
        let r = http.get(format!("{}/", server.url)).send().await?;
        let status = r.status();
        let body = r.text().await?;
        if !status.is_success() || !body.contains("bench/app") {
            bail!(
                "the dashboard answered {status}: {}",
                &body[..body.len().min(300)]
            );
        }
        // The first 40 warm DynamoDB Local's JIT and are not counted.
        if round >= 40 {
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary("dashboard (GET /) over 10,000 builds on DynamoDB Local", ms);
    Ok(())
}
