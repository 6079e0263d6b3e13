//! Which nodes a Pod template may run on: `nodeName`, `nodeSelector`, required node affinity and
//! taints against tolerations, judged like the scheduler's NodeName, NodeAffinity,
//! NodeUnschedulable and TaintToleration filters (and the DaemonSet controller's own copy of
//! them). Preferences, pod (anti-)affinity and resources are out of scope: they decide where a
//! Pod goes, not which ports a node can give it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, PodSpec, Taint, Toleration};

use crate::problem::Problem;

const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
const NO_SCHEDULE: &str = "NoSchedule";
const NO_EXECUTE: &str = "NoExecute";

/// The facts about a node that placement looks at.
#[derive(Clone, Debug)]
pub(crate) struct NodeFacts<'a> {
    pub name: &'a str,
    labels: Option<&'a BTreeMap<String, String>>,
    taints: &'a [Taint],
    /// Cordoned (`spec.unschedulable`): as if tainted `node.kubernetes.io/unschedulable:NoSchedule`.
    unschedulable: bool,
}

impl<'a> NodeFacts<'a> {
    /// `None` for a node without a name, which no Pod can be bound to.
    pub(super) fn of(node: &'a Node) -> Option<Self> {
        let spec = node.spec.as_ref();
        Some(NodeFacts {
            name: node.metadata.name.as_deref().filter(|n| !n.is_empty())?,
            labels: node.metadata.labels.as_ref(),
            taints: spec.and_then(|s| s.taints.as_deref()).unwrap_or_default(),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        })
    }
}

/// Who will place the Pods: it decides which tolerations are added to the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placer {
    /// The DaemonSet controller tolerates node conditions and cordons so node daemons keep
    /// running (pkg/controller/daemon/util AddOrUpdateDaemonPodTolerations).
    DaemonSet,
    /// The scheduler, after the DefaultTolerationSeconds admission plugin added its two
    /// NoExecute tolerations.
    Scheduler,
}

/// A Pod template's node requirements, parsed once and checked against many nodes.
#[derive(Clone, Debug)]
pub(crate) struct PlacementRules {
    node_name: Option<String>,
    node_selector: BTreeMap<String, String>,
    /// Required node affinity: any term must match. `None` when the template has none.
    required_terms: Option<Vec<Term>>,
    tolerations: Vec<Toleration>,
}

#[derive(Clone, Debug)]
struct Term {
    labels: Vec<(String, LabelOp)>,
    /// `matchFields` on `metadata.name`: (node name, whether it must equal it).
    names: Vec<(String, bool)>,
    /// A term with an invalid requirement matches no node, as upstream treats it.
    valid: bool,
}

#[derive(Clone, Debug)]
enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

impl PlacementRules {
    /// Parses the placement fields of `spec`, reporting invalid ones against `object` at
    /// `field_prefix` (like `spec.template.spec`).
    pub(super) fn compile(
        spec: &PodSpec,
        placer: Placer,
        object: &str,
        field_prefix: &str,
        problems: &mut Vec<Problem>,
    ) -> Self {
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|na| na.required_during_scheduling_ignored_during_execution.as_ref());
        let required_terms = required.map(|selector| {
            selector
                .node_selector_terms
                .iter()
                .enumerate()
                .map(|(i, term)| {
                    let field = format!(
                        "{field_prefix}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{i}]"
                    );
                    let mut report = |sub: String, message: String| {
                        problems.push(Problem::new(object, format!("{field}.{sub}"), message))
                    };
                    Term::compile(
                        term.match_expressions.as_deref().unwrap_or_default(),
                        term.match_fields.as_deref().unwrap_or_default(),
                        &mut report,
                    )
                })
                .collect()
        });

        let mut tolerations = spec.tolerations.clone().unwrap_or_default();
        let exists = |key: &str, effect: &str| Toleration {
            key: Some(key.to_string()),
            operator: Some("Exists".to_string()),
            effect: Some(effect.to_string()),
            ..Toleration::default()
        };
        tolerations.push(exists(TAINT_NOT_READY, NO_EXECUTE));
        tolerations.push(exists(TAINT_UNREACHABLE, NO_EXECUTE));
        if placer == Placer::DaemonSet {
            for key in [
                "node.kubernetes.io/disk-pressure",
                "node.kubernetes.io/memory-pressure",
                "node.kubernetes.io/pid-pressure",
                TAINT_UNSCHEDULABLE,
            ] {
                tolerations.push(exists(key, NO_SCHEDULE));
            }
            if spec.host_network == Some(true) {
                tolerations.push(exists("node.kubernetes.io/network-unavailable", NO_SCHEDULE));
            }
        }

        PlacementRules {
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_terms,
            tolerations,
        }
    }

    /// Whether a Pod from this template may run on `node` (ports aside).
    pub(crate) fn admits(&self, node: &NodeFacts) -> bool {
        let label = |key: &str| node.labels.and_then(|l| l.get(key));
        let name_fits = self.node_name.as_deref().is_none_or(|n| n == node.name);
        let selector_fits = self
            .node_selector
            .iter()
            .all(|(key, value)| label(key) == Some(value));
        let affinity_fits = self
            .required_terms
            .as_ref()
            .is_none_or(|terms| terms.iter().any(|t| t.matches(node)));
        name_fits && selector_fits && affinity_fits && self.tolerates_taints_of(node)
    }

    fn tolerates_taints_of(&self, node: &NodeFacts) -> bool {
        let tolerated = |key: &str, value: &str, effect: &str| {
            self.tolerations.iter().any(|t| tolerates(t, key, value, effect))
        };
        let taints_fine = node.taints.iter().all(|taint| {
            !matches!(taint.effect.as_str(), NO_SCHEDULE | NO_EXECUTE)
                || tolerated(&taint.key, taint.value.as_deref().unwrap_or(""), &taint.effect)
        });
        taints_fine && (!node.unschedulable || tolerated(TAINT_UNSCHEDULABLE, "", NO_SCHEDULE))
    }
}

/// Upstream `Toleration.ToleratesTaint`: empty effect or key match any; `Exists` any value.
fn tolerates(toleration: &Toleration, key: &str, value: &str, effect: &str) -> bool {
    fn given(field: &Option<String>) -> Option<&str> {
        field.as_deref().filter(|s| !s.is_empty())
    }
    if given(&toleration.effect).is_some_and(|e| e != effect) {
        return false;
    }
    if given(&toleration.key).is_some_and(|k| k != key) {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("") {
        "Exists" => true,
        "" | "Equal" => toleration.value.as_deref().unwrap_or("") == value,
        _ => false,
    }
}

impl Term {
    fn compile(
        expressions: &[NodeSelectorRequirement],
        fields: &[NodeSelectorRequirement],
        report: &mut impl FnMut(String, String),
    ) -> Term {
        let mut term = Term {
            labels: Vec::new(),
            names: Vec::new(),
            valid: true,
        };
        for (i, req) in expressions.iter().enumerate() {
            match label_op(req) {
                Ok(op) => term.labels.push((req.key.clone(), op)),
                Err((sub, message)) => {
                    report(format!("matchExpressions[{i}].{sub}"), message);
                    term.valid = false;
                }
            }
        }
        for (i, req) in fields.iter().enumerate() {
            match name_requirement(req) {
                Ok(name) => term.names.push(name),
                Err((sub, message)) => {
                    report(format!("matchFields[{i}].{sub}"), message);
                    term.valid = false;
                }
            }
        }
        term
    }

    /// A term with no requirements matches nothing (upstream: "a null or empty term matches no
    /// objects").
    fn matches(&self, node: &NodeFacts) -> bool {
        let label = |key: &str| node.labels.and_then(|l| l.get(key));
        let number = |key: &str| label(key).and_then(|v| v.parse::<i64>().ok());
        self.valid
            && !(self.labels.is_empty() && self.names.is_empty())
            && self.labels.iter().all(|(key, op)| match op {
                LabelOp::In(values) => label(key).is_some_and(|v| values.contains(v)),
                LabelOp::NotIn(values) => label(key).is_none_or(|v| !values.contains(v)),
                LabelOp::Exists => label(key).is_some(),
                LabelOp::DoesNotExist => label(key).is_none(),
                LabelOp::Gt(bound) => number(key).is_some_and(|n| n > *bound),
                LabelOp::Lt(bound) => number(key).is_some_and(|n| n < *bound),
            })
            && self
                .names
                .iter()
                .all(|(name, equal)| (name == node.name) == *equal)
    }
}

fn label_op(req: &NodeSelectorRequirement) -> Result<LabelOp, (&'static str, String)> {
    let values = req.values.clone().unwrap_or_default();
    let op = req.operator.as_str();
    let need_values = || {
        if values.is_empty() {
            Err(("values", format!("operator {op} needs at least one value")))
        } else {
            Ok(())
        }
    };
    let no_values = || {
        if values.is_empty() {
            Ok(())
        } else {
            Err(("values", format!("operator {op} takes no values")))
        }
    };
    let one_integer = || match values.as_slice() {
        [v] => v
            .parse::<i64>()
            .map_err(|_| ("values", format!("operator {op} needs an integer, not {v:?}"))),
        _ => Err(("values", format!("operator {op} needs exactly one value"))),
    };
    match op {
        "In" => need_values().map(|_| LabelOp::In(values.clone())),
        "NotIn" => need_values().map(|_| LabelOp::NotIn(values.clone())),
        "Exists" => no_values().map(|_| LabelOp::Exists),
        "DoesNotExist" => no_values().map(|_| LabelOp::DoesNotExist),
        "Gt" => one_integer().map(LabelOp::Gt),
        "Lt" => one_integer().map(LabelOp::Lt),
        other => Err((
            "operator",
            format!(
                "{other:?} is not a node selector operator: must be In, NotIn, Exists, DoesNotExist, Gt or Lt"
            ),
        )),
    }
}

/// `matchFields` supports only `metadata.name` with `In` or `NotIn` and exactly one value.
fn name_requirement(req: &NodeSelectorRequirement) -> Result<(String, bool), (&'static str, String)> {
    if req.key != "metadata.name" {
        return Err((
            "key",
            format!(
                "{:?} is not a node field selector: only metadata.name is supported",
                req.key
            ),
        ));
    }
    let equal = match req.operator.as_str() {
        "In" => true,
        "NotIn" => false,
        other => {
            return Err((
                "operator",
                format!("{other:?} is not supported on metadata.name: must be In or NotIn"),
            ));
        }
    };
    match req.values.as_deref() {
        Some([name]) => Ok((name.clone(), equal)),
        _ => Err(("values", "metadata.name needs exactly one value".to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn node(value: Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn spec(value: Value) -> PodSpec {
        serde_json::from_value(value).unwrap()
    }

    /// Names of the nodes the template admits.
    fn admitted(template: Value, placer: Placer, nodes: &[Node]) -> (Vec<String>, Vec<Problem>) {
        let mut problems = Vec::new();
        let rules = PlacementRules::compile(
            &spec(template),
            placer,
            "DaemonSet/ns/ds",
            "spec.template.spec",
            &mut problems,
        );
        let names = nodes
            .iter()
            .filter_map(NodeFacts::of)
            .filter(|n| rules.admits(n))
            .map(|n| n.name.to_string())
            .collect();
        (names, problems)
    }

    fn nodes() -> Vec<Node> {
        vec![
            node(json!({"metadata": {"name": "a", "labels": {"zone": "z1", "gpu": "2"}}})),
            node(json!({"metadata": {"name": "b", "labels": {"zone": "z2"}},
                "spec": {"taints": [{"key": "dedicated", "value": "edge", "effect": "NoSchedule"}]}})),
            node(
                json!({"metadata": {"name": "c", "labels": {"zone": "z1", "gpu": "8"}},
                "spec": {"unschedulable": true, "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
            ),
            node(json!({"metadata": {"name": "d", "labels": {"zone": "z3"}},
                "spec": {"taints": [{"key": "soft", "effect": "PreferNoSchedule"}, {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]}})),
            node(
                json!({"metadata": {"name": "e", "labels": {"zone": "z3"}}, "spec": {"unschedulable": true}}),
            ),
        ]
    }

    #[test]
    fn node_selector_affinity_and_taints() {
        let nodes = nodes();
        let cases: Vec<(Value, Placer, Vec<&str>)> = vec![
            // Cordoned nodes take DaemonSet pods but not scheduled ones; `dedicated` repels both.
            (
                json!({"containers": []}),
                Placer::DaemonSet,
                vec!["a", "c", "d", "e"],
            ),
            (json!({"containers": []}), Placer::Scheduler, vec!["a", "d"]),
            (
                json!({"containers": [], "nodeSelector": {"zone": "z1"}}),
                Placer::DaemonSet,
                vec!["a", "c"],
            ),
            (
                json!({"containers": [], "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}]}),
                Placer::Scheduler,
                vec!["a", "b", "d"],
            ),
            (
                json!({"containers": [], "tolerations": [{"key": "dedicated", "value": "other"}]}),
                Placer::Scheduler,
                vec!["a", "d"],
            ),
            (
                json!({"containers": [], "tolerations": [{"operator": "Exists"}]}),
                Placer::Scheduler,
                vec!["a", "b", "c", "d", "e"],
            ),
            (
                json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["4"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["e"]}]},
                ]}}}}),
                Placer::DaemonSet,
                vec!["c", "e"],
            ),
            (
                json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["z1"]}, {"key": "gpu", "operator": "DoesNotExist"}],
                     "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["b"]}]},
                ]}}}}),
                Placer::DaemonSet,
                vec!["d", "e"],
            ),
            (
                json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}}}),
                Placer::DaemonSet,
                vec![],
            ),
            (
                json!({"containers": [], "nodeName": "d"}),
                Placer::Scheduler,
                vec!["d"],
            ),
        ];
        for (template, placer, want) in cases {
            let (got, problems) = admitted(template.clone(), placer, &nodes);
            assert_eq!(got, want, "{template} placed by {placer:?}");
            assert!(problems.is_empty(), "{problems:?}");
        }
    }

    #[test]
    fn host_network_daemons_tolerate_network_unavailable() {
        let nodes = [node(json!({"metadata": {"name": "new"}, "spec": {"taints": [
            {"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}]}}))];
        let (plain, _) = admitted(json!({"containers": []}), Placer::DaemonSet, &nodes);
        let (host, _) = admitted(
            json!({"containers": [], "hostNetwork": true}),
            Placer::DaemonSet,
            &nodes,
        );
        assert_eq!(plain, Vec::<String>::new());
        assert_eq!(host, ["new"]);
    }

    #[test]
    fn invalid_requirements_are_reported_and_match_nothing() {
        let (got, problems) = admitted(
            json!({"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "Like", "values": ["z"]}]},
                {"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["many"]}]},
                {"matchFields": [{"key": "metadata.labels", "operator": "In", "values": ["a"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["a", "b"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["z1"]}]},
            ]}}}}),
            Placer::DaemonSet,
            &nodes(),
        );
        assert_eq!(got, Vec::<String>::new());
        let prefix = "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms";
        let fields: Vec<_> = problems
            .iter()
            .map(|p| p.field.strip_prefix(prefix).unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "[0].matchExpressions[0].operator",
                "[1].matchExpressions[0].values",
                "[2].matchFields[0].key",
                "[3].matchFields[0].values",
                "[4].matchExpressions[0].values",
            ]
        );
        assert!(problems.iter().all(|p| p.object == "DaemonSet/ns/ds"));
    }

    #[test]
    fn toleration_matching_follows_upstream() {
        let t = |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: None,
        };
        let cases = [
            (t(Some("k"), None, Some("v"), None), true),
            (t(Some("k"), Some("Equal"), Some("v"), Some("NoSchedule")), true),
            (t(Some("k"), Some("Equal"), Some("w"), None), false),
            (t(Some("k"), Some("Exists"), None, Some("NoExecute")), false),
            (t(Some("other"), Some("Exists"), None, None), false),
            (t(None, Some("Exists"), None, None), true),
            (t(Some("k"), Some("Sometimes"), Some("v"), None), false),
        ];
        for (toleration, want) in cases {
            assert_eq!(
                tolerates(&toleration, "k", "v", "NoSchedule"),
                want,
                "{toleration:?}"
            );
        }
    }
}
