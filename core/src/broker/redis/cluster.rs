//! Redis Cluster: which node serves each shard's slot, and sharded pub/sub.
//!
//! Commands go through each shard's own connections to the node that serves its slot (found
//! with `CLUSTER SLOTS`, asked again after `MOVED`, a lost node, or every second), so they keep
//! the retry rules of every other Redis connection here (a write is retried only when it
//! certainly did not run). Live messages use sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`: a
//! message reaches only the nodes of its slot, where plain `PUBLISH` is copied to every node)
//! over the redis crate's cluster client, which holds one connection per node and is used for
//! subscriptions only: an unsolicited `sunsubscribe` (its slot moved) can then never be taken
//! for the answer to a command. Such a `sunsubscribe`, or a lost connection, ends the shard's
//! live stream; the gateway resubscribes and backfills from history.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, Stream, future::BoxFuture};
use redis::{
    ConnectionAddr, IntoConnectionInfo, Msg, ProtocolVersion, PushInfo, PushKind, Value,
    aio::{AsyncPushSender, SendError},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};
use tokio::{sync::mpsc, time::Instant};

use super::{Keys, live::decode, reply};
use crate::{BrokerError, Channel, LiveControl, LiveMessage};

/// Least time between two `CLUSTER SLOTS` reads.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// Where the slots are: the primary serving each slot range.
pub(crate) struct ClusterMap {
    /// Clients of the seed nodes; node clients copy their credentials and TLS.
    seeds: Vec<redis::Client>,
    /// `(first slot, last slot, host, port)` of every range.
    slots: Mutex<Vec<(u16, u16, String, u16)>>,
    /// When the map was last read; one read at a time.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
}

impl ClusterMap {
    pub(crate) fn new(seeds: Vec<redis::Client>) -> Self {
        Self {
            seeds,
            slots: Mutex::new(Vec::new()),
            refreshed: tokio::sync::Mutex::new(None),
        }
    }

    /// A client of the primary serving `slot`; `fresh`: read the map from the cluster first
    /// (at most every [`REFRESH_INTERVAL`]).
    pub(crate) async fn primary(
        &self,
        slot: u16,
        fresh: bool,
        timeout: Duration,
    ) -> Result<redis::Client, BrokerError> {
        if fresh || self.node_of(slot).is_none() {
            self.refresh(timeout).await?;
        }
        let (host, port) = self.node_of(slot).ok_or_else(|| {
            BrokerError::Protocol(format!("no node of the Redis Cluster serves slot {slot}"))
        })?;
        self.client_for(&host, port)
    }

    fn node_of(&self, slot: u16) -> Option<(String, u16)> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .find(|(first, last, _, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, host, port)| (host.clone(), *port))
    }

    /// A client of node `host:port`, with the seeds' credentials and TLS.
    fn client_for(&self, host: &str, port: u16) -> Result<redis::Client, BrokerError> {
        let seed = self
            .seeds
            .first()
            .ok_or_else(|| BrokerError::Config("REDIS_CLUSTER names no seed node".into()))?;
        let info = seed.get_connection_info().clone();
        let addr = match info.addr().clone() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        Ok(redis::Client::open(info.set_addr(addr))?)
    }

    /// Reads `CLUSTER SLOTS` from a seed or a known node, unless that was done less than
    /// [`REFRESH_INTERVAL`] ago (every shard's connections ask; one read serves them all).
    async fn refresh(&self, timeout: Duration) -> Result<(), BrokerError> {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFRESH_INTERVAL) {
            return Ok(());
        }
        let known: Vec<redis::Client> = {
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots
                .iter()
                .filter_map(|(_, _, host, port)| self.client_for(host, *port).ok())
                .collect()
        };
        let mut error = None;
        for client in self.seeds.iter().chain(&known) {
            let read = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
            };
            match tokio::time::timeout(timeout, read).await {
                Ok(Ok(reply)) => match parse_slots(reply) {
                    Ok(slots) if !slots.is_empty() => {
                        *self.slots.lock().unwrap_or_else(PoisonError::into_inner) = slots;
                        *last = Some(Instant::now());
                        return Ok(());
                    }
                    Ok(_) => error = Some(BrokerError::Protocol("no slot is served".into())),
                    Err(e) => error = Some(e),
                },
                Ok(Err(e)) => error = Some(e.into()),
                Err(_) => error = Some(BrokerError::Timeout(timeout)),
            }
        }
        *last = Some(Instant::now());
        Err(error.unwrap_or_else(|| BrokerError::Config("REDIS_CLUSTER names no node".into())))
    }
}

/// `CLUSTER SLOTS`: `[first, last, [host, port, id, ...], replicas...]` per range.
fn parse_slots(reply: Value) -> Result<Vec<(u16, u16, String, u16)>, BrokerError> {
    let mut out = Vec::new();
    for range in reply::array(reply)? {
        let mut fields = reply::array(range)?.into_iter();
        let first = reply::int(fields.next())? as u16;
        let last = reply::int(fields.next())? as u16;
        let mut primary = reply::array(fields.next().unwrap_or(Value::Nil))?.into_iter();
        let host = reply::text(primary.next())?;
        let port = reply::int(primary.next())? as u16;
        out.push((first, last, host, port));
    }
    Ok(out)
}

/// Sharded pub/sub for every shard of a process: one cluster client, its messages handed to
/// each shard's current live stream.
pub(crate) struct ClusterPubSub {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
    routes: Arc<Routes>,
}

/// Each shard's current live stream, and the shard channels it wants.
#[derive(Default)]
struct Routes(Mutex<HashMap<usize, Route>>);

struct Route {
    tx: mpsc::UnboundedSender<Msg>,
    wanted: HashSet<String>,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Route>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shard a channel name belongs to, from its hash tag (`…{eg3.17}…`).
fn shard_in(name: &str) -> Option<usize> {
    let tag = &name[name.find("{eg")? + 3..];
    tag[..tag.find('.')?].parse().ok()
}

impl AsyncPushSender for Routes {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::SMessage => {
                if let Some(msg) = Msg::from_push_info(info) {
                    let shard = shard_in(msg.get_channel_name());
                    let mut routes = self.lock();
                    if let Some(route) = shard.and_then(|s| routes.get_mut(&s))
                        && route.tx.send(msg).is_err()
                        && let Some(shard) = shard
                    {
                        routes.remove(&shard);
                    }
                }
            }
            // Its slot moved, or the server dropped it: the stream may have a gap.
            PushKind::SUnsubscribe => {
                let name = info
                    .data
                    .first()
                    .and_then(|v| reply::text(Some(v.clone())).ok())
                    .unwrap_or_default();
                let mut routes = self.lock();
                if let Some(shard) = shard_in(&name)
                    && routes.get(&shard).is_some_and(|r| r.wanted.contains(&name))
                {
                    tracing::info!(shard, "a shard channel was unsubscribed by the cluster");
                    routes.remove(&shard);
                }
            }
            PushKind::Disconnection => self.lock().clear(),
            _ => {}
        }
        Ok(())
    }
}

impl ClusterPubSub {
    pub(crate) fn new(builder: ClusterClientBuilder) -> Result<Self, BrokerError> {
        let routes = Arc::new(Routes::default());
        let client = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(PushRoutes(routes.clone()))
            .build()?;
        Ok(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            routes,
        })
    }

    /// The cluster connection, made on first use.
    async fn connection(&self, timeout: Duration) -> Result<ClusterConnection, BrokerError> {
        let mut connection = self.connection.lock().await;
        if let Some(connection) = connection.as_ref() {
            return Ok(connection.clone());
        }
        let made = tokio::time::timeout(timeout, self.client.get_async_connection())
            .await
            .map_err(|_| BrokerError::Timeout(timeout))??;
        *connection = Some(made.clone());
        Ok(made)
    }

    /// A new live stream for shard `shard` (ending the previous one), subscribed to `marker`.
    pub(crate) async fn connect(
        &self,
        shard: usize,
        keys: Keys,
        marker: String,
        timeout: Duration,
    ) -> Result<(ClusterLiveSink, ClusterLiveStream), BrokerError> {
        let connection = self.connection(timeout).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().insert(
            shard,
            Route {
                tx,
                wanted: HashSet::new(),
            },
        );
        let live_prefix = keys.live.clone();
        let sink = ClusterLiveSink {
            connection,
            routes: self.routes.clone(),
            shard,
            keys: Arc::new(keys),
            timeout,
        };
        sink.command(true, vec![marker.clone()]).await?;
        Ok((
            sink,
            ClusterLiveStream {
                rx,
                live_prefix,
                marker,
            },
        ))
    }
}

/// The cluster client takes its push sender by value: a handle on the shared routes.
struct PushRoutes(Arc<Routes>);

impl AsyncPushSender for PushRoutes {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        self.0.send(info)
    }
}

/// Subscribes and unsubscribes one shard's channels with `SSUBSCRIBE`/`SUNSUBSCRIBE`.
pub struct ClusterLiveSink {
    connection: ClusterConnection,
    routes: Arc<Routes>,
    shard: usize,
    keys: Arc<Keys>,
    timeout: Duration,
}

impl ClusterLiveSink {
    async fn command(&self, subscribe: bool, names: Vec<String>) -> Result<(), BrokerError> {
        if names.is_empty() {
            return Ok(());
        }
        {
            // Wanted before subscribing, unwanted before unsubscribing: a `sunsubscribe` for a
            // wanted channel is always the cluster's doing.
            let mut routes = self.routes.lock();
            let Some(route) = routes.get_mut(&self.shard) else {
                return Err(BrokerError::Closed);
            };
            for name in &names {
                if subscribe {
                    route.wanted.insert(name.clone());
                } else {
                    route.wanted.remove(name);
                }
            }
        }
        let mut connection = self.connection.clone();
        let work = async {
            if subscribe {
                connection.ssubscribe(names).await
            } else {
                connection.sunsubscribe(names).await
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| BrokerError::Timeout(self.timeout))?
            .map_err(BrokerError::from)
    }
}

impl LiveControl for ClusterLiveSink {
    fn subscribe<'a>(&'a self, channels: &'a [Channel]) -> BoxFuture<'a, Result<(), BrokerError>> {
        let names = channels.iter().map(|c| self.keys.live(c)).collect();
        self.command(true, names).boxed()
    }

    fn unsubscribe<'a>(
        &'a self,
        channels: &'a [Channel],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let names = channels.iter().map(|c| self.keys.live(c)).collect();
        self.command(false, names).boxed()
    }
}

/// One shard's messages, in the order its node sent them; ends when the subscription may have
/// a gap.
pub struct ClusterLiveStream {
    rx: mpsc::UnboundedReceiver<Msg>,
    live_prefix: String,
    marker: String,
}

impl Stream for ClusterLiveStream {
    type Item = LiveMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveMessage>> {
        let this = &mut *self;
        this.rx
            .poll_recv(cx)
            .map(|msg| msg.map(|msg| decode(&msg, &this.live_prefix, &this.marker)))
    }
}

/// The seed URLs as the cluster client's builder, with credentials and TLS.
pub(crate) fn builder(
    seeds: &[String],
    certificates: Option<redis::TlsCertificates>,
) -> Result<ClusterClientBuilder, BrokerError> {
    let infos = seeds
        .iter()
        .map(|s| s.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = ClusterClientBuilder::new(infos)
        .retries(2)
        .tcp_settings(super::source::tcp_settings());
    if let Some(certificates) = certificates {
        builder = builder.certs(certificates);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_read_from_hash_tags() {
        assert_eq!(shard_in("eventgate:{eg3.17}:live:orders"), Some(3));
        assert_eq!(shard_in("eventgate:{eg12.0}:marker:gw-1"), Some(12));
        assert_eq!(shard_in("eventgate:live:orders"), None);
    }
}
