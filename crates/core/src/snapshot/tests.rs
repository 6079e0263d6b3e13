use super::*;
use crate::well_known::NAMESPACE_NAME_LABEL;
use pretty_assertions::assert_eq;
use serde_json::json;

fn fields(loaded: &Loaded) -> Vec<(&str, &str)> {
    loaded
        .problems
        .iter()
        .map(|p| (p.object.as_str(), p.field.as_str()))
        .collect()
}

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
    assert_eq!(
        fields(&loaded),
        [
            ("ConfigMap/shop/settings", "kind"),
            ("Service/default/broken", "spec.ports"),
            ("Pod/orphan", "apiVersion"),
        ]
    );
    assert!(
        loaded.problems[0]
            .message
            .starts_with("cluster.yaml, document 1, items[1]")
    );
    assert!(loaded.problems[1].message.contains("cluster.yaml, document 3"));
    // An object without apiVersion is not one kubectl printed: the text was not read whole.
    assert_eq!(loaded.unreadable, [loaded.problems[2].clone()]);
}

#[test]
fn a_type_error_names_the_field_path() {
    let loaded = parse_str(
        "svc.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports:
  - {name: http, port: 80}
  - {name: https, port: "443"}
"#,
    );
    assert_eq!(loaded.snapshot.services.len(), 0);
    assert_eq!(fields(&loaded), [("Service/shop/web", "spec.ports[1].port")]);
    let message = &loaded.problems[0].message;
    assert!(
        message.starts_with("svc.yaml: invalid type: string \"443\""),
        "{message}"
    );
    assert!(message.ends_with("object skipped"), "{message}");
    assert!(loaded.is_whole(), "the text was read; one object is bad");
}

#[test]
fn one_object_reads_pruned_and_names_the_field_that_does_not() {
    let service: Service = read_pruned(
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop",
            "managedFields": [{"manager": "kubectl"}], "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"ports": [{"port": 80}], "selector": ["unread", "so", "no", "problem"]}}"#,
    )
    .unwrap();
    assert_eq!(service.metadata.managed_fields, None);
    assert!(service.metadata.annotations.unwrap_or_default().is_empty());
    let spec = service.spec.unwrap();
    assert_eq!(spec.selector, None);
    assert_eq!(spec.ports.unwrap()[0].port, 80);
    let error = read_pruned::<Service>(r#"{"spec": {"ports": [{"port": "80"}]}}"#).unwrap_err();
    assert!(
        error.starts_with("spec.ports[0].port: invalid type: string"),
        "{error}"
    );
    assert!(read_pruned::<Service>(r#"{"spec": {}} trailing"#).is_err());
}

#[test]
fn unparseable_yaml_names_the_file() {
    let loaded = parse_str("bad.yaml", "kind: [unclosed");
    assert_eq!(loaded.problems.len(), 1);
    assert_eq!(loaded.problems[0].object, "bad.yaml");
    assert!(loaded.problems[0].message.starts_with("not valid YAML"));
    assert_eq!(loaded.snapshot.object_count(), 0);
    assert!(!loaded.is_whole());
}

#[test]
fn namespace_labels_include_the_automatic_name_label() {
    let loaded = parse_str(
        "x.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
    );
    let labels = loaded.snapshot.namespace_labels();
    assert_eq!(labels.of("shop")["team"], "a");
    assert_eq!(labels.of("shop")[NAMESPACE_NAME_LABEL], "shop");
    assert_eq!(labels.of("default")[NAMESPACE_NAME_LABEL], "default");
}

/// Pods with the fields a real cluster's have; `count` of them as one `List`.
fn pod_list(count: usize) -> String {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for i in 0..count {
        text.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: web-{i}\n    namespace: shop\n    \
             labels: {{app: web, pod-template-hash: 7d9f8c6b5}}\n    uid: 6f1c2d3e-{i:012x}\n  spec:\n    \
             nodeName: node-{n}\n    containers:\n    - name: app\n      image: example/web:1\n      \
             ports: [{{containerPort: 8080, name: http, protocol: TCP}}]\n      \
             env: [{{name: A, value: a}}, {{name: B, value: b}}, {{name: C, value: c}}]\n      \
             resources: {{requests: {{cpu: 100m, memory: 128Mi}}, limits: {{memory: 256Mi}}}}\n  \
             status:\n    phase: Running\n    podIP: 10.0.{a}.{b}\n    conditions:\n    \
             - {{type: Ready, status: \"True\"}}\n    - {{type: PodScheduled, status: \"True\"}}\n",
            n = i % 50,
            a = i / 250,
            b = i % 250
        ));
    }
    text
}

#[test]
fn a_cluster_beyond_the_parsers_default_budgets_loads() {
    // 3,000 such Pods are about 150,000 nodes, events and more than 1,024 documents' worth of
    // the parser's default limits (250,000 nodes broke a real 600-Pod dump).
    let list = pod_list(3000);
    let loaded = parse_str("pods.yaml", &list);
    assert_eq!(loaded.problems, []);
    assert_eq!(loaded.snapshot.pods.len(), 3000);
    // The same Pods as 3,000 documents: beyond the default 1,024 documents.
    let documents: String = list
        .split("\n- ")
        .skip(1)
        .map(|item| {
            let unindented: Vec<&str> = item.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect();
            format!("---\n{}\n", unindented.join("\n"))
        })
        .collect();
    let loaded = parse_str("pods.yaml", &documents);
    assert_eq!(loaded.problems, []);
    assert_eq!(loaded.snapshot.pods.len(), 3000);
}

#[test]
fn alias_bombs_are_refused() {
    // A billion laughs: nine levels of ten aliases each expand to 10^9 strings.
    let mut bomb = String::from("a0: &a0 [lol]\n");
    for level in 1..10 {
        let prev = level - 1;
        let refs = vec![format!("*a{prev}"); 10].join(", ");
        bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    let started = std::time::Instant::now();
    let loaded = parse_str("bomb.yaml", &bomb);
    assert_eq!(loaded.snapshot.object_count(), 0);
    assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
    let message = &loaded.problems[0].message;
    assert!(message.contains("refused: its aliases expand it"), "{message}");
    assert!(!loaded.is_whole());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused quickly"
    );
}

#[test]
fn deep_nesting_is_refused() {
    for (what, text) in [
        ("block", {
            let mut t = String::new();
            for depth in 0..200 {
                t.push_str(&"  ".repeat(depth));
                t.push_str("a:\n");
            }
            t
        }),
        ("flow", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))),
    ] {
        let loaded = parse_str("deep.yaml", &text);
        assert_eq!(loaded.snapshot.object_count(), 0, "{what}");
        assert_eq!(loaded.problems.len(), 1, "{what}: {:?}", loaded.problems);
        assert_eq!(loaded.problems[0].object, "deep.yaml");
        let message = &loaded.problems[0].message;
        assert!(
            message.contains("refused: nested deeper than 64 levels"),
            "{what}: {message}"
        );
    }
    // Kubernetes objects nest far less than the limit: a Pod's affinity terms in a List load.
    let affinity = json!({"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "a"},
        "spec": {"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]}]}}}},
    }]});
    let loaded = parse_str("pod.json", &affinity.to_string());
    assert_eq!(loaded.problems, []);
}

fn service(name: &str, resource_version: Option<&str>, port: u16) -> Value {
    let mut metadata = json!({"name": name, "namespace": "shop"});
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"ports": [{"port": port}]}})
}

fn load_documents(documents: &[(&str, Value)]) -> Loaded {
    let mut loader = Loader::new();
    for (source, value) in documents {
        loader.add_text(source, &value.to_string());
    }
    loader.finish()
}

#[test]
fn identical_duplicates_collapse_and_name_both_places() {
    let loaded = load_documents(&[
        ("a.yaml", service("web", Some("5"), 80)),
        ("b.yaml", service("web", Some("5"), 80)),
    ]);
    assert_eq!(loaded.snapshot.services.len(), 1);
    assert_eq!(fields(&loaded), [("Service/shop/web", "")]);
    let message = &loaded.problems[0].message;
    assert!(message.contains("identically (a.yaml and b.yaml)"), "{message}");
    assert!(loaded.is_whole());
}

#[test]
fn differing_duplicates_resolve_the_same_way_in_any_order() {
    let port = |loaded: &Loaded| {
        assert_eq!(loaded.snapshot.services.len(), 1);
        assert_eq!(loaded.problems.len(), 1);
        loaded.snapshot.services[0]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0]
            .port
    };
    // The highest resourceVersion wins, as numbers (10 > 9), whichever comes first.
    let old = ("old.yaml", service("web", Some("9"), 80));
    let new = ("new.yaml", service("web", Some("10"), 8080));
    for order in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
        let loaded = load_documents(&order);
        assert_eq!(port(&loaded), 8080);
        let message = &loaded.problems[0].message;
        assert!(
            message
                .contains("kept the copy at new.yaml (resourceVersion 10) over old.yaml (resourceVersion 9)"),
            "{message}"
        );
    }
    // No resourceVersion to tell them apart: the content decides, so both orders agree.
    let a = ("a.yaml", service("web", None, 80));
    let b = ("b.yaml", service("web", None, 9090));
    let c = ("c.yaml", service("web", None, 443));
    let mut winners = Vec::new();
    for order in [
        [a.clone(), b.clone(), c.clone()],
        [c.clone(), b.clone(), a.clone()],
        [b.clone(), a.clone(), c.clone()],
    ] {
        let loaded = load_documents(&order);
        assert_eq!(loaded.snapshot.services.len(), 1);
        assert_eq!(loaded.problems.len(), 2, "one per extra copy");
        winners.push(
            loaded.snapshot.services[0]
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .port,
        );
    }
    assert!(winners.windows(2).all(|w| w[0] == w[1]), "{winners:?}");
}

#[test]
fn same_name_in_another_namespace_or_kind_is_not_a_duplicate() {
    let mut other_ns = service("web", None, 80);
    other_ns["metadata"]["namespace"] = json!("other");
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web", "namespace": "shop"}, "addressType": "IPv4", "endpoints": []});
    let loaded = load_documents(&[
        ("a.yaml", service("web", None, 80)),
        ("b.yaml", other_ns),
        ("c.yaml", slice),
    ]);
    assert_eq!(loaded.problems, []);
    assert_eq!(loaded.snapshot.services.len(), 2);
    assert_eq!(loaded.snapshot.endpoint_slices.len(), 1);
}

#[test]
fn text_encodings_kubectl_users_produce() {
    let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: nodé-a}\n";
    let utf16 = |big_endian: bool| {
        let mut bytes = if big_endian {
            vec![0xFE, 0xFF]
        } else {
            vec![0xFF, 0xFE]
        };
        for unit in yaml.encode_utf16() {
            bytes.extend(if big_endian {
                unit.to_be_bytes()
            } else {
                unit.to_le_bytes()
            });
        }
        bytes
    };
    let with_bom = [&[0xEF, 0xBB, 0xBF][..], yaml.as_bytes()].concat();
    for (what, bytes) in [
        ("UTF-8", yaml.as_bytes().to_vec()),
        ("UTF-8 with BOM", with_bom),
        ("UTF-16LE (PowerShell's >)", utf16(false)),
        ("UTF-16BE", utf16(true)),
    ] {
        let mut loader = Loader::new();
        loader.add_bytes("nodes.yaml", &bytes);
        let loaded = loader.finish();
        assert_eq!(loaded.problems, [], "{what}");
        assert_eq!(
            loaded.snapshot.nodes[0].metadata.name.as_deref(),
            Some("nodé-a"),
            "{what}"
        );
    }
    // Latin-1 and UTF-16 without a BOM are not guessed at: a problem naming the file and byte.
    for (bytes, expect) in [
        (
            b"apiVersion: v1\nkind: Node\nmetadata: {name: nod\xE9}\n".to_vec(),
            "invalid byte 0xE9 at byte 46 (line 3)",
        ),
        (vec![0xFF, 0xFE, 0x61], "odd number of bytes"),
        (vec![0xFF, 0xFE, 0, 0, 0x61, 0, 0, 0], "UTF-32"),
    ] {
        let mut loader = Loader::new();
        loader.add_bytes("latin1.yaml", &bytes);
        let loaded = loader.finish();
        assert_eq!(fields(&loaded), [("latin1.yaml", "")]);
        assert!(
            loaded.problems[0].message.contains(expect),
            "{}",
            loaded.problems[0].message
        );
        assert!(!loaded.is_whole());
    }
}

#[test]
fn a_cut_off_kubectl_list_is_read_but_not_whole() {
    // kubectl prints `kind: List` after the items: a dump cut off anywhere in them lacks it.
    let text = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata:\n    name: a\n- apiVersion: v1\n  kind: Node\n";
    let loaded = parse_str("dump.yaml", text);
    assert_eq!(loaded.snapshot.nodes.len(), 1);
    assert_eq!(
        fields(&loaded),
        [("dump.yaml", "kind"), ("Node/<unnamed>", "metadata.name")]
    );
    assert_eq!(loaded.unreadable.len(), 2);
}

#[test]
fn an_empty_text_holds_nothing_and_says_so() {
    for text in ["", "# just a comment\n", "---\n---\n"] {
        let loaded = parse_str("empty.yaml", text);
        assert_eq!(fields(&loaded), [("empty.yaml", "")], "{text:?}");
        assert!(loaded.problems[0].message.contains("holds no Kubernetes objects"));
        assert!(!loaded.is_whole());
    }
}

#[test]
fn one_bad_allocation_record_is_skipped_and_the_policy_kept() {
    let loaded = parse_str(
        "policy.yaml",
        r#"
apiVersion: portpolicy.io/v1alpha1
kind: PortPolicy
metadata: {name: edge}
spec: {nodePorts: {range: 31000-31099}}
status:
  allocations:
  - {namespace: shop, service: cart, portName: http, kind: Service, nodePort: 31017}
  - {namespace: shop, service: web, portName: http, kind: Service, nodePort: "31042x"}
  - {namespace: shop, service: api, kind: Sideways, nodePort: 31043}
  - {namespace: shop, service: db, kind: Service, nodePort: 31044, releasedAt: "2026-11-20T09:30:00Z"}
  conflicts:
  - {node: a, protocol: TCP, hostIP: 0.0.0.0, hostPort: 80, pods: [x], reason: PodConflict}
  - {node: b}
"#,
    );
    assert_eq!(loaded.snapshot.policies.len(), 1);
    let status = loaded.snapshot.policies[0].status.as_ref().unwrap();
    let kept: Vec<_> = status.allocations.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(kept, ["cart", "db"]);
    assert_eq!(status.conflicts.len(), 1);
    assert_eq!(
        fields(&loaded),
        [
            ("PortPolicy/edge", "status.allocations[1].nodePort"),
            ("PortPolicy/edge", "status.allocations[2].kind"),
            ("PortPolicy/edge", "status.conflicts[1].protocol"),
        ]
    );
    assert!(
        loaded.problems[0]
            .message
            .contains("the policy and its other records are kept")
    );
    // The skipped records are never written back.
    let written = serde_json::to_value(status).unwrap();
    assert_eq!(written["allocations"].as_array().unwrap().len(), 2);
    assert!(written.get("unreadableRecords").is_none());
}

#[test]
fn a_status_round_trips_through_its_tolerant_reader() {
    let status = json!({
        "observedGeneration": 3,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": "",
            "lastTransitionTime": "2026-11-20T09:30:00Z"}],
        "nodePortsUsed": "2/100", "conflictCount": 1, "agentsReady": "3/3",
        "allocations": [{"namespace": "shop", "service": "cart", "portName": "http", "kind": "Service",
            "nodePort": 31017, "releasedAt": "2026-11-20T09:30:00Z"}],
        "conflicts": [{"node": "a", "protocol": "TCP", "hostIP": "0.0.0.0", "hostPort": 80,
            "pods": ["x"], "reason": "PodConflict"}],
    });
    let read: crate::crd::PortPolicyStatus = serde_json::from_value(status.clone()).unwrap();
    assert_eq!(read.unreadable_records, []);
    assert_eq!(serde_json::to_value(&read).unwrap(), status);
}

#[test]
fn a_name_yaml_reads_as_another_type_is_named_as_such() {
    // `n` is false in YAML 1.1, as kubectl reads it too.
    let loaded = parse_str("n.yaml", "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n");
    assert_eq!(fields(&loaded), [("Node/<unnamed>", "metadata.name")]);
    let message = &loaded.problems[0].message;
    assert!(
        message.contains("metadata.name is false, not a string"),
        "{message}"
    );
    assert!(loaded.is_whole(), "one bad object, not a cut-off text");
}

/// The loader under mutation: real-shaped objects (the demo cluster, a full Pod as the API
/// server returns it) with a value of the wrong type, a field removed, the text cut off or
/// random bytes spliced in. Never a panic; every problem names its object (or the file), and
/// an object's problem names the field; a wrong type is named at its own path.
mod mutations {
    use super::*;
    use crate::snapshot::prune::PathStep;
    use proptest::prelude::*;
    use proptest::sample::Index;

    const SOURCE: &str = "mutated.yaml";

    fn demo_texts() -> [&'static str; 2] {
        [
            include_str!("../../../../examples/demo-cluster/cluster.yaml"),
            include_str!("../../../../examples/demo-cluster/workloads.yaml"),
        ]
    }

    /// Every object of the demo cluster and the full Pod fixture.
    fn objects() -> Vec<Value> {
        let mut out = Vec::new();
        for text in demo_texts() {
            for doc in serde_saphyr::from_str_multiple::<Value, Vec<Value>>(text).unwrap() {
                match doc.get("items") {
                    Some(Value::Array(items)) => out.extend(items.iter().cloned()),
                    _ => out.push(doc),
                }
            }
        }
        out.push(serde_json::from_str(include_str!("../hostport/testdata/full-pod.json")).unwrap());
        out
    }

    #[derive(Clone, Debug)]
    enum Step {
        Key(String),
        Item(usize),
    }

    /// A position's field path, spelled as problems spell it (`spec.ports[0].port`).
    fn spelled(steps: &[Step]) -> String {
        let mut out = String::new();
        for step in steps {
            match step {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Step::Item(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// Every position in `value`.
    fn positions(value: &Value, path: Vec<Step>, out: &mut Vec<Vec<Step>>) {
        let children: Vec<(Step, &Value)> = match value {
            Value::Object(map) => map.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (Step::Item(i), v))
                .collect(),
            _ => Vec::new(),
        };
        for (step, child) in children {
            let mut child_path = path.clone();
            child_path.push(step);
            out.push(child_path.clone());
            positions(child, child_path, out);
        }
    }

    fn at_mut<'a>(value: &'a mut Value, path: &[Step]) -> &'a mut Value {
        path.iter().fold(value, |here, step| match step {
            Step::Key(k) => &mut here[k.as_str()],
            Step::Item(i) => &mut here[*i],
        })
    }

    fn mutation_site(object: Index, position: Index) -> (Value, Vec<Step>) {
        let objects = objects();
        let value = objects[object.index(objects.len())].clone();
        let mut paths = Vec::new();
        positions(&value, Vec::new(), &mut paths);
        let path = paths[position.index(paths.len())].clone();
        (value, path)
    }

    /// The demo cluster as one `List` in kubectl's key order, `kind: List` after the items.
    fn kubectl_dump() -> String {
        let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": objects()});
        serde_saphyr::to_string(&list).unwrap()
    }

    /// A value no field of `original`'s type accepts: a scalar becomes a list, a list or a
    /// mapping a string (no Kubernetes scalar reads a list, no list or mapping a string).
    fn wrong_type(original: &Value) -> Value {
        match original {
            Value::Array(_) | Value::Object(_) => json!("not a collection"),
            _ => json!([true]),
        }
    }

    /// Fields whose type takes any JSON (managedFields' fieldsV1), where no type is wrong.
    fn free_form(path: &str) -> bool {
        path.contains("fieldsV1")
    }

    /// Whether the loader reads the field at `path` of `object`: its kind's [`Keep`], and the
    /// type fields every object is checked for.
    fn is_read(object: &Value, path: &[Step]) -> bool {
        let text = |key: &str| object[key].as_str().unwrap_or_default();
        let Some(kind) = kinds::Kind::of(text("apiVersion"), text("kind")) else {
            return true;
        };
        if matches!(path.first(), Some(Step::Key(k)) if k == "apiVersion" || k == "kind") {
            return true;
        }
        kind.keep().keeps(path.iter().map(|step| match step {
            Step::Key(k) => PathStep::Key(k),
            Step::Item(_) => PathStep::Index,
        }))
    }

    fn check_problems(loaded: &Loaded) {
        for p in &loaded.problems {
            assert!(!p.object.is_empty(), "{p:?}");
            assert!(!p.message.is_empty(), "{p:?}");
            if !p.object.starts_with(SOURCE) {
                // Not the file or one of its documents: a `Kind/[namespace/]name`, and a field.
                assert!(p.object.contains('/'), "{p:?}");
                assert!(!p.field.is_empty(), "an object's problem names the field: {p:?}");
                assert!(p.message.starts_with(SOURCE), "and where it was read: {p:?}");
            }
        }
    }

    fn load(text: &str) -> Loaded {
        parse_str(SOURCE, text)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_wrong_type_is_named_at_its_path_where_portpolicy_reads_and_ignored_elsewhere(
            object in any::<Index>(),
            position in any::<Index>(),
        ) {
            let (mut value, path) = mutation_site(object, position);
            let spelled = spelled(&path);
            prop_assume!(!free_form(&spelled));
            let read = is_read(&value, &path);
            let target = at_mut(&mut value, &path);
            *target = wrong_type(target);
            let loaded = load(&serde_saphyr::to_string(&value).unwrap());
            check_problems(&loaded);
            let named = loaded.problems.iter().any(|p| !p.field.is_empty() && spelled.starts_with(&p.field));
            if read {
                prop_assert!(named, "{spelled}: {:#?}", loaded.problems);
            } else {
                // Skipped as it is read: no problem, and the object is kept.
                prop_assert!(!named && loaded.snapshot.object_count() == 1, "{spelled}: {:#?}", loaded.problems);
            }
        }

        #[test]
        fn a_field_removed_anywhere_never_panics(object in any::<Index>(), position in any::<Index>()) {
            let (mut value, path) = mutation_site(object, position);
            let (last, parent) = path.split_last().unwrap();
            match (at_mut(&mut value, parent), last) {
                (Value::Array(items), Step::Item(i)) => {
                    items.remove(*i);
                }
                (Value::Object(map), Step::Key(k)) => {
                    map.remove(k);
                }
                _ => unreachable!("positions come from the value"),
            }
            let loaded = load(&serde_saphyr::to_string(&value).unwrap());
            check_problems(&loaded);
            prop_assert!(
                loaded.snapshot.object_count() == 1 || !loaded.problems.is_empty(),
                "an object not loaded is a problem: {}", spelled(&path)
            );
        }

        #[test]
        fn a_cut_off_dump_never_panics_and_says_it_was_cut(at in any::<Index>()) {
            // kubectl's key order is what makes a cut visible: a cut anywhere before the
            // closing `kind: List` loses it. (A hand-written List with its kind first, or
            // YAML documents cut between two, cannot tell.)
            let text = kubectl_dump();
            let end_of_items = text.rfind("\nkind: List").unwrap();
            let mut cut = at.index(end_of_items);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let loaded = load(&text[..cut]);
            check_problems(&loaded);
            prop_assert!(!loaded.is_whole(), "cut at byte {cut} of {}: {:?}", text.len(), loaded.problems);
        }

        #[test]
        fn random_bytes_spliced_in_never_panic(
            file in 0..2usize,
            at in any::<Index>(),
            bytes in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let text = demo_texts()[file].as_bytes();
            let at = at.index(text.len());
            let spliced = [&text[..at], &bytes[..], &text[at..]].concat();
            let mut loader = Loader::new();
            loader.add_bytes(SOURCE, &spliced);
            check_problems(&loader.finish());
        }
    }
}
