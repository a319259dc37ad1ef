//! What both eventgate services share.
//!
//! - `broker`: where events are stored and how they travel: per-channel history and live
//!   delivery behind one trait, in memory or on Redis (`broker/redis`), over logical shards,
//!   with the cursors that resume them;
//! - `channel`, `event`: channel names and the event envelope;
//! - `auth`: subscriber tokens, publisher-side minting, tickets;
//! - `limits`: who the client is behind proxies, and rate limiters;
//! - `telemetry`, `redact`: traces, and log lines without credentials;
//! - `config`, `serve`: broker settings, and the accept loop's shared pieces.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod event;
pub mod limits;
pub mod redact;
pub mod serve;
pub mod telemetry;

pub use broker::{
    Backend, Broker, LiveControl, LiveMessage, LiveSink, LiveStream, Shards,
    cursor::{Cursor, CursorError},
    error::BrokerError,
    history::{self, ChannelPage, GapReason, HistoryRead, Position, Removed, StreamFacts},
};
pub use channel::{Channel, ChannelError};
pub use config::BrokerConfig;
pub use event::{Accepted, Event, Outgoing};
