//! `POST /v1/publish` served on the connection itself.
//!
//! A backend publishing at a high rate sends one small request after another on a keep-alive
//! connection. hyper's dispatcher, axum's router and the middleware stack around the one
//! handler cost more CPU per request than the rest of the publish (BENCHMARKS.md, "Single
//! publishes"). So a plain publish is parsed here with `httparse` and answered with one write.
//! It goes through the same key check, rate limits, handler, metrics, trace span and error
//! bodies as the router's path. Any other request (another route, `Expect`, a chunked body, a
//! body over the limit, a browser's request with `Origin`, `Connection: close`, HTTP/1.0)
//! hands the connection to hyper and the router, with the bytes already read replayed first.

use std::{
    io::{self, Write},
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use axum::{
    Router,
    extract::ConnectInfo,
    http::{HeaderMap, HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use eventgate_core::{
    redact::{log_response, traced_request_span},
    serve::{HeadEnd, Prefixed},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    PublisherState,
    auth::admit,
    error::ApiError,
    publish::{check_content_type, publish_body},
};

/// Most headers in a request head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// A longer head goes to hyper, which answers or refuses it as before.
const MAX_HEAD: usize = 16 * 1024;
/// Room made for each read.
const READ_SIZE: usize = 4096;
/// Most room made at once for a body that is still arriving.
const BODY_STEP: usize = 64 * 1024;
/// What tower-http's CORS layer adds to every answer when the console's CORS is on.
const CORS_VARY: &str =
    "vary: origin, access-control-request-method, access-control-request-headers\r\n";

/// A plain publish: its head's length, its body's, and its headers.
struct Publish {
    head_len: usize,
    body_len: usize,
    headers: HeaderMap,
}

/// Serves a connection: publishes here while they are plain, then hyper for the rest of it.
/// Ends when the client closes, a head does not arrive within `REQUEST_HEADER_TIMEOUT` of
/// waiting for it (as hyper does), or `closing` is cancelled and no request is in flight.
pub(crate) async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<PublisherState>,
    app: Router,
    closing: CancellationToken,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::with_capacity(512);
    let header_timeout = state.config.request_header_timeout;
    // One timer for the connection's life, reset per request.
    let deadline = tokio::time::sleep(header_timeout);
    let mut deadline = std::pin::pin!(deadline);
    loop {
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + header_timeout);
        let mut end = HeadEnd::default();
        while !end.found(&buf) {
            if buf.len() >= MAX_HEAD {
                return hyper_connection(stream, buf, peer, &state, app, &closing).await;
            }
            buf.reserve(READ_SIZE);
            tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => if read? == 0 {
                    return Ok(());
                },
                // Between requests: close, as hyper's graceful shutdown does.
                () = closing.cancelled(), if buf.is_empty() => return Ok(()),
                // Slowloris, or an idle keep-alive connection: hyper closes both unanswered.
                () = &mut deadline => return Ok(()),
            }
        }
        let Some(request) = plain_publish(&buf, u64::from(state.config.max_body_bytes)) else {
            return hyper_connection(stream, buf, peer, &state, app, &closing).await;
        };
        let started = Instant::now();
        let span = traced_request_span("POST", "/v1/publish", &request.headers);
        let exchange = Exchange {
            out: &mut out,
            state: &state,
            started,
        };
        let served = serve(&mut stream, &mut buf, exchange, peer, request, &closing)
            .instrument(span)
            .await?;
        // `None`: the client left; `Some(false)`: the answer closed the connection.
        if served != Some(true) {
            return Ok(());
        }
    }
}

/// What answering one request needs besides the socket.
struct Exchange<'a> {
    out: &'a mut Vec<u8>,
    state: &'a PublisherState,
    started: Instant,
}

/// Answers one publish whose head is at the start of `buf`, in the router's order: the key
/// check before the body is read (a client without a key cannot make the publisher wait for
/// or hold a body), then the body, its type, the publish. `None` when the client left.
async fn serve(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    exchange: Exchange<'_>,
    peer: SocketAddr,
    request: Publish,
    closing: &CancellationToken,
) -> io::Result<Option<bool>> {
    let state = exchange.state;
    let total = request.head_len + request.body_len;
    let answer = match admit(state, &request.headers, Some(peer.ip())) {
        Err(refused) => Err(refused),
        Ok((scope, namespace)) => {
            // As the router's body timeout: `REQUEST_BODY_TIMEOUT` without data, not for the
            // whole body; and room for it grows as it arrives, not at its declared length.
            while buf.len() < total {
                buf.reserve((total - buf.len()).min(BODY_STEP));
                let read = stream.read_buf(buf);
                match tokio::time::timeout(state.config.request_body_timeout, read).await {
                    Ok(Ok(0)) => return Ok(None),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        // The router's handler checks the type before it looks at the body.
                        let refused = check_content_type(&request.headers)
                            .err()
                            .unwrap_or(ApiError::BodyTimeout);
                        return respond(stream, exchange, refused.into_response(), false).await;
                    }
                }
            }
            let body = &buf[request.head_len..total];
            match check_content_type(&request.headers) {
                Ok(()) => publish_body(state, &scope, &namespace, &request.headers, body)
                    .await
                    .map(IntoResponse::into_response),
                Err(refused) => Err(refused),
            }
        }
    };
    // A refusal before the body arrived whole closes the connection: the rest of the body
    // would be read as the next request. So does shutdown, saying so (`connection: close`, as
    // hyper's graceful shutdown does), so the client does not send another request into it.
    let whole = buf.len() >= total;
    if whole {
        let _ = buf.split_to(total);
    }
    let keep_alive = whole && !closing.is_cancelled();
    let response = answer.unwrap_or_else(IntoResponse::into_response);
    respond(stream, exchange, response, keep_alive).await
}

/// Writes `response` with one write, as hyper would: status line, its headers,
/// `content-length` and `date`, and `connection: close` when the connection ends after it.
/// Returns `keep_alive`.
async fn respond(
    stream: &mut TcpStream,
    exchange: Exchange<'_>,
    response: Response,
    keep_alive: bool,
) -> io::Result<Option<bool>> {
    let Exchange {
        out,
        state,
        started,
    } = exchange;
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(io::Error::other)?;
    out.clear();
    let status = parts.status;
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )?;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::DATE {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if state.config.console_port.is_some() {
        out.extend_from_slice(CORS_VARY.as_bytes());
    }
    write!(
        out,
        "content-length: {}\r\ndate: {}\r\n{}\r\n",
        body.len(),
        httpdate::fmt_http_date(SystemTime::now()),
        if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        },
    )?;
    out.extend_from_slice(&body);
    // Counted and logged before the answer leaves, as on the router's path: a client that
    // reads `/metrics` once answered finds its request there.
    log_response(status.as_u16(), started.elapsed());
    state
        .metrics
        .record("/v1/publish", status.as_u16(), started);
    stream.write_all(out).await?;
    Ok(Some(keep_alive))
}

/// A complete `POST /v1/publish` head over HTTP/1.1 with a `Content-Length` body within
/// `max_body` and nothing that needs more of HTTP than one request and one answer; `None`
/// leaves the request to hyper and the router.
fn plain_publish(head: &[u8], max_body: u64) -> Option<Publish> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut parsed);
    let httparse::Status::Complete(head_len) = request.parse(head).ok()? else {
        return None;
    };
    if request.method != Some("POST")
        || request.path != Some("/v1/publish")
        || request.version != Some(1)
    {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    let mut body_len = None;
    for h in request.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let mut value = HeaderValue::from_bytes(h.value).ok()?;
        match name {
            header::CONTENT_LENGTH if body_len.is_none() => body_len = Some(length(h.value)?),
            header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::EXPECT
            | header::UPGRADE
            | header::ORIGIN => return None,
            header::CONNECTION if !h.value.eq_ignore_ascii_case(b"keep-alive") => return None,
            // As the router's path marks them: never printed.
            header::AUTHORIZATION | header::COOKIE => value.set_sensitive(true),
            _ => {}
        }
        headers.append(name, value);
    }
    let body_len = body_len?;
    (body_len <= max_body).then_some(Publish {
        head_len,
        body_len: usize::try_from(body_len).ok()?,
        headers,
    })
}

/// A `Content-Length` value: decimal digits only.
fn length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Serves the rest of a connection with hyper and the axum router, replaying `read` first.
async fn hyper_connection(
    stream: TcpStream,
    read: BytesMut,
    peer: SocketAddr,
    state: &PublisherState,
    app: Router,
    closing: &CancellationToken,
) -> io::Result<()> {
    // Handlers and the rate limiters see the peer as axum's `ConnectInfo`.
    let service = tower::ServiceBuilder::new()
        .map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        })
        .service(app);
    // hyper bounds how long a request head may take (slowloris).
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.request_header_timeout);
    let io = TokioIo::new(Prefixed::new(read.freeze(), stream));
    let conn = builder.serve_connection(io, TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    // On shutdown: finish the request in flight, then close.
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    result.map_err(|e| io::Error::other(format!("{peer}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_publishes_are_served_natively() {
        let plain = b"POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\n\
            content-type: application/json\r\ncontent-length: 12\r\n\r\n{\"channel\":";
        let request = plain_publish(plain, 1024).expect("native");
        assert_eq!(request.head_len, plain.len() - 11);
        assert_eq!(request.body_len, 12);
        assert_eq!(request.headers["content-type"], "application/json");
        assert!(request.headers["authorization"].is_sensitive());
        let keep_alive =
            b"POST /v1/publish HTTP/1.1\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\n";
        assert!(plain_publish(keep_alive, 1024).is_some());
        // Everything else goes to hyper and the router, which answer it as before.
        for other in [
            &b"POST /v1/publish HTTP/1.1\r\ncontent-length: 2000\r\n\r\n"[..],
            b"POST /v1/publish HTTP/1.1\r\nhost: x\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ncontent-length: +2\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ncontent-length: 2\r\norigin: http://a\r\n\r\n",
            b"POST /v1/publish HTTP/1.1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n",
            b"POST /v1/publish HTTP/1.0\r\ncontent-length: 2\r\n\r\n",
            b"POST /v1/publish?x=1 HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            b"POST /v1/tokens HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            b"GET /v1/publish HTTP/1.1\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(
                plain_publish(other, 1024).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
