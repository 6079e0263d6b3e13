//! A real-sized cluster in one file: 10,000 Services, 100,000 endpoints and 50,000 Pods as
//! `kubectl get -A -o yaml` prints them (about 250 MB), planned by the binary. The YAML
//! parser's fixed budgets refused a tenth of this; the loader's figures at this size are
//! `benches/loader`'s. (The core is built optimized in test builds, so this takes about a
//! minute on the 2-core machine, most of it loading.)

use std::process::Command;

use portpolicy_cluster_dump::{self as cluster_dump, DumpShape};
use serde_json::Value;

#[test]
fn a_ten_thousand_service_cluster_in_one_file_loads_and_plans() {
    let shape = DumpShape::LARGE;
    let dir = std::env::temp_dir().join(format!("portpolicy-large-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.yaml");
    let started = std::time::Instant::now();
    std::fs::write(&file, cluster_dump::yaml(shape)).unwrap();
    eprintln!("generated in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
        .args([
            "plan",
            "-f",
            file.to_str().unwrap(),
            "--node",
            "node-000",
            "-o",
            "json",
        ])
        .args(["--now", "2026-11-26T12:00:00Z"])
        .output()
        .unwrap();
    eprintln!("planned in {:?}", started.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every object was read: no problem comes from the loader (they all name the file).
    let problems = json["problems"].as_array().unwrap();
    let loader_problems: Vec<_> = problems
        .iter()
        .filter(|p| p["message"].as_str().unwrap().contains("cluster.yaml"))
        .collect();
    assert_eq!(loader_problems, Vec::<&Value>::new());
    // Every Service made it into the node's plan: each has a cluster IP virtual server.
    let node = &json["nodes"][0];
    assert_eq!(node["name"], "node-000");
    let cluster_ips = node["virtualServers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|vs| vs["kind"] == "ClusterIP" && vs["port"] == 80)
        .count();
    assert_eq!(cluster_ips, shape.services);
    // And every NodePort Service holds its node port.
    let node_ports = json["nodePorts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["portName"] == "http")
        .count();
    assert_eq!(
        node_ports,
        (0..shape.services).filter(|&i| shape.is_node_port(i)).count()
    );
}
