//! Protection under abuse, shared by both services: who the client is behind a proxy, and
//! keyed rate limits whose memory stays bounded.

use std::{fmt, hash::Hash, net::IpAddr, num::NonZeroU32, str::FromStr, sync::Arc, time::Duration};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use http::HeaderMap;
use ipnet::IpNet;

/// Settings of the services' edge, one set for both (standalone runs both in one process).
#[derive(clap::Args, Clone, Debug)]
pub struct EdgeConfig {
    /// Proxies whose `X-Forwarded-For` / `X-Real-IP` name the client (comma-separated CIDRs,
    /// `10.0.0.0/8,127.0.0.1`). Empty: the socket peer is the client, headers are ignored.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,

    /// IPv6 clients count per network of this prefix length for rate limits and per-IP caps:
    /// one host usually holds a whole /64, so its addresses are one client.
    #[arg(long, env = "IPV6_PREFIX_LEN", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(32..=128))]
    pub ipv6_prefix_len: u8,

    /// A client must send its whole request head within this (slowloris).
    #[arg(long, env = "REQUEST_HEADER_TIMEOUT", default_value = "10s",
          value_parser = crate::config::parse_duration)]
    pub request_header_timeout: Duration,
}

/// Who a client is: `TRUSTED_PROXIES`, the peers whose `X-Forwarded-For` / `X-Real-IP` are
/// believed, and `IPV6_PREFIX_LEN`, how much of an IPv6 address names one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedProxies {
    proxies: Vec<IpNet>,
    ipv6_prefix: u8,
}

impl Default for TrustedProxies {
    fn default() -> Self {
        Self {
            proxies: Vec::new(),
            ipv6_prefix: 64,
        }
    }
}

impl TrustedProxies {
    /// Parses a comma-separated list of CIDRs or bare addresses (`10.0.0.0/8,127.0.0.1`).
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or CIDR (10.0.0.0/8)"))
            })
            .collect::<Result<_, _>>()
            .map(|proxies| Self {
                proxies,
                ..Self::default()
            })
    }

    /// The same proxies, with IPv6 clients keyed on `/prefix` networks (`IPV6_PREFIX_LEN`).
    pub fn with_ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix.min(128);
        self
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.proxies.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.proxies.is_empty()
    }

    /// The key a client's rate limits and caps count under: its address ([`Self::client_ip`]),
    /// an IPv6 one cut to its `IPV6_PREFIX_LEN` network (a host with a /64 picks any address
    /// in it, so per-address keys would let it escape every limit).
    pub fn client_key(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        match self.client_ip(peer, headers) {
            IpAddr::V6(v6) => {
                let net = ipnet::Ipv6Net::new(v6, self.ipv6_prefix).map_or(v6, |n| n.network());
                IpAddr::V6(net)
            }
            v4 => v4,
        }
    }

    /// The client's address: the socket peer, unless the peer is a trusted proxy. Then the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
    /// left were written by the client and prove nothing), else `X-Real-IP`. An entry that is
    /// not an address ends the walk at the last trusted hop, so no header can name an
    /// arbitrary key.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        if hops.is_empty()
            && let Some(real) = headers.get("x-real-ip").and_then(|v| v.to_str().ok())
        {
            hops.push(real.trim());
        }
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = ip;
            if !self.contains(ip) {
                return ip;
            }
        }
        client
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    None
}

/// IPv4 peers on a dual-stack socket arrive as `::ffff:a.b.c.d`; one client, one key.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for TrustedProxies {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// A rate and a burst: `20/s`, `600/min,burst=50`, or `off`. The burst defaults to one
/// period's worth (`20/s` allows 20 at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// `None` when off.
    quota: Option<(u32, Duration, u32)>,
}

impl Rate {
    pub const OFF: Rate = Rate { quota: None };

    /// `count` per `period`, up to `burst` at once.
    pub fn new(count: u32, period: Duration, burst: u32) -> Self {
        Self {
            quota: Some((count.max(1), period, burst.max(1))),
        }
    }

    pub fn is_off(&self) -> bool {
        self.quota.is_none()
    }

    /// The time one unit takes to refill, and the burst; `None` when off.
    pub fn cell(&self) -> Option<(Duration, u32)> {
        let (count, period, burst) = self.quota?;
        Some(((period / count).max(Duration::from_nanos(1)), burst))
    }

    fn governor_quota(&self) -> Option<Quota> {
        let (count, period, burst) = self.quota?;
        let cell = (period / count).max(Duration::from_nanos(1));
        Some(Quota::with_period(cell)?.allow_burst(NonZeroU32::new(burst)?))
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::OFF);
        }
        let bad = || format!("{s:?}: expected like `20/s`, `600/min,burst=50` or `off`");
        let (rate, burst) = match s.split_once(',') {
            Some((rate, burst)) => (rate, Some(burst.trim())),
            None => (s, None),
        };
        let (count, unit) = rate.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let burst = match burst {
            None => count,
            Some(b) => b
                .strip_prefix("burst=")
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(bad)?,
        };
        if count == 0 || burst == 0 {
            return Err(format!(
                "{s:?}: rate and burst must be at least 1 (or `off`)"
            ));
        }
        Ok(Self::new(count, period, burst))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.quota {
            None => f.write_str("off"),
            Some((count, period, burst)) => {
                write!(f, "{count}/{}s,burst={burst}", period.as_secs())
            }
        }
    }
}

/// Refused: try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for a `Retry-After` header, rounded up, at least 1.
    pub fn seconds(&self) -> u64 {
        self.0.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// A keyed rate limiter (GCRA, from `governor`, the engine of `tower_governor`). Keys whose
/// allowance has fully refilled carry no information and are dropped by [`Self::cleanup`],
/// which the services run periodically, so a flood from many addresses leaves nothing behind.
pub struct Limiter<K: Hash + Eq + Clone> {
    inner: Option<RateLimiter<K, governor::state::keyed::DefaultKeyedStateStore<K>, DefaultClock>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            inner: rate.governor_quota().map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one unit of `key`'s allowance, or says how long until one is free.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.inner else {
            return Ok(());
        };
        limiter
            .check_key(key)
            .map_err(|not_until| RetryAfter(not_until.wait_time_from(self.clock.now())))
    }

    /// Forgets keys that are back to a full allowance.
    pub fn cleanup(&self) {
        if let Some(limiter) = &self.inner {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A rate limit on one thing (a WebSocket's messages): no key, no map.
pub struct DirectLimiter {
    inner: Option<governor::DefaultDirectRateLimiter>,
}

impl DirectLimiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            inner: rate.governor_quota().map(RateLimiter::direct),
        }
    }

    pub fn check(&self) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.inner else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }
}

/// Something whose stale keys are dropped now and then.
pub trait Cleanup: Send + Sync {
    fn cleanup(&self);
}

impl<K: Hash + Eq + Clone + Send + Sync> Cleanup for Limiter<K> {
    fn cleanup(&self) {
        Limiter::cleanup(self)
    }
}

/// Runs `cleanup` on every limiter each `interval` until `stop` resolves.
pub async fn clean_periodically(
    limiters: Vec<Arc<dyn Cleanup>>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => limiters.iter().for_each(|l| l.cleanup()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        let spoofed = headers(&[("x-forwarded-for", "1.1.1.1"), ("x-real-ip", "2.2.2.2")]);
        assert_eq!(
            trusted.client_ip(ip("203.0.113.9"), &spoofed),
            ip("203.0.113.9")
        );
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(ip("10.0.0.1"), &spoofed), ip("10.0.0.1"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1").expect("parse");
        // The client wrote "1.1.1.1"; nginx appended the address it saw.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 192.168.1.1")]);
        assert_eq!(trusted.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.7"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(trusted.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.8"));
        // Ports and brackets are tolerated.
        let h = headers(&[("x-forwarded-for", "[2001:db8::1]:443")]);
        assert_eq!(trusted.client_ip(ip("10.0.0.2"), &h), ip("2001:db8::1"));
    }

    #[test]
    fn x_real_ip_is_used_without_x_forwarded_for() {
        let trusted = TrustedProxies::parse("127.0.0.1").expect("parse");
        let h = headers(&[("x-real-ip", "198.51.100.4")]);
        assert_eq!(trusted.client_ip(ip("127.0.0.1"), &h), ip("198.51.100.4"));
        assert_eq!(
            trusted.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn garbage_never_becomes_a_key() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        let h = headers(&[("x-forwarded-for", "evil, 10.1.1.1")]);
        assert_eq!(trusted.client_ip(ip("10.0.0.2"), &h), ip("10.1.1.1"));
        let h = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(trusted.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn mapped_ipv4_peers_are_one_client() {
        let trusted = TrustedProxies::parse("127.0.0.1/32").expect("parse");
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped());
        let h = headers(&[("x-forwarded-for", "198.51.100.5")]);
        assert_eq!(trusted.client_ip(mapped, &h), ip("198.51.100.5"));
        assert_eq!(
            TrustedProxies::default().client_ip(mapped, &h),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_on_their_network() {
        let none = TrustedProxies::default();
        let h = HeaderMap::new();
        let a = none.client_key(ip("2001:db8:1:2:aaaa::1"), &h);
        let b = none.client_key(ip("2001:db8:1:2:ffff:1:2:3"), &h);
        assert_eq!(a, b, "one /64, one client");
        assert_eq!(a, ip("2001:db8:1:2::"));
        assert_ne!(a, none.client_key(ip("2001:db8:1:3::1"), &h), "another /64");
        // IPv4 (and IPv4-mapped) addresses stay whole.
        assert_eq!(none.client_key(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 9).to_ipv6_mapped());
        assert_eq!(none.client_key(mapped, &h), ip("203.0.113.9"));
        // The prefix is a setting; through a proxy the forwarded address is cut.
        let wide = none.clone().with_ipv6_prefix(48);
        assert_eq!(
            wide.client_key(ip("2001:db8:1:ffff::9"), &h),
            ip("2001:db8:1::")
        );
        let proxied = TrustedProxies::parse("10.0.0.0/8").expect("parse");
        let forwarded = headers(&[("x-forwarded-for", "2001:db8:9:9:1::5")]);
        assert_eq!(
            proxied.client_key(ip("10.0.0.2"), &forwarded),
            ip("2001:db8:9:9::")
        );
        let whole = none.with_ipv6_prefix(128);
        assert_eq!(whole.client_key(ip("2001:db8::7"), &h), ip("2001:db8::7"));
    }

    #[test]
    fn bad_proxy_lists_are_refused() {
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("nginx").is_err());
        assert!(TrustedProxies::parse("").expect("empty").is_empty());
    }

    #[test]
    fn rates_parse_and_refuse() {
        assert_eq!(
            "20/s".parse::<Rate>(),
            Ok(Rate::new(20, Duration::from_secs(1), 20))
        );
        assert_eq!(
            "600/min,burst=50".parse::<Rate>(),
            Ok(Rate::new(600, Duration::from_secs(60), 50))
        );
        assert_eq!("off".parse::<Rate>(), Ok(Rate::OFF));
        for bad in [
            "",
            "20",
            "0/s",
            "20/s,burst=0",
            "20/fortnight",
            "x/s",
            "20/s,50",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_limiter_refuses_past_the_burst_and_says_when() {
        let limiter = Limiter::new("1/min,burst=2".parse().expect("rate"));
        assert!(limiter.check(&1).is_ok());
        assert!(limiter.check(&1).is_ok());
        let refused = limiter.check(&1).expect_err("third");
        assert!(refused.0 > Duration::from_secs(50), "{refused:?}");
        assert_eq!(refused.seconds(), refused.0.as_secs() + 1);
        assert!(limiter.check(&2).is_ok(), "keys are independent");
        let off = Limiter::new(Rate::OFF);
        assert!((0..1000).all(|_| off.check(&1).is_ok()));
    }

    #[test]
    fn limiter_memory_is_bounded_under_many_keys() {
        // 100,000 distinct addresses, one request each: every key is remembered until its
        // allowance refills (1 ms here), then cleanup forgets it.
        let limiter = Limiter::new(Rate::new(1000, Duration::from_secs(1), 1));
        for i in 0..100_000u32 {
            assert!(limiter.check(&IpAddr::V4(Ipv4Addr::from(i))).is_ok());
        }
        assert_eq!(limiter.len(), 100_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            limiter.cleanup();
            if limiter.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(limiter.len(), 0, "refilled keys are forgotten");
    }
}
