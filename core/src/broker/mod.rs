//! The broker: per-channel history and live delivery, behind one trait ([`Backend`]) with two
//! implementations, in memory (`memory`) and on Redis (`redis`: one server, several
//! independent servers, or a Redis Cluster).
//!
//! The contract, the same on every back end:
//! - channels are spread over a fixed number of logical shards ([`Shards`]); each shard has one
//!   counter that hands every event of its channels its `seq`, in the same atomic step that
//!   appends the event to its channel's history and sends it live, so live order is `seq` order
//!   within a shard on every connection;
//! - history per channel is capped (`HISTORY_MAX_LEN`) and expires `HISTORY_TTL` after the
//!   channel's last event; [`history::assess`] tells when it is complete after a cursor.

pub mod cursor;
pub mod error;
pub mod history;
pub mod memory;
pub mod redis;
pub mod shards;

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, future::BoxFuture};

pub use self::shards::Shards;
use crate::{
    Accepted, BrokerConfig, BrokerError, Channel, ChannelPage, HistoryRead, Outgoing, Position,
};

/// What every back end does, shard by shard. Methods return boxed futures so the broker can be
/// chosen at start and held as `Arc<dyn Backend>`.
pub trait Backend: Send + Sync {
    /// `"memory"`, `"redis"`, `"redis-shards"` or `"redis-cluster"`.
    fn kind(&self) -> &'static str;

    /// How channels map to shards.
    fn shards(&self) -> &Shards;

    /// How long one operation may take (`REDIS_TIMEOUT`).
    fn timeout(&self) -> Duration;

    /// Checks shard `shard` answers.
    fn ping(&self, shard: usize) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Publishes entries, all of shard `shard`, in one atomic step; one [`Accepted`] each.
    fn publish<'a>(
        &'a self,
        shard: usize,
        entries: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<Accepted>, BrokerError>>;

    /// Shard `shard`'s counter and epoch.
    fn position(&self, shard: usize) -> BoxFuture<'_, Result<Position, BrokerError>>;

    /// Pages of history of channels of shard `shard`.
    fn history<'a>(
        &'a self,
        shard: usize,
        read: &'a HistoryRead<'a>,
    ) -> BoxFuture<'a, Result<Vec<ChannelPage>, BrokerError>>;

    /// Opens the live connection of gateway `replica` for shard `shard`.
    fn connect_live<'a>(
        &'a self,
        shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<(LiveSink, LiveStream), BrokerError>>;

    /// Sends a [`LiveMessage::Marker`] to `replica`'s live connection of shard `shard`, in
    /// order with events. `Ok(false)`: nobody received it.
    fn request_marker<'a>(
        &'a self,
        shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Stores a ticket under its digest for `ttl`; `Ok(false)`: the digest is taken.
    fn put_ticket<'a>(
        &'a self,
        digest: &'a str,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>>;

    /// Takes a ticket's payload and deletes it in one step.
    fn take_ticket<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>>;
}

/// The broker; cloning shares it.
#[derive(Clone)]
pub struct Broker(Arc<dyn Backend>);

impl Broker {
    /// A Redis broker when `REDIS_URL`, `REDIS_SENTINELS`, `REDIS_SHARDS` or `REDIS_CLUSTER`
    /// is set, else an in-memory one.
    pub async fn from_config(config: &BrokerConfig) -> Result<Self, BrokerError> {
        config.check_redis().map_err(BrokerError::Config)?;
        if config.uses_redis() {
            let backend = redis::RedisBroker::connect(config).await?;
            Ok(Self(Arc::new(backend)))
        } else {
            Ok(Self::memory(config))
        }
    }

    pub fn memory(config: &BrokerConfig) -> Self {
        Self(memory::MemoryBroker::new(config))
    }

    /// `"memory"`, `"redis"`, `"redis-shards"` or `"redis-cluster"`.
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// How channels map to shards.
    pub fn shards(&self) -> &Shards {
        self.0.shards()
    }

    /// The shard of `channel`.
    pub fn shard_of(&self, channel: &Channel) -> usize {
        self.0.shards().shard_of(channel)
    }

    /// How long one broker operation may take (`REDIS_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        self.0.timeout()
    }

    /// Checks every shard answers.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        for shard in 0..self.shards().count() {
            self.0.ping(shard).await?;
        }
        Ok(())
    }

    /// Checks shard `shard` answers.
    pub async fn ping_shard(&self, shard: usize) -> Result<(), BrokerError> {
        self.0.ping(shard).await
    }

    /// Publishes `entries`: each shard's part in one atomic step, shards in parallel; one
    /// [`Accepted`] per entry, in order. When some shards fail the error is
    /// [`BrokerError::Partial`], naming what was published.
    pub async fn publish(&self, entries: &[Outgoing]) -> Result<Vec<Accepted>, BrokerError> {
        let shards = self.shards();
        if shards.count() == 1 {
            return self.0.publish(0, entries).await;
        }
        let mut parts: Vec<(usize, Vec<usize>, Vec<Outgoing>)> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let shard = shards.shard_of(&entry.channel);
            match parts.iter_mut().find(|(s, _, _)| *s == shard) {
                Some((_, indices, part)) => {
                    indices.push(i);
                    part.push(entry.clone());
                }
                None => parts.push((shard, vec![i], vec![entry.clone()])),
            }
        }
        if let [(shard, _, _)] = parts.as_slice() {
            return self.0.publish(*shard, entries).await;
        }
        let results = futures::future::join_all(
            parts
                .iter()
                .map(|(shard, _, part)| self.0.publish(*shard, part)),
        )
        .await;
        let mut accepted: Vec<Option<Accepted>> = vec![None; entries.len()];
        let mut failure = None;
        for ((_, indices, _), result) in parts.iter().zip(results) {
            match result {
                Ok(answers) => {
                    for (&i, answer) in indices.iter().zip(answers) {
                        accepted[i] = Some(answer);
                    }
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        match failure {
            None => Ok(accepted.into_iter().flatten().collect()),
            Some(cause) if accepted.iter().all(Option::is_none) => Err(cause),
            Some(cause) => Err(BrokerError::Partial {
                accepted,
                cause: Box::new(cause),
            }),
        }
    }

    /// Shard `shard`'s counter and epoch.
    pub async fn position(&self, shard: usize) -> Result<Position, BrokerError> {
        self.0.position(shard).await
    }

    /// For each `(channel, after)` of `read`, all channels of shard `shard`: a page of events
    /// with `after < seq <= upto`, and the facts needed to tell whether that history is
    /// complete.
    pub async fn history(
        &self,
        shard: usize,
        read: &HistoryRead<'_>,
    ) -> Result<Vec<ChannelPage>, BrokerError> {
        self.0.history(shard, read).await
    }

    /// Opens the live connection of gateway `replica` for shard `shard`.
    pub async fn connect_live(
        &self,
        shard: usize,
        replica: &str,
    ) -> Result<(LiveSink, LiveStream), BrokerError> {
        self.0.connect_live(shard, replica).await
    }

    /// Sends [`LiveMessage::Marker`] with shard `shard`'s counter to `replica`, in order with
    /// events. `Ok(false)`: nobody received it.
    pub async fn request_marker(&self, shard: usize, replica: &str) -> Result<bool, BrokerError> {
        self.0.request_marker(shard, replica).await
    }

    /// Stores a one-time ticket (see [`crate::auth::new_ticket`]) with `payload` for `ttl`,
    /// under its digest so the store never holds a usable ticket. `Ok(false)`: that ticket
    /// exists.
    pub async fn put_ticket(
        &self,
        ticket: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let digest = crate::auth::ticket_digest(ticket);
        self.0.put_ticket(&digest, payload, ttl).await
    }

    /// Redeems a ticket: its payload, once, on any replica; `None` when unknown, used or
    /// expired.
    pub async fn take_ticket(&self, ticket: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let digest = crate::auth::ticket_digest(ticket);
        self.0.take_ticket(&digest).await
    }
}

/// What a live connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveMessage {
    /// An event on a subscribed channel.
    Event(crate::Event),
    /// Every event of the shard with a `seq` up to this one, on subscribed channels, came
    /// before; and the shard's epoch.
    Marker(Position),
    /// Something on the connection that is not ours; logged and skipped.
    Malformed(String),
}

/// Subscribing and unsubscribing one live connection's channels.
pub trait LiveControl: Send + Sync {
    /// Once this returns, every later event on these channels is delivered.
    fn subscribe<'a>(&'a self, channels: &'a [Channel]) -> BoxFuture<'a, Result<(), BrokerError>>;

    fn unsubscribe<'a>(&'a self, channels: &'a [Channel])
    -> BoxFuture<'a, Result<(), BrokerError>>;
}

/// The control half of a live connection; cloning shares it.
#[derive(Clone)]
pub struct LiveSink(pub Arc<dyn LiveControl>);

impl LiveSink {
    /// Subscribes; once this returns, every later event on these channels is delivered.
    pub async fn subscribe(&self, channels: &[Channel]) -> Result<(), BrokerError> {
        self.0.subscribe(channels).await
    }

    pub async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BrokerError> {
        self.0.unsubscribe(channels).await
    }
}

/// The message half of a live connection; it ends when the connection is lost.
pub type LiveStream = Pin<Box<dyn Stream<Item = LiveMessage> + Send>>;
