//! The hub: which local clients want which channel, and one bounded queue per client.
//!
//! The live task hands every event to [`Hub::dispatch`] once, in `seq` order; the hub pushes
//! the same `Arc<Frame>` into each subscriber's queue. A queue that is full marks its client
//! slow: the queue is emptied at once (memory is released even if the socket is stuck), the
//! client is removed, and its writer ends the stream so the browser resumes from its last id.
//!
//! An SSE stream or a WebSocket the gateway writes itself also lends the hub its socket: while
//! its writer waits with nothing queued, the hub writes an event straight to the socket when the socket
//! takes it at once (see [`Direct`]), which saves a wake-up, a schedule and a poll per delivery.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use eventgate_core::{Channel, GapReason, Shards};
use futures::task::AtomicWaker;
use tokio::net::TcpStream;

use crate::{frame::Frame, live::LiveSenders, server::Taken};

/// Something for one client's writer.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Frame>),
    /// The rest of an SSE event the hub began writing to the socket (it took only part):
    /// written first, as is. (A boxed slice, not `Bytes`: it keeps every delivery 24 bytes.)
    Rest(Box<[u8]>),
    /// Everything up to this seq of the shard, on the client's channels, is already in its
    /// queue.
    Position {
        shard: usize,
        seq: u64,
    },
    Reset(Arc<ResetNotice>),
    /// Time to show the connection is alive (`: ping`, or a WebSocket ping).
    Heartbeat,
}

/// History is incomplete for some channels.
#[derive(Debug)]
pub struct ResetNotice {
    /// `None`: all of the client's channels (of `shard`, when set).
    pub channels: Option<Vec<Channel>>,
    /// The shard whose data was lost, for a notice about a whole shard.
    pub shard: Option<(Shards, usize)>,
    pub reason: GapReason,
    /// A new position on that shard the client must take (after data loss), if any.
    pub position: Option<u64>,
}

impl ResetNotice {
    /// The channels among a client's `mine` that this notice is about.
    pub fn among<'a>(&self, mine: impl IntoIterator<Item = &'a Channel>) -> Vec<Channel> {
        let of_shard = |c: &&Channel| {
            self.shard
                .as_ref()
                .is_none_or(|(shards, shard)| shards.shard_of(c) == *shard)
        };
        let mine = mine.into_iter().filter(of_shard);
        match &self.channels {
            None => mine.cloned().collect(),
            Some(list) => mine.filter(|c| list.contains(c)).cloned().collect(),
        }
    }
}

/// Why a client's queue was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client did not keep up and its queue filled.
    Slow,
    /// The gateway is shutting down.
    Shutdown,
}

/// A client's bounded queue: the hub pushes, the client's writer takes everything at once.
///
/// Not `tokio::sync::mpsc`: a full queue must be emptied by the *sender* side, right away, and
/// tell the receiver why it ended. The writer is woken only when the queue turns non-empty, so
/// a burst costs one wake-up.
pub struct ClientQueue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    capacity: usize,
    /// The socket of an SSE stream the gateway writes itself, shared with its writer.
    socket: OnceLock<TcpStream>,
}

struct QueueState {
    items: VecDeque<Delivery>,
    closed: Option<CloseReason>,
    /// Events discarded when the queue closed (the client gets them on resume).
    dropped_events: u64,
    /// Set while the writer waits with nothing queued: the hub may write to the socket.
    direct: Option<Direct>,
}

impl QueueState {
    /// The rest of a half-written event, if it is next.
    fn take_rest(&mut self) -> Option<Box<[u8]>> {
        match self.items.front() {
            Some(Delivery::Rest(_)) => match self.items.pop_front() {
                Some(Delivery::Rest(rest)) => Some(rest),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Deliveries a waiting writer's buffer may keep room for: a burst can grow it to the queue's
/// capacity (4,096 by default, 96 KiB), which an idle stream should not hold on to.
const KEEP_IDLE: usize = 64;

/// A waiting writer's leave for the hub to write its events straight to the socket.
///
/// Only for a stream on one shard (a WebSocket: on one channel), with no replay running and
/// nothing queued or half written: then an event's bytes are the frame's shared bytes as they
/// are, and the only state to keep is the position. The hub writes only what the socket takes
/// at once, under the queue's lock; the writer takes the leave back (with the position) before
/// it writes anything itself, so the two never interleave. An event the socket takes only in
/// part leaves its rest at the front of the queue; one it does not take at all is queued as
/// usual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    pub shard: usize,
    /// The stream's position on `shard`: events at or below it were replayed already.
    pub floor: u64,
    /// Events the hub wrote since the writer last looked.
    pub written: u64,
    pub form: Form,
    /// The writer had to write while it waited (a WebSocket answers a ping from its read
    /// side): the hub writes nothing more until the leave is taken back.
    pub paused: bool,
}

/// How an event is framed on a stream's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// An HTTP/1.1 chunk holding the SSE event.
    Sse,
    /// A WebSocket text frame holding the event's JSON.
    WebSocket,
}

impl Direct {
    /// A leave at `floor` on `shard`, nothing written yet.
    pub fn new(shard: usize, floor: u64, form: Form) -> Self {
        Self {
            shard,
            floor,
            written: 0,
            form,
            paused: false,
        }
    }
}

/// What became of an event handed to a client's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushed {
    Queued,
    /// Written straight to the socket.
    Written,
    /// Dropped: the stream's replay sent it already.
    Duplicate,
    /// The queue was full (it is now closed as slow) or closed.
    Refused,
}

impl ClientQueue {
    fn new(capacity: usize, closed: Option<CloseReason>) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed,
                dropped_events: 0,
                direct: None,
            }),
            waker: AtomicWaker::new(),
            capacity,
            socket: OnceLock::new(),
        }
    }

    /// Shares the stream's socket with the hub; its writer then reaches it through
    /// [`ClientQueue::socket`]. Gives it back if one is attached already.
    pub fn attach_socket(&self, socket: TcpStream) -> Result<(), TcpStream> {
        self.socket.set(socket)
    }

    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
    }

    /// Hands `frame` to the client: straight to the socket if `direct` and the writer lets it
    /// (see [`Direct`]), queued otherwise.
    fn push_event(&self, frame: &Arc<Frame>, direct: bool) -> Pushed {
        let mut state = self.lock();
        let writable = direct
            && state.closed.is_none()
            && state.items.is_empty()
            && state
                .direct
                .is_some_and(|d| d.shard == frame.shard && !d.paused);
        let (Some(socket), Some(direct), true) =
            (self.socket.get(), state.direct.as_mut(), writable)
        else {
            return self.push_locked(state, Delivery::Event(frame.clone()));
        };
        if frame.seq() <= direct.floor {
            return Pushed::Duplicate;
        }
        let taken = match direct.form {
            Form::Sse => crate::server::try_write_chunk(socket, &frame.sse),
            Form::WebSocket => crate::ws::try_write_text(socket, frame.ws_bytes()),
        };
        match taken {
            Ok(Taken::All) => {
                direct.floor = frame.seq();
                direct.written += 1;
                Pushed::Written
            }
            // Part went out: the rest goes first, written by the writer.
            Ok(Taken::Part(rest)) => {
                direct.floor = frame.seq();
                direct.written += 1;
                self.push_locked(state, Delivery::Rest(rest.into_boxed_slice()));
                Pushed::Written
            }
            // Nothing went out (a full socket, or an error the writer will meet): queued.
            _ => self.push_locked(state, Delivery::Event(frame.clone())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`; `false` when the queue was full (it is now closed as slow) or closed.
    fn push(&self, item: Delivery) -> bool {
        self.push_locked(self.lock(), item) != Pushed::Refused
    }

    fn push_locked(&self, mut state: MutexGuard<'_, QueueState>, item: Delivery) -> Pushed {
        if state.closed.is_some() {
            return Pushed::Refused;
        }
        if state.items.len() >= self.capacity {
            state.dropped_events += u64::from(matches!(item, Delivery::Event(_)));
            drop(state);
            self.close(CloseReason::Slow);
            return Pushed::Refused;
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        drop(state);
        if was_empty {
            self.waker.wake();
        }
        Pushed::Queued
    }

    /// Closes the queue and drops what it holds; the writer sees `reason` next.
    fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        let mut dropped = std::mem::take(&mut state.items);
        // The rest of a half-written event stays: the stream's framing needs it whole.
        if let Some(Delivery::Rest(_)) = dropped.front() {
            state.items.extend(dropped.pop_front());
        }
        state.dropped_events += dropped
            .iter()
            .filter(|d| matches!(d, Delivery::Event(_)))
            .count() as u64;
        drop(state);
        drop(dropped);
        self.waker.wake();
    }

    /// Events discarded because the queue closed.
    pub fn dropped_events(&self) -> u64 {
        self.lock().dropped_events
    }

    /// Moves every queued delivery into `out` (which must be empty), or says why the queue
    /// closed; `Pending` until there is one or the other.
    pub fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Delivery>,
    ) -> Poll<Result<(), CloseReason>> {
        self.poll_recv_direct(cx, out, None).map_ok(|_| ())
    }

    /// [`ClientQueue::poll_recv`] for a writer that lends the hub its socket: `offer` (the
    /// writer's position, when it may) is installed while it waits, and what the hub wrote
    /// meanwhile comes back with the deliveries. Take it into account before them.
    pub fn poll_recv_direct(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Delivery>,
        offer: Option<Direct>,
    ) -> Poll<Result<Option<Direct>, CloseReason>> {
        let mut state = self.lock();
        let direct = state.direct.take();
        if let Some(reason) = state.closed {
            // A half-written event is finished before the end.
            if let Some(Delivery::Rest(_)) = state.items.front() {
                out.extend(state.items.pop_front());
                return Poll::Ready(Ok(direct));
            }
            state.direct = direct;
            return Poll::Ready(Err(reason));
        }
        if state.items.is_empty() {
            // Going idle: the buffer a burst grew is released, not kept for the stream's life.
            // (The queue's own buffer is the writer's last one, swapped in, so small too.)
            if out.is_empty() && out.capacity() > KEEP_IDLE {
                *out = VecDeque::new();
            }
            // Registered under the lock: a push after this sees `was_empty` and wakes us.
            self.waker.register(cx.waker());
            // A leave already given stays: the hub may have moved its position.
            state.direct = direct.or(offer);
            return Poll::Pending;
        }
        std::mem::swap(&mut state.items, out);
        Poll::Ready(Ok(direct))
    }

    /// Lends the hub the socket while the writer waits (see [`Direct`]), if nothing is queued:
    /// for a writer whose own writes may come from elsewhere than its wait for deliveries (a
    /// WebSocket's read side), so the leave must be in place before either is polled. Wait
    /// with [`ClientQueue::poll_recv_direct`] and no offer; take the leave back after.
    pub fn lend(&self, offer: Direct) {
        let mut state = self.lock();
        if state.items.is_empty() && state.closed.is_none() && state.direct.is_none() {
            state.direct = Some(offer);
        }
    }

    /// Stops the hub's writes for a writer about to write while it waits (the leave stays,
    /// paused, for the writer to take back), and hands over the rest of a half-written event:
    /// it goes out before anything else.
    pub fn pause_direct(&self) -> Option<Box<[u8]>> {
        let mut state = self.lock();
        if let Some(direct) = state.direct.as_mut() {
            direct.paused = true;
        }
        state.take_rest()
    }

    /// Takes back the hub's leave to write (the writer is ending), with what it wrote.
    pub fn take_direct(&self) -> Option<Direct> {
        self.lock().direct.take()
    }

    /// Takes back the hub's leave to write, and the rest of a half-written event if one is
    /// queued: a writer that ends by itself writes that rest before its last bytes.
    pub fn stop_direct(&self) -> (Option<Direct>, Option<Box<[u8]>>) {
        let mut state = self.lock();
        (state.direct.take(), state.take_rest())
    }

    /// Waits for deliveries; see [`ClientQueue::poll_recv`].
    pub async fn recv(&self, out: &mut VecDeque<Delivery>) -> Result<(), CloseReason> {
        std::future::poll_fn(|cx| self.poll_recv(cx, out)).await
    }
}

/// Replica-wide counters for `/v1/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_sse: AtomicU64,
    pub connections_ws: AtomicU64,
    pub connections_total: AtomicU64,
    pub connects_sse: AtomicU64,
    pub connects_ws: AtomicU64,
    /// Streams ended, by [`crate::metrics::EndReason`].
    pub disconnects: [AtomicU64; crate::metrics::EndReason::COUNT],
    /// Publish to fan-out on this replica, from the event's timestamp.
    pub delivery_latency: crate::metrics::LatencyHistogram,
    pub events_received: AtomicU64,
    pub events_delivered: AtomicU64,
    pub events_replayed: AtomicU64,
    pub events_backfilled: AtomicU64,
    pub slow_clients_dropped: AtomicU64,
    /// Events discarded with slow clients' queues.
    pub events_dropped: AtomicU64,
    pub resets_sent: AtomicU64,
    pub live_reconnects: AtomicU64,
    pub malformed_messages: AtomicU64,
    /// History entries that could not be decoded, skipped in replays.
    pub history_entries_skipped: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

struct Member {
    client: u64,
    queue: Arc<ClientQueue>,
}

struct ClientEntry {
    queue: Arc<ClientQueue>,
    /// The client's channels, each with its place in that channel's member list.
    channels: Vec<(Channel, usize)>,
}

/// One channel's local subscribers.
#[derive(Default)]
struct Fanout {
    members: Vec<Member>,
    /// How long the last fan-out that wrote to sockets itself took, and when the last fan-out
    /// ended. Writing every subscriber's socket from the fan-out saves each writer a wake-up,
    /// but writes each event alone and on one thread. Under load (the fan-out rested less
    /// than half of that since the last one ended, so events are waiting) events are
    /// queued instead: the writers run on every core and each sends what piled up in one
    /// write. The rest is measured from the end, not the start: a slow fan-out must not make
    /// the events behind it look far apart.
    direct_cost: Duration,
    last_end: Option<Instant>,
}

#[derive(Default)]
struct HubState {
    /// Members per channel, in no particular order: a member leaves by `swap_remove`, so a mass
    /// disconnect costs O(1) per client instead of a scan of the channel per client.
    channels: HashMap<Channel, Fanout>,
    clients: HashMap<u64, ClientEntry>,
    next_client: u64,
    /// Set on shutdown: clients registered later start closed.
    closed: Option<CloseReason>,
}

/// Subscribers per thread below which a fan-out that writes to sockets stays on one thread:
/// starting a thread costs tens of µs, a write a few.
const DIRECT_SPLIT: usize = 1024;

/// Hands `frame` to each of `members`: how many were written straight to their sockets, and
/// the clients refused as slow.
fn push_all(members: &[Member], frame: &Arc<Frame>, direct: bool) -> (u64, Vec<u64>) {
    let mut written = 0;
    let mut slow = Vec::new();
    for member in members {
        match member.queue.push_event(frame, direct) {
            Pushed::Queued | Pushed::Duplicate => {}
            Pushed::Written => written += 1,
            Pushed::Refused => slow.push(member.client),
        }
    }
    (written, slow)
}

/// [`push_all`] with direct writes, over `parts` threads: one event's writes to a large
/// channel's sockets use every core, so its last subscriber gets it sooner. Each subscriber is
/// written by one thread and the fan-out ends when all have, so each client's order holds.
fn push_split(members: &[Member], frame: &Arc<Frame>, parts: usize) -> (u64, Vec<u64>) {
    std::thread::scope(|scope| {
        let mut chunks = members.chunks(members.len().div_ceil(parts));
        let first = chunks.next().unwrap_or_default();
        let mut inline = Vec::new();
        let mut threads = Vec::new();
        for part in chunks {
            let started = std::thread::Builder::new()
                .name("eventgate-fanout".into())
                .stack_size(256 * 1024)
                .spawn_scoped(scope, || push_all(part, frame, true));
            match started {
                Ok(thread) => threads.push(thread),
                // No thread to be had: this one writes that part too.
                Err(_) => inline.push(part),
            }
        }
        let (mut written, mut slow) = push_all(first, frame, true);
        let rest = inline
            .into_iter()
            .map(|part| Ok(push_all(part, frame, true)));
        for result in rest.chain(threads.into_iter().map(|thread| thread.join())) {
            match result {
                Ok((w, s)) => {
                    written += w;
                    slow.extend(s);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        (written, slow)
    })
}

/// Local fan-out: channel → subscribers. Locks are never held across an `.await`.
pub struct Hub {
    state: Mutex<HubState>,
    queue_capacity: usize,
    /// Threads a fan-out that writes to sockets may use: one per core.
    threads: usize,
    live: LiveSenders,
    pub stats: Arc<Stats>,
}

impl Hub {
    pub fn new(queue_capacity: usize, live: LiveSenders, stats: Arc<Stats>) -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            queue_capacity,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            live,
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a client with no channels yet.
    pub fn register(&self) -> (u64, Arc<ClientQueue>) {
        let mut state = self.lock();
        let queue = Arc::new(ClientQueue::new(self.queue_capacity, state.closed));
        let id = state.next_client;
        state.next_client += 1;
        state.clients.insert(
            id,
            ClientEntry {
                queue: queue.clone(),
                channels: Vec::new(),
            },
        );
        (id, queue)
    }

    /// Adds `channels` to a client; their events start queueing for it at once. Returns
    /// `false` when the client is gone (dropped as slow).
    pub fn join(&self, client: u64, channels: &[Channel]) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(entry) = state.clients.get_mut(&client) else {
            return false;
        };
        for channel in channels {
            if entry.channels.iter().any(|(c, _)| c == channel) {
                continue;
            }
            let members = &mut state.channels.entry(channel.clone()).or_default().members;
            entry.channels.push((channel.clone(), members.len()));
            members.push(Member {
                client,
                queue: entry.queue.clone(),
            });
        }
        true
    }

    /// Removes `channels` from a client; channels nobody here wants any more are released.
    pub fn leave(&self, client: u64, channels: &[Channel]) {
        let mut state = self.lock();
        let mut gone = Vec::new();
        if let Some(entry) = state.clients.get_mut(&client) {
            entry.channels.retain(|(c, place)| {
                let leaving = channels.contains(c);
                if leaving {
                    gone.push((c.clone(), *place));
                }
                !leaving
            });
        }
        self.forget_locked(&mut state, gone);
    }

    /// Removes a client and its memberships.
    pub fn unregister(&self, client: u64) {
        let mut state = self.lock();
        self.remove_locked(&mut state, client);
    }

    fn remove_locked(&self, state: &mut HubState, client: u64) {
        if let Some(entry) = state.clients.remove(&client) {
            self.forget_locked(state, entry.channels);
        }
    }

    /// Drops memberships (a channel and the member's place in it), moving each channel's last
    /// member into the hole; releases channels left without members, under the lock, so a
    /// release is always ordered before a later client's ensure.
    fn forget_locked(&self, state: &mut HubState, memberships: Vec<(Channel, usize)>) {
        let HubState {
            channels, clients, ..
        } = state;
        let mut released = Vec::new();
        for (channel, place) in memberships {
            let Some(members) = channels.get_mut(&channel).map(|f| &mut f.members) else {
                continue;
            };
            if place >= members.len() {
                continue;
            }
            members.swap_remove(place);
            if let Some(moved) = members.get(place)
                && let Some(entry) = clients.get_mut(&moved.client)
                && let Some(slot) = entry.channels.iter_mut().find(|(c, _)| *c == channel)
            {
                slot.1 = place;
            }
            if members.is_empty() {
                channels.remove(&channel);
                released.push(channel);
            }
        }
        if !released.is_empty() {
            self.live.release(released);
        }
    }

    /// Hands one event to every local subscriber of its channel.
    pub fn dispatch(&self, frame: Arc<Frame>) {
        let mut state = self.lock();
        let (mut written, mut slow) = (0, Vec::new());
        if let Some(fanout) = state.channels.get_mut(frame.channel()) {
            let start = Instant::now();
            let direct = fanout
                .last_end
                .is_none_or(|end| start.saturating_duration_since(end) >= fanout.direct_cost / 2);
            let parts = match direct {
                true => (fanout.members.len() / DIRECT_SPLIT).clamp(1, self.threads),
                false => 1,
            };
            (written, slow) = if parts == 1 {
                push_all(&fanout.members, &frame, direct)
            } else {
                push_split(&fanout.members, &frame, parts)
            };
            let end = Instant::now();
            if direct {
                fanout.direct_cost = end - start;
            }
            fanout.last_end = Some(end);
        }
        Stats::add(&self.stats.events_delivered, written);
        self.drop_slow(&mut state, slow);
    }

    /// Sends a delivery to every subscriber of one channel.
    pub fn dispatch_to(&self, channel: &Channel, delivery: Delivery) {
        let mut state = self.lock();
        let mut slow = Vec::new();
        if let Some(fanout) = state.channels.get(channel) {
            for member in &fanout.members {
                if !member.queue.push(delivery.clone()) {
                    slow.push(member.client);
                }
            }
        }
        self.drop_slow(&mut state, slow);
    }

    /// Sends a delivery to every client.
    pub fn broadcast(&self, delivery: Delivery) {
        let mut state = self.lock();
        let slow: Vec<u64> = state
            .clients
            .iter()
            .filter(|(_, c)| !c.queue.push(delivery.clone()))
            .map(|(&id, _)| id)
            .collect();
        self.drop_slow(&mut state, slow);
    }

    fn drop_slow(&self, state: &mut HubState, slow: Vec<u64>) {
        for client in slow {
            if let Some(entry) = state.clients.get(&client) {
                tracing::info!(client, reason = "slow", "client queue full, disconnecting");
                Stats::add(&self.stats.slow_clients_dropped, 1);
                Stats::add(&self.stats.events_dropped, entry.queue.dropped_events());
                self.remove_locked(state, client);
            }
        }
    }

    /// Closes every client's queue (shutdown); clients registered later start closed.
    pub fn close_all(&self, reason: CloseReason) {
        let queues: Vec<Arc<ClientQueue>> = {
            let mut state = self.lock();
            state.closed = Some(reason);
            state.clients.values().map(|c| c.queue.clone()).collect()
        };
        for queue in queues {
            queue.close(reason);
        }
    }

    /// Channels with at least one local subscriber, of shard `shard` of `shards`.
    pub fn channels(&self, shards: &Shards, shard: usize) -> Vec<Channel> {
        self.lock()
            .channels
            .keys()
            .filter(|c| shards.shard_of(c) == shard)
            .cloned()
            .collect()
    }

    pub fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    pub fn has_subscribers(&self, channel: &Channel) -> bool {
        self.lock().channels.contains_key(channel)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::mpsc;

    use crate::live::LiveCommand;

    use super::*;

    fn hub(capacity: usize) -> (Hub, mpsc::UnboundedReceiver<LiveCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let senders = LiveSenders::new(Shards::ONE, vec![tx]);
        (Hub::new(capacity, senders, Arc::default()), rx)
    }

    fn member(hub: &Hub, channel: &Channel) -> (u64, Arc<ClientQueue>) {
        let (id, queue) = hub.register();
        assert!(hub.join(id, std::slice::from_ref(channel)));
        (id, queue)
    }

    fn frame(seq: u64, channel: &Channel) -> Arc<Frame> {
        let event = eventgate_core::Event {
            seq,
            channel: channel.clone(),
            body: Bytes::from_static(br#"{"data":1,"timestamp":"t"}"#),
        };
        Arc::new(Frame::build(event, 0).expect("valid body"))
    }

    #[tokio::test]
    async fn every_subscriber_gets_the_same_frame_allocation() {
        let (hub, _live) = hub(8);
        let orders = Channel::parse("orders").unwrap();
        let a = member(&hub, &orders).1;
        let b = member(&hub, &orders).1;
        let sent = frame(1, &orders);
        hub.dispatch(sent.clone());
        for queue in [a, b] {
            let mut got = VecDeque::new();
            queue.recv(&mut got).await.unwrap();
            match got.pop_front() {
                Some(Delivery::Event(f)) => assert!(Arc::ptr_eq(&f, &sent)),
                other => panic!("expected the event, got {other:?}"),
            }
        }
    }

    /// A connected pair: the gateway's end, the browser's end.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let browser = TcpStream::connect(addr).await.expect("connect");
        let (gateway, _) = listener.accept().await.expect("accept");
        (gateway, browser)
    }

    /// The writer parks with `offer`; `Pending` expected.
    fn park(queue: &ClientQueue, offer: Direct) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut out = VecDeque::new();
        assert!(
            queue
                .poll_recv_direct(&mut cx, &mut out, Some(offer))
                .is_pending()
        );
    }

    fn chunk(frame: &Frame) -> Vec<u8> {
        let mut bytes = format!("{:x}\r\n", frame.sse.len()).into_bytes();
        bytes.extend_from_slice(&frame.sse);
        bytes.extend_from_slice(b"\r\n");
        bytes
    }

    #[tokio::test]
    async fn a_waiting_sse_writer_lets_the_hub_write_events_straight_to_its_socket() {
        direct_writes(Form::Sse).await;
    }

    #[tokio::test]
    async fn a_waiting_websocket_lets_the_hub_write_whole_frames_to_its_socket() {
        direct_writes(Form::WebSocket).await;
    }

    /// The bytes of `frame` on the wire, in `form`.
    fn wire(frame: &Frame, form: Form) -> Vec<u8> {
        match form {
            Form::Sse => chunk(frame),
            Form::WebSocket => text_frame(frame),
        }
    }

    /// A writer lends its socket at position 1; events 1 and 2 are dispatched.
    async fn direct_writes(form: Form) {
        use tokio::io::AsyncReadExt;
        let (hub, _live) = hub(8);
        let orders = Channel::parse("orders").unwrap();
        let (_, queue) = member(&hub, &orders);
        let (gateway, mut browser) = socket_pair().await;
        assert!(queue.attach_socket(gateway).is_ok());
        match form {
            // An SSE writer offers the leave as it waits; a WebSocket lends it before.
            Form::Sse => park(&queue, Direct::new(0, 1, form)),
            Form::WebSocket => queue.lend(Direct::new(0, 1, form)),
        }
        // At or below the position: the replay sent it already.
        hub.dispatch(frame(1, &orders));
        let second = frame(2, &orders);
        hub.dispatch(second.clone());
        let want = wire(&second, form);
        let mut got = vec![0u8; want.len()];
        browser.read_exact(&mut got).await.expect("read");
        assert_eq!(got, want, "the frame's bytes, framed once");
        // Nothing queued, so the writer was not woken; it learns what was written.
        assert!(queue.lock().items.is_empty());
        assert_eq!(
            queue.take_direct(),
            Some(Direct {
                written: 1,
                ..Direct::new(0, 2, form)
            })
        );
        assert_eq!(hub.stats.events_delivered.load(Ordering::Relaxed), 1);
        // Without the leave (the writer is busy), events are queued as before.
        hub.dispatch(frame(3, &orders));
        assert_eq!(queue.lock().items.len(), 1);
    }

    /// A channel with more subscribers than one thread writes: the fan-out is split over the
    /// cores, and every subscriber gets the event exactly once, straight to its socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_direct_fan_out_reaches_every_socket_once() {
        use tokio::io::AsyncReadExt;
        let (hub, _live) = hub(8);
        let orders = Channel::parse("orders").unwrap();
        let mut browsers = Vec::new();
        let mut queues = Vec::new();
        for _ in 0..2 * DIRECT_SPLIT + 1 {
            let (_, queue) = member(&hub, &orders);
            let (gateway, browser) = socket_pair().await;
            assert!(queue.attach_socket(gateway).is_ok());
            park(&queue, Direct::new(0, 0, Form::Sse));
            browsers.push(browser);
            queues.push(queue);
        }
        let sent = frame(1, &orders);
        hub.dispatch(sent.clone());
        let want = chunk(&sent);
        for browser in &mut browsers {
            let mut got = vec![0u8; want.len()];
            browser.read_exact(&mut got).await.expect("read");
            assert_eq!(got, want);
        }
        // Loopback writes land at once: a second copy would be there by now.
        for browser in &browsers {
            let more = browser.try_read(&mut [0u8; 1]);
            assert!(
                matches!(&more, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "{more:?}"
            );
        }
        let all = browsers.len() as u64;
        assert_eq!(hub.stats.events_delivered.load(Ordering::Relaxed), all);
        for queue in &queues {
            assert!(queue.lock().items.is_empty(), "written, not queued");
            assert_eq!(queue.take_direct().map(|d| d.written), Some(1));
        }
    }

    /// An event the socket takes only in part: the rest is queued first and survives the queue
    /// closing, so the browser never sees a chunk cut short; one it does not take at all is
    /// queued whole.
    #[tokio::test]
    async fn a_half_written_event_is_finished_before_a_closed_queues_end() {
        half_written(true).await;
    }

    #[tokio::test]
    async fn a_half_written_event_is_finished_before_a_stream_ends_by_itself() {
        half_written(false).await;
    }

    /// The queue closes (`closed`) or the writer ends by itself (expiry, `?duration=`) right
    /// after the hub wrote part of an event.
    async fn half_written(closed: bool) {
        use tokio::io::AsyncReadExt;
        let (hub, _live) = hub(8);
        let orders = Channel::parse("orders").unwrap();
        let (_, queue) = member(&hub, &orders);
        let (gateway, mut browser) = socket_pair().await;
        // Fill the socket while the browser does not read.
        let filler = vec![b'.'; 64 * 1024];
        let mut filled = 0;
        loop {
            match gateway.try_write(&filler) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queue.attach_socket(gateway).is_ok());
        let offer = Direct::new(0, 0, Form::Sse);
        park(&queue, offer);
        let blocked = frame(1, &orders);
        hub.dispatch(blocked.clone());
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut out = VecDeque::new();
        let Poll::Ready(Ok(direct)) = queue.poll_recv_direct(&mut cx, &mut out, None) else {
            panic!("the blocked event is queued");
        };
        assert_eq!(direct.map(|d| d.written), Some(0));
        assert!(matches!(out.pop_front(), Some(Delivery::Event(f)) if f.seq() == 1));

        // The browser reads again: the socket takes bytes, but not a large event at once.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            browser.read_to_end(&mut all).await.expect("read");
            all
        });
        let socket = queue.socket().expect("attached");
        socket.writable().await.expect("writable");
        park(&queue, offer);
        let big = large_frame(2, &orders);
        hub.dispatch(big.clone());
        let rest = if closed {
            queue.close(CloseReason::Slow);
            let Poll::Ready(Ok(direct)) = queue.poll_recv_direct(&mut cx, &mut out, None) else {
                panic!("the rest comes before the end");
            };
            assert_eq!(direct.map(|d| (d.floor, d.written)), Some((2, 1)));
            let Some(Delivery::Rest(rest)) = out.pop_front() else {
                panic!("expected the rest of the event, got {out:?}");
            };
            assert!(matches!(
                queue.poll_recv_direct(&mut cx, &mut out, None),
                Poll::Ready(Err(CloseReason::Slow))
            ));
            rest
        } else {
            let (direct, rest) = queue.stop_direct();
            assert_eq!(direct.map(|d| (d.floor, d.written)), Some((2, 1)));
            // The leave is taken back: the hub writes nothing more.
            hub.dispatch(frame(3, &orders));
            assert_eq!(queue.lock().items.len(), 1, "queued, not written");
            rest.expect("the rest of the event")
        };
        // The writer writes the rest: the browser gets the filler, then the chunk whole.
        let want = chunk(&big);
        let timeout = std::time::Duration::from_secs(10);
        crate::server::write_with_timeout(socket, &rest, timeout)
            .await
            .expect("write the rest");
        drop(queue);
        drop(hub);
        let all = reader.await.expect("reader");
        assert_eq!(all.len(), filled + want.len());
        assert_eq!(&all[all.len() - want.len()..], &want[..]);
    }

    /// An event of 32 MiB: more than a socket takes at once.
    fn large_frame(seq: u64, channel: &Channel) -> Arc<Frame> {
        let event = eventgate_core::Event {
            seq,
            channel: channel.clone(),
            body: Bytes::from(format!(
                r#"{{"data":"{}","timestamp":"t"}}"#,
                "x".repeat(32 * 1024 * 1024)
            )),
        };
        Arc::new(Frame::build(event, 0).expect("valid body"))
    }

    /// A WebSocket text frame as the gateway writes it.
    fn text_frame(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        tungstenite::protocol::frame::Frame::message(
            frame.ws_bytes().to_vec(),
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        )
        .format(&mut out)
        .expect("format");
        out
    }

    /// The hub wrote part of an event while the WebSocket waited, and the WebSocket then writes
    /// (a pong from its read side): the event is finished first, and the hub stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_written_websocket_event_is_finished_before_the_connections_own_writes() {
        use futures::SinkExt;
        use tokio::io::AsyncReadExt;
        use tungstenite::{Message, protocol::Role};
        let (hub, _live) = hub(8);
        let orders = Channel::parse("orders").unwrap();
        let (_, queue) = member(&hub, &orders);
        let (gateway, mut browser) = socket_pair().await;
        assert!(queue.attach_socket(gateway).is_ok());
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            browser.read_to_end(&mut all).await.expect("read");
            all
        });
        queue.lend(Direct::new(0, 1, Form::WebSocket));
        let big = large_frame(2, &orders);
        hub.dispatch(big.clone());
        assert!(
            matches!(queue.lock().items.front(), Some(Delivery::Rest(_))),
            "the socket took part of 32 MiB"
        );
        let io = crate::ws::WsIo::new(
            crate::ws::Io::shared(queue.clone()),
            std::time::Duration::from_secs(10),
        );
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        ws.send(Message::Pong(Bytes::from_static(b"p")))
            .await
            .expect("pong");
        // The leave is paused: the next event is queued, not written.
        hub.dispatch(frame(3, &orders));
        assert!(matches!(queue.lock().items.front(), Some(Delivery::Event(f)) if f.seq() == 3));
        let taken = queue.take_direct();
        assert_eq!(
            taken.map(|d| (d.floor, d.written, d.paused)),
            Some((2, 1, true))
        );
        drop((ws, queue, hub));
        let mut want = text_frame(&big);
        want.extend_from_slice(&[0x8a, 1, b'p']);
        let all = reader.await.expect("reader");
        assert_eq!(all.len(), want.len());
        assert!(all == want, "the whole event, then the pong");
    }

    #[test]
    fn a_stream_that_goes_idle_after_a_burst_releases_its_buffers() {
        let (hub, _live) = hub(4096);
        let orders = Channel::parse("orders").unwrap();
        let (_, queue) = member(&hub, &orders);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut out = VecDeque::new();
        for round in 0..2u64 {
            for seq in 1..=1000 {
                hub.dispatch(frame(round * 1000 + seq, &orders));
            }
            assert!(matches!(
                queue.poll_recv(&mut cx, &mut out),
                Poll::Ready(Ok(()))
            ));
            assert_eq!(out.len(), 1000);
            out.clear();
            // Waiting again, with nothing queued.
            assert!(queue.poll_recv(&mut cx, &mut out).is_pending());
            assert!(
                out.capacity() <= KEEP_IDLE,
                "writer kept {}",
                out.capacity()
            );
            let kept = queue.lock().items.capacity();
            assert!(kept <= KEEP_IDLE, "queue kept {kept}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_only_that_client_and_frees_its_backlog() {
        let (hub, mut live) = hub(2);
        let orders = Channel::parse("orders").unwrap();
        let slow = member(&hub, &orders).1;
        let fast = member(&hub, &orders).1;
        let mut fast_got = Vec::new();
        for seq in 1..=3 {
            hub.dispatch(frame(seq, &orders));
            let mut batch = VecDeque::new();
            fast.recv(&mut batch).await.unwrap();
            fast_got.extend(batch);
        }
        assert_eq!(fast_got.len(), 3);
        let mut batch = VecDeque::new();
        assert_eq!(slow.recv(&mut batch).await, Err(CloseReason::Slow));
        assert!(batch.is_empty());
        assert_eq!(hub.stats.slow_clients_dropped.load(Ordering::Relaxed), 1);
        // Two events queued and the third refused: all three dropped with the queue.
        assert_eq!(hub.stats.events_dropped.load(Ordering::Relaxed), 3);
        assert!(
            hub.has_subscribers(&orders),
            "the fast client still wants the channel"
        );
        assert!(
            live.try_recv().is_err(),
            "nothing released while a subscriber remains"
        );
    }

    #[tokio::test]
    async fn the_last_subscriber_leaving_releases_the_channel() {
        let (hub, mut live) = hub(2);
        let orders = Channel::parse("orders").unwrap();
        let (a, _) = member(&hub, &orders);
        let (b, _) = member(&hub, &orders);
        hub.unregister(a);
        assert!(live.try_recv().is_err());
        hub.leave(b, std::slice::from_ref(&orders));
        match live.try_recv() {
            Ok(LiveCommand::Release(channels)) => assert_eq!(channels, vec![orders]),
            other => panic!("expected a release, got {other:?}"),
        }
        assert_eq!(hub.channel_count(), 0);
    }

    /// A load balancer resets 19,000 clients of one channel at once: each leaves, and then a
    /// fresh client must get the next event promptly. Leaving is O(1), so this takes
    /// milliseconds; filtering the channel's list per leave took seconds.
    #[tokio::test]
    async fn a_mass_disconnect_of_one_channel_leaves_the_hub_responsive() {
        let (hub, _live) = hub(4);
        let orders = Channel::parse("orders").unwrap();
        let others = Channel::parse("others").unwrap();
        let clients: Vec<u64> = (0..19_000)
            .map(|i| {
                let (id, _) = hub.register();
                let channels = if i % 10 == 0 {
                    vec![orders.clone(), others.clone()]
                } else {
                    vec![orders.clone()]
                };
                assert!(hub.join(id, &channels));
                id
            })
            .collect();
        let (stays, _) = member(&hub, &others);
        let started = std::time::Instant::now();
        // In the order they joined, the worst order for a list filtered per leave.
        for client in clients {
            hub.unregister(client);
        }
        let (fresh, queue) = member(&hub, &orders);
        hub.dispatch(frame(1, &orders));
        let mut got = VecDeque::new();
        queue.recv(&mut got).await.expect("delivered");
        let elapsed = started.elapsed();
        assert_eq!(got.len(), 1);
        println!(
            "19,000 subscribers left one channel; the next event reached a fresh client {elapsed:.1?} later"
        );
        // Constant-time leaving takes a few milliseconds here, a scan per leave 350 ms.
        assert!(
            elapsed < std::time::Duration::from_millis(150),
            "{elapsed:?}: leaving is not constant time"
        );
        hub.unregister(fresh);
        hub.unregister(stays);
        assert_eq!(hub.channel_count(), 0);
    }

    /// Joins, leaves and unregisters in a scrambled order: every channel's members are
    /// exactly the clients that still hold it, each getting an event once.
    #[tokio::test]
    async fn memberships_stay_exact_through_any_order_of_leaving() {
        let (hub, _live) = hub(1024);
        let names: Vec<Channel> = (0..5)
            .map(|i| Channel::parse(&format!("c{i}")).unwrap())
            .collect();
        let mut held: Vec<(u64, Arc<ClientQueue>, Vec<usize>)> = Vec::new();
        let mut state = 7u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        for _ in 0..300 {
            let (id, queue) = hub.register();
            let picked: Vec<usize> = (0..5).filter(|_| next(2) == 0).collect();
            let channels: Vec<Channel> = picked.iter().map(|&i| names[i].clone()).collect();
            assert!(hub.join(id, &channels));
            held.push((id, queue, picked));
        }
        for round in 0..400 {
            let who = next(held.len());
            match round % 3 {
                0 => {
                    let (id, _, _) = held.swap_remove(who);
                    hub.unregister(id);
                }
                _ => {
                    let (id, _, picked) = &mut held[who];
                    if let Some(&c) = picked.first() {
                        hub.leave(*id, std::slice::from_ref(&names[c]));
                        picked.remove(0);
                    }
                }
            }
            if held.is_empty() {
                break;
            }
        }
        for (seq, channel) in names.iter().enumerate() {
            hub.dispatch(frame(seq as u64 + 1, channel));
        }
        for (_, queue, picked) in &held {
            let mut got = VecDeque::new();
            if !picked.is_empty() {
                queue.recv(&mut got).await.expect("open");
            }
            let seqs: Vec<u64> = got
                .iter()
                .filter_map(|d| match d {
                    Delivery::Event(f) => Some(f.seq()),
                    _ => None,
                })
                .collect();
            let want: Vec<u64> = picked.iter().map(|&c| c as u64 + 1).collect();
            let mut sorted = seqs.clone();
            sorted.sort_unstable();
            let mut want_sorted = want.clone();
            want_sorted.sort_unstable();
            assert_eq!(sorted, want_sorted);
        }
        let subscribed = names
            .iter()
            .filter(|c| {
                held.iter()
                    .any(|(_, _, p)| p.iter().any(|&i| names[i] == **c))
            })
            .count();
        assert_eq!(hub.channel_count(), subscribed);
    }
}
