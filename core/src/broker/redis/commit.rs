//! Group commit: publish requests that arrive while a script call is in flight go together
//! into the next one.
//!
//! Most of a publish's cost in Redis is the script call itself (invocation, arguments, `TIME`,
//! `INFO`, the clock, the reply: about 40 µs), not the events in it (about 5 µs each). Under
//! load, concurrent requests share calls; an idle publisher sends each request at once. One
//! call is in flight at a time unless many events wait: Redis runs scripts one after another
//! anyway, and calls that wait for each other take more events each (16 single-event clients:
//! 6.2 events per call instead of 2.5 with four in flight, a third less Redis CPU per publish
//! and a quarter more publishes a second). Large requests still pipeline, so Redis does not sit
//! idle between full calls. Every request's events still run in one atomic script. Calls run
//! on a task of their own, so a client that gives up on its request cannot cancel a call other
//! requests are in.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::{StreamExt, stream::FuturesUnordered};
use redis::Script;
use tokio::{
    sync::{Notify, oneshot},
    task::JoinHandle,
};

use super::{Keys, commands::Commands, shard::LINEAGE_KEYS};
use crate::{Accepted, BrokerConfig, BrokerError, Outgoing, config::CLOCK_KEEP};

/// Most events in one script call: keeps each call (which blocks Redis) short. A larger
/// request still goes in one call of its own.
const MAX_CALL_ENTRIES: usize = 1000;

/// Queued events that start a call while another is in flight: enough to pay for a call's
/// fixed cost many times over, so Redis need not wait for the publisher between large calls.
const PIPELINE_AT: usize = 100;

type Reply = oneshot::Sender<Result<Vec<Accepted>, Arc<BrokerError>>>;

struct Pending {
    entries: Vec<Outgoing>,
    reply: Reply,
}

struct Queue {
    pending: Mutex<Waiting>,
    wake: Notify,
    /// Calls in flight, as the committer last counted them.
    inflight: AtomicUsize,
}

/// Requests waiting for a call, and how many events they hold.
#[derive(Default)]
struct Waiting {
    requests: VecDeque<Pending>,
    entries: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a request; wakes the committer when it may start a call for it: nothing is in
    /// flight, or the queue now holds [`PIPELINE_AT`] events. Otherwise the committer takes it
    /// when the call in flight returns, without a wake-up per request. (The committer counts
    /// its calls down before it looks at the queue, and this reads the count after queueing,
    /// under the same lock: one of the two sees the request.)
    fn push(&self, request: Pending) {
        let mut waiting = self.lock();
        let before = waiting.entries;
        waiting.entries += request.entries.len();
        let after = waiting.entries;
        waiting.requests.push_back(request);
        let idle = self.inflight.load(Ordering::SeqCst) == 0;
        drop(waiting);
        if idle || (before < PIPELINE_AT && after >= PIPELINE_AT) {
            self.wake.notify_one();
        }
    }

    /// Whole requests, in arrival order, up to [`MAX_CALL_ENTRIES`] events (at least one);
    /// nothing if fewer than `min` events are queued.
    fn take(&self, min: usize) -> Vec<Pending> {
        let mut waiting = self.lock();
        if waiting.entries < min.max(1) {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut entries = 0;
        while let Some(next) = waiting.requests.front() {
            if !taken.is_empty() && entries + next.entries.len() > MAX_CALL_ENTRIES {
                break;
            }
            entries += next.entries.len();
            taken.extend(waiting.requests.pop_front());
        }
        waiting.entries -= entries;
        taken
    }
}

/// Runs publish script calls for the broker; the task stops when this is dropped.
pub(super) struct Committer {
    queue: Arc<Queue>,
    call: Arc<Call>,
    task: JoinHandle<()>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a script call needs.
struct Call {
    commands: Arc<Commands>,
    script: Script,
    keys: Keys,
    config: BrokerConfig,
}

impl Committer {
    /// `sharded`: on a Redis Cluster (`SPUBLISH`).
    pub(super) fn start(
        commands: Arc<Commands>,
        keys: Keys,
        config: BrokerConfig,
        sharded: bool,
    ) -> Self {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Waiting::default()),
            wake: Notify::new(),
            inflight: AtomicUsize::new(0),
        });
        let concurrency = commands.size();
        let call = Arc::new(Call {
            commands,
            script: super::sharded(super::script!("publish.lua"), sharded),
            keys,
            config,
        });
        let task = tokio::spawn(run(queue.clone(), call.clone(), concurrency));
        Self { queue, call, task }
    }

    /// The publish script.
    pub(super) fn script(&self) -> &Script {
        &self.call.script
    }

    /// Publishes `entries` in the next script call; returns their seqs.
    pub(super) async fn publish(&self, entries: &[Outgoing]) -> Result<Vec<Accepted>, BrokerError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.queue.push(Pending {
            entries: entries.to_vec(),
            reply,
        });
        match answer.await {
            Ok(result) => result.map_err(BrokerError::Shared),
            // The call was dropped (the broker is shutting down): it may have run.
            Err(_) => Err(BrokerError::OutcomeUnknown(Box::new(BrokerError::Closed))),
        }
    }
}

/// Takes queued requests into calls: one call in flight, and another beside it only once
/// [`PIPELINE_AT`] events wait (up to `concurrency` calls, one per connection).
async fn run(queue: Arc<Queue>, call: Arc<Call>, concurrency: usize) {
    let mut inflight = FuturesUnordered::new();
    loop {
        queue.inflight.store(inflight.len(), Ordering::SeqCst);
        while inflight.len() < concurrency {
            let min = if inflight.is_empty() { 0 } else { PIPELINE_AT };
            let batch = queue.take(min);
            if batch.is_empty() {
                break;
            }
            inflight.push(commit(call.clone(), batch));
            queue.inflight.store(inflight.len(), Ordering::SeqCst);
        }
        tokio::select! {
            _ = queue.wake.notified(), if inflight.len() < concurrency => {}
            Some(()) = inflight.next() => {}
        }
    }
}

/// One script call for `batch`; every request gets its own seqs, or the shared error.
async fn commit(call: Arc<Call>, batch: Vec<Pending>) {
    let entries: Vec<&Outgoing> = batch.iter().flat_map(|p| &p.entries).collect();
    let mut invocation = call.script.prepare_invoke();
    call.keys.lineage(&mut invocation, &call.config);
    for entry in &entries {
        invocation.key(call.keys.stream(&entry.channel));
    }
    invocation
        .arg(call.config.history_max_len)
        .arg(call.config.history_ttl.as_millis() as u64)
        .arg(CLOCK_KEEP)
        .arg(call.config.idempotency_ttl.as_millis() as u64);
    // Idempotency keys are declared keys too (after the streams; an entry's argument names its
    // key's index): Redis Cluster then answers `ASK`/`TRYAGAIN` for a slot in migration before
    // the script runs, instead of failing half-way through it on a key that moved.
    let mut next_key = LINEAGE_KEYS + entries.len();
    for entry in &entries {
        let idempotency = match &entry.idempotency_key {
            Some(key) => {
                invocation.key(call.keys.idempotency(key));
                next_key += 1;
                next_key.to_string()
            }
            None => String::new(),
        };
        invocation
            .arg(call.keys.live(&entry.channel))
            .arg(&entry.body[..])
            .arg(idempotency);
    }
    // A seq per entry; negative: the entry's idempotency key was known, this is its first seq.
    let result: Result<Vec<i64>, BrokerError> = call
        .commands
        .with_conn(true, |mut c| {
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut c).await }
        })
        .await;
    let result = result.and_then(|seqs| {
        if seqs.len() == entries.len() {
            Ok(seqs
                .into_iter()
                .map(|s| Accepted {
                    seq: s.unsigned_abs(),
                    replayed: s < 0,
                })
                .collect::<Vec<_>>())
        } else {
            // The script ran; what it did cannot be read from this answer.
            Err(BrokerError::OutcomeUnknown(Box::new(
                BrokerError::Protocol(format!(
                    "publish returned {} ids for {} events",
                    seqs.len(),
                    entries.len()
                )),
            )))
        }
    });
    match result {
        Ok(seqs) => {
            let mut seqs = seqs.into_iter();
            for pending in batch {
                let own: Vec<Accepted> = seqs.by_ref().take(pending.entries.len()).collect();
                let _ = pending.reply.send(Ok(own));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for pending in batch {
                let _ = pending.reply.send(Err(e.clone()));
            }
        }
    }
}
