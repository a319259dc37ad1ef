//! Small readers for the nested replies of our scripts.

use redis::Value;

use crate::BrokerError;

fn unexpected(what: &str, got: &Option<Value>) -> BrokerError {
    BrokerError::Protocol(format!("expected {what}, got {got:?}"))
}

pub(super) fn array(value: Value) -> Result<Vec<Value>, BrokerError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected("an array", &Some(other))),
    }
}

pub(super) fn int(value: Option<Value>) -> Result<u64, BrokerError> {
    match value {
        Some(Value::Int(n)) if n >= 0 => Ok(n as u64),
        Some(Value::BulkString(ref b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected("an integer", &value)),
        other => Err(unexpected("an integer", &other)),
    }
}

pub(super) fn bytes(value: Option<Value>) -> Result<Vec<u8>, BrokerError> {
    match value {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.into_bytes()),
        other => Err(unexpected("a string", &other)),
    }
}

pub(super) fn text(value: Option<Value>) -> Result<String, BrokerError> {
    String::from_utf8(bytes(value)?).map_err(|_| BrokerError::Protocol("non-UTF-8 text".into()))
}

/// The seq of a stream entry id `seq-0`.
pub(super) fn entry_seq(id: &str) -> Result<u64, BrokerError> {
    id.split('-')
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BrokerError::Protocol(format!("bad stream entry id {id:?}")))
}
