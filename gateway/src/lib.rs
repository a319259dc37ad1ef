//! The eventgate gateway: stateless replicas that push events to browsers over Server-Sent
//! Events, with exact `Last-Event-ID` resume from the broker's history.
//!
//! - [`hub`]: local fan-out, one bounded queue per client;
//! - [`live`]: the replica's one live connection to the broker, with backfill on reconnect;
//! - [`session`]: opening a subscription in the order that makes resume exact;
//! - [`sse`]: the `/v1/events` endpoint;
//! - [`ws`]: the `/v1/ws` endpoint;
//! - [`console`]: the live console page (`CONSOLE=true`).

pub mod auth;
pub mod config;
pub mod console;
pub mod error;
pub mod frame;
pub mod hub;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod replay;
pub mod server;
pub mod session;
pub mod sse;
pub mod ws;

use std::{
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderName, Method, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use eventgate_core::{
    Broker,
    auth::Verifier,
    redact::{log_response, traced_request_span},
};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    trace::TraceLayer,
};

pub use config::GatewayConfig;

use crate::{
    error::ApiError,
    hub::{Hub, Stats},
    live::{LiveHandle, LiveSettings},
};

/// Everything a gateway request handler needs.
pub struct GatewayState {
    pub config: GatewayConfig,
    pub replica: String,
    pub broker: Broker,
    pub hub: Arc<Hub>,
    pub live: LiveHandle,
    /// History pages shared by every replay of this replica.
    pub history: Arc<replay::HistoryCache>,
    pub stats: Arc<Stats>,
    /// Cancelled when the replica is asked to stop (SIGTERM): readiness turns false at once,
    /// everything else goes on for `DRAIN_GRACE` so load balancers notice first.
    pub draining: CancellationToken,
    /// Cancelled `DRAIN_GRACE` later: streams end, new ones are refused.
    pub shutdown: CancellationToken,
    /// How long a request waits for the broker before answering 503.
    pub broker_timeout: Duration,
    /// Verifies subscribers.
    pub auth: auth::Authenticator,
    /// Rate limits and connection caps.
    pub admission: Arc<limits::Admission>,
    /// Each shard's position, read once for the clients starting together.
    pub positions: Vec<session::PositionReads>,
}

/// A started gateway: its state and the background tasks it owns.
pub struct Gateway {
    pub state: Arc<GatewayState>,
    tasks: JoinSet<()>,
}

impl Gateway {
    /// Starts the hub and the live connection task. Nothing listens yet.
    pub fn start(
        config: GatewayConfig,
        broker: Broker,
        verifier: Verifier,
        draining: CancellationToken,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let replica = config
            .replica_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
        let stats = Arc::new(Stats::default());
        // One live task per shard, each with its own command queue.
        let (senders, commands): (Vec<_>, Vec<_>) = (0..broker.shards().count())
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let senders = live::LiveSenders::new(broker.shards().clone(), senders);
        let hub = Arc::new(Hub::new(
            config.client_queue_size as usize,
            senders.clone(),
            stats.clone(),
        ));
        let mut tasks = JoinSet::new();
        let history = Arc::new(replay::HistoryCache::new(
            broker.clone(),
            config.replay_page_size as usize,
            replay::ReplayBudget {
                replica_bytes: config.replay_memory_bytes as usize,
                connection_bytes: config.replay_connection_bytes as usize,
            },
            stats.clone(),
        ));
        tasks.spawn(sweep_history(history.clone(), shutdown.clone()));
        let live = live::spawn(
            hub.clone(),
            broker.clone(),
            commands,
            senders,
            LiveSettings {
                replica: replica.clone(),
                marker_interval: config.marker_interval(),
                history: history.clone(),
            },
            &mut tasks,
            shutdown.clone(),
        );
        tasks.spawn(drain(
            draining.clone(),
            shutdown.clone(),
            config.drain_grace,
        ));
        tasks.spawn(heartbeat_and_shutdown(
            hub.clone(),
            config.heartbeat_interval,
            shutdown.clone(),
        ));
        let auth = auth::Authenticator {
            verifier,
            cookie: config.auth_cookie.clone(),
            allow_query_token: config.allow_query_token,
            ticket_ttl: config.ticket_ttl,
        };
        let admission = Arc::new(limits::Admission::new(&config));
        tasks.spawn(eventgate_core::limits::clean_periodically(
            admission.limiters(),
            LIMITER_CLEANUP,
            shutdown.clone().cancelled_owned(),
        ));
        let state = Arc::new(GatewayState {
            positions: (0..broker.shards().count())
                .map(|shard| session::PositionReads::new(broker.clone(), shard))
                .collect(),
            admission,
            auth,
            broker_timeout: broker.timeout(),
            config,
            replica,
            broker,
            hub,
            live,
            history,
            stats,
            draining,
            shutdown,
        });
        Self { state, tasks }
    }

    /// Serves HTTP on `listener` until `DRAIN_GRACE` after the drain began, then ends every
    /// stream and returns once connections are closed, at the latest `DRAIN_TIMEOUT` after the
    /// drain began.
    pub async fn serve(mut self, listener: TcpListener) -> io::Result<()> {
        let config = &self.state.config;
        let grace = config.shutdown_timeout.saturating_sub(config.drain_grace);
        let app = app(self.state.clone());
        let result = server::serve(listener, self.state.clone(), app, grace).await;
        // Every stream has ended (or the deadline passed); stop the live connection last.
        self.state.hub.close_all(hub::CloseReason::Shutdown);
        self.tasks.shutdown().await;
        result
    }
}

/// Frees expired history pages every second, whether or not replays are running.
async fn sweep_history(history: Arc<replay::HistoryCache>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => history.sweep(),
        }
    }
}

/// One replica-wide timer instead of one per connection: every `HEARTBEAT_INTERVAL` each
/// client gets a heartbeat through its queue; on shutdown every queue is closed, which ends
/// SSE streams and closes WebSockets with 1001.
async fn heartbeat_and_shutdown(hub: Arc<Hub>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                hub.close_all(hub::CloseReason::Shutdown);
                return;
            }
            _ = tick.tick() => hub.broadcast(hub::Delivery::Heartbeat),
        }
    }
}

/// How often rate limiters forget clients whose allowance has refilled.
const LIMITER_CLEANUP: Duration = Duration::from_secs(10);

/// The drain: readiness is already false (`draining`); after `grace`, stop.
async fn drain(draining: CancellationToken, shutdown: CancellationToken, grace: Duration) {
    draining.cancelled().await;
    tracing::info!(
        ?grace,
        "draining: not ready; streams end after the grace period"
    );
    tokio::time::sleep(grace).await;
    shutdown.cancel();
}

/// Runs a gateway on `listener` until `shutdown` is cancelled (plus `DRAIN_GRACE`).
pub async fn run(
    config: GatewayConfig,
    broker: Broker,
    verifier: Verifier,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    Gateway::start(config, broker, verifier, shutdown)
        .serve(listener)
        .await
}

/// The gateway's routes. Browsers on `ALLOWED_ORIGINS` may call the events and tickets
/// endpoints cross-origin, with credentials.
pub fn app(state: Arc<GatewayState>) -> Router {
    // Each part gets its 405 answer before the CORS layer, so preflights (OPTIONS) reach it.
    let mut browser = Router::new()
        .route("/v1/events", get(sse::events))
        .route(
            "/v1/tickets",
            post(auth::tickets).layer(tickets_rate_limit(&state)),
        )
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    if let Some(origins) = state.config.allowed_origins.clone() {
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin, _| {
                auth::cors_allows(origin, Some(&origins))
            }))
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, LAST_EVENT_ID])
            .max_age(Duration::from_secs(600));
        browser = browser.layer(cors);
    }
    let registry = Arc::new(metrics::registry(&state));
    if state.config.console == Some(true) {
        browser = browser.merge(console::routes());
    }
    Router::new()
        .route("/v1/ws", get(ws::upgrade))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { metrics::render(&registry) }
            }),
        )
        .route("/v1/stats", get(stats))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .merge(browser)
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            check_uri_length,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let uri = request.uri().path_and_query().map_or("/", |p| p.as_str());
                    traced_request_span(request.method().as_str(), uri, request.headers())
                })
                .on_request(())
                .on_response(
                    |response: &Response, latency: Duration, _: &tracing::Span| {
                        log_response(response.status().as_u16(), latency)
                    },
                )
                .on_failure(()),
        )
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .with_state(state)
}

/// `RATE_LIMIT_TICKETS`, per client IP, through `tower_governor`. Its limiter joins the
/// replica's periodic cleanup.
fn tickets_rate_limit(
    state: &Arc<GatewayState>,
) -> tower::util::Either<
    tower_governor::GovernorLayer<
        limits::ClientIpKey,
        governor::middleware::NoOpMiddleware,
        axum::body::Body,
    >,
    tower::layer::util::Identity,
> {
    let Some((period, burst)) = state.config.rate_limit_tickets.cell() else {
        return tower::util::Either::Right(tower::layer::util::Identity::new());
    };
    let Some(config) = tower_governor::governor::GovernorConfigBuilder::default()
        .period(period)
        .burst_size(burst)
        .key_extractor(limits::ClientIpKey(Arc::new(
            state.config.trusted_proxies.clone(),
        )))
        .finish()
    else {
        return tower::util::Either::Right(tower::layer::util::Identity::new());
    };
    let limiter = config.limiter().clone();
    let cleanup = state.shutdown.clone();
    tokio::spawn(eventgate_core::limits::clean_periodically(
        vec![Arc::new(limits::SharedGovernor(limiter))],
        LIMITER_CLEANUP,
        cleanup.cancelled_owned(),
    ));
    let admission = state.admission.clone();
    tower::util::Either::Left(tower_governor::GovernorLayer::new(config).error_handler(
        move |error| {
            admission
                .refused
                .tickets_rate
                .fetch_add(1, Ordering::Relaxed);
            limits::governor_error("ticket")(error)
        },
    ))
}

/// `MAX_URL_BYTES` for requests after the first on a keep-alive connection (the server checks
/// every first request before routing).
async fn check_uri_length(
    State(state): State<Arc<GatewayState>>,
    request: Request,
    next: middleware::Next,
) -> Response {
    let max = state.config.max_url_bytes as usize;
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if length > max {
        return ApiError::UriTooLong(max).into_response();
    }
    next.run(request).await
}

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready while the live connection is up and caught up, and not shutting down.
/// Ready while at least one shard's live connection is: with several shards, one that is down
/// makes every replica equally unable to serve it, and taking them all out of the load balancer
/// would cut off the other shards' clients too. The body says which shards are up.
async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    let shards = state.live.shards_ready();
    let reason = if state.draining.is_cancelled() || state.shutdown.is_cancelled() {
        Some("shutting_down")
    } else if state.admission.is_full() {
        Some("at_capacity")
    } else if !shards.iter().any(|r| *r) {
        Some("broker_unavailable")
    } else {
        None
    };
    readiness(reason, &shards)
}

/// A `/readyz` answer, with each shard's state when there are several.
pub(crate) fn readiness(reason: Option<&str>, shards: &[bool]) -> Response {
    let mut body = match reason {
        None if shards.iter().all(|r| *r) => json!({"status": "ready"}),
        None => json!({"status": "degraded"}),
        Some(reason) => json!({"status": "not_ready", "reason": reason}),
    };
    if shards.len() > 1 {
        body["shards"] = shard_states(shards);
    }
    let status = if reason.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

fn shard_states(shards: &[bool]) -> serde_json::Value {
    shards
        .iter()
        .enumerate()
        .map(|(shard, ready)| json!({"shard": shard, "ready": ready}))
        .collect()
}

async fn stats(State(state): State<Arc<GatewayState>>) -> Json<serde_json::Value> {
    let s = &state.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Json(json!({
        "replica": state.replica,
        "broker": state.broker.kind(),
        "ready": state.live.is_ready(),
        "shards": shard_states(&state.live.shards_ready()),
        "connections": get(&s.connections_sse) + get(&s.connections_ws),
        "connections_sse": get(&s.connections_sse),
        "connections_ws": get(&s.connections_ws),
        "connections_total": get(&s.connections_total),
        "channels": state.hub.channel_count(),
        "events_received": get(&s.events_received),
        "events_delivered": get(&s.events_delivered),
        "events_replayed": get(&s.events_replayed),
        "events_backfilled": get(&s.events_backfilled),
        "slow_clients_dropped": get(&s.slow_clients_dropped),
        "events_dropped": get(&s.events_dropped),
        "resets_sent": get(&s.resets_sent),
        "live_reconnects": get(&s.live_reconnects),
        "malformed_messages": get(&s.malformed_messages),
        "history_entries_skipped": get(&s.history_entries_skipped),
        "replay_cache_bytes": state.history.cached_bytes(),
        "rate_limit_keys": state.admission.rate_limit_keys(),
        "refused": {
            "connect_rate": get(&state.admission.refused.connect_rate),
            "tickets_rate": get(&state.admission.refused.tickets_rate),
            "ws_message_rate": get(&state.admission.refused.ws_message_rate),
            "per_ip_cap": get(&state.admission.refused.per_ip_cap),
            "per_user_cap": get(&state.admission.refused.per_user_cap),
            "replica_cap": get(&state.admission.refused.replica_cap),
        },
    }))
}
