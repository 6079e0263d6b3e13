//! A cluster snapshot: the objects `kubectl get -o yaml` prints, loaded without a cluster.
//!
//! `plan` and the agent's `--snapshot` mode read these; the operator builds the same view from
//! its watch caches. Loading never fails on one bad object: it is reported and skipped.
//!
//! Objects keep only the fields portpolicy reads ([`kinds`]), skipped as they are read: a
//! loaded snapshot's memory follows what is kept, not the size of the dump. Texts are read by
//! the fastest reader that can read them exactly: JSON by serde_json, YAML by the fast reader
//! ([`yaml`]) and, for what it leaves alone (anchors, tags, invalid YAML), by serde-saphyr. All
//! of them feed the same object handling, so an object means the same whichever reader read it.

mod kinds;
mod prune;
mod stream;
mod tape;
mod yaml;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use serde::de::{DeserializeOwned, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::crd::PortPolicy;
use crate::governance::NamespaceLabels;
use crate::hostport::HostPortPod;
use crate::problem::{Problem, object_ref};

use kinds::Kind;
pub(crate) use prune::Keep;
use prune::Pruned;
use tape::Tape;

/// Every object kind portpolicy reads, each holding only the fields portpolicy reads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub policies: Vec<PortPolicy>,
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Pods as the operator's cache holds them: what decides the ports they hold.
    pub pods: Vec<HostPortPod>,
    pub daemon_sets: Vec<DaemonSet>,
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
}

impl Snapshot {
    pub fn object_count(&self) -> usize {
        self.lengths().iter().sum()
    }

    /// How many objects of each kind, in [`Kind`] order.
    fn lengths(&self) -> [usize; 9] {
        [
            self.policies.len(),
            self.namespaces.len(),
            self.nodes.len(),
            self.services.len(),
            self.endpoint_slices.len(),
            self.pods.len(),
            self.daemon_sets.len(),
            self.deployments.len(),
            self.stateful_sets.len(),
        ]
    }

    fn truncate(&mut self, lengths: [usize; 9]) {
        let [a, b, c, d, e, f, g, h, i] = lengths;
        self.policies.truncate(a);
        self.namespaces.truncate(b);
        self.nodes.truncate(c);
        self.services.truncate(d);
        self.endpoint_slices.truncate(e);
        self.pods.truncate(f);
        self.daemon_sets.truncate(g);
        self.deployments.truncate(h);
        self.stateful_sets.truncate(i);
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

/// An object already read, by kind, namespace and name.
#[derive(Debug)]
struct Seen {
    position: usize,
    location: String,
    resource_version: Option<String>,
}

type Identity = (Kind, String, String);

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
    seen: HashMap<Identity, Seen>,
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
        let mut batch = Batch::new(source, text);
        if looks_like_json(text) && batch.read_json() {
            return self.commit(batch);
        }
        batch.reset();
        let read_fast = yaml::read(text, &mut batch).is_ok() && batch.fallback.is_none();
        if !read_fast {
            // Not for the fast reader: the whole of YAML, its budgets and its error messages.
            batch.reset();
            batch.read_yaml_fully();
        }
        self.commit(batch);
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
        let mut batch = Batch::new(location, "");
        batch.documents = 1;
        batch.add_document(location, &value);
        // A value is one object: it was seen, empty or not.
        batch.objects = batch.objects.max(1);
        self.commit(batch);
    }

    pub fn finish(self) -> Loaded {
        self.loaded
    }

    /// Takes what one text held into the snapshot, in the order it was read.
    fn commit(&mut self, batch: Batch<'_>) {
        let Batch {
            source,
            snapshot,
            events,
            objects,
            refused,
            ..
        } = batch;
        let mut policies = snapshot.policies.into_iter();
        let mut namespaces = snapshot.namespaces.into_iter();
        let mut nodes = snapshot.nodes.into_iter();
        let mut services = snapshot.services.into_iter();
        let mut slices = snapshot.endpoint_slices.into_iter();
        let mut pods = snapshot.pods.into_iter();
        let mut daemon_sets = snapshot.daemon_sets.into_iter();
        let mut deployments = snapshot.deployments.into_iter();
        let mut stateful_sets = snapshot.stateful_sets.into_iter();
        for event in events {
            let read = match event {
                Event::Problem(problem) => {
                    self.loaded.problems.push(problem);
                    continue;
                }
                Event::Unreadable(problem) => {
                    self.loaded.unreadable.push(problem.clone());
                    self.loaded.problems.push(problem);
                    continue;
                }
                Event::Object(read) => read,
            };
            let taken = "each object read has its event";
            match read.key.0 {
                Kind::PortPolicy => self.keep(policies.next().expect(taken), read, |s| &mut s.policies),
                Kind::Namespace => self.keep(namespaces.next().expect(taken), read, |s| &mut s.namespaces),
                Kind::Node => self.keep(nodes.next().expect(taken), read, |s| &mut s.nodes),
                Kind::Service => self.keep(services.next().expect(taken), read, |s| &mut s.services),
                Kind::EndpointSlice => {
                    self.keep(slices.next().expect(taken), read, |s| &mut s.endpoint_slices)
                }
                Kind::Pod => self.keep(pods.next().expect(taken), read, |s| &mut s.pods),
                Kind::DaemonSet => self.keep(daemon_sets.next().expect(taken), read, |s| &mut s.daemon_sets),
                Kind::Deployment => self.keep(deployments.next().expect(taken), read, |s| &mut s.deployments),
                Kind::StatefulSet => {
                    self.keep(stateful_sets.next().expect(taken), read, |s| &mut s.stateful_sets)
                }
            }
        }
        if objects == 0 && !refused {
            self.unreadable(&source, "holds no Kubernetes objects");
        }
    }

    /// Keeps one object, once per identity (see [`Loader`] for which copy wins).
    fn keep<K: Serialize>(&mut self, object: K, read: ReadObject, into: fn(&mut Snapshot) -> &mut Vec<K>) {
        let into = into(&mut self.loaded.snapshot);
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
                    location,
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
            self.loaded.problems.push(Problem::new(
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
                (location.clone(), version(&resource_version)),
                (seen.location.clone(), version(&seen.resource_version)),
            )
        } else {
            (
                (seen.location.clone(), version(&seen.resource_version)),
                (location.clone(), version(&resource_version)),
            )
        };
        self.loaded.problems.push(Problem::new(
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
            seen.location = location;
            seen.resource_version = resource_version;
        }
    }
}

fn json_text<K: Serialize>(object: &K) -> String {
    serde_json::to_string(object).unwrap_or_default()
}

/// Whether a text is JSON, as `kubectl get -o json` writes it (YAML could be too: if serde_json
/// refuses it, the YAML readers try).
fn looks_like_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// One object as read, its identity checked, waiting for its text to be read whole.
#[derive(Debug)]
struct ReadObject {
    /// `Kind/namespace/name`, as problems name it.
    object: String,
    location: String,
    key: Identity,
    resource_version: Option<String>,
}

#[derive(Debug)]
enum Event {
    Problem(Problem),
    Unreadable(Problem),
    Object(ReadObject),
}

/// What one text held, kept apart until the text has been read to its end: a reader that gives
/// up halfway leaves nothing behind, and a streamed `List` that turns out not to be one can be
/// taken back.
struct Batch<'t> {
    source: String,
    text: &'t str,
    /// How many documents the text holds: a lone document is named by the file alone.
    documents: usize,
    snapshot: Snapshot,
    events: Vec<Event>,
    /// Documents and items met, to tell an empty text.
    objects: usize,
    /// The text as a whole could not be read (reported already, so not as empty too).
    refused: bool,
    /// Set when the fast reader's sink could not go on (a document to read again, whole, did
    /// not read): the text goes to serde-saphyr.
    fallback: Option<yaml::Unsupported>,
    /// Where the document being streamed started: its events, objects and kept objects.
    document_start: (usize, usize, [usize; 9]),
}

impl<'t> Batch<'t> {
    fn new(source: &str, text: &'t str) -> Self {
        Batch {
            source: source.to_string(),
            text,
            documents: 0,
            snapshot: Snapshot::default(),
            events: Vec::new(),
            objects: 0,
            refused: false,
            fallback: None,
            document_start: (0, 0, [0; 9]),
        }
    }

    /// Forgets everything read, for another reader to start over.
    fn reset(&mut self) {
        let (source, text) = (std::mem::take(&mut self.source), self.text);
        *self = Batch::new(&source, text);
    }

    fn problem(&mut self, problem: Problem) {
        self.events.push(Event::Problem(problem));
    }

    fn unreadable(&mut self, problem: Problem) {
        self.events.push(Event::Unreadable(problem));
    }

    /// `file` alone for a text of one document, `file, document N` otherwise.
    fn document_location(&self, document: usize) -> String {
        if self.documents == 1 {
            self.source.clone()
        } else {
            format!("{}, document {}", self.source, document + 1)
        }
    }

    /// Reads the text as one JSON object, as `kubectl get -o json` writes it; `false` when it
    /// is not one (nothing is kept then). A `List`'s items are found in the same pass that
    /// checks the text, and each is then read on its own.
    fn read_json(&mut self) -> bool {
        let Ok(root) = serde_json::from_str::<JsonRoot<'t>>(self.text) else {
            return false;
        };
        self.documents = 1;
        let location = self.source.clone();
        let kind = root.kind.as_ref().and_then(Value::as_str).unwrap_or_default();
        let Some(cut_off) = list_kind(kind, root.items.shape()) else {
            // One object: read whole.
            let Ok(whole) = serde_json::from_str::<&'t RawValue>(self.text) else {
                return false;
            };
            self.add_document(&location, whole);
            return true;
        };
        self.objects += 1;
        if cut_off {
            self.cut_off_list(&location, None);
        }
        if let JsonItems::Seq(items) = root.items {
            for (i, item) in items.into_iter().enumerate() {
                self.add_document(&format!("{location}, items[{i}]"), item);
            }
        }
        true
    }

    /// Reads the text with serde-saphyr: all of YAML, with its budgets against alias bombs and
    /// its error messages.
    fn read_yaml_fully(&mut self) {
        let documents = match serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(
            self.text,
            yaml_options(self.text.len()),
        ) {
            Ok(documents) => documents,
            Err(e) => {
                let problem = Problem::new(&self.source, "", format!("not valid YAML: {}", refusal(&e)));
                self.refused = true;
                return self.unreadable(problem);
            }
        };
        self.documents = documents.len();
        for (i, document) in documents.iter().enumerate() {
            let location = self.document_location(i);
            self.add_document(&location, document);
        }
    }

    /// The problem of a `List` without its `kind`, placed before its items' (at `at`, the
    /// event its document started at, when its items were read first).
    fn cut_off_list(&mut self, location: &str, at: Option<usize>) {
        let problem = Problem::new(
            location,
            "kind",
            "has items but no kind: List (kubectl prints the kind after the items: this dump was \
             cut off); its items are read, the rest of it is lost",
        );
        let event = Event::Unreadable(problem);
        match at {
            Some(at) => self.events.insert(at, event),
            None => self.events.push(event),
        }
    }

    /// One document, or one item of a `List`: an object, or a `List` whose items are read.
    fn add_document<'de, S: Source<'de>>(&mut self, location: &str, source: S) {
        match source.shape() {
            Shape::Null => return,
            Shape::Other => {
                self.objects += 1;
                return self.unreadable(Problem::new(
                    location,
                    "",
                    "not a Kubernetes object (expected a mapping with apiVersion and kind)",
                ));
            }
            Shape::Map => self.objects += 1,
        }
        let (api_version, kind) = source.type_meta();
        let kind_text = kind.as_deref().unwrap_or_default();
        if kind_text.is_empty() || kind_text.ends_with("List") {
            let items = source.items();
            let shape = match &items {
                None => ItemsShape::Absent,
                Some(Items::Null) => ItemsShape::Null,
                Some(Items::Seq(_)) => ItemsShape::Seq,
                Some(Items::Other) => ItemsShape::Other,
            };
            if let Some(cut_off) = list_kind(kind_text, shape) {
                if cut_off {
                    self.cut_off_list(location, None);
                }
                if let Some(Items::Seq(items)) = items {
                    for (i, item) in items.into_iter().enumerate() {
                        self.add_document(&format!("{location}, items[{i}]"), item);
                    }
                }
                return;
            }
        }
        self.add_object(location, source, api_version.as_deref(), kind.as_deref());
    }

    /// One object: typed as its kind, with only the fields portpolicy reads.
    fn add_object<'de, S: Source<'de>>(
        &mut self,
        location: &str,
        source: S,
        api_version: Option<&str>,
        kind: Option<&str>,
    ) {
        let tag = match (api_version, kind) {
            (Some(api_version), Some(kind)) => Kind::of(api_version, kind),
            _ => None,
        };
        let Some(tag) = tag else {
            // Missing, mistyped or unknown: the header says which.
            self.header_problem(location, source);
            return;
        };
        match tag {
            Kind::PortPolicy => {
                let Some((policy, read)) = self.typed::<PortPolicy, S>(location, source, tag) else {
                    return;
                };
                if let Some(status) = &policy.status {
                    for p in status.unreadable_record_problems(policy.name()) {
                        self.problem(Problem {
                            message: format!("{location}: {}", p.message),
                            ..p
                        });
                    }
                }
                self.push(policy, read, |s| &mut s.policies);
            }
            Kind::Namespace => self.typed_into(location, source, tag, |s| &mut s.namespaces),
            Kind::Node => self.typed_into(location, source, tag, |s| &mut s.nodes),
            Kind::Service => self.typed_into(location, source, tag, |s| &mut s.services),
            Kind::EndpointSlice => self.typed_into(location, source, tag, |s| &mut s.endpoint_slices),
            Kind::Pod => self.typed_into(location, source, tag, |s| &mut s.pods),
            Kind::DaemonSet => self.typed_into(location, source, tag, |s| &mut s.daemon_sets),
            Kind::Deployment => self.typed_into(location, source, tag, |s| &mut s.deployments),
            Kind::StatefulSet => self.typed_into(location, source, tag, |s| &mut s.stateful_sets),
        }
    }

    fn typed_into<'de, K, S>(
        &mut self,
        location: &str,
        source: S,
        tag: Kind,
        into: fn(&mut Snapshot) -> &mut Vec<K>,
    ) where
        K: DeserializeOwned + Resource<DynamicType = ()>,
        S: Source<'de>,
    {
        if let Some((object, read)) = self.typed::<K, S>(location, source, tag) {
            self.push(object, read, into);
        }
    }

    fn push<K>(&mut self, object: K, read: ReadObject, into: fn(&mut Snapshot) -> &mut Vec<K>) {
        into(&mut self.snapshot).push(object);
        self.events.push(Event::Object(read));
    }

    /// The object typed through its kind's [`Keep`], its identity checked; `None` after
    /// reporting why not.
    fn typed<'de, K, S>(&mut self, location: &str, source: S, tag: Kind) -> Option<(K, ReadObject)>
    where
        K: DeserializeOwned + Resource<DynamicType = ()>,
        S: Source<'de>,
    {
        let mut object = match K::deserialize(Pruned::new(source.deserializer(), tag.keep())) {
            Ok(object) => object,
            Err(_) => {
                // The header's checks name a broken identity the way they always have; any
                // other field is named by its path.
                if !self.header_problem(location, source) {
                    self.type_error::<K, S>(location, source, tag);
                }
                return None;
            }
        };
        let meta = object.meta_mut();
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            if !self.header_problem(location, source) {
                self.unreadable(Problem::new(
                    location,
                    "metadata.name",
                    format!("{location}: missing metadata.name"),
                ));
            }
            return None;
        };
        let mut namespace = meta.namespace.clone().filter(|n| !n.is_empty());
        // A namespaced object without a namespace is in `default`, as `kubectl apply` would put it.
        if tag.namespaced() && namespace.is_none() {
            namespace = Some("default".to_string());
        }
        if namespace.is_some() {
            meta.namespace = namespace.clone();
        }
        let resource_version = meta.resource_version.clone();
        let kind = K::kind(&());
        let read = ReadObject {
            object: object_ref(&kind, namespace.as_deref(), &name),
            location: location.to_string(),
            key: (tag, namespace.unwrap_or_default(), name),
            resource_version,
        };
        Some((object, read))
    }

    /// Reports why an object cannot be typed, naming the field's path.
    fn type_error<'de, K: DeserializeOwned, S: Source<'de>>(&mut self, location: &str, source: S, tag: Kind) {
        let header = source.header();
        let identity = Header::of(&header);
        let object = identity.object_ref(Some(tag));
        match serde_path_to_error::deserialize::<_, K>(Pruned::new(source.deserializer(), tag.keep())) {
            Ok(_) => self.problem(Problem::new(
                object,
                "",
                format!("{location}: cannot be read; object skipped"),
            )),
            Err(e) => {
                let field = error_field(&e);
                self.problem(Problem::new(
                    object,
                    field,
                    format!("{location}: {}; object skipped", e.into_inner()),
                ));
            }
        }
    }

    /// Checks what every object needs before it can be typed (a mapping for metadata, string
    /// identity fields, apiVersion, kind and name present, a kind portpolicy reads); reports the
    /// first thing wrong and returns whether it found one.
    fn header_problem<'de, S: Source<'de>>(&mut self, location: &str, source: S) -> bool {
        let header = source.header();
        let identity = Header::of(&header);
        let meta = header.get("metadata");
        let tag = Kind::of(identity.api_version, identity.kind);
        let object = identity.object_ref(tag);
        // Fields read before typing the object: the wrong type in one of them is that object's
        // problem (typing would name it too, but a namespace of the wrong type would first
        // have become `default`).
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
            self.problem(Problem::new(
                object,
                &field,
                format!("{location}: {field} is {v}, not {wanted}; object skipped"),
            ));
            return true;
        }
        let missing = if identity.api_version.is_empty() {
            Some("apiVersion")
        } else if identity.kind.is_empty() {
            Some("kind")
        } else if identity.name.is_none() {
            Some("metadata.name")
        } else {
            None
        };
        if let Some(field) = missing {
            let problem = Problem::new(&object, field, format!("{location}: missing {field}"));
            // Absent, it is cut off or not an object (kubectl prints all three on every object);
            // present but not a string, it is one bad object.
            let value = match field {
                "metadata.name" => meta.and_then(|m| m.get("name")),
                key => header.get(key),
            };
            match value.filter(|v| !v.is_null()) {
                Some(v) if !v.is_string() => self.problem(Problem {
                    message: format!(
                        "{location}: {field} is {v}, not a string (quote it: YAML reads y, n, yes, no, \
                         on, off and numbers as other types); object skipped"
                    ),
                    ..problem
                }),
                _ => self.unreadable(problem),
            }
            return true;
        }
        if tag.is_none() {
            self.problem(Problem::new(
                object,
                "kind",
                format!(
                    "{location}: {} {} is not a kind portpolicy reads; ignored",
                    identity.api_version, identity.kind
                ),
            ));
            return true;
        }
        false
    }
}

/// Whether a document of this kind with these items is a `List`: `Some(cut_off)` when its
/// items are to be read (`cut_off` when it has items but lost its `kind: List`), `None` when it
/// is an object.
fn list_kind(kind: &str, items: ItemsShape) -> Option<bool> {
    let is_list = items == ItemsShape::Seq && kind.ends_with("List");
    // kubectl prints `kind: List` after the items, so a dump cut off in them has none.
    let cut_off = kind.is_empty() && matches!(items, ItemsShape::Seq | ItemsShape::Null);
    (is_list || cut_off).then_some(cut_off)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ItemsShape {
    Absent,
    Null,
    Seq,
    Other,
}

/// The identity fields of an object, read from its header (see [`Source::header`]).
struct Header<'a> {
    api_version: &'a str,
    kind: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn of(header: &'a Value) -> Self {
        let text = |key: &str| header.get(key).and_then(Value::as_str).unwrap_or_default();
        let meta = header.get("metadata");
        let meta_text = |key: &str| {
            meta.and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
        };
        Header {
            api_version: text("apiVersion"),
            kind: text("kind"),
            namespace: meta_text("namespace"),
            name: meta_text("name"),
        }
    }

    /// `Kind/namespace/name` as problems name the object, namespaced kinds in `default` when
    /// they name none.
    fn object_ref(&self, tag: Option<Kind>) -> String {
        let namespace = match self.namespace {
            None if tag.is_some_and(Kind::namespaced) => Some("default"),
            namespace => namespace,
        };
        object_ref(
            if self.kind.is_empty() {
                "<no kind>"
            } else {
                self.kind
            },
            namespace,
            self.name.unwrap_or("<unnamed>"),
        )
    }
}

/// What the object handling asks of an object, whichever reader holds it: a node of the fast
/// YAML reader's tape, a `serde_json::Value` (serde-saphyr's reading, or the live lister's),
/// or the raw text of a JSON object.
trait Source<'de>: Copy {
    type De: Deserializer<'de, Error = serde_json::Error>;

    fn deserializer(self) -> Self::De;
    fn shape(self) -> Shape;
    /// `apiVersion` and `kind`, each when it is a string.
    fn type_meta(self) -> (Option<Cow<'de, str>>, Option<Cow<'de, str>>);
    /// `items`, when the object has the field.
    fn items(self) -> Option<Items<Self>>;

    /// `apiVersion`, `kind` and the metadata's name, namespace and resourceVersion, as they
    /// are: for problems, so only when something is wrong.
    fn header(self) -> Value {
        Value::deserialize(Pruned::new(self.deserializer(), &HEADER)).unwrap_or(Value::Null)
    }
}

const HEADER: Keep = Keep::Fields(&[
    ("apiVersion", Keep::All),
    ("kind", Keep::All),
    (
        "metadata",
        Keep::Fields(&[
            ("name", Keep::All),
            ("namespace", Keep::All),
            ("resourceVersion", Keep::All),
        ]),
    ),
]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Null,
    Map,
    Other,
}

enum Items<S> {
    Null,
    Seq(Vec<S>),
    Other,
}

impl<'t> Source<'t> for tape::Node<'t> {
    type De = tape::Node<'t>;

    fn deserializer(self) -> Self::De {
        self
    }

    fn shape(self) -> Shape {
        if self.is_null() {
            Shape::Null
        } else if self.is_map() {
            Shape::Map
        } else {
            Shape::Other
        }
    }

    fn type_meta(self) -> (Option<Cow<'t, str>>, Option<Cow<'t, str>>) {
        let text = |key| self.get(key).and_then(|v| v.as_str()).map(Cow::Borrowed);
        (text("apiVersion"), text("kind"))
    }

    fn items(self) -> Option<Items<Self>> {
        let items = self.get("items")?;
        Some(if items.is_null() {
            Items::Null
        } else if items.is_seq() {
            Items::Seq(items.elements().collect())
        } else {
            Items::Other
        })
    }
}

impl<'v> Source<'v> for &'v Value {
    type De = &'v Value;

    fn deserializer(self) -> Self::De {
        self
    }

    fn shape(self) -> Shape {
        match self {
            Value::Null => Shape::Null,
            Value::Object(_) => Shape::Map,
            _ => Shape::Other,
        }
    }

    fn type_meta(self) -> (Option<Cow<'v, str>>, Option<Cow<'v, str>>) {
        let text = |key| self.get(key).and_then(Value::as_str).map(Cow::Borrowed);
        (text("apiVersion"), text("kind"))
    }

    fn items(self) -> Option<Items<Self>> {
        Some(match self.get("items")? {
            Value::Null => Items::Null,
            Value::Array(items) => Items::Seq(items.iter().collect()),
            _ => Items::Other,
        })
    }
}

impl<'j> Source<'j> for &'j RawValue {
    type De = &'j RawValue;

    fn deserializer(self) -> Self::De {
        self
    }

    fn shape(self) -> Shape {
        match self.get().as_bytes().first() {
            Some(b'n') => Shape::Null,
            Some(b'{') => Shape::Map,
            _ => Shape::Other,
        }
    }

    fn type_meta(self) -> (Option<Cow<'j, str>>, Option<Cow<'j, str>>) {
        if let Some((api_version, kind)) = leading_type_meta(self.get()) {
            return (Some(Cow::Borrowed(api_version)), Some(Cow::Borrowed(kind)));
        }
        /// Each field raw, so that one of another type is no string rather than no object.
        #[derive(Deserialize)]
        struct TypeMeta<'a> {
            #[serde(rename = "apiVersion", borrow, default)]
            api_version: Option<&'a RawValue>,
            #[serde(borrow, default)]
            kind: Option<&'a RawValue>,
        }
        let Ok(meta) = serde_json::from_str::<TypeMeta<'j>>(self.get()) else {
            return (None, None);
        };
        let text = |raw: Option<&'j RawValue>| {
            raw.and_then(|raw| serde_json::from_str::<Cow<'j, str>>(raw.get()).ok())
        };
        (text(meta.api_version), text(meta.kind))
    }

    fn items(self) -> Option<Items<Self>> {
        #[derive(Deserialize)]
        struct WithItems<'a> {
            #[serde(borrow, default)]
            items: JsonItems<'a>,
        }
        let probe = serde_json::from_str::<WithItems<'j>>(self.get()).ok()?;
        match probe.items {
            JsonItems::Absent => None,
            JsonItems::Null => Some(Items::Null),
            JsonItems::Seq(items) => Some(Items::Seq(items)),
            JsonItems::Other => Some(Items::Other),
        }
    }
}

/// The `apiVersion` and `kind` of a JSON object when they are its first two fields, plain
/// strings, as kubectl writes every object: read off the text without parsing the object.
fn leading_type_meta(text: &str) -> Option<(&str, &str)> {
    let mut rest = text.strip_prefix('{')?;
    let (mut api_version, mut kind) = (None, None);
    for _ in 0..2 {
        rest = rest.trim_start();
        let (key, after) = simple_string(rest)?;
        rest = after.trim_start().strip_prefix(':')?.trim_start();
        let (value, after) = simple_string(rest)?;
        rest = after.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
        match key {
            "apiVersion" => api_version = Some(value),
            "kind" => kind = Some(value),
            _ => return None,
        }
    }
    Some((api_version?, kind?))
}

/// A JSON string without escapes at the start of `text`, and what follows it.
fn simple_string(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix('"')?;
    let end = memchr::memchr2(b'"', b'\\', body.as_bytes())?;
    (body.as_bytes()[end] == b'"').then(|| (&body[..end], &body[end + 1..]))
}

/// A JSON document's root, read in one pass: what decides whether it is a `List`, and its
/// items as raw text, each read on its own afterwards.
#[derive(Deserialize)]
struct JsonRoot<'a> {
    #[serde(default)]
    kind: Option<Value>,
    #[serde(borrow, default)]
    items: JsonItems<'a>,
}

#[derive(Default)]
enum JsonItems<'a> {
    #[default]
    Absent,
    Null,
    Seq(Vec<&'a RawValue>),
    Other,
}

impl JsonItems<'_> {
    fn shape(&self) -> ItemsShape {
        match self {
            JsonItems::Absent => ItemsShape::Absent,
            JsonItems::Null => ItemsShape::Null,
            JsonItems::Seq(_) => ItemsShape::Seq,
            JsonItems::Other => ItemsShape::Other,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonItems<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ItemsVisitor<'a> {
            type Value = JsonItems<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("anything")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(JsonItems::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(JsonItems::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(JsonItems::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(JsonItems::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(JsonItems::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(JsonItems::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(JsonItems::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(JsonItems::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(JsonItems::Other)
            }
        }
        d.deserialize_any(ItemsVisitor(std::marker::PhantomData))
    }
}

impl yaml::Sink for Batch<'_> {
    fn begin(&mut self, documents: usize) {
        self.documents = documents;
    }

    fn item(&mut self, document: usize, index: usize, item: tape::Node<'_>) {
        if index == 0 {
            self.document_start = (self.events.len(), self.objects, self.snapshot.lengths());
        }
        let location = format!("{}, items[{index}]", self.document_location(document));
        self.add_document(&location, item);
    }

    fn document(
        &mut self,
        document: usize,
        root: tape::Node<'_>,
        streamed: Option<usize>,
        span: Range<usize>,
    ) {
        let location = self.document_location(document);
        let Some(count) = streamed else {
            return self.add_document(&location, root);
        };
        let (events, objects, lengths) = if count == 0 {
            (self.events.len(), self.objects, self.snapshot.lengths())
        } else {
            self.document_start
        };
        let (_, kind) = root.type_meta();
        match list_kind(kind.as_deref().unwrap_or_default(), ItemsShape::Seq) {
            Some(cut_off) => {
                // The items counted as they were read; the document itself counts too.
                self.objects += 1;
                if cut_off {
                    self.cut_off_list(&location, Some(events));
                }
            }
            None => {
                // Not a List after all: its items were fields of one object. Read it again whole.
                self.events.truncate(events);
                self.objects = objects;
                self.snapshot.truncate(lengths);
                let mut tape = Tape::default();
                match yaml::read_node(self.text, span, &mut tape) {
                    Ok(()) => self.add_document(&location, tape.node(self.text, 0)),
                    Err(unsupported) => self.fallback = Some(unsupported),
                }
            }
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

/// Reads one object's JSON (a watch event's, a list item's) as a snapshot keeps it: only the
/// fields portpolicy reads, the rest skipped unread. `K` must be a kind a snapshot holds. The
/// error names the field that does not read (`spec.ports[0].port: invalid type: ...`).
pub fn read_pruned<K>(json: &str) -> Result<K, String>
where
    K: DeserializeOwned + Resource<DynamicType = ()>,
{
    let kind = Kind::of(&K::api_version(&()), &K::kind(&()))
        .ok_or_else(|| format!("{} is not a kind portpolicy reads", K::kind(&())))?;
    let mut json = serde_json::Deserializer::from_str(json);
    let object = match serde_path_to_error::deserialize::<_, K>(Pruned::new(&mut json, kind.keep())) {
        Ok(object) => object,
        Err(e) => {
            let field = error_field(&e);
            let message = e.into_inner().to_string();
            return Err(if field.is_empty() {
                message
            } else {
                format!("{field}: {message}")
            });
        }
    };
    json.end().map_err(|e| e.to_string())?;
    Ok(object)
}

/// Parses one YAML text into a fresh snapshot.
pub fn parse_str(source: &str, text: &str) -> Loaded {
    let mut loader = Loader::new();
    loader.add_text(source, text);
    loader.finish()
}

#[cfg(test)]
mod tests;
