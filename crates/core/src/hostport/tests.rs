//! Conflict detection, rule by rule, and the whole flow over snapshots in real object shapes.

use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;
use crate::crd::PortPolicy;
use crate::governance::{Labels, NamespaceLabels};
use crate::ports::Protocol;

/// `"TCP 0.0.0.0:80"` or `"UDP [::]:53"`.
fn binding(text: &str) -> HostPortBinding {
    let (protocol, address) = text.split_once(' ').unwrap();
    let (ip, port) = address.rsplit_once(':').unwrap();
    HostPortBinding {
        protocol: Protocol::from_k8s(Some(protocol)).unwrap(),
        host_ip: ip.trim_start_matches('[').trim_end_matches(']').parse().unwrap(),
        host_port: port.parse().unwrap(),
    }
}

/// A placed pod from `"ns/name@node"` and its bindings.
fn placed(at: &str, bindings: &[&str]) -> PlacedPod {
    let (pod, node) = at.split_once('@').unwrap();
    PlacedPod {
        pod: pod.to_string(),
        namespace: pod.split_once('/').unwrap().0.to_string(),
        node: node.to_string(),
        bindings: bindings.iter().map(|b| binding(b)).collect(),
    }
}

fn policies(specs: &[(&str, Value)]) -> PolicySet {
    let objects: Vec<PortPolicy> = specs
        .iter()
        .map(|(name, spec)| {
            serde_json::from_value(json!({
                "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                "metadata": {"name": name}, "spec": spec,
            }))
            .unwrap()
        })
        .collect();
    let set = PolicySet::compile(&objects);
    assert_eq!(set.problems(), []);
    set
}

fn detect(pods: &[PlacedPod], set: &PolicySet, namespaces: &NamespaceLabels) -> Vec<HostPortConflict> {
    detect_conflicts(&ConflictInput {
        pods,
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        policies: set,
        namespace_labels: namespaces,
    })
}

/// Each conflict as `(reason, node, binding, pods)`.
fn summary(conflicts: &[HostPortConflict]) -> Vec<(&'static str, String, String, String)> {
    conflicts
        .iter()
        .map(|c| {
            (
                c.reason.as_str(),
                c.node.clone(),
                c.binding().to_string(),
                c.pods.join(","),
            )
        })
        .collect()
}

#[test]
fn pod_conflict_rules() {
    type Case<'a> = (&'a str, Vec<PlacedPod>, Vec<(&'a str, &'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "wildcard vs specific",
            vec![
                placed("a/x@n1", &["TCP 0.0.0.0:80"]),
                placed("b/y@n1", &["TCP 10.0.0.1:80"]),
            ],
            vec![("n1", "TCP 0.0.0.0:80", "a/x,b/y")],
        ),
        (
            "specific vs wildcard",
            vec![
                placed("a/x@n1", &["TCP 10.0.0.1:80"]),
                placed("b/y@n1", &["TCP 0.0.0.0:80"]),
            ],
            vec![("n1", "TCP 0.0.0.0:80", "a/x,b/y")],
        ),
        (
            "IPv6 wildcard takes IPv4 addresses too",
            vec![
                placed("a/x@n1", &["TCP [::]:80"]),
                placed("b/y@n1", &["TCP 10.0.0.1:80"]),
            ],
            vec![("n1", "TCP [::]:80", "a/x,b/y")],
        ),
        (
            "both wildcards: reported on 0.0.0.0",
            vec![
                placed("a/x@n1", &["UDP [::]:53"]),
                placed("b/y@n1", &["UDP 0.0.0.0:53"]),
            ],
            vec![("n1", "UDP 0.0.0.0:53", "a/x,b/y")],
        ),
        (
            "same specific address",
            vec![
                placed("a/x@n1", &["TCP [fd00::1]:80"]),
                placed("b/y@n1", &["TCP [fd00::1]:80"]),
            ],
            vec![("n1", "TCP [fd00::1]:80", "a/x,b/y")],
        ),
        (
            "two different specific addresses share a port",
            vec![
                placed("a/x@n1", &["TCP 10.0.0.1:80"]),
                placed("b/y@n1", &["TCP 10.0.0.2:80"]),
            ],
            vec![],
        ),
        (
            "TCP and UDP never conflict",
            vec![
                placed("a/x@n1", &["TCP 0.0.0.0:53"]),
                placed("b/y@n1", &["UDP 0.0.0.0:53"]),
            ],
            vec![],
        ),
        (
            "same port on different nodes",
            vec![
                placed("a/x@n1", &["TCP 0.0.0.0:80"]),
                placed("b/y@n2", &["TCP 0.0.0.0:80"]),
            ],
            vec![],
        ),
        (
            "three pods in one conflict around a wildcard",
            vec![
                placed("c/z@n1", &["TCP 10.0.0.2:80"]),
                placed("a/x@n1", &["TCP 0.0.0.0:80"]),
                placed("b/y@n1", &["TCP 10.0.0.1:80"]),
            ],
            vec![("n1", "TCP 0.0.0.0:80", "a/x,b/y,c/z")],
        ),
        (
            "without a wildcard, each address is its own conflict",
            vec![
                placed("a/w@n1", &["TCP 10.0.0.1:80"]),
                placed("a/x@n1", &["TCP 10.0.0.1:80"]),
                placed("a/y@n1", &["TCP 10.0.0.2:80"]),
                placed("a/z@n1", &["TCP 10.0.0.2:80"]),
                placed("a/alone@n1", &["TCP 10.0.0.3:80"]),
            ],
            vec![
                ("n1", "TCP 10.0.0.1:80", "a/w,a/x"),
                ("n1", "TCP 10.0.0.2:80", "a/y,a/z"),
            ],
        ),
        (
            "one pod overlapping itself is not a pod conflict",
            vec![placed("a/x@n1", &["TCP 0.0.0.0:80", "TCP 10.0.0.1:80"])],
            vec![],
        ),
    ];
    let none = PolicySet::default();
    for (name, pods, want) in cases {
        let got = detect(&pods, &none, &NamespaceLabels::default());
        let want: Vec<_> = want
            .into_iter()
            .map(|(node, b, pods)| ("PodConflict", node.to_string(), b.to_string(), pods.to_string()))
            .collect();
        assert_eq!(summary(&got), want, "{name}");
        assert!(got.iter().all(|c| c.policies.is_empty()), "{name}");
    }
}

#[test]
fn node_port_range_is_reported_unless_the_governing_policy_allows_it() {
    let set = policies(&[
        (
            "allow-range",
            json!({"namespaceSelector": {"matchLabels": {"range": "ok"}}, "hostPorts": {"allowInNodePortRange": true}}),
        ),
        (
            "strict",
            json!({"namespaceSelector": {"matchLabels": {"team": "strict"}}}),
        ),
    ]);
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let namespaces = NamespaceLabels::from_iter([
        ("relaxed".to_string(), labels(&[("range", "ok")])),
        ("both".to_string(), labels(&[("range", "ok"), ("team", "strict")])),
    ]);
    let pods = [
        placed("relaxed/a@n1", &["TCP 0.0.0.0:30080"]),
        placed("both/b@n1", &["TCP 0.0.0.0:30081"]),
        placed("ungoverned/c@n1", &["UDP 10.0.0.1:32767"]),
        placed("ungoverned/d@n1", &["UDP 10.0.0.1:29999"]),
    ];
    let got = detect(&pods, &set, &namespaces);
    assert_eq!(
        summary(&got),
        [
            (
                "InNodePortRange",
                "n1".into(),
                "TCP 0.0.0.0:30081".into(),
                "both/b".into()
            ),
            (
                "InNodePortRange",
                "n1".into(),
                "UDP 10.0.0.1:32767".into(),
                "ungoverned/c".into()
            ),
        ]
    );
    assert_eq!(got[0].policies, ["strict"]);
    assert_eq!(got[1].policies, Vec::<String>::new());

    let narrow = detect_conflicts(&ConflictInput {
        pods: &pods,
        node_port_range: "29000-29999".parse().unwrap(),
        policies: &set,
        namespace_labels: &namespaces,
    });
    assert_eq!(
        summary(&narrow),
        [(
            "InNodePortRange",
            "n1".into(),
            "UDP 10.0.0.1:29999".into(),
            "ungoverned/d".into()
        )]
    );
}

#[test]
fn ports_outside_allowed_are_reported_to_the_policies_that_deny_them() {
    let set = policies(&[
        (
            "monitoring",
            json!({
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "hostPorts": {"allowed": ["9100-9200"]},
            }),
        ),
        (
            "everywhere",
            json!({"hostPorts": {"allowed": ["80", "443", "9100"]}}),
        ),
        (
            "anything",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}}),
        ),
    ]);
    // No namespace labels given: the automatic name label still selects.
    let pods = [
        placed("monitoring/exporter@n1", &["TCP 0.0.0.0:9100"]),
        placed("monitoring/agent@n1", &["TCP 0.0.0.0:9150"]),
        placed("monitoring/debug@n2", &["TCP 0.0.0.0:8080"]),
        placed("web/front@n2", &["TCP 0.0.0.0:443", "TCP 0.0.0.0:8443"]),
    ];
    let got = detect(&pods, &set, &NamespaceLabels::default());
    let found: Vec<_> = got
        .iter()
        .map(|c| {
            (
                c.node.as_str(),
                c.host_port,
                c.reason,
                c.pods.join(","),
                c.policies.join(","),
            )
        })
        .collect();
    use ConflictReason::NotAllowed;
    assert_eq!(
        found,
        [
            (
                "n1",
                9150,
                NotAllowed,
                "monitoring/agent".into(),
                "everywhere".into()
            ),
            (
                "n2",
                8080,
                NotAllowed,
                "monitoring/debug".into(),
                "everywhere,monitoring".into()
            ),
            ("n2", 8443, NotAllowed, "web/front".into(), "everywhere".into()),
        ]
    );
    assert_eq!(
        got[1].to_string(),
        "node n2: TCP 0.0.0.0:8080 is not in spec.hostPorts.allowed of PortPolicy everywhere, monitoring: monitoring/debug"
    );
}

#[test]
fn pod_conflicts_concern_every_policy_governing_a_pod_involved() {
    let set = policies(&[
        (
            "a-team",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "a"}}}),
        ),
        (
            "b-team",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}),
        ),
        (
            "c-team",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "c"}}}),
        ),
    ]);
    let pods = [
        placed("b/y@n1", &["TCP 0.0.0.0:80"]),
        placed("a/x@n1", &["TCP 0.0.0.0:80"]),
    ];
    let got = detect(&pods, &set, &NamespaceLabels::default());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].policies, ["a-team", "b-team"]);
    let record = got[0].to_record();
    assert_eq!(
        serde_json::to_value(&record).unwrap(),
        json!({"node": "n1", "protocol": "TCP", "hostIP": "0.0.0.0", "hostPort": 80, "pods": ["a/x", "b/y"], "reason": "PodConflict"})
    );
    assert_eq!(
        got[0].to_string(),
        "node n1: 2 Pods want TCP 0.0.0.0:80, only one can have it: a/x, b/y"
    );
}

#[test]
fn output_is_sorted_and_independent_of_input_order() {
    let set = policies(&[("strict", json!({"hostPorts": {"allowed": ["1-1000"]}}))]);
    let mut pods = vec![
        placed("a/p1@n2", &["TCP 0.0.0.0:31000", "UDP 0.0.0.0:53"]),
        placed("a/p2@n2", &["TCP 0.0.0.0:31000"]),
        placed("a/p3@n1", &["UDP 0.0.0.0:53", "TCP 10.0.0.1:8080"]),
        placed("a/p4@n1", &["UDP 10.0.0.9:53", "TCP 10.0.0.1:8080"]),
        placed("a/p5@n10", &["SCTP [fd00::1]:9999"]),
    ];
    let first = detect(&pods, &set, &NamespaceLabels::default());
    let keys: Vec<_> = first
        .iter()
        .map(|c| (c.node.as_str(), c.host_port, c.protocol, c.reason))
        .collect();
    use ConflictReason::*;
    use Protocol::*;
    assert_eq!(
        keys,
        [
            ("n1", 53, Udp, PodConflict),
            ("n1", 8080, Tcp, PodConflict),
            ("n1", 8080, Tcp, NotAllowed),
            ("n10", 9999, Sctp, NotAllowed),
            ("n2", 31000, Tcp, PodConflict),
            ("n2", 31000, Tcp, InNodePortRange),
            ("n2", 31000, Tcp, NotAllowed),
        ]
    );
    pods.reverse();
    assert_eq!(detect(&pods, &set, &NamespaceLabels::default()), first);
    pods.swap(0, 3);
    assert_eq!(detect(&pods, &set, &NamespaceLabels::default()), first);
}

fn pod(name: &str, node: Option<&str>, phase: &str, spec: Value) -> Value {
    let mut spec = spec;
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}")},
        "spec": spec,
        "status": {"phase": phase},
    })
}

fn container(port: i32) -> Value {
    json!({"name": "main", "image": "example/app:1", "ports": [{"containerPort": port, "hostPort": port}]})
}

fn check(items: Vec<Value>) -> HostPortReport {
    let loaded = crate::snapshot::parse_str(
        "cluster.json",
        &json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    );
    assert_eq!(loaded.problems, []);
    check_snapshot(
        &loaded.snapshot,
        &PolicySet::default(),
        PortRange::DEFAULT_NODE_PORTS,
    )
}

#[test]
fn which_pods_hold_ports_end_to_end() {
    let holder = pod(
        "holder",
        Some("n1"),
        "Running",
        json!({"containers": [container(8080)]}),
    );
    let cases: Vec<(&str, Value, bool)> = vec![
        (
            "regular container",
            pod(
                "other",
                Some("n1"),
                "Running",
                json!({"containers": [container(8080)]}),
            ),
            true,
        ),
        (
            "sidecar init container",
            pod(
                "side",
                Some("n1"),
                "Running",
                json!({"containers": [{"name": "app", "image": "x"}],
                "initContainers": [{"name": "proxy", "image": "x", "restartPolicy": "Always", "ports": [{"containerPort": 8080, "hostPort": 8080}]}]}),
            ),
            true,
        ),
        (
            "ordinary init container",
            pod(
                "init",
                Some("n1"),
                "Running",
                json!({"containers": [{"name": "app", "image": "x"}],
                "initContainers": [{"name": "setup", "image": "x", "ports": [{"containerPort": 8080, "hostPort": 8080}]}]}),
            ),
            false,
        ),
        (
            "hostNetwork pod binds its containerPort",
            pod(
                "hostnet",
                Some("n1"),
                "Running",
                json!({"hostNetwork": true,
                "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}]}),
            ),
            true,
        ),
        (
            "succeeded pod",
            pod(
                "done",
                Some("n1"),
                "Succeeded",
                json!({"containers": [container(8080)]}),
            ),
            false,
        ),
        (
            "failed pod",
            pod(
                "crashed",
                Some("n1"),
                "Failed",
                json!({"containers": [container(8080)]}),
            ),
            false,
        ),
        (
            "unscheduled pod",
            pod(
                "waiting",
                None,
                "Pending",
                json!({"containers": [container(8080)]}),
            ),
            false,
        ),
        (
            "pod on another node",
            pod(
                "away",
                Some("n2"),
                "Running",
                json!({"containers": [container(8080)]}),
            ),
            false,
        ),
        (
            "other protocol",
            pod(
                "udp",
                Some("n1"),
                "Running",
                json!({"containers": [{"name": "c", "image": "x",
            "ports": [{"containerPort": 8080, "hostPort": 8080, "protocol": "UDP"}]}]}),
            ),
            false,
        ),
    ];
    for (name, second, conflict) in cases {
        let report = check(vec![holder.clone(), second]);
        assert_eq!(report.problems, [], "{name}");
        assert_eq!(
            report.conflicts.len(),
            usize::from(conflict),
            "{name}: {:?}",
            report.conflicts
        );
        if conflict {
            assert_eq!(report.conflicts[0].pods[0], "apps/holder", "{name}");
            assert_eq!(report.conflicts[0].reason, ConflictReason::PodConflict, "{name}");
        }
    }
}

#[test]
fn duplicate_within_a_pod_is_a_problem_not_a_conflict() {
    let report = check(vec![pod(
        "twice",
        Some("n1"),
        "Running",
        json!({"containers": [container(8080), {"name": "copy", "image": "x", "ports": [{"containerPort": 9090, "hostPort": 8080, "hostIP": "0.0.0.0"}]}]}),
    )]);
    assert_eq!(report.conflicts, []);
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].object, "Pod/apps/twice");
    assert_eq!(report.problems[0].field, "spec.containers[1].ports[0]");
    assert_eq!(report.pods[0].bindings.len(), 1);
}

#[test]
fn daemon_set_predicted_onto_a_node_where_the_port_is_taken() {
    let node = |name: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
    let exporter = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "node-exporter", "namespace": "monitoring"},
        "spec": {
            "selector": {"matchLabels": {"app": "node-exporter"}},
            "template": {
                "metadata": {"labels": {"app": "node-exporter"}},
                "spec": {"hostNetwork": true, "containers": [{"name": "exporter", "image": "prom/node-exporter:v1.8.2",
                    "ports": [{"containerPort": 9100, "name": "metrics"}]}]},
            },
        },
    });
    let squatter = pod(
        "squatter",
        Some("n2"),
        "Running",
        json!({"containers": [{"name": "c", "image": "x",
        "ports": [{"containerPort": 80, "hostPort": 9100, "hostIP": "192.168.0.12"}]}]}),
    );
    let report = check(vec![node("n1"), node("n2"), node("n3"), exporter, squatter]);
    assert_eq!(report.problems, []);
    assert_eq!(report.pods.len(), 4);
    assert_eq!(
        summary(&report.conflicts),
        [(
            "PodConflict",
            "n2".into(),
            "TCP 0.0.0.0:9100".into(),
            "apps/squatter,monitoring/node-exporter@n2".into()
        )]
    );
}
