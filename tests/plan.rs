//! `portpolicy plan` end to end: golden output on the shipped demo cluster, and the CLI's
//! handling of bad input. Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test --test plan`
//! and review the diff like code.

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, Utc};
use portpolicy::snapshot_files::load_paths;
use portpolicy_core::ipvs::{NodePortAddresses, ProxyMode};
use portpolicy_core::plan::{Plan, PlanFormat, PlanOptions, PlanReport, build_plan};
use portpolicy_core::ports::PortRange;
use serde_json::Value;

const NOW: &str = "2026-11-26T12:00:00Z";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_options(mode: ProxyMode, node: Option<&str>) -> PlanOptions {
    PlanOptions {
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        mode,
        node: node.map(str::to_string),
        node_port_addresses: NodePortAddresses::All,
        now: NOW.parse::<DateTime<Utc>>().unwrap(),
    }
}

/// Every node planned complete, in memory.
fn demo_plan(mode: ProxyMode, node: Option<&str>) -> PlanReport {
    let loaded = load_paths(&[root().join("examples/demo-cluster")]);
    assert_eq!(loaded.problems, []);
    build_plan(&loaded.snapshot, &demo_options(mode, node))
}

/// What `plan` prints for the demo.
fn demo_output(node: Option<&str>, format: PlanFormat) -> String {
    let loaded = load_paths(&[root().join("examples/demo-cluster")]);
    let mut out = Vec::new();
    Plan::new(&loaded.snapshot, &demo_options(ProxyMode::Replacement, node))
        .write(format, &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn check_golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    pretty_assertions::assert_eq!(expected, actual, "{} differs; see the module doc", path.display());
}

/// Every node: what they share once, then each node's differences.
#[test]
fn demo_cluster_table_matches_golden() {
    check_golden("demo-plan.txt", &demo_output(None, PlanFormat::Table));
}

#[test]
fn demo_cluster_json_matches_golden() {
    check_golden("demo-plan.json", &demo_output(None, PlanFormat::Json));
}

/// One node's complete table and JSON, as `--node` prints them: the same whether or not the
/// plan for every node prints what the nodes share once.
#[test]
fn demo_cluster_one_node_matches_golden() {
    let report = demo_plan(ProxyMode::Replacement, Some("node-a"));
    check_golden("demo-plan-node-a.txt", &report.to_table());
    check_golden("demo-plan-node-a.json", &report.to_json());
    // What the binary prints for --node is that report.
    assert_eq!(demo_output(Some("node-a"), PlanFormat::Table), report.to_table());
    assert_eq!(demo_output(Some("node-a"), PlanFormat::Json), report.to_json());
}

#[test]
fn demo_cluster_plan_says_what_the_primer_says() {
    let report = demo_plan(ProxyMode::Replacement, None);
    let port = |service: &str, port_name: &str| {
        report
            .node_ports
            .iter()
            .filter(|r| r.service == service && r.port_name == port_name)
            .map(|r| (r.node_port, r.state.as_str(), r.protocol.as_str()))
            .collect::<Vec<_>>()
    };
    // The range summary agrees with the rows: every distinct nodePort edge gives out in its
    // range is used (the demo has no retained-only record), 31000-31009 are reserved, and the
    // pinned 31050 is held by its Service, so it counts as used, not pinned.
    let edge_ports: std::collections::BTreeSet<u16> = report
        .node_ports
        .iter()
        .filter(|r| r.policy.as_deref() == Some("edge") && (31000..=31099).contains(&r.node_port))
        .map(|r| r.node_port)
        .collect();
    let [range] = &report.ranges[..] else {
        panic!("{:?}", report.ranges)
    };
    assert_eq!(
        (range.policy.as_str(), range.range.as_str()),
        ("edge", "31000-31099")
    );
    assert_eq!(range.used, edge_ports.len());
    assert_eq!((range.reserved, range.pinned), (10, 0));
    assert_eq!(range.free, 100 - edge_ports.len() - 10);
    // Re-created within the retention window: the old port comes back.
    assert_eq!(port("shop/cart", "http"), [(31017, "Restored", "TCP")]);
    assert_eq!(port("payments/checkout", "https"), [(31050, "Pinned", "TCP")]);
    // One service port, two protocols, one nodePort.
    let game: Vec<_> = report
        .node_ports
        .iter()
        .filter(|r| r.service == "shop/game")
        .collect();
    assert_eq!(game.len(), 2);
    assert_eq!(game[0].node_port, game[1].node_port);
    assert!(
        (31010..=31099).contains(&game[0].node_port),
        "outside the range minus reserved"
    );
    assert_ne!(game[0].node_port, 31060, "grafana's port is in use");

    let reasons: Vec<_> = report
        .host_port_conflicts
        .iter()
        .map(|c| (c.node.as_str(), c.host_port, c.reason.as_str()))
        .collect();
    for node in ["node-a", "node-b", "node-c"] {
        assert!(
            reasons.contains(&(node, 9100, "PodConflict")),
            "log-shipper vs node-exporter on {node}"
        );
    }
    assert!(reasons.contains(&("node-b", 8080, "PodConflict")));
    assert!(reasons.contains(&("node-c", 30080, "InNodePortRange")));
    assert!(reasons.contains(&("node-c", 30080, "NotAllowed")));
    assert!(
        report
            .host_port_conflicts
            .iter()
            .all(|c| !c.pods.iter().any(|p| p.contains("batch-report"))),
        "finished pods hold no ports"
    );

    let fields: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.object.as_str(), p.field.as_str()))
        .collect();
    assert!(fields.contains(&("Deployment/shop/edge-proxy", "spec.replicas")));
    assert!(fields.contains(&("Service/shop/legacy-api", "spec.ports[0].nodePort")));

    // Local external traffic: node-c has no ready checkout endpoint, so its node port drops.
    let node_c = report.nodes.iter().find(|n| n.name == "node-c").unwrap();
    let checkout_np = node_c
        .virtual_servers
        .iter()
        .find(|vs| vs.service == "payments/checkout" && vs.kind == "NodePort")
        .unwrap();
    assert_eq!(checkout_np.port, 31050);
    assert!(checkout_np.only_local && checkout_np.real_servers.is_empty());
}

#[test]
fn delegated_mode_plans_only_services_handed_to_portpolicy() {
    let report = demo_plan(ProxyMode::Delegated, Some("node-a"));
    assert_eq!(report.nodes.len(), 1);
    // No Service in the snapshot carries the proxy-name label yet (the operator adds it).
    assert!(report.nodes[0].virtual_servers.is_empty());
    assert!(
        !report.node_ports.is_empty(),
        "allocation does not depend on the proxy mode"
    );
}

fn sorted_keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn json_has_exactly_the_contract_keys() {
    let json: Value =
        serde_json::from_str(&demo_plan(ProxyMode::Replacement, Some("node-b")).to_json()).unwrap();
    assert_eq!(json["version"], 2);
    assert_eq!(
        sorted_keys(&json),
        [
            "hostPortConflicts",
            "nodePorts",
            "nodes",
            "problems",
            "ranges",
            "version"
        ]
    );
    let vs_keys = [
        "address",
        "kind",
        "persistenceTimeout",
        "port",
        "protocol",
        "realServers",
        "scheduler",
        "service",
    ];
    assert_eq!(sorted_keys(&json["nodes"][0]["virtualServers"][0]), vs_keys);
    assert_eq!(
        sorted_keys(&json["nodePorts"][0]),
        [
            "kind", "nodePort", "policy", "port", "portName", "protocol", "service", "state"
        ]
    );
    assert_eq!(
        sorted_keys(&json["ranges"][0]),
        ["free", "pinned", "policy", "range", "reserved", "total", "used"]
    );

    // Every node: what they share under `everyNode`, and per node only what differs.
    let every: Value = serde_json::from_str(&demo_output(None, PlanFormat::Json)).unwrap();
    assert_eq!(every["version"], 2);
    assert_eq!(
        sorted_keys(&every),
        [
            "everyNode",
            "hostPortConflicts",
            "nodePorts",
            "nodes",
            "problems",
            "ranges",
            "version"
        ]
    );
    assert_eq!(sorted_keys(&every["everyNode"]), ["virtualServers"]);
    assert_eq!(sorted_keys(&every["everyNode"]["virtualServers"][0]), vs_keys);
    let node_a = &every["nodes"][0];
    assert_eq!(
        sorted_keys(node_a),
        ["name", "nodePortAddresses", "virtualServers", "withdrawn"]
    );
    assert_eq!(sorted_keys(&node_a["virtualServers"][0]), vs_keys);
}

fn portpolicy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portpolicy-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn cli_plans_the_demo_with_node_filter_and_json() {
    let demo = root().join("examples/demo-cluster");
    let (code, stdout, _) = portpolicy(&[
        "plan",
        "-f",
        demo.to_str().unwrap(),
        "-o",
        "json",
        "--node",
        "node-a",
        "--now",
        NOW,
    ]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(json["nodes"][0]["name"], "node-a");
}

#[test]
fn cli_reports_bad_objects_and_still_plans_the_rest() {
    let path = temp_file(
        "mixed.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: d}\nspec: {ports: 7}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: x, namespace: d}\n",
    );
    let (code, stdout, _) = portpolicy(&["plan", "-f", path.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code, 0, "something was planned");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let objects: Vec<_> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap())
        .collect();
    assert!(objects.contains(&"Service/d/s"), "{objects:?}");
    assert!(objects.contains(&"Secret/d/x"), "{objects:?}");
    let message = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["object"] == "Service/d/s")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("mixed.yaml, document 2"), "{message}");
}

#[test]
fn cli_fails_only_when_nothing_could_be_planned() {
    let garbage = temp_file("garbage.yaml", "kind: [unclosed\n");
    let (code, stdout, stderr) = portpolicy(&["plan", "-f", garbage.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        stdout.contains("garbage.yaml") && stdout.contains("not valid YAML"),
        "{stdout}"
    );
    assert!(stderr.contains("nothing was planned"), "{stderr}");

    let (code, _, stderr) = portpolicy(&["plan", "-f", "/nonexistent/snapshot.yaml"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/snapshot.yaml"), "{stderr}");
}

#[test]
fn cli_crd_output_is_the_checked_in_crd() {
    let (code, stdout, _) = portpolicy(&["crd"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        std::fs::read_to_string(Path::new(&root()).join("crds/portpolicy.yaml")).unwrap()
    );
}

/// Zone hints and source ranges show in both outputs the way a user reads them: the JSON keys
/// `topology` and `sourceRanges` appear only where they apply, and the table marks them.
#[test]
fn cli_shows_topology_and_source_ranges_only_where_they_apply() {
    let path = temp_file(
        "topology.yaml",
        "\
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  trafficDistribution: PreferClose
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.1.2], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.2.2], nodeName: node-b, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
",
    );
    let file = path.to_str().unwrap();
    let (code, stdout, _) = portpolicy(&["plan", "-f", file, "-o", "json", "--node", "node-a"]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let servers = json["nodes"][0]["virtualServers"].as_array().unwrap();
    let summary: Vec<(String, Value, Value, usize)> = servers
        .iter()
        .map(|vs| {
            (
                vs["kind"].as_str().unwrap().to_string(),
                vs.get("topology").cloned().unwrap_or(Value::Null),
                vs.get("sourceRanges").cloned().unwrap_or(Value::Null),
                vs["realServers"].as_array().unwrap().len(),
            )
        })
        .collect();
    let zone = Value::from("PreferSameZone");
    assert_eq!(
        summary,
        [
            ("ClusterIP".to_string(), zone.clone(), Value::Null, 1),
            ("NodePort".to_string(), zone.clone(), Value::Null, 1),
            (
                "LoadBalancer".to_string(),
                zone,
                serde_json::json!(["203.0.113.0/24"]),
                1
            ),
        ]
    );
    let (_, table, _) = portpolicy(&["plan", "-f", path.to_str().unwrap()]);
    assert!(
        table.contains("# shop/lb LoadBalancer [PreferSameZone] [from 203.0.113.0/24]"),
        "{table}"
    );
}

/// `plan --nodeport-addresses` plans node ports where the agent given the same flag serves them,
/// and a bad value is refused naming the flag, before anything is read.
#[test]
fn cli_plans_node_ports_on_the_addresses_given() {
    let path = temp_file(
        "nodeport-addresses.yaml",
        "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.10}
  - {type: InternalIP, address: 10.10.0.10}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: InternalIP, address: fd00::10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports: [{port: 80, targetPort: 8080, nodePort: 30090}]
",
    );
    let file = path.to_str().unwrap();
    let node_port_addresses = |flags: &[&str]| -> Vec<String> {
        let mut args = vec!["plan", "-f", file, "-o", "json", "--node", "node-a"];
        args.extend(flags);
        let (code, stdout, stderr) = portpolicy(&args);
        assert_eq!(code, 0, "{stderr}");
        let json: Value = serde_json::from_str(&stdout).unwrap();
        json["nodes"][0]["virtualServers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|vs| vs["kind"] == "NodePort")
            .map(|vs| vs["address"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        node_port_addresses(&[]),
        ["10.10.0.10", "192.168.1.10", "203.0.113.10", "fd00::10"]
    );
    assert_eq!(
        node_port_addresses(&["--nodeport-addresses", "primary"]),
        ["192.168.1.10", "fd00::10"]
    );
    assert_eq!(
        node_port_addresses(&["--nodeport-addresses", "10.0.0.0/8,203.0.113.0/24"]),
        ["10.10.0.10", "203.0.113.10"]
    );
    let (code, stdout, stderr) = portpolicy(&["plan", "-f", file, "--nodeport-addresses", "10.0.0.0"]);
    assert_eq!(code, 2);
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("portpolicy plan: --nodeport-addresses: \"10.0.0.0\" is not a CIDR"),
        "{stderr}"
    );
}

/// The allocator fixes as `plan` shows them: a pin whose holder the same plan moves is reached
/// at once, and a Service port pinned twice is the policy's problem, not the last pin's win.
#[test]
fn cli_plans_a_pin_whose_holder_moves_in_one_plan_and_refuses_a_port_pinned_twice() {
    let service = |name: &str, created: &str, node_port: u16| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: \"{created}\"}}\nspec: {{type: NodePort, ports: [{{name: http, port: 80, nodePort: {node_port}}}]}}\n"
        )
    };
    let policy = |pins: &str| {
        format!(
            "apiVersion: portpolicy.io/v1alpha1\nkind: PortPolicy\nmetadata: {{name: edge}}\nspec:\n  nodePorts:\n    range: 31000-31099\n    pinned: [{pins}]\n"
        )
    };
    let services =
        service("pinned", "2026-01-01T00:00:00Z", 31050) + &service("holder", "2026-01-02T00:00:00Z", 31010);
    let chain = policy(
        "{namespace: shop, service: pinned, portName: http, nodePort: 31010}, \
         {namespace: shop, service: holder, portName: http, nodePort: 31020}",
    );
    let path = temp_file("pin-chain.yaml", &(chain + &services));
    let (code, stdout, stderr) =
        portpolicy(&["plan", "-f", path.to_str().unwrap(), "-o", "json", "--now", NOW]);
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let ports: Vec<_> = (json["nodePorts"].as_array().unwrap().iter())
        .map(|p| {
            (
                p["service"].as_str().unwrap(),
                p["nodePort"].as_u64().unwrap(),
                p["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("shop/holder", 31020, "Pinned"), ("shop/pinned", 31010, "Pinned")]
    );
    assert_eq!(json["problems"], Value::Array(vec![]), "{stdout}");

    let twice = policy(
        "{namespace: shop, service: pinned, portName: http, nodePort: 31010}, \
         {namespace: shop, service: pinned, portName: http, nodePort: 31020}",
    );
    let path = temp_file("pinned-twice.yaml", &(twice + &services));
    let (code, stdout, stderr) =
        portpolicy(&["plan", "-f", path.to_str().unwrap(), "-o", "json", "--now", NOW]);
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    let problem = (json["problems"].as_array().unwrap().iter())
        .find(|p| p["field"] == "spec.nodePorts.pinned[1]")
        .unwrap_or_else(|| panic!("no problem for the second pin: {stdout}"));
    assert_eq!(problem["object"], "PortPolicy/edge");
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("already pinned by spec.nodePorts.pinned[0]"),
        "{problem}"
    );
    let pinned: Vec<_> = (json["nodePorts"].as_array().unwrap().iter())
        .filter(|p| p["service"] == "shop/pinned")
        .map(|p| p["nodePort"].as_u64().unwrap())
        .collect();
    assert_eq!(pinned, [31050], "neither pin is applied");
}
