//! Who may read and who may publish: subscriber tokens (JWT), channel patterns, and one-time
//! tickets. The gateway verifies tokens, the publisher mints them; both read [`AuthConfig`].

use std::{collections::HashMap, fmt, path::PathBuf, time::Duration};

use base64::Engine;
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet},
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{Channel, config::parse_duration};

/// Key material and rules for subscriber tokens. Every field is an environment variable and a
/// command-line flag.
#[derive(clap::Args, Clone, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key (RSA, EC P-256 or Ed25519) that verifies subscriber tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// JWKS document of verification keys, chosen by the token's `kid`.
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// PEM private key the publisher signs minted tokens with (`POST /v1/tokens`).
    #[arg(long, env = "JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,

    /// Accepted algorithms, comma-separated (default: the one the key is for: HS256, RS256,
    /// ES256 or EdDSA). A token naming any other algorithm, or `none`, is refused.
    #[arg(long, env = "JWT_ALGORITHMS", value_delimiter = ',')]
    pub jwt_algorithms: Option<Vec<String>>,

    /// Required `iss`, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud`, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Channel patterns every valid token may read, comma-separated; `{sub}` is replaced by
    /// the token's subject (`user:{sub}`).
    #[arg(long, env = "DEFAULT_CHANNELS", value_delimiter = ',')]
    pub default_channels: Vec<String>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_jwks_file", &self.jwt_jwks_file)
            .field("jwt_private_key_file", &self.jwt_private_key_file)
            .field("jwt_algorithms", &self.jwt_algorithms)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("default_channels", &self.default_channels)
            .finish()
    }
}

/// Key material that does not make sense; names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthSetupError(String);

impl AuthSetupError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

fn setup(message: impl Into<String>) -> AuthSetupError {
    AuthSetupError(message.into())
}

/// A channel pattern: an exact channel name, or a prefix ending in `*` (`invoice:*`; `*`
/// alone is every channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern {
    prefix: String,
    wildcard: bool,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (prefix, wildcard) = match text.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        let valid = if prefix.is_empty() {
            wildcard
        } else {
            // A prefix is valid when it would be a valid channel name on its own.
            Channel::parse(prefix).is_ok()
        };
        if !valid {
            return Err(format!(
                "{text:?} is not a channel or a channel prefix ending in *"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            wildcard,
        })
    }

    pub fn matches(&self, channel: &Channel) -> bool {
        if self.wildcard {
            channel.as_str().starts_with(&self.prefix)
        } else {
            channel.as_str() == self.prefix
        }
    }

    /// Everything `other` admits, this admits too.
    pub fn covers(&self, other: &Pattern) -> bool {
        if self.wildcard {
            other.prefix.starts_with(&self.prefix)
        } else {
            !other.wildcard && other.prefix == self.prefix
        }
    }
}

impl TryFrom<String> for Pattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)?;
        if self.wildcard {
            f.write_str("*")?;
        }
        Ok(())
    }
}

/// A verified subscriber: who, what it may read, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub sub: String,
    pub grants: Vec<Pattern>,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Identity {
    pub fn may_read(&self, channel: &Channel) -> bool {
        self.grants.iter().any(|g| g.matches(channel))
    }

    /// The first of `channels` this identity may not read.
    pub fn first_denied<'a>(&self, channels: &'a [Channel]) -> Option<&'a Channel> {
        channels.iter().find(|c| !self.may_read(c))
    }

    /// Time left until the token expires, plus `leeway`.
    pub fn remaining(&self, leeway: Duration) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(self.expires_at)
            .saturating_add(leeway)
            .saturating_sub(now)
    }
}

/// Why a credential is refused (all answered with 401). Messages never repeat the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a credential is required: Authorization: Bearer <token>, or ?ticket=")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token names an algorithm that is not accepted")]
    Algorithm,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token's key id is unknown")]
    UnknownKey,
    #[error("the token's claims are not valid: {0}")]
    Claims(String),
    #[error("the ticket is unknown, used, or expired")]
    Ticket,
    #[error("the Authorization header must be `Bearer <token>`")]
    Scheme,
    #[error(
        "tokens in the URL are disabled (ALLOW_QUERY_TOKEN); get a ticket from POST /v1/tickets and use ?ticket="
    )]
    QueryTokenDisabled,
}

impl AuthError {
    /// The stable error code clients see.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::Ticket => "invalid_ticket",
            AuthError::Scheme => "invalid_credential",
            AuthError::QueryTokenDisabled => "query_token_disabled",
            AuthError::Malformed
            | AuthError::BadSignature
            | AuthError::Algorithm
            | AuthError::Issuer
            | AuthError::Audience
            | AuthError::UnknownKey
            | AuthError::Claims(_) => "invalid_token",
        }
    }
}

#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    /// JSON numbers; some issuers write fractional seconds.
    exp: f64,
    #[serde(default)]
    channels: Vec<String>,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    channels: Vec<String>,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// A verification key with the rules for tokens it signs: each key accepts only algorithms of
/// its own family (jsonwebtoken refuses a validation that mixes families).
struct KeyRules {
    key: DecodingKey,
    validation: Validation,
}

enum VerifyKeys {
    One(Box<KeyRules>),
    ByKid(HashMap<String, KeyRules>),
}

/// Verifies subscriber tokens (the gateway).
pub struct Verifier {
    keys: VerifyKeys,
    defaults: Vec<String>,
    leeway: Duration,
}

fn default_algorithm(key: &DecodingKey) -> Algorithm {
    use jsonwebtoken::AlgorithmFamily;
    match key.family() {
        AlgorithmFamily::Hmac => Algorithm::HS256,
        AlgorithmFamily::Rsa => Algorithm::RS256,
        AlgorithmFamily::Ec => Algorithm::ES256,
        AlgorithmFamily::Ed => Algorithm::EdDSA,
    }
}

fn read_file(path: &PathBuf, setting: &str) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path)
        .map_err(|e| setup(format!("{setting}: cannot read {}: {e}", path.display())))
}

/// Reads a PEM public key of any supported kind.
fn public_key(pem: &[u8]) -> Result<DecodingKey, AuthSetupError> {
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| setup("JWT_PUBLIC_KEY_FILE: not a PEM RSA, EC or Ed25519 public key"))
}

/// The claim rules: `exp` and `sub` always, `iss` and `aud` when configured (a token without
/// them is refused), `nbf` when present.
fn validation(config: &AuthConfig, algorithms: Vec<Algorithm>) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms;
    validation.leeway = config.jwt_leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = config.jwt_audience.is_some();
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &config.jwt_issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    if let Some(aud) = &config.jwt_audience {
        validation.set_audience(&[aud]);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

impl Verifier {
    /// Builds the verifier; refuses when there is no key material, or more than one kind.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        if config.jwt_leeway > MAX_LEEWAY {
            return Err(setup("JWT_LEEWAY may be at most 5m"));
        }
        check_defaults(&config.default_channels)?;
        let sources = [
            config.jwt_secret.is_some(),
            config.jwt_public_key_file.is_some(),
            config.jwt_jwks_file.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(setup(
                    "no key for subscriber tokens: set JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE",
                ));
            }
            1 => {}
            _ => {
                return Err(setup(
                    "set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_FILE",
                ));
            }
        }
        let pinned = match &config.jwt_algorithms {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        n.trim()
                            .parse::<Algorithm>()
                            .map_err(|_| setup(format!("JWT_ALGORITHMS: unknown algorithm {n:?}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        // The rules for one key: its own algorithm, or the pinned ones of its family. An RSA
        // public key is never usable as an HMAC secret.
        let rules = |key: DecodingKey, own: Algorithm| -> Result<KeyRules, AuthSetupError> {
            let algorithms = match &pinned {
                None => vec![own],
                Some(pinned) => pinned
                    .iter()
                    .copied()
                    .filter(|a| a.family() == own.family())
                    .collect(),
            };
            if algorithms.is_empty() {
                return Err(setup(format!(
                    "JWT_ALGORITHMS: none fits the configured {own:?} key"
                )));
            }
            Ok(KeyRules {
                key,
                validation: validation(config, algorithms),
            })
        };
        let keys = if let Some(secret) = &config.jwt_secret {
            if secret.len() < 32 {
                return Err(setup("JWT_SECRET must be at least 32 bytes"));
            }
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| setup(format!("JWT_SECRET: {e}")))?;
            let own = default_algorithm(&key);
            VerifyKeys::One(Box::new(rules(key, own)?))
        } else if let Some(path) = &config.jwt_public_key_file {
            let key = public_key(&read_file(path, "JWT_PUBLIC_KEY_FILE")?)?;
            let own = default_algorithm(&key);
            VerifyKeys::One(Box::new(rules(key, own)?))
        } else {
            let path = config
                .jwt_jwks_file
                .as_ref()
                .ok_or_else(|| setup("JWT_JWKS_FILE"))?;
            let set: JwkSet = serde_json::from_slice(&read_file(path, "JWT_JWKS_FILE")?)
                .map_err(|e| setup(format!("JWT_JWKS_FILE: not a JWKS document: {e}")))?;
            let mut keys = HashMap::new();
            for jwk in &set.keys {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| setup("JWT_JWKS_FILE: every key needs a kid"))?;
                if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                    return Err(setup(
                        "JWT_JWKS_FILE: symmetric keys are not accepted; use JWT_SECRET",
                    ));
                }
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| setup(format!("JWT_JWKS_FILE: key {kid}: {e}")))?;
                let own = match jwk.common.key_algorithm {
                    Some(a) => Algorithm::try_from(a)
                        .map_err(|e| setup(format!("JWT_JWKS_FILE: key {kid}: {e}")))?,
                    None => default_algorithm(&key),
                };
                // A key whose `alg` or `use` cannot verify tokens would fail every token; say so
                // at start instead.
                if own.family() != key.family() {
                    return Err(setup(format!(
                        "JWT_JWKS_FILE: key {kid}: alg {own:?} does not fit its key type"
                    )));
                }
                if matches!(jwk.common.public_key_use, Some(ref u) if *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
                {
                    return Err(setup(format!(
                        "JWT_JWKS_FILE: key {kid} is not for signatures (use)"
                    )));
                }
                keys.insert(kid, rules(key, own)?);
            }
            if keys.is_empty() {
                return Err(setup("JWT_JWKS_FILE: no keys"));
            }
            VerifyKeys::ByKid(keys)
        };
        Ok(Self {
            keys,
            defaults: config.default_channels.clone(),
            leeway: config.jwt_leeway,
        })
    }

    /// The clock skew allowed on `exp` (`JWT_LEEWAY`); an open connection ends this long after
    /// its token's `exp`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies `token` and returns who it is for and what it grants.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let rules = match &self.keys {
            VerifyKeys::One(rules) => rules,
            VerifyKeys::ByKid(keys) => header
                .kid
                .as_deref()
                .and_then(|kid| keys.get(kid))
                .ok_or(AuthError::UnknownKey)?,
        };
        let data = jsonwebtoken::decode::<TokenClaims>(token, &rules.key, &rules.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::InvalidKeyFormat => AuthError::Algorithm,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Claims(format!("{claim} is required"))
                }
                ErrorKind::Json(e) => AuthError::Claims(e.to_string()),
                _ => AuthError::Malformed,
            })?;
        let claims = data.claims;
        let mut grants = claims
            .channels
            .iter()
            .map(|c| Pattern::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::Claims(format!("channels: {e}")))?;
        grants.extend(expand_defaults(&self.defaults, &claims.sub));
        Ok(Identity {
            sub: claims.sub,
            grants,
            expires_at: claims.exp.max(0.0) as u64,
        })
    }
}

/// `DEFAULT_CHANNELS` for one subject. Only a subject that is itself a valid channel name (no
/// `*`, no spaces) is substituted, so a subject can never widen a grant: `sub: "*"` gets no
/// defaults instead of every channel.
pub fn expand_defaults(templates: &[String], sub: &str) -> Vec<Pattern> {
    if Channel::parse(sub).is_err() {
        return Vec::new();
    }
    templates
        .iter()
        .filter_map(|t| Pattern::parse(&t.replace("{sub}", sub)).ok())
        .collect()
}

/// Refuses `DEFAULT_CHANNELS` entries that are not patterns for an ordinary subject.
fn check_defaults(templates: &[String]) -> Result<(), AuthSetupError> {
    for template in templates {
        Pattern::parse(&template.replace("{sub}", "x"))
            .map_err(|e| setup(format!("DEFAULT_CHANNELS: {e}")))?;
    }
    Ok(())
}

/// Longest `JWT_LEEWAY` accepted: clock skew, not a grace period.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Mints subscriber tokens (the publisher's `POST /v1/tokens`).
pub struct Minter {
    key: EncodingKey,
    algorithm: Algorithm,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    /// `None` when no signing key is configured (minting is then unavailable).
    pub fn new(config: &AuthConfig) -> Result<Option<Self>, AuthSetupError> {
        if config.jwt_secret.is_some() && config.jwt_private_key_file.is_some() {
            return Err(setup("set only one of JWT_SECRET and JWT_PRIVATE_KEY_FILE"));
        }
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            if secret.len() < 32 {
                return Err(setup("JWT_SECRET must be at least 32 bytes"));
            }
            let key = EncodingKey::from_secret(secret.as_bytes())
                .map_err(|e| setup(format!("JWT_SECRET: {e}")))?;
            (key, Algorithm::HS256)
        } else if let Some(path) = &config.jwt_private_key_file {
            let pem = read_file(path, "JWT_PRIVATE_KEY_FILE")?;
            if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
                (key, Algorithm::ES256)
            } else if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
                (key, Algorithm::EdDSA)
            } else {
                return Err(setup(
                    "JWT_PRIVATE_KEY_FILE: not a PEM RSA, EC or Ed25519 private key",
                ));
            }
        } else {
            return Ok(None);
        };
        // The first pinned algorithm of the key's family signs.
        let algorithm = match config.jwt_algorithms.as_deref() {
            Some(names) => names
                .iter()
                .filter_map(|n| n.trim().parse::<Algorithm>().ok())
                .find(|a| a.family() == algorithm.family())
                .ok_or_else(|| setup("JWT_ALGORITHMS: none fits the signing key"))?,
            None => algorithm,
        };
        Ok(Some(Self {
            key,
            algorithm,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        }))
    }

    /// A token for `sub` granting `channels`, valid for `ttl`; returns it and its expiry
    /// (Unix seconds).
    pub fn mint(
        &self,
        sub: &str,
        channels: &[Pattern],
        ttl: Duration,
    ) -> Result<(String, u64), AuthSetupError> {
        let now = unix_now();
        let exp = now + ttl.as_secs().max(1);
        let claims = MintedClaims {
            sub,
            channels: channels.iter().map(ToString::to_string).collect(),
            exp,
            iat: now,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|e| setup(format!("signing a token: {e}")))?;
        Ok((token, exp))
    }
}

/// A new one-time ticket: 256 random bits, URL-safe.
pub fn new_ticket() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// What a ticket is stored under: its SHA-256, so the store never holds a usable ticket.
pub fn ticket_digest(ticket: &str) -> String {
    sha2::Sha256::digest(ticket.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh random secret, for standalone mode without configured keys.
pub fn new_secret() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        let exact = Pattern::parse("orders").unwrap();
        assert!(exact.matches(&ch("orders")));
        assert!(!exact.matches(&ch("orders2")));
        let prefix = Pattern::parse("invoice:*").unwrap();
        assert!(prefix.matches(&ch("invoice:12")));
        assert!(!prefix.matches(&ch("invoices")));
        assert!(Pattern::parse("*").unwrap().matches(&ch("anything")));
        for bad in ["", "a b*", "in*voice", "**"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pattern_covers_narrower_ones_only() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("invoice:*").covers(&p("invoice:12")));
        assert!(p("invoice:*").covers(&p("invoice:1*")));
        assert!(!p("invoice:1*").covers(&p("invoice:*")));
        assert!(p("*").covers(&p("x*")));
        assert!(p("chat").covers(&p("chat")));
        assert!(!p("chat").covers(&p("chat*")));
    }

    fn secret_config() -> AuthConfig {
        AuthConfig {
            jwt_secret: Some("a-test-secret-that-is-long-enough-for-hs256".into()),
            jwt_leeway: Duration::from_secs(0),
            default_channels: vec!["user:{sub}".into()],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn minted_tokens_verify_with_defaults_for_the_subject() {
        let config = secret_config();
        let minter = Minter::new(&config).unwrap().unwrap();
        let (token, exp) = minter
            .mint(
                "alex",
                &[Pattern::parse("invoice:*").unwrap()],
                Duration::from_secs(60),
            )
            .unwrap();
        let identity = Verifier::new(&config).unwrap().verify(&token).unwrap();
        assert_eq!(identity.sub, "alex");
        assert_eq!(identity.expires_at, exp);
        assert!(identity.may_read(&ch("invoice:7")));
        assert!(identity.may_read(&ch("user:alex")));
        assert!(!identity.may_read(&ch("user:bob")));
        assert_eq!(
            identity.first_denied(&[ch("invoice:1"), ch("orders")]),
            Some(&ch("orders"))
        );
    }

    #[test]
    fn setup_refuses_missing_or_mixed_key_material() {
        assert!(Verifier::new(&AuthConfig::default()).is_err());
        let mut short = secret_config();
        short.jwt_secret = Some("short".into());
        assert!(Verifier::new(&short).is_err());
        let mut pinned = secret_config();
        pinned.jwt_algorithms = Some(vec!["RS256".into()]);
        assert!(
            Verifier::new(&pinned).is_err(),
            "an HMAC secret cannot verify RS256"
        );
    }

    #[test]
    fn a_subject_never_widens_a_default_grant() {
        let config = secret_config();
        let verifier = Verifier::new(&config).unwrap();
        let minter = Minter::new(&config).unwrap().unwrap();
        for sub in ["*", "bob*", "a b"] {
            let (token, _) = minter.mint(sub, &[], Duration::from_secs(60)).unwrap();
            let identity = verifier.verify(&token).unwrap();
            assert!(identity.grants.is_empty(), "{sub:?}: {:?}", identity.grants);
        }
        let mut bad = secret_config();
        bad.default_channels = vec!["user {sub}".into()];
        assert!(
            Verifier::new(&bad).is_err(),
            "a template that is no pattern fails at start"
        );
    }

    #[test]
    fn fractional_exp_is_accepted() {
        let config = secret_config();
        let exp = unix_now() as f64 + 60.5;
        let claims = serde_json::json!({"sub": "alex", "exp": exp});
        let key =
            EncodingKey::from_secret(config.jwt_secret.as_deref().unwrap().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        let identity = Verifier::new(&config).unwrap().verify(&token).unwrap();
        assert_eq!(identity.expires_at, exp as u64);
    }

    #[test]
    fn settings_that_cannot_work_refuse_to_start() {
        let mut leeway = secret_config();
        leeway.jwt_leeway = Duration::from_secs(3600);
        assert!(Verifier::new(&leeway).is_err());
        let mut short = secret_config();
        short.jwt_secret = Some("short".into());
        assert!(Minter::new(&short).is_err());
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../eventgate/tests/fixtures");
        let mut both = secret_config();
        both.jwt_private_key_file = Some(fixtures.join("rsa-private.pem"));
        assert!(Minter::new(&both).is_err(), "two signing keys");
        let jwks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures.join("jwks.json")).unwrap()).unwrap();
        for (field, value) in [("alg", "ES256"), ("use", "enc")] {
            let mut broken = jwks.clone();
            broken["keys"][0][field] = value.into();
            let path = std::env::temp_dir().join(format!(
                "eventgate-jwks-{}-{field}.json",
                std::process::id()
            ));
            std::fs::write(&path, broken.to_string()).unwrap();
            let config = AuthConfig {
                jwt_jwks_file: Some(path.clone()),
                ..AuthConfig::default()
            };
            let refused = Verifier::new(&config).is_err();
            let _ = std::fs::remove_file(&path);
            assert!(
                refused,
                "an RSA key with {field} {value} is refused at start"
            );
        }
    }

    #[test]
    fn tickets_are_long_random_and_stored_by_digest() {
        let (a, b) = (new_ticket(), new_ticket());
        assert_ne!(a, b);
        assert!(a.len() >= 43, "{a}");
        assert_eq!(ticket_digest(&a).len(), 64);
        assert_ne!(ticket_digest(&a), a);
    }
}
