//! What one endpoint change costs the agent, against a full resync, on a large node; and what
//! the agent keeps in memory.
//!
//! ClusterIP Services with 5 endpoints each (10,000 and 100,000 Services: 50,000 and 500,000
//! endpoints), programmed into the in-memory fake kernel. `incremental_one_endpoint_change`
//! feeds one changed EndpointSlice and syncs (the planner's delta only: IPVS operations,
//! addresses, nftables set elements); `full_resync_nothing_changed` compares the whole table
//! against a dump and rewrites the nftables table, as the periodic resync does. Both sizes run
//! in the same criterion run, so their ratios compare like with like.
//!
//! Before the measurements, the agent's memory at 10,000 Services with 10 endpoints each
//! (100,000 endpoints) is measured with a counting allocator and printed: the live heap the
//! syncer keeps (planner, model of the kernel, wanted set elements) after the snapshot it was
//! fed is dropped, without the fake kernel's own table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

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

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK, reset_peak};

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
    // 10.96.0.0/12 holds a million cluster IPs.
    let cluster_ip = Ipv4Addr::from(0x0a60_0000 + i as u32 + 1);
    Service {
        metadata: meta(format!("svc-{i}"), BTreeMap::new()),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_string()),
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

fn slice(i: usize, endpoints: usize, shift: usize) -> EndpointSlice {
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
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                // 10.128.0.0/9, 16 addresses per Service.
                addresses: vec![Ipv4Addr::from(0x0a80_0000 + (i * 16 + e + 1 + shift) as u32).to_string()],
                node_name: Some(format!("node-{}", e % 3)),
                ..Default::default()
            })
            .collect(),
    }
}

fn snapshot(services: usize, endpoints: usize) -> Snapshot {
    Snapshot {
        services: (0..services).map(service).collect(),
        endpoint_slices: (0..services).map(|i| slice(i, endpoints, 0)).collect(),
        ..Default::default()
    }
}

fn syncer(fake: FakeDataplane) -> Syncer<FakeDataplane> {
    let config = ProxyConfig::new("node-0", ProxyMode::Replacement);
    Syncer::new(fake, config, MasqueradeOptions::default(), Metrics::new())
}

fn programmed(services: usize) -> Syncer<FakeDataplane> {
    let mut syncer = syncer(FakeDataplane::new(FakeKernel::default()));
    syncer.observe(Change::Snapshot(Box::new(snapshot(services, ENDPOINTS))));
    assert!(syncer.sync().succeeded());
    syncer
}

/// The agent's live heap at 10,000 Services and 100,000 endpoints, printed.
fn memory() {
    const SERVICES: usize = 10_000;
    // Counted from before the input is built: the syncer drops the snapshot once it has read
    // it, and a count started after it was built would subtract it from what the syncer keeps.
    let before = LIVE.load(Ordering::Relaxed);
    reset_peak();
    let input = snapshot(SERVICES, 10);
    let fake = FakeDataplane::new(FakeKernel::default());
    let mut agent = syncer(fake.clone());
    agent.observe(Change::Snapshot(Box::new(input)));
    assert!(agent.sync().succeeded());
    let peak = PEAK.load(Ordering::Relaxed);
    // What the watches keep besides the syncer: each object's namespace and name, to find
    // deletions missed while a watch was down (agent::source); no object is cached.
    let known: [BTreeSet<(String, String)>; 2] = [
        (0..SERVICES)
            .map(|i| ("bench".into(), format!("svc-{i}")))
            .collect(),
        (0..SERVICES)
            .map(|i| ("bench".into(), format!("svc-{i}-1")))
            .collect(),
    ];
    let with_kernel = LIVE.load(Ordering::Relaxed);
    *fake.state() = FakeKernel::default();
    let kept = LIVE.load(Ordering::Relaxed) - before;
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "agent memory, {SERVICES} Services, {} endpoints: {:.1} MiB kept ({} B per endpoint), \
         {:.1} MiB peak while loading (the snapshot's objects included), fake kernel table {:.1} MiB",
        SERVICES * 10,
        mib(kept),
        kept / (SERVICES * 10),
        mib(peak - before),
        mib(with_kernel - before - kept),
    );
    drop((agent, known));
}

fn bench(c: &mut Criterion) {
    memory();
    for (group, services) in [
        ("agent_sync_10k_services", 10_000),
        ("agent_sync_100k_services", 100_000),
    ] {
        let mut group = c.benchmark_group(group);
        group.sample_size(10);

        let mut syncer = programmed(services);
        let changed = services * 42 / 100;
        let mut flip = 0;
        group.bench_function("incremental_one_endpoint_change", |b| {
            b.iter(|| {
                flip = 1 - flip;
                syncer.observe(Change::Slice(Box::new(slice(changed, ENDPOINTS, flip))));
                let outcome = syncer.sync();
                assert!(outcome.succeeded() && !outcome.full && outcome.operations >= 1);
                outcome.operations
            })
        });
        drop(syncer);

        let mut syncer = programmed(services);
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
