//! What resuming clients pull into a gateway is bounded in bytes: slow clients resuming many
//! channels of large events hold small pages, and the replica's replays and page cache stay
//! within `REPLAY_MEMORY_BYTES` (measured as the gateway process's resident memory).

mod support;

use std::time::Duration;

use serde_json::json;
use support::{process::Service, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    task::JoinSet,
    time::Instant,
};

const CHANNELS: usize = 64;
const EVENTS_PER_CHANNEL: usize = 120;
const EVENT_BYTES: usize = 4096;
const SLOW_CLIENTS: usize = 20;
const BUDGET: u64 = 16 * 1024 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A client that resumes every channel from `cursor` and reads 4 KiB every 50 ms through a
/// small receive buffer; returns the event ids it read.
async fn slow_client(addr: String, cursor: String, query: String, until: Instant) -> Vec<u64> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/events?{query} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         last-event-id: {cursor}\r\n\r\n",
        test_token()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let (mut text, mut buf) = (String::new(), vec![0u8; 4096]);
    while Instant::now() < until {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .filter_map(|id| id.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_resuming_many_channels_stay_within_the_replay_budget() {
    let redis = RedisServer::start().await;
    let env = [
        ("REDIS_URL", redis.url()),
        ("REPLAY_MEMORY_BYTES", BUDGET.to_string()),
        ("REPLAY_CONNECTION_BYTES", (256 * 1024).to_string()),
    ];
    let publisher = Service::start("publisher", "PUBLISHER_ADDR", &env).await;
    let gateway = Service::start("gateway", "GATEWAY_ADDR", &env).await;
    let http = authed_client();
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("ch{c}")).collect();
    let query = channels
        .iter()
        .map(|c| format!("channel={c}"))
        .collect::<Vec<_>>()
        .join("&");
    let opening =
        SseClient::connect(&http, &format!("{}/v1/events?{query}", gateway.url), None).await;
    let mut opening = opening;
    let cursor = {
        opening.next_block(SOON).await.expect("opening");
        opening.last_id.clone().expect("position")
    };
    drop(opening);

    // 64 channels × 120 events × 4 KiB: 30 MiB of history, about twice the budget.
    let body = "z".repeat(EVENT_BYTES);
    for round in 0..EVENTS_PER_CHANNEL {
        let events: Vec<_> = channels
            .iter()
            .map(|c| json!({"channel": c, "data": {"round": round, "body": body}}))
            .collect();
        let answer = http
            .post(format!("{}/v1/publish", publisher.url))
            .bearer_auth(TEST_PUBLISHER_KEY)
            .json(&json!({"events": events}))
            .send()
            .await
            .expect("publish");
        assert_eq!(answer.status(), 202);
    }

    let pid = gateway.child.id().expect("gateway pid");
    let before = rss_bytes(pid);
    let until = Instant::now() + Duration::from_secs(6);
    let mut clients = JoinSet::new();
    for _ in 0..SLOW_CLIENTS {
        let (addr, cursor, query) = (gateway.addr.clone(), cursor.clone(), query.clone());
        clients.spawn(slow_client(addr, cursor, query, until));
    }
    let mut peak = before;
    while Instant::now() < until {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reads = clients.join_all().await;
    let growth = peak.saturating_sub(before);
    println!(
        "{SLOW_CLIENTS} slow clients resuming {CHANNELS} channels of {} KiB events: gateway \
         RSS {} MiB before, peak {} MiB, growth {:.1} MiB (REPLAY_MEMORY_BYTES {} MiB); \
         they read {} events",
        EVENT_BYTES / 1024,
        before >> 20,
        peak >> 20,
        growth as f64 / (1 << 20) as f64,
        BUDGET >> 20,
        reads.iter().map(Vec::len).sum::<usize>(),
    );
    for ids in &reads {
        assert!(ids.len() > 1, "every client is served: {ids:?}");
        assert!(ids.windows(2).all(|w| w[0] <= w[1]), "in order");
    }
    assert!(
        growth < BUDGET,
        "the gateway grew {growth} bytes, over the {BUDGET}-byte budget"
    );
}
