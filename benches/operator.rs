//! Operator benchmarks.
//!
//! 1. Memory of the pod watch cache: 50,000 realistic Pods (managedFields, env, volumes, status)
//!    stored as full `Pod`s versus as pruned `HostPortPod`s, measured with a counting allocator
//!    (live heap bytes after deserializing and storing them behind `Arc`, as a reflector does).
//! 2. One full reconcile's computation for one policy over 10,000 Services and 50,000 Pods:
//!    allocation, conflict detection, per-policy facts, Service intents and the status.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use portpolicy::operator::core::{Inputs, compute};
use portpolicy::operator::status::build_status;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::hostport::HostPortPod;
use portpolicy_core::ports::PortRange;
use serde_json::{Value, json};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::LIVE;

const PODS: usize = 50_000;
const SERVICES: usize = 10_000;
const NODES: usize = 500;
const NAMESPACES: usize = 100;

/// A Deployment's Pod as the API server returns it. One Pod in 20 has a hostPort (a few collide).
fn pod_json(i: usize) -> Value {
    let ns = format!("team-{}", i % NAMESPACES);
    let app = format!("app-{}", i % 2000);
    let mut ports = vec![json!({"name": "http", "containerPort": 8080, "protocol": "TCP"})];
    if i.is_multiple_of(20) {
        ports.push(json!({"name": "metrics", "containerPort": 9100, "hostPort": 9100 + (i % 7) as i32, "protocol": "TCP"}));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{app}-7d9f8c6b5-{i:05x}"), "namespace": ns,
            "uid": format!("6f1c2d3e-4b5a-6789-abcd-{i:012x}"), "resourceVersion": format!("{}", 100000 + i),
            "creationTimestamp": "2026-11-20T10:00:00Z", "generateName": format!("{app}-7d9f8c6b5-"),
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "team": ns},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-20T09:59:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f8c6b5"),
                "uid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-11-20T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {
                    "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                        "f:ownerReferences": {".": {}, "k:{\"uid\":\"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {},
                        "f:imagePullPolicy": {}, "f:name": {}, "f:ports": {}, "f:resources": {}}},
                        "f:dnsPolicy": {}, "f:restartPolicy": {}, "f:schedulerName": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                 "time": "2026-11-20T10:00:05Z", "fieldsType": "FieldsV1", "fieldsV1": {
                    "f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {},
                        "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % NODES),
            "serviceAccountName": "default", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "app", "image": format!("registry.example.com/{app}:v1.2.{}", i % 10),
                "imagePullPolicy": "IfNotPresent", "ports": ports,
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "DATABASE_URL", "value": "postgres://db.example.svc:5432/app"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 10},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "10.0.0.1", "podIP": format!("10.244.{}.{}", (i / 250) % 256, i % 250),
            "startTime": "2026-11-20T10:00:01Z",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-20T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-20T10:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-20T10:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-20T10:00:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.example.com/{app}:v1.2.{}", i % 10),
                "imageID": "registry.example.com/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "containerID": format!("containerd://{i:064x}"),
                "state": {"running": {"startedAt": "2026-11-20T10:00:04Z"}}}]
        }
    })
}

fn service_json(i: usize) -> Value {
    let ns = format!("team-{}", i % NAMESPACES);
    let node_port_type = !i.is_multiple_of(4);
    let mut spec = json!({
        "type": if node_port_type { "NodePort" } else { "ClusterIP" },
        "clusterIP": format!("10.96.{}.{}", i / 250, i % 250),
        "selector": {"app": format!("app-{}", i % 2000)},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    });
    if node_port_type {
        // Half already hold a port of the cluster range, picked by the API server.
        if i.is_multiple_of(2) {
            spec["ports"][0]["nodePort"] = json!(30000 + (i % 2700) as i32);
        }
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": ns, "uid": format!("uid-svc-{i}"),
            "resourceVersion": format!("{}", 200000 + i), "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": {"app": format!("app-{}", i % 2000), "tier": if i.is_multiple_of(3) { "edge" } else { "internal" }}},
        "spec": spec,
    })
}

fn heap_of<T>(build: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let value = build();
    (value, LIVE.load(Ordering::Relaxed).saturating_sub(before))
}

fn pod_memory() {
    let texts: Vec<String> = (0..PODS).map(|i| pod_json(i).to_string()).collect();
    let (full, full_bytes) = heap_of(|| {
        texts
            .iter()
            .map(|t| Arc::new(serde_json::from_str::<Pod>(t).unwrap()))
            .collect::<Vec<_>>()
    });
    let (pruned, pruned_bytes) = heap_of(|| {
        texts
            .iter()
            .map(|t| Arc::new(serde_json::from_str::<HostPortPod>(t).unwrap()))
            .collect::<Vec<_>>()
    });
    let per_full = full_bytes as f64 / PODS as f64;
    let per_pruned = pruned_bytes as f64 / PODS as f64;
    println!(
        "pod store, {PODS} pods: full Pod {per_full:.0} B/pod ({:.1} MiB), HostPortPod {per_pruned:.0} B/pod \
         ({:.1} MiB), {:.1}x smaller",
        full_bytes as f64 / 1048576.0,
        pruned_bytes as f64 / 1048576.0,
        per_full / per_pruned
    );
    assert!(
        per_pruned < 1024.0,
        "pruned pods average {per_pruned:.0} B, target < 1 KiB"
    );
    assert!(
        per_full / per_pruned >= 5.0,
        "pruning saves only {:.1}x, target >= 5x",
        per_full / per_pruned
    );
    drop((full, pruned));
}

struct World {
    policies: Vec<Arc<PortPolicy>>,
    services: Vec<Arc<Service>>,
    pods: Vec<Arc<HostPortPod>>,
    namespaces: Vec<Arc<Namespace>>,
}

fn world() -> World {
    let policy: PortPolicy = serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "edge", "uid": "uid-edge", "generation": 1, "resourceVersion": "1"},
        "spec": {"serviceSelector": {"matchLabels": {"tier": "edge"}},
            "nodePorts": {"range": "30000-32767"}, "hostPorts": {"allowed": ["9100-9199"]}},
    }))
    .unwrap();
    World {
        policies: vec![Arc::new(policy)],
        services: (0..SERVICES)
            .map(|i| Arc::new(serde_json::from_value(service_json(i)).unwrap()))
            .collect(),
        pods: (0..PODS)
            .map(|i| Arc::new(serde_json::from_value(pod_json(i)).unwrap()))
            .collect(),
        namespaces: (0..NAMESPACES)
            .map(|i| {
                Arc::new(
                    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": format!("team-{i}"), "labels": {"team": format!("team-{i}")}}}))
                    .unwrap(),
                )
            })
            .collect(),
    }
}

fn reconcile_computation(w: &World) -> usize {
    let comp = compute(&Inputs {
        policies: &w.policies,
        services: &w.services,
        pods: &w.pods,
        namespaces: &w.namespaces,
        cluster_range: PortRange::DEFAULT_NODE_PORTS,
        now: "2026-11-26T12:00:00Z".parse().unwrap(),
        in_flight: &[],
    });
    let policy = &w.policies[0];
    let facts = comp.facts(policy, None);
    let intents = comp.intents("edge");
    let status = build_status(
        policy.status.as_ref(),
        &facts,
        &Time(Timestamp::from_second(1).unwrap()),
    );
    intents.len() + status.allocations.len() + status.conflicts.len()
}

fn benches(c: &mut Criterion) {
    pod_memory();
    let w = world();
    let sizes = reconcile_computation(&w);
    println!("one reconcile over {SERVICES} Services and {PODS} Pods: {sizes} intents + records + conflicts");
    let mut group = c.benchmark_group("operator");
    group.sample_size(10);
    group.bench_function("reconcile_10k_services_50k_pods", |b| {
        b.iter(|| black_box(reconcile_computation(&w)))
    });
    group.finish();
}

criterion_group!(operator, benches);
criterion_main!(operator);
