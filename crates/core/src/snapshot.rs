//! A cluster snapshot: the objects `kubectl get -o yaml` prints, loaded without a cluster.
//!
//! `plan` and the agent's `--snapshot` mode read these; the operator builds the same view from
//! its watch caches. Loading never fails on one bad object: it is reported and skipped.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::PortPolicy;
use crate::problem::{Problem, object_ref};
use crate::well_known::NAMESPACE_NAME_LABEL;

/// Every object kind portpolicy reads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub policies: Vec<PortPolicy>,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub daemon_sets: Vec<DaemonSet>,
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
}

impl Snapshot {
    pub fn object_count(&self) -> usize {
        self.policies.len()
            + self.namespaces.len()
            + self.nodes.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.pods.len()
            + self.daemon_sets.len()
            + self.deployments.len()
            + self.stateful_sets.len()
    }

    /// Labels of every namespace that is listed or that some object lives in. A namespace the
    /// snapshot does not list still carries the label the API server always sets on it, so a
    /// `kubernetes.io/metadata.name` selector works on partial snapshots.
    pub fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for ns in &self.namespaces {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let mut l = ns.metadata.labels.clone().unwrap_or_default();
            l.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            labels.insert(name, l);
        }
        let referenced = self
            .services
            .iter()
            .map(|o| &o.metadata)
            .chain(self.pods.iter().map(|o| &o.metadata))
            .chain(self.endpoint_slices.iter().map(|o| &o.metadata))
            .chain(self.daemon_sets.iter().map(|o| &o.metadata))
            .chain(self.deployments.iter().map(|o| &o.metadata))
            .chain(self.stateful_sets.iter().map(|o| &o.metadata))
            .filter_map(|m| m.namespace.as_deref());
        // Hashed, not sorted: a large snapshot has few namespaces and very many objects.
        let mut seen: HashSet<&str> = HashSet::new();
        for ns in referenced {
            if seen.insert(ns) && !labels.contains_key(ns) {
                let automatic = BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]);
                labels.insert(ns.to_string(), automatic);
            }
        }
        labels
    }
}

/// What loading produced: the objects that parsed, and a problem for each that did not.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub problems: Vec<Problem>,
}

/// Parses one file's text: a single object, a `List`, or several YAML documents.
pub fn parse_into(source: &str, text: &str, loaded: &mut Loaded) {
    let documents: Vec<Value> = match serde_saphyr::from_str_multiple::<Value, Vec<Value>>(text) {
        Ok(docs) => docs,
        Err(e) => {
            loaded
                .problems
                .push(Problem::new(source, "", format!("not valid YAML: {e}")));
            return;
        }
    };
    for (index, doc) in documents.into_iter().enumerate() {
        let location = format!("{source}, document {}", index + 1);
        add_value(&location, doc, loaded);
    }
}

/// Parses one YAML text into a fresh snapshot.
pub fn parse_str(source: &str, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    parse_into(source, text, &mut loaded);
    loaded
}

fn add_value(location: &str, value: Value, loaded: &mut Loaded) {
    if value.is_null() {
        return;
    }
    let Some(obj) = value.as_object() else {
        loaded.problems.push(Problem::new(
            location,
            "",
            "not a Kubernetes object (expected a mapping with apiVersion and kind)",
        ));
        return;
    };
    let text = |key: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let api_version = text("apiVersion");
    let kind = text("kind");
    let meta = obj.get("metadata");
    let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
    let name = meta_text("name").unwrap_or("<unnamed>").to_string();
    let namespace = meta_text("namespace").map(str::to_string);
    let object = object_ref(
        if kind.is_empty() { "<no kind>" } else { &kind },
        namespace.as_deref(),
        &name,
    );

    if kind.ends_with("List") && obj.get("items").is_some_and(Value::is_array) {
        let Value::Object(mut obj) = value else {
            unreachable!()
        };
        if let Some(Value::Array(items)) = obj.remove("items") {
            for (i, item) in items.into_iter().enumerate() {
                add_value(&format!("{location}, items[{i}]"), item, loaded);
            }
        }
        return;
    }
    if api_version.is_empty() || kind.is_empty() {
        let field = if api_version.is_empty() {
            "apiVersion"
        } else {
            "kind"
        };
        loaded.problems.push(Problem::new(
            object,
            field,
            format!("{location}: missing {field}"),
        ));
        return;
    }
    if meta_text("name").is_none() {
        loaded.problems.push(Problem::new(
            object,
            "metadata.name",
            format!("{location}: missing metadata.name"),
        ));
        return;
    }

    let s = &mut loaded.snapshot;
    let problems = &mut loaded.problems;
    let ctx = (object.as_str(), location, &mut *problems);
    match (api_version.as_str(), kind.as_str()) {
        ("portpolicy.io/v1alpha1", "PortPolicy") => push_typed(value, ctx, &mut s.policies),
        ("v1", "Namespace") => push_typed(value, ctx, &mut s.namespaces),
        ("v1", "Node") => push_typed(value, ctx, &mut s.nodes),
        ("v1", "Service") => push_namespaced(value, ctx, namespace, &mut s.services),
        ("v1", "Pod") => push_namespaced(value, ctx, namespace, &mut s.pods),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            push_namespaced(value, ctx, namespace, &mut s.endpoint_slices)
        }
        ("apps/v1", "DaemonSet") => push_namespaced(value, ctx, namespace, &mut s.daemon_sets),
        ("apps/v1", "Deployment") => push_namespaced(value, ctx, namespace, &mut s.deployments),
        ("apps/v1", "StatefulSet") => push_namespaced(value, ctx, namespace, &mut s.stateful_sets),
        _ => problems.push(Problem::new(
            object,
            "kind",
            format!("{location}: {api_version} {kind} is not a kind portpolicy reads; ignored"),
        )),
    }
}

/// A namespaced object without a namespace is in `default`, as `kubectl apply` would put it.
fn push_namespaced<K>(
    mut value: Value,
    ctx: (&str, &str, &mut Vec<Problem>),
    namespace: Option<String>,
    into: &mut Vec<K>,
) where
    K: DeserializeOwned,
{
    if namespace.is_none()
        && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("namespace".into(), Value::String("default".into()));
    }
    push_typed(value, ctx, into)
}

fn push_typed<K>(
    value: Value,
    (object, location, problems): (&str, &str, &mut Vec<Problem>),
    into: &mut Vec<K>,
) where
    K: DeserializeOwned,
{
    // serde_path_to_error would give the field; serde_json's message already quotes it.
    match serde_json::from_value::<K>(value) {
        Ok(typed) => into.push(typed),
        Err(e) => problems.push(Problem::new(object, "", format!("{location}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_multi_documents_and_reports_bad_objects() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    type: NodePort
    ports: [{port: 80, targetPort: http, nodePort: 30080}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: settings, namespace: shop}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  ports: "not a list"
---
kind: Pod
metadata: {name: orphan}
"#;
        let loaded = parse_str("cluster.yaml", text);
        assert_eq!(loaded.snapshot.services.len(), 1);
        assert_eq!(loaded.snapshot.nodes.len(), 1);
        let objects: Vec<_> = loaded
            .problems
            .iter()
            .map(|p| (p.object.as_str(), p.field.as_str()))
            .collect();
        assert_eq!(
            objects,
            [
                ("ConfigMap/shop/settings", "kind"),
                ("Service/broken", ""),
                ("Pod/orphan", "apiVersion"),
            ]
        );
        assert!(
            loaded.problems[0]
                .message
                .starts_with("cluster.yaml, document 1, items[1]")
        );
        assert!(loaded.problems[1].message.contains("cluster.yaml, document 3"));
    }

    #[test]
    fn unparseable_yaml_names_the_file() {
        let loaded = parse_str("bad.yaml", "kind: [unclosed");
        assert_eq!(loaded.problems.len(), 1);
        assert_eq!(loaded.problems[0].object, "bad.yaml");
        assert_eq!(loaded.snapshot.object_count(), 0);
    }

    #[test]
    fn namespace_labels_include_the_automatic_name_label() {
        let loaded = parse_str(
            "x.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
        );
        let labels = loaded.snapshot.namespace_labels();
        assert_eq!(labels["shop"]["team"], "a");
        assert_eq!(labels["shop"][NAMESPACE_NAME_LABEL], "shop");
        assert_eq!(labels["default"][NAMESPACE_NAME_LABEL], "default");
    }
}
