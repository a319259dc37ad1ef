//! Command connections: a few multiplexed connections to the primary, round-robin, replaced when
//! the Sentinels name another primary.

use std::{
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{
    ConnectionAddr, ErrorKind, RedisError, ServerErrorKind,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::time::Instant;

use super::source::Source;
use crate::BrokerError;

/// The connections to one primary.
struct Pool {
    addr: ConnectionAddr,
    client: redis::Client,
    connections: Vec<Slot>,
}

/// One of the pool's connections, replaced when it stops answering.
struct Slot {
    connection: Mutex<ConnectionManager>,
    /// A replacement is being connected; the old connection is not used meanwhile.
    replacing: AtomicBool,
}

impl Pool {
    /// The next connection to use, passing over those being replaced (unless all are).
    fn pick(&self, next: &AtomicUsize) -> usize {
        let n = self.connections.len();
        let mut i = next.fetch_add(1, Ordering::Relaxed) % n;
        for _ in 1..n {
            if !self.connections[i].replacing.load(Ordering::Relaxed) {
                break;
            }
            i = next.fetch_add(1, Ordering::Relaxed) % n;
        }
        i
    }

    fn connection(&self, i: usize) -> ConnectionManager {
        self.connections[i]
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connects a new connection in place of connection `i`, in the background. redis-rs
    /// reconnects only once a connection is known to be broken: one whose packets vanish (a
    /// host gone without a reset, a dropped NAT or conntrack entry) times out every command
    /// sent on it for as long as TCP retransmits, about 15 minutes by default.
    fn replace(self: &Arc<Self>, i: usize, settings: &ConnectionManagerConfig, timeout: Duration) {
        let slot = &self.connections[i];
        if slot.replacing.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let slot = &pool.connections[i];
            let connect = ConnectionManager::new_with_config(pool.client.clone(), settings);
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(fresh)) => {
                    tracing::warn!(redis = %pool.addr, "replaced a Redis connection that stopped answering");
                    *slot
                        .connection
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = fresh;
                }
                Ok(Err(e)) => {
                    tracing::warn!(redis = %pool.addr, error = %e, "replacing a Redis connection failed")
                }
                Err(_) => {
                    tracing::warn!(redis = %pool.addr, "replacing a Redis connection timed out")
                }
            }
            slot.replacing.store(false, Ordering::SeqCst);
        });
    }
}

/// Commands go over a few multiplexed connections, round-robin: concurrent requests share a
/// connection and are pipelined, and each connection reconnects by itself. (A checkout pool
/// such as deadpool-redis pings Redis on every checkout: a second round trip per publish,
/// which cost a third of publish throughput in BENCHMARKS.md.)
pub(super) struct Commands {
    source: Arc<Source>,
    settings: ConnectionManagerConfig,
    size: usize,
    pool: Mutex<Arc<Pool>>,
    next: AtomicUsize,
    timeout: Duration,
    /// One Sentinel lookup at a time, and when the last one ended.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
}

/// Least time between two Sentinel lookups: failing requests do not flood the Sentinels.
const REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// How often the Sentinels are asked whether the primary moved, when nothing failed.
const SENTINEL_POLL: Duration = Duration::from_secs(1);

impl Commands {
    /// Connects `size` connections to the primary.
    pub(super) async fn connect(
        source: Arc<Source>,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, BrokerError> {
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let size = size.max(1);
        let pool = open_pool(&source, &settings, size, timeout).await?;
        Ok(Self {
            source,
            settings,
            size,
            pool: Mutex::new(Arc::new(pool)),
            next: AtomicUsize::new(0),
            timeout,
            refreshing: tokio::sync::Mutex::new(None),
        })
    }

    /// How many connections there are (calls in flight at once, one per connection).
    pub(super) fn size(&self) -> usize {
        self.size
    }

    fn pool(&self) -> Arc<Pool> {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `op` on the next connection, bounded by `REDIS_TIMEOUT`. A connection that turns
    /// out dead (Redis restarted) reconnects by itself after its first failure, and a primary
    /// that is gone or demoted makes the Sentinels be asked again; the operation then moves on
    /// when that is safe: always for reads, and for writes only when Redis certainly did not
    /// run them. A write that fails otherwise is [`BrokerError::OutcomeUnknown`].
    pub(super) async fn with_conn<T, F, Fut>(&self, write: bool, op: F) -> Result<T, BrokerError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let timeout = self.timeout;
        // The connection a command is waiting on, to be replaced if the time runs out.
        let current: Mutex<Option<(Arc<Pool>, usize)>> = Mutex::new(None);
        let work = async {
            let mut tried = 0;
            loop {
                let pool = self.pool();
                let i = pool.pick(&self.next);
                *current.lock().unwrap_or_else(PoisonError::into_inner) = Some((pool.clone(), i));
                let e = match op(pool.connection(i)).await {
                    Ok(value) => return Ok(value),
                    Err(e) => e,
                };
                // It answered (with an error): not the one to blame if the time runs out later.
                current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if e.is_timeout() {
                    pool.replace(i, &self.settings, timeout);
                }
                let moved = self.source.follows_failovers() && primary_may_have_moved(&e);
                if moved {
                    self.refresh(&pool).await;
                }
                // Each connection notices on its own that Redis restarted: try them all.
                let again = tried < self.size + 2
                    && (e.is_connection_dropped() || moved)
                    && (!write || never_ran(&e));
                if !again {
                    return Err(e);
                }
                tried += 1;
                if moved {
                    // The Sentinels may not have promoted anyone yet.
                    tokio::time::sleep(REFRESH_INTERVAL / 2).await;
                }
            }
        };
        let result = tokio::time::timeout(timeout, work).await;
        if result.is_err()
            && let Some((pool, i)) = current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            pool.replace(i, &self.settings, timeout);
        }
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if write && !never_ran(&e) => {
                Err(BrokerError::OutcomeUnknown(Box::new(e.into())))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) if write => Err(BrokerError::OutcomeUnknown(Box::new(BrokerError::Timeout(
                timeout,
            )))),
            Err(_) => Err(BrokerError::Timeout(timeout)),
        }
    }

    /// With Sentinels: asks them every second whether the primary moved, and follows it. A
    /// demoted primary keeps accepting writes until Sentinel reconfigures it (seconds after a
    /// `SENTINEL FAILOVER`), writes that are then lost: waiting for a failing command would
    /// publish into that window.
    pub(super) async fn follow_primary(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SENTINEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pool = self.pool();
            self.refresh(&pool).await;
        }
    }

    /// Asks the Sentinels for the primary and, when it is not the one `seen` connects to,
    /// replaces the connections. Lookups are serialized and spaced.
    async fn refresh(&self, seen: &Arc<Pool>) {
        let mut last = self.refreshing.lock().await;
        if !Arc::ptr_eq(seen, &self.pool()) {
            return; // Someone else replaced the pool meanwhile.
        }
        if let Some(at) = *last {
            let wait = REFRESH_INTERVAL.saturating_sub(at.elapsed());
            tokio::time::sleep(wait).await;
        }
        let found = self.source.locate(self.timeout, true).await;
        *last = Some(Instant::now());
        let client = match found {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "finding the primary failed");
                return;
            }
        };
        if client.get_connection_info().addr() == &seen.addr {
            return;
        }
        match open_pool_with(client, &self.settings, self.size, self.timeout).await {
            Ok(pool) => {
                tracing::warn!(from = %seen.addr, to = %pool.addr, "following the Redis primary");
                *self.pool.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(pool);
            }
            Err(e) => tracing::warn!(error = %e, "connecting to the new Redis primary failed"),
        }
    }
}

async fn open_pool(
    source: &Source,
    settings: &ConnectionManagerConfig,
    size: usize,
    timeout: Duration,
) -> Result<Pool, BrokerError> {
    let client = source.primary(timeout).await?;
    open_pool_with(client, settings, size, timeout).await
}

async fn open_pool_with(
    client: redis::Client,
    settings: &ConnectionManagerConfig,
    size: usize,
    timeout: Duration,
) -> Result<Pool, BrokerError> {
    let addr = client.get_connection_info().addr().clone();
    let mut connections = Vec::with_capacity(size);
    for _ in 0..size {
        let connect = ConnectionManager::new_with_config(client.clone(), settings.clone());
        let connection = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| BrokerError::Timeout(timeout))?
            .map_err(|e| match super::tls::explain(&e) {
                Some(message) => BrokerError::Tls(message),
                None => e.into(),
            })?;
        connections.push(Slot {
            connection: Mutex::new(connection),
            replacing: AtomicBool::new(false),
        });
    }
    Ok(Pool {
        addr,
        client,
        connections,
    })
}

/// Whether a failure suggests the primary is gone or is no longer the primary.
fn primary_may_have_moved(error: &RedisError) -> bool {
    error.is_connection_dropped()
        || error.is_io_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
            )
        )
}

/// Whether a failed command certainly did not run: it never reached Redis (the connection was
/// refused, or writing hit a closed socket), or Redis refused it before running it (a replica,
/// loading, out of memory, unable to persist, ...). Such a write may be retried and its
/// client told nothing happened. redis-rs keeps the `io::Error` behind an `Arc<dyn Error>` and
/// exposes only refusals, so a broken pipe is recognised by its message.
pub(super) fn never_ran(error: &RedisError) -> bool {
    if error.is_connection_refusal()
        || error
            .to_string()
            .to_ascii_lowercase()
            .contains("broken pipe")
    {
        return true;
    }
    matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::CrossSlot
                | ServerErrorKind::NoPerm
        ) | ErrorKind::AuthenticationFailed
    ) || matches!(
        error.code(),
        Some("OOM" | "BUSY" | "MISCONF" | "NOREPLICAS" | "NOAUTH" | "WRONGPASS")
    )
}
