//! The Redis broker: history in one capped stream per channel, live delivery over pub/sub, one
//! counter for all channels. All writes happen inside `publish.lua`, atomically.

mod commands;
mod commit;
mod live;
mod reply;

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use bytes::Bytes;
use redis::{
    Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

pub use live::{RedisLiveSink, RedisLiveStream};

use self::{commands::Commands, commit::Committer};
use crate::{
    Accepted, BrokerConfig, BrokerError, Channel, ChannelPage, Event, Outgoing, Position, Removed,
    StreamFacts,
};

/// Redis key and pub/sub channel names, all under the configured prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    counter: String,
    epoch: String,
    clock: String,
    stream: String,
    live: String,
    marker: String,
    ticket: String,
    idempotency: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            counter: format!("{prefix}seq"),
            epoch: format!("{prefix}epoch"),
            clock: format!("{prefix}clock"),
            stream: format!("{prefix}stream:"),
            live: format!("{prefix}live:"),
            marker: format!("{prefix}marker:"),
            ticket: format!("{prefix}ticket:"),
            idempotency: format!("{prefix}idem:"),
        }
    }

    fn idempotency(&self, key: &str) -> String {
        format!("{}{key}", self.idempotency)
    }

    fn stream(&self, channel: &Channel) -> String {
        format!("{}{channel}", self.stream)
    }

    fn live(&self, channel: &Channel) -> String {
        format!("{}{channel}", self.live)
    }

    fn marker(&self, replica: &str) -> String {
        format!("{}{replica}", self.marker)
    }

    fn ticket(&self, digest: &str) -> String {
        format!("{}{digest}", self.ticket)
    }
}

/// A broker on one Redis primary (7.0 or newer).
pub struct RedisBroker {
    commands: Arc<Commands>,
    commit: Committer,
    client: redis::Client,
    keys: Keys,
    config: BrokerConfig,
    position: Script,
    history: Script,
    marker: Script,
}

impl RedisBroker {
    /// Connects, and checks that the server is Redis 7 or newer.
    pub async fn connect(url: &str, config: &BrokerConfig) -> Result<Self, BrokerError> {
        let timeout = config.redis_timeout;
        let client = redis::Client::open(url)?;
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let mut connections = Vec::new();
        for _ in 0..config.redis_pool_size.max(1) {
            let connect = ConnectionManager::new_with_config(client.clone(), settings.clone());
            let connection = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| BrokerError::Timeout(timeout))??;
            connections.push(connection);
        }
        let commands = Arc::new(Commands {
            connections,
            next: AtomicUsize::new(0),
            timeout,
        });
        let keys = Keys::new(&config.redis_key_prefix);
        let broker = Self {
            commit: Committer::start(commands.clone(), keys.clone(), config.clone()),
            commands,
            client,
            keys,
            config: config.clone(),
            position: Script::new(include_str!("position.lua")),
            history: Script::new(include_str!("history.lua")),
            marker: Script::new(include_str!("marker.lua")),
        };
        broker.check_version().await?;
        Ok(broker)
    }

    async fn check_version(&self) -> Result<(), BrokerError> {
        let info: String = self
            .commands
            .with_conn(false, |mut c| async move {
                redis::cmd("INFO").arg("server").query_async(&mut c).await
            })
            .await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 7 {
            return Err(BrokerError::Version { found: version });
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), BrokerError> {
        let _: String = self
            .commands
            .with_conn(false, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Publishes `entries` atomically (see `commit`: concurrent requests share script calls).
    pub async fn publish(&self, entries: &[Outgoing]) -> Result<Vec<Accepted>, BrokerError> {
        self.commit.publish(entries).await
    }

    pub async fn position(&self) -> Result<Position, BrokerError> {
        let mut call = self.position.prepare_invoke();
        call.key(&self.keys.counter)
            .key(&self.keys.epoch)
            .key(&self.keys.clock)
            .arg(self.config.clock_bucket_secs());
        let (epoch, seq): (u64, u64) = self
            .commands
            .with_conn(false, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(Position { epoch, seq })
    }

    pub async fn history(
        &self,
        requests: &[(Channel, u64)],
        upto: u64,
        limit: usize,
    ) -> Result<Vec<ChannelPage>, BrokerError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.history.prepare_invoke();
        call.key(&self.keys.clock);
        for (channel, _) in requests {
            call.key(self.keys.stream(channel));
        }
        call.arg(upto)
            .arg(limit)
            .arg(self.config.history_ttl.as_secs().max(1))
            .arg(self.config.clock_bucket_secs());
        for (_, after) in requests {
            call.arg(*after);
        }
        let reply: Value = self
            .commands
            .with_conn(false, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        let pages = reply::array(reply)?;
        if pages.len() != requests.len() {
            return Err(BrokerError::Protocol(
                "history returned the wrong number of pages".into(),
            ));
        }
        pages
            .into_iter()
            .zip(requests)
            .map(|(page, (channel, _))| parse_page(page, channel))
            .collect()
    }

    /// Opens this replica's pub/sub connection, subscribed to its marker channel.
    pub async fn connect_live(
        &self,
        replica: &str,
    ) -> Result<(RedisLiveSink, RedisLiveStream), BrokerError> {
        live::connect(
            &self.client,
            self.keys.clone(),
            replica,
            self.config.redis_timeout,
        )
        .await
    }

    /// Asks Redis to publish the counter on this replica's marker channel. Returns whether a
    /// subscriber received it: `false` means the replica's pub/sub connection is gone.
    pub async fn request_marker(&self, replica: &str) -> Result<bool, BrokerError> {
        let mut call = self.marker.prepare_invoke();
        call.key(&self.keys.counter).arg(self.keys.marker(replica));
        let receivers: u64 = self
            .commands
            .with_conn(false, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(receivers > 0)
    }

    /// Stores a one-time ticket under its digest for `ttl`. `Ok(false)`: the digest is taken.
    pub async fn put_ticket(
        &self,
        digest: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let key = self.keys.ticket(digest);
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let stored: Option<String> = self
            .commands
            .with_conn(true, |mut c| {
                let key = &key;
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(payload)
                        .arg("PX")
                        .arg(millis)
                        .arg("NX")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(stored.is_some())
    }

    /// Takes a ticket: returns its payload and deletes it in one step, so it redeems once
    /// across all replicas.
    pub async fn take_ticket(&self, digest: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = self.keys.ticket(digest);
        // GETDEL is not retried on another connection unless it surely never ran (a write).
        self.commands
            .with_conn(true, |mut c| {
                let key = &key;
                async move { redis::cmd("GETDEL").arg(key).query_async(&mut c).await }
            })
            .await
    }

    pub fn timeout(&self) -> Duration {
        self.config.redis_timeout
    }
}

fn parse_page(page: Value, channel: &Channel) -> Result<ChannelPage, BrokerError> {
    let mut fields = reply::array(page)?.into_iter();
    let exists = reply::int(fields.next())? == 1;
    let recent = reply::int(fields.next())? == 1;
    if !exists {
        return Ok(ChannelPage {
            facts: StreamFacts::Missing,
            recent,
            events: Vec::new(),
        });
    }
    let added = reply::int(fields.next())?;
    let length = reply::int(fields.next())?;
    let first = reply::text(fields.next())?;
    let first = if first.is_empty() {
        None
    } else {
        Some(reply::entry_seq(&first)?)
    };
    let max_deleted = reply::entry_seq(&reply::text(fields.next())?)?;
    let removed = if added > length {
        Removed::BelowFirst { max_deleted }
    } else {
        Removed::Nothing
    };
    let events = reply::array(fields.next().unwrap_or(Value::Nil))?
        .into_iter()
        .map(|entry| parse_entry(entry, channel))
        .collect::<Result<_, _>>()?;
    Ok(ChannelPage {
        facts: StreamFacts::Present { first, removed },
        recent,
        events,
    })
}

fn parse_entry(entry: Value, channel: &Channel) -> Result<Event, BrokerError> {
    let mut parts = reply::array(entry)?.into_iter();
    let seq = reply::entry_seq(&reply::text(parts.next())?)?;
    let mut fields = reply::array(parts.next().unwrap_or(Value::Nil))?.into_iter();
    while let Some(name) = fields.next() {
        let value = fields.next();
        if reply::bytes(Some(name))? == b"p" {
            return Ok(Event {
                seq,
                channel: channel.clone(),
                body: Bytes::from(reply::bytes(value)?),
            });
        }
    }
    Err(BrokerError::Protocol(format!(
        "stream entry {seq} has no body"
    )))
}
