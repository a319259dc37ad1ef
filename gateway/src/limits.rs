//! Admission: rate limits on new connections and tickets, and caps on connections held per
//! client IP, per user and per replica. A connection holds a [`Slot`] for its whole life; the
//! slot gives its place back when dropped.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use axum::{
    extract::ConnectInfo,
    http::{Request, Response},
};
use eventgate_core::limits::{Cleanup, Limiter, RetryAfter, TrustedProxies};
use governor::middleware::NoOpMiddleware;
use tower_governor::{GovernorError, key_extractor::KeyExtractor};

use crate::{config::GatewayConfig, error::ApiError};

/// Why a connection or request was refused, for `/v1/stats`.
#[derive(Default)]
pub struct Refusals {
    pub connect_rate: AtomicU64,
    pub tickets_rate: AtomicU64,
    pub ws_message_rate: AtomicU64,
    pub per_ip_cap: AtomicU64,
    pub per_user_cap: AtomicU64,
    pub replica_cap: AtomicU64,
}

/// The replica's admission state.
pub struct Admission {
    pub trusted: TrustedProxies,
    connect: Arc<Limiter<IpAddr>>,
    max_total: usize,
    max_per_ip: u32,
    max_per_user: u32,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    per_user: Mutex<HashMap<Arc<str>, u32>>,
    pub refused: Refusals,
}

impl Admission {
    pub fn new(config: &GatewayConfig) -> Self {
        Self {
            trusted: config.trusted_proxies.clone(),
            connect: Arc::new(Limiter::new(config.rate_limit_connect)),
            max_total: config.max_connections_or_default(),
            max_per_ip: config.max_connections_per_ip,
            max_per_user: config.max_connections_per_user,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_user: Mutex::new(HashMap::new()),
            refused: Refusals::default(),
        }
    }

    /// Limiters whose stale keys the replica drops periodically.
    pub fn limiters(&self) -> Vec<Arc<dyn Cleanup>> {
        vec![self.connect.clone()]
    }

    /// Keys the connect limiter remembers (bounded by cleanup).
    pub fn rate_limit_keys(&self) -> usize {
        self.connect.len()
    }

    /// Streams held now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether the replica holds `MAX_CONNECTIONS` streams (`/readyz` says not ready).
    pub fn is_full(&self) -> bool {
        self.open() >= self.max_total
    }

    /// A new stream from `ip`: refused over the replica cap (503, the load balancer should
    /// try another replica), over the connect rate or the per-IP cap (429).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, ApiError> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            count(&self.refused.replica_cap);
            return Err(ApiError::OverCapacity);
        }
        // From here on the slot gives back what it took, whatever is refused next.
        let mut slot = Slot {
            admission: self.clone(),
            ip: None,
            user: None,
        };
        if let Err(retry) = self.connect.check(&ip) {
            count(&self.refused.connect_rate);
            return Err(ApiError::RateLimited {
                limit: "connect",
                retry,
            });
        }
        {
            let mut per_ip = lock(&self.per_ip);
            let held = per_ip.entry(ip).or_insert(0);
            if self.max_per_ip != 0 && *held >= self.max_per_ip {
                let limit = self.max_per_ip;
                if *held == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                count(&self.refused.per_ip_cap);
                return Err(ApiError::TooManyConnections { per: "IP", limit });
            }
            *held += 1;
        }
        slot.ip = Some(ip);
        Ok(slot)
    }

    fn release(&self, ip: Option<IpAddr>, user: Option<&Arc<str>>) {
        if let Some(ip) = ip {
            decrement(&mut lock(&self.per_ip), &ip);
        }
        if let Some(user) = user {
            decrement(&mut lock(&self.per_user), user);
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A held place for one stream.
pub struct Slot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
    user: Option<Arc<str>>,
}

impl Slot {
    /// Counts the stream against its user, once authenticated (`MAX_CONNECTIONS_PER_USER`).
    pub fn add_user(&mut self, sub: &str) -> Result<(), ApiError> {
        let admission = &self.admission;
        if self.user.is_some() {
            return Ok(());
        }
        let mut per_user = lock(&admission.per_user);
        let limit = admission.max_per_user;
        match per_user.get_mut(sub) {
            Some(held) if limit != 0 && *held >= limit => {
                drop(per_user);
                count(&admission.refused.per_user_cap);
                return Err(ApiError::TooManyConnections { per: "user", limit });
            }
            Some(held) => {
                *held += 1;
                // Share the map's key: one copy of a user's id however many tabs they open.
                let key = per_user.get_key_value(sub).map(|(k, _)| k.clone());
                self.user = key;
            }
            None => {
                let key: Arc<str> = Arc::from(sub);
                per_user.insert(key.clone(), 1);
                self.user = Some(key);
            }
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(self.ip, self.user.as_ref());
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("ip", &self.ip).finish()
    }
}

fn decrement<K: std::hash::Hash + Eq + ?Sized, Q: std::borrow::Borrow<K> + std::hash::Hash + Eq>(
    map: &mut HashMap<Q, u32>,
    key: &K,
) {
    if let Some(held) = map.get_mut(key) {
        *held = held.saturating_sub(1);
        if *held == 0 {
            map.remove(key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves only counters behind; keep counting.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The client key of a request that went through the router: the connection's peer (put into
/// the request by the server), resolved through `TRUSTED_PROXIES`, IPv6 cut to its network.
pub fn client_key<B>(trusted: &TrustedProxies, request: &Request<B>) -> Option<IpAddr> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()?
        .0
        .ip();
    Some(trusted.client_key(peer, request.headers()))
}

/// The limiter inside a `tower_governor` layer, for the periodic cleanup.
pub struct SharedGovernor(pub tower_governor::governor::SharedRateLimiter<IpAddr, NoOpMiddleware>);

impl Cleanup for SharedGovernor {
    fn cleanup(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

/// `tower_governor` key: the client IP behind trusted proxies.
#[derive(Clone)]
pub struct ClientIpKey(pub Arc<TrustedProxies>);

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;

    fn extract<T>(&self, request: &Request<T>) -> Result<IpAddr, GovernorError> {
        client_key(&self.0, request).ok_or(GovernorError::UnableToExtractKey)
    }
}

/// Renders `tower_governor` refusals like every other error of the gateway.
pub fn governor_error(
    limit: &'static str,
) -> impl Fn(GovernorError) -> Response<axum::body::Body> + Clone {
    move |error| {
        use axum::response::IntoResponse;
        match error {
            GovernorError::TooManyRequests { wait_time, .. } => ApiError::RateLimited {
                limit,
                // Whole seconds, rounded down by the layer: one more is never too early.
                retry: RetryAfter(std::time::Duration::from_secs(wait_time + 1)),
            }
            .into_response(),
            GovernorError::UnableToExtractKey => {
                ApiError::Internal("no peer address on the request".into()).into_response()
            }
            GovernorError::Other { code, msg, .. } => {
                ApiError::Internal(format!("{code}: {}", msg.unwrap_or_default())).into_response()
            }
        }
    }
}
