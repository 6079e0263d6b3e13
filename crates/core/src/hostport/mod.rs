//! hostPort conflict detection: which Pods hold which ports on which node, which would clash
//! (now, or once a DaemonSet, Deployment or StatefulSet manifest is applied), and which break a
//! PortPolicy's hostPort rules.
//!
//! Semantics follow the scheduler's NodePorts filter (HostPortInfo in
//! pkg/scheduler/framework/types.go): regular containers and sidecar init containers count,
//! empty hostIP is `0.0.0.0`, empty protocol TCP, hostPort 0 none, `hostNetwork` Pods bind every
//! containerPort; a wildcard hostIP clashes with any address, two specific addresses only when
//! equal. Deliberate differences: `::` is a wildcard too, and a hostPort inside the nodePort
//! range or outside a policy's allowed list is reported as well.
//!
//! The flow: [`HostPortPod`] (stored by the operator, or built from snapshot Pods) ->
//! [`placed_pods`] -> [`predict_workloads`] -> [`detect_conflicts`]. [`check_snapshot`] runs it
//! all for `portpolicy plan`.

mod binding;
mod detect;
mod eligibility;
mod placement;
mod pod;

use crate::governance::PolicySet;
use crate::ports::PortRange;
use crate::problem::Problem;
use crate::snapshot::Snapshot;

pub use binding::HostPortBinding;
pub use detect::{ConflictInput, ConflictReason, HostPortConflict, detect_conflicts};
pub use placement::{PlacedPod, placed_pods, predict_workloads};
pub use pod::{DeclaredPort, HostPortPod, HostPortPodSpec, PodPhase, PortedContainer};

/// What hostPort checking found in a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct HostPortReport {
    /// Real Pods holding host ports, then predicted workload Pods.
    pub pods: Vec<PlacedPod>,
    pub conflicts: Vec<HostPortConflict>,
    /// Invalid ports and placement fields, and workloads whose replicas cannot all be placed.
    pub problems: Vec<Problem>,
}

/// Runs hostPort checking over a snapshot: its Pods as they are, its workload manifests as
/// predicted Pods.
pub(crate) fn check_snapshot(
    snapshot: &Snapshot,
    policies: &PolicySet,
    node_port_range: PortRange,
) -> HostPortReport {
    let (mut placed, mut problems) = placed_pods(&snapshot.pods);
    let (predicted, prediction_problems) = predict_workloads(snapshot, &placed);
    placed.extend(predicted);
    problems.extend(prediction_problems);
    let namespace_labels = snapshot.namespace_labels();
    let conflicts = detect_conflicts(&ConflictInput {
        pods: &placed,
        node_port_range,
        policies,
        namespace_labels: &namespace_labels,
    });
    HostPortReport {
        pods: placed,
        conflicts,
        problems,
    }
}

#[cfg(test)]
mod tests;
