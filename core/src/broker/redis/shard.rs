//! One logical shard on Redis: its keys (with the shard's hash tag when there are several), the
//! connections to the server that holds it, and every operation, each one script that runs the
//! lineage check first (`lineage.lua`).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use redis::{Script, ScriptInvocation, Value};

use super::{
    RedisLiveSink, RedisLiveStream, commands::Commands, commit::Committer, live, reply,
    source::Source,
};
use crate::{
    Accepted, BrokerConfig, BrokerError, Channel, ChannelPage, Event, HistoryRead, Outgoing,
    Position, Removed, StreamFacts,
};

/// Redis key and pub/sub channel names, all under the configured prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    pub(super) counter: String,
    pub(super) epoch: String,
    pub(super) clock: String,
    pub(super) generation: String,
    pub(super) stream: String,
    pub(super) live: String,
    pub(super) marker: String,
    pub(super) ticket: String,
    pub(super) idempotency: String,
}

impl Keys {
    /// The keys of a shard: under `prefix`, and its hash tag when there are several shards
    /// (`eventgate:{eg3.17}:seq`); a single Redis keeps untagged names (`eventgate:seq`).
    pub(crate) fn new(prefix: &str, tag: Option<&str>) -> Self {
        let prefix = match tag {
            Some(tag) => format!("{prefix}{tag}:"),
            None => prefix.to_owned(),
        };
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

    pub(super) fn idempotency(&self, key: &str) -> String {
        format!("{}{key}", self.idempotency)
    }

    pub(super) fn stream(&self, channel: &Channel) -> String {
        format!("{}{channel}", self.stream)
    }

    pub(super) fn live(&self, channel: &Channel) -> String {
        format!("{}{channel}", self.live)
    }

    pub(super) fn marker(&self, replica: &str) -> String {
        format!("{}{replica}", self.marker)
    }

    pub(super) fn ticket(&self, digest: &str) -> String {
        format!("{}{digest}", self.ticket)
    }

    /// The keys and arguments `lineage.lua` expects first in every script ([`LINEAGE_KEYS`]
    /// keys).
    pub(super) fn lineage(&self, call: &mut ScriptInvocation, config: &BrokerConfig) {
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

/// How many keys [`Keys::lineage`] declares: a script's own keys start after them.
pub(super) const LINEAGE_KEYS: usize = 4;

/// Records the deployment's shard count (`{prefix}shards`, untagged: the key must not depend
/// on the count) unless one is recorded; answers the one recorded before.
pub(super) fn shard_count_command(prefix: &str, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(format!("{prefix}shards"))
        .arg(count)
        .arg("NX")
        .arg("GET");
    cmd
}

/// Refuses data written with another shard count: its channels are on other shards.
pub(super) fn judge_shard_count(recorded: Option<String>, count: usize) -> Result<(), BrokerError> {
    match recorded {
        Some(recorded) if recorded != count.to_string() => Err(BrokerError::Config(format!(
            "this deployment has {count} shard(s) (REDIS_SHARD_COUNT, REDIS_SHARDS or \
             REDIS_CLUSTER) but the data in Redis was written with {recorded}: every service \
             must use the same count, and changing it is a migration (see the README, Scaling \
             past one Redis)"
        ))),
        _ => Ok(()),
    }
}

/// The read scripts, shared by every shard.
pub(super) struct Scripts {
    pub(super) position: Script,
    pub(super) history: Script,
    pub(super) marker: Script,
}

impl Scripts {
    /// `sharded`: on a Redis Cluster, where live messages go with `SPUBLISH`.
    pub(super) fn new(sharded: bool) -> Self {
        Self {
            position: redis::Script::new(super::script!("position.lua")),
            history: redis::Script::new(super::script!("history.lua")),
            marker: super::sharded(super::script!("marker.lua"), sharded),
        }
    }
}

/// One logical shard.
pub(super) struct RedisShard {
    pub(super) keys: Keys,
    pub(super) commands: Arc<Commands>,
    pub(super) commit: Committer,
    pub(super) source: Arc<Source>,
    pub(super) scripts: Arc<Scripts>,
    pub(super) config: BrokerConfig,
}

impl RedisShard {
    /// Loads the scripts, so the first publish is one `EVALSHA`: a call that times out then is
    /// one Redis will still run, not a `NOSCRIPT` whose `EVAL` was never sent.
    pub(super) async fn load_scripts(&self) -> Result<(), BrokerError> {
        for script in [
            &self.scripts.position,
            &self.scripts.history,
            &self.scripts.marker,
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

    /// Records the deployment's shard count on this server, or checks it against the one
    /// recorded: data written with another count has its channels on other shards.
    pub(super) async fn check_shard_count(&self, count: usize) -> Result<(), BrokerError> {
        let cmd = shard_count_command(&self.config.redis_key_prefix, count);
        let recorded: Option<String> = self
            .commands
            .with_conn(true, |mut c| {
                let cmd = &cmd;
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        judge_shard_count(recorded, count)
    }

    pub(super) async fn check_version(&self) -> Result<(), BrokerError> {
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

    pub(super) async fn ping(&self) -> Result<(), BrokerError> {
        let _: String = self
            .commands
            .with_conn(false, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Publishes `entries` atomically (see `commit`: concurrent requests share script calls).
    pub(super) async fn publish(&self, entries: &[Outgoing]) -> Result<Vec<Accepted>, BrokerError> {
        self.commit.publish(entries).await
    }

    pub(super) async fn position(&self) -> Result<Position, BrokerError> {
        let mut call = self.scripts.position.prepare_invoke();
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

    pub(super) async fn history(
        &self,
        read: &HistoryRead<'_>,
    ) -> Result<Vec<ChannelPage>, BrokerError> {
        if read.requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.history.prepare_invoke();
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
    pub(super) async fn connect_live(
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
    pub(super) async fn request_marker(&self, replica: &str) -> Result<bool, BrokerError> {
        let mut call = self.scripts.marker.prepare_invoke();
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
    pub(super) async fn put_ticket(
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
    pub(super) async fn take_ticket(&self, digest: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = self.keys.ticket(digest);
        // GETDEL is not retried on another connection unless it surely never ran (a write).
        self.commands
            .with_conn(true, |mut c| {
                let key = &key;
                async move { redis::cmd("GETDEL").arg(key).query_async(&mut c).await }
            })
            .await
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
