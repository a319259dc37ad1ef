//! The replica's one live connection to the broker, and what keeps it exact.
//!
//! One task owns the connection. It subscribes a channel while some local client wants it
//! (ensure/release commands from the hub and sessions, applied in order), hands each event to
//! the hub once, and tracks the *watermark*: the highest seq it has seen. Because the broker
//! delivers in seq order, everything up to the watermark on subscribed channels has arrived.
//! When the connection drops it reconnects with backoff, resubscribes, and replays
//! (watermark, counter] from history before going live again, so connected clients miss
//! nothing. Every few seconds it asks for a marker (the counter, published on the replica's
//! own channel): the marker advances the watermark on quiet replicas, moves clients' positions
//! forward, and proves the subscription is still alive.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use eventgate_core::{
    Broker, BrokerError, Channel, Event, GapReason, LiveMessage, LiveSink, LiveStream, Position,
    Shards, telemetry,
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    frame::Frame,
    hub::{Delivery, Hub, ResetNotice, Stats},
    replay::{HistoryCache, Replay, ReplayItem},
};

/// Requests to the live task.
#[derive(Debug)]
pub enum LiveCommand {
    /// Make sure these channels are subscribed; answer once they are.
    Ensure(Vec<Channel>, EnsureReply),
    /// Nobody local wants these channels any more.
    Release(Vec<Channel>),
}

/// Where the live task answers an ensure, once the channels are subscribed.
pub type EnsureReply = oneshot::Sender<()>;

/// The live connection is down; the gateway answers 503.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the live connection to the broker is down")]
pub struct LiveUnavailable;

/// The live tasks' command queues, one per shard.
#[derive(Clone, Debug)]
pub struct LiveSenders {
    shards: Shards,
    senders: Vec<mpsc::UnboundedSender<LiveCommand>>,
}

impl LiveSenders {
    pub fn new(shards: Shards, senders: Vec<mpsc::UnboundedSender<LiveCommand>>) -> Self {
        Self { shards, senders }
    }

    /// `channels` grouped by shard, in shard order.
    fn by_shard(&self, channels: Vec<Channel>) -> Vec<(usize, Vec<Channel>)> {
        let mut groups: Vec<(usize, Vec<Channel>)> = Vec::new();
        for channel in channels {
            let shard = self.shards.shard_of(&channel);
            match groups.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, group)) => group.push(channel),
                None => groups.push((shard, vec![channel])),
            }
        }
        groups.sort_by_key(|(s, _)| *s);
        groups
    }

    /// Nobody local wants these channels any more.
    pub fn release(&self, channels: Vec<Channel>) {
        for (shard, group) in self.by_shard(channels) {
            if let Some(sender) = self.senders.get(shard) {
                let _ = sender.send(LiveCommand::Release(group));
            }
        }
    }
}

/// What sessions use to talk to the live tasks.
#[derive(Clone)]
pub struct LiveHandle {
    senders: LiveSenders,
    ready: Vec<watch::Receiver<bool>>,
}

impl LiveHandle {
    /// Waits until `channels` are subscribed (each on its shard's connection), at most
    /// `timeout`.
    pub async fn ensure(
        &self,
        channels: Vec<Channel>,
        timeout: Duration,
    ) -> Result<(), LiveUnavailable> {
        let mut answers = Vec::new();
        for (shard, group) in self.senders.by_shard(channels) {
            let (reply, answer) = oneshot::channel();
            self.senders.senders[shard]
                .send(LiveCommand::Ensure(group, reply))
                .map_err(|_| LiveUnavailable)?;
            answers.push(answer);
        }
        let all = futures::future::join_all(answers);
        match tokio::time::timeout(timeout, all).await {
            Ok(results) if results.iter().all(Result::is_ok) => Ok(()),
            _ => Err(LiveUnavailable),
        }
    }

    /// Every shard connected, subscribed and caught up.
    pub fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| *r.borrow())
    }

    /// Whether each shard is ready, by shard.
    pub fn shards_ready(&self) -> Vec<bool> {
        self.ready.iter().map(|r| *r.borrow()).collect()
    }

    /// Resolves when every shard's live connection is ready (tests and start-up).
    pub async fn wait_ready(&self) {
        for ready in &self.ready {
            let mut ready = ready.clone();
            let _ = ready.wait_for(|r| *r).await;
        }
    }
}

/// Settings of the live tasks.
pub struct LiveSettings {
    pub replica: String,
    pub marker_interval: Duration,
    /// Where backfills read history.
    pub history: Arc<HistoryCache>,
}

/// Starts one live task per shard (`commands[i]` is shard `i`'s queue, `senders` their other
/// ends); they run until `shutdown`.
pub fn spawn(
    hub: Arc<Hub>,
    broker: Broker,
    commands: Vec<mpsc::UnboundedReceiver<LiveCommand>>,
    senders: LiveSenders,
    settings: LiveSettings,
    tasks: &mut JoinSet<()>,
    shutdown: CancellationToken,
) -> LiveHandle {
    let settings = Arc::new(settings);
    let mut ready = Vec::new();
    for (shard, commands) in commands.into_iter().enumerate() {
        let (ready_tx, ready_rx) = watch::channel(false);
        let task = LiveTask {
            shard,
            stats: hub.stats.clone(),
            hub: hub.clone(),
            broker: broker.clone(),
            commands,
            ready: ready_tx,
            settings: settings.clone(),
            shutdown: shutdown.clone(),
            watermark: None,
            parked: Vec::new(),
        };
        tasks.spawn(task.run());
        ready.push(ready_rx);
    }
    LiveHandle { senders, ready }
}

/// One shard's live connection.
struct LiveTask {
    shard: usize,
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    broker: Broker,
    commands: mpsc::UnboundedReceiver<LiveCommand>,
    ready: watch::Sender<bool>,
    settings: Arc<LiveSettings>,
    shutdown: CancellationToken,
    /// Epoch and highest seq seen on the live connection.
    watermark: Option<Position>,
    /// Ensures that arrived while the connection was down.
    parked: Vec<(Vec<Channel>, EnsureReply)>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("shutting down")]
    Shutdown,
    #[error("connection lost")]
    Lost,
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Stale(&'static str),
}

enum Op {
    Subscribe(Vec<Channel>),
    Unsubscribe(Vec<Channel>),
}

type OpFuture = BoxFuture<'static, (Op, Result<(), BrokerError>)>;

/// Subscription state of one connection.
struct Subscriptions {
    confirmed: HashSet<Channel>,
    pending: HashSet<Channel>,
    waiters: Vec<(Vec<Channel>, EnsureReply)>,
    queue: VecDeque<Op>,
    inflight: Option<OpFuture>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl LiveTask {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let ended = match self.connect().await {
                Ok((sink, stream, subs)) => {
                    backoff = BACKOFF_MIN;
                    self.serve(sink, stream, subs).await
                }
                Err(e) => e,
            };
            self.ready.send_replace(false);
            if matches!(ended, Ended::Shutdown) || self.shutdown.is_cancelled() {
                return;
            }
            tracing::warn!(shard = self.shard, error = %ended, retry_in = ?backoff, "live connection down");
            Stats::add(&self.stats.live_reconnects, 1);
            if !self.wait_offline(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Sleeps `delay`, holding ensures for the next connection (their callers give up on their
    /// own deadline). `false` on shutdown.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let jitter = rand::random_range(0..=delay.as_millis() as u64 / 4);
        let until = tokio::time::sleep(delay + Duration::from_millis(jitter));
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = &mut until => return true,
                Some(command) = self.commands.recv() => {
                    if let LiveCommand::Ensure(channels, reply) = command {
                        self.parked.retain(|(_, reply)| !reply.is_closed());
                        self.parked.push((channels, reply));
                    }
                }
            }
        }
    }

    /// Connects, subscribes every channel the hub has, and catches up from history.
    async fn connect(&mut self) -> Result<(LiveSink, LiveStream, Subscriptions), Ended> {
        let (sink, stream) = self
            .broker
            .connect_live(self.shard, &self.settings.replica)
            .await?;
        let channels = self.hub.channels(self.broker.shards(), self.shard);
        for chunk in channels.chunks(1024) {
            sink.subscribe(chunk).await?;
        }
        let position = self.broker.position(self.shard).await?;
        match self.watermark {
            Some(seen) if seen.epoch != position.epoch || position.seq < seen.seq => {
                // What the old epoch handed out past `seen` may be lost; the new epoch's events
                // are all there: reset to its start and replay them.
                let from = if seen.epoch == position.epoch {
                    position.seq
                } else {
                    position.epoch.min(position.seq)
                };
                tracing::warn!(
                    shard = self.shard,
                    seen = seen.seq,
                    epoch = position.epoch,
                    now = position.seq,
                    "the broker may have lost data; resetting the shard's clients"
                );
                self.hub.broadcast(Delivery::Reset(Arc::new(ResetNotice {
                    channels: None,
                    shard: Some((self.broker.shards().clone(), self.shard)),
                    reason: GapReason::DataLost,
                    position: Some(from),
                })));
                Stats::add(&self.stats.resets_sent, 1);
                if from < position.seq {
                    self.backfill(channels.iter().cloned(), from, position)
                        .await?;
                }
            }
            Some(seen) if seen.seq < position.seq => {
                self.backfill(channels.iter().cloned(), seen.seq, position)
                    .await?;
            }
            _ => {}
        }
        self.watermark = Some(position);
        self.ready.send_replace(true);
        tracing::info!(
            shard = self.shard,
            channels = channels.len(),
            seq = position.seq,
            "live connection ready"
        );
        let mut subs = Subscriptions {
            confirmed: channels.into_iter().collect(),
            pending: HashSet::new(),
            waiters: Vec::new(),
            queue: VecDeque::new(),
            inflight: None,
        };
        for (channels, reply) in std::mem::take(&mut self.parked) {
            self.on_command(LiveCommand::Ensure(channels, reply), &mut subs);
        }
        Ok((sink, stream, subs))
    }

    /// Replays (after, upto] of `channels` into the hub, in seq order.
    async fn backfill(
        &mut self,
        channels: impl IntoIterator<Item = Channel>,
        after: u64,
        position: Position,
    ) -> Result<(), BrokerError> {
        let upto = position.seq;
        let mut replay = Replay::new(
            self.settings.history.clone(),
            self.shard,
            channels,
            after,
            position,
        );
        let mut count = 0;
        while let Some(item) = replay.next().await? {
            match item {
                ReplayItem::Frame(frame) => {
                    count += 1;
                    self.hub.dispatch(frame);
                }
                ReplayItem::Gap(channel, reason) => {
                    Stats::add(&self.stats.resets_sent, 1);
                    let notice = ResetNotice {
                        channels: Some(vec![channel.clone()]),
                        shard: None,
                        reason,
                        position: None,
                    };
                    self.hub
                        .dispatch_to(&channel, Delivery::Reset(Arc::new(notice)));
                }
            }
        }
        self.hub.broadcast(Delivery::Position {
            shard: self.shard,
            seq: upto,
        });
        Stats::add(&self.stats.events_backfilled, count);
        tracing::info!(after, upto, events = count, "backfilled after reconnecting");
        Ok(())
    }

    fn dispatch(&self, event: Event) {
        // A traced publish: this replica's fan-out joins its trace (sampled where it began).
        let span = match telemetry::traceparent_in(&event.body) {
            Some(traceparent) => {
                let span = tracing::debug_span!(
                    "deliver",
                    channel = %event.channel,
                    event_id = event.seq,
                    replica = %self.settings.replica,
                );
                if !span.is_disabled() {
                    telemetry::continue_from(&span, traceparent);
                }
                span
            }
            None => tracing::Span::none(),
        };
        let _entered = span.enter();
        let (seq, channel) = (event.seq, event.channel.clone());
        match Frame::build(event, self.shard) {
            Ok(frame) => self.hub.dispatch(Arc::new(frame)),
            Err(e) => {
                Stats::add(&self.stats.malformed_messages, 1);
                tracing::warn!(seq, %channel, error = %e, "skipping malformed event");
            }
        }
    }

    async fn serve(
        &mut self,
        sink: LiveSink,
        mut stream: LiveStream,
        mut subs: Subscriptions,
    ) -> Ended {
        let mut markers: JoinSet<Result<bool, BrokerError>> = JoinSet::new();
        let mut tick = tokio::time::interval(self.settings.marker_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_marker = Instant::now();
        let ended = loop {
            if subs.inflight.is_none()
                && let Some(op) = subs.queue.pop_front()
            {
                subs.inflight = Some(start(sink.clone(), op));
            }
            let inflight = async {
                match subs.inflight.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Shutdown,
                message = stream.next() => match message {
                    None => break Ended::Lost,
                    Some(message) => {
                        if let Err(e) = self.on_message(message, &mut last_marker) {
                            break e;
                        }
                    }
                },
                Some(command) = self.commands.recv() => self.on_command(command, &mut subs),
                (op, result) = inflight => {
                    subs.inflight = None;
                    if let Err(e) = result {
                        break Ended::Broker(e);
                    }
                    self.on_done(op, &mut subs);
                }
                _ = tick.tick() => {
                    if last_marker.elapsed() > self.settings.marker_interval * 3 {
                        break Ended::Stale("no marker came back");
                    }
                    let broker = self.broker.clone();
                    let replica = self.settings.replica.clone();
                    let shard = self.shard;
                    markers.spawn(async move { broker.request_marker(shard, &replica).await });
                }
                Some(Ok(result)) = markers.join_next() => match result {
                    Ok(true) => {}
                    Ok(false) => break Ended::Stale("marker had no receiver"),
                    Err(e) => tracing::debug!(error = %e, "marker request failed"),
                },
            }
        };
        // Callers keep waiting, up to their own deadline, for the next connection.
        self.parked.append(&mut subs.waiters);
        ended
    }

    fn on_message(&mut self, message: LiveMessage, last_marker: &mut Instant) -> Result<(), Ended> {
        let Some(watermark) = self.watermark.as_mut() else {
            return Ok(());
        };
        match message {
            LiveMessage::Event(event) => {
                // At or below the watermark: already delivered by the backfill.
                if event.seq > watermark.seq {
                    watermark.seq = event.seq;
                    Stats::add(&self.stats.events_received, 1);
                    self.stats.delivery_latency.observe_body(&event.body);
                    self.dispatch(event);
                }
            }
            LiveMessage::Marker(Position { epoch, seq }) => {
                *last_marker = Instant::now();
                if epoch != watermark.epoch {
                    // A new epoch reached a connection that stayed subscribed (a demoted
                    // primary replicating from the new one): reconnect, which resets clients.
                    return Err(Ended::Stale("the broker began a new epoch"));
                }
                if seq < watermark.seq {
                    return Err(Ended::Stale("the broker's counter went backwards"));
                }
                watermark.seq = seq;
                self.hub.broadcast(Delivery::Position {
                    shard: self.shard,
                    seq,
                });
            }
            LiveMessage::Malformed(what) => {
                Stats::add(&self.stats.malformed_messages, 1);
                tracing::warn!(%what, "skipping malformed live message");
            }
        }
        Ok(())
    }

    fn on_command(&mut self, command: LiveCommand, subs: &mut Subscriptions) {
        match command {
            LiveCommand::Ensure(channels, reply) => {
                let missing: Vec<Channel> = channels
                    .into_iter()
                    .filter(|c| !subs.confirmed.contains(c))
                    .collect();
                if missing.is_empty() {
                    let _ = reply.send(());
                    return;
                }
                let new: Vec<Channel> = missing
                    .iter()
                    .filter(|c| subs.pending.insert((*c).clone()))
                    .cloned()
                    .collect();
                if !new.is_empty() {
                    match subs.queue.back_mut() {
                        Some(Op::Subscribe(batch)) => batch.extend(new),
                        _ => subs.queue.push_back(Op::Subscribe(new)),
                    }
                }
                subs.waiters.push((missing, reply));
            }
            LiveCommand::Release(channels) => {
                let gone: Vec<Channel> = channels
                    .into_iter()
                    .filter(|c| !self.hub.has_subscribers(c) && subs.confirmed.remove(c))
                    .collect();
                if !gone.is_empty() {
                    subs.queue.push_back(Op::Unsubscribe(gone));
                }
            }
        }
    }

    fn on_done(&mut self, op: Op, subs: &mut Subscriptions) {
        let Op::Subscribe(channels) = op else {
            return;
        };
        let mut unwanted = Vec::new();
        for channel in channels {
            subs.pending.remove(&channel);
            if !self.hub.has_subscribers(&channel) {
                unwanted.push(channel.clone());
            } else {
                subs.confirmed.insert(channel);
            }
        }
        if !unwanted.is_empty() {
            subs.queue.push_back(Op::Unsubscribe(unwanted));
        }
        let confirmed = &subs.confirmed;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut subs.waiters)
            .into_iter()
            .filter(|(_, reply)| !reply.is_closed())
            .partition(|(channels, _)| channels.iter().all(|c| confirmed.contains(c)));
        subs.waiters = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }
}

fn start(sink: LiveSink, op: Op) -> OpFuture {
    async move {
        let result = match &op {
            Op::Subscribe(channels) => sink.subscribe(channels).await,
            Op::Unsubscribe(channels) => sink.unsubscribe(channels).await,
        };
        (op, result)
    }
    .boxed()
}
