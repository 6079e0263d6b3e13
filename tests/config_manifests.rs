//! `config/` parses as the Kubernetes objects it claims to be, and agrees with what the
//! binary serves: the webhook's path, port, Service, configuration name and RBAC.

use std::collections::BTreeMap;

use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portpolicy::operator::controller::OperatorArgs;
use portpolicy::operator::leader_pod::{LEADER_LABEL, LEADER_VALUE};
use portpolicy::operator::webhook::MUTATE_SERVICE_PATH;
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    operator: OperatorArgs,
}

/// Every document of every file the kustomization lists, by kind and name.
fn manifests() -> BTreeMap<(String, String), Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let kustomization: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for file in kustomization["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap();
        for doc in serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text).unwrap() {
            let key = (
                doc["kind"].as_str().unwrap().to_string(),
                doc["metadata"]["name"].as_str().unwrap().to_string(),
            );
            out.insert(key, doc);
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(
    manifests: &BTreeMap<(String, String), Value>,
    kind: &str,
    name: &str,
) -> T {
    let value = manifests
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("config/ has no {kind}/{name}"));
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{kind}/{name}: {e}"))
}

#[test]
fn the_webhook_manifests_agree_with_what_the_operator_serves() {
    let defaults = Cli::parse_from(["operator"]).operator;
    let manifests = manifests();
    let configuration: MutatingWebhookConfiguration = typed(
        &manifests,
        "MutatingWebhookConfiguration",
        &defaults.webhook_configuration,
    );
    let webhooks = configuration.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(webhook.side_effects, "NoneOnDryRun");
    assert_eq!(webhook.timeout_seconds, Some(2));
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    let selector = webhook.namespace_selector.as_ref().expect("a namespace selector");
    let excluded = &selector.match_expressions.as_ref().unwrap()[0];
    assert_eq!(excluded.operator, "NotIn");
    assert!(excluded.values.as_ref().unwrap().contains(&defaults.namespace));
    let rule = &webhook.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resources.as_deref(), Some(&["services".to_string()][..]));
    assert_eq!(
        rule.operations.as_deref(),
        Some(&["CREATE".to_string(), "UPDATE".to_string()][..])
    );
    let client = webhook
        .client_config
        .service
        .as_ref()
        .expect("called through a Service");
    assert_eq!(client.path.as_deref(), Some(MUTATE_SERVICE_PATH));
    assert_eq!(client.name, defaults.webhook_service);
    assert_eq!(client.namespace, defaults.namespace);

    // The Service's port reaches the container port the operator listens on.
    let service: Service = typed(&manifests, "Service", &defaults.webhook_service);
    let spec = service.spec.unwrap();
    let port = spec
        .ports
        .unwrap()
        .into_iter()
        .find(|p| Some(p.port) == client.port)
        .expect("the webhook's port on the Service");
    let deployment: Deployment = typed(&manifests, "Deployment", "portpolicy-operator");
    let pod = deployment.spec.unwrap().template;
    // The Service selects the operator's pods, and of them only the one whose replica leads:
    // the label the leader writes on its own Pod.
    let mut leader_labels = pod.metadata.unwrap().labels.unwrap_or_default();
    assert!(
        !leader_labels.contains_key(LEADER_LABEL),
        "no pod is created as the leader"
    );
    leader_labels.insert(LEADER_LABEL.to_string(), LEADER_VALUE.to_string());
    assert_eq!(
        spec.selector.as_ref(),
        Some(&leader_labels),
        "the webhook Service selects the leader's pod only"
    );
    let container = &pod.spec.unwrap().containers[0];
    let container_port = match port.target_port.unwrap() {
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(&name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
        IntOrString::Int(n) => n,
    };
    let address = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "PORTPOLICY_WEBHOOK_ADDRESS")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| defaults.webhook_address.to_string());
    assert_eq!(address, defaults.webhook_address.to_string());
    assert_eq!(container_port, i32::from(defaults.webhook_address.port()));

    // The leader may read and patch its configuration's caBundle, and nothing else's.
    let role: ClusterRole = typed(&manifests, "ClusterRole", "portpolicy-operator");
    let cluster_rules = role.rules.unwrap_or_default();
    let rule = cluster_rules
        .iter()
        .find(|r| r.resources.as_deref() == Some(&["mutatingwebhookconfigurations".to_string()][..]))
        .expect("RBAC for the caBundle");
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&[defaults.webhook_configuration.clone()][..])
    );
    assert!(rule.verbs.contains(&"get".to_string()) && rule.verbs.contains(&"patch".to_string()));
    let clusterwide_pods = cluster_rules.iter().find(|r| {
        r.resources.iter().flatten().any(|r| r == "pods") && r.verbs.contains(&"patch".to_string())
    });
    assert!(
        clusterwide_pods.is_none(),
        "patching pods is not granted cluster-wide"
    );

    // The leader may patch pods (its label) in its own namespace, and it knows its pod's name.
    let role: Role = typed(&manifests, "Role", "portpolicy-operator");
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(defaults.namespace.as_str())
    );
    let rule = role
        .rules
        .unwrap()
        .into_iter()
        .find(|r| r.resources.as_deref() == Some(&["pods".to_string()][..]))
        .expect("RBAC for the leader label");
    assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
    assert!(rule.verbs.contains(&"patch".to_string()));
    let binding: RoleBinding = typed(&manifests, "RoleBinding", "portpolicy-operator");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.name, "portpolicy-operator");
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(env("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(env("POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
}
