//! Running subscribers in this process or in several child processes (one process may hold
//! at most 20,000 sockets here), and merging what they report.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::{
    net::{cpu_time, raise_file_limit},
    subscriber::{self, Shard, ShardResult, SubscriberSpec, histogram},
};

/// A child's periodic report on stdout.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub failed: u64,
    pub delivered: u64,
    pub caught_up: u64,
    pub result: Option<ShardResult>,
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    caught_up: AtomicU64,
}

enum Link {
    Local {
        shard: Arc<Shard>,
        tasks: JoinSet<()>,
    },
    Child(Box<ChildLink>),
}

/// A generator process and what it reported so far.
struct ChildLink {
    child: Child,
    stdin: ChildStdin,
    counts: Arc<Counts>,
    reader: JoinHandle<Option<ShardResult>>,
}

/// All subscribers of a scenario.
pub struct Shards {
    links: Vec<Link>,
    pub total: usize,
}

impl Shards {
    /// Opens `spec.subscribers` subscribers over `procs` processes.
    pub async fn start(spec: SubscriberSpec, procs: usize) -> anyhow::Result<Self> {
        let total = spec.subscribers;
        let mut links = Vec::new();
        if procs <= 1 {
            let spec = SubscriberSpec {
                shard: 0,
                shards: 1,
                ..spec
            };
            let shard = Shard::new();
            let tasks = subscriber::start(Arc::new(spec), shard.clone())?;
            links.push(Link::Local { shard, tasks });
        } else {
            let exe = std::env::current_exe().context("own executable")?;
            for i in 0..procs {
                let spec = SubscriberSpec {
                    shard: i,
                    shards: procs,
                    ..spec.clone()
                };
                let mut child = Command::new(&exe)
                    .arg("shard")
                    .arg("--spec")
                    .arg(serde_json::to_string(&spec)?)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .context("start a generator process")?;
                let stdin = child.stdin.take().context("child stdin")?;
                let stdout = child.stdout.take().context("child stdout")?;
                let counts = Arc::new(Counts::default());
                let reader = tokio::spawn(read_child(stdout, counts.clone()));
                links.push(Link::Child(Box::new(ChildLink {
                    child,
                    stdin,
                    counts,
                    reader,
                })));
            }
        }
        Ok(Self { links, total })
    }

    fn sum(
        &self,
        pick: impl Fn(&Counts) -> &AtomicU64,
        local: impl Fn(&Shard) -> &AtomicU64,
    ) -> u64 {
        self.links
            .iter()
            .map(|l| match l {
                Link::Local { shard, .. } => local(shard).load(Ordering::Relaxed),
                Link::Child(link) => pick(&link.counts).load(Ordering::Relaxed),
            })
            .sum()
    }

    pub fn connected(&self) -> u64 {
        self.sum(|c| &c.connected, |s| &s.connected)
    }

    pub fn failed(&self) -> u64 {
        self.sum(|c| &c.failed, |s| &s.failed)
    }

    pub fn delivered(&self) -> u64 {
        self.sum(|c| &c.delivered, |s| &s.delivered)
    }

    pub fn caught_up(&self) -> u64 {
        self.sum(|c| &c.caught_up, |s| &s.caught_up)
    }

    /// Waits until every subscriber connected or failed; `false` on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.connected() + self.failed() < self.total as u64 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops every subscriber and merges the results.
    pub async fn finish(self) -> anyhow::Result<ShardResult> {
        let mut results = Vec::new();
        for link in self.links {
            match link {
                Link::Local { shard, mut tasks } => {
                    shard.stop.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while tasks.join_next().await.is_some() {}
                    })
                    .await;
                    let cpu = cpu_time(std::process::id()).map_or(0, |d| d.as_millis() as u64);
                    results.push(shard.result(cpu));
                }
                Link::Child(link) => {
                    let ChildLink {
                        mut child,
                        mut stdin,
                        reader,
                        ..
                    } = *link;
                    let _ = stdin.write_all(b"stop\n").await;
                    drop(stdin);
                    let result = tokio::time::timeout(Duration::from_secs(30), reader).await;
                    let _ = child.wait().await;
                    match result {
                        Ok(Ok(Some(result))) => results.push(result),
                        _ => anyhow::bail!("a generator process ended without a result"),
                    }
                }
            }
        }
        Ok(merge(results))
    }
}

async fn read_child(
    stdout: tokio::process::ChildStdout,
    counts: Arc<Counts>,
) -> Option<ShardResult> {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(progress) = serde_json::from_str::<Progress>(&line) else {
            continue;
        };
        counts
            .connected
            .store(progress.connected, Ordering::Relaxed);
        counts.failed.store(progress.failed, Ordering::Relaxed);
        counts
            .delivered
            .store(progress.delivered, Ordering::Relaxed);
        counts
            .caught_up
            .store(progress.caught_up, Ordering::Relaxed);
        if progress.result.is_some() {
            return progress.result;
        }
    }
    None
}

fn merge(results: Vec<ShardResult>) -> ShardResult {
    let mut latency = histogram();
    let mut connect = histogram();
    let mut total = ShardResult::default();
    for r in results {
        total.connected += r.connected;
        total.failed += r.failed;
        total.delivered += r.delivered;
        total.duplicates += r.duplicates;
        total.gaps += r.gaps;
        total.resets += r.resets;
        total.closed_early += r.closed_early;
        total.caught_up += r.caught_up;
        total.cpu_ms += r.cpu_ms;
        record(&mut latency, &r.latency);
        record(&mut connect, &r.connect);
    }
    total.latency = subscriber::pairs(&latency);
    total.connect = subscriber::pairs(&connect);
    total
}

fn record(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        let _ = h.record_n(value, count);
    }
}

/// The `shard` subcommand: run one shard, report progress on stdout, stop on "stop".
pub async fn run_child(spec: &str) -> anyhow::Result<()> {
    let spec: SubscriberSpec = serde_json::from_str(spec)?;
    raise_file_limit();
    let shard = Shard::new();
    let mut tasks = subscriber::start(Arc::new(spec), shard.clone())?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let report = |result: Option<ShardResult>| {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let progress = Progress {
            connected: get(&shard.connected),
            failed: get(&shard.failed),
            delivered: get(&shard.delivered),
            caught_up: get(&shard.caught_up),
            result,
        };
        let mut line = serde_json::to_string(&progress).unwrap_or_default();
        line.push('\n');
        line
    };
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(l)) if l.trim() != "stop" => {}
                _ => break,
            },
            _ = tick.tick() => stdout.write_all(report(None).as_bytes()).await?,
        }
    }
    shard.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let cpu = cpu_time(std::process::id()).map_or(0, |d| d.as_millis() as u64);
    stdout
        .write_all(report(Some(shard.result(cpu))).as_bytes())
        .await?;
    stdout.flush().await?;
    Ok(())
}
