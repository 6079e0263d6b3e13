//! What one node must program: the IPVS planner's output, and the settings it plans for.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::cidr::Cidr;
use crate::problem::Problem;
use crate::service::{ServiceModel, ServiceType};
use crate::well_known::SERVICE_PROXY_NAME;

use super::table::{IpvsService, IpvsTable, RealServerKey, RealServerState, VirtualServerKey};

/// Every real server gets the same weight, as kube-proxy programs them.
pub(crate) const REAL_SERVER_WEIGHT: u32 = 1;

/// Which Services the agent proxies. Spelled `delegated` and `replacement` everywhere: the
/// agent's and `plan`'s `--mode`, and the agent DaemonSet the operator writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// The cluster runs no kube-proxy: proxy every Service kube-proxy would (not headless, not
    /// ExternalName, not handed to another proxy by
    /// [`SERVICE_PROXY_NAME_LABEL`](crate::well_known::SERVICE_PROXY_NAME_LABEL)).
    Replacement,
    /// kube-proxy runs too: proxy only the Services labeled
    /// `service.kubernetes.io/service-proxy-name: portpolicy`, which kube-proxy then leaves alone.
    #[default]
    Delegated,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 2] = [ProxyMode::Delegated, ProxyMode::Replacement];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Delegated => "delegated",
            ProxyMode::Replacement => "replacement",
        }
    }

    /// Whether the agent in this mode proxies a Service at all. A Service without a name is
    /// not proxied: the API server would have refused it, so kube-proxy never sees one.
    pub fn proxies(self, service: &ServiceModel<'_>) -> bool {
        let proxy_name = service.proxy_name();
        let ours = match self {
            ProxyMode::Replacement => proxy_name.is_none_or(|n| n == SERVICE_PROXY_NAME),
            ProxyMode::Delegated => proxy_name.is_some_and(|n| n == SERVICE_PROXY_NAME),
        };
        ours && service.type_ != ServiceType::ExternalName && !service.headless && !service.name.is_empty()
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProxyMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ProxyMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not a proxy mode: must be delegated or replacement"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    /// The node this plan is for (`metadata.name` of the Node, `nodeName` of its endpoints).
    pub node_name: String,
    pub mode: ProxyMode,
    pub node_port_addresses: NodePortAddresses,
}

impl ProxyConfig {
    /// Node ports on every node address.
    pub fn new(node_name: impl Into<String>, mode: ProxyMode) -> Self {
        ProxyConfig {
            node_name: node_name.into(),
            mode,
            node_port_addresses: NodePortAddresses::All,
        }
    }
}

/// Which of the node's addresses accept node ports (kube-proxy's `--nodeport-addresses`).
/// The addresses are the Node's InternalIP and ExternalIP addresses, not the interfaces'.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum NodePortAddresses {
    /// Every InternalIP and ExternalIP address.
    #[default]
    All,
    /// The node's primary address of each family, as kube-proxy picks it: the first
    /// InternalIP, else the first ExternalIP, and the first of the other family the same way.
    Primary,
    /// The addresses inside any of these ranges.
    Cidrs(Vec<Cidr>),
}

impl NodePortAddresses {
    /// The flag's values: CIDRs, or `primary` alone; no value means every address.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Ok(NodePortAddresses::All);
        }
        if values.contains(&"primary") {
            if values.len() > 1 {
                return Err("\"primary\" must be the only value when given".to_string());
            }
            return Ok(NodePortAddresses::Primary);
        }
        values
            .iter()
            .map(|v| v.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map(NodePortAddresses::Cidrs)
    }

    /// Picks from the node's addresses, given InternalIPs first and ExternalIPs after, each in
    /// the Node's order.
    pub fn select(&self, ordered: &[IpAddr]) -> BTreeSet<IpAddr> {
        match self {
            NodePortAddresses::All => ordered.iter().copied().collect(),
            NodePortAddresses::Cidrs(cidrs) => ordered
                .iter()
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .copied()
                .collect(),
            NodePortAddresses::Primary => {
                let Some(first) = ordered.first() else {
                    return BTreeSet::new();
                };
                let other = ordered.iter().find(|ip| ip.is_ipv4() != first.is_ipv4());
                std::iter::once(first).chain(other).copied().collect()
            }
        }
    }
}

/// Where a virtual server's address comes from. The order is the order of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum VirtualServerKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl VirtualServerKind {
    /// Traffic to cluster IPs comes from inside the cluster; to the others, from outside.
    pub fn is_external(self) -> bool {
        self != VirtualServerKind::ClusterIP
    }
}

/// Which hints chose a virtual server's real servers (kube-proxy's topology modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TopologyMode {
    /// Endpoints hinted for this node's zone.
    PreferSameZone,
    /// Endpoints hinted for this node.
    PreferSameNode,
}

impl TopologyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyMode::PreferSameZone => "PreferSameZone",
            TopologyMode::PreferSameNode => "PreferSameNode",
        }
    }
}

/// One virtual server the node must program, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VirtualServerRule {
    /// `namespace/name` of the Service.
    pub service: Arc<str>,
    /// The Service port's name; empty for a single unnamed port.
    pub port_name: Arc<str>,
    pub kind: VirtualServerKind,
    pub key: VirtualServerKey,
    /// Real servers are this node's endpoints only (`internalTrafficPolicy: Local` for a cluster
    /// IP, `externalTrafficPolicy: Local` for the external kinds). For the external kinds this
    /// also means the client address is kept: external traffic is not masqueraded.
    pub only_local: bool,
    /// Traffic from outside the cluster must be masqueraded so replies return through this
    /// node: always for cluster IPs, and for the external kinds under Cluster policy.
    /// Node-local clients are masqueraded regardless (their replies would never return).
    pub masquerade_external: bool,
    pub scheduler: Arc<str>,
    /// Seconds of ClientIP persistence (`sessionAffinity: ClientIP`).
    pub persistence_timeout: Option<u32>,
    /// Sorted by address and port; every weight is [`REAL_SERVER_WEIGHT`]. Shared by the
    /// Service's virtual servers of the same address family and locality.
    pub real_servers: Arc<[(RealServerKey, u32)]>,
    /// The hints that narrowed the real servers; `None` when they are every ready endpoint
    /// (no usable hints, a Local policy, or only terminating endpoints left).
    pub topology: Option<TopologyMode>,
    /// For a load-balancer virtual server of a Service with `loadBalancerSourceRanges`: the
    /// ranges of its address family that may reach it. `None` when unrestricted; empty when
    /// no client may. Node ports and external IPs are never restricted (as in kube-proxy).
    pub source_ranges: Option<Arc<[Cidr]>>,
}

impl VirtualServerRule {
    /// The kernel's view of this virtual server.
    pub(crate) fn to_ipvs_service(&self) -> IpvsService {
        IpvsService {
            scheduler: self.scheduler.clone(),
            persistence_timeout: self.persistence_timeout,
            // Inserted in order: a few real servers fit one node, built without sorting.
            real_servers: self
                .real_servers
                .iter()
                .fold(BTreeMap::new(), |mut reals, (rs, weight)| {
                    reals.insert(*rs, RealServerState::with_weight(*weight));
                    reals
                }),
        }
    }
}

/// A health-check node port this node serves (one HTTP listener, see the health module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheckRule {
    pub namespace: String,
    pub name: String,
    pub node_port: u16,
    /// Distinct IPs of this node's ready, not terminating endpoints of the Service.
    pub local_endpoints: usize,
}

/// Everything one node must program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeRules {
    pub node: String,
    /// This node's InternalIP and ExternalIP addresses.
    pub node_addresses: BTreeSet<IpAddr>,
    /// The node addresses that get node-port virtual servers ([`NodePortAddresses`]).
    pub node_port_addresses: BTreeSet<IpAddr>,
    /// Sorted by Service (namespace, then name), kind and key. A virtual server claimed by two
    /// Services appears once, for the first; the other gets a problem.
    pub virtual_servers: Vec<VirtualServerRule>,
    /// Sorted by namespace and name.
    pub health_checks: Vec<HealthCheckRule>,
    /// Addresses to bind on the agent's dummy interface: cluster, external and load-balancer IPs.
    pub vips: BTreeSet<IpAddr>,
    /// Node ports (and health-check node ports) to keep out of `ip_local_reserved_ports`' reach
    /// of ephemeral ports.
    pub reserved_node_ports: BTreeSet<u16>,
    /// Sorted and without duplicates.
    pub problems: Vec<Problem>,
}

impl NodeRules {
    /// The IPVS table this plan wants.
    pub fn table(&self) -> IpvsTable {
        self.virtual_servers
            .iter()
            .map(|vs| (vs.key, vs.to_ipvs_service()))
            .collect()
    }
}
