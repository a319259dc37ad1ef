//! The promise under faults, with real processes: three gateway replicas behind the repo's
//! nginx config, 500 SSE and 500 WebSocket clients (each its own user and address), a
//! publisher writing 200 events/s; replicas restarted one by one, or killed, and Redis frozen.
//! Every client must end with every event exactly once, in order. Each test prints a summary.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use support::{process::Deployment, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const SSE_CLIENTS: u32 = 500;
const WS_CLIENTS: u32 = 500;
const RATE: u64 = 200;

/// Client `i`'s own address (127.1.x.y): each client is its own IP for the rate limiter.
fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    socket.connect(to).await.ok()
}

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

/// What a client saw.
struct Outcome {
    ids: Vec<u64>,
    connects: u32,
}

/// An SSE client through nginx (HTTP/1.0: the body is the raw stream), reconnecting with
/// `Last-Event-ID` like `EventSource`, until it has seen the event `last` says is final.
async fn sse_client(i: u32, nginx: SocketAddr, mut last: watch::Receiver<Option<u64>>) -> Outcome {
    let token = token_for(&format!("sse-{i}"), &["f"], Duration::from_secs(600));
    let (mut ids, mut connects, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        if (*last.borrow()).is_some_and(|l| ids.last() == Some(&l)) {
            return Outcome { ids, connects };
        }
        connects += 1;
        let Some(mut stream) = connect_from(source(i), nginx).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resume = cursor
            .as_deref()
            .map(|c| format!("last-event-id: {c}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /v1/events?channel=f HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {token}\r\n{resume}\r\n"
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let (mut text, mut buf) = (String::new(), vec![0u8; 32 * 1024]);
        let (mut id, mut data, mut ok) = (None::<String>, false, false);
        'read: loop {
            let read = tokio::select! {
                read = stream.read(&mut buf) => read,
                _ = last.changed() => continue 'read,
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                let line = line.trim_end_matches(['\r', '\n']);
                if line.starts_with("HTTP/") {
                    ok = line.contains(" 200 ");
                    if !ok {
                        break 'read;
                    }
                } else if !ok {
                    continue;
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if line.starts_with("data: ") {
                    data = true;
                } else if line.is_empty() {
                    if let Some(v) = id.take() {
                        if data {
                            ids.push(v.parse().expect("numeric id"));
                        }
                        cursor = Some(v);
                    }
                    data = false;
                }
            }
            if (*last.borrow()).is_some_and(|l| ids.last() == Some(&l)) {
                return Outcome { ids, connects };
            }
        }
        // A browser waits `retry:`; a short pause is enough here.
        tokio::time::sleep(Duration::from_millis(50 + u64::from(i % 200))).await;
    }
}

/// A WebSocket client through nginx, resubscribing with `since` after every disconnect.
async fn ws_client(i: u32, nginx: SocketAddr, mut last: watch::Receiver<Option<u64>>) -> Outcome {
    let token = token_for(&format!("ws-{i}"), &["f"], Duration::from_secs(600));
    let (mut ids, mut connects, mut since) = (Vec::new(), 0, None::<String>);
    let source = source(SSE_CLIENTS + i);
    loop {
        if (*last.borrow()).is_some_and(|l| ids.last() == Some(&l)) {
            return Outcome { ids, connects };
        }
        connects += 1;
        let Some(tcp) = connect_from(source, nginx).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut request = format!("ws://{nginx}/v1/ws")
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let Ok((mut ws, _)) = tokio_tungstenite::client_async(request, tcp).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut subscribe = serde_json::json!({"type": "subscribe", "channel": "f"});
        if let Some(since) = &since {
            subscribe["since"] = serde_json::json!(since);
        }
        if ws
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let message = tokio::select! {
                message = ws.next() => message,
                _ = last.changed() => {
                    if (*last.borrow()).is_some_and(|l| ids.last() == Some(&l)) {
                        return Outcome { ids, connects };
                    }
                    continue;
                }
            };
            let Some(Ok(Message::Text(text))) = message else {
                if matches!(message, Some(Ok(_))) {
                    continue;
                }
                break;
            };
            let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            match value["type"].as_str() {
                Some("event") => {
                    let id = event_id(&value);
                    ids.push(id);
                    since = Some(id.to_string());
                }
                Some("subscribed") if since.is_none() => {
                    since = value["position"].as_str().map(str::to_owned);
                }
                _ => {}
            }
            if (*last.borrow()).is_some_and(|l| ids.last() == Some(&l)) {
                return Outcome { ids, connects };
            }
        }
        tokio::time::sleep(Duration::from_millis(50 + u64::from(i % 200))).await;
    }
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
    for i in 0..SSE_CLIENTS {
        clients.spawn(sse_client(i, nginx, last.clone()));
    }
    for i in 0..WS_CLIENTS {
        clients.spawn(ws_client(i, nginx, last.clone()));
    }
    // Everyone is connected before the first event.
    let http = reqwest::Client::new();
    let stats_urls: Vec<String> = deployment
        .gateways
        .iter()
        .map(|g| format!("{}/v1/stats", g.url))
        .collect();
    let connected = wait_until(Duration::from_secs(60), || async {
        let mut total = 0;
        for url in &stats_urls {
            if let Ok(r) = http.get(url).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
            {
                total += v["connections"].as_u64().unwrap_or(0);
            }
        }
        total >= u64::from(SSE_CLIENTS + WS_CLIENTS)
    })
    .await;
    assert!(connected, "{name}: clients did not all connect");

    let publishing = Arc::new(AtomicBool::new(true));
    let publisher_url = format!("{}/v1/publish", deployment.publisher.url);
    let publisher = {
        let publishing = publishing.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut sends = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut n = 0u64;
            while publishing.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let (http, url) = (http.clone(), publisher_url.clone());
                // Each event retried with its idempotency key until accepted: published once.
                sends.spawn(async move {
                    loop {
                        let answer = http
                            .post(&url)
                            .bearer_auth(TEST_PUBLISHER_KEY)
                            .header("idempotency-key", format!("e-{n}"))
                            .json(&serde_json::json!({"channel": "f", "data": n}))
                            .send()
                            .await;
                        if let Ok(r) = answer
                            && r.status() == reqwest::StatusCode::ACCEPTED
                            && let Ok(json) = r.json::<serde_json::Value>().await
                        {
                            return published(&json)[0].1;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
            let mut ids = sends.join_all().await;
            // Clients get them in the order Redis numbered them.
            ids.sort_unstable();
            ids
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_started = Instant::now();
    let deployment = fault(deployment).await;
    let fault_took = fault_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    publishing.store(false, Ordering::Relaxed);
    let ids = publisher.await.expect("publisher task");
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
        let mut seen = std::collections::HashSet::new();
        duplicated += outcome.ids.iter().filter(|id| !seen.insert(**id)).count();
        lost += ids.iter().filter(|id| !seen.contains(id)).count();
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
