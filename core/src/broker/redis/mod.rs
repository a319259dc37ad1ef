//! The Redis broker: history in one capped stream per channel, live delivery over pub/sub, and
//! per logical shard one counter, all written inside `publish.lua`, atomically. One server
//! (`REDIS_URL`, or found through Sentinels) holds one shard; `REDIS_SHARDS` spreads
//! `REDIS_SHARD_COUNT` shards over independent servers, `REDIS_CLUSTER` over the slots of a
//! Redis Cluster (`cluster`).

mod cluster;
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

/// A script's text: `lineage.lua`, as every script begins, then the script.
macro_rules! script {
    ($file:literal) => {
        concat!(include_str!("lineage.lua"), include_str!($file))
    };
}
pub(crate) use script;

/// The script for the deployment: on a Redis Cluster, live messages go with `SPUBLISH` (only to
/// the nodes of their slot; `PUBLISH` is copied to every node of the cluster).
pub(crate) fn sharded(text: &str, sharded: bool) -> redis::Script {
    if sharded {
        redis::Script::new(&text.replace("'PUBLISH'", "'SPUBLISH'"))
    } else {
        redis::Script::new(text)
    }
}

/// A broker on Redis 7.0 or newer: one or more logical shards.
pub struct RedisBroker {
    kind: &'static str,
    layout: Shards,
    shards: Vec<RedisShard>,
    /// Sharded pub/sub, on a Redis Cluster.
    pubsub: Option<cluster::ClusterPubSub>,
    /// Follow the primary through the Sentinels (none otherwise); stopped on drop.
    followers: Vec<tokio::task::JoinHandle<()>>,
    timeout: Duration,
}

impl RedisBroker {
    /// Connects to every server, checks each is Redis 7 or newer and that the data was written
    /// with the same shard count.
    pub async fn connect(config: &BrokerConfig) -> Result<Self, BrokerError> {
        if !config.redis_cluster.is_empty() {
            return Self::connect_cluster(config).await;
        }
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
        let scripts = Arc::new(Scripts::new(false));
        let shards = (0..count)
            .map(|i| {
                let server = i % servers.len();
                let tag = (config.uses_shards()).then(|| layout.tag(i));
                let keys = Keys::new(&config.redis_key_prefix, tag.as_deref());
                RedisShard {
                    commit: Committer::start(
                        servers[server].clone(),
                        keys.clone(),
                        config.clone(),
                        false,
                    ),
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
            pubsub: None,
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

    /// Shards on a Redis Cluster: each one's keys in one slot (its hash tag), its commands on
    /// the node serving that slot, its live messages through sharded pub/sub.
    async fn connect_cluster(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let certificates = tls::certificates(config).map_err(BrokerError::Config)?;
        if config.redis_tls_enabled() {
            tls::install_crypto();
        }
        let seeds = config
            .redis_cluster
            .iter()
            .map(|url| source::client(url, certificates.clone(), config))
            .collect::<Result<Vec<_>, _>>()?;
        let map = Arc::new(cluster::ClusterMap::new(seeds));
        let count = config.shard_count();
        let layout = Shards::new(count);
        let scripts = Arc::new(Scripts::new(true));
        // The process's connections are shared out: a shard's own traffic is a fraction.
        let per_shard = (config.redis_pool_size as usize / count).max(1);
        let mut shards = Vec::with_capacity(count);
        let mut followers = Vec::with_capacity(count);
        for i in 0..count {
            let tag = layout.tag(i);
            let slot = super::shards::key_slot(tag.as_bytes());
            let source = Arc::new(source::Source::ClusterSlot {
                map: map.clone(),
                slot,
            });
            let commands = Arc::new(
                Commands::connect(source.clone(), per_shard, config.redis_timeout)
                    .await
                    .map_err(tls::explained)?,
            );
            followers.push(tokio::spawn(commands.clone().follow_primary()));
            let keys = Keys::new(&config.redis_key_prefix, Some(&tag));
            shards.push(RedisShard {
                commit: Committer::start(commands.clone(), keys.clone(), config.clone(), true),
                keys,
                commands,
                source,
                scripts: scripts.clone(),
                config: config.clone(),
            });
        }
        let pubsub =
            cluster::ClusterPubSub::new(cluster::builder(&config.redis_cluster, certificates)?)?;
        let broker = Self {
            kind: "redis-cluster",
            layout,
            shards,
            pubsub: Some(pubsub),
            followers,
            timeout: config.redis_timeout,
        };
        for shard in &broker.shards {
            shard.load_scripts().await.map_err(tls::explained)?;
        }
        broker.shards[0]
            .check_version()
            .await
            .map_err(tls::explained)?;
        // The count's key is in a slot of its own: asked on the node serving it.
        let key = format!("{}shards", config.redis_key_prefix);
        let node = map
            .primary(
                super::shards::key_slot(key.as_bytes()),
                false,
                config.redis_timeout,
            )
            .await?;
        let check = async {
            let mut conn = node.get_multiplexed_async_connection().await?;
            shard::shard_count_command(&config.redis_key_prefix, count)
                .query_async::<Option<String>>(&mut conn)
                .await
        };
        let recorded = tokio::time::timeout(config.redis_timeout, check)
            .await
            .map_err(|_| BrokerError::Timeout(config.redis_timeout))?
            .map_err(|e| tls::explained(e.into()))?;
        shard::judge_shard_count(recorded, count)?;
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
            let part = self.shard(shard);
            if let Some(pubsub) = &self.pubsub {
                let marker = part.keys.marker(replica);
                let (sink, stream) = pubsub
                    .connect(shard, part.keys.clone(), marker, self.timeout)
                    .await?;
                let live: (LiveSink, LiveStream) = (LiveSink(Arc::new(sink)), Box::pin(stream));
                return Ok(live);
            }
            let (sink, stream) = part.connect_live(replica).await?;
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
