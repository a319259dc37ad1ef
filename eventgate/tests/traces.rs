//! Traces through the real configuration path (`telemetry::provider` and `telemetry::layer`,
//! as `main` wires them, with the SDK's in-memory exporter in place of OTLP): one published
//! event yields a publish span and a delivery span in the caller's trace, with the channel and
//! event id as attributes; the `traceparent` never reaches the browser.

mod support;

use eventgate_core::telemetry;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use reqwest::StatusCode;
use serde_json::json;
use support::*;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_and_its_delivery_share_the_callers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = telemetry::provider(exporter.clone(), "eventgate-test", false);
    tracing_subscriber::registry()
        .with(telemetry::layer(&provider))
        .init();
    let stack = Stack::start(Backend::Redis).await;
    let mut sse = stack.subscribe("channel=traced").await;

    // The caller (an indexer) is itself traced.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = stack
        .http
        .post(format!("{}/v1/publish", stack.publisher.url))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&json!({"channel": "traced", "event": "paid", "data": {"n": 1}}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = published(&response.json().await.expect("JSON"))[0].1;

    let event = sse.next_event(SOON).await.expect("event");
    assert_eq!(event.id, id);
    assert!(
        !event.block.raw.contains("traceparent"),
        "{}",
        event.block.raw
    );
    assert_eq!(event.envelope["data"], json!({"n": 1}));
    // A resume replays it from history: also without the traceparent, under a replay span.
    let mut resumed = stack
        .subscribe_at(0, "channel=traced", Some(&(id - 1).to_string()))
        .await;
    let replayed = resumed.next_event(SOON).await.expect("replayed");
    assert_eq!(replayed.id, id);
    assert!(!replayed.block.raw.contains("traceparent"));

    let named = |name: &str| {
        exporter
            .get_finished_spans()
            .expect("spans")
            .into_iter()
            .find(|s| s.name == name)
    };
    let exported = wait_until(SOON, || async {
        named("deliver").is_some() && named("publish").is_some() && named("replay").is_some()
    })
    .await;
    assert!(exported, "{:#?}", exporter.get_finished_spans());
    let (publish, step, deliver) = (
        named("publish").expect("publish"),
        named("broker.publish").expect("broker.publish"),
        named("deliver").expect("deliver"),
    );
    let trace = TraceId::from_hex(caller_trace).expect("hex");
    for span in [&publish, &step, &deliver] {
        assert_eq!(span.span_context.trace_id(), trace, "{}", span.name);
    }
    assert_eq!(attribute(&publish, "channel").as_deref(), Some("traced"));
    assert_eq!(attribute(&publish, "event_id"), Some(id.to_string()));
    assert_eq!(attribute(&deliver, "channel").as_deref(), Some("traced"));
    assert_eq!(attribute(&deliver, "event_id"), Some(id.to_string()));
    // The delivery hangs off the Redis step, which hangs off the publish.
    assert_eq!(deliver.parent_span_id, step.span_context.span_id());
    assert_eq!(step.parent_span_id, publish.span_context.span_id());
    assert_ne!(publish.parent_span_id, SpanId::INVALID);
    let _ = provider.shutdown();
}
