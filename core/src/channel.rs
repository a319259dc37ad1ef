//! Channel names: the one rule both services enforce.

use std::{fmt, sync::Arc};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;

/// A validated channel name.
///
/// The rule: 1 to 200 bytes of ASCII letters, digits and `_ - . : @ /`. That admits
/// `orders`, `invoice:123`, `user:alice@example.com` and 56-character Stellar account ids,
/// and keeps out what would break somewhere downstream: whitespace and control characters
/// (SSE lines, logs), `*` (reserved for channel patterns in tokens), `{}` (Redis Cluster
/// hash tags), `,` and `+`/`%` (ambiguous in query strings).
///
/// Cloning is a reference-count increment: the hub hands channel names to every frame.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes; the limit is {MAX_CHANNEL_BYTES}")]
    TooLong(usize),
    #[error("channel name contains {0:?}; allowed are ASCII letters, digits and _ - . : @ /")]
    BadChar(char),
}

impl Channel {
    /// Validates `name` against the channel rule.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_BYTES {
            return Err(ChannelError::TooLong(name.len()));
        }
        if let Some(bad) = name.chars().find(|c| !is_channel_char(*c)) {
            return Err(ChannelError::BadChar(bad));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '/')
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_names_users_rely_on() {
        for name in [
            "orders",
            "invoice:123",
            "user:alice@example.com",
            "stream:42",
            "order_changes",
            "GABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRSTUVW",
            "tenant/7/orders.v2-eu",
        ] {
            assert!(Channel::parse(name).is_ok(), "{name} should be a channel");
        }
        assert_eq!(
            Channel::parse("GABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRSTUVW")
                .unwrap()
                .as_str()
                .len(),
            56
        );
        assert!(Channel::parse(&"a".repeat(200)).is_ok());
    }

    #[test]
    fn refuses_names_that_break_transports_or_patterns() {
        assert_eq!(Channel::parse(""), Err(ChannelError::Empty));
        assert_eq!(
            Channel::parse(&"a".repeat(201)),
            Err(ChannelError::TooLong(201))
        );
        for (name, bad) in [
            ("a b", ' '),
            ("a\nb", '\n'),
            ("orders*", '*'),
            ("{orders}", '{'),
            ("a,b", ','),
            ("a+b", '+'),
            ("café", 'é'),
        ] {
            assert_eq!(
                Channel::parse(name),
                Err(ChannelError::BadChar(bad)),
                "{name:?}"
            );
        }
    }
}
