//! The gateway's HTTP errors: one type, one place that renders `{"error":{"code","message"}}`.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use eventgate_core::{BrokerError, Channel, auth::AuthError, limits::RetryAfter};
use serde_json::json;

/// The challenge sent with every 401 (RFC 6750).
pub const WWW_AUTHENTICATE: &str = "Bearer realm=\"eventgate\"";

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `code` is stable and documented.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("no route for this path")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Redis is unreachable or too slow; clients retry.
    #[error("event broker unavailable")]
    Unavailable(#[source] Option<BrokerError>),
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A WebSocket handshake that is not one (status from axum's rejection).
    #[error("{1}")]
    Handshake(StatusCode, String),
    #[error("origin {0:?} may not open WebSockets here (ALLOWED_ORIGINS)")]
    OriginNotAllowed(String),
    /// The client was disconnected (its queue overflowed) while the request was in flight.
    #[error("the connection was closed as too slow")]
    Gone,
    /// No usable credential (401).
    #[error("{0}")]
    Unauthorized(AuthError),
    /// The credential does not grant this channel (403).
    #[error("this token may not read channel {0}")]
    Forbidden(Channel),
    /// A rate limit refused this (429, with `Retry-After`).
    #[error("too many {limit} requests from this client; retry after {} s", retry.seconds())]
    RateLimited {
        limit: &'static str,
        retry: RetryAfter,
    },
    /// A cap on concurrent streams per IP or per user (429).
    #[error("this {per} already holds {limit} streams (the most allowed); close one first")]
    TooManyConnections { per: &'static str, limit: u32 },
    /// The replica holds `MAX_CONNECTIONS` streams (503): another replica can take this one.
    #[error("this replica is at capacity; retry, the load balancer will pick another")]
    OverCapacity,
    #[error("the request target is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("the request head is larger than {0} bytes or has too many headers")]
    HeadersTooLarge(usize),
    #[error("the request head did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// A bug or a broken store; the message is for logs, not secrets.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The stable error code, also used in WebSocket `error` messages.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::Gone => (StatusCode::SERVICE_UNAVAILABLE, "slow_consumer"),
            ApiError::Handshake(status, _) => (*status, "websocket_handshake"),
            ApiError::OriginNotAllowed(_) => (StatusCode::FORBIDDEN, "origin_not_allowed"),
            ApiError::Unauthorized(e) => (StatusCode::UNAUTHORIZED, e.code()),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::TooManyConnections { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_connections")
            }
            ApiError::OverCapacity => (StatusCode::SERVICE_UNAVAILABLE, "over_capacity"),
            ApiError::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            ApiError::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        }
    }
}

impl ApiError {
    /// Seconds for `Retry-After`, on refusals a client should retry later.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry, .. } => Some(retry.seconds()),
            // Nothing frees a held stream at a known time; a few seconds is a fair guess.
            ApiError::TooManyConnections { .. } => Some(5),
            _ if self.status_and_code().0 == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        ApiError::Unavailable(Some(e))
    }
}

impl ApiError {
    /// Status and JSON body, for any transport that writes its own response.
    pub fn render(&self) -> (StatusCode, String) {
        let (status, code) = self.status_and_code();
        match self {
            ApiError::Unavailable(Some(cause)) => tracing::warn!(error = %cause, "answering 503"),
            ApiError::Internal(cause) => tracing::error!(%cause, "answering 500"),
            _ => {}
        }
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        (status, body.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.render();
        let retry_after = self.retry_after();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE),
            );
        }
        response
    }
}
