//! Reconcile against a mocked API server (the kube-rs `ApiServerVerifier` pattern): every
//! request the operator sends is checked (method, path with query, body) and answered as the API
//! server would answer it. When the reconcile is done the client is dropped, and the verifier
//! checks that nothing else was sent.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::context::{CacheSync, Context, Settings, Stores};
use super::lease::Leadership;
use super::metrics::{Metrics, WATCHED_RESOURCES};
use super::reconcile::reconcile;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::hostport::HostPortPod;
use portpolicy_core::ports::PortRange;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NOW: &str = "2026-11-26T12:00:00Z";
const STATUS_URI: &str =
    "/apis/portpolicy.io/v1alpha1/portpolicies/edge/status?&force=true&fieldManager=portpolicy-operator";

fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

#[derive(Default)]
struct Cluster {
    policies: Vec<PortPolicy>,
    services: Vec<Service>,
    pods: Vec<HostPortPod>,
    namespaces: Vec<Namespace>,
    daemon_sets: Vec<DaemonSet>,
}

fn context(cluster: Cluster) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let stores = Stores {
        policies: store(cluster.policies),
        services: store(cluster.services),
        pods: store(cluster.pods),
        namespaces: store(cluster.namespaces),
        daemon_sets: store(cluster.daemon_sets),
    };
    let settings = Settings {
        namespace: "portpolicy-system".into(),
        default_image: "portpolicy:test".into(),
        cluster_range: PortRange::DEFAULT_NODE_PORTS,
    };
    let mut ctx = Context::new(
        client,
        stores,
        CacheSync::listed(&WATCHED_RESOURCES),
        Leadership::new(true),
        Metrics::new(),
        settings,
        Some("operator-0".into()),
    );
    let now: chrono::DateTime<chrono::Utc> = NOW.parse().unwrap();
    ctx.clock = Arc::new(move || now);
    (Arc::new(ctx), handle)
}

fn policy(spec: Value, status: Option<Value>) -> PortPolicy {
    let mut p = json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "edge", "uid": "uid-edge", "generation": 2, "resourceVersion": "100",
            "finalizers": ["portpolicy.io/cleanup"]},
        "spec": spec,
    });
    if let Some(status) = status {
        p["status"] = status;
    }
    serde_json::from_value(p).unwrap()
}

/// A NodePort Service as `kubectl create` leaves it: the API server picked `node_port` at random,
/// so no manager owns it.
fn node_port_service(ns: &str, name: &str, node_port: i32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "creationTimestamp": "2026-11-26T11:00:00Z",
            "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:type": {}, "f:ports": {".": {},
                    "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}, "f:protocol": {},
                        "f:targetPort": {}}}}}}]},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Cluster",
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port}]},
    }))
    .unwrap()
}

fn host_port_pod(ns: &str, name: &str, node: &str, host_port: i32) -> HostPortPod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx",
            "ports": [{"containerPort": 80, "hostPort": host_port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

/// Receives the next request, checks method and URI, and returns its JSON body.
async fn expect(
    handle: &mut Handle,
    method: &str,
    uri: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the operator sent no request in time")
        .expect("the client was dropped before the expected request");
    assert_eq!(request.method().as_str(), method);
    assert_eq!(request.uri().to_string(), uri);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send)
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, body: &Value) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

/// Answers a status apply the way the API server does: the object with the applied status.
fn reply_status(send: tower_test::mock::SendResponse<Response<Body>>, policy: &PortPolicy, body: &Value) {
    let mut object = serde_json::to_value(policy).unwrap();
    object["status"] = body["status"].clone();
    reply(send, &object);
}

/// Runs one reconcile against the verifier, which must see exactly the requests it expects.
async fn run<F, Fut>(ctx: Arc<Context>, mut handle: Handle, policy: &PortPolicy, verifier: F)
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Handle> + Send + 'static,
{
    handle.allow(100);
    let verify = tokio::spawn(verifier(handle));
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(policy.clone()), ctx))
        .await
        .expect("reconcile finished");
    result.expect("reconcile succeeded");
    let mut handle = tokio::time::timeout(Duration::from_secs(5), verify)
        .await
        .expect("the verifier saw every expected request")
        .unwrap();
    // The reconcile dropped its context (and so the client): no request may be left.
    assert!(
        handle.next_request().await.is_none(),
        "an unexpected request was sent"
    );
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn range_spec() -> Value {
    json!({"nodePorts": {"range": "31000-31099"}})
}

#[tokio::test]
async fn new_policy_gets_its_status_and_nothing_else() {
    let p = policy(range_spec(), None);
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        assert_eq!(
            body["metadata"],
            json!({"name": "edge", "resourceVersion": "100"})
        );
        assert_eq!(body["apiVersion"], "portpolicy.io/v1alpha1");
        let status = &body["status"];
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["nodePortsUsed"], "0/100");
        assert_eq!(status["conflictCount"], 0);
        assert_eq!(condition(status, "Ready")["status"], "True");
        assert_eq!(condition(status, "SpecValid")["status"], "True");
        assert_eq!(condition(status, "NodePortsAllocated")["status"], "True");
        assert_eq!(condition(status, "HostPortConflict")["status"], "False");
        assert_eq!(condition(status, "Ready")["lastTransitionTime"], NOW);
        reply_status(send, &expected, &body);
        h
    })
    .await;
}

#[tokio::test]
async fn unchanged_status_is_not_written_again() {
    // First reconcile: capture the status the operator writes.
    let p = policy(range_spec(), None);
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        tx.send(body["status"].clone()).unwrap();
        reply_status(send, &expected, &body);
        h
    })
    .await;
    // Second reconcile, an hour later, with that status stored: no request at all.
    let written = rx.await.unwrap();
    let p = policy(range_spec(), Some(written));
    let (mut ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    let later: chrono::DateTime<chrono::Utc> = "2026-11-26T13:00:00Z".parse().unwrap();
    Arc::get_mut(&mut ctx).unwrap().clock = Arc::new(move || later);
    run(ctx, handle, &p, |h| async move { h }).await;
}

#[tokio::test]
async fn selected_service_gets_a_node_port_from_the_policy() {
    let p = policy(range_spec(), None);
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 30555)],
        ..Default::default()
    });
    let metrics = ctx.metrics.clone();
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        let records = body["status"]["allocations"].as_array().unwrap().clone();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            (
                &records[0]["namespace"],
                &records[0]["service"],
                &records[0]["kind"]
            ),
            (&json!("shop"), &json!("web"), &json!("Service"))
        );
        let node_port = records[0]["nodePort"].as_i64().unwrap();
        assert!((31000..=31099).contains(&node_port), "{node_port}");
        assert_eq!(body["status"]["nodePortsUsed"], "1/100");
        reply_status(send, &expected, &body);

        let (body, send) = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/shop/services/web?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        assert_eq!(
            body,
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"port": 80, "protocol": "TCP", "nodePort": node_port}]}})
        );
        let mut svc = serde_json::to_value(node_port_service("shop", "web", node_port as i32)).unwrap();
        svc["metadata"]["resourceVersion"] = json!("5");
        reply(send, &svc);
        h
    })
    .await;
    // The API server's random port outside the range was replaced by one from it.
    assert_eq!(outcomes(&metrics), [("moved", 1)]);
}

/// The non-zero `node_port_allocations_total` of policy `edge`, by outcome.
fn outcomes(metrics: &Metrics) -> Vec<(&'static str, u64)> {
    super::metrics::ALLOCATION_OUTCOMES
        .into_iter()
        .map(|o| (o, metrics.allocations.with_label_values(&["edge", o]).get()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[tokio::test]
async fn recreated_service_gets_its_old_port_back() {
    let released = json!({"allocations": [{"namespace": "shop", "service": "web", "kind": "Service",
        "nodePort": 31042, "releasedAt": "2026-11-26T11:30:00Z"}]});
    let p = policy(range_spec(), Some(released));
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 30777)],
        ..Default::default()
    });
    let metrics = ctx.metrics.clone();
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        assert_eq!(
            body["status"]["allocations"],
            json!([{"namespace": "shop", "service": "web", "kind": "Service", "nodePort": 31042}])
        );
        reply_status(send, &expected, &body);
        let (body, send) = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/shop/services/web?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        assert_eq!(
            body["spec"]["ports"],
            json!([{"port": 80, "protocol": "TCP", "nodePort": 31042}])
        );
        reply(
            send,
            &serde_json::to_value(node_port_service("shop", "web", 31042)).unwrap(),
        );
        h
    })
    .await;
    assert_eq!(outcomes(&metrics), [("restored", 1)]);
}

#[tokio::test]
async fn host_port_conflict_sets_the_condition_and_emits_one_event() {
    // The policy was healthy; then two Pods on one node ask for the same hostPort.
    let healthy = json!({"observedGeneration": 2, "conflictCount": 0, "conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready", "message": "policy is in effect",
            "observedGeneration": 2, "lastTransitionTime": "2026-11-26T10:00:00Z"},
        {"type": "SpecValid", "status": "True", "reason": "Valid", "message": "spec is valid",
            "observedGeneration": 2, "lastTransitionTime": "2026-11-26T10:00:00Z"},
        {"type": "HostPortConflict", "status": "False", "reason": "NoConflicts",
            "message": "no hostPort conflicts", "observedGeneration": 2,
            "lastTransitionTime": "2026-11-26T10:00:00Z"}]});
    let p = policy(json!({}), Some(healthy));
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        pods: vec![
            host_port_pod("shop", "a", "node-1", 8080),
            host_port_pod("shop", "b", "node-1", 8080),
        ],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        let status = &body["status"];
        let c = condition(status, "HostPortConflict");
        assert_eq!(c["status"], "True");
        assert_eq!(c["lastTransitionTime"], NOW);
        let message = c["message"].as_str().unwrap();
        for part in ["node-1", "TCP", "8080", "shop/a", "shop/b"] {
            assert!(message.contains(part), "{part} missing from {message:?}");
        }
        assert_eq!(status["conflictCount"], 1);
        assert_eq!(status["conflicts"][0]["node"], "node-1");
        assert_eq!(status["conflicts"][0]["hostPort"], 8080);
        assert_eq!(condition(status, "Ready")["status"], "False");
        assert_eq!(
            condition(status, "SpecValid")["lastTransitionTime"],
            "2026-11-26T10:00:00Z"
        );
        reply_status(send, &expected, &body);

        let (event, send) = expect(
            &mut h,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
        )
        .await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "ConflictsFound");
        assert_eq!(event["regarding"]["kind"], "PortPolicy");
        assert_eq!(event["regarding"]["name"], "edge");
        assert!(event["note"].as_str().unwrap().contains("8080"));
        reply(send, &event);
        h
    })
    .await;
}

#[tokio::test]
async fn agent_daemon_set_is_applied_with_an_owner_reference() {
    let p = policy(json!({"agent": {"proxy": true}}), None);
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        // The DaemonSet first, so the status describes it as it is.
        let (ds, send) = expect(
            &mut h,
            "PATCH",
            "/apis/apps/v1/namespaces/portpolicy-system/daemonsets/portpolicy-agent-edge?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        assert_eq!(ds["kind"], "DaemonSet");
        assert_eq!(
            ds["metadata"]["ownerReferences"],
            json!([{"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy", "name": "edge",
                "uid": "uid-edge", "controller": true, "blockOwnerDeletion": true}])
        );
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["serviceAccountName"], "portpolicy-agent");
        assert_eq!(pod["containers"][0]["image"], "portpolicy:test");
        reply(send, &ds);

        // Just created, so not ready yet; but not missing, and no Warning event for a
        // DaemonSet whose pods are only starting.
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        let agents = condition(&body["status"], "AgentsReady");
        assert_eq!(
            (&agents["status"], &agents["reason"]),
            (&json!("False"), &json!("NotReady"))
        );
        assert_eq!(body["status"]["agentsReady"], "0/0");
        reply_status(send, &expected, &body);
        h
    })
    .await;
}

#[tokio::test]
async fn daemon_set_that_cannot_be_created_is_reported_missing_with_the_reason() {
    let p = policy(json!({"agent": {"proxy": true}}), None);
    let (ctx, mut handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    handle.allow(10);
    let expected = p.clone();
    let verify = tokio::spawn(async move {
        let (_, send) = expect(
            &mut handle,
            "PATCH",
            "/apis/apps/v1/namespaces/portpolicy-system/daemonsets/portpolicy-agent-edge?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
            "reason": "Forbidden", "message": "daemonsets.apps is forbidden: quota exceeded"});
        send.send_response(
            Response::builder()
                .status(403)
                .body(Body::from(serde_json::to_vec(&forbidden).unwrap()))
                .unwrap(),
        );
        let (body, send) = expect(&mut handle, "PATCH", STATUS_URI).await;
        let agents = condition(&body["status"], "AgentsReady");
        assert_eq!(agents["reason"], "DaemonSetMissing");
        let message = agents["message"].as_str().unwrap();
        assert!(
            message.contains("portpolicy-system/portpolicy-agent-edge") && message.contains("quota exceeded"),
            "{message}"
        );
        reply_status(send, &expected, &body);
        let (event, send) = expect(
            &mut handle,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
        )
        .await;
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some("Warning"), Some("DaemonSetMissing"))
        );
        reply(send, &event);
        handle
    });
    let result = reconcile(Arc::new(p), ctx).await;
    assert!(matches!(result, Err(super::Error::Kube(_))), "{result:?}");
    verify.await.unwrap();
}

#[tokio::test]
async fn invalid_spec_only_writes_its_status() {
    let p = policy(
        json!({"nodePorts": {"range": "31000-31099", "reserved": ["oops"]}}),
        None,
    );
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 30555)],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        let c = condition(&body["status"], "SpecValid");
        assert_eq!(c["status"], "False");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("spec.nodePorts.reserved[0]"),
            "{c}"
        );
        reply_status(send, &expected, &body);
        let (event, send) = expect(
            &mut h,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
        )
        .await;
        assert_eq!(event["reason"], "InvalidSpec");
        reply(send, &event);
        h
    })
    .await;
}

#[tokio::test]
async fn stale_policy_copy_gets_a_conflict_and_retries() {
    let p = policy(range_spec(), None);
    let (ctx, mut handle) = context(Cluster {
        policies: vec![p.clone()],
        ..Default::default()
    });
    handle.allow(10);
    let verify = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, "PATCH", STATUS_URI).await;
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
            "reason": "Conflict", "message": "the object has been modified"});
        send.send_response(
            Response::builder()
                .status(409)
                .body(Body::from(serde_json::to_vec(&conflict).unwrap()))
                .unwrap(),
        );
        handle
    });
    let result = reconcile(Arc::new(p), ctx).await;
    assert!(matches!(result, Err(super::Error::Conflict)), "{result:?}");
    verify.await.unwrap();
}

/// A Service the operator has applied to (its managedFields entry), with the proxy-name label.
fn proxied_service(ns: &str, name: &str) -> Service {
    let mut svc = serde_json::to_value(node_port_service(ns, name, 31005)).unwrap();
    svc["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "portpolicy"});
    svc["metadata"]["managedFields"].as_array_mut().unwrap().push(
        json!({"manager": "portpolicy-operator", "operation": "Apply", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {
                "f:metadata": {"f:labels": {"f:service.kubernetes.io/service-proxy-name": {}}},
                "f:spec": {"f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {
                    ".": {}, "f:nodePort": {}, "f:port": {}, "f:protocol": {}}}}}}),
    );
    serde_json::from_value(svc).unwrap()
}

#[tokio::test]
async fn proxy_policy_labels_its_services_and_sets_local_traffic() {
    let spec = json!({"nodePorts": {"range": "31000-31099"},
        "traffic": {"externalTrafficPolicy": "RequireLocal"}, "agent": {"proxy": true}});
    let p = policy(spec, None);
    // The agent DaemonSet exists as the operator would apply it (same hash annotation) and is
    // ready, so after the status only the Service is written.
    let (probe, _) = context(Cluster::default());
    let mut ds =
        serde_json::to_value(super::reconcile::desired_daemon_set_for_tests(&p, &probe).unwrap()).unwrap();
    ds["status"] = json!({"desiredNumberScheduled": 2, "numberReady": 2, "currentNumberScheduled": 2,
        "numberMisscheduled": 0});
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 31007)],
        daemon_sets: vec![serde_json::from_value(ds).unwrap()],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        assert_eq!(body["status"]["agentsReady"], "2/2");
        assert_eq!(condition(&body["status"], "AgentsReady")["status"], "True");
        reply_status(send, &expected, &body);
        let (body, send) = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/shop/services/web?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        assert_eq!(
            body,
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop",
                    "labels": {"service.kubernetes.io/service-proxy-name": "portpolicy"}},
                "spec": {"ports": [{"port": 80, "protocol": "TCP", "nodePort": 31007}],
                    "externalTrafficPolicy": "Local"}})
        );
        reply(
            send,
            &serde_json::to_value(proxied_service("shop", "web")).unwrap(),
        );
        h
    })
    .await;
}

#[tokio::test]
async fn deleted_policy_hands_its_services_back_then_drops_its_finalizer() {
    let mut p = policy(
        json!({"nodePorts": {"range": "31000-31099"}, "agent": {"proxy": true}}),
        None,
    );
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-11-26T11:59:00Z".parse().unwrap(),
    ));
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![proxied_service("shop", "web")],
        ..Default::default()
    });
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/shop/services/web?&force=true&fieldManager=portpolicy-operator",
        )
        .await;
        assert_eq!(
            body,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}})
        );
        reply(
            send,
            &serde_json::to_value(node_port_service("shop", "web", 31005)).unwrap(),
        );
        let (body, send) = expect(&mut h, "PATCH", "/apis/portpolicy.io/v1alpha1/portpolicies/edge?").await;
        assert_eq!(
            body,
            json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "portpolicy.io/cleanup"},
                   {"op": "remove", "path": "/metadata/finalizers/0"}])
        );
        let mut gone = serde_json::to_value(&expected).unwrap();
        gone["metadata"]["finalizers"] = json!([]);
        reply(send, &gone);
        h
    })
    .await;
}

#[tokio::test]
async fn follower_reconciles_nothing_and_writes_nothing() {
    let p = policy(range_spec(), None);
    let (ctx, mut handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 30555)],
        ..Default::default()
    });
    ctx.leadership.set(false);
    handle.allow(10);
    let result = reconcile(Arc::new(p), ctx.clone()).await;
    assert!(result.is_ok(), "{result:?}");
    drop(ctx);
    assert!(handle.next_request().await.is_none(), "a follower sent a request");
}

#[tokio::test]
async fn losing_leadership_cancels_a_reconcile_in_the_middle_and_nothing_more_is_sent() {
    let p = policy(range_spec(), None);
    let (ctx, mut handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![node_port_service("shop", "web", 30555)],
        ..Default::default()
    });
    handle.allow(10);
    let leadership = ctx.leadership.clone();
    let running = tokio::spawn(reconcile(Arc::new(p), ctx));
    // The status write is sent and the API server does not answer (it froze, say).
    let (_, send) = expect(&mut handle, "PATCH", STATUS_URI).await;
    leadership.set(false);
    let result = tokio::time::timeout(Duration::from_secs(1), running)
        .await
        .expect("the reconcile stops at once")
        .unwrap();
    assert!(matches!(result, Err(super::Error::LostLeadership)), "{result:?}");
    drop(send);
    // The Service write that would have followed never goes out.
    assert!(handle.next_request().await.is_none());
}

#[test]
fn unreadable_policy_names_object_and_field() {
    let object: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "broken", "uid": "u-1", "resourceVersion": "7"},
        "spec": {"nodePorts": {"range": "31000-31099",
            "pinned": [{"namespace": "a", "service": "b", "nodePort": "high"}]}}}))
    .unwrap();
    let unreadable = super::controller::read_policy(&object).unwrap_err();
    assert_eq!(unreadable.problem.object, "PortPolicy/broken");
    assert_eq!(unreadable.problem.field, "spec.nodePorts.pinned[0].nodePort");
    assert!(
        unreadable.problem.message.contains("invalid type"),
        "{}",
        unreadable.problem
    );
    assert_eq!(unreadable.reference.name.as_deref(), Some("broken"));
    assert_eq!(unreadable.reference.uid.as_deref(), Some("u-1"));
    assert_eq!(unreadable.resource_version.as_deref(), Some("7"));

    let fine: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "edge"}, "spec": {"nodePorts": {"range": "31000-31099"}}}))
    .unwrap();
    let policy = super::controller::read_policy(&fine).unwrap();
    assert_eq!(policy.spec.node_ports.unwrap().range, "31000-31099");
}

#[test]
fn api_server_failures_are_told_apart_from_refusals() {
    let status = |code: u16| {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    };
    assert!(matches!(
        super::Error::from(status(503)),
        super::Error::ApiServer(_)
    ));
    assert!(matches!(super::Error::from(status(422)), super::Error::Kube(_)));
    let timeout = kube::Error::Service("request timed out".into());
    let error = super::Error::from(timeout);
    assert_eq!(error.metric_label(), "api_server");
    assert_eq!(error.exit_code(), 1);
    assert_eq!(super::Error::Config("x".into()).exit_code(), 2);
}

#[tokio::test]
async fn nothing_is_handed_back_while_some_policy_cannot_be_read() {
    // `web` carries the operator's fields and no readable policy selects it: normally it would
    // be handed back. The unreadable policy may be the one that governs it.
    let p = policy(
        json!({"serviceSelector": {"matchLabels": {"tier": "other"}}}),
        None,
    );
    let (ctx, handle) = context(Cluster {
        policies: vec![p.clone()],
        services: vec![proxied_service("shop", "web")],
        ..Default::default()
    });
    ctx.unreadable.insert(
        "broken".into(),
        super::context::UnreadablePolicy {
            reference: Default::default(),
            resource_version: Some("1".into()),
            problem: portpolicy_core::problem::Problem::new("PortPolicy/broken", "spec", "bad"),
        },
    );
    let expected = p.clone();
    run(ctx, handle, &p, move |mut h| async move {
        let (body, send) = expect(&mut h, "PATCH", STATUS_URI).await;
        reply_status(send, &expected, &body);
        h
    })
    .await;
}
