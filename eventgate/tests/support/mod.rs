//! Shared test support: real Redis servers, real services on ephemeral ports, real clients.
#![allow(dead_code, unused_imports)]

pub mod redis;
pub mod sse;
pub mod ws;

use std::{future::Future, io, time::Duration};

use eventgate_broker::{Broker, BrokerConfig};
use eventgate_gateway::GatewayConfig;
use eventgate_publisher::PublisherConfig;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use self::{
    redis::RedisServer,
    sse::{End, Received, SseClient},
    ws::{WsClient, event_id},
};

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
}

/// Settings for a test stack.
#[derive(Clone)]
pub struct Options {
    pub broker: BrokerConfig,
    pub gateway: GatewayConfig,
    pub publisher: PublisherConfig,
    pub persistent_redis: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            broker: BrokerConfig::memory(),
            gateway: GatewayConfig {
                shutdown_timeout: Duration::from_secs(3),
                ..GatewayConfig::default()
            },
            publisher: PublisherConfig {
                shutdown_timeout: Duration::from_secs(3),
                ..PublisherConfig::default()
            },
            persistent_redis: false,
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
        let (redis, memory) = match backend {
            Backend::Memory => (None, Some(Broker::memory(&options.broker))),
            Backend::Redis => {
                let redis = if options.persistent_redis {
                    RedisServer::start_persistent().await
                } else {
                    RedisServer::start().await
                };
                options.broker.redis_url = Some(redis.url());
                (Some(redis), None)
            }
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client");
        let mut stack = Self {
            backend,
            redis,
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
        let task = tokio::spawn(eventgate_publisher::run(
            self.options.publisher.clone(),
            self.broker().await,
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
        let task = tokio::spawn(eventgate_gateway::run(
            config,
            self.broker().await,
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

    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("a Redis stack")
    }
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

/// Declares one async test per backend: `name::memory` and `name::redis`.
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
            }
        )*
    };
}
