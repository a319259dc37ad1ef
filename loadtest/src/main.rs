//! `loadgen`: drives eventgate (or nchan, to compare) with many subscribers on loopback and
//! prints what it measured: deliveries, loss, duplicates, latency, memory and CPU.

mod floor;
mod net;
mod publisher;
mod report;
mod shards;
mod subscriber;
mod target;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use crate::{
    net::{Sources, cpu_of, cpu_time, now_micros, raise_file_limit, rss},
    publisher::{HttpConn, Plan, fan_out, publish},
    report::{Report, thousands},
    shards::Shards,
    subscriber::{SubscriberSpec, histogram, pairs},
    target::{Base, Kind, Target, Transport, payload},
};

/// Load generator for eventgate and, for comparison, nchan. Sends traffic only to loopback.
#[derive(Parser)]
#[command(name = "loadgen", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,

    /// Source addresses for client sockets (a 127.x range).
    #[arg(long, global = true, default_value = "127.0.0.2-127.0.0.40")]
    source_ips: String,

    /// Generator processes holding the subscribers (each may hold up to ~19,000 sockets).
    #[arg(long, global = true, default_value_t = 1)]
    procs: usize,

    /// PIDs of the server processes, for their CPU time and memory (repeat for several).
    #[arg(long = "server-pid", global = true)]
    server_pids: Vec<u32>,

    /// Also append the figures as one JSON line to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,

    /// Label of this run in the JSON figures.
    #[arg(long, global = true, default_value = "")]
    label: String,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers over C channels; events at a rate or as fast as they are delivered.
    Fanout(FanoutArgs),
    /// N connections held open; the server's memory per connection.
    Idle(IdleArgs),
    /// Publisher throughput with keep-alive clients, single events or batches.
    Publish(PublishArgs),
    /// K clients reconnecting at once, E events behind.
    Resume(ResumeArgs),
    /// The floor: one write per delivery to N loopback sockets, drained by a reader process.
    Floor(FloorArgs),
    /// (internal) The floor's reader process.
    #[command(hide = true)]
    FloorReader {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        expected: u64,
    },
    /// Prints the figures appended with `--json` as Markdown tables.
    Report {
        /// The JSON lines file.
        #[arg(long)]
        input: PathBuf,
    },
    /// (internal) One generator process of a multi-process run.
    #[command(hide = true)]
    Shard {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Args, Clone)]
struct FloorArgs {
    /// Sockets written to (subscribers).
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Channels the sockets are spread over; each event is one write to each socket of its
    /// channel.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Events, round-robin over the channels.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Events per second; 0: as fast as the writes go.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Bytes per write: an SSE event of the fan-out scenarios' default payload is ~236.
    #[arg(long, default_value_t = 236)]
    bytes: usize,
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value_t = Kind::Eventgate)]
    target: Kind,
    /// Gateway base URL; repeat to spread subscribers over replicas (nchan: the nginx URL).
    #[arg(long = "gateway", default_value = "http://127.0.0.1:8080")]
    gateways: Vec<String>,
    /// Publisher base URL (nchan: the nginx URL).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    publisher: String,
    /// eventgate publisher API key.
    #[arg(long, env = "EVENTGATE_PUBLISHER_KEY", hide_env_values = true)]
    publisher_key: Option<String>,
    /// eventgate subscriber token; without one, a token for every channel is minted with the
    /// publisher key (`POST /v1/tokens`).
    #[arg(long, env = "EVENTGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl TargetArgs {
    async fn target(&self, sources: &Arc<Sources>) -> anyhow::Result<Target> {
        let mut target = Target {
            kind: self.target,
            gateways: self
                .gateways
                .iter()
                .map(|g| Base::parse(g))
                .collect::<Result<_, _>>()?,
            publisher: Base::parse(&self.publisher)?,
            token: self.token.clone(),
            publisher_key: self.publisher_key.clone(),
        };
        if target.kind == Kind::Nchan {
            // Same requests for both systems: nchan gets no credentials to skip.
            target.token = None;
            target.publisher_key = None;
        } else if target.token.is_none() && target.publisher_key.is_some() {
            target.token = Some(mint_token(&target, sources).await?);
        }
        Ok(target)
    }
}

/// A token reading every channel for the run, from the publisher's `POST /v1/tokens`.
async fn mint_token(target: &Target, sources: &Arc<Sources>) -> anyhow::Result<String> {
    let mut conn = HttpConn::publisher(target, sources.clone());
    let body = r#"{"sub":"loadgen","channels":["*"],"ttl_seconds":86400}"#;
    let (status, answer) = conn
        .post("/v1/tokens", bytes::Bytes::from_static(body.as_bytes()))
        .await?;
    if status != 200 {
        bail!(
            "minting a token: status {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    answer["token"]
        .as_str()
        .map(str::to_owned)
        .context("minting a token: no token in the answer")
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Events per second over all channels; 0 = as fast as subscribers keep up.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Events to publish in all.
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// With --rate 0: events per channel published but not yet delivered everywhere.
    #[arg(long, default_value_t = 50)]
    window: u64,
    /// How long to wait for deliveries after the last publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Distinct channels the connections subscribe to.
    #[arg(long, default_value_t = 1000)]
    channels: usize,
    /// How long to hold the connections after measuring.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    hold: Duration,
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Events per request (eventgate batches; nchan takes 1).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 128)]
    payload: usize,
}

#[derive(Args)]
struct ResumeArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    /// Clients reconnecting at once.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Events each client missed.
    #[arg(long, default_value_t = 1000)]
    behind: u64,
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long, default_value_t = 2000)]
    connect_concurrency: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.scenario {
        Scenario::Shard { spec } => return shards::run_child(spec).await,
        Scenario::FloorReader {
            addr,
            connections,
            expected,
        } => {
            raise_file_limit();
            let sources = Sources::parse(&cli.source_ips)?;
            return floor::reader(*addr, *connections, *expected, sources).await;
        }
        Scenario::Report { input } => {
            print!("{}", report::markdown(&std::fs::read_to_string(input)?)?);
            return Ok(());
        }
        _ => {}
    }
    let limit = raise_file_limit();
    let sources = Arc::new(Sources::parse(&cli.source_ips)?);
    let started_cpu = cpu_time(std::process::id()).unwrap_or_default();
    let mut report = match &cli.scenario {
        Scenario::Fanout(args) => fanout(&cli, args, sources).await?,
        Scenario::Idle(args) => idle(&cli, args, sources).await?,
        Scenario::Publish(args) => publish_scenario(&cli, args, sources).await?,
        Scenario::Resume(args) => resume(&cli, args, sources).await?,
        Scenario::Floor(args) => {
            let plan = floor::FloorPlan {
                connections: args.connections,
                channels: args.channels,
                events: args.events,
                rate: args.rate,
                bytes: args.bytes,
            };
            floor::run(plan, &cli.source_ips).await?
        }
        Scenario::Shard { .. } | Scenario::Report { .. } | Scenario::FloorReader { .. } => {
            return Ok(());
        }
    };
    let own = cpu_time(std::process::id())
        .unwrap_or_default()
        .saturating_sub(started_cpu);
    report.row(
        "generator",
        format!(
            "{:.2} s CPU in the coordinating process, file limit {limit}",
            own.as_secs_f64()
        ),
    );
    report.set("label", cli.label.clone());
    report.print();
    if let Some(path) = &cli.json {
        report.append_json(path)?;
    }
    Ok(())
}

fn unique_prefix(name: &str) -> String {
    format!("{name}{}", now_micros() % 1_000_000_000)
}

fn subscribers_on(channel: usize, subscribers: usize, channels: usize) -> u64 {
    ((subscribers + channels - 1 - channel) / channels) as u64
}

async fn fanout(cli: &Cli, args: &FanoutArgs, sources: Arc<Sources>) -> anyhow::Result<Report> {
    let target = args.target.target(&sources).await?;
    let prefix = unique_prefix("fan");
    let spec = SubscriberSpec::live(
        target.clone(),
        args.transport,
        prefix.clone(),
        args.subscribers,
        args.channels,
        cli.source_ips.clone(),
        args.connect_concurrency,
    );
    let connecting = Instant::now();
    let shards = Shards::start(spec, cli.procs).await?;
    if !shards.wait_ready(Duration::from_secs(120)).await {
        bail!(
            "subscribers did not connect within 120 s ({} connected)",
            shards.connected()
        );
    }
    let connect_time = connecting.elapsed();
    let server_cpu = cpu_of(&cli.server_pids);
    let plan = Plan {
        channels: args.channels.max(1),
        events: args.events,
        rate: args.rate,
        payload: args.payload,
        window: args.window,
        subscribers_per_channel: args.subscribers as f64 / args.channels.max(1) as f64,
    };
    let published = fan_out(&target, &prefix, &plan, sources, || shards.delivered()).await?;
    let expected: u64 = published
        .per_channel
        .iter()
        .enumerate()
        .map(|(c, n)| n * subscribers_on(c, shards.connected() as usize, plan.channels))
        .sum();
    // Wait until everything arrived, or nothing more arrives for `drain`.
    let (mut last, mut last_change) = (shards.delivered(), Instant::now());
    let mut done_at = Instant::now();
    loop {
        let now = shards.delivered();
        if now != last {
            (last, last_change, done_at) = (now, Instant::now(), Instant::now());
        }
        if now >= expected || last_change.elapsed() > args.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server_cpu = cpu_of(&cli.server_pids).saturating_sub(server_cpu);
    let result = shards.finish().await?;
    let unique = result.delivered.saturating_sub(result.duplicates);
    let elapsed = done_at
        .max(published.finished)
        .duration_since(published.started)
        .as_secs_f64();
    let events: u64 = published.per_channel.iter().sum();

    let mut report = Report::new(format!(
        "fanout: {:?} {} subscribers over {} channels, {} events at {}",
        target.kind,
        args.subscribers,
        plan.channels,
        args.events,
        if args.rate > 0.0 {
            format!("{}/s", args.rate)
        } else {
            "full speed".into()
        }
    ));
    report.set("kind", "fanout");
    report.set("target", format!("{:?}", target.kind).to_lowercase());
    report.set("transport", format!("{:?}", args.transport).to_lowercase());
    report.set(
        "rate",
        if args.rate > 0.0 {
            serde_json::json!(args.rate)
        } else {
            serde_json::json!("max")
        },
    );
    report.set("channels", plan.channels as u64);
    report.row(
        "subscribers",
        format!(
            "{} connected, {} failed in {:.2} s",
            result.connected,
            result.failed,
            connect_time.as_secs_f64()
        ),
    );
    report.latency("connect time", "connect", &result.connect);
    report.row(
        "published",
        format!(
            "{events} events ({} errors) in {:.2} s",
            published.errors,
            published
                .finished
                .duration_since(published.started)
                .as_secs_f64()
        ),
    );
    report.row(
        "deliveries",
        format!(
            "{} of {} expected: {} lost, {} duplicates, {} out of order, {} resets, {} closed early",
            thousands(unique),
            thousands(expected),
            expected.saturating_sub(unique),
            result.duplicates,
            result.gaps,
            result.resets,
            result.closed_early
        ),
    );
    let rate = unique as f64 / elapsed.max(1e-9);
    report.row(
        "throughput",
        format!(
            "{} deliveries/s over {elapsed:.2} s",
            thousands(rate as u64)
        ),
    );
    report.latency("publish → receive", "latency", &result.latency);
    report.cpu("server CPU", "server", server_cpu, unique, "delivery");
    report.row(
        "generator CPU",
        format!(
            "{:.2} s in subscriber processes",
            result.cpu_ms as f64 / 1000.0
        ),
    );
    for (key, value) in [
        ("subscribers", result.connected),
        ("failed", result.failed),
        ("events", events),
        ("expected", expected),
        ("delivered", unique),
        ("lost", expected.saturating_sub(unique)),
        ("duplicates", result.duplicates),
        ("out_of_order", result.gaps),
        ("resets", result.resets),
    ] {
        report.set(key, value);
    }
    report.set("deliveries_per_s", rate.round());
    report.set("generator_cpu_s", result.cpu_ms as f64 / 1000.0);
    Ok(report)
}

async fn idle(cli: &Cli, args: &IdleArgs, sources: Arc<Sources>) -> anyhow::Result<Report> {
    let target = args.target.target(&sources).await?;
    let before: u64 = cli.server_pids.iter().filter_map(|&p| rss(p).ok()).sum();
    let spec = SubscriberSpec::live(
        target.clone(),
        args.transport,
        unique_prefix("idle"),
        args.connections,
        args.channels,
        cli.source_ips.clone(),
        args.connect_concurrency,
    );
    let connecting = Instant::now();
    let shards = Shards::start(spec, cli.procs).await?;
    let all = shards.wait_ready(Duration::from_secs(300)).await;
    let connect_time = connecting.elapsed();
    // Let allocations settle (pending writes, timers armed on connect).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: u64 = cli.server_pids.iter().filter_map(|&p| rss(p).ok()).sum();
    let connected = shards.connected();
    tokio::time::sleep(args.hold).await;
    let still = shards.connected();
    let result = shards.finish().await?;
    let per = after.saturating_sub(before) as f64 / connected.max(1) as f64;

    let mut report = Report::new(format!(
        "idle: {:?} {} {:?} connections over {} channels",
        target.kind, args.connections, args.transport, args.channels
    ));
    report.set("kind", "idle");
    report.set("target", format!("{:?}", target.kind).to_lowercase());
    report.set("transport", format!("{:?}", args.transport).to_lowercase());
    report.row(
        "connections",
        format!(
            "{} connected, {} failed{} in {:.2} s; {} closed while held",
            connected,
            result.failed,
            if all { "" } else { " (timed out)" },
            connect_time.as_secs_f64(),
            result.closed_early
        ),
    );
    report.latency("connect time", "connect", &result.connect);
    report.row(
        "server RSS",
        format!(
            "{:.1} MiB before, {:.1} MiB after: {:.2} KiB per connection",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per / 1024.0
        ),
    );
    report.set("connections", connected);
    report.set("held", still);
    report.set("failed", result.failed);
    report.set("rss_before_mib", report::round(before as f64 / 1048576.0));
    report.set("rss_after_mib", report::round(after as f64 / 1048576.0));
    report.set("kib_per_connection", report::round(per / 1024.0));
    Ok(report)
}

async fn publish_scenario(
    cli: &Cli,
    args: &PublishArgs,
    sources: Arc<Sources>,
) -> anyhow::Result<Report> {
    let target = args.target.target(&sources).await?;
    if target.kind == Kind::Nchan && args.batch > 1 {
        bail!("nchan publishes one message per request; use --batch 1");
    }
    let prefix = unique_prefix("pub");
    let server_cpu = cpu_of(&cli.server_pids);
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..args.clients {
        let mut conn = HttpConn::publisher(&target, sources.clone());
        let (target, channel, batch, size) = (
            target.clone(),
            Target::channel(&prefix, client),
            args.batch,
            args.payload,
        );
        tasks.spawn(async move {
            let mut latency = histogram();
            let (mut events, mut errors, mut n) = (0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let payloads: Vec<String> = (0..batch)
                    .map(|k| payload(n + k as u64, now_micros(), size))
                    .collect();
                n += batch as u64;
                let sent = Instant::now();
                match publish(&mut conn, &target, &channel, &payloads).await {
                    Ok(_) => {
                        events += batch as u64;
                        let _ = latency.record(sent.elapsed().as_micros().max(1) as u64);
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("{e:#}");
                        }
                    }
                }
            }
            (events, errors, pairs(&latency))
        });
    }
    let (mut events, mut errors, mut latency) = (0, 0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (e, err, l) = done.context("publisher task")?;
        events += e;
        errors += err;
        latency.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = cpu_of(&cli.server_pids).saturating_sub(server_cpu);
    let mut report = Report::new(format!(
        "publish: {:?} {} clients, {} event(s) per request, {:.0} s",
        target.kind,
        args.clients,
        args.batch,
        args.duration.as_secs_f64()
    ));
    report.set("kind", "publish");
    report.set("target", format!("{:?}", target.kind).to_lowercase());
    report.set("batch", args.batch as u64);
    report.set("clients", args.clients as u64);
    let rate = events as f64 / elapsed;
    report.row(
        "accepted",
        format!(
            "{} events in {elapsed:.2} s: {} events/s, {} requests/s, {errors} errors",
            thousands(events),
            thousands(rate as u64),
            thousands((rate / args.batch as f64) as u64)
        ),
    );
    report.latency("request latency", "latency", &latency);
    report.cpu("server CPU", "server", server_cpu, events, "event");
    report.set("events", events);
    report.set("errors", errors);
    report.set("events_per_s", rate.round());
    Ok(report)
}

async fn resume(cli: &Cli, args: &ResumeArgs, sources: Arc<Sources>) -> anyhow::Result<Report> {
    let target = args.target.target(&sources).await?;
    let prefix = unique_prefix("resume");
    let channel = Target::channel(&prefix, 0);
    let mut conn = HttpConn::publisher(&target, sources.clone());
    // The anchor: clients resume from its id, so they miss exactly the events after it.
    let answer = publish(
        &mut conn,
        &target,
        &channel,
        &[payload(0, now_micros(), args.payload)],
    )
    .await?;
    let anchor = anchor_id(target.kind, &answer)?;
    let mut n = 1;
    while n <= args.behind {
        let batch = if target.kind == Kind::Eventgate {
            100.min(args.behind - n + 1)
        } else {
            1
        };
        let payloads: Vec<String> = (0..batch)
            .map(|k| payload(n + k, now_micros(), args.payload))
            .collect();
        publish(&mut conn, &target, &channel, &payloads).await?;
        n += batch;
    }
    let spec = SubscriberSpec {
        resume_from: Some(anchor),
        first_n: 1,
        expect: Some(args.behind),
        ..SubscriberSpec::live(
            target.clone(),
            args.transport,
            prefix,
            args.clients,
            1,
            cli.source_ips.clone(),
            args.connect_concurrency,
        )
    };
    let server_cpu = cpu_of(&cli.server_pids);
    let started = Instant::now();
    let shards = Shards::start(spec, cli.procs).await?;
    let deadline = started + args.timeout;
    while shards.caught_up() < args.clients as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let caught_up_in = started.elapsed();
    let server_cpu = cpu_of(&cli.server_pids).saturating_sub(server_cpu);
    let result = shards.finish().await?;
    let expected = args.clients as u64 * args.behind;
    let unique = result.delivered.saturating_sub(result.duplicates);
    let mut report = Report::new(format!(
        "resume: {:?} {} {:?} clients reconnecting {} events behind",
        target.kind, args.clients, args.transport, args.behind
    ));
    report.set("kind", "resume");
    report.set("target", format!("{:?}", target.kind).to_lowercase());
    report.set("behind", args.behind);
    report.row(
        "caught up",
        format!(
            "{} of {} clients in {:.3} s",
            result.caught_up,
            args.clients,
            caught_up_in.as_secs_f64()
        ),
    );
    report.latency("connect time", "connect", &result.connect);
    report.row(
        "deliveries",
        format!(
            "{} of {}: {} lost, {} duplicates, {} out of order, {} resets, {} failed",
            thousands(unique),
            thousands(expected),
            expected.saturating_sub(unique),
            result.duplicates,
            result.gaps,
            result.resets,
            result.failed
        ),
    );
    report.cpu("server CPU", "server", server_cpu, unique, "delivery");
    report.set("clients", args.clients as u64);
    report.set("caught_up", result.caught_up);
    report.set("seconds", report::round(caught_up_in.as_secs_f64()));
    report.set("lost", expected.saturating_sub(unique));
    report.set("duplicates", result.duplicates);
    Ok(report)
}

/// The id of the event a publish answered with: eventgate's `published[0].id`, nchan's
/// `last_message_id`.
fn anchor_id(kind: Kind, answer: &[u8]) -> anyhow::Result<String> {
    let answer: serde_json::Value =
        serde_json::from_slice(answer).context("publish answer is not JSON")?;
    let id = match kind {
        Kind::Eventgate => &answer["published"][0]["id"],
        Kind::Nchan => &answer["last_message_id"],
    };
    id.as_str()
        .map(str::to_owned)
        .context("no id in the publish answer")
}
