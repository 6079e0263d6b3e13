use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Service;
use pretty_assertions::assert_eq;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{AdmissionLedger, ServiceReview};
use crate::crd::PortPolicy;
use crate::governance::{Labels, NamespaceLabels, PolicySet};
use crate::nodeport::{AssignmentState, NodePortInput, allocate_node_ports};
use crate::ports::PortRange;
use crate::service::ServiceModel;

fn policy(name: &str, team: &str, node_ports: Value) -> PortPolicy {
    serde_json::from_value(json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {"team": team}}, "nodePorts": node_ports},
    }))
    .unwrap()
}

fn service(namespace: &str, name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name}, "spec": spec}))
    .unwrap()
}

fn node_port(namespace: &str, name: &str) -> Service {
    service(
        namespace,
        name,
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}]}),
    )
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

fn namespaces() -> NamespaceLabels {
    let labels = |team: &str| -> Labels { [("team".to_string(), team.to_string())].into() };
    NamespaceLabels::from_iter([("edge", labels("edge")), ("core", labels("core"))])
}

fn ledger(policies: &[PortPolicy]) -> AdmissionLedger {
    let mut ledger = AdmissionLedger::new(PortRange::DEFAULT_NODE_PORTS, Duration::from_secs(30));
    ledger.set_policies(policies, t0());
    ledger.set_namespaces(namespaces());
    ledger
}

fn create<'a>(service: &'a Service, uid: &'a str) -> ServiceReview<'a> {
    ServiceReview {
        service,
        old: None,
        uid,
        dry_run: false,
    }
}

/// Applies an admission's patch as the API server would.
fn patched(service: &Service, patch: &[Value]) -> Service {
    let mut value = serde_json::to_value(service).unwrap();
    let patch: json_patch_lite::Patch = patch.to_vec();
    json_patch_lite::apply(&mut value, &patch);
    serde_json::from_value(value).unwrap()
}

/// The few RFC 6902 `add` operations the ledger emits, applied without a JSON-patch crate (the
/// core has none; the operator's tests apply them with kube's).
mod json_patch_lite {
    use serde_json::Value;
    pub(super) type Patch = Vec<Value>;
    pub(super) fn apply(target: &mut Value, patch: &Patch) {
        for op in patch {
            assert_eq!(op["op"], "add", "{op}");
            let path = op["path"].as_str().unwrap();
            let mut parts: Vec<String> = path[1..]
                .split('/')
                .map(|p| p.replace("~1", "/").replace("~0", "~"))
                .collect();
            let last = parts.pop().unwrap();
            let mut at = &mut *target;
            for part in parts {
                at = match at {
                    Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
                    other => other.as_object_mut().unwrap().entry(part).or_insert(Value::Null),
                };
            }
            at.as_object_mut().unwrap().insert(last, op["value"].clone());
        }
    }
}

fn node_ports_of(service: &Service) -> Vec<Option<i32>> {
    let spec = service.spec.as_ref().unwrap();
    spec.ports.iter().flatten().map(|p| p.node_port).collect()
}

#[test]
fn a_governed_node_port_service_gets_the_port_a_reconcile_would_give_it() {
    let policies = [policy("edge", "edge", json!({"range": "31000-31099"}))];
    let mut ledger = ledger(&policies);
    let web = node_port("edge", "web");
    let answer = ledger.review(&create(&web, "u1"), t0());
    assert_eq!(answer.policy.as_deref(), Some("edge"));
    assert!(answer.warnings.is_empty(), "{:?}", answer.warnings);
    assert_eq!(answer.assigned.len(), 1);
    let (field, port) = answer.assigned[0].clone();
    assert_eq!(field, "spec.ports[0].nodePort");
    assert!((31000..=31099).contains(&port), "{port}");
    assert_eq!(
        answer.patch,
        [json!({"op": "add", "path": "/spec/ports/0/nodePort", "value": port})]
    );

    // The whole-cluster allocator, given the Service without a port, picks the same one.
    let set = PolicySet::compile(&policies);
    let models = [ServiceModel::read(&web)];
    let plan = allocate_node_ports(&NodePortInput {
        cluster_range: PortRange::DEFAULT_NODE_PORTS,
        policies: &set,
        records: &BTreeMap::new(),
        services: &models,
        namespace_labels: &namespaces(),
        now: t0(),
    });
    assert_eq!(plan.assignments[0].node_port, port);
    assert_eq!(plan.assignments[0].state, AssignmentState::Allocated);
}

#[test]
fn what_no_policy_with_a_range_governs_is_left_alone() {
    let policies = [
        policy("edge", "edge", json!({"range": "31000-31099"})),
        policy("twice", "edge", json!({"range": "32000-32099"})),
        policy("core", "core", json!(null)),
    ];
    let mut ledger = ledger(&policies[2..]);
    let cluster_ip = service("core", "db", json!({"ports": [{"port": 5432}]}));
    let in_core = node_port("core", "web");
    let elsewhere = node_port("other", "web");
    for svc in [&cluster_ip, &in_core, &elsewhere] {
        let answer = ledger.review(&create(svc, "u"), t0());
        assert!(
            answer.patch.is_empty() && answer.warnings.is_empty(),
            "{answer:?}"
        );
    }
    // Two policies selecting it: neither assigns, and the client is told why.
    let mut ledger = self::ledger(&policies[..2]);
    let answer = ledger.review(&create(&node_port("edge", "web"), "u"), t0());
    assert!(answer.patch.is_empty());
    assert!(
        answer.warnings[0].contains("PortPolicy/edge") && answer.warnings[0].contains("PortPolicy/twice"),
        "{:?}",
        answer.warnings
    );
    assert_eq!(ledger.pending_reservations(), 0);
}

#[test]
fn reviews_never_share_a_port_and_a_reservation_ends_with_its_timeout() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31000"}))]);
    let (a, b) = (node_port("edge", "a"), node_port("edge", "b"));
    let first = ledger.review(&create(&a, "ua"), t0());
    assert_eq!(first.assigned, [("spec.ports[0].nodePort".to_string(), 31000)]);
    // The only port is reserved for `a`, whose Service the watch has not shown yet.
    let second = ledger.review(&create(&b, "ub"), t0() + chrono::Duration::seconds(29));
    assert!(second.patch.is_empty());
    assert!(
        second.warnings[0].contains("Service/edge/b spec.ports[0].nodePort: no free nodePort"),
        "{:?}",
        second.warnings
    );
    // `a` never appears: after the timeout its port goes to the next review.
    let later = t0() + chrono::Duration::seconds(30);
    assert_eq!(ledger.expire(later), 1);
    let third = ledger.review(&create(&b, "ub2"), later);
    assert_eq!(third.assigned, [("spec.ports[0].nodePort".to_string(), 31000)]);
}

#[test]
fn the_watch_confirms_a_reservation_and_a_deletion_frees_the_port() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31000"}))]);
    let a = node_port("edge", "a");
    let answer = ledger.review(&create(&a, "ua"), t0());
    ledger.upsert_service(&patched(&a, &answer.patch));
    assert_eq!(ledger.pending_reservations(), 0);
    // Held by the Service now, past any timeout.
    let much_later = t0() + chrono::Duration::hours(1);
    let b = node_port("edge", "b");
    assert!(ledger.review(&create(&b, "ub"), much_later).patch.is_empty());
    ledger.remove_service("edge", "a");
    let answer = ledger.review(&create(&b, "ub"), much_later);
    assert_eq!(answer.assigned, [("spec.ports[0].nodePort".to_string(), 31000)]);
}

#[test]
fn an_event_from_before_the_write_does_not_end_the_reservation() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31000"}))]);
    let mut web = node_port("edge", "web");
    web.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    ledger.upsert_service(&web);
    let mut updated = web.clone();
    updated.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    let review = ServiceReview {
        service: &updated,
        old: Some(&web),
        uid: "u",
        dry_run: false,
    };
    assert_eq!(ledger.review(&review, t0()).assigned.len(), 1);
    // A late event of the ClusterIP version: the port stays reserved for the update.
    ledger.upsert_service(&web);
    assert_eq!(ledger.pending_reservations(), 1);
    let other = node_port("edge", "other");
    assert!(ledger.review(&create(&other, "u2"), t0()).patch.is_empty());
}

#[test]
fn a_repeated_review_gets_the_same_port_and_a_dry_run_reserves_nothing() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31099"}))]);
    let web = node_port("edge", "web");
    let dry = ServiceReview {
        dry_run: true,
        ..create(&web, "u0")
    };
    let dry_answer = ledger.review(&dry, t0());
    assert_eq!(dry_answer.assigned.len(), 1);
    assert_eq!(ledger.pending_reservations(), 0);
    let first = ledger.review(&create(&web, "u1"), t0());
    let again = ledger.review(&create(&web, "u2"), t0());
    assert_eq!(first.patch, again.patch);
    assert_eq!(
        first.patch, dry_answer.patch,
        "a dry run answers as the real request would"
    );
    assert_eq!(ledger.pending_reservations(), 1);
}

#[test]
fn an_update_needs_no_port_the_stored_service_holds() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31099"}))]);
    let mut stored = node_port("edge", "web");
    stored.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(31050);
    ledger.upsert_service(&stored);
    // `kubectl replace` of a manifest without nodePorts, plus a new port.
    let mut replaced = service(
        "edge",
        "web",
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]}),
    );
    replaced.metadata.resource_version = Some("7".into());
    let review = ServiceReview {
        service: &replaced,
        old: Some(&stored),
        uid: "u",
        dry_run: false,
    };
    let answer = ledger.review(&review, t0());
    assert_eq!(answer.assigned.len(), 1, "{answer:?}");
    assert_eq!(answer.assigned[0].0, "spec.ports[1].nodePort");
    assert_ne!(answer.assigned[0].1, 31050);
}

#[test]
fn ports_of_one_number_share_one_node_port() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31099"}))]);
    let dns = service(
        "edge",
        "dns",
        json!({"type": "NodePort", "ports": [
            {"name": "udp", "port": 53, "protocol": "UDP"}, {"name": "tcp", "port": 53, "protocol": "TCP"}]}),
    );
    let answer = ledger.review(&create(&dns, "u"), t0());
    let ports = node_ports_of(&patched(&dns, &answer.patch));
    assert_eq!(ports.len(), 2);
    assert!(ports[0].is_some() && ports[0] == ports[1], "{ports:?}");
}

#[test]
fn a_local_load_balancer_gets_its_health_check_port_from_the_range() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31099"}))]);
    let lb = service(
        "edge",
        "lb",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 443}]}),
    );
    let answer = ledger.review(&create(&lb, "u"), t0());
    let fields: Vec<&str> = answer.assigned.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(fields, ["spec.ports[0].nodePort", "spec.healthCheckNodePort"]);
    let after = patched(&lb, &answer.patch);
    let health = after.spec.as_ref().unwrap().health_check_node_port.unwrap();
    assert!((31000..=31099).contains(&health));
    assert_ne!(Some(health), node_ports_of(&after)[0]);

    // Local only through the legacy annotation: the port goes into the annotation.
    let legacy: Service = serde_json::from_value(json!({"metadata": {"namespace": "edge", "name": "old",
        "annotations": {"service.beta.kubernetes.io/external-traffic": "OnlyLocal"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 443}]}}))
    .unwrap();
    let answer = ledger.review(&create(&legacy, "u2"), t0());
    let after = patched(&legacy, &answer.patch);
    let annotation =
        &after.metadata.annotations.as_ref().unwrap()["service.beta.kubernetes.io/healthcheck-nodeport"];
    assert!((31000..=31099).contains(&annotation.parse::<u16>().unwrap()));
}

#[test]
fn pins_and_retained_records_are_given_back_to_their_identity() {
    let mut edge = policy(
        "edge",
        "edge",
        json!({"range": "31000-31099", "pinned": [{"namespace": "edge", "service": "pinned", "portName": "http", "nodePort": 31007}]}),
    );
    edge.status = Some(
        serde_json::from_value(json!({"allocations": [{"namespace": "edge", "service": "back",
            "portName": "http", "kind": "Service", "nodePort": 31042, "releasedAt": "2026-01-01T00:00:00Z"}]}))
        .unwrap(),
    );
    let mut ledger = ledger(std::slice::from_ref(&edge));
    let pinned = ledger.review(&create(&node_port("edge", "pinned"), "u1"), t0());
    assert_eq!(pinned.assigned[0].1, 31007);
    let back = ledger.review(&create(&node_port("edge", "back"), "u2"), t0());
    assert_eq!(back.assigned[0].1, 31042);
    // Nobody else gets either, nor a reserved or pinned port.
    for i in 0..98 {
        let answer = ledger.review(&create(&node_port("edge", &format!("s{i}")), "u"), t0());
        let port = answer.assigned[0].1;
        assert!(![31007, 31042].contains(&port), "s{i} got {port}");
    }
    let full = ledger.review(&create(&node_port("edge", "last"), "u"), t0());
    assert!(full.patch.is_empty(), "{full:?}");
}

#[test]
fn a_retained_record_on_a_port_reserved_since_is_not_given_back() {
    let mut edge = policy(
        "edge",
        "edge",
        json!({"range": "31000-31099", "reserved": ["31040-31049"]}),
    );
    edge.status = Some(
        serde_json::from_value(json!({"allocations": [{"namespace": "edge", "service": "back",
            "portName": "http", "kind": "Service", "nodePort": 31042, "releasedAt": "2026-01-01T00:00:00Z"}]}))
        .unwrap(),
    );
    let mut ledger = ledger(std::slice::from_ref(&edge));
    let back = ledger.review(&create(&node_port("edge", "back"), "u1"), t0());
    let port = back.assigned[0].1;
    assert!((31000..=31099).contains(&port), "{back:?}");
    assert!(
        !(31040..=31049).contains(&port),
        "restored onto a reserved port: {back:?}"
    );
}

#[test]
fn a_generated_name_is_reserved_under_the_review_uid() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31001"}))]);
    let mut generated = node_port("edge", "");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web-".into());
    let a = ledger.review(&create(&generated, "uid-a"), t0());
    let b = ledger.review(&create(&generated, "uid-b"), t0());
    assert_eq!(a.assigned.len(), 1);
    assert_eq!(b.assigned.len(), 1);
    assert_ne!(a.assigned[0].1, b.assigned[0].1);
    assert_eq!(ledger.pending_reservations(), 2);
}

#[test]
fn an_invalid_service_is_left_to_the_api_server_with_a_reason() {
    let mut ledger = ledger(&[policy("edge", "edge", json!({"range": "31000-31099"}))]);
    let bad = service(
        "edge",
        "bad",
        json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}),
    );
    let answer = ledger.review(&create(&bad, "u"), t0());
    assert!(answer.patch.is_empty());
    assert!(
        answer.warnings[0].contains("Service/edge/bad spec.ports[0].name"),
        "{:?}",
        answer.warnings
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the mix of existing Services, creations and deletions: every review gets a
    /// port nobody holds or was given, and the reconcile afterwards keeps every port given.
    #[test]
    fn reviews_and_the_reconcile_agree(
        existing in proptest::collection::btree_set(31000u16..31040, 0..20),
        creations in 1usize..40,
        deleted in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let policies = [policy("edge", "edge", json!({"range": "31000-31039"}))];
        let mut ledger = ledger(&policies);
        let mut services: Vec<Service> = existing
            .iter()
            .map(|&p| {
                let mut s = node_port("edge", &format!("old-{p}"));
                s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(i32::from(p));
                s
            })
            .collect();
        for s in &services {
            ledger.upsert_service(s);
        }
        for (i, &delete) in deleted.iter().enumerate().take(creations) {
            if delete && !services.is_empty() {
                let gone = services.remove(0);
                ledger.remove_service("edge", gone.metadata.name.as_deref().unwrap());
            }
            let new = node_port("edge", &format!("new-{i}"));
            let answer = ledger.review(&create(&new, "u"), t0());
            let held: BTreeSet<i32> = services.iter().flat_map(node_ports_of).flatten().collect();
            match answer.assigned.first() {
                Some(&(_, port)) => {
                    prop_assert!(!held.contains(&i32::from(port)), "{port} is held");
                    let created = patched(&new, &answer.patch);
                    // Half the Services show up in the watch at once, the rest stay pending.
                    if i % 2 == 0 {
                        ledger.upsert_service(&created);
                    }
                    services.push(created);
                }
                None => prop_assert_eq!(held.len(), 40, "no port while {} are held", held.len()),
            }
        }
        let all: Vec<i32> = services.iter().flat_map(node_ports_of).flatten().collect();
        let distinct: BTreeSet<i32> = all.iter().copied().collect();
        prop_assert_eq!(all.len(), distinct.len(), "a port given twice: {:?}", all);
        let set = PolicySet::compile(&policies);
        let models: Vec<ServiceModel<'_>> = services.iter().map(ServiceModel::read).collect();
        let plan = allocate_node_ports(&NodePortInput {
            cluster_range: PortRange::DEFAULT_NODE_PORTS,
            policies: &set,
            records: &BTreeMap::new(),
            services: &models,
            namespace_labels: &namespaces(),
            now: t0(),
        });
        prop_assert!(plan.service_changes().is_empty(), "the reconcile would move {:?}", plan.service_changes());
    }
}

/// A Service created while a review's reservation is in flight, without the webhook (it timed
/// out, say), is not given the port the review just handed out: the reconcile skips the
/// ledger's in-flight ports. The Service the review was for keeps its port once it holds it.
#[test]
fn the_reconcile_skips_ports_handed_out_by_in_flight_reviews() {
    use crate::nodeport::{NodePortProblemReason, allocate_node_ports_avoiding};
    let policies = [policy("edge", "edge", json!({"range": "31000-31000"}))];
    let mut ledger = ledger(&policies);
    let reviewed = node_port("edge", "reviewed");
    let answer = ledger.review(&create(&reviewed, "u1"), t0());
    assert_eq!(answer.assigned, [("spec.ports[0].nodePort".to_string(), 31000)]);
    assert_eq!(ledger.in_flight_ports(), [31000]);

    let set = PolicySet::compile(&policies);
    let bypassed = node_port("edge", "bypassed");
    let labels = namespaces();
    let plan = |models: &[ServiceModel<'_>], in_flight: &[u16]| {
        allocate_node_ports_avoiding(
            &NodePortInput {
                cluster_range: PortRange::DEFAULT_NODE_PORTS,
                policies: &set,
                records: &BTreeMap::new(),
                services: models,
                namespace_labels: &labels,
                now: t0(),
            },
            in_flight,
        )
    };
    // Without the in-flight ports the reconcile would hand 31000 out a second time.
    let models = [ServiceModel::read(&bypassed)];
    let blind = plan(&models, &[]);
    assert_eq!(blind.assignments[0].node_port, 31000);
    let plan_now = plan(&models, &ledger.in_flight_ports());
    assert!(
        plan_now.assignments.iter().all(|a| a.node_port != 31000),
        "{:?}",
        plan_now.assignments
    );
    assert!(
        plan_now
            .problems
            .iter()
            .any(|p| p.reason == NodePortProblemReason::RangeExhausted),
        "{:?}",
        plan_now.problems
    );

    // The reviewed Service appears holding its port: it keeps it, and the bypassing one still
    // gets nothing (the range has one port).
    let created = patched(&reviewed, &answer.patch);
    let models = [ServiceModel::read(&created), ServiceModel::read(&bypassed)];
    let later = plan(&models, &ledger.in_flight_ports());
    let kept: Vec<_> = (later.assignments.iter())
        .map(|a| (a.service.as_str(), a.node_port, a.state))
        .collect();
    assert_eq!(kept, [("reviewed", 31000, AssignmentState::Existing)]);
    ledger.upsert_service(&created);
    assert!(ledger.in_flight_ports().is_empty(), "the watch confirmed it");
}

/// Policies compiled outside the ledger and installed give the same answers as setting them.
#[test]
fn policies_compiled_beforehand_answer_as_set_ones() {
    use crate::nodeport::LedgerPolicies;
    let policies = [policy(
        "edge",
        "edge",
        json!({"range": "31000-31099", "reserved": ["31000-31049"]}),
    )];
    let mut set = ledger(&policies);
    let mut installed = AdmissionLedger::new(PortRange::DEFAULT_NODE_PORTS, Duration::from_secs(30));
    installed.set_namespaces(namespaces());
    let compiled = LedgerPolicies::compile(&policies, installed.cluster_range(), t0());
    installed.install_policies(compiled);
    for i in 0..10 {
        let web = node_port("edge", &format!("web-{i}"));
        let a = set.review(&create(&web, &format!("u{i}")), t0());
        let b = installed.review(&create(&web, &format!("u{i}")), t0());
        assert_eq!(a.assigned, b.assigned);
        assert!(a.assigned.iter().all(|(_, p)| *p >= 31050), "{:?}", a.assigned);
    }
}
