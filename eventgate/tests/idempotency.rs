//! Indexers retry: a publish with an `Idempotency-Key` (or per-event `idempotency_key`s)
//! publishes once, however often and however concurrently it is sent, and every retry gets
//! the original ids.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

on_both_brokers!(
    five_concurrent_retries_of_a_batch_publish_it_once,
    per_event_keys_replay_only_the_events_seen_before,
    bad_idempotency_keys_are_refused,
);

async fn publish_with_key(
    stack: &Stack,
    key: Option<&str>,
    body: &Value,
) -> (StatusCode, bool, Value) {
    let mut request = stack
        .http
        .post(format!("{}/v1/publish", stack.publisher.url))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("publish");
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn five_concurrent_retries_of_a_batch_publish_it_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut sse = stack.subscribe("channel=blocks&channel=tx").await;
    let batch = json!({"events": [
        {"channel": "blocks", "event": "block", "data": {"height": 42}},
        {"channels": ["blocks", "tx"], "event": "tx", "data": {"hash": "ab"}},
    ]});
    let sends = (0..5).map(|_| publish_with_key(&stack, Some("block-42"), &batch));
    let answers = futures::future::join_all(sends).await;
    let first = &answers[0].2;
    for (status, _, json) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json, first, "every retry gets the original ids");
    }
    // On one counter one request publishes everything; over shards each shard's part is
    // published by whichever request got there first (`Idempotent-Replayed` says whether all
    // of a request's entries were replays).
    let fresh = answers.iter().filter(|(_, replayed, _)| !replayed).count();
    if backend.sharded() {
        assert!(
            (1..=2).contains(&fresh),
            "{fresh} requests published something"
        );
    } else {
        assert_eq!(fresh, 1, "exactly one publish was not a replay");
    }
    let ids: Vec<u64> = published(first).iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 3);
    // The subscriber gets the three entries once, and nothing else arrives.
    let mut got: Vec<u64> = sse
        .expect_events(3, SOON)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    let mut ids = ids;
    if backend.sharded() {
        // Ids count per shard and shards deliver independently: compare as sets.
        got.sort_unstable();
        ids.sort_unstable();
    }
    assert_eq!(got, ids);
    let marker = stack.publish_one("blocks", json!("after")).await;
    assert_eq!(sse.next_event(SOON).await.expect("marker").id, marker);
    // A retry much later (within IDEMPOTENCY_TTL) still answers the same.
    let (_, replayed, again) = publish_with_key(&stack, Some("block-42"), &batch).await;
    assert!(replayed);
    assert_eq!(&again, first);
    // Another key publishes anew.
    let (_, replayed, other) = publish_with_key(&stack, Some("block-43"), &batch).await;
    assert!(!replayed);
    assert_ne!(&other, first);
}

async fn per_event_keys_replay_only_the_events_seen_before(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut sse = stack.subscribe("channel=tx").await;
    let first = json!({"events": [
        {"channel": "tx", "data": 1, "idempotency_key": "tx-1"},
        {"channel": "tx", "data": 2, "idempotency_key": "tx-2"},
    ]});
    let (status, _, answer) = publish_with_key(&stack, None, &first).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ids: Vec<u64> = published(&answer).iter().map(|(_, id)| *id).collect();
    // An indexer replaying blocks after a restart sends tx-2 again along with tx-3.
    let replay = json!({"events": [
        {"channel": "tx", "data": 2, "idempotency_key": "tx-2"},
        {"channel": "tx", "data": 3, "idempotency_key": "tx-3"},
    ]});
    let (status, replayed, answer) = publish_with_key(&stack, None, &replay).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(!replayed, "part of the batch is new");
    let again: Vec<u64> = published(&answer).iter().map(|(_, id)| *id).collect();
    assert_eq!(again[0], ids[1], "tx-2 answers its original id");
    let got: Vec<Value> = sse
        .expect_events(3, SOON)
        .await
        .iter()
        .map(|e| e.envelope["data"].clone())
        .collect();
    assert_eq!(got, [json!(1), json!(2), json!(3)], "tx-2 delivered once");
    // Keys are per API key's namespace, and the same key on an unkeyed publish is unrelated.
    let plain = stack.publish_one("tx", json!(4)).await;
    assert!(plain > again[1]);
}

async fn bad_idempotency_keys_are_refused(backend: Backend) {
    let stack = Stack::start(backend).await;
    let one = json!({"channel": "tx", "data": 1});
    for key in ["", &"k".repeat(256)] {
        let (status, _, json) = publish_with_key(&stack, Some(key), &one).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(json["error"]["code"], "invalid_idempotency_key");
    }
    let both = json!({"events": [{"channel": "tx", "data": 1, "idempotency_key": "a"}]});
    let (status, _, json) = publish_with_key(&stack, Some("b"), &both).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "invalid_request", "{json}");
    let field = json!({"events": [
        {"channel": "tx", "data": 1},
        {"channel": "tx", "data": 1, "idempotency_key": ""},
    ]});
    let (status, _, json) = publish_with_key(&stack, None, &field).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "invalid_idempotency_key");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("events[1]")),
        "{json}"
    );
}
