//! DynamoDB attribute values, both ways.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use decap_core::{Error, Result};

/// A string value.
pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number value.
pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A string attribute of an item.
pub(crate) fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Result<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        .ok_or_else(|| Error::backend("dynamodb", format!("item without string attribute {name}")))
}

/// A number attribute of an item.
pub(crate) fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Result<i128> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::backend("dynamodb", format!("item without number attribute {name}")))
}
