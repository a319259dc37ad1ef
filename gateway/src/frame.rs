//! What a client is sent, rendered once per event per replica.

use bytes::{BufMut, Bytes, BytesMut};
use eventgate_broker::{Channel, Event, GapReason, event::BodyError};

/// One event, ready to write: every local subscriber gets a clone of the same bytes.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    pub channel: Channel,
    /// `id: …\nevent: …\ndata: {envelope}\n\n`
    pub sse: Bytes,
}

impl Frame {
    pub fn build(event: &Event) -> Result<Self, BodyError> {
        let mut sse = BytesMut::with_capacity(event.body.len() + 128);
        write_sse_event(event, &mut sse)?;
        Ok(Self {
            seq: event.seq,
            channel: event.channel.clone(),
            sse: sse.freeze(),
        })
    }
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
pub fn sse_position(seq: u64) -> Bytes {
    Bytes::from(format!("id: {seq}\n\n"))
}

/// `event: reset` naming the channels whose history is incomplete, optionally moving the
/// position (after a data loss the old position means nothing).
pub fn sse_reset(channels: &[Channel], reason: GapReason, position: Option<u64>) -> Bytes {
    let data = serde_json::json!({"channels": channels, "reason": reason.as_str()});
    let mut out = String::new();
    if let Some(seq) = position {
        out.push_str(&format!("id: {seq}\n"));
    }
    out.push_str(&format!("event: reset\ndata: {data}\n\n"));
    Bytes::from(out)
}
