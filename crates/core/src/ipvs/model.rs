//! The planner's model of its input: Services, EndpointSlices and their endpoints, each read
//! once into what planning needs (kube-proxy's ServicePort and EndpointSliceCache entries).

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use crate::cidr::Cidr;
use crate::governance::Labels;
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};
use crate::service::{IssueKind, ServiceModel, TopologyRequest, parse_ip};
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
    pub(super) topology: Option<TopologyRequest>,
    /// `loadBalancerSourceRanges`; `None` when unrestricted.
    pub(super) source_ranges: Option<Arc<[Cidr]>>,
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
                topology: None,
                source_ranges: None,
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
            topology: model.topology,
            source_ranges: model.source_ranges.map(Arc::from),
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
    /// The distinct zones the endpoints' `hints.forZones` name, in order of first use; an
    /// endpoint's [`EndpointModel::zone_hints`] is a bit set over them. Kept by name because
    /// the node's own zone can change.
    pub(super) hinted_zones: Vec<Arc<str>>,
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
    /// `hints.forNodes` against this node (fixed for the planner's life).
    pub(super) node_hint: Hint,
    /// `hints.forZones`: bit `i` set for [`SliceModel::hinted_zones`]`[i]`; 0 for no hints.
    pub(super) zone_hints: u64,
}

/// What an endpoint's hints say about this node (or its zone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hint {
    /// No hints of this kind.
    Absent,
    /// Hinted for other nodes (zones) only.
    Elsewhere,
    /// Hinted for this node (zone), perhaps among others.
    Here,
}

/// Zones one slice's bit sets can name; beyond this, hints are left out (and the endpoint may
/// then count as unhinted, which turns topology off for the Service: the safe fallback).
const MAX_HINTED_ZONES: usize = 64;

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
        let mut hinted_zones = Vec::new();
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
                let zone_hints = zone_hint_bits(endpoint, &mut hinted_zones).unwrap_or_else(|| {
                    problems.push(Problem::new(
                        object(),
                        format!("endpoints[{i}].hints.forZones"),
                        format!(
                            "more than {MAX_HINTED_ZONES} zones hinted in one slice; this endpoint's zone hints are ignored"
                        ),
                    ));
                    0
                });
                endpoints.push(EndpointModel {
                    address,
                    local: endpoint.node_name.as_deref() == Some(node_name),
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    node_hint: node_hint(endpoint, node_name),
                    zone_hints,
                });
            }
        }
        Some(SliceModel {
            service: ServiceId::new(namespace, service_name),
            name,
            ipv4,
            ports,
            endpoints,
            hinted_zones,
            problems,
        })
    }

    /// Whether any endpoint carries zone hints: only then does the node's zone matter.
    pub(super) fn has_zone_hints(&self) -> bool {
        !self.hinted_zones.is_empty()
    }

    /// The bit of `zone` in this slice's endpoints' zone hints; 0 when none names it.
    pub(super) fn zone_bit(&self, zone: Option<&str>) -> u64 {
        zone.and_then(|zone| self.hinted_zones.iter().position(|z| **z == *zone))
            .map_or(0, |i| 1 << i)
    }
}

fn node_hint(endpoint: &Endpoint, node_name: &str) -> Hint {
    let nodes = endpoint.hints.as_ref().and_then(|h| h.for_nodes.as_deref());
    match nodes.unwrap_or_default() {
        [] => Hint::Absent,
        nodes if nodes.iter().any(|n| n.name == node_name) => Hint::Here,
        _ => Hint::Elsewhere,
    }
}

/// An endpoint's zone hints as bits over `zones`, adding names not seen before; `None` when a
/// name would not fit (the bits of those that fit are then lost too, which is the safe side).
fn zone_hint_bits(endpoint: &Endpoint, zones: &mut Vec<Arc<str>>) -> Option<u64> {
    let hinted = endpoint.hints.as_ref().and_then(|h| h.for_zones.as_deref());
    let mut bits = 0u64;
    for zone in hinted.unwrap_or_default() {
        let at = match zones.iter().position(|z| **z == *zone.name) {
            Some(at) => at,
            None if zones.len() < MAX_HINTED_ZONES => {
                zones.push(Arc::from(zone.name.as_str()));
                zones.len() - 1
            }
            None => return None,
        };
        bits |= 1 << at;
    }
    Some(bits)
}
