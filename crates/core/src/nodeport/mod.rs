//! The nodePort allocator: which nodePort every governed Service port gets.
//!
//! It follows the API server's rules (pkg/registry/core/service/portallocator and
//! storage/alloc.go): a nodePort is unique in the cluster across protocols and Services, ports of
//! one Service with the same `port` and different protocols share one nodePort, a Local
//! LoadBalancer also gets a healthCheckNodePort, `allocateLoadBalancerNodePorts: false` turns
//! automatic allocation off, and only NodePort and LoadBalancer Services get nodePorts.
//!
//! Where it differs, on purpose: ports come from the governing policy's sub-range, a released
//! port stays reserved for its Service identity for `retentionSeconds` so a re-created Service
//! gets it back, and the choice is deterministic (a stable hash of the identity picks where the
//! search starts) instead of random, so `plan`, the operator and a re-run agree.
//!
//! [`allocate_node_ports`] is pure: the clock arrives as `now`, the durable memory as the policies'
//! `status.allocations`, and the result says what to write without writing it.

mod admission;
mod allocator;
mod bitmap;
mod counts;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::crd::{AllocationRecord, NodePortKind};
use crate::governance::{NamespaceLabels, PolicySet};
use crate::intent::ServiceIntent;
use crate::ports::{PortRange, Protocol};
use crate::problem::Problem;
use crate::service::ServiceModel;

pub use admission::{AdmissionLedger, LedgerPolicies, ServiceAdmission, ServiceReview};
pub use allocator::{allocate_node_ports, allocate_node_ports_avoiding};
pub use bitmap::PortBitmap;
pub use counts::NodePortCounts;

/// Everything the allocator decides from.
#[derive(Clone, Copy, Debug)]
pub struct NodePortInput<'a> {
    /// The cluster's `--service-node-port-range`.
    pub cluster_range: PortRange,
    pub policies: &'a PolicySet,
    /// `status.allocations` of each policy, by policy name: the durable sticky records.
    pub records: &'a BTreeMap<String, Vec<AllocationRecord>>,
    /// Every Service in the cluster, governed or not.
    pub services: &'a [ServiceModel<'a>],
    pub namespace_labels: &'a NamespaceLabels,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// What the allocator decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePortAllocation {
    /// Every nodePort a Service holds or is to hold, sorted by
    /// (namespace, service, kind, port name, protocol).
    pub assignments: Vec<NodePortAssignment>,
    pub problems: Vec<NodePortProblem>,
    /// Per valid policy with a nodePort range: what its status should say.
    pub policies: BTreeMap<String, PolicyNodePorts>,
    changes: Vec<ServiceIntent>,
}

impl NodePortAllocation {
    /// The Services whose nodePorts (or healthCheckNodePort) must be written, each with only
    /// what changes, in the order they must be written: a Service leaving a port that a pin
    /// takes in the same plan comes before the pinned Service; otherwise by (namespace, name).
    /// Writing them is the operator's job.
    pub fn service_changes(&self) -> &[ServiceIntent] {
        &self.changes
    }

    /// Problems that concern one policy (for its conditions).
    pub fn problems_of<'s>(&'s self, policy: &'s str) -> impl Iterator<Item = &'s NodePortProblem> + 's {
        self.problems
            .iter()
            .filter(move |p| p.policy.as_deref() == Some(policy))
    }
}

/// One nodePort of one Service port (or of its load balancer's health checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortAssignment {
    /// The policy that manages this nodePort; None when no policy does.
    pub policy: Option<String>,
    pub namespace: String,
    pub service: String,
    /// Empty for the health-check port and a single unnamed Service port.
    pub port_name: String,
    /// The Service port (0 for the health-check port).
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: u16,
    pub kind: NodePortKind,
    pub state: AssignmentState,
    /// What the Service carries now; differs from `node_port` when it must be written.
    pub previous: Option<u16>,
}

impl NodePortAssignment {
    pub fn changed(&self) -> bool {
        self.previous != Some(self.node_port)
    }
}

/// How an assignment came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AssignmentState {
    /// The governed Service already holds it.
    Existing,
    /// Newly handed out from the policy's range.
    Allocated,
    /// Given back from a retained record of the same Service identity.
    Restored,
    /// The policy pins it for this Service port.
    Pinned,
    /// Held by a Service no policy manages (ungoverned, ambiguous, invalid, or governed by a
    /// policy without a nodePort range): never handed to anyone else.
    InUse,
}

impl AssignmentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentState::Existing => "Existing",
            AssignmentState::Allocated => "Allocated",
            AssignmentState::Restored => "Restored",
            AssignmentState::Pinned => "Pinned",
            AssignmentState::InUse => "InUse",
        }
    }
}

/// Something the allocator could not do, or that the user should fix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortProblem {
    /// The policy whose conditions should carry it; None when no policy is concerned.
    pub policy: Option<String>,
    pub reason: NodePortProblemReason,
    pub problem: Problem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodePortProblemReason {
    /// No free port left in the policy's range; the Service port stays without one.
    RangeExhausted,
    /// A pinned port is held by another Service or identity; the holder keeps it.
    PinnedPortTaken,
    /// Two policies' ranges overlap (reported on both).
    PolicyOverlap,
    /// A Service is selected by more than one policy; it is left untouched.
    MultiplePolicies,
    /// A governed Service holds a nodePort outside its policy's range.
    OutsidePolicyRange,
    /// A policy's range (or pinned port) is not inside the cluster's nodePort range.
    RangeOutsideCluster,
    /// Two Services hold the same nodePort.
    DuplicateNodePort,
    /// A Service the API server would reject; it is left untouched.
    InvalidService,
}

impl NodePortProblemReason {
    /// The reason as a condition reason (CamelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            NodePortProblemReason::RangeExhausted => "RangeExhausted",
            NodePortProblemReason::PinnedPortTaken => "PinnedPortTaken",
            NodePortProblemReason::PolicyOverlap => "PolicyOverlap",
            NodePortProblemReason::MultiplePolicies => "MultiplePolicies",
            NodePortProblemReason::OutsidePolicyRange => "OutsidePolicyRange",
            NodePortProblemReason::RangeOutsideCluster => "RangeOutsideCluster",
            NodePortProblemReason::DuplicateNodePort => "DuplicateNodePort",
            NodePortProblemReason::InvalidService => "InvalidService",
        }
    }
}

/// A policy's nodePort status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyNodePorts {
    pub range: PortRange,
    /// Distinct nodePorts the policy holds (for live Services and retained identities).
    pub used: usize,
    /// Size of the range.
    pub total: usize,
    /// The new `status.allocations`, sorted by (namespace, service, kind, port name).
    pub records: Vec<AllocationRecord>,
}

impl PolicyNodePorts {
    /// "used/total", as `status.nodePortsUsed` shows it.
    pub fn used_display(&self) -> String {
        format!("{}/{}", self.used, self.total)
    }
}
