//! The labels and annotations of Kubernetes objects that portpolicy reads or writes, defined
//! once (upstream: k8s.io/api/core/v1 well_known_labels.go and annotation_key_constants.go).

/// The label the API server puts on every Namespace, with the namespace's name as value.
pub(crate) const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The label that hands a Service to an alternative proxy; kube-proxy skips Services carrying it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The value of [`SERVICE_PROXY_NAME_LABEL`] that names portpolicy's agent.
pub const SERVICE_PROXY_NAME: &str = "portpolicy";

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The pre-1.7 spelling of `externalTrafficPolicy: Local`, with the value
/// [`EXTERNAL_TRAFFIC_ONLY_LOCAL`].
pub(crate) const EXTERNAL_TRAFFIC_ANNOTATION: &str = "service.beta.kubernetes.io/external-traffic";
/// The value of [`EXTERNAL_TRAFFIC_ANNOTATION`] that means Local.
pub(crate) const EXTERNAL_TRAFFIC_ONLY_LOCAL: &str = "OnlyLocal";
/// The pre-1.7 spelling of `spec.healthCheckNodePort`, for Services that are Local only through
/// [`EXTERNAL_TRAFFIC_ANNOTATION`].
pub const HEALTH_CHECK_NODE_PORT_ANNOTATION: &str = "service.beta.kubernetes.io/healthcheck-nodeport";

/// Where `kubectl apply` keeps the configuration it last applied.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The Node label naming the node's zone; topology-aware routing compares it with endpoints'
/// `hints.forZones`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The Service annotation asking the EndpointSlice controller for zone hints (`Auto`).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The deprecated spelling of [`TOPOLOGY_MODE_ANNOTATION`]; it wins when both are set, as the
/// EndpointSlice controller reads them.
pub const TOPOLOGY_AWARE_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
