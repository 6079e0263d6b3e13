//! The allocator: seed what is held, then give every governed Service port its nodePort.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{
    AssignmentState, NodePortAllocation, NodePortAssignment, NodePortInput, NodePortProblem,
    NodePortProblemReason as Reason, PolicyNodePorts, PortBitmap,
};
use crate::crd::{AllocationRecord, CompiledPolicy, NodePortKind};
use crate::governance::Governance;
use crate::hash::Fnv1a64;
use crate::intent::{HealthCheckNodePort, ServiceIntent, ServicePortNodePort};
use crate::ports::{PortRange, Protocol};
use crate::problem::Problem;
use crate::service::{ServiceModel, ServicePortModel};

/// Decides every nodePort from the input. Deterministic: the same input gives the same plan.
pub fn allocate_node_ports(input: &NodePortInput<'_>) -> NodePortAllocation {
    allocate_node_ports_avoiding(input, &[])
}

/// As [`allocate_node_ports`], but automatic allocation also skips `in_flight`: the ports the
/// admission webhook handed out whose Services the input does not show holding them yet
/// ([`super::AdmissionLedger::in_flight_ports`]). A Service created meanwhile without the
/// webhook must not be given a port a review just promised. Like a reserved range, this never
/// takes a port from a Service that holds it.
pub fn allocate_node_ports_avoiding(input: &NodePortInput<'_>, in_flight: &[u16]) -> NodePortAllocation {
    let mut allocator = Allocator::new(input);
    allocator.in_flight = in_flight;
    allocator.run()
}

/// A nodePort's owner: one Service port (or health check) of one Service, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Identity<'a> {
    pub(super) namespace: &'a str,
    pub(super) service: &'a str,
    pub(super) port_name: &'a str,
    pub(super) kind: NodePortKind,
}

impl Identity<'_> {
    pub(super) fn describe(&self) -> String {
        let what = match (self.kind, self.port_name) {
            (NodePortKind::HealthCheck, _) => "health check".to_string(),
            (NodePortKind::Service, "") => "unnamed port".to_string(),
            (NodePortKind::Service, name) => format!("port {name:?}"),
        };
        format!("Service/{}/{} {what}", self.namespace, self.service)
    }
}

/// Who holds a port, so conflicts can name them.
#[derive(Clone, Copy, Debug)]
enum Holder<'a> {
    /// A Service of the input (index into the sorted views).
    Service(usize),
    /// A record of a valid policy, kept for an identity that holds no port now.
    Retained { policy: &'a str, identity: Identity<'a> },
    /// A record of a policy whose spec is invalid: kept as it is, so fixing the spec loses nothing.
    FrozenPolicy(&'a str),
}

/// A record that may be given back to its identity.
#[derive(Clone, Copy, Debug)]
struct Reservation<'a> {
    node_port: u16,
    released_at: Option<&'a Time>,
}

/// How the allocator treats one Service.
#[derive(Clone, Copy, Debug)]
enum Treatment<'a> {
    /// Governed by a policy with a nodePort range, and valid: the allocator manages it.
    Managed(&'a CompiledPolicy, PortRange),
    /// Its ports are held but nobody may change them.
    Untouched,
}

/// A Service the allocator manages: its view, and the policy and range it is managed by.
#[derive(Clone, Copy)]
struct Managed<'a> {
    /// Index into the views.
    i: usize,
    view: &'a ServiceModel<'a>,
    policy: &'a CompiledPolicy,
    range: PortRange,
}

/// The nodePort a group of Service ports is to hold.
#[derive(Clone, Copy, Debug)]
struct Target {
    port: u16,
    state: AssignmentState,
    /// Every member moves to it (a pin), not only those without a port of their own.
    every_member: bool,
}

/// Ports with the same number share one nodePort, whatever their protocols.
pub(super) fn port_groups<'p, 'a>(ports: &'p [ServicePortModel<'a>]) -> Vec<Vec<&'p ServicePortModel<'a>>> {
    let mut groups: Vec<Vec<&ServicePortModel<'a>>> = Vec::new();
    for port in ports {
        match groups.iter_mut().find(|g| g[0].port == port.port) {
            Some(group) => group.push(port),
            None => groups.push(vec![port]),
        }
    }
    groups
}

struct Allocator<'i, 'a> {
    input: &'i NodePortInput<'a>,
    /// Ports promised by in-flight admission reviews: skipped by automatic allocation.
    in_flight: &'i [u16],
    now: Time,
    now_nanos: i128,
    /// The Services, oldest first.
    views: Vec<&'a ServiceModel<'a>>,
    /// By view: the problems that leave the Service untouched (its valid nodePorts are still
    /// held, so nothing else is given them).
    invalid: Vec<Vec<Problem>>,
    /// Ports held by a Service or a record, or reserved/pinned by a policy: never handed out
    /// automatically. Covers the cluster range only, like the API server's bitmap.
    blocked: PortBitmap,
    /// Every held port, inside the cluster range or not.
    holders: BTreeMap<u16, Holder<'a>>,
    reservations: BTreeMap<(&'a str, Identity<'a>), Reservation<'a>>,
    /// Pins by (policy, namespace, service, port name): (index in spec.nodePorts.pinned, port).
    pins: BTreeMap<(&'a str, &'a str, &'a str, &'a str), (usize, u16)>,
    problems: Vec<NodePortProblem>,
    assignments: Vec<NodePortAssignment>,
    /// Each with its write rank: how many moves must land before it can be written.
    changes: Vec<(usize, ServiceIntent)>,
    /// Ports a Service leaves in this plan, by the view that leaves them: a pin may take such a
    /// port in the same plan, as the operator writes the leaving Service first.
    vacated: BTreeMap<u16, usize>,
}

impl<'i, 'a> Allocator<'i, 'a> {
    fn new(input: &'i NodePortInput<'a>) -> Self {
        let now_nanos = i128::from(input.now.timestamp()) * 1_000_000_000
            + i128::from(input.now.timestamp_subsec_nanos());
        // Whole seconds: that is what a Time survives a round trip through the API as.
        let now = Time(Timestamp::from_second(input.now.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH));
        let mut views: Vec<&'a ServiceModel<'a>> = input.services.iter().collect();
        // Oldest first, like the order the API server would have seen them in.
        views.sort_by(|a, b| (a.created, a.namespace, a.name).cmp(&(b.created, b.namespace, b.name)));
        let mut seen = BTreeSet::new();
        let invalid = views
            .iter()
            .map(|view| {
                let mut problems: Vec<Problem> = (view.issues.iter())
                    .filter(|issue| issue.kind.blocks_allocation())
                    .map(|issue| view.problem(issue, None))
                    .collect();
                if !seen.insert((view.namespace, view.name)) {
                    let problem = Problem::new(
                        view.object(),
                        "metadata.name",
                        "appears more than once in the input",
                    );
                    problems.push(problem);
                }
                problems
            })
            .collect();
        Allocator {
            input,
            in_flight: &[],
            now,
            now_nanos,
            views,
            invalid,
            blocked: PortBitmap::new(input.cluster_range),
            holders: BTreeMap::new(),
            reservations: BTreeMap::new(),
            pins: BTreeMap::new(),
            problems: Vec::new(),
            assignments: Vec::new(),
            changes: Vec::new(),
            vacated: BTreeMap::new(),
        }
    }

    fn run(mut self) -> NodePortAllocation {
        self.check_policies();
        let treatments = self.govern();
        self.seed_services();
        self.block_reserved_and_pinned();
        self.read_records();
        let (order, ranks) = self.planning_order(&treatments);
        for i in order {
            match treatments[i] {
                Treatment::Managed(policy, range) => self.allocate_service(i, policy, range, ranks[i]),
                Treatment::Untouched => self.record_untouched(i),
            }
        }
        self.finish()
    }

    /// Oldest first, except that a Service whose pinned port another managed Service holds
    /// comes after that holder: if the holder moves away in this plan, the pin gets the port
    /// in the same plan instead of one plan later (which would change the pinned Service's
    /// port twice). The rank of each view is the length of the chain of moves before it, the
    /// order its writes must land in. A cycle of pins (two Services swapping ports) cannot be
    /// written without a third port: there every holder keeps its port and the pins are
    /// reported.
    fn planning_order(&self, treatments: &[Treatment<'a>]) -> (Vec<usize>, Vec<usize>) {
        let mut after: Vec<Vec<usize>> = vec![Vec::new(); self.views.len()];
        for (i, treatment) in treatments.iter().enumerate() {
            let Treatment::Managed(policy, _) = *treatment else {
                continue;
            };
            let view = self.views[i];
            if !view.allocates_node_ports {
                continue;
            }
            for port in &view.ports {
                let key = (policy.name.as_str(), view.namespace, view.name, port.name);
                let Some(&(_, pin)) = self.pins.get(&key) else {
                    continue;
                };
                if let Some(&Holder::Service(j)) = self.holders.get(&pin)
                    && j != i
                    && matches!(treatments[j], Treatment::Managed(..))
                {
                    after[i].push(j);
                }
            }
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let mut marks = vec![Mark::New; self.views.len()];
        let mut ranks = vec![0; self.views.len()];
        let mut order = Vec::with_capacity(self.views.len());
        for root in 0..self.views.len() {
            if marks[root] != Mark::New {
                continue;
            }
            // Depth-first, without recursion: a chain of pins may be as long as the input.
            let mut stack = vec![(root, 0)];
            marks[root] = Mark::Open;
            while let Some(&mut (i, ref mut next)) = stack.last_mut() {
                if let Some(&j) = after[i].get(*next) {
                    *next += 1;
                    if marks[j] == Mark::New {
                        marks[j] = Mark::Open;
                        stack.push((j, 0));
                    }
                    continue;
                }
                ranks[i] = (after[i].iter())
                    .filter(|&&j| marks[j] == Mark::Done)
                    .map(|&j| ranks[j] + 1)
                    .max()
                    .unwrap_or(0);
                marks[i] = Mark::Done;
                order.push(i);
                stack.pop();
            }
        }
        (order, ranks)
    }

    fn problem(&mut self, policy: Option<&str>, reason: Reason, problem: Problem) {
        self.problems.push(NodePortProblem {
            policy: policy.map(str::to_string),
            reason,
            problem,
        });
    }

    /// Policies with nodePort ranges, sorted by name.
    fn ranged_policies(&self) -> impl Iterator<Item = (&'a CompiledPolicy, PortRange)> + use<'a> {
        let policies: &'a [CompiledPolicy] = self.input.policies.policies();
        policies.iter().filter_map(|p| p.node_port_range.map(|r| (p, r)))
    }

    fn check_policies(&mut self) {
        let cluster = self.input.cluster_range;
        let ranged: Vec<_> = self.ranged_policies().collect();
        for (i, &(policy, range)) in ranged.iter().enumerate() {
            let object = format!("PortPolicy/{}", policy.name);
            if !cluster.contains_range(&range) {
                self.problem(
                    Some(&policy.name),
                    Reason::RangeOutsideCluster,
                    Problem::new(
                        &object,
                        "spec.nodePorts.range",
                        format!(
                            "{range} is not inside the cluster's nodePort range {cluster}; only ports inside both are allocated"
                        ),
                    ),
                );
            }
            // One problem per policy, whatever the number of others it overlaps: many policies
            // sharing one range must not make a problem for every pair of them.
            let others: Vec<_> = ranged
                .iter()
                .enumerate()
                .filter(|&(j, &(_, other_range))| i != j && range.overlaps(&other_range))
                .map(|(_, &(other, other_range))| format!("PortPolicy/{}'s range {other_range}", other.name))
                .collect();
            if !others.is_empty() {
                const NAMED: usize = 3;
                let mut named = others[..others.len().min(NAMED)].join(", ");
                if others.len() > NAMED {
                    named.push_str(&format!(" and {} more", others.len() - NAMED));
                }
                self.problem(
                    Some(&policy.name),
                    Reason::PolicyOverlap,
                    Problem::new(
                        &object,
                        "spec.nodePorts.range",
                        format!("{range} overlaps {named}; they allocate from the shared ports"),
                    ),
                );
            }
            for (k, pin) in policy.pinned.iter().enumerate() {
                let Ok(port) = u16::try_from(pin.node_port) else {
                    continue;
                };
                if !cluster.contains(port) {
                    self.problem(
                        Some(&policy.name),
                        Reason::RangeOutsideCluster,
                        Problem::new(
                            &object,
                            format!("spec.nodePorts.pinned[{k}].nodePort"),
                            format!(
                                "{port} is not inside the cluster's nodePort range {cluster}; not applied"
                            ),
                        ),
                    );
                    continue;
                }
                self.pins.insert(
                    (&policy.name, &pin.namespace, &pin.service, &pin.port_name),
                    (k, port),
                );
            }
        }
    }

    /// Who manages each Service; reports ambiguous and invalid ones.
    fn govern(&mut self) -> Vec<Treatment<'a>> {
        let policies = self.input.policies;
        let mut treatments = Vec::with_capacity(self.views.len());
        let mut found = Vec::new();
        for (view, invalid) in self.views.iter().zip(&self.invalid) {
            let governance = policies
                .governing_service(Some(&self.input.namespace_labels.of(view.namespace)), view.labels);
            let treatment = match governance {
                Governance::By(policy) if invalid.is_empty() => match policy.node_port_range {
                    Some(range) => Treatment::Managed(policy, range),
                    None => Treatment::Untouched,
                },
                Governance::Ambiguous(a, b) => {
                    let problem = Problem::new(
                        view.object(),
                        "metadata.labels",
                        format!(
                            "selected by PortPolicy/{} and PortPolicy/{}; its nodePorts are left untouched until one policy selects it",
                            a.name, b.name
                        ),
                    );
                    for policy in [a, b] {
                        found.push((
                            Some(policy.name.as_str()),
                            Reason::MultiplePolicies,
                            problem.clone(),
                        ));
                    }
                    Treatment::Untouched
                }
                _ => Treatment::Untouched,
            };
            let governing = governance.policy().map(|p| p.name.as_str());
            for problem in invalid {
                found.push((governing, Reason::InvalidService, problem.clone()));
            }
            treatments.push(treatment);
        }
        for (policy, reason, problem) in found {
            self.problem(policy, reason, problem);
        }
        treatments
    }

    /// Every nodePort any Service holds is taken, whoever governs it. Duplicates stay with
    /// both Services (moving either would break it) and are reported on both.
    fn seed_services(&mut self) {
        let mut duplicates = Vec::new();
        for (i, view) in self.views.iter().enumerate() {
            for (port, field) in view.held_node_ports() {
                match self.holders.get(&port) {
                    Some(&Holder::Service(first)) if first != i => duplicates.push((first, i, port, field)),
                    Some(_) => {}
                    None => {
                        self.holders.insert(port, Holder::Service(i));
                        self.blocked.set(port);
                    }
                }
            }
        }
        for (first, later, port, field) in duplicates {
            let first_field = self.views[first]
                .held_node_ports()
                .find(|(p, _)| *p == port)
                .map(|(_, f)| f)
                .unwrap_or_default();
            for (at, at_field, other, other_field) in [
                (later, &field, first, &first_field),
                (first, &first_field, later, &field),
            ] {
                let problem = Problem::new(
                    self.views[at].object(),
                    at_field.as_str(),
                    format!(
                        "nodePort {port} is also held by {} {other_field}; both keep it, one must change",
                        self.views[other].object()
                    ),
                );
                let policy = self.governing_name(at);
                self.problem(policy.as_deref(), Reason::DuplicateNodePort, problem);
            }
        }
    }

    fn governing_name(&self, view: usize) -> Option<String> {
        let view = &self.views[view];
        self.input
            .policies
            .governing_service(Some(&self.input.namespace_labels.of(view.namespace)), view.labels)
            .policy()
            .map(|p| p.name.clone())
    }

    /// Reserved ranges and pinned ports of every policy are off limits for automatic
    /// allocation, whichever policy would allocate.
    fn block_reserved_and_pinned(&mut self) {
        let policies: &'a [CompiledPolicy] = self.input.policies.policies();
        for policy in policies {
            for reserved in &policy.reserved {
                if !reserved.overlaps(&self.input.cluster_range) {
                    continue;
                }
                let low = reserved.low.max(self.input.cluster_range.low);
                let high = reserved.high.min(self.input.cluster_range.high);
                for port in low..=high {
                    self.blocked.set(port);
                }
            }
        }
        let pinned: Vec<u16> = self.pins.values().map(|&(_, port)| port).collect();
        for port in pinned {
            self.blocked.set(port);
        }
        for &port in self.in_flight {
            if self.input.cluster_range.contains(port) {
                self.blocked.set(port);
            }
        }
    }

    /// Turns `status.allocations` into reservations. A record whose identity holds a port now
    /// is superseded by that port; an expired one is dropped; one whose port someone else holds
    /// is lost to them.
    fn read_records(&mut self) {
        let input = self.input;
        let mut by_name: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (i, view) in self.views.iter().enumerate() {
            by_name.entry((view.namespace, view.name)).or_insert(i);
        }
        let mut pinned_ports: BTreeMap<u16, Vec<(&str, &str, &str)>> = BTreeMap::new();
        for (&(_, namespace, service, port_name), &(_, port)) in &self.pins {
            pinned_ports
                .entry(port)
                .or_default()
                .push((namespace, service, port_name));
        }
        for (policy_name, records) in input.records {
            let Some(policy) = input.policies.get(policy_name) else {
                if input.policies.invalid().contains(policy_name) {
                    for record in records {
                        if let Some(port) = record_port(record)
                            && !self.holders.contains_key(&port)
                        {
                            self.holders.insert(port, Holder::FrozenPolicy(policy_name));
                            self.blocked.set(port);
                        }
                    }
                }
                continue;
            };
            let Some(range) = policy.node_port_range else {
                continue;
            };
            let retention_nanos = i128::from(policy.retention_seconds) * 1_000_000_000;
            for record in records {
                let Some(port) = record_port(record) else {
                    continue;
                };
                let identity = Identity {
                    namespace: &record.namespace,
                    service: &record.service,
                    port_name: &record.port_name,
                    kind: record.kind,
                };
                let holds_a_port = by_name
                    .get(&(identity.namespace, identity.service))
                    .is_some_and(|&i| holds_port(self.views[i], identity));
                let expired = record
                    .released_at
                    .as_ref()
                    .is_some_and(|t| t.0.as_nanosecond() + retention_nanos <= self.now_nanos);
                // A reserved range does not take a port from a Service that holds it (that is the
                // `holds_a_port` case), but a record is only a promise: one on a port reserved
                // since is not kept, nor is one on a port pinned for someone else.
                let reserved = self
                    .input
                    .policies
                    .policies()
                    .iter()
                    .any(|p| p.reserved.iter().any(|r| r.contains(port)));
                let pinned_for_other = pinned_ports.get(&port).is_some_and(|pins| {
                    !pins.contains(&(identity.namespace, identity.service, identity.port_name))
                        || identity.kind != NodePortKind::Service
                });
                let restorable = range.contains(port)
                    && input.cluster_range.contains(port)
                    && !pinned_for_other
                    && !reserved;
                let key = (policy_name.as_str(), identity);
                if holds_a_port
                    || expired
                    || !restorable
                    || self.holders.contains_key(&port)
                    || self.reservations.contains_key(&key)
                {
                    continue;
                }
                self.holders.insert(
                    port,
                    Holder::Retained {
                        policy: policy_name,
                        identity,
                    },
                );
                self.blocked.set(port);
                self.reservations.insert(
                    key,
                    Reservation {
                        node_port: port,
                        released_at: record.released_at.as_ref(),
                    },
                );
            }
        }
    }

    fn allocate_service(&mut self, i: usize, policy: &'a CompiledPolicy, range: PortRange, rank: usize) {
        let first_assignment = self.assignments.len();
        let managed = Managed {
            i,
            view: self.views[i],
            policy,
            range,
        };
        let mut changed_ports = Vec::new();
        for group in port_groups(&managed.view.ports) {
            let target = self.group_target(managed, &group);
            changed_ports.extend(self.assign_group(managed, &group, target));
        }
        let health_change = self.allocate_health_check(managed);
        let view = managed.view;
        let own = (view.ports.iter().filter_map(|p| p.node_port))
            .chain(view.health_check.and_then(|h| h.node_port));
        for port in own {
            let kept = self.assignments[first_assignment..]
                .iter()
                .any(|a| a.node_port == port);
            if !kept && matches!(self.holders.get(&port), Some(&Holder::Service(j)) if j == i) {
                self.vacated.insert(port, i);
            }
        }
        if !changed_ports.is_empty() || health_change.is_some() {
            let change = ServiceIntent {
                policy: Some(policy.name.clone()),
                ports: changed_ports,
                health_check_node_port: health_change,
                ..ServiceIntent::new(view.namespace, view.name)
            };
            self.changes.push((rank, change));
        }
    }

    /// The nodePort a group of ports (one number, several protocols) is to hold: its pin, else
    /// what it holds (moved into the range if the policy enforces it), else a new one.
    fn group_target(&mut self, m: Managed<'a>, group: &[&ServicePortModel<'a>]) -> Option<Target> {
        let names: Vec<&'a str> = group.iter().map(|p| p.name).collect();
        if let Some(pinned) = self.pinned_target(m, &names) {
            return Some(pinned);
        }
        let field = format!("spec.ports[{}].nodePort", group[0].index);
        let kept = |port| Target {
            port,
            state: AssignmentState::Existing,
            every_member: false,
        };
        let fresh = |(port, state)| Target {
            port,
            state,
            every_member: false,
        };
        match group.iter().find_map(|p| p.node_port) {
            Some(port) if !m.range.contains(port) && m.policy.enforce && m.view.allocates_node_ports => {
                let moved =
                    self.restore_or_allocate(m.i, m.policy, m.range, &names, NodePortKind::Service, &field);
                Some(moved.map_or(kept(port), fresh))
            }
            Some(port) => Some(kept(port)),
            None if m.view.allocates_node_ports => self
                .restore_or_allocate(m.i, m.policy, m.range, &names, NodePortKind::Service, &field)
                .map(fresh),
            None => None,
        }
    }

    /// The group's pinned port, if the policy pins one and nobody else holds it.
    fn pinned_target(&mut self, m: Managed<'a>, names: &[&'a str]) -> Option<Target> {
        if !m.view.allocates_node_ports {
            return None;
        }
        let (namespace, service) = (m.view.namespace, m.view.name);
        let &(pin_index, pin) = names.iter().find_map(|name| {
            self.pins
                .get(&(m.policy.name.as_str(), namespace, service, *name))
        })?;
        let Some(holder) = self.holder_other_than(pin, m.i, names) else {
            self.take(pin, m.i);
            return Some(Target {
                port: pin,
                state: AssignmentState::Pinned,
                every_member: true,
            });
        };
        let identity = Identity {
            namespace,
            service,
            port_name: names[0],
            kind: NodePortKind::Service,
        };
        let problem = Problem::new(
            format!("PortPolicy/{}", m.policy.name),
            format!("spec.nodePorts.pinned[{pin_index}].nodePort"),
            format!(
                "{pin} is pinned for {} but is held by {holder}; the holder keeps it",
                identity.describe()
            ),
        );
        self.problem(Some(&m.policy.name), Reason::PinnedPortTaken, problem);
        None
    }

    /// Records each member's assignment; returns the ports whose nodePort changes.
    fn assign_group(
        &mut self,
        m: Managed<'a>,
        group: &[&ServicePortModel<'a>],
        target: Option<Target>,
    ) -> Vec<ServicePortNodePort> {
        let mut changed = Vec::new();
        for member in group {
            let outcome = match (member.node_port, target) {
                (Some(_), Some(t)) if t.every_member => Some((t.port, t.state)),
                (Some(own), Some(t)) if own == t.port => Some((t.port, t.state)),
                (Some(own), Some(t))
                    if !m.range.contains(own) && m.policy.enforce && m.range.contains(t.port) =>
                {
                    Some((t.port, t.state))
                }
                (Some(own), _) => Some((own, AssignmentState::Existing)),
                (None, Some(t)) if m.view.allocates_node_ports => Some((t.port, t.state)),
                (None, _) => None,
            };
            if let Some(own) = member.node_port
                && !m.range.contains(own)
            {
                let field = format!("spec.ports[{}].nodePort", member.index);
                self.report_outside_range(m, &field, own, outcome.map(|(port, _)| port));
            }
            let Some((node_port, state)) = outcome else {
                continue;
            };
            let assignment = NodePortAssignment {
                policy: Some(m.policy.name.clone()),
                namespace: m.view.namespace.to_string(),
                service: m.view.name.to_string(),
                port_name: member.name.to_string(),
                port: member.port,
                protocol: member.protocol,
                node_port,
                kind: NodePortKind::Service,
                state,
                previous: member.node_port,
            };
            if assignment.changed() {
                changed.push(ServicePortNodePort {
                    index: member.index,
                    name: member.name.to_string(),
                    port: member.port,
                    protocol: member.protocol,
                    node_port,
                });
            }
            self.assignments.push(assignment);
        }
        changed
    }

    /// A Local LoadBalancer's healthCheckNodePort; returns it if it must be written.
    fn allocate_health_check(&mut self, m: Managed<'a>) -> Option<HealthCheckNodePort> {
        let health = m.view.health_check?;
        let field = health.field.path();
        let outcome = match health.node_port {
            Some(own) if m.range.contains(own) => Some((own, AssignmentState::Existing)),
            Some(own) => {
                let moved = if m.policy.enforce {
                    self.restore_or_allocate(m.i, m.policy, m.range, &[""], NodePortKind::HealthCheck, &field)
                } else {
                    None
                };
                self.report_outside_range(m, &field, own, Some(moved.map_or(own, |(port, _)| port)));
                moved.or(Some((own, AssignmentState::Existing)))
            }
            None => {
                self.restore_or_allocate(m.i, m.policy, m.range, &[""], NodePortKind::HealthCheck, &field)
            }
        };
        let (node_port, state) = outcome?;
        self.assignments.push(health_assignment(
            m.view,
            Some(&m.policy.name),
            node_port,
            state,
            health.node_port,
        ));
        (health.node_port != Some(node_port)).then_some(HealthCheckNodePort {
            node_port,
            field: health.field,
        })
    }

    /// `own`, held at `field`, is outside the policy's range; `now` is what it holds after
    /// this plan (another port if it moved).
    fn report_outside_range(&mut self, m: Managed<'a>, field: &str, own: u16, now: Option<u16>) {
        let fate = match now {
            Some(port) if port != own => format!("moved to {port}"),
            _ if m.policy.enforce => "kept: no free port in the range to move it to".to_string(),
            _ => "kept, as the policy does not enforce its range".to_string(),
        };
        let problem = Problem::new(
            m.view.object(),
            field,
            format!(
                "{own} is outside PortPolicy/{}'s range {}; {fate}",
                m.policy.name, m.range
            ),
        );
        self.problem(Some(&m.policy.name), Reason::OutsidePolicyRange, problem);
    }

    /// A Service nobody may change still shows what it holds.
    fn record_untouched(&mut self, i: usize) {
        let view = &self.views[i];
        let mut held = Vec::new();
        for port in &view.ports {
            if let Some(node_port) = port.node_port {
                held.push(NodePortAssignment {
                    policy: None,
                    namespace: view.namespace.to_string(),
                    service: view.name.to_string(),
                    port_name: port.name.to_string(),
                    port: port.port,
                    protocol: port.protocol,
                    node_port,
                    kind: NodePortKind::Service,
                    state: AssignmentState::InUse,
                    previous: Some(node_port),
                });
            }
        }
        if let Some(node_port) = view.health_check.as_ref().and_then(|h| h.node_port) {
            held.push(health_assignment(
                view,
                None,
                node_port,
                AssignmentState::InUse,
                Some(node_port),
            ));
        }
        self.assignments.extend(held);
    }

    /// Who other than Service `i`'s ports `names` holds a port, described for a message.
    fn holder_other_than(&self, port: u16, i: usize, names: &[&str]) -> Option<String> {
        let view = &self.views[i];
        match self.holders.get(&port)? {
            Holder::Service(j) if *j == i => None,
            Holder::Service(j) if self.vacated.get(&port) == Some(j) => None,
            Holder::Service(j) => Some(self.views[*j].object()),
            Holder::Retained { identity, .. }
                if identity.namespace == view.namespace
                    && identity.service == view.name
                    && identity.kind == NodePortKind::Service
                    && names.contains(&identity.port_name) =>
            {
                None
            }
            Holder::Retained { policy, identity } => Some(format!(
                "PortPolicy/{policy}'s retained allocation for {}",
                identity.describe()
            )),
            Holder::FrozenPolicy(policy) => Some(format!("an allocation of PortPolicy/{policy}")),
        }
    }

    fn take(&mut self, port: u16, i: usize) {
        self.holders.insert(port, Holder::Service(i));
        self.blocked.set(port);
    }

    /// The identity's retained port if it has one, else a new one from the range.
    fn restore_or_allocate(
        &mut self,
        i: usize,
        policy: &'a CompiledPolicy,
        range: PortRange,
        names: &[&'a str],
        kind: NodePortKind,
        field: &str,
    ) -> Option<(u16, AssignmentState)> {
        let (namespace, service) = (self.views[i].namespace, self.views[i].name);
        // Taken out of the reservations so no second claimant of the identity gets it too.
        let restored = names.iter().find_map(|port_name| {
            let identity = Identity {
                namespace,
                service,
                port_name,
                kind,
            };
            self.reservations
                .remove(&(policy.name.as_str(), identity))
                .map(|r| r.node_port)
        });
        if let Some(port) = restored {
            self.take(port, i);
            return Some((port, AssignmentState::Restored));
        }
        let identity = Identity {
            namespace,
            service,
            port_name: names[0],
            kind,
        };
        let cluster = self.input.cluster_range;
        let usable = range.overlaps(&cluster).then(|| PortRange {
            low: range.low.max(cluster.low),
            high: range.high.min(cluster.high),
        });
        if let Some(port) = usable.and_then(|usable| self.first_free(usable, identity_hash(&identity))) {
            self.take(port, i);
            return Some((port, AssignmentState::Allocated));
        }
        let message = match usable {
            Some(usable) => format!(
                "no free nodePort for {} in PortPolicy/{}'s range {range}: {} of its {} ports are held, reserved or pinned",
                identity.describe(),
                policy.name,
                self.blocked.count_in(usable),
                usable.len()
            ),
            None => format!(
                "no nodePort for {}: PortPolicy/{}'s range {range} has no port inside the cluster's range {cluster}",
                identity.describe(),
                policy.name
            ),
        };
        let problem = Problem::new(self.views[i].object(), field, message);
        self.problem(Some(&policy.name), Reason::RangeExhausted, problem);
        None
    }

    fn first_free(&self, usable: PortRange, hash: u64) -> Option<u16> {
        first_free(&self.blocked, usable, hash)
    }

    fn finish(mut self) -> NodePortAllocation {
        let mut policies = BTreeMap::new();
        let ranged: Vec<_> = self.ranged_policies().collect();
        for (policy, range) in ranged {
            let mut live: BTreeMap<Identity<'_>, u16> = BTreeMap::new();
            for a in &self.assignments {
                if a.policy.as_deref() == Some(policy.name.as_str())
                    && a.state != AssignmentState::InUse
                    && range.contains(a.node_port)
                {
                    live.entry(Identity {
                        namespace: &a.namespace,
                        service: &a.service,
                        port_name: &a.port_name,
                        kind: a.kind,
                    })
                    .or_insert(a.node_port);
                }
            }
            let mut records: Vec<AllocationRecord> = live
                .iter()
                .map(|(identity, &port)| record(identity, port, None))
                .collect();
            for ((name, identity), reservation) in &self.reservations {
                if *name == policy.name && !live.contains_key(identity) {
                    let released_at = reservation
                        .released_at
                        .cloned()
                        .unwrap_or_else(|| self.now.clone());
                    records.push(record(identity, reservation.node_port, Some(released_at)));
                }
            }
            records.sort_by(|a, b| {
                (&a.namespace, &a.service, a.kind, &a.port_name).cmp(&(
                    &b.namespace,
                    &b.service,
                    b.kind,
                    &b.port_name,
                ))
            });
            let used = records.iter().map(|r| r.node_port).collect::<BTreeSet<_>>().len();
            policies.insert(
                policy.name.clone(),
                PolicyNodePorts {
                    range,
                    used,
                    total: range.len(),
                    records,
                },
            );
        }
        self.assignments.sort_by(|a, b| {
            (&a.namespace, &a.service, a.kind, &a.port_name, a.protocol).cmp(&(
                &b.namespace,
                &b.service,
                b.kind,
                &b.port_name,
                b.protocol,
            ))
        });
        self.changes
            .sort_by(|(ra, a), (rb, b)| (ra, &a.namespace, &a.name).cmp(&(rb, &b.namespace, &b.name)));
        NodePortAllocation {
            assignments: self.assignments,
            problems: self.problems,
            policies,
            changes: self.changes.into_iter().map(|(_, change)| change).collect(),
        }
    }
}

/// Like the API server, prefer the upper band of the range and leave the lower "static"
/// band (KEP-3668) to explicit requests until the upper band is full. The start inside
/// each band comes from the identity, so a port does not depend on who was planned first.
pub(super) fn first_free(blocked: &PortBitmap, usable: PortRange, hash: u64) -> Option<u16> {
    let band = static_band(usable.len());
    let upper = PortRange {
        low: usable.low + band as u16,
        high: usable.high,
    };
    let start = |r: PortRange| r.low + (hash % r.len() as u64) as u16;
    blocked.first_free(upper, start(upper)).or_else(|| {
        let lower = PortRange {
            low: usable.low,
            high: (usable.low + band as u16).checked_sub(1)?,
        };
        (band > 0).then(|| blocked.first_free(lower, start(lower)))?
    })
}

fn record(identity: &Identity<'_>, port: u16, released_at: Option<Time>) -> AllocationRecord {
    AllocationRecord {
        namespace: identity.namespace.to_string(),
        service: identity.service.to_string(),
        port_name: identity.port_name.to_string(),
        kind: identity.kind,
        node_port: i32::from(port),
        released_at,
    }
}

fn health_assignment(
    view: &ServiceModel<'_>,
    policy: Option<&str>,
    node_port: u16,
    state: AssignmentState,
    previous: Option<u16>,
) -> NodePortAssignment {
    NodePortAssignment {
        policy: policy.map(str::to_string),
        namespace: view.namespace.to_string(),
        service: view.name.to_string(),
        port_name: String::new(),
        port: 0,
        protocol: Protocol::Tcp,
        node_port,
        kind: NodePortKind::HealthCheck,
        state,
        previous,
    }
}

fn record_port(record: &AllocationRecord) -> Option<u16> {
    u16::try_from(record.node_port).ok().filter(|p| *p != 0)
}

/// Whether a Service holds a nodePort for this identity right now.
fn holds_port(view: &ServiceModel<'_>, identity: Identity<'_>) -> bool {
    match identity.kind {
        NodePortKind::Service => view
            .ports
            .iter()
            .any(|p| p.name == identity.port_name && p.node_port.is_some()),
        NodePortKind::HealthCheck => view.health_check.as_ref().is_some_and(|h| h.node_port.is_some()),
    }
}

/// Width of the lower band kept for explicit requests: min(max(16, size/32), 128), none for
/// ranges of 16 ports or fewer (portallocator's calculateRangeOffset).
fn static_band(size: usize) -> usize {
    if size <= 16 { 0 } else { (size / 32).clamp(16, 128) }
}

/// FNV-1a over the identity's parts (each ended by a byte no name holds), finished with
/// splitmix64 so nearby names spread over the range.
pub(super) fn identity_hash(identity: &Identity<'_>) -> u64 {
    let kind: &[u8] = match identity.kind {
        NodePortKind::Service => b"Service",
        NodePortKind::HealthCheck => b"HealthCheck",
    };
    let mut fnv = Fnv1a64::default();
    for part in [
        identity.namespace.as_bytes(),
        identity.service.as_bytes(),
        identity.port_name.as_bytes(),
        kind,
    ] {
        fnv.write(part);
        fnv.write(&[0xff]);
    }
    let mut hash = fnv.finish();
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn static_band_matches_the_api_server() {
        assert_eq!(static_band(2768), 86);
        assert_eq!(static_band(16), 0);
        assert_eq!(static_band(17), 16);
        assert_eq!(static_band(100), 16);
        assert_eq!(static_band(10_000), 128);
    }

    #[test]
    fn identity_hash_is_stable_and_spreads() {
        let id = |service| Identity {
            namespace: "shop",
            service,
            port_name: "http",
            kind: NodePortKind::Service,
        };
        // Pinned value: changing the hash would move where every future nodePort search starts.
        assert_eq!(identity_hash(&id("cart")), 7_124_920_769_096_008_666);
        assert_ne!(identity_hash(&id("cart")), identity_hash(&id("carts")));
        let buckets: BTreeSet<u64> = (0..200)
            .map(|i| identity_hash(&id(Box::leak(format!("svc-{i}").into_boxed_str()))) % 100)
            .collect();
        assert!(
            buckets.len() > 70,
            "200 identities hit only {} of 100 buckets",
            buckets.len()
        );
    }
}
