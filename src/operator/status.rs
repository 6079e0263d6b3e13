//! Building a PortPolicy's status from what the core computed. Pure: the caller passes the clock.
//!
//! Conditions keep their `lastTransitionTime` unless their `status` changes, so a reconcile that
//! finds nothing new builds a status equal to the stored one and writes nothing: the operator
//! never triggers itself through its own status writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use portpolicy_core::crd::{AllocationRecord, HostPortConflictRecord, PortPolicyStatus, condition};
use portpolicy_core::problem::Problem;

/// Everything the status says about one policy, before conditions are formatted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyFacts {
    pub generation: Option<i64>,
    /// Compile problems of the spec; non-empty means SpecValid=False and nothing else is known.
    pub spec_problems: Vec<Problem>,
    /// `None` when the policy has no `spec.nodePorts`.
    pub node_ports: Option<NodePortFacts>,
    pub conflicts: Vec<HostPortConflictRecord>,
    /// Policies that select the same Services as this one (each such Service is left alone).
    pub overlapping: Vec<String>,
    /// `None` when the policy has no `spec.agent`.
    pub agents: Option<AgentFacts>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePortFacts {
    pub used: usize,
    pub total: usize,
    /// How the range splits into used, reserved, pinned and free ports (for the metrics).
    pub counts: super::core::NodePortCounts,
    pub records: Vec<AllocationRecord>,
    /// Why some governed Service port did not get a nodePort: (reason, message), reasons in
    /// PascalCase (`RangeExhausted`, `PinnedPortTaken`, ...).
    pub problems: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentFacts {
    /// `ready/desired`.
    pub summary: String,
    pub ready: bool,
    /// Why the DaemonSet is missing, when applying it failed (a DaemonSet just created is not
    /// missing, only not ready yet).
    pub missing: Option<String>,
}

/// Condition messages are bounded so a status with thousands of conflicts stays small; the full
/// list is in `status.conflicts`.
const MAX_MESSAGE_ITEMS: usize = 3;

/// The status `facts` call for, keeping transition times from `previous` where nothing changed.
pub fn build_status(
    previous: Option<&PortPolicyStatus>,
    facts: &PolicyFacts,
    now: &Time,
) -> PortPolicyStatus {
    let old_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let mut status = PortPolicyStatus {
        observed_generation: facts.generation,
        // An invalid spec must not lose what earlier reconciles allocated: keep those records.
        allocations: previous.map(|s| s.allocations.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let mut conditions = Conditions {
        generation: facts.generation,
        now,
        list: Vec::new(),
        not_ready: Vec::new(),
    };
    if !facts.spec_problems.is_empty() {
        let message = facts
            .spec_problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        conditions.push(condition::SPEC_VALID, false, "InvalidSpec", message.clone());
        conditions.push(condition::READY, false, "InvalidSpec", message);
        status.conditions = keep_transition_times(conditions.list, old_conditions);
        status.node_ports_used = previous.and_then(|s| s.node_ports_used.clone());
        status.agents_ready = previous.and_then(|s| s.agents_ready.clone());
        return status;
    }
    conditions.spec_valid(&facts.overlapping);
    if let Some(node_ports) = &facts.node_ports {
        status.node_ports_used = Some(format!("{}/{}", node_ports.used, node_ports.total));
        status.allocations = node_ports.records.clone();
        conditions.node_ports_allocated(node_ports);
    }
    status.conflict_count = i32::try_from(facts.conflicts.len()).unwrap_or(i32::MAX);
    status.conflicts = facts.conflicts.clone();
    conditions.host_port_conflict(&facts.conflicts);
    if let Some(agents) = &facts.agents {
        status.agents_ready = Some(agents.summary.clone());
        conditions.agents_ready(agents);
    }
    status.conditions = keep_transition_times(conditions.ready_first(), old_conditions);
    status
}

/// The conditions of one status as they are decided, and what keeps the policy from Ready.
struct Conditions<'a> {
    generation: Option<i64>,
    now: &'a Time,
    list: Vec<Condition>,
    /// (Ready's reason, message) of each condition that makes the policy not Ready, in order.
    not_ready: Vec<(&'static str, String)>,
}

impl Conditions<'_> {
    fn condition(&self, type_: &str, status: bool, reason: &str, message: String) -> Condition {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            observed_generation: self.generation,
            last_transition_time: self.now.clone(),
        }
    }

    fn push(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let condition = self.condition(type_, status, reason, message);
        self.list.push(condition);
    }

    fn spec_valid(&mut self, overlapping: &[String]) {
        if overlapping.is_empty() {
            self.push(condition::SPEC_VALID, true, "Valid", "spec is valid".into());
            return;
        }
        let message = format!(
            "selects the same Services as {}; those Services are left alone until one policy stops selecting them",
            overlapping
                .iter()
                .map(|p| format!("PortPolicy/{p}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.push(
            condition::SPEC_VALID,
            false,
            "OverlappingPolicies",
            message.clone(),
        );
        self.not_ready.push(("OverlappingPolicies", message));
    }

    fn node_ports_allocated(&mut self, node_ports: &NodePortFacts) {
        match node_ports.problems.first() {
            None => self.push(
                condition::NODE_PORTS_ALLOCATED,
                true,
                "Allocated",
                format!("{} of {} nodePorts in use", node_ports.used, node_ports.total),
            ),
            Some((reason, _)) => {
                let message = bounded(
                    node_ports.problems.iter().map(|(_, m)| m.clone()),
                    node_ports.problems.len(),
                );
                self.push(condition::NODE_PORTS_ALLOCATED, false, reason, message.clone());
                self.not_ready.push(("NodePortsNotAllocated", message));
            }
        }
    }

    /// HostPortConflict is a "bad when True" condition, like the kubelet's DiskPressure.
    fn host_port_conflict(&mut self, conflicts: &[HostPortConflictRecord]) {
        if conflicts.is_empty() {
            self.push(
                condition::HOST_PORT_CONFLICT,
                false,
                "NoConflicts",
                "no hostPort conflicts".into(),
            );
            return;
        }
        let message = bounded(conflicts.iter().map(conflict_message), conflicts.len());
        self.push(
            condition::HOST_PORT_CONFLICT,
            true,
            "ConflictsFound",
            message.clone(),
        );
        self.not_ready.push(("HostPortConflict", message));
    }

    fn agents_ready(&mut self, agents: &AgentFacts) {
        let (reason, message) = if let Some(why) = &agents.missing {
            ("DaemonSetMissing", why.clone())
        } else if agents.ready {
            ("AllReady", format!("{} agent pods ready", agents.summary))
        } else {
            ("NotReady", format!("{} agent pods ready", agents.summary))
        };
        let ready = agents.ready && agents.missing.is_none();
        self.push(condition::AGENTS_READY, ready, reason, message.clone());
        if !ready {
            self.not_ready.push(("AgentsNotReady", message));
        }
    }

    /// Every condition, Ready first: True unless another condition keeps it from being.
    fn ready_first(mut self) -> Vec<Condition> {
        let (reason, message) = match self.not_ready.first() {
            None => ("Ready", "policy is in effect".to_string()),
            Some((reason, message)) => (*reason, message.clone()),
        };
        let ready = self.condition(condition::READY, self.not_ready.is_empty(), reason, message);
        self.list.insert(0, ready);
        self.list
    }
}

fn conflict_message(c: &HostPortConflictRecord) -> String {
    format!(
        "node {} {} {}:{} used by {} ({})",
        c.node,
        c.protocol,
        if c.host_ip.is_empty() {
            "0.0.0.0"
        } else {
            &c.host_ip
        },
        c.host_port,
        c.pods.join(", "),
        c.reason
    )
}

fn bounded(items: impl Iterator<Item = String>, total: usize) -> String {
    let mut shown: Vec<String> = items.take(MAX_MESSAGE_ITEMS).collect();
    if total > MAX_MESSAGE_ITEMS {
        shown.push(format!("and {} more", total - MAX_MESSAGE_ITEMS));
    }
    shown.join("; ")
}

fn keep_transition_times(mut conditions: Vec<Condition>, old: &[Condition]) -> Vec<Condition> {
    for c in &mut conditions {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
    conditions
}

/// A condition whose `status` changed (or that is new), for events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

pub(crate) fn transitions(old: Option<&PortPolicyStatus>, new: &PortPolicyStatus) -> Vec<Transition> {
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    new.conditions
        .iter()
        .filter(|c| !old.iter().any(|o| o.type_ == c.type_ && o.status == c.status))
        .map(|c| Transition {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

/// Whether `new` must be written: anything but condition timestamps differs.
pub(crate) fn needs_write(old: Option<&PortPolicyStatus>, new: &PortPolicyStatus) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &PortPolicyStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Default::default());
        }
        s
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn condition<'a>(s: &'a PortPolicyStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn healthy() -> PolicyFacts {
        PolicyFacts {
            generation: Some(3),
            node_ports: Some(NodePortFacts {
                used: 2,
                total: 100,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_policy_is_ready() {
        let s = build_status(None, &healthy(), &at(10));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.node_ports_used.as_deref(), Some("2/100"));
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "NodePortsAllocated").status, "True");
        assert_eq!(condition(&s, "HostPortConflict").status, "False");
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn unchanged_facts_give_an_equal_status_and_no_transition() {
        let first = build_status(None, &healthy(), &at(10));
        let second = build_status(Some(&first), &healthy(), &at(99));
        assert_eq!(first, second);
        assert!(!needs_write(Some(&first), &second));
        assert!(transitions(Some(&first), &second).is_empty());
    }

    #[test]
    fn conflicts_flip_conditions_and_keep_other_times() {
        let first = build_status(None, &healthy(), &at(10));
        let mut facts = healthy();
        facts.conflicts = vec![HostPortConflictRecord {
            node: "n1".into(),
            protocol: "TCP".into(),
            host_ip: String::new(),
            host_port: 8080,
            pods: vec!["a/p1".into(), "b/p2".into()],
            reason: "SamePort".into(),
        }];
        let second = build_status(Some(&first), &facts, &at(20));
        let c = condition(&second, "HostPortConflict");
        assert_eq!((c.status.as_str(), &c.last_transition_time), ("True", &at(20)));
        assert!(c.message.contains("n1") && c.message.contains("TCP") && c.message.contains("8080"));
        assert!(c.message.contains("a/p1"));
        assert_eq!(
            condition(&second, "NodePortsAllocated").last_transition_time,
            at(10)
        );
        assert_eq!(second.conflict_count, 1);
        let types: Vec<_> = transitions(Some(&first), &second)
            .into_iter()
            .map(|t| t.type_)
            .collect();
        assert_eq!(types, ["Ready", "HostPortConflict"]);
    }

    #[test]
    fn invalid_spec_keeps_allocations() {
        let mut facts = healthy();
        facts.node_ports.as_mut().unwrap().records = vec![AllocationRecord {
            namespace: "a".into(),
            service: "web".into(),
            port_name: String::new(),
            kind: portpolicy_core::crd::NodePortKind::Service,
            node_port: 31000,
            released_at: None,
        }];
        let first = build_status(None, &facts, &at(1));
        let bad = PolicyFacts {
            generation: Some(4),
            spec_problems: vec![Problem::new("PortPolicy/edge", "spec.nodePorts.range", "bad")],
            ..Default::default()
        };
        let s = build_status(Some(&first), &bad, &at(2));
        assert_eq!(s.allocations, first.allocations);
        let c = condition(&s, "SpecValid");
        assert_eq!(c.status, "False");
        assert!(c.message.contains("spec.nodePorts.range"));
    }

    #[test]
    fn exhausted_range_names_reason() {
        let mut facts = healthy();
        facts.node_ports.as_mut().unwrap().problems = (0..5)
            .map(|i| {
                (
                    "RangeExhausted".to_string(),
                    format!("Service/a/s{i} got no nodePort"),
                )
            })
            .collect();
        let s = build_status(None, &facts, &at(1));
        let c = condition(&s, "NodePortsAllocated");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RangeExhausted")
        );
        assert!(c.message.ends_with("and 2 more"));
        assert_eq!(condition(&s, "Ready").status, "False");
    }
}
