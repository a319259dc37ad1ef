//! Keeping credentials out of logs.

use std::borrow::Cow;

/// Query parameters whose values are credentials.
const SECRET_PARAMS: [&str; 5] = ["token", "ticket", "access_token", "key", "api_key"];

/// `path?query` with the values of credential parameters (`token`, `ticket`, ...) replaced by
/// `REDACTED`, for log lines, and anything but visible ASCII percent-encoded (see
/// [`escape_for_log`]). Other parameters stay as they are.
pub fn redact_uri(uri: &str) -> Cow<'_, str> {
    match redact_query(uri) {
        Cow::Borrowed(uri) => escape_for_log(uri),
        Cow::Owned(uri) => Cow::Owned(escape_for_log(&uri).into_owned()),
    }
}

/// `text` with every byte outside visible ASCII percent-encoded: a request target in a log line
/// can hold no line break, control character or Unicode that changes how the line reads
/// (hyper refuses such targets; the gateway's own SSE path reads heads itself).
pub fn escape_for_log(text: &str) -> Cow<'_, str> {
    if text.bytes().all(|b| b.is_ascii_graphic()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for b in text.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

fn redact_query(uri: &str) -> Cow<'_, str> {
    let Some((path, query)) = uri.split_once('?') else {
        return Cow::Borrowed(uri);
    };
    let secret = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        let name = form_urlencoded::parse(name.as_bytes())
            .next()
            .map(|(n, _)| n.into_owned())
            .unwrap_or_default();
        SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s))
    };
    if !query.split('&').any(secret) {
        return Cow::Borrowed(uri);
    }
    let redacted: Vec<Cow<str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if secret(pair) => Cow::Owned(format!("{name}=REDACTED")),
            _ => Cow::Borrowed(pair),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", redacted.join("&")))
}

/// The span of one HTTP request: method and path, credentials redacted. Both services' request
/// logs use it, so a log line never carries a token or ticket from a URL.
pub fn request_span(method: &str, uri: &str) -> tracing::Span {
    tracing::info_span!(
        "request",
        method,
        uri = %redact_uri(uri),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    )
}

/// [`request_span`] joined to the caller's trace (`traceparent`), with its trace and span ids
/// recorded so JSON log lines inside it carry them.
pub fn traced_request_span(method: &str, uri: &str, headers: &http::HeaderMap) -> tracing::Span {
    let span = request_span(method, uri);
    if !span.is_disabled() {
        crate::telemetry::continue_from_headers(&span, headers);
        if let Some((trace_id, span_id)) = crate::telemetry::ids(&span) {
            span.record("trace_id", trace_id);
            span.record("span_id", span_id);
        }
    }
    span
}

/// Logs a finished request: refusals (4xx, 5xx) at `info`, the rest at `debug` (a publisher
/// answering tens of thousands of requests a second should not log each).
pub fn log_response(status: u16, latency: std::time::Duration) {
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if status >= 400 {
        tracing::info!(status, latency_ms, "request refused");
    } else {
        tracing::debug!(status, latency_ms, "request");
    }
}

#[cfg(test)]
mod tests {
    use super::redact_uri;

    #[test]
    fn credential_values_are_redacted_and_the_rest_kept() {
        assert_eq!(redact_uri("/v1/events?channel=a"), "/v1/events?channel=a");
        assert_eq!(
            redact_uri("/v1/events?channel=a&ticket=abc.def&token=eyJ"),
            "/v1/events?channel=a&ticket=REDACTED&token=REDACTED"
        );
        // Encoded names and odd casing are still credentials.
        assert_eq!(
            redact_uri("/x?%74oken=s3cret&Ticket=t"),
            "/x?%74oken=REDACTED&Ticket=REDACTED"
        );
        assert_eq!(redact_uri("/plain"), "/plain");
    }

    #[test]
    fn targets_cannot_break_or_disguise_a_log_line() {
        assert_eq!(
            redact_uri("/v1/events?channel=a\nFAKE log line&x=\u{e9}\u{202e}"),
            "/v1/events?channel=a%0AFAKE%20log%20line&x=%C3%A9%E2%80%AE"
        );
        // Encoded text stays encoded: nothing is decoded for the log.
        assert_eq!(redact_uri("/x?c=a%0ab"), "/x?c=a%0ab");
        assert_eq!(
            redact_uri("/x?token=\u{e9}secret&c=\u{e9}"),
            "/x?token=REDACTED&c=%C3%A9"
        );
    }
}
