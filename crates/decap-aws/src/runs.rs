//! Pipeline runs and their stages' claims in DynamoDB, in the build
//! records' table (no table to add): a run is the item `run#<id>`, listed
//! per project through the project index under the key
//! `run#<team>/<project>` (so a project's builds and its runs never mix);
//! a claim is the item `claim#<run>#<stage>#<attempt>`, written only if
//! absent. Neither has a `build-status`, so the status index skips them.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use decap_core::names::ProjectKey;
use decap_core::pipeline::{MAX_STAGES, PipelineRun, StageClaim};
use decap_core::ports::RunStore;
use decap_core::{Error, Result};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::attrs::{get_s, n, s};
use crate::dynamodb::{DynamoDbConfig, PROJECT_INDEX, client, ddb_err, nanos, require_table};

fn run_key(id: Uuid) -> String {
    format!("run#{id}")
}

fn claim_key(run: Uuid, stage: &str, attempt: u32) -> String {
    format!("claim#{run}#{stage}#{attempt}")
}

fn parse<T: serde::de::DeserializeOwned>(item: &HashMap<String, AttributeValue>) -> Result<T> {
    serde_json::from_str(get_s(item, "record")?)
        .map_err(|e| Error::backend("dynamodb", format!("a record does not parse: {e}")))
}

/// [`RunStore`] on DynamoDB.
#[derive(Clone)]
pub struct DynamoDbRunStore {
    client: Client,
    config: DynamoDbConfig,
}

impl DynamoDbRunStore {
    /// A store on the build records' table, which must exist.
    pub async fn connect(sdk: &aws_config::SdkConfig, config: DynamoDbConfig) -> Result<Self> {
        let client = client(sdk, &config);
        require_table(&client, &config.builds_table).await?;
        Ok(DynamoDbRunStore { client, config })
    }

    async fn get_claims(&self, keys: Vec<String>) -> Result<Vec<StageClaim>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(100) {
            let mut wanted = KeysAndAttributes::builder().consistent_read(true);
            for k in chunk {
                wanted = wanted.keys(HashMap::from([("build-id".to_owned(), s(k))]));
            }
            let mut request = Some(HashMap::from([(
                self.config.builds_table.clone(),
                wanted.build().map_err(|e| Error::backend("dynamodb", e))?,
            )]));
            while let Some(items) = request.take().filter(|r| !r.is_empty()) {
                let page = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(items))
                    .send()
                    .await
                    .map_err(|e| ddb_err("reading stage claims", e))?;
                if let Some(found) = page
                    .responses()
                    .and_then(|r| r.get(&self.config.builds_table))
                {
                    for item in found {
                        out.push(parse(item)?);
                    }
                }
                request = page.unprocessed_keys().cloned();
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl RunStore for DynamoDbRunStore {
    async fn insert(&self, run: &PipelineRun) -> Result<()> {
        let record = serde_json::to_string(run).map_err(|e| Error::backend("dynamodb", e))?;
        self.client
            .put_item()
            .table_name(&self.config.builds_table)
            .item("build-id", s(run_key(run.id)))
            .item("project-key", s(format!("run#{}", run.project)))
            .item("build-start-time", n(nanos(run.created_at)))
            .item("run-id", s(run.id.to_string()))
            .item("record", s(record))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", "build-id")
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_conditional_check_failed_exception() => {
                    Error::Conflict(format!("pipeline run {} exists already", run.id))
                }
                _ => ddb_err("storing a pipeline run", e),
            })?;
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<PipelineRun>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.config.builds_table)
            .key("build-id", s(run_key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err("reading a pipeline run", e))?;
        out.item().map(parse).transpose()
    }

    async fn list(
        &self,
        project: &ProjectKey,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<PipelineRun>> {
        let limit = limit.clamp(1, 500);
        let mut start = match before {
            None => None,
            Some(id) => {
                let Some(run) = self.get(id).await? else {
                    return Err(Error::invalid("before", format!("no pipeline run {id}")));
                };
                Some(HashMap::from([
                    ("build-id".to_owned(), s(run_key(id))),
                    ("project-key".to_owned(), s(format!("run#{project}"))),
                    ("build-start-time".to_owned(), n(nanos(run.created_at))),
                ]))
            }
        };
        let mut out = Vec::new();
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.config.builds_table)
                .index_name(PROJECT_INDEX)
                .scan_index_forward(false)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", "project-key")
                .expression_attribute_values(":pk", s(format!("run#{project}")))
                .limit((limit - out.len()) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| ddb_err("listing pipeline runs", e))?;
            for item in page.items() {
                out.push(parse(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() && out.len() < limit => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn since(&self, since: OffsetDateTime) -> Result<Vec<PipelineRun>> {
        let mut out: Vec<PipelineRun> = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.config.builds_table)
                .filter_expression("begins_with(#id, :run) AND #t >= :since")
                .expression_attribute_names("#id", "build-id")
                .expression_attribute_names("#t", "build-start-time")
                .expression_attribute_values(":run", s("run#"))
                .expression_attribute_values(":since", n(nanos(since)))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| ddb_err("scanning pipeline runs", e))?;
            for item in page.items() {
                out.push(parse(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn claim(&self, claim: &StageClaim) -> Result<Option<StageClaim>> {
        let record = serde_json::to_string(claim).map_err(|e| Error::backend("dynamodb", e))?;
        let key = claim_key(claim.run, &claim.stage, claim.attempt);
        let put = self
            .client
            .put_item()
            .table_name(&self.config.builds_table)
            .item("build-id", s(&key))
            .item("record", s(record))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", "build-id")
            .send()
            .await;
        match put {
            Ok(_) => Ok(None),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                let won = self.get_claims(vec![key]).await?;
                won.into_iter()
                    .next()
                    .map(Some)
                    .ok_or_else(|| Error::backend("dynamodb", "a claim vanished"))
            }
            Err(e) => Err(ddb_err("claiming a stage attempt", e)),
        }
    }

    async fn claims(&self, run: Uuid) -> Result<Vec<StageClaim>> {
        let Some(r) = self.get(run).await? else {
            return Ok(Vec::new());
        };
        // Claims are found by key: attempt 1 of every stage, then the next
        // attempt of the stages that had one, until none has.
        let mut out = Vec::new();
        let mut stages: Vec<String> = r.definition.stages.iter().map(|s| s.name.clone()).collect();
        stages.truncate(MAX_STAGES);
        let mut attempt = 1u32;
        while !stages.is_empty() {
            let keys = stages
                .iter()
                .map(|st| claim_key(run, st, attempt))
                .collect();
            let found = self.get_claims(keys).await?;
            stages = found.iter().map(|c| c.stage.clone()).collect();
            out.extend(found);
            attempt += 1;
        }
        Ok(out)
    }
}
