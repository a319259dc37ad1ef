//! A Server-Sent Events client that keeps every line, so tests can check frames exactly, and
//! tracks the last event id the way a browser's `EventSource` does.

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::Value;

/// One dispatched block: the lines up to a blank line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<String>,
    pub comments: Vec<String>,
    /// The block's text as received, without the final blank line.
    pub raw: String,
}

/// An event with data, as `EventSource` would fire it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `id:` line, parsed.
    pub id: u64,
    pub event: Option<String>,
    pub envelope: Value,
    pub block: Block,
}

impl Received {
    pub fn channel(&self) -> &str {
        self.envelope["channel"].as_str().unwrap_or_default()
    }
}

/// How reading ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Timeout,
    Closed,
}

pub struct SseClient {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
    /// The browser's "last event id": set by every dispatched block that has an `id:` line.
    pub last_id: Option<String>,
}

impl SseClient {
    pub async fn connect(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        Self::open(http.get(url), last_event_id).await
    }

    /// Sends `request` (a GET, with whatever headers the test chose) as an SSE request.
    pub async fn open(request: reqwest::RequestBuilder, last_event_id: Option<&str>) -> Self {
        let mut request = request.header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("SSE request");
        let status = response.status();
        let headers = response.headers().clone();
        Self {
            status,
            headers,
            body: Box::pin(response.bytes_stream()),
            buf: String::new(),
            last_id: last_event_id.map(str::to_owned),
        }
    }

    /// The body of a refused request, as JSON.
    pub async fn error_body(self) -> Value {
        let mut body = self.body;
        let mut bytes = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).expect("JSON error body")
    }

    /// The next block, comments and position lines included.
    pub async fn next_block(&mut self, timeout: Duration) -> Result<Block, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let text: String = self.buf.drain(..end + 2).collect();
                let block = parse_block(&text[..end]);
                if let Some(id) = &block.id {
                    self.last_id = Some(id.clone());
                }
                return Ok(block);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => return Err(End::Timeout),
                Ok(None | Some(Err(_))) => return Err(End::Closed),
                Ok(Some(Ok(chunk))) => {
                    self.buf
                        .push_str(std::str::from_utf8(&chunk).expect("UTF-8 stream"));
                }
            }
        }
    }

    /// The next block that carries data (events and resets), skipping comments and positions.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Received, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let block = self.next_block(left).await?;
            let Some(data) = &block.data else { continue };
            let envelope: Value = serde_json::from_str(data).expect("data is JSON");
            return Ok(Received {
                id: block
                    .id
                    .as_deref()
                    .map_or(0, |id| event_seq(id, envelope["channel"].as_str())),
                event: block.event.clone(),
                envelope,
                block,
            });
        }
    }

    /// Exactly `n` data blocks, or panics with what arrived.
    pub async fn expect_events(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(event) => got.push(event),
                Err(end) => panic!(
                    "expected {n} events, got {} then {end:?}: {:?}",
                    got.len(),
                    got.iter().map(|e| e.id).collect::<Vec<_>>()
                ),
            }
        }
        got
    }

    /// Reads until the stream ends; panics if it does not end within `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<Block> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut blocks = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_block(left).await {
                Ok(block) => blocks.push(block),
                Err(End::Closed) => return blocks,
                Err(End::Timeout) => panic!("stream still open after {timeout:?}: {blocks:?}"),
            }
        }
    }
}

/// The `seq` of an event from its `id:` line: the id itself on one shard; over several, the
/// position of the event's channel's shard in the `v1.` cursor.
pub fn event_seq(id: &str, channel: Option<&str>) -> u64 {
    match eventgate_core::Cursor::parse(id).expect("an id the gateway sent") {
        eventgate_core::Cursor::Plain(seq) => seq,
        eventgate_core::Cursor::Shards { count, positions } => {
            // A reset names no single channel: no seq of its own.
            let Some(channel) = channel.and_then(|c| eventgate_core::Channel::parse(c).ok()) else {
                return 0;
            };
            let shard = eventgate_core::Shards::new(count).shard_of(&channel);
            positions
                .iter()
                .find(|(s, _)| *s == shard)
                .map(|(_, seq)| *seq)
                .expect("the event's shard in the id")
        }
    }
}

fn parse_block(text: &str) -> Block {
    let mut block = Block {
        raw: text.to_owned(),
        ..Block::default()
    };
    for line in text.split('\n') {
        if let Some(comment) = line.strip_prefix(':') {
            block.comments.push(comment.trim_start().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "id" => block.id = Some(value),
            "event" => block.event = Some(value),
            "data" => {
                block.data = Some(match block.data.take() {
                    Some(before) => format!("{before}\n{value}"),
                    None => value,
                })
            }
            "retry" => block.retry = Some(value),
            _ => {}
        }
    }
    block
}
