//! Settings both services read: where the broker is and how much history it keeps.

use std::{fmt, path::PathBuf, time::Duration};

/// Parses a human duration (`15s`, `500ms`, `24h`); zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(text.trim()).map_err(|e| format!("{e} (try 15s, 500ms, 24h)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// A duration of at most `max` (written the way `max_text` says), for settings where a larger
/// value is a mistake.
pub fn parse_duration_at_most(
    text: &str,
    max: Duration,
    max_text: &str,
) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > max {
        return Err(format!("may be at most {max_text}"));
    }
    Ok(d)
}

/// Broker settings. Every field is an environment variable and a command-line flag.
#[derive(clap::Args, Clone)]
pub struct BrokerConfig {
    /// Redis URL, `redis://[[user]:password@]host:port[/db]`. `gateway` and `publisher` need it
    /// (or `REDIS_SENTINELS`); `standalone` uses it when set and an in-memory broker otherwise.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Several independent Redis servers, comma-separated URLs, instead of `REDIS_URL`: channels
    /// are spread over `REDIS_SHARD_COUNT` logical shards, shard `i` on server `i mod n`.
    #[arg(
        long,
        env = "REDIS_SHARDS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub redis_shards: Vec<String>,

    /// A Redis Cluster (7.0 or newer), comma-separated seed URLs (`redis://10.0.0.5:6379`),
    /// instead of `REDIS_URL`: channels are spread over `REDIS_SHARD_COUNT` logical shards, each
    /// in one slot, with sharded pub/sub.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub redis_cluster: Vec<String>,

    /// Logical shards channels are spread over, with `REDIS_SHARDS` (default: one per
    /// server) or `REDIS_CLUSTER` (default 16). Fixed for a deployment: every service must use the same, and changing it is a
    /// migration (a service refuses to start on data written with another count).
    #[arg(long, env = "REDIS_SHARD_COUNT",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_shard_count: Option<u32>,

    /// Redis Sentinels, comma-separated `host:port`, instead of `REDIS_URL`: both services ask
    /// them for the master of `REDIS_SENTINEL_MASTER` and follow its failovers.
    #[arg(long, env = "REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// The master name the Sentinels monitor (`sentinel monitor <name> ...`).
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Username of the Redis master found through Sentinel (ACL); with `REDIS_URL`, put it in
    /// the URL.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Password of the Redis master found through Sentinel; with `REDIS_URL`, put it in the URL.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Username for the Sentinels themselves, when they require one.
    #[arg(long, env = "REDIS_SENTINEL_USERNAME")]
    pub redis_sentinel_username: Option<String>,

    /// Password for the Sentinels themselves (`requirepass` in sentinel.conf), when set.
    #[arg(long, env = "REDIS_SENTINEL_PASSWORD", hide_env_values = true)]
    pub redis_sentinel_password: Option<String>,

    /// With Sentinels: talk TLS to them and to the Redis servers they name. With `REDIS_URL`,
    /// the `rediss://` scheme says so instead.
    #[arg(long, env = "REDIS_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_tls: bool,

    /// PEM file of the CA certificate(s) that sign the Redis servers' (and Sentinels')
    /// certificates: a private CA. Unset: the system's root certificates.
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,

    /// PEM client certificate (chain) for Redis servers that require one (mutual TLS).
    #[arg(long, env = "REDIS_TLS_CERT_FILE")]
    pub redis_tls_cert_file: Option<PathBuf>,

    /// PEM private key of `REDIS_TLS_CERT_FILE`.
    #[arg(long, env = "REDIS_TLS_KEY_FILE")]
    pub redis_tls_key_file: Option<PathBuf>,

    /// Development only: accept a Redis certificate issued for another host name (its chain
    /// is still verified). Logged as a warning at start.
    #[arg(long, env = "REDIS_TLS_SKIP_HOSTNAME_CHECK", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub redis_tls_skip_hostname_check: bool,

    /// Your Redis keeps every acknowledged write across a restart (`appendonly yes`,
    /// `appendfsync always`): a restart of the same server then does not reset clients. Off,
    /// every restart or failover counts as a possible loss (docs/resume.md). Failovers always
    /// do.
    #[arg(long, env = "REDIS_LOSSLESS_RESTARTS", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub redis_lossless_restarts: bool,

    /// Prefix of every Redis key and pub/sub channel eventgate uses.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "eventgate:")]
    pub redis_key_prefix: String,

    /// How long a Redis command may take before the request fails (503).
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Multiplexed Redis command connections per process (the pub/sub connection is extra).
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub redis_pool_size: u32,

    /// Events kept per channel for resume (approximately, on Redis).
    #[arg(long, env = "HISTORY_MAX_LEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub history_max_len: u64,

    /// A channel's history expires this long after its last event. Gateways and publishers
    /// must agree on it.
    #[arg(long, env = "HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// How long a publish's `Idempotency-Key` is remembered: a retry within it returns the
    /// original ids and publishes nothing.
    #[arg(long, env = "IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
}

impl BrokerConfig {
    /// Defaults for an in-memory broker; tests and embedders start here.
    pub fn memory() -> Self {
        Self {
            redis_url: None,
            redis_shards: Vec::new(),
            redis_cluster: Vec::new(),
            redis_shard_count: None,
            redis_sentinels: Vec::new(),
            redis_sentinel_master: None,
            redis_username: None,
            redis_password: None,
            redis_sentinel_username: None,
            redis_sentinel_password: None,
            redis_lossless_restarts: false,
            redis_tls: false,
            redis_tls_ca_file: None,
            redis_tls_cert_file: None,
            redis_tls_key_file: None,
            redis_tls_skip_hostname_check: false,
            redis_key_prefix: "eventgate:".into(),
            redis_timeout: Duration::from_secs(2),
            redis_pool_size: 4,
            history_max_len: 10_000,
            history_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }

    /// The Redis URL with any password replaced, for logs.
    pub fn redacted_redis_url(&self) -> Option<String> {
        self.redis_url.as_deref().map(redact_url)
    }

    /// Whether a Redis is configured (`REDIS_URL`, Sentinels or shards).
    pub fn uses_redis(&self) -> bool {
        self.redis_url.is_some()
            || !self.redis_sentinels.is_empty()
            || !self.redis_shards.is_empty()
            || !self.redis_cluster.is_empty()
    }

    /// Whether channels are spread over shards (`REDIS_SHARDS`, `REDIS_CLUSTER`): keys carry
    /// hash tags.
    pub fn uses_shards(&self) -> bool {
        !self.redis_shards.is_empty() || !self.redis_cluster.is_empty()
    }

    /// The Redis URLs given for shards or cluster seeds.
    fn shard_urls(&self) -> &[String] {
        if self.redis_cluster.is_empty() {
            &self.redis_shards
        } else {
            &self.redis_cluster
        }
    }

    /// The number of logical shards: `REDIS_SHARD_COUNT`, else one per `REDIS_SHARDS` server,
    /// else one.
    pub fn shard_count(&self) -> usize {
        match self.redis_shard_count {
            Some(count) => count as usize,
            None if !self.redis_cluster.is_empty() => 16,
            None => self.redis_shards.len().max(1),
        }
    }

    /// Where Redis is, for logs: the URL without its password, the shards, or the Sentinels.
    pub fn redis_description(&self) -> String {
        if !self.redis_cluster.is_empty() {
            let seeds: Vec<String> = self.redis_cluster.iter().map(|u| redact_url(u)).collect();
            return format!(
                "{} shards on the Redis Cluster of {}",
                self.shard_count(),
                seeds.join(",")
            );
        }
        if !self.redis_shards.is_empty() {
            let servers: Vec<String> = self.redis_shards.iter().map(|u| redact_url(u)).collect();
            return format!("{} shards on {}", self.shard_count(), servers.join(","));
        }
        match &self.redis_url {
            Some(_) => self.redacted_redis_url().unwrap_or_default(),
            None => format!(
                "master {:?} of Sentinels {}",
                self.redis_sentinel_master.as_deref().unwrap_or(""),
                self.redis_sentinels.join(",")
            ),
        }
    }

    /// Checks the Redis settings fit together; the message names the settings.
    pub fn check_redis(&self) -> Result<(), String> {
        let sentinels = !self.redis_sentinels.is_empty();
        let chosen = [
            self.redis_url.is_some(),
            sentinels,
            !self.redis_shards.is_empty(),
            !self.redis_cluster.is_empty(),
        ];
        if chosen.iter().filter(|&&c| c).count() > 1 {
            return Err(
                "set one of REDIS_URL, REDIS_SENTINELS (with REDIS_SENTINEL_MASTER), \
                 REDIS_SHARDS or REDIS_CLUSTER"
                    .into(),
            );
        }
        if let Some(count) = self.redis_shard_count {
            if !self.uses_shards() {
                return Err("REDIS_SHARD_COUNT goes with REDIS_SHARDS or REDIS_CLUSTER".into());
            }
            if self.redis_cluster.is_empty() && (count as usize) < self.redis_shards.len() {
                return Err(format!(
                    "REDIS_SHARD_COUNT ({count}) is less than the servers in REDIS_SHARDS ({}): \
                     some servers would hold no shard",
                    self.redis_shards.len()
                ));
            }
        }
        if self.uses_shards() && self.redis_key_prefix.contains(['{', '}']) {
            return Err(
                "REDIS_KEY_PREFIX may not contain { or } with shards: each shard's keys carry \
                 a hash tag"
                    .into(),
            );
        }
        if self.redis_url.is_some() && (sentinels || self.redis_sentinel_master.is_some()) {
            return Err(
                "set REDIS_URL or REDIS_SENTINELS with REDIS_SENTINEL_MASTER, not both".into(),
            );
        }
        if sentinels != self.redis_sentinel_master.is_some() {
            return Err("REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together".into());
        }
        for sentinel in &self.redis_sentinels {
            crate::broker::redis::parse_host_port(sentinel)
                .map_err(|e| format!("REDIS_SENTINELS: {e}"))?;
        }
        if self.redis_url.is_some()
            && (self.redis_username.is_some() || self.redis_password.is_some())
        {
            return Err(
                "REDIS_USERNAME and REDIS_PASSWORD are for Sentinel setups; with REDIS_URL put \
                 them in the URL (redis://user:password@host:port)"
                    .into(),
            );
        }
        self.check_tls()
    }

    /// Whether Redis connections use TLS.
    pub fn redis_tls_enabled(&self) -> bool {
        let tls = |url: &String| {
            url.trim_start()
                .to_ascii_lowercase()
                .starts_with("rediss://")
        };
        match &self.redis_url {
            Some(url) => tls(url),
            None if self.uses_shards() => self.shard_urls().iter().all(tls),
            None => self.redis_tls,
        }
    }

    fn check_tls(&self) -> Result<(), String> {
        if (self.redis_url.is_some() || self.uses_shards()) && self.redis_tls {
            return Err(
                "REDIS_TLS is for Sentinel setups; with REDIS_URL, REDIS_SHARDS or \
                 REDIS_CLUSTER use the rediss:// scheme"
                    .into(),
            );
        }
        let tls_urls = self
            .shard_urls()
            .iter()
            .filter(|u| u.trim_start().to_ascii_lowercase().starts_with("rediss://"))
            .count();
        if tls_urls != 0 && tls_urls != self.shard_urls().len() {
            return Err(
                "REDIS_SHARDS, REDIS_CLUSTER: use rediss:// for every server or none".into(),
            );
        }
        if self
            .redis_url
            .iter()
            .chain(self.shard_urls())
            .any(|u| u.contains('#'))
        {
            return Err(
                "REDIS_URL: a #fragment (#insecure) is not accepted; for a private CA set \
                 REDIS_TLS_CA_FILE"
                    .into(),
            );
        }
        let set: Vec<&str> = [
            ("REDIS_TLS_CA_FILE", self.redis_tls_ca_file.is_some()),
            ("REDIS_TLS_CERT_FILE", self.redis_tls_cert_file.is_some()),
            ("REDIS_TLS_KEY_FILE", self.redis_tls_key_file.is_some()),
            (
                "REDIS_TLS_SKIP_HOSTNAME_CHECK",
                self.redis_tls_skip_hostname_check,
            ),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        if let Some(first) = set.first()
            && self.uses_redis()
            && !self.redis_tls_enabled()
        {
            return Err(format!(
                "{first} needs TLS: a rediss:// REDIS_URL (or REDIS_TLS=true with Sentinels)"
            ));
        }
        if self.redis_tls_skip_hostname_check && !self.redis_sentinels.is_empty() {
            return Err(
                "REDIS_TLS_SKIP_HOSTNAME_CHECK works with REDIS_URL only; Sentinels name servers \
                 by address: give them certificates for those addresses, or set \
                 `sentinel announce-hostnames yes`"
                    .into(),
            );
        }
        crate::broker::redis::tls::certificates(self).map(|_| ())
    }

    /// Granularity of the clock that tells how old a cursor is (see `docs/resume.md`): about a
    /// thousandth of the TTL, at least a second.
    pub fn clock_bucket_secs(&self) -> u64 {
        (self.history_ttl.as_secs() / 1024).max(1)
    }
}

/// Clock checkpoints kept: enough to cover the TTL at [`BrokerConfig::clock_bucket_secs`].
pub(crate) const CLOCK_KEEP: u64 = 1024 + 16;

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("redis_url", &self.redacted_redis_url())
            .field(
                "redis_shards",
                &self
                    .redis_shards
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field(
                "redis_cluster",
                &self
                    .redis_cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("redis_shard_count", &self.redis_shard_count)
            .field("redis_sentinels", &self.redis_sentinels)
            .field("redis_sentinel_master", &self.redis_sentinel_master)
            .field("redis_username", &self.redis_username)
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "***"),
            )
            .field("redis_sentinel_username", &self.redis_sentinel_username)
            .field(
                "redis_sentinel_password",
                &self.redis_sentinel_password.as_ref().map(|_| "***"),
            )
            .field("redis_lossless_restarts", &self.redis_lossless_restarts)
            .field("redis_tls", &self.redis_tls)
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("redis_tls_cert_file", &self.redis_tls_cert_file)
            .field("redis_tls_key_file", &self.redis_tls_key_file)
            .field(
                "redis_tls_skip_hostname_check",
                &self.redis_tls_skip_hostname_check,
            )
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("redis_timeout", &self.redis_timeout)
            .field("redis_pool_size", &self.redis_pool_size)
            .field("history_max_len", &self.history_max_len)
            .field("history_ttl", &self.history_ttl)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_human_forms() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn passwords_never_reach_logs() {
        let mut config = BrokerConfig::memory();
        config.redis_url = Some("redis://:hunter2@cache:6379/0".into());
        assert_eq!(
            config.redacted_redis_url().unwrap(),
            "redis://***@cache:6379/0"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
