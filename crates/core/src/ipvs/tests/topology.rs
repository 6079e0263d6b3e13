//! Topology-aware routing through the planner, case by case after upstream's
//! pkg/proxy/topology_test.go (TestCategorizeEndpoints), adapted to what kube-proxy does since
//! 1.33: the hints decide, whatever the Service's annotation says. Each case is a Service, one
//! slice with hinted endpoints and a node with (or without) a zone label, and the real servers
//! the cluster IP and the node port get.

use super::*;
use crate::ipvs::TopologyMode;
use crate::well_known::{TOPOLOGY_MODE_ANNOTATION, ZONE_LABEL};
use pretty_assertions::assert_eq;

fn zoned_node(zone: Option<&str>) -> Node {
    let mut node = default_node();
    if let Some(zone) = zone {
        node.metadata.labels = Some(BTreeMap::from([(ZONE_LABEL.to_string(), zone.to_string())]));
    }
    node
}

/// An endpoint on `node` hinted for `zones` and `nodes` (`None`: no hints of that kind).
fn hinted(ip: &str, node: &str, ready: bool, zones: Option<&[&str]>, nodes: Option<&[&str]>) -> Value {
    let mut hints = json!({});
    if let Some(zones) = zones {
        hints["forZones"] = zones.iter().map(|z| json!({"name": z})).collect();
    }
    if let Some(nodes) = nodes {
        hints["forNodes"] = nodes.iter().map(|n| json!({"name": n})).collect();
    }
    let conditions = if ready {
        json!({"ready": true})
    } else {
        json!({"ready": false, "serving": false})
    };
    json!({"addresses": [ip], "nodeName": node, "conditions": conditions, "hints": hints})
}

fn plan_with(node: Node, service: Service, endpoints: Value) -> NodeRules {
    let slice = slice("shop", "web-1", "web", "IPv4", http_ports(), endpoints);
    let snap = Snapshot {
        nodes: vec![node],
        services: vec![service],
        endpoint_slices: vec![slice],
        ..Default::default()
    };
    node_rules(&snap, &config(ProxyMode::Replacement))
}

fn vs_of(plan: &NodeRules, kind: VirtualServerKind) -> &VirtualServerRule {
    plan.virtual_servers
        .iter()
        .find(|vs| vs.kind == kind && vs.key.address.is_ipv4())
        .unwrap_or_else(|| panic!("no {kind:?} virtual server in {plan:#?}"))
}

fn addresses(vs: &VirtualServerRule) -> Vec<String> {
    vs.real_servers
        .iter()
        .map(|(r, _)| r.address.to_string())
        .collect()
}

const A: Option<&[&str]> = Some(&["zone-a"]);
const B: Option<&[&str]> = Some(&["zone-b"]);
const C: Option<&[&str]> = Some(&["zone-c"]);
const NO_HINTS: Option<&[&str]> = None;

#[test]
fn endpoint_hints_as_kube_proxy_reads_them() {
    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        spec: Value,
        meta: Value,
        endpoints: Vec<Value>,
        cluster_ip: (&'static [&'static str], Option<TopologyMode>),
        node_port: (&'static [&'static str], Option<TopologyMode>),
    }
    let zone_spread = || {
        vec![
            hinted("10.1.2.3", "node-b", true, A, None),
            hinted("10.1.2.4", "node-b", true, B, None),
            hinted("10.1.2.5", "node-c", true, C, None),
            hinted("10.1.2.6", "node-c", true, A, None),
        ]
    };
    let same_zone = Some(TopologyMode::PreferSameZone);
    let same_node = Some(TopologyMode::PreferSameNode);
    let all_four: &[&str] = &["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"];
    let cases = vec![
        Case {
            name: "zone hints: only the endpoints hinted for this node's zone",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({"annotations": {TOPOLOGY_MODE_ANNOTATION: "Auto"}}),
            endpoints: zone_spread(),
            cluster_ip: (&["10.1.2.3", "10.1.2.6"], same_zone),
            node_port: (&["10.1.2.3", "10.1.2.6"], same_zone),
        },
        Case {
            // Upstream until 1.32 ignored hints without the annotation; since 1.33 the hints
            // alone decide (the controller only writes them when asked).
            name: "hints are followed whatever the Service's annotation says",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({"annotations": {TOPOLOGY_MODE_ANNOTATION: "Disabled"}}),
            endpoints: zone_spread(),
            cluster_ip: (&["10.1.2.3", "10.1.2.6"], same_zone),
            node_port: (&["10.1.2.3", "10.1.2.6"], same_zone),
        },
        Case {
            name: "externalTrafficPolicy Local: topology ignored for local endpoints",
            zone: Some("zone-a"),
            spec: json!({"externalTrafficPolicy": "Local"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", NODE, true, A, None),
                hinted("10.1.2.4", NODE, true, B, None),
                hinted("10.1.2.5", "node-b", true, C, None),
                hinted("10.1.2.6", "node-b", true, A, None),
            ],
            cluster_ip: (&["10.1.2.3", "10.1.2.6"], same_zone),
            node_port: (&["10.1.2.3", "10.1.2.4"], None),
        },
        Case {
            name: "internalTrafficPolicy Local: topology ignored for local endpoints",
            zone: Some("zone-a"),
            spec: json!({"internalTrafficPolicy": "Local"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", NODE, true, A, None),
                hinted("10.1.2.4", NODE, true, B, None),
                hinted("10.1.2.5", "node-b", true, C, None),
                hinted("10.1.2.6", "node-b", true, A, None),
            ],
            cluster_ip: (&["10.1.2.3", "10.1.2.4"], None),
            node_port: (&["10.1.2.3", "10.1.2.6"], same_zone),
        },
        Case {
            name: "a node without a zone label uses every endpoint",
            zone: None,
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![hinted("10.1.2.3", "node-b", true, A, None)],
            cluster_ip: (&["10.1.2.3"], None),
            node_port: (&["10.1.2.3"], None),
        },
        Case {
            name: "an empty zone label is no zone",
            zone: Some(""),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![hinted("10.1.2.3", "node-b", true, A, None)],
            cluster_ip: (&["10.1.2.3"], None),
            node_port: (&["10.1.2.3"], None),
        },
        Case {
            name: "no endpoint hinted for this node's zone: no filtering",
            zone: Some("zone-b"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![hinted("10.1.2.3", "node-b", true, A, None)],
            cluster_ip: (&["10.1.2.3"], None),
            node_port: (&["10.1.2.3"], None),
        },
        Case {
            name: "an unready endpoint in the zone is left out",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", "node-b", true, A, None),
                hinted("10.1.2.4", "node-b", true, B, None),
                hinted("10.1.2.5", "node-c", true, C, None),
                hinted("10.1.2.6", "node-c", false, A, None),
            ],
            cluster_ip: (&["10.1.2.3"], same_zone),
            node_port: (&["10.1.2.3"], same_zone),
        },
        Case {
            name: "only unready endpoints in the zone: no filtering",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", "node-b", false, A, None),
                hinted("10.1.2.4", "node-b", true, B, None),
                hinted("10.1.2.5", "node-c", true, C, None),
                hinted("10.1.2.6", "node-c", false, A, None),
            ],
            cluster_ip: (&["10.1.2.4", "10.1.2.5"], None),
            node_port: (&["10.1.2.4", "10.1.2.5"], None),
        },
        Case {
            name: "one ready endpoint without hints: no filtering",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", "node-b", true, A, None),
                hinted("10.1.2.4", "node-b", true, B, None),
                hinted("10.1.2.5", "node-c", true, NO_HINTS, None),
                hinted("10.1.2.6", "node-c", true, A, None),
            ],
            cluster_ip: (all_four, None),
            node_port: (all_four, None),
        },
        Case {
            name: "an unready endpoint without hints does not count",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.1.2.3", "node-b", true, A, None),
                hinted("10.1.2.4", "node-b", true, B, None),
                hinted("10.1.2.5", "node-c", false, NO_HINTS, None),
            ],
            cluster_ip: (&["10.1.2.3"], same_zone),
            node_port: (&["10.1.2.3"], same_zone),
        },
        Case {
            name: "several zones per endpoint: any endpoint naming this zone",
            zone: Some("zone-c"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted(
                    "10.1.2.3",
                    "node-b",
                    true,
                    Some(&["zone-a", "zone-b", "zone-c"]),
                    None,
                ),
                hinted("10.1.2.4", "node-b", true, Some(&["zone-b", "zone-c"]), None),
                hinted("10.1.2.5", "node-c", true, Some(&["zone-b", "zone-d"]), None),
                hinted("10.1.2.6", "node-c", true, Some(&["zone-c"]), None),
            ],
            cluster_ip: (&["10.1.2.3", "10.1.2.4", "10.1.2.6"], same_zone),
            node_port: (&["10.1.2.3", "10.1.2.4", "10.1.2.6"], same_zone),
        },
        Case {
            name: "topology and locality disagree: each traffic kind takes its own",
            zone: Some("zone-a"),
            spec: json!({"externalTrafficPolicy": "Local"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.1", NODE, true, A, None),
                hinted("10.0.0.2", NODE, true, B, None),
                hinted("10.0.0.3", "node-b", true, A, None),
                hinted("10.0.0.4", "node-b", true, B, None),
            ],
            cluster_ip: (&["10.0.0.1", "10.0.0.3"], same_zone),
            node_port: (&["10.0.0.1", "10.0.0.2"], None),
        },
        Case {
            name: "nothing ready: serving terminating endpoints, hints ignored",
            zone: Some("zone-a"),
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                json!({"addresses": ["10.0.0.1"], "nodeName": "node-b", "hints": {"forZones": [{"name": "zone-b"}]},
                    "conditions": {"ready": false, "serving": true, "terminating": true}}),
                json!({"addresses": ["10.0.0.2"], "nodeName": "node-b", "hints": {"forZones": [{"name": "zone-a"}]},
                    "conditions": {"ready": false, "serving": true, "terminating": true}}),
            ],
            cluster_ip: (&["10.0.0.1", "10.0.0.2"], None),
            node_port: (&["10.0.0.1", "10.0.0.2"], None),
        },
        Case {
            name: "PreferSameNode: the endpoint hinted for this node",
            zone: Some("zone-a"),
            spec: json!({"trafficDistribution": "PreferSameNode"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.1", NODE, true, A, Some(&[NODE])),
                hinted("10.0.0.2", "node-b", true, A, Some(&["node-b"])),
                hinted("10.0.0.3", "node-c", true, B, Some(&["node-c"])),
            ],
            cluster_ip: (&["10.0.0.1"], same_node),
            node_port: (&["10.0.0.1"], same_node),
        },
        Case {
            name: "PreferSameNode with no endpoint for this node falls back to the zone",
            zone: Some("zone-a"),
            spec: json!({"trafficDistribution": "PreferSameNode"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.2", "node-b", true, A, Some(&["node-b"])),
                hinted("10.0.0.3", "node-c", true, B, Some(&["node-c"])),
            ],
            cluster_ip: (&["10.0.0.2"], same_zone),
            node_port: (&["10.0.0.2"], same_zone),
        },
        Case {
            name: "PreferSameNode, nothing for this node or zone: every endpoint",
            zone: Some("zone-c"),
            spec: json!({"trafficDistribution": "PreferSameNode"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.2", "node-b", true, A, Some(&["node-b"])),
                hinted("10.0.0.3", "node-c", true, B, Some(&["node-c"])),
            ],
            cluster_ip: (&["10.0.0.2", "10.0.0.3"], None),
            node_port: (&["10.0.0.2", "10.0.0.3"], None),
        },
        Case {
            name: "one ready endpoint without a node hint: zone hints decide",
            zone: Some("zone-a"),
            spec: json!({"trafficDistribution": "PreferSameNode"}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.1", NODE, true, A, Some(&[NODE])),
                hinted("10.0.0.2", "node-b", true, A, None),
                hinted("10.0.0.3", "node-c", true, B, Some(&["node-c"])),
            ],
            cluster_ip: (&["10.0.0.1", "10.0.0.2"], same_zone),
            node_port: (&["10.0.0.1", "10.0.0.2"], same_zone),
        },
        Case {
            name: "node hints work on a node without a zone label",
            zone: None,
            spec: json!({}),
            meta: json!({}),
            endpoints: vec![
                hinted("10.0.0.1", NODE, true, NO_HINTS, Some(&[NODE])),
                hinted("10.0.0.2", "node-b", true, NO_HINTS, Some(&["node-b"])),
            ],
            cluster_ip: (&["10.0.0.1"], same_node),
            node_port: (&["10.0.0.1"], same_node),
        },
    ];
    for case in cases {
        let service = web_service(case.spec, case.meta);
        let plan = plan_with(zoned_node(case.zone), service, json!(case.endpoints));
        for (kind, (want, mode)) in [
            (VirtualServerKind::ClusterIP, case.cluster_ip),
            (VirtualServerKind::NodePort, case.node_port),
        ] {
            let vs = vs_of(&plan, kind);
            assert_eq!(addresses(vs), want, "{}: {kind:?} real servers", case.name);
            assert_eq!(vs.topology, mode, "{}: {kind:?} topology", case.name);
        }
    }
}

#[test]
fn address_families_choose_their_topology_apart() {
    let service = web_service(
        json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"]}),
        json!({}),
    );
    let v4 = slice(
        "shop",
        "web-v4",
        "web",
        "IPv4",
        http_ports(),
        json!([
            hinted("10.0.0.1", "node-b", true, A, None),
            hinted("10.0.0.2", "node-b", true, B, None)
        ]),
    );
    // The IPv6 endpoints lack hints: only IPv4 traffic is narrowed.
    let v6 = slice(
        "shop",
        "web-v6",
        "web",
        "IPv6",
        http_ports(),
        json!([
            hinted("fd00:1::1", "node-b", true, A, None),
            hinted("fd00:1::2", "node-b", true, NO_HINTS, None)
        ]),
    );
    let snap = Snapshot {
        nodes: vec![zoned_node(Some("zone-a"))],
        services: vec![service],
        endpoint_slices: vec![v4, v6],
        ..Default::default()
    };
    let plan = node_rules(&snap, &config(ProxyMode::Replacement));
    let cluster: Vec<(String, Vec<String>, Option<TopologyMode>)> = plan
        .virtual_servers
        .iter()
        .filter(|vs| vs.kind == VirtualServerKind::ClusterIP)
        .map(|vs| (vs.key.address.to_string(), addresses(vs), vs.topology))
        .collect();
    assert_eq!(
        cluster,
        [
            (
                "10.96.0.10".to_string(),
                vec!["10.0.0.1".to_string()],
                Some(TopologyMode::PreferSameZone)
            ),
            (
                "fd00:96::10".to_string(),
                vec!["fd00:1::1".to_string(), "fd00:1::2".to_string()],
                None
            ),
        ]
    );
}

#[test]
fn a_zone_label_change_replans_only_services_with_zone_hints() {
    let zoned = web_service(json!({}), json!({}));
    let plain = service(
        "shop",
        "plain",
        json!({}),
        json!({"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80}]}),
        json!({}),
    );
    let zoned_slice = slice(
        "shop",
        "web-1",
        "web",
        "IPv4",
        http_ports(),
        json!([
            hinted("10.0.0.1", "node-b", true, A, None),
            hinted("10.0.0.2", "node-c", true, B, None)
        ]),
    );
    let plain_slice = slice(
        "shop",
        "plain-1",
        "plain",
        "IPv4",
        http_ports(),
        json!([hinted("10.0.0.9", "node-b", true, NO_HINTS, None)]),
    );
    let mut planner = RuleTracker::new(config(ProxyMode::Replacement));
    planner.load_snapshot(&Snapshot {
        nodes: vec![zoned_node(Some("zone-a"))],
        services: vec![zoned, plain],
        endpoint_slices: vec![zoned_slice, plain_slice],
        ..Default::default()
    });
    planner.take_dirty();
    let cluster_ip = vs_key("10.96.0.10", 80, Protocol::Tcp);
    let reals_of = |planner: &RuleTracker| -> Vec<String> {
        planner.desired()[&cluster_ip]
            .real_servers
            .keys()
            .map(|r| r.address.to_string())
            .collect()
    };
    assert_eq!(reals_of(&planner), ["10.0.0.1"]);

    planner.set_node(&zoned_node(Some("zone-b")));
    assert_eq!(reals_of(&planner), ["10.0.0.2"]);
    let dirty = planner.take_dirty();
    assert!(dirty.contains(&cluster_ip));
    assert!(
        dirty.iter().all(|k| k.address != ip("10.96.0.11")),
        "the Service without hints is not re-planned: {dirty:?}"
    );

    // The label goes: hints are no longer used, and the plan says why.
    planner.set_node(&zoned_node(None));
    assert_eq!(reals_of(&planner), ["10.0.0.1", "10.0.0.2"]);
    assert!(planner.node_rules().problems.is_empty());
    let asking = web_service(json!({"trafficDistribution": "PreferClose"}), json!({}));
    planner.upsert_service(&asking);
    assert_eq!(
        planner.node_rules().problems,
        [Problem::new(
            "Node/node-a",
            "metadata.labels[topology.kubernetes.io/zone]",
            "missing: zone hints are never used on this node, so Services asking for topology-aware \
             routing fall back to endpoints in every zone here: shop/web (trafficDistribution PreferSameZone)"
        )]
    );
    // The same label again changes nothing.
    planner.set_node(&zoned_node(Some("zone-b")));
    planner.take_dirty();
    planner.set_node(&zoned_node(Some("zone-b")));
    assert!(planner.take_dirty().is_empty());
}
