//! eventgate on a real Redis Cluster (`REDIS_CLUSTER`): shards in slots, commands on the node
//! that serves each, live messages over sharded pub/sub; through a `CLUSTER FAILOVER`, a
//! `kill -9` of a primary and a slot migration under load, every acknowledged event reaches
//! every client exactly once, in order, or the client is told with a `reset`. The failover
//! tests print their counts.

mod support;

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use support::{
    cluster::RedisCluster,
    fleet::{Publishing, clients, settle},
    process::Service,
    *,
};
use tokio::{sync::watch, time::Instant};

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

    // Sharded pub/sub only: plain PUBLISH would copy every message to every node.
    let cluster = stack.cluster.as_ref().expect("cluster");
    let (mut spublished, mut shard_channels) = (0, 0);
    for node in &cluster.nodes {
        let stats: String = node.query(&["INFO", "commandstats"]).await;
        assert!(
            !stats.contains("cmdstat_publish:"),
            "node {} ran plain PUBLISH:\n{stats}",
            node.port
        );
        spublished += stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_spublish:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let plain: Vec<String> = node.query(&["PUBSUB", "CHANNELS"]).await;
        assert!(
            plain.is_empty(),
            "plain subscriptions on {}: {plain:?}",
            node.port
        );
        let sharded: Vec<String> = node.query(&["PUBSUB", "SHARDCHANNELS"]).await;
        shard_channels += sharded.len();
    }
    assert!(
        spublished >= 7,
        "events went out with SPUBLISH: {spublished}"
    );
    assert!(shard_channels > 0, "the gateway subscribes with SSUBSCRIBE");
    drop(back);
}

/// The slot of channel `channel`'s shard among the services' default 16.
fn slot_of(channel: &str) -> u16 {
    let shards = eventgate_core::Shards::new(16);
    let shard = shards.shard_of(&eventgate_core::Channel::parse(channel).expect("channel"));
    eventgate_core::broker::shards::key_slot(shards.tag(shard).as_bytes())
}

const SSE_CLIENTS: u32 = 200;
const WS_CLIENTS: u32 = 100;
const RATE: u64 = 100;

/// A publisher and two gateways as processes on `cluster`.
async fn services(cluster: &RedisCluster) -> (Service, Vec<Service>) {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let env = vec![
        ("REDIS_CLUSTER", cluster.seeds().join(",")),
        ("HEARTBEAT_INTERVAL", "2s".into()),
        ("REDIS_TIMEOUT", "2s".into()),
    ];
    let publisher = Service::start("publisher", "PUBLISHER_ADDR", &env).await;
    let mut gateways = Vec::new();
    for i in 0..2 {
        let mut env = env.clone();
        env.push(("REPLICA_ID", format!("replica-{i}")));
        gateways.push(Service::start("gateway", "GATEWAY_ADDR", &env).await);
    }
    (publisher, gateways)
}

/// Clients of channel `f` and a publisher writing `RATE` events/s with idempotency keys while
/// `fault` fails over the primary serving `f`'s shard (it returns once a replica has taken
/// over): every acknowledged event reaches every client once, in order, or within a `reset`.
async fn run_failover<F, Fut>(name: &str, replicas: usize, fault: F)
where
    F: FnOnce(RedisCluster, u16) -> Fut,
    Fut: std::future::Future<Output = RedisCluster>,
{
    let cluster = RedisCluster::start(3, replicas).await;
    let (publisher, gateways) = services(&cluster).await;
    let addrs: Vec<SocketAddr> = gateways
        .iter()
        .map(|g| g.addr.parse().expect("addr"))
        .collect();
    let (last_tx, last) = watch::channel(None);
    let clients = clients(&addrs, "f", SSE_CLIENTS, WS_CLIENTS, &last).await;
    let publishing = Publishing::start(&publisher.url, "f", RATE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_started = Instant::now();
    let cluster = fault(cluster, slot_of("f")).await;
    let failed_over = fault_started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gap = publishing.longest_gap_since(fault_started);
    let acked = publishing.stop().await;
    last_tx.send(acked.last().copied()).expect("clients listen");
    let extra =
        format!("; failover took {failed_over:.1?}, publishing stopped for at most {gap:.1?}");
    settle(name, clients, &acked, &extra).await;
    drop((publisher, gateways, cluster));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_is_followed_and_loses_nothing_silently() {
    run_failover("CLUSTER FAILOVER", 1, |cluster, slot| async move {
        let (old, replicas) = cluster.serving(slot).await;
        let new = replicas[0];
        let answer: String = cluster.node(new).query(&["CLUSTER", "FAILOVER"]).await;
        assert_eq!(answer, "OK");
        assert!(
            cluster
                .wait_primary_is(slot, new, Duration::from_secs(30))
                .await,
            "the replica never took over from {old}"
        );
        cluster
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_primary_is_replaced_and_nothing_is_lost_silently() {
    run_failover(
        "kill -9 of a cluster primary",
        1,
        |mut cluster, slot| async move {
            let (old, replicas) = cluster.serving(slot).await;
            cluster.node_mut(old).kill().await;
            assert!(
                cluster
                    .wait_primary_is(slot, replicas[0], Duration::from_secs(30))
                    .await,
                "the cluster never promoted the replica"
            );
            cluster
        },
    )
    .await;
}

/// A live channel's slot moves to another primary under load: the old node ends the
/// subscriptions (`sunsubscribe`), publishes wait out the migration (`ASK`, `TRYAGAIN`) and go on
/// on the new node; nothing acknowledged is lost. eventgate cannot tell a moved slot from one
/// that failed over to a replica that lagged (the writing server changed either way), so the
/// shard's clients get one `reset` and every event after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_loses_nothing() {
    run_failover("slot migration", 0, |cluster, slot| async move {
        let from = cluster.serving(slot).await.0;
        let to = *cluster
            .primaries()
            .await
            .iter()
            .find(|&&p| p != from)
            .expect("another primary");
        let moved = cluster.migrate_slot(slot, to).await;
        assert!(moved >= 3, "the shard's keys moved: {moved}");
        assert!(
            cluster
                .wait_primary_is(slot, to, Duration::from_secs(10))
                .await,
            "the slot never moved"
        );
        cluster
    })
    .await;
}
