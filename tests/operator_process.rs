//! The real `portpolicy operator` binary as a process against a small fake API server on
//! loopback: readiness, a follower's readiness, leadership handover on SIGTERM, stepping down
//! when the API server freezes, and a PortPolicy that cannot be read. The fake
//! (tests/support/fake_api.rs) answers lists from fixed objects, holds watches open without
//! events (these tests change nothing, and it keeps none of the operator's writes), keeps one
//! Lease with resourceVersions, and records every request. (The system e2e suite runs the
//! operator against a fuller emulated API server; this one stays small and fast.)

#[path = "support/fake_api.rs"]
mod fake_api;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{FakeApi, LEASES, WEBHOOK_CONFIGURATION};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One operator process; killed (and its log printed, if the test failed) when dropped.
struct Operator {
    child: Option<Child>,
    metrics: SocketAddr,
    log: PathBuf,
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A directory of its own for each operator (tests run in parallel in one process).
fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("portpolicy-operator-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Operator {
    fn start(api: &FakeApi, identity: &str, extra: &[&str]) -> Self {
        Self::start_at(api, identity, free_port(), extra)
    }

    fn start_at(api: &FakeApi, identity: &str, metrics: SocketAddr, extra: &[&str]) -> Self {
        let dir = scratch_dir(identity);
        let log = dir.join("operator.log");
        let out = std::fs::File::create(&log).unwrap();
        // Tests run in parallel: each operator's webhook gets a port of its own.
        let webhook = free_port().to_string();
        let webhook_flags: &[&str] = if extra.contains(&"--webhook-address") {
            &[]
        } else {
            &["--webhook-address", &webhook]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
            .arg("operator")
            .args(webhook_flags)
            .args(["--identity", identity, "--metrics-address", &metrics.to_string()])
            .args(["--namespace", "portpolicy-system", "--image", "portpolicy:test"])
            .args(extra)
            .env("KUBECONFIG", api.kubeconfig(&dir))
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the operator binary starts");
        Operator {
            child: Some(child),
            metrics,
            log,
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    /// Polls `/readyz` until it answers 200, for at most `limit`.
    async fn wait_ready(&self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < limit {
            match self.get("/readyz").await {
                Some((200, _)) => return Ok(start.elapsed()),
                other => last = other,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not ready after {limit:?}; last answer {last:?}"))
    }

    async fn metric(&self, line_start: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
    }

    async fn wait_metric(&self, line_start: &str, value: f64, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.metric(line_start).await == Some(value) {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "{line_start} is {:?}, not {value}, after {limit:?}",
            self.metric(line_start).await
        ))
    }

    fn terminate(&mut self) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        // The shell's own `kill`: no procps needed.
        let sent = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits for the process to exit, for at most `limit`.
    async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of the operator at {} ---\n{}", self.metrics, self.log());
        }
    }
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "50",
            "finalizers": ["portpolicy.io/cleanup"]},
        "spec": spec})
}

/// Short election periods, so the takeover and step-down tests take seconds.
const FAST_ELECTION: [&str; 8] = [
    "--leader-elect-lease-duration",
    "3s",
    "--leader-elect-renew-deadline",
    "2s",
    "--leader-elect-renew-period",
    "500ms",
    "--leader-elect-retry-period",
    "250ms",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_becomes_ready_once_its_caches_listed() {
    // With a policy there is a reconcile waiting on the caches beside the probe: both must wake.
    let api = FakeApi::start(vec![policy(
        "edge",
        json!({"nodePorts": {"range": "31000-31099"}}),
    )])
    .await;
    let operator = Operator::start(&api, "operator-a", &[]);
    let took = operator.wait_ready(Duration::from_secs(20)).await.unwrap();
    eprintln!("ready after {took:?}");
    let (_, body) = operator.get("/readyz").await.unwrap();
    assert!(body.starts_with("ok"), "{body}");
    // Every error kind is exported from the start, with no error yet.
    for kind in ["kube", "api_server", "conflict", "lost_leadership"] {
        let line = format!("portpolicy_operator_reconciliation_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(operator.metric(&line).await, Some(0.0), "{line}");
    }
    assert_eq!(operator.get("/healthz").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_is_ready_and_takes_over_quickly_when_the_leader_is_stopped() {
    let api = FakeApi::start(vec![policy(
        "edge",
        json!({"nodePorts": {"range": "31000-31099"}}),
    )])
    .await;
    let mut first = Operator::start(&api, "operator-a", &[]);
    first.wait_ready(Duration::from_secs(20)).await.unwrap();
    first
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    let second = Operator::start(&api, "operator-b", &[]);
    // A follower is Ready: a Deployment with two replicas can roll.
    second.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(second.metric("portpolicy_operator_leader").await, Some(0.0));
    assert_eq!(api.holder().as_deref(), Some("operator-a"));
    assert!(
        second.log().contains("following") && second.log().contains("operator-a"),
        "the follower says it follows and whom:\n{}",
        second.log()
    );
    // The follower's first list prompts a reconcile of the policy a debounce (1 s) later, which
    // it skips; let that pass, so that only becoming leader can prompt the next one.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stopped = Instant::now();
    first.terminate();
    let status = first
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the leader exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    second
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(5))
        .await
        .unwrap();
    let takeover = stopped.elapsed();
    eprintln!("takeover {takeover:?} after SIGTERM");
    assert!(takeover < Duration::from_secs(5), "took {takeover:?}");
    assert_eq!(api.holder().as_deref(), Some("operator-b"));
    assert!(
        first.log().contains("released the leader Lease"),
        "{}",
        first.log()
    );
    // As a follower it skipped every reconcile; leading, it does them all, with no watch event
    // to prompt it (the fake's watches send none). Counted from its Lease write: by then the
    // old leader has stopped writing, and the new one may reconcile at once.
    let took_over = api
        .requests()
        .iter()
        .find(|r| {
            r.path.starts_with(LEASES)
                && r.method != "GET"
                && r.body["spec"]["holderIdentity"] == "operator-b"
        })
        .expect("operator-b wrote the Lease to lead")
        .at;
    wait_for_status_write(&api, "edge", took_over, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the new leader did not reconcile: {e}\n{}", second.log()));
}

/// Waits for a status write of policy `name` that arrived after `since`.
async fn wait_for_status_write(
    api: &FakeApi,
    name: &str,
    since: Instant,
    limit: Duration,
) -> Result<Duration, String> {
    let path = format!("/apis/portpolicy.io/v1alpha1/portpolicies/{name}/status");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(r) = api
            .requests()
            .iter()
            .find(|r| r.at >= since && r.method == "PATCH" && r.path == path)
        {
            return Ok(r.at - since);
        }
        if Instant::now() >= deadline {
            return Err(format!("no status write of {name} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stops_when_the_api_server_freezes_and_restarted_writes_only_once_it_leads() {
    let api = FakeApi::start(vec![policy(
        "edge",
        json!({"nodePorts": {"range": "31000-31099"}}),
    )])
    .await;
    let mut operator = Operator::start(&api, "operator-a", &FAST_ELECTION);
    operator.wait_ready(Duration::from_secs(20)).await.unwrap();
    operator
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    // Let the first reconcile's status write land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.requests().iter().any(|r| r.path.ends_with("/edge/status")) {
        assert!(Instant::now() < deadline, "no status write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    api.freeze();
    let frozen = Instant::now();
    // The renew deadline is 2 s: it stops before the 3 s lease could pass to another replica.
    let status = operator
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("a leader that cannot renew stops before its lease runs out");
    let stopped = frozen.elapsed();
    eprintln!("stopped {stopped:?} after the freeze");
    assert_eq!(status.code(), Some(3), "{}", operator.log());
    assert!(operator.log().contains("stopped leading"), "{}", operator.log());

    // Restarted (as the kubelet would) once the API server answers again: it follows until it
    // holds the Lease and writes nothing before.
    api.thaw();
    let restarted = Instant::now();
    let operator = Operator::start(&api, "operator-a", &FAST_ELECTION);
    operator
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    let after: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.at >= restarted && r.method != "GET")
        .collect();
    let first_lease_write = after
        .iter()
        .position(|r| r.path.starts_with(LEASES))
        .expect("it wrote the Lease to lead");
    let early: Vec<_> = after[..first_lease_write].iter().map(|r| &r.path).collect();
    assert!(early.is_empty(), "wrote before it led: {early:?}");
    // It leads within moments of starting, often before its caches have listed (the Lease may
    // still name it: its release could not reach the frozen server). It must still reconcile
    // every policy then, with no watch event to prompt it.
    let led_at = after[first_lease_write].at;
    let took = wait_for_status_write(&api, "edge", led_at, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the restarted leader did not reconcile: {e}\n{}", operator.log()));
    eprintln!(
        "restarted: led {:?} after its start, reconciled {took:?} later",
        led_at - restarted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_policy_is_reported_by_name_and_field_while_the_rest_reconciles() {
    let api = FakeApi::start(vec![
        policy(
            "broken",
            json!({"nodePorts": {"range": "31100-31199", "retentionSeconds": "a day"}}),
        ),
        policy("edge", json!({"nodePorts": {"range": "31000-31099"}})),
    ])
    .await;
    let operator = Operator::start(&api, "operator-a", &[]);
    operator.wait_ready(Duration::from_secs(20)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let (event, status) = loop {
        let requests = api.requests();
        let event = requests
            .iter()
            .find(|r| {
                r.method == "POST" && r.path.ends_with("/events") && r.body["regarding"]["name"] == "broken"
            })
            .cloned();
        let status = requests
            .iter()
            .find(|r| r.path.ends_with("/edge/status"))
            .cloned();
        if let (Some(e), Some(s)) = (&event, &status) {
            break (e.clone(), s.clone());
        }
        assert!(
            Instant::now() < deadline,
            "event {event:?}, status of edge {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "Unreadable");
    let note = event.body["note"].as_str().unwrap();
    assert!(
        note.contains("PortPolicy/broken") && note.contains("spec.nodePorts.retentionSeconds"),
        "{note}"
    );
    assert_eq!(status.body["status"]["nodePortsUsed"], "0/100");
    assert_eq!(
        operator.metric("portpolicy_operator_unreadable_policies").await,
        Some(1.0)
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.path.contains("/broken") && r.method == "PATCH"),
        "nothing is written to a policy that cannot be read"
    );
    // Short log lines: the problem, not the whole object.
    let longest = operator.log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1500, "a log line of {longest} characters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_address_in_use_stops_the_operator() {
    let api = FakeApi::start(vec![]).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let mut operator = Operator::start_at(&api, "operator-a", address, &[]);
    let status = operator
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("it exits");
    assert_eq!(status.code(), Some(2), "{}", operator.log());
    assert!(
        operator.log().contains(&address.to_string()),
        "{}",
        operator.log()
    );
}

// ---- The admission webhook, over HTTPS with a real TLS client ----

use k8s_openapi::ByteString;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The name the self-signed serving certificate is made for (the webhook Service's).
const WEBHOOK_HOST: &str = "portpolicy-webhook.portpolicy-system.svc";

fn review_body(uid: &str, namespace: &str, name: &str, kind: &str) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "services"},
        "name": name, "namespace": namespace, "operation": "CREATE",
        "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
        "object": {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}},
        "oldObject": null, "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}})
}

/// POSTs `body` to the webhook over TLS, trusting only `ca_pem` and checking `host`.
async fn post_review(
    address: SocketAddr,
    ca_pem: &str,
    host: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    portpolicy::operator::webhook::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let head = format!(
        "POST /mutate-v1-service HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    tls.write_all(body).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A server may close without close_notify; what arrived is the answer.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("no status line in {text:?}"))?;
    let start = text.find("\r\n\r\n").ok_or("no body")? + 4;
    Ok((code, response[start..].to_vec()))
}

/// The response of a review answer, with its JSON patch decoded.
fn response_of(body: &[u8]) -> (Value, Option<Value>) {
    let review: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    let response = review["response"].clone();
    assert!(response.is_object(), "a response: {review}");
    // As the API server reads it: Go's []byte, a base64 string.
    let patch = response.get("patch").filter(|p| !p.is_null()).map(|p| {
        assert!(
            p.is_string(),
            "the patch is base64, as the API server reads it: {p}"
        );
        let bytes: ByteString = serde_json::from_value(p.clone()).unwrap();
        serde_json::from_slice(&bytes.0).unwrap()
    });
    (response, patch)
}

fn webhook_flags(address: SocketAddr) -> Vec<String> {
    vec!["--webhook-address".into(), address.to_string()]
}

/// Waits for the leader's caBundle patch and returns the CA it published.
async fn published_ca(api: &FakeApi) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(patch) = api
            .requests()
            .into_iter()
            .find(|r| r.method == "PATCH" && r.path == WEBHOOK_CONFIGURATION)
        {
            let ops = patch.body.as_array().unwrap();
            assert_eq!(
                ops[0]["op"], "test",
                "the patch is pinned to the resourceVersion read: {ops:?}"
            );
            assert_eq!(ops[1]["path"], "/webhooks/0/clientConfig/caBundle");
            let bytes: ByteString = serde_json::from_value(ops[1]["value"].clone()).unwrap();
            return String::from_utf8(bytes.0).unwrap();
        }
        assert!(Instant::now() < deadline, "no caBundle patch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn edge_policy(range: &str) -> Value {
    policy(
        "edge",
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}},
            "nodePorts": {"range": range}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gives_100_concurrent_reviews_100_distinct_ports_over_https() {
    let api = FakeApi::start(vec![edge_policy("31000-31099")]).await;
    let address = free_port();
    let flags = webhook_flags(address);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let operator = Operator::start(&api, "operator-a", &flags);
    operator.wait_ready(Duration::from_secs(20)).await.unwrap();
    operator
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    let ca = published_ca(&api).await;

    let reviews = (0..100).map(|i| {
        let ca = ca.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&review_body(
                &format!("uid-{i}"),
                "edge",
                &format!("svc-{i}"),
                "Service",
            ))
            .unwrap();
            post_review(address, &ca, WEBHOOK_HOST, &body).await
        })
    });
    let mut ports = std::collections::BTreeSet::new();
    for (i, review) in futures::future::join_all(reviews).await.into_iter().enumerate() {
        let (code, body) = review.unwrap().unwrap();
        assert_eq!(code, 200);
        let (response, patch) = response_of(&body);
        assert_eq!(response["uid"], format!("uid-{i}"));
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = patch.expect("a patch");
        assert_eq!(patch[0]["path"], "/spec/ports/0/nodePort", "{patch}");
        let port = patch[0]["value"].as_u64().unwrap();
        assert!((31000..=31099).contains(&port), "{port}");
        ports.insert(port);
    }
    assert_eq!(ports.len(), 100, "every review got its own port");
    operator
        .wait_metric(
            "portpolicy_operator_webhook_reservations",
            100.0,
            Duration::from_secs(3),
        )
        .await
        .unwrap();

    // The range is full: the 101st is allowed unchanged, and told why.
    let body = serde_json::to_vec(&review_body("uid-full", "edge", "one-more", "Service")).unwrap();
    let (_, body) = post_review(address, &ca, WEBHOOK_HOST, &body).await.unwrap();
    let (response, patch) = response_of(&body);
    assert!(patch.is_none());
    assert_eq!(response["allowed"], true);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no free nodePort in PortPolicy/edge's range 31000-31099"),
        "{response}"
    );
    // Ungoverned namespace, another kind, a malformed body: clear answers, no patch, no crash.
    let body = serde_json::to_vec(&review_body("uid-other", "other", "web", "Service")).unwrap();
    let (_, body) = post_review(address, &ca, WEBHOOK_HOST, &body).await.unwrap();
    assert!(
        response_of(&body).1.is_none(),
        "no policy governs namespace other"
    );
    let body = serde_json::to_vec(&review_body("uid-pod", "edge", "web", "Pod")).unwrap();
    let (_, body) = post_review(address, &ca, WEBHOOK_HOST, &body).await.unwrap();
    let (response, patch) = response_of(&body);
    assert!(patch.is_none() && response["allowed"] == true);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("v1 Services only"),
        "{response}"
    );
    let (code, body) = post_review(
        address,
        &ca,
        WEBHOOK_HOST,
        b"{\"kind\": \"AdmissionReview\", \"request\": 7}",
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    let (response, _) = response_of(&body);
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read the body"),
        "{response}"
    );
    assert_eq!(
        operator
            .metric("portpolicy_operator_webhook_reviews_total{outcome=\"invalid\"}")
            .await,
        Some(1.0)
    );
    // Every review answered is timed, whatever its outcome.
    let mut answered = 0.0;
    for outcome in ["patched", "unchanged", "not_leader", "invalid"] {
        let series = format!("portpolicy_operator_webhook_reviews_total{{outcome=\"{outcome}\"}}");
        answered += operator.metric(&series).await.unwrap();
    }
    assert!(answered >= 104.0, "{answered} reviews counted");
    assert_eq!(
        operator
            .metric("portpolicy_operator_webhook_review_duration_seconds_count")
            .await,
        Some(answered)
    );
    // A client that does not trust the published CA cannot talk to it.
    let other = portpolicy::operator::webhook::tls::self_signed(&[WEBHOOK_HOST.to_string()]).unwrap();
    assert!(
        post_review(address, &other.ca_pem, WEBHOOK_HOST, b"{}")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_releases_a_reservation_whose_service_never_appears() {
    let api = FakeApi::start(vec![edge_policy("31000-31000")]).await;
    let address = free_port();
    let mut flags = webhook_flags(address);
    flags.extend(["--webhook-reservation-timeout".to_string(), "2s".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let operator = Operator::start(&api, "operator-a", &flags);
    operator.wait_ready(Duration::from_secs(20)).await.unwrap();
    operator
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(10))
        .await
        .unwrap();
    let ca = published_ca(&api).await;
    let review =
        |uid: &str, name: &str| serde_json::to_vec(&review_body(uid, "edge", name, "Service")).unwrap();
    let port_of = |body: &[u8]| response_of(body).1.map(|p| p[0]["value"].as_u64().unwrap());

    let (_, first) = post_review(address, &ca, WEBHOOK_HOST, &review("u1", "a"))
        .await
        .unwrap();
    assert_eq!(port_of(&first), Some(31000));
    let (_, second) = post_review(address, &ca, WEBHOOK_HOST, &review("u2", "b"))
        .await
        .unwrap();
    assert_eq!(port_of(&second), None, "the only port is reserved for a");
    // `a` never appears in the watch (its create failed): its reservation times out.
    operator
        .wait_metric(
            "portpolicy_operator_webhook_reservations",
            0.0,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        operator.log().contains("released nodePort reservations"),
        "{}",
        operator.log()
    );
    let (_, third) = post_review(address, &ca, WEBHOOK_HOST, &review("u3", "b"))
        .await
        .unwrap();
    assert_eq!(port_of(&third), Some(31000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_serves_certificate_files_and_reloads_them_when_they_change() {
    let api = FakeApi::start(vec![edge_policy("31000-31099")]).await;
    let dir = scratch_dir("certs");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let write = |made: &portpolicy::operator::webhook::tls::SelfSigned| {
        // Key first, then the certificate, as a Secret volume update may land.
        std::fs::write(&key, &made.key_pem).unwrap();
        std::fs::write(&cert, &made.cert_pem).unwrap();
    };
    let first = portpolicy::operator::webhook::tls::self_signed(&["localhost".to_string()]).unwrap();
    write(&first);
    let address = free_port();
    let mut flags = webhook_flags(address);
    flags.extend(
        [
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-reload-period",
            "1s",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let operator = Operator::start(&api, "operator-a", &flags);
    operator
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(20))
        .await
        .unwrap();
    let body = serde_json::to_vec(&review_body("u1", "edge", "web", "Service")).unwrap();
    let (code, answer) = post_review(address, &first.ca_pem, "localhost", &body)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(response_of(&answer).1.is_some(), "a governed Service is patched");
    assert!(
        !api.requests().iter().any(|r| r.path == WEBHOOK_CONFIGURATION),
        "with certificate files the caBundle is left to its owner (cert-manager)"
    );

    let second = portpolicy::operator::webhook::tls::self_signed(&["localhost".to_string()]).unwrap();
    write(&second);
    let changed = Instant::now();
    loop {
        if post_review(address, &second.ca_pem, "localhost", &body)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(10),
            "still the old certificate:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "new certificate served {:?} after the files changed",
        changed.elapsed()
    );
    assert!(
        post_review(address, &first.ca_pem, "localhost", &body)
            .await
            .is_err()
    );
    assert!(
        operator
            .log()
            .contains("reloaded the webhook's serving certificate")
    );
}

/// Reviews go to the leader only: the webhook Service selects the label the leader sets on its
/// own Pod. The leader labels itself and clears a stale label of a leader killed before it
/// could; a follower sets nothing and answers reviews allowed unchanged; after a handover the
/// new leader holds the label, the old one removed its own on shutdown, and the new one
/// assigns ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_labels_its_pod_for_the_webhook_service_and_hands_the_label_over() {
    use portpolicy::operator::leader_pod::LEADER_LABEL;
    let api = FakeApi::start(vec![edge_policy("31000-31099")]).await;
    let app = json!({"app.kubernetes.io/name": "portpolicy-operator"});
    api.add_pod("operator-a", app.clone());
    api.add_pod("operator-b", app.clone());
    // A leader killed (SIGKILL) while it led: its label is still there.
    let mut stale = app.clone();
    stale[LEADER_LABEL] = json!("true");
    api.add_pod("operator-killed", stale);

    // Both replicas serve one certificate pair, so one CA reaches either.
    let dir = scratch_dir("leader-label-certs");
    let made = portpolicy::operator::webhook::tls::self_signed(&["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&key, &made.key_pem).unwrap();
    std::fs::write(&cert, &made.cert_pem).unwrap();
    let start = |identity: &str, address: SocketAddr| {
        let mut flags = webhook_flags(address);
        flags.extend(["--pod-name".to_string(), identity.to_string()]);
        flags.extend(
            [
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
            ]
            .map(String::from),
        );
        flags.extend(FAST_ELECTION.map(String::from));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Operator::start(&api, identity, &flags)
    };
    let wait_leader_pods = |expected: &'static [&'static str]| {
        let api = api.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while api.leader_pods() != expected {
                assert!(
                    Instant::now() < deadline,
                    "labelled {:?}, not {expected:?}",
                    api.leader_pods()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let review =
        |uid: &str, name: &str| serde_json::to_vec(&review_body(uid, "edge", name, "Service")).unwrap();

    let (address_a, address_b) = (free_port(), free_port());
    let mut first = start("operator-a", address_a);
    first
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(20))
        .await
        .unwrap();
    wait_leader_pods(&["operator-a"]).await;
    let second = start("operator-b", address_b);
    second.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(second.metric("portpolicy_operator_leader").await, Some(0.0));
    // Long enough for a follower's write to show, were there one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.leader_pods(), ["operator-a"], "a follower labels nothing");
    let pod_patches = |name: &str| {
        api.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == format!("{}/{name}", fake_api::OPERATOR_PODS))
            .map(|r| r.body["metadata"]["labels"][LEADER_LABEL].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pod_patches("operator-b"),
        Vec::<Value>::new(),
        "a follower writes no label"
    );
    assert_eq!(
        pod_patches("operator-killed"),
        [Value::Null],
        "the stale label was removed"
    );

    // A review that reaches the follower anyway (a handover in progress) is allowed unchanged.
    let (code, body) = post_review(address_b, &made.ca_pem, "localhost", &review("u-b", "web-b"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let (response, patch) = response_of(&body);
    assert!(patch.is_none(), "{response}");
    assert_eq!(response["allowed"], true);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("does not lead"),
        "{response}"
    );
    let (_, body) = post_review(address_a, &made.ca_pem, "localhost", &review("u-a", "web-a"))
        .await
        .unwrap();
    assert!(response_of(&body).1.is_some(), "the leader assigns a port");

    first.terminate();
    let status = first
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    second
        .wait_metric("portpolicy_operator_leader", 1.0, Duration::from_secs(5))
        .await
        .unwrap();
    wait_leader_pods(&["operator-b"]).await;
    assert_eq!(
        pod_patches("operator-a"),
        [json!("true"), Value::Null],
        "the old leader labelled itself, then removed its label on shutdown:\n{}",
        first.log()
    );
    // A removal that lands late (a dead leader's request held up by the network) is undone
    // at the leader's next check, every 10 s.
    api.add_pod("operator-b", app.clone());
    let removed = Instant::now();
    let deadline = removed + Duration::from_secs(15);
    while api.leader_pods().is_empty() {
        assert!(Instant::now() < deadline, "the leader did not label itself again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(api.leader_pods(), ["operator-b"]);
    eprintln!("label restored {:?} after it was removed", removed.elapsed());
    let (_, body) = post_review(address_b, &made.ca_pem, "localhost", &review("u-b2", "web-b2"))
        .await
        .unwrap();
    let (response, patch) = response_of(&body);
    let patch = patch.unwrap_or_else(|| panic!("the new leader assigns a port: {response}"));
    let port = patch[0]["value"].as_u64().unwrap();
    assert!((31000..=31099).contains(&port), "{port}");
}
