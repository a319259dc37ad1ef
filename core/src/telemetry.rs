//! Traces: OpenTelemetry, exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the
//! standard `OTEL_*` variables apply: service name, sampler, headers, timeouts). W3C trace
//! context travels inside each event (a `traceparent` field after `timestamp` that is never
//! part of the envelope browsers get), so a delivery span joins the trace of its publish.
//!
//! Off by default and then free: the spans are at `debug` level, which only the OpenTelemetry
//! layer enables, and an event carries a `traceparent` only when its publish was sampled.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanExporter},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

/// The `traceparent` of `span`, when it is traced and sampled.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    Some(format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    ))
}

/// The trace and span ids of `span` in hex, for log lines, when it is traced.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the caller's trace, when the request carries `traceparent`.
pub fn continue_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
}

/// Makes `span` a child of the trace an event's `traceparent` names.
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent: Context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The tracer provider `OTEL_*` asks for: `None` when no OTLP endpoint is set. The exporter
/// speaks OTLP over HTTP (protobuf), batching spans off the request path.
pub fn provider_from_env(
    default_service: &str,
) -> Result<Option<SdkTracerProvider>, Box<dyn std::error::Error + Send + Sync>> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !configured || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v == "true") {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    Ok(Some(provider(exporter, default_service, true)))
}

/// A provider over `exporter`, with the sampler (`OTEL_TRACES_SAMPLER`) and resource
/// (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) from the environment; tests pass an
/// in-memory exporter and `batch = false`.
pub fn provider<E: SpanExporter + 'static>(
    exporter: E,
    default_service: &str,
    batch: bool,
) -> SdkTracerProvider {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(default_service.to_owned());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    let builder = if batch {
        builder.with_batch_exporter(exporter)
    } else {
        builder.with_simple_exporter(exporter)
    };
    builder.build()
}

/// The `tracing` layer that turns eventgate's spans into OpenTelemetry spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("eventgate"))
        .with_filter(Targets::new().with_target("eventgate", tracing::Level::DEBUG))
}

/// `,"traceparent":"00-…"` as the publisher appends it to a body (after `timestamp`).
const FIELD: &[u8] = br#","traceparent":""#;
/// `00-` + 32 + `-` + 16 + `-` + 2 hex digits.
const TRACEPARENT_LEN: usize = 55;

/// Appends `traceparent` as the body's last field.
pub fn with_traceparent(body: &[u8], traceparent: &str) -> bytes::Bytes {
    debug_assert!(body.ends_with(b"}"));
    let mut out = Vec::with_capacity(body.len() + FIELD.len() + traceparent.len() + 2);
    out.extend_from_slice(&body[..body.len() - 1]);
    out.extend_from_slice(FIELD);
    out.extend_from_slice(traceparent.as_bytes());
    out.extend_from_slice(b"\"}");
    out.into()
}

/// The `traceparent` a stored body carries, if any. (Browsers never see it: the envelope is
/// written from the body's known fields only.)
pub fn traceparent_in(body: &[u8]) -> Option<&str> {
    let tail = FIELD.len() + TRACEPARENT_LEN + 2;
    let start = body.len().checked_sub(tail)?;
    let (field, rest) = body[start..].split_at(FIELD.len());
    if field != FIELD || !rest.ends_with(b"\"}") {
        return None;
    }
    std::str::from_utf8(&rest[..TRACEPARENT_LEN]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_rides_at_the_end_of_a_body_and_comes_off_whole() {
        let body = bytes::Bytes::from_static(
            br#"{"data":{"a":1},"timestamp":"2026-11-28T10:00:00.000Z"}"#,
        );
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let carried = with_traceparent(&body, traceparent);
        assert!(carried.ends_with(
            br#","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#
        ));
        assert_eq!(traceparent_in(&carried), Some(traceparent));
        assert_eq!(traceparent_in(&body), None, "bodies without one");
        assert_eq!(traceparent_in(b"}"), None);
    }
}
