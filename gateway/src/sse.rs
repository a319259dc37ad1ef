//! `GET /v1/events`: Server-Sent Events.
//!
//! A stream starts with `retry:` and an `id:` line carrying the client's position (so even a
//! client that saw no event resumes exactly), then any `event: reset`, the replay of missed
//! history, and live events. Each live event is written from the bytes the hub rendered once.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use eventgate_core::{Channel, Cursor, GapReason, config::parse_duration};
use tokio::time::{Instant, Sleep};

use crate::{
    GatewayState,
    error::ApiError,
    frame::{Frame, sse_position, sse_position_event, sse_reset},
    hub::{ClientQueue, CloseReason, Delivery, Direct, Form, Stats},
    metrics::EndReason,
    replay::{Replay, ReplayItem},
    session::{Attached, Session, Start, Transport},
};

/// A parsed subscription request.
#[derive(Debug, PartialEq, Eq)]
pub struct EventsRequest {
    pub channels: Vec<Channel>,
    pub cursor: Option<Cursor>,
    /// `?duration=`: end the stream after this long (monitoring probes, clients that cannot
    /// read an endless response). `EventSource` then reconnects and resumes as usual.
    pub duration: Option<Duration>,
    /// `?position_events=true`: position lines as `eventgate-position` events.
    pub position_events: bool,
}

/// Longest `?duration=`.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Reads channels and cursor from the query and `Last-Event-ID`. The header wins: a browser's
/// `EventSource` reconnects to the same URL, so `?last_event_id=` still holds the first value.
pub fn parse_request(
    query: Option<&str>,
    headers: &HeaderMap,
    max_channels: usize,
    shard_count: usize,
) -> Result<EventsRequest, ApiError> {
    let mut channels: Vec<Channel> = Vec::new();
    let mut cursor_param = None;
    let mut duration = None;
    let mut position_events = false;
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
            // Empty means none, like an empty `Last-Event-ID` header: a page can always send it.
            "last_event_id" if value.is_empty() => {}
            "last_event_id" => cursor_param = Some(value.into_owned()),
            "duration" => {
                let parsed = parse_duration(&value)
                    .ok()
                    .filter(|d| *d <= MAX_DURATION)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_duration",
                            format!(
                                "duration {value:?}: use a span such as 30s or 5m, at most 24h"
                            ),
                        )
                    })?;
                duration = Some(parsed);
            }
            "position_events" => {
                position_events = match &*value {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_position_events",
                            format!("position_events {value:?}: use true or false"),
                        ));
                    }
                }
            }
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
        Some(text) => {
            let cursor = Cursor::parse(text)
                .map_err(|e| ApiError::bad_request("invalid_last_event_id", e.to_string()))?;
            // An id over several shards from a deployment with another shard count.
            if let Cursor::Shards { count, .. } = &cursor
                && *count != shard_count
            {
                return Err(ApiError::bad_request(
                    "invalid_last_event_id",
                    format!(
                        "event id {text:?} is from a deployment with {count} shards, this one \
                         has {shard_count}: open the stream without it"
                    ),
                ));
            }
            Some(cursor)
        }
        None => None,
    };
    Ok(EventsRequest {
        channels,
        cursor,
        duration,
        position_events,
    })
}

/// Opens a stream: checks the request, who sends it and what it may read, then attaches. Every
/// refusal happens here, before a byte of the stream is written.
pub(crate) async fn open(
    state: &GatewayState,
    client: IpAddr,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<SseBody, ApiError> {
    // Caps and the connect rate first: refusing costs nothing, verifying a token does.
    let mut slot = state.admission.admit(client)?;
    let request = parse_request(
        query,
        headers,
        state.config.max_channels_per_connection as usize,
        state.broker.shards().count(),
    )?;
    let (identity, _) = state
        .auth
        .authenticate(&state.broker, headers, query)
        .await?;
    if let Some(channel) = identity.first_denied(&request.channels) {
        return Err(ApiError::Forbidden(channel.clone()));
    }
    slot.add_user(&identity.sub)?;
    let session = state.new_session(Transport::Sse, slot)?;
    let attached = state
        .attach(&session, &request.channels, request.cursor.as_ref())
        .await?;
    let ends = match request.duration {
        Some(duration) if duration < state.auth.lifetime(&identity) => (duration, Ending::Duration),
        _ => (state.auth.lifetime(&identity), Ending::Expired),
    };
    Ok(SseBody::new(
        session,
        request.channels,
        ends,
        attached,
        request.position_events,
        state,
    ))
}

pub async fn events(
    State(state): State<Arc<GatewayState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let client = state.admission.trusted.client_key(peer.ip(), &headers);
    let body = open(&state, client, query.as_deref(), &headers).await?;
    let mut response = Body::new(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Why a stream ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// `?duration=` passed.
    Duration,
    /// The token expired: an `expired` event, then the end.
    Expired,
}

/// The last message of a stream whose token expired. The client comes back with a fresh
/// credential and its `Last-Event-ID` and loses nothing.
const EXPIRED: &[u8] = b"event: expired\ndata: {\"reason\":\"token_expired\",\"message\":\"the token has expired; reconnect with a fresh ticket and Last-Event-ID\"}\n\n";

/// Largest chunk handed to the connection at once (replay pages, coalesced live events).
const CHUNK: usize = 64 * 1024;

/// The connection's position on each shard its channels are on: what it has been given (events
/// or position lines). Live deliveries at or below it are duplicates of the replay and are
/// dropped. Its id is one shard's plain `seq`, or all of them as a `v1.` cursor.
#[derive(Clone)]
struct Floors {
    /// The deployment's shard count.
    count: usize,
    /// `(shard, seq)`, in shard order.
    shards: Vec<(usize, u64)>,
    /// Positions are written as events a script sees (`?position_events=true`).
    fired: bool,
}

impl Floors {
    /// The connection's position, as an id-only line or as an event.
    fn position_bytes(&self) -> Bytes {
        if self.fired {
            sse_position_event(&self.id())
        } else {
            sse_position(&self.id())
        }
    }

    fn get(&self, shard: usize) -> Option<u64> {
        self.shards
            .iter()
            .find(|(s, _)| *s == shard)
            .map(|(_, f)| *f)
    }

    /// Moves shard `shard` to `seq` if that is ahead; whether it moved.
    fn raise(&mut self, shard: usize, seq: u64) -> bool {
        match self.shards.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, floor)) if seq > *floor => {
                *floor = seq;
                true
            }
            _ => false,
        }
    }

    /// Moves shard `shard` to `seq`, back included (after a data loss).
    fn set(&mut self, shard: usize, seq: u64) {
        if let Some((_, floor)) = self.shards.iter_mut().find(|(s, _)| *s == shard) {
            *floor = seq;
        }
    }

    /// The id a browser keeps: plain on one shard, `v1.…` over several.
    fn id(&self) -> String {
        Cursor::render(self.count, &self.shards)
    }

    /// `frame` as this connection writes it: the shared bytes as they are on one shard, with
    /// the connection's own id line over several.
    fn event_bytes(&self, frame: &Frame) -> Bytes {
        if self.shards.len() == 1 {
            return frame.sse.clone();
        }
        let rest = frame.sse_without_id();
        let mut out = BytesMut::with_capacity(rest.len() + 48);
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(self.id().as_bytes());
        out.extend_from_slice(b"\n");
        out.extend_from_slice(&rest);
        out.freeze()
    }
}

/// One step of a replay, run as a boxed future inside the body.
struct ReplayStep {
    /// The replay, unless it is finished (or failed).
    replay: Option<Box<Replay>>,
    bytes: Bytes,
    floors: Floors,
    replayed: u64,
    resets: u64,
    failed: bool,
}

/// Replays up to [`CHUNK`] bytes of one shard; at the end moves the shard's position to the
/// replay's.
async fn replay_chunk(
    mut replay: Box<Replay>,
    mut first: Option<ReplayItem>,
    mut floors: Floors,
) -> ReplayStep {
    let shard = replay.shard();
    let position = replay.position().seq;
    let mut out = BytesMut::new();
    let (mut replayed, mut resets) = (0, 0);
    while out.len() < CHUNK {
        let item = match first.take() {
            Some(item) => Some(item),
            None => match replay.next().await {
                Ok(item) => item,
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed; ending stream");
                    return ReplayStep {
                        replay: None,
                        bytes: out.freeze(),
                        floors,
                        replayed,
                        resets,
                        failed: true,
                    };
                }
            },
        };
        match item {
            Some(ReplayItem::Frame(frame)) => {
                if floors.raise(shard, frame.seq()) {
                    out.extend_from_slice(&floors.event_bytes(&frame));
                    replayed += 1;
                }
            }
            Some(ReplayItem::Gap(channel, reason)) => {
                resets += 1;
                out.extend_from_slice(&sse_reset(&[channel], reason, None));
            }
            None => {
                if floors.raise(shard, position) {
                    out.extend_from_slice(&floors.position_bytes());
                }
                return ReplayStep {
                    replay: None,
                    bytes: out.freeze(),
                    floors,
                    replayed,
                    resets,
                    failed: false,
                };
            }
        }
    }
    ReplayStep {
        replay: Some(replay),
        bytes: out.freeze(),
        floors,
        replayed,
        resets,
        failed: false,
    }
}

type ReplayFuture = Pin<Box<dyn Future<Output = ReplayStep> + Send>>;

/// One client's stream, polled by hyper: the prelude, the replay, then the client's queue.
/// Written as a `Body` rather than an async stream so the live path is one `poll_recv`.
pub(crate) struct SseBody {
    session: Session,
    channels: Vec<Channel>,
    /// The position on each shard; `None` while a replay step holds it.
    floors: Option<Floors>,
    prelude: Option<Bytes>,
    /// The replay step running, and the shards' replays waiting, one shard after another.
    replay: Option<ReplayFuture>,
    replays: VecDeque<(Box<Replay>, Option<ReplayItem>)>,
    pending: VecDeque<Delivery>,
    stats: Arc<Stats>,
    finished: bool,
    /// Events written to this client.
    sent: u64,
    /// Events written but not yet added to the replica's counter.
    uncounted: u64,
    /// An event went out since the last position delivery: the client's id is current.
    busy_since_position: bool,
    /// Something went out since the last heartbeat: the connection is visibly alive.
    busy_since_heartbeat: bool,
    /// When the stream ends by itself: at `?duration=`, or when the token expires.
    ends: Pin<Box<Sleep>>,
    /// `SSE_RETRY` in milliseconds, for the jittered `retry:` sent at shutdown.
    retry_base_ms: u32,
    ending: Ending,
    opened: Instant,
    end: &'static str,
}

impl SseBody {
    pub(crate) fn new(
        session: Session,
        channels: Vec<Channel>,
        (ends, ending): (Duration, Ending),
        attached: Attached,
        position_events: bool,
        state: &GatewayState,
    ) -> Self {
        let base = state.config.sse_retry.as_millis() as u64;
        let retry = base + rand::random_range(0..=base / 2);
        let mut prelude = BytesMut::from(format!("retry: {retry}\n").as_bytes());
        let mut floors = Floors {
            count: state.broker.shards().count(),
            shards: Vec::new(),
            fired: position_events,
        };
        let mut unknown = Vec::new();
        let mut replays = VecDeque::new();
        for part in attached.shards {
            let floor = match part.start {
                Start::Fresh => part.position,
                Start::Unknown => {
                    unknown.extend(part.channels);
                    part.position
                }
                Start::Resume {
                    cursor,
                    replay,
                    first,
                    reset,
                } => {
                    if reset {
                        unknown.extend(part.channels);
                    }
                    replays.push_back((replay, first));
                    cursor
                }
            };
            floors.shards.push((part.shard, floor));
        }
        prelude.extend_from_slice(&floors.position_bytes());
        if !unknown.is_empty() {
            prelude.extend_from_slice(&sse_reset(&unknown, GapReason::UnknownPosition, None));
            Stats::add(&state.stats.resets_sent, 1);
        }
        let replay = replays.pop_front().map(|(replay, first)| {
            Box::pin(replay_chunk(replay, first, floors.clone())) as ReplayFuture
        });
        Self {
            session,
            channels,
            floors: (replay.is_none()).then_some(floors),
            prelude: Some(prelude.freeze()),
            replay,
            replays,
            pending: VecDeque::new(),
            stats: state.stats.clone(),
            finished: false,
            sent: 0,
            uncounted: 0,
            busy_since_position: false,
            busy_since_heartbeat: false,
            ends: Box::pin(tokio::time::sleep(ends)),
            retry_base_ms: u32::try_from(base).unwrap_or(u32::MAX),
            ending,
            opened: Instant::now(),
            end: "client",
        }
    }

    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            if self.ends.as_mut().poll(cx).is_ready() {
                // The last bytes are this writer's: the hub stops writing first, and the rest
                // of an event it wrote in part goes out before them.
                let (direct, rest) = self.session.queue.stop_direct();
                self.take_back(direct);
                let (end, last) = match self.ending {
                    Ending::Duration => ("duration", &b""[..]),
                    Ending::Expired => ("token_expired", EXPIRED),
                };
                self.finish(end);
                let mut out = BytesMut::from(rest.as_deref().unwrap_or_default());
                out.extend_from_slice(last);
                return Poll::Ready((!out.is_empty()).then(|| out.freeze()));
            }
            if let Some(prelude) = self.prelude.take() {
                return Poll::Ready(Some(prelude));
            }
            if let Some(step) = self.replay.as_mut() {
                let step = ready!(step.as_mut().poll(cx));
                self.sent += step.replayed;
                Stats::add(&self.stats.events_replayed, step.replayed);
                Stats::add(&self.stats.events_delivered, step.replayed);
                Stats::add(&self.stats.resets_sent, step.resets);
                // This shard's replay goes on, or the next shard's starts.
                let next = match step.replay {
                    Some(replay) => Some((replay, None)),
                    None => self.replays.pop_front(),
                };
                self.replay = match next {
                    Some((replay, first)) if !step.failed => {
                        Some(Box::pin(replay_chunk(replay, first, step.floors.clone()))
                            as ReplayFuture)
                    }
                    _ => None,
                };
                if self.replay.is_none() {
                    self.floors = Some(step.floors);
                }
                if step.failed {
                    self.finish("broker_error");
                }
                if !step.bytes.is_empty() {
                    return Poll::Ready(Some(step.bytes));
                }
                continue;
            }
            if let Some(chunk) = self.render_pending() {
                return Poll::Ready(Some(chunk));
            }
            // Counted per batch, not per event: the counter is shared by every writer.
            Stats::add(
                &self.stats.events_delivered,
                std::mem::take(&mut self.uncounted),
            );
            let offer = self.direct_offer();
            match ready!(
                self.session
                    .queue
                    .poll_recv_direct(cx, &mut self.pending, offer)
            ) {
                Ok(direct) => self.take_back(direct),
                Err(CloseReason::Slow) => {
                    self.finish("slow");
                    return Poll::Ready(Some(Bytes::from_static(
                        b": disconnected: too slow; reconnect to resume\n\n",
                    )));
                }
                Err(CloseReason::Shutdown) => {
                    self.finish("shutdown");
                    // Every client of this replica reconnects now: spread them over a few
                    // seconds (SSE_RETRY plus up to twice as much again).
                    let base = u64::from(self.retry_base_ms);
                    let retry = base + rand::random_range(0..=base * 2);
                    return Poll::Ready(Some(Bytes::from(format!("retry: {retry}\n\n"))));
                }
            }
        }
    }

    /// The client's queue (its socket is kept there, see [`Direct`]).
    pub(crate) fn queue(&self) -> Arc<ClientQueue> {
        self.session.queue.clone()
    }

    /// Whether the hub may write this stream's events straight to its socket while it waits:
    /// on one shard, with the replays done and nothing left to write.
    fn direct_offer(&self) -> Option<Direct> {
        let floors = self.floors.as_ref()?;
        match floors.shards[..] {
            [(shard, floor)] if self.pending.is_empty() && !self.finished => {
                Some(Direct::new(shard, floor, Form::Sse))
            }
            _ => None,
        }
    }

    /// Takes in what the hub wrote while this waited: its position and its events.
    fn take_back(&mut self, direct: Option<Direct>) {
        let Some(direct) = direct else { return };
        if let Some(floors) = self.floors.as_mut() {
            floors.raise(direct.shard, direct.floor);
        }
        if direct.written > 0 {
            self.sent += direct.written;
            self.busy_since_position = true;
            self.busy_since_heartbeat = true;
        }
    }

    /// Renders queued deliveries into one chunk: one shared frame as is, several copied
    /// together (fewer chunks and writes for hyper).
    fn render_pending(&mut self) -> Option<Bytes> {
        let mut first: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        while let Some(delivery) = self.pending.pop_front() {
            let Some(bytes) = self.render(delivery) else {
                continue;
            };
            match (&mut first, &mut joined) {
                (None, _) => first = Some(bytes),
                (Some(one), None) => {
                    let mut buf = BytesMut::with_capacity(CHUNK.min(one.len() + bytes.len() * 8));
                    buf.extend_from_slice(one);
                    buf.extend_from_slice(&bytes);
                    joined = Some(buf);
                }
                (Some(_), Some(buf)) => buf.extend_from_slice(&bytes),
            }
            if joined.as_ref().is_some_and(|b| b.len() >= CHUNK) {
                break;
            }
        }
        joined.map(BytesMut::freeze).or(first)
    }

    fn render(&mut self, delivery: Delivery) -> Option<Bytes> {
        // Deliveries are rendered only once the replays are done.
        let floors = self.floors.as_mut()?;
        match delivery {
            Delivery::Rest(bytes) => Some(Bytes::from(bytes)),
            Delivery::Event(frame) => {
                if !floors.raise(frame.shard, frame.seq()) {
                    return None;
                }
                self.sent += 1;
                self.uncounted += 1;
                self.busy_since_position = true;
                self.busy_since_heartbeat = true;
                Some(floors.event_bytes(&frame))
            }
            // Positions and heartbeats go only to quiet clients: a client that just got an event
            // already has a current id and a live connection, and writing to every client at
            // once delays the events behind it.
            Delivery::Position { shard, seq }
                if !self.busy_since_position && floors.get(shard).is_some_and(|f| seq > f) =>
            {
                floors.raise(shard, seq);
                self.busy_since_heartbeat = true;
                Some(floors.position_bytes())
            }
            Delivery::Position { .. } => {
                self.busy_since_position = false;
                None
            }
            Delivery::Heartbeat if self.busy_since_heartbeat => {
                self.busy_since_heartbeat = false;
                None
            }
            Delivery::Heartbeat => Some(Bytes::from_static(b": ping\n\n")),
            Delivery::Reset(notice) => {
                let channels = notice.among(&self.channels);
                if channels.is_empty() {
                    return None;
                }
                let moved = match (notice.position, &notice.shard) {
                    (Some(position), Some((_, shard))) => {
                        floors.set(*shard, position);
                        Some(floors.id())
                    }
                    _ => None,
                };
                Some(sse_reset(&channels, notice.reason, moved.as_deref()))
            }
        }
    }

    fn finish(&mut self, end: &'static str) {
        self.finished = true;
        self.end = end;
    }

    /// Why the connection ended, when the server saw it first (a write that failed).
    pub(crate) fn ended_by(&mut self, end: &'static str) {
        if !self.finished {
            self.end = end;
        }
    }
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .poll_chunk(cx)
            .map(|chunk| chunk.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let direct = self.session.queue.take_direct();
        self.take_back(direct);
        Stats::add(&self.stats.events_delivered, self.uncounted);
        EndReason::count(&self.stats, self.end);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_last_event_id_means_a_fresh_start() {
        let mut headers = HeaderMap::new();
        let parse = |q: &str, h: &HeaderMap| parse_request(Some(q), h, 64, 4).map(|r| r.cursor);
        assert_eq!(parse("channel=a&last_event_id=", &headers).ok(), Some(None));
        assert_eq!(
            parse("channel=a&last_event_id=42", &headers).ok(),
            Some(Some(Cursor::Plain(42)))
        );
        assert!(parse("channel=a&last_event_id=x", &headers).is_err());
        headers.insert("last-event-id", HeaderValue::from_static("7"));
        assert_eq!(
            parse("channel=a&last_event_id=42", &headers).ok(),
            Some(Some(Cursor::Plain(7)))
        );
    }

    #[test]
    fn ids_over_several_shards_must_be_this_deployments() {
        let headers = HeaderMap::new();
        let parse = |q: String| parse_request(Some(&q), &headers, 64, 4).map(|r| r.cursor);
        let ours = Cursor::render(4, &[(0, 5), (3, 9)]);
        assert_eq!(
            parse(format!("channel=a&last_event_id={ours}")).ok(),
            Some(Some(Cursor::Shards {
                count: 4,
                positions: vec![(0, 5), (3, 9)]
            }))
        );
        let foreign = Cursor::render(8, &[(0, 5), (3, 9)]);
        let refused = parse(format!("channel=a&last_event_id={foreign}"));
        assert!(
            matches!(&refused, Err(e) if e.code() == "invalid_last_event_id"),
            "{refused:?}"
        );
    }
}
