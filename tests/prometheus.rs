//! A real Prometheus (Debian's `prometheus` and `promtool`) scraping the real binaries: two
//! operator replicas against a fake API server on loopback that lists, watches and patches, and
//! the agent. The test moves the cluster (a Service appears, a pinned one, a hostPort conflict
//! comes and goes, the leader stops) and asserts through Prometheus's HTTP API that the series
//! an on-call engineer looks at move with it. It also runs `promtool check metrics` on every
//! `/metrics`, `promtool test rules` on the alert tests, and checks that every metric the alert
//! rules and the Grafana dashboard name is one the binaries export.
//!
//! Ignored by a plain `cargo test` (it needs the `prometheus` package): `e2e/run-prometheus`
//! installs it and runs this with `--ignored`.

#[path = "support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_api::{FakeApi, PODS, SERVICES};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Processes: operators, the agent, Prometheus. Each is killed when dropped.

struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &str, command: &mut Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        Process {
            name: name.into(),
            child,
            log,
        }
    }

    fn terminate(&mut self) {
        let pid = self.child.id();
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("--- last lines of {} ---\n{}", self.name, tail.join("\n"));
        }
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    // Prometheus answers chunked only for large bodies; ours are small, but undo it if so.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn operator(api: &FakeApi, identity: &str, metrics: SocketAddr, dir: &Path) -> Process {
    let dir = dir.join(identity);
    std::fs::create_dir_all(&dir).unwrap();
    Process::spawn(
        identity,
        Command::new(env!("CARGO_BIN_EXE_portpolicy"))
            .arg("operator")
            .args(["--identity", identity, "--metrics-address", &metrics.to_string()])
            // Both replicas run on this host: each serves its webhook on a port of its own.
            .args(["--webhook-address", &free_port().to_string()])
            .args(["--namespace", "portpolicy-system", "--image", "portpolicy:test"])
            .args([
                "--leader-elect-lease-duration",
                "3s",
                "--leader-elect-renew-deadline",
                "2s",
            ])
            .args([
                "--leader-elect-renew-period",
                "500ms",
                "--leader-elect-retry-period",
                "250ms",
            ])
            .env("KUBECONFIG", api.kubeconfig(&dir))
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE"),
        &dir,
    )
}

struct Prometheus {
    _process: Process,
    address: SocketAddr,
}

impl Prometheus {
    /// Prometheus on loopback scraping `targets` (job `portpolicy-operator`) every second.
    async fn start(targets: &[SocketAddr], dir: &Path) -> Self {
        let address = free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n- job_name: portpolicy-operator\n  static_configs:\n  - targets: [{}]\n",
                repo().join("config/alerts/portpolicy-rules.yaml").display(),
                list.join(", ")
            ),
        )
        .unwrap();
        let data = dir.join("prometheus-data");
        let process = Process::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address={address}"))
                .arg("--log.level=warn"),
            dir,
        );
        let prometheus = Prometheus {
            _process: process,
            address,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(address, "/-/ready").await.map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "Prometheus not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        prometheus
    }

    /// The instant vector `query` gives, as (labels, value) pairs.
    async fn query(&self, query: &str) -> Result<Vec<(Value, f64)>, String> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(self.address, &format!("/api/v1/query?query={encoded}"))
            .await
            .ok_or("no answer from Prometheus")?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{query}: {body}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect())
    }

    /// The single value of `query`, if it gives exactly one series.
    async fn value(&self, query: &str) -> Option<f64> {
        match self.query(query).await.ok()?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Waits until `query` gives one series with value `want`; returns how long it took.
    async fn wait_for(&self, query: &str, want: f64, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.value(query).await;
            if got == Some(want) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{query} is {got:?} (all: {:?}), not {want}, after {limit:?}",
                self.query(query).await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portpolicy-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Objects.

fn policy() -> Value {
    json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "edge", "uid": "uid-edge", "generation": 1, "resourceVersion": "50",
            "finalizers": ["portpolicy.io/cleanup"]},
        "spec": {
            "nodePorts": {"range": "31000-31009", "reserved": ["31008-31009"],
                "pinned": [{"namespace": "shop", "service": "pinned", "nodePort": 31007}]},
            "hostPorts": {"allowed": ["9100-9199"]}}})
}

/// A NodePort Service as `kubectl create` leaves it: the API server picked `node_port`.
fn service(name: &str, node_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "creationTimestamp": "2026-11-26T11:00:00Z",
            "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:type": {}, "f:ports": {".": {},
                    "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}, "f:protocol": {},
                        "f:targetPort": {}}}}}}]},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Cluster",
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port}]}})
}

fn host_port_pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "monitoring", "uid": format!("uid-{name}")},
        "spec": {"nodeName": "node-a", "containers": [{"name": "exporter", "image": "exporter",
            "ports": [{"containerPort": 9100, "hostPort": 9100, "protocol": "TCP"}]}]},
        "status": {"phase": "Running"}})
}

// ---------------------------------------------------------------------------------------------
// Scrapes and the names in them.

/// `promtool check metrics` on one exposition; its complaints, if any.
fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e}"))?;
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// The names of the series in an exposition (histograms as `_bucket`, `_sum`, `_count`).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The agent's `/metrics`, scraped from the agent binary run in a network namespace of its own
/// (so it programs nothing on this machine, and the empty snapshot it follows plans nothing).
/// `None` when this kernel has no IPVS at all: the agent then refuses to start.
fn agent_scrape(dir: &Path) -> Option<String> {
    let snapshot = dir.join("agent-snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("cluster.yaml"), "").unwrap();
    let sysctl = dir.join("agent-sysctl");
    std::fs::create_dir_all(&sysctl).unwrap();
    let script = format!(
        "ip link set lo up 2>/dev/null || true\n\
         {bin} agent --node-name node-a --snapshot {snapshot} --sysctl-root {sysctl} \
           --metrics-address 127.0.0.1:10259 --health-check-address 127.0.0.1 --resync-period 1s \
           > {dir}/agent.log 2>&1 &\n\
         agent=$!\n\
         for i in $(seq 1 50); do\n\
           if curl -sf -o {dir}/agent-metrics.txt http://127.0.0.1:10259/metrics \
              && grep -q '^portpolicy_agent_full_syncs_total [1-9]' {dir}/agent-metrics.txt; then break; fi\n\
           sleep 0.2\n\
         done\n\
         kill $agent 2>/dev/null; wait $agent 2>/dev/null; true\n",
        bin = env!("CARGO_BIN_EXE_portpolicy"),
        snapshot = snapshot.display(),
        sysctl = sysctl.display(),
        dir = dir.display(),
    );
    let status = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .status()
        .expect("unshare runs (util-linux; root)");
    assert!(status.success(), "the agent scrape script failed");
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    if log.contains("generic netlink family \"IPVS\" not found") {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("agent-metrics.txt"))
        .unwrap_or_else(|_| panic!("no agent scrape; agent log:\n{log}"));
    Some(text)
}

/// Every PromQL expression of the alert rules and the dashboard.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("config/alerts/portpolicy-rules.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            out.push((format!("rule {name}"), rule["expr"].as_str().unwrap().to_string()));
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("config/grafana/portpolicy-dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?");
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(query) = variable["definition"].as_str() {
            out.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    out
}

/// The `portpolicy_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("portpolicy_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's prometheus package: run e2e/run-prometheus"]
async fn prometheus_sees_the_scenario_and_every_queried_metric_is_exported() {
    let dir = scratch_dir();
    let api = FakeApi::start_live(vec![policy()]).await;
    let (a_address, b_address) = (free_port(), free_port());
    let mut a = operator(&api, "operator-a", a_address, &dir);
    let prometheus = Prometheus::start(&[a_address, b_address], &dir).await;
    let leader_a = format!("portpolicy_operator_leader{{instance=\"{a_address}\"}}");
    prometheus.wait_for(&leader_a, 1.0, Duration::from_secs(30)).await;
    let _b = operator(&api, "operator-b", b_address, &dir);
    let leader_b = format!("portpolicy_operator_leader{{instance=\"{b_address}\"}}");
    prometheus.wait_for(&leader_b, 0.0, Duration::from_secs(30)).await;

    // The range as the leader reports it: 10 ports, 2 reserved, 1 pinned to a Service that does
    // not exist yet, so 7 free.
    let range = |series: &str| format!("max(portpolicy_operator_node_ports_{series}{{policy=\"edge\"}})");
    let limit = Duration::from_secs(20);
    for (series, value) in [("used", 0.0), ("reserved", 2.0), ("pinned", 1.0), ("free", 7.0)] {
        prometheus.wait_for(&range(series), value, limit).await;
    }
    let outcome = |o: &str| {
        format!("sum(portpolicy_operator_node_port_allocations_total{{policy=\"edge\",outcome=\"{o}\"}})")
    };
    prometheus.wait_for(&outcome("moved"), 0.0, limit).await;

    // A Service appears with a random nodePort outside the range: moved into it.
    api.change(SERVICES, service("web", 30555), false);
    let took = prometheus.wait_for(&outcome("moved"), 1.0, limit).await;
    eprintln!("a new Service's move was visible in Prometheus after {took:?}");
    prometheus.wait_for(&range("used"), 1.0, limit).await;
    prometheus.wait_for(&range("free"), 6.0, limit).await;

    // The Service its pinned port waits for: it gets 31007, which stops counting as pinned.
    api.change(SERVICES, service("pinned", 30556), false);
    prometheus.wait_for(&outcome("pinned"), 1.0, limit).await;
    prometheus.wait_for(&range("pinned"), 0.0, limit).await;
    prometheus.wait_for(&range("used"), 2.0, limit).await;
    prometheus.wait_for(&range("free"), 6.0, limit).await;

    // Two exporters on one node want hostPort 9100: a conflict, then it clears.
    let conflicts = "max(portpolicy_operator_host_port_conflicts{policy=\"edge\"})";
    prometheus.wait_for(conflicts, 0.0, limit).await;
    api.change(PODS, host_port_pod("exporter-1"), false);
    api.change(PODS, host_port_pod("exporter-2"), false);
    prometheus.wait_for(conflicts, 1.0, limit).await;
    api.change(PODS, host_port_pod("exporter-2"), true);
    prometheus.wait_for(conflicts, 0.0, limit).await;
    prometheus
        .wait_for(
            "sum(rate(portpolicy_operator_reconciliations_total[10s])) > bool 0",
            1.0,
            limit,
        )
        .await;

    // The leader stops; the follower leads within seconds, and there is always at most one.
    a.terminate();
    let took = prometheus.wait_for(&leader_b, 1.0, Duration::from_secs(20)).await;
    eprintln!("the takeover was visible in Prometheus after {took:?}");
    prometheus
        .wait_for(
            &format!("up{{instance=\"{a_address}\"}}"),
            0.0,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        prometheus.value("sum(portpolicy_operator_leader)").await,
        Some(1.0)
    );
    // The new leader's own view of the range agrees.
    prometheus.wait_for(&range("used"), 2.0, limit).await;

    // Every /metrics passes promtool's lint; every metric the rules and the dashboard query is
    // in a scrape of the binaries.
    let (_, operator_text) = http_get(b_address, "/metrics").await.unwrap();
    let agent_text = agent_scrape(&dir);
    if agent_text.is_none() {
        eprintln!(
            "IGNORED: the agent part (promtool check metrics, agent metric names): this kernel has no IPVS, \
             so the agent binary does not start (`e2e/run-system --only prometheus` checks both against \
             the agent in the real-kernel VM)"
        );
    }
    for (who, text) in [("operator", Some(&operator_text)), ("agent", agent_text.as_ref())] {
        let Some(text) = text else { continue };
        promtool_check_metrics(text).unwrap_or_else(|e| panic!("promtool check metrics on the {who}: {e}"));
    }
    let exported: BTreeSet<String> = series_names(&operator_text)
        .into_iter()
        .chain(agent_text.iter().flat_map(|t| series_names(t)))
        .collect();
    assert!(
        exported.contains("portpolicy_operator_node_port_allocations_total"),
        "{exported:?}"
    );
    if agent_text.is_some() {
        assert!(
            exported.contains("portpolicy_agent_resync_drift_total"),
            "{exported:?}"
        );
    }
    let expressions = expressions();
    assert!(expressions.len() >= 10, "{expressions:?}");
    let mut missing = Vec::new();
    for (origin, expr) in &expressions {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{origin} queries no portpolicy metric: {expr}");
        missing.extend(
            names
                .into_iter()
                .filter(|n| !exported.contains(n))
                .filter(|n| agent_text.is_some() || !n.starts_with("portpolicy_agent_"))
                .map(|n| format!("{origin}: {n}")),
        );
        // And Prometheus accepts it (a variable's label_values() is Grafana's, not PromQL).
        if expr.starts_with("label_values(") {
            continue;
        }
        let bare = expr.replace("$__rate_interval", "1m").replace("$policy", ".*");
        prometheus
            .query(&bare)
            .await
            .unwrap_or_else(|e| panic!("{origin}: Prometheus refuses {bare}: {e}"));
    }
    assert!(missing.is_empty(), "not exported by the binaries: {missing:#?}");

    // The alert rules loaded.
    let (_, rules) = http_get(prometheus.address, "/api/v1/rules").await.unwrap();
    assert!(rules.contains("PortPolicyRangeNearlyExhausted"), "{rules}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs Debian's prometheus package: run e2e/run-prometheus"]
fn alert_rules_pass_their_promtool_unit_tests() {
    let alerts = repo().join("config/alerts");
    for args in [
        vec!["check", "rules", "portpolicy-rules.yaml"],
        vec!["test", "rules", "portpolicy-rules.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&alerts)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The PrometheusRule carries the same groups as the plain rules file.
    let plain: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(alerts.join("portpolicy-rules.yaml")).unwrap())
            .unwrap();
    let crd: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(alerts.join("prometheusrule.yaml")).unwrap())
            .unwrap();
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(crd["spec"]["groups"], plain["groups"]);
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names(
            "sum by (policy) (rate(portpolicy_operator_reconcile_duration_seconds_bucket[5m])) / on() portpolicy_x"
        ),
        BTreeSet::from([
            "portpolicy_operator_reconcile_duration_seconds_bucket".to_string(),
            "portpolicy_x".to_string()
        ])
    );
    assert_eq!(
        series_names("# HELP a b\n# TYPE a counter\na_total{x=\"1\"} 0\nb 1\n"),
        BTreeSet::from(["a_total".to_string(), "b".to_string()])
    );
}
