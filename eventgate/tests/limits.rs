//! Protection under abuse, as an offender and everyone else meet it: the client IP behind a
//! trusted proxy (and spoofing ignored), each rate limit hit and then recovered, the caps per
//! IP, per user and per replica across SSE and WebSocket, request size limits, slowloris
//! timeouts, and a reconnect storm of 2,000 clients resuming with nothing lost.

mod support;

use std::time::Duration;

use eventgate_core::limits::{Rate, TrustedProxies};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn rate(s: &str) -> Rate {
    s.parse().expect("rate")
}

async fn memory_stack(configure: impl FnOnce(&mut Options)) -> Stack {
    let mut options = Options::default();
    configure(&mut options);
    Stack::start_with(Backend::Memory, options).await
}

/// Opens `GET /v1/events?channel=c` on gateway 0 with extra headers (the test token unless
/// one is given).
async fn open_sse(stack: &Stack, headers: &[(&str, &str)]) -> SseClient {
    let mut request = stack.http.get(stack.events_url(0, "channel=c"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    SseClient::open(request, None).await
}

/// A WebSocket handshake on gateway 0 with the test token and extra headers.
async fn open_ws(
    stack: &Stack,
    headers: &[(&'static str, &str)],
) -> Result<WsClient, (StatusCode, Value)> {
    let bearer = format!("Bearer {}", test_token());
    let mut all = vec![("authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    WsClient::connect_headers(&stack.ws_url(0), &all).await
}

/// Asserts a refusal's status, JSON code and a `Retry-After` of at least a second; returns it.
fn assert_refused(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    want: StatusCode,
    code: &str,
) -> u64 {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    let retry: u64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After on {status}: {headers:?}"));
    assert!(retry >= 1, "Retry-After {retry}");
    retry
}

async fn assert_sse_refused(client: SseClient, want: StatusCode, code: &str) -> u64 {
    let (status, headers) = (client.status, client.headers.clone());
    let body = client.error_body().await;
    assert_refused(status, &headers, &body, want, code)
}

/// Waits until a stream opened with `headers` is accepted again.
async fn wait_until_sse_accepted(stack: &Stack, headers: &[(&str, &str)]) -> bool {
    wait_until(SOON, || async {
        open_sse(stack, headers).await.status == StatusCode::OK
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_count_only_from_trusted_proxies() {
    // Behind a trusted proxy: each forwarded client has its own allowance.
    let stack = memory_stack(|o| {
        o.gateway.trusted_proxies = TrustedProxies::parse("127.0.0.1/32").expect("cidr");
        o.gateway.rate_limit_connect = rate("1/min,burst=2");
    })
    .await;
    let alice = [("x-forwarded-for", "198.51.100.1")];
    let _a1 = open_sse(&stack, &alice).await;
    let _a2 = open_ws(&stack, &alice).await.expect("second connect");
    let a3 = open_sse(&stack, &alice).await;
    assert_sse_refused(a3, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // The client cannot pick its key: what it writes left of the proxy's entry is ignored.
    let spoofing = [("x-forwarded-for", "203.0.113.50, 198.51.100.1")];
    let spoofed = open_sse(&stack, &spoofing).await;
    assert_sse_refused(spoofed, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Another client behind the same proxy is not affected; X-Real-IP works without XFF.
    let bob = open_sse(&stack, &[("x-forwarded-for", "198.51.100.2")]).await;
    assert_eq!(bob.status, StatusCode::OK);
    let carol = open_sse(&stack, &[("x-real-ip", "198.51.100.3")]).await;
    assert_eq!(carol.status, StatusCode::OK);

    // Without TRUSTED_PROXIES the same headers are ignored: the peer is the key.
    let stack = memory_stack(|o| o.gateway.rate_limit_connect = rate("1/min,burst=2")).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let forwarded = format!("198.51.100.{}", 10 + i);
        let client = open_sse(&stack, &[("x-forwarded-for", forwarded.as_str())]).await;
        statuses.push(client.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}

/// One IPv6 host holds a /64 and may use any address in it: it is one client for caps and
/// rates (`IPV6_PREFIX_LEN`), here behind a proxy that forwards its addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_capped_per_network_not_per_address() {
    let stack = memory_stack(|o| {
        o.gateway.trusted_proxies = TrustedProxies::parse("127.0.0.1/32").expect("cidr");
        o.gateway.max_connections_per_ip = 2;
    })
    .await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let _one = open_sse(&stack, &from("2001:db8:1:2::1")).await;
    let _two = open_ws(&stack, &from("2001:db8:1:2:aaaa:bbbb:cccc:dddd"))
        .await
        .expect("second stream of the network");
    let third = open_sse(&stack, &from("2001:db8:1:2:ffff::9")).await;
    assert_sse_refused(third, StatusCode::TOO_MANY_REQUESTS, "too_many_connections").await;
    let neighbour = open_sse(&stack, &from("2001:db8:1:3::1")).await;
    assert_eq!(
        neighbour.status,
        StatusCode::OK,
        "another /64 is another client"
    );
    assert_eq!(stack.stats(0).await["refused"]["per_ip_cap"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_rate_covers_sse_and_websocket_and_recovers() {
    let stack = memory_stack(|o| o.gateway.rate_limit_connect = rate("1/s,burst=2")).await;
    let _sse = open_sse(&stack, &[]).await;
    let _ws = open_ws(&stack, &[]).await.expect("within the burst");
    let refused = open_sse(&stack, &[]).await;
    assert_sse_refused(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let (status, body) = open_ws(&stack, &[]).await.err().expect("refused handshake");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // The allowance refills at one per second.
    assert!(
        wait_until_sse_accepted(&stack, &[]).await,
        "never recovered"
    );
    let stats = stack.stats(0).await;
    assert!(
        stats["refused"]["connect_rate"].as_u64() >= Some(2),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_rate_limited_per_ip_and_recover() {
    let stack = memory_stack(|o| o.gateway.rate_limit_tickets = rate("1/s,burst=2")).await;
    let url = format!("{}/v1/tickets", stack.gateways[0].url);
    for _ in 0..2 {
        let response = stack.http.post(&url).send().await.expect("ticket");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let response = stack.http.post(&url).send().await.expect("ticket");
    let (status, headers) = (response.status(), response.headers().clone());
    let body: Value = response.json().await.expect("JSON");
    assert_refused(
        status,
        &headers,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
    let http = stack.http.clone();
    let recovered = wait_until(SOON, || async {
        http.post(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    assert!(recovered, "tickets never recovered");
    assert!(stack.stats(0).await["refused"]["tickets_rate"].as_u64() >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribes_are_rate_limited_and_sustained_abuse_closes_1008() {
    let stack = memory_stack(|o| o.gateway.rate_limit_ws_subscribe = rate("1/s,burst=2")).await;
    let mut ws = open_ws(&stack, &[]).await.expect("connect");
    assert_eq!(ws.subscribe("a", None).await["type"], "subscribed");
    assert_eq!(ws.subscribe("b", None).await["type"], "subscribed");
    let refused = ws
        .request(json!({"type": "subscribe", "channel": "c", "id": 7}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(refused["id"], 7, "the reply names the request");
    // The connection stays, and other messages are not limited.
    assert_eq!(ws.request(json!({"type": "ping"})).await["type"], "pong");
    // A client that waits as told is let through, and events flow.
    let wait = refused["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1001).contains(&wait), "{refused}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(ws.subscribe("c", None).await["type"], "subscribed");
    let id = stack.publish_one("c", json!(1)).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), id);

    // A client that ignores the errors is closed.
    let mut abuser = open_ws(&stack, &[]).await.expect("connect");
    for i in 0..20 {
        abuser
            .send(json!({"type": "subscribe", "channel": format!("x{i}")}))
            .await;
    }
    let closed = abuser.expect_close(SOON).await;
    assert_eq!(closed.code(), Some(1008), "{closed:?}");
    assert!(stack.stats(0).await["refused"]["ws_message_rate"].as_u64() >= Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_limited_per_key_and_per_ip_before_auth() {
    let stack = memory_stack(|o| {
        o.publisher.rate_limit_publish = rate("1/s,burst=2");
        o.publisher.rate_limit_unauthenticated = rate("1/min,burst=2");
    })
    .await;
    let first = stack.publish_one("p", json!(1)).await;
    stack.publish_one("p", json!(2)).await;
    let response = stack
        .http
        .post(format!("{}/v1/publish", stack.publisher.url))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .json(&json!({"channel": "p", "data": 3}))
        .send()
        .await
        .expect("publish");
    let (status, headers) = (response.status(), response.headers().clone());
    let body: Value = response.json().await.expect("JSON");
    assert_refused(
        status,
        &headers,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
    // Recovered after the window; the refused request published nothing (ids are dense).
    let deadline = tokio::time::Instant::now() + SOON;
    let next = loop {
        let (status, json) = stack
            .post_publish(
                json!({"channel": "p", "data": 4}).to_string(),
                "application/json",
            )
            .await;
        if status == StatusCode::ACCEPTED {
            break published(&json)[0].1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(next, first + 2);

    // Wrong keys spend the address's small allowance, then get 429 without being checked.
    let url = format!("{}/v1/publish", stack.publisher.url);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = stack
            .http
            .post(&url)
            .bearer_auth("not-a-key-0123456789")
            .json(&json!({"channel": "p", "data": 0}))
            .send()
            .await
            .expect("publish");
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_ip_are_capped_across_sse_and_websocket() {
    let stack = memory_stack(|o| o.gateway.max_connections_per_ip = 2).await;
    let sse = open_sse(&stack, &[]).await;
    assert_eq!(sse.status, StatusCode::OK);
    let _ws = open_ws(&stack, &[]).await.expect("second stream");
    let refused = open_sse(&stack, &[]).await;
    assert_sse_refused(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
    )
    .await;
    let (status, body) = open_ws(&stack, &[]).await.err().expect("refused handshake");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_connections");
    // Closing a stream gives its place back.
    drop(sse);
    assert!(
        wait_until_sse_accepted(&stack, &[]).await,
        "place never given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_user_are_capped_across_sse_and_websocket() {
    let stack = memory_stack(|o| o.gateway.max_connections_per_user = 2).await;
    let alice = format!(
        "Bearer {}",
        token_for("alice", &["*"], Duration::from_secs(600))
    );
    let bob = format!(
        "Bearer {}",
        token_for("bob", &["*"], Duration::from_secs(600))
    );
    let first = open_sse(&stack, &[("authorization", &alice)]).await;
    assert_eq!(first.status, StatusCode::OK);
    let ws = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &alice)]).await;
    assert!(ws.is_ok(), "second stream of alice");
    let (status, body) = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &alice)])
        .await
        .err()
        .expect("third stream refused");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("user"))
    );
    let refused = open_sse(&stack, &[("authorization", &alice)]).await;
    assert_sse_refused(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
    )
    .await;
    // Another user on the same address is not affected.
    assert_eq!(
        open_sse(&stack, &[("authorization", &bob)]).await.status,
        StatusCode::OK
    );
    drop(first);
    assert!(wait_until_sse_accepted(&stack, &[("authorization", &alice)]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_answers_503_and_is_not_ready_until_a_stream_ends() {
    let stack = memory_stack(|o| o.gateway.max_connections = Some(2)).await;
    let sse = open_sse(&stack, &[]).await;
    let _ws = open_ws(&stack, &[]).await.expect("second stream");
    let refused = open_sse(&stack, &[]).await;
    assert_sse_refused(refused, StatusCode::SERVICE_UNAVAILABLE, "over_capacity").await;
    let (status, body) = open_ws(&stack, &[]).await.err().expect("refused handshake");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "over_capacity");
    let readyz = stack
        .http
        .get(format!("{}/readyz", stack.gateways[0].url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        readyz.json::<Value>().await.expect("JSON")["reason"],
        "at_capacity"
    );
    drop(sse);
    assert!(
        stack.wait_ready(0, SOON).await,
        "ready again once a stream ended"
    );
    assert_eq!(open_sse(&stack, &[]).await.status, StatusCode::OK);
}

/// Sends `request` on a fresh connection and reads the answer until the server closes.
async fn raw_exchange(url: &str, request: &[u8]) -> String {
    let addr = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_and_code(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body in {answer:?}"));
    (
        status,
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_clear_errors() {
    let stack = memory_stack(|o| {
        o.gateway.max_url_bytes = 1024;
        o.gateway.max_header_bytes = 4096;
    })
    .await;
    let url = &stack.gateways[0].url;
    let long_channel = "c".repeat(2000);
    for path in ["/v1/events", "/v1/ws", "/v1/stats"] {
        let request = format!("GET {path}?channel={long_channel} HTTP/1.1\r\nhost: x\r\n\r\n");
        let answer = raw_exchange(url, request.as_bytes()).await;
        assert_eq!(
            status_and_code(&answer),
            (414, "uri_too_long".into()),
            "{path}"
        );
    }
    let big = format!(
        "GET /v1/events?channel=c HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(5000)
    );
    let answer = raw_exchange(url, big.as_bytes()).await;
    assert_eq!(status_and_code(&answer), (431, "headers_too_large".into()));
    // A long target on a keep-alive connection's second request.
    let pipelined = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/stats?x={long_channel} HTTP/1.1\r\n\
         host: x\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_exchange(url, pipelined.as_bytes()).await;
    let second = &answer[answer.rfind("HTTP/1.1 ").expect("two answers")..];
    assert_eq!(status_and_code(second), (414, "uri_too_long".into()));
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request = format!("GET /v1/events?channel=c HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let answer = raw_exchange(url, request.as_bytes()).await;
    assert_eq!(status_and_code(&answer), (431, "headers_too_large".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_finishes_is_dropped() {
    let stack = memory_stack(|o| {
        o.gateway.request_header_timeout = Duration::from_millis(500);
        o.publisher.request_header_timeout = Duration::from_millis(500);
        o.publisher.request_body_timeout = Duration::from_millis(500);
    })
    .await;
    let before = stack.publish_one("c", json!(0)).await;
    // A slowloris client: a head started, never finished.
    let partial = b"GET /v1/events?channel=c HTTP/1.1\r\nhost: x\r\n";
    let answer = raw_exchange(&stack.gateways[0].url, partial).await;
    assert_eq!(status_and_code(&answer), (408, "request_timeout".into()));
    // The publisher drops it too (hyper closes the connection).
    let partial = b"POST /v1/publish HTTP/1.1\r\nhost: x\r\n";
    let started = std::time::Instant::now();
    raw_exchange(&stack.publisher.url, partial).await;
    assert!(started.elapsed() < SOON);
    // A body that never arrives is answered 408 and nothing is published.
    let slow_body = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TEST_PUBLISHER_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"chan"
    );
    let answer = raw_exchange(&stack.publisher.url, slow_body.as_bytes()).await;
    assert_eq!(status_and_code(&answer), (408, "request_timeout".into()));
    // A normal request still works, and the refused ones published nothing (ids are dense).
    let id = stack.publish_one("c", json!(1)).await;
    assert_eq!(id, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_keeps_arriving_is_not_cut_off_and_bare_line_feeds_end_a_head() {
    // REQUEST_BODY_TIMEOUT bounds a silence, not the whole body: four parts 300 ms apart take
    // longer than the timeout in all, and each gap is well within it.
    let stack = memory_stack(|o| o.publisher.request_body_timeout = Duration::from_secs(1)).await;
    let before = stack.publish_one("c", json!(0)).await;
    let body = r#"{"channel":"c","data":"slow and steady"}"#;
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TEST_PUBLISHER_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let addr = stack.publisher.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write");
    let (a, rest) = body.split_at(10);
    let (b, rest) = rest.split_at(10);
    let (c, d) = rest.split_at(10);
    for part in [a, b, c, d] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(part.as_bytes()).await.expect("write");
    }
    let mut pending = Vec::new();
    let (answer, json) = read_answer(&mut stream, &mut pending).await;
    assert!(answer.starts_with("http/1.1 202 "), "{answer}");
    assert_eq!(json["published"][0]["id"], (before + 1).to_string());
    // A head ended by bare line feeds (`printf ... | nc`) is answered, not left to time out.
    let answer = raw_exchange(
        &stack.publisher.url,
        b"GET /healthz HTTP/1.1\nhost: x\nconnection: close\n\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

/// Reads one HTTP/1.1 answer with a `Content-Length` body from `stream`, leaving what follows
/// in `pending`; returns the head (lowercased) and the body.
async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Value) {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no content-length in {head}"));
            if pending.len() >= end + 4 + length {
                let body: Vec<u8> = pending.drain(..end + 4 + length).skip(end + 4).collect();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                return (head, body);
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(SOON, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(pending));
        pending.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keep_alive_connection_carries_publishes_refusals_and_other_routes_in_order() {
    // What a backend's HTTP client does: many requests on one connection, some pipelined.
    let stack = memory_stack(|_| {}).await;
    let before = stack.publish_one("k", json!(0)).await;
    let publish = |key: &str, data: u32| {
        let body = format!(r#"{{"channel":"k","data":{data}}}"#);
        format!(
            "POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let addr = stack.publisher.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let pipelined = [
        publish(TEST_PUBLISHER_KEY, 1),
        publish("not-the-key-0123456789", 2),
        publish(TEST_PUBLISHER_KEY, 3),
    ]
    .concat();
    stream.write_all(pipelined.as_bytes()).await.expect("write");
    let mut pending = Vec::new();
    let mut ids = Vec::new();
    for want in [202, 401, 202] {
        let (head, body) = read_answer(&mut stream, &mut pending).await;
        assert!(head.starts_with(&format!("http/1.1 {want} ")), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        if want == 202 {
            let id = body["published"][0]["id"].as_str().expect("id");
            ids.push(id.parse::<u64>().expect("numeric id"));
        } else {
            assert_eq!(body["error"]["code"], "invalid_key");
        }
    }
    // In order, and the refused one published nothing.
    assert_eq!(ids, [before + 1, before + 2]);
    // Another route on the same connection, then publishes again.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_answer(&mut stream, &mut pending).await;
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert_eq!(body["status"], "ok");
    stream
        .write_all(publish(TEST_PUBLISHER_KEY, 4).as_bytes())
        .await
        .expect("write");
    let (head, body) = read_answer(&mut stream, &mut pending).await;
    assert!(head.starts_with("http/1.1 202 "), "{head}");
    assert_eq!(body["published"][0]["id"], (before + 3).to_string());
    // A refusal before the body arrived whole closes the connection: the rest of that body
    // must not be read as a request.
    let partial =
        b"POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer nope-0123456789abcdef\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"chan";
    let answer = raw_exchange(&stack.publisher.url, partial).await;
    assert_eq!(status_and_code(&answer), (401, "invalid_key".into()));
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    let received = stack.publish_one("k", json!(5)).await;
    assert_eq!(received, before + 4);
}

/// A minimal SSE reader for the storm: resumes from `last_id`, reads until it has `want`
/// events; returns the ids it saw and the `retry:` it was given.
async fn storm_client(
    addr: String,
    token: String,
    forwarded_for: String,
    last_id: u64,
    want: usize,
) -> (Vec<u64>, u64) {
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    let request = format!(
        "GET /v1/events?channel=storm HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         x-forwarded-for: {forwarded_for}\r\nlast-event-id: {last_id}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let (mut ids, mut retry, mut text) = (Vec::new(), 0, String::new());
    // The current block: its id, and whether it carries data (position lines do not).
    let (mut id, mut data) = (None, false);
    let mut buf = vec![0u8; 16 * 1024];
    while ids.len() < want {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "stream closed after {} events: {text}", ids.len());
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = text.find('\n') {
            let line: String = text.drain(..=end).collect();
            let line = line.trim_end();
            if line.starts_with("HTTP/1.1") {
                assert!(line.contains(" 200 "), "{line}");
            } else if let Some(r) = line.strip_prefix("retry: ") {
                retry = r.parse().expect("retry");
            } else if line.starts_with("data: ") {
                data = true;
            } else if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.parse::<u64>().expect("id"));
            } else if line == "event: reset" {
                panic!("no reset expected in the storm");
            } else if line.is_empty() {
                if let (Some(id), true) = (id, data) {
                    ids.push(id);
                }
                (id, data) = (None, false);
            }
        }
    }
    (ids, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_2000_clients_resuming_at_once_loses_nothing() {
    // What a killed replica's clients do: all come back within a second, through the proxy,
    // each its own user and address, with the production limits on.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let stack = Stack::start_with(
        Backend::Redis,
        Options {
            gateway: eventgate_gateway::GatewayConfig {
                trusted_proxies: TrustedProxies::parse("127.0.0.1/32").expect("cidr"),
                shutdown_timeout: Duration::from_secs(3),
                drain_grace: Duration::ZERO,
                ..eventgate_gateway::GatewayConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let events: Vec<Value> = (0..100)
        .map(|i| json!({"channel": "storm", "data": i}))
        .collect();
    let ids: Vec<u64> = stack
        .publish(json!({"events": events}))
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    // Every client last saw the 20th event: 80 to replay, then 10 live ones.
    let cursor = ids[19];
    let addr = stack.gateways[0]
        .url
        .trim_start_matches("http://")
        .to_owned();
    let redis = stack.redis();
    let scripts_before = redis.script_calls().await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let token = token_for(&format!("user-{i}"), &["storm"], Duration::from_secs(600));
        let forwarded = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        clients.spawn(storm_client(addr.clone(), token, forwarded, cursor, 90));
    }
    // Live events while the storm is still replaying.
    let live: Vec<Value> = (100..110)
        .map(|i| json!({"channel": "storm", "data": i}))
        .collect();
    let mut expected: Vec<u64> = ids[20..].to_vec();
    expected.extend(
        stack
            .publish(json!({"events": live}))
            .await
            .into_iter()
            .map(|(_, id)| id),
    );
    let mut retries = std::collections::BTreeSet::new();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(result) = clients.join_next().await {
            let (got, retry) = result.expect("client task");
            assert_eq!(got, expected, "every event once, in order");
            retries.insert(retry);
        }
    })
    .await;
    assert!(all.is_ok(), "the storm did not catch up in time");
    // Reconnects are spread: `retry:` carries jitter (2 s plus up to 50%).
    assert!(
        retries.len() > 100,
        "{} distinct retry values",
        retries.len()
    );
    assert!(
        retries.iter().all(|r| (2000..=3000).contains(r)),
        "{retries:?}"
    );
    // History was read in shared pages, not once per client (publishes are script calls too).
    let scripts = redis.script_calls().await - scripts_before;
    assert!(
        scripts < 200,
        "{scripts} script calls for 2,000 resuming clients"
    );
}

/// One request may write at most `MAX_PUBLISH_ENTRIES` stream entries: 1,000 events on 100
/// channels each is refused before anything reaches Redis, which stays responsive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_batch_is_refused_before_anything_is_written() {
    let stack = Stack::start(Backend::Redis).await;
    let channels: Vec<String> = (0..100).map(|c| format!("c{c}")).collect();
    let body = "x".repeat(2000);
    let events: Vec<_> = (0..1000)
        .map(|n| json!({"channels": channels, "data": {"n": n, "body": body}}))
        .collect();
    let started = std::time::Instant::now();
    let (status, answer) = stack
        .post_publish(json!({"events": events}).to_string(), "application/json")
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "too_many_entries");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("MAX_PUBLISH_ENTRIES") && message.contains("10000"),
        "{message}"
    );
    let keys: Vec<String> = stack.redis().query(&["KEYS", "eventgate:stream:*"]).await;
    assert!(keys.is_empty(), "nothing was written: {keys:?}");
    let ping = std::time::Instant::now();
    let pong: String = stack.redis().query(&["PING"]).await;
    assert_eq!(pong, "PONG");
    println!(
        "oversized batch refused in {:.1?}; Redis answered PING in {:.1?}",
        started.elapsed(),
        ping.elapsed()
    );

    // The bytes one request writes are bounded too: 100 events × 100 channels × 4 KB.
    let big = "y".repeat(4000);
    let events: Vec<_> = (0..100)
        .map(|n| json!({"channels": channels, "data": {"n": n, "body": big}}))
        .collect();
    let (status, answer) = stack
        .post_publish(json!({"events": events}).to_string(), "application/json")
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"]["code"], "publish_too_large");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("MAX_PUBLISH_BYTES")),
        "{answer}"
    );
    // Within both limits it goes through, all in one atomic step.
    let events: Vec<_> = (0..100)
        .map(|n| json!({"channels": channels, "data": n}))
        .collect();
    let ids = stack.publish(json!({"events": events})).await;
    assert_eq!(ids.len(), 10_000);
}
