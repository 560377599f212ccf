//! Build records, webhook deliveries and branch locks in DynamoDB.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType, Select, TransactWriteItem,
};
use decap_core::build::{Build, BuildId, BuildStatus};
use decap_core::names::LockKey;
use decap_core::ports::{
    BuildPage, BuildQuery, BuildStore, Delivery, DeliveryOutcome, Lock, LockStore,
};
use decap_core::{Error, Result};
use time::OffsetDateTime;

use crate::attrs::{get_n, get_s, n, s};

/// The most builds one page returns.
const MAX_PAGE: usize = 500;
/// The index of builds by project, newest first (the original Decap's).
pub const PROJECT_INDEX: &str = "project-key-build-start-time-index";
/// The index of builds by status.
pub const STATUS_INDEX: &str = "build-status-build-id-index";

/// Which tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoDbConfig {
    /// Build records (`build-id` hash key).
    pub builds_table: String,
    /// Webhook deliveries (`delivery-id` hash key).
    pub deliveries_table: String,
    /// Branch locks (`lock-key` hash key).
    pub locks_table: String,
    /// Talk to this endpoint instead of AWS (DynamoDB Local).
    pub endpoint_url: Option<String>,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        DynamoDbConfig {
            builds_table: "decap-build-metadata".into(),
            deliveries_table: "decap-webhook-deliveries".into(),
            locks_table: "decap-locks".into(),
            endpoint_url: None,
        }
    }
}

pub(crate) fn ddb_err<E>(
    what: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Error
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    Error::backend("dynamodb", format!("{what}: {}", crate::sdk_message(&e)))
}

pub(crate) fn client(sdk: &aws_config::SdkConfig, config: &DynamoDbConfig) -> Client {
    client_at(sdk, config.endpoint_url.as_deref())
}

/// A DynamoDB client, of `endpoint` when given (DynamoDB Local).
pub(crate) fn client_at(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> Client {
    let mut builder = aws_sdk_dynamodb::config::Builder::from(sdk);
    if let Some(url) = endpoint {
        builder = builder.endpoint_url(url);
    }
    Client::from_conf(builder.build())
}

/// An attribute of a table's keys.
pub(crate) fn key_attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| Error::backend("dynamodb", e))
}

/// One element of a key schema.
pub(crate) fn key_element(name: &str, kind: KeyType) -> Result<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| Error::backend("dynamodb", e))
}

/// Sends a `CreateTable`; a table that exists already is no error.
pub(crate) async fn create_table(
    request: aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
    table: &str,
) -> Result<()> {
    match request
        .table_name(table)
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(ddb_err(&format!("creating table {table}"), e)),
    }
}

/// Creates a pay-per-request table keyed by one string attribute, unless it
/// exists.
pub(crate) async fn create_key_table(
    sdk: &aws_config::SdkConfig,
    endpoint: Option<&str>,
    table: &str,
    hash: &str,
) -> Result<()> {
    let request = client_at(sdk, endpoint)
        .create_table()
        .attribute_definitions(key_attribute(hash, ScalarAttributeType::S)?)
        .key_schema(key_element(hash, KeyType::Hash)?);
    create_table(request, table).await
}

/// A client of `endpoint` (when given) for `table`, checked to exist.
pub(crate) async fn connect_table(
    sdk: &aws_config::SdkConfig,
    table: &str,
    endpoint: Option<&str>,
) -> Result<Client> {
    let client = client_at(sdk, endpoint);
    require_table(&client, table).await?;
    Ok(client)
}

/// Checks that a table exists, so that a missing one is a clear error at start-up.
pub(crate) async fn require_table(client: &Client, table: &str) -> Result<()> {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| {
            let hint = if e
                .as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception())
            {
                "it does not exist (aws-resources/ creates it)".to_owned()
            } else {
                DisplayErrorContext(&e).to_string()
            };
            Error::backend("dynamodb", format!("table {table}: {hint}"))
        })?;
    Ok(())
}

pub(crate) fn nanos(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos()
}

pub(crate) fn from_nanos(n: i128) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(n).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// [`BuildStore`] on DynamoDB.
#[derive(Clone)]
pub struct DynamoDbBuildStore {
    client: Client,
    config: DynamoDbConfig,
}

/// A build's item: its keys, the whole record (`record`, what Decap reads
/// back), and what an operator reads with awscli as attributes of their
/// own: status, exit code, times (ISO 8601, and epoch seconds), duration,
/// commit, trigger, stage and message.
fn build_item(b: &Build) -> Result<HashMap<String, AttributeValue>> {
    let record = serde_json::to_string(b).map_err(|e| Error::backend("dynamodb", e))?;
    let mut item = HashMap::from([
        ("build-id".to_owned(), s(b.id.to_string())),
        ("project-key".to_owned(), s(b.project.to_string())),
        ("build-start-time".to_owned(), n(nanos(b.queued_at))),
        ("build-status".to_owned(), s(b.status.as_str())),
        ("branch".to_owned(), s(&b.branch)),
        ("trigger".to_owned(), s(b.trigger.as_str())),
        ("record".to_owned(), s(record)),
    ]);
    let times = [
        ("queued-at", Some(b.queued_at)),
        ("started-at", b.start_time),
        ("ended-at", b.end_time),
    ];
    for (name, t) in times {
        let Some(t) = t else { continue };
        if let Ok(text) = t.format(&time::format_description::well_known::Rfc3339) {
            item.insert(name.to_owned(), s(text));
        }
        let millis = t.unix_timestamp_nanos() / 1_000_000;
        item.insert(
            format!("{name}-epoch"),
            AttributeValue::N(format!(
                "{}.{:03}",
                millis.div_euclid(1000),
                millis.rem_euclid(1000)
            )),
        );
    }
    if let (Some(start), Some(end)) = (b.start_time, b.end_time) {
        item.insert(
            "duration-ms".to_owned(),
            n((end - start).whole_milliseconds().max(0)),
        );
    }
    if let Some(code) = b.exit_code {
        item.insert("exit-code".to_owned(), n(i128::from(code)));
    }
    if let Some(commit) = b.commit.as_deref().filter(|c| !c.is_empty()) {
        item.insert("commit".to_owned(), s(commit));
    }
    if let Some(stage) = &b.stage {
        item.insert("stage".to_owned(), s(&stage.name));
        item.insert("attempt".to_owned(), n(i128::from(stage.attempt)));
    }
    if let Some(m) = b.message.as_deref().filter(|m| !m.is_empty()) {
        item.insert("message".to_owned(), s(m));
    }
    Ok(item)
}

fn item_build(item: &HashMap<String, AttributeValue>) -> Result<Build> {
    serde_json::from_str(get_s(item, "record")?)
        .map_err(|e| Error::backend("dynamodb", format!("a build record does not parse: {e}")))
}

fn conditional_failed<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

impl DynamoDbBuildStore {
    /// A store on the configured tables, which must exist.
    pub async fn connect(sdk: &aws_config::SdkConfig, config: DynamoDbConfig) -> Result<Self> {
        let client = client(sdk, &config);
        require_table(&client, &config.builds_table).await?;
        require_table(&client, &config.deliveries_table).await?;
        Ok(DynamoDbBuildStore { client, config })
    }

    /// A store that does not check its tables first: for bctool, whose
    /// credentials may allow only reading and updating build records.
    pub fn new(sdk: &aws_config::SdkConfig, config: DynamoDbConfig) -> Self {
        DynamoDbBuildStore {
            client: client(sdk, &config),
            config,
        }
    }

    /// Creates the tables and indexes if they are missing (for the test bed
    /// and `aws-resources/`).
    pub async fn create_tables(sdk: &aws_config::SdkConfig, config: &DynamoDbConfig) -> Result<()> {
        let client = client(sdk, config);
        let key = key_element;
        let attr = key_attribute;
        let all = Projection::builder()
            .projection_type(ProjectionType::All)
            .build();
        let index = |name: &str, hash: &str, range: &str| -> Result<GlobalSecondaryIndex> {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key(hash, KeyType::Hash)?)
                .key_schema(key(range, KeyType::Range)?)
                .projection(all.clone())
                .build()
                .map_err(|e| Error::backend("dynamodb", e))
        };
        let builds = client
            .create_table()
            .attribute_definitions(attr("build-id", ScalarAttributeType::S)?)
            .attribute_definitions(attr("project-key", ScalarAttributeType::S)?)
            .attribute_definitions(attr("build-start-time", ScalarAttributeType::N)?)
            .attribute_definitions(attr("build-status", ScalarAttributeType::S)?)
            .key_schema(key("build-id", KeyType::Hash)?)
            .global_secondary_indexes(index(PROJECT_INDEX, "project-key", "build-start-time")?)
            .global_secondary_indexes(index(STATUS_INDEX, "build-status", "build-id")?);
        create_table(builds, &config.builds_table).await?;
        let endpoint = config.endpoint_url.as_deref();
        create_key_table(sdk, endpoint, &config.deliveries_table, "delivery-id").await?;
        create_key_table(sdk, endpoint, &config.locks_table, "lock-key").await
    }

    /// Queries every page of the project index, newest first, keeping the
    /// builds that pass `keep`, until `want` are kept or the index ends.
    async fn query_project(
        &self,
        q: &BuildQuery,
        want: usize,
        mut start: Option<HashMap<String, AttributeValue>>,
    ) -> Result<Vec<Build>> {
        let Some(project) = &q.project else {
            return Err(Error::invalid(
                "project",
                "the project index needs a project",
            ));
        };
        let mut out = Vec::new();
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.config.builds_table)
                .index_name(PROJECT_INDEX)
                .scan_index_forward(false)
                .expression_attribute_names("#pk", "project-key")
                .expression_attribute_values(":pk", s(project.to_string()))
                .set_exclusive_start_key(start.take());
            req = match (q.since, q.before) {
                (Some(since), Some(before)) => req
                    .key_condition_expression("#pk = :pk AND #t BETWEEN :since AND :last")
                    .expression_attribute_names("#t", "build-start-time")
                    .expression_attribute_values(":since", n(nanos(since)))
                    .expression_attribute_values(":last", n(nanos(before) - 1)),
                (Some(since), None) => req
                    .key_condition_expression("#pk = :pk AND #t >= :since")
                    .expression_attribute_names("#t", "build-start-time")
                    .expression_attribute_values(":since", n(nanos(since))),
                (None, Some(before)) => req
                    .key_condition_expression("#pk = :pk AND #t < :before")
                    .expression_attribute_names("#t", "build-start-time")
                    .expression_attribute_values(":before", n(nanos(before))),
                (None, None) => req.key_condition_expression("#pk = :pk"),
            };
            let page = req
                .send()
                .await
                .map_err(|e| ddb_err("querying builds", e))?;
            for item in page.items() {
                let b = item_build(item)?;
                if keep(q, &b) {
                    out.push(b);
                    if out.len() >= want {
                        return Ok(out);
                    }
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Every page of the status index for one status.
    async fn query_status(
        &self,
        status: BuildStatus,
        count_only: bool,
    ) -> Result<(Vec<Build>, u64)> {
        let mut out = Vec::new();
        let mut count = 0u64;
        let mut start = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.config.builds_table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#st = :st")
                .expression_attribute_names("#st", "build-status")
                .expression_attribute_values(":st", s(status.as_str()))
                .set_exclusive_start_key(start.take());
            if count_only {
                req = req.select(Select::Count);
            }
            let page = req
                .send()
                .await
                .map_err(|e| ddb_err("querying builds by status", e))?;
            count += page.count().max(0) as u64;
            for item in page.items() {
                out.push(item_build(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok((out, count)),
            }
        }
    }

    /// Up to `want` builds of `status` that `q` keeps, newest first (by
    /// id, which is time-ordered), older than `below`: the status index
    /// read a page at a time, never the table.
    async fn query_status_page(
        &self,
        q: &BuildQuery,
        status: BuildStatus,
        want: usize,
        below: Option<BuildId>,
    ) -> Result<Vec<Build>> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.config.builds_table)
                .index_name(STATUS_INDEX)
                .scan_index_forward(false)
                .limit(want.clamp(1, MAX_PAGE) as i32)
                .expression_attribute_names("#st", "build-status")
                .expression_attribute_values(":st", s(status.as_str()))
                .set_exclusive_start_key(start.take());
            req = match below {
                Some(id) => req
                    .key_condition_expression("#st = :st AND #id < :below")
                    .expression_attribute_names("#id", "build-id")
                    .expression_attribute_values(":below", s(id.to_string())),
                None => req.key_condition_expression("#st = :st"),
            };
            let page = req
                .send()
                .await
                .map_err(|e| ddb_err("querying builds by status", e))?;
            for item in page.items() {
                let b = item_build(item)?;
                if keep(q, &b) {
                    out.push(b);
                    if out.len() >= want {
                        return Ok(out);
                    }
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }
}

fn keep(q: &BuildQuery, b: &Build) -> bool {
    q.branch.as_ref().is_none_or(|br| &b.branch == br)
        && (q.statuses.is_empty() || q.statuses.contains(&b.status))
        && q.since.is_none_or(|t| b.queued_at >= t)
        && q.before.is_none_or(|t| b.queued_at < t)
        && q.project.as_ref().is_none_or(|p| &b.project == p)
}

/// A cursor names the last build of a page: `<start time nanos>.<build id>`.
fn cursor_of(b: &Build) -> String {
    format!("{}.{}", nanos(b.queued_at), b.id)
}

fn parse_cursor(c: &str) -> Result<(i128, BuildId)> {
    let bad = || Error::invalid("cursor", "not a cursor from this server");
    let (t, id) = c.split_once('.').ok_or_else(bad)?;
    Ok((
        t.parse().map_err(|_| bad())?,
        BuildId::parse(id).map_err(|_| bad())?,
    ))
}

#[async_trait]
impl BuildStore for DynamoDbBuildStore {
    async fn insert(&self, build: &Build) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.config.builds_table)
            .set_item(Some(build_item(build)?))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", "build-id")
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_conditional_check_failed_exception() => {
                    Error::Conflict(format!("build {} exists already", build.id))
                }
                _ => ddb_err("storing a build", e),
            })?;
        Ok(())
    }

    async fn insert_delivery(
        &self,
        delivery: &Delivery,
        builds: &[Build],
    ) -> Result<DeliveryOutcome> {
        let ids: Vec<BuildId> = builds.iter().map(|b| b.id).collect();
        let ids_json = serde_json::to_string(&ids).map_err(|e| Error::backend("dynamodb", e))?;
        let put = |table: &str,
                   item: HashMap<String, AttributeValue>,
                   key: &str|
         -> Result<TransactWriteItem> {
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", key)
                .build()
                .map_err(|e| Error::backend("dynamodb", e))?;
            Ok(TransactWriteItem::builder().put(put).build())
        };
        let mut items = vec![put(
            &self.config.deliveries_table,
            HashMap::from([
                ("delivery-id".to_owned(), s(&delivery.id)),
                ("event".to_owned(), s(&delivery.event)),
                ("outcome".to_owned(), s(&delivery.outcome)),
                ("received-at".to_owned(), n(nanos(delivery.received_at))),
                // GitHub does not redeliver after this long: let DynamoDB's TTL drop it.
                (
                    crate::resources::DELIVERY_TTL_ATTRIBUTE.to_owned(),
                    n(delivery.received_at.unix_timestamp() + 30 * 24 * 3600),
                ),
                ("builds".to_owned(), s(ids_json)),
            ]),
            "delivery-id",
        )?];
        for b in builds {
            items.push(put(&self.config.builds_table, build_item(b)?, "build-id")?);
        }
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(DeliveryOutcome::New),
            Err(e) => {
                let delivery_seen = e
                    .as_service_error()
                    .and_then(|se| match se {
                        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                            c.cancellation_reasons().first().map(|r| r.code() == Some("ConditionalCheckFailed"))
                        }
                        _ => None,
                    })
                    .unwrap_or(false);
                if !delivery_seen {
                    return Err(ddb_err("storing a delivery", e));
                }
                let seen = self
                    .client
                    .get_item()
                    .table_name(&self.config.deliveries_table)
                    .key("delivery-id", s(&delivery.id))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| ddb_err("reading a delivery", e))?;
                let first: Vec<BuildId> = seen
                    .item()
                    .and_then(|i| get_s(i, "builds").ok())
                    .and_then(|j| serde_json::from_str(j).ok())
                    .unwrap_or_default();
                Ok(DeliveryOutcome::Duplicate(first))
            }
        }
    }

    async fn get(&self, id: BuildId) -> Result<Option<Build>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.config.builds_table)
            .key("build-id", s(id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err("reading a build", e))?;
        out.item().map(item_build).transpose()
    }

    async fn update(&self, build: &Build, expected: BuildStatus) -> Result<bool> {
        let result = self
            .client
            .put_item()
            .table_name(&self.config.builds_table)
            .set_item(Some(build_item(build)?))
            .condition_expression("#st = :expected")
            .expression_attribute_names("#st", "build-status")
            .expression_attribute_values(":expected", s(expected.as_str()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(conditional_failed) => Ok(false),
            Err(e) => Err(ddb_err("updating a build", e)),
        }
    }

    async fn list(&self, q: &BuildQuery) -> Result<BuildPage> {
        if q.branch.is_some() && q.project.is_none() {
            return Err(Error::invalid("branch", "a branch filter needs a project"));
        }
        let cursor = q.cursor.as_deref().map(parse_cursor).transpose()?;
        let limit = q.limit.clamp(1, MAX_PAGE);
        let mut builds = match &q.project {
            Some(project) => {
                let start = cursor.map(|(t, id)| {
                    HashMap::from([
                        ("build-id".to_owned(), s(id.to_string())),
                        ("project-key".to_owned(), s(project.to_string())),
                        ("build-start-time".to_owned(), n(t)),
                    ])
                });
                self.query_project(q, limit + 1, start).await?
            }
            None => {
                // Every build has a status: the status index, one query
                // per status asked for (each read only as far as a page
                // needs), merged newest first by id.
                let statuses = if q.statuses.is_empty() {
                    BuildStatus::ALL.to_vec()
                } else {
                    q.statuses.clone()
                };
                let below = cursor.map(|(_, id)| id);
                let pages = futures::future::try_join_all(
                    statuses
                        .iter()
                        .map(|st| self.query_status_page(q, *st, limit + 1, below)),
                )
                .await?;
                let mut all: Vec<Build> = pages.into_iter().flatten().collect();
                all.sort_by_key(|b| std::cmp::Reverse(b.id));
                all.truncate(limit + 1);
                all
            }
        };
        let next_cursor = if builds.len() > limit {
            builds.truncate(limit);
            builds.last().map(cursor_of)
        } else {
            None
        };
        Ok(BuildPage {
            builds,
            next_cursor,
        })
    }

    async fn with_status(&self, statuses: &[BuildStatus]) -> Result<Vec<Build>> {
        let mut out = Vec::new();
        for st in statuses {
            out.extend(self.query_status(*st, false).await?.0);
        }
        out.sort_by_key(|b| b.id);
        Ok(out)
    }

    async fn count_by_status(&self) -> Result<Vec<(BuildStatus, u64)>> {
        let mut out = Vec::new();
        for st in BuildStatus::ALL {
            let (_, count) = self.query_status(st, true).await?;
            if count > 0 {
                out.push((st, count));
            }
        }
        Ok(out)
    }
}

/// [`LockStore`] on DynamoDB: one item per key, taken, renewed and released
/// with single conditional writes. A released key keeps its item (without
/// an owner), so that its fencing token keeps growing: every acquisition
/// sets `token = token + 1` in the same write that takes the lock.
#[derive(Clone)]
pub struct DynamoDbLockStore {
    client: Client,
    config: DynamoDbConfig,
}

fn lock_of(item: &HashMap<String, AttributeValue>) -> Result<Lock> {
    Ok(Lock {
        key: LockKey(get_s(item, "lock-key")?.to_owned()),
        owner: BuildId::parse(get_s(item, "owner")?)?,
        fencing_token: get_n(item, "token")? as u64,
        acquired_at: from_nanos(get_n(item, "acquired-at")?),
        expires_at: from_nanos(get_n(item, "expires-at")?),
    })
}

fn expiry(now: OffsetDateTime, ttl: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(365))
}

impl DynamoDbLockStore {
    /// A store on the configured lock table, which must exist.
    pub async fn connect(sdk: &aws_config::SdkConfig, config: DynamoDbConfig) -> Result<Self> {
        let client = client(sdk, &config);
        require_table(&client, &config.locks_table).await?;
        Ok(DynamoDbLockStore { client, config })
    }

    /// A store that does not check its table first: for bctool, whose
    /// credentials may allow only releasing locks.
    pub fn new(sdk: &aws_config::SdkConfig, config: DynamoDbConfig) -> Self {
        DynamoDbLockStore {
            client: client(sdk, &config),
            config,
        }
    }

    async fn current(&self, key: &str) -> Result<Option<Lock>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.config.locks_table)
            .key("lock-key", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err("reading a lock", e))?;
        match out.item() {
            Some(item) if item.contains_key("owner") => lock_of(item).map(Some),
            _ => Ok(None),
        }
    }

    /// Frees a key: its owner goes, its token stays.
    async fn free(&self, key: &LockKey, owner: Option<BuildId>) -> Result<Option<Lock>> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.config.locks_table)
            .key("lock-key", s(key.as_str()))
            .update_expression("REMOVE #owner SET #exp = :zero")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#exp", "expires-at")
            .expression_attribute_values(":zero", n(0))
            .return_values(ReturnValue::AllOld);
        req = match owner {
            Some(o) => req
                .condition_expression("#owner = :owner")
                .expression_attribute_values(":owner", s(o.to_string())),
            None => req.condition_expression("attribute_exists(#owner)"),
        };
        match req.send().await {
            Ok(out) => out.attributes().map(lock_of).transpose(),
            Err(e) if e.as_service_error().is_some_and(conditional_failed) => Ok(None),
            Err(e) => Err(ddb_err("releasing a lock", e)),
        }
    }
}

#[async_trait]
impl LockStore for DynamoDbLockStore {
    async fn acquire(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Result<Lock, Lock>> {
        let result = self
            .client
            .update_item()
            .table_name(&self.config.locks_table)
            .key("lock-key", s(key.as_str()))
            .update_expression("SET #owner = :owner, #acq = :now, #exp = :exp, #tok = if_not_exists(#tok, :zero) + :one")
            // Free, lapsed, or already ours: anything else is a lost race.
            .condition_expression("attribute_not_exists(#owner) OR #exp <= :now OR #owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#acq", "acquired-at")
            .expression_attribute_names("#exp", "expires-at")
            .expression_attribute_names("#tok", "token")
            .expression_attribute_values(":owner", s(owner.to_string()))
            .expression_attribute_values(":now", n(nanos(now)))
            .expression_attribute_values(":exp", n(nanos(expiry(now, ttl))))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out
                    .attributes()
                    .ok_or_else(|| Error::backend("dynamodb", "no lock in the answer"))?;
                Ok(Ok(lock_of(item)?))
            }
            Err(e) if e.as_service_error().is_some_and(conditional_failed) => {
                let held = match e.as_service_error() {
                    Some(aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c)) => {
                        c.item().map(lock_of).transpose()?
                    }
                    _ => None,
                };
                match held {
                    Some(lock) => Ok(Err(lock)),
                    // An older server that does not return the holder: read it.
                    None => match self.current(key.as_str()).await? {
                        Some(lock) => Ok(Err(lock)),
                        None => Err(Error::backend(
                            "dynamodb",
                            format!("lock {key}: lost a race with a release; try again"),
                        )),
                    },
                }
            }
            Err(e) => Err(ddb_err("taking a lock", e)),
        }
    }

    async fn release(&self, key: &LockKey, owner: BuildId) -> Result<bool> {
        Ok(self.free(key, Some(owner)).await?.is_some())
    }

    async fn renew(
        &self,
        key: &LockKey,
        owner: BuildId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let result = self
            .client
            .update_item()
            .table_name(&self.config.locks_table)
            .key("lock-key", s(key.as_str()))
            .update_expression("SET #exp = :exp")
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#exp", "expires-at")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":exp", n(nanos(expiry(now, ttl))))
            .expression_attribute_values(":owner", s(owner.to_string()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(conditional_failed) => Ok(false),
            Err(e) => Err(ddb_err("renewing a lock", e)),
        }
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Lock>> {
        self.free(key, None).await
    }

    async fn list(&self) -> Result<Vec<Lock>> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.config.locks_table)
                .consistent_read(true)
                .filter_expression("attribute_exists(#owner)")
                .expression_attribute_names("#owner", "owner")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| ddb_err("listing locks", e))?;
            for item in page.items() {
                out.push(lock_of(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}
