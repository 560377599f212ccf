//! The CI status hub's records in one DynamoDB table shared by every
//! replica: partition `project`, sort key `item`:
//!
//! * `build#<revision>#<name>`: the last status of a build (repository,
//!   status, URL, when its revision was first reported, when it was);
//! * `seen#<revision>`: when the revision was first reported (kept once);
//! * `rev#<first reported, nanoseconds, 20 digits>#<revision>`: the same,
//!   ordered, so that the latest revisions are one query, newest first;
//! * `lock#<name>`: the revision holding a build name's lock, and until when.
//!
//! A partition [`PROJECTS`] lists the projects with reports.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, KeyType, ReturnValue, ScalarAttributeType};
use decap_core::Result;
use decap_core::hub::{ExternalBuild, Reported};
use decap_core::ports::StatusHub;
use time::OffsetDateTime;

use crate::attrs::{get_n, get_s, n, s};
use crate::dynamodb::{
    client_at, connect_table, create_table, ddb_err, from_nanos, key_attribute, key_element, nanos,
};

const PROJECT: &str = "project";
const ITEM: &str = "item";
/// The partition listing the projects with reports (`#` is in no project
/// name).
const PROJECTS: &str = "#projects";

/// [`StatusHub`] on DynamoDB.
#[derive(Clone)]
pub struct DynamoDbStatusHub {
    client: Client,
    table: String,
}

fn key(project: &str, item: String) -> HashMap<String, AttributeValue> {
    HashMap::from([(PROJECT.to_owned(), s(project)), (ITEM.to_owned(), s(item))])
}

fn build_of(item: &HashMap<String, AttributeValue>) -> Result<ExternalBuild> {
    Ok(ExternalBuild {
        project: get_s(item, PROJECT)?.to_owned(),
        repository: get_s(item, "repository")?.to_owned(),
        revision: get_s(item, "revision")?.to_owned(),
        name: get_s(item, "name")?.to_owned(),
        status: Reported::parse(get_s(item, "status")?).unwrap_or(Reported::Failed),
        status_url: get_s(item, "status-url").ok().map(str::to_owned),
        revision_seen_at: from_nanos(get_n(item, "revision-seen-at")?),
        updated_at: from_nanos(get_n(item, "updated-at")?),
    })
}

impl DynamoDbStatusHub {
    /// The hub in `table`, checked to exist.
    pub async fn connect(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<Self> {
        Ok(DynamoDbStatusHub {
            client: connect_table(sdk, table, endpoint).await?,
            table: table.to_owned(),
        })
    }

    /// Creates the table unless it exists (for the test bed and
    /// `aws-resources/`).
    pub async fn create_table(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<()> {
        let request = client_at(sdk, endpoint)
            .create_table()
            .attribute_definitions(key_attribute(PROJECT, ScalarAttributeType::S)?)
            .attribute_definitions(key_attribute(ITEM, ScalarAttributeType::S)?)
            .key_schema(key_element(PROJECT, KeyType::Hash)?)
            .key_schema(key_element(ITEM, KeyType::Range)?);
        create_table(request, table).await
    }

    /// Every item of a partition whose sort key begins with `prefix`, in
    /// order (newest first when `back`), at most `limit`.
    async fn query(
        &self,
        project: &str,
        prefix: &str,
        back: bool,
        limit: Option<usize>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_names("#p", PROJECT)
                .expression_attribute_values(":p", s(project))
                .scan_index_forward(!back)
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            // DynamoDB takes no empty prefix: all of the partition then.
            req = if prefix.is_empty() {
                req.key_condition_expression("#p = :p")
            } else {
                req.key_condition_expression("#p = :p AND begins_with(#i, :prefix)")
                    .expression_attribute_names("#i", ITEM)
                    .expression_attribute_values(":prefix", s(prefix))
            };
            if let Some(limit) = limit {
                req = req.limit(limit.clamp(1, 1000) as i32);
            }
            let page = req
                .send()
                .await
                .map_err(|e| ddb_err("reading the status hub", e))?;
            out.extend(page.items().iter().cloned());
            if limit.is_some_and(|l| out.len() >= l) {
                out.truncate(limit.unwrap_or(out.len()));
                return Ok(out);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes items, eight at a time (each its own `DeleteItem`: the
    /// policy of least privilege grants no batch writes).
    async fn delete_all(&self, keys: Vec<HashMap<String, AttributeValue>>) -> Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        futures::stream::iter(keys)
            .map(|k| async move {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(k))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| ddb_err("removing from the status hub", e))
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl StatusHub for DynamoDbStatusHub {
    async fn record(&self, b: &ExternalBuild) -> Result<()> {
        // The revision keeps the time it was first reported.
        let seen = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(&b.project, format!("seen#{}", b.revision))))
            .update_expression("SET #t = if_not_exists(#t, :t)")
            .expression_attribute_names("#t", "seen-at")
            .expression_attribute_values(":t", n(nanos(b.revision_seen_at)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| ddb_err("recording a hub report", e))?;
        let seen = seen
            .attributes()
            .map(|a| get_n(a, "seen-at"))
            .transpose()?
            .unwrap_or_else(|| nanos(b.revision_seen_at));
        let mut order = key(&b.project, format!("rev#{seen:020}#{}", b.revision));
        order.insert("revision".to_owned(), s(&b.revision));
        let mut item = key(&b.project, format!("build#{}#{}", b.revision, b.name));
        item.extend([
            ("repository".to_owned(), s(&b.repository)),
            ("revision".to_owned(), s(&b.revision)),
            ("name".to_owned(), s(&b.name)),
            ("status".to_owned(), s(b.status.as_str())),
            ("revision-seen-at".to_owned(), n(seen)),
            ("updated-at".to_owned(), n(nanos(b.updated_at))),
        ]);
        if let Some(url) = &b.status_url {
            item.insert("status-url".to_owned(), s(url));
        }
        for item in [order, item, key(PROJECTS, b.project.clone())] {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| ddb_err("recording a hub report", e))?;
        }
        Ok(())
    }

    async fn latest(&self, project: &str, revisions: usize) -> Result<Vec<ExternalBuild>> {
        if revisions == 0 {
            return Ok(Vec::new());
        }
        let newest = self.query(project, "rev#", true, Some(revisions)).await?;
        let mut out = Vec::new();
        for r in &newest {
            let revision = get_s(r, "revision")?;
            for item in self
                .query(project, &format!("build#{revision}#"), false, None)
                .await?
            {
                out.push(build_of(&item)?);
            }
        }
        Ok(out)
    }

    async fn projects(&self) -> Result<Vec<String>> {
        self.query(PROJECTS, "", false, None)
            .await?
            .iter()
            .map(|i| get_s(i, ITEM).map(str::to_owned))
            .collect()
    }

    async fn remove_project(&self, project: &str) -> Result<bool> {
        let keys: Vec<_> = self
            .query(project, "", false, None)
            .await?
            .into_iter()
            .filter_map(|i| Some(key(project, get_s(&i, ITEM).ok()?.to_owned())))
            .collect();
        let had = !keys.is_empty();
        self.delete_all(keys).await?;
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(PROJECTS, project.to_owned())))
            .send()
            .await
            .map_err(|e| ddb_err("removing from the status hub", e))?;
        Ok(had)
    }

    async fn lock(
        &self,
        project: &str,
        name: &str,
        revision: &str,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<String> {
        // Taken when free, expired, or already this revision's.
        let taken = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(project, format!("lock#{name}"))))
            .update_expression("SET #r = :r, #e = :e")
            .condition_expression("attribute_not_exists(#r) OR #e <= :now OR #r = :r")
            .expression_attribute_names("#r", "revision")
            .expression_attribute_names("#e", "expires-at")
            .expression_attribute_values(":r", s(revision))
            .expression_attribute_values(":e", n(nanos(now + ttl)))
            .expression_attribute_values(":now", n(nanos(now)))
            .send()
            .await;
        match taken {
            Ok(_) => Ok(revision.to_owned()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                let holder = self
                    .client
                    .get_item()
                    .table_name(&self.table)
                    .set_key(Some(key(project, format!("lock#{name}"))))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| ddb_err("reading a hub lock", e))?;
                Ok(holder
                    .item()
                    .and_then(|i| get_s(i, "revision").ok())
                    .unwrap_or(revision)
                    .to_owned())
            }
            Err(e) => Err(ddb_err("taking a hub lock", e)),
        }
    }

    async fn unlock(&self, project: &str, name: &str, revision: &str) -> Result<bool> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(project, format!("lock#{name}"))))
            .condition_expression("#r = :r")
            .expression_attribute_names("#r", "revision")
            .expression_attribute_values(":r", s(revision))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(ddb_err("releasing a hub lock", e)),
        }
    }
}
