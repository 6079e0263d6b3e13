use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::core::v1::Service;
use pretty_assertions::assert_eq;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::crd::PortPolicy;
use crate::governance::{Labels, NamespaceLabels};
use crate::intent::{HealthCheckNodePort, ServiceIntent, ServicePortNodePort};
use crate::service::HealthCheckField;
use crate::service::ServiceModel;
use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, EXTERNAL_TRAFFIC_ONLY_LOCAL, HEALTH_CHECK_NODE_PORT_ANNOTATION,
};

const EDGE_NS: &str = "edge";
const OTHER_NS: &str = "other";

fn policy(name: &str, namespace_label: &str, node_ports: Value) -> PortPolicy {
    serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"team": namespace_label}},
            "nodePorts": node_ports,
        },
    }))
    .unwrap()
}

/// The usual policy: governs namespace `edge`.
fn edge(node_ports: Value) -> PortPolicy {
    policy("edge", "edge", node_ports)
}

fn service_with(namespace: &str, name: &str, metadata: Value, spec: Value) -> Service {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    });
    for (key, value) in metadata.as_object().cloned().unwrap_or_default() {
        object["metadata"][key] = value;
    }
    serde_json::from_value(object).unwrap()
}

fn service(namespace: &str, name: &str, spec: Value) -> Service {
    service_with(namespace, name, json!({}), spec)
}

/// A NodePort Service with one named TCP port, optionally with a nodePort already set.
fn node_port_service(namespace: &str, name: &str, node_port: Option<u16>) -> Service {
    let mut port = json!({"name": "http", "port": 80, "targetPort": 8080});
    if let Some(np) = node_port {
        port["nodePort"] = json!(np);
    }
    service(namespace, name, json!({"type": "NodePort", "ports": [port]}))
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

struct World {
    policies: Vec<PortPolicy>,
    services: Vec<Service>,
    records: BTreeMap<String, Vec<crate::crd::AllocationRecord>>,
    namespaces: NamespaceLabels,
    now: DateTime<Utc>,
    cluster: PortRange,
}

impl World {
    fn new(policies: Vec<PortPolicy>, services: Vec<Service>) -> Self {
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        World {
            policies,
            services,
            records: BTreeMap::new(),
            namespaces: NamespaceLabels::from_iter([
                (EDGE_NS.to_string(), labels(&[("team", "edge")])),
                ("core".to_string(), labels(&[("team", "core")])),
                ("both".to_string(), labels(&[("team", "edge"), ("shared", "yes")])),
                (OTHER_NS.to_string(), labels(&[])),
            ]),
            now: t0(),
            cluster: PortRange::DEFAULT_NODE_PORTS,
        }
    }

    fn plan(&self) -> NodePortAllocation {
        let set = PolicySet::compile(&self.policies);
        let services: Vec<ServiceModel<'_>> = self.services.iter().map(ServiceModel::read).collect();
        allocate_node_ports(&NodePortInput {
            cluster_range: self.cluster,
            policies: &set,
            records: &self.records,
            services: &services,
            namespace_labels: &self.namespaces,
            now: self.now,
        })
    }

    /// What the operator does with a plan: write the Services and the policies' records.
    fn apply(&mut self, plan: &NodePortAllocation) {
        for change in plan.service_changes() {
            let service = self
                .services
                .iter_mut()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(&change.namespace)
                        && s.metadata.name.as_deref() == Some(&change.name)
                })
                .expect("a change names an input Service");
            change.apply_to(service);
        }
        self.records = plan
            .policies
            .iter()
            .map(|(name, p)| (name.clone(), p.records.clone()))
            .collect();
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        self.services.retain(|s| {
            !(s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(name))
        });
    }
}

fn assignment<'p>(
    plan: &'p NodePortAllocation,
    namespace: &str,
    service: &str,
    kind: NodePortKind,
    port_name: &str,
) -> Option<&'p NodePortAssignment> {
    plan.assignments.iter().find(|a| {
        a.namespace == namespace && a.service == service && a.kind == kind && a.port_name == port_name
    })
}

fn port(
    plan: &NodePortAllocation,
    namespace: &str,
    service: &str,
    port_name: &str,
) -> Option<(u16, AssignmentState)> {
    assignment(plan, namespace, service, NodePortKind::Service, port_name).map(|a| (a.node_port, a.state))
}

fn health(plan: &NodePortAllocation, namespace: &str, service: &str) -> Option<(u16, AssignmentState)> {
    assignment(plan, namespace, service, NodePortKind::HealthCheck, "").map(|a| (a.node_port, a.state))
}

fn reasons(plan: &NodePortAllocation) -> Vec<(NodePortProblemReason, String, String)> {
    plan.problems
        .iter()
        .map(|p| (p.reason, p.problem.object.clone(), p.problem.field.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Allocation rules
// ---------------------------------------------------------------------------------------------

#[test]
fn governed_service_gets_a_port_from_the_upper_band_of_its_policy_range() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![node_port_service(EDGE_NS, "web", None)],
    );
    let plan = world.plan();
    let (np, state) = port(&plan, EDGE_NS, "web", "http").unwrap();
    assert_eq!(state, AssignmentState::Allocated);
    // 100 ports: the lower 16 are left for explicit requests.
    assert!((31016..=31099).contains(&np), "{np}");
    assert_eq!(
        plan.service_changes(),
        [ServiceIntent {
            namespace: EDGE_NS.into(),
            name: "web".into(),
            policy: Some("edge".into()),
            ports: vec![ServicePortNodePort {
                index: 0,
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: np,
            }],
            health_check_node_port: None,
            external_traffic_local: false,
            proxy_label: false,
        }]
    );
    let status = &plan.policies["edge"];
    assert_eq!(status.used_display(), "1/100");
    assert_eq!(status.records.len(), 1);
    assert_eq!(status.records[0].node_port, i32::from(np));
    assert_eq!(status.records[0].released_at, None);
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
}

#[test]
fn existing_port_is_kept_and_nothing_is_written() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![node_port_service(EDGE_NS, "web", Some(31005))],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "web", "http"),
        Some((31005, AssignmentState::Existing))
    );
    assert!(plan.service_changes().is_empty());
    assert_eq!(plan.policies["edge"].records[0].node_port, 31005);
}

#[test]
fn same_port_with_different_protocols_shares_one_node_port() {
    let dns = service(
        EDGE_NS,
        "dns",
        json!({"type": "NodePort", "ports": [
            {"name": "dns-udp", "port": 53, "protocol": "UDP"},
            {"name": "metrics", "port": 9153},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]}),
    );
    // One member already has a port: the other inherits it (the API server's findRequestedNodePort).
    let half_set = service(
        EDGE_NS,
        "dns2",
        json!({"type": "NodePort", "ports": [
            {"name": "dns-udp", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 31001},
        ]}),
    );
    let world = World::new(vec![edge(json!({"range": "31000-31099"}))], vec![dns, half_set]);
    let plan = world.plan();
    let udp = port(&plan, EDGE_NS, "dns", "dns-udp").unwrap();
    let tcp = port(&plan, EDGE_NS, "dns", "dns-tcp").unwrap();
    let metrics = port(&plan, EDGE_NS, "dns", "metrics").unwrap();
    assert_eq!(udp, tcp);
    assert_ne!(udp.0, metrics.0);
    assert_eq!(
        port(&plan, EDGE_NS, "dns2", "dns-udp"),
        Some((31001, AssignmentState::Existing))
    );
    assert_eq!(
        port(&plan, EDGE_NS, "dns2", "dns-tcp"),
        Some((31001, AssignmentState::Existing))
    );
    let change = plan.service_changes().iter().find(|c| c.name == "dns2").unwrap();
    assert_eq!(change.ports.len(), 1);
    assert_eq!((change.ports[0].index, change.ports[0].node_port), (0, 31001));
    // Two distinct ports for dns, one for dns2; each port name keeps its own record.
    assert_eq!(plan.policies["edge"].used, 3);
    assert_eq!(plan.policies["edge"].records.len(), 5);
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
}

#[test]
fn local_load_balancers_get_a_health_check_port() {
    let lb = |name: &str, extra: Value, metadata: Value| {
        let mut spec = json!({"type": "LoadBalancer", "ports": [{"name": "https", "port": 443}]});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            spec[k] = v;
        }
        service_with(EDGE_NS, name, metadata, spec)
    };
    let only_local = json!({"annotations": {EXTERNAL_TRAFFIC_ANNOTATION: EXTERNAL_TRAFFIC_ONLY_LOCAL}});
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![
            lb("local", json!({"externalTrafficPolicy": "Local"}), json!({})),
            lb("cluster", json!({"externalTrafficPolicy": "Cluster"}), json!({})),
            lb("legacy", json!({}), only_local),
            lb(
                "legacy-set",
                json!({}),
                json!({"annotations": {
                    EXTERNAL_TRAFFIC_ANNOTATION: EXTERNAL_TRAFFIC_ONLY_LOCAL,
                    HEALTH_CHECK_NODE_PORT_ANNOTATION: "31007",
                }}),
            ),
            lb(
                "local-set",
                json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 31008}),
                json!({}),
            ),
        ],
    );
    let plan = world.plan();
    let local = health(&plan, EDGE_NS, "local").unwrap();
    assert_eq!(local.1, AssignmentState::Allocated);
    assert_ne!(Some(local.0), port(&plan, EDGE_NS, "local", "https").map(|p| p.0));
    assert_eq!(health(&plan, EDGE_NS, "cluster"), None);
    assert_eq!(
        health(&plan, EDGE_NS, "legacy").unwrap().1,
        AssignmentState::Allocated
    );
    assert_eq!(
        health(&plan, EDGE_NS, "legacy-set"),
        Some((31007, AssignmentState::Existing))
    );
    assert_eq!(
        health(&plan, EDGE_NS, "local-set"),
        Some((31008, AssignmentState::Existing))
    );

    let change = |name: &str| {
        plan.service_changes()
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        change("local").health_check_node_port,
        Some(HealthCheckNodePort {
            node_port: local.0,
            field: HealthCheckField::Spec
        })
    );
    // Only the annotation says OnlyLocal, so the API server would refuse the spec field.
    assert_eq!(
        change("legacy").health_check_node_port.unwrap().field,
        HealthCheckField::Annotation
    );
    assert_eq!(change("legacy-set").health_check_node_port, None);
    let hc_records = plan.policies["edge"]
        .records
        .iter()
        .filter(|r| r.kind == NodePortKind::HealthCheck)
        .count();
    assert_eq!(hc_records, 4);
}

#[test]
fn allocate_load_balancer_node_ports_false_gets_no_automatic_ports() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099", "pinned": [
            {"namespace": EDGE_NS, "service": "direct", "portName": "a", "nodePort": 31050},
        ]}))],
        vec![service(
            EDGE_NS,
            "direct",
            json!({
                "type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                "externalTrafficPolicy": "Local",
                "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": 31002}],
            }),
        )],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "direct", "a"),
        None,
        "no automatic port, not even a pinned one"
    );
    assert_eq!(
        port(&plan, EDGE_NS, "direct", "b"),
        Some((31002, AssignmentState::Existing))
    );
    // The health check port does not depend on allocateLoadBalancerNodePorts (upstream neither).
    assert_eq!(
        health(&plan, EDGE_NS, "direct").unwrap().1,
        AssignmentState::Allocated
    );
}

#[test]
fn only_node_port_and_load_balancer_services_get_node_ports() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![
            service(EDGE_NS, "plain", json!({"ports": [{"port": 80}]})),
            service(
                EDGE_NS,
                "cip",
                json!({"type": "ClusterIP", "ports": [{"port": 80}]}),
            ),
            service(
                EDGE_NS,
                "ext",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            ),
            service(
                EDGE_NS,
                "np",
                json!({"type": "NodePort", "ports": [{"port": 80}]}),
            ),
            service(
                EDGE_NS,
                "lb",
                json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
            ),
        ],
    );
    let plan = world.plan();
    let names: BTreeSet<_> = plan.assignments.iter().map(|a| a.service.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["lb", "np"]));
    assert!(plan.assignments.iter().all(|a| a.port_name.is_empty()));
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
}

#[test]
fn ungoverned_services_keep_their_ports_and_those_are_never_handed_out() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31001"}))],
        vec![
            node_port_service(OTHER_NS, "theirs", Some(31000)),
            node_port_service(EDGE_NS, "first", None),
            node_port_service(EDGE_NS, "second", None),
        ],
    );
    let plan = world.plan();
    let theirs = assignment(&plan, OTHER_NS, "theirs", NodePortKind::Service, "http").unwrap();
    assert_eq!(
        (theirs.node_port, theirs.state, theirs.policy.clone()),
        (31000, AssignmentState::InUse, None)
    );
    let first = port(&plan, EDGE_NS, "first", "http");
    let second = port(&plan, EDGE_NS, "second", "http");
    // Only one port is left, and who gets it follows creation order (equal here: then the name).
    assert_eq!(first, Some((31001, AssignmentState::Allocated)));
    assert_eq!(second, None);
    assert_eq!(
        reasons(&plan),
        [(
            NodePortProblemReason::RangeExhausted,
            "Service/edge/second".into(),
            "spec.ports[0].nodePort".into()
        )]
    );
}

#[test]
fn reserved_and_pinned_ports_are_skipped_by_automatic_allocation() {
    let world = World::new(
        vec![edge(json!({
            "range": "31000-31003", "reserved": ["31000-31001"],
            "pinned": [{"namespace": EDGE_NS, "service": "not-yet-created", "portName": "http", "nodePort": 31002}],
        }))],
        vec![
            node_port_service(EDGE_NS, "a", None),
            node_port_service(EDGE_NS, "b", None),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "a", "http"),
        Some((31003, AssignmentState::Allocated))
    );
    assert_eq!(port(&plan, EDGE_NS, "b", "http"), None);
    assert_eq!(plan.problems.len(), 1);
    assert_eq!(plan.problems[0].reason, NodePortProblemReason::RangeExhausted);
    // A user may still ask for a reserved port explicitly.
    let world = World::new(
        vec![edge(json!({"range": "31000-31003", "reserved": ["31000-31001"]}))],
        vec![node_port_service(EDGE_NS, "explicit", Some(31000))],
    );
    assert_eq!(
        port(&world.plan(), EDGE_NS, "explicit", "http"),
        Some((31000, AssignmentState::Existing))
    );
}

#[test]
fn pinned_ports_are_given_and_move_an_existing_port() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099", "pinned": [
            {"namespace": EDGE_NS, "service": "fresh", "portName": "http", "nodePort": 31010},
            {"namespace": EDGE_NS, "service": "moved", "portName": "http", "nodePort": 31011},
            {"namespace": EDGE_NS, "service": "there", "portName": "http", "nodePort": 31012},
        ]}))],
        vec![
            node_port_service(EDGE_NS, "fresh", None),
            node_port_service(EDGE_NS, "moved", Some(31050)),
            node_port_service(EDGE_NS, "there", Some(31012)),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "fresh", "http"),
        Some((31010, AssignmentState::Pinned))
    );
    let moved = assignment(&plan, EDGE_NS, "moved", NodePortKind::Service, "http").unwrap();
    assert_eq!((moved.node_port, moved.previous), (31011, Some(31050)));
    assert_eq!(
        port(&plan, EDGE_NS, "there", "http"),
        Some((31012, AssignmentState::Pinned))
    );
    let changed: Vec<_> = plan.service_changes().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(changed, ["fresh", "moved"]);
}

#[test]
fn ports_do_not_depend_on_input_order_or_unrelated_services() {
    let services: Vec<Service> = (0..40)
        .map(|i| node_port_service(EDGE_NS, &format!("svc-{i}"), None))
        .collect();
    let mut world = World::new(vec![edge(json!({"range": "30000-32767"}))], services.clone());
    let forward = world.plan();
    world.services.reverse();
    assert_eq!(world.plan(), forward, "input order must not matter");

    // Alone, svc-7 gets the port it gets among 40 others (no collision in a range this large).
    let alone = World::new(
        vec![edge(json!({"range": "30000-32767"}))],
        vec![services[7].clone()],
    )
    .plan();
    assert_eq!(
        port(&alone, EDGE_NS, "svc-7", "http"),
        port(&forward, EDGE_NS, "svc-7", "http")
    );
    let distinct: BTreeSet<u16> = forward.assignments.iter().map(|a| a.node_port).collect();
    assert_eq!(distinct.len(), 40);
}

#[test]
fn oldest_service_wins_the_last_port() {
    let created = |name: &str, at: &str| {
        service_with(
            EDGE_NS,
            name,
            json!({"creationTimestamp": at}),
            json!({"type": "NodePort", "ports": [{"port": 80}]}),
        )
    };
    let world = World::new(
        vec![edge(json!({"range": "31000"}))],
        vec![
            created("a-young", "2026-01-02T00:00:00Z"),
            created("z-old", "2026-01-01T00:00:00Z"),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "z-old", ""),
        Some((31000, AssignmentState::Allocated))
    );
    assert_eq!(port(&plan, EDGE_NS, "a-young", ""), None);
}

// ---------------------------------------------------------------------------------------------
// Sticky allocations
// ---------------------------------------------------------------------------------------------

#[test]
fn re_created_service_gets_its_port_back_within_retention() {
    let mut world = World::new(
        vec![edge(json!({"range": "31000-31099", "retentionSeconds": 3600}))],
        vec![node_port_service(EDGE_NS, "web", None)],
    );
    let first = world.plan();
    let (np, _) = port(&first, EDGE_NS, "web", "http").unwrap();
    world.apply(&first);

    // Deleted: the record is released now and still reserved.
    world.remove(EDGE_NS, "web");
    world.now += Duration::seconds(10);
    let gone = world.plan();
    let records = &gone.policies["edge"].records;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].node_port, i32::from(np));
    let released = records[0].released_at.clone().unwrap();
    assert_eq!(released.0.as_second(), world.now.timestamp());
    assert_eq!(
        gone.policies["edge"].used, 1,
        "a retained port still counts as used"
    );
    world.apply(&gone);

    // Re-created 50 minutes later: the same port comes back, and released_at is not renewed
    // by plans in between.
    world.now += Duration::seconds(1800);
    let still = world.plan();
    assert_eq!(still.policies["edge"].records[0].released_at, Some(released));
    world.apply(&still);
    world.now += Duration::seconds(1200);
    world.services.push(node_port_service(EDGE_NS, "web", None));
    let back = world.plan();
    assert_eq!(
        port(&back, EDGE_NS, "web", "http"),
        Some((np, AssignmentState::Restored))
    );
    assert_eq!(back.policies["edge"].records[0].released_at, None);
}

#[test]
fn retained_port_blocks_others_until_it_expires() {
    // A one-port range makes "who may take it" observable.
    let mut world = World::new(
        vec![edge(json!({"range": "31000", "retentionSeconds": 60}))],
        vec![node_port_service(EDGE_NS, "old", None)],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "old", "http"),
        Some((31000, AssignmentState::Allocated))
    );
    world.apply(&plan);

    world.remove(EDGE_NS, "old");
    world.services.push(node_port_service(EDGE_NS, "new", None));
    world.now += Duration::seconds(1);
    let within = world.plan();
    assert_eq!(port(&within, EDGE_NS, "new", "http"), None);
    assert_eq!(within.problems[0].reason, NodePortProblemReason::RangeExhausted);
    assert!(
        within.problems[0].problem.message.contains("1 of its 1 ports"),
        "{}",
        within.problems[0].problem
    );
    world.apply(&within);

    world.now += Duration::seconds(60);
    let after = world.plan();
    assert_eq!(
        port(&after, EDGE_NS, "new", "http"),
        Some((31000, AssignmentState::Allocated))
    );
    let records = &after.policies["edge"].records;
    assert_eq!(records.len(), 1, "the expired record is dropped: {records:?}");
    assert_eq!(records[0].service, "new");
}

#[test]
fn records_of_an_invalid_policy_stay_reserved() {
    let mut world = World::new(
        vec![edge(json!({"range": "31000-31001"}))],
        vec![node_port_service(EDGE_NS, "a", None)],
    );
    // A second policy whose spec no longer compiles still has records in its status.
    world
        .policies
        .push(policy("broken", "core", json!({"range": "31001-31000"})));
    world.records.insert(
        "broken".into(),
        vec![crate::crd::AllocationRecord {
            namespace: "core".into(),
            service: "gone".into(),
            port_name: String::new(),
            kind: NodePortKind::Service,
            node_port: 31001,
            released_at: None,
        }],
    );
    world.services.push(node_port_service(EDGE_NS, "b", None));
    let plan = world.plan();
    let ports: Vec<_> = ["a", "b"]
        .iter()
        .map(|s| port(&plan, EDGE_NS, s, "http"))
        .collect();
    assert_eq!(ports, [Some((31000, AssignmentState::Allocated)), None]);
    assert!(!plan.policies.contains_key("broken"));
}

#[test]
fn service_that_stops_needing_a_port_releases_it() {
    let mut world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![node_port_service(EDGE_NS, "web", Some(31020))],
    );
    world.apply(&world.plan());
    // Turned into a ClusterIP Service: the API server frees its nodePorts.
    world.services = vec![service(
        EDGE_NS,
        "web",
        json!({"ports": [{"name": "http", "port": 80}]}),
    )];
    let plan = world.plan();
    let records = &plan.policies["edge"].records;
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].node_port, records[0].released_at.is_some()),
        (31020, true)
    );
    world.apply(&plan);
    // Back to NodePort: the retained port returns.
    world.services = vec![node_port_service(EDGE_NS, "web", None)];
    assert_eq!(
        port(&world.plan(), EDGE_NS, "web", "http"),
        Some((31020, AssignmentState::Restored))
    );
}

// ---------------------------------------------------------------------------------------------
// Problems, one kind each
// ---------------------------------------------------------------------------------------------

#[test]
fn overlapping_policies_are_reported_on_both() {
    let world = World::new(
        vec![
            edge(json!({"range": "31000-31099"})),
            policy("core", "core", json!({"range": "31050-31149"})),
        ],
        vec![],
    );
    assert_eq!(
        reasons(&world.plan()),
        [
            (
                NodePortProblemReason::PolicyOverlap,
                "PortPolicy/core".into(),
                "spec.nodePorts.range".into()
            ),
            (
                NodePortProblemReason::PolicyOverlap,
                "PortPolicy/edge".into(),
                "spec.nodePorts.range".into()
            ),
        ]
    );
}

#[test]
fn range_outside_the_cluster_range_is_reported_and_clipped() {
    let world = World::new(
        vec![edge(json!({"range": "32760-32800", "pinned": [
            {"namespace": EDGE_NS, "service": "x", "nodePort": 32790},
        ]}))],
        (0..9)
            .map(|i| node_port_service(EDGE_NS, &format!("s{i}"), None))
            .collect(),
    );
    let plan = world.plan();
    let got = reasons(&plan);
    assert_eq!(
        got[..2],
        [
            (
                NodePortProblemReason::RangeOutsideCluster,
                "PortPolicy/edge".into(),
                "spec.nodePorts.range".into()
            ),
            (
                NodePortProblemReason::RangeOutsideCluster,
                "PortPolicy/edge".into(),
                "spec.nodePorts.pinned[0].nodePort".into()
            ),
        ]
    );
    // Only 32760-32767 is usable: eight Services get ports, the ninth none.
    let ports: BTreeSet<u16> = plan.assignments.iter().map(|a| a.node_port).collect();
    assert_eq!(ports, (32760..=32767).collect());
    assert_eq!(
        got[2..]
            .iter()
            .filter(|r| r.0 == NodePortProblemReason::RangeExhausted)
            .count(),
        1
    );
}

#[test]
fn service_selected_by_two_policies_is_left_untouched() {
    let world = World::new(
        vec![
            edge(json!({"range": "31000-31099"})),
            policy("shared", "edge", json!({"range": "31100-31199"})),
        ],
        vec![
            node_port_service(EDGE_NS, "held", Some(30500)),
            node_port_service(EDGE_NS, "bare", None),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "held", "http"),
        Some((30500, AssignmentState::InUse))
    );
    assert_eq!(port(&plan, EDGE_NS, "bare", "http"), None);
    assert!(plan.service_changes().is_empty());
    let problems: Vec<_> = plan
        .problems
        .iter()
        .map(|p| (p.policy.clone().unwrap(), p.reason, p.problem.object.clone()))
        .collect();
    assert_eq!(problems.len(), 4);
    assert!(problems.contains(&(
        "edge".into(),
        NodePortProblemReason::MultiplePolicies,
        "Service/edge/bare".into()
    )));
    assert!(problems.contains(&(
        "shared".into(),
        NodePortProblemReason::MultiplePolicies,
        "Service/edge/held".into()
    )));
    assert!(
        plan.problems[0]
            .problem
            .message
            .contains("PortPolicy/edge and PortPolicy/shared")
    );
}

#[test]
fn pinned_port_held_by_another_service_stays_with_the_holder() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099", "pinned": [
            {"namespace": EDGE_NS, "service": "wants", "portName": "http", "nodePort": 31010},
        ]}))],
        vec![
            node_port_service(OTHER_NS, "holder", Some(31010)),
            node_port_service(EDGE_NS, "wants", None),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, OTHER_NS, "holder", "http"),
        Some((31010, AssignmentState::InUse))
    );
    let (np, state) = port(&plan, EDGE_NS, "wants", "http").unwrap();
    assert_eq!(state, AssignmentState::Allocated);
    assert_ne!(np, 31010);
    assert_eq!(
        reasons(&plan),
        [(
            NodePortProblemReason::PinnedPortTaken,
            "PortPolicy/edge".into(),
            "spec.nodePorts.pinned[0].nodePort".into()
        )]
    );
    assert!(plan.problems[0].problem.message.contains("Service/other/holder"));
}

#[test]
fn exhausted_range_leaves_the_service_without_a_port() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31001"}))],
        (0..3)
            .map(|i| node_port_service(EDGE_NS, &format!("s{i}"), None))
            .collect(),
    );
    let plan = world.plan();
    assert_eq!(plan.assignments.len(), 2);
    assert_eq!(
        reasons(&plan),
        [(
            NodePortProblemReason::RangeExhausted,
            "Service/edge/s2".into(),
            "spec.ports[0].nodePort".into()
        )]
    );
    assert_eq!(plan.policies["edge"].used_display(), "2/2");
}

#[test]
fn node_port_outside_the_policy_range_is_kept_or_moved_by_enforce() {
    let services = || {
        vec![service(
            EDGE_NS,
            "web",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30001,
                "ports": [{"name": "http", "port": 80, "nodePort": 30000}]}),
        )]
    };
    let kept = World::new(vec![edge(json!({"range": "31000-31099"}))], services()).plan();
    assert_eq!(
        port(&kept, EDGE_NS, "web", "http"),
        Some((30000, AssignmentState::Existing))
    );
    assert_eq!(
        health(&kept, EDGE_NS, "web"),
        Some((30001, AssignmentState::Existing))
    );
    assert!(kept.service_changes().is_empty());
    assert!(
        kept.policies["edge"].records.is_empty(),
        "ports outside the range are not the policy's"
    );
    assert_eq!(
        reasons(&kept),
        [
            (
                NodePortProblemReason::OutsidePolicyRange,
                "Service/edge/web".into(),
                "spec.ports[0].nodePort".into()
            ),
            (
                NodePortProblemReason::OutsidePolicyRange,
                "Service/edge/web".into(),
                "spec.healthCheckNodePort".into()
            ),
        ]
    );

    let moved = World::new(
        vec![edge(json!({"range": "31000-31099", "enforce": true}))],
        services(),
    )
    .plan();
    let (np, state) = port(&moved, EDGE_NS, "web", "http").unwrap();
    let (hc, _) = health(&moved, EDGE_NS, "web").unwrap();
    assert!((31000..=31099).contains(&np) && (31000..=31099).contains(&hc));
    assert_eq!(state, AssignmentState::Allocated);
    let change = &moved.service_changes()[0];
    assert_eq!(change.ports[0].node_port, np);
    assert_eq!(change.health_check_node_port.unwrap().node_port, hc);
    assert!(
        moved
            .problems
            .iter()
            .all(|p| p.reason == NodePortProblemReason::OutsidePolicyRange
                && p.problem.message.contains("moved to"))
    );
}

#[test]
fn two_services_with_the_same_node_port_are_both_named_and_both_keep_it() {
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![
            node_port_service(EDGE_NS, "a", Some(31005)),
            node_port_service(OTHER_NS, "b", Some(31005)),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "a", "http"),
        Some((31005, AssignmentState::Existing))
    );
    assert_eq!(
        port(&plan, OTHER_NS, "b", "http"),
        Some((31005, AssignmentState::InUse))
    );
    let got: Vec<_> = plan
        .problems
        .iter()
        .map(|p| (p.reason, p.policy.clone(), p.problem.object.clone()))
        .collect();
    assert_eq!(got.len(), 2);
    assert!(got.contains(&(
        NodePortProblemReason::DuplicateNodePort,
        Some("edge".into()),
        "Service/edge/a".into()
    )));
    assert!(got.contains(&(
        NodePortProblemReason::DuplicateNodePort,
        None,
        "Service/other/b".into()
    )));
    assert!(
        plan.problems
            .iter()
            .all(|p| p.problem.message.contains("also held by"))
    );
}

#[test]
fn invalid_services_are_reported_by_field_and_left_untouched() {
    // (spec, fields at fault)
    let cases: [(Value, &[&str]); 12] = [
        (
            json!({"type": "NodePort", "ports": [{"port": 80, "protocol": "tcp"}]}),
            &["spec.ports[0].protocol"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"port": 0}]}),
            &["spec.ports[0].port"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"port": 70000}]}),
            &["spec.ports[0].port"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 70000}]}),
            &["spec.ports[0].nodePort"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": -1}]}),
            &["spec.ports[0].nodePort"],
        ),
        (
            json!({"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 31000}]}),
            &["spec.ports[0].nodePort"],
        ),
        (json!({"type": "Fancy", "ports": [{"port": 80}]}), &["spec.type"]),
        (
            json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}),
            &["spec.ports[0].name", "spec.ports[1].name"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
            &["spec.ports[1].name"],
        ),
        (
            json!({"type": "NodePort", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            &["spec.ports[1]"],
        ),
        (
            json!({"type": "NodePort", "ports": [
                {"name": "a", "port": 80, "nodePort": 31000}, {"name": "b", "port": 81, "nodePort": 31000}]}),
            &["spec.ports[1].nodePort"],
        ),
        (
            json!({"type": "NodePort", "healthCheckNodePort": 31001, "ports": [{"port": 80}]}),
            &["spec.healthCheckNodePort"],
        ),
    ];
    for (spec, fields) in cases {
        let world = World::new(
            vec![edge(json!({"range": "31000-31099"}))],
            vec![service(EDGE_NS, "bad", spec.clone())],
        );
        let plan = world.plan();
        let got: Vec<_> = plan
            .problems
            .iter()
            .map(|p| (p.reason, p.problem.field.as_str()))
            .collect();
        let want: Vec<_> = fields
            .iter()
            .map(|f| (NodePortProblemReason::InvalidService, *f))
            .collect();
        assert_eq!(got, want, "spec {spec}");
        assert_eq!(plan.problems[0].policy.as_deref(), Some("edge"));
        assert_eq!(plan.problems[0].problem.object, "Service/edge/bad");
        assert!(plan.service_changes().is_empty(), "spec {spec}");
        assert!(
            plan.assignments.iter().all(|a| a.state == AssignmentState::InUse),
            "spec {spec}"
        );
    }
}

#[test]
fn an_empty_type_is_cluster_ip_not_an_invalid_service() {
    // The API server defaults `type: ""` to ClusterIP, so such a Service is valid (and holds no
    // nodePort), as the planner always read it.
    let world = World::new(
        vec![edge(json!({"range": "31000-31099"}))],
        vec![service(
            EDGE_NS,
            "plain",
            json!({"type": "", "ports": [{"port": 80}]}),
        )],
    );
    let plan = world.plan();
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    assert!(plan.assignments.is_empty());
}

#[test]
fn invalid_service_still_holds_its_valid_ports() {
    let bad = service(
        OTHER_NS,
        "bad",
        json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80, "nodePort": 31000}, {"name": "b", "port": 81, "protocol": "HTTP"}]}),
    );
    let world = World::new(
        vec![edge(json!({"range": "31000-31001"}))],
        vec![bad, node_port_service(EDGE_NS, "good", None)],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, OTHER_NS, "bad", "a"),
        Some((31000, AssignmentState::InUse))
    );
    assert_eq!(
        port(&plan, EDGE_NS, "good", "http"),
        Some((31001, AssignmentState::Allocated))
    );
}

// ---------------------------------------------------------------------------------------------
// Property: whatever Services come and go, no port is handed out twice or outside its range.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    Create {
        namespace: usize,
        name: usize,
        kind: usize,
        dual_protocol: bool,
        explicit: Option<u16>,
    },
    Delete {
        namespace: usize,
        name: usize,
    },
    Wait(i64),
}

const NAMESPACES: [&str; 3] = [EDGE_NS, "core", OTHER_NS];
const EDGE_RANGE: (u16, u16) = (31000, 31023);
const CORE_RANGE: (u16, u16) = (31024, 31039);
const RESERVED: u16 = 31005;
const PINNED: u16 = 31010;
const RETENTION: i64 = 100;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, 0..8usize, 0..4usize, any::<bool>(), proptest::option::weighted(0.2, 31000u16..31045))
            .prop_map(|(namespace, name, kind, dual_protocol, explicit)| Step::Create {
                namespace, name, kind, dual_protocol, explicit
            }),
        2 => (0..3usize, 0..8usize).prop_map(|(namespace, name)| Step::Delete { namespace, name }),
        1 => (1..150i64).prop_map(Step::Wait),
    ]
}

fn created_service(
    namespace: &str,
    name: &str,
    kind: usize,
    dual_protocol: bool,
    explicit: Option<u16>,
) -> Service {
    let mut ports = vec![json!({"name": "http", "port": 80})];
    if dual_protocol {
        ports.push(json!({"name": "quic", "port": 80, "protocol": "UDP"}));
        ports.push(json!({"name": "admin", "port": 9000}));
    }
    if let Some(np) = explicit {
        ports[0]["nodePort"] = json!(np);
    }
    let spec = match kind {
        0 => json!({"type": "NodePort", "ports": ports}),
        1 => json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": ports}),
        2 => json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": ports}),
        _ => json!({"type": "ClusterIP", "ports": ports}),
    };
    service(namespace, name, spec)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn never_hands_out_a_port_twice_or_outside_its_range(steps in proptest::collection::vec(step(), 1..40)) {
        let range = |r: (u16, u16)| format!("{}-{}", r.0, r.1);
        let mut world = World::new(
            vec![
                edge(json!({"range": range(EDGE_RANGE), "reserved": [RESERVED.to_string()],
                    "retentionSeconds": RETENTION,
                    "pinned": [{"namespace": EDGE_NS, "service": "svc-1", "portName": "http", "nodePort": PINNED}]})),
                policy("core", "core", json!({"range": range(CORE_RANGE), "retentionSeconds": RETENTION})),
            ],
            vec![],
        );
        let policy_range = |p: &str| if p == "edge" { EDGE_RANGE } else { CORE_RANGE };
        for step in steps {
            match step {
                Step::Create { namespace, name, kind, dual_protocol, explicit } => {
                    let (ns, name) = (NAMESPACES[namespace], format!("svc-{name}"));
                    world.remove(ns, &name);
                    // The API server refuses a nodePort another Service holds; the user then
                    // leaves it to the allocator.
                    let held = |port: u16| world.services.iter().any(|s| {
                        s.spec.iter().flat_map(|spec| spec.ports.iter().flatten()).any(|p| p.node_port == Some(i32::from(port)))
                            || s.spec.as_ref().and_then(|spec| spec.health_check_node_port) == Some(i32::from(port))
                    });
                    let explicit = explicit.filter(|port| !held(*port));
                    world.services.push(created_service(ns, &name, kind, dual_protocol, explicit));
                }
                Step::Delete { namespace, name } => world.remove(NAMESPACES[namespace], &format!("svc-{name}")),
                Step::Wait(seconds) => world.now += Duration::seconds(seconds),
            }
            let before = world.records.clone();
            let plan = world.plan();
            // Ports Services hold before planning (a record on one of them is lost to the holder).
            let held: BTreeSet<i32> = world
                .services
                .iter()
                .filter_map(|s| s.spec.as_ref())
                .flat_map(|spec| spec.ports.iter().flatten().filter_map(|p| p.node_port).chain(spec.health_check_node_port))
                .collect();

            // Who holds each port: live Services, and retained records of gone identities.
            let mut holders: BTreeMap<u16, BTreeSet<(String, String)>> = BTreeMap::new();
            for a in &plan.assignments {
                holders.entry(a.node_port).or_default().insert((a.namespace.clone(), a.service.clone()));
            }
            for (name, status) in &plan.policies {
                let (low, high) = policy_range(name);
                for r in status.records.iter().filter(|r| r.released_at.is_some()) {
                    holders.entry(r.node_port as u16).or_default().insert((r.namespace.clone(), r.service.clone()));
                    prop_assert!((i32::from(low)..=i32::from(high)).contains(&r.node_port));
                }
            }
            for a in &plan.assignments {
                let handed_out = matches!(
                    a.state,
                    AssignmentState::Allocated | AssignmentState::Restored | AssignmentState::Pinned
                );
                if !handed_out {
                    continue;
                }
                let owners = &holders[&a.node_port];
                prop_assert_eq!(owners.len(), 1, "port {} held by {:?}", a.node_port, owners);
                let (low, high) = policy_range(a.policy.as_deref().unwrap());
                prop_assert!((low..=high).contains(&a.node_port), "{:?} outside its range", a);
                if a.state == AssignmentState::Allocated {
                    prop_assert_ne!(a.node_port, RESERVED);
                    prop_assert_ne!(a.node_port, PINNED);
                }
                // A record of the same identity, still in its window, comes back. Ports sharing
                // one nodePort may have had different ones: then one of them wins.
                let in_window: Vec<_> = before.get(a.policy.as_deref().unwrap()).into_iter().flatten().filter(|r| {
                    r.namespace == a.namespace && r.service == a.service && r.kind == a.kind
                        && r.released_at.as_ref().is_none_or(|t| t.0.as_second() + RETENTION > world.now.timestamp())
                        // Lost to a pin for someone else, or to a Service that asked for the port.
                        && (r.node_port != i32::from(PINNED) || (r.namespace == EDGE_NS && r.service == "svc-1"))
                        && !held.contains(&r.node_port)
                }).collect();
                let own = in_window.iter().any(|r| r.port_name == a.port_name);
                if own && a.state != AssignmentState::Pinned && a.previous.is_none() {
                    prop_assert_eq!(a.state, AssignmentState::Restored, "{:?} not restored", a);
                    prop_assert!(in_window.iter().any(|r| r.node_port == i32::from(a.node_port)), "{:?}", a);
                }
            }
            // Nothing a Service already holds is moved (the pin aside, which is an explicit request).
            for a in &plan.assignments {
                if let Some(previous) = a.previous && a.state != AssignmentState::Pinned {
                    prop_assert_eq!(a.node_port, previous, "{:?} moved", a);
                }
            }
            world.apply(&plan);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pins whose holder moves, records on reserved ports, ports pinned twice
// ---------------------------------------------------------------------------------------------

/// A Service created `age_rank` seconds after t0, so the allocator's age order is explicit.
fn aged(service: Service, seconds: i64) -> Service {
    let mut service = service;
    let created = t0() + Duration::seconds(seconds);
    service.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        created.to_rfc3339().parse().unwrap(),
    ));
    service
}

impl World {
    /// Writes the plan's Service changes one by one in its order, refusing (like the API
    /// server) a write that takes a nodePort another Service still holds.
    fn apply_in_order(&mut self, plan: &NodePortAllocation) {
        for change in plan.service_changes() {
            let index = (self.services.iter())
                .position(|s| {
                    s.metadata.namespace.as_deref() == Some(&change.namespace)
                        && s.metadata.name.as_deref() == Some(&change.name)
                })
                .expect("a change names an input Service");
            for port in &change.ports {
                let holder = self.services.iter().enumerate().find(|(j, s)| {
                    *j != index
                        && (s.spec.iter().flat_map(|spec| spec.ports.iter().flatten()))
                            .any(|p| p.node_port == Some(i32::from(port.node_port)))
                });
                assert!(
                    holder.is_none(),
                    "{}/{} written before {:?} left nodePort {}",
                    change.namespace,
                    change.name,
                    holder.map(|(_, s)| s.metadata.name.clone()),
                    port.node_port
                );
            }
            change.apply_to(&mut self.services[index]);
        }
        self.records = (plan.policies.iter())
            .map(|(name, p)| (name.clone(), p.records.clone()))
            .collect();
    }
}

#[test]
fn pin_held_by_a_service_that_the_same_plan_moves_is_reached_in_one_plan() {
    // Oldest first would plan `first` before the Services holding its port: a chain of three
    // pins, each port held by the next Service, created in the worst order.
    let mut world = World::new(
        vec![edge(json!({"range": "31000-31099", "pinned": [
            {"namespace": EDGE_NS, "service": "first", "portName": "http", "nodePort": 31010},
            {"namespace": EDGE_NS, "service": "second", "portName": "http", "nodePort": 31020},
            {"namespace": EDGE_NS, "service": "third", "portName": "http", "nodePort": 31030},
        ]}))],
        vec![
            aged(node_port_service(EDGE_NS, "first", None), 1),
            aged(node_port_service(EDGE_NS, "second", Some(31010)), 2),
            aged(node_port_service(EDGE_NS, "third", Some(31020)), 3),
        ],
    );
    let plan = world.plan();
    assert_eq!(reasons(&plan), []);
    for (service, pin) in [("first", 31010), ("second", 31020), ("third", 31030)] {
        assert_eq!(
            port(&plan, EDGE_NS, service, "http"),
            Some((pin, AssignmentState::Pinned)),
            "{service}"
        );
    }
    let order: Vec<_> = plan.service_changes().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        order,
        ["third", "second", "first"],
        "each move lands before its port is taken"
    );
    world.apply_in_order(&plan);
    let again = world.plan();
    assert!(
        again.service_changes().is_empty(),
        "{:?}",
        again.service_changes()
    );
    assert_eq!(reasons(&again), []);
}

#[test]
fn pin_held_by_a_service_another_policy_moves_into_its_range_is_reached_in_one_plan() {
    let mut world = World::new(
        vec![
            edge(json!({"range": "31000-31099", "pinned": [
                {"namespace": EDGE_NS, "service": "wants", "portName": "http", "nodePort": 31010},
            ]})),
            policy("core", "core", json!({"range": "31100-31199", "enforce": true})),
        ],
        vec![
            aged(node_port_service(EDGE_NS, "wants", Some(31050)), 1),
            aged(node_port_service("core", "holder", Some(31010)), 2),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "wants", "http"),
        Some((31010, AssignmentState::Pinned))
    );
    let (moved, state) = port(&plan, "core", "holder", "http").unwrap();
    assert!((31100..=31199).contains(&moved), "{moved}");
    assert_eq!(state, AssignmentState::Allocated);
    assert!(
        plan.problems
            .iter()
            .all(|p| p.reason == NodePortProblemReason::OutsidePolicyRange),
        "only the holder's move is reported: {:?}",
        reasons(&plan)
    );
    let order: Vec<_> = plan.service_changes().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(order, ["holder", "wants"]);
    world.apply_in_order(&plan);
    assert!(world.plan().service_changes().is_empty());
}

#[test]
fn pin_held_by_a_service_that_keeps_its_port_still_stays_with_the_holder() {
    // The holder's own policy does not enforce its range: it does not move, so the pin waits.
    let world = World::new(
        vec![
            edge(json!({"range": "31000-31099", "pinned": [
                {"namespace": EDGE_NS, "service": "wants", "portName": "http", "nodePort": 31010},
            ]})),
            policy("core", "core", json!({"range": "31100-31199"})),
        ],
        vec![
            aged(node_port_service(EDGE_NS, "wants", Some(31050)), 1),
            aged(node_port_service("core", "holder", Some(31010)), 2),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "wants", "http"),
        Some((31050, AssignmentState::Existing))
    );
    assert_eq!(
        port(&plan, "core", "holder", "http"),
        Some((31010, AssignmentState::Existing))
    );
    assert!(plan.service_changes().is_empty());
    assert!(
        reasons(&plan).contains(&(
            NodePortProblemReason::PinnedPortTaken,
            "PortPolicy/edge".into(),
            "spec.nodePorts.pinned[0].nodePort".into()
        )),
        "{:?}",
        reasons(&plan)
    );
}

#[test]
fn pins_that_swap_two_services_ports_leave_both_with_their_holders() {
    // Swapping needs a third port between the two writes; both pins are reported instead.
    let world = World::new(
        vec![edge(json!({"range": "31000-31099", "pinned": [
            {"namespace": EDGE_NS, "service": "a", "portName": "http", "nodePort": 31011},
            {"namespace": EDGE_NS, "service": "b", "portName": "http", "nodePort": 31010},
        ]}))],
        vec![
            node_port_service(EDGE_NS, "a", Some(31010)),
            node_port_service(EDGE_NS, "b", Some(31011)),
        ],
    );
    let plan = world.plan();
    assert_eq!(
        port(&plan, EDGE_NS, "a", "http"),
        Some((31010, AssignmentState::Existing))
    );
    assert_eq!(
        port(&plan, EDGE_NS, "b", "http"),
        Some((31011, AssignmentState::Existing))
    );
    assert!(plan.service_changes().is_empty());
    let taken = (plan.problems.iter())
        .filter(|p| p.reason == NodePortProblemReason::PinnedPortTaken)
        .count();
    assert_eq!(taken, 2, "{:?}", reasons(&plan));
}

#[test]
fn retained_record_is_not_restored_onto_a_port_reserved_since() {
    let mut world = World::new(
        vec![edge(json!({"range": "31000-31099", "retentionSeconds": 3600}))],
        vec![node_port_service(EDGE_NS, "web", None)],
    );
    let first = world.plan();
    let (np, _) = port(&first, EDGE_NS, "web", "http").unwrap();
    world.apply(&first);
    world.remove(EDGE_NS, "web");
    world.now += Duration::seconds(10);
    let gone = world.plan();
    assert_eq!(gone.policies["edge"].records.len(), 1);
    world.apply(&gone);

    // The port is reserved while the Service is gone; it is re-created within retention.
    world.policies = vec![edge(json!({"range": "31000-31099", "retentionSeconds": 3600,
        "reserved": [np.to_string()]}))];
    world.services.push(node_port_service(EDGE_NS, "web", None));
    world.now += Duration::seconds(10);
    let back = world.plan();
    let (again, state) = port(&back, EDGE_NS, "web", "http").unwrap();
    assert_ne!(again, np, "a reserved port is never handed out automatically");
    assert_eq!(state, AssignmentState::Allocated);
    let records: Vec<_> = back.policies["edge"]
        .records
        .iter()
        .map(|r| r.node_port)
        .collect();
    assert_eq!(
        records,
        [i32::from(again)],
        "the record on the reserved port is dropped"
    );

    // A Service that still holds a port reserved since keeps it.
    world.apply(&back);
    world.policies = vec![edge(json!({"range": "31000-31099", "retentionSeconds": 3600,
        "reserved": [again.to_string()]}))];
    let kept = world.plan();
    assert_eq!(
        port(&kept, EDGE_NS, "web", "http"),
        Some((again, AssignmentState::Existing))
    );
    assert!(kept.service_changes().is_empty());
}

#[test]
fn one_service_port_pinned_twice_makes_the_policy_invalid_and_changes_nothing() {
    for (first, second) in [(31010, 31020), (31020, 31010)] {
        let world = World::new(
            vec![edge(json!({"range": "31000-31099", "pinned": [
                {"namespace": EDGE_NS, "service": "web", "portName": "http", "nodePort": first},
                {"namespace": EDGE_NS, "service": "web", "portName": "http", "nodePort": second},
            ]}))],
            vec![node_port_service(EDGE_NS, "web", Some(31050))],
        );
        let plan = world.plan();
        assert_eq!(
            port(&plan, EDGE_NS, "web", "http"),
            Some((31050, AssignmentState::InUse)),
            "neither pin wins"
        );
        assert!(plan.service_changes().is_empty());
        assert!(!plan.policies.contains_key("edge"));
        let problems = PolicySet::compile(&world.policies);
        assert_eq!(problems.invalid().len(), 1);
    }
}
