//! A WebSocket client for tests (tokio-tungstenite).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, protocol::CloseFrame},
};

use super::End;

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The server's `connected` message.
    pub hello: Value,
}

/// How a closed socket ended: its close frame, if one came.
#[derive(Debug)]
pub struct Closed(pub Option<CloseFrame>);

impl Closed {
    pub fn code(&self) -> Option<u16> {
        self.0.as_ref().map(|f| f.code.into())
    }
}

impl WsClient {
    /// Connects with the test token and reads the `connected` message.
    pub async fn connect(url: &str) -> Self {
        Self::connect_with(url, None)
            .await
            .expect("WebSocket handshake")
    }

    /// Connects with the test token and an `Origin` header; `Err(status)` when refused.
    pub async fn connect_with(
        url: &str,
        origin: Option<&str>,
    ) -> Result<Self, (StatusCode, Value)> {
        let bearer = format!("Bearer {}", super::test_token());
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(origin.map(|o| ("origin", o)));
        Self::connect_headers(url, &headers).await
    }

    /// Connects with exactly these headers (none added); `Err(status)` when refused.
    pub async fn connect_headers(
        url: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Self, (StatusCode, Value)> {
        let mut request = url.into_client_request().expect("request");
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, value.parse().expect("header value"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => {
                let mut client = Self {
                    stream,
                    hello: Value::Null,
                };
                client.hello = client
                    .next_json(super::SOON)
                    .await
                    .expect("connected message");
                Ok(client)
            }
            Err(tungstenite::Error::Http(response)) => {
                let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
                let body = response
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(e) => panic!("WebSocket connect failed: {e}"),
        }
    }

    /// Connects from `source` (a 127.0.0.x address, so each client has its own IP) with the
    /// test token; `None` when the handshake fails.
    pub async fn connect_from(source: std::net::IpAddr, url: &str) -> Option<Self> {
        let mut request = url.into_client_request().expect("request");
        let bearer = format!("Bearer {}", super::test_token());
        request
            .headers_mut()
            .insert("authorization", bearer.parse().expect("header"));
        let host = request.uri().authority().expect("host").as_str().to_owned();
        let addr: std::net::SocketAddr = host.parse().expect("ip:port");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind((source, 0).into())
            .expect("bind the source address");
        let tcp = socket.connect(addr).await.ok()?;
        let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
            .await
            .ok()?;
        let mut client = Self {
            stream,
            hello: Value::Null,
        };
        client.hello = client.next_json(super::SOON).await.ok()?;
        Some(client)
    }

    pub async fn send(&mut self, message: Value) {
        self.send_raw(Message::Text(message.to_string().into()))
            .await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next text message as JSON; control frames are skipped (pings are answered).
    pub async fn next_json(&mut self, timeout: Duration) -> Result<Value, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(End::Timeout),
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Err(End::Closed),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Ok(serde_json::from_str(&text).expect("server sends JSON"));
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Sends a request and returns the next message (the reply, when no event is in flight).
    pub async fn request(&mut self, message: Value) -> Value {
        self.send(message).await;
        self.next_json(super::SOON).await.expect("reply")
    }

    /// Subscribes and expects `subscribed`; returns the reply.
    pub async fn subscribe(&mut self, channel: &str, since: Option<&str>) -> Value {
        let mut message = serde_json::json!({"type": "subscribe", "channel": channel});
        if let Some(since) = since {
            message["since"] = since.into();
        }
        let reply = self.request(message).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply
    }

    /// Exactly `n` messages of type `event`; panics on anything else.
    pub async fn expect_events(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next_json(super::SOON).await {
                Ok(m) if m["type"] == "event" => got.push(m),
                Ok(other) => panic!("expected events, got {other} after {} events", got.len()),
                Err(end) => panic!("expected {n} events, got {} then {end:?}", got.len()),
            }
        }
        got
    }

    /// Reads until the server closes; returns its close frame.
    pub async fn expect_close(&mut self, timeout: Duration) -> Closed {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => panic!("socket still open after {timeout:?}"),
                Ok(Some(Ok(Message::Close(frame)))) => return Closed(frame),
                Ok(None | Some(Err(_))) => return Closed(None),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

/// The numeric id of an event message.
pub fn event_id(message: &Value) -> u64 {
    message["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("numeric id")
}
