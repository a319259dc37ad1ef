//! The browser client (`clients/js`) in real Chromium: a page per transport and a React page
//! built with esbuild that renders each event with `useEventgate`, through the repo's
//! nginx config in front of two gateways, while events are published on several channels, each
//! gateway is killed and started again in turn and the pages' tokens run out: every event
//! reaches each page exactly once, in order per channel. Then a channel's history is trimmed
//! while the pages are away: the app gets the reset, the other channels resume exactly. And the
//! live console `eventgate standalone` serves, driven like a user would, with a screenshot. Needs
//! `npm ci` in `clients/js` and Debian's `chromium`, which the README's test command provides.

mod support;

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, time::Duration};

use serde_json::{Value, json};
use support::{process, *};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CHANNELS: [&str; 3] = ["orders", "invoice:7", "user:42"];
const EVENTS: usize = 90;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What one page received: ids per channel, resets, and how often it reconnected.
struct Page {
    got: BTreeMap<String, Vec<String>>,
    resets: Vec<Value>,
    reconnects: usize,
}

fn page(result: &Value, transport: &str) -> Page {
    let page = &result[transport];
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in page["received"].as_array().expect("received") {
        got.entry(pair[0].as_str().expect("channel").to_owned())
            .or_default()
            .push(pair[1].as_str().expect("id").to_owned());
    }
    Page {
        got,
        resets: page["resets"].as_array().cloned().unwrap_or_default(),
        reconnects: page["statuses"]
            .as_array()
            .expect("statuses")
            .iter()
            .filter(|s| *s == "reconnecting")
            .count(),
    }
}

struct Driver {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Driver {
    /// Runs `clients/js/e2e/{script}` in Node with `env` (and Chromium's path).
    fn start(script: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg(repo().join("clients/js/e2e").join(script))
            .envs(env.iter().copied())
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    /// The driver's next line, within 90 s.
    async fn next(&mut self, what: &str) -> String {
        tokio::time::timeout(Duration::from_secs(90), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("read")
            .expect("a line")
    }
    async fn ask(&mut self, command: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("command");
        tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .expect("the driver answers")
            .expect("read")
            .expect("a line")
    }

    /// Waits until both pages have the last event of each channel; what they received.
    async fn until(&mut self, published: &BTreeMap<String, Vec<String>>) -> Value {
        let last: Vec<&str> = published
            .values()
            .filter_map(|ids| ids.last().map(String::as_str))
            .collect();
        let line = self.ask(&format!("until {}", last.join(","))).await;
        serde_json::from_str(line.strip_prefix("result ").expect("result")).expect("JSON")
    }
}

async fn publish(
    http: &reqwest::Client,
    deployment: &process::Deployment,
    channel: &str,
    data: Value,
) -> String {
    let response = http
        .post(format!("{}/v1/publish", deployment.publisher.url))
        .bearer_auth(TEST_PUBLISHER_KEY)
        .json(&json!({"channel": channel, "data": data}))
        .send()
        .await
        .expect("publish");
    let answer: Value = response.json().await.expect("JSON");
    answer["published"][0]["id"]
        .as_str()
        .expect("an id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_package_in_chromium_gets_every_event_once_through_restarts_expiry_and_resets() {
    let js = repo().join("clients/js");
    assert!(
        js.join("node_modules/puppeteer-core").exists() && js.join("dist/index.js").exists(),
        "run `npm ci && npm test` in clients/js first (scripts/test does)"
    );
    // Fails early, saying how to install it.
    let _ = chromium();
    let mut deployment = process::Deployment::start(
        2,
        &[
            ("HEARTBEAT_INTERVAL", "1s"),
            ("HISTORY_MAX_LEN", "50"),
            ("JWT_LEEWAY", "1s"),
        ],
    )
    .await;
    // The console is off unless asked for (`CONSOLE=true`; standalone turns it on).
    let console = reqwest::get(format!("{}/console", deployment.gateways[0].url))
        .await
        .expect("console");
    assert_eq!(console.status(), 404);

    // Tokens of 4 s, minted by the driver as an app's backend would: they run out during the
    // run, so SSE streams end with `expired` and WebSockets refresh.
    let channels = CHANNELS.join(",");
    let mut driver = Driver::start(
        "driver.mjs",
        &[
            ("EVENTGATE_ORIGIN", deployment.nginx.url.as_ref()),
            ("EVENTGATE_PUBLISHER", deployment.publisher.url.as_ref()),
            ("EVENTGATE_PUBLISHER_KEY", TEST_PUBLISHER_KEY.as_ref()),
            ("TOKEN_TTL_SECONDS", "4".as_ref()),
            ("CHANNELS", channels.as_ref()),
        ],
    );
    assert_eq!(driver.next("the pages connect").await, "ready");

    // Each gateway killed (`kill -9`) and started again in turn, while publishing.
    let http = reqwest::Client::new();
    let mut published: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let started = tokio::time::Instant::now();
    for i in 0..EVENTS {
        match i {
            20 => deployment.gateways[0].kill().await,
            35 => deployment.gateways[0].restart().await,
            55 => deployment.gateways[1].kill().await,
            70 => deployment.gateways[1].restart().await,
            _ => {}
        }
        let channel = CHANNELS[i % CHANNELS.len()];
        let id = publish(&http, &deployment, channel, json!(i)).await;
        published.entry(channel.to_owned()).or_default().push(id);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let result = driver.until(&published).await;
    let minted = result["tokens_minted"].as_u64().unwrap_or(0);
    for transport in ["sse", "websocket", "react"] {
        let page = page(&result, transport);
        println!(
            "{transport}: {} of {EVENTS} events in {:.1?}, {} reconnects, {} tokens minted by both pages",
            page.got.values().map(Vec::len).sum::<usize>(),
            started.elapsed(),
            page.reconnects,
            minted
        );
        assert_eq!(
            page.got, published,
            "{transport}: every event exactly once, in order per channel"
        );
        assert!(page.resets.is_empty(), "{transport}: {:?}", page.resets);
        // (React may render a quick `reconnecting` and `open` as one state.)
        assert!(
            transport == "react" || page.reconnects >= 1,
            "{transport}: both gateways were killed, so the page reconnected"
        );
    }
    assert!(minted >= 4, "tokens ran out and were replaced: {minted}");

    // Both gateways down while 300 events go to `orders`: more than its history keeps. When the
    // pages come back, `orders` is reset (the app refetches it); the rest resumes exactly.
    deployment.gateways[0].kill().await;
    deployment.gateways[1].kill().await;
    let mut trimmed = Vec::new();
    for i in 0..300 {
        trimmed.push(publish(&http, &deployment, "orders", json!(i)).await);
    }
    deployment.gateways[0].restart().await;
    deployment.gateways[1].restart().await;
    assert_eq!(driver.ask("resets 1").await, "resets");
    for channel in CHANNELS {
        let id = publish(&http, &deployment, channel, json!("after")).await;
        published.get_mut(channel).expect("channel").push(id);
    }
    let result = driver.until(&published).await;
    for transport in ["sse", "websocket", "react"] {
        let page = page(&result, transport);
        println!("{transport}: after the trim, resets {:?}", page.resets);
        assert_eq!(
            page.resets,
            [json!([["orders"], "history_trimmed"])],
            "{transport}: the app is told to refetch orders"
        );
        for channel in ["invoice:7", "user:42"] {
            assert_eq!(
                page.got[channel], published[channel],
                "{transport}: {channel}"
            );
        }
        // `orders`: everything before the outage, then what history still had, then live.
        let orders = &page.got["orders"];
        let before = published["orders"].len() - 1;
        assert_eq!(orders[..before], published["orders"][..before]);
        let rest = &orders[before..];
        assert_eq!(rest.last(), published["orders"].last(), "{transport}");
        let kept = &rest[..rest.len() - 1];
        assert!(
            trimmed.ends_with(kept) && kept.len() < trimmed.len(),
            "{transport}: after the reset, the end of history in order ({} of {})",
            kept.len(),
            trimmed.len()
        );
    }

    // The hook follows its channels and closes on unmount.
    let line = driver.ask("lifecycle").await;
    let lifecycle: Value =
        serde_json::from_str(line.strip_prefix("lifecycle ").expect("lifecycle")).expect("JSON");
    println!("react lifecycle: {lifecycle}");
    assert_eq!(
        lifecycle["changed"],
        json!([["user:42"]]),
        "one stream, new channels"
    );
    assert_eq!(lifecycle["unmounted"], json!([]), "closed on unmount");
    drop(driver.child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), driver.child.wait()).await;
}

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Chromium (Debian: apt-get install chromium; scripts/test installs it)")
}

/// The console at the address `eventgate standalone` prints: it connects with the token from
/// that address, publishes from its form with the generated key, shows events published
/// elsewhere over SSE and over WebSocket, and the test keeps a screenshot of it. The page is
/// served with the package's current build, and no credential reaches the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_console_shows_and_publishes_events_in_chromium() {
    let js = repo().join("clients/js");
    let built = std::fs::read_to_string(js.join("dist/index.js"))
        .expect("run `npm ci && npm test` in clients/js first (scripts/test does)");
    assert!(
        built == eventgate_gateway::console::CLIENT,
        "gateway/console/client.js is not the package's current build: \
         cp clients/js/dist/index.js gateway/console/client.js"
    );
    let mut server = process::eventgate(
        &[],
        &[
            ("GATEWAY_ADDR", "127.0.0.1:0"),
            ("PUBLISHER_ADDR", "127.0.0.1:0"),
            ("DRAIN_GRACE", "100ms"),
        ],
    );
    // Everything the server logs, to search for credentials at the end.
    let mut stderr = server.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut stdout = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let mut banner = Vec::new();
    let console_url = tokio::time::timeout(SOON, async {
        while let Some(line) = stdout.next_line().await.expect("stdout") {
            banner.push(line.clone());
            if let Some(url) = line.trim().strip_prefix("console") {
                return url.trim().to_owned();
            }
        }
        panic!("no console address in {banner:#?}")
    })
    .await
    .expect("standalone prints the console's address");
    let value = |label: &str| {
        banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {label} in {banner:#?}"))
    };
    let (token, key, publisher) = (
        value("subscriber token"),
        value("PUBLISHER_API_KEYS"),
        value("publisher"),
    );
    assert!(
        console_url.contains(&format!("#token={token}")),
        "{console_url}"
    );

    let screenshot = repo().join("target/console.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Driver::start(
        "console.mjs",
        &[
            ("CONSOLE_URL", console_url.as_ref()),
            ("SCREENSHOT", screenshot.as_os_str()),
        ],
    );
    let first = driver.next("the console connects and publishes").await;
    let from_page = first
        .strip_prefix("published ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();

    // Events from a backend show up too: over WebSocket any event; over SSE (where the
    // browser passes named events only to listeners of their name) events without a name.
    let http = reqwest::Client::new();
    let publish = |event: Option<&str>, data: Value| {
        let mut body = json!({"channel": "orders", "data": data});
        if let Some(name) = event {
            body["event"] = json!(name);
        }
        let request = http
            .post(format!("{publisher}/v1/publish"))
            .bearer_auth(&key)
            .json(&body);
        async move {
            let answer: Value = request
                .send()
                .await
                .expect("publish")
                .json()
                .await
                .expect("JSON");
            answer["published"][0]["id"]
                .as_str()
                .expect("an id")
                .to_owned()
        }
    };
    let over_ws = publish(Some("order:shipped"), json!({"order": 1})).await;
    assert_eq!(driver.ask(&format!("until {over_ws}")).await, "shown");
    assert_eq!(driver.ask("sse").await, "open");
    let over_sse = publish(None, json!({"order": 2})).await;
    assert_eq!(driver.ask(&format!("until {over_sse}")).await, "shown");
    let line = driver.ask("screenshot").await;
    let result: Value =
        serde_json::from_str(line.strip_prefix("result ").expect("result")).expect("JSON");
    println!("console: {result}");

    assert_eq!(result["errors"], json!([]), "no script error on the page");
    assert_eq!(result["status"], "open");
    assert_eq!(result["hash"], "", "credentials leave the address bar");
    let events: Vec<Vec<&str>> = result["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r[0] == "event")
        .map(|r| {
            r.as_array().expect("row")[1..]
                .iter()
                .map(|c| c.as_str().expect("cell"))
                .collect()
        })
        .collect();
    // Newest first: id, channel, event name, data.
    assert_eq!(
        events,
        [
            [over_sse.as_str(), "orders", "", r#"{"order":2}"#],
            [
                over_ws.as_str(),
                "orders",
                "order:shipped",
                r#"{"order":1}"#
            ],
            [
                from_page.as_str(),
                "orders",
                "invoice:paid",
                r#"{"invoice":7,"amount":"12.50"}"#
            ],
        ]
    );
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a PNG of the page ({} bytes)",
        png.len()
    );
    println!("screenshot: {} ({} bytes)", screenshot.display(), png.len());

    // A link naming another publisher drops the saved key and token, and the publisher it
    // names is taken only for its port, on the page's own host.
    let line = driver.ask("crafted").await;
    let crafted: Value =
        serde_json::from_str(line.strip_prefix("crafted ").expect("crafted")).expect("JSON");
    println!("crafted link: {crafted}");
    assert_eq!(crafted["publish_form_hidden"], true, "{crafted}");
    assert_eq!(crafted["kept"].get("key"), None, "{crafted}");
    assert_eq!(crafted["kept"].get("token"), None, "{crafted}");
    assert_eq!(
        crafted["kept"]["publisher"], "http://127.0.0.1:9",
        "{crafted}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), driver.child.wait()).await;

    let pid = server.id().expect("running").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), server.wait()).await;
    let logs = logs.await.expect("logs");
    assert!(logs.contains("/console"), "the page was served: {logs}");
    for secret in [&token, &key] {
        assert!(!logs.contains(secret.as_str()), "a credential in the logs");
    }
}
