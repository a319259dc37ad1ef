//! eventgate on a real Redis Cluster (`REDIS_CLUSTER`): shards in slots, commands on the node
//! that serves each, live messages over sharded pub/sub.

mod support;

use std::time::Instant;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_and_resume_over_a_cluster() {
    let started = Instant::now();
    let stack = Stack::start(Backend::Cluster).await;
    println!("cluster and services up in {:.1?}", started.elapsed());
    let mut client = stack.subscribe("channel=a&channel=b&channel=c").await;
    let mut sent = Vec::new();
    for (i, channel) in ["a", "b", "c", "a"].iter().enumerate() {
        sent.push((
            channel.to_string(),
            stack.publish_one(channel, json!(i)).await,
        ));
    }
    let got: Vec<(String, u64)> = client
        .expect_events(4, SOON)
        .await
        .iter()
        .map(|e| (e.channel().to_owned(), e.id))
        .collect();
    assert_delivered(Backend::Cluster, &got, &sent, "live over sharded pub/sub");
    let last = client.last_id.clone().expect("id");
    drop(client);
    let mut missed = Vec::new();
    for (i, channel) in ["c", "b", "a"].iter().enumerate() {
        missed.push((
            channel.to_string(),
            stack.publish_one(channel, json!(i)).await,
        ));
    }
    let mut back = stack
        .subscribe_at(0, "channel=a&channel=b&channel=c", Some(&last))
        .await;
    let got: Vec<(String, u64)> = back
        .expect_events(3, SOON)
        .await
        .iter()
        .map(|e| (e.channel().to_owned(), e.id))
        .collect();
    assert_delivered(Backend::Cluster, &got, &missed, "resumed from one id");
}
