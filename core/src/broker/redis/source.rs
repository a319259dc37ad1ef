//! Where the Redis primary is: a fixed URL, or whatever the Sentinels say it is right now. Every
//! Redis connection of a process (commands and pub/sub) is built here.

use std::time::Duration;

use redis::{
    ConnectionAddr, IntoConnectionInfo, TlsMode,
    io::tcp::{TcpSettings, socket2::TcpKeepalive},
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

use super::tls;
use crate::{BrokerConfig, BrokerError};

/// The primary's address source.
pub(crate) enum Source {
    Url(redis::Client),
    /// The primary that serves a slot of a Redis Cluster.
    ClusterSlot {
        map: std::sync::Arc<super::cluster::ClusterMap>,
        slot: u16,
    },
    /// The redis crate's Sentinel client: it asks the Sentinels in turn for the master and
    /// checks with `ROLE` that the server it names really is one.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
}

/// The one place Redis clients are built, address, credentials and TLS: one source for
/// `REDIS_URL` or the Sentinels, one per server for `REDIS_SHARDS`.
pub(crate) fn sources(config: &BrokerConfig) -> Result<Vec<Source>, BrokerError> {
    let certificates = tls::certificates(config).map_err(BrokerError::Config)?;
    if config.redis_tls_enabled() {
        tls::install_crypto();
    }
    if config.redis_tls_skip_hostname_check {
        tracing::warn!(
            "REDIS_TLS_SKIP_HOSTNAME_CHECK is on: any server with a certificate from a trusted \
             CA is accepted as Redis; for development only"
        );
    }
    if let Some(url) = &config.redis_url {
        return Ok(vec![Source::url(url, certificates, config)?]);
    }
    if !config.redis_shards.is_empty() {
        return config
            .redis_shards
            .iter()
            .map(|url| Source::url(url, certificates.clone(), config))
            .collect();
    }
    Ok(vec![Source::sentinel(config, certificates)?])
}

/// The TCP options of every Redis connection (redis-rs sets none of them by default):
/// - no Nagle delay: several commands pipelined on one connection go out at once;
/// - keepalive probes after 30 s idle: the NAT and load-balancer entries on the way, which the
///   usual clouds drop after 4 to 10 minutes idle, stay up, and a peer that vanished is noticed
///   while the connection is idle;
/// - data unacknowledged for 10 s closes the connection, which then reconnects, instead of
///   retransmitting for about 15 minutes (a host gone without a reset).
pub(crate) fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive.with_retries(3);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(Duration::from_secs(10));
    settings
}

/// A client of the server at `url`, with the configured TLS.
pub(crate) fn client(
    url: &str,
    certificates: Option<redis::TlsCertificates>,
    config: &BrokerConfig,
) -> Result<redis::Client, BrokerError> {
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    let client = match certificates {
        Some(certificates) => redis::Client::build_with_tls(info, certificates)?,
        None => redis::Client::open(info)?,
    };
    if !config.redis_tls_skip_hostname_check {
        return Ok(client);
    }
    let info = client.get_connection_info().clone();
    let mut addr = info.addr().clone();
    addr.set_danger_accept_invalid_hostnames(true);
    Ok(redis::Client::open(info.set_addr(addr))?)
}

impl Source {
    fn url(
        url: &str,
        certificates: Option<redis::TlsCertificates>,
        config: &BrokerConfig,
    ) -> Result<Self, BrokerError> {
        Ok(Self::Url(client(url, certificates, config)?))
    }

    fn sentinel(
        config: &BrokerConfig,
        certificates: Option<redis::TlsCertificates>,
    ) -> Result<Self, BrokerError> {
        let master = config.redis_sentinel_master.clone().unwrap_or_default();
        let tls_on = config.redis_tls;
        let sentinels = config
            .redis_sentinels
            .iter()
            .map(|s| {
                parse_host_port(s).map(|(host, port)| match tls_on {
                    true => ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    },
                    false => ConnectionAddr::Tcp(host, port),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(BrokerError::Config)?;
        let mut builder =
            SentinelClientBuilder::new(sentinels, master.clone(), SentinelServerType::Master)?
                .set_client_to_redis_tcp_settings(tcp_settings())
                .set_client_to_sentinel_tcp_settings(tcp_settings());
        if tls_on {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certificates) = certificates {
                builder = builder
                    .set_client_to_redis_certificates(certificates.clone())
                    .set_client_to_sentinel_certificates(certificates);
            }
        }
        if let Some(username) = &config.redis_username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &config.redis_password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &config.redis_sentinel_username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &config.redis_sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        Ok(Self::Sentinel {
            client: tokio::sync::Mutex::new(builder.build()?),
            master,
        })
    }

    /// Whether the primary can move (Sentinel, Cluster), so failing connections are worth
    /// re-resolving.
    pub(crate) fn follows_failovers(&self) -> bool {
        matches!(self, Self::Sentinel { .. } | Self::ClusterSlot { .. })
    }

    /// A client for the current primary; with Sentinels, asks them (within `timeout`); on a
    /// Cluster, reads the slot map again when `fresh`.
    pub(crate) async fn locate(
        &self,
        timeout: Duration,
        fresh: bool,
    ) -> Result<redis::Client, BrokerError> {
        match self {
            Self::ClusterSlot { map, slot } => map.primary(*slot, fresh, timeout).await,
            _ => self.primary(timeout).await,
        }
    }

    /// A client for the current primary; with Sentinels, asks them (within `timeout`).
    pub(crate) async fn primary(&self, timeout: Duration) -> Result<redis::Client, BrokerError> {
        match self {
            Self::Url(client) => Ok(client.clone()),
            Self::ClusterSlot { map, slot } => map.primary(*slot, false, timeout).await,
            Self::Sentinel { client, master } => {
                let ask = async { client.lock().await.async_get_client().await };
                match tokio::time::timeout(timeout, ask).await {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(match tls::explain(&e) {
                        Some(message) => BrokerError::Tls(message),
                        None => BrokerError::Sentinel {
                            master: master.clone(),
                            source: e,
                        },
                    }),
                    Err(_) => Err(BrokerError::Timeout(timeout)),
                }
            }
        }
    }
}

/// Parses `host:port` (`[v6]:port` for IPv6).
pub fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    let text = text.trim();
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{text:?} has no valid port"))?;
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_addresses_are_host_and_port() {
        assert_eq!(
            parse_host_port("10.0.0.1:26379"),
            Ok(("10.0.0.1".into(), 26379))
        );
        assert_eq!(parse_host_port(" [::1]:26379"), Ok(("::1".into(), 26379)));
        for bad in ["sentinel", ":26379", "host:", "host:0", "host:99999"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connections_to_a_url_get_the_tcp_options() {
        let config = BrokerConfig::memory();
        let client = client("redis://127.0.0.1:6379", None, &config).expect("client");
        let tcp = client.get_connection_info().tcp_settings();
        assert!(tcp.nodelay());
        assert!(tcp.keepalive().is_some());
        #[cfg(target_os = "linux")]
        assert_eq!(tcp.user_timeout(), Some(Duration::from_secs(10)));
    }
}
