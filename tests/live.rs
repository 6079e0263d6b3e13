//! `portpolicy plan` against a live cluster: a fake API server on loopback answers the list
//! requests (paged, with a 403 for Pods as a namespace-scoped RBAC role would give), and the
//! binary is run with `--kubeconfig` and `--context` as a kubectl user would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const NOW: &str = "2026-11-26T12:00:00Z";

/// What the fake API server serves, and what it was asked.
#[derive(Clone, Default)]
struct Cluster {
    /// Kinds whose list answers 403, and whose answers 404 (an API not served).
    forbidden: Vec<&'static str>,
    missing: Vec<&'static str>,
    requests: Arc<Mutex<Vec<(Method, String)>>>,
}

fn objects() -> Vec<(&'static str, Value)> {
    vec![
        (
            "namespaces",
            json!({"metadata": {"name": "shop", "labels": {"team": "shop"}}}),
        ),
        (
            "nodes",
            json!({"metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]}}),
        ),
        (
            "portpolicies",
            json!({"metadata": {"name": "edge"},
            "spec": {"namespaceSelector": {"matchLabels": {"team": "shop"}}, "nodePorts": {"range": "31000-31099"}}}),
        ),
        (
            "services",
            json!({"metadata": {"name": "web", "namespace": "shop", "resourceVersion": "10"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        ),
        (
            "services",
            json!({"metadata": {"name": "api", "namespace": "shop", "resourceVersion": "11"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.11",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 31050}]}}),
        ),
        (
            "endpointslices",
            json!({"metadata": {"name": "web-1", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.2"], "nodeName": "node-a", "conditions": {"ready": true}}]}),
        ),
        (
            "pods",
            json!({"metadata": {"name": "web-1", "namespace": "shop"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "x",
                "ports": [{"containerPort": 8080, "hostPort": 8080}]}]},
            "status": {"phase": "Running"}}),
        ),
    ]
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "namespaces" => ("v1", "Namespace"),
        "nodes" => ("v1", "Node"),
        "services" => ("v1", "Service"),
        "pods" => ("v1", "Pod"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSlice"),
        "portpolicies" => ("portpolicy.io/v1alpha1", "PortPolicy"),
        "daemonsets" => ("apps/v1", "DaemonSet"),
        "deployments" => ("apps/v1", "Deployment"),
        _ => ("apps/v1", "StatefulSet"),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Lists as the API server writes them: items without apiVersion and kind, one object per
/// page (so every list of two pages), with a continue token that needs escaping.
async fn serve(State(cluster): State<Cluster>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    cluster
        .requests
        .lock()
        .unwrap()
        .push((request.method().clone(), format!("{path}?{query}")));
    if request.method() != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "read-only");
    }
    let resource = path.rsplit('/').next().unwrap_or_default();
    if cluster.forbidden.contains(&resource) {
        let message = format!(
            "{resource} is forbidden: User \"viewer\" cannot list resource \"{resource}\" in API group \"\" at the cluster scope"
        );
        return status(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    if cluster.missing.contains(&resource) {
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    }
    let items: Vec<Value> = objects()
        .into_iter()
        .filter(|(r, _)| *r == resource)
        .map(|(_, o)| o)
        .collect();
    let page: usize = if query.contains("continue=page%2B2%2F%3D") {
        1
    } else {
        0
    };
    let token = if page == 0 && items.len() > 1 {
        "page+2/="
    } else {
        ""
    };
    let (api_version, kind) = kind_of(resource);
    let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "99", "continue": token},
        "items": items.get(page).into_iter().collect::<Vec<_>>()});
    ([("content-type", "application/json")], list.to_string()).into_response()
}

struct Fake {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<(Method, String)>>>,
    dir: PathBuf,
}

async fn start(name: &str, cluster: Cluster) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let requests = cluster.requests.clone();
    let app = Router::new().fallback(serve).with_state(cluster);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = std::env::temp_dir().join(format!("portpolicy-live-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Two contexts: the current one points at a port nothing listens on, so only --context
    // reaches the fake.
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: elsewhere\n\
         clusters:\n- name: fake\n  cluster: {{server: \"http://{address}\"}}\n\
         - name: nowhere\n  cluster: {{server: \"http://127.0.0.1:9\"}}\n\
         users:\n- name: viewer\n  user: {{token: viewer-token}}\n\
         contexts:\n- name: fake\n  context: {{cluster: fake, user: viewer}}\n\
         - name: elsewhere\n  context: {{cluster: nowhere, user: viewer}}\n"
    );
    std::fs::write(dir.join("kubeconfig"), kubeconfig).unwrap();
    Fake {
        address,
        requests,
        dir,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn portpolicy(args: Vec<String>, env: Vec<(&'static str, String)>) -> Run {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
            .args(&args)
            .env_remove("KUBECONFIG")
            .env("HOME", std::env::temp_dir().join("portpolicy-live-no-home"))
            .envs(env)
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn plan_args(fake: &Fake, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["plan", "-o", "json", "--now", NOW].map(String::from).to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let _ = fake;
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_a_live_cluster_read_only_and_names_the_kinds_it_may_not_list() {
    let fake = start(
        "forbidden",
        Cluster {
            forbidden: vec!["pods"],
            ..Cluster::default()
        },
    )
    .await;
    let kubeconfig = fake.dir.join("kubeconfig");
    let out = portpolicy(
        plan_args(
            &fake,
            &["--kubeconfig", kubeconfig.to_str().unwrap(), "--context", "fake"],
        ),
        vec![],
    )
    .await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(&format!("http://{}", fake.address)),
        "{}",
        out.stderr
    );
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let ports: Vec<_> = json["nodePorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap(),
                r["nodePort"].as_u64().unwrap(),
                r["state"].as_str().unwrap(),
            )
        })
        .collect();
    // The second Service came on the second page of its list.
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(ports.contains(&("shop/api", 31050, "Existing")), "{ports:?}");
    assert!(
        ports
            .iter()
            .any(|&(s, p, st)| s == "shop/web" && (31000..=31099).contains(&p) && st == "Allocated")
    );
    assert_eq!(json["nodes"][0]["name"], "node-a");
    let problems: Vec<_> = json["problems"].as_array().unwrap().iter().collect();
    let forbidden: Vec<_> = problems.iter().filter(|p| p["object"] == "Pod").collect();
    assert_eq!(forbidden.len(), 1, "{problems:?}");
    let message = forbidden[0]["message"].as_str().unwrap();
    assert!(
        message.contains("forbidden") && message.contains("planned without them"),
        "{message}"
    );
    // No host-port checks without Pods, and nothing but GETs went to the server.
    assert_eq!(json["hostPortConflicts"], json!([]));
    let requests = fake.requests.lock().unwrap().clone();
    assert!(requests.iter().all(|(m, _)| m == Method::GET), "{requests:?}");
    assert!(
        requests
            .iter()
            .any(|(_, u)| u.contains("/api/v1/services?limit=500&continue=page%2B2%2F%3D")),
        "{requests:?}"
    );
    std::fs::remove_dir_all(&fake.dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_plan_is_the_plan_of_the_same_objects_in_a_file() {
    let fake = start("same", Cluster::default()).await;
    // The default kubeconfig (KUBECONFIG) and its current context, switched to the fake.
    let kubeconfig = std::fs::read_to_string(fake.dir.join("kubeconfig"))
        .unwrap()
        .replace("current-context: elsewhere", "current-context: fake");
    std::fs::write(fake.dir.join("kubeconfig"), kubeconfig).unwrap();
    let live = portpolicy(
        plan_args(&fake, &[]),
        vec![("KUBECONFIG", fake.dir.join("kubeconfig").display().to_string())],
    )
    .await;
    assert_eq!(live.code, 0, "{}", live.stderr);

    let items: Vec<Value> = objects()
        .into_iter()
        .map(|(resource, mut o)| {
            let (api_version, kind) = kind_of(resource);
            o["apiVersion"] = json!(api_version);
            o["kind"] = json!(kind);
            o
        })
        .collect();
    let file = fake.dir.join("cluster.json");
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    let from_file = portpolicy(plan_args(&fake, &["-f", file.to_str().unwrap()]), vec![]).await;
    assert_eq!(from_file.code, 0, "{}", from_file.stderr);
    assert_eq!(live.stdout, from_file.stdout);
    std::fs::remove_dir_all(&fake.dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_the_crd_is_planned_and_one_out_of_reach_fails_clearly() {
    let fake = start(
        "no-crd",
        Cluster {
            missing: vec!["portpolicies"],
            ..Cluster::default()
        },
    )
    .await;
    let kubeconfig = fake.dir.join("kubeconfig");
    let out = portpolicy(
        plan_args(
            &fake,
            &["--kubeconfig", kubeconfig.to_str().unwrap(), "--context", "fake"],
        ),
        vec![],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let crd: Vec<_> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["object"] == "PortPolicy")
        .collect();
    assert_eq!(crd.len(), 1);
    assert!(
        crd[0]["message"]
            .as_str()
            .unwrap()
            .contains("CRD is not installed")
    );
    // Without policies nothing is allocated, but the Service holding a port is still listed.
    assert_eq!(json["nodePorts"].as_array().unwrap().len(), 1);

    // The current context points where nothing listens: one clear error, nothing planned.
    let out = portpolicy(
        plan_args(&fake, &["--kubeconfig", kubeconfig.to_str().unwrap()]),
        vec![],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("cannot reach the cluster"), "{}", out.stderr);
    assert_eq!(out.stderr.matches("cannot reach").count(), 1, "{}", out.stderr);
    assert!(
        !out.stderr.contains("ERROR"),
        "no client log noise: {}",
        out.stderr
    );
    std::fs::remove_dir_all(&fake.dir).unwrap();
}

#[tokio::test]
async fn files_and_a_cluster_are_not_mixed() {
    let out = portpolicy(
        ["plan", "-f", "x.yaml", "--context", "fake"]
            .map(String::from)
            .to_vec(),
        vec![],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("cannot be used with"), "{}", out.stderr);
}
