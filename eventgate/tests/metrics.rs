//! `GET /metrics` on both services: after a scripted run every counter moved by exactly what
//! happened, names follow Prometheus conventions, and no label carries a channel, user or IP.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::*;

async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let response = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().expect("type");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.expect("text")
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_happened() {
    let mut options = Options::default();
    options.gateway.rate_limit_connect = "1/min,burst=3".parse().expect("rate");
    let stack = Stack::start_with(Backend::Redis, options).await;
    let gateway = stack.gateways[0].url.clone();
    let publisher = stack.publisher.url.clone();
    let before = scrape(&stack.http, &publisher).await;

    let sse = stack.subscribe("channel=m").await;
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    ws.subscribe("m", None).await;
    let _idle = stack.subscribe("channel=other").await;
    let refused = SseClient::connect(&stack.http, &stack.events_url(0, "channel=m"), None).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);

    stack
        .publish(json!({"events": [{"channel": "m", "data": 1}, {"channel": "m", "data": 2}]}))
        .await;
    stack.publish_one("m", json!(3)).await;
    let (status, _) = stack
        .post_publish(r#"{"channel":"m","data":4}"#, "text/plain")
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let unauthorized = stack
        .http
        .post(format!("{publisher}/v1/publish"))
        .bearer_auth("wrong-key-0123456789")
        .json(&json!({"channel": "m", "data": 5}))
        .send()
        .await
        .expect("publish");
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);

    let mut sse = sse;
    sse.expect_events(3, SOON).await;
    ws.expect_events(3).await;
    drop(sse);
    ws.send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;
    let http = stack.http.clone();
    let ended = wait_until(SOON, || async {
        let text = scrape(&http, &gateway).await;
        sample(
            &text,
            r#"eventgate_gateway_disconnects_total{reason="client"}"#,
        ) == 2.0
    })
    .await;
    assert!(ended, "{}", scrape(&http, &gateway).await);

    let g = scrape(&stack.http, &gateway).await;
    for (series, want) in [
        (r#"eventgate_gateway_connects_total{transport="sse"}"#, 2.0),
        (
            r#"eventgate_gateway_connects_total{transport="websocket"}"#,
            1.0,
        ),
        (r#"eventgate_gateway_connections{transport="sse"}"#, 1.0),
        (
            r#"eventgate_gateway_connections{transport="websocket"}"#,
            0.0,
        ),
        (r#"eventgate_gateway_disconnects_total{reason="slow"}"#, 0.0),
        ("eventgate_gateway_channels", 1.0),
        ("eventgate_gateway_events_received_total", 3.0),
        ("eventgate_gateway_events_delivered_total", 6.0),
        ("eventgate_gateway_events_replayed_total", 0.0),
        ("eventgate_gateway_delivery_latency_seconds_count", 3.0),
        (
            r#"eventgate_gateway_refusals_total{limit="connect_rate"}"#,
            1.0,
        ),
        (
            r#"eventgate_gateway_refusals_total{limit="per_ip_cap"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sample(&g, series), want, "{series}\n{g}");
    }
    let p = scrape(&stack.http, &publisher).await;
    let delta = |series: &str| sample(&p, series) - sample(&before, series);
    for (series, want) in [
        (
            r#"eventgate_publisher_requests_total{route="/v1/publish",status="202"}"#,
            2.0,
        ),
        (
            r#"eventgate_publisher_requests_total{route="/v1/publish",status="415"}"#,
            1.0,
        ),
        (
            r#"eventgate_publisher_requests_total{route="/v1/publish",status="401"}"#,
            1.0,
        ),
        ("eventgate_publisher_events_published_total", 3.0),
        ("eventgate_publisher_publish_duration_seconds_count", 4.0),
        ("eventgate_publisher_broker_errors_total", 0.0),
    ] {
        assert_eq!(delta(series), want, "{series}\n{p}");
    }

    // Conventions: counters end in _total, no label value names a channel, user or address.
    for text in [&g, &p] {
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            assert!(parts[2].starts_with("eventgate_"), "{line}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            for forbidden in ["\"m\"", "other", "tester", "127.0.0.1"] {
                assert!(!line.contains(forbidden), "label leaks {forbidden}: {line}");
            }
        }
    }
    // Redis going away is counted as a broker error.
    let mut stack = stack;
    stack.redis.as_mut().expect("redis").stop().await;
    let (status, _) = stack
        .post_publish(r#"{"channel":"m","data":6}"#, "application/json")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let p = tokio::time::timeout(Duration::from_secs(5), scrape(&stack.http, &publisher))
        .await
        .expect("scrape while Redis is down");
    assert_eq!(sample(&p, "eventgate_publisher_broker_errors_total"), 1.0);
}
