//! Publisher settings.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use eventgate_core::{
    config::{parse_duration, parse_duration_at_most},
    limits::{Rate, TrustedProxies},
};

/// Publisher settings. Every field is an environment variable and a command-line flag.
#[derive(clap::Args, Clone)]
pub struct PublisherConfig {
    /// Address the publisher API listens on.
    #[arg(long, env = "PUBLISHER_ADDR", default_value = "0.0.0.0:8081")]
    pub publisher_addr: SocketAddr,

    /// Largest `data` of one event, in bytes, once serialized compactly.
    #[arg(long, env = "MAX_EVENT_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_event_bytes: u32,

    /// Largest request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_body_bytes: u32,

    /// Most events in one `{"events": [...]}` request.
    #[arg(long, env = "MAX_BATCH_EVENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch_events: u32,

    /// Most channels one event may be published on.
    #[arg(long, env = "MAX_CHANNELS_PER_EVENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_channels_per_event: u32,

    /// Most stream entries one request writes: events times their channels. A larger request
    /// is refused (413) before anything is written: one request cannot hold Redis for long.
    #[arg(long, env = "MAX_PUBLISH_ENTRIES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_publish_entries: u32,

    /// Most bytes one request writes to Redis: each event's stored body times its channels.
    #[arg(long, env = "MAX_PUBLISH_BYTES", default_value_t = 32 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_publish_bytes: u64,

    /// API keys that may publish, comma-separated: `key`, or `key=pattern|pattern` to limit a
    /// key to channels (`orders-service-key=orders|invoice:*`). Keys are 16+ characters.
    #[arg(
        long,
        env = "PUBLISHER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub publisher_api_keys: Vec<String>,

    /// File of API keys, one entry per line in the same form; `#` starts a comment.
    #[arg(long, env = "PUBLISHER_API_KEYS_FILE")]
    pub publisher_api_keys_file: Option<PathBuf>,

    /// Longest lifetime of a token minted by `POST /v1/tokens`.
    #[arg(long, env = "TOKEN_MAX_TTL", default_value = "24h",
          value_parser = |s: &str| parse_duration_at_most(s, Duration::from_secs(366 * 24 * 3600), "366d"))]
    pub token_max_ttl: Duration,

    /// `TRUSTED_PROXIES` (see [`eventgate_core::limits::EdgeConfig`], shared with the gateway).
    #[arg(skip = TrustedProxies::default())]
    pub trusted_proxies: TrustedProxies,

    /// Requests per API key (`5000/s,burst=10000`; `off`): a runaway backend cannot starve
    /// the others of Redis.
    #[arg(long, env = "RATE_LIMIT_PUBLISH", default_value = "5000/s,burst=10000")]
    pub rate_limit_publish: Rate,

    /// Requests without a valid API key, per client IP: key guessing and misconfigured
    /// clients are slowed down before they cost anything.
    #[arg(
        long,
        env = "RATE_LIMIT_UNAUTHENTICATED",
        default_value = "5/s,burst=20"
    )]
    pub rate_limit_unauthenticated: Rate,

    /// After SIGTERM: requests are refused (503) for this long while the listener stays open
    /// (`DRAIN_GRACE`, set by the binary).
    #[arg(skip = Duration::from_secs(5))]
    pub drain_grace: Duration,

    /// A request head must arrive within this (`REQUEST_HEADER_TIMEOUT`, set by the binary;
    /// see [`eventgate_core::limits::EdgeConfig`]).
    #[arg(skip = Duration::from_secs(10))]
    pub request_header_timeout: Duration,

    /// A request body must arrive within this.
    #[arg(long, env = "REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_body_timeout: Duration,

    /// `eventgate standalone` sets its gateway's port: the console that gateway serves may
    /// then publish from the browser (CORS for `/v1/publish`, from that port on the host the
    /// publisher is reached by). Never set in `publisher` mode, where keys stay on backends.
    #[arg(skip)]
    pub console_port: Option<u16>,

    /// The process stops at the latest this long after SIGTERM; in-flight requests finish
    /// within it (`DRAIN_TIMEOUT`, set by the binary for both services).
    #[arg(skip = Duration::from_secs(15))]
    pub shutdown_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            publisher_addr: SocketAddr::from(([0, 0, 0, 0], 8081)),
            max_event_bytes: 65_536,
            max_body_bytes: 16 * 1024 * 1024,
            max_batch_events: 1000,
            max_channels_per_event: 100,
            max_publish_entries: 10_000,
            max_publish_bytes: 32 * 1024 * 1024,
            publisher_api_keys: Vec::new(),
            publisher_api_keys_file: None,
            token_max_ttl: Duration::from_secs(24 * 3600),
            shutdown_timeout: Duration::from_secs(15),
            drain_grace: Duration::from_secs(5),
            trusted_proxies: TrustedProxies::default(),
            rate_limit_publish: Rate::new(5000, Duration::from_secs(1), 10_000),
            rate_limit_unauthenticated: Rate::new(5, Duration::from_secs(1), 20),
            request_header_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(30),
            console_port: None,
        }
    }
}

/// Keys are never printed.
impl fmt::Debug for PublisherConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherConfig")
            .field("publisher_addr", &self.publisher_addr)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_channels_per_event", &self.max_channels_per_event)
            .field("max_publish_entries", &self.max_publish_entries)
            .field("max_publish_bytes", &self.max_publish_bytes)
            .field(
                "publisher_api_keys",
                &format_args!("[{} redacted]", self.publisher_api_keys.len()),
            )
            .field("publisher_api_keys_file", &self.publisher_api_keys_file)
            .field("token_max_ttl", &self.token_max_ttl)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("rate_limit_publish", &self.rate_limit_publish)
            .field(
                "rate_limit_unauthenticated",
                &self.rate_limit_unauthenticated,
            )
            .field("request_header_timeout", &self.request_header_timeout)
            .field("request_body_timeout", &self.request_body_timeout)
            .field("console_port", &self.console_port)
            .finish()
    }
}
