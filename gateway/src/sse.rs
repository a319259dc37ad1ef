//! `GET /v1/events`: Server-Sent Events.
//!
//! A stream starts with `retry:` and an `id:` line carrying the client's position (so even a
//! client that saw no event resumes exactly), then any `event: reset`, the replay of missed
//! history, and live events. Each live event is written from the bytes the hub rendered once.

use std::{collections::VecDeque, convert::Infallible, sync::Arc};

use axum::{
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use eventgate_broker::{Channel, GapReason, Replay, ReplayItem, parse_cursor};
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::{
    GatewayState,
    error::ApiError,
    frame::{sse_position, sse_reset, write_sse_event},
    hub::{CloseReason, Delivery, Stats},
    session::{Attached, Session, Start, Transport},
};

/// A parsed subscription request.
#[derive(Debug, PartialEq, Eq)]
pub struct EventsRequest {
    pub channels: Vec<Channel>,
    pub cursor: Option<u64>,
}

/// Reads channels and cursor from the query and `Last-Event-ID`. The header wins: a browser's
/// `EventSource` reconnects to the same URL, so `?last_event_id=` still holds the first value.
pub fn parse_request(
    query: Option<&str>,
    headers: &HeaderMap,
    max_channels: usize,
) -> Result<EventsRequest, ApiError> {
    let mut channels: Vec<Channel> = Vec::new();
    let mut cursor_param = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "channel" => {
                let channel = Channel::parse(&value).map_err(|e| {
                    ApiError::bad_request("invalid_channel", format!("channel {value:?}: {e}"))
                })?;
                if !channels.contains(&channel) {
                    channels.push(channel);
                }
            }
            "last_event_id" => cursor_param = Some(value.into_owned()),
            _ => {}
        }
    }
    if channels.is_empty() {
        return Err(ApiError::bad_request(
            "missing_channel",
            "name at least one channel, as in /v1/events?channel=orders&channel=user:42",
        ));
    }
    if channels.len() > max_channels {
        return Err(ApiError::bad_request(
            "too_many_channels",
            format!(
                "{} channels requested; the limit is {max_channels}",
                channels.len()
            ),
        ));
    }
    let header = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::bad_request("invalid_last_event_id", "Last-Event-ID is not valid text")
        })?),
        None => None,
    };
    let cursor = match header.filter(|h| !h.is_empty()).or(cursor_param.as_deref()) {
        Some(text) => Some(
            parse_cursor(text)
                .map_err(|e| ApiError::bad_request("invalid_last_event_id", e.to_string()))?,
        ),
        None => None,
    };
    Ok(EventsRequest { channels, cursor })
}

pub async fn events(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let request = parse_request(
        query.as_deref(),
        &headers,
        state.config.max_channels_per_connection as usize,
    )?;
    let session = state.new_session(Transport::Sse)?;
    let attached = state
        .attach(&session, &request.channels, request.cursor)
        .await?;
    let writer = SseWriter::new(session, request.channels, attached, &state);
    let body = Body::from_stream(futures::stream::unfold(writer, |mut writer| async move {
        writer
            .next_chunk()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), writer))
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Largest replay chunk handed to the connection at once.
const REPLAY_CHUNK: usize = 64 * 1024;

/// Produces one client's stream.
struct SseWriter {
    session: Session,
    channels: Vec<Channel>,
    /// Highest seq this client has been given (events or position lines). Live deliveries at
    /// or below it are duplicates of the replay and are dropped.
    floor: u64,
    /// The broker position when the subscription went live; the replay ends there.
    position: u64,
    prelude: Option<Bytes>,
    replay: Option<(Box<Replay>, Option<ReplayItem>)>,
    pending: VecDeque<Delivery>,
    heartbeat: Interval,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    finished: bool,
    /// Events written to this client.
    sent: u64,
    /// Events written but not yet added to the replica's counter.
    uncounted: u64,
    opened: Instant,
    end: &'static str,
}

impl SseWriter {
    fn new(
        session: Session,
        channels: Vec<Channel>,
        attached: Attached,
        state: &GatewayState,
    ) -> Self {
        let Attached { position, start } = attached;
        let base = state.config.sse_retry.as_millis() as u64;
        let retry = base + rand::random_range(0..=base / 2);
        let mut prelude = BytesMut::from(format!("retry: {retry}\n").as_bytes());
        let (floor, replay, unknown) = match start {
            Start::Fresh => (position, None, false),
            Start::Unknown => (position, None, true),
            Start::Resume {
                cursor,
                replay,
                first,
            } => (cursor, Some((replay, first)), false),
        };
        prelude.extend_from_slice(&sse_position(floor));
        if unknown {
            prelude.extend_from_slice(&sse_reset(&channels, GapReason::UnknownPosition, None));
            Stats::add(&state.stats.resets_sent, 1);
        }
        let interval = state.config.heartbeat_interval;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            session,
            channels,
            floor,
            position,
            prelude: Some(prelude.freeze()),
            replay,
            pending: VecDeque::new(),
            heartbeat,
            shutdown: state.shutdown.clone(),
            stats: state.stats.clone(),
            finished: false,
            sent: 0,
            uncounted: 0,
            opened: Instant::now(),
            end: "client",
        }
    }

    /// The next bytes to write, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        if let Some(prelude) = self.prelude.take() {
            return Some(prelude);
        }
        if self.replay.is_some() {
            if self.shutdown.is_cancelled() {
                return self.finish("shutdown", None);
            }
            let chunk = self.replay_chunk().await;
            if !chunk.is_empty() {
                return Some(chunk);
            }
            if self.finished {
                return None;
            }
        }
        loop {
            while let Some(delivery) = self.pending.pop_front() {
                if let Some(bytes) = self.render(delivery) {
                    return Some(bytes);
                }
            }
            // Counted per batch, not per event: the counter is shared by every writer.
            Stats::add(
                &self.stats.events_delivered,
                std::mem::take(&mut self.uncounted),
            );
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.finish("shutdown", None),
                received = self.session.queue.recv(&mut self.pending) => {
                    if let Err(CloseReason::Slow) = received {
                        let note = Bytes::from_static(b": disconnected: too slow; reconnect to resume\n\n");
                        return self.finish("slow", Some(note));
                    }
                }
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": ping\n\n")),
            }
        }
    }

    /// Up to [`REPLAY_CHUNK`] bytes of replayed history; ends the replay with a position line.
    async fn replay_chunk(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        let mut replayed = 0;
        while out.len() < REPLAY_CHUNK {
            let Some((replay, first)) = self.replay.as_mut() else {
                break;
            };
            let item = match first.take() {
                Some(item) => Some(item),
                None => match replay.next().await {
                    Ok(item) => item,
                    Err(e) => {
                        tracing::warn!(client = self.session.client, error = %e, "replay failed; ending stream");
                        self.replay = None;
                        self.finished = true;
                        self.end = "broker_error";
                        break;
                    }
                },
            };
            match item {
                Some(ReplayItem::Event(event)) if event.seq > self.floor => {
                    match write_sse_event(&event, &mut out) {
                        Ok(()) => replayed += 1,
                        Err(e) => {
                            tracing::warn!(seq = event.seq, error = %e, "skipping malformed event")
                        }
                    }
                    self.floor = event.seq;
                }
                Some(ReplayItem::Event(_)) => {}
                Some(ReplayItem::Gap(channel, reason)) => {
                    Stats::add(&self.stats.resets_sent, 1);
                    out.extend_from_slice(&sse_reset(&[channel], reason, None));
                }
                None => {
                    self.replay = None;
                    if self.position > self.floor {
                        self.floor = self.position;
                        out.extend_from_slice(&sse_position(self.position));
                    }
                }
            }
        }
        self.sent += replayed;
        Stats::add(&self.stats.events_replayed, replayed);
        Stats::add(&self.stats.events_delivered, replayed);
        out.freeze()
    }

    fn render(&mut self, delivery: Delivery) -> Option<Bytes> {
        match delivery {
            Delivery::Event(frame) if frame.seq() > self.floor => {
                self.floor = frame.seq();
                self.sent += 1;
                self.uncounted += 1;
                Some(frame.sse.clone())
            }
            Delivery::Event(_) => None,
            Delivery::Position(seq) if seq > self.floor => {
                self.floor = seq;
                Some(sse_position(seq))
            }
            Delivery::Position(_) => None,
            Delivery::Reset(notice) => {
                let channels: Vec<Channel> = match &notice.channels {
                    None => self.channels.clone(),
                    Some(list) => list
                        .iter()
                        .filter(|c| self.channels.contains(c))
                        .cloned()
                        .collect(),
                };
                if channels.is_empty() {
                    return None;
                }
                if let Some(position) = notice.position {
                    self.floor = position;
                }
                Some(sse_reset(&channels, notice.reason, notice.position))
            }
        }
    }

    fn finish(&mut self, end: &'static str, last: Option<Bytes>) -> Option<Bytes> {
        self.finished = true;
        self.end = end;
        last
    }
}

impl Drop for SseWriter {
    fn drop(&mut self) {
        Stats::add(&self.stats.events_delivered, self.uncounted);
        tracing::info!(
            client = self.session.client,
            transport = "sse",
            channels = self.channels.len(),
            events = self.sent,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            end = self.end,
            "stream closed"
        );
    }
}
