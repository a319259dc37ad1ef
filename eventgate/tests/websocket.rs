//! The WebSocket transport, on both brokers: the same hub, ordering, resume, reset and
//! slow-client rules as SSE, plus the JSON protocol's own replies and errors.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

on_both_brokers!(
    connected_subscribed_and_events_have_the_documented_form,
    subscribe_and_unsubscribe_mid_stream,
    since_replays_missed_events_then_continues_live,
    position_resumes_a_channel_that_saw_no_event,
    trimmed_history_sends_reset,
    ping_pong_and_id_echo,
    errors_are_reported_and_the_connection_stays,
    binary_and_oversize_messages_close_the_socket,
    handshakes_from_other_origins_are_refused,
    a_silent_peer_is_closed_by_the_heartbeat,
    slow_client_is_closed_1013_while_a_fast_one_gets_everything,
    shutdown_closes_with_going_away,
    websocket_and_sse_see_identical_ids,
    resume_with_since_is_exact_while_publishing_and_reconnecting,
);

async fn connected_subscribed_and_events_have_the_documented_form(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    assert_eq!(ws.hello["type"], "connected");
    assert_eq!(ws.hello["replica"], "replica-0");
    let id = ws.hello["connection_id"].as_str().expect("connection id");
    assert_eq!(id.len(), 36, "a UUID: {id}");

    let reply = ws
        .request(json!({"type": "subscribe", "channel": "orders", "id": 1}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    assert_eq!(reply["channel"], "orders");
    assert_eq!(reply["id"], 1);
    let position: u64 = reply["position"]
        .as_str()
        .expect("position")
        .parse()
        .expect("numeric");

    let mut sse = stack.subscribe("channel=orders").await;
    let published = stack
        .publish(json!({"channel": "orders", "event": "order:created", "data": {"total": "12.50"}}))
        .await[0]
        .1;
    assert!(published > position);
    let event = ws.next_json(SOON).await.expect("event");
    let sse_event = sse.next_event(SOON).await.expect("SSE event");
    let mut expected = sse_event.envelope.clone();
    expected["type"] = json!("event");
    assert_eq!(event, expected, "the SSE envelope plus type");
    assert_eq!(event_id(&event), published);
}

async fn subscribe_and_unsubscribe_mid_stream(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("a", None).await;
    let a1 = stack.publish_one("a", json!(1)).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), a1);

    ws.subscribe("b", None).await;
    let b1 = stack.publish_one("b", json!(2)).await;
    let a2 = stack.publish_one("a", json!(3)).await;
    let mut ids: Vec<u64> = ws.expect_events(2).await.iter().map(event_id).collect();
    // Order holds per channel; on shards, two channels' events may arrive either way round.
    ids.sort_unstable();
    let mut want = [b1, a2];
    want.sort_unstable();
    assert_eq!(ids, want);

    let reply = ws
        .request(json!({"type": "unsubscribe", "channel": "a", "id": "u"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "unsubscribed", "channel": "a", "id": "u"})
    );
    stack.publish_one("a", json!(4)).await;
    let b2 = stack.publish_one("b", json!(5)).await;
    let next = ws.next_json(SOON).await.expect("event");
    assert_eq!(
        (next["channel"].as_str(), event_id(&next)),
        (Some("b"), b2),
        "nothing of a after the reply"
    );
    assert!(ws.next_json(Duration::from_millis(300)).await.is_err());
}

async fn since_replays_missed_events_then_continues_live(backend: Backend) {
    let stack = Stack::start(backend).await;
    let first = stack.publish_one("orders", json!(0)).await;
    let mut missed = Vec::new();
    for n in 1..=4 {
        missed.push(stack.publish_one("orders", json!(n)).await);
    }
    stack.publish_one("other", json!("not ours")).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    let reply = ws.subscribe("orders", Some(&first.to_string())).await;
    assert_eq!(
        reply["position"],
        first.to_string(),
        "a resume keeps its own since"
    );
    let replayed: Vec<u64> = ws.expect_events(4).await.iter().map(event_id).collect();
    assert_eq!(replayed, missed);
    let live = stack.publish_one("orders", json!("live")).await;
    assert_eq!(
        event_id(&ws.expect_events(1).await[0]),
        live,
        "no duplicate, nothing skipped"
    );
}

async fn position_resumes_a_channel_that_saw_no_event(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    let position = ws.subscribe("quiet", None).await["position"]
        .as_str()
        .expect("position")
        .to_owned();
    drop(ws);
    let missed = stack.publish_one("quiet", json!("while away")).await;
    let mut back = WsClient::connect(&stack.ws_url(0)).await;
    back.subscribe("quiet", Some(&position)).await;
    assert_eq!(event_id(&back.expect_events(1).await[0]), missed);
}

async fn trimmed_history_sends_reset(backend: Backend) {
    let mut options = Options::default();
    options.broker.history_max_len = 10;
    let stack = Stack::start_with(backend, options).await;
    let since = stack.publish_one("orders", json!("old")).await;
    let batch: Vec<_> = (0..300)
        .map(|n| json!({"channel": "orders", "data": n}))
        .collect();
    stack.publish(json!({"events": batch})).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("orders", Some(&since.to_string())).await;
    let reset = ws.next_json(SOON).await.expect("reset");
    assert_eq!(
        reset,
        json!({"type": "reset", "channels": ["orders"], "reason": "history_trimmed"})
    );
    let live = stack.publish_one("orders", json!("live")).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), live);

    // An id this broker never handed out.
    let mut other = WsClient::connect(&stack.ws_url(0)).await;
    other
        .subscribe("orders", Some(&(live + 1_000_000).to_string()))
        .await;
    let reset = other.next_json(SOON).await.expect("reset");
    assert_eq!(
        reset,
        json!({"type": "reset", "channels": ["orders"], "reason": "unknown_position",
               "position": live.to_string()})
    );
    let next = stack.publish_one("orders", json!("next")).await;
    assert_eq!(event_id(&other.expect_events(1).await[0]), next);
}

async fn ping_pong_and_id_echo(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    assert_eq!(
        ws.request(json!({"type": "ping"})).await,
        json!({"type": "pong"})
    );
    assert_eq!(
        ws.request(json!({"type": "ping", "id": "abc"})).await,
        json!({"type": "pong", "id": "abc"})
    );
    assert_eq!(
        ws.request(json!({"type": "ping", "id": 42})).await,
        json!({"type": "pong", "id": 42})
    );
    let error = ws
        .request(json!({"type": "subscribe", "channel": "bad channel", "id": 7}))
        .await;
    assert_eq!(
        (error["type"].as_str(), error["id"].as_i64()),
        (Some("error"), Some(7)),
        "errors echo ids too"
    );
}

async fn errors_are_reported_and_the_connection_stays(backend: Backend) {
    let mut options = Options::default();
    options.gateway.ws_max_subscriptions = 2;
    let stack = Stack::start_with(backend, options).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("a", None).await;
    ws.subscribe("b", None).await;
    let cases: Vec<(Message, &str, &str)> = vec![
        (Message::Text("{not json".into()), "invalid_json", "JSON"),
        (Message::Text("[1,2]".into()), "invalid_message", "type"),
        (
            Message::Text(r#"{"type":"ping","id":{"x":1}}"#.into()),
            "invalid_message",
            "id",
        ),
        (
            Message::Text(r#"{"type":"publish","channel":"a"}"#.into()),
            "unknown_type",
            "publish",
        ),
        (
            Message::Text(r#"{"type":"subscribe"}"#.into()),
            "missing_channel",
            "channel",
        ),
        (
            Message::Text(r#"{"type":"subscribe","channel":"a b"}"#.into()),
            "invalid_channel",
            "a b",
        ),
        (
            Message::Text(r#"{"type":"subscribe","channel":"c","since":"x1"}"#.into()),
            "invalid_since",
            "x1",
        ),
        (
            Message::Text(r#"{"type":"subscribe","channel":"a"}"#.into()),
            "already_subscribed",
            "a",
        ),
        (
            Message::Text(r#"{"type":"subscribe","channel":"c"}"#.into()),
            "too_many_subscriptions",
            "2",
        ),
        (
            Message::Text(r#"{"type":"unsubscribe","channel":"z"}"#.into()),
            "not_subscribed",
            "z",
        ),
    ];
    for (message, code, mentions) in cases {
        ws.send_raw(message.clone()).await;
        let error = ws.next_json(SOON).await.expect("error reply");
        assert_eq!(error["type"], "error", "{message:?} → {error}");
        assert_eq!(error["code"], code, "{message:?} → {error}");
        let text = error["message"].as_str().unwrap_or_default();
        assert!(
            text.contains(mentions),
            "{text:?} should mention {mentions:?}"
        );
    }
    // Still open and still subscribed.
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
    let id = stack.publish_one("a", json!("still here")).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), id);
}

async fn binary_and_oversize_messages_close_the_socket(backend: Backend) {
    let mut options = Options::default();
    options.gateway.ws_max_message_bytes = 1024;
    let stack = Stack::start_with(backend, options).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(ws.expect_close(SOON).await.code(), Some(1003));

    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    let big = json!({"type": "ping", "id": "x".repeat(2000)});
    ws.send(big).await;
    assert_eq!(ws.expect_close(SOON).await.code(), Some(1009));
}

async fn handshakes_from_other_origins_are_refused(backend: Backend) {
    let mut options = Options::default();
    options.gateway.allowed_origins = Some(vec![
        "https://app.example.com".into(),
        "http://localhost:3000".into(),
    ]);
    let stack = Stack::start_with(backend, options).await;
    let url = stack.ws_url(0);
    let refused = WsClient::connect_with(&url, Some("https://evil.example.net"))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.0, StatusCode::FORBIDDEN);
    assert_eq!(refused.1["error"]["code"], "origin_not_allowed");
    assert!(
        WsClient::connect_with(&url, Some("https://app.example.com"))
            .await
            .is_ok()
    );
    assert!(
        WsClient::connect_with(&url, Some("http://localhost:3000"))
            .await
            .is_ok()
    );
    assert!(
        WsClient::connect_with(&url, None).await.is_ok(),
        "non-browser clients send no Origin"
    );
    assert_eq!(
        stack.stats(0).await["connections_total"],
        3,
        "the refused handshake never became a session"
    );
}

async fn a_silent_peer_is_closed_by_the_heartbeat(backend: Backend) {
    let mut options = Options::default();
    options.gateway.heartbeat_interval = Duration::from_millis(200);
    let stack = Stack::start_with(backend, options).await;
    // A peer that answers nothing: after the handshake, only raw bytes are read.
    let silent = WsClient::connect(&stack.ws_url(0)).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(mut raw) = silent.stream.into_inner() else {
        panic!("plain TCP expected");
    };
    assert!(
        wait_until(SOON, || async {
            stack.stats(0).await["connections_ws"] == 1
        })
        .await
    );
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut bytes),
    )
    .await;
    assert!(read.is_ok(), "the server closed the silent connection");
    // Server frames are unmasked: FIN+close opcode, length 2 + reason, then the code.
    let close = bytes
        .windows(4)
        .position(|w| w[0] == 0x88 && w[2..] == 1011u16.to_be_bytes());
    assert!(
        close.is_some(),
        "a close frame with 1011 came after the pings: {bytes:?}"
    );
    assert!(bytes.starts_with(&[0x89, 0x00]), "the server pinged first");
    assert!(
        wait_until(SOON, || async {
            stack.stats(0).await["connections_ws"] == 0
        })
        .await
    );

    // A client that reads answers pings (tungstenite does) and stays.
    let mut alive = WsClient::connect(&stack.ws_url(0)).await;
    assert!(
        alive.next_json(Duration::from_millis(1000)).await.is_err(),
        "only pings for a second"
    );
    assert_eq!(alive.request(json!({"type": "ping"})).await["type"], "pong");
}

async fn slow_client_is_closed_1013_while_a_fast_one_gets_everything(backend: Backend) {
    let mut options = Options::default();
    options.gateway.client_queue_size = 16;
    options.gateway.write_timeout = Duration::from_secs(1);
    let stack = Stack::start_with(backend, options).await;
    let mut slow = WsClient::connect(&stack.ws_url(0)).await;
    slow.subscribe("orders", None).await;
    let mut fast = WsClient::connect(&stack.ws_url(0)).await;
    fast.subscribe("orders", None).await;

    let payload = "x".repeat(16 * 1024);
    let mut published = Vec::new();
    while stack.stats(0).await["slow_clients_dropped"] == 0 {
        assert!(
            published.len() < 3000,
            "the client that does not read was never dropped"
        );
        let batch: Vec<_> = (0..8)
            .map(|_| json!({"channel": "orders", "data": payload}))
            .collect();
        let ids = stack.publish(json!({"events": batch})).await;
        published.extend(ids.into_iter().map(|(_, id)| id));
        let got: Vec<u64> = fast.expect_events(8).await.iter().map(event_id).collect();
        assert_eq!(
            got,
            published[published.len() - 8..],
            "the fast client keeps up, in order"
        );
    }
    assert!(
        wait_until(SOON, || async {
            stack.stats(0).await["connections_ws"] == 1
        })
        .await,
        "the slow connection is closed"
    );
    // What the slow client finally reads ends with the close (or the dropped connection).
    let closed = slow.expect_close(SOON).await;
    assert!(matches!(closed.code(), Some(1013) | None), "{closed:?}");
}

async fn shutdown_closes_with_going_away(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("orders", None).await;
    stack.gateways.remove(0).stop().await;
    assert_eq!(ws.expect_close(SOON).await.code(), Some(1001));
}

async fn websocket_and_sse_see_identical_ids(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("a", None).await;
    ws.subscribe("b", None).await;
    let mut sse = stack.subscribe("channel=a&channel=b").await;
    for n in 0..30 {
        let channel = ["a", "b", "c"][n % 3];
        stack.publish_one(channel, json!(n)).await;
    }
    let ws_ids: Vec<(String, u64)> = ws
        .expect_events(20)
        .await
        .iter()
        .map(|e| {
            (
                e["channel"].as_str().unwrap_or_default().to_owned(),
                event_id(e),
            )
        })
        .collect();
    let sse_ids: Vec<(String, u64)> = sse
        .expect_events(20, SOON)
        .await
        .iter()
        .map(|e| (e.channel().to_owned(), e.id))
        .collect();
    assert_eq!(ws_ids, sse_ids);
}

/// Clients on several channels drop and resubscribe with per-channel `since` over and over
/// while thousands of events are published: each ends with exactly its channels' events.
async fn resume_with_since_is_exact_while_publishing_and_reconnecting(backend: Backend) {
    const EVENTS: usize = 2000;
    const CLIENTS: usize = 8;
    let stack = Arc::new(Stack::start(backend).await);
    let sets: Vec<Vec<&'static str>> = (0..CLIENTS)
        .map(|i| match i % 3 {
            0 => vec!["c0"],
            1 => vec!["c1", "c2"],
            _ => vec!["c0", "c1", "c2"],
        })
        .collect();
    // Start positions, per client and channel, taken before publishing.
    let mut starts = Vec::new();
    for set in &sets {
        let mut ws = WsClient::connect(&stack.ws_url(0)).await;
        let mut since = std::collections::HashMap::new();
        for channel in set {
            let reply = ws.subscribe(channel, None).await;
            since.insert(
                channel.to_string(),
                reply["position"].as_str().expect("position").to_owned(),
            );
        }
        starts.push(since);
    }
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stack, done) = (stack.clone(), done.clone());
        tokio::spawn(async move {
            let mut published: Vec<(String, u64)> = Vec::new();
            let mut n = 0;
            while published.len() < EVENTS {
                let batch: Vec<_> = (0..1 + n % 5)
                    .map(|k| json!({"channel": format!("c{}", (n + k) % 3), "data": n}))
                    .collect();
                published.extend(stack.publish(json!({"events": batch})).await);
                n += 1;
            }
            done.store(true, Ordering::SeqCst);
            published
        })
    };
    let mut readers = Vec::new();
    for (i, mut since) in starts.into_iter().enumerate() {
        let (stack, done) = (stack.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut received: Vec<(String, u64)> = Vec::new();
            let (mut rounds, mut quiet) = (0usize, 0);
            while quiet < 3 {
                rounds += 1;
                let mut ws = WsClient::connect(&stack.ws_url(0)).await;
                let mut channels: Vec<String> = since.keys().cloned().collect();
                channels.sort();
                let mut record =
                    |message: Value, since: &mut std::collections::HashMap<String, String>| {
                        assert_eq!(message["type"], "event", "no reset, no error: {message}");
                        let channel = message["channel"].as_str().expect("channel").to_owned();
                        since.insert(
                            channel.clone(),
                            message["id"].as_str().expect("id").to_owned(),
                        );
                        received.push((channel, event_id(&message)));
                    };
                // Events of channels already subscribed may arrive before the next reply.
                for channel in &channels {
                    ws.send(
                        json!({"type": "subscribe", "channel": channel, "since": since[channel]}),
                    )
                    .await;
                    loop {
                        let message = ws.next_json(SOON).await.expect("reply or event");
                        if message["type"] == "subscribed" && message["channel"] == channel.as_str()
                        {
                            assert_eq!(message["position"], since[channel].as_str());
                            break;
                        }
                        record(message, &mut since);
                    }
                }
                let take = 1 + (i * 11 + rounds * 17) % 50;
                let mut got = 0;
                while got < take {
                    let Ok(message) = ws.next_json(Duration::from_millis(500)).await else {
                        break;
                    };
                    record(message, &mut since);
                    got += 1;
                }
                let finished = done.load(Ordering::SeqCst);
                quiet = if got == 0 && finished { quiet + 1 } else { 0 };
            }
            (received, rounds)
        }));
    }
    let published = publisher.await.expect("publisher");
    for (i, reader) in readers.into_iter().enumerate() {
        let (mut received, rounds) = reader.await.expect("reader");
        assert!(rounds > 10, "client {i} resubscribed only {rounds} times");
        let set = &sets[i];
        let expected: Vec<(String, u64)> = published
            .iter()
            .filter(|(c, _)| set.contains(&c.as_str()))
            .cloned()
            .collect();
        // Order is per channel on a WebSocket (each channel resumes from its own since).
        for channel in set {
            let got: Vec<u64> = received
                .iter()
                .filter(|(c, _)| c == channel)
                .map(|(_, id)| *id)
                .collect();
            let want: Vec<u64> = expected
                .iter()
                .filter(|(c, _)| c == channel)
                .map(|(_, id)| *id)
                .collect();
            assert_eq!(
                got, want,
                "client {i}, channel {channel}: exactly once, in order"
            );
        }
        received.sort_by_key(|(_, id)| *id);
        assert_delivered(backend, &received, &expected, "every event once");
    }
}

/// Reads one response head (and its `content-length` body) from a raw connection.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let head_end = loop {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(SOON, tcp.read(&mut byte))
            .await
            .expect("a response in time")
            .expect("read");
        assert_eq!(n, 1, "connection closed mid-head: {buf:?}");
        buf.push(byte[0]);
        if buf.ends_with(b"\r\n\r\n") {
            break buf.len();
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("text head");
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .map_or(0, |n| n.trim().parse().expect("length"));
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.expect("body");
    (head, body)
}

/// The gateway serves a connection's first request itself and hands later ones to the router:
/// a handshake works on either path, a client's first frame sent with its handshake is read,
/// and a request to /v1/ws that is not a WebSocket handshake gets a JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_work_on_first_and_reused_connections() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::{
        MaybeTlsStream, WebSocketStream,
        tungstenite::{client::IntoClientRequest, protocol::Role},
    };
    let stack = Stack::start(Backend::Memory).await;
    let url = stack.ws_url(0);
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/ws")
        .to_owned();
    let bearer = format!("Bearer {}", test_token());

    // A reused keep-alive connection: /healthz first, then the handshake, through the router.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut request = url.as_str().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("authorization", bearer.parse().expect("header"));
    let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
        .await
        .expect("a handshake on a reused connection upgrades");
    let mut reused = WsClient {
        stream,
        hello: serde_json::Value::Null,
    };
    reused.hello = reused.next_json(SOON).await.expect("connected");
    assert_eq!(reused.hello["type"], "connected");
    reused.subscribe("orders", None).await;
    let id = stack.publish_one("orders", json!(1)).await;
    assert_eq!(event_id(&reused.expect_events(1).await[0]), id);

    // A first request with a frame right behind the handshake, in one write.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut bytes = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         authorization: {bearer}\r\n\r\n"
    )
    .into_bytes();
    let ping = br#"{"type":"ping","id":7}"#;
    let mask = [1u8, 2, 3, 4];
    bytes.extend_from_slice(&[0x81, 0x80 | ping.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(ping.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tcp.write_all(&bytes).await.expect("write");
    let (head, _) = read_response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the RFC 6455 example key's answer: {head}"
    );
    let mut client = WsClient {
        stream: WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(tcp), Role::Client, None)
            .await,
        hello: serde_json::Value::Null,
    };
    assert_eq!(
        client.next_json(SOON).await.expect("hello")["type"],
        "connected"
    );
    assert_eq!(
        client.next_json(SOON).await.expect("pong"),
        json!({"type": "pong", "id": 7})
    );

    // Not a handshake (no key): a JSON error, on a first request and on a reused one.
    let bad = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nauthorization: {bearer}\r\n\r\n"
    );
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    for _ in 0..2 {
        tcp.write_all(bad.as_bytes()).await.expect("write");
        let (head, body) = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        let error: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(error["error"]["code"], "websocket_handshake", "{error}");
    }
}

/// A WebSocket that stops reading while large events arrive, and pings meanwhile, then reads
/// again. While it waits the gateway writes events straight to its socket, and a full socket
/// leaves events half written: every event still arrives whole, once and in order, and every
/// ping gets its pong, with nothing written inside another frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_gets_whole_events_in_order_and_its_pongs() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::{MaybeTlsStream, tungstenite::client::IntoClientRequest};
    let stack = Stack::start(Backend::Memory).await;
    let url = stack.ws_url(0);
    let mut request = url.as_str().into_client_request().expect("request");
    let bearer = format!("Bearer {}", test_token());
    request
        .headers_mut()
        .insert("authorization", bearer.parse().expect("header"));
    let addr: std::net::SocketAddr = request
        .uri()
        .authority()
        .expect("host")
        .as_str()
        .parse()
        .expect("ip:port");
    // A small receive buffer: the gateway's socket fills after a few events.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
        .await
        .expect("handshake");
    let mut ws = WsClient {
        stream,
        hello: Value::Null,
    };
    ws.hello = ws.next_json(SOON).await.expect("connected");
    ws.subscribe("orders", None).await;

    let pad = "x".repeat(50_000);
    let mut ids = Vec::new();
    for round in 0..3 {
        // About 2 MB per round, more than the socket holds: the client reads nothing.
        for _ in 0..40 {
            let n = ids.len();
            ids.push(
                stack
                    .publish_one("orders", json!({"n": n, "pad": pad}))
                    .await,
            );
        }
        let ping = Message::Ping(format!("p{round}").into_bytes().into());
        ws.stream.send(ping).await.expect("ping");
    }
    let mut got = Vec::new();
    let mut pongs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < ids.len() || pongs.len() < 3 {
        let message = tokio::time::timeout_at(deadline, ws.stream.next())
            .await
            .expect("everything within 30 s")
            .expect("open")
            .expect("a well-formed frame");
        match message {
            Message::Text(text) => {
                let event: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(event["type"], "event", "{}", truncate(&text));
                assert_eq!(event["data"]["n"], got.len(), "in order, none missing");
                assert_eq!(event["data"]["pad"].as_str().map(str::len), Some(pad.len()));
                got.push(event_id(&event));
            }
            Message::Pong(payload) => pongs.push(String::from_utf8_lossy(&payload).into_owned()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, ids);
    assert_eq!(pongs, ["p0", "p1", "p2"]);
}

fn truncate(text: &str) -> &str {
    &text[..text.len().min(200)]
}
