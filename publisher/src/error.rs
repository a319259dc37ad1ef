//! The publisher's HTTP errors: one type, one place that renders `{"error":{"code","message"}}`.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use eventgate_core::{BrokerError, limits::RetryAfter};
use serde_json::json;

/// An error answered to a publishing backend. Nothing of a request that fails is published,
/// except that after [`ApiError::OutcomeUnknown`] it may have been, entirely.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `code` is stable and documented.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The body or an event is over a size limit.
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    #[error("send the request as JSON with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("no route for this path")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No valid API key (401).
    #[error("{message}")]
    Unauthorized {
        code: &'static str,
        message: &'static str,
    },
    /// The key may not publish on (or grant) a channel (403).
    #[error("{0}")]
    Forbidden(String),
    /// `POST /v1/tokens` without a signing key.
    #[error("minting tokens needs JWT_SECRET or JWT_PRIVATE_KEY_FILE on the publisher")]
    MintingDisabled,
    /// A bug; the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
    /// A rate limit refused the request (429); nothing was published.
    #[error("too many requests {per}; nothing was published, retry after {} s", retry.seconds())]
    RateLimited {
        per: &'static str,
        retry: RetryAfter,
    },
    /// The body did not arrive within `REQUEST_BODY_TIMEOUT`.
    #[error("the request body did not arrive in time; nothing was published")]
    BodyTimeout,
    /// The publisher is draining (SIGTERM); nothing was published, retry (another replica).
    #[error("the publisher is shutting down; nothing was published, retry")]
    ShuttingDown,
    /// Redis is unreachable or refused the write before running it; nothing was published,
    /// retry.
    #[error("event broker unavailable; nothing was published, retry")]
    Unavailable(#[source] BrokerError),
    /// The write failed after it may have reached Redis (a timeout, a connection lost
    /// mid-call): it may or may not have been published.
    #[error(
        "event broker failed during the publish; it may or may not have been published: retry \
         with the same Idempotency-Key (a retry without one may publish twice)"
    )]
    OutcomeUnknown(#[source] BrokerError),
    /// A request over several shards that some shards applied: `published` names what was
    /// published (it stays published), `failed` the entries that were not (or may not have
    /// been).
    #[error(
        "some events were published and some were not (a shard of the broker failed); retry \
         with the same Idempotency-Key, or resend only the entries under `failed`"
    )]
    PartiallyPublished {
        published: Vec<serde_json::Value>,
        failed: Vec<serde_json::Value>,
        #[source]
        cause: BrokerError,
    },
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::OutcomeUnknown(_) => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
            ApiError::PartiallyPublished { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "partially_published")
            }
            ApiError::Unauthorized { code, .. } => (StatusCode::UNAUTHORIZED, code),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::MintingDisabled => (StatusCode::NOT_IMPLEMENTED, "minting_disabled"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        if e.outcome_unknown() {
            ApiError::OutcomeUnknown(e)
        } else {
            ApiError::Unavailable(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "publish failed: broker unavailable")
            }
            ApiError::OutcomeUnknown(cause) => {
                tracing::warn!(error = %cause, "publish failed after it may have been applied")
            }
            ApiError::PartiallyPublished { cause, .. } => {
                tracing::warn!(error = %cause, "publish failed on some shards")
            }
            ApiError::Internal(cause) => tracing::error!(%cause, "answering 500"),
            _ => {}
        }
        let mut body = json!({"error": {"code": code, "message": self.to_string()}});
        if let ApiError::PartiallyPublished {
            published, failed, ..
        } = &self
        {
            body["published"] = json!(published);
            body["failed"] = json!(failed);
        }
        let body = Json(body);
        let retry_after = match &self {
            ApiError::RateLimited { retry, .. } => Some(retry.seconds()),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let mut response = (status, body).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"eventgate-publisher\""),
            );
        }
        response
    }
}
