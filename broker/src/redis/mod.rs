//! The Redis broker: history in one capped stream per channel, live delivery over pub/sub, one
//! counter for all channels. All writes happen inside `publish.lua`, atomically.

mod commands;
mod commit;
mod live;
mod reply;
mod source;
pub mod tls;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use redis::{Script, ScriptInvocation, Value};

pub use live::{RedisLiveSink, RedisLiveStream};
pub use source::parse_host_port;

use self::{commands::Commands, commit::Committer, source::Source};
use crate::{
    Accepted, BrokerConfig, BrokerError, Channel, ChannelPage, Event, HistoryRead, Outgoing,
    Position, Removed, StreamFacts,
};

/// A script that begins with `lineage.lua`, as every script does.
macro_rules! script {
    ($file:literal) => {
        redis::Script::new(concat!(include_str!("lineage.lua"), include_str!($file)))
    };
}
pub(crate) use script;

/// Redis key and pub/sub channel names, all under the configured prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    counter: String,
    epoch: String,
    clock: String,
    generation: String,
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
            generation: format!("{prefix}generation"),
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

    /// The keys and arguments `lineage.lua` expects first in every script.
    fn lineage(&self, call: &mut ScriptInvocation, config: &BrokerConfig) {
        call.key(&self.counter)
            .key(&self.epoch)
            .key(&self.clock)
            .key(&self.generation)
            .arg(if config.redis_lossless_restarts {
                "1"
            } else {
                "0"
            })
            .arg(config.clock_bucket_secs());
    }
}

/// A broker on one Redis primary (7.0 or newer).
pub struct RedisBroker {
    commands: Arc<Commands>,
    commit: Committer,
    /// Follows the primary through the Sentinels (none with `REDIS_URL`); stopped on drop.
    follower: Option<tokio::task::JoinHandle<()>>,
    source: Arc<Source>,
    keys: Keys,
    config: BrokerConfig,
    position: Script,
    history: Script,
    marker: Script,
}

impl RedisBroker {
    /// Connects, and checks that the server is Redis 7 or newer.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let source = Arc::new(Source::new(config)?);
        let commands = Arc::new(
            Commands::connect(
                source.clone(),
                config.redis_pool_size as usize,
                config.redis_timeout,
            )
            .await
            .map_err(tls::explained)?,
        );
        let keys = Keys::new(&config.redis_key_prefix);
        let follower = source
            .follows_failovers()
            .then(|| tokio::spawn(commands.clone().follow_primary()));
        let broker = Self {
            follower,
            commit: Committer::start(commands.clone(), keys.clone(), config.clone()),
            commands,
            source,
            keys,
            config: config.clone(),
            position: script!("position.lua"),
            history: script!("history.lua"),
            marker: script!("marker.lua"),
        };
        broker.check_version().await.map_err(tls::explained)?;
        broker.load_scripts().await.map_err(tls::explained)?;
        Ok(broker)
    }

    /// Loads the scripts, so the first publish is one `EVALSHA`: a call that times out then is
    /// one Redis will still run, not a `NOSCRIPT` whose `EVAL` was never sent.
    async fn load_scripts(&self) -> Result<(), BrokerError> {
        for script in [
            &self.position,
            &self.history,
            &self.marker,
            self.commit.script(),
        ] {
            let _: String = self
                .commands
                .with_conn(
                    false,
                    |mut c| async move { script.load_async(&mut c).await },
                )
                .await?;
        }
        Ok(())
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
        self.keys.lineage(&mut call, &self.config);
        let (epoch, seq): (u64, u64) = self
            .commands
            .with_conn(false, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(Position { epoch, seq })
    }

    pub async fn history(&self, read: &HistoryRead<'_>) -> Result<Vec<ChannelPage>, BrokerError> {
        if read.requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.history.prepare_invoke();
        self.keys.lineage(&mut call, &self.config);
        for (channel, _) in read.requests {
            call.key(self.keys.stream(channel));
        }
        call.arg(read.upto)
            .arg(read.limit.max(1))
            .arg(read.max_bytes)
            .arg(self.config.history_ttl.as_secs().max(1))
            .arg(read.epoch);
        for (_, after) in read.requests {
            call.arg(*after);
        }
        let reply: Value = self
            .commands
            .with_conn(false, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        let mut reply = reply::array(reply)?.into_iter();
        let epoch = reply::int(reply.next())?;
        if epoch != read.epoch {
            return Err(BrokerError::EpochChanged);
        }
        let pages: Vec<Value> = reply.collect();
        if pages.len() != read.requests.len() {
            return Err(BrokerError::Protocol(
                "history returned the wrong number of pages".into(),
            ));
        }
        pages
            .into_iter()
            .zip(read.requests)
            .map(|(page, (channel, _))| parse_page(page, channel))
            .collect()
    }

    /// Opens this replica's pub/sub connection, subscribed to its marker channel.
    pub async fn connect_live(
        &self,
        replica: &str,
    ) -> Result<(RedisLiveSink, RedisLiveStream), BrokerError> {
        let client = self.source.primary(self.config.redis_timeout).await?;
        live::connect(
            &client,
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
        self.keys.lineage(&mut call, &self.config);
        call.arg(self.keys.marker(replica));
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

impl Drop for RedisBroker {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
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
            ..ChannelPage::default()
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
    let more = reply::int(fields.next())? == 1;
    let mut page = ChannelPage {
        facts: StreamFacts::Present { first, removed },
        recent,
        more,
        ..ChannelPage::default()
    };
    for entry in reply::array(fields.next().unwrap_or(Value::Nil))? {
        let mut parts = reply::array(entry)?.into_iter();
        let seq = reply::entry_seq(&reply::text(parts.next())?)?;
        page.through = Some(seq);
        match body_of(parts.next()) {
            Some(body) => page.events.push(Event {
                seq,
                channel: channel.clone(),
                body,
            }),
            // Not written by eventgate (or damaged): skipped and counted, never re-read.
            None => page.skipped += 1,
        }
    }
    Ok(page)
}

/// The body (field `p`) of a stream entry's fields.
fn body_of(fields: Option<Value>) -> Option<Bytes> {
    let mut fields = reply::array(fields?).ok()?.into_iter();
    while let Some(name) = fields.next() {
        let value = fields.next();
        if reply::bytes(Some(name)).ok()? == b"p" {
            return reply::bytes(value).ok().map(Bytes::from);
        }
    }
    None
}
