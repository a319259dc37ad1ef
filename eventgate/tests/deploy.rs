//! The deployment files agree with the binary: every Kubernetes overlay renders with
//! `kubectl kustomize` and its images, commands, ports, probes and environment are ones the
//! binary really has; `docker-compose.yml` and the Dockerfile likewise; no secret is real.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_yaml::Value;
use support::{SOON, TEST_PUBLISHER_KEY, TEST_SECRET, redis::free_port, wait_until};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn eventgate_help(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(args)
        .arg("--help")
        .output()
        .expect("eventgate --help");
    assert!(output.status.success(), "{args:?} --help");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The environment variables the binary reads, from its own help (a ConfigMap shared by both
/// services may carry the other's settings; a name no command reads is a typo).
fn known_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for help in [
        eventgate_help(&[]),
        eventgate_help(&["gateway"]),
        eventgate_help(&["publisher"]),
        eventgate_help(&["standalone"]),
    ] {
        for part in help.split("[env: ").skip(1) {
            // `[env: NAME=value]`, or `[env: NAME]` for settings whose values are hidden.
            let end = part.find(['=', ']']).expect("end of the env name");
            vars.insert(part[..end].to_owned());
        }
    }
    // Read by the logging library, not a flag.
    vars.insert("RUST_LOG".into());
    assert!(
        vars.contains("REDIS_URL") && vars.contains("JWT_SECRET"),
        "{vars:?}"
    );
    vars
}

fn subcommands() -> BTreeSet<String> {
    ["gateway", "publisher", "standalone", "health"]
        .iter()
        .filter(|s| eventgate_help(&[s]).contains("Usage:"))
        .map(|s| s.to_string())
        .collect()
}

fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("k8s/overlays").join(overlay);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .stderr(Stdio::piped())
        .output()
        .expect("kubectl (scripts/test installs it)");
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("every rendered manifest parses"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn kind_named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn str_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other)
                            .expect("scalar")
                            .trim()
                            .to_owned(),
                    };
                    (k.as_str().expect("string key").to_owned(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A secret's value that is plainly an example: keys and secrets say `change-me`, a Redis URL
/// carries no password.
fn assert_placeholder(name: &str, value: &str) {
    assert!(!value.starts_with("eyJ"), "{name} holds a JWT");
    if name == "REDIS_URL" {
        assert!(!value.contains('@'), "{name} carries a password: {value:?}");
    } else if ["SECRET", "KEY", "PASSWORD", "TOKEN"]
        .iter()
        .any(|s| name.contains(s))
    {
        assert!(
            value.contains("change-me"),
            "{name} looks like a real secret: {value:?}"
        );
    }
}

fn duration_secs(text: &str) -> u64 {
    humantime::parse_duration(text).expect("duration").as_secs()
}

#[test]
fn every_kubernetes_overlay_renders_and_agrees_with_the_binary() {
    let subcommands = subcommands();
    for overlay in ["dev", "production"] {
        let docs = render(overlay);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Ingress",
            "ConfigMap",
            "Secret",
            "StatefulSet",
        ] {
            assert!(kinds.contains(kind), "{overlay}: no {kind}");
        }
        let config = str_map(&kind_named(&docs, "ConfigMap", "eventgate-config")["data"]);
        let secret = str_map(&kind_named(&docs, "Secret", "eventgate-secrets")["stringData"]);
        for (name, value) in &secret {
            assert_placeholder(name, value);
        }
        let heartbeat = duration_secs(&config["HEARTBEAT_INTERVAL"]);
        let shutdown = duration_secs(&config["DRAIN_TIMEOUT"]);
        assert!(
            shutdown > duration_secs(&config["DRAIN_GRACE"]),
            "{overlay}"
        );

        for (deployment, subcommand, addr_var) in [
            ("eventgate-gateway", "gateway", "GATEWAY_ADDR"),
            ("eventgate-publisher", "publisher", "PUBLISHER_ADDR"),
        ] {
            let known = known_env_vars();
            let pod = &kind_named(&docs, "Deployment", deployment)["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            let image = container["image"].as_str().expect("image");
            assert!(
                image.contains("eventgate:"),
                "{overlay} {deployment}: {image}"
            );
            let args: Vec<&str> = container["args"]
                .as_sequence()
                .expect("args")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(subcommands.contains(args[0]), "{deployment}: {args:?}");
            assert_eq!(args[0], subcommand);
            // Every variable it is given is one the binary reads.
            let mut given: Vec<String> = config.keys().chain(secret.keys()).cloned().collect();
            if let Some(env) = container["env"].as_sequence() {
                given.extend(
                    env.iter()
                        .filter_map(|e| e["name"].as_str())
                        .map(str::to_owned),
                );
            }
            for name in &given {
                assert!(
                    known.contains(name),
                    "{overlay} {deployment}: eventgate reads no {name}"
                );
            }
            // The port it listens on is the one declared and probed.
            let port: u16 = config[addr_var]
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in the address");
            assert_eq!(
                container["ports"][0]["containerPort"].as_u64(),
                Some(port as u64)
            );
            let port_name = container["ports"][0]["name"].as_str().expect("port name");
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{deployment} {probe}");
                assert_eq!(get["port"], port_name, "{deployment} {probe}");
            }
            // Drain: the pre-stop pause and the shutdown fit in the grace period.
            let pre_stop: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("preStop sleep seconds");
            let grace = pod["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("grace period");
            assert!(
                grace > pre_stop + shutdown,
                "{deployment}: {grace} <= {pre_stop} + {shutdown}"
            );
            // Scraped on the port the binary serves /metrics on.
            let annotations = str_map(
                &kind_named(&docs, "Deployment", deployment)["spec"]["template"]["metadata"]["annotations"],
            );
            assert_eq!(
                annotations["prometheus.io/port"],
                port.to_string(),
                "{deployment}"
            );
            assert_eq!(
                annotations["prometheus.io/path"], "/metrics",
                "{deployment}"
            );
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
            assert_eq!(
                container["securityContext"]["allowPrivilegeEscalation"],
                false
            );
            for kind in ["requests", "limits"] {
                assert!(
                    container["resources"][kind]["memory"].is_string(),
                    "{deployment} {kind}"
                );
            }
        }

        // The ingress reaches only the gateway, unbuffered, open longer than the heartbeat.
        let ingress = kind_named(&docs, "Ingress", "eventgate");
        let annotations = str_map(&ingress["metadata"]["annotations"]);
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-buffering"],
            "off"
        );
        let read: u64 = annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]
            .parse()
            .expect("seconds");
        assert!(
            read > heartbeat * 2,
            "read timeout {read} s vs heartbeat {heartbeat} s"
        );
        let backends: Vec<&str> = ingress["spec"]["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .flat_map(|r| r["http"]["paths"].as_sequence().into_iter().flatten())
            .filter_map(|p| p["backend"]["service"]["name"].as_str())
            .collect();
        assert_eq!(backends, ["eventgate-gateway"], "{overlay}");
        // The publisher admits only labelled clients.
        let policy = kind_named(&docs, "NetworkPolicy", "eventgate-publisher");
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "eventgate-publisher"
        );
        assert!(policy["spec"]["ingress"][0]["from"].is_sequence());
        // Services point at the named ports of their pods.
        for service in [
            "eventgate-gateway",
            "eventgate-publisher",
            "eventgate-redis",
        ] {
            let spec = &kind_named(&docs, "Service", service)["spec"];
            assert!(
                spec["selector"]["app.kubernetes.io/name"] == service,
                "{service}"
            );
        }
        // The in-cluster Redis is what REDIS_URL names.
        assert!(secret["REDIS_URL"].contains("eventgate-redis"), "{overlay}");
    }
}

/// The managed-Redis overlay: TLS to Redis with the CA and client certificate from a Secret,
/// mounted where the settings point and readable by the non-root user.
#[test]
fn the_managed_redis_overlay_mounts_the_tls_files_where_the_settings_point() {
    let docs = render("managed-redis-tls");
    let known = known_env_vars();
    let config = str_map(&kind_named(&docs, "ConfigMap", "eventgate-config")["data"]);
    let secret = str_map(&kind_named(&docs, "Secret", "eventgate-secrets")["stringData"]);
    assert!(secret["REDIS_URL"].starts_with("rediss://"), "{secret:?}");
    assert!(
        !docs.iter().any(|d| d["kind"] == "StatefulSet"),
        "no in-cluster Redis"
    );
    let files = str_map(&kind_named(&docs, "Secret", "eventgate-redis-tls")["stringData"]);
    for (name, value) in &files {
        assert!(value.contains("change-me"), "{name} looks real: {value:?}");
    }
    for name in config.keys().chain(secret.keys()) {
        assert!(known.contains(name), "eventgate reads no {name}");
    }
    for deployment in ["eventgate-gateway", "eventgate-publisher"] {
        let pod = &kind_named(&docs, "Deployment", deployment)["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["secret"]["secretName"] == "eventgate-redis-tls")
            .expect("the TLS Secret as a volume");
        let mount = pod["containers"][0]["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("mounted");
        assert_eq!(mount["readOnly"], true);
        let dir = mount["mountPath"].as_str().expect("path");
        for setting in [
            "REDIS_TLS_CA_FILE",
            "REDIS_TLS_CERT_FILE",
            "REDIS_TLS_KEY_FILE",
        ] {
            let path = &config[setting];
            let file = path
                .strip_prefix(&format!("{dir}/"))
                .unwrap_or_else(|| panic!("{deployment}: {setting}={path} is outside {dir}"));
            assert!(
                files.contains_key(file),
                "{deployment}: the Secret has no {file}"
            );
        }
        let mode = volume["secret"]["defaultMode"].as_u64().expect("mode");
        let group = pod["securityContext"]["fsGroup"].as_u64();
        assert!(
            mode & 0o004 != 0 || (mode & 0o040 != 0 && group == Some(10001)),
            "{deployment}: user 10001 cannot read the key (mode {mode:o}, fsGroup {group:?})"
        );
    }
}

fn compose() -> Value {
    let text =
        std::fs::read_to_string(repo().join("docker-compose.yml")).expect("docker-compose.yml");
    let mut value: Value = serde_yaml::from_str(&text).expect("docker-compose.yml parses");
    value.apply_merge().expect("merge keys");
    // Nested merges (`<<:` inside services) need a second pass.
    value.apply_merge().expect("merge keys");
    value
}

fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn docker_compose_runs_redis_a_publisher_three_gateways_and_nginx() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "redis",
            "publisher",
            "gateway-1",
            "gateway-2",
            "gateway-3",
            "nginx"
        ])
    );
    let example = env_file(&repo().join(".env.example"));
    for (name, value) in &example {
        assert_placeholder(name, value);
    }
    let subcommands = subcommands();
    let mut replicas = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().expect("name");
        assert!(
            service["healthcheck"]["test"].is_sequence(),
            "{name}: healthcheck"
        );
        let Some(subcommand) = service["command"][0].as_str().filter(|_| name != "redis") else {
            continue;
        };
        assert!(subcommands.contains(subcommand), "{name}: {subcommand}");
        let known = known_env_vars();
        let env = str_map(&service["environment"]);
        for var in env.keys().chain(example.keys()) {
            assert!(known.contains(var), "{name}: eventgate reads no {var}");
        }
        assert_eq!(service["env_file"][0], ".env", "{name}");
        assert_eq!(
            service["depends_on"]["redis"]["condition"], "service_healthy",
            "{name}"
        );
        let health = service["healthcheck"]["test"]
            .as_sequence()
            .expect("test")
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>();
        assert_eq!(&health[..3], ["CMD", "eventgate", "health"], "{name}");
        let addr_var = if subcommand == "gateway" {
            "GATEWAY_ADDR"
        } else {
            "PUBLISHER_ADDR"
        };
        let port = env[addr_var].rsplit(':').next().expect("port");
        assert!(
            health[3].contains(&format!(":{port}/healthz")),
            "{name}: {health:?}"
        );
        if subcommand == "gateway" {
            replicas.insert(env["REPLICA_ID"].clone());
            assert!(!env["TRUSTED_PROXIES"].is_empty(), "{name}");
        }
    }
    assert_eq!(replicas.len(), 3, "distinct replica ids");
    // nginx serves the repo's config and waits for healthy gateways.
    let nginx = &compose["services"]["nginx"];
    let mount = nginx["volumes"][0].as_str().expect("volume");
    let source = mount.split(':').next().expect("source");
    assert!(repo().join(source).is_file(), "{source}");
    for gateway in ["gateway-1", "gateway-2", "gateway-3"] {
        assert_eq!(nginx["depends_on"][gateway]["condition"], "service_healthy");
    }
    let config = std::fs::read_to_string(repo().join(source)).expect("nginx config");
    // nginx does not inherit proxy_set_header into a location that sets any: every proxied
    // location must set X-Forwarded-For itself, or clients choose their own rate-limit key.
    for block in config.split("\n    location ").skip(1) {
        let block = &block[..block.find("\n    }").expect("end of location")];
        if block.contains("proxy_pass") {
            let sets = |directive: &str| block.lines().any(|l| l.trim() == directive);
            assert!(
                sets("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"),
                "location {block}"
            );
        }
    }
    for gateway in ["gateway-1", "gateway-2", "gateway-3"] {
        assert!(
            config.contains(&format!("server {gateway}:8080")),
            "{gateway} upstream"
        );
    }
}

#[test]
fn the_dockerfile_builds_one_non_root_image_with_a_healthcheck() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}"))
            .to_owned()
    };
    assert!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(line("USER ").contains("10001"), "non-root user");
    assert_eq!(line("ENTRYPOINT "), r#"ENTRYPOINT ["eventgate"]"#);
    assert!(text.contains(r#"CMD ["eventgate", "health", "http://127.0.0.1:8080/healthz"]"#));
    assert!(line("CMD ").contains("standalone"));
    assert!(text.contains("cargo build --release --locked -p eventgate"));
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_paths_answer_and_the_health_command_uses_them() {
    let (gateway, publisher) = (free_port(), free_port());
    let gateway_addr = format!("127.0.0.1:{gateway}");
    let publisher_addr = format!("127.0.0.1:{publisher}");
    let _standalone = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .arg("standalone")
        .env("GATEWAY_ADDR", &gateway_addr)
        .env("PUBLISHER_ADDR", &publisher_addr)
        .env("JWT_SECRET", TEST_SECRET)
        .env("PUBLISHER_API_KEYS", TEST_PUBLISHER_KEY)
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("standalone");
    let http = reqwest::Client::new();
    for addr in [&gateway_addr, &publisher_addr] {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let url = format!("http://{addr}{path}");
            let up = wait_until(SOON, || async {
                http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
            })
            .await;
            assert!(up, "{url}");
        }
        let status = Command::new(env!("CARGO_BIN_EXE_eventgate"))
            .args(["health", &format!("http://{addr}/healthz")])
            .status()
            .expect("health");
        assert!(status.success(), "health of {addr}");
    }
    let closed = format!("http://127.0.0.1:{}/healthz", free_port());
    let status = Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(["health", &closed])
        .stderr(Stdio::null())
        .status()
        .expect("health");
    assert!(!status.success(), "a closed port is unhealthy");
}
