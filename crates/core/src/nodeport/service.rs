//! What the allocator needs from a Service, read once and checked the way the API server's
//! validation would (pkg/apis/core/validation ValidateService), so a bad object is reported
//! instead of being allocated for.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::governance::Labels;
use crate::ports::{Protocol, port_from_i32};
use crate::problem::{Problem, object_ref};
use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, EXTERNAL_TRAFFIC_ONLY_LOCAL, HEALTH_CHECK_NODE_PORT_ANNOTATION,
};

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

/// One valid entry of `spec.ports`.
#[derive(Clone, Debug)]
pub(crate) struct PortView<'a> {
    pub index: usize,
    pub name: &'a str,
    pub port: u16,
    pub protocol: Protocol,
    /// The nodePort the Service holds for this port, if it may hold one.
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub(crate) struct HealthCheckView {
    pub node_port: Option<u16>,
    pub field: HealthCheckField,
}

/// A Service as the allocator sees it.
#[derive(Clone, Debug)]
pub(crate) struct ServiceView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `Service/namespace/name`.
    pub object: String,
    pub created: Option<&'a Time>,
    pub labels: Option<&'a Labels>,
    /// Type NodePort, or LoadBalancer without `allocateLoadBalancerNodePorts: false`.
    pub allocates_node_ports: bool,
    pub ports: Vec<PortView<'a>>,
    /// Present for a LoadBalancer with Local external traffic: it needs a health-check port.
    pub health_check: Option<HealthCheckView>,
    /// InvalidService problems. A Service with any is left untouched (its valid nodePorts
    /// are still held, so nothing else is given them).
    pub problems: Vec<Problem>,
}

impl<'a> ServiceView<'a> {
    pub fn read(service: &'a Service) -> Self {
        let meta = &service.metadata;
        let namespace = meta
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default");
        let name = meta.name.as_deref().unwrap_or("");
        let object = object_ref(
            "Service",
            Some(namespace),
            if name.is_empty() { "<unnamed>" } else { name },
        );
        let mut problems = Vec::new();
        let mut problem =
            |field: String, message: String| problems.push(Problem::new(&object, field, message));
        if name.is_empty() {
            problem("metadata.name".into(), "a Service needs a name".into());
        }

        let spec = service.spec.as_ref();
        let service_type = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
        let may_hold_node_ports = match service_type {
            "NodePort" | "LoadBalancer" => true,
            "ClusterIP" | "ExternalName" => false,
            other => {
                problem(
                    "spec.type".into(),
                    format!(
                        "{other:?} is not a Service type: must be ClusterIP, NodePort, LoadBalancer or ExternalName"
                    ),
                );
                false
            }
        };
        let allocates_node_ports = match service_type {
            "NodePort" => true,
            "LoadBalancer" => spec
                .and_then(|s| s.allocate_load_balancer_node_ports)
                .unwrap_or(true),
            _ => false,
        };

        let spec_ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let mut ports: Vec<PortView<'a>> = Vec::with_capacity(spec_ports.len());
        for (index, sp) in spec_ports.iter().enumerate() {
            let field = format!("spec.ports[{index}]");
            let port = port_from_i32(sp.port).map_err(|e| problem(format!("{field}.port"), e));
            let protocol = Protocol::from_k8s(sp.protocol.as_deref())
                .map_err(|e| problem(format!("{field}.protocol"), e));
            let node_port = match sp.node_port.unwrap_or(0) {
                0 => Ok(None),
                _ if !may_hold_node_ports => {
                    problem(
                        format!("{field}.nodePort"),
                        format!("may not be set when type is {service_type:?}"),
                    );
                    Ok(None)
                }
                value => port_from_i32(value)
                    .map(Some)
                    .map_err(|e| problem(format!("{field}.nodePort"), e)),
            };
            let name = sp.name.as_deref().unwrap_or("");
            if spec_ports.len() > 1 && name.is_empty() {
                problem(
                    format!("{field}.name"),
                    "required when a Service has more than one port".into(),
                );
            } else if let Some(first) = ports.iter().find(|p| !name.is_empty() && p.name == name) {
                problem(
                    format!("{field}.name"),
                    format!("{name:?} is already the name of spec.ports[{}]", first.index),
                );
            }
            let (Ok(port), Ok(protocol), Ok(node_port)) = (port, protocol, node_port) else {
                continue;
            };
            if let Some(first) = ports.iter().find(|p| p.port == port && p.protocol == protocol) {
                problem(
                    field.clone(),
                    format!("{port}/{protocol} is already spec.ports[{}]", first.index),
                );
            }
            if let Some(np) = node_port
                && let Some(first) = ports
                    .iter()
                    .find(|p| p.node_port == Some(np) && p.protocol == protocol)
            {
                problem(
                    format!("{field}.nodePort"),
                    format!(
                        "{np}/{protocol} is already the nodePort of spec.ports[{}]",
                        first.index
                    ),
                );
            }
            ports.push(PortView {
                index,
                name,
                port,
                protocol,
                node_port,
            });
        }

        let annotations = meta.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let local_in_spec = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
        let local_by_annotation =
            annotation(EXTERNAL_TRAFFIC_ANNOTATION) == Some(EXTERNAL_TRAFFIC_ONLY_LOCAL);
        let needs_health_check = service_type == "LoadBalancer" && (local_in_spec || local_by_annotation);
        let field = if local_in_spec {
            HealthCheckField::Spec
        } else {
            HealthCheckField::Annotation
        };

        let in_spec = spec.and_then(|s| s.health_check_node_port).filter(|v| *v != 0);
        let in_annotation = annotation(HEALTH_CHECK_NODE_PORT_ANNOTATION).filter(|v| !v.trim().is_empty());
        let mut health_check_port = None;
        if let Some(value) = in_spec {
            match port_from_i32(value) {
                Ok(port) => health_check_port = Some(port),
                Err(e) => problem(HealthCheckField::Spec.path(), e),
            }
        } else if let Some(text) = in_annotation {
            match text
                .trim()
                .parse::<i32>()
                .map_err(|_| format!("{text:?} is not a port"))
                .and_then(port_from_i32)
            {
                Ok(port) => health_check_port = Some(port),
                Err(e) => problem(HealthCheckField::Annotation.path(), e),
            }
        }
        let source = if in_spec.is_some() {
            HealthCheckField::Spec
        } else {
            HealthCheckField::Annotation
        };
        if let Some(port) = health_check_port {
            if !needs_health_check {
                problem(
                    source.path(),
                    "may only be set when type is LoadBalancer and externalTrafficPolicy is Local".into(),
                );
                health_check_port = None;
            } else if let Some(p) = ports.iter().find(|p| p.node_port == Some(port)) {
                problem(
                    source.path(),
                    format!("{port} is already the nodePort of spec.ports[{}]", p.index),
                );
                health_check_port = None;
            }
        }
        let health_check = needs_health_check.then_some(HealthCheckView {
            node_port: health_check_port,
            field,
        });

        ServiceView {
            namespace,
            name,
            object,
            created: meta.creation_timestamp.as_ref(),
            labels: meta.labels.as_ref(),
            allocates_node_ports,
            ports,
            health_check,
            problems,
        }
    }

    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every nodePort the Service holds, with the field that holds it.
    pub fn held_ports(&self) -> impl Iterator<Item = (u16, String)> + '_ {
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
}
