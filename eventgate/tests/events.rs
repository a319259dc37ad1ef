//! The core event path, on both brokers: publish → SSE delivery, resume, reset, slow clients.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::*;

on_both_brokers!(
    publish_delivers_the_documented_sse_frame,
    unnamed_events_have_no_event_line,
    channels_are_isolated,
    batch_is_delivered_in_request_order,
    resume_replays_exactly_what_was_missed,
    a_client_that_saw_no_event_resumes_from_its_position_line,
    one_id_resumes_every_channel_of_a_connection,
    query_last_event_id_resumes_a_first_connect_and_the_header_wins,
    trimmed_history_sends_reset_naming_the_channel,
    a_cursor_ahead_of_the_counter_sends_reset,
    expired_history_sends_reset,
    position_lines_keep_quiet_clients_current,
    position_events_tell_scripts_where_a_quiet_stream_stands,
    heartbeats_are_comments,
    slow_client_is_dropped_while_a_fast_one_gets_everything,
    stats_count_connections_and_deliveries,
    shutdown_ends_streams,
    resume_is_exact_while_publishing_and_reconnecting,
    a_stream_on_a_reused_keep_alive_connection_works_the_same,
    a_stream_with_a_duration_ends_by_itself,
);

async fn publish_delivers_the_documented_sse_frame(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut client =
        SseClient::connect(&stack.http, &stack.events_url(0, "channel=orders"), None).await;
    assert_eq!(client.status, StatusCode::OK);
    assert_eq!(client.headers["content-type"], "text/event-stream");
    assert_eq!(client.headers["cache-control"], "no-cache");
    assert_eq!(client.headers["x-accel-buffering"], "no");

    let opening = client.next_block(SOON).await.expect("opening block");
    let lines: Vec<&str> = opening.raw.lines().collect();
    assert_eq!(lines.len(), 2, "retry then id: {lines:?}");
    assert!(lines[0].starts_with("retry: "));
    let position: u64 = opening
        .id
        .as_deref()
        .expect("position id")
        .parse()
        .expect("numeric");

    // Raw text: the number must reach the browser digit for digit.
    let body = r#"{"channel": "orders", "event": "order:created",
                   "data": {"order_id": 7, "total": "12.50", "amount": 12345678901234567890.5}}"#;
    let (status, answer) = stack.post_publish(body, "application/json").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = published(&answer)[0].1;
    assert!(id > position);
    let event = client.next_event(SOON).await.expect("the event");
    let ts = event.envelope["timestamp"]
        .as_str()
        .expect("timestamp")
        .to_owned();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "RFC 3339 UTC with milliseconds: {ts}"
    );
    assert_eq!(
        event.block.raw,
        format!(
            "id: {id}\nevent: order:created\ndata: {{\"id\":\"{id}\",\"channel\":\"orders\",\
             \"event\":\"order:created\",\"data\":{{\"order_id\":7,\"total\":\"12.50\",\
             \"amount\":12345678901234567890.5}},\"timestamp\":\"{ts}\"}}"
        )
    );
}

async fn unnamed_events_have_no_event_line(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut client = stack.subscribe("channel=orders").await;
    let (status, _) = stack
        .post_publish(
            r#"{"channel":"orders","data":{"note":"a  b",  "n": [1, 2]}}"#,
            "application/json",
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let event = client.next_event(SOON).await.expect("event");
    assert_eq!(event.event, None);
    assert!(!event.block.raw.contains("event:"), "{}", event.block.raw);
    assert_eq!(event.envelope["data"], json!({"note": "a  b", "n": [1, 2]}));
    assert!(event.envelope.get("event").is_none());
}

async fn channels_are_isolated(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut only_a = stack.subscribe("channel=a").await;
    let mut only_b = stack.subscribe("channel=b").await;
    let mut both = stack.subscribe("channel=a&channel=b").await;
    let a1 = stack.publish_one("a", json!(1)).await;
    let b1 = stack.publish_one("b", json!(2)).await;
    let a2 = stack.publish_one("a", json!(3)).await;
    let ids = |events: Vec<Received>| {
        events
            .iter()
            .map(|e| (e.channel().to_owned(), e.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(only_a.expect_events(2, SOON).await),
        [("a".into(), a1), ("a".into(), a2)]
    );
    assert_eq!(ids(only_b.expect_events(1, SOON).await), [("b".into(), b1)]);
    assert_eq!(
        ids(both.expect_events(3, SOON).await),
        [("a".into(), a1), ("b".into(), b1), ("a".into(), a2)]
    );
    let quiet = only_b.next_event(Duration::from_millis(300)).await;
    assert!(quiet.is_err(), "b must not see a's events: {quiet:?}");
}

async fn batch_is_delivered_in_request_order(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut client = stack.subscribe("channel=a&channel=b").await;
    let published = stack
        .publish(json!({"events": [
            {"channel": "a", "event": "one", "data": 1},
            {"channels": ["b", "a"], "event": "two", "data": 2},
            {"channel": "b", "data": 3},
        ]}))
        .await;
    let channels: Vec<&str> = published.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(channels, ["a", "b", "a", "b"]);
    let ids: Vec<u64> = published.iter().map(|(_, id)| *id).collect();
    // One atomic step per shard: consecutive ids on one counter.
    assert!(
        backend.sharded() || ids.windows(2).all(|w| w[1] == w[0] + 1),
        "one atomic step: consecutive ids {ids:?}"
    );
    let got = client.expect_events(4, SOON).await;
    let mut seen: Vec<(String, u64, Option<String>)> = got
        .iter()
        .map(|e| (e.channel().to_owned(), e.id, e.event.clone()))
        .collect();
    let mut want: Vec<(String, u64, Option<String>)> = vec![
        ("a".into(), ids[0], Some("one".into())),
        ("b".into(), ids[1], Some("two".into())),
        ("a".into(), ids[2], Some("two".into())),
        ("b".into(), ids[3], None),
    ];
    if backend.sharded() {
        // Request order per channel; channels of different shards interleave freely.
        seen.sort_by(|x, y| x.0.cmp(&y.0));
        want.sort_by(|x, y| x.0.cmp(&y.0));
    }
    assert_eq!(seen, want);
}

async fn resume_replays_exactly_what_was_missed(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut client = stack.subscribe("channel=orders").await;
    stack.publish_one("orders", json!("first")).await;
    let seen = client.expect_events(1, SOON).await;
    let last = client.last_id.clone().expect("last id");
    assert_eq!(last, seen[0].id.to_string());
    drop(client);

    let mut missed = Vec::new();
    for n in 0..5 {
        missed.push(stack.publish_one("orders", json!(n)).await);
    }
    let mut back = stack.subscribe_at(0, "channel=orders", Some(&last)).await;
    let replayed: Vec<u64> = back
        .expect_events(5, SOON)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(replayed, missed);
    let live = stack.publish_one("orders", json!("live")).await;
    assert_eq!(
        back.next_event(SOON).await.expect("live").id,
        live,
        "no duplicate, nothing skipped"
    );
}

async fn a_client_that_saw_no_event_resumes_from_its_position_line(backend: Backend) {
    let stack = Stack::start(backend).await;
    let client = stack.subscribe("channel=quiet").await;
    let position = client
        .last_id
        .clone()
        .expect("the opening id line sets the last event id");
    drop(client);
    let missed = stack.publish_one("quiet", json!("while away")).await;
    let mut back = stack
        .subscribe_at(0, "channel=quiet", Some(&position))
        .await;
    assert_eq!(
        back.next_event(SOON).await.expect("missed event").id,
        missed
    );
}

async fn one_id_resumes_every_channel_of_a_connection(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut client = stack.subscribe("channel=a&channel=b&channel=c").await;
    stack.publish_one("a", json!(0)).await;
    stack.publish_one("b", json!(0)).await;
    client.expect_events(2, SOON).await;
    let last = client.last_id.clone().expect("last id");
    drop(client);
    let mut expected = Vec::new();
    for (i, channel) in ["b", "a", "c", "c", "a", "b"].iter().enumerate() {
        expected.push((
            channel.to_string(),
            stack.publish_one(channel, json!(i)).await,
        ));
    }
    stack.publish_one("elsewhere", json!("not ours")).await;
    let mut back = stack
        .subscribe_at(0, "channel=a&channel=b&channel=c", Some(&last))
        .await;
    let got: Vec<(String, u64)> = back
        .expect_events(6, SOON)
        .await
        .iter()
        .map(|e| (e.channel().to_owned(), e.id))
        .collect();
    assert_delivered(backend, &got, &expected, "every channel, in global order");
}

async fn query_last_event_id_resumes_a_first_connect_and_the_header_wins(backend: Backend) {
    let stack = Stack::start(backend).await;
    let first = stack.publish_one("orders", json!(1)).await;
    let second = stack.publish_one("orders", json!(2)).await;
    let third = stack.publish_one("orders", json!(3)).await;
    let query = format!("channel=orders&last_event_id={first}");
    let mut by_query = stack.subscribe_at(0, &query, None).await;
    let ids: Vec<u64> = by_query
        .expect_events(2, SOON)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [second, third]);
    // A browser reconnects to the same URL and sends the newer id in the header.
    let mut by_header = stack
        .subscribe_at(0, &query, Some(&second.to_string()))
        .await;
    assert_eq!(by_header.next_event(SOON).await.expect("event").id, third);
}

async fn trimmed_history_sends_reset_naming_the_channel(backend: Backend) {
    let mut options = Options::default();
    options.broker.history_max_len = 10;
    let stack = Stack::start_with(backend, options).await;
    let client = stack.subscribe("channel=orders&channel=other").await;
    let cursor = client.last_id.clone().expect("position");
    drop(client);
    // Redis trims whole stream nodes (100 entries), so go well past both limits.
    let mut batch = Vec::new();
    for n in 0..300 {
        batch.push(json!({"channel": "orders", "data": n}));
    }
    stack.publish(json!({"events": batch})).await;
    let other = stack.publish_one("other", json!("kept")).await;

    let mut back = stack
        .subscribe_at(0, "channel=orders&channel=other", Some(&cursor))
        .await;
    // Shards replay one after another, so across shards either may come first.
    let mut first_two = vec![
        back.next_event(SOON).await.expect("first"),
        back.next_event(SOON).await.expect("second"),
    ];
    if !backend.sharded() {
        assert_eq!(first_two[0].event.as_deref(), Some("reset"), "reset first");
    }
    first_two.sort_by_key(|e| e.event.as_deref() != Some("reset"));
    let [reset, kept] = <[_; 2]>::try_from(first_two).expect("two events");
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(reset.block.id, None, "a reset does not move the position");
    assert_eq!(
        reset.envelope,
        json!({"channels": ["orders"], "reason": "history_trimmed"})
    );
    assert_eq!(kept.id, other, "other's history");
    let live = stack.publish_one("orders", json!("live")).await;
    assert_eq!(back.next_event(SOON).await.expect("live").id, live);
}

async fn a_cursor_ahead_of_the_counter_sends_reset(backend: Backend) {
    let stack = Stack::start(backend).await;
    let probe = stack.subscribe("channel=orders").await;
    let position: u64 = probe
        .last_id
        .as_deref()
        .expect("position")
        .parse()
        .expect("numeric");
    let ahead = (position + 1_000_000).to_string();
    let mut client = SseClient::connect(
        &stack.http,
        &stack.events_url(0, "channel=orders"),
        Some(&ahead),
    )
    .await;
    let opening = client.next_block(SOON).await.expect("opening");
    assert_eq!(
        opening.id.as_deref(),
        Some(position.to_string().as_str()),
        "position replaces the unknown id"
    );
    let reset = client.next_event(SOON).await.expect("reset");
    assert_eq!(
        reset.envelope,
        json!({"channels": ["orders"], "reason": "unknown_position"})
    );
    let live = stack.publish_one("orders", json!(1)).await;
    assert_eq!(client.next_event(SOON).await.expect("live").id, live);
}

async fn expired_history_sends_reset(backend: Backend) {
    let mut options = Options::default();
    options.broker.history_ttl = Duration::from_secs(1);
    let stack = Stack::start_with(backend, options).await;
    let client = stack.subscribe("channel=orders").await;
    let cursor = client.last_id.clone().expect("position");
    drop(client);
    let id = stack.publish_one("orders", json!("soon expired")).await;

    let mut fresh = stack.subscribe_at(0, "channel=orders", Some(&cursor)).await;
    assert_eq!(
        fresh.next_event(SOON).await.expect("replayed").id,
        id,
        "still within the TTL"
    );
    drop(fresh);

    let expired = wait_until(SOON, || {
        let stack = &stack;
        let cursor = cursor.clone();
        async move {
            let mut back = stack.subscribe_at(0, "channel=orders", Some(&cursor)).await;
            let first = back.next_event(SOON).await.expect("an event or a reset");
            first.event.as_deref() == Some("reset")
                && first.envelope == json!({"channels": ["orders"], "reason": "history_expired"})
        }
    })
    .await;
    assert!(expired, "after the TTL the old cursor must get a reset");
}

async fn position_lines_keep_quiet_clients_current(backend: Backend) {
    let mut options = Options::default();
    options.gateway.heartbeat_interval = Duration::from_millis(200);
    let stack = Stack::start_with(backend, options).await;
    let mut quiet = stack.subscribe("channel=quiet").await;
    let busy = stack.publish_one("busy", json!("elsewhere")).await;
    loop {
        let block = quiet.next_block(SOON).await.expect("position line");
        assert!(block.data.is_none(), "quiet must see no events: {block:?}");
        if block
            .id
            .as_deref()
            .is_some_and(|id| id.parse::<u64>().expect("numeric") >= busy)
        {
            break;
        }
    }
    // The advanced id is a valid resume point: nothing of `quiet` is skipped.
    let cursor = quiet.last_id.clone().expect("id");
    drop(quiet);
    let missed = stack.publish_one("quiet", json!("now")).await;
    let mut back = stack.subscribe_at(0, "channel=quiet", Some(&cursor)).await;
    assert_eq!(back.next_event(SOON).await.expect("missed").id, missed);
}

/// A page that reconnects by itself (a fresh ticket, a new `EventSource`) cannot read id-only
/// lines; with `?position_events=true` every position fires an `eventgate-position` event
/// carrying the id, and resuming from it is exact.
async fn position_events_tell_scripts_where_a_quiet_stream_stands(backend: Backend) {
    let mut options = Options::default();
    options.gateway.heartbeat_interval = Duration::from_millis(200);
    let stack = Stack::start_with(backend, options).await;
    let query = "channel=quiet&position_events=true";
    let mut quiet = SseClient::connect(&stack.http, &stack.events_url(0, query), None).await;
    assert_eq!(quiet.status, StatusCode::OK);
    let fired = |block: &support::sse::Block| {
        let id = block.id.clone().expect("an id");
        assert_eq!(
            block.event.as_deref(),
            Some("eventgate-position"),
            "{block:?}"
        );
        assert_eq!(block.data, Some(json!({"id": id}).to_string()), "{block:?}");
        id
    };
    let opening = quiet.next_block(SOON).await.expect("opening block");
    assert!(opening.retry.is_some(), "{opening:?}");
    fired(&opening);
    let busy = stack.publish_one("busy", json!("elsewhere")).await;
    loop {
        let block = quiet.next_block(SOON).await.expect("a position");
        if block.id.is_none() && !block.comments.is_empty() {
            continue; // a heartbeat
        }
        if fired(&block).parse::<u64>().expect("numeric") >= busy {
            break;
        }
    }
    let cursor = quiet.last_id.clone().expect("id");
    drop(quiet);
    let missed = stack.publish_one("quiet", json!("now")).await;
    let mut back = stack.subscribe_at(0, query, Some(&cursor)).await;
    let event = loop {
        let event = back.next_event(SOON).await.expect("the missed event");
        if event.event.as_deref() != Some("eventgate-position") {
            break event;
        }
    };
    assert_eq!(event.id, missed);

    let refused = SseClient::connect(
        &stack.http,
        &stack.events_url(0, "channel=quiet&position_events=yes"),
        None,
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.error_body().await["error"]["code"],
        "invalid_position_events"
    );
}

async fn heartbeats_are_comments(backend: Backend) {
    let mut options = Options::default();
    options.gateway.heartbeat_interval = Duration::from_millis(200);
    let stack = Stack::start_with(backend, options).await;
    let mut client = stack.subscribe("channel=orders").await;
    let found = loop {
        let block = client.next_block(SOON).await.expect("block");
        if block.comments.iter().any(|c| c == "ping") {
            break block;
        }
    };
    assert_eq!(found.raw, ": ping");
}

async fn slow_client_is_dropped_while_a_fast_one_gets_everything(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut options = Options::default();
    options.gateway.client_queue_size = 16;
    options.gateway.write_timeout = Duration::from_secs(1);
    let stack = Stack::start_with(backend, options).await;
    let addr = stack.gateways[0]
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut slow = socket.connect(addr).await.expect("connect");
    slow.write_all(support::raw_sse_request("channel=orders").as_bytes())
        .await
        .expect("request");
    let mut fast = stack.subscribe("channel=orders").await;
    assert!(
        wait_until(SOON, || async { stack.stats(0).await["connections"] == 2 }).await,
        "both clients connected"
    );

    let payload = "x".repeat(16 * 1024);
    let mut published = Vec::new();
    while stack.stats(0).await["slow_clients_dropped"] == 0 {
        assert!(
            published.len() < 3000,
            "the stalled client was never dropped"
        );
        // Bursts below the queue size: a client that keeps up is never dropped.
        let batch: Vec<_> = (0..8)
            .map(|_| json!({"channel": "orders", "data": payload}))
            .collect();
        let ids = stack.publish(json!({"events": batch})).await;
        published.extend(ids.into_iter().map(|(_, id)| id));
        let got: Vec<u64> = fast
            .expect_events(8, SOON)
            .await
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            got,
            published[published.len() - 8..],
            "the fast client keeps up, in order"
        );
    }
    // Its socket accepts nothing, so the write timeout closes the connection.
    assert!(
        wait_until(SOON, || async { stack.stats(0).await["connections"] == 1 }).await,
        "the stalled connection is closed"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SOON, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client's socket is closed");

    // It comes back with the last id it got (whole events only) and catches up exactly.
    let text = String::from_utf8_lossy(&rest);
    let chunked = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    // Undo the chunked encoding; the last chunk may be cut short.
    let (mut body, mut left) = (String::new(), chunked);
    while let Some((size, after)) = left.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let take = size.min(after.len());
        body.push_str(&after[..take]);
        left = after[take..].strip_prefix("\r\n").unwrap_or("");
        if size == 0 || take < size {
            break;
        }
    }
    let mut got = Vec::new();
    let mut blocks: Vec<&str> = body.split("\n\n").collect();
    blocks.pop(); // cut short, or empty
    for block in blocks.into_iter().filter(|b| b.contains("data: ")) {
        if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
            got.push(id.trim().parse::<u64>().expect("id"));
        }
    }
    let last = *got.last().expect("the slow client got some events first");
    assert_eq!(got, published[..got.len()], "what it got was in order");
    let mut resumed = stack
        .subscribe_at(0, "channel=orders", Some(&last.to_string()))
        .await;
    let missed = &published[got.len()..];
    let caught_up: Vec<u64> = resumed
        .expect_events(missed.len(), SOON)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(caught_up, missed, "the dropped client catches up by resume");
}

async fn stats_count_connections_and_deliveries(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut a = stack.subscribe("channel=orders").await;
    let mut b = stack.subscribe("channel=orders&channel=other").await;
    for n in 0..3 {
        stack.publish_one("orders", json!(n)).await;
    }
    a.expect_events(3, SOON).await;
    b.expect_events(3, SOON).await;
    let stats = stack.stats(0).await;
    assert_eq!(stats["replica"], "replica-0");
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["channels"], 2);
    assert_eq!(stats["events_received"], 3);
    assert_eq!(stats["events_delivered"], 6);
    assert_eq!(stats["slow_clients_dropped"], 0);
    drop(a);
    assert!(
        wait_until(SOON, || async { stack.stats(0).await["connections"] == 1 }).await,
        "a closed stream is counted out"
    );
}

async fn shutdown_ends_streams(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    let mut client = stack.subscribe("channel=orders").await;
    let gateway = stack.gateways.remove(0);
    gateway.shutdown.cancel();
    client.expect_closed(SOON).await;
    let finished = tokio::time::timeout(SOON, gateway.task).await;
    assert!(
        matches!(finished, Ok(Ok(Ok(())))),
        "the gateway stops cleanly: {finished:?}"
    );
}

/// Thousands of events published concurrently while clients on different channel sets drop and
/// resume over and over: every client ends with exactly the events of its channels, in order.
async fn resume_is_exact_while_publishing_and_reconnecting(backend: Backend) {
    use std::sync::Arc;

    const EVENTS: usize = 3000;
    const CLIENTS: usize = 12;
    let stack = Arc::new(Stack::start(backend).await);
    let channel_sets: Vec<Vec<&str>> = (0..CLIENTS)
        .map(|i| match i % 4 {
            0 => vec!["c0"],
            1 => vec!["c1", "c2"],
            2 => vec!["c0", "c1", "c2"],
            _ => vec!["c2", "c0"],
        })
        .collect();

    // Every client starts from a position taken before publishing starts.
    let mut cursors = Vec::new();
    for set in &channel_sets {
        let query: Vec<String> = set.iter().map(|c| format!("channel={c}")).collect();
        let client = stack.subscribe(&query.join("&")).await;
        cursors.push(client.last_id.clone().expect("position"));
    }

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stack = stack.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut published: Vec<(String, u64)> = Vec::with_capacity(EVENTS);
            let mut n = 0;
            while published.len() < EVENTS {
                let size = 1 + n % 7;
                let batch: Vec<_> = (0..size)
                    .map(|k| json!({"channel": format!("c{}", (n + k) % 3), "data": {"n": n, "k": k}}))
                    .collect();
                published.extend(stack.publish(json!({"events": batch})).await);
                n += 1;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            published
        })
    };

    let mut readers = Vec::new();
    for (i, (set, cursor)) in channel_sets.iter().zip(cursors).enumerate() {
        let stack = stack.clone();
        let query: Vec<String> = set.iter().map(|c| format!("channel={c}")).collect();
        let query = query.join("&");
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            let mut received: Vec<(String, u64)> = Vec::new();
            let mut last = cursor;
            let mut reconnects = 0u32;
            let mut quiet_rounds = 0;
            // Read a few events, drop the connection, resume; stop once nothing new arrives.
            while quiet_rounds < 3 {
                let mut client = stack.subscribe_at(0, &query, Some(&last)).await;
                reconnects += 1;
                let take = 1 + (i * 7 + reconnects as usize * 13) % 60;
                let mut got = 0;
                while got < take {
                    match client.next_event(Duration::from_millis(500)).await {
                        Ok(event) => {
                            assert_ne!(
                                event.event.as_deref(),
                                Some("reset"),
                                "no history was lost"
                            );
                            received.push((event.channel().to_owned(), event.id));
                            got += 1;
                        }
                        Err(_) => break,
                    }
                }
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                quiet_rounds = if got == 0 && finished {
                    quiet_rounds + 1
                } else {
                    0
                };
                last = client.last_id.clone().expect("last id");
            }
            (received, reconnects)
        }));
    }

    let published = publisher.await.expect("publisher");
    for (i, reader) in readers.into_iter().enumerate() {
        let (received, reconnects) = reader.await.expect("reader");
        let set = &channel_sets[i];
        let expected: Vec<(String, u64)> = published
            .iter()
            .filter(|(c, _)| set.contains(&c.as_str()))
            .cloned()
            .collect();
        assert!(
            reconnects > 10,
            "client {i} reconnected only {reconnects} times"
        );
        assert_eq!(
            received.len(),
            expected.len(),
            "client {i}: count (loss or duplicates)"
        );
        assert_delivered(
            backend,
            &received,
            &expected,
            &format!("client {i}: exactly its channels' events, in order"),
        );
    }
}

/// A browser may send its EventSource request on a connection it already used for another
/// request: that stream takes the general HTTP path and must look exactly the same.
async fn a_stream_on_a_reused_keep_alive_connection_works_the_same(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stack = Stack::start(backend).await;
    let addr: std::net::SocketAddr = stack.gateways[0]
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("first request");
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(r#"{"status":"ok"}"#) {
        let n = tokio::time::timeout(SOON, conn.read(&mut buf))
            .await
            .expect("answer")
            .expect("read");
        assert!(n > 0, "connection closed after the first request");
        seen.extend_from_slice(&buf[..n]);
    }
    conn.write_all(support::raw_sse_request("channel=orders").as_bytes())
        .await
        .expect("second request");
    // The stream is positioned once its opening `id:` line arrives: events after it reach it.
    let mut stream = Vec::new();
    while !String::from_utf8_lossy(&stream).contains("\nid: ") {
        let n = tokio::time::timeout(SOON, conn.read(&mut buf))
            .await
            .expect("the second request opened a stream")
            .expect("read");
        assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&stream));
        stream.extend_from_slice(&buf[..n]);
    }
    let id = stack
        .publish_one("orders", json!({"via": "keep-alive"}))
        .await;
    let want = format!(
        "id: {id}\ndata: {{\"id\":\"{id}\",\"channel\":\"orders\",\"data\":{{\"via\":\"keep-alive\"}}"
    );
    while !String::from_utf8_lossy(&stream).contains(&want) {
        let n = tokio::time::timeout(SOON, conn.read(&mut buf))
            .await
            .expect("event")
            .expect("read");
        assert!(n > 0, "stream closed: {}", String::from_utf8_lossy(&stream));
        stream.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&stream);
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.contains("retry: "), "{text}");
}

/// `?duration=` ends a stream after that long, so tools that read whole responses (monitoring
/// probes, k6) can check one.
async fn a_stream_with_a_duration_ends_by_itself(backend: Backend) {
    let stack = Stack::start(backend).await;
    let started = std::time::Instant::now();
    let mut client = stack.subscribe("channel=orders&duration=700ms").await;
    let id = stack.publish_one("orders", json!("within")).await;
    assert_eq!(client.next_event(SOON).await.expect("event").id, id);
    client.expect_closed(SOON).await;
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(700),
        "ended after {lasted:?}"
    );
    let refused = SseClient::connect(
        &stack.http,
        &stack.events_url(0, "channel=orders&duration=2d"),
        None,
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.error_body().await["error"]["code"],
        "invalid_duration"
    );
}

/// Large requests do not wait for the call in flight: once a hundred events queue up, a second
/// call goes to Redis beside it (Redis runs them in order), so Redis does not sit idle between
/// large calls. Ids still follow the order the calls ran in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_waiting_events_start_a_second_script_call() {
    let stack = std::sync::Arc::new(Stack::start(Backend::Redis).await);
    let redis = stack.redis();
    let _: () = redis.query(&["CLIENT", "PAUSE", "5000", "WRITE"]).await;
    // A first call, recognisable by its 20 KB event, waits in Redis.
    let first = tokio::spawn({
        let stack = stack.clone();
        async move { stack.publish_one("orders", json!("x".repeat(20_000))).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while redis.held_calls_over(10_000).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first call never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 150 events queue behind it, and go to Redis without waiting for it.
    let events: Vec<serde_json::Value> = (0..150)
        .map(|i| json!({"channel": "orders", "data": i}))
        .collect();
    let second = tokio::spawn({
        let stack = stack.clone();
        async move { stack.publish(json!({"events": events})).await }
    });
    while redis.held_calls_over(10_000).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "150 queued events waited for the call in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis.query(&["CLIENT", "UNPAUSE"]).await;
    let first = first.await.expect("first publish");
    let second = second.await.expect("second publish");
    assert_eq!(second.len(), 150);
    assert!(
        second.iter().all(|(_, id)| *id > first),
        "{first} {second:?}"
    );
}

/// An idle publisher sends each publish in a script call of its own; publishes that arrive
/// while a call is in flight wait and share the next call (one in flight at a time). Every
/// publish gets its own id either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_share_script_calls_only_when_they_overlap() {
    let stack = Stack::start(Backend::Redis).await;
    let redis = stack.redis();
    let before = redis.script_calls().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(stack.publish_one("orders", json!(i)).await);
    }
    // (A gateway's position marker is a script call too, now and then.)
    let calls = redis.script_calls().await - before;
    assert!((10..=11).contains(&calls), "{calls} calls: one each");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Fifty at once while Redis holds writes back: the first call waits in Redis, the rest of
    // the requests wait in the publisher's queue and go together once it returns: two calls,
    // and perhaps a marker. (Four calls in flight would make five.)
    let before = redis.script_calls().await;
    let _: () = redis.query(&["CLIENT", "PAUSE", "500", "WRITE"]).await;
    let publishes = (0..50).map(|i| stack.publish_one("orders", json!(i)));
    let mut ids = futures::future::join_all(publishes).await;
    let calls = redis.script_calls().await - before;
    assert!(
        calls <= 3,
        "{calls} script calls for 50 overlapping publishes"
    );
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 50, "every publish has its own id");
}
