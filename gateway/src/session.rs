//! A client's registration in the hub, and attaching channels to it, the same way for every
//! transport.
//!
//! The order is what makes resume exact (docs/resume.md): join the channels in the hub first, so
//! live events start queueing; make sure they are subscribed on the live connection; only then
//! read the broker's position G. Every event up to G is in history, every event after G arrives
//! live, and the client's writer drops live events at or below what it already sent.

use std::sync::{Arc, atomic::AtomicU64};

use eventgate_core::{BrokerError, Channel, Cursor, Position};

use crate::{
    GatewayState,
    error::ApiError,
    hub::{ClientQueue, Hub, Stats},
    limits::Slot,
    replay::{Replay, ReplayItem},
};

/// The transport of a session, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    WebSocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "websocket",
        }
    }

    fn connect_counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Transport::Sse => &stats.connects_sse,
            Transport::WebSocket => &stats.connects_ws,
        }
    }

    fn open_counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Transport::Sse => &stats.connections_sse,
            Transport::WebSocket => &stats.connections_ws,
        }
    }
}

/// A client registered in the hub; dropping it unregisters the client.
pub struct Session {
    pub client: u64,
    pub queue: Arc<ClientQueue>,
    pub transport: Transport,
    hub: Arc<Hub>,
    /// The client's place under the connection caps, given back with the session.
    _slot: Slot,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.unregister(self.client);
        let counter = self.transport.open_counter(&self.hub.stats);
        counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How one shard's channels of an attached set start.
pub enum Start {
    /// No cursor: from the current position.
    Fresh,
    /// The cursor is not a position of this broker: reset the channels, start fresh.
    Unknown,
    /// Replay history after the cursor; `first` is the replay's first item, read before
    /// anything is sent so a broker failure is still a clean error. `reset`: the client's
    /// cursor is from before the counter's epoch (Redis lost data or failed over since), so
    /// the channels are reset and `cursor` is the epoch's start: what the old epoch may have
    /// lost is skipped, everything the new one holds is replayed.
    Resume {
        cursor: u64,
        replay: Box<Replay>,
        first: Option<ReplayItem>,
        reset: bool,
    },
}

/// One shard's part of an attached channel set.
pub struct ShardStart {
    pub shard: usize,
    /// The shard's position once the channels were live; a replay ends there.
    pub position: u64,
    pub start: Start,
    /// The set's channels on this shard.
    pub channels: Vec<Channel>,
}

/// Channels attached to a session, shard by shard, in shard order.
pub struct Attached {
    pub shards: Vec<ShardStart>,
}

impl GatewayState {
    /// Registers a new client.
    pub fn new_session(&self, transport: Transport, slot: Slot) -> Result<Session, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        let (client, queue) = self.hub.register();
        Stats::add(transport.open_counter(&self.stats), 1);
        Stats::add(&self.stats.connections_total, 1);
        Stats::add(transport.connect_counter(&self.stats), 1);
        Ok(Session {
            client,
            queue,
            transport,
            hub: self.hub.clone(),
            _slot: slot,
        })
    }

    /// Adds `channels` to `session` and prepares their start from `cursor`. On error the
    /// channels are removed again.
    pub async fn attach(
        &self,
        session: &Session,
        channels: &[Channel],
        cursor: Option<&Cursor>,
    ) -> Result<Attached, ApiError> {
        if !self.hub.join(session.client, channels) {
            return Err(ApiError::Gone);
        }
        let attached = self.start(channels, cursor).await;
        if attached.is_err() {
            self.hub.leave(session.client, channels);
        }
        attached
    }

    async fn start(
        &self,
        channels: &[Channel],
        cursor: Option<&Cursor>,
    ) -> Result<Attached, ApiError> {
        self.live
            .ensure(channels.to_vec(), self.broker_timeout)
            .await
            .map_err(|_| ApiError::Unavailable(None))?;
        let shards = self.broker.shards();
        let mut groups: Vec<(usize, Vec<Channel>)> = Vec::new();
        for channel in channels {
            let shard = shards.shard_of(channel);
            match groups.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, group)) => group.push(channel.clone()),
                None => groups.push((shard, vec![channel.clone()])),
            }
        }
        groups.sort_by_key(|(s, _)| *s);
        let single = groups.len() == 1;
        let mut starts = Vec::with_capacity(groups.len());
        for (shard, group) in groups {
            // Where this shard resumes: a plain id belongs to a connection on one shard only;
            // a shard missing from a composite id was not part of the connection (its
            // channels start fresh).
            let from = match cursor {
                None => StartFrom::Fresh,
                Some(Cursor::Plain(seq)) if single => StartFrom::Cursor(*seq),
                Some(Cursor::Plain(_)) => StartFrom::Unknown,
                Some(Cursor::Shards { positions, .. }) => positions
                    .iter()
                    .find(|(s, _)| *s == shard)
                    .map_or(StartFrom::Fresh, |&(_, seq)| StartFrom::Cursor(seq)),
            };
            starts.push(self.start_shard(shard, group, from).await?);
        }
        Ok(Attached { shards: starts })
    }

    /// Starts one shard's channels. A new epoch between reading the position and the history
    /// (Redis lost data, or failed over, just then) invalidates the position: read it again.
    async fn start_shard(
        &self,
        shard: usize,
        channels: Vec<Channel>,
        from: StartFrom,
    ) -> Result<ShardStart, ApiError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.start_at(shard, &channels, from).await {
                Err(StartError::Broker(BrokerError::EpochChanged)) if attempts < 3 => continue,
                Err(StartError::Broker(e)) => return Err(e.into()),
                Err(StartError::Api(e)) => return Err(e),
                Ok((position, start)) => {
                    return Ok(ShardStart {
                        shard,
                        position,
                        start,
                        channels,
                    });
                }
            }
        }
    }

    async fn start_at(
        &self,
        shard: usize,
        channels: &[Channel],
        from: StartFrom,
    ) -> Result<(u64, Start), StartError> {
        let now = self.positions[shard].read().await?;
        let start = match from {
            StartFrom::Fresh => Start::Fresh,
            StartFrom::Unknown => Start::Unknown,
            // Ahead of the counter (another deployment, a Redis that lost data and has not
            // caught up): nothing can be said about what it missed.
            StartFrom::Cursor(cursor) if cursor > now.seq => Start::Unknown,
            StartFrom::Cursor(cursor) => {
                // From before the counter's epoch began (a Redis that lost data or failed over,
                // another deployment): what it missed of the old epoch is unknown, but the new
                // epoch's events are all there.
                let reset = cursor < now.epoch;
                let cursor = cursor.max(now.epoch);
                // The rest of the replay is read as the client takes it; this covers its start.
                let span = tracing::debug_span!("replay", shard, channels = channels.len(), cursor);
                let mut replay = Replay::new(
                    self.history.clone(),
                    shard,
                    channels.iter().cloned(),
                    cursor,
                    now,
                );
                let first = tracing::Instrument::instrument(replay.next(), span)
                    .await
                    .map_err(StartError::Broker)?;
                Start::Resume {
                    cursor,
                    replay: Box::new(replay),
                    first,
                    reset,
                }
            }
        };
        Ok((now.seq, start))
    }
}

/// Where one shard of a channel set starts from.
#[derive(Clone, Copy)]
enum StartFrom {
    Fresh,
    Unknown,
    Cursor(u64),
}

/// Why starting failed.
enum StartError {
    Api(ApiError),
    Broker(BrokerError),
}

impl From<ApiError> for StartError {
    fn from(e: ApiError) -> Self {
        StartError::Api(e)
    }
}

/// Position reads shared by the clients that start at about the same time. A client may use
/// any read that *began* after its channels went live, so arrivals join the next read that has
/// not begun yet; one read is in flight at a time. A storm of resuming clients then costs
/// Redis a handful of reads instead of one per client.
pub struct PositionReads {
    broker: eventgate_core::Broker,
    shard: usize,
    rounds: Arc<std::sync::Mutex<Rounds>>,
}

type Round = futures::future::Shared<
    futures::future::BoxFuture<'static, Result<Position, Arc<eventgate_core::BrokerError>>>,
>;

#[derive(Default)]
struct Rounds {
    /// The read new arrivals join: it has not begun.
    open: Option<(u64, Round)>,
    /// The read begun last (or about to be); the next one starts after it.
    latest: Option<Round>,
    next_id: u64,
}

impl PositionReads {
    /// Reads of shard `shard`'s position.
    pub fn new(broker: eventgate_core::Broker, shard: usize) -> Self {
        Self {
            broker,
            shard,
            rounds: Arc::default(),
        }
    }

    /// The broker's position, read after this call began.
    pub async fn read(&self) -> Result<Position, ApiError> {
        let round = {
            let mut rounds = lock(&self.rounds);
            match &rounds.open {
                Some((_, round)) => round.clone(),
                None => {
                    let id = rounds.next_id;
                    rounds.next_id += 1;
                    let previous = rounds.latest.take();
                    let (broker, all) = (self.broker.clone(), self.rounds.clone());
                    let shard = self.shard;
                    let round: Round = futures::FutureExt::shared(Box::pin(async move {
                        if let Some(previous) = previous {
                            let _ = previous.await;
                        }
                        // Closed before reading: whoever arrives from now on needs a later read.
                        {
                            let mut rounds = lock(&all);
                            if rounds.open.as_ref().is_some_and(|(open, _)| *open == id) {
                                rounds.open = None;
                            }
                        }
                        broker.position(shard).await.map_err(|e| {
                            tracing::warn!(error = %e, "reading the broker position failed");
                            Arc::new(e)
                        })
                    })
                        as futures::future::BoxFuture<'static, _>);
                    rounds.open = Some((id, round.clone()));
                    rounds.latest = Some(round.clone());
                    round
                }
            }
        };
        round.await.map_err(|_| ApiError::Unavailable(None))
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
