//! The eventgate publisher: the HTTP API backends call to publish events. It validates a whole
//! request, then appends every event to its channel's history and publishes it live in one
//! atomic broker call, so a request is published completely or not at all.

pub mod auth;
pub mod config;
pub mod error;
pub mod publish;

use std::{io, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use eventgate_broker::{
    Broker,
    redact::{log_response, request_span},
};
use tower_http::{sensitive_headers::SetSensitiveRequestHeadersLayer, trace::TraceLayer};

pub use auth::PublisherAuth;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::PublisherConfig;

use crate::error::ApiError;

/// What publisher handlers need.
pub struct PublisherState {
    pub config: PublisherConfig,
    pub broker: Broker,
    pub auth: PublisherAuth,
    pub shutdown: CancellationToken,
}

/// The publisher's routes: the API needs a key, health checks do not.
pub fn app(state: Arc<PublisherState>) -> Router {
    let body_limit = state.config.max_body_bytes as usize;
    let api = Router::new()
        .route("/v1/publish", post(publish::publish))
        .route("/v1/tokens", post(auth::mint))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let uri = request.uri().path_and_query().map_or("/", |p| p.as_str());
                    request_span(request.method().as_str(), uri)
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

/// Runs the publisher on `listener` until `shutdown` is cancelled; in-flight requests finish
/// within `SHUTDOWN_TIMEOUT`.
pub async fn run(
    config: PublisherConfig,
    broker: Broker,
    auth: PublisherAuth,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let grace = config.shutdown_timeout;
    let state = Arc::new(PublisherState {
        config,
        broker,
        auth,
        shutdown: shutdown.clone(),
    });
    let server = axum::serve(listener, app(state).into_make_service())
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        result = server => result,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => Ok(()),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready while the broker answers and the publisher is not shutting down.
async fn readyz(State(state): State<Arc<PublisherState>>) -> Response {
    let reason = if state.shutdown.is_cancelled() {
        Some("shutting_down".to_owned())
    } else {
        state
            .broker
            .ping()
            .await
            .err()
            .map(|_| "broker_unavailable".to_owned())
    };
    match reason {
        None => Json(json!({"status": "ready"})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}
