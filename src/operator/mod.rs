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
//! Every replica watches and keeps the caches (so a follower is Ready and takes over warm); only
//! the leader of the `portpolicy-operator` Lease reconciles and writes, so two replicas never
//! both allocate.

pub(crate) mod agent;
mod context;
pub mod controller;
pub mod core;
pub mod leader_pod;
pub mod lease;
pub mod metrics;
mod reconcile;
pub mod server;
mod services;
pub mod status;
pub mod webhook;

/// Why a reconcile or the operator failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server answered, and refused (4xx other than a conflict).
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The API server could not be reached, did not answer, or failed (5xx).
    #[error("API server unavailable: {0}")]
    ApiServer(#[source] kube::Error),
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
    /// This replica does not lead (any more): it must not write; the leader does the work. Out
    /// of a reconcile, the reconcile was cancelled; out of the operator, it stopped leading and
    /// exits, to be restarted as a follower.
    #[error("this replica stopped leading; it writes nothing until it leads again")]
    LostLeadership,
    /// A watch ended, so its cache is no longer kept up to date (the operator is stopping).
    #[error("the watch of {0} ended; its cache is no longer kept up to date")]
    CacheDropped(&'static str),
    #[error("cannot serve /metrics, /healthz and /readyz on {address}: {source}")]
    MetricsServer {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Flags, environment or kubeconfig: retrying does not help.
    #[error("configuration: {0}")]
    Config(String),
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(s) if s.code >= 500 => Error::ApiServer(error),
            kube::Error::Api(_) => Error::Kube(error),
            kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::ReadEvents(_)
            | kube::Error::HttpError(_) => Error::ApiServer(error),
            _ => Error::Kube(error),
        }
    }
}

impl Error {
    /// Every value [`Error::metric_label`] returns, so each series exists from the start.
    pub const METRIC_LABELS: [&'static str; 8] = [
        "kube",
        "api_server",
        "finalizer",
        "conflict",
        "serialize",
        "lost_leadership",
        "cache_dropped",
        "config",
    ];

    /// A bounded label value for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::ApiServer(_) => "api_server",
            Error::Finalizer(_) => "finalizer",
            Error::Conflict => "conflict",
            Error::Serialize { .. } => "serialize",
            Error::LostLeadership => "lost_leadership",
            Error::CacheDropped(_) => "cache_dropped",
            // Neither comes out of a reconcile; they stop the process.
            Error::MetricsServer { .. } | Error::Config(_) => "config",
        }
    }

    /// The process's exit status when this error stops the operator: 2 for what a restart
    /// cannot fix (flags, environment, kubeconfig, a metrics address that cannot be bound), 3
    /// for a leader that lost its Lease (restarted, it follows), 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::MetricsServer { .. } => 2,
            Error::LostLeadership => 3,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
