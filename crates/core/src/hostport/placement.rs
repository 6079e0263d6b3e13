//! Pods with the ports they hold on their node: real Pods as they are, and the Pods that
//! DaemonSets, Deployments and StatefulSets would create, predicted before they exist.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::problem::{Problem, object_ref};
use crate::snapshot::Snapshot;

use super::binding::HostPortBinding;
use super::eligibility::{NodeFacts, PlacementRules, Placer};
use super::pod::{HostPortPod, HostPortPodSpec};

/// A Pod on a node and the host ports it holds there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedPod {
    /// `namespace/name` for a real Pod, `namespace/workload@node` for a predicted one.
    pub pod: String,
    pub namespace: String,
    pub node: String,
    pub bindings: Vec<HostPortBinding>,
}

/// The real Pods that hold host ports: bound to a node, not terminated, with at least one
/// binding. Pods holding none are left out, since they cannot take part in a conflict. Problems
/// name the Pod and field of each invalid port.
pub fn placed_pods<'a>(pods: impl IntoIterator<Item = &'a HostPortPod>) -> (Vec<PlacedPod>, Vec<Problem>) {
    let mut placed = Vec::new();
    let mut problems = Vec::new();
    for pod in pods {
        let spec = &pod.spec;
        if (spec.containers.is_empty() && spec.init_containers.is_empty()) || !pod.holds_ports() {
            continue;
        }
        let (bindings, pod_problems) = pod.bindings();
        problems.extend(pod_problems);
        if bindings.is_empty() {
            continue;
        }
        let namespace = pod.namespace();
        placed.push(PlacedPod {
            pod: format!("{namespace}/{}", pod.name()),
            namespace: namespace.to_string(),
            node: spec.node_name.clone().unwrap_or_default(),
            bindings,
        });
    }
    (placed, problems)
}

/// A workload manifest whose Pods are predicted.
struct Workload<'a> {
    kind: &'static str,
    metadata: &'a ObjectMeta,
    template: Option<&'a PodSpec>,
    scale: Scale,
}

enum Scale {
    /// A DaemonSet: one Pod on every node its template admits.
    EveryNode,
    /// `spec.replicas` of a Deployment or StatefulSet (1 when unset).
    Replicas(Option<i32>),
}

impl Workload<'_> {
    fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("<unnamed>")
    }
}

/// Predicts where the workloads in `snapshot` put Pods that hold host ports, given the Pods
/// already `existing` (usually [`placed_pods`] of the real Pods).
///
/// - A DaemonSet gets a Pod on every node its template admits (nodeName, nodeSelector, required
///   node affinity, taints against tolerations plus those its controller adds). Its controller
///   does not look at ports, so a DaemonSet Pod can conflict; [`super::detect_conflicts`] says so.
/// - A Deployment or StatefulSet with host ports fits at most one replica per node, and the
///   scheduler only picks a node where those ports are free. Replicas go to the first such nodes
///   in name order; replicas beyond them would stay Pending and are reported on `spec.replicas`.
///
/// DaemonSets come first (they ignore ports), then Deployments, then StatefulSets, each in
/// `namespace/name` order; every prediction occupies its ports for the ones after it.
/// A manifest is always predicted, even if its real Pods are in the snapshot too: a snapshot
/// holding both counts those Pods twice. Workloads without host ports are skipped.
pub fn predict_workloads(snapshot: &Snapshot, existing: &[PlacedPod]) -> (Vec<PlacedPod>, Vec<Problem>) {
    let mut nodes: Vec<NodeFacts> = snapshot.nodes.iter().filter_map(NodeFacts::of).collect();
    nodes.sort_by(|a, b| a.name.cmp(b.name));
    let mut occupied: HashMap<&str, Vec<HostPortBinding>> = HashMap::new();
    for pod in existing {
        occupied.entry(&pod.node).or_default().extend(&pod.bindings);
    }

    let mut workloads: Vec<Workload> = Vec::new();
    workloads.extend(in_name_order(snapshot.daemon_sets.iter().map(|ds| Workload {
        kind: "DaemonSet",
        metadata: &ds.metadata,
        template: ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        scale: Scale::EveryNode,
    })));
    workloads.extend(in_name_order(snapshot.deployments.iter().map(|d| Workload {
        kind: "Deployment",
        metadata: &d.metadata,
        template: d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        scale: Scale::Replicas(d.spec.as_ref().and_then(|s| s.replicas)),
    })));
    workloads.extend(in_name_order(snapshot.stateful_sets.iter().map(|s| Workload {
        kind: "StatefulSet",
        metadata: &s.metadata,
        template: s.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        scale: Scale::Replicas(s.spec.as_ref().and_then(|s| s.replicas)),
    })));

    let mut predicted = Vec::new();
    let mut problems = Vec::new();
    for workload in &workloads {
        let Some(spec) = workload.template else {
            continue;
        };
        let object = object_ref(workload.kind, Some(workload.namespace()), workload.name());
        let prefix = "spec.template.spec";
        let (bindings, binding_problems) = HostPortPodSpec::from_pod_spec(spec).bindings(&object, prefix);
        problems.extend(binding_problems);
        if bindings.is_empty() {
            continue;
        }
        let placer = match workload.scale {
            Scale::EveryNode => Placer::DaemonSet,
            Scale::Replicas(_) => Placer::Scheduler,
        };
        let rules = PlacementRules::compile(spec, placer, &object, prefix, &mut problems);
        let mut place = |node: &NodeFacts| {
            predicted.push(PlacedPod {
                pod: format!("{}/{}@{}", workload.namespace(), workload.name(), node.name),
                namespace: workload.namespace().to_string(),
                node: node.name.to_string(),
                bindings: bindings.clone(),
            });
        };

        let Scale::Replicas(replicas) = workload.scale else {
            for node in nodes.iter().filter(|n| rules.admits(n)) {
                place(node);
                occupied.entry(node.name).or_default().extend(&bindings);
            }
            continue;
        };
        let replicas = replicas.unwrap_or(1);
        if replicas < 0 {
            problems.push(Problem::new(
                &object,
                "spec.replicas",
                format!("{replicas} is negative"),
            ));
            continue;
        }
        let wanted = usize::try_from(replicas).unwrap_or_default();
        let mut placed = 0;
        for node in nodes.iter().filter(|n| rules.admits(n)) {
            if placed == wanted {
                break;
            }
            let free = occupied
                .get(node.name)
                .is_none_or(|held| !held.iter().any(|h| bindings.iter().any(|b| b.conflicts_with(h))));
            if free {
                place(node);
                occupied.entry(node.name).or_default().extend(&bindings);
                placed += 1;
            }
        }
        if placed < wanted {
            let admitted = nodes.iter().filter(|n| rules.admits(n)).count();
            let ports: Vec<String> = bindings.iter().map(ToString::to_string).collect();
            problems.push(Problem::new(
                &object,
                "spec.replicas",
                format!(
                    "{wanted} replicas each need host ports {}, so at most one fits a node, but only {placed} \
                     of the {admitted} nodes the Pod template may run on (of {} in the snapshot) have them \
                     free: {} replicas would stay Pending",
                    ports.join(", "),
                    nodes.len(),
                    wanted - placed
                ),
            ));
        }
    }
    (predicted, problems)
}

fn in_name_order<'a>(workloads: impl Iterator<Item = Workload<'a>>) -> Vec<Workload<'a>> {
    let mut workloads: Vec<_> = workloads.collect();
    workloads.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    workloads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Protocol;
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    fn snapshot(objects: Value) -> Snapshot {
        let loaded = crate::snapshot::parse_str("test.yaml", &objects.to_string());
        assert_eq!(loaded.problems, []);
        loaded.snapshot
    }

    fn node(name: &str, labels: Value, taints: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}})
    }

    fn workload(kind: &str, name: &str, replicas: Option<i32>, template_spec: Value) -> Value {
        let mut spec = json!({
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": template_spec},
        });
        if let Some(r) = replicas {
            spec["replicas"] = json!(r);
        }
        json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": "ops"}, "spec": spec})
    }

    fn host_port(port: i32) -> Value {
        json!({"containers": [{"name": "main", "image": "x", "ports": [{"containerPort": port, "hostPort": port}]}]})
    }

    fn names(pods: &[PlacedPod]) -> Vec<&str> {
        pods.iter().map(|p| p.pod.as_str()).collect()
    }

    fn three_nodes() -> Vec<Value> {
        vec![
            node("n1", json!({"role": "edge"}), json!([])),
            node(
                "n2",
                json!({"role": "edge"}),
                json!([{"key": "maintenance", "effect": "NoExecute"}]),
            ),
            node("n3", json!({"role": "worker"}), json!([])),
        ]
    }

    #[test]
    fn real_pods_hold_ports_only_when_bound_and_running() {
        let pod = |name: &str, node: Option<&str>, phase: &str| -> HostPortPod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let no_ports: HostPortPod = serde_json::from_value(json!({
            "metadata": {"name": "plain", "namespace": "ns"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
        }))
        .unwrap();
        let pods = [
            pod("running", Some("n1"), "Running"),
            pod("done", Some("n1"), "Succeeded"),
            pod("failed", Some("n1"), "Failed"),
            pod("pending", None, "Pending"),
            pod("bound", Some("n2"), "Pending"),
            no_ports,
        ];
        let (placed, problems) = placed_pods(&pods);
        assert_eq!(problems, []);
        assert_eq!(names(&placed), ["ns/running", "ns/bound"]);
        assert_eq!(placed[1].node, "n2");
        assert_eq!(placed[1].bindings[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn daemon_set_lands_on_every_node_it_admits() {
        let mut objects = three_nodes();
        objects.push(workload("DaemonSet", "agent", None, host_port(9100)));
        let mut edge_only = host_port(9200);
        edge_only["nodeSelector"] = json!({"role": "edge"});
        edge_only["tolerations"] = json!([{"key": "maintenance", "operator": "Exists"}]);
        objects.push(workload("DaemonSet", "edge", None, edge_only));
        objects.push(workload(
            "DaemonSet",
            "portless",
            None,
            json!({"containers": [{"name": "c", "image": "x"}]}),
        ));
        let (predicted, problems) = predict_workloads(
            &snapshot(json!({"kind": "List", "apiVersion": "v1", "items": objects})),
            &[],
        );
        assert_eq!(problems, []);
        assert_eq!(
            names(&predicted),
            ["ops/agent@n1", "ops/agent@n3", "ops/edge@n1", "ops/edge@n2"]
        );
        assert_eq!(predicted[3].node, "n2");
        assert_eq!(predicted[3].namespace, "ops");
    }

    #[test]
    fn deployment_replicas_beyond_nodes_with_free_ports_are_reported() {
        let mut objects = three_nodes();
        objects.push(workload("Deployment", "ingress", Some(3), host_port(443)));
        objects.push(workload("StatefulSet", "db", Some(1), host_port(443)));
        objects.push(workload("Deployment", "fits", Some(2), host_port(8080)));
        objects.push(workload(
            "Deployment",
            "many-without-ports",
            Some(50),
            json!({"containers": [{"name": "c", "image": "x"}]}),
        ));
        objects.push(workload("Deployment", "default-one", None, host_port(7000)));
        let s = snapshot(json!({"kind": "List", "apiVersion": "v1", "items": objects}));
        // A real Pod already holds 443 on n3.
        let existing = [PlacedPod {
            pod: "web/proxy".into(),
            namespace: "web".into(),
            node: "n3".into(),
            bindings: vec![HostPortBinding {
                protocol: Protocol::Tcp,
                host_ip: "10.0.0.3".parse().unwrap(),
                host_port: 443,
            }],
        }];
        let (predicted, problems) = predict_workloads(&s, &existing);
        // n2 is tainted, n3 has 443 taken: ingress gets n1 only; db then finds no node.
        assert_eq!(
            names(&predicted),
            [
                "ops/default-one@n1",
                "ops/fits@n1",
                "ops/fits@n3",
                "ops/ingress@n1"
            ]
        );
        let found: Vec<_> = problems
            .iter()
            .map(|p| (p.object.as_str(), p.field.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("Deployment/ops/ingress", "spec.replicas"),
                ("StatefulSet/ops/db", "spec.replicas")
            ]
        );
        assert!(
            problems[0].message.contains("only 1 of the 2 nodes")
                && problems[0].message.contains("2 replicas would stay Pending"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn invalid_template_ports_name_the_workload_field() {
        let objects = vec![
            node("n1", json!({}), json!([])),
            workload(
                "DaemonSet",
                "bad",
                None,
                json!({"containers": [{"name": "c", "image": "x", "ports": [
                    {"containerPort": 53, "hostPort": 53, "protocol": "UDP"},
                    {"containerPort": 80, "hostPort": 80, "hostIP": "localhost"},
                ]}]}),
            ),
        ];
        let (predicted, problems) = predict_workloads(
            &snapshot(json!({"kind": "List", "apiVersion": "v1", "items": objects})),
            &[],
        );
        assert_eq!(names(&predicted), ["ops/bad@n1"]);
        assert_eq!(predicted[0].bindings.len(), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, "DaemonSet/ops/bad");
        assert_eq!(
            problems[0].field,
            "spec.template.spec.containers[0].ports[1].hostIP"
        );
    }
}
