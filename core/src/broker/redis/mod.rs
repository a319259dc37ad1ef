//! The Redis broker: history in one capped stream per channel, live delivery over pub/sub, and
//! per logical shard one counter, all written inside `publish.lua`, atomically. One server
//! (`REDIS_URL`, or found through Sentinels) holds one shard; `REDIS_SHARDS` spreads
//! `REDIS_SHARD_COUNT` shards over independent servers.

mod commands;
mod commit;
mod live;
mod reply;
mod shard;
mod source;
pub mod tls;

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};

pub use live::{RedisLiveSink, RedisLiveStream};
pub use source::parse_host_port;

pub(crate) use self::shard::Keys;
use self::{
    commands::Commands,
    commit::Committer,
    shard::{RedisShard, Scripts},
};
use super::{Backend, LiveSink, LiveStream, Shards};
use crate::{Accepted, BrokerConfig, BrokerError, ChannelPage, HistoryRead, Outgoing, Position};

/// A script that begins with `lineage.lua`, as every script does.
macro_rules! script {
    ($file:literal) => {
        redis::Script::new(concat!(include_str!("lineage.lua"), include_str!($file)))
    };
}
pub(crate) use script;

/// A broker on Redis 7.0 or newer: one or more logical shards.
pub struct RedisBroker {
    kind: &'static str,
    layout: Shards,
    shards: Vec<RedisShard>,
    /// Follow the primary through the Sentinels (none otherwise); stopped on drop.
    followers: Vec<tokio::task::JoinHandle<()>>,
    timeout: Duration,
}

impl RedisBroker {
    /// Connects to every server, checks each is Redis 7 or newer and that the data was written
    /// with the same shard count.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let sources: Vec<Arc<source::Source>> =
            source::sources(config)?.into_iter().map(Arc::new).collect();
        let count = config.shard_count();
        let layout = Shards::new(count);
        // Connections per server: the pool size is the process's, not each shard's.
        let mut servers = Vec::with_capacity(sources.len());
        for source in &sources {
            let commands = Commands::connect(
                source.clone(),
                config.redis_pool_size as usize,
                config.redis_timeout,
            )
            .await
            .map_err(tls::explained)?;
            servers.push(Arc::new(commands));
        }
        let followers = sources
            .iter()
            .zip(&servers)
            .filter(|(source, _)| source.follows_failovers())
            .map(|(_, commands)| tokio::spawn(commands.clone().follow_primary()))
            .collect();
        let scripts = Arc::new(Scripts::new());
        let shards = (0..count)
            .map(|i| {
                let server = i % servers.len();
                let tag = (config.uses_shards()).then(|| layout.tag(i));
                let keys = Keys::new(&config.redis_key_prefix, tag.as_deref());
                RedisShard {
                    commit: Committer::start(servers[server].clone(), keys.clone(), config.clone()),
                    keys,
                    commands: servers[server].clone(),
                    source: sources[server].clone(),
                    scripts: scripts.clone(),
                    config: config.clone(),
                }
            })
            .collect::<Vec<_>>();
        let broker = Self {
            kind: if config.uses_shards() {
                "redis-shards"
            } else {
                "redis"
            },
            layout,
            shards,
            followers,
            timeout: config.redis_timeout,
        };
        for server in 0..servers.len() {
            let shard = &broker.shards[server];
            shard.check_version().await.map_err(tls::explained)?;
            shard.load_scripts().await.map_err(tls::explained)?;
            shard
                .check_shard_count(count)
                .await
                .map_err(tls::explained)?;
        }
        Ok(broker)
    }

    fn shard(&self, shard: usize) -> &RedisShard {
        &self.shards[shard.min(self.shards.len() - 1)]
    }

    /// The shard that keeps a ticket: spread by its digest.
    fn ticket_shard(&self, digest: &str) -> &RedisShard {
        let hash = digest
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.shards[hash % self.shards.len()]
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for follower in &self.followers {
            follower.abort();
        }
    }
}

impl Backend for RedisBroker {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn shards(&self) -> &Shards {
        &self.layout
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn ping(&self, shard: usize) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.shard(shard).ping().boxed()
    }

    fn publish<'a>(
        &'a self,
        shard: usize,
        entries: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<Accepted>, BrokerError>> {
        self.shard(shard).publish(entries).boxed()
    }

    fn position(&self, shard: usize) -> BoxFuture<'_, Result<Position, BrokerError>> {
        self.shard(shard).position().boxed()
    }

    fn history<'a>(
        &'a self,
        shard: usize,
        read: &'a HistoryRead<'a>,
    ) -> BoxFuture<'a, Result<Vec<ChannelPage>, BrokerError>> {
        self.shard(shard).history(read).boxed()
    }

    fn connect_live<'a>(
        &'a self,
        shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<(LiveSink, LiveStream), BrokerError>> {
        async move {
            let (sink, stream) = self.shard(shard).connect_live(replica).await?;
            let live: (LiveSink, LiveStream) = (LiveSink(Arc::new(sink)), Box::pin(stream));
            Ok(live)
        }
        .boxed()
    }

    fn request_marker<'a>(
        &'a self,
        shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.shard(shard).request_marker(replica).boxed()
    }

    fn put_ticket<'a>(
        &'a self,
        digest: &'a str,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        self.ticket_shard(digest)
            .put_ticket(digest, payload, ttl)
            .boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>> {
        self.ticket_shard(digest).take_ticket(digest).boxed()
    }
}
