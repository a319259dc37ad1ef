//! Publishing: a keep-alive HTTP/1.1 connection, and the drivers that publish at a rate or as
//! fast as subscribers keep up.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn::http1::SendRequest, header};
use hyper_util::rt::TokioIo;
use tokio::{sync::mpsc, task::JoinSet, time::Instant};

use crate::{
    net::{Sources, now_micros},
    target::{Base, Target, payload},
};

/// One keep-alive connection; reconnects once when the server closed it.
pub struct HttpConn {
    base: Base,
    sources: Arc<Sources>,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// `Authorization` header value, if any.
    authorization: Option<String>,
}

impl HttpConn {
    /// A connection to the target's publisher, with its API key.
    pub fn publisher(target: &Target, sources: Arc<Sources>) -> Self {
        Self {
            base: target.publisher.clone(),
            sources,
            sender: None,
            authorization: target.publisher_key.as_ref().map(|k| format!("Bearer {k}")),
        }
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = self
                .sources
                .connect(self.base.addr)
                .await
                .context("connect to the publisher")?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().context("no connection")?;
        sender.ready().await?;
        Ok(sender)
    }

    /// POSTs `body` to `path`; returns the status and body.
    pub async fn post(&mut self, path: &str, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
        let mut last = None;
        for _ in 0..2 {
            let host = self.base.host.clone();
            let authorization = self.authorization.clone();
            let sender = match self.connect().await {
                Ok(sender) => sender,
                Err(e) => {
                    last = Some(e);
                    self.sender = None;
                    continue;
                }
            };
            let mut request = Request::post(path);
            if let Some(authorization) = authorization {
                request = request.header(header::AUTHORIZATION, authorization);
            }
            let request = request
                .header(header::HOST, host)
                .header(header::CONTENT_TYPE, "application/json")
                // nchan answers with the channel's `last_message_id` in JSON.
                .header(header::ACCEPT, "application/json")
                .body(Full::new(body.clone()))?;
            match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await?.to_bytes();
                    return Ok((status, body));
                }
                Err(e) => {
                    last = Some(e.into());
                    self.sender = None;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("publish failed")))
    }
}

/// Publishes one event (or a batch) on `channel`; fails unless the server accepted it.
pub async fn publish(
    conn: &mut HttpConn,
    target: &Target,
    channel: &str,
    payloads: &[String],
) -> anyhow::Result<Bytes> {
    let (path, body) = target.publish_request(channel, payloads);
    let (status, answer) = conn.post(&path, Bytes::from(body)).await?;
    if !(200..300).contains(&status) {
        bail!(
            "publish answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(answer)
}

/// How a fan-out publishes.
pub struct Plan {
    pub channels: usize,
    pub events: u64,
    /// Events per second; 0 publishes as fast as the subscribers keep up.
    pub rate: f64,
    pub payload: usize,
    /// As-fast-as-possible mode: most events published and not yet delivered everywhere.
    pub window: u64,
    pub subscribers_per_channel: f64,
}

/// What a fan-out published.
pub struct Published {
    /// Events accepted, per channel.
    pub per_channel: Vec<u64>,
    pub errors: u64,
    pub started: Instant,
    pub finished: Instant,
}

/// Publishes `plan.events` events round-robin over the channels, each channel on one
/// connection so its events stay in order. `delivered` reads the subscribers' progress.
pub async fn fan_out(
    target: &Target,
    prefix: &str,
    plan: &Plan,
    sources: Arc<Sources>,
    delivered: impl Fn() -> u64,
) -> anyhow::Result<Published> {
    let workers = plan.channels.clamp(1, 16);
    let accepted: Arc<Vec<AtomicU64>> =
        Arc::new((0..plan.channels).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(usize, u64)>(1024);
        senders.push(tx);
        let mut conn = HttpConn::publisher(target, sources.clone());
        let (target, prefix, accepted, errors, size) = (
            target.clone(),
            prefix.to_owned(),
            accepted.clone(),
            errors.clone(),
            plan.payload,
        );
        tasks.spawn(async move {
            while let Some((channel, n)) = rx.recv().await {
                let name = Target::channel(&prefix, channel);
                let body = [payload(n, now_micros(), size)];
                match publish(&mut conn, &target, &name, &body).await {
                    Ok(_) => drop(accepted[channel].fetch_add(1, Ordering::Relaxed)),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("{e:#}");
                        }
                    }
                }
            }
        });
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let mut next_n = vec![0u64; plan.channels];
    while sent < plan.events {
        let allowed = if plan.rate > 0.0 {
            let due = (started.elapsed().as_secs_f64() * plan.rate) as u64 + 1;
            due.min(plan.events)
        } else {
            // Closed loop: keep at most `window` events per channel in flight.
            let done = delivered() as f64 / plan.subscribers_per_channel.max(1.0);
            (done as u64 + plan.window * plan.channels as u64).min(plan.events)
        };
        while sent < allowed {
            let channel = (sent % plan.channels as u64) as usize;
            let n = next_n[channel];
            next_n[channel] += 1;
            senders[channel % workers].send((channel, n)).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(if plan.rate > 0.0 { 2 } else { 1 })).await;
    }
    drop(senders);
    while tasks.join_next().await.is_some() {}
    Ok(Published {
        per_channel: accepted.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        errors: errors.load(Ordering::Relaxed),
        started,
        finished: Instant::now(),
    })
}
