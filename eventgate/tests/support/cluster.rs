//! A real Redis Cluster: `redis-server --cluster-enabled yes` nodes on free ports (their bus
//! ports, +10000, free too), joined with `redis-cli --cluster create`.

use std::{os::unix::process::CommandExt, path::PathBuf, process::Stdio, time::Duration};

use super::{RedisServer, redis::free_port, wait_until};

/// The nodes; killed when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A port whose cluster bus port (+10000) is free as well.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each, `cluster_state:ok` on every node;
    /// killed when dropped. For tests that stop, fail over or reshard nodes.
    pub async fn start(primaries: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            nodes.push(RedisServer::start_cluster_node(free_cluster_port()).await);
        }
        Self::join(nodes, replicas).await
    }

    /// The three-primary cluster this test binary shares with its other tests in this run
    /// (each stack keeps to its own key prefix). Nextest runs each test in its own process, so
    /// the first test to ask starts the nodes in their own process group and records their
    /// ports under a file lock; a watchdog stops them once the test runner has exited.
    pub async fn shared() -> Self {
        let state = shared_state_dir();
        std::fs::create_dir_all(&state).expect("shared cluster directory");
        let lock = std::fs::File::create(state.join("lock")).expect("lock file");
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .expect("lock task")
            .expect("lock the shared cluster");
        let ports_file = state.join("ports");
        if let Ok(text) = std::fs::read_to_string(&ports_file) {
            let nodes: Vec<RedisServer> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(RedisServer::attach)
                .collect();
            let cluster = Self { nodes };
            if !cluster.nodes.is_empty() && cluster.is_ok().await {
                drop(lock);
                return cluster;
            }
        }
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let dir = tempfile::Builder::new()
                .disable_cleanup(true)
                .tempdir_in(&state)
                .expect("node directory");
            if let Some(node) =
                RedisServer::start_detached_cluster_node(free_cluster_port(), dir).await
            {
                nodes.push(node);
            }
        }
        let pids: Vec<String> = nodes
            .iter()
            .filter_map(|n| n.pid())
            .map(|p| p.to_string())
            .collect();
        // The watchdog: once the runner is gone, stop the nodes and remove their files. It
        // outlives this process (init reaps it), so it is not waited for.
        #[allow(clippy::zombie_processes)]
        std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "owner=$1; dir=$2; shift 2; \
                 while kill -0 \"$owner\" 2>/dev/null; do sleep 1; done; \
                 kill -9 \"$@\" 2>/dev/null; rm -rf \"$dir\"",
            )
            .arg("watchdog")
            .arg(owner_pid().to_string())
            .arg(&state)
            .args(&pids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the shared cluster's watchdog");
        let cluster = Self::join(nodes, 0).await;
        let ports: Vec<String> = cluster.nodes.iter().map(|n| n.port.to_string()).collect();
        std::fs::write(&ports_file, ports.join(" ")).expect("record the shared cluster");
        drop(lock);
        cluster
    }

    async fn join(nodes: Vec<RedisServer>, replicas: usize) -> Self {
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli (scripts/test installs redis-tools)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes };
        let ok = wait_until(Duration::from_secs(30), || cluster.is_ok()).await;
        assert!(ok, "the cluster never reached cluster_state:ok");
        let synced = wait_until(Duration::from_secs(30), || async {
            for node in &cluster.nodes {
                let info: String = node.query(&["INFO", "replication"]).await;
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    return false;
                }
            }
            let slots: Vec<redis::Value> = cluster.nodes[0].query(&["CLUSTER", "SLOTS"]).await;
            slots.iter().all(|range| {
                matches!(range, redis::Value::Array(fields) if fields.len() == 3 + replicas)
            })
        })
        .await;
        assert!(synced, "the replicas never caught up");
        cluster
    }

    /// Every node answers and reports `cluster_state:ok`.
    async fn is_ok(&self) -> bool {
        for node in &self.nodes {
            let Some(info) = node.try_query::<String>(&["CLUSTER", "INFO"]).await else {
                return false;
            };
            if !info.contains("cluster_state:ok") {
                return false;
            }
        }
        true
    }

    /// `REDIS_CLUSTER` for the services: every node as a seed.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// The port of the primary serving `slot` now, and of its replicas, as a live node says.
    pub async fn serving(&self, slot: u16) -> (u16, Vec<u16>) {
        for node in &self.nodes {
            let Some(ranges) = node
                .try_query::<Vec<redis::Value>>(&["CLUSTER", "SLOTS"])
                .await
            else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(fields) = range else {
                    continue;
                };
                let (Some(redis::Value::Int(first)), Some(redis::Value::Int(last))) =
                    (fields.first(), fields.get(1))
                else {
                    continue;
                };
                if !(*first..=*last).contains(&i64::from(slot)) {
                    continue;
                }
                let ports: Vec<u16> = fields[2..]
                    .iter()
                    .filter_map(|node| match node {
                        redis::Value::Array(node) => match node.get(1) {
                            Some(redis::Value::Int(port)) => u16::try_from(*port).ok(),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect();
                if let Some((primary, replicas)) = ports.split_first() {
                    return (*primary, replicas.to_vec());
                }
            }
        }
        panic!("no live node names a primary of slot {slot}");
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("one of ours")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("one of ours")
    }

    /// Moves `slot` from the primary serving it to the primary on `to`, the way
    /// `redis-cli --cluster reshard` does: `IMPORTING` on the target, `MIGRATING` on the
    /// source, `MIGRATE` of its keys in batches, then `SETSLOT NODE` on both and every other
    /// node. Returns how many keys moved.
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> usize {
        let from = self.serving(slot).await.0;
        let (source, target) = (self.node(from), self.node(to));
        let source_id: String = source.query(&["CLUSTER", "MYID"]).await;
        let target_id: String = target.query(&["CLUSTER", "MYID"]).await;
        let slot = slot.to_string();
        let _: String = target
            .query(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id])
            .await;
        let _: String = source
            .query(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id])
            .await;
        let port = to.to_string();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = source
                .query(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .await;
            if keys.is_empty() {
                break;
            }
            moved += keys.len();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: String = source.query(&args).await;
        }
        // The target first, so the slot is never owned by nobody (as redis-cli does).
        let _: String = target
            .query(&["CLUSTER", "SETSLOT", &slot, "NODE", &target_id])
            .await;
        let _: String = source
            .query(&["CLUSTER", "SETSLOT", &slot, "NODE", &target_id])
            .await;
        for node in &self.nodes {
            if node.port != from && node.port != to {
                let _: Option<String> = node
                    .try_query(&["CLUSTER", "SETSLOT", &slot, "NODE", &target_id])
                    .await;
            }
        }
        moved
    }

    /// The ports of the primaries, as a live node says.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut primaries = Vec::new();
        for slot in (0..16384u16).step_by(512) {
            let primary = self.serving(slot).await.0;
            if !primaries.contains(&primary) {
                primaries.push(primary);
            }
        }
        primaries
    }

    /// Waits until the cluster says `port` serves `slot`.
    pub async fn wait_primary_is(&self, slot: u16, port: u16, timeout: Duration) -> bool {
        wait_until(timeout, || async { self.serving(slot).await.0 == port }).await
    }
}

/// Who the shared cluster lives as long as: the test runner (nextest runs one process per test,
/// its parent), or this process when every test runs in it (`cargo test`).
fn owner_pid() -> u32 {
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        std::os::unix::process::parent_id()
    } else {
        std::process::id()
    }
}

/// One directory per runner and test binary.
fn shared_state_dir() -> PathBuf {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tests".into());
    std::env::temp_dir()
        .join("eventgate-test-clusters")
        .join(format!("{}-{binary}", owner_pid()))
}
