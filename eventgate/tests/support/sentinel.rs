//! A Redis primary, a replica and three Sentinels watching them, as real processes: what the
//! failover tests run.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use super::{
    RedisServer,
    proxy::Proxy,
    redis::{free_port, redis_binary},
    wait_until,
};

/// The master name the Sentinels monitor.
pub const MASTER: &str = "eventgate";

/// Primary, replica and three Sentinels; everything is killed when dropped.
pub struct Sentinels {
    /// The two data servers, primary first; which one is the primary changes with failovers.
    pub servers: Vec<RedisServer>,
    /// In front of the first primary, when started with [`Sentinels::start_behind_proxy`]:
    /// everyone reaches it through the proxy.
    pub proxy: Option<Proxy>,
    sentinels: Vec<(u16, tempfile::TempDir, Child)>,
}

fn sentinel_command(config: &std::path::Path) -> Command {
    // Debian's redis-sentinel package; the same binary runs Sentinel with `--sentinel`.
    let dedicated = PathBuf::from("/usr/bin/redis-sentinel");
    if dedicated.exists() {
        let mut cmd = Command::new(dedicated);
        cmd.arg(config);
        cmd
    } else {
        let mut cmd = Command::new(redis_binary());
        cmd.arg(config).arg("--sentinel");
        cmd
    }
}

impl Sentinels {
    /// Starts the primary, its replica (in sync) and three Sentinels that agree on both.
    pub async fn start() -> Self {
        Self::launch(false).await
    }

    /// Like [`Sentinels::start`], with the primary reached through a [`Proxy`] that can cut
    /// its replication link.
    pub async fn start_behind_proxy() -> Self {
        Self::launch(true).await
    }

    async fn launch(proxied: bool) -> Self {
        let primary = RedisServer::start().await;
        let proxy = if proxied {
            Some(Proxy::start(primary.port).await)
        } else {
            None
        };
        let address = proxy.as_ref().map_or(primary.port, |p| p.port);
        let replica = RedisServer::start_replica_of(address).await;
        let synced = wait_until(Duration::from_secs(10), || async {
            let info: String = replica.query(&["INFO", "replication"]).await;
            info.contains("master_link_status:up")
        })
        .await;
        assert!(synced, "the replica never synced");
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let config = dir.path().join("sentinel.conf");
            let text = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nloglevel warning\n\
                 dir {dir}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {address} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 10000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = dir.path().display(),
            );
            std::fs::write(&config, text).expect("sentinel.conf");
            let child = sentinel_command(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-sentinel (scripts/test installs it)");
            sentinels.push((port, dir, child));
        }
        let setup = Self {
            servers: vec![primary, replica],
            proxy,
            sentinels,
        };
        let agreed = wait_until(Duration::from_secs(30), || async {
            for i in 0..3 {
                let Some(fields) = setup.master_fields(i).await else {
                    return false;
                };
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|kv| kv[0] == name)
                        .map(|kv| kv[1].clone())
                        .unwrap_or_default()
                };
                if field("num-slaves") != "1" || field("num-other-sentinels") != "2" {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            agreed,
            "the Sentinels never found the replica and each other"
        );
        setup
    }

    /// `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER` for the services.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _, _)| format!("127.0.0.1:{port}"))
            .collect();
        vec![
            ("REDIS_SENTINELS", addrs.join(",")),
            ("REDIS_SENTINEL_MASTER", MASTER.to_owned()),
        ]
    }

    async fn client(&self, i: usize) -> Option<redis::aio::MultiplexedConnection> {
        let url = format!("redis://127.0.0.1:{}", self.sentinels[i].0);
        let client = redis::Client::open(url).ok()?;
        client.get_multiplexed_async_connection().await.ok()
    }

    async fn master_fields(&self, i: usize) -> Option<Vec<String>> {
        let mut conn = self.client(i).await?;
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .ok()
    }

    /// The port of the primary Sentinel `i` names.
    pub async fn primary_port(&self, i: usize) -> Option<u16> {
        let mut conn = self.client(i).await?;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(port)
    }

    /// The ports of the primary now and of the other server.
    pub async fn primary_and_replica(&self) -> (u16, u16) {
        let primary = self.primary().await.port;
        let other = self.servers.iter().find(|s| s.port != primary);
        (primary, other.expect("two servers").port)
    }

    /// The server that is primary now.
    pub async fn primary(&self) -> &RedisServer {
        let port = self.primary_port(0).await.expect("a Sentinel answers");
        self.server(port)
    }

    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers
            .iter()
            .find(|s| s.port == port)
            .expect("one of ours")
    }

    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("one of ours")
    }

    /// `SENTINEL FAILOVER`: promotes the replica (no agreement needed).
    pub async fn failover(&self) {
        let mut conn = self.client(0).await.expect("a Sentinel answers");
        let _: String = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .expect("SENTINEL FAILOVER");
    }

    /// Waits until every Sentinel names `port` as the primary and it says it is one.
    pub async fn wait_primary_is(&self, port: u16, timeout: Duration) -> bool {
        wait_until(timeout, || async {
            for i in 0..self.sentinels.len() {
                if self.primary_port(i).await != Some(port) {
                    return false;
                }
            }
            self.role(port).await == "master"
        })
        .await
    }

    /// `master` or `slave`: what the server on `port` says it is; empty while it cannot answer
    /// (a server changing roles drops its clients' connections).
    pub async fn role(&self, port: u16) -> String {
        let role: Vec<redis::Value> = self
            .server(port)
            .try_query(&["ROLE"])
            .await
            .unwrap_or_default();
        match role.first() {
            Some(redis::Value::BulkString(r)) => String::from_utf8_lossy(r).into_owned(),
            _ => String::new(),
        }
    }
}
