//! `portpolicy plan` and `agent --print-table` on the input people really have: standard input,
//! the same objects read twice, documents in any order, a bad status record, hostile names,
//! many overlapping policies, a snapshot cut off mid-write. Each runs the binary as a user would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const NOW: &str = "2026-11-26T12:00:00Z";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo() -> PathBuf {
    root().join("examples/demo-cluster")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(binary: &Path, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(binary)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn portpolicy(args: &[&str]) -> Run {
    run(Path::new(env!("CARGO_BIN_EXE_portpolicy")), args, None)
}

fn plan(paths: &[&Path], output: &str) -> Run {
    let mut args = vec!["plan", "--now", NOW, "-o", output];
    for p in paths {
        args.extend(["-f", p.to_str().unwrap()]);
    }
    portpolicy(&args)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portpolicy-input-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(root().join("tests/golden").join(name)).unwrap()
}

/// Every object of the demo cluster, as parsed values.
fn demo_objects() -> Vec<Value> {
    let mut objects = Vec::new();
    for file in ["cluster.yaml", "workloads.yaml"] {
        let text = std::fs::read_to_string(demo().join(file)).unwrap();
        for doc in serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text).unwrap() {
            match doc.get("items") {
                Some(Value::Array(items)) => objects.extend(items.iter().cloned()),
                _ => objects.push(doc),
            }
        }
    }
    objects
}

fn problems(json: &Value) -> Vec<(String, String, String)> {
    json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap().to_string();
            (s("object"), s("field"), s("message"))
        })
        .collect()
}

#[test]
fn plan_reads_standard_input() {
    let text = std::fs::read(demo().join("cluster.yaml")).unwrap();
    let workloads = std::fs::read(demo().join("workloads.yaml")).unwrap();
    let stdin = [&text[..], b"\n---\n", &workloads[..]].concat();
    let out = run(
        Path::new(env!("CARGO_BIN_EXE_portpolicy")),
        &["plan", "-f", "-", "--now", NOW],
        Some(&stdin),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, golden("demo-plan.txt"));
}

#[test]
fn documents_in_any_order_and_any_files_plan_to_the_same_bytes() {
    let objects = demo_objects();
    let dir = scratch("shuffled");
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..4 {
        let mut shuffled = objects.clone();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        // Spread over up to three files, some as Lists, some as YAML documents.
        let files = 1 + (next() % 3) as usize;
        let round_dir = dir.join(format!("round-{round}"));
        std::fs::create_dir_all(&round_dir).unwrap();
        for f in 0..files {
            let mine: Vec<&Value> = shuffled.iter().skip(f).step_by(files).collect();
            let text = if next() % 2 == 0 {
                json!({"apiVersion": "v1", "kind": "List", "items": mine}).to_string()
            } else {
                mine.iter().map(|o| format!("---\n{o}\n")).collect()
            };
            // Names sort differently from the files' order of creation.
            let name = format!("{:016x}.yaml", next());
            std::fs::write(round_dir.join(name), text).unwrap();
        }
        for (output, golden_file) in [("table", "demo-plan.txt"), ("json", "demo-plan.json")] {
            let out = plan(&[&round_dir], output);
            assert_eq!(out.code, 0, "{}", out.stderr);
            pretty_assertions::assert_eq!(out.stdout, golden(golden_file), "round {round}, {output}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_same_cluster_read_twice_plans_as_once() {
    // Two copies of the demo directory (a backup beside the original, a ConfigMap mount):
    // before, every Service was "selected by PortPolicy/edge and PortPolicy/edge".
    let dir = scratch("twice");
    for copy in ["a", "b"] {
        std::fs::create_dir_all(dir.join(copy)).unwrap();
        for file in ["cluster.yaml", "workloads.yaml"] {
            std::fs::copy(demo().join(file), dir.join(copy).join(file)).unwrap();
        }
    }
    let out = plan(&[&dir], "json");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let twice: Value = serde_json::from_str(&out.stdout).unwrap();
    let once: Value = serde_json::from_str(&golden("demo-plan.json")).unwrap();
    for key in ["nodePorts", "hostPortConflicts", "everyNode", "nodes"] {
        assert_eq!(twice[key], once[key], "{key}");
    }
    let extra: Vec<_> = problems(&twice)
        .into_iter()
        .filter(|p| !problems(&once).contains(p))
        .collect();
    assert!(!extra.is_empty());
    for (object, field, message) in &extra {
        assert_eq!(field, "", "{object}");
        assert!(
            message.contains("read twice, identically") && message.contains("/a/") && message.contains("/b/"),
            "{object}: {message}"
        );
    }
    assert_eq!(
        extra.len(),
        demo_objects().len(),
        "one note per object read twice"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_bad_allocation_record_keeps_the_policy_and_its_other_records() {
    let dir = scratch("bad-record");
    let cluster = std::fs::read_to_string(demo().join("cluster.yaml")).unwrap();
    let record = "service: storefront, portName: http, kind: Service, nodePort: 31042}";
    assert!(cluster.contains(record));
    let broken = cluster.replace(record, &record.replace("31042", "\"31042x\""));
    std::fs::write(dir.join("cluster.yaml"), broken).unwrap();
    std::fs::copy(demo().join("workloads.yaml"), dir.join("workloads.yaml")).unwrap();

    let out = plan(&[&dir], "json");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let clean: Value = serde_json::from_str(&golden("demo-plan.json")).unwrap();
    // Before: the whole policy was dropped and 5 of the 8 nodePorts vanished.
    assert_eq!(json["nodePorts"], clean["nodePorts"]);
    let record_problems: Vec<_> = problems(&json)
        .into_iter()
        .filter(|(_, field, _)| field.starts_with("status."))
        .collect();
    assert_eq!(record_problems.len(), 1, "{record_problems:?}");
    let (object, field, message) = &record_problems[0];
    assert_eq!(
        (object.as_str(), field.as_str()),
        ("PortPolicy/edge", "status.allocations[1].nodePort")
    );
    assert!(message.contains("31042x"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_type_error_names_the_object_and_field_path() {
    let dir = scratch("type-error");
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\napiVersion: v1\nkind: Service\n\
         metadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - {port: \"80\"}\n",
    )
    .unwrap();
    let out = plan(&[&dir.join("svc.yaml")], "json");
    assert_eq!(out.code, 0);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let found: Vec<_> = problems(&json)
        .into_iter()
        .filter(|(object, _, _)| object.starts_with("Service/"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].0.as_str(), found[0].1.as_str()),
        ("Service/shop/web", "spec.ports[0].port")
    );
    assert!(
        found[0]
            .2
            .contains("svc.yaml, document 2: invalid type: string \"80\""),
        "{}",
        found[0].2
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn control_characters_in_names_are_escaped_in_the_table() {
    let dir = scratch("controls");
    // A name no API server would accept, but a snapshot file can hold anything.
    let evil = "web\u{1b}[2J\u{1b}[31m\nFAKE ROW\r";
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": evil, "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.1", "ports": [{"port": 80, "nodePort": 30080}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": evil, "namespace": "shop"}},
    ]});
    std::fs::write(dir.join("evil.json"), objects.to_string()).unwrap();
    let out = plan(&[&dir.join("evil.json")], "table");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !out.stdout.contains('\u{1b}') && !out.stdout.contains('\r'),
        "{:?}",
        out.stdout
    );
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("FAKE ROW")),
        "a name must not start a line of its own"
    );
    let escaped = "web\\u{1b}[2J\\u{1b}[31m\\nFAKE ROW\\r";
    let mentions = out.stdout.matches(escaped).count();
    assert!(
        mentions >= 3,
        "node port row, IPVS listing and problem: {}",
        out.stdout
    );
    // JSON keeps the exact name: it is escaped by JSON itself.
    let out = plan(&[&dir.join("evil.json")], "json");
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["nodePorts"][0]["service"], format!("shop/{evil}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn many_overlapping_policies_make_a_linear_number_of_problems() {
    const POLICIES: usize = 200;
    const SERVICES: usize = 20;
    let dir = scratch("overlap");
    let mut items = vec![json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})];
    for p in 0..POLICIES {
        // Every policy selects every Service, in the same range.
        items.push(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": format!("p-{p:03}")}, "spec": {"nodePorts": {"range": "31000-31999"}}}),
        );
    }
    for s in 0..SERVICES {
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": "shop"},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]}}));
    }
    std::fs::write(
        dir.join("cluster.json"),
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    let out = plan(&[&dir.join("cluster.json")], "json");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let found = problems(&json);
    // Before: one problem per ordered pair of policies, 39,800 of them. Now one per policy,
    // and a few per Service (selected by several policies, both for its nodePorts and for its
    // IPVS rules; no cluster IP) and the Node.
    assert!(
        found.len() <= POLICIES + 3 * SERVICES + 1,
        "{} problems for {POLICIES} policies and {SERVICES} Services",
        found.len()
    );
    let overlap = found
        .iter()
        .find(|(object, field, _)| object == "PortPolicy/p-000" && field == "spec.nodePorts.range")
        .unwrap();
    assert!(overlap.2.contains("and 196 more"), "{}", overlap.2);
    std::fs::remove_dir_all(&dir).unwrap();
}

const AGENT_SNAPSHOT: &str = "apiVersion: v1
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
  status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
- apiVersion: v1
  kind: Service
  metadata: {name: bad, namespace: shop}
  spec: {ports: [{port: \"80\"}]}
kind: List
metadata:
  resourceVersion: \"\"
";

#[test]
fn agent_print_table_refuses_a_snapshot_it_cannot_read_whole() {
    let dir = scratch("agent");
    let file = dir.join("cluster.yaml");
    let agent = |file: &Path| {
        portpolicy(&[
            "agent",
            "--node-name",
            "node-a",
            "--mode",
            "replacement",
            "--snapshot",
            file.to_str().unwrap(),
            "--print-table",
        ])
    };
    std::fs::write(&file, AGENT_SNAPSHOT).unwrap();
    let good = agent(&file);
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert!(good.stdout.contains("10.96.0.10:80"), "{}", good.stdout);
    // The bad Service is a warning on stderr, logged without colour codes off a terminal;
    // standard output holds the table alone.
    assert!(
        good.stderr.contains("Service/shop/bad") && good.stderr.contains("WARN"),
        "{}",
        good.stderr
    );
    assert!(!good.stderr.contains('\u{1b}'), "{:?}", good.stderr);
    assert!(!good.stdout.contains("WARN"), "{}", good.stdout);

    for (what, text) in [
        ("cut mid-object", &AGENT_SNAPSHOT[..AGENT_SNAPSHOT.len() * 2 / 3]),
        (
            "cut before kind: List",
            &AGENT_SNAPSHOT[..AGENT_SNAPSHOT.find("kind: List").unwrap()],
        ),
        ("emptied", ""),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = agent(&file);
        assert_ne!(out.code, 0, "{what}: {}", out.stdout);
        assert!(out.stdout.is_empty(), "{what}: no table: {}", out.stdout);
        assert!(
            out.stderr.contains("cannot be read whole") || out.stderr.contains("holds no"),
            "{what}: {}",
            out.stderr
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn works_as_a_kubectl_plugin() {
    // kubectl runs `kubectl-portpolicy` from the PATH for `kubectl portpolicy`; a symlink to
    // the binary is enough.
    let dir = scratch("plugin");
    let plugin = dir.join("kubectl-portpolicy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_portpolicy"), &plugin).unwrap();
    let help = run(&plugin, &["plan", "--help"], None);
    assert_eq!(help.code, 0, "{}", help.stderr);
    assert!(
        help.stdout.contains("Usage: kubectl portpolicy plan"),
        "{}",
        help.stdout
    );
    let out = run(
        &plugin,
        &["plan", "-f", demo().to_str().unwrap(), "--now", NOW],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, golden("demo-plan.txt"));
    std::fs::remove_dir_all(&dir).unwrap();
}
