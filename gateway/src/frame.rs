//! What a client is sent, rendered once per event per replica.

use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use eventgate_core::{Channel, Event, GapReason, event::BodyError};
use tungstenite::Utf8Bytes;

/// One event, ready to write: every local subscriber gets a clone of the same bytes.
#[derive(Debug)]
pub struct Frame {
    pub event: Event,
    /// The shard of the event's channel: its `seq` counts on that shard.
    pub shard: usize,
    /// `id: …\nevent: …\ndata: {envelope}\n\n`
    pub sse: Bytes,
    /// Length of the `id: …\n` line at the start of `sse`: a connection over several shards
    /// writes its own id line and the rest of these bytes.
    id_len: usize,
    /// The WebSocket message, rendered by the first WebSocket subscriber that needs it.
    ws: OnceLock<Utf8Bytes>,
}

impl Frame {
    pub fn build(event: Event, shard: usize) -> Result<Self, BodyError> {
        let mut sse = BytesMut::with_capacity(event.body.len() + 128);
        write_sse_event(&event, &mut sse)?;
        let id_len = sse.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        Ok(Self {
            event,
            shard,
            sse: sse.freeze(),
            id_len,
            ws: OnceLock::new(),
        })
    }

    /// The SSE event without its `id:` line (the same allocation).
    pub fn sse_without_id(&self) -> Bytes {
        self.sse.slice(self.id_len..)
    }

    /// Heap bytes this frame holds: the body and its SSE and WebSocket forms.
    pub fn heap_bytes(&self) -> usize {
        let ws = self.ws.get().map_or(0, |text| text.len());
        self.event.body.len() + self.sse.len() + ws
    }

    pub fn seq(&self) -> u64 {
        self.event.seq
    }

    pub fn channel(&self) -> &Channel {
        &self.event.channel
    }

    /// `{"type":"event",…}`, rendered once per replica.
    pub fn ws_text(&self) -> Utf8Bytes {
        self.ws_rendered().clone()
    }

    /// [`Frame::ws_text`]'s bytes, for a write straight to a socket.
    pub fn ws_bytes(&self) -> &[u8] {
        self.ws_rendered().as_bytes()
    }

    fn ws_rendered(&self) -> &Utf8Bytes {
        // `build` already decoded this body, so rendering cannot fail here.
        self.ws
            .get_or_init(|| ws_event(&self.event).unwrap_or_default())
    }
}

/// The WebSocket form of an event: the SSE envelope plus `"type":"event"`.
pub fn ws_event(event: &Event) -> Result<Utf8Bytes, BodyError> {
    let body = event.decode()?;
    let mut text = Vec::with_capacity(event.body.len() + 96);
    event.write_envelope(&body, true, &mut text)?;
    // serde_json writes UTF-8; the check runs once per event per replica.
    Ok(Utf8Bytes::try_from(text).unwrap_or_default())
}

/// Appends the SSE form of `event`. An event without a name gets no `event:` line, so
/// `EventSource.onmessage` sees it.
pub fn write_sse_event(event: &Event, out: &mut BytesMut) -> Result<(), BodyError> {
    let body = event.decode()?;
    let mut envelope = Vec::with_capacity(event.body.len() + 64);
    event.write_envelope(&body, false, &mut envelope)?;
    out.put_slice(format!("id: {}\n", event.seq).as_bytes());
    if let Some(name) = &body.event {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    out.put_slice(&envelope);
    out.put_slice(b"\n\n");
    Ok(())
}

/// A position line: moves the browser's last event id without firing an event.
pub fn sse_position(id: &str) -> Bytes {
    Bytes::from(format!("id: {id}\n\n"))
}

/// A position as an event a script can listen for (`?position_events=true`): `EventSource`
/// fires nothing for an id-only block, so a page that reconnects by itself (a fresh ticket, a
/// new `EventSource`) could not otherwise learn where a quiet stream stands.
pub fn sse_position_event(id: &str) -> Bytes {
    Bytes::from(format!(
        "id: {id}\nevent: {POSITION_EVENT}\ndata: {{\"id\":\"{id}\"}}\n\n"
    ))
}

/// The event name of [`sse_position_event`], reserved at publish (`eventgate*`).
pub const POSITION_EVENT: &str = "eventgate-position";

/// `event: reset` naming the channels whose history is incomplete, optionally moving the
/// position (after a data loss the old position means nothing).
pub fn sse_reset(channels: &[Channel], reason: GapReason, position: Option<&str>) -> Bytes {
    let data = serde_json::json!({"channels": channels, "reason": reason.as_str()});
    let mut out = String::new();
    if let Some(id) = position {
        out.push_str(&format!("id: {id}\n"));
    }
    out.push_str(&format!("event: reset\ndata: {data}\n\n"));
    Bytes::from(out)
}
