//! The web UI's login sessions in one DynamoDB table shared by every
//! replica: `session-key` (the SHA-256 of the session id, never the id) →
//! `login` (GitHub's, none for the API token), `can-build`, `can-unlock`,
//! `expires-at` (nanoseconds) and `expires-at-epoch` (seconds, the table's
//! time-to-live attribute, so DynamoDB deletes ended sessions by itself).

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use decap_core::ports::{SessionStore, StoredSession};
use decap_core::{Error, Result};
use time::OffsetDateTime;

use crate::attrs::{get_n, get_s, n, s};
use crate::dynamodb::{connect_table, create_key_table, ddb_err, from_nanos, nanos};

const KEY: &str = "session-key";
/// The attribute DynamoDB's time to live reads (epoch seconds).
pub const SESSION_TTL_ATTRIBUTE: &str = "expires-at-epoch";

/// [`SessionStore`] on DynamoDB.
#[derive(Clone)]
pub struct DynamoDbSessionStore {
    client: Client,
    table: String,
}

fn flag(item: &std::collections::HashMap<String, AttributeValue>, name: &str) -> bool {
    item.get(name)
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false)
}

impl DynamoDbSessionStore {
    /// The sessions in `table`, checked to exist.
    pub async fn connect(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<Self> {
        Ok(DynamoDbSessionStore {
            client: connect_table(sdk, table, endpoint).await?,
            table: table.to_owned(),
        })
    }

    /// Creates the table unless it exists (its time to live is set by
    /// `aws-resources`).
    pub async fn create_table(
        sdk: &aws_config::SdkConfig,
        table: &str,
        endpoint: Option<&str>,
    ) -> Result<()> {
        create_key_table(sdk, endpoint, table, KEY).await
    }
}

#[async_trait]
impl SessionStore for DynamoDbSessionStore {
    async fn put(&self, key: &str, session: &StoredSession) -> Result<()> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY, s(key))
            .item("can-build", AttributeValue::Bool(session.can_build))
            .item("can-unlock", AttributeValue::Bool(session.can_unlock))
            .item("expires-at", n(nanos(session.expires_at)))
            .item(
                SESSION_TTL_ATTRIBUTE,
                n(session.expires_at.unix_timestamp()),
            );
        if let Some(login) = &session.github_login {
            req = req.item("login", s(login));
        }
        req.send()
            .await
            .map_err(|e| ddb_err("storing a login session", e))?;
        Ok(())
    }

    async fn get(&self, key: &str, now: OffsetDateTime) -> Result<Option<StoredSession>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY, s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err("reading a login session", e))?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let expires_at = from_nanos(get_n(item, "expires-at").map_err(|e| {
            Error::backend("dynamodb", format!("a login session does not read: {e}"))
        })?);
        // DynamoDB deletes ended sessions some time after they end.
        if expires_at <= now {
            return Ok(None);
        }
        Ok(Some(StoredSession {
            github_login: get_s(item, "login").ok().map(str::to_owned),
            can_build: flag(item, "can-build"),
            can_unlock: flag(item, "can-unlock"),
            expires_at,
        }))
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key(KEY, s(key))
            .send()
            .await
            .map_err(|e| ddb_err("ending a login session", e))?;
        Ok(())
    }
}
