//! `portpolicy operator`: the Kubernetes edge around the pure core.
//!
//! A kube-runtime `Controller` over PortPolicies, fed by watches on Services, Pods (pruned to
//! [`portpolicy_core::hostport::HostPortPod`]), Nodes, Namespaces and the agent DaemonSets it owns. Each
//! reconcile reads the reflector stores, runs the same functions `portpolicy plan` runs
//! (`allocate_node_ports`, `detect_conflicts`), and writes only the difference:
//!
//! - nodePorts, healthCheckNodePorts, `externalTrafficPolicy` and the proxy-name label on
//!   governed Services, by server-side apply with the field manager `portpolicy-operator`;
//! - the policy's status (conditions, counts, allocations, conflicts) by server-side apply on
//!   the status subresource, skipped when only condition timestamps would change;
//! - the agent DaemonSet, owned by the policy.
//!
//! Sticky allocations live in the policy's own `status.allocations`. They could live in a
//! ConfigMap or a second CRD, but the status is already the policy's single writer's record:
//! it is read back with the policy at no extra cost, shown by `kubectl get -o yaml`, deleted with
//! the policy, and every write carries the policy's resourceVersion, so a stale replica's write
//! is rejected (409) instead of overwriting newer records. Status is not backed up by
//! `kubectl get -o yaml | kubectl apply` round trips, which is acceptable: losing the records
//! only loses stickiness for Services deleted within the retention time, never a live port.
//!
//! Only the leader of the `portpolicy-operator` Lease runs the controller, so two replicas never
//! both allocate.

pub(crate) mod agent;
mod context;
pub mod controller;
pub mod core;
pub mod lease;
pub mod metrics;
mod reconcile;
pub mod server;
mod services;
pub mod status;

/// Why a reconcile or the operator failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("status write lost a race with another write; retrying")]
    Conflict,
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// A bounded label value for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Conflict => "conflict",
            Error::Serialize { .. } => "serialize",
            Error::Config(_) => "config",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
