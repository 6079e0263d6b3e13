//! A cluster snapshot: the objects `kubectl get -o yaml` prints, loaded without a cluster.
//!
//! `plan` and the agent's `--snapshot` mode read these; the operator builds the same view from
//! its watch caches. Loading never fails on one bad object: it is reported and skipped.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::crd::PortPolicy;
use crate::governance::NamespaceLabels;
use crate::problem::{Problem, object_ref};

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
    pub fn namespace_labels(&self) -> NamespaceLabels {
        let mut labels = NamespaceLabels::default();
        for ns in &self.namespaces {
            labels.insert(
                ns.metadata.name.as_deref().unwrap_or_default(),
                ns.metadata.labels.as_ref(),
            );
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
        // Listed once, so lookups need not derive them again. Hashed, not sorted: a large
        // snapshot has few namespaces and very many objects.
        let mut seen: HashSet<&str> = HashSet::new();
        for ns in referenced {
            if seen.insert(ns) {
                labels.ensure(ns);
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
    /// The problems (also in `problems`) that mean some text was not read at all: a file that
    /// could not be read or decoded, YAML that does not parse, a document that is not a whole
    /// object, a `List` without its `kind` (kubectl prints `kind: List` after the items, so a
    /// cut-off dump loses it), a file with no objects in it. A snapshot with any of these is
    /// not the whole cluster; the agent refuses it rather than withdraw what it lacks.
    pub unreadable: Vec<Problem>,
}

impl Loaded {
    /// Whether every text was read whole (object-level problems aside).
    pub fn is_whole(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// Where an object was read: `file, document N[, items[I]]`.
type Location = String;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    PortPolicy,
    Namespace,
    Node,
    Service,
    EndpointSlice,
    Pod,
    DaemonSet,
    Deployment,
    StatefulSet,
}

impl Kind {
    fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("portpolicy.io/v1alpha1", "PortPolicy") => Kind::PortPolicy,
            ("v1", "Namespace") => Kind::Namespace,
            ("v1", "Node") => Kind::Node,
            ("v1", "Service") => Kind::Service,
            ("v1", "Pod") => Kind::Pod,
            ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
            ("apps/v1", "DaemonSet") => Kind::DaemonSet,
            ("apps/v1", "Deployment") => Kind::Deployment,
            ("apps/v1", "StatefulSet") => Kind::StatefulSet,
            _ => return None,
        })
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::PortPolicy | Kind::Namespace | Kind::Node)
    }
}

/// An object already read, by kind, namespace and name.
#[derive(Debug)]
struct Seen {
    position: usize,
    location: Location,
    resource_version: Option<String>,
}

/// Reads texts into one snapshot. Every object is checked on its own: a bad one is a problem
/// naming it and the field at fault, and the rest is read.
///
/// The same object (kind, namespace, name) read twice is kept once, whatever order the texts
/// come in: identical copies collapse (reported), and of differing copies the one with the
/// highest `metadata.resourceVersion` wins (the API server's later write; compared as numbers,
/// a missing or non-numeric one lowest), then the greatest JSON text of the object, so every
/// order of the same texts yields the same snapshot.
#[derive(Debug, Default)]
pub struct Loader {
    loaded: Loaded,
    seen: HashMap<(Kind, String, String), Seen>,
    /// Documents and items met in the text being added, to tell an empty text.
    objects_in_text: usize,
}

impl Loader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one file's bytes: UTF-8 (with or without a byte-order mark) or UTF-16 with a BOM,
    /// as PowerShell's `>` writes `kubectl` output on Windows.
    pub fn add_bytes(&mut self, source: &str, bytes: &[u8]) {
        match decode(bytes) {
            Ok(text) => self.add_text(source, &text),
            Err(why) => self.unreadable(source, why),
        }
    }

    /// Reads one file's text: a single object, a `List`, or several YAML (or JSON) documents.
    pub fn add_text(&mut self, source: &str, text: &str) {
        self.objects_in_text = 0;
        let documents = match serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(
            text,
            yaml_options(text.len()),
        ) {
            Ok(docs) => docs,
            Err(e) => {
                return self.unreadable(source, format!("not valid YAML: {}", refusal(&e)));
            }
        };
        let count = documents.len();
        for (index, doc) in documents.into_iter().enumerate() {
            let location = if count == 1 {
                source.to_string()
            } else {
                format!("{source}, document {}", index + 1)
            };
            self.add_document(&location, doc);
        }
        if self.objects_in_text == 0 {
            self.unreadable(source, "holds no Kubernetes objects");
        }
    }

    /// A problem with a whole file or entry, naming it (the object) alone.
    pub fn problem(&mut self, source: &str, message: impl Into<String>) {
        self.loaded.problems.push(Problem::new(source, "", message));
    }

    /// A file or entry that could not be read: the snapshot is not whole.
    pub fn unreadable(&mut self, source: &str, message: impl Into<String>) {
        let problem = Problem::new(source, "", message);
        self.loaded.unreadable.push(problem.clone());
        self.loaded.problems.push(problem);
    }

    /// Reads one object (or `List`) already parsed, as the live lister gets them.
    pub fn add_value(&mut self, location: &str, value: Value) {
        self.add_document(location, value);
    }

    pub fn finish(self) -> Loaded {
        self.loaded
    }

    fn add_document(&mut self, location: &str, value: Value) {
        if value.is_null() {
            return;
        }
        // Anything but an empty document: a text of nothing else holds nothing.
        self.objects_in_text += 1;
        let Value::Object(mut obj) = value else {
            let problem = Problem::new(
                location,
                "",
                "not a Kubernetes object (expected a mapping with apiVersion and kind)",
            );
            self.loaded.unreadable.push(problem.clone());
            self.loaded.problems.push(problem);
            return;
        };
        let text = |obj: &Map<String, Value>, key: &str| {
            obj.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let kind = text(&obj, "kind");
        let items = obj.get("items");
        let is_list = matches!(items, Some(Value::Array(_))) && kind.ends_with("List");
        // kubectl prints `kind: List` after the items, so a dump cut off in them has none.
        let cut_off_list = kind.is_empty() && matches!(items, Some(Value::Array(_) | Value::Null));
        if is_list || cut_off_list {
            if cut_off_list {
                let problem = Problem::new(
                    location,
                    "kind",
                    "has items but no kind: List (kubectl prints the kind after the items: \
                     this dump was cut off); its items are read, the rest of it is lost",
                );
                self.loaded.unreadable.push(problem.clone());
                self.loaded.problems.push(problem);
            }
            if let Some(Value::Array(items)) = obj.remove("items") {
                for (i, item) in items.into_iter().enumerate() {
                    self.add_document(&format!("{location}, items[{i}]"), item);
                }
            }
            return;
        }
        self.add_object(location, Value::Object(obj));
    }

    fn add_object(&mut self, location: &str, mut value: Value) {
        let obj = value.as_object().expect("callers pass objects");
        let text = |key: &str| obj.get(key).and_then(Value::as_str).unwrap_or_default();
        let (api_version, kind) = (text("apiVersion").to_string(), text("kind").to_string());
        let meta = obj.get("metadata");
        let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
        let name = meta_text("name").filter(|n| !n.is_empty()).map(str::to_string);
        let mut namespace = meta_text("namespace")
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let resource_version = meta_text("resourceVersion").map(str::to_string);
        let tag = Kind::of(&api_version, &kind);
        // A namespaced object without a namespace is in `default`, as `kubectl apply` would put it.
        if tag.is_some_and(Kind::namespaced) && namespace.is_none() {
            namespace = Some("default".to_string());
        }
        let object = object_ref(
            if kind.is_empty() { "<no kind>" } else { &kind },
            namespace.as_deref(),
            name.as_deref().unwrap_or("<unnamed>"),
        );
        // Fields the loader reads before typing the object: the wrong type in one of them is
        // that object's problem (typing would name it too, but a namespace of the wrong type
        // would first have become `default`).
        let mistyped = match meta {
            Some(m) if !m.is_object() && !m.is_null() => Some(("metadata", m, "a mapping")),
            _ => ["namespace", "resourceVersion"].into_iter().find_map(|key| {
                let v = meta.and_then(|m| m.get(key)).filter(|v| !v.is_null())?;
                (!v.is_string()).then_some((key, v, "a string"))
            }),
        };
        if let Some((key, v, wanted)) = mistyped {
            let field = if key == "metadata" {
                key.to_string()
            } else {
                format!("metadata.{key}")
            };
            self.loaded.problems.push(Problem::new(
                object,
                &field,
                format!("{location}: {field} is {v}, not {wanted}; object skipped"),
            ));
            return;
        }
        let missing = if api_version.is_empty() {
            Some("apiVersion")
        } else if kind.is_empty() {
            Some("kind")
        } else if name.is_none() {
            Some("metadata.name")
        } else {
            None
        };
        if let Some(field) = missing {
            let problem = Problem::new(&object, field, format!("{location}: missing {field}"));
            self.loaded.problems.push(problem.clone());
            // Absent, it is cut off or not an object (kubectl prints all three on every object);
            // present but not a string, it is one bad object.
            let value = match field {
                "metadata.name" => meta.and_then(|m| m.get("name")),
                key => obj.get(key),
            };
            match value.filter(|v| !v.is_null()) {
                Some(v) if !v.is_string() => {
                    let last = self.loaded.problems.last_mut().expect("just pushed");
                    last.message = format!(
                        "{location}: {field} is {v}, not a string (quote it: YAML reads y, n, yes, no, \
                         on, off and numbers as other types); object skipped"
                    );
                }
                _ => self.loaded.unreadable.push(problem),
            }
            return;
        }
        let Some(tag) = tag else {
            self.loaded.problems.push(Problem::new(
                object,
                "kind",
                format!("{location}: {api_version} {kind} is not a kind portpolicy reads; ignored"),
            ));
            return;
        };
        if let (Some(ns), Some(meta)) = (
            &namespace,
            value.get_mut("metadata").and_then(Value::as_object_mut),
        ) {
            meta.insert("namespace".into(), Value::String(ns.clone()));
        }
        let key = (tag, namespace.unwrap_or_default(), name.unwrap_or_default());
        let read = ReadObject {
            object: &object,
            location,
            key,
            resource_version,
        };
        let s = &mut self.loaded.snapshot;
        let target = Target {
            seen: &mut self.seen,
            problems: &mut self.loaded.problems,
        };
        match tag {
            Kind::PortPolicy => {
                let Some(policy) = typed::<PortPolicy>(value, &read, target.problems) else {
                    return;
                };
                if let Some(status) = &policy.status {
                    target
                        .problems
                        .extend(
                            status
                                .unreadable_record_problems(policy.name())
                                .into_iter()
                                .map(|p| Problem {
                                    message: format!("{}: {}", read.location, p.message),
                                    ..p
                                }),
                        );
                }
                target.keep(policy, read, &mut s.policies)
            }
            Kind::Namespace => target.add(value, read, &mut s.namespaces),
            Kind::Node => target.add(value, read, &mut s.nodes),
            Kind::Service => target.add(value, read, &mut s.services),
            Kind::EndpointSlice => target.add(value, read, &mut s.endpoint_slices),
            Kind::Pod => target.add(value, read, &mut s.pods),
            Kind::DaemonSet => target.add(value, read, &mut s.daemon_sets),
            Kind::Deployment => target.add(value, read, &mut s.deployments),
            Kind::StatefulSet => target.add(value, read, &mut s.stateful_sets),
        }
    }
}

/// One object as read, before it is typed.
struct ReadObject<'a> {
    object: &'a str,
    location: &'a str,
    key: (Kind, String, String),
    resource_version: Option<String>,
}

/// Where typed objects go: the snapshot's list of their kind, once per identity.
struct Target<'a> {
    seen: &'a mut HashMap<(Kind, String, String), Seen>,
    problems: &'a mut Vec<Problem>,
}

impl Target<'_> {
    fn add<K>(self, value: Value, read: ReadObject<'_>, into: &mut Vec<K>)
    where
        K: DeserializeOwned + Serialize,
    {
        if let Some(typed) = typed::<K>(value, &read, self.problems) {
            self.keep(typed, read, into);
        }
    }

    fn keep<K>(self, object: K, read: ReadObject<'_>, into: &mut Vec<K>)
    where
        K: Serialize,
    {
        let ReadObject {
            object: name,
            location,
            key,
            resource_version,
        } = read;
        let Some(seen) = self.seen.get_mut(&key) else {
            self.seen.insert(
                key,
                Seen {
                    position: into.len(),
                    location: location.to_string(),
                    resource_version,
                },
            );
            into.push(object);
            return;
        };
        let kept = &mut into[seen.position];
        // Compared as the JSON portpolicy would write of them: what it reads, in a fixed order.
        let (new_text, kept_text) = (json_text(&object), json_text(kept));
        if new_text == kept_text {
            self.problems.push(Problem::new(
                name,
                "",
                format!(
                    "read twice, identically ({} and {location}); kept once",
                    seen.location
                ),
            ));
            return;
        }
        let number = |rv: &Option<String>| rv.as_deref().and_then(|v| v.parse::<u64>().ok());
        let new_wins = (number(&resource_version), &new_text) > (number(&seen.resource_version), &kept_text);
        let version = |rv: &Option<String>| rv.as_deref().unwrap_or("none").to_string();
        let (winner, loser) = if new_wins {
            (
                (location.to_string(), version(&resource_version)),
                (seen.location.clone(), version(&seen.resource_version)),
            )
        } else {
            (
                (seen.location.clone(), version(&seen.resource_version)),
                (location.to_string(), version(&resource_version)),
            )
        };
        self.problems.push(Problem::new(
            name,
            "",
            format!(
                "read twice with different contents; kept the copy at {} (resourceVersion {}) over {} \
                 (resourceVersion {}): the highest resourceVersion wins, then the greatest JSON text",
                winner.0, winner.1, loser.0, loser.1
            ),
        ));
        if new_wins {
            *kept = object;
            seen.location = location.to_string();
            seen.resource_version = resource_version;
        }
    }
}

fn json_text<K: Serialize>(object: &K) -> String {
    serde_json::to_string(object).unwrap_or_default()
}

/// The typed object, or a problem naming the field that does not fit (`spec.ports[0].port`).
fn typed<K: DeserializeOwned>(value: Value, read: &ReadObject<'_>, problems: &mut Vec<Problem>) -> Option<K> {
    match serde_path_to_error::deserialize::<_, K>(value) {
        Ok(typed) => Some(typed),
        Err(e) => {
            let field = error_field(&e);
            problems.push(Problem::new(
                read.object,
                field,
                format!("{}: {}; object skipped", read.location, e.into_inner()),
            ));
            None
        }
    }
}

/// The field a deserialization error is about, spelled `spec.ports[0].port` as `kubectl
/// explain` and the API server's errors spell field paths. serde reports a missing field at
/// the mapping that lacks it; the field named is the missing one itself.
pub fn error_field<E: std::fmt::Display>(error: &serde_path_to_error::Error<E>) -> String {
    let mut path = error.path().to_string();
    // The crate writes `.` for the root.
    if path == "." {
        path.clear();
    }
    let message = error.inner().to_string();
    if let Some(missing) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(missing);
    }
    path
}

/// UTF-8, with or without a byte-order mark, or UTF-16 with one.
pub fn decode(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    let utf16 = |bytes: &[u8], from: fn([u8; 2]) -> u16, name: &str| {
        if !bytes.len().is_multiple_of(2) {
            return Err(format!(
                "{name} (from its byte-order mark) but an odd number of bytes long"
            ));
        }
        let units = bytes.chunks_exact(2).map(|c| from([c[0], c[1]]));
        char::decode_utf16(units)
            .enumerate()
            .map(|(i, c)| {
                c.map_err(|_| {
                    format!(
                        "{name} (from its byte-order mark) with an unpaired surrogate at byte {}",
                        2 + 2 * i
                    )
                })
            })
            .collect::<Result<String, String>>()
            .map(Cow::Owned)
    };
    match bytes {
        [0xFF, 0xFE, 0, 0, ..] | [0, 0, 0xFE, 0xFF, ..] => {
            Err("UTF-32 (from its byte-order mark); save it as UTF-8".to_string())
        }
        [0xEF, 0xBB, 0xBF, rest @ ..] => utf8(rest, 3),
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes, "UTF-16LE"),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes, "UTF-16BE"),
        _ => utf8(bytes, 0),
    }
}

fn utf8(bytes: &[u8], offset: usize) -> Result<Cow<'_, str>, String> {
    std::str::from_utf8(bytes).map(Cow::Borrowed).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        format!(
            "not UTF-8 text: invalid byte 0x{:02X} at byte {} (line {line}); save it as UTF-8",
            bytes[at],
            at + offset
        )
    })
}

/// A parse error, saying plainly when it is a refusal to expand or nest without end.
fn refusal(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error;
    use serde_saphyr::budget::BudgetBreach as Breach;
    let text = e.to_string();
    let nested = format!("{text} (refused: nested deeper than {MAX_DEPTH} levels)");
    // The size budgets scale with the text, so only alias expansion can exceed them.
    let expanded = format!("{text} (refused: its aliases expand it far beyond its own size)");
    let mut cause = e;
    while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = cause {
        cause = error;
    }
    match cause {
        Error::Budget {
            breach: Breach::Depth { .. },
            ..
        } => nested,
        Error::Budget {
            breach:
                Breach::Events { .. }
                | Breach::Nodes { .. }
                | Breach::ScalarBytes { .. }
                | Breach::Aliases { .. }
                | Breach::Anchors { .. }
                | Breach::AliasAnchorRatio { .. }
                | Breach::RecordedAnchorEvents { .. }
                | Breach::RecordedAnchorBytes { .. },
            ..
        }
        | Error::AliasReplayLimitExceeded { .. }
        | Error::AliasReplayStackDepthExceeded { .. }
        | Error::AliasReplayCounterOverflow { .. } => expanded,
        // The parser's own limit on flow collections (`[[[[...`).
        _ if text.contains("recursion limit") => nested,
        _ => text,
    }
}

/// Nesting deeper than any Kubernetes object this loader reads (a Pod's affinity terms inside
/// a List reach about 15).
const MAX_DEPTH: usize = 64;

/// The parser's limits. Without aliases a YAML text cannot hold more nodes, events, documents or
/// scalar bytes than a small multiple of its length, so those budgets scale with the text (the
/// parser's fixed defaults refuse a cluster of a few hundred Pods). What can blow a small text
/// up is alias expansion and nesting, and those keep fixed limits: the parser's alias limits
/// (a million replayed events at most, the alias/anchor ratio check) and [`MAX_DEPTH`].
fn yaml_options(text_len: usize) -> serde_saphyr::Options {
    let scaled = text_len.saturating_mul(4).saturating_add(4096);
    serde_saphyr::options! {
        // Problems are one line each; the error's line and column say where.
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_events: scaled,
            max_nodes: scaled,
            max_documents: scaled,
            max_total_scalar_bytes: scaled,
            max_reader_input_bytes: None,
            max_depth: MAX_DEPTH,
        },
    }
}

/// Parses one YAML text into a fresh snapshot.
pub fn parse_str(source: &str, text: &str) -> Loaded {
    let mut loader = Loader::new();
    loader.add_text(source, text);
    loader.finish()
}

// The fast reader, not yet wired into the loader: its own tests hold it equal to serde-saphyr.
#[allow(dead_code)]
mod tape;
#[allow(dead_code)]
mod yaml;

#[cfg(test)]
mod tests;
