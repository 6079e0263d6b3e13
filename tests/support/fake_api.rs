//! The fake Kubernetes API server on loopback that the operator process tests
//! (tests/operator_process.rs) and the Prometheus test (tests/prometheus.rs) run the real
//! `portpolicy operator` binary against. One implementation for both, included by each with
//! `#[path = "support/fake_api.rs"] mod fake_api;`.
//!
//! It lists from its objects, keeps one Lease with resourceVersions, takes Events, answers the
//! MutatingWebhookConfiguration GET and PATCH, and the operator's patches (PortPolicy status,
//! Service nodePorts). It records every request as it arrives and can freeze (take requests and
//! answer none, like a SIGSTOPped API server). Its watches deliver what the test changes with
//! [`FakeApi::change`], and nothing else unless it was started with [`FakeApi::start_live`]:
//! then it also keeps what the operator writes and tells the watches, as an API server does.
//! [`FakeApi::start`] answers writes without keeping them, so that only the operator's own
//! decisions (never an echo of its writes) prompt its reconciles.

// Each test uses its part of the fake.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

pub(crate) const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/portpolicy-system/leases";
pub(crate) const POLICIES: &str = "/apis/portpolicy.io/v1alpha1/portpolicies";
pub(crate) const SERVICES: &str = "/api/v1/services";
pub(crate) const PODS: &str = "/api/v1/pods";
pub(crate) const WEBHOOK_CONFIGURATION: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/portpolicy-operator";

/// config/webhook.yaml's MutatingWebhookConfiguration, as the API server would return it.
fn webhook_configuration() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/webhook.yaml")).unwrap();
    let docs = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text).unwrap();
    let mut object = docs
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    object["metadata"]["resourceVersion"] = json!("7");
    object
}

#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) body: Value,
    /// When it arrived (a frozen server records requests as they come and answers later).
    pub(crate) at: Instant,
}

#[derive(Default)]
struct ApiState {
    policies: Vec<Value>,
    services: Vec<Value>,
    pods: Vec<Value>,
    lease: Option<Value>,
    resource_version: u64,
    requests: Vec<Recorded>,
    /// Pods of portpolicy-system by name: their labels (the leader label's tests).
    pod_labels: std::collections::BTreeMap<String, serde_json::Map<String, Value>>,
}

#[derive(Clone)]
pub(crate) struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    /// (collection path, watch event) for every change.
    events: tokio::sync::broadcast::Sender<(String, Value)>,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    /// Whether the operator's writes are kept and told to the watches.
    live: bool,
    pub(crate) address: SocketAddr,
}

impl FakeApi {
    /// A server whose watches carry only the test's [`change`](Self::change)s; the operator's
    /// writes are answered, not kept.
    pub(crate) async fn start(policies: Vec<Value>) -> Self {
        Self::start_with(policies, false).await
    }

    /// A server that keeps the operator's writes (status, Service nodePorts), each bumping the
    /// resourceVersion, and tells the watches.
    pub(crate) async fn start_live(policies: Vec<Value>) -> Self {
        Self::start_with(policies, true).await
    }

    async fn start_with(policies: Vec<Value>, live: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = FakeApi {
            state: Arc::new(Mutex::new(ApiState {
                policies,
                resource_version: 100,
                ..Default::default()
            })),
            events: tokio::sync::broadcast::channel(256).0,
            frozen: Arc::new(tokio::sync::watch::Sender::new(false)),
            live,
            address: listener.local_addr().unwrap(),
        };
        let app = Router::new().fallback(handle).with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        api
    }

    /// Like a SIGSTOPped API server: requests are taken and left unanswered until `thaw`.
    pub(crate) fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub(crate) fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub(crate) fn holder(&self) -> Option<String> {
        let state = self.state.lock().unwrap();
        let holder = state.lease.as_ref()?["spec"]["holderIdentity"]
            .as_str()?
            .to_string();
        (!holder.is_empty()).then_some(holder)
    }

    /// A Pod in portpolicy-system with these labels (PATCH 404s for a Pod that is not there).
    pub(crate) fn add_pod(&self, name: &str, labels: Value) {
        let labels = labels.as_object().cloned().unwrap_or_default();
        self.state.lock().unwrap().pod_labels.insert(name.into(), labels);
    }

    /// The Pods carrying the leader label the webhook Service selects.
    pub(crate) fn leader_pods(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .pod_labels
            .iter()
            .filter(|(_, labels)| labels.get("portpolicy.io/leader").and_then(Value::as_str) == Some("true"))
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub(crate) fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n\
             users:\n- name: fake\n  user: {{}}\n",
            self.address
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Adds (or, with `deleted`, removes) an object of `collection` (`POLICIES`, `SERVICES`,
    /// `PODS`) and tells the watches.
    pub(crate) fn change(&self, collection: &str, mut object: Value, deleted: bool) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
        let objects = match collection {
            SERVICES => &mut state.services,
            PODS => &mut state.pods,
            _ => &mut state.policies,
        };
        let same = |o: &Value| {
            o["metadata"]["name"] == object["metadata"]["name"]
                && o["metadata"]["namespace"] == object["metadata"]["namespace"]
        };
        let existed = objects.iter().any(same);
        objects.retain(|o| !same(o));
        let kind = if deleted {
            "DELETED"
        } else {
            objects.push(object.clone());
            if existed { "MODIFIED" } else { "ADDED" }
        };
        let _ = self
            .events
            .send((collection.to_string(), json!({"type": kind, "object": object})));
    }

    /// Answers a write of `object` to `collection`: kept (and told to the watches) when live.
    fn written(&self, collection: &str, object: Value) -> Response {
        if !self.live {
            return json_response(StatusCode::OK, &object);
        }
        self.change(collection, object, false);
        let state = self.state.lock().unwrap();
        let stored = match collection {
            SERVICES => state.services.last(),
            _ => state.policies.last(),
        };
        json_response(StatusCode::OK, stored.unwrap())
    }
}

/// The operator's own Pods (the leader labels its own).
pub(crate) const OPERATOR_PODS: &str = "/api/v1/namespaces/portpolicy-system/pods";

fn pod_metadata(name: &str, labels: &serde_json::Map<String, Value>) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "namespace": "portpolicy-system", "labels": labels}})
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
        .into_response()
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}),
    )
}

fn list(api_version: &str, kind: &str, items: Vec<Value>, rv: u64) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

/// Sets what a server-side apply of a Service from the operator sets: nodePorts by
/// (port, protocol), labels, externalTrafficPolicy.
fn apply_to_service(live: &mut Value, patch: &Value) {
    if let Some(ports) = patch["spec"]["ports"].as_array() {
        for p in ports {
            for live_port in live["spec"]["ports"].as_array_mut().into_iter().flatten() {
                if live_port["port"] == p["port"] && live_port["protocol"] == p["protocol"] {
                    live_port["nodePort"] = p["nodePort"].clone();
                }
            }
        }
    }
    if let Some(labels) = patch["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            live["metadata"]["labels"][k] = v.clone();
        }
    }
    if let Some(policy) = patch["spec"].get("externalTrafficPolicy") {
        live["spec"]["externalTrafficPolicy"] = policy.clone();
    }
}

async fn handle(State(api): State<FakeApi>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.state.lock().unwrap().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        body: body.clone(),
        at: Instant::now(),
    });
    let mut frozen = api.frozen.subscribe();
    let _ = frozen.wait_for(|f| !*f).await;
    if method == Method::GET && query.split('&').any(|q| q == "watch=true" || q == "watch=1") {
        // Events from now on (the lists the watches start from are as fresh as the test's
        // changes, which it makes only once the operators listed); with none, an open watch
        // and the client keeps its cache as listed.
        let events = stream_of(api.events.subscribe(), path);
        return Body::from_stream(events).into_response();
    }
    let mut state = api.state.lock().unwrap();
    let rv = state.resource_version;
    let lease_path = format!("{LEASES}/portpolicy-operator");
    match (method.as_str(), path.as_str()) {
        ("GET", POLICIES) => list(
            "portpolicy.io/v1alpha1",
            "PortPolicyList",
            state.policies.clone(),
            rv,
        ),
        ("GET", SERVICES) => list("v1", "ServiceList", state.services.clone(), rv),
        ("GET", PODS) => list("v1", "PodList", state.pods.clone(), rv),
        ("GET", "/api/v1/namespaces") => list("v1", "NamespaceList", vec![], rv),
        ("GET", "/api/v1/nodes") => list("meta.k8s.io/v1", "PartialObjectMetadataList", vec![], rv),
        ("GET", "/apis/apps/v1/namespaces/portpolicy-system/daemonsets") => {
            list("apps/v1", "DaemonSetList", vec![], rv)
        }
        ("GET", p) if p == lease_path => match &state.lease {
            Some(lease) => json_response(StatusCode::OK, lease),
            None => status(404, "NotFound", "leases \"portpolicy-operator\" not found"),
        },
        ("POST", LEASES) => {
            if state.lease.is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    "leases \"portpolicy-operator\" already exists",
                );
            }
            state.resource_version += 1;
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.lease = Some(lease.clone());
            json_response(StatusCode::CREATED, &lease)
        }
        ("PUT", p) if p == lease_path => {
            let current = state
                .lease
                .as_ref()
                .map(|l| l["metadata"]["resourceVersion"].clone());
            if current.as_ref() != Some(&body["metadata"]["resourceVersion"]) {
                return status(409, "Conflict", "the object has been modified");
            }
            state.resource_version += 1;
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.lease = Some(lease.clone());
            json_response(StatusCode::OK, &lease)
        }
        // The leader publishes its webhook's CA bundle; the fake takes it and keeps nothing.
        ("GET", OPERATOR_PODS) => {
            // Only the leader label's selector is understood: `key=value`.
            let selector = query
                .split('&')
                .find_map(|q| q.strip_prefix("labelSelector="))
                .map(|s| s.replace("%3D", "=").replace("%2F", "/"))
                .unwrap_or_default();
            let (key, value) = selector.split_once('=').unwrap_or_default();
            let items = state
                .pod_labels
                .iter()
                .filter(|(_, labels)| {
                    key.is_empty() || labels.get(key).and_then(Value::as_str) == Some(value)
                })
                .map(|(name, labels)| pod_metadata(name, labels))
                .collect();
            list(
                "meta.k8s.io/v1",
                "PartialObjectMetadataList",
                items,
                state.resource_version,
            )
        }
        ("PATCH", p) if p.starts_with(OPERATOR_PODS) => {
            let name = p.trim_start_matches(OPERATOR_PODS).trim_start_matches('/');
            let Some(labels) = state.pod_labels.get_mut(name) else {
                return status(404, "NotFound", &format!("pods \"{name}\" not found"));
            };
            // A JSON merge patch of metadata.labels: null removes.
            for (key, value) in body["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default()
            {
                match value {
                    Value::Null => labels.remove(&key),
                    value => labels.insert(key, value),
                };
            }
            let object = pod_metadata(name, labels);
            json_response(StatusCode::OK, &object)
        }
        ("GET", WEBHOOK_CONFIGURATION) => json_response(StatusCode::OK, &webhook_configuration()),
        ("PATCH", WEBHOOK_CONFIGURATION) => json_response(StatusCode::OK, &webhook_configuration()),
        ("POST", p) if p.ends_with("/events") => json_response(StatusCode::CREATED, &body),
        ("PATCH", p) if p.starts_with(POLICIES) => {
            let name = p.trim_start_matches(POLICIES).trim_start_matches('/');
            let name = name.trim_end_matches("/status");
            let found = state
                .policies
                .iter()
                .find(|o| o["metadata"]["name"] == name)
                .cloned();
            drop(state);
            match found {
                Some(mut object) => {
                    if p.ends_with("/status") {
                        object["status"] = body["status"].clone();
                    }
                    api.written(POLICIES, object)
                }
                None => status(404, "NotFound", "not found"),
            }
        }
        ("PATCH", p) if p.starts_with("/api/v1/namespaces/") && p.contains("/services/") => {
            let mut parts = p.trim_start_matches("/api/v1/namespaces/").split("/services/");
            let (ns, name) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let found = state
                .services
                .iter()
                .find(|o| o["metadata"]["name"] == name && o["metadata"]["namespace"] == ns)
                .cloned();
            drop(state);
            match found {
                Some(mut object) => {
                    apply_to_service(&mut object, &body);
                    api.written(SERVICES, object)
                }
                None => status(404, "NotFound", "not found"),
            }
        }
        _ => status(
            404,
            "NotFound",
            &format!("the fake API server has no {method} {path}"),
        ),
    }
}

/// The watch events of one collection as a chunked body, one JSON object a line.
fn stream_of(
    receiver: tokio::sync::broadcast::Receiver<(String, Value)>,
    collection: String,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => return Some((event, receiver)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    })
    .filter_map(move |(path, event)| {
        let line = (path == collection).then(|| {
            let mut bytes = serde_json::to_vec(&event).unwrap();
            bytes.push(b'\n');
            Ok(Bytes::from(bytes))
        });
        std::future::ready(line)
    })
}
