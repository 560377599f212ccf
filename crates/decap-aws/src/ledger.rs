//! What Decap told GitHub (commit statuses, pull-request comments), in one
//! DynamoDB table shared by every replica: `ledger-key` → `state`,
//! `comment-id`.

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use decap_core::ports::{CommitState, StatusLedger};
use decap_core::{Error, Result};

use crate::dynamodb::{connect_table, create_key_table, ddb_err};

const KEY: &str = "ledger-key";
const STATE: &str = "state";
const COMMENT: &str = "comment-id";

/// [`StatusLedger`] on DynamoDB.
pub struct DynamoDbStatusLedger {
    client: Client,
    table: String,
}

impl DynamoDbStatusLedger {
    /// The ledger in `table`, checked to exist.
    pub async fn connect(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<Self> {
        Ok(DynamoDbStatusLedger {
            client: connect_table(sdk, table, endpoint).await?,
            table: table.to_owned(),
        })
    }

    /// Creates the table unless it exists.
    pub async fn create_table(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<()> {
        create_key_table(sdk, endpoint, table, KEY).await
    }

    async fn attribute(&self, key: &str, name: &str) -> Result<Option<AttributeValue>> {
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY, AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err("reading the status ledger", e))?;
        Ok(item.item.and_then(|mut i| i.remove(name)))
    }

    async fn set(&self, key: &str, name: &str, value: AttributeValue) -> Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(KEY, AttributeValue::S(key.to_owned()))
            .update_expression("SET #a = :v")
            .expression_attribute_names("#a", name)
            .expression_attribute_values(":v", value)
            .send()
            .await
            .map_err(|e| ddb_err("writing the status ledger", e))?;
        Ok(())
    }
}

#[async_trait]
impl StatusLedger for DynamoDbStatusLedger {
    async fn reported(&self, key: &str) -> Result<Option<CommitState>> {
        let Some(AttributeValue::S(s)) = self.attribute(key, STATE).await? else {
            return Ok(None);
        };
        Ok([
            CommitState::Pending,
            CommitState::Success,
            CommitState::Failure,
            CommitState::Error,
        ]
        .into_iter()
        .find(|c| c.as_str() == s))
    }

    async fn record(&self, key: &str, state: CommitState) -> Result<()> {
        self.set(key, STATE, AttributeValue::S(state.as_str().to_owned()))
            .await
    }

    async fn comment(&self, key: &str) -> Result<Option<u64>> {
        match self.attribute(key, COMMENT).await? {
            Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| {
                Error::backend("dynamodb", format!("comment id {n:?} is not a number"))
            }),
            _ => Ok(None),
        }
    }

    async fn record_comment(&self, key: &str, id: u64) -> Result<()> {
        self.set(key, COMMENT, AttributeValue::N(id.to_string()))
            .await
    }
}
