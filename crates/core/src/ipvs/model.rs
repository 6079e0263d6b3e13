//! The planner's model of its input: Services, EndpointSlices and their endpoints, each read
//! once into what planning needs (kube-proxy's ServicePort and EndpointSliceCache entries).

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::governance::Labels;
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};

use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, EXTERNAL_TRAFFIC_ONLY_LOCAL, HEALTH_CHECK_NODE_PORT_ANNOTATION,
    SERVICE_NAME_LABEL,
};

use super::rules::{DEFAULT_AFFINITY_TIMEOUT_SECONDS, MAX_AFFINITY_TIMEOUT_SECONDS, ProxyMode};

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

    pub(super) fn of(service: &Service) -> Self {
        let meta = &service.metadata;
        ServiceId::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<unnamed>"),
        )
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

/// A proxied Service, with every field the planner reads parsed once.
#[derive(Clone, Debug)]
pub(super) struct ServiceModel {
    pub(super) id: ServiceId,
    pub(super) labels: Option<Labels>,
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) external_ips: Vec<IpAddr>,
    pub(super) load_balancer_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePortModel>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
    pub(super) persistence_timeout: Option<u32>,
    pub(super) health_check_node_port: Option<u16>,
    pub(super) problems: Vec<Problem>,
}

#[derive(Clone, Debug)]
pub(super) struct ServicePortModel {
    pub(super) name: Arc<str>,
    pub(super) protocol: Protocol,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
}

pub(super) fn parse_ip(text: &str) -> Option<IpAddr> {
    text.trim().parse().ok()
}

impl ServiceModel {
    /// `None` when the mode does not proxy the Service.
    pub(super) fn parse(service: &Service, mode: ProxyMode) -> Option<Self> {
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
            || annotation(EXTERNAL_TRAFFIC_ANNOTATION) == Some(EXTERNAL_TRAFFIC_ONLY_LOCAL);
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
