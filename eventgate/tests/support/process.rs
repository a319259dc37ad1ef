//! eventgate services as real processes of the binary, and nginx with the repo's config.

use std::{path::PathBuf, process::Stdio};

use tokio::process::{Child, Command};

use super::{SOON, TEST_PUBLISHER_KEY, TEST_SECRET, redis::free_port, wait_until};

/// The binary under test, started with a clean environment plus `env`, its output piped.
pub fn eventgate(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start eventgate")
}

/// Runs the binary to completion (bounded) and returns (status, stdout + stderr).
pub async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = eventgate(args, env);
    let output = tokio::time::timeout(SOON, child.wait_with_output())
        .await
        .expect("eventgate exits")
        .expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// A running `eventgate <subcommand>`; killed when dropped.
pub struct Service {
    pub child: Child,
    pub url: String,
    pub addr: String,
    subcommand: String,
    addr_var: String,
    env: Vec<(String, String)>,
}

impl Service {
    /// Starts `eventgate subcommand` listening on a free port (`addr_var`), with the test key
    /// material and `env`, and waits until `/readyz` answers 200.
    pub async fn start(subcommand: &str, addr_var: &str, env: &[(&str, String)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let child = spawn(subcommand, addr_var, &addr, &env);
        let service = Self {
            child,
            url: format!("http://{addr}"),
            addr,
            subcommand: subcommand.to_owned(),
            addr_var: addr_var.to_owned(),
            env,
        };
        service.wait_ready().await;
        service
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let readyz = format!("{}/readyz", self.url);
        // Generous: a replica restarted under a fault test's load starts on a busy machine.
        let ready = wait_until(SOON * 3, || async {
            http.get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let last = match http.get(&readyz).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        assert!(
            ready,
            "eventgate {} never became ready: {last}",
            self.subcommand
        );
    }

    /// SIGTERM, and waits for the process to finish its drain and exit.
    pub async fn terminate(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(SOON, self.child.wait()).await;
    }

    /// Starts the process again on the same address, and waits until it is ready.
    pub async fn restart(&mut self) {
        self.child = spawn(&self.subcommand, &self.addr_var, &self.addr, &self.env);
        self.wait_ready().await;
    }

    /// `kill -9`: no drain, no goodbye.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill");
    }
}

fn spawn(subcommand: &str, addr_var: &str, addr: &str, env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .arg(subcommand)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env(addr_var, addr)
        .env("JWT_SECRET", TEST_SECRET)
        .env("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start eventgate")
}

/// nginx (the Debian package) running `deploy/nginx/eventgate.conf` with its upstreams swapped
/// for test processes; stopped when dropped.
pub struct Nginx {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start(gateways: &[&str], publisher: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = std::fs::read_to_string(repo.join("deploy/nginx/eventgate.conf"))
            .expect("deploy/nginx/eventgate.conf");
        let servers: String = gateways
            .iter()
            .map(|g| format!("    server {g} max_fails=1 fail_timeout=5s;\n"))
            .collect();
        let mut conf = String::new();
        for line in shipped.lines() {
            if line.trim_start().starts_with("server gateway-") {
                continue;
            }
            let line = line
                .replace("server publisher:8081;", &format!("server {publisher};"))
                .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
                .replace(
                    "/var/log/nginx/access.log",
                    &dir.path().join("access.log").display().to_string(),
                );
            conf.push_str(&line);
            conf.push('\n');
            if line.starts_with("upstream eventgate_gateways {") {
                conf.push_str(&servers);
            }
        }
        assert!(
            conf.contains(&format!("listen 127.0.0.1:{port};")),
            "{conf}"
        );
        let d = dir.path().display();
        std::fs::write(dir.path().join("eventgate.conf"), conf).expect("write");
        let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/eventgate.conf;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).expect("write");
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx (scripts/test installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let healthz = format!("{url}/healthz");
        let up = wait_until(SOON, || async {
            http.get(&healthz)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(
            up,
            "nginx never answered: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        Self { child, url, dir }
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Redis, a publisher and `replicas` gateways as processes, with nginx (the repo's config) in
/// front; every service gets `env` (nginx is a trusted proxy) and its replica id.
pub struct Deployment {
    pub redis: super::RedisServer,
    pub publisher: Service,
    pub gateways: Vec<Service>,
    pub nginx: Nginx,
}

impl Deployment {
    pub async fn start(replicas: usize, env: &[(&str, &str)]) -> Self {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let redis = super::RedisServer::start().await;
        let mut env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        env.push(("REDIS_URL", redis.url()));
        // nginx runs on this machine: its X-Forwarded-For names the client.
        env.push(("TRUSTED_PROXIES", "127.0.0.1/32".to_owned()));
        let publisher = Service::start("publisher", "PUBLISHER_ADDR", &env).await;
        let mut gateways = Vec::new();
        for i in 0..replicas {
            let mut env = env.clone();
            env.push(("REPLICA_ID", format!("replica-{i}")));
            gateways.push(Service::start("gateway", "GATEWAY_ADDR", &env).await);
        }
        let upstreams: Vec<&str> = gateways.iter().map(|g| g.addr.as_str()).collect();
        let nginx = Nginx::start(&upstreams, &publisher.addr).await;
        Self {
            redis,
            publisher,
            gateways,
            nginx,
        }
    }
}
