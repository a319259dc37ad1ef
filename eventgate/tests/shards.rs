//! Channels spread over several independent Redis servers (`REDIS_SHARDS`): one browser id
//! resumes every shard exactly, a shard that is down takes only its own channels with it, a
//! request over several shards says what it published, and services refuse data written with
//! another shard count. The behaviour suite also runs on three shards (`::shards` tests).

mod support;

use std::{collections::BTreeMap, time::Duration};

use eventgate_core::{Channel, Cursor, Shards};
use reqwest::StatusCode;
use serde_json::json;
use support::{process, process::run_to_exit, *};

/// Eight logical shards on three servers.
const SHARDS: usize = 8;

async fn stack() -> Stack {
    let mut options = Options::default();
    options.broker.redis_shard_count = Some(SHARDS as u32);
    options.broker.redis_timeout = Duration::from_secs(1);
    Stack::start_with(Backend::Shards, options).await
}

/// One channel name on each of the first `n` shards.
fn channel_per_shard(n: usize) -> Vec<String> {
    let shards = Shards::new(SHARDS);
    let mut found: Vec<Option<String>> = vec![None; n];
    for i in 0.. {
        let name = format!("ch{i}");
        let shard = shards.shard_of(&Channel::parse(&name).expect("channel"));
        if shard < n && found[shard].is_none() {
            found[shard] = Some(name);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().flatten().collect()
}

fn by_channel(events: &[(String, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut map: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (channel, id) in events {
        map.entry(channel.clone()).or_default().push(*id);
    }
    map
}

/// Exactly `n` events, as `(channel, id)`.
async fn channel_ids(client: &mut SseClient, n: usize, timeout: Duration) -> Vec<(String, u64)> {
    let events = client.expect_events(n, timeout).await;
    events
        .iter()
        .map(|e| (e.channel().to_owned(), e.id))
        .collect()
}

/// Events as `(channel, id)` and the envelopes of resets, read until `done(events)`.
async fn events_and_resets(
    client: &mut SseClient,
    done: impl Fn(&[(String, u64)]) -> bool,
) -> (Vec<(String, u64)>, Vec<serde_json::Value>) {
    let (mut seen, mut resets) = (Vec::new(), Vec::new());
    while !done(&seen) {
        let event = client.next_event(SOON).await.expect("an event");
        if event.event.as_deref() == Some("reset") {
            resets.push(event.envelope.clone());
        } else {
            seen.push((event.channel().to_owned(), event.id));
        }
    }
    (seen, resets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_resumes_every_shard_of_a_connection_exactly() {
    let stack = stack().await;
    let channels = channel_per_shard(SHARDS);
    let query = channels
        .iter()
        .map(|c| format!("channel={c}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut client = stack.subscribe(&query).await;
    let opening = client.last_id.clone().expect("an id");
    match Cursor::parse(&opening).expect("an id the gateway sent") {
        Cursor::Shards { count, positions } => {
            assert_eq!(count, SHARDS);
            assert_eq!(positions.len(), SHARDS, "a position per shard: {opening}");
        }
        other => panic!("a connection over {SHARDS} shards has a v1 id: {other:?}"),
    }
    let first: Vec<(String, u64)> = stack
        .publish(json!({"events": channels.iter().map(|c| json!({"channel": c, "data": 0})).collect::<Vec<_>>()}))
        .await;
    let got = channel_ids(&mut client, SHARDS, SOON).await;
    assert_eq!(by_channel(&got), by_channel(&first));
    let last = client.last_id.clone().expect("last id");
    drop(client);

    // Thousands of events over every shard while the client is away.
    let mut missed = Vec::new();
    for round in 0..25 {
        let events: Vec<_> = (0..120)
            .map(|i| json!({"channel": channels[(round + i) % SHARDS], "data": [round, i]}))
            .collect();
        missed.extend(stack.publish(json!({"events": events})).await);
    }
    let mut back = stack.subscribe_at(0, &query, Some(&last)).await;
    let got = channel_ids(&mut back, missed.len(), Duration::from_secs(30)).await;
    assert_eq!(
        by_channel(&got),
        by_channel(&missed),
        "nothing lost, duplicated or reordered on any channel"
    );
    // Quiet now: the position lines (id only, no data) carry the id a browser keeps, and it
    // still resumes exactly.
    let quiet_id = back.last_id.clone().expect("id");
    drop(back);
    let late = stack.publish_one(&channels[3], json!("late")).await;
    let mut again = stack.subscribe_at(0, &query, Some(&quiet_id)).await;
    let event = again.next_event(SOON).await.expect("the late event");
    assert_eq!((event.channel(), event.id), (channels[3].as_str(), late));
    println!(
        "{} events over {SHARDS} shards missed and replayed from one id ({} bytes)",
        missed.len(),
        last.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_one_shard_keeps_plain_ids_and_foreign_ids_are_refused() {
    let stack = stack().await;
    let channel = &channel_per_shard(1)[0];
    let mut client = stack.subscribe(&format!("channel={channel}")).await;
    let id = stack.publish_one(channel, json!(1)).await;
    assert_eq!(client.next_event(SOON).await.expect("event").id, id);
    assert_eq!(client.last_id, Some(id.to_string()), "plain decimal");
    for foreign in [
        Cursor::render(SHARDS * 2, &[(0, 1), (1, 2)]),
        "v1.AAAA".to_owned(),
        "v1.%%%".to_owned(),
    ] {
        let refused = SseClient::connect(
            &stack.http,
            &stack.events_url(0, "channel=x"),
            Some(&foreign),
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{foreign}");
        assert_eq!(
            refused.error_body().await["error"]["code"],
            "invalid_last_event_id"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_down_takes_only_its_own_channels_with_it() {
    let mut stack = stack().await;
    // Logical shard i lives on server i mod 3: one channel on server 0, one on server 1.
    let channels = channel_per_shard(2);
    let (down, up) = (&channels[0], &channels[1]);
    let mut client = stack
        .subscribe(&format!("channel={down}&channel={up}"))
        .await;
    stack.shard_servers[0].kill().await;

    let (status, body) = stack
        .post_publish(
            json!({"channel": down, "data": "lost?"}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let kept = stack.publish_one(up, json!("still here")).await;
    let event = client
        .next_event(SOON)
        .await
        .expect("the other shard goes on");
    assert_eq!((event.channel(), event.id), (up.as_str(), kept));

    // Both services are ready, and say which shard is down.
    let ready = wait_until(SOON, || async {
        let readyz: serde_json::Value = stack
            .http
            .get(format!("{}/readyz", stack.gateways[0].url))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("JSON");
        readyz["status"] == "degraded" && readyz["shards"][0]["ready"] == false
    })
    .await;
    assert!(ready, "the gateway reports the shard");
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.gateways[0].url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in [
        "eventgate_gateway_shard_ready{shard=\"0\"} 0",
        "eventgate_gateway_shard_ready{shard=\"1\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} in the metrics:\n{metrics}"
        );
    }
    let publisher: serde_json::Value = stack
        .http
        .get(format!("{}/readyz", stack.publisher.url))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(publisher["status"], "degraded", "{publisher}");

    // A request over both shards publishes what it can and says so.
    let request = json!({"events": [
        {"channel": up, "data": "a"},
        {"channel": down, "data": "b"},
    ]});
    let response = stack
        .http
        .post(format!("{}/v1/publish", stack.publisher.url))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .header("idempotency-key", "split-1")
        .json(&request)
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(answer["error"]["code"], "partially_published", "{answer}");
    assert_eq!(answer["published"][0]["channel"], up.as_str());
    assert_eq!(answer["failed"][0]["channel"], down.as_str());
    let first_id: u64 = answer["published"][0]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("id");

    stack.shard_servers[0].restart().await;
    // The gateway is back on the shard (it resets the shard's clients: the server lost its
    // data), then the request is retried.
    assert!(stack.wait_ready(0, SOON).await);
    let back = wait_until(SOON, || async {
        let stats = stack.stats(0).await;
        stats["shards"][0]["ready"] == true
    })
    .await;
    assert!(back, "the gateway follows the shard back");
    let deadline = tokio::time::Instant::now() + SOON;
    let retried = loop {
        let response = stack
            .http
            .post(format!("{}/v1/publish", stack.publisher.url))
            .bearer_auth(TEST_PUBLISHER_KEY)
            .header("idempotency-key", "split-1")
            .json(&request)
            .send()
            .await
            .expect("publish");
        if response.status() == StatusCode::ACCEPTED {
            break published(&response.json().await.expect("JSON"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shard never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retried[0].1, first_id,
        "the published part is not published again"
    );
    // The client gets the first part once, a reset of the shard that came back (it lost its
    // data), and the retried part.
    let (seen, resets) =
        events_and_resets(&mut client, |seen| seen.iter().any(|(c, _)| c == down)).await;
    assert_eq!(
        resets,
        [json!({"channels": [down], "reason": "data_lost"})],
        "only the shard that lost its data"
    );
    assert_eq!(
        seen.iter()
            .filter(|(c, id)| c == up && *id == first_id)
            .count(),
        1,
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_refuse_data_written_with_another_shard_count() {
    let servers = [
        RedisServer::start().await,
        RedisServer::start().await,
        RedisServer::start().await,
    ];
    let urls = servers
        .iter()
        .map(|s| s.url())
        .collect::<Vec<_>>()
        .join(",");
    let keys = [
        ("JWT_SECRET", TEST_SECRET),
        ("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY),
        ("REDIS_SHARDS", urls.as_str()),
        ("PUBLISHER_ADDR", "127.0.0.1:0"),
    ];
    // A first service records 8 shards; one configured with 6 refuses to start.
    let mut eight = keys.to_vec();
    eight.push(("REDIS_SHARD_COUNT", "8"));
    let mut first = process::eventgate(&["publisher"], &eight);
    let recorded = wait_until(SOON, || async {
        let value: Option<String> = servers[2].query(&["GET", "eventgate:shards"]).await;
        value.as_deref() == Some("8")
    })
    .await;
    assert!(recorded, "the shard count is recorded on every server");
    let _ = first.kill().await;
    let mut six = keys.to_vec();
    six.push(("REDIS_SHARD_COUNT", "6"));
    let (code, output) = run_to_exit(&["publisher"], &six).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(
        output.contains("6 shard") && output.contains("written with 8"),
        "{output}"
    );
}

/// A browser away while one shard's server restarted with nothing comes back with the one id it
/// kept: that shard's channels get a `reset` (their history before the restart is gone) and the
/// events published since; the other shard's channels get exactly what they missed. The id it
/// keeps from then on resumes both shards exactly, without another reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_from_before_a_shard_lost_its_data_resets_only_that_shards_channels() {
    let mut stack = stack().await;
    let channels = channel_per_shard(2);
    let (lost, kept) = (channels[0].clone(), channels[1].clone());
    let query = format!("channel={lost}&channel={kept}");
    let mut client = stack.subscribe(&query).await;
    stack
        .publish(json!({"events": [{"channel": lost, "data": 1}, {"channel": kept, "data": 1}]}))
        .await;
    client.expect_events(2, SOON).await;
    let away = client.last_id.clone().expect("an id");
    drop(client);

    // Server 0, shard 0's, restarts empty (it keeps nothing on disk).
    stack.shard_servers[0].kill().await;
    stack.shard_servers[0].restart().await;
    let deadline = tokio::time::Instant::now() + SOON;
    let since_lost = loop {
        let (status, body) = stack
            .post_publish(
                json!({"channel": lost, "data": 2}).to_string(),
                "application/json",
            )
            .await;
        if status == StatusCode::ACCEPTED {
            break published(&body)[0].1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shard never came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missed_kept = stack.publish_one(&kept, json!(2)).await;

    let mut back = stack.subscribe_at(0, &query, Some(&away)).await;
    let (seen, resets) = events_and_resets(&mut back, |seen| seen.len() == 2).await;
    assert_eq!(
        resets,
        [json!({"channels": [lost], "reason": "unknown_position"})],
        "a reset of the shard that lost its data only"
    );
    assert_eq!(
        by_channel(&seen),
        by_channel(&[(lost.clone(), since_lost), (kept.clone(), missed_kept)]),
        "what each shard's channels missed, once"
    );

    // The id kept after that resumes both shards without another reset.
    let now = back.last_id.clone().expect("an id");
    drop(back);
    let more = stack
        .publish(json!({"events": [{"channel": lost, "data": 3}, {"channel": kept, "data": 3}]}))
        .await;
    let mut again = stack.subscribe_at(0, &query, Some(&now)).await;
    let got = channel_ids(&mut again, 2, SOON).await;
    // A reset would come first, before the replay, and be one of the two.
    assert_eq!(
        by_channel(&got),
        by_channel(&more),
        "no reset, nothing lost"
    );
}
