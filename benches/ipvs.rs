//! IPVS planning and diffing at cluster scale.
//!
//! - `plan_node/N`: one node's plan from scratch for N Services with 10 endpoints each (one
//!   EndpointSlice per Service; one Service in 50 is a NodePort). Throughput is per Service, so
//!   linear scaling shows as a flat per-element time.
//! - `read_snapshot/N`: the floor under it: only reading each endpoint's address and node name
//!   once. Its per-Service time steps up as the snapshot outgrows the CPU caches, and so does the
//!   planner's; the ratio of the two is what shows how the planner itself scales.
//! - `plan_node_zone_hints/10000`: the same plan when every endpoint carries a zone hint (three
//!   zones, the node in one): what topology-aware routing adds to `plan_node/10000`.
//! - `one_endpoint_change/10000`: the agent's steady state: one EndpointSlice changes in a
//!   10,000-Service state; re-plan that Service, take the dirty keys, diff them against the
//!   kernel table and apply the ops to it.
//! - `full_diff_unchanged/10000`: what diffing everything would cost instead (no change at all).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use portpolicy_core::ipvs::diff::{Ownership, diff, diff_keys};
use portpolicy_core::ipvs::{ProxyConfig, ProxyMode, RuleTracker, node_rules};
use portpolicy_core::snapshot::Snapshot;
use portpolicy_core::well_known::SERVICE_NAME_LABEL;
use serde_json::json;

const ENDPOINTS_PER_SERVICE: usize = 10;

fn config() -> ProxyConfig {
    ProxyConfig::new("node-0", ProxyMode::Replacement)
}

fn service(i: usize) -> Service {
    // Node ports are unique in the cluster: one Service in 50 (2,000 of 100,000) fits the range.
    let node_port = i.is_multiple_of(50);
    let mut port = json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"});
    if node_port {
        port["nodePort"] = json!(30000 + i / 50);
    }
    let cluster_ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": format!("ns-{}", i % 100), "name": format!("svc-{i}")},
        "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" }, "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip], "ports": [port]},
    }))
    .unwrap()
}

/// Service `i`'s slice; `generation` shifts one endpoint so a new generation is one change.
fn slice(i: usize, generation: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            let n = i * ENDPOINTS_PER_SERVICE + e + if e == 0 { generation * 7919 } else { 0 };
            json!({"addresses": [format!("10.{}.{}.{}", 128 + (n / 65536) % 64, (n / 256) % 256, n % 256)],
                "nodeName": format!("node-{}", n % 20),
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": format!("ns-{}", i % 100), "name": format!("svc-{i}-abcde"),
            "labels": {SERVICE_NAME_LABEL: format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn snapshot(services: usize) -> Snapshot {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-0"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"},
            {"type": "ExternalIP", "address": "203.0.113.10"}]},
    }))
    .unwrap();
    Snapshot {
        nodes: vec![node],
        services: (0..services).map(service).collect(),
        endpoint_slices: (0..services).map(|i| slice(i, 0)).collect(),
        ..Default::default()
    }
}

/// Runs `routine` on snapshots of 1,000, 10,000 and 100,000 Services, with throughput per Service.
fn per_cluster_size<T>(c: &mut Criterion, name: &str, routine: impl Fn(&Snapshot) -> T) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for services in [1_000, 10_000, 100_000] {
        let snap = snapshot(services);
        group.throughput(Throughput::Elements(services as u64));
        group.bench_with_input(BenchmarkId::from_parameter(services), &snap, |b, snap| {
            b.iter(|| black_box(routine(snap)))
        });
    }
    group.finish();
}

fn plan_from_scratch(c: &mut Criterion) {
    per_cluster_size(c, "plan_node", |snap| node_rules(snap, &config()));
}

/// The snapshot with the node in zone-0 and every endpoint hinted for one of three zones.
fn zone_hinted(mut snap: Snapshot) -> Snapshot {
    snap.nodes[0].metadata.labels =
        Some([("topology.kubernetes.io/zone".to_string(), "zone-0".to_string())].into());
    for slice in &mut snap.endpoint_slices {
        for (e, endpoint) in slice.endpoints.iter_mut().enumerate() {
            let zone = format!("zone-{}", e % 3);
            endpoint.zone = Some(zone.clone());
            endpoint.hints = Some(serde_json::from_value(json!({"forZones": [{"name": zone}]})).unwrap());
        }
    }
    snap
}

fn plan_with_zone_hints(c: &mut Criterion) {
    const SERVICES: usize = 10_000;
    let snap = zone_hinted(snapshot(SERVICES));
    let plan = node_rules(&snap, &config());
    assert!(
        plan.virtual_servers.iter().all(|vs| vs.topology.is_some()),
        "hints are used"
    );
    let mut group = c.benchmark_group("plan_node_zone_hints");
    group.sample_size(10);
    group.throughput(Throughput::Elements(SERVICES as u64));
    group.bench_function(BenchmarkId::from_parameter(SERVICES), |b| {
        b.iter(|| black_box(node_rules(&snap, &config())))
    });
    group.finish();
}

/// Reads every field of the snapshot a planner cannot avoid reading, and builds nothing.
fn read_every_endpoint(snap: &Snapshot) -> usize {
    let mut seen = 0;
    for slice in &snap.endpoint_slices {
        for endpoint in &slice.endpoints {
            let address = endpoint.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
            seen +=
                usize::from(address.is_some()) + usize::from(endpoint.node_name.as_deref() == Some("node-0"));
        }
    }
    seen
}

fn read_snapshot(c: &mut Criterion) {
    per_cluster_size(c, "read_snapshot", read_every_endpoint);
}

fn one_endpoint_change(c: &mut Criterion) {
    const SERVICES: usize = 10_000;
    let snap = snapshot(SERVICES);
    let mut tracker = RuleTracker::new(config());
    tracker.load_snapshot(&snap);
    tracker.take_dirty();
    let mut kernel = tracker.desired().clone();
    let ownership = Ownership::everything();
    let changed = 4_321;
    let generations = [slice(changed, 1), slice(changed, 0)];

    let mut group = c.benchmark_group("one_endpoint_change");
    let mut step = 0usize;
    group.bench_function(BenchmarkId::from_parameter(SERVICES), |b| {
        b.iter(|| {
            tracker.upsert_slice(&generations[step % 2]);
            step += 1;
            let dirty = tracker.take_dirty();
            let ops = diff_keys(&kernel, tracker.desired(), &dirty, &ownership);
            for op in &ops {
                op.apply_to(&mut kernel)
                    .expect("the kernel model accepts the diff");
            }
            black_box(ops.len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("full_diff_unchanged");
    group.sample_size(20);
    let desired = tracker.desired().clone();
    group.bench_function(BenchmarkId::from_parameter(SERVICES), |b| {
        b.iter_batched_ref(
            || (),
            |_| black_box(diff(&kernel, &desired, &ownership).len()),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    plan_from_scratch,
    plan_with_zone_hints,
    read_snapshot,
    one_endpoint_change
);
criterion_main!(benches);
