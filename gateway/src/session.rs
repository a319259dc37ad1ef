//! Opening a client's subscription, the same way for every transport.
//!
//! The order is what makes resume exact (docs/resume.md): register in the hub first, so live
//! events start queueing; make sure the channels are subscribed on the live connection; only
//! then read the broker's position G. Every event up to G is in history, every event after G
//! arrives live, and the client's writer drops live events at or below what it already sent.

use std::sync::Arc;

use eventgate_broker::{Channel, Position, Replay, ReplayItem};

use crate::{
    GatewayState,
    error::ApiError,
    hub::{ClientQueue, Hub, Stats},
};

/// A client registered in the hub; dropping it unregisters the client.
pub struct Session {
    pub client: u64,
    pub queue: Arc<ClientQueue>,
    pub channels: Vec<Channel>,
    hub: Arc<Hub>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.unregister(self.client);
        self.hub
            .stats
            .connections_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a subscription starts.
pub enum Start {
    /// No cursor: from the current position.
    Fresh,
    /// The cursor is not a position of this broker: reset every channel, start fresh.
    Unknown,
    /// Replay history after the cursor; `first` is the replay's first item, read before the
    /// response starts so a broker failure is still a clean 503.
    Resume {
        cursor: u64,
        replay: Box<Replay>,
        first: Option<ReplayItem>,
    },
}

/// A subscription ready to stream.
pub struct Opening {
    pub session: Session,
    /// The broker's position when the subscription became live.
    pub position: u64,
    pub start: Start,
}

impl GatewayState {
    /// Registers a client for `channels` and prepares its start from `cursor`.
    pub async fn open(
        &self,
        channels: Vec<Channel>,
        cursor: Option<u64>,
    ) -> Result<Opening, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        let (client, queue) = self.hub.register(&channels);
        Stats::add(&self.stats.connections_open, 1);
        Stats::add(&self.stats.connections_total, 1);
        let session = Session {
            client,
            queue,
            channels,
            hub: self.hub.clone(),
        };
        self.live
            .ensure(session.channels.clone(), self.broker_timeout)
            .await
            .map_err(|_| ApiError::Unavailable(None))?;
        let Position {
            epoch,
            seq: position,
        } = self.broker.position().await?;
        let start = match cursor {
            None => Start::Fresh,
            // Ahead of the counter, or from before the counter's epoch began (a Redis that lost
            // its data, another deployment): nothing can be said about what it missed.
            Some(cursor) if cursor > position || cursor < epoch => Start::Unknown,
            Some(cursor) => {
                let mut replay = Replay::new(
                    self.broker.clone(),
                    session.channels.iter().cloned(),
                    cursor,
                    position,
                    self.config.replay_page_size as usize,
                );
                let first = replay.next().await?;
                Start::Resume {
                    cursor,
                    replay: Box::new(replay),
                    first,
                }
            }
        };
        Ok(Opening {
            session,
            position,
            start,
        })
    }
}
