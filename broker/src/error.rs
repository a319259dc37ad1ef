//! Broker errors.

use std::{sync::Arc, time::Duration};

/// A broker operation failed. Everything here means "the broker is unavailable or misbehaving
/// right now"; the services answer 503 and clients retry.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    #[error("redis {found} is too old: eventgate needs Redis 7.0 or newer")]
    Version { found: String },
    #[error("the live connection is closed")]
    Closed,
    /// The failure of a read that several requests shared.
    #[error("{0}")]
    Shared(Arc<BrokerError>),
}
