//! The deployment files agree with the binary: every Kubernetes overlay renders with
//! `kubectl kustomize` and its images, commands, ports, probes and environment are ones the
//! binary really has; `docker-compose.yml` and the Dockerfile likewise; no secret is real.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
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

/// The settings that pick Redis; the binary takes exactly one.
const REDIS_SETTINGS: [&str; 4] = [
    "REDIS_URL",
    "REDIS_SENTINELS",
    "REDIS_SHARDS",
    "REDIS_CLUSTER",
];

/// A secret's value that is plainly an example: keys and secrets say `change-me`, a Redis URL
/// carries no password.
fn assert_placeholder(name: &str, value: &str) {
    assert!(!value.starts_with("eyJ"), "{name} holds a JWT");
    if REDIS_SETTINGS.contains(&name) {
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

/// Every directory under `k8s/overlays`: a new overlay is checked without being listed here.
fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("k8s/overlays"))
        .expect("k8s/overlays")
        .map(|entry| {
            entry
                .expect("overlay")
                .file_name()
                .into_string()
                .expect("name")
        })
        .collect();
    names.sort();
    for expected in ["cluster", "dev", "managed-redis-tls", "production"] {
        assert!(names.iter().any(|n| n == expected), "no overlay {expected}");
    }
    names
}

/// Whether a `matchLabels` selector picks pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (selector, labels) = (str_map(selector), str_map(labels));
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod templates of the rendered Deployments, StatefulSets and Jobs.
fn pod_templates(docs: &[Value]) -> impl Iterator<Item = &Value> {
    docs.iter()
        .filter(|d| {
            ["Deployment", "StatefulSet", "Job"]
                .iter()
                .any(|k| d["kind"] == *k)
        })
        .map(|d| &d["spec"]["template"])
}

/// The host a Redis address names: `redis://user:pw@host:port/0` or `host:port`.
fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split([':', '/']).next().expect("host")
}

/// The StatefulSet a Redis host reaches: a Service in front of its pods (`svc`), or one of its
/// pods by name under its headless Service (`name-N.svc`).
fn statefulset_behind<'a>(docs: &'a [Value], host: &str) -> Option<&'a Value> {
    let labels: Vec<&str> = host.split('.').collect();
    docs.iter()
        .filter(|d| d["kind"] == "StatefulSet")
        .find(|set| {
            let pod_labels = &set["spec"]["template"]["metadata"]["labels"];
            let in_front = |service: &str| {
                docs.iter().any(|d| {
                    d["kind"] == "Service"
                        && d["metadata"]["name"] == service
                        && selects(&d["spec"]["selector"], pod_labels)
                })
            };
            if in_front(labels[0]) {
                return true;
            }
            let (name, replicas) = (
                set["metadata"]["name"].as_str().expect("name"),
                set["spec"]["replicas"].as_u64().unwrap_or(1),
            );
            labels.len() > 1
                && set["spec"]["serviceName"] == labels[1]
                && in_front(labels[1])
                && labels[0]
                    .strip_prefix(name)
                    .and_then(|n| n.strip_prefix('-'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n < replicas)
        })
}

#[test]
fn every_kubernetes_overlay_renders_and_agrees_with_the_binary() {
    let subcommands = subcommands();
    for overlay in overlays() {
        let overlay = overlay.as_str();
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
            // One Redis setting (the binary refuses two), naming a Redis this overlay deploys
            // or one outside the cluster (a full domain name).
            let chosen: Vec<&str> = REDIS_SETTINGS
                .into_iter()
                .filter(|s| given.iter().any(|g| g == s))
                .collect();
            assert_eq!(chosen.len(), 1, "{overlay} {deployment}: {chosen:?}");
            let value = config
                .get(chosen[0])
                .or(secret.get(chosen[0]))
                .unwrap_or_else(|| panic!("{overlay} {deployment}: {} in env", chosen[0]));
            let mut used = BTreeSet::new();
            for address in value.split(',') {
                let host = host_of(address);
                if let Some(set) = statefulset_behind(&docs, host) {
                    used.insert(set["metadata"]["name"].as_str().expect("name"));
                } else {
                    // Outside the cluster: a domain name, not one of this overlay's Services.
                    let names_a_service = host.split('.').take(2).any(|label| {
                        docs.iter()
                            .any(|d| d["kind"] == "Service" && d["metadata"]["name"] == label)
                    });
                    assert!(
                        host.contains('.') && !names_a_service,
                        "{overlay}: nothing serves {host}"
                    );
                }
            }
            // Every Redis deployed is one the services use.
            let deployed: BTreeSet<&str> = docs
                .iter()
                .filter(|d| d["kind"] == "StatefulSet")
                .filter_map(|d| d["metadata"]["name"].as_str())
                .collect();
            assert_eq!(used, deployed, "{overlay} {deployment}: {value}");
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
        // Services select the pods they are named after, and their named ports.
        for service in docs.iter().filter(|d| d["kind"] == "Service") {
            let name = service["metadata"]["name"].as_str().expect("name");
            let spec = &service["spec"];
            assert_eq!(
                spec["selector"]["app.kubernetes.io/name"], name,
                "{overlay}"
            );
            let pod = pod_templates(&docs)
                .find(|t| selects(&spec["selector"], &t["metadata"]["labels"]))
                .unwrap_or_else(|| panic!("{overlay}: Service {name} selects no pods"));
            let named: BTreeSet<&str> = pod["spec"]["containers"]
                .as_sequence()
                .expect("containers")
                .iter()
                .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
                .filter_map(|p| p["name"].as_str())
                .collect();
            for port in spec["ports"].as_sequence().expect("ports") {
                let target = port["targetPort"].as_str().expect("a named targetPort");
                assert!(named.contains(target), "{overlay} {name}: {target}");
            }
        }
        // Disruption budgets and network policies apply to pods that exist.
        for kind in ["PodDisruptionBudget", "NetworkPolicy"] {
            for doc in docs.iter().filter(|d| d["kind"] == kind) {
                let selector = match kind {
                    "NetworkPolicy" => &doc["spec"]["podSelector"]["matchLabels"],
                    _ => &doc["spec"]["selector"]["matchLabels"],
                };
                assert!(
                    pod_templates(&docs).any(|t| selects(selector, &t["metadata"]["labels"])),
                    "{overlay}: {kind} {} selects no pods",
                    doc["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
        }
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

/// The pods of the cluster overlay's Redis Cluster, as the services and the init Job name them.
const CLUSTER_PODS: [&str; 6] = [
    "eventgate-redis-cluster-0.eventgate-redis-cluster",
    "eventgate-redis-cluster-1.eventgate-redis-cluster",
    "eventgate-redis-cluster-2.eventgate-redis-cluster",
    "eventgate-redis-cluster-3.eventgate-redis-cluster",
    "eventgate-redis-cluster-4.eventgate-redis-cluster",
    "eventgate-redis-cluster-5.eventgate-redis-cluster",
];

/// A container's command and arguments as one text (a `sh -c` script included).
fn command_line(container: &Value) -> String {
    ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_sequence().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `sh -c` script of the cluster's init Job.
fn init_job_script(docs: &[Value]) -> String {
    let job = kind_named(docs, "Job", "eventgate-redis-cluster-init");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["command"],
        serde_yaml::from_str::<Value>(r#"["sh", "-c"]"#).unwrap()
    );
    container["args"][0].as_str().expect("script").to_owned()
}

/// The values of a container's literal `env` entries.
fn container_env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The cluster overlay: a six-node Redis Cluster (StatefulSet, headless Service, one volume per
/// pod, announced host names), the Job that forms it, and the services on REDIS_CLUSTER.
#[test]
fn the_cluster_overlay_runs_a_six_node_redis_cluster_and_points_the_services_at_it() {
    let docs = render("cluster");
    let sets: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .filter(|n| n.contains("redis"))
        .collect();
    assert_eq!(sets, ["eventgate-redis-cluster"], "no single Redis");
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "eventgate-redis")
    );

    let set = kind_named(&docs, "StatefulSet", "eventgate-redis-cluster");
    assert_eq!(set["spec"]["replicas"].as_u64(), Some(6));
    let service = kind_named(&docs, "Service", "eventgate-redis-cluster");
    assert_eq!(set["spec"]["serviceName"], "eventgate-redis-cluster");
    assert_eq!(service["spec"]["clusterIP"], "None", "headless");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    let ports: BTreeSet<u64> = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([6379, 16379]),
        "clients and the cluster bus"
    );

    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "redis:7-alpine");
    let line = command_line(container);
    let server = &line[line.find("redis-server").expect("runs redis-server")..];
    for flag in [
        "--cluster-enabled yes",
        "--cluster-config-file nodes.conf",
        "--appendonly yes",
        "--cluster-announce-ip \"$POD_IP\"",
        "--cluster-announce-hostname \"$POD_NAME.eventgate-redis-cluster.$POD_NAMESPACE.svc\"",
        "--cluster-preferred-endpoint-type hostname",
    ] {
        assert!(server.contains(flag), "no {flag}: {server}");
    }
    let fields: BTreeMap<&str, &str> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(
        fields,
        BTreeMap::from([
            ("POD_IP", "status.podIP"),
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ])
    );
    // Its data and nodes.conf on the pod's own volume.
    let claim = set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("a volume per pod");
    let mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == claim)
        .expect("the volume mounted");
    assert_eq!(mount["mountPath"], "/data");
    assert!(line.contains("cd /data"), "nodes.conf is in /data");
    assert_eq!(
        container["readinessProbe"]["exec"]["command"],
        serde_yaml::from_str::<Value>(r#"["redis-cli", "ping"]"#).unwrap()
    );
    for resource in ["cpu", "memory"] {
        assert!(
            container["resources"]["requests"][resource].is_string(),
            "{resource}"
        );
    }
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let pod_labels = &set["spec"]["template"]["metadata"]["labels"];
    let budget = kind_named(&docs, "PodDisruptionBudget", "eventgate-redis-cluster");
    assert!(selects(
        &budget["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert_eq!(budget["spec"]["maxUnavailable"].as_u64(), Some(1));

    // The init Job: one replica per primary, the six pods, only when not formed yet.
    let job = kind_named(&docs, "Job", "eventgate-redis-cluster-init");
    let job_pod = &job["spec"]["template"]["spec"];
    let job_container = &job_pod["containers"][0];
    assert_eq!(job_container["image"], container["image"]);
    assert_eq!(job_pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        job_container["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    assert!(
        ["OnFailure", "Never"]
            .iter()
            .any(|p| job_pod["restartPolicy"] == *p)
    );
    let nodes: Vec<String> = container_env(job_container)["NODES"]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = CLUSTER_PODS.iter().map(|p| format!("{p}:6379")).collect();
    assert_eq!(nodes, expected);
    let script = init_job_script(&docs);
    let create = script
        .find("redis-cli --cluster create $NODES --cluster-replicas 1 --cluster-yes")
        .expect("creates the cluster with one replica per primary");
    let guard = script.find("cluster_slots_assigned").expect("checks first");
    assert!(
        guard < create,
        "checks whether the cluster is formed before creating it"
    );

    // Only eventgate's pods and the Job reach the nodes; the nodes reach one another's bus.
    let policy = kind_named(&docs, "NetworkPolicy", "eventgate-redis-cluster");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    let admitted = |labels: &Value, port: u64| {
        policy["spec"]["ingress"]
            .as_sequence()
            .expect("ingress")
            .iter()
            .any(|rule| {
                rule["from"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|peer| selects(&peer["podSelector"]["matchLabels"], labels))
                    && rule["ports"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|p| p["port"].as_u64() == Some(port))
            })
    };
    let gateway = kind_named(&docs, "Deployment", "eventgate-gateway");
    let publisher = kind_named(&docs, "Deployment", "eventgate-publisher");
    for (name, workload) in [
        ("gateway", gateway),
        ("publisher", publisher),
        ("init Job", job),
    ] {
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(admitted(labels, 6379), "{name}");
    }
    assert!(admitted(pod_labels, 16379), "the cluster bus");

    // The services: REDIS_CLUSTER naming the six pods, no REDIS_URL anywhere.
    let config = str_map(&kind_named(&docs, "ConfigMap", "eventgate-config")["data"]);
    let secret = str_map(&kind_named(&docs, "Secret", "eventgate-secrets")["stringData"]);
    assert!(!config.contains_key("REDIS_URL") && !secret.contains_key("REDIS_URL"));
    let seeds: Vec<&str> = secret["REDIS_CLUSTER"].split(',').collect();
    let expected: Vec<String> = CLUSTER_PODS
        .iter()
        .map(|p| format!("redis://{p}:6379"))
        .collect();
    assert_eq!(seeds, expected);
    for deployment in ["eventgate-gateway", "eventgate-publisher"] {
        let pod = &kind_named(&docs, "Deployment", deployment)["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let from: Vec<&str> = container["envFrom"]
            .as_sequence()
            .expect("envFrom")
            .iter()
            .filter_map(|e| e["secretRef"]["name"].as_str())
            .collect();
        assert_eq!(from, ["eventgate-secrets"], "{deployment}");
        let names: Vec<&str> = container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(!names.contains(&"REDIS_URL"), "{deployment}");
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

/// The services `docker compose up` starts: those in no profile.
fn default_services(compose: &Value) -> serde_yaml::Mapping {
    let services = compose["services"].as_mapping().expect("services");
    services
        .iter()
        .filter(|(_, s)| s["profiles"].is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn docker_compose_runs_redis_a_publisher_three_gateways_and_nginx() {
    let compose = compose();
    let services = &default_services(&compose);
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
    // None of them waits for a service of a profile (compose would refuse to start them).
    for (name, service) in services {
        for dependency in service["depends_on"].as_mapping().into_iter().flatten() {
            let (name, dependency) = (name.as_str(), dependency.0.as_str().expect("name"));
            assert!(names.contains(dependency), "{name:?} needs {dependency}");
        }
    }
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

/// Profile `cluster`: six Redis Cluster nodes, the one-shot service that forms the cluster (the
/// Kubernetes Job's script), and a publisher and a gateway on REDIS_CLUSTER; the default
/// `docker compose up` starts none of them.
#[test]
fn docker_compose_profile_cluster_runs_a_six_node_redis_cluster() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let in_profile: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| !s["profiles"].is_null())
        .map(|(name, s)| {
            let name = name.as_str().expect("name");
            assert_eq!(s["profiles"], Value::from(vec!["cluster"]), "{name}");
            name
        })
        .collect();
    let nodes: Vec<String> = (0..6).map(|n| format!("redis-cluster-{n}")).collect();
    let mut expected: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    expected.extend(["redis-cluster-init", "publisher-cluster", "gateway-cluster"]);
    assert_eq!(in_profile, expected);

    let network = &compose["networks"]["redis-cluster"];
    assert_eq!(
        network["internal"], true,
        "no way out of the cluster's network"
    );
    let subnet = network["ipam"]["config"][0]["subnet"]
        .as_str()
        .expect("subnet");
    let prefix = subnet.strip_suffix("0/24").expect("a /24");
    let mut addresses = BTreeSet::new();
    let mut volumes = BTreeSet::new();
    for node in &nodes {
        let service = &compose["services"][node.as_str()];
        assert_eq!(
            service["image"], compose["services"]["redis"]["image"],
            "{node}"
        );
        let args: Vec<&str> = service["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let line = args.join(" ");
        assert_eq!(args[0], "redis-server", "{node}");
        for flag in [
            "--cluster-enabled yes",
            "--cluster-config-file nodes.conf",
            "--appendonly yes",
            &format!("--cluster-announce-hostname {node} "),
            "--cluster-preferred-endpoint-type hostname",
        ] {
            assert!(line.contains(flag), "{node}: no {flag}: {line}");
        }
        assert_eq!(
            service["healthcheck"]["test"],
            Value::from(vec!["CMD", "redis-cli", "ping"]),
            "{node}"
        );
        let volume = service["volumes"][0].as_str().expect("volume");
        let (name, path) = volume.split_once(':').expect("name:path");
        assert_eq!(path, "/data", "{node}");
        assert!(
            compose["volumes"].get(name).is_some(),
            "{node}: volume {name}"
        );
        volumes.insert(name.to_owned());
        // A fixed address (nodes.conf records the others'), outside the dynamic range.
        let address = service["networks"]["redis-cluster"]["ipv4_address"]
            .as_str()
            .expect("a fixed address");
        let host: u8 = address
            .strip_prefix(prefix)
            .and_then(|h| h.parse().ok())
            .unwrap_or_else(|| panic!("{node}: {address} outside {subnet}"));
        assert!((2..128).contains(&host), "{node}: {address}");
        addresses.insert(address);
    }
    assert_eq!(addresses.len(), 6, "distinct addresses");
    assert_eq!(volumes.len(), 6, "a volume per node");
    assert_eq!(
        network["ipam"]["config"][0]["ip_range"],
        format!("{prefix}128/25").as_str()
    );

    // The init service: after every node is healthy, the Kubernetes Job's script, once.
    let init = &compose["services"]["redis-cluster-init"];
    assert_eq!(init["image"], compose["services"]["redis"]["image"]);
    assert_eq!(init["restart"], "no");
    for node in &nodes {
        assert_eq!(
            init["depends_on"][node.as_str()]["condition"],
            "service_healthy",
            "{node}"
        );
    }
    let listed: Vec<String> = str_map(&init["environment"])["NODES"]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = nodes.iter().map(|n| format!("{n}:6379")).collect();
    assert_eq!(listed, expected);
    assert_eq!(init["command"][0], "sh");
    assert_eq!(init["command"][1], "-c");
    // Compose reads `$$` as `$`.
    let script = init["command"][2]
        .as_str()
        .expect("script")
        .replace("$$", "$");
    assert_eq!(script.trim(), init_job_script(&render("cluster")).trim());

    // The publisher and the gateway of the profile: REDIS_CLUSTER with every node, once the
    // cluster is formed.
    let known = known_env_vars();
    let example = env_file(&repo().join(".env.example"));
    let defaults = default_services(&compose);
    let default_ports: BTreeSet<&str> = defaults
        .values()
        .flat_map(|s| s["ports"].as_sequence().into_iter().flatten())
        .filter_map(Value::as_str)
        .map(|p| p.rsplit_once(':').expect("host:container").0)
        .collect();
    for (name, subcommand, addr_var) in [
        ("publisher-cluster", "publisher", "PUBLISHER_ADDR"),
        ("gateway-cluster", "gateway", "GATEWAY_ADDR"),
    ] {
        let service = &compose["services"][name];
        assert_eq!(service["command"][0], subcommand, "{name}");
        let env = str_map(&service["environment"]);
        for var in env.keys().chain(example.keys()) {
            assert!(known.contains(var), "{name}: eventgate reads no {var}");
        }
        let chosen: Vec<&str> = REDIS_SETTINGS
            .into_iter()
            .filter(|s| env.contains_key(*s) || example.contains_key(*s))
            .collect();
        assert_eq!(chosen, ["REDIS_CLUSTER"], "{name}");
        let seeds: Vec<&str> = env["REDIS_CLUSTER"].split(',').collect();
        let expected: Vec<String> = nodes.iter().map(|n| format!("redis://{n}:6379")).collect();
        assert_eq!(seeds, expected, "{name}");
        let depends = service["depends_on"].as_mapping().expect("depends_on");
        assert_eq!(depends.len(), 1, "{name}: {depends:?}");
        assert_eq!(
            service["depends_on"]["redis-cluster-init"]["condition"],
            "service_completed_successfully",
            "{name}"
        );
        let networks: Vec<&str> = service["networks"]
            .as_sequence()
            .expect("networks")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(networks.contains(&"redis-cluster"), "{name}: {networks:?}");
        let port = env[addr_var].rsplit(':').next().expect("port");
        let health = service["healthcheck"]["test"][3]
            .as_str()
            .expect("health URL");
        assert!(
            health.contains(&format!(":{port}/healthz")),
            "{name}: {health}"
        );
        let published = service["ports"][0].as_str().expect("a published port");
        let (host, container) = published.rsplit_once(':').expect("host:container");
        assert_eq!(container, port, "{name}");
        assert!(host.starts_with("127.0.0.1:"), "{name}: {published}");
        assert!(!default_ports.contains(host), "{name}: {host} is taken");
    }
}

/// The script that forms the cluster (the Kubernetes Job's, and compose's), run against six
/// real nodes: it waits for a node that is not up yet, creates three primaries with a replica
/// each, and run again leaves the formed cluster as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_init_script_forms_the_cluster_once() {
    use support::{RedisServer, cluster::free_cluster_port};

    let script = init_job_script(&render("cluster"));
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 6 {
        // Free now, and not one already picked (none is bound until its node starts).
        let port = free_cluster_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let mut nodes = Vec::new();
    for port in &ports[..5] {
        nodes.push(RedisServer::start_cluster_node(*port).await);
    }
    let listed: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let run = || {
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("NODES", listed.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sh")
    };
    let finish = |child: tokio::process::Child| async move {
        let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .expect("the script finishes")
            .expect("its output");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };

    let mut first = run();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        first.try_wait().expect("status").is_none(),
        "waits for the sixth node"
    );
    nodes.push(RedisServer::start_cluster_node(ports[5]).await);
    let created = finish(first).await;
    assert!(!created.contains("already formed"), "{created}");

    // The script returns once every node says `cluster_state:ok`; gossip tells every node of
    // the others (and the replicas' roles) soon after.
    let gossiped = wait_until(Duration::from_secs(30), || async {
        let mut all = true;
        for node in &nodes {
            let info: String = node.query(&["CLUSTER", "INFO"]).await;
            all &= [
                "cluster_state:ok",
                "cluster_known_nodes:6",
                "cluster_size:3",
            ]
            .iter()
            .all(|line| info.contains(line));
        }
        all
    })
    .await;
    assert!(
        gossiped,
        "every node knows the six nodes and three primaries"
    );

    // Each node as it sees itself: id, role, its primary, slots.
    let layout = || async {
        let mut table = Vec::new();
        for node in &nodes {
            let info: String = node.query(&["CLUSTER", "INFO"]).await;
            for line in [
                "cluster_state:ok",
                "cluster_known_nodes:6",
                "cluster_size:3",
            ] {
                assert!(info.contains(line), "{}: no {line}", node.port);
            }
            let all: String = node.query(&["CLUSTER", "NODES"]).await;
            let own = all
                .lines()
                .find(|l| l.contains("myself"))
                .expect("its own line");
            let f: Vec<&str> = own.split(' ').collect();
            let role = f[2].replace("myself,", "");
            table.push((role, f[0].to_owned(), f[3].to_owned(), f[8..].join(" ")));
        }
        table.sort();
        let primaries: Vec<&str> = table
            .iter()
            .filter(|(role, ..)| role == "master")
            .map(|(_, id, ..)| id.as_str())
            .collect();
        assert_eq!(primaries.len(), 3, "three primaries: {table:?}");
        for (role, _, primary, slots) in &table {
            if role == "master" {
                assert!(!slots.is_empty(), "every primary serves slots: {table:?}");
            } else {
                assert!(primaries.contains(&primary.as_str()), "{table:?}");
            }
        }
        let replicated: BTreeSet<&str> = table.iter().map(|(_, _, p, _)| p.as_str()).collect();
        assert_eq!(
            replicated.len(),
            4,
            "one replica per primary (and `-`): {table:?}"
        );
        table
    };
    let before = layout().await;

    let again = finish(run()).await;
    assert!(again.contains("already formed"), "{again}");
    assert_eq!(layout().await, before, "the second run changed nothing");
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
