//! Shared test support: real Redis servers, real services on ephemeral ports, real clients.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod fleet;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod sentinel;
pub mod sse;
pub mod tls;
pub mod ws;

use std::{future::Future, io, time::Duration};

use eventgate_core::{
    Broker, BrokerConfig,
    auth::{AuthConfig, Minter, Pattern, Verifier},
    limits::Rate,
};
use eventgate_gateway::GatewayConfig;
use eventgate_publisher::{PublisherAuth, PublisherConfig};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use self::{
    redis::RedisServer,
    sse::{End, Received, SseClient},
    ws::{WsClient, event_id},
};

/// The JWT secret of test stacks.
pub const TEST_SECRET: &str = "eventgate-test-secret-0123456789abcdef";

/// The publisher API key of test stacks (every channel).
pub const TEST_PUBLISHER_KEY: &str = "test-publisher-key-0123456789";

/// Auth settings of test stacks: `TEST_SECRET`, no leeway (expiry tests stay short).
pub fn test_auth() -> AuthConfig {
    AuthConfig {
        jwt_secret: Some(TEST_SECRET.into()),
        jwt_leeway: Duration::ZERO,
        ..AuthConfig::default()
    }
}

/// A token signed with `TEST_SECRET` for `sub`, granting `channels`, valid for `ttl`.
pub fn token_for(sub: &str, channels: &[&str], ttl: Duration) -> String {
    let minter = Minter::new(&test_auth())
        .expect("test auth")
        .expect("a signing key");
    let patterns: Vec<Pattern> = channels
        .iter()
        .map(|c| Pattern::parse(c).expect("pattern"))
        .collect();
    minter.mint(sub, &patterns, ttl).expect("mint").0
}

/// A token that reads every channel for an hour: what the test clients send by default.
pub fn test_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| token_for("tester", &["*"], Duration::from_secs(3600)))
}

/// An HTTP client that sends `test_token()` unless a request sets its own `Authorization`.
pub fn authed_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", test_token()).parse().expect("header"),
    );
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// A hand-written `GET /v1/events?{query}` request head carrying the test token.
pub fn raw_sse_request(query: &str) -> String {
    format!(
        "GET /v1/events?{query} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\r\n",
        test_token()
    )
}

/// Generous bound for anything that should happen "now".
pub const SOON: Duration = Duration::from_secs(10);

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which broker a stack runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    /// Three independent Redis servers (`REDIS_SHARDS`), one shard each.
    Shards,
    /// A Redis Cluster of three primaries (`REDIS_CLUSTER`), 16 shards.
    Cluster,
}

impl Backend {
    /// Channels spread over several shards: no order across shards.
    pub fn sharded(self) -> bool {
        matches!(self, Backend::Shards | Backend::Cluster)
    }
}

/// Settings for a test stack.
#[derive(Clone)]
pub struct Options {
    pub broker: BrokerConfig,
    pub gateway: GatewayConfig,
    pub publisher: PublisherConfig,
    pub auth: AuthConfig,
    pub persistent_redis: bool,
    /// The services reach Redis through a [`proxy::Proxy`] (`Stack::proxy`).
    pub redis_proxy: bool,
}

/// Limits on (their code runs in every test) but never reached by one test's clients, which
/// all come from 127.0.0.1 as one user. The limits tests set their own.
pub fn unlimited() -> Rate {
    Rate::new(1_000_000, Duration::from_secs(1), 1_000_000)
}

impl Default for Options {
    fn default() -> Self {
        Self {
            broker: BrokerConfig::memory(),
            gateway: GatewayConfig {
                shutdown_timeout: Duration::from_secs(3),
                // Tests stop services at once; the drain test sets its own.
                drain_grace: Duration::ZERO,
                rate_limit_connect: unlimited(),
                rate_limit_tickets: unlimited(),
                rate_limit_ws_subscribe: unlimited(),
                max_connections_per_ip: 1_000_000,
                max_connections_per_user: 1_000_000,
                ..GatewayConfig::default()
            },
            publisher: PublisherConfig {
                shutdown_timeout: Duration::from_secs(3),
                drain_grace: Duration::ZERO,
                rate_limit_publish: unlimited(),
                rate_limit_unauthenticated: unlimited(),
                publisher_api_keys: vec![TEST_PUBLISHER_KEY.into()],
                ..PublisherConfig::default()
            },
            auth: test_auth(),
            persistent_redis: false,
            redis_proxy: false,
        }
    }
}

/// A service running in this test process.
pub struct Service {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<io::Result<()>>,
}

impl Service {
    /// Stops the service gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(SOON, self.task).await;
    }
}

/// Publisher, gateways and (for Redis) a Redis server of one test.
pub struct Stack {
    pub backend: Backend,
    pub redis: Option<RedisServer>,
    /// The servers of a `Shards` stack.
    pub shard_servers: Vec<RedisServer>,
    /// The cluster of a `Cluster` stack.
    pub cluster: Option<cluster::RedisCluster>,
    /// Between the services and Redis, with `Options::redis_proxy`.
    pub proxy: Option<proxy::Proxy>,
    pub options: Options,
    /// The one broker of a memory stack, shared like in `standalone`.
    memory: Option<Broker>,
    pub gateways: Vec<Service>,
    pub publisher: Service,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: Backend, mut options: Options) -> Self {
        let mut shard_servers = Vec::new();
        let mut cluster = None;
        let mut proxied = None;
        let (redis, memory) = match backend {
            Backend::Cluster => {
                let nodes = cluster::RedisCluster::shared().await;
                options.broker.redis_cluster = nodes.seeds();
                // The binary's tests share the cluster, each under its own prefix.
                options.broker.redis_key_prefix = format!("eventgate:{}:", rand::random::<u64>());
                cluster = Some(nodes);
                (None, None)
            }
            Backend::Memory => (None, Some(Broker::memory(&options.broker))),
            Backend::Shards => {
                for _ in 0..3 {
                    shard_servers.push(RedisServer::start().await);
                }
                options.broker.redis_shards = shard_servers.iter().map(|r| r.url()).collect();
                (None, None)
            }
            Backend::Redis => {
                let redis = if options.persistent_redis {
                    RedisServer::start_persistent().await
                } else {
                    RedisServer::start().await
                };
                options.broker.redis_url = Some(redis.url());
                if options.redis_proxy {
                    let relay = proxy::Proxy::start(redis.port).await;
                    options.broker.redis_url = Some(format!("redis://127.0.0.1:{}", relay.port));
                    proxied = Some(relay);
                }
                (Some(redis), None)
            }
        };
        let http = authed_client();
        let mut stack = Self {
            backend,
            redis,
            shard_servers,
            cluster,
            proxy: proxied,
            memory,
            publisher: Service {
                url: String::new(),
                shutdown: CancellationToken::new(),
                task: tokio::spawn(async { Ok(()) }),
            },
            gateways: Vec::new(),
            options,
            http,
        };
        stack.publisher = stack.start_publisher().await;
        stack.add_gateway().await;
        stack
    }

    async fn broker(&self) -> Broker {
        match &self.memory {
            Some(broker) => broker.clone(),
            None => Broker::from_config(&self.options.broker)
                .await
                .expect("connect to test redis"),
        }
    }

    async fn start_publisher(&self) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let auth = PublisherAuth::from_config(&self.options.publisher, &self.options.auth)
            .expect("publisher auth");
        let task = tokio::spawn(eventgate_publisher::run(
            self.options.publisher.clone(),
            self.broker().await,
            auth,
            listener,
            shutdown.clone(),
        ));
        Service {
            url,
            shutdown,
            task,
        }
    }

    /// Starts another gateway replica on the same broker; returns its index.
    pub async fn add_gateway(&mut self) -> usize {
        let index = self.gateways.len();
        let mut config = self.options.gateway.clone();
        config.replica_id = Some(format!("replica-{index}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let verifier = Verifier::new(&self.options.auth).expect("gateway auth");
        let task = tokio::spawn(eventgate_gateway::run(
            config,
            self.broker().await,
            verifier,
            listener,
            shutdown.clone(),
        ));
        self.gateways.push(Service {
            url,
            shutdown,
            task,
        });
        assert!(
            self.wait_ready(index, SOON).await,
            "gateway {index} never became ready"
        );
        index
    }

    /// Waits until gateway `index` answers 200 on `/readyz`.
    pub async fn wait_ready(&self, index: usize, timeout: Duration) -> bool {
        let url = format!("{}/readyz", self.gateways[index].url);
        let http = self.http.clone();
        wait_until(timeout, || {
            let (url, http) = (url.clone(), http.clone());
            async move {
                matches!(http.get(&url).send().await, Ok(r) if r.status() == StatusCode::OK)
            }
        })
        .await
    }

    pub async fn readyz_status(&self, index: usize) -> StatusCode {
        self.http
            .get(format!("{}/readyz", self.gateways[index].url))
            .send()
            .await
            .expect("readyz")
            .status()
    }

    pub fn ws_url(&self, gateway: usize) -> String {
        format!(
            "{}/v1/ws",
            self.gateways[gateway].url.replacen("http://", "ws://", 1)
        )
    }

    pub fn events_url(&self, gateway: usize, query: &str) -> String {
        format!("{}/v1/events?{query}", self.gateways[gateway].url)
    }

    /// Opens an SSE stream on gateway 0 and checks it was accepted.
    pub async fn subscribe(&self, query: &str) -> SseClient {
        self.subscribe_at(0, query, None).await
    }

    /// Opens an SSE stream, optionally resuming, and reads through its opening lines.
    pub async fn subscribe_at(
        &self,
        gateway: usize,
        query: &str,
        last_id: Option<&str>,
    ) -> SseClient {
        let mut client =
            SseClient::connect(&self.http, &self.events_url(gateway, query), last_id).await;
        assert_eq!(client.status, StatusCode::OK, "subscribe {query}");
        let opening = client.next_block(SOON).await.expect("opening block");
        assert!(
            opening.retry.is_some() && opening.id.is_some(),
            "opening block: {opening:?}"
        );
        client
    }

    /// Posts a JSON body to the publisher; returns the status and JSON answer.
    pub async fn post_publish(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/v1/publish", self.publisher.url))
            .header("content-type", content_type)
            .bearer_auth(TEST_PUBLISHER_KEY)
            .body(body)
            .send()
            .await
            .expect("publish request");
        let status = response.status();
        let json = response.json().await.unwrap_or(Value::Null);
        (status, json)
    }

    /// Publishes and expects 202; returns `(channel, id)` per entry.
    pub async fn publish(&self, body: Value) -> Vec<(String, u64)> {
        let (status, json) = self
            .post_publish(body.to_string(), "application/json")
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "publish answered {json}");
        published(&json)
    }

    /// Publishes one event on `channel` with `data`; returns its id.
    pub async fn publish_one(&self, channel: &str, data: Value) -> u64 {
        self.publish(serde_json::json!({"channel": channel, "data": data}))
            .await[0]
            .1
    }

    pub async fn stats(&self, gateway: usize) -> Value {
        self.http
            .get(format!("{}/v1/stats", self.gateways[gateway].url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats JSON")
    }

    /// Keys matching `pattern` (written for the default `eventgate:` prefix) under this stack's
    /// prefix, on every Redis of the stack.
    pub async fn redis_keys(&self, pattern: &str) -> Vec<String> {
        let pattern = match pattern.strip_prefix("eventgate:") {
            Some(rest) => format!("{}{rest}", self.options.broker.redis_key_prefix),
            None => pattern.to_owned(),
        };
        let mut keys = Vec::new();
        let nodes = self.cluster.iter().flat_map(|c| &c.nodes);
        for server in self.redis.iter().chain(&self.shard_servers).chain(nodes) {
            keys.extend(server.query::<Vec<String>>(&["KEYS", &pattern]).await);
        }
        keys
    }

    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("a Redis stack")
    }
}

/// Asserts a client got `expected` `(channel, id)` events: in exactly that order on one
/// counter; with several shards (no order across shards), in that order per channel.
pub fn assert_delivered(
    backend: Backend,
    got: &[(String, u64)],
    expected: &[(String, u64)],
    what: &str,
) {
    if !backend.sharded() {
        assert_eq!(got, expected, "{what}");
        return;
    }
    let by_channel = |list: &[(String, u64)]| {
        let mut map: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for (channel, id) in list {
            map.entry(channel.clone()).or_default().push(*id);
        }
        map
    };
    assert_eq!(got.len(), expected.len(), "{what}: count");
    assert_eq!(by_channel(got), by_channel(expected), "{what}, per channel");
}

/// `(channel, id)` pairs of a 202 answer.
pub fn published(json: &Value) -> Vec<(String, u64)> {
    json["published"]
        .as_array()
        .expect("published list")
        .iter()
        .map(|p| {
            (
                p["channel"].as_str().expect("channel").to_owned(),
                p["id"].as_str().expect("id").parse().expect("numeric id"),
            )
        })
        .collect()
}

/// Declares one async test per backend: `name::memory`, `name::redis` (one Redis),
/// `name::shards` (three independent Redis servers) and `name::cluster` (a Redis Cluster).
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name($crate::support::Backend::Memory).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name($crate::support::Backend::Redis).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn shards() {
                    super::$name($crate::support::Backend::Shards).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    super::$name($crate::support::Backend::Cluster).await
                }
            }
        )*
    };
}
