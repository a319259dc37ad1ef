//! The `eventgate` binary as users run it: printed commands that work, clear start-up errors,
//! graceful exit on SIGTERM, and no secret in its output.

mod support;

use std::process::Stdio;

use reqwest::StatusCode;
use support::{
    RedisServer, SOON, TEST_PUBLISHER_KEY, TEST_SECRET,
    process::{eventgate, run_to_exit},
    redis::free_port,
    wait_until,
};

/// Key material for the `gateway` and `publisher` commands.
const KEYS: [(&str, &str); 2] = [
    ("JWT_SECRET", TEST_SECRET),
    ("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY),
];

/// The value printed after `label` in standalone's banner.
fn printed_value(lines: &[String], label: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label} in {lines:#?}"))
}
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, Command},
};

/// Reads stdout lines until one satisfies `want`; returns every line read.
async fn read_until(child: &mut Child, lines: &mut Vec<String>, want: impl Fn(&str) -> bool) {
    let stdout = child.stdout.as_mut().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let found = tokio::time::timeout(SOON, async {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.expect("read stdout") == 0 {
                return false;
            }
            let line = line.trim_end().to_owned();
            let hit = want(&line);
            lines.push(line);
            if hit {
                return true;
            }
        }
    })
    .await;
    assert!(matches!(found, Ok(true)), "eventgate printed: {lines:#?}");
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_prints_curl_commands_that_work_and_exits_on_sigterm() {
    let mut server = eventgate(
        &[],
        &[
            ("GATEWAY_ADDR", "127.0.0.1:0"),
            ("PUBLISHER_ADDR", "127.0.0.1:0"),
        ],
    );
    let mut lines = Vec::new();
    read_until(&mut server, &mut lines, |l| l.contains("-X POST")).await;
    let curls: Vec<String> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("curl "))
        .cloned()
        .collect();
    assert_eq!(
        curls.len(),
        2,
        "a subscribing and a publishing command: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l.contains("in-memory broker")));
    // No keys configured: a secret, a publisher key and a ready token are made and printed.
    for label in ["JWT_SECRET", "PUBLISHER_API_KEYS", "subscriber token"] {
        assert!(
            printed_value(&lines, label).len() >= 32,
            "{label}: {lines:#?}"
        );
    }

    // The subscribing command, run by a real shell and curl.
    let mut subscriber = Command::new("sh")
        .args(["-c", &format!("exec {} --max-time 20", curls[0].trim())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("curl");
    let gateway = curls[0]
        .split('\'')
        .find(|part| part.starts_with("http"))
        .expect("URL")
        .split("/v1/")
        .next()
        .expect("base")
        .to_owned();
    let http = reqwest::Client::new();
    let connected = wait_until(SOON, || async {
        let stats: serde_json::Value = match http.get(format!("{gateway}/v1/stats")).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        stats["connections"] == 1
    })
    .await;
    assert!(connected, "the printed subscribe command connects");

    let publish = Command::new("sh")
        .args(["-c", curls[1].trim()])
        .output()
        .await
        .expect("curl publish");
    let answer = String::from_utf8_lossy(&publish.stdout);
    assert!(
        answer.contains(r#""published":[{"channel":"orders","id":""#),
        "{answer}"
    );

    let mut stream = subscriber.stdout.take().expect("curl stdout");
    let mut seen = Vec::new();
    let got = tokio::time::timeout(SOON, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(r#""data":{"id":42}"#) {
            let n = stream.read(&mut buf).await.expect("read curl");
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        got.is_ok() && seen.contains("event: order:created"),
        "curl saw: {seen}"
    );

    // SIGTERM with a stream open: the stream ends and the process exits 0, promptly.
    sigterm(&server);
    let status = tokio::time::timeout(SOON, server.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status:?}");
    let curl_done = tokio::time::timeout(SOON, subscriber.wait()).await;
    assert!(
        curl_done.is_ok(),
        "the open stream was ended by the shutdown"
    );
}

#[tokio::test]
async fn gateway_and_publisher_refuse_to_start_without_redis_url() {
    for role in ["gateway", "publisher"] {
        let (code, output) = run_to_exit(&[role], &KEYS).await;
        assert_eq!(code, Some(64), "{output}");
        assert!(output.contains("REDIS_URL"), "{output}");
        assert!(
            output.contains("standalone"),
            "points to the way without Redis: {output}"
        );
    }
}

#[tokio::test]
async fn unreachable_redis_exits_69_naming_it_without_the_password() {
    let port = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    for role in ["gateway", "publisher"] {
        let (code, output) = run_to_exit(
            &[role],
            &[
                KEYS[0],
                KEYS[1],
                ("REDIS_URL", &url),
                ("REDIS_TIMEOUT", "1s"),
            ],
        )
        .await;
        assert_eq!(code, Some(69), "{output}");
        assert!(output.contains(&format!("127.0.0.1:{port}")), "{output}");
        assert!(!output.contains("hunter2"), "the password leaked: {output}");
    }
}

#[tokio::test]
async fn sentinel_settings_are_checked_at_start() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("REDIS_SENTINELS", "127.0.0.1:26379")],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            &[
                ("REDIS_SENTINELS", "127.0.0.1:26379"),
                ("REDIS_SENTINEL_MASTER", "m"),
                ("REDIS_URL", "redis://127.0.0.1:6379"),
            ],
            "set one of REDIS_URL, REDIS_SENTINELS",
        ),
        (
            &[
                ("REDIS_SENTINELS", "sentinel-a"),
                ("REDIS_SENTINEL_MASTER", "m"),
            ],
            "REDIS_SENTINELS",
        ),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("REDIS_PASSWORD", "hunter2"),
            ],
            "in the URL",
        ),
    ];
    for (env, says) in cases {
        let mut all = KEYS.to_vec();
        all.extend_from_slice(env);
        let (code, output) = run_to_exit(&["publisher"], &all).await;
        assert_eq!(code, Some(64), "{env:?}: {output}");
        assert!(output.contains(says), "{env:?}: {output}");
        assert!(!output.contains("hunter2"), "{output}");
    }
    // No Sentinel answers: 69, naming the master and the Sentinels.
    let sentinel = format!("127.0.0.1:{}", free_port());
    let env = [
        KEYS[0],
        KEYS[1],
        ("REDIS_SENTINELS", sentinel.as_str()),
        ("REDIS_SENTINEL_MASTER", "orders-redis"),
        ("REDIS_TIMEOUT", "1s"),
    ];
    let (code, output) = run_to_exit(&["gateway"], &env).await;
    assert_eq!(code, Some(69), "{output}");
    assert!(
        output.contains("orders-redis") && output.contains(&sentinel),
        "{output}"
    );
}

#[tokio::test]
async fn a_bad_setting_is_refused_by_name() {
    let (code, output) = run_to_exit(&[], &[("HEARTBEAT_INTERVAL", "fast")]).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(
        output.contains("HEARTBEAT_INTERVAL") || output.contains("heartbeat-interval"),
        "{output}"
    );
    let (code, output) = run_to_exit(&["gateway", "--history-max-len", "0"], &[]).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("history-max-len"), "{output}");
}

/// Finds "listening on http://…" in a service's output.
async fn listening_url(child: &mut Child) -> String {
    let mut lines = Vec::new();
    read_until(child, &mut lines, |l| l.contains("listening on http://")).await;
    let line = lines.last().expect("line");
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("URL")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_publisher_processes_work_on_a_password_protected_redis() {
    let redis = RedisServer::start_with_password("s3cret-pw").await;
    let url = redis.url();
    let common = [
        ("REDIS_URL", url.as_str()),
        ("LOG_FORMAT", "json"),
        KEYS[0],
        KEYS[1],
    ];
    let mut gateway = eventgate(&["gateway", "--gateway-addr", "127.0.0.1:0"], &common);
    let mut publisher_env = common.to_vec();
    publisher_env.push(("PUBLISHER_ADDR", "127.0.0.1:0"));
    let mut publisher = eventgate(&["publisher"], &publisher_env);
    let gateway_url = listening_url(&mut gateway).await;
    let publisher_url = listening_url(&mut publisher).await;

    let http = support::authed_client();
    let mut client = support::SseClient::connect(
        &http,
        &format!("{gateway_url}/v1/events?channel=orders"),
        None,
    )
    .await;
    assert_eq!(client.status, StatusCode::OK);
    client.next_block(SOON).await.expect("opening");
    let answer = http
        .post(format!("{publisher_url}/v1/publish"))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .header("content-type", "application/json")
        .body(r#"{"channel":"orders","data":{"paid":true}}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    let event = client.next_event(SOON).await.expect("event");
    assert_eq!(event.envelope["data"], serde_json::json!({"paid": true}));
    drop(client);

    for child in [&gateway, &publisher] {
        sigterm(child);
    }
    for child in [&mut gateway, &mut publisher] {
        let mut err = String::new();
        let mut stderr = child.stderr.take().expect("stderr");
        tokio::time::timeout(SOON, stderr.read_to_string(&mut err))
            .await
            .expect("stderr closes")
            .expect("read");
        let status = tokio::time::timeout(SOON, child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "{status:?}: {err}");
        assert!(
            !err.contains("s3cret-pw"),
            "the Redis password leaked into the logs: {err}"
        );
        for line in err.lines().filter(|l| !l.is_empty()) {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(
                parsed.is_ok(),
                "LOG_FORMAT=json gives one JSON object per line: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_uses_redis_when_redis_url_is_set() {
    let redis = RedisServer::start_with_password("pw-standalone").await;
    let url = redis.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("GATEWAY_ADDR", "127.0.0.1:0"),
        ("PUBLISHER_ADDR", "127.0.0.1:0"),
    ];
    let mut server = eventgate(&["standalone"], &env);
    let mut lines = Vec::new();
    read_until(&mut server, &mut lines, |l| l.contains("-X POST")).await;
    let banner = lines.join("\n");
    assert!(
        banner.contains(&format!("Redis at redis://***@127.0.0.1:{}", redis.port)),
        "{banner}"
    );
    assert!(!banner.contains("pw-standalone"), "{banner}");
    let publisher = lines
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("publisher")
                .map(|u| u.trim().to_owned())
        })
        .expect("publisher URL");
    let key = printed_value(&lines, "PUBLISHER_API_KEYS");
    let answer = reqwest::Client::new()
        .post(format!("{publisher}/v1/publish"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"channel":"orders","data":1}"#)
        .send()
        .await
        .expect("publish");
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    let length: u64 = redis.query(&["XLEN", "eventgate:stream:orders"]).await;
    assert_eq!(length, 1, "the event went to Redis, not to memory");
}

#[tokio::test]
async fn gateway_and_publisher_refuse_to_start_without_key_material() {
    let redis = [("REDIS_URL", "redis://127.0.0.1:1")];
    let (code, output) = run_to_exit(&["gateway"], &redis).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("JWT_SECRET"), "{output}");
    let (code, output) = run_to_exit(&["gateway"], &[redis[0], ("JWT_SECRET", "too-short")]).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("at least 32 bytes"), "{output}");
    assert!(
        !output.contains("too-short"),
        "the secret is not echoed: {output}"
    );
    let (code, output) = run_to_exit(&["publisher"], &redis).await;
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("PUBLISHER_API_KEYS"), "{output}");
}

/// The base URL printed after `label` (`gateway` or `publisher`) in standalone's banner.
fn printed_url(lines: &[String], label: &str) -> String {
    lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .find(|v| v.starts_with("http://"))
        .unwrap_or_else(|| panic!("no {label} URL in {lines:#?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_the_logs() {
    let secret = "log-test-secret-0123456789abcdefghij";
    let keys = "log-test-key-full-0123456,log-test-key-orders-0123=orders";
    let mut server = eventgate(
        &[],
        &[
            ("GATEWAY_ADDR", "127.0.0.1:0"),
            ("PUBLISHER_ADDR", "127.0.0.1:0"),
            ("JWT_SECRET", secret),
            ("PUBLISHER_API_KEYS", keys),
            ("AUTH_COOKIE", "eg_session"),
            ("ALLOW_QUERY_TOKEN", "true"),
            ("LOG_FORMAT", "json"),
        ],
    );
    let mut lines = Vec::new();
    read_until(&mut server, &mut lines, |l| l.contains("/v1/tokens")).await;
    let gateway = printed_url(&lines, "gateway");
    let publisher = printed_url(&lines, "publisher");
    // Every credential value this run uses; none may appear in the output.
    let mut secrets: Vec<String> = vec![
        secret.into(),
        "log-test-key-full-0123456".into(),
        "log-test-key-orders-0123".into(),
        "log-test-wrong-key-0123456".into(),
    ];
    let http = reqwest::Client::new();

    // The publisher: good, scoped, wrong and missing keys; minting.
    let publish = |key: &str, channel: &str| {
        http.post(format!("{publisher}/v1/publish"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(format!(r#"{{"channel":"{channel}","data":1}}"#))
            .send()
    };
    let statuses = [
        publish("log-test-key-full-0123456", "orders")
            .await
            .expect("publish")
            .status(),
        publish("log-test-key-orders-0123", "payments")
            .await
            .expect("publish")
            .status(),
        publish("log-test-wrong-key-0123456", "orders")
            .await
            .expect("publish")
            .status(),
    ];
    assert_eq!(
        statuses,
        [
            StatusCode::ACCEPTED,
            StatusCode::FORBIDDEN,
            StatusCode::UNAUTHORIZED
        ]
    );
    let minted: serde_json::Value = http
        .post(format!("{publisher}/v1/tokens"))
        .bearer_auth("log-test-key-full-0123456")
        .header("content-type", "application/json")
        .body(r#"{"sub":"alex","channels":["orders"]}"#)
        .send()
        .await
        .expect("mint")
        .json()
        .await
        .expect("JSON");
    let token = minted["token"].as_str().expect("token").to_owned();
    secrets.push(token.clone());

    // The gateway: every credential source, good and bad.
    let get = |query: String| http.get(format!("{gateway}/v1/events?{query}")).send();
    let mut tickets = Vec::new();
    for _ in 0..3 {
        let answer: serde_json::Value = http
            .post(format!("{gateway}/v1/tickets"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("ticket")
            .json()
            .await
            .expect("JSON");
        tickets.push(answer["ticket"].as_str().expect("ticket").to_owned());
    }
    secrets.extend(tickets.iter().cloned());
    let fake_ticket = "fake-ticket-value-abcdefghijklmnop";
    let bad_token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bad-signature-value";
    secrets.extend([fake_ticket.to_owned(), bad_token.to_owned()]);
    let opened = [
        http.get(format!("{gateway}/v1/events?channel=orders"))
            .bearer_auth(&token)
            .send()
            .await,
        get(format!("channel=orders&ticket={}", tickets[0])).await,
        get(format!("channel=orders&ticket={}", tickets[0])).await,
        get(format!("channel=orders&ticket={fake_ticket}")).await,
        get(format!("channel=orders&token={token}")).await,
        get(format!("channel=orders&token={bad_token}")).await,
        http.get(format!("{gateway}/v1/events?channel=orders"))
            .header("cookie", format!("eg_session={token}"))
            .send()
            .await,
        http.get(format!("{gateway}/v1/events?channel=payments"))
            .bearer_auth(&token)
            .send()
            .await,
        http.get(format!(
            "{gateway}/nowhere?token={token}&ticket={}",
            tickets[1]
        ))
        .bearer_auth(bad_token)
        .send()
        .await,
    ];
    let statuses: Vec<u16> = opened
        .into_iter()
        .map(|r| r.expect("request").status().as_u16())
        .collect();
    assert_eq!(statuses, [200, 200, 401, 401, 200, 401, 200, 403, 404]);
    // A WebSocket with a ticket, refreshed with a token.
    let ws_url = format!(
        "{}/v1/ws?ticket={}",
        gateway.replacen("http://", "ws://", 1),
        tickets[2]
    );
    let mut ws = support::WsClient::connect_headers(&ws_url, &[])
        .await
        .expect("handshake");
    let reply = ws
        .request(serde_json::json!({"type": "refresh", "token": token}))
        .await;
    assert_eq!(reply["type"], "refreshed");
    drop(ws);

    sigterm(&server);
    let output = tokio::time::timeout(SOON, server.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    let everything = format!(
        "{}\n{}\n{}",
        lines.join("\n"),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for value in &secrets {
        assert!(
            !everything.contains(value.as_str()),
            "a credential reached the output: {value}"
        );
    }
    // The requests were logged, with their credentials redacted.
    let logged = |what: &str| everything.lines().filter(|l| l.contains(what)).count();
    assert!(
        logged("request refused") >= 6,
        "refusals are logged:\n{everything}"
    );
    assert!(
        logged("REDACTED") >= 3,
        "URLs are logged with credentials redacted:\n{everything}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_callers_trace_when_tracing_is_on() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // Nothing listens there: spans are dropped, logs are what this test reads.
    let otlp = format!("http://127.0.0.1:{}", free_port());
    let env = [
        ("REDIS_URL", url.as_str()),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("PUBLISHER_ADDR", "127.0.0.1:0"),
        KEYS[0],
        KEYS[1],
    ];
    let mut publisher = eventgate(&["publisher"], &env);
    let publisher_url = listening_url(&mut publisher).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let refused = reqwest::Client::new()
        .post(format!("{publisher_url}/v1/publish"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .bearer_auth("not-the-key-0123456789")
        .json(&serde_json::json!({"channel": "a", "data": 1}))
        .send()
        .await
        .expect("publish");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let stderr = publisher.stderr.as_mut().expect("stderr");
    let mut reader = BufReader::new(stderr);
    let line = tokio::time::timeout(SOON, async {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.expect("read") == 0 {
                return None;
            }
            if line.contains("request refused") {
                return Some(line);
            }
        }
    })
    .await
    .expect("a log line in time")
    .expect("the refusal is logged");
    let json: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(json["span"]["trace_id"], trace, "{line}");
    assert_eq!(
        json["span"]["span_id"].as_str().map(str::len),
        Some(16),
        "{line}"
    );
    assert!(!line.contains("not-the-key"), "{line}");
}

/// The gateway reads SSE request heads itself: a target with an encoded newline and raw UTF-8
/// reaches its log line escaped, on one line, like the router's request logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_are_escaped_in_log_lines() {
    let mut server = eventgate(
        &[],
        &[
            ("GATEWAY_ADDR", "127.0.0.1:0"),
            ("PUBLISHER_ADDR", "127.0.0.1:0"),
            ("RUST_LOG", "info"),
            ("DRAIN_GRACE", "100ms"),
        ],
    );
    let mut lines = Vec::new();
    read_until(&mut server, &mut lines, |l| l.contains("/v1/publish")).await;
    let gateway = printed_url(&lines, "gateway");
    let addr = gateway.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let target = "/v1/events?channel=a%0aFORGED-LINE&note=\u{e9}\u{202e}x";
    let request = format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("invalid_channel"),
        "{answer}"
    );

    sigterm(&server);
    let output = tokio::time::timeout(SOON, server.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    let log = String::from_utf8_lossy(&output.stderr);
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains("channel=a%0aFORGED-LINE&note=%C3%A9%E2%80%AEx"),
        "{}",
        refused[0]
    );
    assert!(
        !log.contains('\u{e9}') && !log.contains('\u{202e}'),
        "{log}"
    );
}
