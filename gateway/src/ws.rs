//! `GET /v1/ws`: the WebSocket transport, on the same hub, ordering, resume, `reset` and
//! slow-client rules as SSE.
//!
//! One task per connection reads client messages, drains the client's queue and sends pings.
//! Each subscribed channel has its own floor (the highest seq sent on it), because channels
//! join and leave on the fly and each `subscribe` may resume from its own `since`. A subscribe
//! is handled to the end (join, ensure, position, replay) before the queue is drained again, so
//! live events of that channel that queued meanwhile are dropped up to the replay's end.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use eventgate_core::{Channel, Cursor, GapReason, auth::Identity, limits::DirectLimiter};
use futures::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tokio_tungstenite::WebSocketStream;
use tungstenite::{
    Message, Utf8Bytes,
    protocol::{CloseFrame, Role, WebSocketConfig},
};

use crate::{
    GatewayState,
    auth::check_ws_origin,
    error::ApiError,
    hub::{ClientQueue, CloseReason, Delivery, Direct, Form, Stats},
    replay::{Replay, ReplayItem},
    server::Taken,
    session::{Session, ShardStart, Start, Transport},
};

/// Close codes, RFC 6455 section 7.4.1.
mod code {
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const POLICY: u16 = 1008;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Checks that a request asks for a WebSocket (RFC 6455 section 4.2.1) and returns its
/// `Sec-WebSocket-Key`. The same answers as axum's `WebSocketUpgrade`.
pub(crate) fn check_handshake<'a>(
    method: &Method,
    version: Version,
    headers: &'a HeaderMap,
) -> Result<&'a HeaderValue, ApiError> {
    let refuse = |status, text: &str| Err(ApiError::Handshake(status, text.to_owned()));
    if method != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "Request method must be `GET`",
        );
    }
    if version != Version::HTTP_11 {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "a WebSocket handshake needs HTTP/1.1",
        );
    }
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Connection header did not include 'upgrade'",
        );
    }
    if !has_token(header::UPGRADE, "websocket") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`Upgrade` header did not include 'websocket'",
        );
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`Sec-WebSocket-Key` header missing",
        );
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`Sec-WebSocket-Version` header did not include '13'",
        );
    }
    Ok(key)
}

/// The `101 Switching Protocols` head that accepts `key`.
pub(crate) fn accept_head(key: &HeaderValue) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: {}\r\ndate: {}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
        httpdate::fmt_http_date(std::time::SystemTime::now())
    )
}

/// Admits a WebSocket: caps and the connect rate, the credential, the origin, the identity.
/// Every refusal is an HTTP answer before upgrading.
pub(crate) async fn open(
    state: &Arc<GatewayState>,
    peer: SocketAddr,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(Session, Identity), ApiError> {
    let client = state.admission.trusted.client_key(peer.ip(), headers);
    let mut slot = state.admission.admit(client)?;
    let credential = state
        .auth
        .credential(headers, query)
        .map_err(ApiError::Unauthorized)?;
    // Before redeeming: a refused origin must not use up a ticket.
    check_ws_origin(
        headers,
        state.config.allowed_origins.as_deref(),
        Some(credential.source),
        state.admission.trusted.contains(peer.ip()),
    )?;
    let identity = state.auth.identify(&state.broker, &credential).await?;
    slot.add_user(&identity.sub)?;
    let session = state.new_session(Transport::WebSocket, slot)?;
    Ok((session, identity))
}

/// The WebSocket of an admitted connection, ready to run.
pub(crate) fn connection(
    state: Arc<GatewayState>,
    session: Session,
    identity: Identity,
    io: WsIo,
    already_read: Vec<u8>,
) -> impl Future<Output = ()> + Send + 'static {
    let limit = state.config.ws_max_message_bytes as usize;
    // tungstenite zero-fills its read buffer (128 KiB by default) on every connection and
    // keeps it: client messages are small, so read in 128-byte steps (a larger message still
    // fits; the buffer grows for it).
    let config = WebSocketConfig::default()
        .read_buffer_size(128)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    // Completes at once: there is no handshake to do, the socket is only wrapped.
    let socket = WebSocketStream::from_partially_read(io, already_read, Role::Server, Some(config))
        .now_or_never()
        .expect("wrapping a socket does no I/O");
    WsConnection::new(state, session, identity, socket).run()
}

/// `GET /v1/ws` through the router: a handshake on a reused keep-alive connection (the
/// gateway serves a connection's first request itself, see `server`).
pub async fn upgrade(
    State(state): State<Arc<GatewayState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let key = check_handshake(request.method(), request.version(), request.headers())?.clone();
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return Err(ApiError::Handshake(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded".to_owned(),
        ));
    };
    let (session, identity) = open(&state, peer, request.uri().query(), request.headers()).await?;
    let write_timeout = state.config.write_timeout;
    tokio::spawn(on_upgrade.then(move |upgraded| async move {
        match upgraded {
            Ok(upgraded) => {
                let io = WsIo::new(Io::Upgraded(TokioIo::new(upgraded)), write_timeout);
                connection(state, session, identity, io, Vec::new()).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    }));
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok(response)
}

/// The connection under a WebSocket, with a write timeout: a peer that stops reading is cut
/// off instead of holding its task on a full socket forever.
pub(crate) struct WsIo {
    io: Io,
    write_timeout: Duration,
    /// Armed only while a write waits (boxed: most writes complete at once, and every
    /// connection would otherwise carry a timer).
    stalled: Option<Pin<Box<Sleep>>>,
}

/// The socket, kept with the client's queue when the gateway read the handshake (the hub may
/// write events to it, see [`Direct`]), or hyper's upgraded connection when the handshake
/// came through the router.
pub(crate) enum Io {
    Shared(Shared),
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

/// A socket kept with the client's queue, and what keeps the hub's writes and the WebSocket's
/// apart. (Here rather than in [`WsIo`]: no larger than the upgraded connection, so it costs
/// an idle connection nothing.)
pub(crate) struct Shared {
    queue: Arc<ClientQueue>,
    /// The rest of an event the hub began writing to the socket: it goes out before anything
    /// the WebSocket writes.
    rest: Option<Box<[u8]>>,
    /// Bytes the WebSocket wrote may wait in its buffer (a write did not finish, or no flush
    /// followed yet): the hub must not write in between.
    unflushed: bool,
}

impl Io {
    /// The socket attached to `queue` (see [`ClientQueue::attach_socket`]).
    pub(crate) fn shared(queue: Arc<ClientQueue>) -> Self {
        Io::Shared(Shared {
            queue,
            rest: None,
            unflushed: false,
        })
    }
}

impl WsIo {
    pub(crate) fn new(io: Io, write_timeout: Duration) -> Self {
        Self {
            io,
            write_timeout,
            stalled: None,
        }
    }

    /// Whether the hub may write to the socket while the connection waits: the gateway's own
    /// socket, with nothing of the WebSocket's or the hub's half written.
    fn may_lend(&self) -> bool {
        matches!(&self.io, Io::Shared(shared) if shared.rest.is_none() && !shared.unflushed)
    }

    /// Queues the rest of a half-written event: written before anything else.
    fn finish_event(&mut self, rest: Box<[u8]>) {
        match &mut self.io {
            Io::Shared(shared) => append(&mut shared.rest, rest),
            // Only the gateway's own sockets are lent to the hub.
            Io::Upgraded(_) => {}
        }
    }

    /// Passes on a finished write; a waiting one fails once it has waited the write timeout.
    fn limit<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn append(slot: &mut Option<Box<[u8]>>, rest: Box<[u8]>) {
    *slot = Some(match slot.take() {
        Some(before) => [&before[..], &rest[..]].concat().into_boxed_slice(),
        None => rest,
    });
}

impl Shared {
    /// The socket, once the hub is stopped (see [`ClientQueue::pause_direct`]) and a
    /// half-written event is finished.
    fn ready_to_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&TcpStream>> {
        let Some(socket) = self.queue.socket() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if let Some(more) = self.queue.pause_direct() {
            append(&mut self.rest, more);
        }
        while let Some(bytes) = self.rest.as_deref() {
            let n = std::task::ready!(poll_write_shared(socket, cx, bytes))?;
            self.rest = (n < bytes.len()).then(|| bytes[n..].into());
        }
        Poll::Ready(Ok(socket))
    }
}

/// One write to a socket shared with the hub (`&TcpStream`, which has no `AsyncWrite`).
fn poll_write_shared(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(socket.poll_write_ready(cx))?;
        match socket.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) if !buf.is_empty() => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            result => return Poll::Ready(result),
        }
    }
}

/// Writes one WebSocket text frame (a server's: unmasked) with one `writev`, if the socket
/// takes it at once; for the hub's fan-out, like [`crate::server::try_write_chunk`].
pub(crate) fn try_write_text(socket: &TcpStream, text: &[u8]) -> io::Result<Taken> {
    let mut head = [0u8; 10];
    let head_len = text_head(text.len(), &mut head);
    crate::server::try_write_parts(socket, &[&head[..head_len], text])
}

/// A final text frame's header (RFC 6455 section 5.2) into `out`; returns its length.
fn text_head(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x81; // FIN, text
    match len {
        0..=125 => {
            out[1] = len as u8;
            2
        }
        126..=0xffff => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Shared(shared) => {
                let Some(socket) = shared.queue.socket() else {
                    return Poll::Ready(Ok(()));
                };
                loop {
                    std::task::ready!(socket.poll_read_ready(cx))?;
                    match socket.try_read(buf.initialize_unfilled()) {
                        Ok(n) => {
                            buf.advance(n);
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Io::Upgraded(upgraded) => Pin::new(upgraded).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Shared(shared) => {
                shared.unflushed = true;
                match shared.ready_to_write(cx) {
                    Poll::Ready(Ok(socket)) => poll_write_shared(socket, cx, buf),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
            Io::Upgraded(upgraded) => Pin::new(upgraded).poll_write(cx, buf),
        };
        this.limit(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Shared(shared) => {
                let poll = shared.ready_to_write(cx).map_ok(|_| ());
                if let Poll::Ready(Ok(())) = poll {
                    shared.unflushed = false;
                }
                poll
            }
            Io::Upgraded(upgraded) => Pin::new(upgraded).poll_flush(cx),
        };
        this.limit(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Shared(shared) => match shared.ready_to_write(cx) {
                Poll::Ready(Ok(socket)) => {
                    Poll::Ready(socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            Io::Upgraded(upgraded) => Pin::new(upgraded).poll_shutdown(cx),
        };
        this.limit(cx, poll)
    }
}

/// Why the connection loop ended, and the close frame to send, if any.
struct Ending {
    close: Option<(u16, &'static str)>,
    why: &'static str,
}

impl Ending {
    fn close(code: u16, reason: &'static str, why: &'static str) -> Self {
        Self {
            close: Some((code, reason)),
            why,
        }
    }

    fn quiet(why: &'static str) -> Self {
        Self { close: None, why }
    }
}

type Step = Result<(), Ending>;

/// Rate-limited messages in a row that close a WebSocket (1008): a client that ignores
/// `rate_limited` errors is not going to slow down.
const REFUSALS_BEFORE_CLOSE: u32 = 10;

/// How long a closing connection waits for the peer's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

struct WsConnection {
    state: Arc<GatewayState>,
    session: Session,
    socket: WebSocketStream<WsIo>,
    id: uuid::Uuid,
    /// Subscribed channels, each with the highest seq sent on it.
    floors: HashMap<Channel, u64>,
    pending: VecDeque<Delivery>,
    sent: u64,
    uncounted: u64,
    opened: Instant,
    /// When the peer last sent anything (a pong included).
    last_heard: Instant,
    /// Who is connected and what it may read; replaced by `refresh`.
    identity: Identity,
    /// When the token expires (plus leeway): the connection closes with 1008.
    expires: Pin<Box<Sleep>>,
    /// `RATE_LIMIT_WS_SUBSCRIBE`, made on the first `subscribe` or `refresh`.
    limiter: Option<Box<DirectLimiter>>,
    /// Rate-limited messages since the last one let through.
    refused_in_a_row: u32,
}

impl WsConnection {
    fn new(
        state: Arc<GatewayState>,
        session: Session,
        identity: Identity,
        socket: WebSocketStream<WsIo>,
    ) -> Self {
        let expires = Box::pin(tokio::time::sleep(state.auth.lifetime(&identity)));
        Self {
            identity,
            expires,
            state,
            session,
            socket,
            id: uuid::Uuid::new_v4(),
            floors: HashMap::new(),
            pending: VecDeque::new(),
            sent: 0,
            uncounted: 0,
            opened: Instant::now(),
            last_heard: Instant::now(),
            limiter: None,
            refused_in_a_row: 0,
        }
    }

    /// Not an `async fn`: those keep their arguments twice (rust-lang/rust#62958), and the
    /// connection is most of an idle WebSocket's task.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> {
        async move {
            let ending = match self.serve().await {
                Ok(()) => Ending::quiet("client"),
                Err(ending) => ending,
            };
            if let Some((code, reason)) = ending.close {
                let frame = CloseFrame {
                    code: code.into(),
                    reason: Utf8Bytes::from_static(reason),
                };
                // The closing handshake: send our close, then read until the peer's (it may first
                // flush pongs) so it sees the code instead of a reset connection. Bounded: a dead
                // peer never answers. Boxed, like the greeting in `serve`: it runs once, and
                // inline it would be the largest state of every connection's task.
                let closing = Box::pin(tokio::time::timeout(CLOSE_GRACE, async {
                    self.socket.send(Message::Close(Some(frame))).await?;
                    while let Some(message) = self.socket.next().await {
                        if let Message::Close(_) = message? {
                            break;
                        }
                    }
                    Ok::<_, tungstenite::Error>(())
                }));
                let _ = closing.await;
            }
            Stats::add(&self.state.stats.events_delivered, self.uncounted);
            crate::metrics::EndReason::count(&self.state.stats, ending.why);
            tracing::info!(
                client = self.session.client,
                connection_id = %self.id,
                transport = "websocket",
                channels = self.floors.len(),
                events = self.sent,
                duration_ms = self.opened.elapsed().as_millis() as u64,
                end = ending.why,
                "stream closed"
            );
        }
    }

    async fn serve(&mut self) -> Step {
        let hello = json!({"type": "connected", "connection_id": self.id.to_string(),
            "replica": self.state.replica, "expires_at": self.identity.expires_at});
        let greeting = Box::pin(self.send_json(hello));
        greeting.await?;
        loop {
            // While this waits, the hub may write the channel's events to the socket itself.
            // The leave is lent before the socket is polled: a pong written from the read side
            // pauses it (see `WsIo`).
            if let Some(offer) = self.direct_offer() {
                self.session.queue.lend(offer);
            }
            tokio::select! {
                received = std::future::poll_fn(|cx| {
                    self.session.queue.poll_recv_direct(cx, &mut self.pending, None)
                }) => match received {
                    Ok(direct) => {
                        self.take_back(direct);
                        self.flush_pending().await?;
                    }
                    Err(CloseReason::Slow) => {
                        self.take_back(None);
                        return Err(Ending::close(
                            code::TRY_AGAIN_LATER,
                            "too slow; reconnect and subscribe with since",
                            "slow",
                        ));
                    }
                    Err(CloseReason::Shutdown) => {
                        self.take_back(None);
                        return Err(Ending::close(code::GOING_AWAY, "server shutting down; reconnect", "shutdown"));
                    }
                },
                _ = self.expires.as_mut() => {
                    self.take_back(None);
                    return Err(Ending::close(code::POLICY, "token expired", "token_expired"));
                }
                message = self.socket.next() => {
                    self.take_back(None);
                    self.last_heard = Instant::now();
                    match message {
                        None | Some(Ok(Message::Close(_))) => return Ok(()),
                        Some(Err(e)) => return Err(receive_error(e)),
                        // Boxed: subscribing (attach, replay) is a large future, and inlined
                        // here it would make every idle connection's task that large.
                        // Bound first: a temporary would keep room for the unboxed future.
                        Some(Ok(Message::Text(text))) => {
                            let handling = Box::pin(self.on_text(&text));
                            handling.await?
                        }
                        Some(Ok(Message::Binary(_))) => {
                            return Err(Ending::close(
                                code::UNSUPPORTED_DATA,
                                "binary messages are not supported; send JSON text",
                                "binary",
                            ));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    }
                }
            }
        }
    }

    /// Whether the hub may write events straight to the socket while this waits: subscribed
    /// to one channel (so its position is one seq), with nothing to write, on the gateway's
    /// own socket with nothing half written. A replay runs to its end before this waits.
    fn direct_offer(&self) -> Option<Direct> {
        if !self.pending.is_empty() || self.floors.len() != 1 || !self.socket.get_ref().may_lend() {
            return None;
        }
        let (channel, floor) = self.floors.iter().next()?;
        let shard = self.state.broker.shard_of(channel);
        Some(Direct::new(shard, *floor, Form::WebSocket))
    }

    /// Takes the hub's leave back, with what it wrote meanwhile (`direct`, or still lent).
    fn take_back(&mut self, direct: Option<Direct>) {
        let Some(direct) = direct.or_else(|| self.session.queue.take_direct()) else {
            return;
        };
        // The leave was lent for the only channel, and channels change only after this.
        if let Some(floor) = self.floors.values_mut().next() {
            *floor = (*floor).max(direct.floor);
        }
        // The hub counted them as delivered.
        self.sent += direct.written;
    }

    async fn send(&mut self, message: Message) -> Step {
        self.socket
            .send(message)
            .await
            .map_err(|_| Ending::quiet("write_error"))
    }

    async fn send_json(&mut self, value: Value) -> Step {
        self.send(Message::Text(value.to_string().into())).await
    }

    async fn send_error(&mut self, id: Option<&Value>, error: &ApiError) -> Step {
        let mut reply =
            json!({"type": "error", "code": error.code(), "message": error.to_string()});
        if let ApiError::RateLimited { retry, .. } = error {
            // When the next one will be let through, to the millisecond.
            reply["retry_after_ms"] = json!(retry.0.as_millis() as u64 + 1);
        }
        with_id(&mut reply, id);
        self.send_json(reply).await
    }

    /// Writes everything queued, then flushes once.
    async fn flush_pending(&mut self) -> Step {
        let mut wrote = false;
        while let Some(delivery) = self.pending.pop_front() {
            if let Delivery::Heartbeat = delivery {
                // Pings go out every HEARTBEAT_INTERVAL; a peer silent for two is gone.
                if self.last_heard.elapsed() > self.state.config.heartbeat_interval * 2 {
                    return Err(Ending::close(
                        code::INTERNAL,
                        "no answer to pings",
                        "heartbeat_timeout",
                    ));
                }
            }
            if let Delivery::Rest(rest) = delivery {
                // The rest of an event the hub began writing: before anything else.
                self.socket.get_mut().finish_event(rest);
                wrote = true;
                continue;
            }
            if let Some(message) = self.render(delivery) {
                self.socket
                    .feed(message)
                    .await
                    .map_err(|_| Ending::quiet("write_error"))?;
                wrote = true;
            }
        }
        if wrote {
            self.socket
                .flush()
                .await
                .map_err(|_| Ending::quiet("write_error"))?;
        }
        Stats::add(
            &self.state.stats.events_delivered,
            std::mem::take(&mut self.uncounted),
        );
        Ok(())
    }

    fn render(&mut self, delivery: Delivery) -> Option<Message> {
        match delivery {
            Delivery::Event(frame) => {
                let floor = self.floors.get_mut(frame.channel())?;
                if frame.seq() <= *floor {
                    return None;
                }
                *floor = frame.seq();
                self.sent += 1;
                self.uncounted += 1;
                Some(Message::Text(frame.ws_text()))
            }
            // Positions are SSE's; a rest is written as is (`flush_pending`).
            Delivery::Position { .. } | Delivery::Rest(_) => None,
            Delivery::Heartbeat => Some(Message::Ping(Bytes::new())),
            Delivery::Reset(notice) => {
                let channels = notice.among(self.floors.keys());
                if channels.is_empty() {
                    return None;
                }
                if let Some(position) = notice.position {
                    for channel in &channels {
                        self.floors.insert(channel.clone(), position);
                    }
                }
                let mut message = reset_json(&channels, notice.reason);
                if let Some(position) = notice.position {
                    // After a data loss: the `since` to resume these channels from.
                    message["position"] = json!(position.to_string());
                }
                Some(Message::Text(message.to_string().into()))
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        let message: Value = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                let error =
                    ApiError::bad_request("invalid_json", format!("message is not JSON: {e}"));
                return self.send_error(None, &error).await;
            }
        };
        let id = message
            .get("id")
            .filter(|id| id.is_string() || id.is_number())
            .cloned();
        if message
            .get("id")
            .is_some_and(|v| id.is_none() && !v.is_null())
        {
            let error =
                ApiError::bad_request("invalid_message", "`id` must be a string or a number");
            return self.send_error(None, &error).await;
        }
        let kind = message
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if matches!(kind, "subscribe" | "refresh") {
            self.rate_limit(id.as_ref()).await?;
            if self.refused_in_a_row > 0 {
                return Ok(());
            }
        }
        let result = match kind {
            "ping" => {
                let mut pong = json!({"type": "pong"});
                with_id(&mut pong, id.as_ref());
                return self.send_json(pong).await;
            }
            "subscribe" => match parse_subscribe(&message) {
                Ok((channel, since)) => return self.subscribe(channel, since, id.as_ref()).await,
                Err(e) => e,
            },
            "unsubscribe" => match channel_of(&message) {
                Ok(channel) => return self.unsubscribe(channel, id.as_ref()).await,
                Err(e) => e,
            },
            "refresh" => match message.get("token").and_then(Value::as_str) {
                Some(token) => return self.refresh(token, id.as_ref()).await,
                None => ApiError::bad_request("invalid_message", "`token` is required"),
            },
            "" => ApiError::bad_request(
                "invalid_message",
                "a message needs a `type`: subscribe, unsubscribe, refresh or ping",
            ),
            other => ApiError::bad_request(
                "unknown_type",
                format!(
                    "unknown type {:?}; expected subscribe, unsubscribe, refresh or ping",
                    truncate(other)
                ),
            ),
        };
        self.send_error(id.as_ref(), &result).await
    }

    /// Takes one unit of this connection's allowance for `subscribe`/`refresh`. A refusal is
    /// an `error` (code `rate_limited`); [`REFUSALS_BEFORE_CLOSE`] in a row close the socket.
    async fn rate_limit(&mut self, id: Option<&Value>) -> Step {
        let rate = self.state.config.rate_limit_ws_subscribe;
        let limiter = self
            .limiter
            .get_or_insert_with(|| Box::new(DirectLimiter::new(rate)));
        let Err(retry) = limiter.check() else {
            self.refused_in_a_row = 0;
            return Ok(());
        };
        self.refused_in_a_row += 1;
        let refused = &self.state.admission.refused.ws_message_rate;
        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.refused_in_a_row >= REFUSALS_BEFORE_CLOSE {
            return Err(Ending::close(
                code::POLICY,
                "rate limit exceeded",
                "rate_limited",
            ));
        }
        let error = ApiError::RateLimited {
            limit: "subscribe",
            retry,
        };
        self.send_error(id, &error).await
    }

    async fn subscribe(
        &mut self,
        channel: Channel,
        since: Option<u64>,
        id: Option<&Value>,
    ) -> Step {
        if self.floors.contains_key(&channel) {
            let error = ApiError::bad_request(
                "already_subscribed",
                format!("already subscribed to {channel}"),
            );
            return self.send_error(id, &error).await;
        }
        if !self.identity.may_read(&channel) {
            return self.send_error(id, &ApiError::Forbidden(channel)).await;
        }
        let limit = self.state.config.ws_max_subscriptions as usize;
        if self.floors.len() >= limit {
            let error = ApiError::bad_request(
                "too_many_subscriptions",
                format!("a connection may hold {limit} subscriptions"),
            );
            return self.send_error(id, &error).await;
        }
        let channels = std::slice::from_ref(&channel);
        let since = since.map(Cursor::Plain);
        let attached = match self
            .state
            .attach(&self.session, channels, since.as_ref())
            .await
        {
            Ok(attached) => attached,
            Err(ApiError::Gone) => {
                return Err(Ending::close(
                    code::TRY_AGAIN_LATER,
                    "too slow; reconnect and subscribe with since",
                    "slow",
                ));
            }
            Err(error) => return self.send_error(id, &error).await,
        };
        // One channel: one shard.
        let Some(ShardStart {
            position, start, ..
        }) = attached.shards.into_iter().next()
        else {
            return Ok(());
        };
        // The resume point for this channel until an event arrives on it: the current position
        // for a fresh subscription, `since` itself for a resume (the replay follows).
        let resume_from = match &start {
            Start::Resume { cursor, .. } => *cursor,
            Start::Fresh | Start::Unknown => position,
        };
        let mut reply =
            json!({"type": "subscribed", "channel": channel, "position": resume_from.to_string()});
        with_id(&mut reply, id);
        self.send_json(reply).await?;
        match start {
            Start::Fresh => {
                self.floors.insert(channel, position);
            }
            Start::Unknown => {
                self.floors.insert(channel.clone(), position);
                Stats::add(&self.state.stats.resets_sent, 1);
                self.send(reset_message(
                    &[channel],
                    GapReason::UnknownPosition,
                    position,
                ))
                .await?;
            }
            Start::Resume {
                cursor,
                replay,
                first,
                reset,
            } => {
                self.floors.insert(channel.clone(), cursor);
                if reset {
                    Stats::add(&self.state.stats.resets_sent, 1);
                    let message = reset_message(
                        std::slice::from_ref(&channel),
                        GapReason::UnknownPosition,
                        cursor,
                    );
                    self.send(message).await?;
                }
                self.replay(&channel, replay, first, position).await?;
            }
        }
        Ok(())
    }

    /// Sends the history of one channel up to `position`, then lets live events through.
    async fn replay(
        &mut self,
        channel: &Channel,
        mut replay: Box<Replay>,
        mut first: Option<ReplayItem>,
        position: u64,
    ) -> Step {
        let mut replayed = 0;
        loop {
            // The expiry timer is not polled while a replay runs: check it here.
            if self.expires.is_elapsed() {
                return Err(Ending::close(
                    code::POLICY,
                    "token expired",
                    "token_expired",
                ));
            }
            let item = match first.take() {
                Some(item) => Some(item),
                None => match replay.next().await {
                    Ok(item) => item,
                    Err(e) => {
                        tracing::warn!(client = self.session.client, error = %e, "replay failed");
                        self.floors.remove(channel);
                        self.state
                            .hub
                            .leave(self.session.client, std::slice::from_ref(channel));
                        let error = json!({"type": "error", "code": "unavailable", "channel": channel,
                            "message": "history could not be read; subscribe again with since"});
                        return self.send_json(error).await;
                    }
                },
            };
            let message = match item {
                None => break,
                Some(ReplayItem::Frame(frame)) => {
                    let floor = self.floors.entry(channel.clone()).or_default();
                    if frame.seq() <= *floor {
                        continue;
                    }
                    *floor = frame.seq();
                    replayed += 1;
                    Message::Text(frame.ws_text())
                }
                Some(ReplayItem::Gap(channel, reason)) => {
                    Stats::add(&self.state.stats.resets_sent, 1);
                    Message::Text(reset_json(&[channel], reason).to_string().into())
                }
            };
            self.socket
                .feed(message)
                .await
                .map_err(|_| Ending::quiet("write_error"))?;
        }
        self.socket
            .flush()
            .await
            .map_err(|_| Ending::quiet("write_error"))?;
        let floor = self.floors.entry(channel.clone()).or_default();
        *floor = (*floor).max(position);
        self.sent += replayed;
        Stats::add(&self.state.stats.events_replayed, replayed);
        Stats::add(&self.state.stats.events_delivered, replayed);
        Ok(())
    }

    /// Replaces the connection's token with a fresh one for the same subject. Channels the new
    /// token does not grant are unsubscribed, with `reason: forbidden`.
    async fn refresh(&mut self, token: &str, id: Option<&Value>) -> Step {
        let identity = match self.state.auth.verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => return self.send_error(id, &ApiError::Unauthorized(e)).await,
        };
        if identity.sub != self.identity.sub {
            let error = ApiError::bad_request(
                "subject_mismatch",
                "a refresh token must be for the same subject as the connection's",
            );
            return self.send_error(id, &error).await;
        }
        let lifetime = self.state.auth.lifetime(&identity);
        self.expires
            .as_mut()
            .reset(tokio::time::Instant::now() + lifetime);
        self.identity = identity;
        let revoked: Vec<Channel> = self
            .floors
            .keys()
            .filter(|c| !self.identity.may_read(c))
            .cloned()
            .collect();
        for channel in revoked {
            self.floors.remove(&channel);
            self.state
                .hub
                .leave(self.session.client, std::slice::from_ref(&channel));
            self.send_json(
                json!({"type": "unsubscribed", "channel": channel, "reason": "forbidden"}),
            )
            .await?;
        }
        let mut reply = json!({"type": "refreshed", "expires_at": self.identity.expires_at});
        with_id(&mut reply, id);
        self.send_json(reply).await
    }

    async fn unsubscribe(&mut self, channel: Channel, id: Option<&Value>) -> Step {
        if self.floors.remove(&channel).is_none() {
            let error =
                ApiError::bad_request("not_subscribed", format!("not subscribed to {channel}"));
            return self.send_error(id, &error).await;
        }
        self.state
            .hub
            .leave(self.session.client, std::slice::from_ref(&channel));
        let mut reply = json!({"type": "unsubscribed", "channel": channel});
        with_id(&mut reply, id);
        self.send_json(reply).await
    }
}

fn receive_error(error: tungstenite::Error) -> Ending {
    match error {
        tungstenite::Error::Capacity(_) => Ending::close(
            code::TOO_BIG,
            "message too big (WS_MAX_MESSAGE_BYTES)",
            "message_too_big",
        ),
        _ => Ending::quiet("read_error"),
    }
}

fn with_id(reply: &mut Value, id: Option<&Value>) {
    if let (Some(id), Some(object)) = (id, reply.as_object_mut()) {
        object.insert("id".into(), id.clone());
    }
}

fn reset_json(channels: &[Channel], reason: GapReason) -> Value {
    json!({"type": "reset", "channels": channels, "reason": reason.as_str()})
}

/// A `reset` of `channels` at subscription, with the `since` to resume them from.
fn reset_message(channels: &[Channel], reason: GapReason, position: u64) -> Message {
    let mut message = reset_json(channels, reason);
    message["position"] = json!(position.to_string());
    Message::Text(message.to_string().into())
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

fn channel_of(message: &Value) -> Result<Channel, ApiError> {
    let name = match message.get("channel") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_channel",
                "`channel` must be a string",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "missing_channel",
                "`channel` is required",
            ));
        }
    };
    Channel::parse(name).map_err(|e| {
        ApiError::bad_request(
            "invalid_channel",
            format!("channel {:?}: {e}", truncate(name)),
        )
    })
}

fn parse_subscribe(message: &Value) -> Result<(Channel, Option<u64>), ApiError> {
    let channel = channel_of(message)?;
    let since = match message.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(Cursor::parse_plain(text)),
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .ok_or_else(|| eventgate_core::CursorError(n.to_string())),
        ),
        Some(other) => Some(Err(eventgate_core::CursorError(truncate(
            &other.to_string(),
        )))),
    };
    let since = since
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_since", e.to_string()))?;
    Ok((channel, since))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub writes text frames itself: byte for byte what tungstenite would write.
    #[test]
    fn text_frame_headers_match_tungstenites() {
        use tungstenite::protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        };
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'a'; len];
            let mut want = Vec::new();
            Frame::message(payload.clone(), OpCode::Data(Data::Text), true)
                .format(&mut want)
                .expect("format");
            let mut head = [0u8; 10];
            let head_len = text_head(len, &mut head);
            assert_eq!(
                [&head[..head_len], &payload[..]].concat(),
                want,
                "{len} bytes"
            );
        }
    }

    /// A WebSocket's task holds this future for its whole life (docs/memory.md): subscribing
    /// and replaying are boxed, and `run` keeps the connection once.
    #[test]
    fn an_idle_websockets_task_stays_small() {
        fn returned<A, R>(_: impl Fn(A) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let task = returned(WsConnection::run);
        println!("WebSocket task {task} bytes");
        assert!(task <= 920, "WebSocket task: {task} bytes");
    }
}
