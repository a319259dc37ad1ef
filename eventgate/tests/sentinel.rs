//! Redis Sentinel, with real processes: a primary, a replica and three Sentinels; a publisher
//! and two gateways that find the primary through the Sentinels. Through a `SENTINEL FAILOVER`,
//! a `kill -9` of the primary and a failover to a replica that lagged, every acknowledged event
//! reaches every client exactly once, in order, or the client is told with a `reset` whose
//! range covers it. Each test prints its counts.

mod support;

use std::{net::SocketAddr, time::Duration};

use reqwest::StatusCode;
use serde_json::json;
use support::{
    fleet::{Outcome, Publishing, clients, settle},
    process::Service,
    sentinel::Sentinels,
    *,
};
use tokio::{sync::watch, task::JoinSet, time::Instant};

const SSE_CLIENTS: u32 = 200;
const WS_CLIENTS: u32 = 100;
const RATE: u64 = 100;

/// One failover test at a time: each runs six Redis processes and three services.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    sentinels: Sentinels,
    publisher: Service,
    gateways: Vec<Service>,
}

async fn start() -> Setup {
    start_with(Sentinels::start().await).await
}

async fn start_with(sentinels: Sentinels) -> Setup {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut env = sentinels.env();
    env.push(("HEARTBEAT_INTERVAL", "2s".into()));
    env.push(("REDIS_TIMEOUT", "2s".into()));
    let publisher = Service::start("publisher", "PUBLISHER_ADDR", &env).await;
    let mut gateways = Vec::new();
    for i in 0..2 {
        let mut env = env.clone();
        env.push(("REPLICA_ID", format!("replica-{i}")));
        gateways.push(Service::start("gateway", "GATEWAY_ADDR", &env).await);
    }
    Setup {
        sentinels,
        publisher,
        gateways,
    }
}

impl Setup {
    fn gateway_addr(&self, i: usize) -> SocketAddr {
        self.gateways[i % self.gateways.len()]
            .addr
            .parse()
            .expect("addr")
    }

    /// `sse` SSE and `ws` WebSocket clients of channel `f`, spread over the gateways.
    async fn clients(
        &self,
        sse: u32,
        ws: u32,
        last: &watch::Receiver<Option<u64>>,
    ) -> JoinSet<Outcome> {
        let gateways: Vec<SocketAddr> = (0..self.gateways.len())
            .map(|i| self.gateway_addr(i))
            .collect();
        clients(&gateways, "f", sse, ws, last).await
    }

    /// Publishes one event, retrying until it is accepted; returns its id.
    async fn publish(&self, n: u64) -> u64 {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = http
                .post(format!("{}/v1/publish", self.publisher.url))
                .bearer_auth(TEST_PUBLISHER_KEY)
                .json(&json!({"channel": "f", "data": n}))
                .send()
                .await;
            if let Ok(r) = answer
                && r.status() == StatusCode::ACCEPTED
            {
                return published(&r.json().await.expect("JSON"))[0].1;
            }
            assert!(Instant::now() < deadline, "publishing never recovered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Clients and a publisher writing `RATE` events/s around `fault`, which returns once the new
/// primary is in place.
async fn run_failover<F, Fut>(name: &str, fault: F)
where
    F: FnOnce(Setup) -> Fut,
    Fut: std::future::Future<Output = Setup>,
{
    let _alone = ONE_AT_A_TIME.lock().await;
    let setup = start().await;
    let (last_tx, last) = watch::channel(None);
    let clients = setup.clients(SSE_CLIENTS, WS_CLIENTS, &last).await;
    let publishing = Publishing::start(&setup.publisher.url, "f", RATE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_started = Instant::now();
    let setup = fault(setup).await;
    let failed_over = fault_started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gap = publishing.longest_gap_since(fault_started);
    let acked = publishing.stop().await;
    last_tx.send(acked.last().copied()).expect("clients listen");
    let extra =
        format!("; failover took {failed_over:.1?}, publishing stopped for at most {gap:.1?}");
    settle(name, clients, &acked, &extra).await;
    drop(setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_and_loses_nothing_silently() {
    run_failover("SENTINEL FAILOVER", |setup| async move {
        let (old, new) = setup.sentinels.primary_and_replica().await;
        setup.sentinels.failover().await;
        assert!(
            setup
                .sentinels
                .wait_primary_is(new, Duration::from_secs(30))
                .await,
            "the replica never became primary"
        );
        // The old primary takes writes until Sentinel demotes it, seconds later.
        let demoted = wait_until(Duration::from_secs(30), || async {
            setup.sentinels.role(old).await == "slave"
        })
        .await;
        assert!(demoted, "Sentinel never demoted the old primary");
        setup
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_and_nothing_is_lost_silently() {
    run_failover("kill -9 of the primary", |mut setup| async move {
        let (old, new) = setup.sentinels.primary_and_replica().await;
        setup.sentinels.server_mut(old).kill().await;
        assert!(
            setup
                .sentinels
                .wait_primary_is(new, Duration::from_secs(30))
                .await,
            "the Sentinels never promoted the replica"
        );
        setup
    })
    .await;
}

/// Writes the replica never got (its replication link was cut while they were acknowledged),
/// then the primary dies and the replica is promoted: the lost writes' ids are never handed out again,
/// and every client, connected or coming back, gets a `reset`, not a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_lagging_replica_resets_clients_instead_of_a_silent_gap() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut setup = start_with(Sentinels::start_behind_proxy().await).await;
    let (last_tx, last) = watch::channel(None);
    let clients = setup.clients(20, 10, &last).await;
    let mut acked = Vec::new();
    for n in 0..10 {
        acked.push(setup.publish(n).await);
    }
    let new = setup.sentinels.servers[1].port;
    setup
        .sentinels
        .proxy
        .as_ref()
        .expect("proxy")
        .cut_replication();
    let mut unreplicated = Vec::new();
    for n in 10..20 {
        unreplicated.push(setup.publish(n).await);
    }
    setup.sentinels.servers[0].kill().await;
    let started = Instant::now();
    assert!(
        setup
            .sentinels
            .wait_primary_is(new, Duration::from_secs(30))
            .await,
        "the Sentinels never promoted the replica"
    );
    let failed_over = started.elapsed();
    let kept: Vec<(String, Vec<String>)> = setup
        .sentinels
        .server(new)
        .query(&["XRANGE", "eventgate:stream:f", "-", "+"])
        .await;
    let kept: Vec<u64> = kept
        .iter()
        .map(|(id, _)| id.trim_end_matches("-0").parse().expect("id"))
        .collect();
    assert_eq!(
        kept, acked,
        "the promoted replica lacks exactly the frozen writes"
    );

    // Both gateways are back on the new primary (each has reset its clients).
    let http = reqwest::Client::new();
    for gateway in &setup.gateways {
        let ready = wait_until(Duration::from_secs(30), || async {
            http.get(format!("{}/readyz", gateway.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
        assert!(ready, "gateway {} follows the new primary", gateway.url);
    }
    let mut after = Vec::new();
    for n in 20..30 {
        after.push(setup.publish(n).await);
    }
    let top = *unreplicated.last().expect("ids");
    assert!(
        after[0] > top,
        "ids after the loss start above every lost one"
    );
    acked.extend(&unreplicated);
    acked.extend(&after);
    last_tx.send(after.last().copied()).expect("clients listen");

    // A client that was away comes back with the id of a lost event.
    let http = authed_client();
    let url = format!("{}/v1/events?channel=f", setup.gateways[0].url);
    let mut back = SseClient::connect(&http, &url, Some(&unreplicated[4].to_string())).await;
    let reset = back.next_event(SOON).await.expect("reset");
    assert_eq!(
        (reset.event.as_deref(), &reset.envelope),
        (
            Some("reset"),
            &json!({"channels": ["f"], "reason": "unknown_position"})
        )
    );

    let mut outcomes = Vec::new();
    let mut clients = clients;
    while let Some(outcome) = tokio::time::timeout(Duration::from_secs(60), clients.join_next())
        .await
        .expect("clients catch up")
    {
        outcomes.push(outcome.expect("client"));
    }
    let (mut lost, mut duplicated, mut reset) = (0, 0, 0);
    for outcome in &outcomes {
        lost += outcome.lost(&acked);
        duplicated += outcome.duplicated();
        reset += usize::from(!outcome.resets.is_empty());
        assert!(outcome.in_order(), "{outcome:?}");
        let reset_to = outcome.resets.iter().filter_map(|r| r.position).max();
        for id in after.iter().filter(|&&id| reset_to.is_none_or(|p| id > p)) {
            assert!(
                outcome.ids.contains(id),
                "every event after the reset: {outcome:?}"
            );
        }
    }
    println!(
        "lagging replica: {} events acknowledged, {} of them never replicated; {} clients, \
         {reset} reset; lost {lost}, duplicated {duplicated}; failover took {failed_over:.1?}",
        acked.len(),
        unreplicated.len(),
        outcomes.len()
    );
    assert_eq!(reset, outcomes.len(), "every client is told");
    assert_eq!((lost, duplicated), (0, 0));
}
