//! Per-Service planning: the virtual servers, real servers and health check one Service needs
//! on this node.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::cidr::Cidr;
use crate::problem::Problem;

use super::model::{ServiceInfo, SliceModel};
use super::rules::{HealthCheckRule, VirtualServerKind, VirtualServerRule};
use super::table::VirtualServerKey;
use super::topology::{Chosen, candidates_for_port, choose_endpoints};

/// The planned result for one Service.
#[derive(Clone, Debug, Default)]
pub(super) struct ServiceRules {
    /// Sorted by kind and key, no two with the same key.
    pub(super) virtual_servers: Vec<VirtualServerRule>,
    pub(super) health_check: Option<HealthCheckRule>,
    pub(super) node_ports: Vec<u16>,
    pub(super) problems: Vec<Problem>,
}

impl ServiceRules {
    pub(super) fn get(&self, key: &VirtualServerKey) -> Option<&VirtualServerRule> {
        self.virtual_servers.iter().find(|vs| vs.key == *key)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = VirtualServerKey> + '_ {
        self.virtual_servers.iter().map(|vs| vs.key)
    }
}

/// What the planner knows about its node that planning a Service reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct NodeContext<'a> {
    /// The addresses that get node-port virtual servers, sorted.
    pub(super) node_port_addresses: &'a [IpAddr],
    /// The node's `topology.kubernetes.io/zone` label; `None` when missing or empty.
    pub(super) zone: Option<&'a str>,
}

/// What one Service needs on this node.
pub(super) fn rules_for_service(
    service: &ServiceInfo,
    slices: &[SliceModel],
    node: NodeContext<'_>,
    scheduler: &Arc<str>,
) -> ServiceRules {
    let node_addresses = node.node_port_addresses;
    let vips_per_port =
        service.cluster_ips.len() + service.external_ips.len() + service.load_balancer_ips.len();
    let node_port_count = service.ports.iter().filter(|p| p.node_port.is_some()).count();
    let mut rules = ServiceRules {
        virtual_servers: Vec::with_capacity(
            service.ports.len() * vips_per_port + node_port_count * node_addresses.len(),
        ),
        problems: service.problems.clone(),
        ..Default::default()
    };
    let service_name = service.id.qualified();
    let source_ranges = source_ranges_by_family(service, &mut rules.problems);
    for port in &service.ports {
        rules.node_ports.extend(port.node_port);
        let candidates = candidates_for_port(port, slices, node.zone);
        // [ipv4][local_only], computed when first needed.
        let mut chosen: [[Option<Chosen>; 2]; 2] = Default::default();
        let key = |address: &IpAddr, port_number: u16| VirtualServerKey {
            address: *address,
            port: port_number,
            protocol: port.protocol,
        };
        let node_ports = port.node_port.map(|node_port| {
            node_addresses
                .iter()
                .map(move |ip| (VirtualServerKind::NodePort, key(ip, node_port)))
        });
        let vips = (service.cluster_ips.iter())
            .map(|ip| (VirtualServerKind::ClusterIP, key(ip, port.port)))
            .chain(node_ports.into_iter().flatten())
            .chain(
                (service.external_ips.iter()).map(|ip| (VirtualServerKind::ExternalIP, key(ip, port.port))),
            )
            .chain(
                (service.load_balancer_ips.iter())
                    .map(|ip| (VirtualServerKind::LoadBalancer, key(ip, port.port))),
            );
        for (kind, vs_key) in vips {
            if let Some(earlier) = rules.virtual_servers.iter().find(|vs| vs.key == vs_key) {
                rules.problems.push(Problem::new(
                    service.id.object(),
                    kind_field(kind, &port.name),
                    format!(
                        "virtual server {vs_key} is already this Service's {:?} virtual server for port {:?}; \
                         planned once",
                        earlier.kind, earlier.port_name
                    ),
                ));
                continue;
            }
            let only_local = if kind.is_external() {
                service.external_local
            } else {
                service.internal_local
            };
            let ipv4 = vs_key.address.is_ipv4();
            let Chosen {
                real_servers,
                topology,
            } = chosen[usize::from(ipv4)][usize::from(only_local)]
                .get_or_insert_with(|| choose_endpoints(&candidates, ipv4, only_local))
                .clone();
            let source_ranges = match kind {
                VirtualServerKind::LoadBalancer => source_ranges[usize::from(ipv4)].clone(),
                _ => None,
            };
            rules.virtual_servers.push(VirtualServerRule {
                service: service_name.clone(),
                port_name: port.name.clone(),
                kind,
                key: vs_key,
                only_local,
                masquerade_external: !(kind.is_external() && only_local),
                scheduler: scheduler.clone(),
                persistence_timeout: service.persistence_timeout,
                real_servers,
                topology,
                source_ranges,
            });
        }
    }
    rules.virtual_servers.sort_by_key(|vs| (vs.kind, vs.key));

    if let Some(node_port) = service.health_check_node_port {
        rules.node_ports.push(node_port);
        let local_ready: BTreeSet<IpAddr> = slices
            .iter()
            .filter(|s| s.ipv4.is_some() && !s.ports.is_empty())
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.local && e.ready && !e.terminating)
            .map(|e| e.address)
            .collect();
        rules.health_check = Some(HealthCheckRule {
            namespace: service.id.namespace().to_string(),
            name: service.id.name().to_string(),
            node_port,
            local_endpoints: local_ready.len(),
        });
    }
    rules
}

/// The Service's source ranges split by address family, `[IPv6, IPv4]`, each shared by the
/// load-balancer virtual servers of its family. A family with load-balancer IPs but no usable
/// range of its own is closed, not open (kube-proxy would leave it open), and reported.
fn source_ranges_by_family(service: &ServiceInfo, problems: &mut Vec<Problem>) -> [Option<Arc<[Cidr]>>; 2] {
    let Some(ranges) = &service.source_ranges else {
        return [None, None];
    };
    [false, true].map(|ipv4| {
        let family: Arc<[Cidr]> = ranges.iter().filter(|c| c.is_ipv4() == ipv4).copied().collect();
        let has_vips = service.load_balancer_ips.iter().any(|ip| ip.is_ipv4() == ipv4);
        if family.is_empty() && has_vips && !service.ports.is_empty() {
            let name = if ipv4 { "IPv4" } else { "IPv6" };
            problems.push(Problem::new(
                service.id.object(),
                "spec.loadBalancerSourceRanges",
                format!(
                    "no usable {name} range: {name} traffic to the load-balancer IPs is dropped \
                     (kube-proxy would accept it from anywhere)"
                ),
            ));
        }
        Some(family)
    })
}

pub(super) fn kind_field(kind: VirtualServerKind, port_name: &str) -> String {
    match kind {
        VirtualServerKind::ClusterIP => "spec.clusterIPs".to_string(),
        VirtualServerKind::NodePort => format!("spec.ports[name={port_name:?}].nodePort"),
        VirtualServerKind::ExternalIP => "spec.externalIPs".to_string(),
        VirtualServerKind::LoadBalancer => "status.loadBalancer.ingress".to_string(),
    }
}
