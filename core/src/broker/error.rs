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
    #[error("cannot find the Redis master {master:?} through the Sentinels: {source}")]
    Sentinel {
        master: String,
        #[source]
        source: redis::RedisError,
    },
    /// A TLS handshake with Redis failed; the message says which setting to look at.
    #[error("{0}")]
    Tls(String),
    /// Settings that do not fit together; the message names them.
    #[error("{0}")]
    Config(String),
    /// Redis began a new epoch (it may have lost data) while an operation that started in the
    /// old one was running; the operation's position is no longer valid.
    #[error("redis may have lost data: its epoch changed during the operation")]
    EpochChanged,
    /// A write failed after it may have reached Redis: it may or may not have been applied.
    #[error("{0} (the write may have been applied)")]
    OutcomeUnknown(Box<BrokerError>),
    /// Too much is going on to start this now; retry shortly.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A publish over several shards that some shards applied and others did not: `accepted`
    /// holds, per entry, its answer where its shard applied it.
    #[error("some shards failed: {cause}")]
    Partial {
        accepted: Vec<Option<crate::Accepted>>,
        cause: Box<BrokerError>,
    },
    /// The failure of a read that several requests shared.
    #[error("{0}")]
    Shared(Arc<BrokerError>),
}

impl BrokerError {
    /// Whether the operation may have been applied although it failed.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            BrokerError::OutcomeUnknown(_) => true,
            BrokerError::Shared(inner) => inner.outcome_unknown(),
            BrokerError::Partial { cause, .. } => cause.outcome_unknown(),
            _ => false,
        }
    }
}
