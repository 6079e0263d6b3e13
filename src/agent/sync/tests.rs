use portpolicy_core::ipvs::table::test_keys::{rs_key as rs, vs_key as vs};
use std::net::IpAddr;

use pretty_assertions::assert_eq;

use super::*;
use crate::agent::dataplane::DataplaneError;
use crate::agent::fake::{FakeDataplane, FakeKernel};
use portpolicy_core::ipvs::node_rules;
use portpolicy_core::ipvs::{IpvsOp, StaleFlows};
use portpolicy_core::snapshot::parse_str;

const NODE: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses: [{type: InternalIP, address: 192.168.1.10}]
";

/// A TCP NodePort Service (three endpoints, two on node-a) and a UDP ClusterIP Service, both
/// handed to portpolicy, plus one Service left to kube-proxy.
fn cluster(web_endpoints: &[(&str, &str)]) -> Snapshot {
    let endpoints: String = web_endpoints
        .iter()
        .map(|(ip, node)| {
            format!("  - {{addresses: [{ip}], nodeName: {node}, conditions: {{ready: true}}}}\n")
        })
        .collect();
    let text = format!(
        "{NODE}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {{service.kubernetes.io/service-proxy-name: portpolicy}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}
---
apiVersion: v1
kind: Service
metadata:
  name: dns
  namespace: kube-system
  labels: {{service.kubernetes.io/service-proxy-name: portpolicy}}
spec:
  clusterIP: 10.96.0.53
  ports: [{{name: dns, port: 53, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: kube-system
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}]
endpoints:
  - {{addresses: [10.0.1.3], nodeName: node-a}}
  - {{addresses: [10.0.2.3], nodeName: node-b}}
---
apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: shop}}
spec:
  clusterIP: 10.96.0.99
  ports: [{{port: 80}}]
"
    );
    let loaded = parse_str("cluster.yaml", &text);
    assert_eq!(loaded.problems, vec![]);
    loaded.snapshot
}

const WEB: [(&str, &str); 3] = [
    ("10.0.1.2", "node-a"),
    ("10.0.1.4", "node-a"),
    ("10.0.2.2", "node-b"),
];

fn config() -> ProxyConfig {
    ProxyConfig::new("node-a", ProxyMode::Delegated)
}

fn web_cluster_ip() -> VirtualServerKey {
    vs("10.96.0.10", 80, Protocol::Tcp)
}

/// kube-proxy's virtual server on an address the agent does not own.
fn foreign_entry() -> (VirtualServerKey, portpolicy_core::ipvs::IpvsService) {
    (
        vs("10.96.0.1", 443, Protocol::Tcp),
        portpolicy_core::ipvs::IpvsService {
            scheduler: "rr".into(),
            persistence_timeout: None,
            real_servers: [(
                rs("192.168.1.1", 6443),
                portpolicy_core::ipvs::RealServerState::with_weight(1),
            )]
            .into(),
        },
    )
}

fn syncer(kernel: FakeKernel) -> (Syncer<FakeDataplane>, FakeDataplane, Metrics) {
    let fake = FakeDataplane::new(kernel);
    let metrics = Metrics::new();
    let mut s = Syncer::new(
        fake.clone(),
        config(),
        MasqueradeOptions::default(),
        metrics.clone(),
    );
    s.observe(Change::Snapshot(Box::new(cluster(&WEB))));
    (s, fake, metrics)
}

fn ops_counted(metrics: &Metrics) -> u64 {
    [
        "add_service",
        "update_service",
        "delete_service",
        "add_real_server",
        "update_real_server",
        "delete_real_server",
    ]
    .iter()
    .map(|k| metrics.ipvs_operations.with_label_values(&[k]).get())
    .sum()
}

#[test]
fn first_sync_programs_the_plan_and_the_node() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    let outcome = s.sync();
    assert!(outcome.succeeded(), "{:?}", outcome.errors);
    assert!(outcome.full);
    let want = node_rules(&cluster(&WEB), &config());
    let k = fake.state();
    assert_eq!(k.table, want.table());
    // Cluster IP and node port for web, cluster IP for dns; never the kube-proxy Service.
    assert_eq!(k.table.len(), 3);
    assert!(!k.table.contains_key(&vs("10.96.0.99", 80, Protocol::Tcp)));
    let vips: BTreeSet<IpAddr> = ["10.96.0.10".parse().unwrap(), "10.96.0.53".parse().unwrap()].into();
    assert_eq!(k.addresses, vips);
    assert_eq!(k.reserved_ports, BTreeSet::from([30080]));
    assert!(k.sysctls_set);
    let ruleset = k.ruleset.as_ref().unwrap();
    assert!(ruleset.contains("192.168.1.10 . tcp . 30080"));
}

#[test]
fn start_up_converges_on_a_programmed_kernel_without_touching_anything() {
    // The kernel already holds exactly the plan (a previous agent run) and a foreign entry.
    let want = node_rules(&cluster(&WEB), &config());
    let mut table = want.table();
    let (foreign_key, foreign) = foreign_entry();
    table.insert(foreign_key, foreign.clone());
    let kernel = FakeKernel {
        table: table.clone(),
        addresses: want.vips.clone(),
        ..Default::default()
    };
    let (mut s, fake, metrics) = syncer(kernel);
    let outcome = s.sync();
    assert!(outcome.succeeded(), "{:?}", outcome.errors);
    assert_eq!(outcome.operations, 0);
    assert_eq!(fake.state().ops_log, vec![]);
    assert_eq!(fake.state().table, table);
    assert_eq!(ops_counted(&metrics), 0);
    // And a second (incremental) sync with nothing changed does nothing either.
    let outcome = s.sync();
    assert!(!outcome.full);
    assert_eq!(outcome.operations, 0);
    assert_eq!(fake.state().dumps, 1);
}

#[test]
fn start_up_repairs_only_what_differs() {
    let want = node_rules(&cluster(&WEB), &config());
    let mut table = want.table();
    // One endpoint missing, one stale endpoint without connections.
    let svc = table.get_mut(&web_cluster_ip()).unwrap();
    svc.real_servers.remove(&rs("10.0.1.2", 8080));
    svc.real_servers.insert(
        rs("10.0.9.9", 8080),
        portpolicy_core::ipvs::RealServerState::with_weight(1),
    );
    let kernel = FakeKernel {
        table,
        addresses: want.vips.clone(),
        ..Default::default()
    };
    let (mut s, fake, _) = syncer(kernel);
    let outcome = s.sync();
    assert!(outcome.succeeded());
    assert_eq!(
        fake.state().ops_log,
        vec![
            IpvsOp::AddRealServer {
                service: web_cluster_ip(),
                real: rs("10.0.1.2", 8080),
                weight: 1
            },
            IpvsOp::DeleteRealServer {
                service: web_cluster_ip(),
                real: rs("10.0.9.9", 8080)
            },
        ]
    );
    assert_eq!(fake.state().table, want.table());
}

#[test]
fn one_endpoint_change_is_one_or_two_operations_without_a_dump() {
    let (mut s, fake, metrics) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    let before = fake.state().ops_log.len();
    let counted_before = ops_counted(&metrics);
    let dumps = fake.state().dumps;

    // A new remote endpoint: added to the cluster IP and to the (Cluster policy) node port.
    let more = [WEB[0], WEB[1], WEB[2], ("10.0.3.2", "node-c")];
    s.observe(Change::Snapshot(Box::new(cluster(&more))));
    let outcome = s.sync();
    assert!(outcome.succeeded());
    assert!(!outcome.full);
    let new_ops = fake.state().ops_log[before..].to_vec();
    assert_eq!(new_ops.len(), 2, "{new_ops:?}");
    assert!(
        new_ops
            .iter()
            .all(|op| matches!(op, IpvsOp::AddRealServer { real, .. } if *real == rs("10.0.3.2", 8080)))
    );
    assert_eq!(ops_counted(&metrics) - counted_before, 2);
    assert_eq!(fake.state().dumps, dumps);
    assert_eq!(fake.state().table, node_rules(&cluster(&more), &config()).table());
}

#[test]
fn drift_made_by_others_is_repaired_by_the_full_sync() {
    let (mut s, fake, metrics) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    // A resync of an untouched kernel finds no drift (connection counters do not count).
    fake.state()
        .set_connections(&web_cluster_ip(), &rs("10.0.1.2", 8080), 5);
    s.request_full();
    assert!(s.sync().succeeded());
    assert_eq!(metrics.resync_drift.get(), 0);
    fake.state()
        .set_connections(&web_cluster_ip(), &rs("10.0.1.2", 8080), 0);
    // Someone deletes a real server behind the agent's back and adds a service on its VIP.
    {
        let mut k = fake.state();
        k.table
            .get_mut(&web_cluster_ip())
            .unwrap()
            .real_servers
            .remove(&rs("10.0.2.2", 8080));
        k.table
            .insert(vs("10.96.0.10", 8443, Protocol::Tcp), foreign_entry().1);
    }
    // An incremental sync with nothing new does not look at the kernel.
    assert_eq!(s.sync().operations, 0);
    s.request_full();
    let outcome = s.sync();
    assert!(outcome.full && outcome.succeeded());
    assert_eq!(outcome.operations, 2);
    assert_eq!(fake.state().table, node_rules(&cluster(&WEB), &config()).table());
    // Two virtual servers had drifted: the one missing a real server and the added one.
    assert_eq!(metrics.resync_drift.get(), 2);
    s.request_full();
    assert!(s.sync().succeeded());
    assert_eq!(
        metrics.resync_drift.get(),
        2,
        "repaired drift is not counted again"
    );
}

#[test]
fn start_up_differences_are_not_drift() {
    // A kernel left by an earlier run with something else on its VIP: repaired, not drift,
    // as the agent has programmed nothing yet.
    let want = node_rules(&cluster(&WEB), &config());
    let mut table = want.table();
    table.insert(vs("10.96.0.10", 8443, Protocol::Tcp), foreign_entry().1);
    let kernel = FakeKernel {
        table,
        addresses: want.vips.clone(),
        ..Default::default()
    };
    let (mut s, _fake, metrics) = syncer(kernel);
    assert!(s.sync().succeeded());
    assert_eq!(metrics.resync_drift.get(), 0);
}

#[test]
fn tcp_real_servers_drain_before_deletion_and_udp_ones_go_at_once() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    let start = fake.state().ops_log.len();
    // 10.0.2.2 (remote) leaves web; the dns Service loses its remote endpoint too.
    let fewer = [WEB[0], WEB[1]];
    let mut snapshot = cluster(&fewer);
    snapshot.endpoint_slices[1]
        .endpoints
        .retain(|e| e.addresses[0] != "10.0.2.3");
    s.observe(Change::Snapshot(Box::new(snapshot.clone())));
    let outcome = s.sync();
    assert!(outcome.succeeded());
    let node_port = vs("192.168.1.10", 30080, Protocol::Tcp);
    let dns = vs("10.96.0.53", 53, Protocol::Udp);
    let leaving = rs("10.0.2.2", 8080);
    assert_eq!(
        fake.state().ops_log[start..].to_vec(),
        vec![
            IpvsOp::UpdateRealServer {
                service: web_cluster_ip(),
                real: leaving,
                weight: 0
            },
            IpvsOp::DeleteRealServer {
                service: dns,
                real: rs("10.0.2.3", 5353)
            },
            IpvsOp::UpdateRealServer {
                service: node_port,
                real: leaving,
                weight: 0
            },
        ]
    );
    assert_eq!(s.draining(), &BTreeSet::from([web_cluster_ip(), node_port]));

    // Connections still open on the cluster IP: the full sync keeps it at weight 0 there and
    // deletes the drained one on the node port.
    fake.state().set_connections(&web_cluster_ip(), &leaving, 3);
    s.request_full();
    let outcome = s.sync();
    assert!(outcome.succeeded());
    assert_eq!(
        fake.state().ops_log.last(),
        Some(&IpvsOp::DeleteRealServer {
            service: node_port,
            real: leaving
        })
    );
    assert_eq!(
        fake.state().table[&web_cluster_ip()].real_servers[&leaving].weight,
        0
    );
    assert_eq!(s.draining(), &BTreeSet::from([web_cluster_ip()]));

    fake.state().set_connections(&web_cluster_ip(), &leaving, 0);
    s.request_full();
    assert!(s.sync().succeeded());
    assert_eq!(fake.state().table, node_rules(&snapshot, &config()).table());
    assert!(s.draining().is_empty());
}

#[test]
fn a_removed_udp_real_server_has_its_flows_cleared_after_it_is_deleted() {
    let (mut s, fake, metrics) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    // The first sync filled an empty UDP virtual server: flows from before are cleared once.
    let dns = vs("10.96.0.53", 53, Protocol::Udp);
    let every_flow = StaleFlows {
        service: dns,
        real: None,
    };
    assert_eq!(fake.state().cleared_flows, vec![vec![every_flow]]);

    let mut snapshot = cluster(&[WEB[0], WEB[1]]);
    snapshot.endpoint_slices[1]
        .endpoints
        .retain(|e| e.addresses[0] != "10.0.2.3");
    s.observe(Change::Snapshot(Box::new(snapshot)));
    fake.state().fail_clearing_flows = true;
    let outcome = s.sync();
    // IPVS is as planned: the sync succeeded, the failure is a warning and is retried.
    assert!(outcome.succeeded(), "{:?}", outcome.errors);
    assert_eq!(outcome.warnings.len(), 1, "{:?}", outcome.warnings);
    assert_eq!(metrics.conntrack_errors.get(), 1);
    assert!(
        !fake.state().table[&dns]
            .real_servers
            .contains_key(&rs("10.0.2.3", 5353))
    );

    fake.state().fail_clearing_flows = false;
    let outcome = s.sync();
    assert!(outcome.warnings.is_empty());
    let removed = StaleFlows {
        service: dns,
        real: Some(rs("10.0.2.3", 5353)),
    };
    // Only the UDP real server's flows: the TCP one drains instead.
    assert_eq!(fake.state().cleared_flows.last(), Some(&vec![removed]));
    assert_eq!(metrics.conntrack_entries_deleted.get(), 2);
    // Nothing more to clear on the next sync.
    let batches = fake.state().cleared_flows.len();
    assert!(s.sync().succeeded());
    assert_eq!(fake.state().cleared_flows.len(), batches);
}

#[test]
fn refused_operations_are_counted_retried_and_lose_nothing() {
    let (mut s, fake, metrics) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    let programmed = fake.state().table.clone();

    fake.state().fail_next_ops = 1;
    let more = [WEB[0], WEB[1], WEB[2], ("10.0.3.2", "node-c")];
    s.observe(Change::Snapshot(Box::new(cluster(&more))));
    let outcome = s.sync();
    assert!(!outcome.succeeded());
    assert_eq!((outcome.operations, outcome.failed_operations), (2, 1));
    // The kernel's answer is kept as it came, errno and all.
    assert!(
        matches!(
            &outcome.errors[..],
            [SyncError::Refused(NetlinkError::Kernel { errno, name: "EIO", .. })]
                if *errno == portpolicy_netlink::errno::EIO
        ),
        "{:?}",
        outcome.errors
    );
    assert_eq!(metrics.sync_errors.get(), 1);
    assert_eq!(
        metrics
            .ipvs_operation_errors
            .with_label_values(&["add_real_server"])
            .get(),
        1
    );
    assert_eq!(metrics.kernel_errors.with_label_values(&["EIO"]).get(), 1);
    // Nothing that was programmed went away.
    for (key, svc) in &programmed {
        for real in svc.real_servers.keys() {
            assert!(fake.state().table[key].real_servers.contains_key(real));
        }
    }
    assert!(s.needs_full());

    // The retry compares against a dump and completes the change.
    let outcome = s.sync();
    assert!(outcome.full && outcome.succeeded(), "{:?}", outcome.errors);
    assert_eq!(outcome.operations, 1);
    assert_eq!(fake.state().table, node_rules(&cluster(&more), &config()).table());
    assert_eq!(metrics.sync_errors.get(), 1);
}

#[test]
fn a_failed_dump_changes_nothing_and_is_retried() {
    let (mut s, fake, metrics) = syncer(FakeKernel {
        fail_dump: true,
        ..Default::default()
    });
    let outcome = s.sync();
    assert!(!outcome.succeeded());
    assert!(
        matches!(
            &outcome.errors[..],
            [SyncError::Dataplane(DataplaneError::Dump(NetlinkError::Io(_)))]
        ),
        "{:?}",
        outcome.errors
    );
    assert_eq!(fake.state().ops_log, vec![]);
    assert_eq!(fake.state().ruleset_writes, 0);
    assert_eq!(metrics.sync_errors.get(), 1);
    fake.state().fail_dump = false;
    let outcome = s.sync();
    assert!(outcome.full && outcome.succeeded());
    assert_eq!(fake.state().table.len(), 3);
}

#[test]
fn a_deleted_service_is_removed_and_its_address_unbound() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    s.observe(Change::ServiceDeleted {
        namespace: "kube-system".into(),
        name: "dns".into(),
    });
    let outcome = s.sync();
    assert!(outcome.succeeded());
    assert_eq!(
        fake.state().ops_log.last(),
        Some(&IpvsOp::DeleteService {
            key: vs("10.96.0.53", 53, Protocol::Udp)
        })
    );
    assert_eq!(
        fake.state().addresses,
        BTreeSet::from(["10.96.0.10".parse::<IpAddr>().unwrap()])
    );
}

#[test]
fn after_a_restart_the_agent_still_deletes_node_ports_in_its_policy_ranges() {
    // A node port programmed by a previous run, for a Service deleted while the agent was down.
    let stale = vs("192.168.1.10", 30999, Protocol::Tcp);
    let want = node_rules(&cluster(&WEB), &config());
    let mut table = want.table();
    table.insert(stale, foreign_entry().1);
    // kube-proxy's node port, outside the policy's range.
    table.insert(vs("192.168.1.10", 31500, Protocol::Tcp), foreign_entry().1);
    let kernel = FakeKernel {
        table,
        addresses: want.vips.clone(),
        ..Default::default()
    };
    let policy = "
apiVersion: portpolicy.io/v1alpha1
kind: PortPolicy
metadata: {name: shop}
spec:
  nodePorts: {range: 30000-30999}
  agent: {proxy: true}
";
    let mut snapshot = cluster(&WEB);
    let loaded = parse_str("policy.yaml", policy);
    assert_eq!(loaded.problems, vec![]);
    snapshot.policies = loaded.snapshot.policies;
    let fake = FakeDataplane::new(kernel);
    let mut s = Syncer::new(
        fake.clone(),
        config(),
        MasqueradeOptions::default(),
        Metrics::new(),
    );
    s.observe(Change::Snapshot(Box::new(snapshot)));
    assert!(s.sync().succeeded());
    assert_eq!(fake.state().ops_log, vec![IpvsOp::DeleteService { key: stale }]);
}
