//! Every node derived from the shared plan is exactly the node planned complete: its virtual
//! servers (the shared ones, node ports on its addresses, its withdrawn ones taken out, its own
//! put over them), its health checks and its problems. Checked on generated clusters with what
//! makes nodes differ: Local Services, endpoints of one address in several slices, node and
//! zone hints, nodes with and without zones and IPv6, and node addresses that other virtual
//! servers use too (where a node is planned complete).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::ipvs::{NodePortAddresses, ProxyMode};
use crate::plan::{Plan, PlanOptions};
use crate::ports::PortRange;
use crate::snapshot::Loader;

#[derive(Clone, Debug)]
struct NodeSpec {
    zone: Option<u8>,
    ipv6: bool,
}

#[derive(Clone, Debug)]
struct EndpointSpec {
    /// The last octet of its address: few, so that slices share some.
    address: u8,
    node: Option<u8>,
    ready: bool,
    terminating: bool,
    /// 0: none, 1: for a node, 2: for a zone.
    hint: u8,
    hinted: u8,
}

#[derive(Clone, Debug)]
struct ServiceSpec {
    /// 0: ClusterIP, 1: NodePort, 2: LoadBalancer.
    kind: u8,
    external_local: bool,
    internal_local: bool,
    udp: bool,
    /// 0: none, 1: the first node's address, 2: another address.
    external_ip: u8,
    /// The Service port: 80, or the first Service's node port (a clash on a node address).
    clashing_port: bool,
    topology: bool,
    slices: Vec<Vec<EndpointSpec>>,
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (proptest::option::of(0..2u8), any::<bool>()).prop_map(|(zone, ipv6)| NodeSpec { zone, ipv6 })
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    (
        0..4u8,
        proptest::option::of(0..4u8),
        any::<bool>(),
        any::<bool>(),
        0..3u8,
        0..4u8,
    )
        .prop_map(|(address, node, ready, terminating, hint, hinted)| EndpointSpec {
            address,
            node,
            ready,
            terminating,
            hint,
            hinted,
        })
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        0..3u8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..3u8,
        prop::bool::weighted(0.2),
        any::<bool>(),
        proptest::collection::vec(proptest::collection::vec(endpoint_spec(), 0..4), 1..3),
    )
        .prop_map(
            |(kind, external_local, internal_local, udp, external_ip, clashing_port, topology, slices)| {
                ServiceSpec {
                    kind,
                    external_local,
                    internal_local,
                    udp,
                    external_ip,
                    clashing_port,
                    topology,
                    slices,
                }
            },
        )
}

fn node_name(i: u8) -> String {
    format!("n{i}")
}

fn zone_name(i: u8) -> String {
    format!("z{}", i % 2)
}

fn cluster(nodes: &[NodeSpec], services: &[ServiceSpec]) -> Vec<Value> {
    let mut objects = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut addresses = vec![json!({"type": "InternalIP", "address": format!("10.1.0.{}", i + 1)})];
        if node.ipv6 {
            addresses.push(json!({"type": "InternalIP", "address": format!("fd00::{}", i + 1)}));
        }
        let mut labels = json!({});
        if let Some(zone) = node.zone {
            labels[ZONE_LABEL] = json!(zone_name(zone));
        }
        objects.push(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(i as u8), "labels": labels},
            "status": {"addresses": addresses}}));
    }
    for (s, service) in services.iter().enumerate() {
        let name = format!("s{s}");
        let node_port = 30000 + s as u16;
        let protocol = if service.udp { "UDP" } else { "TCP" };
        // A port equal to the first Service's node port, on an external IP that is a node's
        // address: that node's node port clashes with this virtual server.
        let port = if service.clashing_port { 30000 } else { 80 };
        let kind = ["ClusterIP", "NodePort", "LoadBalancer"][service.kind as usize];
        let mut spec = json!({"type": kind, "clusterIP": format!("10.96.0.{}", s + 1),
            "ports": [{"name": "p", "port": port, "protocol": protocol, "targetPort": 8080}]});
        if service.kind > 0 {
            spec["ports"][0]["nodePort"] = json!(node_port);
            if service.external_local {
                spec["externalTrafficPolicy"] = json!("Local");
                if service.kind == 2 {
                    spec["healthCheckNodePort"] = json!(31000 + s as u16);
                }
            }
        }
        if service.internal_local {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        match service.external_ip {
            1 => spec["externalIPs"] = json!(["10.1.0.1"]),
            2 => spec["externalIPs"] = json!([format!("192.0.2.{}", s + 1)]),
            _ => {}
        }
        if service.topology {
            spec["trafficDistribution"] = json!("PreferSameZone");
        }
        let mut object = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec});
        if service.kind == 2 {
            object["status"] = json!({"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", s + 1)}]}});
        }
        objects.push(object);
        for (k, slice) in service.slices.iter().enumerate() {
            let endpoints: Vec<Value> = slice
                .iter()
                .map(|e| {
                    let mut endpoint = json!({"addresses": [format!("10.244.{s}.{}", e.address)],
                        "conditions": {"ready": e.ready, "serving": true, "terminating": e.terminating}});
                    if let Some(node) = e.node {
                        endpoint["nodeName"] = json!(node_name(node));
                    }
                    match e.hint {
                        1 => endpoint["hints"] = json!({"forNodes": [{"name": node_name(e.hinted)}]}),
                        2 => endpoint["hints"] = json!({"forZones": [{"name": zone_name(e.hinted)}]}),
                        _ => {}
                    }
                    endpoint
                })
                .collect();
            objects.push(
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-{k}"), "namespace": "shop",
                    "labels": {SERVICE_NAME_LABEL: name}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
                "endpoints": endpoints}),
            );
        }
    }
    objects
}

fn plan_of(objects: Vec<Value>) -> Plan {
    let mut loader = Loader::new();
    for (i, object) in objects.into_iter().enumerate() {
        loader.add_value(&format!("object {i}"), object);
    }
    let loaded = loader.finish();
    assert_eq!(loaded.unreadable, []);
    let options = PlanOptions {
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        mode: ProxyMode::Replacement,
        node: None,
        node_port_addresses: NodePortAddresses::All,
        now: "2026-11-26T12:00:00Z".parse().unwrap(),
    };
    Plan::new(&loaded.snapshot, &options)
}

/// A node's table from the shared rows and its part, by address, port and protocol. Where two
/// shared virtual servers share an address on this node (a node port on an address another
/// Service also uses), the node's withdrawn entry says which one it does not program.
fn reconstruct(
    shared: &[VirtualServerRow],
    part: &NodeDifferences,
) -> BTreeMap<(String, u16, Protocol), String> {
    let mut table: BTreeMap<(String, u16, Protocol), Vec<VirtualServerRow>> = BTreeMap::new();
    for row in shared {
        if row.kind == "NodePort" {
            let ipv4 = row.address == "0.0.0.0";
            for address in part
                .node_port_addresses
                .iter()
                .filter(|a| a.contains(':') != ipv4)
            {
                let mut row = row.clone();
                row.address = address.clone();
                table
                    .entry((row.address.clone(), row.port, row.protocol))
                    .or_default()
                    .push(row);
            }
        } else {
            table
                .entry((row.address.clone(), row.port, row.protocol))
                .or_default()
                .push(row.clone());
        }
    }
    for gone in &part.withdrawn {
        let rows = table
            .get_mut(&(gone.address.clone(), gone.port, gone.protocol))
            .expect("withdrawn from the table");
        let at = rows
            .iter()
            .position(|r| r.service == gone.service && r.kind == gone.kind)
            .unwrap_or_else(|| panic!("{gone:?} in {rows:?}"));
        rows.remove(at);
    }
    for row in &part.virtual_servers {
        table.insert((row.address.clone(), row.port, row.protocol), vec![row.clone()]);
    }
    table
        .into_iter()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(key, rows)| {
            assert_eq!(rows.len(), 1, "{key:?}: {rows:?}");
            (key, format!("{:?}", rows[0]))
        })
        .collect()
}

/// Checks every node; returns how many were derived from the shared plan (the others, planned
/// complete, had a node-port clash).
fn check(nodes: &[NodeSpec], services: &[ServiceSpec]) -> usize {
    let plan = plan_of(cluster(nodes, services));
    let shared = Shared::plan(&plan);
    let shared_rows = shared.rows();
    let common: BTreeSet<Problem> = shared.common_problems().into_iter().collect();
    let mut derived = 0;
    for node in plan.selected_nodes() {
        let part = shared.node(&plan, node);
        let complete = plan.node_rules(node);
        let name = &complete.node;
        let complete_table: BTreeMap<_, _> = complete
            .virtual_servers
            .iter()
            .map(|vs| {
                let row = virtual_server_row(vs);
                ((row.address.clone(), row.port, row.protocol), format!("{row:?}"))
            })
            .collect();
        assert_eq!(
            reconstruct(&shared_rows, &part.differences),
            complete_table,
            "node {name}"
        );
        assert_eq!(
            part.differences.health_checks,
            health_check_rows(&complete),
            "node {name}"
        );
        // A derived node's problems are the shared plan's and its own; a node planned complete
        // states all of its own.
        let mut problems = if part.complete {
            BTreeSet::new()
        } else {
            common.clone()
        };
        problems.extend(part.problems.iter().cloned());
        let expected: BTreeSet<Problem> = complete.problems.iter().cloned().collect();
        assert_eq!(problems, expected, "node {name}");
        // The node's own rows come in the order its complete plan lists them.
        let complete_rows: Vec<VirtualServerRow> =
            complete.virtual_servers.iter().map(virtual_server_row).collect();
        let positions: Vec<usize> = part
            .differences
            .virtual_servers
            .iter()
            .map(|row| {
                complete_rows
                    .iter()
                    .position(|r| r == row)
                    .expect("a row of the complete plan")
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "node {name}: {positions:?}"
        );
        derived += usize::from(!part.complete);
    }
    derived
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_derived_node_is_its_complete_plan(
        nodes in proptest::collection::vec(node_spec(), 1..4),
        services in proptest::collection::vec(service_spec(), 1..6),
    ) {
        let clash = services.iter().any(|s| s.external_ip == 1 && s.clashing_port);
        let derived = check(&nodes, &services);
        // Without a clash every node is derived; with one, at least the others are.
        prop_assert!(derived == nodes.len() || clash, "{derived} of {} derived", nodes.len());
        prop_assert!(derived + 1 >= nodes.len());
    }
}

/// A node address that another virtual server uses on a node port's port: that node is
/// planned complete, and still reconstructs.
#[test]
fn a_node_port_clash_on_a_node_address_is_planned_complete() {
    let node = NodeSpec {
        zone: Some(0),
        ipv6: false,
    };
    let endpoint = EndpointSpec {
        address: 1,
        node: Some(0),
        ready: true,
        terminating: false,
        hint: 0,
        hinted: 0,
    };
    let node_port = ServiceSpec {
        kind: 1,
        external_local: false,
        internal_local: false,
        udp: false,
        external_ip: 0,
        clashing_port: false,
        topology: false,
        slices: vec![vec![endpoint.clone()]],
    };
    // Port 30000 on 10.1.0.1, the first node's address and the first Service's node port.
    let clashing = ServiceSpec {
        external_ip: 1,
        clashing_port: true,
        kind: 0,
        ..node_port.clone()
    };
    // The first node holds the clashing address and is planned complete; the second is derived.
    assert_eq!(check(&[node.clone(), node], &[node_port, clashing]), 1);
}
