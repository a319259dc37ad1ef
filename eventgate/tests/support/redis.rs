//! A real `redis-server` per test, on a free port, in its own directory.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use super::wait_until;

/// A `redis-server` child process. Killed when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    password: Option<String>,
    /// More `redis-server` arguments (a replica's `--replicaof`, TLS files).
    extra: Vec<String>,
    /// Speaks TLS only (`rediss://`); the test's own connections present these.
    tls: Option<redis::TlsCertificates>,
    /// Outlives this process (a shared cluster node): its own process group, not killed on drop.
    detached: bool,
    child: Option<Child>,
}

pub(super) fn redis_binary() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = PathBuf::from(dir).join("redis-server");
        if path.exists() {
            return path;
        }
    }
    panic!(
        "redis-server not found: the test suite needs it (Debian: apt-get install redis-server); \
         run the suite with .ci/run, which installs it"
    );
}

fn cluster_node_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ]
    .map(String::from)
    .to_vec()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

impl RedisServer {
    /// A Redis without persistence: a restart loses everything.
    pub async fn start() -> Self {
        Self::launch(false, None, Vec::new(), None).await
    }

    /// A Redis that speaks only TLS with `certs`' server certificate, requiring client
    /// certificates when `require_clients`; persistent (fsync always) when `persistent`.
    pub async fn start_tls(
        certs: &super::tls::Certs,
        require_clients: bool,
        persistent: bool,
    ) -> Self {
        let mut extra: Vec<String> = Vec::new();
        for (flag, file) in [
            ("--tls-cert-file", "server.crt"),
            ("--tls-key-file", "server.key"),
            ("--tls-ca-cert-file", "ca.crt"),
        ] {
            extra.push(flag.into());
            extra.push(certs.file(file));
        }
        extra.push("--tls-auth-clients".into());
        extra.push(if require_clients { "yes" } else { "no" }.into());
        Self::launch(persistent, None, extra, Some(certs.client_certificates())).await
    }

    /// A Redis Cluster node on `port` (its bus port +10000 must be free), not yet joined.
    pub async fn start_cluster_node(port: u16) -> Self {
        let mut server =
            Self::start_cluster_node_unspawned(port, tempfile::tempdir().expect("temp dir"));
        assert!(server.spawn().await, "cluster node on {port}");
        server
    }

    /// A cluster node like [`Self::start_cluster_node`] in `dir`, that keeps running after this
    /// process exits (whoever started it stops it); `None` if it did not come up.
    pub async fn start_detached_cluster_node(port: u16, dir: tempfile::TempDir) -> Option<Self> {
        let mut server = Self::start_cluster_node_unspawned(port, dir);
        server.detached = true;
        server.spawn().await.then_some(server)
    }

    fn start_cluster_node_unspawned(port: u16, dir: tempfile::TempDir) -> Self {
        Self {
            port,
            dir,
            persistent: false,
            password: None,
            extra: cluster_node_args(),
            tls: None,
            detached: false,
            child: None,
        }
    }

    /// A handle on a Redis some other process runs on `port`: queries only; dropping it does
    /// nothing to the server.
    pub fn attach(port: u16) -> Self {
        Self::start_cluster_node_unspawned(port, tempfile::tempdir().expect("temp dir"))
    }

    /// A replica of the Redis on `port`, without persistence.
    pub async fn start_replica_of(port: u16) -> Self {
        let extra = vec!["--replicaof".into(), "127.0.0.1".into(), port.to_string()];
        Self::launch(false, None, extra, None).await
    }

    /// A Redis with an fsync-always append-only file: a restart keeps every acknowledged write.
    pub async fn start_persistent() -> Self {
        Self::launch(true, None, Vec::new(), None).await
    }

    /// A Redis that requires `password`.
    pub async fn start_with_password(password: &str) -> Self {
        Self::launch(false, Some(password.to_owned()), Vec::new(), None).await
    }

    async fn launch(
        persistent: bool,
        password: Option<String>,
        extra: Vec<String>,
        tls: Option<redis::TlsCertificates>,
    ) -> Self {
        for _ in 0..20 {
            let mut server = Self {
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                persistent,
                password: password.clone(),
                extra: extra.clone(),
                tls: tls.clone(),
                detached: false,
                child: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts the process on `self.port`; `false` if it did not come up.
    async fn spawn(&mut self) -> bool {
        let mut cmd = Command::new(redis_binary());
        if self.tls.is_some() {
            cmd.args(["--port", "0", "--tls-port"]);
        } else {
            cmd.arg("--port");
        }
        cmd.arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--loglevel", "warning", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra);
        if self.detached {
            cmd.process_group(0);
        } else {
            cmd.kill_on_drop(true);
        }
        let Ok(child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
            return false;
        };
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(5), || async {
            match self.client() {
                Some(client) => ping(client).await,
                None => false,
            }
        })
        .await;
        if !up {
            self.kill().await;
        }
        up
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(password) => format!("{scheme}://:{password}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    fn client(&self) -> Option<redis::Client> {
        match &self.tls {
            Some(certs) => redis::Client::build_with_tls(self.url(), certs.clone()).ok(),
            None => redis::Client::open(self.url()).ok(),
        }
    }

    /// Stops Redis with SIGTERM (it writes its data when persistent) and waits for the exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// Kills Redis with SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The server's process id, for signals (freezing it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis is running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts Redis again on the same port and directory.
    pub async fn restart(&mut self) {
        assert!(
            self.spawn().await,
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// A connection for assertions and fault injection.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Like [`Self::query`], `None` when the server does not answer.
    pub async fn try_query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let client = self.client()?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await.ok()
    }

    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut conn = self.connection().await;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await.expect("redis command")
    }

    /// Commands this server holds back (`CLIENT PAUSE`) whose arguments take over `bytes`:
    /// a publish's script call, told from a gateway's marker by a large event.
    pub async fn held_calls_over(&self, bytes: u64) -> usize {
        let clients: String = self.query(&["CLIENT", "LIST"]).await;
        clients
            .lines()
            .filter(|client| {
                let field = |name: &str| {
                    client
                        .split(' ')
                        .find_map(|f| f.strip_prefix(name))
                        .unwrap_or_default()
                        .to_owned()
                };
                field("flags=").contains('b') && field("argv-mem=").parse().unwrap_or(0) > bytes
            })
            .count()
    }

    /// Script calls (`EVALSHA`) this server has run, from `INFO commandstats`.
    pub async fn script_calls(&self) -> u64 {
        let info: String = self.query(&["INFO", "commandstats"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

async fn ping(client: redis::Client) -> bool {
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}
