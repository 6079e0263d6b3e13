//! The kinds a snapshot holds and, for each, the fields portpolicy reads: everything else in a
//! dump is skipped as it is read (see [`super::prune`]). A field added here is a field some part
//! of the core reads; the loader's mutation test checks that a wrong value anywhere else in an
//! object is no problem, and a wrong value here always is.

use super::prune::Keep::{self, All, Fields, Items, Keys};
use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, HEALTH_CHECK_NODE_PORT_ANNOTATION, TOPOLOGY_AWARE_HINTS_ANNOTATION,
    TOPOLOGY_MODE_ANNOTATION,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    PortPolicy,
    Namespace,
    Node,
    Service,
    EndpointSlice,
    Pod,
    DaemonSet,
    Deployment,
    StatefulSet,
}

impl Kind {
    pub(crate) fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("portpolicy.io/v1alpha1", "PortPolicy") => Kind::PortPolicy,
            ("v1", "Namespace") => Kind::Namespace,
            ("v1", "Node") => Kind::Node,
            ("v1", "Service") => Kind::Service,
            ("v1", "Pod") => Kind::Pod,
            ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
            ("apps/v1", "DaemonSet") => Kind::DaemonSet,
            ("apps/v1", "Deployment") => Kind::Deployment,
            ("apps/v1", "StatefulSet") => Kind::StatefulSet,
            _ => return None,
        })
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Kind::PortPolicy | Kind::Namespace | Kind::Node)
    }

    /// The fields of this kind that portpolicy reads.
    pub(crate) fn keep(self) -> &'static Keep {
        match self {
            // Small, and read whole: its status is the allocator's memory.
            Kind::PortPolicy => &All,
            Kind::Namespace => &NAMESPACE,
            Kind::Node => &NODE,
            Kind::Service => &SERVICE,
            Kind::EndpointSlice => &ENDPOINT_SLICE,
            Kind::Pod => &POD,
            Kind::DaemonSet | Kind::Deployment | Kind::StatefulSet => &WORKLOAD,
        }
    }
}

/// Identity, for duplicates and problems: every kind keeps it.
const NAME: (&str, Keep) = ("name", All);
const NAMESPACE_FIELD: (&str, Keep) = ("namespace", All);
const RESOURCE_VERSION: (&str, Keep) = ("resourceVersion", All);
const LABELS: (&str, Keep) = ("labels", All);

const NAMESPACE: Keep = Fields(&[("metadata", Fields(&[NAME, RESOURCE_VERSION, LABELS]))]);

/// Labels (zones, DaemonSet node selectors), taints and cordons (DaemonSet placement),
/// addresses (node ports).
const NODE: Keep = Fields(&[
    ("metadata", Fields(&[NAME, RESOURCE_VERSION, LABELS])),
    ("spec", Fields(&[("taints", All), ("unschedulable", All)])),
    ("status", Fields(&[("addresses", All)])),
]);

/// What `ServiceFields` reads (the one Service model).
const SERVICE: Keep = Fields(&[
    (
        "metadata",
        Fields(&[
            NAME,
            NAMESPACE_FIELD,
            RESOURCE_VERSION,
            ("creationTimestamp", All),
            LABELS,
            (
                "annotations",
                Keys(&[
                    EXTERNAL_TRAFFIC_ANNOTATION,
                    HEALTH_CHECK_NODE_PORT_ANNOTATION,
                    TOPOLOGY_AWARE_HINTS_ANNOTATION,
                    TOPOLOGY_MODE_ANNOTATION,
                ]),
            ),
        ]),
    ),
    (
        "spec",
        Fields(&[
            ("type", All),
            ("clusterIP", All),
            ("clusterIPs", All),
            ("externalIPs", All),
            ("ports", All),
            ("externalTrafficPolicy", All),
            ("internalTrafficPolicy", All),
            ("healthCheckNodePort", All),
            ("allocateLoadBalancerNodePorts", All),
            ("sessionAffinity", All),
            ("sessionAffinityConfig", All),
            ("trafficDistribution", All),
            ("loadBalancerSourceRanges", All),
        ]),
    ),
    ("status", Fields(&[("loadBalancer", All)])),
]);

/// What the IPVS planner's slice model reads.
const ENDPOINT_SLICE: Keep = Fields(&[
    (
        "metadata",
        Fields(&[NAME, NAMESPACE_FIELD, RESOURCE_VERSION, LABELS]),
    ),
    ("addressType", All),
    ("ports", All),
    (
        "endpoints",
        Items(&Fields(&[
            ("addresses", All),
            ("conditions", All),
            ("hints", All),
            ("nodeName", All),
        ])),
    ),
]);

/// A container's name and the ports it may bind on its node, and whether an init container is
/// a sidecar.
const CONTAINERS: Keep = Items(&Fields(&[
    NAME,
    (
        "ports",
        Items(&Fields(&[
            ("containerPort", All),
            ("hostPort", All),
            ("hostIP", All),
            ("protocol", All),
        ])),
    ),
    ("restartPolicy", All),
]));

/// What `HostPortPod` keeps.
const POD: Keep = Fields(&[
    (
        "metadata",
        Fields(&[NAME, NAMESPACE_FIELD, ("uid", All), RESOURCE_VERSION]),
    ),
    (
        "spec",
        Fields(&[
            ("nodeName", All),
            ("hostNetwork", All),
            ("containers", CONTAINERS),
            ("initContainers", CONTAINERS),
        ]),
    ),
    ("status", Fields(&[("phase", All)])),
]);

/// A workload's replicas and its Pod template's placement and host ports.
const WORKLOAD: Keep = Fields(&[
    ("metadata", Fields(&[NAME, NAMESPACE_FIELD, RESOURCE_VERSION])),
    (
        "spec",
        Fields(&[
            ("replicas", All),
            (
                "template",
                Fields(&[(
                    "spec",
                    Fields(&[
                        ("nodeName", All),
                        ("nodeSelector", All),
                        ("affinity", All),
                        ("tolerations", All),
                        ("hostNetwork", All),
                        ("containers", CONTAINERS),
                        ("initContainers", CONTAINERS),
                    ]),
                )]),
            ),
        ]),
    ),
]);
