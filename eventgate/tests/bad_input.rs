//! Bad input gets a clear JSON error, and nothing of a refused request is published.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

on_both_brokers!(
    refused_publishes_name_the_problem_and_publish_nothing,
    refused_subscriptions_name_the_problem,
);

fn assert_error(
    status: StatusCode,
    body: &Value,
    want_status: StatusCode,
    want_code: &str,
    mentions: &str,
) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
}

async fn refused_publishes_name_the_problem_and_publish_nothing(backend: Backend) {
    let mut options = Options::default();
    options.publisher.max_event_bytes = 1024;
    options.publisher.max_body_bytes = 256 * 1024;
    let stack = Stack::start_with(backend, options).await;
    let mut watcher = stack.subscribe("channel=orders&channel=ok").await;

    let too_many_channels: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let too_many_events: Vec<Value> = (0..1001)
        .map(|i| json!({"channel": "orders", "data": i}))
        .collect();
    let cases: Vec<(String, &str, StatusCode, &str, &str)> = vec![
        (r#"{"channel":"orders","data":"#.into(), "application/json", StatusCode::BAD_REQUEST, "invalid_json", "EOF"),
        ("".into(), "application/json", StatusCode::BAD_REQUEST, "invalid_json", "EOF"),
        (r#"{"channel":"orders","data":1,"priority":5}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_request", "priority"),
        (r#"{"channel":"or ders","data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_channel", "or ders"),
        (r#"{"channel":"orders","channels":["ok"],"data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_request", "not both"),
        (r#"{"data":1}"#.into(), "application/json", StatusCode::BAD_REQUEST, "missing_channel", "channel"),
        (r#"{"channel":"orders"}"#.into(), "application/json", StatusCode::BAD_REQUEST, "missing_data", "data"),
        (r#"{"channel":"orders","event":"reset","data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_event", "reserved"),
        (r#"{"channel":"orders","event":"error","data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_event", "`event`: event name \"error\" is reserved"),
        (r#"{"channel":"orders","event":"open","data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_event", "reserved"),
        (r#"{"events":[{"channel":"o","data":1},{"channel":"o","event":"expired","data":1}]}"#.into(),
         "application/json", StatusCode::BAD_REQUEST, "invalid_event", "events[1]: `event`"),
        (r#"{"channel":"orders","event":"a\nb","data":1}"#.into(), "application/json",
         StatusCode::BAD_REQUEST, "invalid_event", "control"),
        (json!({"channels": too_many_channels, "data": 1}).to_string(), "application/json",
         StatusCode::BAD_REQUEST, "too_many_channels", "101"),
        (json!({"events": too_many_events}).to_string(), "application/json",
         StatusCode::BAD_REQUEST, "too_many_events", "1001"),
        (json!({"channel": "orders", "data": "x".repeat(1100)}).to_string(), "application/json",
         StatusCode::PAYLOAD_TOO_LARGE, "event_too_large", "1024"),
        (json!({"channel": "orders", "data": "x".repeat(300 * 1024)}).to_string(), "application/json",
         StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "MAX_BODY_BYTES"),
        (r#"{"channel":"orders","data":1}"#.into(), "text/plain",
         StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "application/json"),
        // One bad event refuses the whole batch, and the message points at it.
        (json!({"events": [{"channel": "orders", "data": 1}, {"channel": "orders", "data": 2, "x": 1}]}).to_string(),
         "application/json", StatusCode::BAD_REQUEST, "invalid_request", "x"),
        (json!({"events": [{"channel": "orders", "data": 1}, {"channel": "bad*", "data": 2}]}).to_string(),
         "application/json", StatusCode::BAD_REQUEST, "invalid_channel", "events[1]"),
    ];
    for (body, content_type, status, code, mentions) in cases {
        let (got_status, got) = stack.post_publish(body.clone(), content_type).await;
        assert_error(got_status, &got, status, code, mentions);
    }

    let get = stack
        .http
        .get(format!("{}/v1/publish", stack.publisher.url))
        .send()
        .await
        .expect("GET");
    let status = get.status();
    assert_error(
        status,
        &get.json().await.expect("JSON"),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "",
    );
    let missing = stack
        .http
        .get(format!("{}/v2/nothing", stack.publisher.url))
        .send()
        .await
        .expect("GET");
    let status = missing.status();
    assert_error(
        status,
        &missing.json().await.expect("JSON"),
        StatusCode::NOT_FOUND,
        "not_found",
        "",
    );

    // Nothing above reached a subscriber: the first event it sees is this one.
    let good = stack.publish_one("ok", json!("the only event")).await;
    let first = watcher.next_event(SOON).await.expect("the good event");
    assert_eq!((first.id, first.channel()), (good, "ok"));
}

async fn refused_subscriptions_name_the_problem(backend: Backend) {
    let stack = Stack::start(backend).await;
    let many: Vec<String> = (0..65).map(|i| format!("channel=c{i}")).collect();
    let many = many.join("&");
    let cases: Vec<(&str, Option<&str>, &str, &str)> = vec![
        ("", None, "missing_channel", "channel"),
        ("chanel=orders", None, "missing_channel", "channel"),
        ("channel=a%20b", None, "invalid_channel", "a b"),
        ("channel=", None, "invalid_channel", "empty"),
        (&many, None, "too_many_channels", "65"),
        (
            "channel=orders",
            Some("abc"),
            "invalid_last_event_id",
            "abc",
        ),
        (
            "channel=orders&last_event_id=-5",
            None,
            "invalid_last_event_id",
            "-5",
        ),
    ];
    for (query, header, code, mentions) in cases {
        let client = SseClient::connect(&stack.http, &stack.events_url(0, query), header).await;
        let status = client.status;
        assert_eq!(
            client
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default()),
            Some("application/json"),
            "{query}"
        );
        assert_error(
            status,
            &client.error_body().await,
            StatusCode::BAD_REQUEST,
            code,
            mentions,
        );
    }
    let post = stack
        .http
        .post(stack.events_url(0, "channel=orders"))
        .send()
        .await
        .expect("POST");
    let status = post.status();
    assert_error(
        status,
        &post.json().await.expect("JSON"),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "",
    );
    assert_eq!(
        stack.stats(0).await["connections"],
        0,
        "no refused request became a subscription"
    );
}
