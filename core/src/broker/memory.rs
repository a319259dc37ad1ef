//! The in-memory broker: standalone mode's Redis, with the same contract (one counter, capped
//! and expiring per-channel history, live delivery in counter order).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, Stream, future::BoxFuture};
use tokio::{sync::mpsc, time::Instant};

use super::{Backend, LiveControl, LiveSink, LiveStream, Shards};
use crate::{
    Accepted, BrokerConfig, BrokerError, Channel, ChannelPage, Event, HistoryRead, LiveMessage,
    Outgoing, Position, Removed, StreamFacts, config::CLOCK_KEEP,
};

/// An in-process broker, one shard, shared through an `Arc`.
pub struct MemoryBroker {
    /// Itself, for the live connections it hands out.
    me: Weak<MemoryBroker>,
    state: Mutex<State>,
    tickets: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    max_len: usize,
    ttl: Duration,
    idempotency_ttl: Duration,
    bucket: Duration,
    timeout: Duration,
}

struct State {
    seq: u64,
    epoch: u64,
    channels: HashMap<Channel, Log>,
    /// `(seq, at)`: every seq from `seq` on was handed out at or after `at`.
    clock: VecDeque<(u64, Instant)>,
    live: HashMap<u64, LiveConn>,
    next_conn: u64,
    next_sweep: Instant,
    /// Idempotency key → the seq of its first publish, and until when it is remembered.
    idempotency: HashMap<String, (u64, Instant)>,
}

struct Log {
    entries: VecDeque<Event>,
    /// Highest seq trimmed away, 0 when none.
    removed_upto: u64,
    expires_at: Instant,
}

struct LiveConn {
    replica: String,
    channels: HashSet<Channel>,
    tx: mpsc::UnboundedSender<LiveMessage>,
}

impl MemoryBroker {
    pub fn new(config: &BrokerConfig) -> Arc<Self> {
        // Seeded from the wall clock like the Redis counter, so a cursor from a previous run is
        // never mistaken for a position in this one.
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let seed = millis * 1000;
        let now = Instant::now();
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            state: Mutex::new(State {
                seq: seed,
                epoch: seed,
                channels: HashMap::new(),
                clock: VecDeque::from([(seed + 1, now)]),
                live: HashMap::new(),
                next_conn: 0,
                next_sweep: now,
                idempotency: HashMap::new(),
            }),
            tickets: Mutex::new(HashMap::new()),
            max_len: usize::try_from(config.history_max_len)
                .unwrap_or(usize::MAX)
                .max(1),
            ttl: config.history_ttl,
            idempotency_ttl: config.idempotency_ttl,
            bucket: Duration::from_secs(config.clock_bucket_secs()),
            timeout: config.redis_timeout,
        })
    }

    /// The operation timeout callers use for waits that involve this broker.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Stores a one-time ticket under its digest until `ttl` passes; `false` if taken.
    pub fn put_ticket(&self, digest: &str, payload: &[u8], ttl: Duration) -> bool {
        let now = Instant::now();
        let mut tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        // Expired tickets are dropped whenever the map doubles, so it stays bounded by the
        // tickets issued within one TTL.
        if tickets.len() >= 1024 && tickets.len().is_power_of_two() {
            tickets.retain(|_, (_, until)| *until > now);
        }
        if tickets.get(digest).is_some_and(|(_, until)| *until > now) {
            return false;
        }
        tickets.insert(digest.to_owned(), (payload.to_vec(), now + ttl));
        true
    }

    /// Takes a ticket: its payload if it exists and has not expired; it is gone either way.
    pub fn take_ticket(&self, digest: &str) -> Option<Vec<u8>> {
        let mut tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        let (payload, until) = tickets.remove(digest)?;
        (until > Instant::now()).then_some(payload)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn publish(&self, entries: &[Outgoing]) -> Vec<Accepted> {
        let mut state = self.lock();
        let now = Instant::now();
        self.sweep(&mut state, now);
        let next = state.seq + 1;
        if state
            .clock
            .back()
            .is_none_or(|&(_, at)| at + self.bucket <= now)
        {
            state.clock.push_back((next, now));
            while state.clock.len() as u64 > CLOCK_KEEP {
                state.clock.pop_front();
            }
        }
        let mut seqs = Vec::with_capacity(entries.len());
        for entry in entries {
            state.seq += 1;
            if let Some(key) = &entry.idempotency_key {
                match state.idempotency.get(key) {
                    Some(&(first, until)) if until > now => {
                        seqs.push(Accepted {
                            seq: first,
                            replayed: true,
                        });
                        continue;
                    }
                    _ => {
                        let seq = state.seq;
                        state
                            .idempotency
                            .insert(key.clone(), (seq, now + self.idempotency_ttl));
                    }
                }
            }
            let event = Event {
                seq: state.seq,
                channel: entry.channel.clone(),
                body: entry.body.clone(),
            };
            let log = state
                .channels
                .entry(entry.channel.clone())
                .or_insert_with(|| Log::new(now));
            if log.expires_at <= now {
                *log = Log::new(now);
            }
            log.entries.push_back(event.clone());
            if log.entries.len() > self.max_len
                && let Some(old) = log.entries.pop_front()
            {
                log.removed_upto = old.seq;
            }
            log.expires_at = now + self.ttl;
            for conn in state.live.values() {
                if conn.channels.contains(&event.channel) {
                    let _ = conn.tx.send(LiveMessage::Event(event.clone()));
                }
            }
            seqs.push(Accepted {
                seq: event.seq,
                replayed: false,
            });
        }
        seqs
    }

    /// Drops expired channels now and then, so memory follows the TTL.
    fn sweep(&self, state: &mut State, now: Instant) {
        if now < state.next_sweep {
            return;
        }
        state.channels.retain(|_, log| log.expires_at > now);
        state.idempotency.retain(|_, (_, until)| *until > now);
        state.next_sweep = now + (self.ttl / 8).max(Duration::from_secs(1));
    }

    pub fn position(&self) -> Position {
        let state = self.lock();
        Position {
            epoch: state.epoch,
            seq: state.seq,
        }
    }

    pub fn history(&self, read: &HistoryRead<'_>) -> Result<Vec<ChannelPage>, BrokerError> {
        let state = self.lock();
        if state.epoch != read.epoch {
            return Err(BrokerError::EpochChanged);
        }
        let now = Instant::now();
        let pages = read
            .requests
            .iter()
            .map(|(channel, after)| {
                let recent = state
                    .clock
                    .iter()
                    .rev()
                    .find(|&&(seq, _)| seq <= after.saturating_add(1))
                    .is_some_and(|&(_, at)| at + self.ttl > now);
                let Some(log) = state.channels.get(channel).filter(|l| l.expires_at > now) else {
                    return ChannelPage {
                        facts: StreamFacts::Missing,
                        recent,
                        ..ChannelPage::default()
                    };
                };
                let start = log.entries.partition_point(|e| e.seq <= *after);
                let (mut events, mut bytes, mut more) = (Vec::new(), 0, false);
                for event in log
                    .entries
                    .range(start..)
                    .take_while(|e| e.seq <= read.upto)
                {
                    let full = events.len() >= read.limit.max(1)
                        || (!events.is_empty() && bytes + event.body.len() > read.max_bytes);
                    if full {
                        more = true;
                        break;
                    }
                    bytes += event.body.len();
                    events.push(event.clone());
                }
                let removed = match log.removed_upto {
                    0 => Removed::Nothing,
                    upto => Removed::Upto(upto),
                };
                ChannelPage {
                    facts: StreamFacts::Present {
                        first: log.entries.front().map(|e| e.seq),
                        removed,
                    },
                    recent,
                    through: events.last().map(|e: &Event| e.seq),
                    events,
                    more,
                    skipped: 0,
                }
            })
            .collect();
        Ok(pages)
    }

    /// Opens a live connection for `replica`; its messages arrive in publish order.
    pub fn connect_live(&self, replica: &str) -> (MemoryLiveSink, MemoryLiveStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        let id = state.next_conn;
        state.next_conn += 1;
        state.live.insert(
            id,
            LiveConn {
                replica: replica.to_owned(),
                channels: HashSet::new(),
                tx,
            },
        );
        let sink = MemoryLiveSink {
            broker: self.me.clone(),
            id,
        };
        let stream = MemoryLiveStream {
            rx,
            _guard: ConnGuard {
                broker: self.me.clone(),
                id,
            },
        };
        (sink, stream)
    }

    /// Sends the counter to `replica`'s live connections, in order with events.
    pub fn request_marker(&self, replica: &str) -> bool {
        let state = self.lock();
        let mut delivered = false;
        for conn in state.live.values().filter(|c| c.replica == replica) {
            let position = Position {
                epoch: state.epoch,
                seq: state.seq,
            };
            delivered |= conn.tx.send(LiveMessage::Marker(position)).is_ok();
        }
        delivered
    }
}

impl Backend for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn shards(&self) -> &Shards {
        &Shards::ONE
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn ping(&self, _shard: usize) -> BoxFuture<'_, Result<(), BrokerError>> {
        async { Ok(()) }.boxed()
    }

    fn publish<'a>(
        &'a self,
        _shard: usize,
        entries: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<Vec<Accepted>, BrokerError>> {
        let accepted = MemoryBroker::publish(self, entries);
        async move { Ok(accepted) }.boxed()
    }

    fn position(&self, _shard: usize) -> BoxFuture<'_, Result<Position, BrokerError>> {
        let position = MemoryBroker::position(self);
        async move { Ok(position) }.boxed()
    }

    fn history<'a>(
        &'a self,
        _shard: usize,
        read: &'a HistoryRead<'a>,
    ) -> BoxFuture<'a, Result<Vec<ChannelPage>, BrokerError>> {
        let pages = MemoryBroker::history(self, read);
        async move { pages }.boxed()
    }

    fn connect_live<'a>(
        &'a self,
        _shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<(LiveSink, LiveStream), BrokerError>> {
        let (sink, stream) = MemoryBroker::connect_live(self, replica);
        let live: (LiveSink, LiveStream) = (LiveSink(Arc::new(sink)), Box::pin(stream));
        async move { Ok(live) }.boxed()
    }

    fn request_marker<'a>(
        &'a self,
        _shard: usize,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let delivered = MemoryBroker::request_marker(self, replica);
        async move { Ok(delivered) }.boxed()
    }

    fn put_ticket<'a>(
        &'a self,
        digest: &'a str,
        payload: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        let stored = MemoryBroker::put_ticket(self, digest, payload, ttl);
        async move { Ok(stored) }.boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, BrokerError>> {
        let taken = MemoryBroker::take_ticket(self, digest);
        async move { Ok(taken) }.boxed()
    }
}

impl LiveControl for MemoryLiveSink {
    fn subscribe<'a>(&'a self, channels: &'a [Channel]) -> BoxFuture<'a, Result<(), BrokerError>> {
        MemoryLiveSink::subscribe(self, channels);
        async { Ok(()) }.boxed()
    }

    fn unsubscribe<'a>(
        &'a self,
        channels: &'a [Channel],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        MemoryLiveSink::unsubscribe(self, channels);
        async { Ok(()) }.boxed()
    }
}

impl Log {
    fn new(now: Instant) -> Self {
        Self {
            entries: VecDeque::new(),
            removed_upto: 0,
            expires_at: now,
        }
    }
}

/// Subscribes and unsubscribes channels of one memory live connection.
#[derive(Clone)]
pub struct MemoryLiveSink {
    broker: Weak<MemoryBroker>,
    id: u64,
}

impl MemoryLiveSink {
    pub fn subscribe(&self, channels: &[Channel]) {
        self.update(|set| set.extend(channels.iter().cloned()));
    }

    pub fn unsubscribe(&self, channels: &[Channel]) {
        self.update(|set| {
            for c in channels {
                set.remove(c);
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut HashSet<Channel>)) {
        if let Some(broker) = self.broker.upgrade()
            && let Some(conn) = broker.lock().live.get_mut(&self.id)
        {
            f(&mut conn.channels);
        }
    }
}

/// The messages of one memory live connection.
pub struct MemoryLiveStream {
    rx: mpsc::UnboundedReceiver<LiveMessage>,
    _guard: ConnGuard,
}

struct ConnGuard {
    broker: Weak<MemoryBroker>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.upgrade() {
            broker.lock().live.remove(&self.id);
        }
    }
}

impl Stream for MemoryLiveStream {
    type Item = LiveMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveMessage>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn outgoing(channel: &str) -> Outgoing {
        Outgoing {
            channel: Channel::parse(channel).unwrap(),
            body: Bytes::from_static(br#"{"data":1,"timestamp":"t"}"#),
            idempotency_key: None,
        }
    }

    /// One page per request, with no size limit but `limit` events.
    fn read(broker: &MemoryBroker, channel: &str, after: u64, limit: usize) -> ChannelPage {
        let requests = [(Channel::parse(channel).unwrap(), after)];
        let read = HistoryRead {
            requests: &requests,
            upto: u64::MAX,
            limit,
            max_bytes: usize::MAX,
            epoch: broker.position().epoch,
        };
        broker.history(&read).unwrap().remove(0)
    }

    #[tokio::test(start_paused = true)]
    async fn expired_history_is_gone_and_old_cursors_are_not_recent() {
        let mut config = BrokerConfig::memory();
        config.history_ttl = Duration::from_secs(10);
        let broker = MemoryBroker::new(&config);
        let start = broker.position().seq;
        let seqs = broker.publish(&[outgoing("a")]);

        let page = read(&broker, "a", start, 10);
        assert_eq!(page.events.len(), 1);
        assert!(page.recent);

        tokio::time::advance(Duration::from_secs(11)).await;
        let page = read(&broker, "a", start, 10);
        assert_eq!(page.facts, StreamFacts::Missing);
        assert!(!page.recent, "a cursor older than the TTL is not recent");
        assert_eq!(seqs[0].seq, start + 1);
    }

    #[test]
    fn trimming_is_exact_and_reported() {
        let mut config = BrokerConfig::memory();
        config.history_max_len = 3;
        let broker = MemoryBroker::new(&config);
        let seqs = broker.publish(&[
            outgoing("a"),
            outgoing("a"),
            outgoing("b"),
            outgoing("a"),
            outgoing("a"),
        ]);
        let seqs: Vec<u64> = seqs.iter().map(|a| a.seq).collect();
        let page = read(&broker, "a", 0, 10);
        let kept: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(kept, vec![seqs[1], seqs[3], seqs[4]]);
        assert_eq!(
            page.facts,
            StreamFacts::Present {
                first: Some(seqs[1]),
                removed: Removed::Upto(seqs[0])
            }
        );
    }

    #[test]
    fn pages_stop_at_their_byte_budget_but_hold_one_event() {
        let broker = MemoryBroker::new(&BrokerConfig::memory());
        let start = broker.position().seq;
        broker.publish(&[outgoing("a"), outgoing("a"), outgoing("a")]);
        let size = outgoing("a").body.len();
        let requests = [(Channel::parse("a").unwrap(), start)];
        let mut read = HistoryRead {
            requests: &requests,
            upto: u64::MAX,
            limit: 10,
            max_bytes: 2 * size,
            epoch: broker.position().epoch,
        };
        let page = broker.history(&read).unwrap().remove(0);
        assert_eq!((page.events.len(), page.more), (2, true));
        assert_eq!(page.through, Some(start + 2));
        read.max_bytes = 1;
        let page = broker.history(&read).unwrap().remove(0);
        assert_eq!((page.events.len(), page.more), (1, true));
        read.epoch += 1;
        assert!(matches!(
            broker.history(&read),
            Err(BrokerError::EpochChanged)
        ));
    }
}
