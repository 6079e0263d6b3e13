//! How the operator writes [`ServiceIntent`]s on Services, and how it tells whether a Service
//! already says what an intent asks.
//!
//! Every apply uses the field manager [`FIELD_MANAGER`] and names only the fields the operator
//! owns: the nodePorts of the ports it manages (with `port` and `protocol`, the keys of the
//! `spec.ports` list-map), the healthCheckNodePort, `externalTrafficPolicy` when the policy asks
//! for it, and the proxy-name label. Leaving a field out of a later apply hands it back; for
//! nodePorts the API server then keeps the value the Service has (it copies allocated nodePorts
//! forward on update), so releasing ownership never releases a port.

use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

use portpolicy_core::crd::ExternalTrafficRule;
use portpolicy_core::intent::{HealthCheckNodePort, ServiceIntent};
use portpolicy_core::ports::Protocol;
use portpolicy_core::service::{HealthCheckField, ServiceModel, ServiceType};
use portpolicy_core::well_known::{
    HEALTH_CHECK_NODE_PORT_ANNOTATION, LAST_APPLIED_ANNOTATION, SERVICE_PROXY_NAME, SERVICE_PROXY_NAME_LABEL,
};

pub(super) const FIELD_MANAGER: &str = "portpolicy-operator";

/// Whether the live Service already carries everything `intent` asks for, and nothing the
/// operator owns but no longer wants.
pub(super) fn satisfied_by(intent: &ServiceIntent, service: &Service) -> bool {
    let spec = service.spec.as_ref();
    let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let node_ports_ok = intent.ports.iter().all(|want| {
        ports.iter().any(|p| {
            p.port == i32::from(want.port)
                && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(want.protocol)
                && p.node_port == Some(i32::from(want.node_port))
        })
    });
    let health_ok = match intent.health_check_node_port {
        None => true,
        Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Spec,
        }) => spec.and_then(|s| s.health_check_node_port) == Some(i32::from(node_port)),
        Some(HealthCheckNodePort {
            node_port,
            field: HealthCheckField::Annotation,
        }) => annotation(service, HEALTH_CHECK_NODE_PORT_ANNOTATION) == Some(node_port.to_string().as_str()),
    };
    let traffic_ok = !intent.external_traffic_local
        || spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    let label_ok =
        !intent.proxy_label || label(service, SERVICE_PROXY_NAME_LABEL) == Some(SERVICE_PROXY_NAME);
    // A field the operator still owns but no longer wants is given back by the next apply.
    let owned = owned_fields(service);
    let owned_label = owned
        .and_then(|f| f.pointer("/f:metadata/f:labels"))
        .and_then(|labels| labels.get(format!("f:{SERVICE_PROXY_NAME_LABEL}")))
        .is_some();
    let owned_traffic = owned
        .and_then(|f| f.pointer("/f:spec/f:externalTrafficPolicy"))
        .is_some();
    let nothing_stale =
        (intent.proxy_label || !owned_label) && (intent.external_traffic_local || !owned_traffic);
    node_ports_ok && health_ok && traffic_ok && label_ok && nothing_stale
}

fn label<'a>(service: &'a Service, key: &str) -> Option<&'a str> {
    service.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'a>(service: &'a Service, key: &str) -> Option<&'a str> {
    service
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The fields the operator's apply owns on this Service (its managedFields entry).
fn owned_fields(service: &Service) -> Option<&Value> {
    service
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some(FIELD_MANAGER) && m.operation.as_deref() == Some("Apply"))
        .and_then(|m| m.fields_v1.as_ref())
        .map(|f| &f.0)
}

/// Whether some field manager owns the nodePort of the Service port (`port`, `protocol`): `None`
/// when the Service carries no managedFields at all (so nothing can be told).
///
/// Nobody owns a nodePort the API server picked at random: ownership is recorded for the fields
/// a request sets, and allocation happens later, in the registry. So an owned nodePort is one a
/// user (or a tool, or this operator) asked for; an unowned one is the API server's random pick.
pub(super) fn node_port_owned(service: &Service, port: u16, protocol: Protocol) -> Option<bool> {
    let entries = service
        .metadata
        .managed_fields
        .as_ref()
        .filter(|m| !m.is_empty())?;
    Some(entries.iter().any(|m| {
        let Some(ports) = m.fields_v1.as_ref().and_then(|f| f.0.pointer("/f:spec/f:ports")) else {
            return false;
        };
        ports.as_object().into_iter().flatten().any(|(key, fields)| {
            let Some(k) = key
                .strip_prefix("k:")
                .and_then(|k| serde_json::from_str::<Value>(k).ok())
            else {
                return false;
            };
            let key_protocol = Protocol::from_k8s(k.get("protocol").and_then(Value::as_str)).ok();
            k.get("port").and_then(Value::as_i64) == Some(i64::from(port))
                && key_protocol == Some(protocol)
                && fields.get("f:nodePort").is_some()
        })
    }))
}

/// Like [`node_port_owned`], for `spec.healthCheckNodePort`.
pub(super) fn health_check_node_port_owned(service: &Service) -> Option<bool> {
    let entries = service
        .metadata
        .managed_fields
        .as_ref()
        .filter(|m| !m.is_empty())?;
    Some(entries.iter().any(|m| {
        m.fields_v1
            .as_ref()
            .and_then(|f| f.0.pointer("/f:spec/f:healthCheckNodePort"))
            .is_some()
    }))
}

/// Whether the operator holds any field of this Service (an entry of ours in managedFields).
pub(super) fn managed_by_operator(service: &Service) -> bool {
    service
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
}

/// Whether the Service's owner chose `externalTrafficPolicy` themselves.
///
/// The API server defaults the field to `Cluster`, and a create through Update (`kubectl
/// create`, client-side apply) records the defaulted value as the creator's, so ownership alone
/// cannot tell "chose Cluster" from "left it out". The rule used: a value declared by another
/// manager through server-side apply is explicit, and so is one in kubectl's last-applied
/// configuration; `Local` is always explicit (nothing defaults to it). Anything else counts as
/// the default, which DefaultLocal replaces.
pub(super) fn external_traffic_policy_set_by_user(service: &Service) -> bool {
    let Some(value) = service
        .spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
    else {
        return false;
    };
    if value == "Local" {
        return true;
    }
    let applied_by_other = service.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() != Some(FIELD_MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:externalTrafficPolicy"))
                .is_some()
    });
    let last_applied = annotation(service, LAST_APPLIED_ANNOTATION)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .is_some_and(|v| v.pointer("/spec/externalTrafficPolicy").is_some());
    applied_by_other || last_applied
}

/// Whether `rule` makes the operator set `externalTrafficPolicy: Local` on this Service.
pub(super) fn wants_local_traffic(rule: ExternalTrafficRule, service: &Service) -> bool {
    let service_type = ServiceType::parse(service.spec.as_ref().and_then(|s| s.type_.as_deref()));
    if !service_type.has_node_ports() {
        return false;
    }
    match rule {
        ExternalTrafficRule::Any => false,
        ExternalTrafficRule::RequireLocal => true,
        ExternalTrafficRule::DefaultLocal => !external_traffic_policy_set_by_user(service),
    }
}

/// Service identity, `namespace/name`.
pub(super) type ServiceKey = (String, String);

pub(super) fn key_of(service: &ServiceModel<'_>) -> ServiceKey {
    (service.namespace.to_string(), service.name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use portpolicy_core::intent::ServicePortNodePort;
    use serde_json::json;

    fn service(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn satisfied_compares_with_live_values() {
        let live = service(json!({"metadata": {"name": "web", "namespace": "a"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 31000}]}}));
        let mut intent = ServiceIntent {
            ports: vec![ServicePortNodePort {
                index: 0,
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: 31000,
            }],
            ..ServiceIntent::new("a", "web")
        };
        assert!(satisfied_by(&intent, &live));
        intent.ports[0].node_port = 31001;
        assert!(!satisfied_by(&intent, &live));
        let intent = ServiceIntent {
            proxy_label: true,
            ..ServiceIntent::new("a", "web")
        };
        assert!(!satisfied_by(&intent, &live));

        let labelled = service(json!({"metadata": {"name": "web", "namespace": "a",
            "labels": {"service.kubernetes.io/service-proxy-name": "portpolicy"},
            "managedFields": [{"manager": "portpolicy-operator", "operation": "Apply", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {
                    "f:service.kubernetes.io/service-proxy-name": {}}}}}]},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 31000}]}}));
        assert!(satisfied_by(&intent, &labelled));
        let unlabelled = ServiceIntent::new("a", "web");
        assert!(
            !satisfied_by(&unlabelled, &labelled),
            "a label the operator owns but no longer wants"
        );
    }

    #[test]
    fn random_node_ports_are_unowned() {
        let created = service(json!({"metadata": {"name": "web", "namespace": "a",
            "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {
                    ".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {"f:port": {}, "f:protocol": {}},
                    "k:{\"port\":53,\"protocol\":\"UDP\"}": {"f:port": {}, "f:nodePort": {}}}}}}]},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30555}]}}));
        assert_eq!(node_port_owned(&created, 80, Protocol::Tcp), Some(false));
        assert_eq!(node_port_owned(&created, 53, Protocol::Udp), Some(true));
        assert_eq!(node_port_owned(&created, 53, Protocol::Tcp), Some(false));
        let bare = service(json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}));
        assert_eq!(node_port_owned(&bare, 80, Protocol::Tcp), None);
        assert_eq!(health_check_node_port_owned(&bare), None);
    }

    #[test]
    fn default_local_respects_explicit_choices() {
        let defaulted = service(json!({"metadata": {"name": "web", "namespace": "a",
            "managedFields": [{"manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:externalTrafficPolicy": {}}}}]},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}}));
        assert!(wants_local_traffic(ExternalTrafficRule::DefaultLocal, &defaulted));

        let applied = service(json!({"metadata": {"name": "web", "namespace": "a",
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:externalTrafficPolicy": {}}}}]},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}}));
        assert!(!wants_local_traffic(ExternalTrafficRule::DefaultLocal, &applied));
        assert!(wants_local_traffic(ExternalTrafficRule::RequireLocal, &applied));

        let last_applied = service(
            json!({"metadata": {"name": "web", "namespace": "a", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration":
                "{\"spec\":{\"externalTrafficPolicy\":\"Cluster\"}}"}},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}}),
        );
        assert!(!wants_local_traffic(
            ExternalTrafficRule::DefaultLocal,
            &last_applied
        ));

        let cluster_ip = service(json!({"metadata": {"name": "web", "namespace": "a"},
            "spec": {"ports": [{"port": 80}]}}));
        assert!(!wants_local_traffic(
            ExternalTrafficRule::RequireLocal,
            &cluster_ip
        ));
    }
}
