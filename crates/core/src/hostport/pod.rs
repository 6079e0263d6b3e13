//! The slice of a Pod that hostPort checks need, small enough to keep 50,000 of them in memory.
//!
//! A full `k8s_openapi` Pod with managed fields, env, volumes and status takes tens of kilobytes
//! on the heap; [`HostPortPod`] deserializes straight from the same JSON and keeps only what
//! decides which ports the Pod holds on its node. It implements [`kube::Resource`] as a v1 Pod, so
//! the operator can `watch` `Api::<HostPortPod>` and never materialise the full objects.

use std::borrow::Cow;
use std::mem::size_of;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::problem::object_ref;

/// A Pod reduced to its identity, placement, phase and the ports it can bind on its node.
///
/// Pruned when built: containers keep only ports that can bind on the host (a non-zero
/// `hostPort`, or every port of a `hostNetwork` Pod), containers left without such ports are
/// dropped, and of the init containers only sidecars (`restartPolicy: Always`) are kept, because
/// ordinary init containers run one at a time before the Pod starts and hold no ports.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(from = "wire::Pod")]
pub struct HostPortPod {
    /// Only `name`, `namespace`, `uid` and `resourceVersion` are kept.
    pub metadata: ObjectMeta,
    pub spec: HostPortPodSpec,
    pub phase: Option<PodPhase>,
}

/// The placement and port declarations of a Pod or a workload's Pod template.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostPortPodSpec {
    pub node_name: Option<String>,
    pub host_network: bool,
    /// Regular containers that declare a port able to bind on the host.
    pub containers: Vec<PortedContainer>,
    /// Sidecar init containers (`restartPolicy: Always`) that declare such a port.
    pub init_containers: Vec<PortedContainer>,
}

/// A container that declares at least one port able to bind on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortedContainer {
    /// Position in the Pod's `containers` or `initContainers` list, for field paths in problems.
    pub index: u16,
    pub name: String,
    pub ports: Vec<DeclaredPort>,
}

/// One `ports[]` entry as the Pod declares it; checked and defaulted by
/// [`HostPortPodSpec::bindings`], so that bad values are reported instead of failing the watch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeclaredPort {
    /// Position in the container's `ports` list.
    pub index: u16,
    pub container_port: i32,
    /// 0 when unset.
    pub host_port: i32,
    pub protocol: Option<String>,
    pub host_ip: Option<String>,
}

/// `status.phase`. Pods in `Succeeded` or `Failed` have stopped for good and hold no ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    fn parse(phase: &str) -> Self {
        match phase {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

impl HostPortPod {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("<unnamed>")
    }

    /// The namespace; a Pod without one (only possible in hand-written input) is in `default`.
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `Pod/namespace/name`, as problems name it.
    pub fn object_ref(&self) -> String {
        object_ref("Pod", Some(self.namespace()), self.name())
    }

    /// Whether the Pod currently holds its ports on a node: it is bound to one and has not
    /// terminated. Like the scheduler, a Pod that is being deleted still holds them.
    pub(crate) fn holds_ports(&self) -> bool {
        self.spec.node_name.as_deref().is_some_and(|n| !n.is_empty())
            && !self.phase.is_some_and(PodPhase::is_terminal)
    }

    /// Approximate bytes this Pod occupies on the heap once stored (say, behind the `Arc` of a
    /// reflector store): its own size plus every allocation it owns, without allocator overhead.
    pub fn approx_heap_bytes(&self) -> usize {
        size_of::<Self>() + meta_heap_bytes(&self.metadata) + self.spec.approx_owned_bytes()
    }
}

fn string_bytes(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::capacity)
}

/// Heap owned by the metadata fields a [`HostPortPod`] keeps (the others are always empty).
fn meta_heap_bytes(meta: &ObjectMeta) -> usize {
    string_bytes(&meta.name)
        + string_bytes(&meta.namespace)
        + string_bytes(&meta.uid)
        + string_bytes(&meta.resource_version)
}

impl HostPortPodSpec {
    /// Prunes a Pod template or Pod spec down to what decides its host ports.
    pub(crate) fn from_pod_spec(spec: &PodSpec) -> Self {
        let host_network = spec.host_network.unwrap_or(false);
        let convert = |containers: &[Container], sidecars_only: bool| {
            prune_containers(
                host_network,
                containers.iter().enumerate().filter_map(|(index, c)| {
                    let sidecar = c.restart_policy.as_deref() == Some("Always");
                    (!sidecars_only || sidecar).then(|| {
                        let ports = c.ports.iter().flatten().enumerate().map(declared_port);
                        (index, c.name.clone(), ports.collect())
                    })
                }),
            )
        };
        HostPortPodSpec {
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            host_network,
            containers: convert(&spec.containers, false),
            init_containers: convert(spec.init_containers.as_deref().unwrap_or_default(), true),
        }
    }

    /// Heap owned by this spec (not counting its own inline size).
    pub(crate) fn approx_owned_bytes(&self) -> usize {
        let container_bytes = |containers: &Vec<PortedContainer>| {
            containers.capacity() * size_of::<PortedContainer>()
                + containers
                    .iter()
                    .map(|c| {
                        c.name.capacity()
                            + c.ports.capacity() * size_of::<DeclaredPort>()
                            + c.ports
                                .iter()
                                .map(|p| string_bytes(&p.protocol) + string_bytes(&p.host_ip))
                                .sum::<usize>()
                    })
                    .sum::<usize>()
        };
        string_bytes(&self.node_name)
            + container_bytes(&self.containers)
            + container_bytes(&self.init_containers)
    }
}

fn declared_port((index, port): (usize, &ContainerPort)) -> DeclaredPort {
    DeclaredPort {
        index: index_u16(index),
        container_port: port.container_port,
        host_port: port.host_port.unwrap_or(0),
        protocol: port.protocol.clone(),
        host_ip: port.host_ip.clone(),
    }
}

/// Pods have far fewer than 65,536 containers or ports; saturating keeps this total anyway.
fn index_u16(index: usize) -> u16 {
    u16::try_from(index).unwrap_or(u16::MAX)
}

/// Keeps the ports that can bind on the host and the containers that still have some, with
/// exactly-sized allocations (in-place `collect` would keep the unpruned capacity).
fn prune_containers(
    host_network: bool,
    containers: impl Iterator<Item = (usize, String, Vec<DeclaredPort>)>,
) -> Vec<PortedContainer> {
    let mut kept: Vec<PortedContainer> = containers
        .filter_map(|(index, name, mut ports)| {
            ports.retain(|p| host_network || p.host_port != 0);
            ports.shrink_to_fit();
            (!ports.is_empty()).then(|| PortedContainer {
                index: index_u16(index),
                name,
                ports,
            })
        })
        .collect();
    kept.shrink_to_fit();
    kept
}

impl From<&Pod> for HostPortPod {
    fn from(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        HostPortPod {
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                ..ObjectMeta::default()
            },
            spec: pod
                .spec
                .as_ref()
                .map(HostPortPodSpec::from_pod_spec)
                .unwrap_or_default(),
            phase: pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .map(PodPhase::parse),
        }
    }
}

impl kube::Resource for HostPortPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The Pod JSON shape, reduced to the fields [`HostPortPod`] keeps. serde skips everything else
/// without allocating, so managed fields, env and status never reach the heap. Every field is
/// optional or defaulted: list responses omit `kind`, and a Pod that fails to deserialize would
/// stall the operator's watch, so odd values are left for [`HostPortPodSpec::bindings`] to report.
mod wire {
    use serde::{Deserialize, Deserializer};

    fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Pod {
        #[serde(deserialize_with = "null_as_default")]
        pub metadata: Meta,
        #[serde(deserialize_with = "null_as_default")]
        pub spec: Spec,
        #[serde(deserialize_with = "null_as_default")]
        pub status: Status,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Meta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        pub uid: Option<String>,
        pub resource_version: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Spec {
        pub node_name: Option<String>,
        pub host_network: Option<bool>,
        #[serde(deserialize_with = "null_as_default")]
        pub containers: Vec<Container>,
        #[serde(deserialize_with = "null_as_default")]
        pub init_containers: Vec<Container>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Container {
        #[serde(deserialize_with = "null_as_default")]
        pub name: String,
        #[serde(deserialize_with = "null_as_default")]
        pub ports: Vec<ContainerPort>,
        pub restart_policy: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    pub struct ContainerPort {
        #[serde(deserialize_with = "null_as_default")]
        pub container_port: i32,
        pub host_port: Option<i32>,
        #[serde(rename = "hostIP")]
        pub host_ip: Option<String>,
        pub protocol: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Status {
        pub phase: Option<String>,
    }
}

impl From<wire::Pod> for HostPortPod {
    fn from(pod: wire::Pod) -> Self {
        let host_network = pod.spec.host_network.unwrap_or(false);
        let convert = |containers: Vec<wire::Container>, sidecars_only: bool| {
            prune_containers(
                host_network,
                containers.into_iter().enumerate().filter_map(|(index, c)| {
                    let sidecar = c.restart_policy.as_deref() == Some("Always");
                    (!sidecars_only || sidecar).then(|| {
                        let ports = c.ports.into_iter().enumerate().map(|(index, p)| DeclaredPort {
                            index: index_u16(index),
                            container_port: p.container_port,
                            host_port: p.host_port.unwrap_or(0),
                            protocol: p.protocol,
                            host_ip: p.host_ip,
                        });
                        (index, c.name, ports.collect())
                    })
                }),
            )
        };
        let meta = pod.metadata;
        HostPortPod {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                ..ObjectMeta::default()
            },
            spec: HostPortPodSpec {
                node_name: pod.spec.node_name.filter(|n| !n.is_empty()),
                host_network,
                containers: convert(pod.spec.containers, false),
                init_containers: convert(pod.spec.init_containers, true),
            },
            phase: pod.status.phase.as_deref().map(PodPhase::parse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    const FULL_POD: &str = include_str!("testdata/full-pod.json");

    fn port(
        index: u16,
        container_port: i32,
        host_port: i32,
        protocol: Option<&str>,
        host_ip: Option<&str>,
    ) -> DeclaredPort {
        DeclaredPort {
            index,
            container_port,
            host_port,
            protocol: protocol.map(str::to_string),
            host_ip: host_ip.map(str::to_string),
        }
    }

    #[test]
    fn deserializes_a_full_pod_keeping_only_what_the_checks_need() {
        let pod: HostPortPod = serde_json::from_str(FULL_POD).unwrap();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("edge-ingress-7c9f6d5b8d-x2kqp")
        );
        assert_eq!(pod.namespace(), "edge");
        assert_eq!(
            pod.metadata.uid.as_deref(),
            Some("5f0c2e8a-3d7b-4f1e-b6a9-2c4d8e1f0a93")
        );
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("48213377"));
        assert_eq!(pod.metadata.labels, None);
        assert_eq!(pod.metadata.managed_fields, None);
        assert_eq!(pod.metadata.annotations, None);
        assert_eq!(pod.phase, Some(PodPhase::Running));
        assert!(pod.holds_ports());
        assert_eq!(
            pod.spec,
            HostPortPodSpec {
                node_name: Some("worker-17".into()),
                host_network: false,
                // The metrics port (no hostPort) and the portless log-tailer are pruned.
                containers: vec![PortedContainer {
                    index: 0,
                    name: "ingress".into(),
                    ports: vec![
                        port(0, 80, 80, Some("TCP"), None),
                        port(1, 443, 443, Some("TCP"), Some("192.168.10.21")),
                    ],
                }],
                // The ordinary init container is dropped, the sidecar kept at its index.
                init_containers: vec![PortedContainer {
                    index: 1,
                    name: "stats-proxy".into(),
                    ports: vec![port(0, 9901, 9901, Some("UDP"), None)],
                }],
            }
        );
    }

    #[test]
    fn from_full_pod_object_agrees_with_deserializing_its_json() {
        let full: Pod = serde_json::from_str(FULL_POD).unwrap();
        let direct: HostPortPod = serde_json::from_str(FULL_POD).unwrap();
        assert_eq!(HostPortPod::from(&full), direct);
    }

    #[test]
    fn stored_pod_is_small() {
        let pod: HostPortPod = serde_json::from_str(FULL_POD).unwrap();
        let bytes = pod.approx_heap_bytes();
        // A Pod with hostPorts on two containers is the expensive case; most Pods have none.
        assert!(bytes < 1024, "{bytes} bytes per stored pod");
        let plain: HostPortPod = serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u", "resourceVersion": "1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]},
        }))
        .unwrap();
        assert!(plain.spec.containers.is_empty());
        assert!(plain.approx_heap_bytes() < bytes);
        assert!(plain.approx_heap_bytes() >= size_of::<HostPortPod>());
    }

    #[test]
    fn host_network_keeps_every_container_port() {
        let pod: HostPortPod = serde_json::from_value(json!({
            "metadata": {"name": "node-exporter-abc", "namespace": "monitoring"},
            "spec": {"hostNetwork": true, "nodeName": "n1", "containers": [
                {"name": "exporter", "ports": [{"containerPort": 9100, "hostPort": 9100, "name": "metrics"}]},
                {"name": "rbac-proxy", "ports": [{"containerPort": 8443}]},
            ]},
        }))
        .unwrap();
        let ports: Vec<_> = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| {
                c.ports
                    .iter()
                    .map(move |p| (c.index, p.container_port, p.host_port))
            })
            .collect();
        assert_eq!(ports, [(0, 9100, 9100), (1, 8443, 0)]);
    }

    #[test]
    fn tolerates_nulls_and_missing_sections() {
        let cases = [
            json!({}),
            json!({"metadata": null, "spec": null, "status": null}),
            json!({"spec": {"containers": null, "initContainers": null}}),
            json!({"spec": {"containers": [{"name": "a", "ports": null}]}}),
            json!({"spec": {"containers": [{"ports": [{"hostPort": 80}]}]}}),
        ];
        for case in cases {
            let pod: Result<HostPortPod, _> = serde_json::from_value(case.clone());
            assert!(pod.is_ok(), "{case}: {pod:?}");
            assert!(!pod.unwrap().holds_ports(), "{case}");
        }
    }

    #[test]
    fn terminal_and_unscheduled_pods_hold_no_ports() {
        let pod = |node: Option<&str>, phase: Option<&str>| -> HostPortPod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let cases = [
            (Some("n1"), Some("Running"), true),
            (Some("n1"), Some("Pending"), true),
            (Some("n1"), None, true),
            (Some("n1"), Some("Unknown"), true),
            (Some("n1"), Some("Succeeded"), false),
            (Some("n1"), Some("Failed"), false),
            (None, Some("Pending"), false),
            (Some(""), Some("Pending"), false),
        ];
        for (node, phase, holds) in cases {
            assert_eq!(
                pod(node, phase).holds_ports(),
                holds,
                "node {node:?} phase {phase:?}"
            );
        }
    }

    #[test]
    fn is_a_v1_pod_resource() {
        assert_eq!(HostPortPod::kind(&()), "Pod");
        assert_eq!(HostPortPod::api_version(&()), "v1");
        assert_eq!(
            HostPortPod::url_path(&(), Some("edge")),
            "/api/v1/namespaces/edge/pods"
        );
        let pod: HostPortPod = serde_json::from_str(FULL_POD).unwrap();
        assert_eq!(pod.object_ref(), "Pod/edge/edge-ingress-7c9f6d5b8d-x2kqp");
    }
}
