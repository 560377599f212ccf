//! Decap's AWS backends. This crate is the only one that imports `aws-sdk-*`.
//!
//! * [`S3BlobStore`] keeps console logs and artifacts in S3 (or any
//!   S3-compatible server), in two buckets as the original Decap had them
//!   (`decap-console-logs`, `decap-build-artifacts`; names configurable).
//! * [`DynamoDbBuildStore`] keeps build records in the original table
//!   (`decap-build-metadata`, hash key `build-id`, an index on `project-key`
//!   and `build-start-time`), plus an index on `build-status`, and webhook
//!   deliveries in a table of their own. Every query reads to the end.
//! * [`DynamoDbLockStore`] keeps branch locks with conditional writes.
//! * [`SqsDeferralQueue`] keeps deferred builds on an SQS FIFO queue (message
//!   group: the lock key), listed and removed through a small DynamoDB index.
//!
//! S3 object keys:
//!
//! Object keys are versioned so that the layout can change without
//! ambiguity:
//!
//! | blob | bucket | key |
//! | --- | --- | --- |
//! | console log (gzip) | logs bucket | `{prefix}v1/{build id}/console.log.gz` |
//! | artifacts (tar.gz) | artifacts bucket | `{prefix}v1/{build id}/artifacts.tar.gz` |
//!
//! Uploads stream: a blob smaller than one part is one `PutObject`; a larger
//! one is a multipart upload with up to four parts (6 MiB each, so objects
//! up to 58 GiB) in flight while the next one fills, aborted if anything fails, so a reader sees the
//! old blob or the new one.
#![deny(missing_docs)]

mod attrs;
pub mod details;
pub mod direct;
mod dynamodb;
mod hub;
pub mod iam;
mod ledger;
pub mod resources;
mod runs;
mod s3;
mod sessions;
mod sqs;

pub use direct::{DirectConfig, DirectStores};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// An SDK error in a line: the service's code, status and message when it
/// answered, the cause chain when it could not be reached.
pub(crate) fn sdk_message<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => format!(
            "{} (HTTP {}): {}",
            se.err().code().unwrap_or("error"),
            se.raw().status().as_u16(),
            se.err().message().unwrap_or("no message")
        ),
        other => DisplayErrorContext(other).to_string(),
    }
}
pub use dynamodb::{DynamoDbBuildStore, DynamoDbConfig, DynamoDbLockStore};
pub use hub::DynamoDbStatusHub;
pub use ledger::DynamoDbStatusLedger;
pub use runs::DynamoDbRunStore;
pub use s3::{PART_BYTES, PARTS_IN_FLIGHT, S3BlobStore, S3Config, S3DetailStore};
pub use sessions::{DynamoDbSessionStore, SESSION_TTL_ATTRIBUTE};
pub use sqs::{SqsConfig, SqsDeferralQueue};
