//! Many clients at once, each reconnecting the way a browser (or the README's WebSocket code)
//! does, and a publisher that retries every event with its idempotency key: what the fault
//! tests run, and how they count what each client saw.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use super::{TEST_PUBLISHER_KEY, event_id, published, token_for};

/// Client `i`'s own address (127.1.x.y): each client is its own IP for the rate limiter.
pub fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    socket.connect(to).await.ok()
}

/// Counts clients whose first stream is open and positioned (SSE: the opening `id:`; WebSocket:
/// `subscribed`): events published after that reach them.
#[derive(Clone, Default)]
pub struct Started(Arc<AtomicU32>);

impl Started {
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    fn one(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until `n` clients started, at most `timeout`.
    pub async fn wait_for(&self, n: u32, timeout: Duration) -> bool {
        super::wait_until(timeout, || async { self.count() >= n }).await
    }
}

/// A `reset` a client got: the last event id it had seen before it, and the position it was
/// moved to (when the reset said one).
#[derive(Debug, Clone, Copy)]
pub struct Reset {
    pub after: Option<u64>,
    pub position: Option<u64>,
}

/// What a client saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ids: Vec<u64>,
    pub connects: u32,
    pub resets: Vec<Reset>,
}

impl Outcome {
    /// Whether the client is done: it saw `last`, or stands at or past it.
    fn reached(&self, last: Option<u64>, cursor: Option<u64>) -> bool {
        last.is_some_and(|l| self.ids.last() == Some(&l) || cursor.is_some_and(|c| c >= l))
    }

    /// `acked` events this client neither received nor was told about by a `reset` whose
    /// range (last id before it, its position] holds them.
    pub fn lost(&self, acked: &[u64]) -> usize {
        let seen: HashSet<u64> = self.ids.iter().copied().collect();
        acked
            .iter()
            .filter(|id| !seen.contains(id))
            .filter(|&&id| {
                !self
                    .resets
                    .iter()
                    .any(|r| r.after.is_none_or(|a| a < id) && r.position.is_some_and(|p| id <= p))
            })
            .count()
    }

    /// Events received more than once.
    pub fn duplicated(&self) -> usize {
        let mut seen = HashSet::new();
        self.ids.iter().filter(|id| !seen.insert(**id)).count()
    }

    /// Whether the ids arrived in increasing order.
    pub fn in_order(&self) -> bool {
        self.ids.windows(2).all(|w| w[0] < w[1])
    }
}

/// An SSE client of `channel` at `addr` (HTTP/1.0: the body is the raw stream) from `source`,
/// reconnecting with `Last-Event-ID` like `EventSource`, until it reaches the event `last`
/// names.
pub async fn sse_client(
    user: String,
    source: IpAddr,
    addr: SocketAddr,
    channel: &'static str,
    mut last: watch::Receiver<Option<u64>>,
    started: Started,
) -> Outcome {
    let token = token_for(&user, &[channel], Duration::from_secs(600));
    let mut outcome = Outcome::default();
    let mut cursor = None::<String>;
    let position = |c: &Option<String>| c.as_deref().and_then(|c| c.parse().ok());
    loop {
        if outcome.reached(*last.borrow(), position(&cursor)) {
            return outcome;
        }
        outcome.connects += 1;
        let Some(mut stream) = connect_from(source, addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resume = cursor
            .as_deref()
            .map(|c| format!("last-event-id: {c}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /v1/events?channel={channel} HTTP/1.0\r\nhost: x\r\n\
             authorization: Bearer {token}\r\n{resume}\r\n"
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let (mut text, mut buf) = (String::new(), vec![0u8; 32 * 1024]);
        let (mut id, mut event, mut data, mut ok) = (None::<String>, None::<String>, false, false);
        'read: loop {
            let read = tokio::select! {
                read = stream.read(&mut buf) => read,
                _ = last.changed() => {
                    if outcome.reached(*last.borrow(), position(&cursor)) {
                        return outcome;
                    }
                    continue 'read;
                }
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
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if line.starts_with("data: ") {
                    data = true;
                } else if line.is_empty() {
                    if event.as_deref() == Some("reset") {
                        let position = id.as_deref().and_then(|v| v.parse().ok());
                        outcome.resets.push(Reset {
                            after: outcome.ids.last().copied(),
                            // A reset without an id keeps the position the stream opened at.
                            position: position.or(cursor.as_deref().and_then(|c| c.parse().ok())),
                        });
                    } else if data && let Some(v) = &id {
                        outcome.ids.push(v.parse().expect("numeric id"));
                    }
                    if let Some(v) = id.take() {
                        if cursor.is_none() {
                            started.one();
                        }
                        cursor = Some(v);
                    }
                    (event, data) = (None, false);
                }
            }
            if outcome.reached(*last.borrow(), position(&cursor)) {
                return outcome;
            }
        }
        // A browser waits `retry:`; a short pause, spread over clients, is enough here.
        tokio::time::sleep(pause(&user)).await;
    }
}

/// A WebSocket client of `channel` at `addr` from `source`, resubscribing with `since` after
/// every disconnect (and from a reset's position).
pub async fn ws_client(
    user: String,
    source: IpAddr,
    addr: SocketAddr,
    channel: &'static str,
    mut last: watch::Receiver<Option<u64>>,
    started: Started,
) -> Outcome {
    let token = token_for(&user, &[channel], Duration::from_secs(600));
    let mut outcome = Outcome::default();
    let mut since = None::<u64>;
    loop {
        if outcome.reached(*last.borrow(), since) {
            return outcome;
        }
        outcome.connects += 1;
        let Some(tcp) = connect_from(source, addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut request = format!("ws://{addr}/v1/ws")
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
        let mut subscribe = serde_json::json!({"type": "subscribe", "channel": channel});
        if let Some(since) = since {
            subscribe["since"] = serde_json::json!(since.to_string());
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
                    if outcome.reached(*last.borrow(), since) {
                        return outcome;
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
            let position = || value["position"].as_str().and_then(|p| p.parse().ok());
            match value["type"].as_str() {
                Some("event") => {
                    let id = event_id(&value);
                    outcome.ids.push(id);
                    since = Some(id);
                }
                Some("subscribed") if since.is_none() => {
                    since = position();
                    started.one();
                }
                Some("reset") => {
                    outcome.resets.push(Reset {
                        after: outcome.ids.last().copied(),
                        position: position().or(since),
                    });
                    since = position().or(since);
                }
                _ => {}
            }
            if outcome.reached(*last.borrow(), since) {
                return outcome;
            }
        }
        tokio::time::sleep(pause(&user)).await;
    }
}

/// 50 to 250 ms, different per client, so reconnects do not all land at once.
fn pause(user: &str) -> Duration {
    let spread = user
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    Duration::from_millis(50 + spread % 200)
}

/// Publishes `{"channel": channel, "data": n}` at `rate` per second, each event retried with
/// its idempotency key until accepted, so each is published once.
pub struct Publishing {
    running: Arc<AtomicBool>,
    task: JoinHandle<Vec<u64>>,
    /// When each accepted publish was answered.
    pub accepted_at: Arc<Mutex<Vec<Instant>>>,
}

impl Publishing {
    pub fn start(publisher_url: &str, channel: &'static str, rate: u64) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let accepted_at = Arc::new(Mutex::new(Vec::new()));
        let url = format!("{publisher_url}/v1/publish");
        let task = {
            let (running, accepted_at) = (running.clone(), accepted_at.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut sends = tokio::task::JoinSet::new();
                let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
                let mut n = 0u64;
                while running.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let (http, url, accepted_at) = (http.clone(), url.clone(), accepted_at.clone());
                    sends.spawn(async move {
                        loop {
                            let answer = http
                                .post(&url)
                                .bearer_auth(TEST_PUBLISHER_KEY)
                                .header("idempotency-key", format!("e-{n}"))
                                .json(&serde_json::json!({"channel": channel, "data": n}))
                                .send()
                                .await;
                            if let Ok(r) = answer
                                && r.status() == reqwest::StatusCode::ACCEPTED
                                && let Ok(json) = r.json::<serde_json::Value>().await
                            {
                                if let Ok(mut at) = accepted_at.lock() {
                                    at.push(Instant::now());
                                }
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
        Self {
            running,
            task,
            accepted_at,
        }
    }

    /// Stops publishing; returns every acknowledged id, in order.
    pub async fn stop(self) -> Vec<u64> {
        self.running.store(false, Ordering::Relaxed);
        self.task.await.expect("publisher task")
    }

    /// The longest time after `from` without an accepted publish.
    pub fn longest_gap_since(&self, from: Instant) -> Duration {
        let mut at: Vec<Instant> = self
            .accepted_at
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        at.sort_unstable();
        let mut previous = from;
        let mut longest = Duration::ZERO;
        for t in at.into_iter().filter(|t| *t >= from) {
            longest = longest.max(t - previous);
            previous = t;
        }
        longest
    }
}

/// Waits for every client to reach the last acknowledged event; checks and prints the counts.
pub async fn settle(
    name: &str,
    mut clients: tokio::task::JoinSet<Outcome>,
    acked: &[u64],
    extra: &str,
) {
    let mut outcomes = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(outcome) = clients.join_next().await {
            outcomes.push(outcome.expect("client task"));
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "{name}: {} clients caught up in 90 s",
        outcomes.len()
    );
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "{name}: an id was handed out twice"
    );
    let (mut delivered, mut reset, mut lost, mut duplicated, mut disordered) = (0, 0, 0, 0, 0);
    for outcome in &outcomes {
        delivered += outcome.ids.iter().filter(|id| acked.contains(id)).count();
        reset += usize::from(!outcome.resets.is_empty());
        lost += outcome.lost(acked);
        duplicated += outcome.duplicated();
        disordered += usize::from(!outcome.in_order());
    }
    println!(
        "{name}: acknowledged {} events; {} clients; delivered {delivered} of {}; \
         {reset} clients reset; lost {lost}, duplicated {duplicated}, out of order {disordered}{extra}",
        acked.len(),
        outcomes.len(),
        acked.len() * outcomes.len(),
    );
    assert_eq!((lost, duplicated, disordered), (0, 0, 0), "{name}");
}

/// `sse` SSE and `ws` WebSocket clients of `channel`, spread over `gateways`, each its own user
/// and address; returns once all are connected.
pub async fn clients(
    gateways: &[SocketAddr],
    channel: &'static str,
    sse: u32,
    ws: u32,
    last: &watch::Receiver<Option<u64>>,
) -> tokio::task::JoinSet<Outcome> {
    let (mut clients, started) = (tokio::task::JoinSet::new(), Started::default());
    let gateway = |i: u32| gateways[i as usize % gateways.len()];
    for i in 0..sse {
        let (last, started) = (last.clone(), started.clone());
        let user = format!("sse-{i}");
        clients.spawn(sse_client(
            user,
            source(i),
            gateway(i),
            channel,
            last,
            started,
        ));
    }
    for i in 0..ws {
        let (last, started) = (last.clone(), started.clone());
        let user = format!("ws-{i}");
        clients.spawn(ws_client(
            user,
            source(sse + i),
            gateway(i),
            channel,
            last,
            started,
        ));
    }
    let all = started.wait_for(sse + ws, Duration::from_secs(60)).await;
    assert!(all, "{} of {} clients started", started.count(), sse + ws);
    clients
}
