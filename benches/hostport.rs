//! hostPort conflict detection at cluster scale: 50,000 Pods on 5,000 nodes, and what a stored
//! Pod costs in memory compared with a full k8s-openapi Pod.

use std::hint::black_box;
use std::sync::atomic::Ordering;

use criterion::Criterion;
use k8s_openapi::api::core::v1::Pod;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::governance::{Labels, NamespaceLabels, PolicySet};
use portpolicy_core::hostport::{
    ConflictInput, HostPortPod, detect_conflicts, placed_pods, predict_workloads,
};
use portpolicy_core::ports::PortRange;
use portpolicy_core::snapshot::Snapshot;
use serde_json::{Value, json};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::LIVE;

const NODES: usize = 5_000;
const PODS_PER_NODE: usize = 10;
const FULL_POD: &str = include_str!("../crates/core/src/hostport/testdata/full-pod.json");

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn pod_json(namespace: &str, name: &str, node: Option<&str>, phase: &str, spec: Value) -> Value {
    let mut spec = spec;
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("{namespace}-{name}"), "resourceVersion": "1"},
        "spec": spec,
        "status": {"phase": phase},
    })
}

/// A realistic cluster: three host-network node daemons per node (kube-proxy, node-exporter,
/// the CNI agent), an ingress controller with hostPorts on every tenth node, plain application
/// Pods everywhere else (some finished, some still unscheduled), and a few troublemakers: Pods
/// squatting node-exporter's port, and hostPorts inside the nodePort range.
fn cluster_pods() -> Vec<HostPortPod> {
    let mut pods = Vec::with_capacity(NODES * PODS_PER_NODE);
    let mut add = |value: Value| pods.push(serde_json::from_value::<HostPortPod>(value).unwrap());
    for n in 0..NODES {
        let node = node_name(n);
        let node = Some(node.as_str());
        let hostnet = |ports: Value| json!({"hostNetwork": true, "containers": [{"name": "main", "image": "x", "ports": ports}]});
        add(pod_json(
            "kube-system",
            &format!("kube-proxy-{n}"),
            node,
            "Running",
            hostnet(
                json!([{"containerPort": 10249, "hostPort": 10249}, {"containerPort": 10256, "hostPort": 10256}]),
            ),
        ));
        add(pod_json(
            "monitoring",
            &format!("node-exporter-{n}"),
            node,
            "Running",
            hostnet(json!([{"containerPort": 9100, "hostPort": 9100, "name": "metrics"}])),
        ));
        add(pod_json(
            "kube-system",
            &format!("cni-{n}"),
            node,
            "Running",
            hostnet(
                json!([{"containerPort": 9099, "hostPort": 9099}, {"containerPort": 8472, "hostPort": 8472, "protocol": "UDP"}]),
            ),
        ));
        let mut app = 3;
        if n % 10 == 0 {
            add(pod_json(
                "ingress",
                &format!("ingress-{n}"),
                node,
                "Running",
                json!({"containers": [{"name": "nginx", "image": "x",
                "ports": [{"containerPort": 80, "hostPort": 80}, {"containerPort": 443, "hostPort": 443}, {"containerPort": 10254}]}]}),
            ));
            app += 1;
        }
        if n % 250 == 0 {
            add(pod_json(
                "team-7",
                &format!("squatter-{n}"),
                node,
                "Running",
                json!({"containers": [{"name": "c", "image": "x",
                "ports": [{"containerPort": 9100, "hostPort": 9100, "hostIP": "10.1.0.1"}]}]}),
            ));
            app += 1;
        }
        if n % 500 == 0 {
            add(pod_json(
                "team-3",
                &format!("in-range-{n}"),
                node,
                "Running",
                json!({"containers": [{"name": "c", "image": "x",
                "ports": [{"containerPort": 8080, "hostPort": 30080}]}]}),
            ));
            app += 1;
        }
        for a in app..PODS_PER_NODE {
            let namespace = format!("team-{}", (n + a) % 40);
            let (node, phase) = match (n + a) % 97 {
                0 => (None, "Pending"),
                1 => (node, "Succeeded"),
                _ => (node, "Running"),
            };
            add(pod_json(
                &namespace,
                &format!("app-{n}-{a}"),
                node,
                phase,
                json!({"containers": [
                    {"name": "app", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "metrics"}]},
                    {"name": "sidecar", "image": "y"},
                ]}),
            ));
        }
    }
    pods
}

fn policies() -> PolicySet {
    let policy = |name: &str, spec: Value| -> PortPolicy {
        serde_json::from_value(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    };
    PolicySet::compile(&[
        policy(
            "system",
            json!({"namespaceSelector": {"matchLabels": {"tier": "system"}},
            "hostPorts": {"allowed": ["8472", "9099-9100", "10249-10256"]}}),
        ),
        policy(
            "ingress",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}},
            "hostPorts": {"allowed": ["80", "443"]}}),
        ),
        policy(
            "tenants",
            json!({"namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["tenant"]}]},
            "hostPorts": {"allowed": ["9100", "20000-29999"]}}),
        ),
    ])
}

fn namespace_labels() -> NamespaceLabels {
    let mut labels = NamespaceLabels::default();
    let mut add = |name: String, tier: &str| {
        labels.insert(
            &name,
            Some(&Labels::from([("tier".to_string(), tier.to_string())])),
        );
    };
    add("kube-system".into(), "system");
    add("monitoring".into(), "system");
    for t in 0..40 {
        add(format!("team-{t}"), "tenant");
    }
    labels
}

/// Live heap bytes per element of `build()`'s Vec, measured by the counting allocator.
fn live_bytes_per_item<T>(count: usize, build: impl Fn(usize) -> T) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    let items: Vec<T> = (0..count).map(&build).collect();
    let after = LIVE.load(Ordering::Relaxed);
    black_box(&items);
    (after - before) / count
}

fn report_memory() {
    let full: Value = serde_json::from_str(FULL_POD).unwrap();
    // The fixture with every hostPort removed: an ordinary application Pod.
    let mut plain = full.clone();
    for list in ["containers", "initContainers"] {
        for c in plain["spec"][list].as_array_mut().unwrap() {
            for p in c["ports"].as_array_mut().into_iter().flatten() {
                p.as_object_mut().unwrap().remove("hostPort");
            }
        }
    }
    let texts = |base: &Value| -> Vec<String> {
        (0..2_000)
            .map(|i| {
                let mut v = base.clone();
                v["metadata"]["name"] = json!(format!("edge-ingress-7c9f6d5b8d-{i:05}"));
                v["metadata"]["uid"] = json!(format!("5f0c2e8a-3d7b-4f1e-b6a9-{i:012}"));
                v.to_string()
            })
            .collect()
    };
    for (label, base) in [("with hostPorts", &full), ("without hostPorts", &plain)] {
        let texts = texts(base);
        let full_bytes =
            live_bytes_per_item(texts.len(), |i| serde_json::from_str::<Pod>(&texts[i]).unwrap());
        let slim_bytes = live_bytes_per_item(texts.len(), |i| {
            serde_json::from_str::<HostPortPod>(&texts[i]).unwrap()
        });
        let estimate = serde_json::from_str::<HostPortPod>(&texts[0])
            .unwrap()
            .approx_heap_bytes();
        println!(
            "memory per stored Pod ({label}): full k8s-openapi Pod {full_bytes} B, HostPortPod {slim_bytes} B \
             (approx_heap_bytes {estimate} B), {:.1}x smaller",
            full_bytes as f64 / slim_bytes as f64
        );
    }
    let cluster = cluster_pods();
    let total: usize = cluster.iter().map(HostPortPod::approx_heap_bytes).sum();
    println!(
        "benchmark cluster: {} pods, approx_heap_bytes average {} B, total {:.1} MiB",
        cluster.len(),
        total / cluster.len(),
        total as f64 / (1024.0 * 1024.0)
    );
}

fn workloads_snapshot() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for n in 0..NODES {
        let zone = format!("zone-{}", n % 3);
        snapshot.nodes.push(
            serde_json::from_value(json!({"metadata": {"name": node_name(n), "labels": {"topology.kubernetes.io/zone": zone}},
                "spec": if n % 100 == 0 { json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}) } else { json!({}) }}))
            .unwrap(),
        );
    }
    for (i, port) in [9200, 9300, 9400, 9500].iter().enumerate() {
        snapshot.daemon_sets.push(serde_json::from_value(json!({"metadata": {"name": format!("daemon-{i}"), "namespace": "monitoring"},
            "spec": {"selector": {}, "template": {"spec": {"nodeSelector": {"topology.kubernetes.io/zone": format!("zone-{}", i % 3)},
                "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": port, "hostPort": port}]}]}}}})).unwrap());
    }
    for i in 0..20 {
        snapshot.deployments.push(serde_json::from_value(json!({"metadata": {"name": format!("edge-{i}"), "namespace": "ingress"},
            "spec": {"replicas": 300, "selector": {}, "template": {"spec": {
                "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 8443, "hostPort": 8443}]}]}}}})).unwrap());
    }
    snapshot
}

fn benches(c: &mut Criterion) {
    let pods = cluster_pods();
    let (placed, problems) = placed_pods(&pods);
    assert!(problems.is_empty(), "{problems:?}");
    let policies = policies();
    let labels = namespace_labels();
    let input = ConflictInput {
        pods: &placed,
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        policies: &policies,
        namespace_labels: &labels,
    };
    let conflicts = detect_conflicts(&input);
    let count = |reason: &str| conflicts.iter().filter(|c| c.reason.as_str() == reason).count();
    println!(
        "{} pods, {} holding host ports, {} bindings; conflicts: {} PodConflict, {} InNodePortRange, {} NotAllowed",
        pods.len(),
        placed.len(),
        placed.iter().map(|p| p.bindings.len()).sum::<usize>(),
        count("PodConflict"),
        count("InNodePortRange"),
        count("NotAllowed"),
    );
    assert_eq!(count("PodConflict"), NODES / 250);

    let mut group = c.benchmark_group("hostport");
    group.sample_size(20);
    group.bench_function("detect_conflicts 50k pods on 5k nodes", |b| {
        b.iter(|| detect_conflicts(black_box(&input)))
    });
    group.bench_function("placed_pods + detect_conflicts 50k pods", |b| {
        b.iter(|| {
            let (placed, _) = placed_pods(black_box(&pods));
            detect_conflicts(&ConflictInput {
                pods: &placed,
                ..input
            })
            .len()
        })
    });
    let snapshot = workloads_snapshot();
    let (predicted, _) = predict_workloads(&snapshot, &placed);
    println!(
        "prediction: {} nodes, 4 DaemonSets and 20 Deployments of 300 replicas -> {} predicted pods",
        snapshot.nodes.len(),
        predicted.len()
    );
    group.bench_function("predict_workloads 24 workloads on 5k nodes", |b| {
        b.iter(|| {
            predict_workloads(black_box(&snapshot), black_box(&placed))
                .0
                .len()
        })
    });
    let text = FULL_POD.to_string();
    group.bench_function("deserialize full Pod JSON as k8s-openapi Pod", |b| {
        b.iter(|| serde_json::from_str::<Pod>(black_box(&text)).unwrap())
    });
    group.bench_function("deserialize full Pod JSON as HostPortPod", |b| {
        b.iter(|| serde_json::from_str::<HostPortPod>(black_box(&text)).unwrap())
    });
    group.finish();
}

fn main() {
    report_memory();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
}
