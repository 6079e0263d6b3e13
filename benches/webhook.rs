//! One admission review at cluster scale: 10,000 NodePort Services holding ports (with a sticky
//! record each in their policy's status), four policies of 4,000-port ranges over 100
//! namespaces, and a review of one new Service. Compared with what a review would cost if it
//! recomputed the whole cluster (`allocate_node_ports`), and with the p50/p99/max of single
//! reviews measured one by one (criterion reports means; the target is a p99).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::governance::{Labels, NamespaceLabels, PolicySet};
use portpolicy_core::nodeport::{AdmissionLedger, NodePortInput, ServiceReview, allocate_node_ports};
use portpolicy_core::ports::PortRange;
use portpolicy_core::service::ServiceModel;
use serde_json::json;

const NAMESPACES: usize = 100;
const SERVICES: usize = 10_000;
const POLICIES: usize = 4;
const CLUSTER: PortRange = PortRange {
    low: 20000,
    high: 39999,
};

struct Cluster {
    policies: Vec<PortPolicy>,
    services: Vec<Service>,
    namespaces: NamespaceLabels,
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

fn node_port_service(namespace: &str, name: &str, node_port: Option<u16>) -> Service {
    let mut port = json!({"name": "http", "port": 80});
    if let Some(p) = node_port {
        port["nodePort"] = json!(p);
    }
    serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name,
        "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"type": "NodePort", "ports": [port]}}))
    .unwrap()
}

/// Namespace `ns-i` belongs to team `t{i % 4}`; policy `p{t}` governs that team with the
/// range `20000 + 4000 t ..+3999`. Every Service holds a port of its policy's range.
fn cluster() -> Cluster {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            let labels = Labels::from([("team".to_string(), format!("t{}", i % POLICIES))]);
            (format!("ns-{i}"), labels)
        })
        .collect();
    let mut services = Vec::with_capacity(SERVICES);
    let mut records: Vec<Vec<serde_json::Value>> = vec![Vec::new(); POLICIES];
    for i in 0..SERVICES {
        let ns = i % NAMESPACES;
        let team = ns % POLICIES;
        let port = 20000 + 4000 * team as u16 + ((i / NAMESPACES) * 25 + ns / POLICIES) as u16 % 4000;
        let name = format!("svc-{i}");
        records[team].push(
            json!({"namespace": format!("ns-{ns}"), "service": name, "portName": "http",
            "kind": "Service", "nodePort": port}),
        );
        services.push(node_port_service(&format!("ns-{ns}"), &name, Some(port)));
    }
    let policies = (0..POLICIES)
        .map(|t| {
            let low = 20000 + 4000 * t;
            serde_json::from_value(json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                "metadata": {"name": format!("p{t}")},
                "spec": {"namespaceSelector": {"matchLabels": {"team": format!("t{t}")}},
                    "nodePorts": {"range": format!("{low}-{}", low + 3999), "reserved": [format!("{low}-{}", low + 9)]}},
                "status": {"allocations": records[t]}}))
            .unwrap()
        })
        .collect();
    Cluster {
        policies,
        services,
        namespaces,
    }
}

fn ledger(cluster: &Cluster) -> AdmissionLedger {
    let mut ledger = AdmissionLedger::new(CLUSTER, Duration::from_secs(30));
    ledger.set_policies(&cluster.policies, now());
    ledger.set_namespaces(cluster.namespaces.clone());
    for service in &cluster.services {
        ledger.upsert_service(service);
    }
    ledger
}

fn review(ledger: &mut AdmissionLedger, service: &Service) -> usize {
    let answer = ledger.review(
        &ServiceReview {
            service,
            old: None,
            uid: "bench",
            dry_run: false,
        },
        now(),
    );
    // The reservation times out: the next review starts from the same state.
    ledger.expire(now() + chrono::Duration::seconds(31));
    answer.patch.len()
}

/// p50, p99 and max of `count` single reviews, each timed on its own.
fn percentiles(ledger: &mut AdmissionLedger, count: usize) -> (Duration, Duration, Duration) {
    let new: Vec<Service> = (0..count)
        .map(|i| node_port_service(&format!("ns-{}", i % NAMESPACES), &format!("new-{i}"), None))
        .collect();
    let mut times: Vec<Duration> = new
        .iter()
        .map(|service| {
            let start = Instant::now();
            assert_eq!(black_box(review(ledger, service)), 1);
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[count / 2], times[count * 99 / 100], times[count - 1])
}

fn bench(c: &mut Criterion) {
    let cluster = cluster();
    let mut ledger = ledger(&cluster);
    assert_eq!(ledger.services(), SERVICES);
    let (p50, p99, max) = percentiles(&mut ledger, 20_000);
    eprintln!(
        "webhook review at {SERVICES} Services, 20,000 single reviews: p50 {p50:?}, p99 {p99:?}, max {max:?}"
    );

    let new = node_port_service("ns-5", "new-service", None);
    c.bench_function("webhook/review one new Service (10k Services)", |b| {
        b.iter(|| review(&mut ledger, black_box(&new)))
    });
    c.bench_function("webhook/watch event: upsert one Service (10k Services)", |b| {
        let changed = node_port_service("ns-5", "svc-5", Some(21999));
        let back = cluster.services[5].clone();
        b.iter(|| {
            ledger.upsert_service(black_box(&changed));
            ledger.upsert_service(black_box(&back));
        })
    });
    c.bench_function(
        "webhook/policy event: reload policies and records (10k records)",
        |b| b.iter(|| ledger.set_policies(black_box(&cluster.policies), now())),
    );
    c.bench_function("webhook/build the ledger from the caches (10k Services)", |b| {
        b.iter(|| black_box(self::ledger(&cluster)).services())
    });
    // What a review would cost if it recomputed the cluster instead.
    let set = PolicySet::compile(&cluster.policies);
    let records: BTreeMap<String, Vec<_>> = cluster
        .policies
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                p.status.clone().unwrap().allocations,
            )
        })
        .collect();
    let mut with_new = cluster.services.clone();
    with_new.push(new.clone());
    c.bench_function("webhook/whole-cluster recompute instead (10k Services)", |b| {
        b.iter(|| {
            let models: Vec<ServiceModel<'_>> = with_new.iter().map(ServiceModel::read).collect();
            allocate_node_ports(&NodePortInput {
                cluster_range: CLUSTER,
                policies: &set,
                records: &records,
                services: &models,
                namespace_labels: &cluster.namespaces,
                now: now(),
            })
            .service_changes()
            .len()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
