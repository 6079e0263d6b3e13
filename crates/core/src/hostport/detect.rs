//! hostPort conflicts per node: Pods that want the same port, hostPorts that collide with the
//! cluster's node ports, and hostPorts a policy does not allow.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::crd::{CompiledPolicy, HostPortConflictRecord};
use crate::governance::{NamespaceLabels, PolicySet};
use crate::ports::{PortRange, Protocol};

use super::binding::HostPortBinding;
use super::placement::PlacedPod;

/// Why a hostPort is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictReason {
    /// Two or more Pods on one node want the same port (the scheduler's NodePorts rule).
    PodConflict,
    /// The port is inside the cluster's nodePort range, where kube-proxy opens node ports on
    /// every node.
    InNodePortRange,
    /// A policy governing the Pod's namespace does not list the port in `hostPorts.allowed`.
    NotAllowed,
}

impl ConflictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictReason::PodConflict => "PodConflict",
            ConflictReason::InNodePortRange => "InNodePortRange",
            ConflictReason::NotAllowed => "NotAllowed",
        }
    }
}

impl fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reported hostPort on one node, with every Pod involved and the policies it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPortConflict {
    pub node: String,
    pub protocol: Protocol,
    /// For a [`ConflictReason::PodConflict`] that involves a wildcard binding, the wildcard
    /// (`0.0.0.0`, else `::`): every Pod listed then clashes with a Pod that binds all addresses.
    pub host_ip: IpAddr,
    pub host_port: u16,
    /// `namespace/name` (or `namespace/workload@node` when predicted), sorted.
    pub pods: Vec<String>,
    pub reason: ConflictReason,
    /// Names of the policies whose status should list this conflict, sorted. For a pod conflict,
    /// every policy governing one of the Pods' namespaces; otherwise the policies whose rule is
    /// broken. Empty when no policy governs the Pods (it still shows in `plan`).
    pub policies: Vec<String>,
}

impl HostPortConflict {
    pub(crate) fn binding(&self) -> HostPortBinding {
        HostPortBinding {
            protocol: self.protocol,
            host_ip: self.host_ip,
            host_port: self.host_port,
        }
    }

    /// The entry for a policy's `status.conflicts`.
    pub fn to_record(&self) -> HostPortConflictRecord {
        HostPortConflictRecord {
            node: self.node.clone(),
            protocol: self.protocol.to_string(),
            host_ip: self.host_ip.to_string(),
            host_port: i32::from(self.host_port),
            pods: self.pods.clone(),
            reason: self.reason.as_str().to_string(),
        }
    }

    fn sort_key(&self) -> (&str, u16, Protocol, IpAddr, ConflictReason, &[String]) {
        (
            &self.node,
            self.host_port,
            self.protocol,
            self.host_ip,
            self.reason,
            &self.pods,
        )
    }
}

impl fmt::Display for HostPortConflict {
    /// One line for `plan` output and condition messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pods = self.pods.join(", ");
        let binding = self.binding();
        let node = &self.node;
        match self.reason {
            ConflictReason::PodConflict => write!(
                f,
                "node {node}: {} Pods want {binding}, only one can have it: {pods}",
                self.pods.len()
            ),
            ConflictReason::InNodePortRange => write!(
                f,
                "node {node}: {binding} is inside the cluster's nodePort range and collides with node \
                 ports on every node: {pods}"
            ),
            ConflictReason::NotAllowed => write!(
                f,
                "node {node}: {binding} is not in spec.hostPorts.allowed of PortPolicy {}: {pods}",
                self.policies.join(", ")
            ),
        }
    }
}

/// Everything conflict detection looks at.
#[derive(Clone, Copy, Debug)]
pub struct ConflictInput<'a> {
    /// Real and predicted Pods with their bindings (see [`super::placed_pods`] and
    /// [`super::predict_workloads`]).
    pub pods: &'a [PlacedPod],
    /// The cluster's `--service-node-port-range`.
    pub node_port_range: PortRange,
    pub policies: &'a PolicySet,
    /// Labels of each namespace; a namespace missing here still has its
    /// `kubernetes.io/metadata.name` label.
    pub namespace_labels: &'a NamespaceLabels,
}

/// A binding of one Pod, flattened so all bindings sort by where they could clash.
#[derive(Clone, Copy)]
struct Held<'a> {
    node: &'a str,
    protocol: Protocol,
    port: u16,
    ip: IpAddr,
    pod: usize,
}

/// Every conflict on every node, sorted by node, port, protocol, hostIP and reason.
pub fn detect_conflicts(input: &ConflictInput) -> Vec<HostPortConflict> {
    let mut held: Vec<Held> = input
        .pods
        .iter()
        .enumerate()
        .flat_map(|(pod, placed)| {
            placed.bindings.iter().map(move |b| Held {
                node: &placed.node,
                protocol: b.protocol,
                port: b.host_port,
                ip: b.host_ip,
                pod,
            })
        })
        .collect();
    held.sort_unstable_by(|a, b| {
        (a.node, a.protocol, a.port, a.ip, a.pod).cmp(&(b.node, b.protocol, b.port, b.ip, b.pod))
    });

    let governance = NamespacePolicies::new(input);
    let mut conflicts = Vec::new();
    let mut report = |first: &Held, ip: IpAddr, reason, pods: Vec<usize>, policies: Vec<&str>| {
        let mut pods: Vec<String> = pods.into_iter().map(|i| input.pods[i].pod.clone()).collect();
        pods.sort_unstable();
        pods.dedup();
        let mut policies: Vec<String> = policies.into_iter().map(str::to_string).collect();
        policies.sort_unstable();
        policies.dedup();
        conflicts.push(HostPortConflict {
            node: first.node.to_string(),
            protocol: first.protocol,
            host_ip: ip,
            host_port: first.port,
            pods,
            reason,
            policies,
        });
    };

    for same_port in held.chunk_by(|a, b| (a.node, a.protocol, a.port) == (b.node, b.protocol, b.port)) {
        let first = &same_port[0];
        let mut pods: Vec<usize> = same_port.iter().map(|h| h.pod).collect();
        pods.sort_unstable();
        pods.dedup();
        if pods.len() > 1 {
            // Sorted by IP, so the first wildcard is 0.0.0.0 when a Pod binds it, else `::`.
            if let Some(wildcard) = same_port.iter().find(|h| h.ip.is_unspecified()) {
                // Every other Pod clashes with the one binding all addresses: one conflict.
                let policies = governance.of_pods(&pods).map(|p| p.name.as_str()).collect();
                report(first, wildcard.ip, ConflictReason::PodConflict, pods, policies);
            } else {
                for same_ip in same_port.chunk_by(|a, b| a.ip == b.ip) {
                    let mut pods: Vec<usize> = same_ip.iter().map(|h| h.pod).collect();
                    pods.dedup();
                    if pods.len() > 1 {
                        let policies = governance.of_pods(&pods).map(|p| p.name.as_str()).collect();
                        report(
                            &same_ip[0],
                            same_ip[0].ip,
                            ConflictReason::PodConflict,
                            pods,
                            policies,
                        );
                    }
                }
            }
        }

        let in_node_port_range = input.node_port_range.contains(first.port);
        for same_ip in same_port.chunk_by(|a, b| a.ip == b.ip) {
            let (mut range_pods, mut range_policies) = (Vec::new(), Vec::new());
            let (mut denied_pods, mut denied_policies) = (Vec::new(), Vec::new());
            for h in same_ip {
                let governing = governance.of(h.pod);
                if in_node_port_range {
                    let objecting = governing
                        .iter()
                        .filter(|p| !p.allow_host_ports_in_node_port_range);
                    let before = range_policies.len();
                    range_policies.extend(objecting.map(|p| p.name.as_str()));
                    // Ungoverned Pods are reported too: the collision is real either way.
                    if governing.is_empty() || range_policies.len() > before {
                        range_pods.push(h.pod);
                    }
                }
                let denying = governing.iter().filter(|p| !p.host_port_allowed(h.port));
                let before = denied_policies.len();
                denied_policies.extend(denying.map(|p| p.name.as_str()));
                if denied_policies.len() > before {
                    denied_pods.push(h.pod);
                }
            }
            let at = &same_ip[0];
            if !range_pods.is_empty() {
                report(
                    at,
                    at.ip,
                    ConflictReason::InNodePortRange,
                    range_pods,
                    range_policies,
                );
            }
            if !denied_pods.is_empty() {
                report(
                    at,
                    at.ip,
                    ConflictReason::NotAllowed,
                    denied_pods,
                    denied_policies,
                );
            }
        }
    }
    conflicts.sort_unstable_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    conflicts
}

/// The policies governing each Pod's namespace, computed once per namespace.
struct NamespacePolicies<'a> {
    namespace_of_pod: Vec<usize>,
    governing: Vec<Vec<&'a CompiledPolicy>>,
}

impl<'a> NamespacePolicies<'a> {
    fn new(input: &ConflictInput<'a>) -> Self {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut governing_by_namespace = Vec::new();
        let namespace_of_pod = input
            .pods
            .iter()
            .map(|pod| {
                let namespace = pod.namespace.as_str();
                *index.entry(namespace).or_insert_with(|| {
                    governing_by_namespace.push(governing(input.policies, input.namespace_labels, namespace));
                    governing_by_namespace.len() - 1
                })
            })
            .collect();
        NamespacePolicies {
            namespace_of_pod,
            governing: governing_by_namespace,
        }
    }

    fn of(&self, pod: usize) -> &[&'a CompiledPolicy] {
        &self.governing[self.namespace_of_pod[pod]]
    }

    fn of_pods<'s>(&'s self, pods: &'s [usize]) -> impl Iterator<Item = &'a CompiledPolicy> + 's {
        pods.iter().flat_map(|&pod| self.of(pod).iter().copied())
    }
}

fn governing<'p>(
    policies: &'p PolicySet,
    namespace_labels: &NamespaceLabels,
    namespace: &str,
) -> Vec<&'p CompiledPolicy> {
    let labels = namespace_labels.of(namespace);
    // `for_namespace` ties its items to the labels' lifetime; look the names back up instead.
    let names: Vec<&str> = policies
        .for_namespace(Some(&labels))
        .map(|p| p.name.as_str())
        .collect();
    names.into_iter().filter_map(|name| policies.get(name)).collect()
}
