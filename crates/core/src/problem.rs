//! Problems: what the core reports instead of failing. Each names the object and field at fault.

use std::fmt;

use serde::Serialize;

/// One thing wrong with the input, named precisely enough that a user can find and fix it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Problem {
    /// `Kind/namespace/name`, or `Kind/name` for cluster-scoped objects, or a file name.
    pub object: String,
    /// The field path, like `spec.ports[0].nodePort`; empty when the whole object is at fault.
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(object: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{} {}: {}", self.object, self.field, self.message)
        }
    }
}

/// `Kind/namespace/name` for namespaced objects, `Kind/name` for cluster-scoped ones.
pub fn object_ref(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() => format!("{kind}/{ns}/{name}"),
        _ => format!("{kind}/{name}"),
    }
}
