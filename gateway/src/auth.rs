//! Who a subscriber is: credentials from the request, verified tokens, one-time tickets, and
//! the browser-origin rules (CORS and the WebSocket origin check).

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use eventgate_core::{
    Broker,
    auth::{AuthError, Identity, Verifier, new_ticket},
};
use serde_json::json;

use crate::{GatewayState, error::ApiError};

/// Where a subscriber's credential came from, in the order they are looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `?ticket=`: a one-time ticket from `POST /v1/tickets`.
    Ticket,
    /// The cookie named by `AUTH_COOKIE`.
    Cookie,
    /// `?token=`, only with `ALLOW_QUERY_TOKEN=true`.
    Query,
}

/// A credential as presented; never logged.
pub struct Credential {
    pub source: Source,
    value: String,
}

/// Verifies subscribers: tokens, tickets, and the settings that say where credentials may come
/// from.
pub struct Authenticator {
    pub verifier: Verifier,
    pub cookie: Option<String>,
    pub allow_query_token: bool,
    pub ticket_ttl: Duration,
}

/// Longest a connection stays open on one token.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Longest ticket worth a broker round trip (ours are 43 characters).
const MAX_TICKET_LEN: usize = 128;

impl Authenticator {
    /// Finds the request's credential. A credential that is present but unusable is refused
    /// rather than skipped, so a client never silently runs as someone else.
    pub fn credential(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Credential, AuthError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            return bearer(value).map(|token| Credential {
                source: Source::Header,
                value: token.to_owned(),
            });
        }
        let (mut ticket, mut token) = (None, None);
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "ticket" => ticket = Some(value.into_owned()),
                "token" => token = Some(value.into_owned()),
                _ => {}
            }
        }
        if let Some(value) = ticket {
            return Ok(Credential {
                source: Source::Ticket,
                value,
            });
        }
        if let Some(value) = self
            .cookie
            .as_deref()
            .and_then(|name| cookie(headers, name))
        {
            return Ok(Credential {
                source: Source::Cookie,
                value,
            });
        }
        match token {
            Some(value) if self.allow_query_token => Ok(Credential {
                source: Source::Query,
                value,
            }),
            Some(_) => Err(AuthError::QueryTokenDisabled),
            None => Err(AuthError::Missing),
        }
    }

    /// Verifies a credential: a token by its signature and claims, a ticket by redeeming it
    /// (once, on any replica).
    pub async fn identify(
        &self,
        broker: &Broker,
        credential: &Credential,
    ) -> Result<Identity, ApiError> {
        if credential.source != Source::Ticket {
            return self
                .verifier
                .verify(&credential.value)
                .map_err(ApiError::Unauthorized);
        }
        let ticket = &credential.value;
        let plausible = !ticket.is_empty()
            && ticket.len() <= MAX_TICKET_LEN
            && ticket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plausible {
            return Err(ApiError::Unauthorized(AuthError::Ticket));
        }
        let payload = broker
            .take_ticket(ticket)
            .await?
            .ok_or(ApiError::Unauthorized(AuthError::Ticket))?;
        let identity: Identity = serde_json::from_slice(&payload)
            .map_err(|_| ApiError::Unauthorized(AuthError::Ticket))?;
        if identity.remaining(self.verifier.leeway()).is_zero() {
            return Err(ApiError::Unauthorized(AuthError::Expired));
        }
        Ok(identity)
    }

    /// Finds and verifies the request's credential.
    pub async fn authenticate(
        &self,
        broker: &Broker,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Identity, Source), ApiError> {
        let credential = self
            .credential(headers, query)
            .map_err(ApiError::Unauthorized)?;
        let identity = self.identify(broker, &credential).await?;
        Ok((identity, credential.source))
    }

    /// How long a connection of `identity` may stay open (capped, so a token with an absurd
    /// `exp` cannot overflow a timer).
    pub fn lifetime(&self, identity: &Identity) -> Duration {
        identity.remaining(self.verifier.leeway()).min(MAX_LIFETIME)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(value: &HeaderValue) -> Result<&str, AuthError> {
    let text = value.to_str().map_err(|_| AuthError::Scheme)?.trim();
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Scheme)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Scheme);
    }
    Ok(token)
}

/// The value of cookie `name`, from any `Cookie` header.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value().is_empty())
        .map(|c| c.value().to_owned())
}

/// `POST /v1/tickets`: trades a bearer token for a one-time ticket a browser can put in the
/// URL of `EventSource` or `WebSocket` (neither can set headers), so the token itself never
/// lands in a URL.
pub async fn tickets(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized(AuthError::Missing));
    };
    let token = bearer(value).map_err(ApiError::Unauthorized)?;
    let identity = state
        .auth
        .verifier
        .verify(token)
        .map_err(ApiError::Unauthorized)?;
    let payload = serde_json::to_vec(&identity).map_err(|e| ApiError::Internal(e.to_string()))?;
    let ttl = state.auth.ticket_ttl;
    let ticket = new_ticket();
    // 256 random bits do not collide; `false` would mean the store is broken.
    if !state.broker.put_ticket(&ticket, &payload, ttl).await? {
        return Err(ApiError::Internal("ticket collision".into()));
    }
    let body = json!({"ticket": ticket, "expires_in": ttl.as_secs()});
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Whether `origin` is one of `allowed` (`ALLOWED_ORIGINS`), ignoring case and a trailing `/`.
pub fn origin_listed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// Whether a browser request from `origin` may read responses (CORS, with credentials):
/// only origins listed in `ALLOWED_ORIGINS`.
pub fn cors_allows(origin: &HeaderValue, allowed: Option<&[String]>) -> bool {
    match (allowed, origin.to_str()) {
        (Some(allowed), Ok(origin)) => origin_listed(origin, allowed),
        _ => false,
    }
}

/// The CORS response header lines for a request's `Origin`, for responses written by hand.
pub fn cors_header_lines(headers: &HeaderMap, allowed: Option<&[String]>) -> String {
    match headers.get(header::ORIGIN) {
        Some(origin) if cors_allows(origin, allowed) => format!(
            "access-control-allow-origin: {}\r\naccess-control-allow-credentials: true\r\nvary: origin\r\n",
            origin.to_str().unwrap_or_default()
        ),
        Some(_) => "vary: origin\r\n".to_owned(),
        None => String::new(),
    }
}

/// Refuses a browser WebSocket handshake from an origin that may not open one. Listed origins
/// always may. With `ALLOWED_ORIGINS` unset any origin may, except when the credential is a
/// cookie: a cookie rides along on cross-site requests, so it counts only from the gateway's
/// own origin (cross-site WebSocket hijacking). Requests without `Origin` are not from a
/// browser page and pass. `via_proxy`: the peer is a trusted proxy, whose `X-Forwarded-Proto`
/// and `X-Forwarded-Host` say what the browser connected to.
pub fn check_ws_origin(
    headers: &HeaderMap,
    allowed: Option<&[String]>,
    source: Option<Source>,
    via_proxy: bool,
) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let text = origin.to_str().unwrap_or_default();
    let refuse = || Err(ApiError::OriginNotAllowed(text.chars().take(200).collect()));
    if let Some(allowed) = allowed {
        return if origin_listed(text, allowed) {
            Ok(())
        } else {
            refuse()
        };
    }
    if source == Some(Source::Cookie) && !same_origin(text, headers, via_proxy) {
        return refuse();
    }
    Ok(())
}

/// Whether `origin` is the origin the request was sent to: the same scheme, host and port
/// (the scheme's default when none is written). Behind a trusted proxy that is its
/// `X-Forwarded-Proto` and `X-Forwarded-Host`; otherwise plain HTTP to `Host`.
fn same_origin(origin: &str, headers: &HeaderMap, via_proxy: bool) -> bool {
    let header = |name: &str| {
        let value = headers.get(name)?.to_str().ok()?;
        // The first proxy's view, when several appended theirs.
        Some(value.split(',').next().unwrap_or(value).trim())
    };
    let forwarded = |name: &str| if via_proxy { header(name) } else { None };
    let scheme = forwarded("x-forwarded-proto").unwrap_or("http");
    let Some(host) = forwarded("x-forwarded-host").or_else(|| header("host")) else {
        return false;
    };
    match (
        parse_origin(origin),
        parse_origin(&format!("{scheme}://{host}")),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// `scheme://host[:port]` as (scheme, host, port), lower-cased, the port defaulted by scheme.
fn parse_origin(text: &str) -> Option<(String, String, u16)> {
    let (scheme, authority) = text.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => return None,
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6.split_once(']')?;
            (host, rest.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default,
    };
    let scheme = match scheme.as_str() {
        "ws" => "http".to_owned(),
        "wss" => "https".to_owned(),
        _ => scheme,
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(cookie: Option<&str>, allow_query_token: bool) -> Authenticator {
        let config = eventgate_core::auth::AuthConfig {
            jwt_secret: Some("x".repeat(32)),
            ..Default::default()
        };
        Authenticator {
            verifier: Verifier::new(&config).unwrap(),
            cookie: cookie.map(str::to_owned),
            allow_query_token,
            ticket_ttl: Duration::from_secs(30),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn credentials_are_looked_for_in_order() {
        let auth = authenticator(Some("sid"), true);
        let all = headers(&[("authorization", "Bearer h"), ("cookie", "a=1; sid=c")]);
        let found = |h: &HeaderMap, q| auth.credential(h, q).map(|c| (c.source, c.value));
        assert_eq!(
            found(&all, Some("ticket=t&token=q")),
            Ok((Source::Header, "h".into()))
        );
        let no_header = headers(&[("cookie", "a=1; sid=c")]);
        assert_eq!(
            found(&no_header, Some("ticket=t&token=q")),
            Ok((Source::Ticket, "t".into()))
        );
        assert_eq!(
            found(&no_header, Some("token=q")),
            Ok((Source::Cookie, "c".into()))
        );
        assert_eq!(
            found(&HeaderMap::new(), Some("token=q")),
            Ok((Source::Query, "q".into()))
        );
        assert_eq!(
            found(&HeaderMap::new(), None).map(|_| ()),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn unusable_credentials_are_refused_not_skipped() {
        let auth = authenticator(None, false);
        let basic = headers(&[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(
            auth.credential(&basic, Some("ticket=t")).err(),
            Some(AuthError::Scheme)
        );
        assert_eq!(
            auth.credential(&HeaderMap::new(), Some("token=q")).err(),
            Some(AuthError::QueryTokenDisabled)
        );
        // Without AUTH_COOKIE, cookies are not credentials.
        let cookie = headers(&[("cookie", "sid=c")]);
        assert_eq!(
            auth.credential(&cookie, None).err(),
            Some(AuthError::Missing)
        );
    }

    #[test]
    fn cookie_credentials_need_the_gateways_own_origin() {
        let cross = headers(&[("origin", "https://evil.example"), ("host", "gw.example")]);
        let same = headers(&[("origin", "http://gw.example"), ("host", "gw.example")]);
        assert!(check_ws_origin(&cross, None, Some(Source::Cookie), false).is_err());
        assert!(check_ws_origin(&cross, None, Some(Source::Ticket), false).is_ok());
        assert!(check_ws_origin(&same, None, Some(Source::Cookie), false).is_ok());
        let listed = vec!["https://evil.example/".to_owned()];
        assert!(check_ws_origin(&cross, Some(&listed), Some(Source::Cookie), false).is_ok());
    }

    #[test]
    fn the_origin_check_compares_scheme_host_and_port_as_the_browser_saw_them() {
        let cookie = Some(Source::Cookie);
        // Behind nginx on a non-default port: Host lost the port, X-Forwarded-Host kept it.
        let proxied = |origin: &str| {
            headers(&[
                ("origin", origin),
                ("host", "127.0.0.1"),
                ("x-forwarded-host", "127.0.0.1:8443"),
                ("x-forwarded-proto", "https"),
            ])
        };
        assert!(check_ws_origin(&proxied("https://127.0.0.1:8443"), None, cookie, true).is_ok());
        for other in [
            "http://127.0.0.1:8443",
            "https://127.0.0.1",
            "https://127.0.0.1:9443",
            "https://localhost:8443",
            "https://127.0.0.1:8443.evil.example",
            "null",
        ] {
            assert!(
                check_ws_origin(&proxied(other), None, cookie, true).is_err(),
                "{other}"
            );
        }
        // The forwarded headers count only from a trusted proxy.
        assert!(check_ws_origin(&proxied("https://127.0.0.1:8443"), None, cookie, false).is_err());
        assert!(check_ws_origin(&proxied("http://127.0.0.1"), None, cookie, false).is_ok());
        // Default ports are the same origin written or not; case does not matter.
        let https = headers(&[
            ("origin", "https://App.Example.com"),
            ("host", "gw"),
            ("x-forwarded-host", "app.example.com:443"),
            ("x-forwarded-proto", "https"),
        ]);
        assert!(check_ws_origin(&https, None, cookie, true).is_ok());
        let v6 = headers(&[("origin", "http://[::1]:8080"), ("host", "[::1]:8080")]);
        assert!(check_ws_origin(&v6, None, cookie, false).is_ok());
    }
}
