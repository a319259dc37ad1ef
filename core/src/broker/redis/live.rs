//! A replica's one pub/sub connection.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, Stream, future::BoxFuture};
use redis::aio::{PubSubSink, PubSubStream};

use super::Keys;
use crate::{BrokerError, Channel, Event, LiveControl, LiveMessage, Position};

pub(super) async fn connect(
    client: &redis::Client,
    keys: Keys,
    replica: &str,
    timeout: Duration,
) -> Result<(RedisLiveSink, RedisLiveStream), BrokerError> {
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| BrokerError::Timeout(timeout))??;
    let (sink, stream) = pubsub.split();
    let marker = keys.marker(replica);
    let live_prefix = keys.live.clone();
    let sink = RedisLiveSink {
        sink,
        keys: std::sync::Arc::new(keys),
        timeout,
    };
    sink.command(true, vec![marker.clone()]).await?;
    let stream = RedisLiveStream {
        inner: stream,
        live_prefix,
        marker,
    };
    Ok((sink, stream))
}

/// Subscribes and unsubscribes channels; each call returns once Redis confirmed it.
#[derive(Clone)]
pub struct RedisLiveSink {
    sink: PubSubSink,
    keys: std::sync::Arc<Keys>,
    timeout: Duration,
}

impl LiveControl for RedisLiveSink {
    fn subscribe<'a>(&'a self, channels: &'a [Channel]) -> BoxFuture<'a, Result<(), BrokerError>> {
        let names = channels.iter().map(|c| self.keys.live(c)).collect();
        self.command(true, names).boxed()
    }

    fn unsubscribe<'a>(
        &'a self,
        channels: &'a [Channel],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let names = channels.iter().map(|c| self.keys.live(c)).collect();
        self.command(false, names).boxed()
    }
}

impl RedisLiveSink {
    async fn command(&self, subscribe: bool, names: Vec<String>) -> Result<(), BrokerError> {
        if names.is_empty() {
            return Ok(());
        }
        let timeout = self.timeout;
        // The sink is a handle to the connection's task: a clone sends on the same connection.
        let mut sink = self.sink.clone();
        let work = async {
            if subscribe {
                sink.subscribe(names).await
            } else {
                sink.unsubscribe(names).await
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| BrokerError::Timeout(timeout))?
            .map_err(BrokerError::from)
    }
}

/// Messages in the order Redis executed the publishes; ends when the connection drops.
pub struct RedisLiveStream {
    inner: PubSubStream,
    live_prefix: String,
    marker: String,
}

/// A live message: an event on `{live_prefix}{channel}` (`"<seq> <body>"`), or a marker on
/// `marker` (`"<counter> <epoch>"`).
pub(super) fn decode(msg: &redis::Msg, live_prefix: &str, marker: &str) -> LiveMessage {
    let name = msg.get_channel_name();
    let payload = msg.get_payload_bytes();
    if name == marker {
        // "counter epoch" (marker.lua).
        let position = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.split_once(' '))
            .and_then(|(seq, epoch)| Some((seq.parse().ok()?, epoch.parse().ok()?)));
        return match position {
            Some((seq, epoch)) => LiveMessage::Marker(Position { epoch, seq }),
            None => LiveMessage::Malformed(format!("marker payload {payload:?}")),
        };
    }
    let Some(channel) = name
        .strip_prefix(live_prefix)
        .and_then(|c| Channel::parse(c).ok())
    else {
        return LiveMessage::Malformed(format!("message on unexpected channel {name:?}"));
    };
    let Some(space) = payload.iter().position(|&b| b == b' ') else {
        return LiveMessage::Malformed(format!("message on {name:?} without a seq"));
    };
    let seq = std::str::from_utf8(&payload[..space])
        .ok()
        .and_then(|s| s.parse().ok());
    match seq {
        Some(seq) => LiveMessage::Event(Event {
            seq,
            channel,
            body: Bytes::copy_from_slice(&payload[space + 1..]),
        }),
        None => LiveMessage::Malformed(format!("message on {name:?} with a bad seq")),
    }
}

impl Stream for RedisLiveStream {
    type Item = LiveMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveMessage>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|msg| msg.map(|msg| decode(&msg, &self.live_prefix, &self.marker)))
    }
}
