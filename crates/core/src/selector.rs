//! Label selectors, evaluated the way the API server does.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A validated label selector. `None` in a policy means "everything"; an empty selector too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Compiles a selector, or says which part of it is invalid (relative field path and message).
    pub fn compile(selector: Option<&LabelSelector>) -> Result<Self, (String, String)> {
        let Some(selector) = selector else {
            return Ok(Selector::default());
        };
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{i}]");
            let values = expr.values.clone().unwrap_or_default();
            let needs_values = |values: &Vec<String>| {
                if values.is_empty() {
                    Err((
                        format!("{field}.values"),
                        format!("operator {} needs at least one value", expr.operator),
                    ))
                } else {
                    Ok(())
                }
            };
            let no_values = |values: &Vec<String>| {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err((
                        format!("{field}.values"),
                        format!("operator {} takes no values", expr.operator),
                    ))
                }
            };
            let key = expr.key.clone();
            requirements.push(match expr.operator.as_str() {
                "In" => {
                    needs_values(&values)?;
                    Requirement::In(key, values)
                }
                "NotIn" => {
                    needs_values(&values)?;
                    Requirement::NotIn(key, values)
                }
                "Exists" => {
                    no_values(&values)?;
                    Requirement::Exists(key)
                }
                "DoesNotExist" => {
                    no_values(&values)?;
                    Requirement::DoesNotExist(key)
                }
                other => {
                    return Err((
                        format!("{field}.operator"),
                        format!(
                            "{other:?} is not a valid operator: must be In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                }
            });
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key));
        self.requirements.iter().all(|req| match req {
            Requirement::In(key, values) => get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => get(key).is_some(),
            Requirement::DoesNotExist(key) => get(key).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn evaluates_like_the_api_server() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("team", "edge")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["web", "api"]),
                expr("env", "NotIn", &["dev"]),
                expr("owner", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        };
        let s = Selector::compile(Some(&sel)).unwrap();
        let base = [("team", "edge"), ("tier", "web"), ("owner", "x")];
        assert!(s.matches(Some(&labels(&base))));
        let mut with_env = base.to_vec();
        with_env.push(("env", "dev"));
        assert!(!s.matches(Some(&labels(&with_env))));
        let mut with_legacy = base.to_vec();
        with_legacy.push(("legacy", "1"));
        assert!(!s.matches(Some(&labels(&with_legacy))));
        assert!(!s.matches(Some(&labels(&[("team", "edge"), ("tier", "db"), ("owner", "x")]))));
        assert!(!s.matches(None));
    }

    #[test]
    fn missing_or_empty_selector_selects_everything() {
        assert!(Selector::compile(None).unwrap().matches(None));
        assert!(
            Selector::compile(Some(&LabelSelector::default()))
                .unwrap()
                .matches(None)
        );
    }

    #[test]
    fn rejects_bad_operators_and_values() {
        let bad_op = LabelSelector {
            match_expressions: Some(vec![expr("a", "Equals", &["b"])]),
            ..Default::default()
        };
        assert_eq!(
            Selector::compile(Some(&bad_op)).unwrap_err().0,
            "matchExpressions[0].operator"
        );
        let in_without_values = LabelSelector {
            match_expressions: Some(vec![expr("a", "In", &[])]),
            ..Default::default()
        };
        assert_eq!(
            Selector::compile(Some(&in_without_values)).unwrap_err().0,
            "matchExpressions[0].values"
        );
    }
}
