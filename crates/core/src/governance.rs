//! Which PortPolicy governs which Service or namespace.
//!
//! Every consumer (allocator, conflict detector, planner, operator) asks this one index, so a
//! Service is never governed by one policy in one place and another elsewhere.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::crd::{CompiledPolicy, PortPolicy};
use crate::problem::Problem;
use crate::well_known::NAMESPACE_NAME_LABEL;

pub type Labels = BTreeMap<String, String>;

/// What selectors see on a namespace: its own labels and `kubernetes.io/metadata.name`, which
/// the API server sets on every namespace.
pub fn namespace_labels(name: &str, own: Option<&Labels>) -> Labels {
    let mut labels = own.cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    labels
}

/// The labels of a cluster's namespaces, by name, each as [`namespace_labels`] derives it.
/// Snapshots, the operator's caches and the agent's watches all build one of these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceLabels {
    by_name: BTreeMap<String, Labels>,
}

impl NamespaceLabels {
    /// Records a namespace and its own labels; returns whether what selectors see changed.
    pub fn insert(&mut self, name: &str, own: Option<&Labels>) -> bool {
        let labels = namespace_labels(name, own);
        if self.by_name.get(name) == Some(&labels) {
            return false;
        }
        self.by_name.insert(name.to_string(), labels);
        true
    }

    /// Records a namespace known only by name (an object lives in it), unless it is known.
    pub fn ensure(&mut self, name: &str) {
        if !self.by_name.contains_key(name) {
            self.insert(name, None);
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// The labels of a namespace. One that was never recorded still has its name label, as
    /// every namespace does: a `kubernetes.io/metadata.name` selector works on a partial
    /// snapshot, and before a namespace watch has caught up.
    pub fn of(&self, namespace: &str) -> Cow<'_, Labels> {
        match self.by_name.get(namespace) {
            Some(labels) => Cow::Borrowed(labels),
            None => Cow::Owned(namespace_labels(namespace, None)),
        }
    }
}

impl<N: AsRef<str>> FromIterator<(N, Labels)> for NamespaceLabels {
    /// Namespaces with their own labels.
    fn from_iter<I: IntoIterator<Item = (N, Labels)>>(namespaces: I) -> Self {
        let mut labels = NamespaceLabels::default();
        for (name, own) in namespaces {
            labels.insert(name.as_ref(), Some(&own));
        }
        labels
    }
}

/// The valid policies of a cluster, sorted by name, and the problems of the invalid ones.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    policies: Vec<CompiledPolicy>,
    /// Names of policies whose spec did not compile; they govern nothing.
    invalid: Vec<String>,
    problems: Vec<Problem>,
}

/// The answer to "who governs this Service?".
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Governance<'a> {
    Ungoverned,
    By(&'a CompiledPolicy),
    /// Selected by more than one policy: none of them may touch it until the user resolves it.
    Ambiguous(&'a CompiledPolicy, &'a CompiledPolicy),
}

impl<'a> Governance<'a> {
    pub fn policy(self) -> Option<&'a CompiledPolicy> {
        match self {
            Governance::By(p) => Some(p),
            _ => None,
        }
    }
}

impl PolicySet {
    pub fn compile<'a>(policies: impl IntoIterator<Item = &'a PortPolicy>) -> Self {
        let mut set = PolicySet::default();
        for policy in policies {
            match policy.compile() {
                Ok(compiled) => set.policies.push(compiled),
                Err(problems) => {
                    set.invalid.push(policy.name().to_string());
                    set.problems.extend(problems);
                }
            }
        }
        set.policies.sort_by(|a, b| a.name.cmp(&b.name));
        set.invalid.sort();
        set
    }

    /// Valid policies, sorted by name.
    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    pub fn get(&self, name: &str) -> Option<&CompiledPolicy> {
        self.policies
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.policies[i])
    }

    pub fn invalid(&self) -> &[String] {
        &self.invalid
    }

    /// Problems of policies that did not compile (each names the policy and field).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn governing_service(
        &self,
        namespace_labels: Option<&Labels>,
        service_labels: Option<&Labels>,
    ) -> Governance<'_> {
        let mut selecting = self
            .policies
            .iter()
            .filter(|p| p.selects_service(namespace_labels, service_labels));
        match (selecting.next(), selecting.next()) {
            (None, _) => Governance::Ungoverned,
            (Some(p), None) => Governance::By(p),
            (Some(a), Some(b)) => Governance::Ambiguous(a, b),
        }
    }

    /// Policies whose hostPort rules apply to Pods in a namespace.
    pub(crate) fn for_namespace<'s>(
        &'s self,
        namespace_labels: Option<&'s Labels>,
    ) -> impl Iterator<Item = &'s CompiledPolicy> + 's {
        self.policies
            .iter()
            .filter(move |p| p.selects_namespace(namespace_labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> PortPolicy {
        serde_json::from_value(json!({
            "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_two_or_no_policies() {
        let policies = [
            policy(
                "b-web",
                json!({"serviceSelector": {"matchLabels": {"tier": "web"}}}),
            ),
            policy(
                "a-team",
                json!({"namespaceSelector": {"matchLabels": {"team": "edge"}}}),
            ),
            policy("broken", json!({"nodePorts": {"range": "9-1"}})),
        ];
        let set = PolicySet::compile(&policies);
        assert_eq!(set.policies().len(), 2);
        assert_eq!(set.invalid(), ["broken"]);
        assert_eq!(set.problems()[0].object, "PortPolicy/broken");

        let edge = labels(&[("team", "edge")]);
        let web = labels(&[("tier", "web")]);
        assert_eq!(set.governing_service(None, None), Governance::Ungoverned);
        assert_eq!(
            set.governing_service(Some(&edge), None).policy().unwrap().name,
            "a-team"
        );
        assert!(matches!(
            set.governing_service(Some(&edge), Some(&web)),
            Governance::Ambiguous(a, b) if a.name == "a-team" && b.name == "b-web"
        ));
        assert_eq!(set.for_namespace(Some(&edge)).count(), 2);
        assert_eq!(set.get("b-web").unwrap().name, "b-web");
        assert!(set.get("broken").is_none());
    }

    #[test]
    fn every_namespace_carries_its_name_label() {
        let mut namespaces: NamespaceLabels = [("shop", labels(&[("team", "edge")]))].into_iter().collect();
        assert_eq!(
            *namespaces.of("shop"),
            labels(&[("team", "edge"), (NAMESPACE_NAME_LABEL, "shop")])
        );
        assert_eq!(
            *namespaces.of("unlisted"),
            labels(&[(NAMESPACE_NAME_LABEL, "unlisted")])
        );
        assert!(!namespaces.insert("shop", Some(&labels(&[("team", "edge")]))));
        assert!(namespaces.insert("shop", None));
        namespaces.ensure("shop");
        assert_eq!(*namespaces.of("shop"), labels(&[(NAMESPACE_NAME_LABEL, "shop")]));
        // A user cannot override the label the API server sets.
        namespaces.insert("web", Some(&labels(&[(NAMESPACE_NAME_LABEL, "other")])));
        assert_eq!(namespaces.of("web")[NAMESPACE_NAME_LABEL], "web");
    }
}
