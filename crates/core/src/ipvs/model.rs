//! The planner's model of its input: Services, EndpointSlices and their endpoints, each read
//! once into what planning needs (kube-proxy's ServicePort and EndpointSliceCache entries).

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::governance::Labels;
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};
use crate::service::{IssueKind, ServiceModel, parse_ip};
use crate::well_known::SERVICE_NAME_LABEL;

use super::rules::ProxyMode;

/// A Service's identity; ordered by namespace, then name (the order conflicts are decided in).
/// `namespace/name` in one shared allocation: the planner's indexes, its claims and every planned
/// virtual server name Services, so a clone is a reference.
#[derive(Clone, Debug)]
pub(super) struct ServiceId {
    qualified: Arc<str>,
    namespace_len: usize,
}

impl PartialEq for ServiceId {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for ServiceId {}

impl PartialOrd for ServiceId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.pair().cmp(&other.pair())
    }
}

impl ServiceId {
    pub(super) fn new(namespace: &str, name: &str) -> Self {
        ServiceId {
            qualified: Arc::from(format!("{namespace}/{name}")),
            namespace_len: namespace.len(),
        }
    }

    pub(super) fn pair(&self) -> (&str, &str) {
        let (namespace, slash_name) = self.qualified.split_at(self.namespace_len);
        (namespace, &slash_name[1..])
    }

    pub(super) fn namespace(&self) -> &str {
        self.pair().0
    }

    pub(super) fn name(&self) -> &str {
        self.pair().1
    }

    /// `namespace/name`.
    pub(super) fn qualified(&self) -> &Arc<str> {
        &self.qualified
    }

    pub(super) fn object(&self) -> String {
        object_ref("Service", Some(self.namespace()), self.name())
    }
}

/// A proxied Service, with what the planner keeps of its model.
#[derive(Clone, Debug)]
pub(super) struct ServiceInfo {
    pub(super) id: ServiceId,
    pub(super) labels: Option<Labels>,
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) external_ips: Vec<IpAddr>,
    pub(super) load_balancer_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePortInfo>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
    pub(super) persistence_timeout: Option<u32>,
    pub(super) health_check_node_port: Option<u16>,
    pub(super) problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
pub(super) struct ServicePortInfo {
    pub(super) name: Arc<str>,
    pub(super) protocol: Protocol,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
}

impl ServiceInfo {
    /// `None` when the mode does not proxy the Service.
    pub(super) fn new(model: ServiceModel<'_>, mode: ProxyMode) -> Option<Self> {
        if !mode.proxies(&model) {
            return None;
        }
        let id = ServiceId::new(model.namespace, model.name);
        let no_cluster_ip =
            model.cluster_ips.is_empty() && !model.issues.iter().any(|i| i.kind == IssueKind::ClusterIp);
        if no_cluster_ip {
            // Nothing else matters until the API server has allocated one.
            let problem = Problem::new(
                model.object(),
                "spec.clusterIP",
                "no cluster IP allocated yet; the Service is not proxied until it has one",
            );
            return Some(ServiceInfo {
                id,
                labels: model.labels.cloned(),
                cluster_ips: Vec::new(),
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                ports: Vec::new(),
                internal_local: false,
                external_local: false,
                persistence_timeout: None,
                health_check_node_port: None,
                problems: vec![problem],
            });
        }
        let problems = model
            .issues
            .iter()
            .filter_map(|issue| Some(model.problem(issue, Some(issue.kind.proxy_consequence()?))))
            .collect();
        let ports = model
            .ports
            .iter()
            .map(|port| ServicePortInfo {
                name: Arc::from(port.name),
                protocol: port.protocol,
                port: port.port,
                node_port: port.node_port,
            })
            .collect();
        Some(ServiceInfo {
            id,
            labels: model.labels.cloned(),
            ports,
            internal_local: model.internal_traffic_local,
            external_local: model.external_traffic.is_local(),
            persistence_timeout: model.affinity_timeout,
            health_check_node_port: model.health_check.and_then(|h| h.node_port),
            problems,
            cluster_ips: model.cluster_ips,
            external_ips: model.external_ips,
            load_balancer_ips: model.load_balancer_ips,
        })
    }
}

/// An EndpointSlice with what the planner needs, locality already decided for this node.
#[derive(Clone, Debug)]
pub(super) struct SliceModel {
    /// The slice's own name; its namespace is its Service's.
    pub(super) name: Arc<str>,
    pub(super) service: ServiceId,
    /// `None` for FQDN slices, which no proxy serves.
    pub(super) ipv4: Option<bool>,
    pub(super) ports: Vec<SlicePort>,
    pub(super) endpoints: Vec<EndpointModel>,
    pub(super) problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
pub(super) struct SlicePort {
    pub(super) name: String,
    pub(super) protocol: Protocol,
    pub(super) port: u16,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct EndpointModel {
    pub(super) address: IpAddr,
    pub(super) local: bool,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
}

impl SliceModel {
    /// `None` when the slice belongs to no Service (no `kubernetes.io/service-name` label).
    pub(super) fn parse(slice: &EndpointSlice, node_name: &str) -> Option<Self> {
        let meta = &slice.metadata;
        let service_name = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        let name: Arc<str> = Arc::from(meta.name.as_deref().unwrap_or_default());
        let object = || object_ref("EndpointSlice", Some(namespace), &name);
        let mut problems = Vec::new();
        let ipv4 = match slice.address_type.as_str() {
            "IPv4" => Some(true),
            "IPv6" => Some(false),
            _ => None,
        };
        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            // A port without a number means "all ports", which IPVS cannot express.
            let Some(number) = port.port else { continue };
            let parsed = Protocol::from_k8s(port.protocol.as_deref())
                .and_then(|protocol| port_from_i32(number).map(|port| (protocol, port)));
            match parsed {
                Ok((protocol, number)) => ports.push(SlicePort {
                    name: port.name.clone().unwrap_or_default(),
                    protocol,
                    port: number,
                }),
                Err(e) => problems.push(Problem::new(
                    object(),
                    format!("ports[{i}]"),
                    format!("{e}; ignored"),
                )),
            }
        }
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        if let Some(ipv4) = ipv4 {
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                // Consumers use the first address only (the API documents the others as unused).
                let Some(text) = endpoint.addresses.first() else {
                    continue;
                };
                let address = match parse_ip(text) {
                    Some(ip) if ip.is_ipv4() == ipv4 => ip,
                    _ => {
                        problems.push(Problem::new(
                            object(),
                            format!("endpoints[{i}].addresses[0]"),
                            format!("{text:?} is not an {} address; ignored", slice.address_type),
                        ));
                        continue;
                    }
                };
                let conditions = endpoint.conditions.as_ref();
                endpoints.push(EndpointModel {
                    address,
                    local: endpoint.node_name.as_deref() == Some(node_name),
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                });
            }
        }
        Some(SliceModel {
            service: ServiceId::new(namespace, service_name),
            name,
            ipv4,
            ports,
            endpoints,
            problems,
        })
    }
}
