//! What one endpoint change costs the agent, against a full resync, on a large node.
//!
//! 10,000 ClusterIP Services with 5 endpoints each, programmed into the in-memory fake kernel.
//! `incremental` feeds one changed EndpointSlice and syncs (the planner's dirty keys only);
//! `full` compares the whole table against a dump, as the periodic resync does.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portpolicy::agent::fake::{FakeDataplane, FakeKernel};
use portpolicy::agent::metrics::Metrics;
use portpolicy::agent::nft::MasqueradeOptions;
use portpolicy::agent::sync::{Change, Syncer};
use portpolicy_core::ipvs::{ProxyConfig, ProxyMode};
use portpolicy_core::snapshot::Snapshot;

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 5;

fn meta(name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some("bench".into()),
        labels: Some(labels),
        ..Default::default()
    }
}

fn service(i: usize) -> Service {
    Service {
        metadata: meta(format!("svc-{i}"), BTreeMap::new()),
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, shift: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            format!("svc-{i}-1"),
            BTreeMap::from([("kubernetes.io/service-name".to_string(), format!("svc-{i}"))]),
        ),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
        endpoints: (0..ENDPOINTS)
            .map(|e| Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 1 + i / 250, i % 250, e + 1 + shift)],
                node_name: Some(format!("node-{}", e % 3)),
                ..Default::default()
            })
            .collect(),
    }
}

fn programmed() -> Syncer<FakeDataplane> {
    let snapshot = Snapshot {
        services: (0..SERVICES).map(service).collect(),
        endpoint_slices: (0..SERVICES).map(|i| slice(i, 0)).collect(),
        ..Default::default()
    };
    let config = ProxyConfig::new("node-0", ProxyMode::Replacement);
    let mut syncer = Syncer::new(
        FakeDataplane::new(FakeKernel::default()),
        config,
        MasqueradeOptions::default(),
        Metrics::new(),
    );
    syncer.observe(Change::Snapshot(Box::new(snapshot)));
    assert!(syncer.sync().succeeded());
    syncer
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("agent_sync_10k_services");
    group.sample_size(10);

    let mut syncer = programmed();
    let mut flip = 0;
    group.bench_function("incremental_one_endpoint_change", |b| {
        b.iter(|| {
            flip = 1 - flip;
            syncer.observe(Change::Slice(Box::new(slice(4242, flip))));
            let outcome = syncer.sync();
            assert!(outcome.succeeded() && !outcome.full && outcome.operations >= 1);
            outcome.operations
        })
    });

    let mut syncer = programmed();
    group.bench_function("full_resync_nothing_changed", |b| {
        b.iter(|| {
            syncer.request_full();
            let outcome = syncer.sync();
            assert!(outcome.succeeded() && outcome.operations == 0);
            outcome.operations
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
