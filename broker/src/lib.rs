//! What both eventgate services share: channel names, the event envelope, and the broker that
//! keeps per-channel history and carries events live, on Redis or in memory.
//!
//! The broker's contract, the same on both back ends:
//! - one counter hands every event its `seq`, in the same atomic step that appends it to its
//!   channel's history and sends it live, so live order is `seq` order on every connection;
//! - history per channel is capped (`HISTORY_MAX_LEN`) and expires `HISTORY_TTL` after the
//!   channel's last event; [`history::assess`] tells when it is complete after a cursor.

pub mod auth;
pub mod channel;
pub mod config;
pub mod error;
pub mod event;
pub mod history;
pub mod limits;
pub mod memory;
pub mod redact;
pub mod redis;
pub mod serve;
pub mod telemetry;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::Stream;

pub use channel::{Channel, ChannelError};
pub use config::BrokerConfig;
pub use error::BrokerError;
pub use event::{Accepted, Event, Outgoing};
pub use history::{
    ChannelPage, GapReason, HistoryRead, Position, Removed, StreamFacts, parse_cursor,
};

use crate::{
    memory::{MemoryBroker, MemoryLiveSink, MemoryLiveStream},
    redis::{RedisBroker, RedisLiveSink, RedisLiveStream},
};

/// The broker, on Redis or in memory; cloning shares it.
#[derive(Clone)]
pub enum Broker {
    Memory(Arc<MemoryBroker>),
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// A Redis broker when `REDIS_URL` or `REDIS_SENTINELS` is set, else an in-memory one.
    pub async fn from_config(config: &BrokerConfig) -> Result<Self, BrokerError> {
        config.check_redis().map_err(BrokerError::Config)?;
        if config.uses_redis() {
            Ok(Self::Redis(Arc::new(RedisBroker::connect(config).await?)))
        } else {
            Ok(Self::memory(config))
        }
    }

    pub fn memory(config: &BrokerConfig) -> Self {
        Self::Memory(Arc::new(MemoryBroker::new(config)))
    }

    /// `"redis"` or `"memory"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }

    /// How long one broker operation may take (`REDIS_TIMEOUT`).
    pub fn timeout(&self) -> std::time::Duration {
        match self {
            Broker::Memory(m) => m.timeout(),
            Broker::Redis(r) => r.timeout(),
        }
    }

    /// Checks the broker answers.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(r) => r.ping().await,
        }
    }

    /// Publishes `entries` atomically; one [`Accepted`] per entry, in order.
    pub async fn publish(&self, entries: &[Outgoing]) -> Result<Vec<Accepted>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.publish(entries)),
            Broker::Redis(r) => r.publish(entries).await,
        }
    }

    /// The current counter and epoch.
    pub async fn position(&self) -> Result<Position, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.position()),
            Broker::Redis(r) => r.position().await,
        }
    }

    /// For each `(channel, after)` of `read`: a page of events with `after < seq <= upto`, and
    /// the facts needed to tell whether that history is complete.
    pub async fn history(&self, read: &HistoryRead<'_>) -> Result<Vec<ChannelPage>, BrokerError> {
        match self {
            Broker::Memory(m) => m.history(read),
            Broker::Redis(r) => r.history(read).await,
        }
    }

    /// Opens the live connection of gateway `replica`. A replica holds exactly one.
    pub async fn connect_live(&self, replica: &str) -> Result<(LiveSink, LiveStream), BrokerError> {
        match self {
            Broker::Memory(m) => {
                let (sink, stream) = m.connect_live(replica);
                Ok((LiveSink::Memory(sink), LiveStream::Memory(stream)))
            }
            Broker::Redis(r) => {
                let (sink, stream) = r.connect_live(replica).await?;
                Ok((LiveSink::Redis(sink), LiveStream::Redis(stream)))
            }
        }
    }

    /// Stores a one-time ticket (see [`auth::new_ticket`]) with `payload` for `ttl`, under its
    /// digest so the store never holds a usable ticket. `Ok(false)`: that ticket exists.
    pub async fn put_ticket(
        &self,
        ticket: &str,
        payload: &[u8],
        ttl: std::time::Duration,
    ) -> Result<bool, BrokerError> {
        let digest = auth::ticket_digest(ticket);
        match self {
            Broker::Memory(m) => Ok(m.put_ticket(&digest, payload, ttl)),
            Broker::Redis(r) => r.put_ticket(&digest, payload, ttl).await,
        }
    }

    /// Redeems a ticket: its payload, once, on any replica; `None` when unknown, used or
    /// expired.
    pub async fn take_ticket(&self, ticket: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let digest = auth::ticket_digest(ticket);
        match self {
            Broker::Memory(m) => Ok(m.take_ticket(&digest)),
            Broker::Redis(r) => r.take_ticket(&digest).await,
        }
    }

    /// Sends [`LiveMessage::Marker`] with the current counter to `replica`'s live connection,
    /// in order with events. `Ok(false)`: nobody received it.
    pub async fn request_marker(&self, replica: &str) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.request_marker(replica)),
            Broker::Redis(r) => r.request_marker(replica).await,
        }
    }
}

/// What a live connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveMessage {
    /// An event on a subscribed channel.
    Event(Event),
    /// Every event with a `seq` up to this one, on subscribed channels, came before; and the
    /// broker's epoch.
    Marker(Position),
    /// Something on the connection that is not ours; logged and skipped.
    Malformed(String),
}

/// The control half of a live connection.
#[derive(Clone)]
pub enum LiveSink {
    Memory(MemoryLiveSink),
    Redis(RedisLiveSink),
}

impl LiveSink {
    /// Subscribes; once this returns, every later event on these channels is delivered.
    pub async fn subscribe(&mut self, channels: &[Channel]) -> Result<(), BrokerError> {
        match self {
            LiveSink::Memory(m) => {
                m.subscribe(channels);
                Ok(())
            }
            LiveSink::Redis(r) => r.subscribe(channels).await,
        }
    }

    pub async fn unsubscribe(&mut self, channels: &[Channel]) -> Result<(), BrokerError> {
        match self {
            LiveSink::Memory(m) => {
                m.unsubscribe(channels);
                Ok(())
            }
            LiveSink::Redis(r) => r.unsubscribe(channels).await,
        }
    }
}

/// The message half of a live connection; it ends when the connection is lost.
pub enum LiveStream {
    Memory(MemoryLiveStream),
    Redis(RedisLiveStream),
}

impl Stream for LiveStream {
    type Item = LiveMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveMessage>> {
        match self.get_mut() {
            LiveStream::Memory(m) => Pin::new(m).poll_next(cx),
            LiveStream::Redis(r) => Pin::new(r).poll_next(cx),
        }
    }
}
