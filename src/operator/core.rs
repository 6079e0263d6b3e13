//! One reconcile's computation: the reflector stores' contents in, per-policy facts and Service
//! intents out. Pure (the clock is an argument), so the benchmark and the mock-API tests run it
//! exactly as the controller does, and it calls the same core `portpolicy plan` calls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::ResourceExt;

use super::services::{self, ServiceKey};
use super::status::{AgentFacts, NodePortFacts, PolicyFacts};
use portpolicy_core::crd::{CompiledPolicy, ExternalTrafficRule, NodePortKind, PortPolicy};
use portpolicy_core::governance::{Governance, NamespaceLabels, PolicySet};
use portpolicy_core::hostport::{
    ConflictInput, HostPortConflict, HostPortPod, detect_conflicts, placed_pods,
};
use portpolicy_core::intent::{HealthCheckNodePort, ServiceIntent, ServicePortNodePort};
use portpolicy_core::nodeport::{
    AssignmentState, NodePortAllocation, NodePortAssignment, NodePortInput, NodePortProblemReason,
    allocate_node_ports_avoiding,
};
use portpolicy_core::ports::PortRange;
use portpolicy_core::service::{ExternalTraffic, HealthCheckField, ServiceFields, ServiceModel};

pub use portpolicy_core::nodeport::NodePortCounts;

/// What the stores hold when a reconcile starts.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub policies: &'a [Arc<PortPolicy>],
    pub services: &'a [Arc<Service>],
    pub pods: &'a [Arc<HostPortPod>],
    pub namespaces: &'a [Arc<Namespace>],
    pub cluster_range: PortRange,
    pub now: chrono::DateTime<chrono::Utc>,
    /// Ports the admission webhook handed out whose Services the stores do not show yet:
    /// automatic allocation skips them.
    pub in_flight: &'a [u16],
}

/// The core's answer for the whole cluster; each policy's reconcile acts on its own part.
pub struct Computation {
    pub policy_set: PolicySet,
    pub namespace_labels: NamespaceLabels,
    /// The Services, each with whether it is `externalTrafficPolicy: Local` once the operator's
    /// writes land (as the allocator saw it).
    services: Vec<(Arc<Service>, bool)>,
    pub allocation: NodePortAllocation,
    pub conflicts: Vec<HostPortConflict>,
    /// Per policy, the other policies selecting some of the same Services.
    pub overlaps: BTreeMap<String, BTreeSet<String>>,
}

pub fn compute(inputs: &Inputs<'_>) -> Computation {
    let policy_set = PolicySet::compile(inputs.policies.iter().map(|p| &**p));
    let namespace_labels = namespace_labels(inputs.namespaces, inputs.services, inputs.pods);

    let mut overlaps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Services as they will be once the operator's `externalTrafficPolicy` writes land, so the
    // allocator gives a newly Local LoadBalancer its healthCheckNodePort from the policy in the
    // same pass (otherwise the API server would pick one from the whole cluster range).
    let models: Vec<ServiceModel<'_>> = inputs
        .services
        .iter()
        .map(|svc| {
            let fields = ServiceFields::from(&**svc);
            let ns_labels = Some(&*namespace_labels.of(fields.namespace()));
            match policy_set.governing_service(ns_labels, fields.labels) {
                Governance::By(policy) => desired_model(svc, policy),
                Governance::Ambiguous(..) => {
                    let selecting: Vec<&str> = policy_set
                        .policies()
                        .iter()
                        .filter(|p| p.selects_service(ns_labels, fields.labels))
                        .map(|p| p.name.as_str())
                        .collect();
                    for p in &selecting {
                        let others = selecting.iter().filter(|o| *o != p).map(|o| o.to_string());
                        overlaps.entry(p.to_string()).or_default().extend(others);
                    }
                    ServiceModel::read(fields)
                }
                _ => ServiceModel::read(fields),
            }
        })
        .collect();

    // Records of every policy, valid or not: an invalid policy's ports stay held.
    let records: BTreeMap<String, Vec<_>> = inputs
        .policies
        .iter()
        .filter_map(|p| Some((p.name_any(), p.status.as_ref()?.allocations.clone())))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    let allocation = allocate_node_ports_avoiding(
        &NodePortInput {
            cluster_range: inputs.cluster_range,
            policies: &policy_set,
            records: &records,
            services: &models,
            namespace_labels: &namespace_labels,
            now: inputs.now,
        },
        inputs.in_flight,
    );
    let services = inputs
        .services
        .iter()
        .zip(&models)
        .map(|(svc, model)| (svc.clone(), model.external_traffic == ExternalTraffic::Local))
        .collect();

    let (placed, _pod_problems) = placed_pods(inputs.pods.iter().map(|p| &**p));
    let conflicts = detect_conflicts(&ConflictInput {
        pods: &placed,
        node_port_range: inputs.cluster_range,
        policies: &policy_set,
        namespace_labels: &namespace_labels,
    });

    Computation {
        policy_set,
        namespace_labels,
        services,
        allocation,
        conflicts,
        overlaps,
    }
}

/// A governed Service as the allocator should see it: `externalTrafficPolicy: Local` already
/// set when the policy sets it, and without the nodePorts the API server picked at random
/// outside the policy's range (nobody asked for those, so moving them into the range is the
/// policy's whole point; a nodePort some manager set is the user's and stays, reported).
fn desired_model<'a>(svc: &'a Service, policy: &CompiledPolicy) -> ServiceModel<'a> {
    let range = policy.node_port_range;
    let outside = |port: Option<i32>| match (range, port) {
        (Some(range), Some(port)) => u16::try_from(port).map_or(true, |p| !range.contains(p)),
        _ => false,
    };
    let mut fields = ServiceFields::from(svc);
    if services::wants_local_traffic(policy.external_traffic, svc) {
        fields.external_traffic_policy = Some("Local");
    }
    if outside(fields.health_check_node_port) && services::health_check_node_port_owned(svc) == Some(false) {
        fields.health_check_node_port = None;
    }
    let mut model = ServiceModel::read(fields);
    for port in &mut model.ports {
        if outside(port.node_port.map(i32::from))
            && services::node_port_owned(svc, port.port, port.protocol) == Some(false)
        {
            port.node_port = None;
        }
    }
    model
}

/// Labels of every namespace in the store, and of those the store has not seen yet but objects
/// live in (listed once, so lookups need not derive them again).
fn namespace_labels(
    namespaces: &[Arc<Namespace>],
    services: &[Arc<Service>],
    pods: &[Arc<HostPortPod>],
) -> NamespaceLabels {
    let mut labels = NamespaceLabels::default();
    for ns in namespaces {
        labels.insert(&ns.name_any(), ns.metadata.labels.as_ref());
    }
    let referenced = services
        .iter()
        .filter_map(|s| s.metadata.namespace.as_deref())
        .chain(pods.iter().filter_map(|p| p.metadata.namespace.as_deref()));
    for ns in referenced {
        labels.ensure(ns);
    }
    labels
}

impl Computation {
    /// The facts one policy's status reports. `agents` comes from its DaemonSet.
    pub fn facts(&self, policy: &PortPolicy, agents: Option<AgentFacts>) -> PolicyFacts {
        let name = policy.name_any();
        let generation = policy.metadata.generation;
        if let Err(spec_problems) = policy.compile() {
            return PolicyFacts {
                generation,
                spec_problems,
                ..Default::default()
            };
        }
        // Status records that did not parse were skipped when the policy was read (the core's
        // tolerant status reader); say so, or they would vanish from the status unexplained.
        let unreadable = policy
            .status
            .iter()
            .flat_map(|s| s.unreadable_record_problems(&name))
            .map(|p| ("UnreadableRecord".to_string(), p.to_string()));
        let compiled = self.policy_set.get(&name);
        let node_ports = self.allocation.policies.get(&name).map(|np| NodePortFacts {
            used: np.used,
            total: np.total,
            counts: NodePortCounts::of(
                np.range,
                compiled.map(|c| c.reserved.as_slice()).unwrap_or_default(),
                compiled.map(|c| c.pinned.as_slice()).unwrap_or_default(),
                np.records.iter().filter_map(|r| u16::try_from(r.node_port).ok()),
            ),
            records: np.records.clone(),
            problems: unreadable
                .chain(
                    self.allocation
                        .problems_of(&name)
                        .map(|p| (p.reason.as_str().to_string(), p.problem.to_string())),
                )
                .collect(),
        });
        PolicyFacts {
            generation,
            spec_problems: Vec::new(),
            node_ports,
            conflicts: self
                .conflicts
                .iter()
                .filter(|c| c.policies.contains(&name))
                .map(HostPortConflict::to_record)
                .collect(),
            overlapping: self.overlaps.get(&name).into_iter().flatten().cloned().collect(),
            agents,
        }
    }

    /// What `policy` wants on each Service it governs. Services it shares with another policy
    /// are not governed by it (nor by the other) and get nothing.
    pub fn intents(&self, policy: &str) -> BTreeMap<ServiceKey, ServiceIntent> {
        let Some(compiled) = self.policy_set.get(policy) else {
            return BTreeMap::new();
        };
        // Each governed Service's intent, with its model (where its ports are) and whether it is
        // Local in its spec (else only through the legacy annotation, which decides where its
        // healthCheckNodePort is written).
        let mut governed = BTreeMap::new();
        for (svc, local) in &self.services {
            let fields = ServiceFields::from(&**svc);
            let governance = self
                .policy_set
                .governing_service(Some(&self.namespace_labels.of(fields.namespace())), fields.labels);
            if governance.policy().is_none_or(|p| p.name != policy) {
                continue;
            }
            let model = ServiceModel::read(fields);
            let key = services::key_of(&model);
            let mut intent = ServiceIntent::new(&key.0, &key.1);
            intent.policy = Some(policy.to_string());
            // `local` is the desired view's: Local under a Local rule means the rule wants it (or
            // the owner chose it, and applying the same value changes nothing).
            intent.external_traffic_local = compiled.external_traffic != ExternalTrafficRule::Any
                && model.type_.has_node_ports()
                && *local;
            intent.proxy_label = compiled.agent_proxies;
            governed.insert(key, (intent, model, *local));
        }
        for a in &self.allocation.assignments {
            if a.policy.as_deref() != Some(policy) || a.state == AssignmentState::InUse {
                continue;
            }
            let key = (a.namespace.clone(), a.service.clone());
            let Some((intent, model, local)) = governed.get_mut(&key) else {
                continue;
            };
            match a.kind {
                NodePortKind::Service => {
                    let spec_port = (model.ports.iter())
                        .find(|p| p.name == a.port_name && p.port == a.port && p.protocol == a.protocol);
                    if let Some(spec_port) = spec_port {
                        intent.ports.push(ServicePortNodePort {
                            index: spec_port.index,
                            name: a.port_name.clone(),
                            port: a.port,
                            protocol: a.protocol,
                            node_port: a.node_port,
                        });
                    }
                }
                NodePortKind::HealthCheck => {
                    let field = if *local {
                        HealthCheckField::Spec
                    } else {
                        HealthCheckField::Annotation
                    };
                    intent.health_check_node_port = Some(HealthCheckNodePort {
                        node_port: a.node_port,
                        field,
                    });
                }
            }
        }
        // Ports with the same number and different protocols share one nodePort and are listed
        // once per protocol, as the API server keys `spec.ports` by (port, protocol).
        governed
            .into_iter()
            .map(|(key, (mut intent, ..))| {
                intent.ports.sort_by_key(|p| (p.port, p.protocol, p.node_port));
                intent.ports.dedup_by_key(|p| (p.port, p.protocol));
                (key, intent)
            })
            .collect()
    }

    /// What writing `policy`'s intent to `live` does to each of its nodePorts that changes, as
    /// `node_port_allocations_total` counts it (see `metrics::ALLOCATION_OUTCOMES`).
    pub fn outcomes(&self, policy: &str, live: &Service) -> Vec<&'static str> {
        let fields = ServiceFields::from(live);
        let model = ServiceModel::read(fields);
        let live_port = |a: &NodePortAssignment| match a.kind {
            NodePortKind::Service => (model.ports.iter())
                .find(|p| p.name == a.port_name && p.port == a.port && p.protocol == a.protocol)
                .and_then(|p| p.node_port),
            NodePortKind::HealthCheck => fields.health_check_node_port.and_then(|p| u16::try_from(p).ok()),
        };
        self.allocation
            .assignments
            .iter()
            .filter(|a| {
                a.policy.as_deref() == Some(policy)
                    && a.namespace == model.namespace
                    && a.service == model.name
            })
            .filter_map(|a| {
                let held = live_port(a);
                if held == Some(a.node_port) {
                    return None;
                }
                match a.state {
                    AssignmentState::Restored => Some("restored"),
                    AssignmentState::Pinned => Some("pinned"),
                    AssignmentState::Allocated if held.is_some() => Some("moved"),
                    AssignmentState::Allocated => Some("allocated"),
                    AssignmentState::Existing | AssignmentState::InUse => None,
                }
            })
            .collect()
    }

    /// The nodePorts `policy` cannot give its Services now (its range is full, a pinned port is
    /// taken), each as its problem reads.
    pub fn refusals(&self, policy: &str) -> BTreeSet<String> {
        self.allocation
            .problems_of(policy)
            .filter(|p| {
                matches!(
                    p.reason,
                    NodePortProblemReason::RangeExhausted | NodePortProblemReason::PinnedPortTaken
                )
            })
            .map(|p| p.problem.to_string())
            .collect()
    }

    /// [`Self::intents`] in the order they must be written: a Service that leaves a nodePort
    /// another one takes in the same plan (a pin whose holder moves) comes first, or the API
    /// server would refuse the taker. The allocator's change list is in that order; Services
    /// whose nodePorts do not change go first, as they take nothing.
    pub fn intents_in_write_order(&self, policy: &str) -> Vec<(ServiceKey, ServiceIntent)> {
        let rank: BTreeMap<(&str, &str), usize> = (self.allocation.service_changes().iter())
            .enumerate()
            .map(|(i, change)| ((change.namespace.as_str(), change.name.as_str()), i + 1))
            .collect();
        let mut intents: Vec<_> = self.intents(policy).into_iter().collect();
        intents.sort_by_key(|(key, _)| rank.get(&(key.0.as_str(), key.1.as_str())).copied().unwrap_or(0));
        intents
    }

    /// Services the operator holds fields on that no policy governs any more: they get an empty
    /// apply, which hands those fields back. Nothing is released while some policy is invalid,
    /// because its selectors cannot be evaluated and it may still mean to govern them.
    pub(crate) fn releases(&self) -> Vec<ServiceKey> {
        if !self.policy_set.invalid().is_empty() {
            return Vec::new();
        }
        self.managed_services()
            .filter(|model| {
                matches!(
                    self.policy_set
                        .governing_service(Some(&self.namespace_labels.of(model.namespace)), model.labels),
                    Governance::Ungoverned
                )
            })
            .map(|model| services::key_of(&model))
            .collect()
    }

    /// Services `policy` governs that the operator holds fields on: what a deleted policy lets go.
    pub(crate) fn held_by(&self, policy: &str) -> Vec<ServiceKey> {
        self.managed_services()
            .filter(|model| {
                self.policy_set.get(policy).is_some_and(|p| {
                    p.selects_service(Some(&self.namespace_labels.of(model.namespace)), model.labels)
                })
            })
            .map(|model| services::key_of(&model))
            .collect()
    }

    /// The Services the operator holds fields on.
    fn managed_services(&self) -> impl Iterator<Item = ServiceModel<'_>> {
        self.services
            .iter()
            .filter(|(svc, _)| services::managed_by_operator(svc))
            .map(|(svc, _)| ServiceModel::read(&**svc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portpolicy_core::ports::Protocol;
    use serde_json::{Value, json};

    fn policy(name: &str, spec: Value) -> Arc<PortPolicy> {
        Arc::new(
            serde_json::from_value(
                json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                "metadata": {"name": name, "uid": format!("uid-{name}")}, "spec": spec}),
            )
            .unwrap(),
        )
    }

    fn service(name: &str, labels: Value, node_port: i32, managed: Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop", "labels": labels, "managedFields": managed},
                "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": node_port}]}}))
            .unwrap(),
        )
    }

    fn run(policies: &[Arc<PortPolicy>], services: &[Arc<Service>]) -> Computation {
        compute(&Inputs {
            policies,
            services,
            pods: &[],
            namespaces: &[],
            cluster_range: PortRange::DEFAULT_NODE_PORTS,
            now: "2026-11-26T12:00:00Z".parse().unwrap(),
            in_flight: &[],
        })
    }

    /// (port, protocol, nodePort) of each port an intent sets.
    fn node_ports(intent: &ServiceIntent) -> Vec<(u16, Protocol, u16)> {
        intent
            .ports
            .iter()
            .map(|p| (p.port, p.protocol, p.node_port))
            .collect()
    }

    fn created_by_kubectl() -> Value {
        json!([{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {"f:port": {}}}}}}])
    }

    #[test]
    fn overlapping_policies_are_reported_on_both_and_touch_nothing() {
        let policies = [
            policy("a", json!({"nodePorts": {"range": "31000-31099"}})),
            policy("b", json!({"serviceSelector": {"matchLabels": {"tier": "edge"}}})),
        ];
        let services = [service(
            "web",
            json!({"tier": "edge"}),
            30555,
            created_by_kubectl(),
        )];
        let comp = run(&policies, &services);
        for (name, other) in [("a", "b"), ("b", "a")] {
            let facts = comp.facts(&policies[if name == "a" { 0 } else { 1 }], None);
            assert_eq!(facts.overlapping, [other.to_string()], "{name}");
            assert!(
                comp.intents(name).is_empty(),
                "{name} must leave the shared Service alone"
            );
        }
    }

    #[test]
    fn a_bad_allocation_record_is_skipped_reported_and_the_rest_kept() {
        let policy: Arc<PortPolicy> = Arc::new(
            serde_json::from_value(
                json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                "metadata": {"name": "a"}, "spec": {"nodePorts": {"range": "31000-31099"}},
                "status": {"allocations": [
                    {"namespace": "shop", "service": "web", "kind": "Service", "nodePort": "31005"},
                    {"namespace": "shop", "service": "gone", "kind": "Service", "nodePort": 31006,
                        "releasedAt": "2026-11-26T11:00:00Z"}]}}),
            )
            .unwrap(),
        );
        let comp = run(std::slice::from_ref(&policy), &[]);
        let facts = comp.facts(&policy, None);
        let np = facts.node_ports.unwrap();
        assert_eq!(np.problems[0].0, "UnreadableRecord", "{:?}", np.problems);
        assert!(
            np.problems[0].1.contains("status.allocations[0].nodePort"),
            "{:?}",
            np.problems
        );
        // The readable record is still honoured: the released port stays retained.
        assert!(
            np.records
                .iter()
                .any(|r| r.service == "gone" && r.node_port == 31006),
            "{:?}",
            np.records
        );
    }

    #[test]
    fn user_set_node_port_outside_the_range_is_kept_and_reported() {
        let owned = json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {
                "k:{\"port\":80,\"protocol\":\"TCP\"}": {"f:port": {}, "f:nodePort": {}}}}}}]);
        let policies = [policy("a", json!({"nodePorts": {"range": "31000-31099"}}))];
        let services = [service("web", json!({}), 30555, owned)];
        let comp = run(&policies, &services);
        let intent = &comp.intents("a")[&("shop".to_string(), "web".to_string())];
        assert_eq!(node_ports(intent), [(80, Protocol::Tcp, 30555)]);
        let facts = comp.facts(&policies[0], None);
        let problems = &facts.node_ports.unwrap().problems;
        assert_eq!(problems[0].0, "OutsidePolicyRange", "{problems:?}");

        // The same port, picked at random by the API server (nobody owns it), is moved.
        let services = [service("web", json!({}), 30555, created_by_kubectl())];
        let comp = run(&policies, &services);
        let intent = &comp.intents("a")[&("shop".to_string(), "web".to_string())];
        assert!((31000..=31099).contains(&intent.ports[0].node_port), "{intent:?}");
    }

    #[test]
    fn a_service_leaving_a_pinned_port_is_written_before_the_pinned_one() {
        // `a-pinned` sorts first by name; the port it is pinned to is `b-holder`'s, which its
        // own pin moves away in the same plan.
        let policies = [policy(
            "a",
            json!({"nodePorts": {"range": "31000-31099", "pinned": [
                {"namespace": "shop", "service": "a-pinned", "nodePort": 31010},
                {"namespace": "shop", "service": "b-holder", "nodePort": 31020}]}}),
        )];
        let services = [
            service("a-pinned", json!({}), 31050, created_by_kubectl()),
            service("b-holder", json!({}), 31010, created_by_kubectl()),
        ];
        let comp = run(&policies, &services);
        let order: Vec<_> = (comp.intents_in_write_order("a").into_iter())
            .map(|(key, intent)| (key.1, node_ports(&intent)))
            .collect();
        assert_eq!(
            order,
            [
                ("b-holder".to_string(), vec![(80, Protocol::Tcp, 31020)]),
                ("a-pinned".to_string(), vec![(80, Protocol::Tcp, 31010)]),
            ]
        );
    }

    #[test]
    fn ungoverned_services_are_released_unless_a_policy_is_invalid() {
        let ours = json!([{"manager": "portpolicy-operator", "operation": "Apply", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]);
        let services = [service("web", json!({}), 31005, ours)];
        let selective = policy("a", json!({"serviceSelector": {"matchLabels": {"tier": "edge"}}}));
        let comp = run(std::slice::from_ref(&selective), &services);
        assert_eq!(comp.releases(), [("shop".to_string(), "web".to_string())]);

        let broken = policy("b", json!({"nodePorts": {"range": "9-1"}}));
        let comp = run(&[selective, broken], &services);
        assert!(comp.releases().is_empty());
    }

    #[test]
    fn default_local_load_balancer_gets_its_health_check_port_from_the_policy() {
        let policies = [policy(
            "a",
            json!({"nodePorts": {"range": "31000-31099"}, "traffic": {"externalTrafficPolicy": "DefaultLocal"}}),
        )];
        let lb: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "lb", "namespace": "shop", "managedFields": created_by_kubectl()},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                "ports": [{"port": 80, "protocol": "TCP", "nodePort": 31010}]}}))
        .unwrap();
        let comp = run(&policies, &[Arc::new(lb)]);
        let intent = &comp.intents("a")[&("shop".to_string(), "lb".to_string())];
        assert!(intent.external_traffic_local);
        assert_eq!(node_ports(intent), [(80, Protocol::Tcp, 31010)]);
        let health = intent.health_check_node_port.expect("a health-check port");
        let (health, in_annotation) = (health.node_port, health.field == HealthCheckField::Annotation);
        assert!((31000..=31099).contains(&health) && health != 31010, "{health}");
        assert!(!in_annotation);
    }

    #[test]
    fn node_port_counts_add_up_and_free_excludes_reserved_and_pinned() {
        let policies = [policy(
            "a",
            json!({"nodePorts": {"range": "31000-31099",
                // 31000-31009 plus an overlapping 31005-31014 and a range reaching outside.
                "reserved": ["31000-31009", "31005-31014", "31095-31200"],
                "pinned": [{"namespace": "shop", "service": "web", "nodePort": 31050},
                    {"namespace": "shop", "service": "gone", "nodePort": 31060},
                    {"namespace": "shop", "service": "odd", "nodePort": 31003}]}}),
        )];
        // `web` holds its pinned port; a second Service holds a port the allocator gave it.
        let services = [
            service("web", json!({}), 31050, created_by_kubectl()),
            service("api", json!({}), 30555, created_by_kubectl()),
        ];
        let comp = run(&policies, &services);
        let facts = comp.facts(&policies[0], None);
        let np = facts.node_ports.unwrap();
        let c = np.counts;
        assert_eq!(c.total, 100);
        assert_eq!(c.used, 2, "{np:?}");
        assert_eq!(c.used, np.used, "the metric and the status agree on used");
        // 31000-31014 and 31095-31099; 31003 is reserved before it is pinned.
        assert_eq!(c.reserved, 20);
        // 31060 only: 31050 is used, 31003 reserved.
        assert_eq!(c.pinned, 1);
        assert_eq!(c.free, 100 - 2 - 20 - 1);
        assert_eq!(c.used + c.reserved + c.pinned + c.free, c.total);
    }
}
