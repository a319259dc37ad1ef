//! Redis-only behaviour: several replicas on one Redis, one pub/sub connection per replica, and
//! what connected clients see when Redis or the pub/sub connection goes away.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::json;
use support::*;

async fn ids_of(client: &mut SseClient, n: usize) -> Vec<u64> {
    let events = client.expect_events(n, SOON).await;
    for event in &events {
        assert_ne!(
            event.event.as_deref(),
            Some("reset"),
            "unexpected reset: {:?}",
            event.envelope
        );
    }
    events.iter().map(|e| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_each_deliver_every_event_to_their_own_clients() {
    let mut options = Options::default();
    options.broker.redis_pool_size = 2;
    let mut stack = Stack::start_with(Backend::Redis, options).await;
    stack.add_gateway().await;

    let mut clients = Vec::new();
    for i in 0..40 {
        let query = if i % 2 == 0 {
            "channel=orders"
        } else {
            "channel=orders&channel=other"
        };
        clients.push(stack.subscribe_at(i % 2, query, None).await);
    }
    let mut expected = Vec::new();
    for n in 0..10 {
        expected.push(stack.publish_one("orders", json!(n)).await);
    }
    let batch: Vec<_> = (0..40)
        .map(|n| json!({"channel": "orders", "data": n}))
        .collect();
    expected.extend(
        stack
            .publish(json!({"events": batch}))
            .await
            .into_iter()
            .map(|(_, id)| id),
    );
    for client in &mut clients {
        assert_eq!(ids_of(client, 50).await, expected);
    }

    let redis = stack.redis();
    let numsub: (String, u64) = redis
        .query(&["PUBSUB", "NUMSUB", "eventgate:live:orders"])
        .await;
    assert_eq!(numsub.1, 2, "one subscription per replica, not per client");
    let pubsub_clients: String = redis.query(&["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    assert_eq!(
        pubsub_clients.lines().count(),
        2,
        "one pub/sub connection per replica"
    );
    let all_clients: String = redis.query(&["CLIENT", "LIST"]).await;
    // 2 pub/sub + at most 2 pooled per service (3 services) + this test's own connection.
    assert!(
        all_clients.lines().count() <= 2 + 3 * 2 + 1,
        "40 SSE clients must not open Redis connections:\n{all_clients}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_unsubscribed_when_its_last_local_client_leaves() {
    let stack = Stack::start(Backend::Redis).await;
    let redis = stack.redis();
    let a = stack.subscribe("channel=orders").await;
    let b = stack.subscribe("channel=orders").await;
    let _other = stack.subscribe("channel=other").await;
    let channels = || async {
        redis
            .query::<Vec<String>>(&["PUBSUB", "CHANNELS", "eventgate:live:*"])
            .await
    };
    let mut subscribed = channels().await;
    subscribed.sort();
    assert_eq!(
        subscribed,
        ["eventgate:live:orders", "eventgate:live:other"]
    );

    drop(a);
    let still = channels().await;
    assert!(
        still.contains(&"eventgate:live:orders".to_owned()),
        "one client remains"
    );
    drop(b);
    let released = wait_until(SOON, || async {
        channels().await == vec!["eventgate:live:other".to_owned()]
    })
    .await;
    assert!(released, "orders is unsubscribed once nobody here wants it");

    let mut again = stack.subscribe("channel=orders").await;
    let id = stack.publish_one("orders", json!("again")).await;
    assert_eq!(again.next_event(SOON).await.expect("event").id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_persistence_loses_nothing_for_connected_clients() {
    let mut options = Options {
        persistent_redis: true,
        ..Options::default()
    };
    options.broker.redis_timeout = Duration::from_secs(1);
    // fsync-always AOF on one server: a restart keeps every write, and the operator says so.
    options.broker.redis_lossless_restarts = true;
    let mut stack = Stack::start_with(Backend::Redis, options).await;
    let mut clients = vec![
        stack.subscribe("channel=orders").await,
        stack.subscribe("channel=orders&channel=other").await,
    ];
    let mut expected = Vec::new();
    for n in 0..20 {
        expected.push(stack.publish_one("orders", json!(n)).await);
    }

    let publisher_ready = || async {
        let url = format!("{}/readyz", stack.publisher.url);
        stack.http.get(url).send().await.expect("readyz").status()
    };
    assert_eq!(publisher_ready().await, StatusCode::OK);
    stack.redis.as_mut().expect("redis").stop().await;
    assert!(
        wait_until(SOON, || async {
            stack.readyz_status(0).await == StatusCode::SERVICE_UNAVAILABLE
        })
        .await,
        "/readyz turns 503 while Redis is down"
    );
    assert_eq!(publisher_ready().await, StatusCode::SERVICE_UNAVAILABLE);
    let started = Instant::now();
    let (status, body) = stack
        .post_publish(r#"{"channel":"orders","data":1}"#, "application/json")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the publisher fails fast"
    );
    let started = Instant::now();
    let refused =
        SseClient::connect(&stack.http, &stack.events_url(0, "channel=orders"), None).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a new stream waits REDIS_TIMEOUT, then 503"
    );
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.error_body().await["error"]["code"], "unavailable");
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut ws = WsClient::connect(&stack.ws_url(0)).await;
    let error = ws
        .request(json!({"type": "subscribe", "channel": "orders", "id": 1}))
        .await;
    assert_eq!(
        (error["code"].as_str(), error["id"].as_i64()),
        (Some("unavailable"), Some(1)),
        "{error}"
    );
    assert_eq!(
        ws.request(json!({"type": "ping"})).await["type"],
        "pong",
        "the socket stays open"
    );

    stack.redis.as_mut().expect("redis").restart().await;
    assert!(
        stack.wait_ready(0, SOON).await,
        "the gateway recovers by itself"
    );
    assert_eq!(publisher_ready().await, StatusCode::OK);
    let deadline = Instant::now() + SOON;
    for n in 20..40 {
        loop {
            let body = json!({"channel": "orders", "data": n}).to_string();
            let (status, answer) = stack.post_publish(body, "application/json").await;
            if status == StatusCode::ACCEPTED {
                expected.push(support::published(&answer)[0].1);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the publisher recovers without a restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for client in &mut clients {
        assert_eq!(
            ids_of(client, 40).await,
            expected,
            "nothing missed across the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_is_backfilled_while_publishing() {
    let stack = Arc::new(Stack::start(Backend::Redis).await);
    let mut clients = [
        stack.subscribe("channel=orders").await,
        stack.subscribe("channel=orders&channel=other").await,
        stack.subscribe("channel=other").await,
    ];
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stack, done) = (stack.clone(), done.clone());
        tokio::spawn(async move {
            let mut published = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::SeqCst) || n < 300 {
                let channel = if n % 3 == 0 { "other" } else { "orders" };
                published.push((
                    channel.to_owned(),
                    stack.publish_one(channel, json!(n)).await,
                ));
                n += 1;
            }
            published
        })
    };
    for kill in 1..=3u64 {
        let killed: u64 = stack
            .redis()
            .query(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .await;
        assert_eq!(killed, 1);
        let reconnected = wait_until(SOON, || async {
            stack.stats(0).await["live_reconnects"].as_u64() == Some(kill)
                && stack.readyz_status(0).await == StatusCode::OK
        })
        .await;
        assert!(reconnected, "reconnect {kill}");
    }
    done.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("publisher");
    let sets: [&[&str]; 3] = [&["orders"], &["orders", "other"], &["other"]];
    for (client, set) in clients.iter_mut().zip(sets) {
        let expected: Vec<u64> = published
            .iter()
            .filter(|(c, _)| set.contains(&c.as_str()))
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(
            ids_of(client, expected.len()).await,
            expected,
            "exactly once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_resets_connected_clients() {
    let mut stack = Stack::start(Backend::Redis).await;
    let mut client = stack.subscribe("channel=orders").await;
    let away = stack.subscribe("channel=orders").await;
    let before = stack.publish_one("orders", json!("before")).await;
    assert_eq!(client.next_event(SOON).await.expect("event").id, before);
    let old_cursor = away.last_id.clone().expect("position");
    drop(away);

    let redis = stack.redis.as_mut().expect("redis");
    redis.stop().await;
    redis.restart().await;
    assert!(stack.wait_ready(0, SOON).await);

    let reset = client.next_event(SOON).await.expect("reset");
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(
        reset.envelope,
        json!({"channels": ["orders"], "reason": "data_lost"})
    );
    let position = reset.id;
    assert!(position > 0, "the reset carries the new position");
    let after = stack.publish_one("orders", json!("after")).await;
    assert!(after > before, "ids never repeat across a data loss");
    assert_eq!(client.next_event(SOON).await.expect("live").id, after);

    // A client that was away during the loss comes back with an id from the old counter.
    let mut returning = stack
        .subscribe_at(0, "channel=orders", Some(&old_cursor))
        .await;
    let reset = returning.next_event(SOON).await.expect("reset");
    assert_eq!(
        reset.envelope,
        json!({"channels": ["orders"], "reason": "unknown_position"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_set_back_by_hand_never_breaks_a_batch() {
    let stack = Stack::start(Backend::Redis).await;
    let mut client = stack.subscribe("channel=orders").await;
    let before = stack.publish_one("orders", json!("before")).await;
    assert_eq!(ids_of(&mut client, 1).await, [before]);
    // Someone sets the counter far below what the stream already holds.
    let _: () = stack.redis().query(&["SET", "eventgate:seq", "5"]).await;
    let batch: Vec<_> = (0..3)
        .map(|n| json!({"channel": "orders", "data": n}))
        .collect();
    let ids: Vec<u64> = stack
        .publish(json!({"events": batch}))
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert!(
        ids[0] > before && ids.windows(2).all(|w| w[1] > w[0]),
        "{before} then {ids:?}"
    );
    assert_eq!(
        ids_of(&mut client, 3).await,
        ids,
        "the whole batch, after the old history"
    );
    let length: u64 = stack
        .redis()
        .query(&["XLEN", "eventgate:stream:orders"])
        .await;
    assert_eq!(length, 4);
}

/// The scenario of a Redis that restarts from an old snapshot (RDB only, `SHUTDOWN NOSAVE` or a
/// crash after the last `SAVE`): the counter goes back, and the lost ids must never be handed
/// out again, nor may any client silently miss events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_old_snapshot_never_reuses_ids_and_resets_clients() {
    let mut options = Options::default();
    options.broker.redis_timeout = Duration::from_secs(1);
    let mut stack = Stack::start_with(Backend::Redis, options).await;
    let mut connected = stack.subscribe("channel=c&channel=d").await;

    let mut answered: Vec<u64> = vec![stack.publish_one("c", json!(0)).await];
    let saved = answered[0];
    let _: String = stack.redis().query(&["SAVE"]).await;
    for n in 1..=5 {
        answered.push(stack.publish_one("c", json!(n)).await);
    }
    let x = *answered.last().expect("ids");
    assert_eq!(ids_of(&mut connected, 6).await, answered);

    // Like `redis-cli SHUTDOWN NOSAVE`: the five events after the snapshot are gone.
    let redis = stack.redis.as_mut().expect("redis");
    redis.kill().await;
    redis.restart().await;
    let restored: Vec<String> = stack
        .redis()
        .query::<Vec<(String, Vec<String>)>>(&["XRANGE", "eventgate:stream:c", "-", "+"])
        .await
        .into_iter()
        .map(|(id, _): (String, Vec<String>)| id)
        .collect();
    assert_eq!(
        restored,
        [format!("{saved}-0")],
        "the snapshot holds one event"
    );
    assert!(stack.wait_ready(0, SOON).await, "the gateway reconnects");

    let mut after = Vec::new();
    for n in 6..13 {
        after.push(publish_retrying(&stack, "c", n).await);
    }
    let mut all = answered.clone();
    all.extend(&after);
    let distinct: std::collections::HashSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "an id named two events: {all:?}");
    assert!(
        after[0] > x,
        "new ids start above every id handed out: {x} then {after:?}"
    );

    // The connected client is told before the new events, with its new position.
    let reset = connected.next_event(SOON).await.expect("reset");
    assert_eq!(reset.event.as_deref(), Some("reset"), "{:?}", reset.block);
    assert_eq!(
        reset.envelope,
        json!({"channels": ["c", "d"], "reason": "data_lost"})
    );
    assert!(
        reset.id < after[0] && reset.id > x,
        "{} then {after:?}",
        reset.id
    );
    let connected_reset = reset.id;
    assert_eq!(
        ids_of(&mut connected, 7).await,
        after,
        "then exactly the new events"
    );

    // Clients that were away resume from before and from inside the lost range: a reset at the
    // new epoch's start, then every event of the new epoch.
    let mut epoch_events = after.clone();
    for cursor in [saved, x] {
        let mut back = stack
            .subscribe_at(0, "channel=c", Some(&cursor.to_string()))
            .await;
        let reset = back.next_event(SOON).await.expect("reset");
        assert_eq!(
            (reset.event.as_deref(), &reset.envelope),
            (
                Some("reset"),
                &json!({"channels": ["c"], "reason": "unknown_position"})
            ),
            "a cursor from before the loss ({cursor})"
        );
        assert_eq!(
            back.last_id,
            Some(connected_reset.to_string()),
            "the stream continues from the new epoch's start, as the connected client's did"
        );
        let next = stack.publish_one("c", json!("next")).await;
        epoch_events.push(next);
        assert_eq!(ids_of(&mut back, epoch_events.len()).await, epoch_events);
        assert_eq!(ids_of(&mut connected, 1).await, [next]);
    }
}

/// Publishes one event, retrying while the publisher reconnects; returns its id.
async fn publish_retrying(stack: &Stack, channel: &str, n: u64) -> u64 {
    let deadline = Instant::now() + SOON;
    loop {
        let body = json!({"channel": channel, "data": n}).to_string();
        let (status, answer) = stack.post_publish(body, "application/json").await;
        if status == StatusCode::ACCEPTED {
            return support::published(&answer)[0].1;
        }
        assert!(
            Instant::now() < deadline,
            "publishing never recovered: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publish that was sent but not answered may have been applied: the publisher says the
/// outcome is unknown (never "nothing was published"), and a retry with the same key answers
/// the original ids once Redis runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_frozen_redis_has_an_unknown_outcome_and_retries_safely() {
    let mut options = Options::default();
    options.broker.redis_timeout = Duration::from_secs(1);
    let stack = Stack::start_with(Backend::Redis, options).await;
    let mut client = stack.subscribe("channel=c").await;
    let pid = stack.redis().pid().expect("pid").to_string();
    let signal = |s: &str| {
        std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill")
    };
    let publish = |key: Option<&'static str>, n: u64| {
        let request = stack
            .http
            .post(format!("{}/v1/publish", stack.publisher.url))
            .bearer_auth(TEST_PUBLISHER_KEY)
            .json(&json!({"channel": "c", "data": n}));
        let request = match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        };
        async move {
            let response = request.send().await.expect("publish");
            let (status, headers) = (response.status(), response.headers().clone());
            (
                status,
                headers,
                response.json::<serde_json::Value>().await.expect("JSON"),
            )
        }
    };

    signal("-STOP");
    let (status, headers, body) = publish(None, 1).await;
    let (keyed_status, _, keyed) = publish(Some("order-7"), 2).await;
    signal("-CONT");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("Idempotency-Key") && !message.contains("nothing was published"),
        "{message}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        (keyed_status, &keyed["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("outcome_unknown"))
    );

    // Redis ran both once it woke up; the keyed retry gets the first call's id.
    let delivered = ids_of(&mut client, 2).await;
    let (status, headers, retried) = publish(Some("order-7"), 2).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(headers["idempotent-replayed"], "true");
    let id = support::published(&retried)[0].1;
    assert!(delivered.contains(&id), "{id} is one of {delivered:?}");
    let length: u64 = stack.redis().query(&["XLEN", "eventgate:stream:c"]).await;
    assert_eq!(length, 2, "each publish applied once");
    let quiet = client.next_event(Duration::from_millis(500)).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
}

/// Entries eventgate did not write (or that are damaged) are skipped and counted, never read
/// again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_history_entries_are_skipped_and_counted() {
    let stack = Stack::start(Backend::Redis).await;
    let start = stack.subscribe("channel=c").await;
    let cursor = start.last_id.clone().expect("position");
    drop(start);
    let first = stack.publish_one("c", json!(1)).await;
    let redis = stack.redis();
    let no_body = format!("{}-0", first + 1);
    let not_json = format!("{}-0", first + 2);
    let _: String = redis
        .query(&["XADD", "eventgate:stream:c", &no_body, "x", "1"])
        .await;
    let _: String = redis
        .query(&["XADD", "eventgate:stream:c", &not_json, "p", "{oops"])
        .await;
    let _: () = redis
        .query(&["SET", "eventgate:seq", &(first + 2).to_string()])
        .await;
    let last = stack.publish_one("c", json!(2)).await;

    let mut back = stack.subscribe_at(0, "channel=c", Some(&cursor)).await;
    assert_eq!(ids_of(&mut back, 2).await, [first, last]);
    let stats = stack.stats(0).await;
    assert_eq!(stats["history_entries_skipped"], 2, "{stats}");
}

/// A command connection whose packets vanish (its Redis host gone without a reset, a dropped
/// NAT entry) is replaced once a call on it times out: that publish is answered 503
/// `outcome_unknown`, and every publish after it goes through. (redis-rs reconnects only a
/// connection known to be broken; TCP would go on retransmitting on this one for about 15
/// minutes, and every other call would go to it meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_that_stops_answering_is_replaced() {
    let mut options = Options::default();
    options.broker.redis_pool_size = 2;
    options.broker.redis_timeout = Duration::from_millis(500);
    options.redis_proxy = true;
    let stack = Stack::start_with(Backend::Redis, options).await;
    let proxy = stack.proxy.as_ref().expect("a proxy");
    proxy.black_hole_on(b"lost-in-transit");
    let (status, body) = stack
        .post_publish(
            json!({"channel": "orders", "data": "lost-in-transit"}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
    assert_eq!(proxy.black_holes(), 1);

    let mut ids = Vec::new();
    for i in 0..10 {
        let (status, body) = stack
            .post_publish(
                json!({"channel": "orders", "data": i}).to_string(),
                "application/json",
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "publish {i}: {body}");
        ids.push(published(&body)[0].1);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(proxy.black_holes(), 1);
}

/// Every connection the services hold to Redis sends TCP keepalive probes while idle: NAT and
/// load-balancer entries on the way stay up (the usual clouds drop them after 4 to 10 idle
/// minutes, and the next command would then go into a black hole), and a peer that vanished is
/// noticed. Read from the kernel's socket table: an idle established socket has a timer only
/// when keepalive is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_redis_send_keepalive_probes_while_idle() {
    let stack = Stack::start(Backend::Redis).await;
    stack.publish_one("orders", json!(1)).await;
    let port = format!("{:04X}", stack.redis().port);
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    // sl local rem st queues tr:when ...; rem is `ADDR:PORT` in hex, st 01 is established.
    let to_redis: Vec<&str> = table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2).and_then(|rem| rem.split(':').nth(1)) == Some(port.as_str())
                && fields.get(3) == Some(&"01")
        })
        .collect();
    // The publisher's and the gateway's command connections, and the gateway's pub/sub one.
    assert!(to_redis.len() >= 3, "{to_redis:#?}");
    for line in &to_redis {
        let timer = line.split_whitespace().nth(5).unwrap_or_default();
        assert!(timer.starts_with("02:"), "no keepalive timer: {line}");
    }
}
