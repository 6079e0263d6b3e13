//! What portpolicy writes on a Service: one type for the allocator's changes (which `plan`
//! writes into its snapshot to show the cluster as the operator will leave it) and for the
//! operator's server-side applies.

use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};

use crate::ports::Protocol;
use crate::service::HealthCheckField;
use crate::well_known::{HEALTH_CHECK_NODE_PORT_ANNOTATION, SERVICE_PROXY_NAME, SERVICE_PROXY_NAME_LABEL};

/// The fields portpolicy sets on one Service, with their values.
///
/// An apply names every field the operator owns, so the operator's intents list every managed
/// port (leaving one out hands it back); the allocator's changes list only what changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceIntent {
    pub namespace: String,
    pub name: String,
    /// The policy that wants it; `None` for an empty intent that lets go of a Service.
    pub policy: Option<String>,
    pub ports: Vec<ServicePortNodePort>,
    pub health_check_node_port: Option<HealthCheckNodePort>,
    /// Set `externalTrafficPolicy: Local`.
    pub external_traffic_local: bool,
    /// Hand the Service to portpolicy's agent (`service.kubernetes.io/service-proxy-name`).
    pub proxy_label: bool,
}

/// The nodePort of one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortNodePort {
    /// Index in `spec.ports`.
    pub index: usize,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheckNodePort {
    pub node_port: u16,
    /// Where to write it: the spec field, or the legacy annotation for OnlyLocal Services.
    pub field: HealthCheckField,
}

impl ServiceIntent {
    /// An intent that sets nothing.
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceIntent {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.health_check_node_port.is_none()
            && !self.external_traffic_local
            && !self.proxy_label
    }

    /// Writes the intent into a Service, as the operator's apply will. Ports the Service no
    /// longer has are left alone.
    pub fn apply_to(&self, service: &mut Service) {
        if self.proxy_label {
            let labels = service.metadata.labels.get_or_insert_default();
            labels.insert(SERVICE_PROXY_NAME_LABEL.into(), SERVICE_PROXY_NAME.into());
        }
        if let Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Annotation,
        }) = self.health_check_node_port
        {
            let annotations = service.metadata.annotations.get_or_insert_default();
            annotations.insert(HEALTH_CHECK_NODE_PORT_ANNOTATION.into(), node_port.to_string());
        }
        let Some(spec) = service.spec.as_mut() else { return };
        for port in &self.ports {
            if let Some(target) = spec.ports.as_mut().and_then(|ports| ports.get_mut(port.index)) {
                target.node_port = Some(i32::from(port.node_port));
            }
        }
        if let Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Spec,
        }) = self.health_check_node_port
        {
            spec.health_check_node_port = Some(i32::from(node_port));
        }
        if self.external_traffic_local {
            spec.external_traffic_policy = Some("Local".into());
        }
    }

    /// The server-side-apply body: only the fields the intent sets, each port keyed by `port`
    /// and `protocol` as the API server keys the `spec.ports` list. An empty intent gives an
    /// apply that owns nothing, which is how the operator lets go of a Service.
    pub fn apply_body(&self) -> Value {
        let mut metadata = json!({"name": self.name, "namespace": self.namespace});
        if self.proxy_label {
            metadata["labels"] = json!({SERVICE_PROXY_NAME_LABEL: SERVICE_PROXY_NAME});
        }
        if let Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Annotation,
        }) = self.health_check_node_port
        {
            metadata["annotations"] = json!({HEALTH_CHECK_NODE_PORT_ANNOTATION: node_port.to_string()});
        }
        let mut body = json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata});
        let mut spec = serde_json::Map::new();
        if !self.ports.is_empty() {
            let ports: Vec<Value> = self
                .ports
                .iter()
                .map(|p| json!({"port": p.port, "protocol": p.protocol.as_str(), "nodePort": p.node_port}))
                .collect();
            spec.insert("ports".into(), Value::Array(ports));
        }
        if let Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Spec,
        }) = self.health_check_node_port
        {
            spec.insert("healthCheckNodePort".into(), json!(node_port));
        }
        if self.external_traffic_local {
            spec.insert("externalTrafficPolicy".into(), json!("Local"));
        }
        if !spec.is_empty() {
            body["spec"] = Value::Object(spec);
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn port(index: usize, port: u16, protocol: Protocol, node_port: u16) -> ServicePortNodePort {
        ServicePortNodePort {
            index,
            name: String::new(),
            port,
            protocol,
            node_port,
        }
    }

    #[test]
    fn apply_body_names_only_owned_fields() {
        let intent = ServiceIntent {
            ports: vec![
                port(0, 80, Protocol::Tcp, 31000),
                port(1, 53, Protocol::Udp, 31001),
            ],
            health_check_node_port: Some(HealthCheckNodePort {
                node_port: 31002,
                field: HealthCheckField::Spec,
            }),
            external_traffic_local: true,
            proxy_label: true,
            ..ServiceIntent::new("a", "web")
        };
        assert_eq!(
            intent.apply_body(),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "a",
                    "labels": {"service.kubernetes.io/service-proxy-name": "portpolicy"}},
                "spec": {"ports": [{"port": 80, "protocol": "TCP", "nodePort": 31000},
                                   {"port": 53, "protocol": "UDP", "nodePort": 31001}],
                         "healthCheckNodePort": 31002, "externalTrafficPolicy": "Local"}})
        );
        assert_eq!(
            ServiceIntent::new("a", "web").apply_body(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"}})
        );
    }

    #[test]
    fn apply_to_writes_what_the_apply_would() {
        let mut service: Service =
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "a"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}}))
            .unwrap();
        let intent = ServiceIntent {
            ports: vec![port(1, 53, Protocol::Udp, 31001)],
            health_check_node_port: Some(HealthCheckNodePort {
                node_port: 31002,
                field: HealthCheckField::Annotation,
            }),
            external_traffic_local: true,
            proxy_label: true,
            ..ServiceIntent::new("a", "web")
        };
        intent.apply_to(&mut service);
        let spec = service.spec.as_ref().unwrap();
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!((ports[0].node_port, ports[1].node_port), (None, Some(31001)));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, None);
        assert_eq!(
            service.metadata.annotations.unwrap()[HEALTH_CHECK_NODE_PORT_ANNOTATION],
            "31002"
        );
        assert_eq!(
            service.metadata.labels.unwrap()[SERVICE_PROXY_NAME_LABEL],
            SERVICE_PROXY_NAME
        );
    }
}
