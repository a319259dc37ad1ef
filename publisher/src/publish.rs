//! `POST /v1/publish`: validate everything, then write it all in one atomic broker call.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
};
use eventgate_core::{
    BrokerError, Channel, Outgoing,
    event::{check_event_name, compact_json, encode_body, format_timestamp},
    telemetry,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::{
    PublisherConfig, PublisherState,
    auth::{KeyNamespace, KeyScope},
    error::ApiError,
};

/// Whether reading the body failed because `REQUEST_BODY_TIMEOUT` passed.
fn timed_out(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// One event as a request gives it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec<'a> {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    event: Option<String>,
    /// `Some` whenever the field is present, `null` included.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    idempotency_key: Option<String>,
}

/// The request: one event inline, or `events`. (Not `#[serde(flatten)]`: it cannot hold raw
/// values or refuse unknown fields.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest<'a> {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    event: Option<String>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    idempotency_key: Option<String>,
    #[serde(borrow)]
    events: Option<Vec<EventSpec<'a>>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Published {
    pub channel: Channel,
    pub id: String,
}

#[derive(Serialize)]
pub struct PublishResponse {
    pub published: Vec<Published>,
}

pub async fn publish(
    State(state): State<Arc<PublisherState>>,
    Extension(scope): Extension<KeyScope>,
    Extension(namespace): Extension<KeyNamespace>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Accepted, ApiError> {
    check_content_type(&headers)?;
    let body = body.map_err(|rejection| match rejection.status() {
        _ if timed_out(&rejection) => ApiError::BodyTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => too_large(&state.config),
        _ => ApiError::invalid("invalid_request", rejection.body_text()),
    })?;
    publish_body(&state, &scope, &namespace, &headers, &body).await
}

/// A publish's answer: 202, the ids, and `Idempotent-Replayed` for a retry.
pub type Accepted = (StatusCode, HeaderMap, Json<PublishResponse>);

/// The answer to a body over `MAX_BODY_BYTES`.
pub(crate) fn too_large(config: &PublisherConfig) -> ApiError {
    ApiError::TooLarge {
        code: "body_too_large",
        message: format!(
            "the request body is over {} bytes (MAX_BODY_BYTES)",
            config.max_body_bytes
        ),
    }
}

/// Publishes a request whose key was checked and whose body has arrived: what
/// `POST /v1/publish` does after its headers, on either HTTP path.
pub(crate) async fn publish_body(
    state: &PublisherState,
    scope: &KeyScope,
    namespace: &KeyNamespace,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Accepted, ApiError> {
    let timestamp = format_timestamp(SystemTime::now());
    let mut entries = parse(body, &state.config, &timestamp)?;
    let header = match headers.get("idempotency-key") {
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::invalid(
                "invalid_idempotency_key",
                "Idempotency-Key must be printable ASCII",
            )
        })?),
        None => None,
    };
    scope_idempotency_keys(&mut entries, header, &namespace.0)?;
    if let Some(entry) = entries.iter().find(|e| !scope.allows(&e.channel)) {
        return Err(ApiError::Forbidden(format!(
            "this key may not publish on channel {}; nothing was published",
            entry.channel
        )));
    }
    // Traced publishes: a span for the request's events and one for the Redis step, whose
    // context each event carries to the gateways (debug level: free unless tracing is on).
    let span = tracing::debug_span!(
        "publish",
        events = entries.len(),
        channel = tracing::field::Empty,
        event_id = tracing::field::Empty,
    );
    let step = tracing::debug_span!(parent: &span, "broker.publish", events = entries.len());
    let mut entries = entries;
    if let Some(traceparent) = telemetry::traceparent(&step) {
        for entry in &mut entries {
            entry.body = telemetry::with_traceparent(&entry.body, &traceparent);
        }
    }
    let seqs = match state.broker.publish(&entries).instrument(step).await {
        Ok(seqs) => seqs,
        Err(BrokerError::Partial { accepted, cause }) => {
            state.metrics.broker_errors.inc();
            return Err(partially_published(&entries, accepted, *cause));
        }
        Err(e) => {
            state.metrics.broker_errors.inc();
            return Err(e.into());
        }
    };
    let fresh = seqs.iter().filter(|a| !a.replayed).count();
    state.metrics.events_published.inc_by(fresh as u64);
    if let ([entry], [accepted]) = (entries.as_slice(), seqs.as_slice()) {
        span.record("channel", entry.channel.as_str());
        span.record("event_id", accepted.seq);
    }
    let published = entries
        .into_iter()
        .zip(&seqs)
        .map(|(entry, accepted)| Published {
            channel: entry.channel,
            id: accepted.seq.to_string(),
        })
        .collect();
    // A retry answered from the first publish says so (nothing new was published).
    let mut headers = HeaderMap::new();
    if fresh == 0 {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((
        StatusCode::ACCEPTED,
        headers,
        Json(PublishResponse { published }),
    ))
}

/// The answer to a request some shards applied: per entry (in request order, `index` its
/// place), its id where published.
fn partially_published(
    entries: &[Outgoing],
    accepted: Vec<Option<eventgate_core::Accepted>>,
    cause: BrokerError,
) -> ApiError {
    let (mut published, mut failed) = (Vec::new(), Vec::new());
    for (index, (entry, answer)) in entries.iter().zip(accepted).enumerate() {
        match answer {
            Some(answer) => published.push(serde_json::json!({
                "index": index, "channel": entry.channel, "id": answer.seq.to_string()
            })),
            None => failed.push(serde_json::json!({"index": index, "channel": entry.channel})),
        }
    }
    ApiError::PartiallyPublished {
        published,
        failed,
        cause,
    }
}

pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Parses and validates a request into the entries to publish, one per channel per event, in
/// request order. Any problem refuses the whole request.
pub fn parse(
    body: &[u8],
    config: &PublisherConfig,
    timestamp: &str,
) -> Result<Vec<Outgoing>, ApiError> {
    let request: PublishRequest = serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_request"
        } else {
            "invalid_json"
        };
        ApiError::invalid(code, format!("request body: {e}"))
    })?;
    let has_single = request.channel.is_some()
        || request.channels.is_some()
        || request.event.is_some()
        || request.data.is_some()
        || request.idempotency_key.is_some();
    let specs = match request.events {
        Some(_) if has_single => {
            return Err(ApiError::invalid(
                "invalid_request",
                "send either one event (channel, event, data) or `events`, not both",
            ));
        }
        Some(events) if events.is_empty() => {
            return Err(ApiError::invalid("invalid_request", "`events` is empty"));
        }
        Some(events) if events.len() > config.max_batch_events as usize => {
            return Err(ApiError::invalid(
                "too_many_events",
                format!(
                    "{} events; the limit is {}",
                    events.len(),
                    config.max_batch_events
                ),
            ));
        }
        Some(events) => events,
        None => vec![EventSpec {
            channel: request.channel,
            channels: request.channels,
            event: request.event,
            data: request.data,
            idempotency_key: request.idempotency_key,
        }],
    };
    let batch = specs.len() > 1;
    let mut entries = Vec::new();
    let (mut written_entries, mut written_bytes) = (0usize, 0u64);
    for (index, spec) in specs.into_iter().enumerate() {
        let at = |message: String| {
            if batch {
                format!("events[{index}]: {message}")
            } else {
                message
            }
        };
        let channels = channels_of(&spec, config).map_err(|e| relabel(e, &at))?;
        if let Some(name) = &spec.event {
            check_event_name(name)
                .map_err(|e| ApiError::invalid("invalid_event", at(format!("`event`: {e}"))))?;
        }
        let Some(data) = spec.data else {
            return Err(ApiError::invalid(
                "missing_data",
                at("`data` is required (any JSON value)".into()),
            ));
        };
        let compact = compact_json(data.get());
        if compact.len() > config.max_event_bytes as usize {
            return Err(ApiError::TooLarge {
                code: "event_too_large",
                message: at(format!(
                    "`data` is {} bytes; the limit is {}",
                    compact.len(),
                    config.max_event_bytes
                )),
            });
        }
        // `compact` came from valid JSON and only lost insignificant whitespace.
        let data = RawValue::from_string(compact.into_owned())
            .map_err(|e| ApiError::invalid("invalid_json", at(e.to_string())))?;
        let body = encode_body(spec.event.as_deref(), &data, timestamp);
        let key = match &spec.idempotency_key {
            Some(key) => Some(check_idempotency_key(key).map_err(|e| relabel(e, &at))?),
            None => None,
        };
        // What the request writes to Redis, checked before anything is: one stream entry (and
        // one live message) per event per channel.
        written_entries += channels.len();
        written_bytes += (channels.len() * body.len()) as u64;
        if written_entries > config.max_publish_entries as usize {
            return Err(ApiError::TooLarge {
                code: "too_many_entries",
                message: format!(
                    "the request writes more than {} entries (events times channels, \
                     MAX_PUBLISH_ENTRIES); nothing was published, split it",
                    config.max_publish_entries
                ),
            });
        }
        if written_bytes > config.max_publish_bytes {
            return Err(ApiError::TooLarge {
                code: "publish_too_large",
                message: format!(
                    "the request writes more than {} bytes (event bodies times channels, \
                     MAX_PUBLISH_BYTES); nothing was published, split it",
                    config.max_publish_bytes
                ),
            });
        }
        entries.extend(
            channels
                .into_iter()
                .enumerate()
                .map(|(i, channel)| Outgoing {
                    channel,
                    body: body.clone(),
                    idempotency_key: key.map(|k| format!("{k}:{i}")),
                }),
        );
    }
    Ok(entries)
}

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

fn check_idempotency_key(key: &str) -> Result<&str, ApiError> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(ApiError::invalid(
            "invalid_idempotency_key",
            format!("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
        ));
    }
    Ok(key)
}

/// Names the entries' idempotency keys for the broker: per API key (`namespace`), hashed (any
/// length or content becomes a fixed name), and per entry. The `Idempotency-Key` header
/// covers the whole request, entry by entry in request order; a per-event `idempotency_key`
/// covers that event's channels.
fn scope_idempotency_keys(
    entries: &mut [Outgoing],
    header: Option<&str>,
    namespace: &str,
) -> Result<(), ApiError> {
    let hash = |key: &str| {
        let digest = Sha256::digest(format!("{namespace}\0{key}").as_bytes());
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    match header {
        Some(_) if entries.iter().any(|e| e.idempotency_key.is_some()) => Err(ApiError::invalid(
            "invalid_request",
            "use the Idempotency-Key header or per-event idempotency_key fields, not both",
        )),
        Some(header) => {
            let key = hash(check_idempotency_key(header)?);
            for (i, entry) in entries.iter_mut().enumerate() {
                entry.idempotency_key = Some(format!("{namespace}:{key}:{i}"));
            }
            Ok(())
        }
        None => {
            for entry in entries.iter_mut() {
                if let Some(own) = &entry.idempotency_key {
                    // `own` is `key:channel index`: hash the key, keep the index.
                    let (key, index) = own.rsplit_once(':').unwrap_or((own, "0"));
                    entry.idempotency_key = Some(format!("{namespace}:{}:{index}", hash(key)));
                }
            }
            Ok(())
        }
    }
}

fn relabel(error: ApiError, at: &impl Fn(String) -> String) -> ApiError {
    match error {
        ApiError::Invalid { code, message } => ApiError::invalid(code, at(message)),
        other => other,
    }
}

fn channels_of(spec: &EventSpec<'_>, config: &PublisherConfig) -> Result<Vec<Channel>, ApiError> {
    let names: Vec<&str> = match (&spec.channel, &spec.channels) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_request",
                "give `channel` or `channels`, not both",
            ));
        }
        (Some(one), None) => vec![one.as_str()],
        (None, Some(many)) if many.is_empty() => {
            return Err(ApiError::invalid("missing_channel", "`channels` is empty"));
        }
        (None, Some(many)) => many.iter().map(String::as_str).collect(),
        (None, None) => {
            return Err(ApiError::invalid(
                "missing_channel",
                "`channel` or `channels` is required",
            ));
        }
    };
    if names.len() > config.max_channels_per_event as usize {
        return Err(ApiError::invalid(
            "too_many_channels",
            format!(
                "{} channels; the limit is {}",
                names.len(),
                config.max_channels_per_event
            ),
        ));
    }
    let mut channels: Vec<Channel> = Vec::with_capacity(names.len());
    for name in names {
        let channel = Channel::parse(name)
            .map_err(|e| ApiError::invalid("invalid_channel", format!("channel {name:?}: {e}")))?;
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(body: &str) -> Vec<Outgoing> {
        parse(body.as_bytes(), &PublisherConfig::default(), "t").unwrap()
    }

    fn parse_err(body: &str) -> (&'static str, String) {
        match parse(body.as_bytes(), &PublisherConfig::default(), "t") {
            Err(ApiError::Invalid { code, message } | ApiError::TooLarge { code, message }) => {
                (code, message)
            }
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("{body} should be refused"),
        }
    }

    #[test]
    fn one_event_on_several_channels_shares_one_body() {
        let entries = parse_ok(r#"{"channels":["a","b","a"],"event":"x","data":{"n": 1}}"#);
        let names: Vec<&str> = entries.iter().map(|e| e.channel.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(entries[0].body, entries[1].body);
        assert_eq!(
            &entries[0].body[..],
            br#"{"event":"x","data":{"n":1},"timestamp":"t"}"#
        );
    }

    #[test]
    fn null_data_is_data_and_missing_data_is_an_error() {
        assert_eq!(parse_ok(r#"{"channel":"a","data":null}"#).len(), 1);
        assert_eq!(parse_err(r#"{"channel":"a"}"#).0, "missing_data");
    }

    #[test]
    fn batch_errors_name_the_event() {
        let (code, message) =
            parse_err(r#"{"events":[{"channel":"a","data":1},{"channel":"b c","data":2}]}"#);
        assert_eq!(code, "invalid_channel");
        assert!(message.starts_with("events[1]: "), "{message}");
        assert_eq!(
            parse_err(r#"{"events":[],"channel":"a"}"#).0,
            "invalid_request"
        );
        assert_eq!(
            parse_err(r#"{"channel":"a","data":1,"colour":"red"}"#).0,
            "invalid_request"
        );
        assert_eq!(parse_err(r#"{"channel":"a","data":"#).0, "invalid_json");
        assert_eq!(
            parse_err(r#"{"channel":"a","event":"reset","data":1}"#).0,
            "invalid_event"
        );
    }
}
