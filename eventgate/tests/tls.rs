//! Redis over TLS, with real processes: `redis-server` speaking only TLS (certificates made by
//! `openssl` for 127.0.0.1), with and without client certificates; publish, live delivery,
//! resume and a Redis restart under connected clients; and every mistake a clear start error.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::{
    process::{Service, eventgate, run_to_exit},
    tls::Certs,
    *,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The publisher's and gateway's settings for `redis`: its URL, the CA, and the client
/// certificate when `client_cert`.
fn settings(certs: &Certs, redis: &RedisServer, client_cert: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("REDIS_URL", redis.url()),
        ("REDIS_TLS_CA_FILE", certs.file("ca.crt")),
        ("REDIS_TIMEOUT", "1s".into()),
        // Persistent with fsync always: a restart loses nothing.
        ("REDIS_LOSSLESS_RESTARTS", "true".into()),
    ];
    if client_cert {
        env.push(("REDIS_TLS_CERT_FILE", certs.file("client.crt")));
        env.push(("REDIS_TLS_KEY_FILE", certs.file("client.key")));
    }
    env
}

async fn publish(http: &reqwest::Client, publisher: &Service, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let answer = http
            .post(format!("{}/v1/publish", publisher.url))
            .bearer_auth(TEST_PUBLISHER_KEY)
            .json(&json!({"channel": "orders", "data": n}))
            .send()
            .await
            .expect("publish");
        if answer.status() == StatusCode::ACCEPTED {
            return published(&answer.json().await.expect("JSON"))[0].1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ids(client: &mut SseClient, n: usize) -> Vec<u64> {
    let events = client.expect_events(n, SOON).await;
    assert!(
        events.iter().all(|e| e.event.as_deref() != Some("reset")),
        "{events:?}"
    );
    events.iter().map(|e| e.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_deliver_resume_and_restart_over_tls() {
    let certs = Certs::generate();
    for require_client_certs in [false, true] {
        let mut redis = RedisServer::start_tls(&certs, require_client_certs, true).await;
        let env = settings(&certs, &redis, require_client_certs);
        let publisher = Service::start("publisher", "PUBLISHER_ADDR", &env).await;
        let gateway = Service::start("gateway", "GATEWAY_ADDR", &env).await;
        let http = authed_client();
        let url = format!("{}/v1/events?channel=orders", gateway.url);
        let mut live = SseClient::connect(&http, &url, None).await;
        assert_eq!(live.status, StatusCode::OK);
        live.next_block(SOON).await.expect("opening");

        let mut sent = Vec::new();
        for n in 0..3 {
            sent.push(publish(&http, &publisher, n).await);
        }
        assert_eq!(ids(&mut live, 3).await, sent, "live over TLS");
        let mut back = SseClient::connect(&http, &url, Some(&sent[0].to_string())).await;
        assert_eq!(
            ids(&mut back, 2).await,
            sent[1..],
            "resumed from history over TLS"
        );

        redis.stop().await;
        redis.restart().await;
        let mut after = Vec::new();
        for n in 3..6 {
            after.push(publish(&http, &publisher, n).await);
        }
        assert_eq!(
            ids(&mut live, 3).await,
            after,
            "nothing lost across a Redis restart (client certificates: {require_client_certs})"
        );
        println!(
            "TLS (client certificates required: {require_client_certs}): 6 events published, \
             delivered live, resumed, and across a Redis restart"
        );
    }
}

/// What is wrong, the settings, the exit status, and what the message must name.
type Mistake<'a> = (&'a str, Vec<(&'a str, String)>, i32, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mistakes_are_clear_start_errors() {
    let certs = Certs::generate();
    let redis = RedisServer::start_tls(&certs, true, false).await;
    let port = redis.port;
    let url = format!("rediss://:hunter2secret@127.0.0.1:{port}");
    let keys = [
        ("JWT_SECRET", TEST_SECRET.to_owned()),
        ("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY.to_owned()),
        ("REDIS_TIMEOUT", "2s".to_owned()),
    ];
    let cases: Vec<Mistake> = vec![
        (
            "a CA that did not sign the server's certificate",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CA_FILE", certs.file("other-ca.crt")),
                ("REDIS_TLS_CERT_FILE", certs.file("client.crt")),
                ("REDIS_TLS_KEY_FILE", certs.file("client.key")),
            ],
            69,
            "REDIS_TLS_CA_FILE",
        ),
        (
            "a host name the certificate does not list",
            vec![
                ("REDIS_URL", format!("rediss://localhost:{port}")),
                ("REDIS_TLS_CA_FILE", certs.file("ca.crt")),
                ("REDIS_TLS_CERT_FILE", certs.file("client.crt")),
                ("REDIS_TLS_KEY_FILE", certs.file("client.key")),
            ],
            69,
            "host name",
        ),
        (
            "no client certificate for a server that requires one",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CA_FILE", certs.file("ca.crt")),
            ],
            69,
            "REDIS_TLS_CERT_FILE",
        ),
        (
            "the system's roots for a private CA",
            vec![("REDIS_URL", url.clone())],
            69,
            "REDIS_TLS_CA_FILE",
        ),
        (
            "a CA file that does not exist",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CA_FILE", certs.file("missing.crt")),
            ],
            64,
            "REDIS_TLS_CA_FILE",
        ),
        (
            "a CA file that holds no certificate",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CA_FILE", certs.file("client.key")),
            ],
            64,
            "REDIS_TLS_CA_FILE",
        ),
        (
            "a key that does not fit the certificate",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CA_FILE", certs.file("ca.crt")),
                ("REDIS_TLS_CERT_FILE", certs.file("client.crt")),
                ("REDIS_TLS_KEY_FILE", certs.file("stray.key")),
            ],
            64,
            "REDIS_TLS_KEY_FILE",
        ),
        (
            "a certificate without its key",
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_TLS_CERT_FILE", certs.file("client.crt")),
            ],
            64,
            "REDIS_TLS_KEY_FILE",
        ),
        (
            "TLS files with a plain redis:// URL",
            vec![
                ("REDIS_URL", format!("redis://127.0.0.1:{port}")),
                ("REDIS_TLS_CA_FILE", certs.file("ca.crt")),
            ],
            64,
            "rediss://",
        ),
        (
            "#insecure in the URL",
            vec![("REDIS_URL", format!("{url}/#insecure"))],
            64,
            "REDIS_TLS_CA_FILE",
        ),
    ];
    for (what, env, status, names) in cases {
        for role in ["publisher", "gateway"] {
            let mut all: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
            all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
            let started = tokio::time::Instant::now();
            let (code, output) = run_to_exit(&[role], &all).await;
            assert_eq!(code, Some(status), "{role}, {what}: {output}");
            assert!(
                output.contains(names),
                "{role}, {what}: names {names}: {output}"
            );
            assert!(
                !output.contains("hunter2secret"),
                "the password leaked: {output}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "{what}: no hang"
            );
        }
    }
}

/// The development opt-out: a certificate for another host name is accepted, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipping_the_host_name_check_is_loud() {
    let certs = Certs::generate();
    let redis = RedisServer::start_tls(&certs, false, false).await;
    let url = format!("rediss://localhost:{}", redis.port);
    let env = [
        ("JWT_SECRET", TEST_SECRET),
        ("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY),
        ("REDIS_URL", url.as_str()),
        ("REDIS_TLS_CA_FILE", &certs.file("ca.crt")),
        ("REDIS_TLS_SKIP_HOSTNAME_CHECK", "true"),
        ("PUBLISHER_ADDR", "127.0.0.1:0"),
    ];
    let mut child = eventgate(&["publisher"], &env);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(SOON, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("listening on") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(listening, Ok(true), "the publisher starts");
    child.kill().await.expect("kill");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    assert!(
        stderr.contains("WARN") && stderr.contains("REDIS_TLS_SKIP_HOSTNAME_CHECK"),
        "{stderr}"
    );
}
