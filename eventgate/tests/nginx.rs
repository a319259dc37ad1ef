//! The nginx config we ship (`deploy/nginx/eventgate.conf`), run for real in front of two
//! gateway processes, a publisher process and Redis: SSE arrives unbuffered, WebSockets
//! upgrade, the client IP reaches the gateway's rate limiter (and a spoofed one does not), and
//! killing a replica sends its clients through nginx to the other, resuming with nothing lost.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{process, *};

/// An HTTP client whose connections come from `source`.
fn client_from(source: IpAddr) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", test_token()).parse().expect("header"),
    );
    reqwest::Client::builder()
        .local_address(source)
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .expect("client")
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The deployment of this test, and a client for the publisher.
struct Deployment {
    services: process::Deployment,
    http: reqwest::Client,
}

impl std::ops::Deref for Deployment {
    type Target = process::Deployment;
    fn deref(&self) -> &process::Deployment {
        &self.services
    }
}

impl std::ops::DerefMut for Deployment {
    fn deref_mut(&mut self) -> &mut process::Deployment {
        &mut self.services
    }
}

impl Deployment {
    async fn start() -> Self {
        let env = [
            ("RATE_LIMIT_CONNECT", "1/min,burst=20"),
            ("HEARTBEAT_INTERVAL", "5s"),
        ];
        Self {
            services: process::Deployment::start(2, &env).await,
            http: reqwest::Client::new(),
        }
    }

    /// Publishes one event straight to the publisher; returns its id.
    async fn publish(&self, channel: &str, data: Value) -> u64 {
        let response = self
            .http
            .post(format!("{}/v1/publish", self.publisher.url))
            .bearer_auth(TEST_PUBLISHER_KEY)
            .json(&json!({"channel": channel, "data": data}))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        published(&response.json().await.expect("JSON"))[0].1
    }

    async fn connections(&self, gateway: usize) -> u64 {
        let stats: Value = self
            .http
            .get(format!("{}/v1/stats", self.gateways[gateway].url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("JSON");
        stats["connections"].as_u64().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_in_front_of_two_replicas_streams_limits_and_fails_over() {
    let mut deployment = Deployment::start().await;
    let events = format!("{}/v1/events?channel=live", deployment.nginx.url);

    // SSE through nginx arrives event by event, long before the next heartbeat (5 s).
    let mut sse = SseClient::open(client_from(loopback(2)).get(&events), None).await;
    assert_eq!(sse.status, StatusCode::OK);
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    sse.next_block(SOON).await.expect("opening block");
    for i in 0..3 {
        let sent = Instant::now();
        let id = deployment.publish("live", json!(i)).await;
        let got = sse.next_event(SOON).await.expect("event");
        assert_eq!(got.id, id);
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "event {i} took {:?}: buffered",
            sent.elapsed()
        );
    }

    // WebSocket upgrades through nginx.
    let ws_url = format!("{}/v1/ws", deployment.nginx.url.replacen("http", "ws", 1));
    let mut ws = WsClient::connect_from(loopback(3), &ws_url)
        .await
        .expect("upgrade through nginx");
    assert_eq!(ws.hello["type"], "connected");
    ws.subscribe("live", None).await;
    let id = deployment.publish("live", json!("ws")).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), id);

    // The client IP reaches the limiter: one address gets at most its burst on each replica
    // (20 each), whatever it writes in X-Forwarded-For itself; another address is unaffected.
    let from_five = client_from(loopback(5));
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..50 {
        let spoofed = format!("203.0.113.{i}");
        let client = SseClient::open(
            from_five
                .get(format!("{events}&duration=1ms"))
                .header("x-forwarded-for", spoofed),
            None,
        )
        .await;
        match client.status {
            StatusCode::OK => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(client.error_body().await["error"]["code"], "rate_limited");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        accepted <= 40 && refused >= 10,
        "{accepted} accepted, {refused} refused"
    );
    let other = SseClient::open(client_from(loopback(6)).get(&events), None).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "another client is not limited"
    );
    drop((other, sse, ws));
    // Tickets never reach nginx's access log (it logs the path only).
    assert!(deployment.nginx.access_log().contains("/v1/events"));
    assert!(!deployment.nginx.access_log().contains("ticket="));

    // Failover: clients on both replicas, one replica killed while publishing.
    const EVENTS: usize = 60;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let url = format!("{}/v1/events?channel=fo", deployment.nginx.url);
        clients.spawn(follow_sse(client_from(loopback(20 + i)), url, EVENTS));
    }
    let (subscribed, mut subscriptions) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..4u8 {
        let ready = subscribed.clone();
        clients.spawn(follow_ws(loopback(40 + i), ws_url.clone(), EVENTS, ready));
    }
    for _ in 0..4 {
        // A WebSocket client's channel starts at its `subscribed` reply, not at its connect.
        tokio::time::timeout(SOON, subscriptions.recv())
            .await
            .expect("every WebSocket client subscribed");
    }
    let both_busy = wait_until(SOON, || async {
        let (a, b) = (
            deployment.connections(0).await,
            deployment.connections(1).await,
        );
        a + b >= 12 && a > 0 && b > 0
    })
    .await;
    assert!(both_busy, "clients spread over both replicas");
    let mut ids = Vec::new();
    for i in 0..EVENTS {
        if i == EVENTS / 3 {
            deployment.gateways[0].kill().await;
        }
        ids.push(deployment.publish("fo", json!(i)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reconnected = 0;
    while let Some(result) = tokio::time::timeout(Duration::from_secs(60), clients.join_next())
        .await
        .expect("every client caught up within a minute")
    {
        let (got, connects) = result.expect("client");
        assert_eq!(got, ids, "every event exactly once, in order");
        reconnected += usize::from(connects > 1);
    }
    assert!(reconnected > 0, "some clients were on the killed replica");
}

/// An SSE client that reconnects through nginx with `Last-Event-ID` until it has `want`
/// events; returns their ids and how many times it connected.
async fn follow_sse(http: reqwest::Client, url: String, want: usize) -> (Vec<u64>, usize) {
    let (mut ids, mut connects, mut last_id) = (Vec::new(), 0, None::<String>);
    while ids.len() < want {
        connects += 1;
        assert!(connects < 20, "too many reconnects");
        // Bounded: a connect that hangs is retried like a browser would.
        let Ok(mut client) =
            tokio::time::timeout(SOON, SseClient::open(http.get(&url), last_id.as_deref())).await
        else {
            continue;
        };
        if client.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        while ids.len() < want {
            match client.next_event(SOON).await {
                Ok(event) => ids.push(event.id),
                Err(_) => break,
            }
        }
        last_id = client.last_id.clone();
    }
    (ids, connects)
}

/// A WebSocket client that reconnects through nginx and resubscribes with `since`.
async fn follow_ws(
    source: IpAddr,
    url: String,
    want: usize,
    subscribed: tokio::sync::mpsc::UnboundedSender<()>,
) -> (Vec<u64>, usize) {
    let (mut ids, mut connects, mut since) = (Vec::new(), 0, None::<String>);
    while ids.len() < want {
        connects += 1;
        assert!(connects < 20, "too many reconnects");
        let Ok(Some(mut ws)) =
            tokio::time::timeout(SOON, WsClient::connect_from(source, &url)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut subscribe = json!({"type": "subscribe", "channel": "fo"});
        if let Some(since) = &since {
            subscribe["since"] = json!(since);
        }
        ws.send(subscribe).await;
        while ids.len() < want {
            match ws.next_json(SOON).await {
                Ok(message) if message["type"] == "event" => {
                    let id = event_id(&message);
                    ids.push(id);
                    since = Some(id.to_string());
                }
                Ok(message) if message["type"] == "subscribed" => {
                    // A first subscribe starts now: resume from the replica's position.
                    if since.is_none() {
                        since = message["position"].as_str().map(str::to_owned);
                        let _ = subscribed.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    (ids, connects)
}

/// A cookie WebSocket through the shipped nginx on a non-default port: the page's own origin
/// (scheme, host and port as the browser saw them) is let in, any other refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_websockets_through_nginx_check_the_full_origin() {
    let services = process::Deployment::start(1, &[("AUTH_COOKIE", "eg_session")]).await;
    let port = services
        .nginx
        .url
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let ws_url = format!(
        "{}/v1/ws",
        services.nginx.url.replacen("http://", "ws://", 1)
    );
    let cookie = format!("eg_session={}", test_token());
    let own = format!("http://127.0.0.1:{port}");
    let mut ws = WsClient::connect_headers(&ws_url, &[("cookie", &cookie), ("origin", &own)])
        .await
        .unwrap_or_else(|e| panic!("the page's own origin {own} is refused: {e:?}"));
    let reply = ws
        .request(json!({"type": "subscribe", "channel": "orders"}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    for foreign in [
        "http://evil.example".to_owned(),
        "http://127.0.0.1".to_owned(),
        format!("https://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let refused =
            WsClient::connect_headers(&ws_url, &[("cookie", &cookie), ("origin", &foreign)]).await;
        match refused {
            Err((status, body)) => {
                assert_eq!(status, StatusCode::FORBIDDEN, "{foreign}: {body}");
                assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
            }
            Ok(_) => panic!("{foreign} opened a cookie WebSocket"),
        }
    }
}
