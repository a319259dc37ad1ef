//! Gateway settings.

use std::{net::SocketAddr, time::Duration};

use eventgate_core::{
    config::{parse_duration, parse_duration_at_most},
    limits::{Rate, TrustedProxies},
};

/// Gateway settings. Every field is an environment variable and a command-line flag.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayConfig {
    /// Address the gateway listens on.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub gateway_addr: SocketAddr,

    /// Name of this replica in `/v1/stats` and logs; defaults to `HOSTNAME`, else a random id.
    #[arg(long, env = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// A `: ping` comment is sent this often on idle streams, so proxies keep them open.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Reconnect delay suggested to browsers (`retry:`); each stream adds up to 50% jitter.
    #[arg(long, env = "SSE_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub sse_retry: Duration,

    /// Events queued per client before it counts as slow and is disconnected. Keep it above
    /// your largest burst on one channel (a publish batch holds up to 1,000 events).
    #[arg(long, env = "CLIENT_QUEUE_SIZE", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_queue_size: u32,

    /// A connection whose socket accepts no bytes for this long is closed (a client that
    /// stopped reading; its queue was already released when it fell behind).
    #[arg(long, env = "WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Channels one connection may subscribe to.
    #[arg(long, env = "MAX_CHANNELS_PER_CONNECTION", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_channels_per_connection: u32,

    /// Channels one WebSocket may be subscribed to at once.
    #[arg(long, env = "WS_MAX_SUBSCRIPTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub ws_max_subscriptions: u32,

    /// Largest WebSocket message a client may send; a larger one closes the socket (1009).
    #[arg(long, env = "WS_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(64..=16 * 1024 * 1024))]
    pub ws_max_message_bytes: u32,

    /// Browser origins allowed in, comma-separated (`https://app.example.com`): they may read
    /// `/v1/events` and `/v1/tickets` cross-origin (CORS, with credentials) and open
    /// WebSockets; a WebSocket handshake from another origin gets 403. Unset: no CORS, and
    /// any origin may open a WebSocket with a token or ticket (a cookie only from the
    /// gateway's own origin).
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Cookie holding a subscriber JWT, for apps that set one on the gateway's site. Unset:
    /// cookies are not read.
    #[arg(long, env = "AUTH_COOKIE")]
    pub auth_cookie: Option<String>,

    /// Accept `?token=<JWT>` in the URL. Off: URLs end up in access logs and browser history;
    /// browsers should use one-time tickets (`POST /v1/tickets`, then `?ticket=`).
    #[arg(long, env = "ALLOW_QUERY_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_query_token: bool,

    /// How long a ticket from `POST /v1/tickets` may be redeemed (once).
    #[arg(long, env = "TICKET_TTL", default_value = "30s",
          value_parser = |s: &str| parse_duration_at_most(s, Duration::from_secs(600), "10m"))]
    pub ticket_ttl: Duration,

    /// History entries read per channel per round trip when replaying.
    #[arg(long, env = "REPLAY_PAGE_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub replay_page_size: u32,

    /// Bytes of history all replays of this replica and its page cache hold at most. Replays
    /// that do not fit wait (up to 10 s, then 503).
    #[arg(long, env = "REPLAY_MEMORY_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024 * 1024..))]
    pub replay_memory_bytes: u64,

    /// Bytes of history one replay holds at most, all its channels together (plus at most one
    /// event per channel): a client resuming 64 channels reads small pages of each.
    #[arg(long, env = "REPLAY_CONNECTION_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(16 * 1024..))]
    pub replay_connection_bytes: u64,

    /// `TRUSTED_PROXIES` (see [`eventgate_core::limits::EdgeConfig`], shared with the publisher).
    #[arg(skip = TrustedProxies::default())]
    pub trusted_proxies: TrustedProxies,

    /// New SSE streams and WebSockets per client IP (`20/s,burst=200`; `off`).
    #[arg(long, env = "RATE_LIMIT_CONNECT", default_value = "20/s,burst=200")]
    pub rate_limit_connect: Rate,

    /// `POST /v1/tickets` per client IP.
    #[arg(long, env = "RATE_LIMIT_TICKETS", default_value = "10/s,burst=50")]
    pub rate_limit_tickets: Rate,

    /// `subscribe` and `refresh` messages per WebSocket. Ten refusals in a row close it (1008).
    #[arg(
        long,
        env = "RATE_LIMIT_WS_SUBSCRIBE",
        default_value = "20/s,burst=100"
    )]
    pub rate_limit_ws_subscribe: Rate,

    /// Streams (SSE and WebSocket) one client IP may hold at once; 0: no cap.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: u32,

    /// Streams one user (`sub`) may hold at once; 0: no cap.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: u32,

    /// Streams this replica holds at most; past it new ones get 503 and `/readyz` turns
    /// false. Default: the open-files limit less 256 (for Redis and HTTP requests).
    #[arg(long, env = "MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,

    /// `REQUEST_HEADER_TIMEOUT` (see [`eventgate_core::limits::EdgeConfig`]).
    #[arg(skip = Duration::from_secs(10))]
    pub request_header_timeout: Duration,

    /// Largest request head (request line and headers), in bytes.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    pub max_header_bytes: u32,

    /// Longest request target (path and query), in bytes.
    #[arg(long, env = "MAX_URL_BYTES", default_value_t = 8 * 1024,
          value_parser = clap::value_parser!(u32).range(256..=1024 * 1024))]
    pub max_url_bytes: u32,

    /// Serve the live console at `/console`: a page that subscribes to channels and shows
    /// events, resets and connection state. Off by default; on in `eventgate standalone`.
    #[arg(long, env = "CONSOLE", action = clap::ArgAction::Set)]
    pub console: Option<bool>,

    /// After SIGTERM the replica is not ready at once, serves on for this long (`DRAIN_GRACE`,
    /// set by the binary for both services), then ends its streams.
    #[arg(skip = Duration::from_secs(5))]
    pub drain_grace: Duration,

    /// The process stops at the latest this long after SIGTERM (`DRAIN_TIMEOUT`).
    #[arg(skip = Duration::from_secs(15))]
    pub shutdown_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            replica_id: None,
            heartbeat_interval: Duration::from_secs(15),
            sse_retry: Duration::from_secs(2),
            client_queue_size: 4096,
            write_timeout: Duration::from_secs(30),
            max_channels_per_connection: 64,
            ws_max_subscriptions: 64,
            ws_max_message_bytes: 16 * 1024,
            allowed_origins: None,
            auth_cookie: None,
            allow_query_token: false,
            ticket_ttl: Duration::from_secs(30),
            replay_page_size: 500,
            replay_memory_bytes: 256 * 1024 * 1024,
            replay_connection_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(15),
            drain_grace: Duration::from_secs(5),
            trusted_proxies: TrustedProxies::default(),
            rate_limit_connect: Rate::new(20, Duration::from_secs(1), 200),
            rate_limit_tickets: Rate::new(10, Duration::from_secs(1), 50),
            rate_limit_ws_subscribe: Rate::new(20, Duration::from_secs(1), 100),
            max_connections_per_ip: 1000,
            max_connections_per_user: 100,
            max_connections: None,
            request_header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_url_bytes: 8 * 1024,
            console: None,
        }
    }
}

impl GatewayConfig {
    /// `MAX_CONNECTIONS`, or what the open-files limit allows.
    pub fn max_connections_or_default(&self) -> usize {
        match self.max_connections {
            Some(max) => max as usize,
            None => rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map_or(65_536, |(soft, _)| soft.saturating_sub(256).max(1) as usize),
        }
    }

    /// How often the replica asks Redis for a position marker (see `live`).
    pub(crate) fn marker_interval(&self) -> Duration {
        self.heartbeat_interval.min(Duration::from_secs(5))
    }
}
