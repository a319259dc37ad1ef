//! Command connections: a few multiplexed connections, round-robin.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use redis::aio::ConnectionManager;

use crate::BrokerError;

/// Commands go over a few multiplexed connections, round-robin: concurrent requests share a
/// connection and are pipelined, and each connection reconnects by itself. (A checkout pool
/// such as deadpool-redis pings Redis on every checkout: a second round trip per publish,
/// which cost a third of publish throughput in BENCHMARKS.md.)
pub(super) struct Commands {
    pub(super) connections: Vec<ConnectionManager>,
    pub(super) next: AtomicUsize,
    pub(super) timeout: Duration,
}

impl Commands {
    /// Runs `op` on the next connection, bounded by `REDIS_TIMEOUT`. A connection that turns
    /// out dead (Redis restarted) reconnects by itself after its first failure; the operation
    /// then moves to the next connection when that is safe: always for reads, and for writes
    /// only when the command certainly never reached Redis.
    pub(super) async fn with_conn<T, F, Fut>(&self, write: bool, op: F) -> Result<T, BrokerError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let timeout = self.timeout;
        let work = async {
            let mut tried = 0;
            loop {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
                match op(self.connections[i].clone()).await {
                    // Each connection notices on its own that Redis restarted: try them all.
                    Err(e)
                        if tried < self.connections.len()
                            && e.is_connection_dropped()
                            && (!write || never_sent(&e)) =>
                    {
                        tried += 1
                    }
                    result => return result.map_err(BrokerError::from),
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| BrokerError::Timeout(timeout))?
    }
}

/// Whether a failed command certainly never reached Redis (so a write may be retried): the
/// connection was refused, or writing hit a closed socket. redis-rs keeps the `io::Error`
/// behind an `Arc<dyn Error>` and exposes only refusals, so a broken pipe is recognised by its
/// message.
pub(super) fn never_sent(error: &redis::RedisError) -> bool {
    error.is_connection_refusal()
        || error
            .to_string()
            .to_ascii_lowercase()
            .contains("broken pipe")
}
