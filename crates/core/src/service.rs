//! The one Service model: every field of a Service that portpolicy reads, read once with the API
//! server's defaults (pkg/apis/core/v1/defaults.go) and checked the way its validation would
//! (pkg/apis/core/validation ValidateService). The nodePort allocator, the IPVS planner and the
//! operator all read Services through it, so they cannot disagree about what a Service says.
//!
//! The model is built from [`ServiceFields`], a borrowed view of exactly those fields, so any
//! representation of a Service can feed it: a `k8s_openapi` [`Service`] (the operator's caches,
//! the agent's watches, snapshots) or a pruned type that deserializes only these fields. Nothing
//! is copied that does not have to be parsed.
//!
//! A value that cannot be used is left out of the model and reported as a [`ServiceIssue`]; what
//! leaving it out means is each consumer's to say ([`IssueKind`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::cidr::Cidr;
use crate::governance::Labels;
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};
use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, EXTERNAL_TRAFFIC_ONLY_LOCAL, HEALTH_CHECK_NODE_PORT_ANNOTATION,
    SERVICE_PROXY_NAME_LABEL, TOPOLOGY_AWARE_HINTS_ANNOTATION, TOPOLOGY_MODE_ANNOTATION,
};

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when missing (the API server's default, 3 h).
pub(crate) const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;
/// The longest ClientIP affinity the API server accepts (1 day).
pub(crate) const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86400;

/// The fields of a Service that portpolicy reads, borrowed from whatever holds them.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceFields<'a> {
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    pub creation_timestamp: Option<&'a Time>,
    pub labels: Option<&'a Labels>,
    /// Only [`EXTERNAL_TRAFFIC_ANNOTATION`], [`HEALTH_CHECK_NODE_PORT_ANNOTATION`] and the
    /// topology annotations are read.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub type_: Option<&'a str>,
    pub cluster_ip: Option<&'a str>,
    pub cluster_ips: &'a [String],
    pub external_ips: &'a [String],
    pub ports: &'a [ServicePort],
    pub external_traffic_policy: Option<&'a str>,
    pub internal_traffic_policy: Option<&'a str>,
    pub health_check_node_port: Option<i32>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub session_affinity: Option<&'a str>,
    pub session_affinity_timeout_seconds: Option<i32>,
    pub traffic_distribution: Option<&'a str>,
    pub load_balancer_source_ranges: &'a [String],
    /// `status.loadBalancer.ingress`.
    pub load_balancer_ingress: &'a [LoadBalancerIngress],
}

impl<'a> From<&'a Service> for ServiceFields<'a> {
    fn from(service: &'a Service) -> Self {
        let meta = &service.metadata;
        let mut fields = ServiceFields {
            namespace: meta.namespace.as_deref(),
            name: meta.name.as_deref(),
            creation_timestamp: meta.creation_timestamp.as_ref(),
            labels: meta.labels.as_ref(),
            annotations: meta.annotations.as_ref(),
            load_balancer_ingress: service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_deref())
                .unwrap_or_default(),
            ..ServiceFields::default()
        };
        if let Some(spec) = &service.spec {
            fields.type_ = spec.type_.as_deref();
            fields.cluster_ip = spec.cluster_ip.as_deref();
            fields.cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
            fields.external_ips = spec.external_ips.as_deref().unwrap_or_default();
            fields.ports = spec.ports.as_deref().unwrap_or_default();
            fields.external_traffic_policy = spec.external_traffic_policy.as_deref();
            fields.internal_traffic_policy = spec.internal_traffic_policy.as_deref();
            fields.health_check_node_port = spec.health_check_node_port;
            fields.allocate_load_balancer_node_ports = spec.allocate_load_balancer_node_ports;
            fields.session_affinity = spec.session_affinity.as_deref();
            fields.traffic_distribution = spec.traffic_distribution.as_deref();
            fields.load_balancer_source_ranges =
                spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
            fields.session_affinity_timeout_seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
        }
        fields
    }
}

impl<'a> ServiceFields<'a> {
    /// The namespace: `default` when missing or empty, as `kubectl apply` would place it.
    pub fn namespace(&self) -> &'a str {
        self.namespace.filter(|ns| !ns.is_empty()).unwrap_or("default")
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations?.get(key).map(String::as_str)
    }
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType<'a> {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
    /// A type the API server does not know; it would refuse the Service.
    Unknown(&'a str),
}

impl<'a> ServiceType<'a> {
    /// A missing or empty type is ClusterIP, as the API server defaults it.
    pub fn parse(text: Option<&'a str>) -> Self {
        match text.unwrap_or_default() {
            "" | "ClusterIP" => ServiceType::ClusterIP,
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => ServiceType::ExternalName,
            other => ServiceType::Unknown(other),
        }
    }

    /// Only NodePort and LoadBalancer Services may hold nodePorts.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }

    pub fn as_str(self) -> &'a str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
            ServiceType::Unknown(text) => text,
        }
    }
}

/// `spec.externalTrafficPolicy`, with the legacy annotation taken into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalTraffic {
    Cluster,
    /// `externalTrafficPolicy: Local`.
    Local,
    /// Local only through the `OnlyLocal` annotation.
    LocalByAnnotation,
}

impl ExternalTraffic {
    pub(crate) fn is_local(self) -> bool {
        self != ExternalTraffic::Cluster
    }
}

/// Where a Service carries its healthCheckNodePort, and so where a new one must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthCheckField {
    /// `spec.healthCheckNodePort` (the Service says `externalTrafficPolicy: Local`).
    Spec,
    /// The legacy annotation: the Service is Local only through the `OnlyLocal` annotation, so
    /// the API server would reject `spec.healthCheckNodePort`.
    Annotation,
}

impl HealthCheckField {
    pub fn path(self) -> String {
        match self {
            HealthCheckField::Spec => "spec.healthCheckNodePort".to_string(),
            HealthCheckField::Annotation => {
                format!("metadata.annotations[{HEALTH_CHECK_NODE_PORT_ANNOTATION}]")
            }
        }
    }
}

/// How a Service asks for topology-aware routing. The EndpointSlice controller turns the request
/// into endpoint hints, and the proxy follows the hints (kube-proxy has not read the request
/// itself since 1.33); the model keeps it to explain plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyRequest {
    /// `service.kubernetes.io/topology-mode: Auto` (or the deprecated
    /// `service.kubernetes.io/topology-aware-hints`): zone hints in proportion to each zone's
    /// capacity. The controller prefers it to `trafficDistribution`.
    Auto,
    /// `trafficDistribution: PreferSameZone`, or `PreferClose`, its older name.
    PreferSameZone,
    /// `trafficDistribution: PreferSameNode`: node hints, then zone hints as the fallback.
    PreferSameNode,
}

impl TopologyRequest {
    /// How the Service spells it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            TopologyRequest::Auto => "topology-mode Auto",
            TopologyRequest::PreferSameZone => "trafficDistribution PreferSameZone",
            TopologyRequest::PreferSameNode => "trafficDistribution PreferSameNode",
        }
    }
}

/// One usable entry of `spec.ports`: its number and protocol parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePortModel<'a> {
    /// Index in `spec.ports`.
    pub index: usize,
    /// Empty for a single unnamed port.
    pub name: &'a str,
    pub port: u16,
    pub protocol: Protocol,
    /// The nodePort the port holds; always `None` for a type that may not hold nodePorts.
    pub node_port: Option<u16>,
}

/// The health check of a LoadBalancer with Local external traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The healthCheckNodePort the Service holds, if it holds a usable one.
    pub node_port: Option<u16>,
    pub field: HealthCheckField,
}

/// What an issue is about, which decides what each consumer does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueKind {
    /// Against the API server's validation (a missing name, duplicates, a field the type may
    /// not set), but nothing is left out for it.
    Invalid,
    /// A `spec.ports` entry whose number or protocol is unusable; the port is left out.
    Port,
    /// An unusable nodePort; the port has none.
    NodePort,
    /// An unusable healthCheckNodePort; the health check has none.
    HealthCheckNodePort,
    /// An unusable cluster IP; left out.
    ClusterIp,
    /// An unusable external IP; left out.
    ExternalIp,
    /// An unusable load-balancer ingress IP; left out.
    LoadBalancerIp,
    /// A ClientIP affinity timeout out of range; the default is used.
    AffinityTimeout,
    /// An unusable `loadBalancerSourceRanges` entry; left out (the others still restrict).
    SourceRange,
}

impl IssueKind {
    /// Whether the issue makes the Service one the allocator must leave untouched: the API
    /// server would refuse it, and its nodePorts are what the allocator decides about.
    pub(crate) fn blocks_allocation(self) -> bool {
        matches!(
            self,
            IssueKind::Invalid | IssueKind::Port | IssueKind::NodePort | IssueKind::HealthCheckNodePort
        )
    }

    /// What proxying the Service gives up because of the issue, as the end of its message;
    /// `None` when proxying loses nothing.
    pub(crate) fn proxy_consequence(self) -> Option<&'static str> {
        match self {
            IssueKind::Invalid => None,
            IssueKind::Port => Some("port not proxied"),
            IssueKind::NodePort => Some("node port not proxied"),
            IssueKind::HealthCheckNodePort => Some("no health check served"),
            IssueKind::ClusterIp => Some("this cluster IP is not proxied"),
            IssueKind::ExternalIp | IssueKind::LoadBalancerIp => Some("ignored"),
            IssueKind::AffinityTimeout => Some("using the default 10800"),
            IssueKind::SourceRange => Some("ignored"),
        }
    }
}

/// Something wrong with one field of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIssue {
    pub field: String,
    pub message: String,
    pub kind: IssueKind,
}

/// A Service, read: everything the allocator, the planner and the operator decide from.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceModel<'a> {
    /// `default` when missing or empty, as `kubectl apply` would place it.
    pub namespace: &'a str,
    /// Empty when missing (the API server would refuse it; see [`Self::object`]).
    pub name: &'a str,
    pub created: Option<&'a Time>,
    pub labels: Option<&'a Labels>,
    pub type_: ServiceType<'a>,
    /// `clusterIP: None`.
    pub headless: bool,
    /// The usable cluster IPs (`spec.clusterIPs`, or `spec.clusterIP` without them).
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs the nodes capture: a LoadBalancer's, without those of
    /// `ipMode: Proxy` (the load balancer delivers to the nodes itself, KEP-1860).
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortModel<'a>>,
    pub external_traffic: ExternalTraffic,
    /// `internalTrafficPolicy: Local`.
    pub internal_traffic_local: bool,
    /// Whether the API server hands out nodePorts: type NodePort, or LoadBalancer without
    /// `allocateLoadBalancerNodePorts: false`.
    pub allocates_node_ports: bool,
    /// Present for a LoadBalancer with Local external traffic.
    pub health_check: Option<HealthCheck>,
    /// Seconds of ClientIP affinity; `None` without `sessionAffinity: ClientIP`.
    pub affinity_timeout: Option<u32>,
    pub topology: Option<TopologyRequest>,
    /// `spec.loadBalancerSourceRanges`: `None` when unrestricted (the field is empty), else the
    /// usable ranges, trimmed of the blanks validation lets through. A list whose every entry
    /// is unusable is `Some` and empty: it restricts to nothing rather than opening up.
    pub source_ranges: Option<Vec<Cidr>>,
    /// In the order the API server's validation would report them.
    pub issues: Vec<ServiceIssue>,
}

pub(crate) fn parse_ip(text: &str) -> Option<IpAddr> {
    text.trim().parse().ok()
}

impl<'a> ServiceModel<'a> {
    pub fn read(fields: impl Into<ServiceFields<'a>>) -> Self {
        let fields = fields.into();
        let type_ = ServiceType::parse(fields.type_);
        let mut model = ServiceModel {
            namespace: fields.namespace(),
            name: fields.name.unwrap_or_default(),
            created: fields.creation_timestamp,
            labels: fields.labels,
            type_,
            headless: false,
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: Vec::with_capacity(fields.ports.len()),
            external_traffic: ExternalTraffic::Cluster,
            internal_traffic_local: fields.internal_traffic_policy == Some("Local"),
            allocates_node_ports: match type_ {
                ServiceType::NodePort => true,
                ServiceType::LoadBalancer => fields.allocate_load_balancer_node_ports.unwrap_or(true),
                _ => false,
            },
            health_check: None,
            affinity_timeout: None,
            topology: None,
            source_ranges: None,
            issues: Vec::new(),
        };
        if model.name.is_empty() {
            model.issue(IssueKind::Invalid, "metadata.name", "a Service needs a name");
        }
        if let ServiceType::Unknown(other) = type_ {
            model.issue(
                IssueKind::Invalid,
                "spec.type",
                format!(
                    "{other:?} is not a Service type: must be ClusterIP, NodePort, LoadBalancer or ExternalName"
                ),
            );
        }
        model.read_ports(fields.ports);
        model.read_traffic_and_health_check(&fields);
        model.read_addresses(&fields);
        model.read_affinity(&fields);
        model.read_topology(&fields);
        model.read_source_ranges(&fields);
        model
    }

    /// `Service/namespace/name`, for problems.
    pub fn object(&self) -> String {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            self.name
        };
        object_ref("Service", Some(self.namespace), name)
    }

    /// The proxy this Service is handed to (`service.kubernetes.io/service-proxy-name`).
    pub(crate) fn proxy_name(&self) -> Option<&'a str> {
        self.labels?.get(SERVICE_PROXY_NAME_LABEL).map(String::as_str)
    }

    /// Every nodePort the Service holds, with the field that holds it.
    pub(crate) fn held_node_ports(&self) -> impl Iterator<Item = (u16, String)> + '_ {
        let ports = self.ports.iter().filter_map(|p| {
            p.node_port
                .map(|np| (np, format!("spec.ports[{}].nodePort", p.index)))
        });
        let health = self
            .health_check
            .as_ref()
            .and_then(|h| h.node_port.map(|np| (np, h.field.path())));
        ports.chain(health)
    }

    /// An issue as a problem of this Service, its message ending in `consequence` if given.
    pub fn problem(&self, issue: &ServiceIssue, consequence: Option<&str>) -> Problem {
        let message = match consequence {
            Some(consequence) => format!("{}; {consequence}", issue.message),
            None => issue.message.clone(),
        };
        Problem::new(self.object(), issue.field.as_str(), message)
    }

    fn issue(&mut self, kind: IssueKind, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ServiceIssue {
            field: field.into(),
            message: message.into(),
            kind,
        });
    }

    /// `spec.ports`: each usable entry, and what validation would say about the list.
    fn read_ports(&mut self, spec_ports: &'a [ServicePort]) {
        for (index, sp) in spec_ports.iter().enumerate() {
            let field = |leaf: &str| format!("spec.ports[{index}]{leaf}");
            let port = port_from_i32(sp.port).map_err(|e| self.issue(IssueKind::Port, field(".port"), e));
            let protocol = Protocol::from_k8s(sp.protocol.as_deref())
                .map_err(|e| self.issue(IssueKind::Port, field(".protocol"), e));
            let node_port = match sp.node_port.unwrap_or(0) {
                0 => None,
                _ if !self.type_.has_node_ports() => {
                    let message = format!("may not be set when type is {:?}", self.type_.as_str());
                    self.issue(IssueKind::Invalid, field(".nodePort"), message);
                    None
                }
                value => port_from_i32(value)
                    .map_err(|e| self.issue(IssueKind::NodePort, field(".nodePort"), e))
                    .ok(),
            };
            let name = sp.name.as_deref().unwrap_or_default();
            if spec_ports.len() > 1 && name.is_empty() {
                let message = "required when a Service has more than one port";
                self.issue(IssueKind::Invalid, field(".name"), message);
            } else if let Some(first) = self.ports.iter().find(|p| !name.is_empty() && p.name == name) {
                let message = format!("{name:?} is already the name of spec.ports[{}]", first.index);
                self.issue(IssueKind::Invalid, field(".name"), message);
            }
            let (Ok(port), Ok(protocol)) = (port, protocol) else {
                continue;
            };
            if let Some(first) = self
                .ports
                .iter()
                .find(|p| p.port == port && p.protocol == protocol)
            {
                let message = format!("{port}/{protocol} is already spec.ports[{}]", first.index);
                self.issue(IssueKind::Invalid, field(""), message);
            }
            if let Some(np) = node_port
                && let Some(first) = self
                    .ports
                    .iter()
                    .find(|p| p.node_port == Some(np) && p.protocol == protocol)
            {
                let message = format!(
                    "{np}/{protocol} is already the nodePort of spec.ports[{}]",
                    first.index
                );
                self.issue(IssueKind::Invalid, field(".nodePort"), message);
            }
            self.ports.push(ServicePortModel {
                index,
                name,
                port,
                protocol,
                node_port,
            });
        }
    }

    /// `externalTrafficPolicy` (or the `OnlyLocal` annotation) and, for a Local LoadBalancer,
    /// the healthCheckNodePort (or its annotation).
    fn read_traffic_and_health_check(&mut self, fields: &ServiceFields<'_>) {
        let local_in_spec = fields.external_traffic_policy == Some("Local");
        self.external_traffic = if local_in_spec {
            ExternalTraffic::Local
        } else if fields.annotation(EXTERNAL_TRAFFIC_ANNOTATION) == Some(EXTERNAL_TRAFFIC_ONLY_LOCAL) {
            ExternalTraffic::LocalByAnnotation
        } else {
            ExternalTraffic::Cluster
        };
        let needs_health_check = self.type_ == ServiceType::LoadBalancer && self.external_traffic.is_local();

        // 0 is "not set": the API server allocates one (and kube-proxy serves none before).
        let in_spec = fields.health_check_node_port.filter(|v| *v != 0);
        let source = if in_spec.is_some() {
            HealthCheckField::Spec
        } else {
            HealthCheckField::Annotation
        };
        let held = match in_spec {
            Some(value) => port_from_i32(value).map(Some),
            None => match fields
                .annotation(HEALTH_CHECK_NODE_PORT_ANNOTATION)
                .filter(|v| !v.trim().is_empty())
            {
                Some(text) => text
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| format!("{text:?} is not a port"))
                    .and_then(port_from_i32)
                    .map(Some),
                None => Ok(None),
            },
        };
        let mut node_port = held
            .map_err(|e| self.issue(IssueKind::HealthCheckNodePort, source.path(), e))
            .ok()
            .flatten();
        if let Some(port) = node_port {
            if !needs_health_check {
                let message = "may only be set when type is LoadBalancer and externalTrafficPolicy is Local";
                self.issue(IssueKind::Invalid, source.path(), message);
                node_port = None;
            } else if let Some(p) = self.ports.iter().find(|p| p.node_port == Some(port)) {
                let message = format!("{port} is already the nodePort of spec.ports[{}]", p.index);
                self.issue(IssueKind::HealthCheckNodePort, source.path(), message);
                node_port = None;
            }
        }
        self.health_check = needs_health_check.then_some(HealthCheck {
            node_port,
            field: if local_in_spec {
                HealthCheckField::Spec
            } else {
                HealthCheckField::Annotation
            },
        });
    }

    /// Cluster, external and load-balancer IPs.
    fn read_addresses(&mut self, fields: &ServiceFields<'a>) {
        // `spec.clusterIPs`, or `spec.clusterIP` without them.
        let listed = fields.cluster_ips.iter().map(String::as_str);
        let single = fields.cluster_ip.filter(|_| fields.cluster_ips.is_empty());
        let primary = fields
            .cluster_ip
            .or(fields.cluster_ips.first().map(String::as_str));
        // The primary cluster IP decides, as kube-proxy's ShouldSkipService reads it.
        self.headless = primary == Some("None");
        for (i, text) in listed.chain(single).enumerate() {
            match parse_ip(text) {
                Some(ip) => self.cluster_ips.push(ip),
                None if text.is_empty() || self.headless => {}
                None => self.issue(
                    IssueKind::ClusterIp,
                    format!("spec.clusterIPs[{i}]"),
                    format!("{text:?} is not an IP address"),
                ),
            }
        }
        for (i, text) in fields.external_ips.iter().enumerate() {
            match parse_ip(text) {
                Some(ip) => self.external_ips.push(ip),
                None => self.issue(
                    IssueKind::ExternalIp,
                    format!("spec.externalIPs[{i}]"),
                    format!("{text:?} is not an IP address"),
                ),
            }
        }
        if self.type_ != ServiceType::LoadBalancer {
            return;
        }
        for (i, ingress) in fields.load_balancer_ingress.iter().enumerate() {
            if ingress.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(text) = ingress.ip.as_deref() else {
                continue;
            };
            match parse_ip(text) {
                Some(ip) => self.load_balancer_ips.push(ip),
                None => self.issue(
                    IssueKind::LoadBalancerIp,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{text:?} is not an IP address"),
                ),
            }
        }
    }

    /// The topology annotations and `trafficDistribution`, as the EndpointSlice controller
    /// weighs them: an annotation saying `Auto` wins; other annotation values ask for nothing.
    fn read_topology(&mut self, fields: &ServiceFields<'_>) {
        // The deprecated annotation, when present, is the one read (even if empty).
        let annotation = fields
            .annotation(TOPOLOGY_AWARE_HINTS_ANNOTATION)
            .or_else(|| fields.annotation(TOPOLOGY_MODE_ANNOTATION));
        if matches!(annotation, Some("Auto" | "auto")) {
            self.topology = Some(TopologyRequest::Auto);
            return;
        }
        self.topology = match fields.traffic_distribution {
            None | Some("") => None,
            Some("PreferClose" | "PreferSameZone") => Some(TopologyRequest::PreferSameZone),
            Some("PreferSameNode") => Some(TopologyRequest::PreferSameNode),
            Some(other) => {
                let message = format!(
                    "{other:?} is not a traffic distribution: must be PreferClose, PreferSameZone or PreferSameNode"
                );
                self.issue(IssueKind::Invalid, "spec.trafficDistribution", message);
                None
            }
        };
    }

    /// `loadBalancerSourceRanges`: only a LoadBalancer may list them.
    fn read_source_ranges(&mut self, fields: &ServiceFields<'_>) {
        if fields.load_balancer_source_ranges.is_empty() {
            return;
        }
        if self.type_ != ServiceType::LoadBalancer {
            let message = format!(
                "may only be set when type is LoadBalancer, not {:?}",
                self.type_.as_str()
            );
            self.issue(IssueKind::Invalid, "spec.loadBalancerSourceRanges", message);
            return;
        }
        let mut ranges = Vec::with_capacity(fields.load_balancer_source_ranges.len());
        for (i, text) in fields.load_balancer_source_ranges.iter().enumerate() {
            match text.trim().parse::<Cidr>() {
                Ok(cidr) => ranges.push(cidr),
                Err(e) => self.issue(
                    IssueKind::SourceRange,
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    e,
                ),
            }
        }
        self.source_ranges = Some(ranges);
    }

    /// `sessionAffinity: ClientIP` and its timeout.
    fn read_affinity(&mut self, fields: &ServiceFields<'_>) {
        if fields.session_affinity != Some("ClientIP") {
            return;
        }
        self.affinity_timeout = Some(match fields.session_affinity_timeout_seconds {
            None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
            Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_SECONDS => t as u32,
            Some(t) => {
                self.issue(
                    IssueKind::AffinityTimeout,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                );
                DEFAULT_AFFINITY_TIMEOUT_SECONDS
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    use super::*;

    fn service(meta: Value, spec: Value) -> Service {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}))
            .expect("test Service has a valid shape")
    }

    /// Reads a Service that lives as long as the test (leaked: tests are short-lived).
    fn read(meta: Value, spec: Value) -> ServiceModel<'static> {
        ServiceModel::read(&*Box::leak(Box::new(service(meta, spec))))
    }

    fn fields(issues: &[ServiceIssue]) -> Vec<(&str, IssueKind)> {
        issues.iter().map(|i| (i.field.as_str(), i.kind)).collect()
    }

    #[test]
    fn reads_every_field_once_with_the_api_servers_defaults() {
        let svc = service(
            json!({"name": "lb", "namespace": "shop", "labels": {SERVICE_PROXY_NAME_LABEL: "portpolicy"}}),
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                "externalIPs": ["198.51.100.7"], "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "sessionAffinity": "ClientIP",
                "ports": [{"name": "https", "port": 443, "nodePort": 30443},
                          {"name": "dns", "port": 53, "protocol": "UDP"}]}),
        );
        let model = ServiceModel::read(&svc);
        assert_eq!((model.namespace, model.name), ("shop", "lb"));
        assert_eq!(model.object(), "Service/shop/lb");
        assert_eq!(model.type_, ServiceType::LoadBalancer);
        assert_eq!(model.proxy_name(), Some("portpolicy"));
        assert_eq!(
            model.cluster_ips,
            [
                "10.96.0.20".parse::<IpAddr>().unwrap(),
                "fd00::20".parse().unwrap()
            ]
        );
        assert_eq!(model.external_ips, ["198.51.100.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            model.ports,
            [
                ServicePortModel {
                    index: 0,
                    name: "https",
                    port: 443,
                    protocol: Protocol::Tcp,
                    node_port: Some(30443)
                },
                ServicePortModel {
                    index: 1,
                    name: "dns",
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None
                },
            ]
        );
        assert_eq!(model.external_traffic, ExternalTraffic::Local);
        assert!(model.internal_traffic_local && model.allocates_node_ports);
        assert_eq!(
            model.health_check,
            Some(HealthCheck {
                node_port: Some(32000),
                field: HealthCheckField::Spec
            })
        );
        assert_eq!(model.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS));
        assert_eq!(model.issues, []);
        assert_eq!(
            model.held_node_ports().collect::<Vec<_>>(),
            [
                (30443, "spec.ports[0].nodePort".to_string()),
                (32000, "spec.healthCheckNodePort".to_string())
            ]
        );
    }

    // The edge cases below are where the allocator's, the planner's and the operator's own
    // readings of a Service used to disagree; each is decided as the API server decides it.

    #[test]
    fn an_empty_namespace_is_default() {
        let model = read(json!({"name": "web", "namespace": ""}), json!({}));
        assert_eq!(model.namespace, "default");
        assert_eq!(model.object(), "Service/default/web");
    }

    #[test]
    fn an_empty_type_is_cluster_ip() {
        // SetDefaults_Service: `type: ""` is defaulted to ClusterIP, not refused.
        let model = read(
            json!({"name": "web"}),
            json!({"type": "", "ports": [{"port": 80}]}),
        );
        assert_eq!(model.type_, ServiceType::ClusterIP);
        assert_eq!(model.issues, []);
        let model = read(json!({"name": "web"}), json!({"type": "Fancy"}));
        assert_eq!(model.type_, ServiceType::Unknown("Fancy"));
        assert_eq!(fields(&model.issues), [("spec.type", IssueKind::Invalid)]);
    }

    #[test]
    fn a_zero_health_check_node_port_is_not_set() {
        // 0 asks the API server to allocate one; it is neither a port nor a problem.
        let model = read(
            json!({"name": "lb"}),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 0,
                "ports": [{"port": 80}]}),
        );
        assert_eq!(model.issues, []);
        assert_eq!(
            model.health_check,
            Some(HealthCheck {
                node_port: None,
                field: HealthCheckField::Spec
            })
        );
    }

    #[test]
    fn a_health_check_node_port_from_the_legacy_annotation_is_checked_where_it_is() {
        let model = read(
            json!({"name": "lb", "annotations": {EXTERNAL_TRAFFIC_ANNOTATION: EXTERNAL_TRAFFIC_ONLY_LOCAL,
                HEALTH_CHECK_NODE_PORT_ANNOTATION: "soon"}}),
            json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
        );
        assert_eq!(model.external_traffic, ExternalTraffic::LocalByAnnotation);
        assert_eq!(
            fields(&model.issues),
            [(
                "metadata.annotations[service.beta.kubernetes.io/healthcheck-nodeport]",
                IssueKind::HealthCheckNodePort
            )]
        );
        assert_eq!(model.issues[0].message, "\"soon\" is not a port");
        assert_eq!(
            model.health_check,
            Some(HealthCheck {
                node_port: None,
                field: HealthCheckField::Annotation
            })
        );
    }

    #[test]
    fn a_health_check_node_port_that_is_a_ports_node_port_is_dropped() {
        // The API server's allocator would refuse the second use of the port.
        let model = read(
            json!({"name": "lb"}),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30080,
                "ports": [{"port": 80, "nodePort": 30080}]}),
        );
        assert_eq!(
            fields(&model.issues),
            [("spec.healthCheckNodePort", IssueKind::HealthCheckNodePort)]
        );
        assert_eq!(model.health_check.unwrap().node_port, None);
        assert_eq!(model.held_node_ports().count(), 1);
    }

    #[test]
    fn a_service_without_a_name_is_invalid() {
        let model = read(json!({"namespace": "shop"}), json!({"ports": [{"port": 80}]}));
        assert_eq!(model.name, "");
        assert_eq!(model.object(), "Service/shop/<unnamed>");
        assert_eq!(fields(&model.issues), [("metadata.name", IssueKind::Invalid)]);
    }

    #[test]
    fn unusable_values_are_left_out_and_reported_where_they_are() {
        let model = read(
            json!({"name": "web"}),
            json!({"type": "ClusterIP", "clusterIPs": ["10.96.0.1", "bogus"], "externalIPs": ["nope"],
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                "ports": [{"name": "a", "port": 80, "protocol": "HTTP"}, {"name": "b", "port": 0},
                          {"name": "c", "port": 81, "nodePort": 30081}]}),
        );
        assert_eq!(
            fields(&model.issues),
            [
                ("spec.ports[0].protocol", IssueKind::Port),
                ("spec.ports[1].port", IssueKind::Port),
                ("spec.ports[2].nodePort", IssueKind::Invalid),
                ("spec.clusterIPs[1]", IssueKind::ClusterIp),
                ("spec.externalIPs[0]", IssueKind::ExternalIp),
                (
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    IssueKind::AffinityTimeout
                ),
            ]
        );
        assert_eq!(model.ports.len(), 1);
        assert_eq!((model.ports[0].name, model.ports[0].node_port), ("c", None));
        assert_eq!(model.cluster_ips, ["10.96.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(model.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS));
        assert_eq!(
            model
                .problem(&model.issues[3], IssueKind::ClusterIp.proxy_consequence())
                .message,
            "\"bogus\" is not an IP address; this cluster IP is not proxied"
        );
        assert_eq!(
            model
                .problem(&model.issues[5], IssueKind::AffinityTimeout.proxy_consequence())
                .message,
            format!("0 is not 1-86400; using the default {DEFAULT_AFFINITY_TIMEOUT_SECONDS}")
        );
    }

    #[test]
    fn topology_requests_are_read_as_the_endpoint_slice_controller_weighs_them() {
        let read_topology = |annotations: Value, distribution: Value| {
            let model = read(
                json!({"name": "web", "annotations": annotations}),
                json!({"trafficDistribution": distribution, "ports": [{"port": 80}]}),
            );
            let issues: Vec<(String, IssueKind)> =
                model.issues.iter().map(|i| (i.field.clone(), i.kind)).collect();
            (model.topology, issues)
        };
        use TopologyRequest::*;
        assert_eq!(read_topology(json!({}), Value::Null), (None, vec![]));
        assert_eq!(
            read_topology(json!({TOPOLOGY_MODE_ANNOTATION: "Auto"}), Value::Null),
            (Some(Auto), vec![])
        );
        assert_eq!(
            read_topology(json!({TOPOLOGY_MODE_ANNOTATION: "auto"}), json!("PreferSameNode")),
            (Some(Auto), vec![]),
            "an Auto annotation wins over trafficDistribution"
        );
        // The deprecated annotation is read first, even when it disables.
        assert_eq!(
            read_topology(
                json!({TOPOLOGY_AWARE_HINTS_ANNOTATION: "Disabled", TOPOLOGY_MODE_ANNOTATION: "Auto"}),
                Value::Null
            ),
            (None, vec![])
        );
        assert_eq!(
            read_topology(json!({TOPOLOGY_MODE_ANNOTATION: "Custom"}), json!("PreferClose")),
            (Some(PreferSameZone), vec![])
        );
        assert_eq!(
            read_topology(json!({}), json!("PreferSameZone")),
            (Some(PreferSameZone), vec![])
        );
        assert_eq!(
            read_topology(json!({}), json!("PreferSameNode")),
            (Some(PreferSameNode), vec![])
        );
        assert_eq!(
            read_topology(json!({}), json!("Nearby")),
            (
                None,
                vec![("spec.trafficDistribution".to_string(), IssueKind::Invalid)]
            )
        );
    }

    #[test]
    fn source_ranges_are_trimmed_parsed_and_kept_even_when_none_parse() {
        let lb = |ranges: Value| {
            read(
                json!({"name": "lb"}),
                json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ranges, "ports": [{"port": 80}]}),
            )
        };
        let model = lb(json!([" 10.0.0.0/8", "192.0.2.1/24 ", "fd00::/8"]));
        let ranges: Vec<String> = model
            .source_ranges
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"]);
        assert_eq!(model.issues, []);
        assert_eq!(lb(json!([])).source_ranges, None);
        let bad = lb(json!(["everywhere"]));
        assert_eq!(bad.source_ranges, Some(vec![]));
        assert_eq!(
            fields(&bad.issues),
            [("spec.loadBalancerSourceRanges[0]", IssueKind::SourceRange)]
        );
        let not_lb = read(
            json!({"name": "web"}),
            json!({"loadBalancerSourceRanges": ["10.0.0.0/8"], "ports": [{"port": 80}]}),
        );
        assert_eq!(not_lb.source_ranges, None);
        assert_eq!(
            fields(&not_lb.issues),
            [("spec.loadBalancerSourceRanges", IssueKind::Invalid)]
        );
    }

    #[test]
    fn headless_is_read_from_the_primary_cluster_ip() {
        let headless = read(json!({"name": "db"}), json!({"clusterIP": "None"}));
        assert!(headless.headless && headless.cluster_ips.is_empty() && headless.issues.is_empty());
        let listed = read(json!({"name": "db"}), json!({"clusterIPs": ["None"]}));
        assert!(listed.headless && listed.issues.is_empty());
    }
}
