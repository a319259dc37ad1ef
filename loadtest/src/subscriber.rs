//! Subscribers: SSE over a raw HTTP/1.1 connection, or WebSocket. Each checks the sequence of
//! its channel (duplicates, gaps) and records publish-to-receive latency.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{
    net::{Sources, now_micros},
    target::{Kind, Target, Transport, read_payload},
};

/// Which subscribers a shard opens and what they expect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubscriberSpec {
    pub target: Target,
    pub transport: Transport,
    pub channel_prefix: String,
    /// Subscribers over all shards; subscriber `i` is on channel `i % channels` and gateway
    /// `i % gateways`, and belongs to shard `i % shards`.
    pub subscribers: usize,
    pub channels: usize,
    pub shard: usize,
    pub shards: usize,
    /// Resume point sent as `Last-Event-ID` (SSE) or `since` (eventgate WebSocket).
    pub resume_from: Option<String>,
    /// The `n` of the first event each subscriber should see.
    pub first_n: u64,
    /// A subscriber counts as caught up once it has this many events.
    pub expect: Option<u64>,
    pub source_ips: String,
    pub connect_concurrency: usize,
}

impl SubscriberSpec {
    /// Live subscribers from the current position, over every shard (set by `Shards`).
    pub fn live(
        target: Target,
        transport: Transport,
        channel_prefix: String,
        subscribers: usize,
        channels: usize,
        source_ips: String,
        connect_concurrency: usize,
    ) -> Self {
        Self {
            target,
            transport,
            channel_prefix,
            subscribers,
            channels: channels.max(1),
            shard: 0,
            shards: 1,
            resume_from: None,
            first_n: 0,
            expect: None,
            source_ips,
            connect_concurrency,
        }
    }

    pub fn mine(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.subscribers).filter(|i| i % self.shards == self.shard)
    }
}

/// Counters of one shard, shared by its subscriber tasks.
pub struct Shard {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub resets: AtomicU64,
    pub closed_early: AtomicU64,
    pub caught_up: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    connect: Mutex<Histogram<u64>>,
    pub stop: CancellationToken,
}

/// What a shard reports at the end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ShardResult {
    pub connected: u64,
    pub failed: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub resets: u64,
    pub closed_early: u64,
    pub caught_up: u64,
    /// Latency in microseconds, as (value, count) pairs.
    pub latency: Vec<(u64, u64)>,
    /// Connect time in microseconds, as (value, count) pairs.
    pub connect: Vec<(u64, u64)>,
    /// CPU time of the process that ran the shard, in milliseconds.
    pub cpu_ms: u64,
}

pub fn histogram() -> Histogram<u64> {
    // Microseconds up to an hour, 3 significant figures; cannot fail with these bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

pub fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

const STRIPES: usize = 16;

impl Shard {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            latency: (0..STRIPES).map(|_| Mutex::new(histogram())).collect(),
            connect: Mutex::new(histogram()),
            stop: CancellationToken::new(),
        })
    }

    pub fn result(&self, cpu_ms: u64) -> ShardResult {
        let mut latency = histogram();
        for stripe in &self.latency {
            if let Ok(h) = stripe.lock() {
                let _ = latency.add(&*h);
            }
        }
        let connect = self.connect.lock().map(|h| pairs(&h)).unwrap_or_default();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShardResult {
            connected: get(&self.connected),
            failed: get(&self.failed),
            delivered: get(&self.delivered),
            duplicates: get(&self.duplicates),
            gaps: get(&self.gaps),
            resets: get(&self.resets),
            closed_early: get(&self.closed_early),
            caught_up: get(&self.caught_up),
            latency: pairs(&latency),
            connect,
            cpu_ms,
        }
    }
}

/// Starts this shard's subscribers; they run until `shard.stop` is cancelled.
pub fn start(spec: Arc<SubscriberSpec>, shard: Arc<Shard>) -> anyhow::Result<JoinSet<()>> {
    let sources = Arc::new(Sources::parse(&spec.source_ips)?);
    let permits = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for index in spec.mine() {
        let (spec, shard, sources, permits) = (
            spec.clone(),
            shard.clone(),
            sources.clone(),
            permits.clone(),
        );
        tasks.spawn(async move {
            let started = Instant::now();
            let mut sub = Subscriber::new(&spec, shard.clone(), index);
            let result = match spec.transport {
                Transport::Sse => sub.sse(&spec, &sources, &permits, started).await,
                Transport::Ws => sub.ws(&spec, &sources, &permits, started).await,
            };
            if sub.connected {
                if !shard.stop.is_cancelled() {
                    shard.closed_early.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                shard.failed.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    eprintln!("subscriber {index}: {e:#}");
                }
            }
        });
    }
    Ok(tasks)
}

struct Subscriber {
    shard: Arc<Shard>,
    stripe: usize,
    next: u64,
    received: u64,
    expect: Option<u64>,
    connected: bool,
    channel: String,
    gateway: usize,
    // Counts not yet added to the shard's counters.
    delivered: u64,
    duplicates: u64,
    gaps: u64,
    latencies: Vec<u64>,
}

impl Subscriber {
    fn new(spec: &SubscriberSpec, shard: Arc<Shard>, index: usize) -> Self {
        Self {
            shard,
            stripe: index % STRIPES,
            next: spec.first_n,
            received: 0,
            expect: spec.expect,
            connected: false,
            channel: Target::channel(&spec.channel_prefix, index % spec.channels),
            gateway: index % spec.target.gateways.len(),
            delivered: 0,
            duplicates: 0,
            gaps: 0,
            latencies: Vec::new(),
        }
    }

    fn on_connected(&mut self, started: Instant) {
        self.connected = true;
        self.shard.connected.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.shard.connect.lock() {
            let _ = h.record(started.elapsed().as_micros().max(1) as u64);
        }
    }

    fn on_payload(&mut self, data: &[u8], now: u64) {
        let Some((n, t)) = read_payload(data) else {
            return;
        };
        self.latencies.push(now.saturating_sub(t).max(1));
        self.delivered += 1;
        self.received += 1;
        if n == self.next {
            self.next += 1;
        } else if n < self.next {
            self.duplicates += 1;
        } else {
            self.gaps += 1;
            self.next = n + 1;
        }
        if self.expect == Some(self.received) {
            self.shard.caught_up.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds what was counted since the last flush to the shard.
    fn flush(&mut self) {
        if self.delivered == 0 {
            return;
        }
        if let Ok(mut h) = self.shard.latency[self.stripe].lock() {
            for &l in &self.latencies {
                let _ = h.record(l);
            }
        }
        self.latencies.clear();
        self.shard
            .duplicates
            .fetch_add(std::mem::take(&mut self.duplicates), Ordering::Relaxed);
        self.shard
            .gaps
            .fetch_add(std::mem::take(&mut self.gaps), Ordering::Relaxed);
        self.shard
            .delivered
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
    }

    async fn sse(
        &mut self,
        spec: &SubscriberSpec,
        sources: &Sources,
        permits: &Semaphore,
        started: Instant,
    ) -> anyhow::Result<()> {
        let gateway = &spec.target.gateways[self.gateway];
        let permit = permits.acquire().await?;
        let stream = sources.connect(gateway.addr).await.context("connect")?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
        let mut conn = std::pin::pin!(conn);
        let mut request = Request::get(spec.target.subscribe_path(Transport::Sse, &self.channel))
            .header(header::HOST, &gateway.host)
            .header(header::ACCEPT, "text/event-stream");
        if let Some(id) = &spec.resume_from {
            request = request.header("last-event-id", id);
        }
        if let Some(token) = &spec.target.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = tokio::select! {
            response = sender.send_request(request.body(Empty::new())?) => response?,
            _ = &mut conn => bail!("connection closed before the response"),
        };
        if !response.status().is_success() {
            bail!("status {}", response.status());
        }
        self.on_connected(started);
        drop(permit);
        let mut body = response.into_body();
        let mut buf = BytesMut::new();
        let stop = self.shard.stop.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = &mut conn => return Ok(()),
                frame = body.frame() => {
                    let Some(Ok(frame)) = frame else { return Ok(()) };
                    let Ok(data) = frame.into_data() else { continue };
                    buf.extend_from_slice(&data);
                    self.sse_blocks(&mut buf);
                    self.flush();
                }
            }
        }
    }

    /// Processes every complete block (`…\n\n`) in `buf`.
    fn sse_blocks(&mut self, buf: &mut BytesMut) {
        let now = now_micros();
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block = buf.split_to(end + 2);
            let mut is_reset = false;
            for line in block[..].split(|&b| b == b'\n') {
                if line == b"event: reset" {
                    is_reset = true;
                }
                if let Some(data) = line
                    .strip_prefix(b"data: ")
                    .or_else(|| line.strip_prefix(b"data:"))
                {
                    if is_reset {
                        self.shard.resets.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.on_payload(data, now);
                    }
                }
            }
        }
    }

    async fn ws(
        &mut self,
        spec: &SubscriberSpec,
        sources: &Sources,
        permits: &Semaphore,
        started: Instant,
    ) -> anyhow::Result<()> {
        let gateway = &spec.target.gateways[self.gateway];
        let permit = permits.acquire().await?;
        let stream = sources.connect(gateway.addr).await.context("connect")?;
        let url = format!(
            "ws://{}{}",
            gateway.host,
            spec.target.subscribe_path(Transport::Ws, &self.channel)
        );
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        if let Some(token) = &spec.target.token {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        }
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await?;
        if spec.target.kind == Kind::Eventgate {
            let mut subscribe = serde_json::json!({"type": "subscribe", "channel": self.channel});
            if let Some(since) = &spec.resume_from {
                subscribe["since"] = since.clone().into();
            }
            socket
                .send(Message::Text(subscribe.to_string().into()))
                .await?;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) if text.contains(r#""type":"subscribed""#) => {
                        break;
                    }
                    Some(Ok(Message::Text(text))) if text.contains(r#""type":"error""#) => {
                        bail!("{text}")
                    }
                    Some(Ok(_)) => {}
                    _ => bail!("closed before subscribed"),
                }
            }
        }
        self.on_connected(started);
        drop(permit);
        let stop = self.shard.stop.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let bytes = text.as_bytes();
                        if bytes.starts_with(br#"{"type":"reset""#) {
                            self.shard.resets.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.on_payload(bytes, now_micros());
                        }
                        self.flush();
                    }
                    Some(Ok(_)) => {}
                    _ => return Ok(()),
                }
            }
        }
    }
}
