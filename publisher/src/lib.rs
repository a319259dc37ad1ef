//! The eventgate publisher: the HTTP API backends call to publish events. It validates a whole
//! request, then appends every event to its channel's history and publishes it live in one
//! atomic broker call, so a request is published completely or not at all.

pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
mod native;
pub mod publish;

use std::{io, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{Method, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use eventgate_core::{
    Broker,
    redact::{log_response, traced_request_span},
};
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    timeout::RequestBodyTimeoutLayer,
    trace::TraceLayer,
};

pub use auth::PublisherAuth;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::PublisherConfig;

use crate::error::ApiError;

/// What publisher handlers need.
pub struct PublisherState {
    pub config: PublisherConfig,
    pub broker: Broker,
    pub auth: PublisherAuth,
    pub limits: auth::PublisherLimits,
    pub metrics: metrics::PublisherMetrics,
    pub shutdown: CancellationToken,
}

/// The publisher's routes: the API needs a key, health checks do not.
pub fn app(state: Arc<PublisherState>) -> Router {
    let body_limit = state.config.max_body_bytes as usize;
    let mut publish = Router::new()
        .route("/v1/publish", post(publish::publish))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    if let Some(port) = state.config.console_port {
        // The 405 answer goes inside the CORS layer, so a preflight (OPTIONS) reaches it; and
        // outside the key check, since a preflight carries no key.
        publish = publish
            .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
            .layer(console_cors(port));
    }
    let api = Router::new()
        .route("/v1/tokens", post(auth::mint))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .merge(publish);
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // A body that trickles in fails the read (answered 408) instead of holding the socket.
        .layer(RequestBodyTimeoutLayer::new(
            state.config.request_body_timeout,
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

/// Lets the standalone console (served by the gateway on `port`, same host) call
/// `/v1/publish` from the browser.
fn console_cors(port: u16) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, request| {
            let host = request
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<axum::http::uri::Authority>().ok());
            console_origin(origin.to_str().unwrap_or(""), host.as_ref(), port)
        }))
        .allow_methods([Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, IDEMPOTENCY_KEY])
        .max_age(Duration::from_secs(600))
}

const IDEMPOTENCY_KEY: header::HeaderName = header::HeaderName::from_static("idempotency-key");

/// `origin` is `http(s)://<the host the publisher was reached by>:<port>`.
fn console_origin(origin: &str, host: Option<&axum::http::uri::Authority>, port: u16) -> bool {
    let (Ok(origin), Some(host)) = (origin.parse::<axum::http::Uri>(), host) else {
        return false;
    };
    matches!(origin.scheme_str(), Some("http" | "https"))
        && origin.path() == "/"
        && origin.host() == Some(host.host())
        // A browser leaves a scheme's default port out of `Origin`.
        && origin.port_u16().or(match origin.scheme_str() {
            Some("https") => Some(443),
            _ => Some(80),
        }) == Some(port)
}

/// Runs the publisher on `listener` until `shutdown` is cancelled; in-flight requests finish
/// within `DRAIN_TIMEOUT` of it (after `DRAIN_GRACE`, during which new requests get 503).
pub async fn run(
    config: PublisherConfig,
    broker: Broker,
    auth: PublisherAuth,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let grace = config.shutdown_timeout.saturating_sub(config.drain_grace);
    let drain_grace = config.drain_grace;
    let state = Arc::new(PublisherState {
        limits: auth::PublisherLimits::new(&config),
        metrics: metrics::PublisherMetrics::default(),
        config,
        broker,
        auth,
        shutdown: shutdown.clone(),
    });
    tokio::spawn(eventgate_core::limits::clean_periodically(
        state.limits.all(),
        Duration::from_secs(10),
        shutdown.clone().cancelled_owned(),
    ));
    let router = app(state.clone());
    // Each connection serves plain publishes itself and hands anything else to hyper and the
    // router (see `native`), which bounds how long a request head may take (slowloris).
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    // After SIGTERM: requests are refused with 503 (readiness too) while connections are still
    // taken for DRAIN_GRACE, so load balancers move on; then the listener closes.
    let stop = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_grace).await;
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = eventgate_core::serve::accept(&listener) => accepted,
        };
        let _ = stream.set_nodelay(true);
        let connection =
            native::connection(stream, peer, state.clone(), router.clone(), closing.clone());
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // In-flight requests finish; idle keep-alive connections close.
    closing.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(?grace, "requests still in flight at the shutdown deadline");
    }
    Ok(())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready while the broker answers and the publisher is not shutting down.
/// Ready while at least one shard answers: publishes to the others' channels still work (a
/// shard that is down answers 503 for its channels only). The body says which shards are up.
async fn readyz(State(state): State<Arc<PublisherState>>) -> Response {
    let count = state.broker.shards().count();
    let shards: Vec<bool> =
        futures::future::join_all((0..count).map(|shard| state.broker.ping_shard(shard)))
            .await
            .into_iter()
            .map(|r| r.is_ok())
            .collect();
    let reason = if state.shutdown.is_cancelled() {
        Some("shutting_down")
    } else if !shards.iter().any(|r| *r) {
        Some("broker_unavailable")
    } else {
        None
    };
    let mut body = match reason {
        None if shards.iter().all(|r| *r) => json!({"status": "ready"}),
        None => json!({"status": "degraded"}),
        Some(reason) => json!({"status": "not_ready", "reason": reason}),
    };
    if count > 1 {
        body["shards"] = shards
            .iter()
            .enumerate()
            .map(|(shard, ready)| json!({"shard": shard, "ready": ready}))
            .collect();
    }
    let status = if reason.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_consoles_origin_may_publish_from_a_browser() {
        let host = |h: &str| h.parse::<axum::http::uri::Authority>().ok();
        let on = |origin: &str, h: &str| console_origin(origin, host(h).as_ref(), 8080);
        assert!(on("http://127.0.0.1:8080", "127.0.0.1:8081"));
        assert!(on("http://localhost:8080", "localhost:8081"));
        assert!(on("https://box.lan:8080", "box.lan:8081"));
        assert!(on("http://[::1]:8080", "[::1]:8081"));
        // Another port, another host, or a page that is not the console's origin.
        assert!(!on("http://127.0.0.1:3000", "127.0.0.1:8081"));
        assert!(!on("http://evil.example:8080", "127.0.0.1:8081"));
        assert!(!on("http://localhost:8080", "127.0.0.1:8081"));
        assert!(!on("http://127.0.0.1", "127.0.0.1:8081"));
        assert!(!on("null", "127.0.0.1:8081"));
        assert!(!on("file://127.0.0.1:8080", "127.0.0.1:8081"));
        assert!(!console_origin("http://127.0.0.1:8080", None, 8080));
        // A gateway on a scheme's default port: the browser sends no port.
        let on_port =
            |origin: &str, port| console_origin(origin, host("box.lan:8081").as_ref(), port);
        assert!(on_port("http://box.lan", 80));
        assert!(on_port("https://box.lan", 443));
        assert!(!on_port("http://box.lan", 443));
        assert!(!on_port("http://box.lan", 8080));
    }
}
