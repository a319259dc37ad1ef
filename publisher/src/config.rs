//! Publisher settings.

use std::{net::SocketAddr, time::Duration};

/// Publisher settings. Every field is an environment variable and a command-line flag.
#[derive(clap::Args, Clone, Debug)]
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

    /// After SIGTERM, in-flight requests may finish for this long (`SHUTDOWN_TIMEOUT`, set by
    /// the binary for both services).
    #[arg(skip = Duration::from_secs(10))]
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
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}
