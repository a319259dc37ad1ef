//! `GET /metrics`: the replica's counters in the Prometheus text format. The counters live in
//! [`Stats`] and the admission state (plain atomics on the hot path); a collector reads them at
//! scrape time. Label values come from fixed sets: never a channel, a user or an address.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use eventgate_core::serve::METRICS_CONTENT_TYPE;

use crate::{GatewayState, hub::Stats, limits::Admission};

/// Why a stream ended: a small fixed set, for the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Client,
    Slow,
    Expired,
    Shutdown,
    Duration,
    Policy,
    Error,
}

impl EndReason {
    pub const COUNT: usize = 7;
    const ALL: [EndReason; Self::COUNT] = [
        EndReason::Client,
        EndReason::Slow,
        EndReason::Expired,
        EndReason::Shutdown,
        EndReason::Duration,
        EndReason::Policy,
        EndReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Client => "client",
            EndReason::Slow => "slow",
            EndReason::Expired => "expired",
            EndReason::Shutdown => "shutdown",
            EndReason::Duration => "duration",
            EndReason::Policy => "policy",
            EndReason::Error => "error",
        }
    }

    /// From the `end` a transport logs (finer grained, also fixed strings).
    pub fn of(end: &str) -> Self {
        match end {
            "client" => EndReason::Client,
            "slow" => EndReason::Slow,
            "token_expired" => EndReason::Expired,
            "shutdown" => EndReason::Shutdown,
            "duration" => EndReason::Duration,
            "binary" | "message_too_big" | "rate_limited" => EndReason::Policy,
            _ => EndReason::Error,
        }
    }

    /// Counts a stream that ended with `end`.
    pub fn count(stats: &Stats, end: &str) {
        Stats::add(&stats.disconnects[Self::of(end) as usize], 1);
    }
}

/// Publish-to-fan-out latency in seconds: 1 ms to about 16 s.
#[derive(Debug)]
pub struct LatencyHistogram(pub Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.001, 2.0, 15)))
    }
}

impl LatencyHistogram {
    /// Observes the age of an event whose body carries `"timestamp":"<RFC 3339>"`.
    pub fn observe_body(&self, body: &[u8]) {
        if let Some(age) = age_of(body) {
            self.0.observe(age.as_secs_f64());
        }
    }
}

/// The publisher's timestamp is the last field of the body it encoded.
fn age_of(body: &[u8]) -> Option<Duration> {
    const KEY: &[u8] = br#""timestamp":""#;
    let start = body.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let end = start + body[start..].iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(&body[start..end]).ok()?;
    let at = humantime::parse_rfc3339(text).ok()?;
    // A clock behind the publisher's counts as zero.
    Some(SystemTime::now().duration_since(at).unwrap_or_default())
}

/// Reads the replica's counters at scrape time.
#[derive(Debug)]
struct GatewayCollector {
    state: std::sync::Weak<GatewayState>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One counter family with a single label.
fn labelled_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Whether each shard's live connection is ready, labelled by shard index (never a channel).
fn shard_gauges(encoder: &mut DescriptorEncoder, ready: &[bool]) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        "shard_ready",
        "1 while this replica's live connection of the shard is ready.",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (shard, up) in ready.iter().enumerate() {
        let shard = shard.to_string();
        let labels = [("shard", shard.as_str())];
        ConstGauge::new(i64::from(*up)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let s = &state.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let e = &mut encoder;
        {
            let mut family = e.encode_descriptor(
                "connections",
                "Streams open now, by transport.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (transport, n) in [
                ("sse", get(&s.connections_sse)),
                ("websocket", get(&s.connections_ws)),
            ] {
                let labels = [("transport", transport)];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        labelled_counters(
            e,
            "connects",
            "Streams opened, by transport.",
            "transport",
            &[
                ("sse", get(&s.connects_sse)),
                ("websocket", get(&s.connects_ws)),
            ],
        )?;
        let ends: Vec<(&str, u64)> = EndReason::ALL
            .iter()
            .map(|r| (r.as_str(), get(&s.disconnects[*r as usize])))
            .collect();
        labelled_counters(
            e,
            "disconnects",
            "Streams ended, by reason.",
            "reason",
            &ends,
        )?;
        gauge(
            e,
            "channels",
            "Channels with a local subscriber.",
            state.hub.channel_count() as i64,
        )?;
        counter(
            e,
            "events_received",
            "Live events received from the broker.",
            get(&s.events_received),
        )?;
        counter(
            e,
            "events_delivered",
            "Events written to clients (live and replayed).",
            get(&s.events_delivered),
        )?;
        counter(
            e,
            "events_replayed",
            "Events written to clients from history on resume.",
            get(&s.events_replayed),
        )?;
        counter(
            e,
            "events_backfilled",
            "Events read from history after a broker reconnect.",
            get(&s.events_backfilled),
        )?;
        counter(
            e,
            "events_dropped",
            "Events discarded with the queues of slow clients (they get them on resume).",
            get(&s.events_dropped),
        )?;
        counter(
            e,
            "slow_clients_dropped",
            "Clients disconnected because their queue filled.",
            get(&s.slow_clients_dropped),
        )?;
        counter(
            e,
            "resets",
            "`reset` notices sent to clients.",
            get(&s.resets_sent),
        )?;
        counter(
            e,
            "broker_reconnects",
            "Reconnects of the replica's live broker connection.",
            get(&s.live_reconnects),
        )?;
        counter(
            e,
            "malformed_messages",
            "Live messages that could not be read.",
            get(&s.malformed_messages),
        )?;
        counter(
            e,
            "history_entries_skipped",
            "History entries that could not be decoded, skipped in replays.",
            get(&s.history_entries_skipped),
        )?;
        gauge(
            e,
            "replay_cache_bytes",
            "Bytes of history pages the replay cache holds.",
            state.history.cached_bytes() as i64,
        )?;
        refusals(e, &state.admission)?;
        shard_gauges(e, &state.live.shards_ready())?;
        gauge(
            e,
            "rate_limit_keys",
            "Client addresses the connect limiter remembers.",
            state.admission.rate_limit_keys() as i64,
        )?;
        let histogram = &s.delivery_latency.0;
        histogram.encode(e.encode_descriptor(
            "delivery_latency_seconds",
            "Time from the publisher accepting an event to this replica handing it to its clients' queues.",
            None,
            histogram.metric_type(),
        )?)?;
        Ok(())
    }
}

fn refusals(encoder: &mut DescriptorEncoder, admission: &Admission) -> std::fmt::Result {
    let r = &admission.refused;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    labelled_counters(
        encoder,
        "refusals",
        "Connections, requests and messages refused by a limit.",
        "limit",
        &[
            ("connect_rate", get(&r.connect_rate)),
            ("tickets_rate", get(&r.tickets_rate)),
            ("ws_message_rate", get(&r.ws_message_rate)),
            ("per_ip_cap", get(&r.per_ip_cap)),
            ("per_user_cap", get(&r.per_user_cap)),
            ("replica_cap", get(&r.replica_cap)),
        ],
    )
}

/// The registry for `/metrics`, reading `state` at each scrape.
pub fn registry(state: &Arc<GatewayState>) -> Registry {
    let mut registry = Registry::with_prefix("eventgate_gateway");
    registry.register_collector(Box::new(GatewayCollector {
        state: Arc::downgrade(state),
    }));
    registry
}

/// Encodes `registry` as Prometheus text (OpenMetrics).
pub fn render(registry: &Registry) -> Response {
    match eventgate_core::serve::encode_metrics(registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            crate::error::ApiError::Internal(format!("encoding metrics: {e}")).into_response()
        }
    }
}
