//! Deferred builds on an SQS FIFO queue, listed through a DynamoDB index.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, ReturnValue, TransactWriteItem};
use decap_core::build::BuildId;
use decap_core::names::ProjectKey;
use decap_core::ports::{DeferralQueue, DeferredEntry, PushOutcome, Received};
use decap_core::{Error, Result};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::attrs::{get_n, get_s, n, s};

/// Where deferred builds go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsConfig {
    /// The FIFO queue's URL.
    pub queue_url: String,
    /// The DynamoDB table indexing what waits (`key` hash key), since SQS
    /// cannot list or remove a message it has not handed out.
    pub index_table: String,
    /// An SQS endpoint instead of AWS (ElasticMQ).
    pub sqs_endpoint: Option<String>,
    /// A DynamoDB endpoint instead of AWS (DynamoDB Local).
    pub dynamodb_endpoint: Option<String>,
    /// How long a taken entry stays hidden from other controllers before it
    /// is offered again (if the taker died before acknowledging it).
    pub visibility: Duration,
}

/// [`DeferralQueue`] on an SQS FIFO queue.
///
/// Each deferred build is one message (group: its lock key, so SQS keeps
/// the builds of a branch in order and hands out only the oldest of each;
/// deduplication id: the build id) plus one index item in DynamoDB, written
/// first, with a second item that keeps the same branch and commit from
/// waiting twice. A message whose index item is gone (the build was removed)
/// is deleted when it comes up. A taken message that is neither acknowledged
/// nor released reappears after the visibility timeout.
#[derive(Clone)]
pub struct SqsDeferralQueue {
    sqs: aws_sdk_sqs::Client,
    ddb: aws_sdk_dynamodb::Client,
    config: SqsConfig,
    sightings: Arc<Mutex<Sightings>>,
}

/// What this process has seen of the queue's messages, to tell one that
/// is lost from one that is only out of sight (held by a taker, behind
/// the oldest of its group).
#[derive(Debug, Default)]
struct Sightings {
    /// When each waiting entry's message was last received (or, before
    /// that, when the entry was first listed).
    seen: HashMap<BuildId, Instant>,
    /// When the last receive that took every message on offer began.
    full_pass: Option<Instant>,
}

/// How long a message is kept: SQS's longest, on the queue and on its
/// dead-letter queue.
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
/// How often a message may be received without being deleted before SQS
/// moves it to the dead-letter queue. A build waiting behind a held lock
/// is received at every drain (every 5 s); one moved after about 80
/// minutes of that is sent again from the index (`requeue_lost`), and the
/// dead-letter queue keeps the evidence.
pub const MAX_RECEIVES: u32 = 1000;

/// The dead-letter queue's name for the queue `name` (`x.fifo` →
/// `x-dead.fifo`).
pub fn dead_letter_name(name: &str) -> String {
    format!("{}-dead.fifo", name.trim_end_matches(".fifo"))
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend("sqs", format!("{what}: {e}"))
}

fn entry_key(id: BuildId) -> String {
    format!("entry#{id}")
}

fn dedup_key(e: &DeferredEntry) -> String {
    format!(
        "dedup#{}/{}#{}",
        e.project,
        e.branch,
        e.commit.as_deref().unwrap_or("")
    )
}

/// SQS group ids are at most 128 characters; lock keys can be longer.
fn group_of(e: &DeferredEntry) -> String {
    hex::encode(Sha256::digest(e.lock_key().as_str().as_bytes()))
}

fn entry_of(item: &HashMap<String, AttributeValue>) -> Result<(i128, DeferredEntry)> {
    let project = ProjectKey::new(get_s(item, "team")?, get_s(item, "project")?)?;
    let commit = get_s(item, "commit")?;
    Ok((
        get_n(item, "seq")?,
        DeferredEntry {
            build_id: BuildId::parse(get_s(item, "build-id")?)?,
            project,
            branch: get_s(item, "branch")?.to_owned(),
            git_ref: get_s(item, "git-ref")?.to_owned(),
            commit: (!commit.is_empty()).then(|| commit.to_owned()),
            deferred_at: OffsetDateTime::from_unix_timestamp_nanos(get_n(item, "deferred-at")?)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            reason: get_s(item, "reason")?.to_owned(),
        },
    ))
}

impl SqsDeferralQueue {
    /// A queue on the configured SQS queue and index table, which must exist.
    pub async fn connect(sdk: &aws_config::SdkConfig, config: SqsConfig) -> Result<Self> {
        let mut sqs = aws_sdk_sqs::config::Builder::from(sdk);
        if let Some(url) = &config.sqs_endpoint {
            sqs = sqs.endpoint_url(url);
        }
        let mut ddb = aws_sdk_dynamodb::config::Builder::from(sdk);
        if let Some(url) = &config.dynamodb_endpoint {
            ddb = ddb.endpoint_url(url);
        }
        let queue = SqsDeferralQueue {
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
            ddb: aws_sdk_dynamodb::Client::from_conf(ddb.build()),
            config,
            sightings: Arc::default(),
        };
        queue
            .sqs
            .get_queue_attributes()
            .queue_url(&queue.config.queue_url)
            .send()
            .await
            .map_err(|e| {
                err(
                    &format!("queue {}", queue.config.queue_url),
                    crate::sdk_message(&e),
                )
            })?;
        queue
            .ddb
            .describe_table()
            .table_name(&queue.config.index_table)
            .send()
            .await
            .map_err(|e| {
                err(
                    &format!("index table {}", queue.config.index_table),
                    crate::sdk_message(&e),
                )
            })?;
        Ok(queue)
    }

    /// Creates the FIFO queue and its dead-letter queue (for the test bed
    /// and `aws-resources/`), or brings existing ones to the settings:
    /// both keep messages for [`RETENTION`], and a message received
    /// [`MAX_RECEIVES`] times moves to the dead-letter queue. Returns the
    /// queue's URL.
    pub async fn create_queue(
        sdk: &aws_config::SdkConfig,
        endpoint: Option<&str>,
        name: &str,
    ) -> Result<String> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let mut b = aws_sdk_sqs::config::Builder::from(sdk);
        if let Some(url) = endpoint {
            b = b.endpoint_url(url);
        }
        let client = aws_sdk_sqs::Client::from_conf(b.build());
        let retention = RETENTION.as_secs().to_string();
        let create = |name: String| {
            client
                .create_queue()
                .queue_name(name)
                .attributes(A::FifoQueue, "true")
                .attributes(A::ContentBasedDeduplication, "false")
                .send()
        };
        let dead_url = create(dead_letter_name(name))
            .await
            .map_err(|e| err("creating the dead-letter queue", crate::sdk_message(&e)))?
            .queue_url()
            .map(str::to_owned)
            .ok_or_else(|| err("creating the dead-letter queue", "no URL in the answer"))?;
        client
            .set_queue_attributes()
            .queue_url(&dead_url)
            .attributes(A::MessageRetentionPeriod, &retention)
            .send()
            .await
            .map_err(|e| {
                err(
                    "setting the dead-letter queue's retention",
                    crate::sdk_message(&e),
                )
            })?;
        let dead_arn = client
            .get_queue_attributes()
            .queue_url(&dead_url)
            .attribute_names(A::QueueArn)
            .send()
            .await
            .map_err(|e| err("reading the dead-letter queue", crate::sdk_message(&e)))?
            .attributes()
            .and_then(|a| a.get(&A::QueueArn).cloned())
            .ok_or_else(|| err("reading the dead-letter queue", "no ARN in the answer"))?;
        let url = create(name.to_owned())
            .await
            .map_err(|e| err("creating the queue", crate::sdk_message(&e)))?
            .queue_url()
            .map(str::to_owned)
            .ok_or_else(|| err("creating the queue", "no URL in the answer"))?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dead_arn,
            "maxReceiveCount": MAX_RECEIVES.to_string(),
        })
        .to_string();
        client
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(A::MessageRetentionPeriod, &retention)
            .attributes(A::RedrivePolicy, redrive)
            .send()
            .await
            .map_err(|e| {
                err(
                    "setting the queue's retention and dead-letter queue",
                    crate::sdk_message(&e),
                )
            })?;
        Ok(url)
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.config.queue_url
    }

    /// Notes that the message of `id` was just received.
    fn saw(&self, id: BuildId) {
        if let Ok(mut s) = self.sightings.lock() {
            s.seen.insert(id, Instant::now());
        }
    }

    /// Creates the index table if it is missing (for the test bed and
    /// `aws-resources/`).
    pub async fn create_index_table(
        sdk: &aws_config::SdkConfig,
        endpoint: Option<&str>,
        name: &str,
    ) -> Result<()> {
        crate::dynamodb::create_key_table(sdk, endpoint, name, "key").await
    }

    async fn index_item(&self, key: &str) -> Result<Option<HashMap<String, AttributeValue>>> {
        let out = self
            .ddb
            .get_item()
            .table_name(&self.config.index_table)
            .key("key", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| err("reading the index", crate::sdk_message(&e)))?;
        Ok(out.item().cloned())
    }

    async fn counter(&self) -> Result<i128> {
        let out = self
            .ddb
            .update_item()
            .table_name(&self.config.index_table)
            .key("key", s("#seq"))
            .update_expression("ADD #last :one")
            .expression_attribute_names("#last", "last")
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| err("numbering an entry", crate::sdk_message(&e)))?;
        out.attributes()
            .map(|a| get_n(a, "last"))
            .transpose()?
            .ok_or_else(|| err("numbering an entry", "no number"))
    }

    /// Deletes an entry's index items; returns whether it was there.
    async fn unindex(&self, id: BuildId) -> Result<bool> {
        let Some(item) = self.index_item(&entry_key(id)).await? else {
            return Ok(false);
        };
        let dedup = get_s(&item, "dedup")?.to_owned();
        let delete = |key: String| -> Result<TransactWriteItem> {
            let d = Delete::builder()
                .table_name(&self.config.index_table)
                .key("key", s(key))
                .build()
                .map_err(|e| err("index", e))?;
            Ok(TransactWriteItem::builder().delete(d).build())
        };
        let dedup_delete = Delete::builder()
            .table_name(&self.config.index_table)
            .key("key", s(dedup))
            .condition_expression("attribute_not_exists(#id) OR #id = :id")
            .expression_attribute_names("#id", "build-id")
            .expression_attribute_values(":id", s(id.to_string()))
            .build()
            .map_err(|e| err("index", e))?;
        self.ddb
            .transact_write_items()
            .transact_items(delete(entry_key(id))?)
            .transact_items(TransactWriteItem::builder().delete(dedup_delete).build())
            .send()
            .await
            .map_err(|e| err("removing an entry", crate::sdk_message(&e)))?;
        Ok(true)
    }
}

#[async_trait]
impl DeferralQueue for SqsDeferralQueue {
    async fn push(&self, entry: &DeferredEntry) -> Result<PushOutcome> {
        let seq = self.counter().await?;
        let dedup = dedup_key(entry);
        let item = HashMap::from([
            ("key".to_owned(), s(entry_key(entry.build_id))),
            ("seq".to_owned(), n(seq)),
            ("build-id".to_owned(), s(entry.build_id.to_string())),
            ("team".to_owned(), s(&entry.project.team)),
            ("project".to_owned(), s(&entry.project.project)),
            ("branch".to_owned(), s(&entry.branch)),
            ("git-ref".to_owned(), s(&entry.git_ref)),
            (
                "commit".to_owned(),
                s(entry.commit.clone().unwrap_or_default()),
            ),
            (
                "deferred-at".to_owned(),
                n(entry.deferred_at.unix_timestamp_nanos()),
            ),
            ("reason".to_owned(), s(&entry.reason)),
            ("dedup".to_owned(), s(&dedup)),
        ]);
        let put = |item: HashMap<String, AttributeValue>| -> Result<TransactWriteItem> {
            let p = Put::builder()
                .table_name(&self.config.index_table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", "key")
                .build()
                .map_err(|e| err("index", e))?;
            Ok(TransactWriteItem::builder().put(p).build())
        };
        let dedup_item = HashMap::from([
            ("key".to_owned(), s(&dedup)),
            ("build-id".to_owned(), s(entry.build_id.to_string())),
        ]);
        let written = self
            .ddb
            .transact_write_items()
            .transact_items(put(item)?)
            .transact_items(put(dedup_item)?)
            .send()
            .await;
        if let Err(e) = written {
            let reasons: Vec<Option<String>> = match e.as_service_error() {
                Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c)) => {
                    c.cancellation_reasons().iter().map(|r| r.code().map(str::to_owned)).collect()
                }
                _ => vec![],
            };
            let failed = |i: usize| {
                reasons.get(i).and_then(|r| r.as_deref()) == Some("ConditionalCheckFailed")
            };
            if failed(0) {
                return Ok(PushOutcome::Added); // this very build waits already
            }
            if failed(1) {
                let waiting = self
                    .index_item(&dedup)
                    .await?
                    .ok_or_else(|| err("deduplicating", "the waiting entry vanished"))?;
                return Ok(PushOutcome::AlreadyWaiting(BuildId::parse(get_s(
                    &waiting, "build-id",
                )?)?));
            }
            return Err(err("indexing an entry", crate::sdk_message(&e)));
        }
        let sent = self
            .sqs
            .send_message()
            .queue_url(&self.config.queue_url)
            .message_body(entry.build_id.to_string())
            .message_group_id(group_of(entry))
            .message_deduplication_id(entry.build_id.to_string())
            .send()
            .await;
        if let Err(e) = sent {
            self.unindex(entry.build_id).await?;
            return Err(err("queueing an entry", crate::sdk_message(&e)));
        }
        Ok(PushOutcome::Added)
    }

    async fn list(&self) -> Result<Vec<DeferredEntry>> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .ddb
                .scan()
                .table_name(&self.config.index_table)
                .filter_expression("begins_with(#k, :entry)")
                .expression_attribute_names("#k", "key")
                .expression_attribute_values(":entry", s("entry#"))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| err("listing", crate::sdk_message(&e)))?;
            for item in page.items() {
                out.push(entry_of(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, e)| e).collect())
    }

    async fn remove(&self, build_id: BuildId) -> Result<bool> {
        // The message stays until it comes up, and is dropped then.
        self.unindex(build_id).await
    }

    async fn set_reason(&self, build_id: BuildId, reason: &str) -> Result<()> {
        let result = self
            .ddb
            .update_item()
            .table_name(&self.config.index_table)
            .key("key", s(entry_key(build_id)))
            .update_expression("SET #r = :r")
            .condition_expression("attribute_exists(#k)")
            .expression_attribute_names("#r", "reason")
            .expression_attribute_names("#k", "key")
            .expression_attribute_values(":r", s(reason))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(err("updating a reason", crate::sdk_message(&e))),
        }
    }

    async fn receive_heads(&self, max: usize) -> Result<Vec<Received>> {
        let mut heads: Vec<(i128, Received)> = Vec::new();
        let mut keys = HashMap::new();
        let mut others = Vec::new();
        let visibility = self.config.visibility.as_secs().clamp(1, 43_200) as i32;
        let began = Instant::now();
        let mut took_all = false;
        let result: Result<()> = async {
            while heads.len() < max {
                let got = self
                    .sqs
                    .receive_message()
                    .queue_url(&self.config.queue_url)
                    .max_number_of_messages(10)
                    .visibility_timeout(visibility)
                    .wait_time_seconds(0)
                    .send()
                    .await
                    .map_err(|e| err("receiving", crate::sdk_message(&e)))?;
                let messages = got.messages();
                if messages.is_empty() {
                    took_all = true;
                    break;
                }
                for m in messages {
                    let receipt = m.receipt_handle().unwrap_or_default().to_owned();
                    let id = m.body().and_then(|b| BuildId::parse(b).ok());
                    if let Some(id) = id {
                        self.saw(id);
                    }
                    let item = match id {
                        Some(id) => self.index_item(&entry_key(id)).await?,
                        None => None,
                    };
                    let Some(item) = item else {
                        // Removed from the index (cancelled), or not ours: drop it.
                        tracing::info!(body = ?m.body(), "dropping a queue message whose entry is gone");
                        self.sqs
                            .delete_message()
                            .queue_url(&self.config.queue_url)
                            .receipt_handle(&receipt)
                            .send()
                            .await
                            .map_err(|e| err("dropping a message", crate::sdk_message(&e)))?;
                        continue;
                    };
                    let (seq, entry) = entry_of(&item)?;
                    // The oldest of each lock key by the index: a message
                    // sent again (`requeue_lost`) is behind newer ones of
                    // its group in SQS's order.
                    match keys.get(&entry.lock_key()) {
                        None if heads.len() < max => {
                            keys.insert(entry.lock_key(), heads.len());
                            heads.push((seq, Received { entry, receipt }));
                        }
                        Some(&i) if seq < heads[i].0 => {
                            let (_, newer) =
                                std::mem::replace(&mut heads[i], (seq, Received { entry, receipt }));
                            others.push(newer.receipt);
                        }
                        _ => others.push(receipt),
                    }
                }
            }
            Ok(())
        }
        .await;
        // What was taken but is not a head goes back at once.
        if result.is_err() {
            others.extend(heads.iter().map(|(_, h)| h.receipt.clone()));
        }
        for receipt in &others {
            let _ = self
                .sqs
                .change_message_visibility()
                .queue_url(&self.config.queue_url)
                .receipt_handle(receipt)
                .visibility_timeout(0)
                .send()
                .await;
        }
        result?;
        if took_all && let Ok(mut s) = self.sightings.lock() {
            s.full_pass = Some(began);
        }
        heads.sort_by_key(|(seq, _)| *seq);
        Ok(heads.into_iter().map(|(_, h)| h).collect())
    }

    async fn ack(&self, received: &Received) -> Result<()> {
        self.sqs
            .delete_message()
            .queue_url(&self.config.queue_url)
            .receipt_handle(&received.receipt)
            .send()
            .await
            .map_err(|e| err("acknowledging", crate::sdk_message(&e)))?;
        self.unindex(received.entry.build_id).await.map(|_| ())
    }

    async fn release(&self, received: &Received) -> Result<()> {
        self.sqs
            .change_message_visibility()
            .queue_url(&self.config.queue_url)
            .receipt_handle(&received.receipt)
            .visibility_timeout(0)
            .send()
            .await
            .map_err(|e| err("releasing", crate::sdk_message(&e)))?;
        Ok(())
    }

    async fn requeue_lost(&self) -> Result<Vec<BuildId>> {
        let entries = self.list().await?;
        let now = Instant::now();
        // A taker's hold on a message lapses after the visibility timeout;
        // a push sends its message right after indexing it.
        let grace = self.config.visibility * 2;
        let lost: Vec<DeferredEntry> = {
            let Ok(mut s) = self.sightings.lock() else {
                return Ok(Vec::new());
            };
            let waiting: HashSet<BuildId> = entries.iter().map(|e| e.build_id).collect();
            s.seen.retain(|id, _| waiting.contains(id));
            let full_pass = s.full_pass;
            let mut keys = HashSet::new();
            let mut lost = Vec::new();
            for e in &entries {
                // Only the oldest of a lock key is always on offer: SQS
                // holds the rest of its group back behind it.
                let oldest = keys.insert(e.lock_key());
                let seen = *s.seen.entry(e.build_id).or_insert(now);
                if oldest && full_pass.is_some_and(|pass| pass > seen + grace) {
                    lost.push(e.clone());
                }
            }
            lost
        };
        let mut sent = Vec::new();
        for e in lost {
            // A deduplication id of its own: SQS drops a message whose id
            // it saw in the last five minutes, even if that one is gone.
            let dedup = format!(
                "{}-{}",
                e.build_id.0.simple(),
                OffsetDateTime::now_utc().unix_timestamp_nanos()
            );
            self.sqs
                .send_message()
                .queue_url(&self.config.queue_url)
                .message_body(e.build_id.to_string())
                .message_group_id(group_of(&e))
                .message_deduplication_id(dedup)
                .send()
                .await
                .map_err(|err_| err("sending a lost entry again", crate::sdk_message(&err_)))?;
            self.saw(e.build_id);
            tracing::warn!(build_id = %e.build_id, "the queue had lost the message of a deferred build; sent it again");
            sent.push(e.build_id);
        }
        Ok(sent)
    }

    async fn is_open(&self) -> Result<bool> {
        let state = self.index_item("#state").await?;
        Ok(state.as_ref().and_then(|i| get_s(i, "state").ok()) != Some("closed"))
    }

    async fn set_open(&self, open: bool) -> Result<()> {
        self.ddb
            .put_item()
            .table_name(&self.config.index_table)
            .item("key", s("#state"))
            .item("state", s(if open { "open" } else { "closed" }))
            .send()
            .await
            .map_err(|e| err("storing the queue state", crate::sdk_message(&e)))?;
        Ok(())
    }
}
