//! Who may publish: API keys, each optionally limited to channel patterns; and minting
//! subscriber tokens for backends (`POST /v1/tokens`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, Request, State, rejection::BytesRejection},
    http::{HeaderMap, header},
    middleware::Next,
    response::Response,
};
use eventgate_core::{
    Channel,
    auth::{AuthConfig, AuthSetupError, Minter, Pattern, expand_defaults},
    event::format_timestamp,
    limits::{Cleanup, Limiter},
};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{PublisherConfig, PublisherState, error::ApiError, publish::check_content_type};

/// Shortest key accepted: shorter ones are guessable.
const MIN_KEY_LEN: usize = 16;

/// What one API key may do: publish on its channels (`None`: every channel), and mint tokens
/// for its subjects (`None`: any subject).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyScope {
    channels: Option<Vec<Pattern>>,
    subjects: Option<Vec<SubjectPattern>>,
}

impl KeyScope {
    /// A key for everything.
    pub const ALL: KeyScope = KeyScope {
        channels: None,
        subjects: None,
    };

    pub fn allows(&self, channel: &Channel) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(channel)))
    }

    /// Whether a token granting `pattern` stays within this key's channels.
    pub fn covers(&self, pattern: &Pattern) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.covers(pattern)))
    }

    /// Whether this key may mint tokens for `sub`.
    pub fn may_mint_for(&self, sub: &str) -> bool {
        self.subjects
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(sub)))
    }
}

/// A subject a key may mint for: exact (`alex`), a prefix (`tenant-7:*`), or `*` for any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectPattern {
    text: String,
    prefix: bool,
}

impl SubjectPattern {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("subject pattern {text:?} {why}");
        let (text, prefix) = match text.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        if text.is_empty() && !prefix {
            return Err(bad("is empty"));
        }
        if text.len() > MAX_SUB_LEN {
            return Err(bad("is too long"));
        }
        if text
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "*|;,".contains(c))
        {
            return Err(bad(
                "may hold no space, control character or * | ; , (but a final *)",
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            prefix,
        })
    }

    fn matches(&self, sub: &str) -> bool {
        if self.prefix {
            sub.starts_with(&self.text)
        } else {
            sub == self.text
        }
    }
}

/// The configured keys, kept as SHA-256 digests: a presented key is hashed and compared with
/// every digest in constant time, so neither timing nor length tells how close a guess was.
pub struct ApiKeys {
    keys: Vec<([u8; 32], KeyScope)>,
    /// Each key's [`ApiKeys::namespace`], hashed once at start rather than per request.
    namespaces: Vec<KeyNamespace>,
}

impl ApiKeys {
    /// Reads `PUBLISHER_API_KEYS` and `PUBLISHER_API_KEYS_FILE`: entries `key` or
    /// `key=pattern|pattern`. Refuses to start with none.
    pub fn from_config(config: &PublisherConfig) -> Result<Self, AuthSetupError> {
        let mut entries: Vec<(String, &str)> = config
            .publisher_api_keys
            .iter()
            .map(|e| (e.trim().to_owned(), "PUBLISHER_API_KEYS"))
            .filter(|(e, _)| !e.is_empty())
            .collect();
        if let Some(path) = &config.publisher_api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AuthSetupError::new(format!(
                    "PUBLISHER_API_KEYS_FILE: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            entries.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| (l.to_owned(), "PUBLISHER_API_KEYS_FILE")),
            );
        }
        if entries.is_empty() {
            return Err(AuthSetupError::new(
                "no publisher API key: set PUBLISHER_API_KEYS or PUBLISHER_API_KEYS_FILE",
            ));
        }
        let keys = entries
            .iter()
            .enumerate()
            .map(|(i, (entry, setting))| {
                parse_entry(entry)
                    .map_err(|e| AuthSetupError::new(format!("{setting}: entry {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let namespaces = keys
            .iter()
            .map(|(digest, _)| {
                let hashed = Sha256::digest(digest);
                KeyNamespace(hashed[..8].iter().map(|b| format!("{b:02x}")).collect())
            })
            .collect();
        Ok(Self { keys, namespaces })
    }

    /// Which key `presented` is (its index, for per-key limits) and its scope.
    pub fn find(&self, presented: &str) -> Option<(usize, KeyScope)> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        // Every key is compared, matched or not, so the time taken says nothing.
        for (index, (key, scope)) in self.keys.iter().enumerate() {
            if bool::from(key.ct_eq(&digest)) {
                found = Some((index, scope.clone()));
            }
        }
        found
    }

    /// A stable name for key `index` that reveals nothing of it: idempotency keys are kept per
    /// API key, so two backends never answer each other's retries.
    pub fn namespace(&self, index: usize) -> KeyNamespace {
        self.namespaces
            .get(index)
            .cloned()
            .unwrap_or_else(|| KeyNamespace(String::new()))
    }
}

/// See [`ApiKeys::namespace`]; a request extension.
#[derive(Clone, Debug)]
pub struct KeyNamespace(pub String);

/// `key`, `key=pattern|pattern`, either followed by `;subjects=pattern|pattern`. Keys may end
/// in `=` (base64 padding): the key is split at its last `=` only when what follows is a
/// pattern list. A key limited to channels mints tokens only for the subjects it names: one
/// service's key must not be able to fill any user's connection cap.
fn parse_entry(entry: &str) -> Result<([u8; 32], KeyScope), String> {
    let (entry, subjects) = match entry.split_once(';') {
        Some((entry, option)) => {
            let list = option.trim().strip_prefix("subjects=").ok_or_else(|| {
                format!("unknown option {option:?}: the one option is subjects=pattern|pattern")
            })?;
            let patterns = list
                .split('|')
                .map(|p| SubjectPattern::parse(p.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            (entry, Some(patterns))
        }
        None => (entry, None),
    };
    let (key, channels) = match entry.rsplit_once('=') {
        Some((key, patterns)) if !patterns.is_empty() => {
            let patterns = patterns
                .split('|')
                .map(|p| Pattern::parse(p.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            (key, Some(patterns))
        }
        _ => (entry, None),
    };
    let subjects = match (subjects, &channels) {
        (Some(subjects), _) => Some(subjects),
        (None, None) => None,
        // Limited to channels, silent on subjects: no subject.
        (None, Some(_)) => Some(Vec::new()),
    };
    let scope = KeyScope { channels, subjects };
    if key.len() < MIN_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "a key must be at least {MIN_KEY_LEN} characters, without spaces"
        ));
    }
    Ok((Sha256::digest(key.as_bytes()).into(), scope))
}

/// The publisher's credentials: its API keys, and the signing key for minted tokens.
pub struct PublisherAuth {
    pub keys: ApiKeys,
    /// `None` when no signing key is configured: `POST /v1/tokens` answers 501.
    pub minter: Option<Minter>,
    /// `DEFAULT_CHANNELS`: what gateways add to every token, so a scoped key's tokens are
    /// checked with them (set it the same on publishers and gateways).
    pub defaults: Vec<String>,
}

impl PublisherAuth {
    pub fn from_config(
        config: &PublisherConfig,
        auth: &AuthConfig,
    ) -> Result<Self, AuthSetupError> {
        Ok(Self {
            keys: ApiKeys::from_config(config)?,
            minter: Minter::new(auth)?,
            defaults: auth.default_channels.clone(),
        })
    }
}

/// Middleware: every request needs `Authorization: Bearer <key>`; its scope goes into the
/// request's extensions. A valid key spends its own allowance (`RATE_LIMIT_PUBLISH`); a
/// request without one spends its client IP's (`RATE_LIMIT_UNAUTHENTICATED`) before it is
/// refused, so guessing keys is slow and costs nothing.
pub async fn require_key(
    State(state): State<Arc<PublisherState>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (scope, namespace) = admit(&state, request.headers(), peer)?;
    request.extensions_mut().insert(scope);
    request.extensions_mut().insert(namespace);
    Ok(next.run(request).await)
}

/// What every request under the key check goes through, on either HTTP path: refused while
/// shutting down, then the key and its rate limit; a request without a valid key counts
/// against its address's limit (`peer`, through trusted proxies).
pub(crate) fn admit(
    state: &PublisherState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<(KeyScope, KeyNamespace), ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    match key_scope(state, headers) {
        Ok((index, scope)) => {
            state
                .limits
                .per_key
                .check(&index)
                .map_err(|retry| ApiError::RateLimited {
                    per: "for this API key",
                    retry,
                })?;
            Ok((scope, state.auth.keys.namespace(index)))
        }
        Err(unauthorized) => {
            if let Some(peer) = peer {
                let client = state.config.trusted_proxies.client_key(peer, headers);
                state
                    .limits
                    .unauthenticated
                    .check(&client)
                    .map_err(|retry| ApiError::RateLimited {
                        per: "without a valid API key from this address",
                        retry,
                    })?;
            }
            Err(unauthorized)
        }
    }
}

/// The publisher's rate limiters.
pub struct PublisherLimits {
    pub per_key: Arc<Limiter<usize>>,
    pub unauthenticated: Arc<Limiter<IpAddr>>,
}

impl PublisherLimits {
    pub fn new(config: &PublisherConfig) -> Self {
        Self {
            per_key: Arc::new(Limiter::new(config.rate_limit_publish)),
            unauthenticated: Arc::new(Limiter::new(config.rate_limit_unauthenticated)),
        }
    }

    pub fn all(&self) -> Vec<Arc<dyn Cleanup>> {
        vec![self.per_key.clone(), self.unauthenticated.clone()]
    }
}

fn key_scope(state: &PublisherState, headers: &HeaderMap) -> Result<(usize, KeyScope), ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized {
            code: "missing_credential",
            message: "send the API key as Authorization: Bearer <key>",
        });
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .ok_or(ApiError::Unauthorized {
            code: "invalid_credential",
            message: "the Authorization header must be `Bearer <key>`",
        })?;
    state.auth.keys.find(key).ok_or(ApiError::Unauthorized {
        code: "invalid_key",
        message: "the API key is not valid",
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    sub: String,
    #[serde(default)]
    channels: Vec<String>,
    ttl_seconds: Option<u64>,
}

/// Longest `sub` accepted.
const MAX_SUB_LEN: usize = 256;

/// Most patterns in one minted token.
const MAX_TOKEN_CHANNELS: usize = 100;

/// `POST /v1/tokens`: `{"sub","channels","ttl_seconds"}` → `{"token","expires_at"}`. The key's
/// scope bounds what the token may grant.
pub async fn mint(
    State(state): State<Arc<PublisherState>>,
    axum::Extension(scope): axum::Extension<KeyScope>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let Some(minter) = &state.auth.minter else {
        return Err(ApiError::MintingDisabled);
    };
    check_content_type(&headers)?;
    let body = body.map_err(|r| ApiError::invalid("invalid_request", r.body_text()))?;
    let request: TokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_request", format!("request body: {e}")))?;
    if request.sub.is_empty()
        || request.sub.len() > MAX_SUB_LEN
        || request.sub.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "invalid_sub",
            format!("`sub` must be 1 to {MAX_SUB_LEN} bytes without control characters"),
        ));
    }
    if request.channels.len() > MAX_TOKEN_CHANNELS {
        return Err(ApiError::invalid(
            "too_many_channels",
            format!("a token may grant at most {MAX_TOKEN_CHANNELS} patterns"),
        ));
    }
    let patterns = request
        .channels
        .iter()
        .map(|c| Pattern::parse(c).map_err(|e| ApiError::invalid("invalid_channel", e)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(denied) = patterns.iter().find(|p| !scope.covers(p)) {
        return Err(ApiError::Forbidden(format!(
            "this key may not grant channel {denied}"
        )));
    }
    if !scope.may_mint_for(&request.sub) {
        return Err(ApiError::Forbidden(
            "this key may not mint tokens for this subject: a key limited to channels mints \
             only for the subjects its entry names (`;subjects=pattern` in PUBLISHER_API_KEYS)"
                .into(),
        ));
    }
    // Gateways add DEFAULT_CHANNELS for the subject: a scoped key must cover those too, or it
    // could mint its way into any user's channel.
    let defaults = expand_defaults(&state.auth.defaults, &request.sub);
    if let Some(denied) = defaults.iter().find(|p| !scope.covers(p)) {
        return Err(ApiError::Forbidden(format!(
            "this key may not mint tokens for this subject: DEFAULT_CHANNELS grants {denied}"
        )));
    }
    let max = state.config.token_max_ttl;
    let ttl = match request.ttl_seconds {
        None => max.min(Duration::from_secs(3600)),
        Some(0) => {
            return Err(ApiError::invalid(
                "invalid_ttl",
                "`ttl_seconds` must be positive",
            ));
        }
        Some(s) if Duration::from_secs(s) > max => {
            return Err(ApiError::invalid(
                "invalid_ttl",
                format!(
                    "`ttl_seconds` may be at most {} (TOKEN_MAX_TTL)",
                    max.as_secs()
                ),
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    let (token, expires_at) = minter
        .mint(&request.sub, &patterns, ttl)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let expires_at = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
    let body = json!({"token": token, "expires_at": format_timestamp(expires_at)});
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(entries: &[&str]) -> Result<ApiKeys, AuthSetupError> {
        ApiKeys::from_config(&PublisherConfig {
            publisher_api_keys: entries.iter().map(|e| e.to_string()).collect(),
            ..PublisherConfig::default()
        })
    }

    #[test]
    fn keys_are_matched_with_their_scopes() {
        let keys = keys(&[
            "k-everything-0123456",
            "k-orders-0123456789=orders|invoice:*",
            "padded-base64-key-AA==",
        ])
        .unwrap();
        assert_eq!(keys.find("k-everything-0123456"), Some((0, KeyScope::ALL)));
        let (index, scoped) = keys.find("k-orders-0123456789").unwrap();
        assert_eq!(index, 1);
        assert!(scoped.allows(&Channel::parse("invoice:7").unwrap()));
        assert!(!scoped.allows(&Channel::parse("payments").unwrap()));
        assert_eq!(
            keys.find("padded-base64-key-AA=="),
            Some((2, KeyScope::ALL))
        );
        assert_eq!(keys.find("k-orders-0123456789=orders|invoice:*"), None);
        assert_eq!(keys.find("nope"), None);
    }

    #[test]
    fn keys_limited_to_channels_mint_only_for_their_subjects() {
        let keys = keys(&[
            "k-everything-0123456",
            "k-orders-0123456789=orders",
            "k-tenant-0123456789=tenant-7:*;subjects=tenant-7:*|support",
            "k-anyone-0123456789=orders;subjects=*",
            "k-users-only-012345;subjects=user-*",
        ])
        .unwrap();
        let scope = |key: &str| keys.find(key).unwrap().1;
        assert!(scope("k-everything-0123456").may_mint_for("anyone"));
        assert!(!scope("k-orders-0123456789").may_mint_for("alex"));
        let tenant = scope("k-tenant-0123456789");
        assert!(tenant.may_mint_for("tenant-7:alex") && tenant.may_mint_for("support"));
        assert!(!tenant.may_mint_for("tenant-8:alex") && !tenant.may_mint_for("support-2"));
        assert!(scope("k-anyone-0123456789").may_mint_for("alex"));
        let users = scope("k-users-only-012345");
        assert!(users.allows(&Channel::parse("anything").unwrap()));
        assert!(users.may_mint_for("user-9") && !users.may_mint_for("admin"));
        for bad in [
            "k-bad-option-0123456;channels=x",
            "k-bad-subject-012345;subjects=a b",
            "k-bad-subject-012345;subjects=a*b",
            "k-bad-subject-012345;subjects=",
        ] {
            assert!(super::tests::keys(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn weak_or_missing_keys_refuse_to_start() {
        assert!(keys(&[]).is_err());
        assert!(keys(&["short"]).is_err());
        assert!(keys(&["long-enough-key-123=not a pattern"]).is_err());
    }
}
