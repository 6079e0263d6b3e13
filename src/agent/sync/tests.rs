use portpolicy_core::ipvs::table::test_keys::{rs_key as rs, vs_key as vs};
use std::net::IpAddr;

use pretty_assertions::assert_eq;

use super::*;
use crate::agent::dataplane::DataplaneError;
use crate::agent::fake::{FakeDataplane, FakeKernel, FakeNft};
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

/// node-a's Node with these InternalIPs.
fn node_with(addresses: &[&str]) -> Node {
    let listed: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {"addresses": listed}
    }))
    .unwrap()
}

/// Delegated mode: a node address that goes takes the agent's node-port virtual servers on it
/// along, by the incremental sync and by the full resync, and leaves kube-proxy's on it alone.
#[test]
fn node_ports_on_a_node_address_that_is_gone_are_deleted() {
    let gone = vs("192.168.1.11", 30080, Protocol::Tcp);
    let kept = vs("192.168.1.10", 30080, Protocol::Tcp);
    // kube-proxy's node port on the same address: never the agent's.
    let foreign = vs("192.168.1.11", 31500, Protocol::Tcp);
    // An agent that programmed its node ports on both addresses, kube-proxy's beside them.
    let programmed_on_both = || {
        let mut kernel = FakeKernel::default();
        kernel.table.insert(foreign, foreign_entry().1);
        let (mut s, fake, _) = syncer(kernel);
        s.observe(Change::Node(Box::new(node_with(&[
            "192.168.1.10",
            "192.168.1.11",
        ]))));
        assert!(s.sync().succeeded());
        assert!(
            fake.state().table.contains_key(&gone),
            "{:?}",
            fake.state().table.keys()
        );
        (s, fake)
    };
    for full in [false, true] {
        let (mut s, fake) = programmed_on_both();
        s.observe(Change::Node(Box::new(node_with(&["192.168.1.10"]))));
        if full {
            s.request_full();
        }
        let outcome = s.sync();
        assert!(outcome.succeeded() && outcome.full == full, "{outcome:?}");
        let k = fake.state();
        assert!(
            !k.table.contains_key(&gone),
            "full={full}: the stale node port stayed"
        );
        assert!(
            k.table.contains_key(&kept) && k.table.contains_key(&foreign),
            "full={full}"
        );
        assert_eq!(
            k.ops_log.last(),
            Some(&IpvsOp::DeleteService { key: gone }),
            "full={full}"
        );
    }
    // The same when the sync that should delete it fails: the retry (a full sync) does.
    let (mut s, fake) = programmed_on_both();
    s.observe(Change::Node(Box::new(node_with(&["192.168.1.10"]))));
    s.request_full();
    fake.state().fail_dump = true;
    assert!(!s.sync().succeeded());
    fake.state().fail_dump = false;
    assert!(s.sync().succeeded());
    assert!(!fake.state().table.contains_key(&gone));
    assert!(fake.state().table.contains_key(&foreign));
}

/// Delegated mode, after a restart: the Node lost an address while the agent was down, so
/// nothing in the new process says it was ever a node address. A node port of the agent's on
/// it goes all the same, because no interface holds the address any more; what kube-proxy
/// serves (on addresses the node holds, or outside the agent's ports) stays.
#[test]
fn after_a_restart_node_ports_on_an_address_the_node_lost_are_deleted() {
    let gone = vs("192.168.1.11", 30080, Protocol::Tcp);
    // kube-proxy's: its node port on the lost address, and a cluster IP it binds on
    // kube-ipvs0 that happens to use the same port number.
    let foreign_node_port = vs("192.168.1.11", 31500, Protocol::Tcp);
    let foreign_vip = vs("10.96.7.7", 30080, Protocol::Tcp);
    let left_by_the_last_run = |held: &[&str]| {
        let mut kernel = FakeKernel::default();
        for key in [gone, foreign_node_port, foreign_vip] {
            kernel.table.insert(key, foreign_entry().1);
        }
        kernel.host_addresses = held.iter().map(|a| a.parse().unwrap()).collect();
        kernel
    };
    let (mut s, fake, _) = syncer(left_by_the_last_run(&["192.168.1.10", "10.96.7.7"]));
    assert!(s.sync().succeeded());
    let k = fake.state();
    assert!(
        !k.table.contains_key(&gone),
        "the lost address's node port stayed"
    );
    assert!(k.table.contains_key(&foreign_node_port) && k.table.contains_key(&foreign_vip));
    assert!(k.ops_log.contains(&IpvsOp::DeleteService { key: gone }));
    drop(k);

    // While an interface still holds the address, it may be anyone's: it stays.
    let (mut s, fake, _) = syncer(left_by_the_last_run(&[
        "192.168.1.10",
        "192.168.1.11",
        "10.96.7.7",
    ]));
    assert!(s.sync().succeeded());
    let k = fake.state();
    assert!(k.table.contains_key(&gone) && k.table.contains_key(&foreign_node_port));
    assert!(k.table.contains_key(&foreign_vip));
}

/// A table kept by a direct one-endpoint change, then the table replaced only on a full sync.
#[test]
fn an_endpoint_change_sends_set_elements_and_never_replaces_the_table() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    assert_eq!(fake.state().table_replacements, 1);
    let more = [
        ("10.0.1.1", "node-a"),
        ("10.0.1.2", "node-a"),
        ("10.0.2.1", "node-b"),
        ("10.0.1.9", "node-a"),
    ];
    s.observe(Change::Snapshot(Box::new(cluster(&more))));
    let outcome = s.sync();
    assert!(outcome.succeeded() && !outcome.full);
    let k = fake.state();
    assert_eq!(k.table_replacements, 1, "an element change replaced the table");
    let batch = k.ruleset.clone().unwrap();
    assert!(batch.contains("\nadd element ip portpolicy hairpin {"), "{batch}");
    assert!(!batch.contains("table"), "{batch}");
    let want = node_rules(&cluster(&more), &config());
    assert_eq!(k.nft, expected_nft(&want, &MasqueradeOptions::default()));
    drop(k);
    // The full resync refills the sets in place.
    s.request_full();
    assert!(s.sync().succeeded());
    let k = fake.state();
    assert_eq!(k.table_replacements, 1);
    assert!(
        k.ruleset
            .as_ref()
            .unwrap()
            .starts_with("flush set ip portpolicy virtual-servers\n")
    );
    assert_eq!(k.nft, expected_nft(&want, &MasqueradeOptions::default()));
}

/// Someone deleted the table: the full resync's refill fails, and the next sync writes it whole.
#[test]
fn a_table_deleted_behind_the_agents_back_is_written_again() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    fake.state().nft = FakeNft::default();
    s.request_full();
    assert!(!s.sync().succeeded());
    assert!(s.sync().succeeded());
    let want = node_rules(&cluster(&WEB), &config());
    let k = fake.state();
    assert_eq!(k.table_replacements, 2, "written whole at start and once more");
    assert_eq!(k.nft, expected_nft(&want, &MasqueradeOptions::default()));
}

#[test]
fn a_refused_element_batch_is_repaired_by_writing_the_whole_table() {
    let (mut s, fake, _) = syncer(FakeKernel::default());
    assert!(s.sync().succeeded());
    let more = [
        ("10.0.1.1", "node-a"),
        ("10.0.1.2", "node-a"),
        ("10.0.2.1", "node-b"),
        ("10.0.1.9", "node-a"),
    ];
    s.observe(Change::Snapshot(Box::new(cluster(&more))));
    fake.state().fail_nft = true;
    assert!(!s.sync().succeeded());
    fake.state().fail_nft = false;
    let outcome = s.sync();
    assert!(outcome.succeeded() && outcome.full);
    let want = node_rules(&cluster(&more), &config());
    assert_eq!(
        fake.state().nft,
        expected_nft(&want, &MasqueradeOptions::default())
    );
}

/// The sets a full ruleset of the plan would hold.
fn expected_nft(plan: &portpolicy_core::ipvs::NodeRules, options: &MasqueradeOptions) -> FakeNft {
    let table = plan.table();
    let text = nft::ruleset(
        plan.virtual_servers.iter().map(|vs| (&vs.key, reach_of(vs))),
        &table,
        options,
        &nft::source_restrictions(plan),
    );
    FakeNft::from_ruleset(&text).unwrap()
}

/// The kernel model (IPVS table, dummy-interface addresses, nftables sets, reserved ports)
/// against the plan of everything the agent was told, through every delta.
mod kernel_model {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use portpolicy_core::well_known::{SERVICE_PROXY_NAME, SERVICE_PROXY_NAME_LABEL};

    const SERVICES: [(&str, &str); 4] = [("a", "s0"), ("a", "s1"), ("b", "s0"), ("b", "s2")];

    #[derive(Clone, Debug)]
    enum Event {
        UpsertService {
            index: usize,
            variant: u8,
        },
        RemoveService {
            index: usize,
        },
        UpsertSlice {
            index: usize,
            service: usize,
            ipv6: bool,
            endpoints: Vec<(u8, bool, bool)>,
        },
        RemoveSlice {
            index: usize,
        },
        SetNode {
            variant: u8,
        },
        /// A re-list: the agent is told the whole cluster as it is now.
        Relist,
        Sync,
        FullSync,
        /// The kernel refuses the next IPVS operation, or the next nft transaction.
        Refuse {
            nft: bool,
        },
    }

    #[derive(Clone, Debug, Default)]
    struct Cluster {
        services: BTreeMap<usize, Service>,
        /// By namespace and name, as the API server (and the agent) tells them apart.
        slices: BTreeMap<(String, String), EndpointSlice>,
        node: Option<Node>,
    }

    fn slice_key(slice: &EndpointSlice) -> (String, String) {
        (
            slice.metadata.namespace.clone().unwrap_or_default(),
            slice.metadata.name.clone().unwrap_or_default(),
        )
    }

    impl Cluster {
        /// The cluster's slice `slice-INDEX`, in whichever namespace it is.
        fn slice_at(&self, index: usize) -> Option<(String, String)> {
            let name = format!("slice-{index}");
            self.slices.keys().find(|(_, n)| *n == name).cloned()
        }

        fn snapshot(&self) -> Snapshot {
            Snapshot {
                nodes: self.node.iter().cloned().collect(),
                services: self.services.values().cloned().collect(),
                endpoint_slices: self.slices.values().cloned().collect(),
                ..Default::default()
            }
        }
    }

    fn service(index: usize, variant: u8, mode: ProxyMode) -> Service {
        let (ns, name) = SERVICES[index];
        let kind = ["ClusterIP", "NodePort", "LoadBalancer"][usize::from(variant % 3)];
        let ipv6 = variant & 32 != 0;
        // Two Services may share a cluster IP and so contest its virtual servers.
        let ip_index = if variant & 16 != 0 { 9 } else { index };
        let cluster_ip = if ipv6 {
            format!("fd00::{ip_index}")
        } else {
            format!("10.96.0.{ip_index}")
        };
        let mut spec = json!({"type": kind, "clusterIP": cluster_ip,
            "ipFamilies": [if ipv6 { "IPv6" } else { "IPv4" }],
            "ports": [{"name": "http", "port": 80, "nodePort": 30000 + index},
                      {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30100 + index}]});
        if kind != "ClusterIP" {
            spec["externalTrafficPolicy"] = json!(if variant & 4 != 0 { "Local" } else { "Cluster" });
        } else {
            for port in spec["ports"].as_array_mut().unwrap() {
                port.as_object_mut().unwrap().remove("nodePort");
            }
        }
        if kind == "LoadBalancer" && variant & 4 != 0 {
            spec["healthCheckNodePort"] = json!(32000 + index);
        }
        // Source ranges come, go and change; one of them holds node-a's address in one of its
        // node variants only, so a node change alone moves the VIP in or out of lb-allowed.
        if kind == "LoadBalancer" && variant & 128 != 0 {
            spec["loadBalancerSourceRanges"] = match (ipv6, variant & 8 != 0) {
                (true, _) => json!(["2001:db8::/32"]),
                (false, true) => json!(["192.168.1.11/32", "203.0.113.0/24"]),
                (false, false) => json!(["203.0.113.0/24"]),
            };
        }
        if variant & 8 != 0 {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        // Whether the Service is handed to portpolicy changes with the variant too.
        let ours = variant & 64 == 0;
        let labels = match (mode, ours) {
            (_, true) => json!({SERVICE_PROXY_NAME_LABEL: SERVICE_PROXY_NAME}),
            (_, false) => json!({SERVICE_PROXY_NAME_LABEL: "other"}),
        };
        let lb = if ipv6 { "fd00:ff::50" } else { "198.51.100.50" };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": lb}]}},
        }))
        .unwrap()
    }

    fn slice(index: usize, service: usize, ipv6: bool, endpoints: &[(u8, bool, bool)]) -> EndpointSlice {
        let (ns, name) = SERVICES[service];
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(host, local, ready)| {
                let address = if ipv6 {
                    format!("fd00:1::{host}")
                } else {
                    format!("10.1.0.{host}")
                };
                json!({"addresses": [address], "nodeName": if *local { "node-a" } else { "node-b" },
                       "conditions": {"ready": ready}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("slice-{index}"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": if ipv6 { "IPv6" } else { "IPv4" },
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn node(variant: u8) -> Node {
        let addresses = match variant % 3 {
            0 => json!([{"type": "InternalIP", "address": "192.168.1.10"}]),
            1 => json!([{"type": "InternalIP", "address": "192.168.1.11"}]),
            _ => {
                json!([{"type": "InternalIP", "address": "192.168.1.12"}, {"type": "ExternalIP", "address": "198.51.100.1"}])
            }
        };
        serde_json::from_value(json!({"metadata": {"name": "node-a"}, "status": {"addresses": addresses}}))
            .unwrap()
    }

    fn event(node_changes: bool) -> impl Strategy<Value = Event> {
        let node_weight = if node_changes { 1 } else { 0 };
        prop_oneof![
            3 => (0..4usize, any::<u8>()).prop_map(|(index, variant)| Event::UpsertService { index, variant }),
            1 => (0..4usize).prop_map(|index| Event::RemoveService { index }),
            4 => (0..5usize, 0..4usize, prop::bool::weighted(0.2), prop::collection::vec((0..6u8, any::<bool>(), prop::bool::weighted(0.8)), 0..4))
                .prop_map(|(index, service, ipv6, endpoints)| Event::UpsertSlice { index, service, ipv6, endpoints }),
            1 => (0..5usize).prop_map(|index| Event::RemoveSlice { index }),
            node_weight => any::<u8>().prop_map(|variant| Event::SetNode { variant }),
            1 => Just(Event::Relist),
            4 => Just(Event::Sync),
            1 => Just(Event::FullSync),
            1 => any::<bool>().prop_map(|nft| Event::Refuse { nft }),
        ]
    }

    /// Asserts the fake kernel holds what the plan of `told` wants. Real servers the plan
    /// dropped may still be draining at weight 0 (TCP), until a full sync, which then deletes
    /// them (the fake kernel has no connections).
    fn holds_the_plan(
        fake: &FakeDataplane,
        told: &Cluster,
        mode: ProxyMode,
        full: bool,
    ) -> Result<(), TestCaseError> {
        let config = ProxyConfig::new("node-a", mode);
        let plan = node_rules(&told.snapshot(), &config);
        let want = plan.table();
        let k = fake.state();
        prop_assert_eq!(
            k.table.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (key, have) in &k.table {
            let wanted = &want[key];
            prop_assert_eq!(&have.scheduler, &wanted.scheduler, "{}", key);
            prop_assert_eq!(have.persistence_timeout, wanted.persistence_timeout, "{}", key);
            for (real, state) in &wanted.real_servers {
                prop_assert_eq!(
                    have.real_servers.get(real).map(|s| s.weight),
                    Some(state.weight),
                    "{} {}",
                    key,
                    real
                );
            }
            for (real, state) in &have.real_servers {
                if !wanted.real_servers.contains_key(real) {
                    prop_assert!(
                        !full && key.protocol == Protocol::Tcp && state.weight == 0,
                        "{} keeps {} at {}",
                        key,
                        real,
                        state.weight
                    );
                }
            }
        }
        prop_assert_eq!(&k.addresses, &plan.vips);
        prop_assert_eq!(&k.reserved_ports, &plan.reserved_node_ports);
        prop_assert_eq!(&k.nft, &expected_nft(&plan, &MasqueradeOptions::default()));
        Ok(())
    }

    fn run(mode: ProxyMode, events: Vec<(Event, bool)>) -> Result<(), TestCaseError> {
        let fake = FakeDataplane::new(FakeKernel::default());
        let config = ProxyConfig::new("node-a", mode);
        let mut syncer = Syncer::new(fake.clone(), config, MasqueradeOptions::default(), Metrics::new());
        let mut cluster = Cluster {
            node: Some(node(0)),
            ..Default::default()
        };
        let mut told = cluster.clone();
        syncer.observe(Change::Snapshot(Box::new(told.snapshot())));
        prop_assert!(syncer.sync().succeeded());
        holds_the_plan(&fake, &told, mode, true)?;
        for (event, missed) in events {
            // A missed event changes the cluster but never reaches the agent, as when a watch
            // drops; the next re-list catches up.
            let mut changes = Vec::new();
            match event {
                Event::UpsertService { index, variant } => {
                    let s = service(index, variant, mode);
                    cluster.services.insert(index, s.clone());
                    changes.push(Change::Service(Box::new(s)));
                }
                Event::RemoveService { index } => {
                    cluster.services.remove(&index);
                    let (namespace, name) = SERVICES[index];
                    changes.push(Change::ServiceDeleted {
                        namespace: namespace.into(),
                        name: name.into(),
                    });
                }
                Event::UpsertSlice {
                    index,
                    service,
                    ipv6,
                    endpoints,
                } => {
                    let s = slice(index, service, ipv6, &endpoints);
                    // A slice moving namespace is a delete and a create, as the API sees it.
                    if let Some(old) = cluster.slice_at(index)
                        && old != slice_key(&s)
                    {
                        cluster.slices.remove(&old);
                        changes.push(Change::SliceDeleted {
                            namespace: old.0,
                            name: old.1,
                        });
                    }
                    cluster.slices.insert(slice_key(&s), s.clone());
                    changes.push(Change::Slice(Box::new(s)));
                }
                Event::RemoveSlice { index } => {
                    if let Some(old) = cluster.slice_at(index) {
                        cluster.slices.remove(&old);
                        changes.push(Change::SliceDeleted {
                            namespace: old.0,
                            name: old.1,
                        });
                    }
                }
                Event::SetNode { variant } => {
                    let n = node(variant);
                    cluster.node = Some(n.clone());
                    changes.push(Change::Node(Box::new(n)));
                }
                Event::Relist => {
                    told = cluster.clone();
                    syncer.observe(Change::Snapshot(Box::new(told.snapshot())));
                }
                Event::Sync | Event::FullSync => {
                    let full = matches!(event, Event::FullSync);
                    if full {
                        syncer.request_full();
                    }
                    let outcome = syncer.sync();
                    // An injected nft refusal lasts one sync.
                    fake.state().fail_nft = false;
                    if outcome.succeeded() {
                        holds_the_plan(&fake, &told, mode, outcome.full)?;
                    } else {
                        prop_assert!(syncer.needs_full(), "a failure schedules the repair");
                    }
                }
                Event::Refuse { nft } => {
                    let mut k = fake.state();
                    if nft {
                        k.fail_nft = true;
                    } else {
                        k.fail_next_ops = 1;
                    }
                }
            }
            if !missed {
                for change in changes {
                    apply_to(&mut told, &change);
                    syncer.observe(change);
                }
            }
        }
        fake.state().fail_nft = false;
        fake.state().fail_next_ops = 0;
        // The repair path: whatever happened, a re-list and two syncs (the second full if the
        // first failed) converge on the cluster.
        told = cluster.clone();
        syncer.observe(Change::Snapshot(Box::new(told.snapshot())));
        let outcome = syncer.sync();
        if !outcome.succeeded() {
            prop_assert!(syncer.sync().succeeded());
        }
        holds_the_plan(&fake, &told, mode, false)?;
        syncer.request_full();
        prop_assert!(syncer.sync().succeeded());
        holds_the_plan(&fake, &told, mode, true)
    }

    /// Keeps the model of what the agent was told in step with what it is told.
    fn apply_to(told: &mut Cluster, change: &Change) {
        match change {
            Change::Service(s) => {
                let at = SERVICES
                    .iter()
                    .position(|(ns, name)| {
                        s.metadata.namespace.as_deref() == Some(ns)
                            && s.metadata.name.as_deref() == Some(name)
                    })
                    .unwrap();
                told.services.insert(at, (**s).clone());
            }
            Change::ServiceDeleted { namespace, name } => {
                told.services.retain(|_, s| {
                    !(s.metadata.namespace.as_ref() == Some(namespace)
                        && s.metadata.name.as_ref() == Some(name))
                });
            }
            Change::Slice(s) => {
                told.slices.insert(slice_key(s), (**s).clone());
            }
            Change::SliceDeleted { namespace, name } => {
                told.slices.remove(&(namespace.clone(), name.clone()));
            }
            Change::Node(n) => told.node = Some((**n).clone()),
            Change::Snapshot(_) | Change::Policies { .. } => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn every_delta_keeps_the_kernel_equal_to_the_plan_in_replacement_mode(
            events in prop::collection::vec((event(true), prop::bool::weighted(0.15)), 1..40),
        ) {
            run(ProxyMode::Replacement, events)?;
        }

        /// Delegated mode owns node ports only on the node's current addresses, so the node
        /// keeps its addresses here.
        #[test]
        fn every_delta_keeps_the_kernel_equal_to_the_plan_in_delegated_mode(
            events in prop::collection::vec((event(false), prop::bool::weighted(0.15)), 1..40),
        ) {
            run(ProxyMode::Delegated, events)?;
        }
    }
}
