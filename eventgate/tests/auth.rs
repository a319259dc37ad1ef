//! Authentication and authorization as users meet them: every refusal with its reason, the
//! credential sources, one-time tickets across replicas, channel grants, token expiry on open
//! connections followed by a lossless resume, WebSocket refresh, publisher keys, minting, and
//! CORS.

mod support;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use eventgate_core::auth::AuthConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::*;

on_both_brokers!(
    a_ticket_is_redeemed_once_on_any_replica,
    an_expired_ticket_is_refused,
    an_sse_stream_ends_with_expired_and_resumes_without_loss,
    a_websocket_closes_1008_at_expiry_and_resumes_without_loss,
);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims for `sub` reading `channels`, expiring `ttl` seconds from now (negative: past).
fn claims(sub: &str, channels: &[&str], ttl: i64) -> Value {
    json!({"sub": sub, "channels": channels, "exp": now() + ttl})
}

fn secret_key(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).expect("HMAC key")
}

fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

/// HS256 with the test stack's secret.
fn hs256(claims: &Value) -> String {
    sign(
        Header::new(Algorithm::HS256),
        claims,
        &secret_key(TEST_SECRET.as_bytes()),
    )
}

/// An unsigned token (`alg: none`), which must never be accepted.
fn unsigned(claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// The status, error code and `WWW-Authenticate` of a refused request.
async fn refusal(response: reqwest::Response) -> (StatusCode, String, Option<String>) {
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("text").to_owned());
    let body: Value = response.json().await.expect("JSON error body");
    let code = body["error"]["code"].as_str().expect("code").to_owned();
    assert!(body["error"]["message"].is_string(), "{body}");
    (status, code, challenge)
}

/// Opens `/v1/events?{query}` with `token` as a bearer header.
async fn events_with(stack: &Stack, gateway: usize, query: &str, token: &str) -> reqwest::Response {
    plain()
        .get(stack.events_url(gateway, query))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

async fn assert_401(response: reqwest::Response, code: &str) {
    let (status, got, challenge) = refusal(response).await;
    assert_eq!((status, got.as_str()), (StatusCode::UNAUTHORIZED, code));
    assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="eventgate""#));
}

/// A one-time ticket from gateway `gateway` for `token`.
async fn ticket(stack: &Stack, gateway: usize, token: &str) -> String {
    let response = plain()
        .post(format!("{}/v1/tickets", stack.gateways[gateway].url))
        .bearer_auth(token)
        .send()
        .await
        .expect("tickets");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.expect("JSON");
    body["ticket"].as_str().expect("ticket").to_owned()
}

async fn connections(stack: &Stack, gateway: usize) -> u64 {
    stack.stats(gateway).await["connections_total"]
        .as_u64()
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_credential_is_refused_with_401_before_a_stream_or_upgrade() {
    let stack = Stack::start(Backend::Memory).await;
    let other_secret = secret_key(b"another-secret-that-is-32-bytes-long!!");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "missing_credential"),
        ("malformed", Some("not-a-jwt".into()), "invalid_token"),
        (
            "bad signature",
            Some(sign(
                Header::new(Algorithm::HS256),
                &claims("a", &["*"], 60),
                &other_secret,
            )),
            "invalid_token",
        ),
        (
            "alg none",
            Some(unsigned(&claims("a", &["*"], 60))),
            "invalid_token",
        ),
        (
            "expired",
            Some(hs256(&claims("a", &["*"], -60))),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(hs256(
                &json!({"sub": "a", "channels": ["*"], "exp": now() + 3600, "nbf": now() + 600}),
            )),
            "token_not_yet_valid",
        ),
        (
            "no exp",
            Some(hs256(&json!({"sub": "a", "channels": ["*"]}))),
            "invalid_token",
        ),
        (
            "no sub",
            Some(hs256(&json!({"channels": ["*"], "exp": now() + 60}))),
            "invalid_token",
        ),
    ];
    for (name, token, code) in &cases {
        let mut request = plain().get(stack.events_url(0, "channel=orders"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let (status, got, challenge) = refusal(response).await;
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::UNAUTHORIZED, *code),
            "SSE, {name}"
        );
        assert!(challenge.is_some(), "{name}: WWW-Authenticate");

        let mut headers = Vec::new();
        let bearer = token.as_ref().map(|t| format!("Bearer {t}"));
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        let refused = WsClient::connect_headers(&stack.ws_url(0), &headers).await;
        let (status, body) = refused
            .err()
            .unwrap_or_else(|| panic!("WebSocket, {name}: upgraded"));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some(*code)),
            "WebSocket, {name}"
        );
    }
    // Other ways to get it wrong.
    let basic = plain()
        .get(stack.events_url(0, "channel=orders"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("request");
    assert_401(basic, "invalid_credential").await;
    let query_token = plain()
        .get(stack.events_url(0, &format!("channel=orders&token={}", test_token())))
        .send()
        .await
        .expect("request");
    assert_401(query_token, "query_token_disabled").await;
    for bad in ["unknown-ticket-value", "a%20b", &"x".repeat(500)] {
        let response = plain()
            .get(stack.events_url(0, &format!("channel=orders&ticket={bad}")))
            .send()
            .await
            .expect("request");
        assert_401(response, "invalid_ticket").await;
    }
    // A credential that is present but bad is refused, never skipped for a later source.
    let response = plain()
        .get(stack.events_url(0, "channel=orders&ticket=whatever"))
        .header("authorization", "Bearer not-a-jwt")
        .send()
        .await
        .expect("request");
    assert_401(response, "invalid_token").await;
    assert_eq!(
        connections(&stack, 0).await,
        0,
        "no refused request opened a stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let options = Options {
        auth: AuthConfig {
            jwt_issuer: Some("https://auth.example".into()),
            jwt_audience: Some("eventgate".into()),
            ..test_auth()
        },
        ..Options::default()
    };
    let stack = Stack::start_with(Backend::Memory, options).await;
    let with = |extra: Value| {
        let mut c = claims("alex", &["orders"], 60);
        c.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        hs256(&c)
    };
    let good = with(json!({"iss": "https://auth.example", "aud": "eventgate"}));
    let response = events_with(&stack, 0, "channel=orders", &good).await;
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    for (name, token) in [
        (
            "wrong iss",
            with(json!({"iss": "https://evil.example", "aud": "eventgate"})),
        ),
        ("no iss", with(json!({"aud": "eventgate"}))),
        (
            "wrong aud",
            with(json!({"iss": "https://auth.example", "aud": "other"})),
        ),
        ("no aud", with(json!({"iss": "https://auth.example"}))),
    ] {
        let response = events_with(&stack, 0, "channel=orders", &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_verify_their_algorithms_and_nothing_else() {
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).expect("rsa");
    let ec = EncodingKey::from_ec_pem(&pem("ec-private.pem")).expect("ec");
    let ed = EncodingKey::from_ed_pem(&pem("ed-private.pem")).expect("ed");
    let body = claims("alex", &["orders"], 60);
    for (public, algorithm, key) in [
        ("rsa-public.pem", Algorithm::RS256, &rsa),
        ("ec-public.pem", Algorithm::ES256, &ec),
        ("ed-public.pem", Algorithm::EdDSA, &ed),
    ] {
        let options = Options {
            auth: AuthConfig {
                jwt_public_key_file: Some(fixture(public)),
                jwt_leeway: Duration::ZERO,
                ..AuthConfig::default()
            },
            ..Options::default()
        };
        let stack = Stack::start_with(Backend::Memory, options).await;
        let good = sign(Header::new(algorithm), &body, key);
        let response = events_with(&stack, 0, "channel=orders", &good).await;
        assert_eq!(response.status(), StatusCode::OK, "{algorithm:?}");
        drop(response);
        // HS/RS confusion: an HMAC token keyed with the public key's own bytes.
        let confused = sign(
            Header::new(Algorithm::HS256),
            &body,
            &secret_key(&pem(public)),
        );
        assert_401(
            events_with(&stack, 0, "channel=orders", &confused).await,
            "invalid_token",
        )
        .await;
        assert_401(
            events_with(&stack, 0, "channel=orders", &unsigned(&body)).await,
            "invalid_token",
        )
        .await;
        assert_401(
            events_with(&stack, 0, "channel=orders", &hs256(&body)).await,
            "invalid_token",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_chosen_by_kid() {
    let options = Options {
        auth: AuthConfig {
            jwt_jwks_file: Some(fixture("jwks.json")),
            jwt_leeway: Duration::ZERO,
            ..AuthConfig::default()
        },
        ..Options::default()
    };
    let stack = Stack::start_with(Backend::Memory, options).await;
    let body = claims("alex", &["orders"], 60);
    let with_kid = |algorithm, kid: Option<&str>| {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        header
    };
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).expect("rsa");
    let ec = EncodingKey::from_ec_pem(&pem("ec-private.pem")).expect("ec");
    let ed = EncodingKey::from_ed_pem(&pem("ed-private.pem")).expect("ed");
    for (algorithm, kid, key) in [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-1", &ec),
        (Algorithm::EdDSA, "ed-1", &ed),
    ] {
        let token = sign(with_kid(algorithm, Some(kid)), &body, key);
        let response = events_with(&stack, 0, "channel=orders", &token).await;
        assert_eq!(response.status(), StatusCode::OK, "{kid}");
    }
    let refused = [
        (
            "unknown kid",
            sign(with_kid(Algorithm::RS256, Some("rsa-2")), &body, &rsa),
        ),
        (
            "no kid",
            sign(with_kid(Algorithm::RS256, None), &body, &rsa),
        ),
        (
            "key of another kid",
            sign(with_kid(Algorithm::RS256, Some("ec-1")), &body, &rsa),
        ),
        (
            "HMAC under an RSA kid",
            sign(
                with_kid(Algorithm::HS256, Some("rsa-1")),
                &body,
                &secret_key(&pem("rsa-public.pem")),
            ),
        ),
    ];
    for (name, token) in refused {
        let response = events_with(&stack, 0, "channel=orders", &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_exact_names_prefixes_and_subject_defaults() {
    let options = Options {
        auth: AuthConfig {
            default_channels: vec!["user:{sub}".into()],
            ..test_auth()
        },
        ..Options::default()
    };
    let stack = Stack::start_with(Backend::Memory, options).await;
    let token = token_for("alex", &["orders", "invoice:*"], Duration::from_secs(600));
    let response = events_with(
        &stack,
        0,
        "channel=orders&channel=invoice:7&channel=user:alex",
        &token,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    for (query, denied) in [
        ("channel=user:bob", "user:bob"),
        ("channel=invoices", "invoices"),
        ("channel=orders2", "orders2"),
        ("channel=invoice:7&channel=payments", "payments"),
    ] {
        let (status, code, _) = refusal(events_with(&stack, 0, query, &token).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{query}"
        );
        let body: Value = events_with(&stack, 0, query, &token)
            .await
            .json()
            .await
            .expect("JSON");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(denied), "{message} names {denied}");
    }

    // Over WebSocket a refused subscribe is an error message; the connection stays.
    let bearer = format!("Bearer {token}");
    let mut ws = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &bearer)])
        .await
        .expect("handshake");
    let reply = ws
        .request(json!({"type": "subscribe", "channel": "user:bob", "id": 7}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
    assert_eq!(reply["id"], 7);
    assert!(
        reply["message"]
            .as_str()
            .expect("message")
            .contains("user:bob")
    );
    ws.subscribe("invoice:9", None).await;
    let id = stack.publish_one("invoice:9", json!({"total": 5})).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), id);
}

async fn a_ticket_is_redeemed_once_on_any_replica(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    stack.add_gateway().await;
    let token = token_for("alex", &["orders"], Duration::from_secs(600));

    let response = plain()
        .post(format!("{}/v1/tickets", stack.gateways[0].url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("tickets");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["expires_in"], 30);
    let first = body["ticket"].as_str().expect("ticket").to_owned();
    assert!(first.len() >= 22, "at least 128 bits: {first}");
    if backend != Backend::Memory {
        let keys = stack.redis_keys("eventgate:*ticket:*").await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(
            !keys[0].contains(&first),
            "the store holds a digest, not the ticket"
        );
    }

    // Issued by replica 0, redeemed by replica 1, then by nobody.
    let url = |gateway, ticket: &str| {
        stack.events_url(gateway, &format!("channel=orders&ticket={ticket}"))
    };
    let mut client = SseClient::connect(&plain(), &url(1, &first), None).await;
    assert_eq!(client.status, StatusCode::OK);
    client.next_block(SOON).await.expect("opening");
    for gateway in [1, 0] {
        let again = plain()
            .get(url(gateway, &first))
            .send()
            .await
            .expect("request");
        assert_401(again, "invalid_ticket").await;
    }
    // A ticket redeemed on the replica that issued it is gone for the other one too.
    let second = ticket(&stack, 0, &token).await;
    let response = plain().get(url(0, &second)).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    assert_401(
        plain().get(url(1, &second)).send().await.expect("request"),
        "invalid_ticket",
    )
    .await;

    // WebSocket handshakes take tickets the same way.
    let third = ticket(&stack, 1, &token).await;
    let ws_url = format!("{}?ticket={third}", stack.ws_url(0));
    let mut ws = WsClient::connect_headers(&ws_url, &[])
        .await
        .expect("handshake");
    ws.subscribe("orders", None).await;
    let (status, body) = WsClient::connect_headers(&ws_url, &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_ticket"))
    );

    // Tickets are only for bearer tokens.
    let no_token = plain()
        .post(format!("{}/v1/tickets", stack.gateways[0].url))
        .send()
        .await
        .expect("tickets");
    assert_401(no_token, "missing_credential").await;
    let bad_token = plain()
        .post(format!("{}/v1/tickets", stack.gateways[0].url))
        .bearer_auth("not-a-jwt")
        .send()
        .await
        .expect("tickets");
    assert_401(bad_token, "invalid_token").await;
}

async fn an_expired_ticket_is_refused(backend: Backend) {
    let mut options = Options::default();
    options.gateway.ticket_ttl = Duration::from_secs(1);
    let stack = Stack::start_with(backend, options).await;
    let issued = tokio::time::Instant::now();
    let late = ticket(&stack, 0, test_token()).await;
    match backend {
        // Redis expires the key itself: wait until it has.
        Backend::Redis | Backend::Shards | Backend::Cluster => {
            let gone = wait_until(SOON, || async {
                stack.redis_keys("eventgate:*ticket:*").await.is_empty()
            })
            .await;
            assert!(gone, "the ticket expired in Redis");
        }
        Backend::Memory => tokio::time::sleep_until(issued + Duration::from_millis(1100)).await,
    }
    let response = plain()
        .get(stack.events_url(0, &format!("channel=orders&ticket={late}")))
        .send()
        .await
        .expect("request");
    assert_401(response, "invalid_ticket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_source_works_and_cookies_need_a_same_origin_websocket() {
    let mut options = Options::default();
    options.gateway.auth_cookie = Some("eg_token".into());
    options.gateway.allow_query_token = true;
    let stack = Stack::start_with(Backend::Memory, options).await;
    let token = test_token();
    let ticket = ticket(&stack, 0, token).await;
    let requests = [
        (
            "header",
            plain()
                .get(stack.events_url(0, "channel=orders"))
                .bearer_auth(token),
        ),
        (
            "ticket",
            plain().get(stack.events_url(0, &format!("channel=orders&ticket={ticket}"))),
        ),
        (
            "cookie",
            plain()
                .get(stack.events_url(0, "channel=orders"))
                .header("cookie", format!("theme=dark; eg_token={token}")),
        ),
        (
            "query token",
            plain().get(stack.events_url(0, &format!("channel=orders&token={token}"))),
        ),
    ];
    for (source, request) in requests {
        let mut client = SseClient::open(request, None).await;
        assert_eq!(client.status, StatusCode::OK, "{source}");
        client.next_block(SOON).await.expect("opening");
    }

    // A cookie rides along on cross-site requests: a WebSocket with one must come from the
    // gateway's own origin.
    let host = stack.gateways[0]
        .url
        .trim_start_matches("http://")
        .to_owned();
    let cookie = format!("eg_token={token}");
    let foreign = WsClient::connect_headers(
        &stack.ws_url(0),
        &[("cookie", &cookie), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(foreign.err().map(|e| e.0), Some(StatusCode::FORBIDDEN));
    let own_origin = format!("http://{host}");
    let mut ws = WsClient::connect_headers(
        &stack.ws_url(0),
        &[("cookie", &cookie), ("origin", &own_origin)],
    )
    .await
    .expect("same-origin handshake");
    ws.subscribe("orders", None).await;
    // A bearer token from another origin is fine: a page can only send it deliberately.
    let bearer = format!("Bearer {token}");
    let ws = WsClient::connect_headers(
        &stack.ws_url(0),
        &[
            ("authorization", &bearer),
            ("origin", "https://other.example"),
        ],
    )
    .await;
    assert!(ws.is_ok());
}

/// Reads blocks until `event: expired`, then expects the stream to end.
async fn expect_expired(client: &mut SseClient) {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let block = client.next_block(left).await.expect("the expired event");
        if block.event.as_deref() == Some("expired") {
            let data: Value =
                serde_json::from_str(block.data.as_deref().expect("data")).expect("JSON");
            assert_eq!(data["reason"], "token_expired");
            break;
        }
        assert!(
            block.data.is_none() || block.event.is_none(),
            "unexpected {block:?}"
        );
    }
    client.expect_closed(SOON).await;
}

async fn an_sse_stream_ends_with_expired_and_resumes_without_loss(backend: Backend) {
    let stack = Stack::start(backend).await;
    let short = token_for("alex", &["orders"], Duration::from_secs(2));
    let request = plain()
        .get(stack.events_url(0, "channel=orders"))
        .bearer_auth(&short);
    let mut client = SseClient::open(request, None).await;
    assert_eq!(client.status, StatusCode::OK);
    let first = stack.publish_one("orders", json!({"n": 1})).await;
    assert_eq!(client.expect_events(1, SOON).await[0].id, first);
    expect_expired(&mut client).await;
    let last_seen = client.last_id.clone().expect("an id");

    // Missed while the client fetched a fresh ticket.
    let missed: Vec<u64> = stack
        .publish(json!({"events": [
            {"channel": "orders", "data": {"n": 2}},
            {"channel": "orders", "data": {"n": 3}},
        ]}))
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let fresh = token_for("alex", &["orders"], Duration::from_secs(600));
    let ticket = ticket(&stack, 0, &fresh).await;
    let url = stack.events_url(0, &format!("channel=orders&ticket={ticket}"));
    let mut resumed = SseClient::connect(&plain(), &url, Some(&last_seen)).await;
    assert_eq!(resumed.status, StatusCode::OK);
    let got: Vec<u64> = resumed
        .expect_events(2, SOON)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, missed, "exactly what was missed, nothing twice");
}

async fn a_websocket_closes_1008_at_expiry_and_resumes_without_loss(backend: Backend) {
    let stack = Stack::start(backend).await;
    let short = token_for("alex", &["orders"], Duration::from_secs(2));
    let bearer = format!("Bearer {short}");
    let mut ws = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &bearer)])
        .await
        .expect("handshake");
    assert!(ws.hello["expires_at"].as_u64().is_some(), "{}", ws.hello);
    ws.subscribe("orders", None).await;
    let first = stack.publish_one("orders", json!({"n": 1})).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), first);
    let closed = ws.expect_close(SOON).await;
    assert_eq!(closed.code(), Some(1008));
    assert_eq!(
        closed.0.as_ref().map(|f| f.reason.to_string()).as_deref(),
        Some("token expired")
    );

    let missed = stack.publish_one("orders", json!({"n": 2})).await;
    let fresh = format!(
        "Bearer {}",
        token_for("alex", &["orders"], Duration::from_secs(600))
    );
    let mut ws = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &fresh)])
        .await
        .expect("handshake");
    ws.subscribe("orders", Some(&first.to_string())).await;
    assert_eq!(event_id(&ws.expect_events(1).await[0]), missed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_refresh_keeps_the_connection_past_the_old_expiry() {
    let stack = Stack::start(Backend::Memory).await;
    let short = token_for("alex", &["orders", "audit"], Duration::from_secs(2));
    let old_exp = jsonwebtoken::dangerous::insecure_decode::<Value>(&short)
        .expect("claims")
        .claims["exp"]
        .as_u64()
        .expect("exp");
    let bearer = format!("Bearer {short}");
    let mut ws = WsClient::connect_headers(&stack.ws_url(0), &[("authorization", &bearer)])
        .await
        .expect("handshake");
    ws.subscribe("orders", None).await;
    ws.subscribe("audit", None).await;

    // Refusals leave the connection and its token as they were.
    for (token, code) in [
        (
            token_for("bob", &["orders"], Duration::from_secs(600)),
            "subject_mismatch",
        ),
        (hs256(&claims("alex", &["orders"], -60)), "token_expired"),
        ("garbage".to_owned(), "invalid_token"),
    ] {
        let reply = ws
            .request(json!({"type": "refresh", "token": token, "id": "r"}))
            .await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{reply}"
        );
    }

    // A fresh token that no longer grants `audit`: that subscription ends, `orders` stays.
    let fresh = token_for("alex", &["orders"], Duration::from_secs(600));
    ws.send(json!({"type": "refresh", "token": fresh, "id": 9}))
        .await;
    let dropped = ws.next_json(SOON).await.expect("unsubscribed");
    assert_eq!(
        dropped,
        json!({"type": "unsubscribed", "channel": "audit", "reason": "forbidden"})
    );
    let refreshed = ws.next_json(SOON).await.expect("refreshed");
    assert_eq!(
        (refreshed["type"].as_str(), refreshed["id"].as_i64()),
        (Some("refreshed"), Some(9))
    );
    assert!(refreshed["expires_at"].as_u64().expect("expires_at") > old_exp);

    // Past the old token's expiry the connection still delivers.
    let old_deadline = UNIX_EPOCH + Duration::from_secs(old_exp + 1);
    let wait = old_deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    stack.publish_one("audit", json!({"n": 0})).await;
    let id = stack.publish_one("orders", json!({"n": 1})).await;
    let events = ws.expect_events(1).await;
    assert_eq!(
        (event_id(&events[0]), events[0]["channel"].as_str()),
        (id, Some("orders"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_keys_are_required_compared_and_scoped() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("keys");
    std::fs::write(&file, "# backends\nfile-key-0123456789abcdef\n\n").expect("write");
    let mut options = Options::default();
    options.publisher.publisher_api_keys = vec![
        TEST_PUBLISHER_KEY.into(),
        "orders-service-key-0123=orders|invoice:*".into(),
    ];
    options.publisher.publisher_api_keys_file = Some(file);
    let stack = Stack::start_with(Backend::Memory, options).await;
    let publish = |key: Option<&str>, body: Value| {
        let mut request = plain()
            .post(format!("{}/v1/publish", stack.publisher.url))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let one = json!({"channel": "orders", "data": 1});
    for (key, code) in [
        (None, "missing_credential"),
        (Some("wrong-key-0123456789"), "invalid_key"),
    ] {
        let response = publish(key, one.clone()).await.expect("publish");
        let (status, got, challenge) = refusal(response).await;
        assert_eq!((status, got.as_str()), (StatusCode::UNAUTHORIZED, code));
        assert!(challenge.is_some());
    }
    for key in [
        TEST_PUBLISHER_KEY,
        "file-key-0123456789abcdef",
        "orders-service-key-0123",
    ] {
        assert_eq!(
            publish(Some(key), one.clone())
                .await
                .expect("publish")
                .status(),
            StatusCode::ACCEPTED,
            "{key}"
        );
    }
    let health = plain()
        .get(format!("{}/healthz", stack.publisher.url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK, "health checks need no key");

    // Out of scope: 403 naming the channel, and nothing of the request is published.
    let mut invoices = stack.subscribe("channel=invoice:1").await;
    let mixed = json!({"events": [
        {"channel": "invoice:1", "data": {"n": "refused"}},
        {"channel": "payments", "data": {"n": "refused"}},
    ]});
    let (status, code, _) = refusal(
        publish(Some("orders-service-key-0123"), mixed)
            .await
            .expect("publish"),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let marker = json!({"channel": "invoice:1", "data": {"n": "marker"}});
    assert_eq!(
        publish(Some("orders-service-key-0123"), marker)
            .await
            .expect("publish")
            .status(),
        StatusCode::ACCEPTED
    );
    let next = invoices.next_event(SOON).await.expect("event");
    assert_eq!(
        next.envelope["data"]["n"], "marker",
        "the refused batch left nothing behind"
    );
}

/// `POST /v1/tokens` on the stack's publisher with `key`.
async fn mint(stack: &Stack, key: &str, body: Value) -> reqwest::Response {
    plain()
        .post(format!("{}/v1/tokens", stack.publisher.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_work_on_the_gateway_within_the_keys_scope() {
    let mut options = Options::default();
    options.publisher.publisher_api_keys = vec![
        TEST_PUBLISHER_KEY.into(),
        "invoices-key-0123456789=invoice:*".into(),
        "invoices-users-key-0123456789=invoice:*|user:*;subjects=*".into(),
        "tenant-key-0123456789=invoice:*|user:*;subjects=tenant-7:*".into(),
    ];
    options.auth.default_channels = vec!["user:{sub}".into()];
    let stack = Stack::start_with(Backend::Memory, options).await;
    let response = mint(
        &stack,
        TEST_PUBLISHER_KEY,
        json!({"sub": "alex", "channels": ["chat"], "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    let token = body["token"].as_str().expect("token");
    let expires_at = body["expires_at"].as_str().expect("expires_at");
    let expires = humantime::parse_rfc3339(expires_at).expect("RFC 3339");
    let left = expires
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(590) && left <= Duration::from_secs(600),
        "{left:?}"
    );
    assert_eq!(
        events_with(&stack, 0, "channel=chat", token).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        events_with(&stack, 0, "channel=orders", token)
            .await
            .status(),
        StatusCode::FORBIDDEN
    );

    for (key, request, status, code) in [
        (
            TEST_PUBLISHER_KEY,
            json!({"sub": "alex", "ttl_seconds": 864_000}),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            TEST_PUBLISHER_KEY,
            json!({"sub": "", "channels": []}),
            StatusCode::BAD_REQUEST,
            "invalid_sub",
        ),
        (
            TEST_PUBLISHER_KEY,
            json!({"sub": "a", "channels": ["bad channel"]}),
            StatusCode::BAD_REQUEST,
            "invalid_channel",
        ),
        (
            TEST_PUBLISHER_KEY,
            json!({"sub": "a", "scope": "x"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "invoices-key-0123456789",
            json!({"sub": "a", "channels": ["chat"]}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "invoices-key-0123456789",
            json!({"sub": "a", "channels": ["*"]}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "wrong-key-0123456789",
            json!({"sub": "a"}),
            StatusCode::UNAUTHORIZED,
            "invalid_key",
        ),
    ] {
        let (got, got_code, _) = refusal(mint(&stack, key, request.clone()).await).await;
        assert_eq!((got, got_code.as_str()), (status, code), "{request}");
    }
    // DEFAULT_CHANNELS count against a scoped key too: it cannot mint its way into `user:*`.
    let (status, code, _) = refusal(
        mint(
            &stack,
            "invoices-key-0123456789",
            json!({"sub": "alex", "channels": ["invoice:1"]}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let unscoped = mint(&stack, TEST_PUBLISHER_KEY, json!({"sub": "alex"})).await;
    assert_eq!(unscoped.status(), StatusCode::OK);
    assert_eq!(unscoped.headers()["cache-control"], "no-store");
    let narrower = mint(
        &stack,
        "invoices-users-key-0123456789",
        json!({"sub": "a", "channels": ["invoice:1*", "invoice:9"]}),
    )
    .await;
    assert_eq!(
        narrower.status(),
        StatusCode::OK,
        "a scoped key grants within its scope"
    );

    // Subjects: a key limited to channels mints only for the subjects its entry names.
    let refused = mint(
        &stack,
        "invoices-key-0123456789",
        json!({"sub": "victim", "channels": []}),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.expect("JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("subjects=")),
        "{body}"
    );
    let (status, _, _) = refusal(
        mint(
            &stack,
            "tenant-key-0123456789",
            json!({"sub": "tenant-8:eve"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "another tenant's user");
    let own = mint(
        &stack,
        "tenant-key-0123456789",
        json!({"sub": "tenant-7:alex", "channels": ["invoice:7"]}),
    )
    .await;
    assert_eq!(own.status(), StatusCode::OK);
    let body: Value = own.json().await.expect("JSON");
    let token = body["token"].as_str().expect("token");
    assert_eq!(
        events_with(&stack, 0, "channel=invoice:7", token)
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_with_a_private_key_and_without_any() {
    let signing = Options {
        auth: AuthConfig {
            jwt_public_key_file: Some(fixture("rsa-public.pem")),
            jwt_private_key_file: Some(fixture("rsa-private.pem")),
            ..AuthConfig::default()
        },
        ..Options::default()
    };
    let stack = Stack::start_with(Backend::Memory, signing).await;
    let response = mint(
        &stack,
        TEST_PUBLISHER_KEY,
        json!({"sub": "alex", "channels": ["chat"]}),
    )
    .await;
    let body: Value = response.json().await.expect("JSON");
    let token = body["token"].as_str().expect("token");
    let header = jsonwebtoken::decode_header(token).expect("header");
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(
        events_with(&stack, 0, "channel=chat", token).await.status(),
        StatusCode::OK
    );

    let verify_only = Options {
        auth: AuthConfig {
            jwt_public_key_file: Some(fixture("rsa-public.pem")),
            ..AuthConfig::default()
        },
        ..Options::default()
    };
    let stack = Stack::start_with(Backend::Memory, verify_only).await;
    let (status, code, _) =
        refusal(mint(&stack, TEST_PUBLISHER_KEY, json!({"sub": "alex"})).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_IMPLEMENTED, "minting_disabled")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_lets_listed_origins_read_events_and_tickets_with_credentials() {
    let app = "https://app.example";
    let mut options = Options::default();
    options.gateway.allowed_origins = Some(vec![app.into()]);
    let stack = Stack::start_with(Backend::Memory, options).await;
    let gateway = &stack.gateways[0].url;
    let allow = |r: &reqwest::Response| {
        (
            r.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().expect("text").to_owned()),
            r.headers()
                .get("access-control-allow-credentials")
                .map(|v| v.to_str().expect("text").to_owned()),
        )
    };
    let listed = (Some(app.to_owned()), Some("true".to_owned()));

    for (path, method, headers) in [
        ("/v1/tickets", "POST", "authorization"),
        ("/v1/events", "GET", "authorization, last-event-id"),
    ] {
        let preflight = |origin: &'static str| {
            plain()
                .request(reqwest::Method::OPTIONS, format!("{gateway}{path}"))
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header("access-control-request-headers", headers)
                .send()
        };
        let ok = preflight(app).await.expect("preflight");
        assert!(ok.status().is_success(), "{path}: {}", ok.status());
        assert_eq!(allow(&ok), listed, "{path}");
        let allowed_headers = ok.headers()["access-control-allow-headers"]
            .to_str()
            .expect("text")
            .to_lowercase();
        for header in headers.split(", ") {
            assert!(
                allowed_headers.contains(header),
                "{path}: {allowed_headers}"
            );
        }
        let other = preflight("https://evil.example").await.expect("preflight");
        assert_eq!(allow(&other).0, None, "{path}: unlisted origin");
    }

    let tickets = plain()
        .post(format!("{gateway}/v1/tickets"))
        .header("origin", app)
        .bearer_auth(test_token())
        .send()
        .await
        .expect("tickets");
    assert_eq!(tickets.status(), StatusCode::OK);
    assert_eq!(allow(&tickets), listed);

    // The stream itself, and its refusals, so the page can read why.
    let stream = plain()
        .get(stack.events_url(0, "channel=orders"))
        .header("origin", app)
        .bearer_auth(test_token())
        .send()
        .await
        .expect("events");
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(allow(&stream), listed);
    drop(stream);
    let refused = plain()
        .get(stack.events_url(0, "channel=orders"))
        .header("origin", app)
        .send()
        .await
        .expect("events");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(allow(&refused), listed);
    let foreign = plain()
        .get(stack.events_url(0, "channel=orders"))
        .header("origin", "https://evil.example")
        .bearer_auth(test_token())
        .send()
        .await
        .expect("events");
    assert_eq!(
        allow(&foreign).0,
        None,
        "no CORS grant for an unlisted origin"
    );
}
