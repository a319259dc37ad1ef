//! The event envelope: how an event is stored, carried between services, and shown to clients.
//!
//! The publisher encodes each event once into a *body* (`{"event":…,"data":…,"timestamp":…}`);
//! Redis stores that body in the channel's stream and carries it on pub/sub, next to the
//! sequence number the publish script assigned. A gateway decodes the body once per event and
//! writes the client-facing *envelope*, which adds `id` and `channel`.

use std::{borrow::Cow, time::SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Channel;

/// Longest event name, in bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 128;

/// Event names the gateway itself sends; publishers may not use them.
///
/// `reset` and `expired` are the gateway's own notices; `error` and `open` are what a browser's
/// `EventSource` fires for its connection (`onerror` makes apps reconnect, `onopen` reset
/// their state). A publisher must not be able to imitate either. Names are compared without
/// regard to case, and names starting with `eventgate` are kept for future notices.
pub const RESERVED_EVENT_NAMES: &[&str] = &["reset", "expired", "error", "open"];

/// Event names beginning with this (in any case) are reserved too.
pub const RESERVED_EVENT_PREFIX: &str = "eventgate";

/// An event as stored in history and carried on the live feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the broker's single counter; also the SSE `id` and the stream entry id.
    pub seq: u64,
    pub channel: Channel,
    /// The encoded body, exactly as the publisher wrote it.
    pub body: Bytes,
}

/// An event to publish on one channel: the body is encoded once, before any write.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub channel: Channel,
    pub body: Bytes,
    /// Publish at most once per key (within `IDEMPOTENCY_TTL`): a later publish with the same
    /// key answers the first one's seq and publishes nothing.
    pub idempotency_key: Option<String>,
}

/// What the broker did with one [`Outgoing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    /// Its idempotency key was seen before: `seq` is the first publish's, nothing new was
    /// published.
    pub replayed: bool,
}

/// Why an event name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("event name is empty; omit `event` for an unnamed event")]
    Empty,
    #[error("event name is {0} bytes; the limit is {MAX_EVENT_NAME_BYTES}")]
    TooLong(usize),
    #[error("event name contains a control character")]
    ControlChar,
    #[error(
        "event name {0:?} is reserved: reset, expired, error, open and names starting with \
         eventgate mean something to the gateway or the browser"
    )]
    Reserved(String),
}

/// Checks an event name: it becomes an SSE `event:` line, so no line breaks or other control
/// characters, and not a name the gateway uses for its own notices.
pub fn check_event_name(name: &str) -> Result<(), EventNameError> {
    if name.is_empty() {
        return Err(EventNameError::Empty);
    }
    if name.len() > MAX_EVENT_NAME_BYTES {
        return Err(EventNameError::TooLong(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(EventNameError::ControlChar);
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_EVENT_NAMES.contains(&lower.as_str()) || lower.starts_with(RESERVED_EVENT_PREFIX) {
        return Err(EventNameError::Reserved(name.to_owned()));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
}

/// Encodes an event body. `data` must already be compact (see [`compact_json`]).
pub fn encode_body(event: Option<&str>, data: &RawValue, timestamp: &str) -> Bytes {
    let body = Body {
        event: event.map(Cow::Borrowed),
        data,
        timestamp: Cow::Borrowed(timestamp),
    };
    // Serializing borrowed strings and a raw value into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// A decoded body, borrowing from the encoded bytes.
pub struct DecodedBody<'a> {
    pub event: Option<Cow<'a, str>>,
    pub data: &'a RawValue,
    pub timestamp: Cow<'a, str>,
}

/// A stored body that does not decode: written by something other than our publisher.
#[derive(Debug, thiserror::Error)]
#[error("event body is not valid: {0}")]
pub struct BodyError(#[from] serde_json::Error);

impl Event {
    /// Decodes the body. Unknown fields are ignored, so newer publishers can add some.
    pub fn decode(&self) -> Result<DecodedBody<'_>, BodyError> {
        let body: Body<'_> = serde_json::from_slice(&self.body)?;
        Ok(DecodedBody {
            event: body.event,
            data: body.data,
            timestamp: body.timestamp,
        })
    }

    /// Writes the client-facing envelope,
    /// `{"id":"1042","channel":"orders","event":"order:created","data":{…},"timestamp":"…"}`,
    /// optionally preceded by `"type":"event"` (the WebSocket form).
    pub fn write_envelope(
        &self,
        body: &DecodedBody<'_>,
        with_type: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), BodyError> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
            kind: Option<&'static str>,
            id: &'a str,
            channel: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            event: Option<&'a str>,
            data: &'a RawValue,
            timestamp: &'a str,
        }
        let id = self.seq.to_string();
        let envelope = Envelope {
            kind: with_type.then_some("event"),
            id: &id,
            channel: self.channel.as_str(),
            event: body.event.as_deref(),
            data: body.data,
            timestamp: &body.timestamp,
        };
        serde_json::to_writer(out, &envelope)?;
        Ok(())
    }
}

/// The timestamp format of envelopes: RFC 3339, UTC, milliseconds (`2026-11-24T10:30:00.000Z`).
pub fn format_timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Removes insignificant whitespace from valid JSON text.
///
/// Written by hand because the alternatives change the value: re-serializing through
/// `serde_json::Value` rounds large numbers and decimals (amounts!), and the raw text may hold
/// line breaks that would split an SSE `data:` line. JSON strings cannot contain raw control
/// characters, so every whitespace byte outside a string is insignificant.
pub fn compact_json(json: &str) -> Cow<'_, str> {
    let bytes = json.as_bytes();
    let is_ws = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    if !bytes.iter().copied().any(is_ws) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !(c.is_ascii() && is_ws(c as u8)) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn compact_json_keeps_strings_and_number_text() {
        let pretty =
            "{\n  \"note\": \"a  b\\\" c\",\n  \"amount\": 12345678901234567890.123456789\n}";
        assert_eq!(
            compact_json(pretty),
            r#"{"note":"a  b\" c","amount":12345678901234567890.123456789}"#
        );
        assert!(matches!(compact_json(r#"{"a":1}"#), Cow::Borrowed(_)));
    }

    #[test]
    fn envelope_has_the_documented_field_order() {
        let data = raw(r#"{"total":12.5}"#);
        let event = Event {
            seq: 1042,
            channel: Channel::parse("orders").unwrap(),
            body: encode_body(Some("order:created"), &data, "2026-11-24T10:30:00.000Z"),
        };
        let body = event.decode().unwrap();
        let mut out = Vec::new();
        event.write_envelope(&body, false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":"1042","channel":"orders","event":"order:created","data":{"total":12.5},"timestamp":"2026-11-24T10:30:00.000Z"}"#
        );
    }

    #[test]
    fn unnamed_events_have_no_event_field_and_bodies_tolerate_new_fields() {
        let event = Event {
            seq: 7,
            channel: Channel::parse("c").unwrap(),
            body: Bytes::from_static(br#"{"data":null,"timestamp":"t","traceparent":"00-x"}"#),
        };
        let body = event.decode().unwrap();
        let mut out = Vec::new();
        event.write_envelope(&body, true, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"type":"event","id":"7","channel":"c","data":null,"timestamp":"t"}"#
        );
    }

    #[test]
    fn event_names_that_would_break_sse_are_refused() {
        assert!(check_event_name("order:created").is_ok());
        assert_eq!(check_event_name(""), Err(EventNameError::Empty));
        assert_eq!(check_event_name("a\nb"), Err(EventNameError::ControlChar));
        for name in [
            "reset",
            "expired",
            "error",
            "open",
            "Error",
            "OPEN",
            "eventgate:ping",
        ] {
            assert_eq!(
                check_event_name(name),
                Err(EventNameError::Reserved(name.into())),
                "{name}"
            );
        }
        assert!(
            check_event_name("message").is_ok(),
            "the name of unnamed events"
        );
        assert!(check_event_name("order:error").is_ok());
        assert!(matches!(
            check_event_name(&"x".repeat(129)),
            Err(EventNameError::TooLong(129))
        ));
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        assert_eq!(format_timestamp(at), "2026-11-18T11:06:40.123Z");
    }
}
