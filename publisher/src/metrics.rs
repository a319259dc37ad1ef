//! `GET /metrics` of the publisher, Prometheus text. Labels are the route template and the
//! status code: bounded sets.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use std::sync::Arc;

use eventgate_core::serve;

use crate::PublisherState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

/// The publisher's metrics.
pub struct PublisherMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Events accepted (one per channel per event).
    pub events_published: Counter,
    publish_latency: Histogram,
    /// Publishes that failed because Redis was unreachable or too slow.
    pub broker_errors: Counter,
}

impl PublisherMetrics {
    /// Counts a finished request by route template and status; times publishes.
    pub(crate) fn record(&self, route: &str, status: u16, started: Instant) {
        if route == "/v1/publish" {
            self.publish_latency
                .observe(started.elapsed().as_secs_f64());
        }
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
    }
}

impl Default for PublisherMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eventgate_publisher");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests, by route and status",
            requests.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "events_published",
            "Events published (one per channel per event)",
            events_published.clone(),
        );
        // 100 µs to about 3 s.
        let publish_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "publish_duration_seconds",
            "Time to answer POST /v1/publish",
            publish_latency.clone(),
        );
        let broker_errors = Counter::default();
        registry.register(
            "broker_errors",
            "Publishes refused because Redis was unreachable or too slow",
            broker_errors.clone(),
        );
        Self {
            registry,
            requests,
            events_published,
            publish_latency,
            broker_errors,
        }
    }
}

/// Middleware: counts every request by route and status; times publishes.
pub async fn track(
    State(state): State<Arc<PublisherState>>,
    request: Request,
    next: Next,
) -> Response {
    // The route template, never the raw path (unknown paths share one label).
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .record(&route, response.status().as_u16(), started);
    response
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<PublisherState>>) -> Response {
    match serve::encode_metrics(&state.metrics.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(serve::METRICS_CONTENT_TYPE),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            crate::error::ApiError::Internal(format!("encoding metrics: {e}")).into_response()
        }
    }
}
