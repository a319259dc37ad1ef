//! The floor: what the kernel alone costs to deliver events over loopback TCP. One process
//! writes the same chunk to N sockets, one `write` per delivery, at a set rate; a child process
//! drains them through epoll (tokio), like subscribers. The writer's CPU per write is the least
//! any server can spend per delivery on this machine; fan-out figures are read against it.

use std::{
    io::Write,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::{
    net::{Sources, cpu_time},
    report::{Report, thousands},
};

pub struct FloorPlan {
    pub connections: usize,
    /// Sockets are spread over this many channels; event `i` goes to channel `i % channels`.
    pub channels: usize,
    pub events: usize,
    pub rate: f64,
    pub bytes: usize,
}

pub async fn run(plan: FloorPlan, source_ips: &str) -> anyhow::Result<Report> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let channels = plan.channels.clamp(1, plan.connections.max(1));
    // Socket `s` is on channel `s % channels`; event `e` goes to channel `e % channels`.
    let writes: u64 = (0..plan.events)
        .map(|e| {
            (0..plan.connections)
                .filter(|s| s % channels == e % channels)
                .count() as u64
        })
        .sum();
    let expected = writes * plan.bytes as u64;
    let mut reader = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--source-ips", source_ips, "floor-reader"])
        .args(["--addr", &addr.to_string()])
        .args(["--connections", &plan.connections.to_string()])
        .args(["--expected", &expected.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the reader")?;
    let mut sockets = Vec::with_capacity(plan.connections);
    while sockets.len() < plan.connections {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
            .await
            .context("the reader connects")??;
        stream.set_nodelay(true)?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        sockets.push(stream);
    }
    // One thread, blocking writes: the reader drains, so each write is one syscall that
    // returns at once.
    let FloorPlan {
        events,
        rate,
        bytes,
        connections,
        ..
    } = plan;
    let mut groups: Vec<Vec<std::net::TcpStream>> = (0..channels).map(|_| Vec::new()).collect();
    for (i, socket) in sockets.into_iter().enumerate() {
        groups[i % channels].push(socket);
    }
    let before = cpu_time(std::process::id())?;
    let (passes, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let chunk = vec![b'x'; bytes];
        let started = Instant::now();
        let mut passes = Vec::with_capacity(events);
        for i in 0..events {
            if rate > 0.0 {
                let at = started + Duration::from_secs_f64(i as f64 / rate);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            let pass = Instant::now();
            for socket in &mut groups[i % channels] {
                socket.write_all(&chunk)?;
            }
            passes.push(pass.elapsed());
        }
        Ok((passes, started.elapsed()))
    })
    .await??;
    let writer_cpu = cpu_time(std::process::id())?.saturating_sub(before);
    let mut lines = BufReader::new(reader.stdout.take().context("reader output")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the reader finishes")??
        .context("the reader's figures")?;
    let figures: serde_json::Value = serde_json::from_str(&line)?;
    let received = figures["bytes"].as_u64().unwrap_or(0);
    let reader_cpu = Duration::from_millis(figures["cpu_ms"].as_u64().unwrap_or(0));
    if received != expected {
        bail!("the reader got {received} of {expected} bytes");
    }
    let mut report = Report::new(format!(
        "floor: one {bytes}-byte write per delivery to {connections} loopback sockets over {channels} channels, {events} events at {}",
        if rate > 0.0 {
            format!("{rate}/s")
        } else {
            "full speed".into()
        }
    ));
    // In the fan-out table, next to the servers.
    report.set("kind", "fanout");
    report.set("target", "floor");
    report.set("transport", "tcp");
    report.set("subscribers", connections as u64);
    report.set("channels", channels as u64);
    report.set(
        "rate",
        if rate > 0.0 {
            serde_json::json!(rate)
        } else {
            serde_json::json!("max")
        },
    );
    report.set("events", events as u64);
    report.set("lost", 0u64);
    report.set("duplicates", 0u64);
    report.set("out_of_order", 0u64);
    report.set("expected", writes);
    report.set("delivered", writes);
    report.row(
        "writes",
        format!("{} of {bytes} bytes, all read back", thousands(writes)),
    );
    let rate_per_s = writes as f64 / elapsed.as_secs_f64().max(1e-9);
    report.row(
        "throughput",
        format!("{} writes/s", thousands(rate_per_s as u64)),
    );
    report.set("deliveries_per_s", rate_per_s.round());
    let pairs: Vec<(u64, u64)> = passes.iter().map(|d| (d.as_micros() as u64, 1)).collect();
    report.latency("one event's pass over every socket", "latency", &pairs);
    report.cpu("writer CPU", "server", writer_cpu, writes, "delivery");
    report.row(
        "generator CPU",
        format!("{:.2} s in the reader process", reader_cpu.as_secs_f64()),
    );
    report.set("generator_cpu_s", reader_cpu.as_secs_f64());
    Ok(report)
}

/// The reader process: connects, drains every socket until the writer closes them, prints
/// `{"bytes":…,"cpu_ms":…}`.
pub async fn reader(
    addr: SocketAddr,
    connections: usize,
    expected: u64,
    sources: Sources,
) -> anyhow::Result<()> {
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let mut stream = sources.connect(addr).await?;
        let total = total.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while total.load(Ordering::Relaxed) < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = cpu_time(std::process::id())?;
    println!(
        "{{\"bytes\":{},\"cpu_ms\":{}}}",
        total.load(Ordering::Relaxed),
        cpu.as_millis()
    );
    tasks.abort_all();
    Ok(())
}
