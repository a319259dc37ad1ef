//! Accepting connections and serving HTTP.
//!
//! A connection whose first request is `GET /v1/events` or a WebSocket handshake on `/v1/ws`
//! is served here directly: the request head is parsed with `httparse`, and the event stream
//! is written straight to the socket in HTTP/1.1 chunks, or the socket is handed to the
//! WebSocket. A long-lived stream needs nothing else of an HTTP server, and hyper and axum's
//! upgrade would keep buffers, a dispatcher and a second task per connection for it (the bulk
//! of an idle connection's cost, see docs/memory.md). Every other connection (stats, health,
//! and streams that arrive on a reused keep-alive connection) goes to hyper and the axum
//! router, with the bytes already read replayed first.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::ConnectInfo,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_io_timeout::TimeoutStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use eventgate_core::{
    redact::redact_uri,
    serve::{HeadEnd, Prefixed},
};

use crate::{
    GatewayState,
    auth::cors_header_lines,
    error::{ApiError, WWW_AUTHENTICATE},
    sse::{self, SseBody},
    ws::{self, Io, WsIo},
};

/// Most headers in a request head (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// Serves `listener` until the gateway's shutdown token is cancelled, then stops accepting,
/// asks hyper connections to finish and waits for every connection, at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<GatewayState>,
    app: Router,
    grace: Duration,
) -> io::Result<()> {
    let shutdown = state.shutdown.clone();
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = eventgate_core::serve::accept(&listener) => accepted,
        };
        let _ = stream.set_nodelay(true);
        let task = connection_task(
            stream,
            peer,
            state.clone(),
            app.clone(),
            connections.clone(),
        );
        connections.spawn(task);
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            open = connections.len(),
            "connections still open at the shutdown deadline"
        );
    }
    Ok(())
}

/// What a connection's task runs: [`connection`], then a log line if it failed.
///
/// `map`, not an `async move` block that awaits it: a block would keep the captured future and
/// the awaited one in separate slots, doubling every stream's task (1,544 bytes instead of 792).
fn connection_task(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<GatewayState>,
    app: Router,
    connections: TaskTracker,
) -> impl Future<Output = ()> {
    connection(stream, peer, state, app, connections).map(move |result| {
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    })
}

/// A connection's task. Its future is allocated once, at the size of its largest state, and
/// lives as long as the stream: every phase but the streaming loop is boxed and freed when it
/// ends, so an idle SSE stream's task holds little more than its loop (see docs/memory.md).
#[allow(clippy::manual_async_fn)] // deliberate: see below
fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<GatewayState>,
    app: Router,
    connections: TaskTracker,
) -> impl Future<Output = io::Result<()>> {
    // Not an `async fn`, like `stream_sse`: its arguments are kept once.
    async move {
        // Each boxed future is bound first: a temporary lives to the end of its statement, so
        // `Box::pin(f()).await` would keep room for the unboxed `f()` in this future too.
        // A local that was borrowed keeps its room until its scope ends, even once moved
        // (the head, the parsed request): each phase is a block that ends before the next
        // await, so the streaming loop's state holds none of them.
        let (stream, request) = 'sse: {
            let read = Box::pin(read_request(stream, peer, &state));
            let Some((stream, head)) = read.await? else {
                return Ok(());
            };
            // Every other path is one boxed future awaited at one place: a value live across
            // two awaits would take room in every stream's task.
            let other: Pin<Box<dyn Future<Output = io::Result<()>> + Send>> =
                match native_request(&head) {
                    Some((Route::Sse, request)) => break 'sse (stream, request),
                    Some((Route::WebSocket { head_len }, request)) => {
                        let already_read = head.get(head_len..).unwrap_or_default().to_vec();
                        let ws = open_ws(stream, already_read, peer, request, state);
                        Box::pin(ws.map(move |opened| {
                            // A task of its own, sized for the WebSocket: this one ends here.
                            if let Some(run) = opened? {
                                connections.spawn(run);
                            }
                            Ok(())
                        }))
                    }
                    None => Box::pin(hyper_connection(stream, head.freeze(), peer, state, app)),
                };
            return other.await;
        };
        let streaming = {
            let open = Box::pin(open_sse(stream, peer, request, &state));
            let Some(body) = open.await? else {
                return Ok(());
            };
            stream_sse(body, state.config.write_timeout)
        };
        drop(state);
        streaming.await
    }
}

/// Reads the request head; `None` when the connection ended or was refused (answered here).
async fn read_request(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: &GatewayState,
) -> io::Result<Option<(TcpStream, BytesMut)>> {
    let mut head = BytesMut::with_capacity(1024);
    let config = &state.config;
    let max_head = config.max_header_bytes as usize;
    let timeout = config.request_header_timeout;
    let complete = tokio::time::timeout(timeout, read_head(&mut stream, &mut head, max_head)).await;
    let refusal = match complete {
        // Slowloris: a head that never completes does not hold the socket.
        Err(_) => Some(ApiError::RequestTimeout(timeout)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(false)) if head.len() >= max_head => Some(ApiError::HeadersTooLarge(max_head)),
        Ok(Ok(false)) => return Ok(None),
        Ok(Ok(true)) => check_head(&head, config.max_url_bytes as usize, max_head),
    };
    if let Some(error) = refusal {
        tracing::info!(%peer, code = error.code(), "request refused before routing");
        let (status, json) = error.render();
        respond_and_close(&mut stream, status, Some(json), "", None).await?;
        return Ok(None);
    }
    Ok(Some((stream, head)))
}

/// Serves a connection with hyper and the axum router, replaying `prefix` first.
async fn hyper_connection(
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    state: Arc<GatewayState>,
    app: Router,
) -> io::Result<()> {
    let io = TimeoutStream::new(Prefixed::new(prefix, stream));
    let mut io = Box::pin(io);
    io.as_mut()
        .set_write_timeout_pinned(Some(state.config.write_timeout));
    // Handlers and the rate limiters see the peer as axum's `ConnectInfo`.
    let app = tower::ServiceBuilder::new()
        .map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        })
        .service(app);
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size((state.config.max_header_bytes as usize).max(8192))
        .header_read_timeout(state.config.request_header_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let shutdown: CancellationToken = state.shutdown.clone();
    // On shutdown: finish the request in flight (streams end through their queues), then close.
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    result.map_err(|e| io::Error::other(format!("{peer}: {e}")))
}

/// Reads until the first request head is complete (`Ok(true)`), the peer closes, or `max`
/// bytes arrived without one (`Ok(false)`).
async fn read_head(stream: &mut TcpStream, head: &mut BytesMut, max: usize) -> io::Result<bool> {
    let mut end = HeadEnd::default();
    loop {
        if end.found(head) {
            return Ok(true);
        }
        if head.len() >= max || stream.read_buf(head).await? == 0 {
            return Ok(false);
        }
    }
}

/// The limits every first request meets, whichever path serves it: the target's length and
/// the number of headers. Malformed heads are left to hyper, which answers 400.
fn check_head(head: &[u8], max_url: usize, max_head: usize) -> Option<ApiError> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let mut parts = head[..line_end].split(|&b| b == b' ');
    let target = parts.nth(1)?;
    if target.len() > max_url {
        return Some(ApiError::UriTooLong(max_url));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(head) {
        Err(httparse::Error::TooManyHeaders) => Some(ApiError::HeadersTooLarge(max_head)),
        _ => None,
    }
}

/// What the native path needs of a request.
struct NativeRequest {
    path: &'static str,
    query: Option<String>,
    headers: HeaderMap,
}

/// The streams the native path serves.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Sse,
    /// A well-formed handshake; bytes after the head's `head_len` are the client's first frames.
    WebSocket {
        head_len: usize,
    },
}

/// Recognises a plain `GET /v1/events`, or a well-formed WebSocket handshake on `/v1/ws`, over
/// HTTP/1.1 without a body; anything else is left to hyper and the router (which also answer
/// malformed requests and refused handshakes).
fn native_request(head: &[u8]) -> Option<(Route, NativeRequest)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head_len) = request.parse(head).ok()? else {
        return None;
    };
    let (path, query) = match request.path?.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (request.path?, None),
    };
    let (route, path) = match path {
        "/v1/events" => (Route::Sse, "/v1/events"),
        "/v1/ws" => (Route::WebSocket { head_len }, "/v1/ws"),
        _ => return None,
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        map.append(name, value);
    }
    let has_body = map.contains_key("transfer-encoding")
        || map
            .get("content-length")
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return None;
    }
    let native = match route {
        Route::Sse => !map.contains_key("upgrade"),
        Route::WebSocket { .. } => {
            ws::check_handshake(&axum::http::Method::GET, axum::http::Version::HTTP_11, &map)
                .is_ok()
        }
    };
    native.then_some((
        route,
        NativeRequest {
            path,
            query,
            headers: map,
        },
    ))
}

/// Opens an SSE stream on a connection of its own, writes the response head and hands the
/// socket to the client's queue; `None` when it was refused (answered here).
async fn open_sse(
    mut stream: TcpStream,
    peer: SocketAddr,
    request: NativeRequest,
    state: &Arc<GatewayState>,
) -> io::Result<Option<SseBody>> {
    let cors = cors_header_lines(&request.headers, state.config.allowed_origins.as_deref());
    let client = state
        .admission
        .trusted
        .client_key(peer.ip(), &request.headers);
    // Boxed and dropped once done: opening (auth, attach, first replay page) is a large future.
    let opening = Box::pin(sse::open(
        state,
        client,
        request.query.as_deref(),
        &request.headers,
    ));
    let opened = opening.await;
    let body = match opened {
        Ok(body) => body,
        Err(error) => {
            let (status, json) = error.render();
            log_refusal(&request, status, &error);
            let retry = error.retry_after();
            respond_and_close(&mut stream, status, Some(json), &cors, retry).await?;
            return Ok(None);
        }
    };
    drop(request);
    let head = format!(
        "HTTP/1.1 200 OK\r\ndate: {}\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\n{cors}transfer-encoding: chunked\r\n\r\n",
        httpdate::fmt_http_date(SystemTime::now())
    );
    write_with_timeout(&stream, head.as_bytes(), state.config.write_timeout).await?;
    body.queue()
        .attach_socket(stream)
        .map_err(|_| io::Error::other("the stream's queue has a socket already"))?;
    Ok(Some(body))
}

/// Admits a WebSocket on a connection of its own and accepts the handshake; the connection,
/// ready to run, or `None` when it was refused (answered here).
async fn open_ws(
    mut stream: TcpStream,
    already_read: Vec<u8>,
    peer: SocketAddr,
    request: NativeRequest,
    state: Arc<GatewayState>,
) -> io::Result<Option<impl Future<Output = ()> + Send + 'static>> {
    let opened = ws::open(&state, peer, request.query.as_deref(), &request.headers).await;
    let (session, identity) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let (status, json) = error.render();
            log_refusal(&request, status, &error);
            let retry = error.retry_after();
            respond_and_close(&mut stream, status, Some(json), "", retry).await?;
            return Ok(None);
        }
    };
    let timeout = state.config.write_timeout;
    let Some(key) = request.headers.get(axum::http::header::SEC_WEBSOCKET_KEY) else {
        return Ok(None);
    };
    let accept = ws::accept_head(key);
    drop(request);
    write_with_timeout(&stream, accept.as_bytes(), timeout).await?;
    // The socket goes with the client's queue: the hub writes events to it while the
    // connection waits (see `hub::Direct`).
    let queue = session.queue.clone();
    if queue.attach_socket(stream).is_err() {
        return Ok(None);
    }
    let io = WsIo::new(Io::shared(queue), timeout);
    Ok(Some(ws::connection(
        state,
        session,
        identity,
        io,
        already_read,
    )))
}

/// Writes the stream's events until it ends or the client leaves: the state an open SSE
/// stream keeps for its whole life, so it is kept to the body and one write. The socket is
/// kept with the client's queue, which lends it to the hub's fan-out while this waits.
///
/// Not an `async fn`: those keep their arguments twice (rust-lang/rust#62958), and the body is
/// the largest part of an idle stream.
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn stream_sse(mut body: SseBody, timeout: Duration) -> impl Future<Output = io::Result<()>> {
    async move {
        let queue = body.queue();
        let Some(socket) = queue.socket() else {
            return Ok(());
        };
        loop {
            match std::future::poll_fn(|cx| poll_stream(socket, &mut body, cx)).await {
                Next::Chunk(data) => {
                    // The common case is one `writev` that takes the whole chunk; only a
                    // socket that cannot take it all arms the write timeout (boxed: it is
                    // rare, and would otherwise take room in every stream's task).
                    let rest = match try_write_chunk(socket, &data) {
                        Ok(Taken::All) => Ok(None),
                        Ok(Taken::Part(rest)) => Ok(Some(rest)),
                        Ok(Taken::Nothing) => Ok(Some(chunk_bytes(&data))),
                        Err(e) => Err(e),
                    };
                    let written = match rest {
                        Ok(Some(rest)) => {
                            let slow = Box::pin(write_with_timeout(socket, &rest, timeout));
                            slow.await
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = written {
                        body.ended_by("write_error");
                        return Err(e);
                    }
                }
                Next::End => {
                    let last = Box::pin(write_with_timeout(socket, b"0\r\n\r\n", timeout));
                    return last.await;
                }
                Next::Closed => return Ok(()),
                Next::ReadError => {
                    body.ended_by("read_error");
                    return Ok(());
                }
            }
        }
    }
}

/// What a stream does next.
enum Next {
    Chunk(Bytes),
    /// The body ended: the last chunk, then the connection closes.
    End,
    /// The client closed the connection.
    Closed,
    ReadError,
}

/// The body's next chunk, or the client leaving. The client sends nothing more on this
/// connection, so a read that returns means it closed (bytes it sends anyway are discarded).
fn poll_stream(socket: &TcpStream, body: &mut SseBody, cx: &mut Context<'_>) -> Poll<Next> {
    if let Poll::Ready(chunk) = body.poll_chunk(cx) {
        return Poll::Ready(chunk.map_or(Next::End, Next::Chunk));
    }
    let mut scratch = [0u8; 64];
    loop {
        match socket.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Next::ReadError),
            Poll::Pending => return Poll::Pending,
        }
        match socket.try_read(&mut scratch) {
            Ok(0) => return Poll::Ready(Next::Closed),
            // Not ready after all (readiness is cleared): the next poll registers the waker.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(Next::ReadError),
        }
    }
}

/// How much of a chunk the socket took.
pub(crate) enum Taken {
    All,
    /// Part: the rest, to be written before anything else.
    Part(Vec<u8>),
    /// Nothing (it would block); nothing is copied.
    Nothing,
}

/// Writes one HTTP/1.1 chunk (size line, data, CRLF) with one `writev`, if the socket takes it
/// at once (a timer per event per client would cost more than the write). Not async, so its
/// buffers take no room in every stream's task; the hub's fan-out calls it too.
pub(crate) fn try_write_chunk(socket: &TcpStream, data: &[u8]) -> io::Result<Taken> {
    let mut line = [0u8; 20];
    let line_len = chunk_size_line(data.len(), &mut line);
    try_write_parts(socket, &[&line[..line_len], data, b"\r\n"])
}

/// Writes `parts` with one `writev` if the socket takes them at once; says how much it took.
pub(crate) fn try_write_parts(socket: &TcpStream, parts: &[&[u8]]) -> io::Result<Taken> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let slices: [io::IoSlice<'_>; 3] =
        std::array::from_fn(|i| io::IoSlice::new(parts.get(i).copied().unwrap_or_default()));
    match socket.try_write_vectored(&slices) {
        Ok(n) if n == total => Ok(Taken::All),
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => {
            // Only what is left is copied (the hub calls this under the queue's lock).
            let mut rest = Vec::with_capacity(total - n);
            let mut skip = n;
            for part in parts {
                let taken = skip.min(part.len());
                rest.extend_from_slice(&part[taken..]);
                skip -= taken;
            }
            Ok(Taken::Part(rest))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Taken::Nothing),
        Err(e) => Err(e),
    }
}

/// The whole HTTP/1.1 chunk of `data`, for a write that waits.
fn chunk_bytes(data: &[u8]) -> Vec<u8> {
    let mut line = [0u8; 20];
    let line_len = chunk_size_line(data.len(), &mut line);
    [&line[..line_len], data, b"\r\n"].concat()
}

/// `{len:x}\r\n` into `out`; returns its length.
fn chunk_size_line(len: usize, out: &mut [u8; 20]) -> usize {
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, digit) in out.iter_mut().take(digits).enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *digit = b"0123456789abcdef"[nibble];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// Writes all of `data` to a socket shared with the hub (which does not write meanwhile).
pub(crate) async fn write_with_timeout(
    socket: &TcpStream,
    data: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let write_all = async {
        let mut data = data;
        while !data.is_empty() {
            socket.writable().await?;
            match socket.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, write_all)
        .await
        .map_err(|_| io::ErrorKind::TimedOut)?
}

/// Logs a refused stream like the router logs refused requests (credentials redacted).
fn log_refusal(request: &NativeRequest, status: StatusCode, error: &ApiError) {
    let uri = match &request.query {
        Some(query) => format!("{}?{query}", request.path),
        None => request.path.to_owned(),
    };
    tracing::info!(
        method = "GET",
        uri = %redact_uri(&uri),
        status = status.as_u16(),
        code = error.code(),
        "request refused"
    );
}

/// Writes a complete response (a JSON error, or an empty one) with `extra` header lines and
/// `Retry-After` when given, and closes.
async fn respond_and_close(
    stream: &mut TcpStream,
    status: StatusCode,
    json: Option<String>,
    extra: &str,
    retry_after: Option<u64>,
) -> io::Result<()> {
    let body = json.unwrap_or_default();
    let mut retry = match retry_after {
        Some(seconds) => format!("retry-after: {seconds}\r\n"),
        None => String::new(),
    };
    if status == StatusCode::UNAUTHORIZED {
        retry.push_str(&format!("www-authenticate: {WWW_AUTHENTICATE}\r\n"));
    }
    let response = format!(
        "HTTP/1.1 {} {}\r\ndate: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}{extra}connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        httpdate::fmt_http_date(SystemTime::now()),
        body.len(),
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {

    /// The size of what `f` returns, without calling it.
    fn returned5<A, B, C, D, E, R>(_: impl Fn(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// An open stream's task is allocated once at its largest state's size and lives as long as
    /// the stream, so this bounds every idle stream's memory (docs/memory.md). Opening phases
    /// are boxed and freed; an `async fn` or `Box::pin(f()).await` here would grow it again.
    #[test]
    fn an_idle_sse_streams_task_stays_small() {
        let task = returned5(connection_task);
        let body = std::mem::size_of::<SseBody>();
        println!("connection task {task} bytes, of which SseBody {body}");
        // tokio adds about 96 bytes (header, tracker) and rounds the task up to 128-byte
        // lines: at most 672 keeps it at six lines (768 bytes).
        assert!(task <= 672, "connection task: {task} bytes");
        assert!(body <= 360, "SseBody: {body} bytes");
    }

    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut out = [0u8; 20];
        for (len, want) in [
            (0, "0\r\n"),
            (9, "9\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
            (65_536, "10000\r\n"),
        ] {
            let n = chunk_size_line(len, &mut out);
            assert_eq!(&out[..n], want.as_bytes());
        }
    }

    #[test]
    fn only_plain_streams_take_the_native_path() {
        let sse = b"GET /v1/events?channel=a HTTP/1.1\r\nhost: x\r\nlast-event-id: 5\r\n\r\n";
        let (route, request) = native_request(sse).expect("native");
        assert_eq!(route, Route::Sse);
        assert_eq!(request.query.as_deref(), Some("channel=a"));
        assert_eq!(request.headers["last-event-id"], "5");
        let ws = b"GET /v1/ws?ticket=t HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, Upgrade\r\n\
            upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let mut with_frame = ws.to_vec();
        with_frame.extend_from_slice(b"\x81\x80");
        let (route, request) = native_request(&with_frame).expect("native");
        assert_eq!(route, Route::WebSocket { head_len: ws.len() });
        assert_eq!(request.query.as_deref(), Some("ticket=t"));
        // Anything else goes to hyper and the router, which answer refused handshakes too.
        for other in [
            &b"GET /v1/ws HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"GET /v1/ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 8\r\nsec-websocket-key: a\r\n\r\n",
            b"GET /v1/ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n",
            b"POST /v1/ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: a\r\n\r\n",
            b"GET /v1/events HTTP/1.0\r\nhost: x\r\n\r\n",
            b"POST /v1/events HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            b"GET /v1/events HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            b"GET /v1/eventsx HTTP/1.1\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(
                native_request(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
