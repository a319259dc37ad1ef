//! Replaying history to clients: a short-lived cache of history pages shared by every client of
//! the replica, and the merge of several channels' pages into one `seq` order.
//!
//! After a replica restarts, thousands of clients come back at once, often on the same channels
//! from the same ids. Each page is read from the broker once (concurrent identical reads wait
//! for the one in flight) and rendered once into shared frames, so a reconnect storm costs the
//! broker a few reads instead of one per client and event.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use eventgate_broker::{Broker, BrokerError, Channel, GapReason, StreamFacts, history::assess};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::time::Instant;

use crate::frame::Frame;

/// How long a page stays reusable. Reuse is always exact (see [`HistoryCache::pages`]); this
/// only bounds memory to what a reconnect storm needs.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// Most frames the cache holds at once.
const MAX_CACHED_FRAMES: usize = 200_000;

/// One channel's history after one cursor, as read from the broker.
pub struct Page {
    pub facts: StreamFacts,
    pub recent: bool,
    /// Rendered events after the cursor, in order, up to `upto` and the page size.
    pub frames: Vec<Arc<Frame>>,
    /// The broker position the page was read at: it holds every event up to this.
    pub upto: u64,
    /// The page size limit was reached: more may follow.
    pub full: bool,
}

type Loaded = Result<Arc<Vec<Arc<Page>>>, Arc<BrokerError>>;
type Batch = Shared<BoxFuture<'static, Loaded>>;

#[derive(Clone)]
enum Slot {
    Ready(Arc<Page>, Instant),
    Loading {
        upto: u64,
        batch: Batch,
        index: usize,
    },
}

#[derive(Default)]
struct CacheState {
    slots: HashMap<(Channel, u64), Slot>,
    frames: usize,
}

/// History pages shared by all clients of a replica.
pub struct HistoryCache {
    broker: Broker,
    page: usize,
    state: Arc<Mutex<CacheState>>,
}

enum Plan {
    Hit(Arc<Page>),
    Wait(Batch, usize),
    Miss(usize),
}

impl HistoryCache {
    pub fn new(broker: Broker, page: usize) -> Self {
        Self {
            broker,
            page: page.max(1),
            state: Arc::default(),
        }
    }

    fn lock(state: &Mutex<CacheState>) -> MutexGuard<'_, CacheState> {
        state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For each `(channel, after)`: the page of events after `after`, complete up to `upto`.
    ///
    /// A cached page for the same channel and cursor serves the request when it was read at a
    /// position at or past `upto` (it holds every event the request can ask for), or when it is
    /// full (the caller continues from its last event). Anything else is read from the broker,
    /// all misses of one call in one round trip.
    pub async fn pages(
        &self,
        requests: &[(Channel, u64)],
        upto: u64,
    ) -> Result<Vec<Arc<Page>>, BrokerError> {
        let mut plans = Vec::with_capacity(requests.len());
        let mut loading = None;
        {
            let mut state = Self::lock(&self.state);
            let mut misses = Vec::new();
            for (channel, after) in requests {
                let key = (channel.clone(), *after);
                plans.push(match state.slots.get(&key) {
                    Some(Slot::Ready(page, at))
                        if at.elapsed() < CACHE_TTL && (page.upto >= upto || page.full) =>
                    {
                        Plan::Hit(page.clone())
                    }
                    Some(Slot::Loading {
                        upto: loading,
                        batch,
                        index,
                    }) if *loading >= upto => Plan::Wait(batch.clone(), *index),
                    _ => {
                        misses.push(key);
                        Plan::Miss(misses.len() - 1)
                    }
                });
            }
            if !misses.is_empty() {
                let batch = self.load(misses.clone(), upto);
                for (index, key) in misses.into_iter().enumerate() {
                    let slot = Slot::Loading {
                        upto,
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

    /// Reads `requests` from the broker in one call; the result replaces their slots.
    fn load(&self, requests: Vec<(Channel, u64)>, upto: u64) -> Batch {
        let (broker, page, state) = (self.broker.clone(), self.page, self.state.clone());
        async move {
            let read = broker.history(&requests, upto, page).await;
            let mut cache = Self::lock(&state);
            let pages = match read {
                Ok(pages) => pages,
                Err(e) => {
                    for key in &requests {
                        cache.slots.remove(key);
                    }
                    return Err(Arc::new(e));
                }
            };
            let now = Instant::now();
            let pages: Vec<Arc<Page>> = pages
                .into_iter()
                .map(|p| {
                    let full = p.events.len() >= page;
                    let frames = p
                        .events
                        .into_iter()
                        .filter_map(|event| match Frame::build(event) {
                            Ok(frame) => Some(Arc::new(frame)),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping malformed event in history");
                                None
                            }
                        })
                        .collect();
                    Arc::new(Page {
                        facts: p.facts,
                        recent: p.recent,
                        frames,
                        upto,
                        full,
                    })
                })
                .collect();
            for (key, page) in requests.into_iter().zip(&pages) {
                cache.frames += page.frames.len();
                cache.slots.insert(key, Slot::Ready(page.clone(), now));
            }
            evict(&mut cache);
            Ok(Arc::new(pages))
        }
        .boxed()
        .shared()
    }
}

/// Drops expired pages, then the oldest, until the cache is within [`MAX_CACHED_FRAMES`].
fn evict(cache: &mut CacheState) {
    let mut frames = 0;
    cache.slots.retain(|_, slot| match slot {
        Slot::Ready(_, at) if at.elapsed() >= CACHE_TTL => false,
        Slot::Ready(page, _) => {
            frames += page.frames.len();
            true
        }
        Slot::Loading { .. } => true,
    });
    cache.frames = frames;
    while cache.frames > MAX_CACHED_FRAMES {
        let oldest = cache
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready(page, at) => Some((key.clone(), *at, page.frames.len())),
                Slot::Loading { .. } => None,
            })
            .min_by_key(|(_, at, _)| *at);
        let Some((key, _, size)) = oldest else { break };
        cache.slots.remove(&key);
        cache.frames -= size;
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
enum Lane {
    Open,
    Exhausted,
    Gapped,
}

struct ChannelReplay {
    channel: Channel,
    after: u64,
    buffered: VecDeque<Arc<Frame>>,
    state: Lane,
}

/// Replays history of several channels after one cursor, up to `upto`, merged into global
/// `seq` order. Reads a page per channel at a time and checks completeness on every page, so
/// entries trimmed mid-replay surface as a gap.
pub struct Replay {
    cache: Arc<HistoryCache>,
    upto: u64,
    lanes: Vec<ChannelReplay>,
    gaps: VecDeque<(Channel, GapReason)>,
}

impl Replay {
    pub fn new(
        cache: Arc<HistoryCache>,
        channels: impl IntoIterator<Item = Channel>,
        after: u64,
        upto: u64,
    ) -> Self {
        let lanes = channels
            .into_iter()
            .map(|channel| ChannelReplay {
                channel,
                after,
                buffered: VecDeque::new(),
                state: if after < upto {
                    Lane::Open
                } else {
                    Lane::Exhausted
                },
            })
            .collect();
        Self {
            cache,
            upto,
            lanes,
            gaps: VecDeque::new(),
        }
    }

    /// The next event or gap, or `None` when the replay is done.
    pub async fn next(&mut self) -> Result<Option<ReplayItem>, BrokerError> {
        loop {
            if let Some((channel, reason)) = self.gaps.pop_front() {
                return Ok(Some(ReplayItem::Gap(channel, reason)));
            }
            let starving: Vec<usize> = (0..self.lanes.len())
                .filter(|&i| self.lanes[i].state == Lane::Open && self.lanes[i].buffered.is_empty())
                .collect();
            if !starving.is_empty() {
                self.refill(&starving).await?;
                continue;
            }
            let next = self
                .lanes
                .iter_mut()
                .filter(|lane| !lane.buffered.is_empty())
                .min_by_key(|lane| lane.buffered.front().map(|f| f.seq()));
            return Ok(next
                .and_then(|lane| lane.buffered.pop_front())
                .map(ReplayItem::Frame));
        }
    }

    async fn refill(&mut self, lanes: &[usize]) -> Result<(), BrokerError> {
        let requests: Vec<(Channel, u64)> = lanes
            .iter()
            .map(|&i| (self.lanes[i].channel.clone(), self.lanes[i].after))
            .collect();
        let pages = self.cache.pages(&requests, self.upto).await?;
        for (&i, page) in lanes.iter().zip(pages) {
            let lane = &mut self.lanes[i];
            if let Err(reason) = assess(lane.after, &page.facts, page.recent) {
                lane.state = Lane::Gapped;
                self.gaps.push_back((lane.channel.clone(), reason));
                continue;
            }
            for frame in &page.frames {
                if frame.seq() > lane.after && frame.seq() <= self.upto {
                    lane.after = frame.seq();
                    lane.buffered.push_back(frame.clone());
                }
            }
            let beyond = page.frames.last().is_some_and(|f| f.seq() >= self.upto);
            if !page.full || beyond || lane.after >= self.upto {
                lane.state = Lane::Exhausted;
            }
        }
        Ok(())
    }
}
