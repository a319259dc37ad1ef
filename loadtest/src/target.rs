//! What the generator talks to: eventgate, or nchan for comparison. Each has its own URLs,
//! publish requests and subscription handshake; the payload and the checks are the same.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The server family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Kind {
    /// eventgate: `GET /v1/events?channel=…`, `GET /v1/ws`, `POST /v1/publish`.
    Eventgate,
    /// nchan (nginx module): `GET /sub/{channel}` (SSE or WebSocket), `POST /pub/{channel}`.
    Nchan,
}

/// How subscribers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
}

/// A `host:port` base URL, split for raw connections.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Base {
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: String,
}

impl Base {
    /// Parses `http://127.0.0.1:8080` (loopback addresses only: load goes nowhere else).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: use an http:// URL"))?;
        let host = rest.trim_end_matches('/').to_owned();
        let addr: SocketAddr = host.parse().with_context(|| {
            format!("{url}: use an IP address and port, as http://127.0.0.1:8080")
        })?;
        if !addr.ip().is_loopback() {
            bail!("{url}: load is only sent to loopback addresses (127.0.0.0/8)");
        }
        Ok(Self { addr, host })
    }
}

/// Everything needed to reach one system under test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub kind: Kind,
    pub gateways: Vec<Base>,
    pub publisher: Base,
    /// Subscriber token (eventgate), sent as `Authorization: Bearer`.
    #[serde(default)]
    pub token: Option<String>,
    /// Publisher API key (eventgate), sent as `Authorization: Bearer`.
    #[serde(default)]
    pub publisher_key: Option<String>,
}

impl Target {
    /// Channel names used by the generator.
    pub fn channel(prefix: &str, index: usize) -> String {
        format!("{prefix}-{index}")
    }

    /// Path a subscriber requests, for SSE or for the WebSocket handshake.
    pub fn subscribe_path(&self, transport: Transport, channel: &str) -> String {
        match (self.kind, transport) {
            (Kind::Eventgate, Transport::Sse) => format!("/v1/events?channel={channel}"),
            (Kind::Eventgate, Transport::Ws) => "/v1/ws".to_owned(),
            (Kind::Nchan, _) => format!("/sub/{channel}"),
        }
    }

    /// Path and body of a publish of `payloads` on `channel` (nchan takes one at a time).
    pub fn publish_request(&self, channel: &str, payloads: &[String]) -> (String, String) {
        match self.kind {
            Kind::Eventgate if payloads.len() == 1 => (
                "/v1/publish".to_owned(),
                format!(r#"{{"channel":"{channel}","data":{}}}"#, payloads[0]),
            ),
            Kind::Eventgate => {
                let events: Vec<String> = payloads
                    .iter()
                    .map(|p| format!(r#"{{"channel":"{channel}","data":{p}}}"#))
                    .collect();
                (
                    "/v1/publish".to_owned(),
                    format!(r#"{{"events":[{}]}}"#, events.join(",")),
                )
            }
            Kind::Nchan => (format!("/pub/{channel}"), payloads.concat()),
        }
    }
}

/// The payload every scenario publishes: a per-channel sequence number, the publish time in
/// microseconds since the epoch, and padding to the requested size.
pub fn payload(n: u64, at_micros: u64, size: usize) -> String {
    let mut text = format!(r#"{{"n":{n},"t":{at_micros},"p":""#);
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// Reads `n` and `t` back from a message that contains the payload (an eventgate envelope or
/// nchan's raw body). Searching beats parsing JSON here: it runs once per delivery.
pub fn read_payload(text: &[u8]) -> Option<(u64, u64)> {
    Some((
        number_after(text, br#""n":"#)?,
        number_after(text, br#""t":"#)?,
    ))
}

fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&text[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_inside_an_envelope() {
        let p = payload(42, 1_795_000_000_000_000, 100);
        assert_eq!(p.len(), 100);
        let envelope = format!(r#"{{"id":"9","channel":"c","data":{p},"timestamp":"t"}}"#);
        assert_eq!(
            read_payload(envelope.as_bytes()),
            Some((42, 1_795_000_000_000_000))
        );
        assert_eq!(read_payload(b"{}"), None);
    }

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert!(Base::parse("http://127.0.0.1:8080").is_ok());
        assert!(Base::parse("http://10.0.0.1:8080").is_err());
        assert!(Base::parse("https://127.0.0.1:8080").is_err());
    }
}
