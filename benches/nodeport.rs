//! nodePort allocation at cluster scale: 10,000 Services, a few thousand of them already holding
//! nodePorts, and the allocator filling the rest of the default range for the governed ones.

use std::collections::BTreeMap;
use std::hint::black_box;

use chrono::DateTime;
use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use portpolicy_core::crd::{AllocationRecord, PortPolicy};
use portpolicy_core::governance::{Labels, NamespaceLabels, PolicySet};
use portpolicy_core::nodeport::{NodePortInput, PortBitmap, allocate_node_ports};
use portpolicy_core::ports::PortRange;
use portpolicy_core::service::ServiceModel;
use serde_json::json;

const NAMESPACES: usize = 100;
const SERVICES: usize = 10_000;

struct Cluster {
    policies: PolicySet,
    services: Vec<Service>,
    namespaces: NamespaceLabels,
    records: BTreeMap<String, Vec<AllocationRecord>>,
}

/// Even namespaces belong to team edge (governed), odd ones to nobody. Every 4th Service is
/// NodePort or LoadBalancer (every 64th with Local traffic, so it needs a health-check port too); most of those already hold ports (as they would after years of
/// random allocation by the API server); the governed ones created since hold none.
fn cluster() -> Cluster {
    let policy: PortPolicy = serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": "edge"},
        "spec": {
            "namespaceSelector": {"matchLabels": {"team": "edge"}},
            "nodePorts": {"range": "30000-32767", "reserved": ["30000-30009"], "pinned": [
                {"namespace": "ns-0", "service": "svc-3", "nodePort": 30020},
            ]},
        },
    }))
    .unwrap();
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            let mut labels = Labels::from([("kubernetes.io/metadata.name".to_string(), format!("ns-{i}"))]);
            if i % 2 == 0 {
                labels.insert("team".into(), "edge".into());
            }
            (format!("ns-{i}"), labels)
        })
        .collect();

    // Ports already held walk the range with a stride coprime to its size, like scattered
    // random picks, without repeating.
    let range = PortRange::DEFAULT_NODE_PORTS;
    let mut next_held = 0usize;
    let mut held_port = || {
        next_held += 1;
        range.low + ((next_held * 1013) % range.len()) as u16
    };
    let mut services = Vec::with_capacity(SERVICES);
    let mut without_ports = 0;
    for i in 0..SERVICES {
        let namespace_index = (i / 4) % NAMESPACES;
        let namespace = format!("ns-{namespace_index}");
        let governed = namespace_index.is_multiple_of(2);
        let exposed = i % 4 == 3;
        // 2,500 exposed Services, one in 24 with two ports, one in 16 a Local LoadBalancer with a
        // health-check port: about 2,760 nodePorts for a range of 2,768, 10 of them reserved.
        let two_ports = i % 96 == 95;
        let mut ports = vec![json!({"name": "http", "port": 80, "targetPort": 8080})];
        if two_ports {
            ports.push(json!({"name": "https", "port": 443, "targetPort": 8443}));
        }
        let spec = if !exposed {
            json!({"type": "ClusterIP", "ports": ports})
        } else {
            // Governed Services created lately (among the last 1,000 exposed ones) wait for ports.
            let waiting = governed && i >= SERVICES - 4 * 1_000;
            if waiting {
                without_ports += ports.len();
            } else {
                for port in &mut ports {
                    port["nodePort"] = json!(held_port());
                }
            }
            if i % 64 == 63 {
                let mut lb =
                    json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": ports});
                if waiting {
                    without_ports += 1;
                } else {
                    lb["healthCheckNodePort"] = json!(held_port());
                }
                lb
            } else {
                json!({"type": "NodePort", "ports": ports})
            }
        };
        let service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": namespace, "name": format!("svc-{i}"),
                "creationTimestamp": format!("2025-01-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60)},
            "spec": spec,
        }))
        .unwrap();
        services.push(service);
    }
    assert!(
        next_held < range.len(),
        "the fixture must not hand out a port twice"
    );
    eprintln!(
        "fixture: {} Services, {} nodePorts already held, {} governed ports waiting, range of {}",
        services.len(),
        next_held,
        without_ports,
        range.len()
    );
    Cluster {
        policies: PolicySet::compile([&policy]),
        services,
        namespaces,
        records: BTreeMap::new(),
    }
}

/// Reading the Services is part of the work: the operator and `plan` start from the objects.
fn plan(cluster: &Cluster) -> portpolicy_core::nodeport::NodePortAllocation {
    let services: Vec<ServiceModel<'_>> = cluster.services.iter().map(ServiceModel::read).collect();
    allocate_node_ports(&NodePortInput {
        cluster_range: PortRange::DEFAULT_NODE_PORTS,
        policies: &cluster.policies,
        records: &cluster.records,
        services: &services,
        namespace_labels: &cluster.namespaces,
        now: DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
    })
}

fn bench(c: &mut Criterion) {
    let mut cluster = cluster();
    let first = plan(&cluster);
    let allocated = first
        .service_changes()
        .iter()
        .map(|c| c.ports.len())
        .sum::<usize>();
    eprintln!(
        "first plan: {allocated} ports allocated, {} problems, status {}",
        first.problems.len(),
        first.policies["edge"].used_display()
    );

    c.bench_function("nodeport/plan 10k services, fill the range", |b| {
        b.iter(|| plan(black_box(&cluster)))
    });

    // The steady state an operator reconciles in: everything written, records in place.
    for change in first.service_changes() {
        let service = cluster
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some(change.name.as_str()))
            .unwrap();
        let ports = service.spec.as_mut().unwrap().ports.as_mut().unwrap();
        for port in &change.ports {
            ports[port.index].node_port = Some(i32::from(port.node_port));
        }
    }
    cluster.records = first
        .policies
        .iter()
        .map(|(name, p)| (name.clone(), p.records.clone()))
        .collect();
    assert!(plan(&cluster).service_changes().is_empty());
    c.bench_function("nodeport/plan 10k services, steady state", |b| {
        b.iter(|| plan(black_box(&cluster)))
    });

    c.bench_function("nodeport/bitmap fill the default range", |b| {
        b.iter(|| {
            let range = PortRange::DEFAULT_NODE_PORTS;
            let mut bitmap = PortBitmap::new(range);
            let mut start = range.low;
            while let Some(port) = bitmap.first_free(range, start) {
                bitmap.set(port);
                start = range.low + ((usize::from(port - range.low) * 7 + 13) % range.len()) as u16;
            }
            black_box(bitmap.count())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
