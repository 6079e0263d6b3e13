//! The IPVS planner: from Services, EndpointSlices, the Node and the PortPolicies to the virtual
//! servers one node must program, and what the agent must set up around them.
//!
//! Semantics follow kube-proxy (pkg/proxy/serviceport.go, endpointslicecache.go, topology.go)
//! with one deliberate difference: a virtual server with no eligible endpoint is still planned,
//! with no real servers, so its traffic is dropped. kube-proxy's IPVS mode instead falls back to
//! cluster-wide endpoints for `externalTrafficPolicy: Local` with no local endpoint, whose replies
//! are then lost because the client address was kept; the iptables and nftables modes drop, and
//! so does portpolicy.
//!
//! One [`Planner`] keeps the result of every Service and the EndpointSlices indexed by Service, so
//! a slice change re-plans one Service and touches only its virtual servers. [`plan_node`] runs the
//! same planner once over a snapshot.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::crd::DEFAULT_SCHEDULER;
use crate::governance::{Governance, Labels, PolicySet};
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};
use crate::snapshot::Snapshot;

use super::table::{IpvsService, IpvsTable, RealServerKey, RealServerState, VirtualServerKey};

/// The label that hands a Service to an alternative proxy; kube-proxy skips Services carrying it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The value of [`SERVICE_PROXY_NAME_LABEL`] that names portpolicy's agent.
pub const SERVICE_PROXY_NAME: &str = "portpolicy";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The pre-1.7 spelling of `externalTrafficPolicy: Local` (value `OnlyLocal`).
pub const EXTERNAL_TRAFFIC_ANNOTATION: &str = "service.beta.kubernetes.io/external-traffic";
/// The pre-1.7 spelling of `spec.healthCheckNodePort`.
pub const HEALTH_CHECK_NODE_PORT_ANNOTATION: &str = "service.beta.kubernetes.io/healthcheck-nodeport";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when missing (the API server's default, 3 h).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;
/// The longest ClientIP affinity the API server accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86400;
/// Every real server gets the same weight, as kube-proxy programs them.
pub const REAL_SERVER_WEIGHT: u32 = 1;

/// Which Services the agent proxies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ProxyMode {
    /// The cluster runs no kube-proxy: proxy every Service kube-proxy would (not headless, not
    /// ExternalName, not handed to another proxy by [`SERVICE_PROXY_NAME_LABEL`]).
    Replacement,
    /// kube-proxy runs too: proxy only the Services labeled
    /// `service.kubernetes.io/service-proxy-name: portpolicy`, which kube-proxy then leaves alone.
    #[default]
    Delegated,
}

impl ProxyMode {
    /// Whether the agent in this mode proxies a Service at all.
    pub fn proxies(self, service: &Service) -> bool {
        let proxy_name = service
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
        let ours = match self {
            ProxyMode::Replacement => proxy_name.is_none_or(|n| n == SERVICE_PROXY_NAME),
            ProxyMode::Delegated => proxy_name.is_some_and(|n| n == SERVICE_PROXY_NAME),
        };
        let spec = service.spec.as_ref();
        let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
        let headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");
        ours && !external_name && !headless
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannerConfig {
    /// The node this plan is for (`metadata.name` of the Node, `nodeName` of its endpoints).
    pub node_name: String,
    pub mode: ProxyMode,
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

/// One virtual server the node must program, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedVirtualServer {
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
}

impl PlannedVirtualServer {
    /// The kernel's view of this virtual server.
    pub fn to_ipvs_service(&self) -> IpvsService {
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
pub struct HealthCheckPlan {
    pub namespace: String,
    pub name: String,
    pub node_port: u16,
    /// Distinct IPs of this node's ready, not terminating endpoints of the Service.
    pub local_endpoints: usize,
}

/// Everything one node must program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    pub node: String,
    /// This node's InternalIP and ExternalIP addresses (the node-port virtual server addresses).
    pub node_addresses: BTreeSet<IpAddr>,
    /// Sorted by Service (namespace, then name), kind and key. A virtual server claimed by two
    /// Services appears once, for the first; the other gets a problem.
    pub virtual_servers: Vec<PlannedVirtualServer>,
    /// Sorted by namespace and name.
    pub health_checks: Vec<HealthCheckPlan>,
    /// Addresses to bind on the agent's dummy interface: cluster, external and load-balancer IPs.
    pub vips: BTreeSet<IpAddr>,
    /// Node ports (and health-check node ports) to keep out of `ip_local_reserved_ports`' reach
    /// of ephemeral ports.
    pub reserved_node_ports: BTreeSet<u16>,
    /// Sorted and without duplicates.
    pub problems: Vec<Problem>,
}

impl NodePlan {
    /// The IPVS table this plan wants.
    pub fn table(&self) -> IpvsTable {
        self.virtual_servers
            .iter()
            .map(|vs| (vs.key, vs.to_ipvs_service()))
            .collect()
    }
}

/// Plans one node from a snapshot, with the same code the agent runs incrementally.
pub fn plan_node(snapshot: &Snapshot, config: &PlannerConfig) -> NodePlan {
    let mut planner = Planner::new(config.clone());
    planner.load_snapshot(snapshot);
    planner.node_plan()
}

/// A Service's identity; ordered by namespace, then name (the order conflicts are decided in).
/// `namespace/name` in one shared allocation: the planner's indexes, its claims and every planned
/// virtual server name Services, so a clone is a reference.
#[derive(Clone, Debug)]
struct ServiceId {
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
    fn new(namespace: &str, name: &str) -> Self {
        ServiceId {
            qualified: Arc::from(format!("{namespace}/{name}")),
            namespace_len: namespace.len(),
        }
    }

    fn of(service: &Service) -> Self {
        let meta = &service.metadata;
        ServiceId::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>"),
        )
    }

    fn pair(&self) -> (&str, &str) {
        let (namespace, slash_name) = self.qualified.split_at(self.namespace_len);
        (namespace, &slash_name[1..])
    }

    fn namespace(&self) -> &str {
        self.pair().0
    }

    fn name(&self) -> &str {
        self.pair().1
    }

    /// `namespace/name`.
    fn qualified(&self) -> &Arc<str> {
        &self.qualified
    }

    fn object(&self) -> String {
        object_ref("Service", Some(self.namespace()), self.name())
    }
}

/// A proxied Service, with every field the planner reads parsed once.
#[derive(Clone, Debug)]
struct ServiceModel {
    id: ServiceId,
    labels: Option<Labels>,
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    ports: Vec<ServicePortModel>,
    internal_local: bool,
    external_local: bool,
    persistence_timeout: Option<u32>,
    health_check_node_port: Option<u16>,
    problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
struct ServicePortModel {
    name: Arc<str>,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    text.trim().parse().ok()
}

impl ServiceModel {
    /// `None` when the mode does not proxy the Service.
    fn parse(service: &Service, mode: ProxyMode) -> Option<Self> {
        if !mode.proxies(service) {
            return None;
        }
        let meta = &service.metadata;
        let id = ServiceId::of(service);
        // Named only when something is wrong: most Services have no problem to report.
        let object = || id.object();
        let mut problems = Vec::new();
        let default_spec = Default::default();
        let spec = service.spec.as_ref().unwrap_or(&default_spec);
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        let has_node_ports = matches!(kind, "NodePort" | "LoadBalancer");
        let is_load_balancer = kind == "LoadBalancer";

        let cluster_ip_texts: Vec<&str> = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let mut cluster_ips = Vec::new();
        for (i, text) in cluster_ip_texts.iter().enumerate() {
            match parse_ip(text) {
                Some(ip) => cluster_ips.push(ip),
                None if text.is_empty() => {}
                None => problems.push(Problem::new(
                    object(),
                    format!("spec.clusterIPs[{i}]"),
                    format!("{text:?} is not an IP address; this cluster IP is not proxied"),
                )),
            }
        }
        if cluster_ips.is_empty() && problems.is_empty() {
            problems.push(Problem::new(
                object(),
                "spec.clusterIP",
                "no cluster IP allocated yet; the Service is not proxied until it has one",
            ));
            // kube-proxy skips such Services entirely, node ports and external IPs included.
            return Some(ServiceModel {
                id,
                labels: meta.labels.clone(),
                cluster_ips,
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                ports: Vec::new(),
                internal_local: false,
                external_local: false,
                persistence_timeout: None,
                health_check_node_port: None,
                problems,
            });
        }

        let mut external_ips = Vec::new();
        for (i, text) in spec.external_ips.iter().flatten().enumerate() {
            match parse_ip(text) {
                Some(ip) => external_ips.push(ip),
                None => problems.push(Problem::new(
                    object(),
                    format!("spec.externalIPs[{i}]"),
                    format!("{text:?} is not an IP address; ignored"),
                )),
            }
        }

        let mut load_balancer_ips = Vec::new();
        if is_load_balancer {
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for (i, ing) in ingress.into_iter().flatten().enumerate() {
                // ipMode Proxy: the load balancer delivers to the nodes itself, so the node must
                // not capture the LB IP (kube-proxy does the same since KEP-1860).
                if ing.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                let Some(text) = ing.ip.as_deref() else {
                    continue;
                };
                match parse_ip(text) {
                    Some(ip) => load_balancer_ips.push(ip),
                    None => problems.push(Problem::new(
                        object(),
                        format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("{text:?} is not an IP address; ignored"),
                    )),
                }
            }
        }

        let mut ports = Vec::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let protocol = match Protocol::from_k8s(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(Problem::new(
                        object(),
                        format!("spec.ports[{i}].protocol"),
                        format!("{e}; port not proxied"),
                    ));
                    continue;
                }
            };
            let number = match port_from_i32(port.port) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(Problem::new(
                        object(),
                        format!("spec.ports[{i}].port"),
                        format!("{e}; port not proxied"),
                    ));
                    continue;
                }
            };
            let node_port = match port.node_port.filter(|_| has_node_ports) {
                None | Some(0) => None,
                Some(n) => match port_from_i32(n) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        problems.push(Problem::new(
                            object(),
                            format!("spec.ports[{i}].nodePort"),
                            format!("{e}; node port not proxied"),
                        ));
                        None
                    }
                },
            };
            ports.push(ServicePortModel {
                name: Arc::from(port.name.as_deref().unwrap_or_default()),
                protocol,
                port: number,
                node_port,
            });
        }

        let annotations = meta.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local")
            || annotation(EXTERNAL_TRAFFIC_ANNOTATION) == Some("OnlyLocal");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");

        let persistence_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECONDS => t as u32,
                Some(t) => {
                    problems.push(Problem::new(
                        object(),
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "{t} is not 1-{MAX_AFFINITY_TIMEOUT_SECONDS}; using the default \
                             {DEFAULT_AFFINITY_TIMEOUT_SECONDS}"
                        ),
                    ));
                    DEFAULT_AFFINITY_TIMEOUT_SECONDS
                }
            })
        } else {
            None
        };

        let mut health_check_node_port = None;
        if is_load_balancer && external_local {
            let (field, value) = match spec.health_check_node_port {
                Some(port) => ("spec.healthCheckNodePort", Some(i64::from(port))),
                None => (
                    "metadata.annotations",
                    annotation(HEALTH_CHECK_NODE_PORT_ANNOTATION).and_then(|v| v.trim().parse::<i64>().ok()),
                ),
            };
            if let Some(value) = value {
                match i32::try_from(value)
                    .map_err(|_| String::new())
                    .and_then(port_from_i32)
                {
                    Ok(port) => health_check_node_port = Some(port),
                    Err(_) => problems.push(Problem::new(
                        object(),
                        field,
                        format!("{value} is not a port: must be 1-65535; no health check served"),
                    )),
                }
            }
        }

        Some(ServiceModel {
            id,
            labels: meta.labels.clone(),
            cluster_ips,
            external_ips,
            load_balancer_ips,
            ports,
            internal_local,
            external_local,
            persistence_timeout,
            health_check_node_port,
            problems,
        })
    }
}

/// An EndpointSlice with what the planner needs, locality already decided for this node.
#[derive(Clone, Debug)]
struct SliceModel {
    /// The slice's own name; its namespace is its Service's.
    name: Arc<str>,
    service: ServiceId,
    /// `None` for FQDN slices, which no proxy serves.
    ipv4: Option<bool>,
    ports: Vec<SlicePort>,
    endpoints: Vec<EndpointModel>,
    problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

#[derive(Clone, Copy, Debug)]
struct EndpointModel {
    address: IpAddr,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl SliceModel {
    /// `None` when the slice belongs to no Service (no `kubernetes.io/service-name` label).
    fn parse(slice: &EndpointSlice, node_name: &str) -> Option<Self> {
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

/// The planned result for one Service.
#[derive(Clone, Debug, Default)]
struct ServicePlan {
    /// Sorted by kind and key, no two with the same key.
    virtual_servers: Vec<PlannedVirtualServer>,
    health_check: Option<HealthCheckPlan>,
    node_ports: Vec<u16>,
    problems: Vec<Problem>,
}

impl ServicePlan {
    fn get(&self, key: &VirtualServerKey) -> Option<&PlannedVirtualServer> {
        self.virtual_servers.iter().find(|vs| vs.key == *key)
    }

    fn keys(&self) -> impl Iterator<Item = VirtualServerKey> + '_ {
        self.virtual_servers.iter().map(|vs| vs.key)
    }
}

/// A proxied Service and its current plan.
#[derive(Clone, Debug)]
struct ProxiedService {
    model: ServiceModel,
    plan: ServicePlan,
}

/// Real servers with their weights, as a plan lists them.
type RealServers = Arc<[(RealServerKey, u32)]>;

/// An endpoint serving one Service port, after de-duplication across slices.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    real: RealServerKey,
    local: bool,
    ready: bool,
    serving_terminating: bool,
    /// Position across the slices, which decides between two listings of one endpoint.
    listing: usize,
}

/// Cluster or local endpoints of one address family, chosen the way kube-proxy's
/// CategorizeEndpoints does: ready ones, or if there are none, serving-and-terminating ones.
fn choose_endpoints(candidates: &[Candidate], ipv4: bool, local_only: bool) -> RealServers {
    let pool = || {
        candidates
            .iter()
            .filter(move |c| c.real.address.is_ipv4() == ipv4 && (!local_only || c.local))
    };
    let pick = |ready: bool| {
        let mut picked = Vec::with_capacity(candidates.len());
        picked.extend(
            pool()
                .filter(|c| if ready { c.ready } else { c.serving_terminating })
                .map(|c| (c.real, REAL_SERVER_WEIGHT)),
        );
        picked
    };
    let ready = pick(true);
    if ready.is_empty() {
        pick(false).into()
    } else {
        ready.into()
    }
}

/// Endpoints of one Service port across its slices (`slices` in slice-name order), sorted by
/// real server. An endpoint listed by two slices counts once: the first listing wins, except
/// that a listing on this node beats one elsewhere (as kube-proxy's EndpointSliceCache does).
fn candidates_for_port(port: &ServicePortModel, slices: &[SliceModel]) -> Vec<Candidate> {
    let mut listed: Vec<Candidate> = Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum());
    for slice in slices {
        if slice.ipv4.is_none() {
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| *p.name == *port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            listed.push(Candidate {
                real: RealServerKey {
                    address: ep.address,
                    port: slice_port.port,
                },
                local: ep.local,
                ready: ep.ready,
                serving_terminating: ep.serving && ep.terminating,
                listing: listed.len(),
            });
        }
    }
    listed.sort_unstable_by(|a, b| {
        a.real
            .cmp(&b.real)
            .then(b.local.cmp(&a.local))
            .then(a.listing.cmp(&b.listing))
    });
    listed.dedup_by(|later, first| later.real == first.real);
    listed
}

/// What one Service needs on this node.
fn plan_service(
    service: &ServiceModel,
    slices: &[SliceModel],
    node_addresses: &[IpAddr],
    scheduler: &Arc<str>,
) -> ServicePlan {
    let vips_per_port =
        service.cluster_ips.len() + service.external_ips.len() + service.load_balancer_ips.len();
    let node_port_count = service.ports.iter().filter(|p| p.node_port.is_some()).count();
    let mut plan = ServicePlan {
        virtual_servers: Vec::with_capacity(
            service.ports.len() * vips_per_port + node_port_count * node_addresses.len(),
        ),
        problems: service.problems.clone(),
        ..Default::default()
    };
    let service_name = service.id.qualified();
    for port in &service.ports {
        plan.node_ports.extend(port.node_port);
        let candidates = candidates_for_port(port, slices);
        // [ipv4][local_only], computed when first needed.
        let mut chosen: [[Option<RealServers>; 2]; 2] = Default::default();
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
            if let Some(earlier) = plan.virtual_servers.iter().find(|vs| vs.key == vs_key) {
                plan.problems.push(Problem::new(
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
            let real_servers = chosen[usize::from(ipv4)][usize::from(only_local)]
                .get_or_insert_with(|| choose_endpoints(&candidates, ipv4, only_local))
                .clone();
            plan.virtual_servers.push(PlannedVirtualServer {
                service: service_name.clone(),
                port_name: port.name.clone(),
                kind,
                key: vs_key,
                only_local,
                masquerade_external: !(kind.is_external() && only_local),
                scheduler: scheduler.clone(),
                persistence_timeout: service.persistence_timeout,
                real_servers,
            });
        }
    }
    plan.virtual_servers.sort_by_key(|vs| (vs.kind, vs.key));

    if let Some(node_port) = service.health_check_node_port {
        plan.node_ports.push(node_port);
        let local_ready: BTreeSet<IpAddr> = slices
            .iter()
            .filter(|s| s.ipv4.is_some() && !s.ports.is_empty())
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.local && e.ready && !e.terminating)
            .map(|e| e.address)
            .collect();
        plan.health_check = Some(HealthCheckPlan {
            namespace: service.id.namespace().to_string(),
            name: service.id.name().to_string(),
            node_port,
            local_endpoints: local_ready.len(),
        });
    }
    plan
}

fn kind_field(kind: VirtualServerKind, port_name: &str) -> String {
    match kind {
        VirtualServerKind::ClusterIP => "spec.clusterIPs".to_string(),
        VirtualServerKind::NodePort => format!("spec.ports[name={port_name:?}].nodePort"),
        VirtualServerKind::ExternalIP => "spec.externalIPs".to_string(),
        VirtualServerKind::LoadBalancer => "status.loadBalancer.ingress".to_string(),
    }
}

/// The incremental planner the agent runs: feed it watch events, read the desired table and the
/// keys that changed.
///
/// [`Planner::load_snapshot`] builds every index in bulk from sorted runs; the watch-event methods
/// re-plan one Service at a time. Both decide each Service with [`plan_service`] and each virtual
/// server by the same rule (the first claimant by namespace/name wins), and a property test holds
/// them equal.
#[derive(Clone, Debug)]
pub struct Planner {
    config: PlannerConfig,
    /// This node's InternalIP and ExternalIP addresses, sorted, without duplicates.
    node_addresses: Vec<IpAddr>,
    node_problems: Vec<Problem>,
    policies: PolicySet,
    namespace_labels: BTreeMap<String, Labels>,
    /// Proxied Services only, each with its plan.
    services: BTreeMap<ServiceId, ProxiedService>,
    /// EndpointSlices by the Service they belong to (whether or not it exists or is proxied),
    /// each Service's in slice-name order: the order kube-proxy's cache de-duplicates in.
    slices: BTreeMap<ServiceId, Vec<SliceModel>>,
    /// The Service each slice belongs to, by namespace and slice name, to find the slice again
    /// when it changes or goes.
    slice_owners: HashMap<String, HashMap<Arc<str>, ServiceId>>,
    claims: Claims,
    /// Every scheduler name in use, shared by the plans that use it.
    schedulers: Vec<Arc<str>>,
    desired: IpvsTable,
    dirty: BTreeSet<VirtualServerKey>,
}

impl Planner {
    pub fn new(config: PlannerConfig) -> Self {
        let node_problems = vec![missing_node_problem(&config.node_name)];
        Planner {
            config,
            node_addresses: Vec::new(),
            node_problems,
            policies: PolicySet::default(),
            namespace_labels: BTreeMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owners: HashMap::new(),
            claims: Claims::default(),
            schedulers: vec![Arc::from(DEFAULT_SCHEDULER)],
            desired: IpvsTable::new(),
            dirty: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Replaces everything the planner knows with a snapshot's objects. Keys whose desired state
    /// differs from before are marked dirty.
    pub fn load_snapshot(&mut self, snapshot: &Snapshot) {
        self.set_policy_set(
            PolicySet::compile(&snapshot.policies),
            snapshot.namespace_labels(),
        );
        match snapshot
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.config.node_name))
        {
            Some(node) => self.read_node(node),
            None => {
                self.node_addresses.clear();
                self.node_problems = vec![missing_node_problem(&self.config.node_name)];
            }
        }
        self.load_slices(&snapshot.endpoint_slices);

        let parsed: Vec<ServiceModel> = snapshot
            .services
            .iter()
            .filter_map(|service| ServiceModel::parse(service, self.config.mode))
            .collect();
        // Sort positions, not the models: a model is large, and moves once, into the index.
        let order = sorted_latest(&parsed, |service| service.id.pair());

        // Services and slices are both in ServiceId order: walk them together.
        let mut parsed: Vec<Option<ServiceModel>> = parsed.into_iter().map(Some).collect();
        let mut slices = self.slices.iter().peekable();
        let services: Vec<(ServiceId, ProxiedService)> = order
            .iter()
            .filter_map(|&i| parsed[i].take())
            .map(|model| {
                while slices.next_if(|(owner, _)| **owner < model.id).is_some() {}
                let own = slices
                    .next_if(|(owner, _)| **owner == model.id)
                    .map_or(&[][..], |(_, slices)| slices.as_slice());
                let plan = self.plan(&model, own);
                (model.id.clone(), ProxiedService { model, plan })
            })
            .collect();

        // Every (key, claimant) in key order, claimants in ServiceId order: the first wins.
        let mut claimed: Vec<(VirtualServerKey, usize, usize)> = services
            .iter()
            .enumerate()
            .flat_map(|(s, (_, service))| {
                service
                    .plan
                    .virtual_servers
                    .iter()
                    .enumerate()
                    .map(move |(v, vs)| (vs.key, s, v))
            })
            .collect();
        claimed.sort_unstable();
        let mut winners = Vec::new();
        let mut contested = Vec::new();
        let mut desired = Vec::new();
        for group in claimed.chunk_by(|a, b| a.0 == b.0) {
            let (key, winner, vs) = group[0];
            winners.push((key, services[winner].0.clone()));
            if group.len() > 1 {
                contested.push((
                    key,
                    group.iter().map(|&(_, s, _)| services[s].0.clone()).collect(),
                ));
            }
            desired.push((key, services[winner].1.plan.virtual_servers[vs].to_ipvs_service()));
        }
        let previous = std::mem::replace(&mut self.desired, desired.into_iter().collect());
        self.claims = Claims {
            winners: winners.into_iter().collect(),
            contested: contested.into_iter().collect(),
        };
        self.services = services.into_iter().collect();

        // Keep what was still unread, and add what differs from before.
        let changed = changed_keys(&previous, &self.desired);
        if self.dirty.is_empty() {
            self.dirty = changed.into_iter().collect();
        } else {
            self.dirty.extend(changed);
        }
    }

    /// Replaces every slice with a snapshot's, in bulk: grouped by Service in ServiceId order,
    /// so that planning the Services in that order reads their slices in memory order.
    fn load_slices(&mut self, slices: &[EndpointSlice]) {
        let parsed: Vec<SliceModel> = slices
            .iter()
            .filter_map(|slice| SliceModel::parse(slice, &self.config.node_name))
            .collect();
        // Of two copies of one slice the later wins, as applying them in order would. Copies are
        // found by namespace and name, since a copy may name another Service.
        let mut latest: HashMap<(&str, &str), usize> = HashMap::with_capacity(parsed.len());
        for (i, slice) in parsed.iter().enumerate() {
            latest.insert((slice.service.namespace(), &slice.name), i);
        }
        // By Service, then slice name; the sort keys laid out flat, for the cache.
        let mut order: Vec<(&str, &str, &str, usize)> = latest
            .into_values()
            .map(|i| {
                let (namespace, service) = parsed[i].service.pair();
                (namespace, service, &*parsed[i].name, i)
            })
            .collect();
        order.sort_unstable();
        let order: Vec<usize> = order.into_iter().map(|(.., i)| i).collect();

        self.slice_owners.clear();
        let mut parsed: Vec<Option<SliceModel>> = parsed.into_iter().map(Some).collect();
        let mut by_service: Vec<(ServiceId, Vec<SliceModel>)> = Vec::new();
        for slice in order.iter().filter_map(|&i| parsed[i].take()) {
            self.own_slice(&slice);
            match by_service.last_mut() {
                Some((owner, group)) if *owner == slice.service => group.push(slice),
                _ => by_service.push((slice.service.clone(), vec![slice])),
            }
        }
        self.slices = by_service.into_iter().collect();
    }

    /// Takes this node's addresses; a Node of another name is ignored. Re-plans the Services
    /// with node ports when the addresses changed.
    pub fn set_node(&mut self, node: &Node) {
        if node.metadata.name.as_deref() != Some(&self.config.node_name) {
            return;
        }
        let before = std::mem::take(&mut self.node_addresses);
        self.read_node(node);
        if before != self.node_addresses {
            let with_node_ports: Vec<ServiceId> = self
                .services
                .iter()
                .filter(|(_, s)| s.model.ports.iter().any(|p| p.node_port.is_some()))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &with_node_ports {
                self.replan(id);
            }
        }
    }

    fn read_node(&mut self, node: &Node) {
        let object = object_ref("Node", None, &self.config.node_name);
        let mut addresses = BTreeSet::new();
        self.node_problems.clear();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, address) in listed.into_iter().flatten().enumerate() {
            if !matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
                continue;
            }
            match parse_ip(&address.address) {
                Some(ip) => {
                    addresses.insert(ip);
                }
                None => self.node_problems.push(Problem::new(
                    &object,
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address; no node ports on it", address.address),
                )),
            }
        }
        if addresses.is_empty() {
            self.node_problems.push(Problem::new(
                &object,
                "status.addresses",
                "no InternalIP or ExternalIP address: node ports are not served on this node",
            ));
        }
        self.node_addresses = addresses.into_iter().collect();
    }

    /// Policies decide each Service's scheduler; every Service is re-planned.
    pub fn set_policies(&mut self, policies: PolicySet, namespace_labels: BTreeMap<String, Labels>) {
        self.set_policy_set(policies, namespace_labels);
        let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
        for id in &ids {
            self.replan(id);
        }
    }

    fn set_policy_set(&mut self, policies: PolicySet, namespace_labels: BTreeMap<String, Labels>) {
        let mut schedulers: Vec<Arc<str>> = vec![Arc::from(DEFAULT_SCHEDULER)];
        for policy in policies.policies() {
            if !schedulers.iter().any(|s| **s == *policy.scheduler) {
                schedulers.push(Arc::from(policy.scheduler.as_str()));
            }
        }
        self.schedulers = schedulers;
        self.policies = policies;
        self.namespace_labels = namespace_labels;
    }

    pub fn upsert_service(&mut self, service: &Service) {
        // Not (or no longer) ours: forget it, as if deleted.
        let model = ServiceModel::parse(service, self.config.mode);
        self.set_service(&ServiceId::of(service), model);
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        self.set_service(&ServiceId::new(namespace, name), None);
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = slice.metadata.name.as_deref().unwrap_or_default();
        let before = self.unindex_slice(namespace, name);
        let after = SliceModel::parse(slice, &self.config.node_name).map(|model| self.index_slice(model));
        for id in before
            .iter()
            .chain(after.iter().filter(|a| before.as_ref() != Some(*a)))
        {
            self.replan(id);
        }
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        if let Some(id) = self.unindex_slice(namespace, name) {
            self.replan(&id);
        }
    }

    /// The whole desired table, kept up to date by every change.
    pub fn desired(&self) -> &IpvsTable {
        &self.desired
    }

    /// Virtual servers whose desired state changed since the last call (added, changed or
    /// removed). Feed them to [`super::diff::diff_keys`].
    pub fn take_dirty(&mut self) -> BTreeSet<VirtualServerKey> {
        std::mem::take(&mut self.dirty)
    }

    /// The full plan for this node, assembled from the per-Service results.
    pub fn node_plan(&self) -> NodePlan {
        let mut plan = NodePlan {
            node: self.config.node_name.clone(),
            node_addresses: self.node_addresses.iter().copied().collect(),
            problems: self.node_problems.clone(),
            ..Default::default()
        };
        for slice in self.slices.values().flatten() {
            plan.problems.extend(slice.problems.iter().cloned());
        }
        // Collected, then sorted once: inserting into the sets one by one costs a search each.
        let mut vips = Vec::new();
        let mut reserved_node_ports = Vec::new();
        for (id, ProxiedService { plan: result, .. }) in &self.services {
            plan.problems.extend(result.problems.iter().cloned());
            reserved_node_ports.extend_from_slice(&result.node_ports);
            plan.health_checks.extend(result.health_check.clone());
            for vs in &result.virtual_servers {
                let winner = self
                    .claims
                    .contested_winner(&vs.key)
                    .filter(|winner| *winner != id);
                if let Some(winner) = winner {
                    plan.problems.push(Problem::new(
                        id.object(),
                        kind_field(vs.kind, &vs.port_name),
                        format!(
                            "virtual server {} is also planned by {}, which wins (first by namespace/name); \
                             not programmed for this Service",
                            vs.key,
                            winner.object()
                        ),
                    ));
                    continue;
                }
                if vs.kind != VirtualServerKind::NodePort {
                    vips.push(vs.key.address);
                }
                plan.virtual_servers.push(vs.clone());
            }
        }
        vips.sort_unstable();
        plan.vips = vips.into_iter().collect();
        reserved_node_ports.sort_unstable();
        plan.reserved_node_ports = reserved_node_ports.into_iter().collect();
        plan.problems.sort();
        plan.problems.dedup();
        plan
    }

    /// Adds a parsed slice to the index, in its Service's name order; returns its Service.
    fn index_slice(&mut self, model: SliceModel) -> ServiceId {
        let id = model.service.clone();
        self.own_slice(&model);
        let slices = self.slices.entry(id.clone()).or_default();
        match slices.binary_search_by(|s| s.name.cmp(&model.name)) {
            Ok(at) => slices[at] = model,
            Err(at) => slices.insert(at, model),
        }
        id
    }

    fn own_slice(&mut self, slice: &SliceModel) {
        let namespace = slice.service.namespace();
        let owners = match self.slice_owners.get_mut(namespace) {
            Some(owners) => owners,
            None => self.slice_owners.entry(namespace.to_string()).or_default(),
        };
        owners.insert(slice.name.clone(), slice.service.clone());
    }

    /// Removes a slice from the index; returns the Service it belonged to.
    fn unindex_slice(&mut self, namespace: &str, name: &str) -> Option<ServiceId> {
        let owners = self.slice_owners.get_mut(namespace)?;
        let id = owners.remove(name)?;
        if owners.is_empty() {
            self.slice_owners.remove(namespace);
        }
        if let Some(slices) = self.slices.get_mut(&id) {
            slices.retain(|s| &*s.name != name);
            if slices.is_empty() {
                self.slices.remove(&id);
            }
        }
        Some(id)
    }

    fn slices_of(&self, id: &ServiceId) -> &[SliceModel] {
        self.slices.get(id).map_or(&[], Vec::as_slice)
    }

    /// Plans one Service with its slices (in slice-name order) and its governing policy.
    fn plan(&self, service: &ServiceModel, slices: &[SliceModel]) -> ServicePlan {
        let mut problems = Vec::new();
        let scheduler = self.scheduler_for(service, &mut problems);
        let mut plan = plan_service(service, slices, &self.node_addresses, &scheduler);
        plan.problems.extend(problems);
        plan
    }

    fn scheduler_for(&self, service: &ServiceModel, problems: &mut Vec<Problem>) -> Arc<str> {
        let governance = self.policies.governing_service(
            self.namespace_labels.get(service.id.namespace()),
            service.labels.as_ref(),
        );
        match governance {
            Governance::By(policy) => self.scheduler_named(&policy.scheduler),
            Governance::Ungoverned => self.scheduler_named(DEFAULT_SCHEDULER),
            Governance::Ambiguous(a, b) => {
                problems.push(Problem::new(
                    service.id.object(),
                    "metadata.labels",
                    format!(
                        "selected by PortPolicies {} and {}; using the default scheduler {DEFAULT_SCHEDULER}",
                        a.name, b.name
                    ),
                ));
                self.scheduler_named(DEFAULT_SCHEDULER)
            }
        }
    }

    fn scheduler_named(&self, name: &str) -> Arc<str> {
        let known = self.schedulers.iter().find(|s| ***s == *name);
        known.cloned().unwrap_or_else(|| Arc::from(name))
    }

    /// Plans a Service anew from its model, or forgets it (`None`).
    fn set_service(&mut self, id: &ServiceId, model: Option<ServiceModel>) {
        let old = self.services.remove(id).map(|service| service.plan);
        if let Some(model) = model {
            let slices = self.slices_of(id);
            let plan = self.plan(&model, slices);
            self.services.insert(id.clone(), ProxiedService { model, plan });
        }
        self.update_claims(id, old);
    }

    /// Re-plans one Service after its slices, the node or the policies changed.
    fn replan(&mut self, id: &ServiceId) {
        let Some(service) = self.services.get(id) else {
            return;
        };
        let slices = self.slices_of(id);
        let plan = self.plan(&service.model, slices);
        let old = self
            .services
            .get_mut(id)
            .map(|service| std::mem::replace(&mut service.plan, plan));
        self.update_claims(id, old);
    }

    /// Updates the claims, the desired table and the dirty keys for exactly the virtual servers
    /// a Service planned before (`old`) and plans now.
    fn update_claims(&mut self, id: &ServiceId, old: Option<ServicePlan>) {
        let old_keys: Vec<VirtualServerKey> = old.iter().flat_map(ServicePlan::keys).collect();
        let new_keys: Vec<VirtualServerKey> = self
            .services
            .get(id)
            .into_iter()
            .flat_map(|service| service.plan.keys())
            .collect();
        for key in &old_keys {
            if !new_keys.contains(key) {
                self.claims.release(key, id);
            }
        }
        for key in &new_keys {
            self.claims.claim(*key, id);
        }
        for key in old_keys.iter().chain(&new_keys) {
            self.refresh_desired(key);
        }
    }

    /// Sets the desired entry of one key from the Service that wins it.
    fn refresh_desired(&mut self, key: &VirtualServerKey) {
        let wanted = self
            .claims
            .winner(key)
            .and_then(|winner| self.services.get(winner))
            .and_then(|service| service.plan.get(key))
            .map(PlannedVirtualServer::to_ipvs_service);
        match wanted {
            Some(service) => {
                if self.desired.get(key) != Some(&service) {
                    self.desired.insert(*key, service);
                    self.dirty.insert(*key);
                }
            }
            None => {
                if self.desired.remove(key).is_some() {
                    self.dirty.insert(*key);
                }
            }
        }
    }
}

/// Which Services plan each virtual server. The first by namespace/name wins. One claimant is
/// the rule and costs no more than the winner's name; contested keys keep every claimant apart.
#[derive(Clone, Debug, Default)]
struct Claims {
    winners: BTreeMap<VirtualServerKey, ServiceId>,
    /// Every claimant, sorted, of each key with more than one.
    contested: BTreeMap<VirtualServerKey, Vec<ServiceId>>,
}

impl Claims {
    fn winner(&self, key: &VirtualServerKey) -> Option<&ServiceId> {
        self.winners.get(key)
    }

    /// The winner of a key, when others claim it too.
    fn contested_winner(&self, key: &VirtualServerKey) -> Option<&ServiceId> {
        self.contested.get(key).and_then(|claimants| claimants.first())
    }

    fn claim(&mut self, key: VirtualServerKey, id: &ServiceId) {
        let winner = match self.winners.get(&key) {
            None => id.clone(),
            Some(winner) if winner == id => return,
            Some(winner) => {
                let claimants = self.contested.entry(key).or_insert_with(|| vec![winner.clone()]);
                if let Err(at) = claimants.binary_search(id) {
                    claimants.insert(at, id.clone());
                }
                claimants.first().unwrap_or(id).clone()
            }
        };
        self.winners.insert(key, winner);
    }

    fn release(&mut self, key: &VirtualServerKey, id: &ServiceId) {
        match self.contested.get_mut(key) {
            Some(claimants) => {
                claimants.retain(|c| c != id);
                if let Some(winner) = claimants.first() {
                    self.winners.insert(*key, winner.clone());
                }
                if claimants.len() < 2 {
                    self.contested.remove(key);
                }
            }
            None => {
                if self.winners.get(key) == Some(id) {
                    self.winners.remove(key);
                }
            }
        }
    }
}

/// Positions of `items` in order of their keys, keeping only the last of equal keys (the copy
/// applied last wins). Keys are laid out flat before sorting, for the cache.
fn sorted_latest<'a, T, K: Ord>(items: &'a [T], key: impl Fn(&'a T) -> K) -> Vec<usize> {
    let mut keyed: Vec<(K, usize)> = items.iter().enumerate().map(|(i, item)| (key(item), i)).collect();
    // Equal keys sort by position, so the last of each run is the latest copy.
    keyed.sort_unstable();
    let mut order = Vec::with_capacity(keyed.len());
    let mut keyed = keyed.into_iter().peekable();
    while let Some((key, i)) = keyed.next() {
        if keyed.peek().is_none_or(|(next, _)| *next != key) {
            order.push(i);
        }
    }
    order
}

/// Keys whose entries differ between two tables (present in one only, or unequal), in order.
fn changed_keys(before: &IpvsTable, after: &IpvsTable) -> Vec<VirtualServerKey> {
    let mut changed = Vec::new();
    let mut before = before.iter().peekable();
    let mut after = after.iter().peekable();
    loop {
        let order = match (before.peek(), after.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((b, _)), Some((a, _))) => b.cmp(a),
        };
        match order {
            Ordering::Less => changed.extend(before.next().map(|(key, _)| *key)),
            Ordering::Greater => changed.extend(after.next().map(|(key, _)| *key)),
            Ordering::Equal => {
                if let (Some((key, b)), Some((_, a))) = (before.next(), after.next())
                    && b != a
                {
                    changed.push(*key);
                }
            }
        }
    }
    changed
}

fn missing_node_problem(node_name: &str) -> Problem {
    Problem::new(
        object_ref("Node", None, node_name),
        "",
        "node not known: node ports are not served until its addresses are",
    )
}

#[cfg(test)]
mod tests;
