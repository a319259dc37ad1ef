//! Replaying history to clients: a short-lived cache of history pages shared by every client of
//! the replica, the merge of several channels' pages into one `seq` order, and the memory
//! budget every replay runs within.
//!
//! After a replica restarts, thousands of clients come back at once, often on the same channels
//! from the same ids. Each page is read from the broker once (concurrent identical reads wait
//! for the one in flight) and rendered once into shared frames, so a reconnect storm costs the
//! broker a few reads instead of one per client and event.
//!
//! Memory is bounded in bytes (docs/resume.md, "Replay memory"): a replay reads one page per
//! channel at a time, sized so all of its channels' pages fit its share
//! (`REPLAY_CONNECTION_BYTES`); replays start only while their shares fit the replica's budget
//! (`REPLAY_MEMORY_BYTES`, three quarters of it), and the cache keeps pages within the last
//! quarter and drops them when they expire.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use eventgate_core::{
    Broker, BrokerError, Channel, GapReason, HistoryRead, Position, StreamFacts, history::assess,
};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{frame::Frame, hub::Stats};

/// How long a page stays reusable. Reuse is always exact (see [`HistoryCache::pages`]); this
/// only bounds memory to what a reconnect storm needs.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// How long a replay waits for room in the replica's budget before its client gets 503.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The memory replays of a replica may hold.
#[derive(Debug, Clone, Copy)]
pub struct ReplayBudget {
    /// Everything replays and the page cache hold at once (`REPLAY_MEMORY_BYTES`).
    pub replica_bytes: usize,
    /// What one replay holds at most, all its channels' pages together
    /// (`REPLAY_CONNECTION_BYTES`), plus at most one event per channel.
    pub connection_bytes: usize,
}

/// One channel's history after one cursor, as read from the broker.
pub struct Page {
    pub facts: StreamFacts,
    pub recent: bool,
    /// Rendered events after the cursor, in order, up to `upto` and the page size.
    pub frames: Vec<Arc<Frame>>,
    /// The broker position the page was read at: it holds every event up to this.
    pub upto: u64,
    /// The epoch of that position.
    pub epoch: u64,
    /// The page stopped at its size: more may follow.
    pub more: bool,
    /// The `seq` of the last entry read (rendered or skipped): the next page starts after it.
    pub through: Option<u64>,
    /// Bytes the frames hold.
    pub bytes: usize,
}

type Loaded = Result<Arc<Vec<Arc<Page>>>, Arc<BrokerError>>;
type Batch = Shared<BoxFuture<'static, Loaded>>;

#[derive(Clone)]
enum Slot {
    Ready(Arc<Page>, Instant),
    Loading {
        upto: u64,
        epoch: u64,
        max_bytes: usize,
        batch: Batch,
        index: usize,
    },
}

#[derive(Default)]
struct CacheState {
    slots: HashMap<(Channel, u64), Slot>,
    /// Bytes of the ready pages held.
    bytes: usize,
}

/// History pages shared by all clients of a replica, and the replay budget.
pub struct HistoryCache {
    broker: Broker,
    page: usize,
    budget: ReplayBudget,
    /// Replays hold a share each (in KiB) while they run.
    shares: Arc<Semaphore>,
    share_kib: u32,
    cache_bytes: usize,
    state: Arc<Mutex<CacheState>>,
    stats: Arc<Stats>,
}

enum Plan {
    Hit(Arc<Page>),
    Wait(Batch, usize),
    Miss(usize),
}

impl HistoryCache {
    pub fn new(broker: Broker, page: usize, budget: ReplayBudget, stats: Arc<Stats>) -> Self {
        let kib = |bytes: usize| u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        let total = kib(budget.replica_bytes / 4 * 3);
        Self {
            broker,
            page: page.max(1),
            budget,
            shares: Arc::new(Semaphore::new(total as usize)),
            share_kib: kib(budget.connection_bytes).min(total),
            cache_bytes: budget.replica_bytes / 4,
            state: Arc::default(),
            stats,
        }
    }

    fn lock(state: &Mutex<CacheState>) -> MutexGuard<'_, CacheState> {
        state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes the cache holds now (tests, stats).
    pub fn cached_bytes(&self) -> usize {
        Self::lock(&self.state).bytes
    }

    /// A replay's share of the budget, waited for up to [`ADMIT_TIMEOUT`].
    async fn admit(&self) -> Result<OwnedSemaphorePermit, BrokerError> {
        let share = self.shares.clone().acquire_many_owned(self.share_kib);
        match tokio::time::timeout(ADMIT_TIMEOUT, share).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BrokerError::Busy(
                "the replica's replay memory (REPLAY_MEMORY_BYTES) is in use",
            )),
        }
    }

    /// For each `(channel, after)`: the page of events after `after`, complete up to `upto`,
    /// within `max_bytes` (or one event).
    ///
    /// A cached page for the same channel and cursor serves the request when it was read in
    /// the same epoch, within the same size, and at a position at or past `upto` (it holds
    /// every event the request can ask for) or it stopped at its size (the caller continues
    /// from its last event). Anything else is read from the broker, all misses of one call in
    /// one round trip.
    pub async fn pages(
        &self,
        shard: usize,
        requests: &[(Channel, u64)],
        position: Position,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Page>>, BrokerError> {
        let (upto, epoch) = (position.seq, position.epoch);
        let mut plans = Vec::with_capacity(requests.len());
        let mut loading = None;
        {
            let mut state = Self::lock(&self.state);
            let mut misses = Vec::new();
            for (channel, after) in requests {
                let key = (channel.clone(), *after);
                plans.push(match state.slots.get(&key) {
                    Some(Slot::Ready(page, at))
                        if at.elapsed() < CACHE_TTL
                            && page.epoch == epoch
                            && (page.upto >= upto || page.more)
                            && (page.bytes <= max_bytes || page.frames.len() <= 1) =>
                    {
                        Plan::Hit(page.clone())
                    }
                    Some(Slot::Loading {
                        upto: loading,
                        epoch: e,
                        max_bytes: m,
                        batch,
                        index,
                    }) if *loading >= upto && *e == epoch && *m <= max_bytes => {
                        Plan::Wait(batch.clone(), *index)
                    }
                    _ => {
                        misses.push(key);
                        Plan::Miss(misses.len() - 1)
                    }
                });
            }
            if !misses.is_empty() {
                let batch = self.load(shard, misses.clone(), position, max_bytes);
                for (index, key) in misses.into_iter().enumerate() {
                    if let Some(Slot::Ready(old, _)) = state.slots.get(&key) {
                        state.bytes -= old.bytes;
                    }
                    let slot = Slot::Loading {
                        upto,
                        epoch,
                        max_bytes,
                        batch: batch.clone(),
                        index,
                    };
                    state.slots.insert(key, slot);
                }
                loading = Some(batch);
            }
        }
        let mut pages = Vec::with_capacity(plans.len());
        for plan in plans {
            let (batch, index) = match plan {
                Plan::Hit(page) => {
                    pages.push(page);
                    continue;
                }
                Plan::Wait(batch, index) => (batch, index),
                Plan::Miss(index) => match &loading {
                    Some(batch) => (batch.clone(), index),
                    None => return Err(BrokerError::Protocol("history read missing".into())),
                },
            };
            let loaded = batch.await.map_err(BrokerError::Shared)?;
            let page = loaded.get(index).cloned();
            pages.push(page.ok_or_else(|| BrokerError::Protocol("history page missing".into()))?);
        }
        Ok(pages)
    }

    /// Reads `requests` (of shard `shard`) from the broker in one call; the result replaces
    /// their slots.
    fn load(
        &self,
        shard: usize,
        requests: Vec<(Channel, u64)>,
        position: Position,
        max_bytes: usize,
    ) -> Batch {
        let (broker, limit, state) = (self.broker.clone(), self.page, self.state.clone());
        let (cache_bytes, stats) = (self.cache_bytes, self.stats.clone());
        async move {
            let read = HistoryRead {
                requests: &requests,
                upto: position.seq,
                limit,
                max_bytes,
                epoch: position.epoch,
            };
            let read = broker.history(shard, &read).await;
            let pages = match read {
                Ok(pages) => pages,
                Err(e) => {
                    let mut cache = Self::lock(&state);
                    for key in &requests {
                        if matches!(cache.slots.get(key), Some(Slot::Loading { .. })) {
                            cache.slots.remove(key);
                        }
                    }
                    return Err(Arc::new(e));
                }
            };
            let mut skipped = 0;
            let pages: Vec<Arc<Page>> = pages
                .into_iter()
                .map(|p| {
                    skipped += p.skipped;
                    let frames: Vec<Arc<Frame>> = p
                        .events
                        .into_iter()
                        .filter_map(|event| match Frame::build(event, shard) {
                            Ok(frame) => Some(Arc::new(frame)),
                            Err(e) => {
                                skipped += 1;
                                tracing::warn!(error = %e, "skipping malformed event in history");
                                None
                            }
                        })
                        .collect();
                    Arc::new(Page {
                        facts: p.facts,
                        recent: p.recent,
                        bytes: frames.iter().map(|f| f.heap_bytes()).sum(),
                        frames,
                        upto: position.seq,
                        epoch: position.epoch,
                        more: p.more,
                        through: p.through,
                    })
                })
                .collect();
            if skipped > 0 {
                Stats::add(&stats.history_entries_skipped, skipped as u64);
            }
            let mut cache = Self::lock(&state);
            let now = Instant::now();
            for (key, page) in requests.into_iter().zip(&pages) {
                cache.bytes += page.bytes;
                if let Some(Slot::Ready(old, _)) =
                    cache.slots.insert(key, Slot::Ready(page.clone(), now))
                {
                    cache.bytes -= old.bytes;
                }
            }
            evict(&mut cache, cache_bytes);
            Ok(Arc::new(pages))
        }
        .boxed()
        .shared()
    }

    /// Drops expired pages (the replica calls this every second, so memory is freed without
    /// waiting for the next read).
    pub fn sweep(&self) {
        evict(&mut Self::lock(&self.state), self.cache_bytes);
    }
}

/// Drops expired pages, then the oldest, until the cache is within `limit` bytes.
fn evict(cache: &mut CacheState, limit: usize) {
    let mut bytes = 0;
    cache.slots.retain(|_, slot| match slot {
        Slot::Ready(_, at) if at.elapsed() >= CACHE_TTL => false,
        Slot::Ready(page, _) => {
            bytes += page.bytes;
            true
        }
        Slot::Loading { .. } => true,
    });
    cache.bytes = bytes;
    if cache.bytes <= limit {
        return;
    }
    let mut ready: Vec<((Channel, u64), Instant, usize)> = cache
        .slots
        .iter()
        .filter_map(|(key, slot)| match slot {
            Slot::Ready(page, at) => Some((key.clone(), *at, page.bytes)),
            Slot::Loading { .. } => None,
        })
        .collect();
    ready.sort_by_key(|(_, at, _)| *at);
    for (key, _, size) in ready {
        if cache.bytes <= limit {
            break;
        }
        cache.slots.remove(&key);
        cache.bytes -= size;
    }
}

/// One step of a replay.
#[derive(Debug, Clone)]
pub enum ReplayItem {
    Frame(Arc<Frame>),
    /// History of this channel is incomplete after the cursor; no more of its history follows.
    Gap(Channel, GapReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneState {
    Open,
    Exhausted,
    Gapped,
}

/// One channel of a replay: its current page, read as the client takes it.
struct Lane {
    channel: Channel,
    /// Where the next page starts.
    after: u64,
    page: Option<Arc<Page>>,
    /// The next frame of `page`.
    next: usize,
    state: LaneState,
}

impl Lane {
    /// The next frame of the current page, within `upto`.
    fn head(&self, upto: u64) -> Option<&Arc<Frame>> {
        let frame = self.page.as_ref()?.frames.get(self.next)?;
        (frame.seq() <= upto).then_some(frame)
    }
}

/// Replays history of several channels of one shard after one cursor, up to a position, merged
/// into the shard's `seq` order. Reads a page per channel at a time and checks completeness on
/// every page, so entries trimmed mid-replay surface as a gap.
pub struct Replay {
    cache: Arc<HistoryCache>,
    shard: usize,
    position: Position,
    lanes: Vec<Lane>,
    gaps: VecDeque<(Channel, GapReason)>,
    /// This replay's share of the replica's budget, held while it runs.
    share: Option<OwnedSemaphorePermit>,
}

impl Replay {
    /// A replay of `channels` (all of shard `shard`) after `after` up to `position` (read in
    /// `position.epoch`).
    pub fn new(
        cache: Arc<HistoryCache>,
        shard: usize,
        channels: impl IntoIterator<Item = Channel>,
        after: u64,
        position: Position,
    ) -> Self {
        let lanes = channels
            .into_iter()
            .map(|channel| Lane {
                channel,
                after,
                page: None,
                next: 0,
                state: if after < position.seq {
                    LaneState::Open
                } else {
                    LaneState::Exhausted
                },
            })
            .collect();
        Self {
            cache,
            shard,
            position,
            lanes,
            gaps: VecDeque::new(),
            share: None,
        }
    }

    /// The shard this replay reads.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The position this replay ends at.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The next event or gap, or `None` when the replay is done.
    pub async fn next(&mut self) -> Result<Option<ReplayItem>, BrokerError> {
        let upto = self.position.seq;
        loop {
            if let Some((channel, reason)) = self.gaps.pop_front() {
                return Ok(Some(ReplayItem::Gap(channel, reason)));
            }
            let starving: Vec<usize> = (0..self.lanes.len())
                .filter(|&i| {
                    let lane = &self.lanes[i];
                    lane.state == LaneState::Open && lane.head(upto).is_none()
                })
                .collect();
            if !starving.is_empty() {
                self.refill(&starving).await?;
                continue;
            }
            let next = self
                .lanes
                .iter_mut()
                .filter(|lane| lane.head(upto).is_some())
                .min_by_key(|lane| lane.head(upto).map(|f| f.seq()));
            let Some(lane) = next else {
                self.share = None;
                return Ok(None);
            };
            let frame = lane.head(upto).cloned();
            lane.next += 1;
            if lane.head(upto).is_none() {
                // Done with this page: its memory goes as soon as nobody else holds it.
                lane.page = None;
            }
            return Ok(frame.map(ReplayItem::Frame));
        }
    }

    async fn refill(&mut self, lanes: &[usize]) -> Result<(), BrokerError> {
        if self.share.is_none() {
            self.share = Some(self.cache.admit().await?);
        }
        let open = self
            .lanes
            .iter()
            .filter(|l| l.state == LaneState::Open)
            .count();
        let max_bytes = (self.cache.budget.connection_bytes / open.max(1)).max(1);
        let requests: Vec<(Channel, u64)> = lanes
            .iter()
            .map(|&i| (self.lanes[i].channel.clone(), self.lanes[i].after))
            .collect();
        let pages = self
            .cache
            .pages(self.shard, &requests, self.position, max_bytes)
            .await?;
        let upto = self.position.seq;
        for (&i, page) in lanes.iter().zip(pages) {
            let lane = &mut self.lanes[i];
            if let Err(reason) = assess(lane.after, &page.facts, page.recent) {
                lane.state = LaneState::Gapped;
                lane.page = None;
                self.gaps.push_back((lane.channel.clone(), reason));
                continue;
            }
            let after = lane.after;
            let through = page.through.unwrap_or(after).min(upto);
            let progressed = through > after;
            lane.next = page.frames.partition_point(|f| f.seq() <= after);
            lane.after = lane.after.max(through);
            if !page.more || lane.after >= upto || !progressed {
                lane.state = LaneState::Exhausted;
            }
            lane.page = Some(page);
            if lane.head(upto).is_none() {
                lane.page = None;
            }
        }
        Ok(())
    }
}
