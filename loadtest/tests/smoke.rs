//! Keeps the generator working: every scenario, small and short, against a real gateway and
//! publisher (in-memory broker) on ephemeral ports, checked through the generator's own
//! figures.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use eventgate_core::{
    Broker, BrokerConfig,
    auth::{AuthConfig, Verifier},
    limits::Rate,
};
use eventgate_gateway::GatewayConfig;
use eventgate_publisher::{PublisherAuth, PublisherConfig};

const SECRET: &str = "loadgen-smoke-secret-0123456789abcdef";
const KEY: &str = "loadgen-smoke-publisher-key";
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Stack {
    gateway: SocketAddr,
    publisher: SocketAddr,
    shutdown: CancellationToken,
}

async fn start() -> Stack {
    let broker = Broker::memory(&BrokerConfig::memory());
    let shutdown = CancellationToken::new();
    let gateway = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let publisher = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stack = Stack {
        gateway: gateway.local_addr().expect("addr"),
        publisher: publisher.local_addr().expect("addr"),
        shutdown: shutdown.clone(),
    };
    // One user on one address opening many streams at once: limits that never refuse it.
    let unlimited = Rate::new(1_000_000, Duration::from_secs(1), 1_000_000);
    let auth = AuthConfig {
        jwt_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    let publisher_config = PublisherConfig {
        publisher_api_keys: vec![KEY.into()],
        rate_limit_publish: unlimited,
        ..PublisherConfig::default()
    };
    tokio::spawn(eventgate_gateway::run(
        GatewayConfig {
            rate_limit_connect: unlimited,
            max_connections_per_ip: 0,
            max_connections_per_user: 0,
            ..GatewayConfig::default()
        },
        broker.clone(),
        Verifier::new(&auth).expect("verifier"),
        gateway,
        shutdown.clone(),
    ));
    let publisher_auth = PublisherAuth::from_config(&publisher_config, &auth).expect("auth");
    tokio::spawn(eventgate_publisher::run(
        publisher_config,
        broker,
        publisher_auth,
        publisher,
        shutdown,
    ));
    stack
}

/// Runs loadgen with `args` against the gateway and publisher; returns its JSON figures.
fn loadgen(gateway: SocketAddr, publisher: SocketAddr, results: &Path, args: &[&str]) -> Value {
    let gateway = format!("http://{gateway}");
    let publisher = format!("http://{publisher}");
    let mut full: Vec<&str> = vec!["--json", results.to_str().expect("path")];
    full.extend_from_slice(args);
    full.extend_from_slice(&[
        "--gateway",
        &gateway,
        "--publisher",
        &publisher,
        "--publisher-key",
        KEY,
    ]);
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(&full)
        .output()
        .expect("run loadgen");
    assert!(
        output.status.success(),
        "loadgen {full:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = std::fs::read_to_string(results).expect("results");
    serde_json::from_str(lines.lines().last().expect("a result line")).expect("JSON figures")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports_exact_figures() {
    let stack = start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let results = dir.path().join("results.jsonl");
    let (gateway, publisher) = (stack.gateway, stack.publisher);
    let run = |args: &'static [&'static str]| {
        let results = results.clone();
        tokio::task::spawn_blocking(move || loadgen(gateway, publisher, &results, args))
    };

    let sse = run(&[
        "fanout",
        "--subscribers",
        "300",
        "--channels",
        "3",
        "--rate",
        "200",
        "--events",
        "200",
    ])
    .await
    .expect("join");
    assert_eq!(sse["subscribers"], 300);
    assert_eq!(sse["delivered"], sse["expected"]);
    assert_eq!(sse["expected"], 200 * 100);
    for key in ["lost", "duplicates", "out_of_order", "resets"] {
        assert_eq!(sse[key], 0, "{key}: {sse}");
    }
    assert!(sse["latency_p50_ms"].as_f64().is_some_and(|ms| ms > 0.0));

    let ws = run(&[
        "--procs",
        "2",
        "fanout",
        "--transport",
        "ws",
        "--subscribers",
        "200",
        "--rate",
        "0",
        "--events",
        "100",
    ])
    .await
    .expect("join");
    assert_eq!(
        ws["delivered"],
        200 * 100,
        "two generator processes, as fast as delivered: {ws}"
    );
    assert_eq!(ws["lost"], 0);

    // The floor: one write per delivery, every byte read back by its reader process.
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--json", results.to_str().expect("path"), "floor"])
        .args(["--connections", "200", "--channels", "4", "--events", "20"])
        .args(["--rate", "0"])
        .output()
        .expect("run loadgen floor");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = std::fs::read_to_string(&results).expect("results");
    let floor: Value = serde_json::from_str(lines.lines().last().expect("a line")).expect("JSON");
    assert_eq!(floor["target"], "floor");
    assert_eq!(
        floor["delivered"],
        20 * 50,
        "each event to its channel's 50 sockets"
    );
    assert!(
        floor["server_cpu_us_per_delivery"]
            .as_f64()
            .is_some_and(|us| us >= 0.0),
        "{floor}"
    );

    let idle = run(&["idle", "--connections", "300", "--hold", "100ms"])
        .await
        .expect("join");
    assert_eq!(idle["connections"], 300);
    assert_eq!(idle["held"], 300);

    let publish = run(&[
        "publish",
        "--clients",
        "4",
        "--batch",
        "10",
        "--duration",
        "500ms",
    ])
    .await
    .expect("join");
    assert!(
        publish["events"]
            .as_u64()
            .is_some_and(|n| n > 0 && n % 10 == 0),
        "{publish}"
    );
    assert_eq!(publish["errors"], 0);

    let resume = run(&[
        "resume",
        "--clients",
        "100",
        "--behind",
        "50",
        "--timeout",
        "20s",
    ])
    .await
    .expect("join");
    assert_eq!(resume["caught_up"], 100, "{resume}");
    assert_eq!(resume["lost"], 0);
    assert_eq!(resume["duplicates"], 0);

    // The Markdown tables of BENCHMARKS.md come from the same figures.
    let tables = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["report", "--input", results.to_str().expect("path")])
        .output()
        .expect("report");
    let tables = String::from_utf8_lossy(&tables.stdout);
    for heading in ["#### fanout", "#### idle", "#### publish", "#### resume"] {
        assert!(tables.contains(heading), "{tables}");
    }
    stack.shutdown.cancel();
}
