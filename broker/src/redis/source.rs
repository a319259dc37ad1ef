//! Where the Redis primary is: a fixed URL, or whatever the Sentinels say it is right now. Every
//! Redis connection of a process (commands and pub/sub) is built here.

use std::time::Duration;

use redis::{
    ConnectionAddr,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

use crate::{BrokerConfig, BrokerError};

/// The primary's address source.
pub(crate) enum Source {
    Url(redis::Client),
    /// The redis crate's Sentinel client: it asks the Sentinels in turn for the master and
    /// checks with `ROLE` that the server it names really is one.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
}

impl Source {
    pub(crate) fn new(config: &BrokerConfig) -> Result<Self, BrokerError> {
        if let Some(url) = &config.redis_url {
            return Ok(Self::Url(redis::Client::open(url.as_str())?));
        }
        let master = config.redis_sentinel_master.clone().unwrap_or_default();
        let sentinels = config
            .redis_sentinels
            .iter()
            .map(|s| parse_host_port(s).map(|(host, port)| ConnectionAddr::Tcp(host, port)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BrokerError::Config)?;
        let mut builder =
            SentinelClientBuilder::new(sentinels, master.clone(), SentinelServerType::Master)?;
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

    /// Whether the primary can move (Sentinel), so failing connections are worth re-resolving.
    pub(crate) fn follows_failovers(&self) -> bool {
        matches!(self, Self::Sentinel { .. })
    }

    /// A client for the current primary; with Sentinels, asks them (within `timeout`).
    pub(crate) async fn primary(&self, timeout: Duration) -> Result<redis::Client, BrokerError> {
        match self {
            Self::Url(client) => Ok(client.clone()),
            Self::Sentinel { client, master } => {
                let ask = async { client.lock().await.async_get_client().await };
                match tokio::time::timeout(timeout, ask).await {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(BrokerError::Sentinel {
                        master: master.clone(),
                        source: e,
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
}
