//! Sockets and process figures: source addresses, file limits, CPU time and RSS.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses to spread client sockets over: one address has ~28k ephemeral ports per
/// destination, so 50k connections need several.
pub struct Sources {
    addrs: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    /// Parses `127.0.0.2-127.0.0.40` or a single address.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let (first, last) = spec.split_once('-').unwrap_or((spec, spec));
        let first: Ipv4Addr = first.trim().parse().context("source address")?;
        let last: Ipv4Addr = last.trim().parse().context("source address")?;
        let (a, b) = (u32::from(first), u32::from(last));
        if !first.is_loopback() || !last.is_loopback() || b < a {
            bail!("source addresses must be a loopback range such as 127.0.0.2-127.0.0.40");
        }
        Ok(Self {
            addrs: (a..=b).map(Ipv4Addr::from).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Connects to `to` from the next source address in turn.
    pub async fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let from = SocketAddr::new(IpAddr::V4(self.addrs[i % self.addrs.len()]), 0);
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(from)?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Raises this process's open-file limit to its hard limit; returns the new soft limit.
pub fn raise_file_limit() -> u64 {
    let hard = rlimit::Resource::NOFILE
        .get()
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    rlimit::increase_nofile_limit(hard).unwrap_or(1024)
}

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let total = ticks(11) + ticks(12);
    Ok(Duration::from_millis(total * 1000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on.
    100
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid}"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// Sum of CPU time over several processes.
pub fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|&p| cpu_time(p).ok()).sum()
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
