//! The promise under faults, with real processes: three gateway replicas behind the repo's
//! nginx config, 500 SSE and 500 WebSocket clients (each its own user and address), a
//! publisher writing 200 events/s; replicas restarted one by one, or killed, and Redis frozen.
//! Every client must end with every event exactly once, in order. Each test prints a summary.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    fleet::{Publishing, Started, source, sse_client, ws_client},
    process::Deployment,
};
use tokio::sync::watch;

const SSE_CLIENTS: u32 = 500;
const WS_CLIENTS: u32 = 500;
const RATE: u64 = 200;

async fn start() -> Deployment {
    Deployment::start(
        3,
        &[
            ("HEARTBEAT_INTERVAL", "2s"),
            ("DRAIN_GRACE", "500ms"),
            ("DRAIN_TIMEOUT", "5s"),
            // A Redis freeze of a few seconds must not count as down for publishes.
            ("REDIS_TIMEOUT", "10s"),
        ],
    )
    .await
}

fn nginx_addr(deployment: &Deployment) -> SocketAddr {
    deployment
        .nginx
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr")
}

/// Runs the clients and a 200 events/s publisher around `fault`; checks every client got every
/// event exactly once, in order; prints the summary.
async fn run_with_fault<F, Fut>(name: &str, fault: F)
where
    F: FnOnce(Deployment) -> Fut,
    Fut: std::future::Future<Output = Deployment>,
{
    // One at a time also under `cargo test`, which runs a binary's tests in parallel.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_AT_A_TIME.lock().await;
    let deployment = start().await;
    let nginx = nginx_addr(&deployment);
    let (last_tx, last) = watch::channel(None);
    let mut clients = tokio::task::JoinSet::new();
    let started = Started::default();
    for i in 0..SSE_CLIENTS {
        let (user, last, started) = (format!("sse-{i}"), last.clone(), started.clone());
        clients.spawn(sse_client(user, source(i), nginx, "f", last, started));
    }
    for i in 0..WS_CLIENTS {
        let (user, from) = (format!("ws-{i}"), source(SSE_CLIENTS + i));
        let (last, started) = (last.clone(), started.clone());
        clients.spawn(ws_client(user, from, nginx, "f", last, started));
    }
    // Everyone is connected and positioned before the first event.
    let all = started
        .wait_for(SSE_CLIENTS + WS_CLIENTS, Duration::from_secs(60))
        .await;
    assert!(all, "{name}: {} clients started", started.count());

    let publishing = Publishing::start(&deployment.publisher.url, "f", RATE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_started = Instant::now();
    let deployment = fault(deployment).await;
    let fault_took = fault_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = publishing.stop().await;
    let recovering = Instant::now();
    last_tx.send(ids.last().copied()).expect("clients listen");
    let mut outcomes = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(outcome) = clients.join_next().await {
            outcomes.push(outcome.expect("client task"));
        }
    })
    .await;
    let caught_up = recovering.elapsed();
    assert!(
        all.is_ok(),
        "{name}: {} of {} clients caught up in 120 s",
        outcomes.len(),
        SSE_CLIENTS + WS_CLIENTS
    );
    let (mut lost, mut duplicated, mut reconnected) = (0usize, 0usize, 0usize);
    for outcome in &outcomes {
        assert!(
            outcome.resets.is_empty(),
            "{name}: no reset: {:?}",
            outcome.resets
        );
        duplicated += outcome.duplicated();
        lost += outcome.lost(&ids);
        reconnected += usize::from(outcome.connects > 1);
    }
    println!(
        "{name}: {} events to {} clients ({} reconnected); lost {lost}, duplicated {duplicated}; \
         fault took {fault_took:.1?}, all caught up {caught_up:.1?} after the last event",
        ids.len(),
        outcomes.len(),
        reconnected,
    );
    assert_eq!((lost, duplicated), (0, 0), "{name}");
    for outcome in &outcomes {
        assert_eq!(outcome.ids, ids, "{name}: every event once, in order");
    }
    drop(deployment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing() {
    run_with_fault("rolling restart", |mut d| async move {
        for i in 0..d.gateways.len() {
            d.gateways[i].terminate().await;
            d.gateways[i].restart().await;
        }
        d
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_loses_nothing() {
    run_with_fault("kill -9", |mut d| async move {
        d.gateways[1].kill().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.gateways[1].restart().await;
        d
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_loses_nothing() {
    run_with_fault("Redis frozen 3 s", |d| async move {
        let pid = d.redis.pid().expect("redis pid").to_string();
        let signal = |s: &str| {
            std::process::Command::new("kill")
                .args([s, &pid])
                .status()
                .expect("kill")
        };
        signal("-STOP");
        tokio::time::sleep(Duration::from_secs(3)).await;
        signal("-CONT");
        d
    })
    .await;
}
