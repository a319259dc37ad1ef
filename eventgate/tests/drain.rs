//! Graceful drain on SIGTERM: not ready at once, still serving through `DRAIN_GRACE`, then SSE
//! streams end with a jittered `retry:` and WebSockets close with 1001; the publisher refuses
//! new requests with 503 meanwhile. Clients resume elsewhere with nothing lost.

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_serves_through_the_grace_then_sends_clients_elsewhere() {
    let mut options = Options::default();
    options.gateway.drain_grace = Duration::from_millis(1500);
    options.gateway.shutdown_timeout = Duration::from_secs(5);
    let mut stack = Stack::start_with(Backend::Redis, options).await;
    stack.add_gateway().await;
    let mut sse = stack.subscribe("channel=d").await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("d", None).await;

    let began = Instant::now();
    stack.gateways[0].shutdown.cancel();
    // Not ready at once, so the load balancer stops sending new clients...
    let unready = wait_until(SOON, || async {
        stack.readyz_status(0).await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(unready && began.elapsed() < Duration::from_millis(1000));
    // ...while everything keeps working through the grace: live events, and new streams.
    let first = stack.publish_one("d", json!(1)).await;
    assert_eq!(sse.next_event(SOON).await.expect("during grace").id, first);
    assert_eq!(event_id(&ws.expect_events(1).await[0]), first);
    let late = SseClient::connect(&stack.http, &stack.events_url(0, "channel=d"), None).await;
    assert_eq!(
        late.status,
        StatusCode::OK,
        "still serving during the grace"
    );
    drop(late);

    // Then the streams end: SSE with a retry spread over SSE_RETRY..3×SSE_RETRY, WS with 1001.
    let blocks = sse.expect_closed(SOON).await;
    assert!(
        began.elapsed() >= Duration::from_millis(1400),
        "ended before the grace"
    );
    let retry: u64 = blocks
        .iter()
        .rev()
        .find_map(|b| b.retry.as_deref())
        .expect("a final retry")
        .parse()
        .expect("ms");
    assert!((2000..=6000).contains(&retry), "retry {retry}");
    let closed = ws.expect_close(SOON).await;
    assert_eq!(closed.code(), Some(1001));
    // The replica is gone before DRAIN_TIMEOUT.
    let gateway = stack.gateways.remove(0);
    tokio::time::timeout(Duration::from_secs(5), gateway.task)
        .await
        .expect("stopped within DRAIN_TIMEOUT")
        .expect("task")
        .expect("clean exit");

    // The client resumes on the other replica with nothing lost.
    let missed = stack.publish_one("d", json!(2)).await;
    let mut resumed = stack
        .subscribe_at(0, "channel=d", sse.last_id.as_deref())
        .await;
    assert_eq!(resumed.next_event(SOON).await.expect("resumed").id, missed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_publisher_finishes_what_it_has_and_refuses_new_requests_with_503() {
    let mut options = Options::default();
    options.publisher.drain_grace = Duration::from_millis(1500);
    options.publisher.shutdown_timeout = Duration::from_secs(5);
    let stack = Stack::start_with(Backend::Memory, options).await;
    stack.publish_one("p", json!(1)).await;
    stack.publisher.shutdown.cancel();
    let refused = wait_until(SOON, || async {
        let (status, json) = stack
            .post_publish(
                json!({"channel": "p", "data": 2}).to_string(),
                "application/json",
            )
            .await;
        status == StatusCode::SERVICE_UNAVAILABLE && json["error"]["code"] == "shutting_down"
    })
    .await;
    assert!(refused, "new publishes are refused with 503 while draining");
    let readyz = stack
        .http
        .get(format!("{}/readyz", stack.publisher.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    let stopped = tokio::time::timeout(Duration::from_secs(5), stack.publisher.task).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "publisher stopped within DRAIN_TIMEOUT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_in_flight_when_the_publisher_closes_is_answered_with_connection_close() {
    let mut options = Options::default();
    options.publisher.drain_grace = Duration::from_millis(200);
    options.publisher.shutdown_timeout = Duration::from_secs(5);
    let stack = Stack::start_with(Backend::Redis, options).await;
    let redis = stack.redis();
    // A publish held in Redis while the publisher's drain grace runs out.
    let _: () = redis.query(&["CLIENT", "PAUSE", "5000", "WRITE"]).await;
    let body = json!({"channel": "p", "data": "x".repeat(20_000)}).to_string();
    let request = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TEST_PUBLISHER_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let addr = stack.publisher.url.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let held = wait_until(SOON, || async { redis.held_calls_over(10_000).await == 1 }).await;
    assert!(held, "the publish reached Redis");
    stack.publisher.shutdown.cancel();
    let closed = wait_until(SOON, || async { TcpStream::connect(&addr).await.is_err() }).await;
    assert!(closed, "the listener closed after the drain grace");
    let _: () = redis.query(&["CLIENT", "UNPAUSE"]).await;
    // Answered, and told not to send more on this connection, which then ends.
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 202 "), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
}
