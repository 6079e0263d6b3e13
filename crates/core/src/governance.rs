//! Which PortPolicy governs which Service or namespace.
//!
//! Every consumer (allocator, conflict detector, planner, operator) asks this one index, so a
//! Service is never governed by one policy in one place and another elsewhere.

use std::collections::BTreeMap;

use crate::crd::{CompiledPolicy, PortPolicy};
use crate::problem::Problem;

pub type Labels = BTreeMap<String, String>;

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
    pub fn for_namespace<'s>(
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
}
