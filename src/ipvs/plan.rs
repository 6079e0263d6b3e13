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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

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
    pub service: String,
    /// The Service port's name; empty for a single unnamed port.
    pub port_name: String,
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
    pub scheduler: String,
    /// Seconds of ClientIP persistence (`sessionAffinity: ClientIP`).
    pub persistence_timeout: Option<u32>,
    /// Sorted by address and port; every weight is [`REAL_SERVER_WEIGHT`].
    pub real_servers: Vec<(RealServerKey, u32)>,
}

impl PlannedVirtualServer {
    /// The kernel's view of this virtual server.
    pub fn to_ipvs_service(&self) -> IpvsService {
        IpvsService {
            scheduler: self.scheduler.clone(),
            persistence_timeout: self.persistence_timeout,
            real_servers: self
                .real_servers
                .iter()
                .map(|(rs, weight)| (*rs, RealServerState::with_weight(*weight)))
                .collect(),
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ServiceId {
    namespace: String,
    name: String,
}

impl ServiceId {
    fn new(namespace: &str, name: &str) -> Self {
        ServiceId {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn object(&self) -> String {
        object_ref("Service", Some(&self.namespace), &self.name)
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
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
    name: String,
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
        let id = ServiceId::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>"),
        );
        let object = id.object();
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
                    &object,
                    format!("spec.clusterIPs[{i}]"),
                    format!("{text:?} is not an IP address; this cluster IP is not proxied"),
                )),
            }
        }
        if cluster_ips.is_empty() && problems.is_empty() {
            problems.push(Problem::new(
                &object,
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
                    &object,
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
                        &object,
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
                        &object,
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
                        &object,
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
                            &object,
                            format!("spec.ports[{i}].nodePort"),
                            format!("{e}; node port not proxied"),
                        ));
                        None
                    }
                },
            };
            ports.push(ServicePortModel {
                name: port.name.clone().unwrap_or_default(),
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
                        &object,
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
                        &object,
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
    fn parse(slice: &EndpointSlice, node_name: &str) -> Option<(String, Self)> {
        let meta = &slice.metadata;
        let service_name = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        let name = meta.name.clone().unwrap_or_default();
        let object = object_ref("EndpointSlice", Some(namespace), &name);
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
                    &object,
                    format!("ports[{i}]"),
                    format!("{e}; ignored"),
                )),
            }
        }
        let mut endpoints = Vec::new();
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
                            &object,
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
        Some((
            name,
            SliceModel {
                service: ServiceId::new(namespace, service_name),
                ipv4,
                ports,
                endpoints,
                problems,
            },
        ))
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
}

/// Real servers with their weights, as a plan lists them.
type RealServers = Vec<(RealServerKey, u32)>;

/// An endpoint serving one Service port, after de-duplication across slices.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    real: RealServerKey,
    local: bool,
    ready: bool,
    serving_terminating: bool,
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
        pool()
            .filter(|c| if ready { c.ready } else { c.serving_terminating })
            .map(|c| (c.real, REAL_SERVER_WEIGHT))
            .collect::<Vec<_>>()
    };
    let ready = pick(true);
    if ready.is_empty() { pick(false) } else { ready }
}

/// Endpoints of one Service port across its slices (`slices` in slice-name order), sorted by
/// real server. An endpoint listed by two slices counts once: the first listing wins, except
/// that a listing on this node beats one elsewhere (as kube-proxy's EndpointSliceCache does).
fn candidates_for_port(port: &ServicePortModel, slices: &[&SliceModel]) -> Vec<Candidate> {
    let mut listed: Vec<(Candidate, usize)> = Vec::new();
    for slice in slices {
        if slice.ipv4.is_none() {
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let order = listed.len();
            listed.push((
                Candidate {
                    real: RealServerKey {
                        address: ep.address,
                        port: slice_port.port,
                    },
                    local: ep.local,
                    ready: ep.ready,
                    serving_terminating: ep.serving && ep.terminating,
                },
                order,
            ));
        }
    }
    listed.sort_unstable_by(|(a, ai), (b, bi)| {
        a.real.cmp(&b.real).then(b.local.cmp(&a.local)).then(ai.cmp(bi))
    });
    listed.dedup_by(|later, first| later.0.real == first.0.real);
    listed.into_iter().map(|(c, _)| c).collect()
}

/// What one Service needs on this node.
fn plan_service(
    service: &ServiceModel,
    slices: &[&SliceModel],
    node_addresses: &[IpAddr],
    scheduler: &str,
) -> ServicePlan {
    let mut plan = ServicePlan {
        problems: service.problems.clone(),
        ..Default::default()
    };
    let object = service.id.object();
    let service_name = service.id.to_string();
    for port in &service.ports {
        plan.node_ports.extend(port.node_port);
        let candidates = candidates_for_port(port, slices);
        // [ipv4][local_only], computed when first needed.
        let mut chosen: [[Option<RealServers>; 2]; 2] = Default::default();
        let mut vips: Vec<(VirtualServerKind, VirtualServerKey)> = Vec::new();
        let key = |address: IpAddr, port_number: u16| VirtualServerKey {
            address,
            port: port_number,
            protocol: port.protocol,
        };
        vips.extend(
            service
                .cluster_ips
                .iter()
                .map(|ip| (VirtualServerKind::ClusterIP, key(*ip, port.port))),
        );
        if let Some(node_port) = port.node_port {
            vips.extend(
                node_addresses
                    .iter()
                    .map(|ip| (VirtualServerKind::NodePort, key(*ip, node_port))),
            );
        }
        vips.extend(
            service
                .external_ips
                .iter()
                .map(|ip| (VirtualServerKind::ExternalIP, key(*ip, port.port))),
        );
        vips.extend(
            service
                .load_balancer_ips
                .iter()
                .map(|ip| (VirtualServerKind::LoadBalancer, key(*ip, port.port))),
        );
        for (kind, vs_key) in vips {
            if let Some(earlier) = plan.virtual_servers.iter().find(|vs| vs.key == vs_key) {
                plan.problems.push(Problem::new(
                    &object,
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
                scheduler: scheduler.to_string(),
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
            namespace: service.id.namespace.clone(),
            name: service.id.name.clone(),
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
#[derive(Clone, Debug)]
pub struct Planner {
    config: PlannerConfig,
    /// This node's InternalIP and ExternalIP addresses, sorted, without duplicates.
    node_addresses: Vec<IpAddr>,
    node_problems: Vec<Problem>,
    policies: PolicySet,
    namespace_labels: BTreeMap<String, Labels>,
    /// Proxied Services only.
    services: BTreeMap<ServiceId, ServiceModel>,
    /// Keyed by (namespace, slice name).
    slices: BTreeMap<(String, String), SliceModel>,
    /// Slice names by Service, in name order (the order kube-proxy's cache de-duplicates in).
    slices_by_service: BTreeMap<ServiceId, BTreeSet<String>>,
    results: BTreeMap<ServiceId, ServicePlan>,
    /// Services planning each virtual server, sorted: the first one wins.
    claims: BTreeMap<VirtualServerKey, Vec<ServiceId>>,
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
            slices_by_service: BTreeMap::new(),
            results: BTreeMap::new(),
            claims: BTreeMap::new(),
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
        let previous = std::mem::take(&mut self.desired);
        let pending = std::mem::take(&mut self.dirty);
        self.services.clear();
        self.slices.clear();
        self.slices_by_service.clear();
        self.results.clear();
        self.claims.clear();
        self.policies = PolicySet::compile(&snapshot.policies);
        self.namespace_labels = snapshot.namespace_labels();
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
        // Slices first, so each Service is planned once, with all its endpoints.
        for slice in &snapshot.endpoint_slices {
            self.index_slice(slice);
        }
        for service in &snapshot.services {
            if let Some(model) = ServiceModel::parse(service, self.config.mode) {
                self.services.insert(model.id.clone(), model);
            }
        }
        let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
        for id in &ids {
            self.replan(id);
        }
        // Rebuilding marked every key; keep only real changes, plus what was still unread.
        let rebuilt = std::mem::replace(&mut self.dirty, pending);
        let changed: Vec<VirtualServerKey> = rebuilt
            .into_iter()
            .chain(previous.keys().copied())
            .filter(|k| previous.get(k) != self.desired.get(k))
            .collect();
        self.dirty.extend(changed);
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
                .values()
                .filter(|s| s.ports.iter().any(|p| p.node_port.is_some()))
                .map(|s| s.id.clone())
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
        self.policies = policies;
        self.namespace_labels = namespace_labels;
        let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
        for id in &ids {
            self.replan(id);
        }
    }

    pub fn upsert_service(&mut self, service: &Service) {
        let meta = &service.metadata;
        let id = ServiceId::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>"),
        );
        match ServiceModel::parse(service, self.config.mode) {
            Some(model) => {
                self.services.insert(id.clone(), model);
            }
            // Not (or no longer) ours: forget it, as if deleted.
            None => {
                self.services.remove(&id);
            }
        }
        self.replan(&id);
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let id = ServiceId::new(namespace, name);
        self.services.remove(&id);
        self.replan(&id);
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = slice.metadata.name.as_deref().unwrap_or_default();
        let before = self.unindex_slice(namespace, name);
        let after = self.index_slice(slice);
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
        for slice in self.slices.values() {
            plan.problems.extend(slice.problems.iter().cloned());
        }
        for (id, result) in &self.results {
            plan.problems.extend(result.problems.iter().cloned());
            plan.reserved_node_ports.extend(result.node_ports.iter().copied());
            plan.health_checks.extend(result.health_check.clone());
            for vs in &result.virtual_servers {
                let claimants = &self.claims[&vs.key];
                if claimants[0] != *id {
                    plan.problems.push(Problem::new(
                        id.object(),
                        kind_field(vs.kind, &vs.port_name),
                        format!(
                            "virtual server {} is also planned by {}, which wins (first by namespace/name); \
                             not programmed for this Service",
                            vs.key,
                            claimants[0].object()
                        ),
                    ));
                    continue;
                }
                if vs.kind != VirtualServerKind::NodePort {
                    plan.vips.insert(vs.key.address);
                }
                plan.virtual_servers.push(vs.clone());
            }
        }
        plan.problems.sort();
        plan.problems.dedup();
        plan
    }

    /// Adds a slice to the index; returns its Service.
    fn index_slice(&mut self, slice: &EndpointSlice) -> Option<ServiceId> {
        let (name, model) = SliceModel::parse(slice, &self.config.node_name)?;
        let id = model.service.clone();
        self.slices_by_service
            .entry(id.clone())
            .or_default()
            .insert(name.clone());
        self.slices.insert((id.namespace.clone(), name), model);
        Some(id)
    }

    /// Removes a slice from the index; returns the Service it belonged to.
    fn unindex_slice(&mut self, namespace: &str, name: &str) -> Option<ServiceId> {
        let model = self.slices.remove(&(namespace.to_string(), name.to_string()))?;
        if let Some(names) = self.slices_by_service.get_mut(&model.service) {
            names.remove(name);
            if names.is_empty() {
                self.slices_by_service.remove(&model.service);
            }
        }
        Some(model.service)
    }

    fn scheduler_for(&self, service: &ServiceModel, problems: &mut Vec<Problem>) -> String {
        let governance = self.policies.governing_service(
            self.namespace_labels.get(&service.id.namespace),
            service.labels.as_ref(),
        );
        match governance {
            Governance::By(policy) => policy.scheduler.clone(),
            Governance::Ungoverned => DEFAULT_SCHEDULER.to_string(),
            Governance::Ambiguous(a, b) => {
                problems.push(Problem::new(
                    service.id.object(),
                    "metadata.labels",
                    format!(
                        "selected by PortPolicies {} and {}; using the default scheduler {DEFAULT_SCHEDULER}",
                        a.name, b.name
                    ),
                ));
                DEFAULT_SCHEDULER.to_string()
            }
        }
    }

    /// Re-plans one Service (or forgets it, when it is gone) and updates the claims, the desired
    /// table and the dirty keys for exactly its virtual servers.
    fn replan(&mut self, id: &ServiceId) {
        let new = self.services.get(id).map(|service| {
            let slices: Vec<&SliceModel> = self
                .slices_by_service
                .get(id)
                .into_iter()
                .flatten()
                .filter_map(|name| self.slices.get(&(id.namespace.clone(), name.clone())))
                .collect();
            let mut problems = Vec::new();
            let scheduler = self.scheduler_for(service, &mut problems);
            let mut plan = plan_service(service, &slices, &self.node_addresses, &scheduler);
            plan.problems.extend(problems);
            plan
        });
        let old = match new {
            Some(plan) => self.results.insert(id.clone(), plan),
            None => self.results.remove(id),
        };
        let old_keys: Vec<VirtualServerKey> = old
            .iter()
            .flat_map(|p| p.virtual_servers.iter().map(|vs| vs.key))
            .collect();
        let new_keys: Vec<VirtualServerKey> = self
            .results
            .get(id)
            .into_iter()
            .flat_map(|p| p.virtual_servers.iter().map(|vs| vs.key))
            .collect();
        for key in &old_keys {
            if !new_keys.contains(key)
                && let Some(claimants) = self.claims.get_mut(key)
            {
                claimants.retain(|c| c != id);
                if claimants.is_empty() {
                    self.claims.remove(key);
                }
            }
        }
        for key in &new_keys {
            let claimants = self.claims.entry(*key).or_default();
            if let Err(at) = claimants.binary_search(id) {
                claimants.insert(at, id.clone());
            }
        }
        for key in old_keys.iter().chain(&new_keys) {
            self.refresh_desired(key);
        }
    }

    /// Sets the desired entry of one key from the Service that wins it.
    fn refresh_desired(&mut self, key: &VirtualServerKey) {
        let wanted = self
            .claims
            .get(key)
            .and_then(|claimants| claimants.first())
            .and_then(|winner| self.results.get(winner))
            .and_then(|plan| plan.get(key))
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

fn missing_node_problem(node_name: &str) -> Problem {
    Problem::new(
        object_ref("Node", None, node_name),
        "",
        "node not known: node ports are not served until its addresses are",
    )
}

#[cfg(test)]
mod tests;
