//! `plan` without `--node` on clusters of many nodes: what every node shares is printed once and
//! each node lists only what differs, so the output grows as Services + nodes x (each node's own
//! part), not as nodes x Services; and putting a node's part over the shared one gives exactly
//! the complete table `--node` prints for it.

use std::path::PathBuf;
use std::process::Command;

use portpolicy::snapshot_files::load_paths;
use portpolicy_cluster_dump::{self as cluster_dump, DumpShape};
use portpolicy_core::ipvs::{NodePortAddresses, ProxyMode};
use portpolicy_core::plan::{Plan, PlanFormat, PlanOptions};
use portpolicy_core::ports::PortRange;
use portpolicy_core::snapshot::Snapshot;
use serde_json::{Value, json};

const NOW: &str = "2026-11-26T12:00:00Z";

fn options(node: Option<&str>) -> PlanOptions {
    PlanOptions {
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        mode: ProxyMode::Replacement,
        node: node.map(str::to_string),
        node_port_addresses: NodePortAddresses::All,
        now: NOW.parse().unwrap(),
    }
}

fn json_plan(snapshot: &Snapshot, node: Option<&str>) -> Value {
    let mut out = Vec::new();
    Plan::new(snapshot, &options(node))
        .write(PlanFormat::Json, &mut out)
        .unwrap();
    serde_json::from_slice(&out).unwrap()
}

/// A node's complete virtual servers from the every-node JSON: the shared ones (node ports on
/// each of its node-port addresses of the family), less its withdrawn ones, with its own put
/// over them by address, port and protocol. Sorted, as [`sorted`] sorts.
fn reconstruct(every: &Value, node: &str) -> Vec<Value> {
    let entry = every["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap();
    let addresses: Vec<&str> = entry["nodePortAddresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let key = |vs: &Value| {
        (
            vs["address"].as_str().unwrap().to_string(),
            vs["port"].as_u64().unwrap(),
            vs["protocol"].as_str().unwrap().to_string(),
        )
    };
    let mut table = std::collections::BTreeMap::new();
    for vs in every["everyNode"]["virtualServers"].as_array().unwrap() {
        if vs["kind"] == "NodePort" {
            let wildcard = vs["address"].as_str().unwrap();
            assert!(wildcard == "0.0.0.0" || wildcard == "::", "{vs}");
            let ipv4 = wildcard == "0.0.0.0";
            for address in addresses.iter().filter(|a| a.contains(':') != ipv4) {
                let mut concrete = vs.clone();
                concrete["address"] = json!(address);
                table.insert(key(&concrete), concrete);
            }
        } else {
            table.insert(key(vs), vs.clone());
        }
    }
    for withdrawn in entry["withdrawn"].as_array().unwrap() {
        assert!(table.remove(&key(withdrawn)).is_some(), "{withdrawn}");
    }
    for own in entry["virtualServers"].as_array().unwrap() {
        table.insert(key(own), own.clone());
    }
    sorted(table.into_values().collect())
}

fn sorted(mut servers: Vec<Value>) -> Vec<Value> {
    servers.sort_by_key(|vs| vs.to_string());
    servers
}

fn assert_every_node_reconstructs(snapshot: &Snapshot) -> usize {
    let every = json_plan(snapshot, None);
    let names: Vec<String> = every["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    for name in &names {
        let one = json_plan(snapshot, Some(name));
        let complete = sorted(one["nodes"][0]["virtualServers"].as_array().unwrap().clone());
        assert!(!complete.is_empty());
        assert_eq!(reconstruct(&every, name), complete, "node {name}");
        // The rest of the plan is the same either way.
        for key in ["nodePorts", "hostPortConflicts", "ranges"] {
            assert_eq!(every[key], one[key], "{key}");
        }
    }
    names.len()
}

/// A generated cluster of `nodes` nodes and 500 Services; one NodePort Service in two keeps
/// external traffic on the node (`externalTrafficPolicy: Local`), and with `hints` one Service
/// in seven has zone hints.
fn cluster(nodes: usize, hints: bool) -> Vec<Value> {
    let shape = DumpShape {
        namespaces: 10,
        nodes,
        services: 500,
        endpoints_per_service: 3,
        pods: 1_500,
    };
    cluster_dump::items(shape)
        .map(|mut item| {
            let kind = item["kind"].as_str().unwrap().to_string();
            let name = item["metadata"]["name"].as_str().unwrap().to_string();
            let index = |prefix: &str| -> Option<usize> {
                name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
            };
            if kind == "Service"
                && let Some(i) = index("app-")
                && shape.is_node_port(i)
                && i % 10 == 0
            {
                item["spec"]["externalTrafficPolicy"] = json!("Local");
            }
            if hints
                && kind == "EndpointSlice"
                && let Some(i) = index("app-")
                && i % 7 == 0
            {
                for ep in item["endpoints"].as_array_mut().unwrap() {
                    let zone = ep["zone"].clone();
                    ep["hints"] = json!({"forZones": [{"name": zone}]});
                }
            }
            item
        })
        .collect()
}

fn write_cluster(name: &str, items: Vec<Value>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portpolicy-every-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    path
}

#[test]
fn the_demo_clusters_nodes_each_reconstruct_to_their_complete_table() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let loaded = load_paths(&[root.join("examples/demo-cluster")]);
    assert_eq!(assert_every_node_reconstructs(&loaded.snapshot), 3);
}

/// Local backends, zone hints and node-port addresses all differ per node here.
#[test]
fn a_generated_clusters_nodes_each_reconstruct_to_their_complete_table() {
    let path = write_cluster("hinted.json", cluster(6, true));
    let loaded = load_paths(&[path]);
    assert_eq!(loaded.problems, []);
    assert_eq!(assert_every_node_reconstructs(&loaded.snapshot), 6);
    // Both kinds of per-node difference are there to reconstruct.
    let every = json_plan(&loaded.snapshot, None);
    let own: Vec<&Value> = every["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["virtualServers"].as_array().unwrap())
        .collect();
    assert!(own.iter().any(|vs| vs["topology"] == "PreferSameZone"));
    assert!(
        own.iter()
            .any(|vs| vs["kind"] == "NodePort" && vs.get("topology").is_none())
    );
}

/// The binary's output for 5 and for 50 nodes of the same 500 Services: were every node's
/// table printed whole, 50 nodes would print about 10 times what 5 do.
#[test]
fn output_grows_with_services_plus_nodes_not_nodes_times_services() {
    let run = |nodes: usize, format: &str| -> usize {
        let path = write_cluster(&format!("nodes-{nodes}.json"), cluster(nodes, false));
        let out = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
            .args(["plan", "-f", path.to_str().unwrap(), "-o", format, "--now", NOW])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        if format == "json" {
            let json: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["nodes"].as_array().unwrap().len(), nodes);
        }
        out.stdout.len()
    };
    for format in ["json", "table"] {
        let (five, fifty) = (run(5, format), run(50, format));
        let ratio = fifty as f64 / five as f64;
        eprintln!("{format}: 5 nodes {five} bytes, 50 nodes {fifty} bytes, ratio {ratio:.2}");
        assert!(ratio < 1.5, "{format}: {fifty} / {five} bytes");
        // Each of the 45 more nodes adds its own part: a small fraction of the shared one.
        let per_node = (fifty - five) / 45;
        assert!(per_node * 20 < five, "{format}: {per_node} bytes per node");
    }
}
