use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;
use crate::governance::{NamespaceLabels, PolicySet};
use crate::ipvs::diff::{Ownership, diff_keys};
use crate::ipvs::table::test_keys::vs_key;
use crate::ports::Protocol;
use crate::problem::Problem;
use crate::service::ServiceModel;
use crate::snapshot::Snapshot;
use crate::well_known::{
    EXTERNAL_TRAFFIC_ANNOTATION, HEALTH_CHECK_NODE_PORT_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME,
    SERVICE_PROXY_NAME_LABEL,
};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

const NODE: &str = "node-a";

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("test object has a valid shape")
}

fn config(mode: ProxyMode) -> ProxyConfig {
    ProxyConfig::new(NODE, mode)
}

fn node(addresses: &[(&str, &str)]) -> Node {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    object(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        "status": {"addresses": addresses}}),
    )
}

fn default_node() -> Node {
    node(&[
        ("InternalIP", "192.168.0.10"),
        ("ExternalIP", "203.0.113.10"),
        ("Hostname", "node-a"),
        ("InternalIP", "fd00::10"),
    ])
}

/// A Service `ns/name`: `meta` is merged into metadata, `spec` and `status` are taken as given.
fn service(ns: &str, name: &str, meta: Value, spec: Value, status: Value) -> Service {
    let mut metadata = json!({"namespace": ns, "name": name});
    if let Value::Object(extra) = meta {
        metadata.as_object_mut().unwrap().extend(extra);
    }
    object(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec,
        "status": status}),
    )
}

fn slice(ns: &str, name: &str, service: &str, family: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    object(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": family, "ports": ports, "endpoints": endpoints}),
    )
}

fn endpoint(ip: &str, node: &str, conditions: Value) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": conditions})
}

fn snapshot(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
    Snapshot {
        nodes: vec![default_node()],
        services,
        endpoint_slices: slices,
        ..Default::default()
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Real servers of the plan's virtual server of `kind` on `address`, as "ip:port" strings.
fn reals(rules: &NodeRules, kind: VirtualServerKind, address: &str) -> Vec<String> {
    let vs = rules
        .virtual_servers
        .iter()
        .find(|vs| vs.kind == kind && vs.key.address == ip(address))
        .unwrap_or_else(|| panic!("no {kind:?} virtual server on {address} in {rules:#?}"));
    vs.real_servers.iter().map(|(r, _)| r.to_string()).collect()
}

fn web_service(spec_extra: Value, meta: Value) -> Service {
    let mut spec = json!({"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]});
    if let Value::Object(extra) = spec_extra {
        spec.as_object_mut().unwrap().extend(extra);
    }
    service("shop", "web", meta, spec, json!({}))
}

fn http_ports() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

#[test]
fn endpoint_selection_rules() {
    struct Case {
        name: &'static str,
        spec: Value,
        meta: Value,
        endpoints: Value,
        cluster_ip: &'static [&'static str],
        node_port: &'static [&'static str],
    }
    let ready = json!({"ready": true, "serving": true, "terminating": false});
    let not_ready = json!({"ready": false, "serving": false, "terminating": false});
    let serving_terminating = json!({"ready": false, "serving": true, "terminating": true});
    let terminating_not_serving = json!({"ready": false, "serving": false, "terminating": true});
    let local_policy = json!({"externalTrafficPolicy": "Local"});
    let cases = [
        Case {
            name: "ready endpoints everywhere serve both",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, ready.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.1:8080", "10.1.0.2:8080"],
            node_port: &["10.1.0.1:8080", "10.1.0.2:8080"],
        },
        Case {
            name: "not ready endpoints are left out",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, not_ready.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.2:8080"],
            node_port: &["10.1.0.2:8080"],
        },
        Case {
            name: "missing conditions mean ready, serving, not terminating",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([{"addresses": ["10.1.0.3"]}, endpoint("10.1.0.4", "node-b", json!({}))]),
            cluster_ip: &["10.1.0.3:8080", "10.1.0.4:8080"],
            node_port: &["10.1.0.3:8080", "10.1.0.4:8080"],
        },
        Case {
            name: "serving-terminating is only a fallback when nothing is ready",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, serving_terminating.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.2:8080"],
            node_port: &["10.1.0.2:8080"],
        },
        Case {
            name: "no ready endpoint: serving-and-terminating ones, not the non-serving",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, serving_terminating.clone()),
                endpoint("10.1.0.2", "node-b", terminating_not_serving.clone()),
                endpoint("10.1.0.3", "node-b", not_ready.clone()),
            ]),
            cluster_ip: &["10.1.0.1:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "missing serving means serving, so a terminating endpoint is a fallback",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([endpoint(
                "10.1.0.1",
                "node-b",
                json!({"ready": false, "terminating": true})
            )]),
            cluster_ip: &["10.1.0.1:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "externalTrafficPolicy Local: node port gets local endpoints only",
            spec: local_policy.clone(),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, ready.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.1:8080", "10.1.0.2:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "externalTrafficPolicy Local without local endpoint drops (no fallback to cluster)",
            spec: local_policy.clone(),
            meta: json!({}),
            endpoints: json!([endpoint("10.1.0.2", "node-b", ready.clone())]),
            cluster_ip: &["10.1.0.2:8080"],
            node_port: &[],
        },
        Case {
            name: "local fallback is decided among local endpoints alone",
            spec: local_policy.clone(),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, serving_terminating.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.2:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "legacy OnlyLocal annotation acts like externalTrafficPolicy Local",
            spec: json!({}),
            meta: json!({"annotations": {EXTERNAL_TRAFFIC_ANNOTATION: "OnlyLocal"}}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, ready.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.1:8080", "10.1.0.2:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "internalTrafficPolicy Local: cluster IP gets local endpoints only",
            spec: json!({"internalTrafficPolicy": "Local"}),
            meta: json!({}),
            endpoints: json!([
                endpoint("10.1.0.1", NODE, ready.clone()),
                endpoint("10.1.0.2", "node-b", ready.clone())
            ]),
            cluster_ip: &["10.1.0.1:8080"],
            node_port: &["10.1.0.1:8080", "10.1.0.2:8080"],
        },
        Case {
            name: "both policies Local, nothing local: both dropped",
            spec: json!({"internalTrafficPolicy": "Local", "externalTrafficPolicy": "Local"}),
            meta: json!({}),
            endpoints: json!([endpoint("10.1.0.2", "node-b", ready.clone())]),
            cluster_ip: &[],
            node_port: &[],
        },
        Case {
            name: "publishNotReadyAddresses: the controller marks every endpoint ready, and so it is used",
            spec: json!({"publishNotReadyAddresses": true}),
            meta: json!({}),
            endpoints: json!([endpoint(
                "10.1.0.1",
                "node-b",
                json!({"ready": true, "serving": false, "terminating": false})
            )]),
            cluster_ip: &["10.1.0.1:8080"],
            node_port: &["10.1.0.1:8080"],
        },
        Case {
            name: "no endpoints: virtual servers still planned, empty",
            spec: json!({}),
            meta: json!({}),
            endpoints: json!([]),
            cluster_ip: &[],
            node_port: &[],
        },
    ];
    for case in cases {
        let svc = web_service(case.spec, case.meta);
        let slices = vec![slice(
            "shop",
            "web-1",
            "web",
            "IPv4",
            http_ports(),
            case.endpoints,
        )];
        let rules = node_rules(&snapshot(vec![svc], slices), &config(ProxyMode::Replacement));
        assert_eq!(
            reals(&rules, VirtualServerKind::ClusterIP, "10.96.0.10"),
            case.cluster_ip,
            "{}: cluster IP",
            case.name
        );
        for address in ["192.168.0.10", "203.0.113.10"] {
            assert_eq!(
                reals(&rules, VirtualServerKind::NodePort, address),
                case.node_port,
                "{}: node port on {address}",
                case.name
            );
        }
    }
}

#[test]
fn traffic_policies_set_only_local_and_masquerading() {
    let svc = web_service(
        json!({"externalTrafficPolicy": "Local", "externalIPs": ["198.51.100.7"]}),
        json!({}),
    );
    let rules = node_rules(&snapshot(vec![svc], vec![]), &config(ProxyMode::Replacement));
    let flags: Vec<_> = rules
        .virtual_servers
        .iter()
        .map(|vs| {
            (
                vs.kind,
                vs.key.address.to_string(),
                vs.only_local,
                vs.masquerade_external,
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            (VirtualServerKind::ClusterIP, "10.96.0.10".into(), false, true),
            (VirtualServerKind::NodePort, "192.168.0.10".into(), true, false),
            (VirtualServerKind::NodePort, "203.0.113.10".into(), true, false),
            (VirtualServerKind::NodePort, "fd00::10".into(), true, false),
            (VirtualServerKind::ExternalIP, "198.51.100.7".into(), true, false),
        ]
    );
    let cluster = web_service(json!({"externalIPs": ["198.51.100.7"]}), json!({}));
    let rules = node_rules(&snapshot(vec![cluster], vec![]), &config(ProxyMode::Replacement));
    assert!(
        rules
            .virtual_servers
            .iter()
            .all(|vs| !vs.only_local && vs.masquerade_external)
    );
}

#[test]
fn dual_stack_keeps_families_apart() {
    let svc = web_service(
        json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack"}),
        json!({}),
    );
    let slices = vec![
        slice(
            "shop",
            "web-v4",
            "web",
            "IPv4",
            http_ports(),
            json!([
                endpoint("10.1.0.1", NODE, json!({})),
                endpoint("fd00:1::9", NODE, json!({}))
            ]),
        ),
        slice(
            "shop",
            "web-v6",
            "web",
            "IPv6",
            http_ports(),
            json!([endpoint("fd00:1::1", NODE, json!({}))]),
        ),
        slice(
            "shop",
            "web-fqdn",
            "web",
            "FQDN",
            http_ports(),
            json!([endpoint("web.example.com", NODE, json!({}))]),
        ),
    ];
    let rules = node_rules(&snapshot(vec![svc], slices), &config(ProxyMode::Replacement));
    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "10.96.0.10"),
        ["10.1.0.1:8080"]
    );
    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "fd00:96::10"),
        ["[fd00:1::1]:8080"]
    );
    assert_eq!(
        reals(&rules, VirtualServerKind::NodePort, "192.168.0.10"),
        ["10.1.0.1:8080"]
    );
    assert_eq!(
        reals(&rules, VirtualServerKind::NodePort, "fd00::10"),
        ["[fd00:1::1]:8080"]
    );
    // The IPv6 address in the IPv4 slice is reported, not used.
    assert!(
        rules
            .problems
            .iter()
            .any(|p| p.object == "EndpointSlice/shop/web-v4" && p.field == "endpoints[1].addresses[0]"),
        "{:?}",
        rules.problems
    );
    assert_eq!(rules.vips, BTreeSet::from([ip("10.96.0.10"), ip("fd00:96::10")]));
}

#[test]
fn ports_match_by_name_and_protocol_and_duplicates_count_once() {
    let svc = service(
        "shop",
        "dns",
        json!({}),
        json!({"clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
        ]}),
        json!({}),
    );
    let ports_a = json!([{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}]);
    // Pods that resolve the named port differently land in a different slice.
    let ports_b =
        json!([{"name": "dns", "port": 1053, "protocol": "UDP"}, {"name": "dns-tcp", "port": 1053}]);
    let slices = vec![
        slice(
            "shop",
            "dns-a",
            "dns",
            "IPv4",
            ports_a.clone(),
            json!([
                endpoint("10.1.0.1", "node-b", json!({})),
                endpoint("10.1.0.2", "node-b", json!({}))
            ]),
        ),
        // 10.1.0.2 listed twice with the same port: one real server.
        slice(
            "shop",
            "dns-c",
            "dns",
            "IPv4",
            ports_a,
            json!([endpoint("10.1.0.2", "node-b", json!({}))]),
        ),
        slice(
            "shop",
            "dns-b",
            "dns",
            "IPv4",
            ports_b,
            json!([endpoint("10.1.0.3", "node-b", json!({}))]),
        ),
        // A port of the wrong protocol never matches.
        slice(
            "shop",
            "dns-d",
            "dns",
            "IPv4",
            json!([{"name": "dns", "port": 9999, "protocol": "SCTP"}]),
            json!([endpoint("10.1.0.4", "node-b", json!({}))]),
        ),
    ];
    let rules = node_rules(&snapshot(vec![svc], slices), &config(ProxyMode::Replacement));
    let by_protocol = |protocol| {
        let vs = rules
            .virtual_servers
            .iter()
            .find(|vs| vs.key == vs_key("10.96.0.53", 53, protocol))
            .unwrap();
        vs.real_servers
            .iter()
            .map(|(r, _)| r.to_string())
            .collect::<Vec<_>>()
    };
    let want = ["10.1.0.1:5353", "10.1.0.2:5353", "10.1.0.3:1053"];
    assert_eq!(by_protocol(Protocol::Udp), want);
    assert_eq!(by_protocol(Protocol::Tcp), want);
    assert_eq!(rules.virtual_servers.len(), 2);
}

#[test]
fn unnamed_port_matches_unnamed_slice_port_and_local_listing_wins() {
    let svc = service(
        "shop",
        "one",
        json!({}),
        json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30081}]}),
        json!({}),
    );
    let slices = vec![
        // No name at all, and an explicit empty name: both are the unnamed port.
        slice(
            "shop",
            "one-a",
            "one",
            "IPv4",
            json!([{"port": 8080}]),
            json!([endpoint("10.1.0.1", "node-b", json!({}))]),
        ),
        slice(
            "shop",
            "one-b",
            "one",
            "IPv4",
            json!([{"name": "", "port": 8080}]),
            json!([endpoint("10.1.0.1", NODE, json!({}))]),
        ),
        slice(
            "shop",
            "one-c",
            "one",
            "IPv4",
            json!([{"name": "other", "port": 7070}]),
            json!([endpoint("10.1.0.9", NODE, json!({}))]),
        ),
    ];
    let rules = node_rules(&snapshot(vec![svc], slices), &config(ProxyMode::Replacement));
    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "10.96.0.11"),
        ["10.1.0.1:8080"]
    );
    // Listed elsewhere first and on this node later: kube-proxy counts it local.
    assert_eq!(
        reals(&rules, VirtualServerKind::NodePort, "192.168.0.10"),
        ["10.1.0.1:8080"]
    );
}

#[test]
fn which_services_are_proxied() {
    let labelled = |value: Option<&str>| match value {
        Some(v) => json!({"labels": {SERVICE_PROXY_NAME_LABEL: v}}),
        None => json!({}),
    };
    let plain = |name: &str, meta: Value| {
        service(
            "shop",
            name,
            meta,
            json!({"clusterIP": "10.96.1.1", "ports": [{"port": 80}]}),
            json!({}),
        )
    };
    let cases: [(&str, Service, bool, bool); 6] = [
        ("unlabelled", plain("a", labelled(None)), true, false),
        (
            "labelled portpolicy",
            plain("b", labelled(Some(SERVICE_PROXY_NAME))),
            true,
            true,
        ),
        (
            "labelled for another proxy",
            plain("c", labelled(Some("cilium"))),
            false,
            false,
        ),
        (
            "headless",
            service(
                "shop",
                "d",
                labelled(Some(SERVICE_PROXY_NAME)),
                json!({"clusterIP": "None", "ports": [{"port": 80}]}),
                json!({}),
            ),
            false,
            false,
        ),
        (
            "ExternalName",
            service(
                "shop",
                "e",
                labelled(Some(SERVICE_PROXY_NAME)),
                json!({"type": "ExternalName", "externalName": "db.example.com"}),
                json!({}),
            ),
            false,
            false,
        ),
        (
            "no selector, manual slices",
            service(
                "shop",
                "f",
                labelled(None),
                json!({"clusterIP": "10.96.1.6", "ports": [{"port": 80}]}),
                json!({}),
            ),
            true,
            false,
        ),
    ];
    for (name, svc, replacement, delegated) in cases {
        assert_eq!(
            ProxyMode::Replacement.proxies(&ServiceModel::read(&svc)),
            replacement,
            "{name} in replacement mode"
        );
        assert_eq!(
            ProxyMode::Delegated.proxies(&ServiceModel::read(&svc)),
            delegated,
            "{name} in delegated mode"
        );
        let planned = |mode| {
            !node_rules(&snapshot(vec![svc.clone()], vec![]), &config(mode))
                .virtual_servers
                .is_empty()
        };
        assert_eq!(
            planned(ProxyMode::Replacement),
            replacement,
            "{name} planned in replacement mode"
        );
        assert_eq!(
            planned(ProxyMode::Delegated),
            delegated,
            "{name} planned in delegated mode"
        );
    }
    // The selector-less Service gets its endpoints from hand-made slices.
    let manual = service(
        "shop",
        "f",
        json!({}),
        json!({"clusterIP": "10.96.1.6", "ports": [{"port": 80}]}),
        json!({}),
    );
    let slices = vec![slice(
        "shop",
        "f-manual",
        "f",
        "IPv4",
        json!([{"port": 5432}]),
        json!([{"addresses": ["192.168.50.5"]}]),
    )];
    let rules = node_rules(&snapshot(vec![manual], slices), &config(ProxyMode::Replacement));
    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "10.96.1.6"),
        ["192.168.50.5:5432"]
    );
}

#[test]
fn node_addresses_external_and_load_balancer_ips() {
    let svc = service(
        "shop",
        "lb",
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalIPs": ["198.51.100.7", "bogus"],
            "ports": [{"name": "https", "port": 443, "nodePort": 30443}]}),
        json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.20"},
            {"hostname": "lb.example.com"},
            {"ip": "198.51.100.21", "ipMode": "Proxy"},
            {"ip": "2001:db8::20", "ipMode": "VIP"},
        ]}}),
    );
    let rules = node_rules(&snapshot(vec![svc], vec![]), &config(ProxyMode::Replacement));
    let planned: Vec<_> = rules
        .virtual_servers
        .iter()
        .map(|vs| (vs.kind, vs.key.to_string()))
        .collect();
    use VirtualServerKind::*;
    assert_eq!(
        planned,
        [
            (ClusterIP, "TCP 10.96.0.20:443".to_string()),
            (NodePort, "TCP 192.168.0.10:30443".to_string()),
            (NodePort, "TCP 203.0.113.10:30443".to_string()),
            (NodePort, "TCP [fd00::10]:30443".to_string()),
            (ExternalIP, "TCP 198.51.100.7:443".to_string()),
            (LoadBalancer, "TCP 198.51.100.20:443".to_string()),
            (LoadBalancer, "TCP [2001:db8::20]:443".to_string()),
        ]
    );
    assert_eq!(
        rules.vips,
        ["10.96.0.20", "198.51.100.7", "198.51.100.20", "2001:db8::20"]
            .map(ip)
            .into()
    );
    assert_eq!(rules.reserved_node_ports, BTreeSet::from([30443]));
    assert_eq!(
        rules.node_addresses.len(),
        3,
        "Hostname is not an address to serve on"
    );
    assert_eq!(
        rules.problems,
        [Problem::new(
            "Service/shop/lb",
            "spec.externalIPs[1]",
            "\"bogus\" is not an IP address; ignored"
        )]
    );
}

#[test]
fn source_ranges_restrict_only_load_balancer_virtual_servers() {
    let lb = |ranges: Value| {
        service(
            "shop",
            "lb",
            json!({}),
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalIPs": ["198.51.100.7"],
                "loadBalancerSourceRanges": ranges,
                "ports": [{"name": "https", "port": 443, "nodePort": 30443}]}),
            json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}, {"ip": "2001:db8::20"}]}}),
        )
    };
    let ranges_by_kind = |plan: &NodeRules| -> Vec<(VirtualServerKind, String, Option<Vec<String>>)> {
        plan.virtual_servers
            .iter()
            .filter(|vs| vs.kind != VirtualServerKind::NodePort)
            .map(|vs| {
                let ranges = vs
                    .source_ranges
                    .as_ref()
                    .map(|r| r.iter().map(ToString::to_string).collect());
                (vs.kind, vs.key.address.to_string(), ranges)
            })
            .collect()
    };
    use VirtualServerKind::*;
    let strings = |list: &[&str]| Some(list.iter().map(|s| s.to_string()).collect::<Vec<_>>());

    // Blanks trimmed, host bits cleared, each family's ranges on its own addresses; node ports,
    // external IPs and the cluster IP are never restricted.
    let svc = lb(json!([" 203.0.113.0/24", "192.0.2.7/16 ", "2001:db8:1::/48"]));
    let plan = node_rules(&snapshot(vec![svc], vec![]), &config(ProxyMode::Replacement));
    assert_eq!(
        ranges_by_kind(&plan),
        [
            (ClusterIP, "10.96.0.20".to_string(), None),
            (ExternalIP, "198.51.100.7".to_string(), None),
            (
                LoadBalancer,
                "198.51.100.20".to_string(),
                strings(&["203.0.113.0/24", "192.0.0.0/16"])
            ),
            (
                LoadBalancer,
                "2001:db8::20".to_string(),
                strings(&["2001:db8:1::/48"])
            ),
        ]
    );
    assert!(
        plan.virtual_servers
            .iter()
            .filter(|vs| vs.kind == NodePort)
            .all(|vs| vs.source_ranges.is_none())
    );
    assert_eq!(plan.problems, []);

    // No field: unrestricted everywhere.
    let plan = node_rules(
        &snapshot(vec![lb(json!([]))], vec![]),
        &config(ProxyMode::Replacement),
    );
    assert!(plan.virtual_servers.iter().all(|vs| vs.source_ranges.is_none()));

    // Only IPv6 ranges, and one that does not parse: IPv4 load-balancer traffic is refused,
    // not let in from anywhere, and both are reported.
    let plan = node_rules(
        &snapshot(vec![lb(json!(["2001:db8:1::/48", "10.0.0.0/40"]))], vec![]),
        &config(ProxyMode::Replacement),
    );
    let lb_v4 = ranges_by_kind(&plan)
        .into_iter()
        .find(|(kind, address, _)| *kind == LoadBalancer && address == "198.51.100.20");
    assert_eq!(lb_v4.unwrap().2, Some(vec![]));
    assert_eq!(
        plan.problems,
        [
            Problem::new(
                "Service/shop/lb",
                "spec.loadBalancerSourceRanges",
                "no usable IPv4 range: IPv4 traffic to the load-balancer IPs is dropped \
                 (kube-proxy would accept it from anywhere)"
            ),
            Problem::new(
                "Service/shop/lb",
                "spec.loadBalancerSourceRanges[1]",
                "\"10.0.0.0/40\": prefix length above 32; ignored"
            ),
        ]
    );

    // Source ranges on a Service that is no LoadBalancer (validation refuses them) restrict
    // nothing; proxying loses nothing by it, so the planner has nothing to report.
    let svc = web_service(json!({"loadBalancerSourceRanges": ["10.0.0.0/8"]}), json!({}));
    let plan = node_rules(&snapshot(vec![svc], vec![]), &config(ProxyMode::Replacement));
    assert!(plan.virtual_servers.iter().all(|vs| vs.source_ranges.is_none()));
    assert_eq!(plan.problems, []);
}

#[test]
fn node_port_addresses_pick_which_node_addresses_serve_node_ports() {
    let svc = web_service(json!({}), json!({}));
    // ExternalIP listed first: the primary address is still the first InternalIP.
    let node = node(&[
        ("ExternalIP", "203.0.113.10"),
        ("InternalIP", "192.168.0.10"),
        ("InternalIP", "192.168.0.11"),
        ("InternalIP", "fd00::10"),
    ]);
    let snap = Snapshot {
        nodes: vec![node],
        services: vec![svc],
        ..Default::default()
    };
    let node_ports = |addresses: NodePortAddresses| -> Vec<String> {
        let mut config = config(ProxyMode::Replacement);
        config.node_port_addresses = addresses;
        let plan = node_rules(&snap, &config);
        assert_eq!(plan.node_addresses.len(), 4, "every address stays known");
        plan.virtual_servers
            .iter()
            .filter(|vs| vs.kind == VirtualServerKind::NodePort)
            .map(|vs| vs.key.address.to_string())
            .collect()
    };
    let parse =
        |values: &[&str]| NodePortAddresses::parse(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>());
    assert_eq!(
        node_ports(parse(&[]).unwrap()),
        ["192.168.0.10", "192.168.0.11", "203.0.113.10", "fd00::10"]
    );
    assert_eq!(
        node_ports(parse(&["primary"]).unwrap()),
        ["192.168.0.10", "fd00::10"]
    );
    assert_eq!(
        node_ports(parse(&["192.168.0.10/31", " fd00::/64"]).unwrap()),
        ["192.168.0.10", "192.168.0.11", "fd00::10"]
    );
    assert_eq!(node_ports(parse(&["203.0.113.10/32"]).unwrap()), ["203.0.113.10"]);
    assert!(node_ports(parse(&["10.0.0.0/8"]).unwrap()).is_empty());
    let mut config = config(ProxyMode::Replacement);
    config.node_port_addresses = parse(&["10.0.0.0/8"]).unwrap();
    assert_eq!(
        node_rules(&snap, &config).problems,
        [Problem::new(
            "Node/node-a",
            "status.addresses",
            "no address matches --nodeport-addresses: node ports are not served on this node"
        )]
    );
    assert_eq!(
        parse(&["primary", "10.0.0.0/8"]),
        Err("\"primary\" must be the only value when given".to_string())
    );
    assert!(parse(&["10.0.0.0"]).unwrap_err().contains("not a CIDR"));
}

#[test]
fn unknown_node_plans_no_node_ports_but_reserves_them() {
    let svc = web_service(json!({}), json!({}));
    let mut snap = snapshot(vec![svc], vec![]);
    snap.nodes.clear();
    let rules = node_rules(&snap, &config(ProxyMode::Replacement));
    assert!(
        rules
            .virtual_servers
            .iter()
            .all(|vs| vs.kind == VirtualServerKind::ClusterIP)
    );
    assert_eq!(rules.reserved_node_ports, BTreeSet::from([30080]));
    assert_eq!(rules.problems[0].object, "Node/node-a");
}

#[test]
fn session_affinity_sets_persistence() {
    let cases = [
        (json!({}), None),
        (json!({"sessionAffinity": "None"}), None),
        (json!({"sessionAffinity": "ClientIP"}), Some(10800)),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
            Some(600),
        ),
    ];
    for (spec, want) in cases {
        let rules = node_rules(
            &snapshot(vec![web_service(spec.clone(), json!({}))], vec![]),
            &config(ProxyMode::Replacement),
        );
        assert!(!rules.virtual_servers.is_empty());
        for vs in &rules.virtual_servers {
            assert_eq!(vs.persistence_timeout, want, "{spec}");
        }
        assert!(rules.table().values().all(|s| s.persistence_timeout == want));
    }
}

#[test]
fn scheduler_comes_from_the_governing_policy() {
    let policy = |name: &str, spec: Value| -> crate::crd::PortPolicy {
        object(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name}, "spec": spec}),
        )
    };
    let mut snap = snapshot(
        vec![
            service(
                "edge",
                "a",
                json!({}),
                json!({"clusterIP": "10.96.2.1", "ports": [{"port": 80}]}),
                json!({}),
            ),
            service(
                "other",
                "b",
                json!({}),
                json!({"clusterIP": "10.96.2.2", "ports": [{"port": 80}]}),
                json!({}),
            ),
            service(
                "edge",
                "c",
                json!({"labels": {"tier": "web"}}),
                json!({"clusterIP": "10.96.2.3", "ports": [{"port": 80}]}),
                json!({}),
            ),
        ],
        vec![],
    );
    snap.policies = vec![
        policy(
            "edge",
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}},
            "agent": {"scheduler": "lc"}}),
        ),
        policy(
            "web",
            json!({"serviceSelector": {"matchLabels": {"tier": "web"}}, "agent": {"scheduler": "sh"}}),
        ),
    ];
    let rules = node_rules(&snap, &config(ProxyMode::Replacement));
    let schedulers: Vec<_> = rules
        .virtual_servers
        .iter()
        .map(|vs| (&*vs.service, &*vs.scheduler))
        .collect();
    assert_eq!(
        schedulers,
        [("edge/a", "lc"), ("edge/c", "rr"), ("other/b", "rr")]
    );
    assert!(
        rules
            .problems
            .iter()
            .any(|p| p.object == "Service/edge/c" && p.message.contains("edge and web"))
    );

    // The incremental planner picks up a policy change and marks exactly the affected keys.
    let mut tracker = RuleTracker::new(config(ProxyMode::Replacement));
    tracker.load_snapshot(&snap);
    tracker.take_dirty();
    let set = PolicySet::compile(&[policy("all", json!({"agent": {"scheduler": "wlc"}}))]);
    tracker.set_policies(set, snap.namespace_labels());
    assert_eq!(tracker.take_dirty().len(), 3);
    assert!(tracker.desired().values().all(|s| &*s.scheduler == "wlc"));

    // Policies from a watch that has not seen the namespaces yet: every namespace still carries
    // its name label, so the edge policy governs edge/a as it does in the snapshot.
    let set = PolicySet::compile(&snap.policies);
    tracker.set_policies(set, NamespaceLabels::default());
    assert_eq!(&*tracker.node_rules().virtual_servers[0].scheduler, "lc");
}

#[test]
fn health_checks_count_distinct_local_ready_ips() {
    let svc = service(
        "shop",
        "lb",
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]}),
        json!({}),
    );
    let ports = json!([{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]);
    let slices = vec![
        slice(
            "shop",
            "lb-1",
            "lb",
            "IPv4",
            ports.clone(),
            json!([
                endpoint("10.1.0.1", NODE, json!({"ready": true})),
                // Ready but terminating (publishNotReadyAddresses): not counted.
                endpoint("10.1.0.2", NODE, json!({"ready": true, "terminating": true})),
                endpoint("10.1.0.3", NODE, json!({"ready": false})),
                endpoint("10.1.0.4", "node-b", json!({"ready": true})),
            ]),
        ),
        // The same IP in another slice counts once.
        slice(
            "shop",
            "lb-2",
            "lb",
            "IPv4",
            ports,
            json!([
                endpoint("10.1.0.1", NODE, json!({})),
                endpoint("10.1.0.5", NODE, json!({})),
            ]),
        ),
    ];
    let cluster = service(
        "shop",
        "cluster-lb",
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.21", "healthCheckNodePort": 32001,
            "ports": [{"port": 80, "nodePort": 30090}]}),
        json!({}),
    );
    let legacy = service(
        "shop",
        "legacy",
        json!({"annotations": {EXTERNAL_TRAFFIC_ANNOTATION: "OnlyLocal", HEALTH_CHECK_NODE_PORT_ANNOTATION: "32002"}}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.22", "ports": [{"port": 80, "nodePort": 30091}]}),
        json!({}),
    );
    let rules = node_rules(
        &snapshot(vec![svc, cluster, legacy], slices),
        &config(ProxyMode::Replacement),
    );
    assert_eq!(
        rules.health_checks,
        [
            HealthCheckRule {
                namespace: "shop".into(),
                name: "lb".into(),
                node_port: 32000,
                local_endpoints: 2
            },
            HealthCheckRule {
                namespace: "shop".into(),
                name: "legacy".into(),
                node_port: 32002,
                local_endpoints: 0
            },
        ]
    );
    assert_eq!(
        rules.reserved_node_ports,
        BTreeSet::from([30080, 30090, 30091, 30443, 32000, 32002])
    );
}

/// Where the planner's reading of a Service used to differ from the allocator's, it now reads
/// the one Service model, which decides as the API server does.
#[test]
fn services_are_read_as_the_api_server_reads_them() {
    // healthCheckNodePort 0 means "allocate one": no problem, and no health check until then.
    let unallocated = service(
        "shop",
        "lb",
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 0, "ports": [{"port": 80, "nodePort": 30090}]}),
        json!({}),
    );
    // A Service in the empty namespace is in `default`; one without a name cannot exist.
    let mut defaulted = web_service(json!({}), json!({}));
    defaulted.metadata.namespace = Some(String::new());
    let mut nameless = service(
        "shop",
        "x",
        json!({}),
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
        json!({}),
    );
    nameless.metadata.name = None;
    let rules = node_rules(
        &snapshot(vec![unallocated, defaulted, nameless], vec![]),
        &config(ProxyMode::Replacement),
    );
    assert_eq!(rules.problems, []);
    assert_eq!(rules.health_checks, []);
    let services: BTreeSet<&str> = rules.virtual_servers.iter().map(|vs| &*vs.service).collect();
    assert_eq!(services, BTreeSet::from(["default/web", "shop/lb"]));

    // A healthCheckNodePort that is one of the Service's nodePorts is not served twice.
    let clash = service(
        "shop",
        "lb",
        json!({}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30080, "ports": [{"port": 80, "nodePort": 30080}]}),
        json!({}),
    );
    let rules = node_rules(&snapshot(vec![clash], vec![]), &config(ProxyMode::Replacement));
    assert_eq!(rules.health_checks, []);
    assert_eq!(
        rules.problems,
        [Problem::new(
            "Service/shop/lb",
            "spec.healthCheckNodePort",
            "30080 is already the nodePort of spec.ports[0]; no health check served"
        )]
    );
}

#[test]
fn two_services_on_one_virtual_server_first_wins() {
    let shared = |ns: &str, name: &str, cluster_ip: &str| {
        service(
            ns,
            name,
            json!({}),
            json!({"clusterIP": cluster_ip, "externalIPs": ["198.51.100.7"], "ports": [{"port": 80}]}),
            json!({}),
        )
    };
    let slices = vec![
        slice(
            "b",
            "x-1",
            "x",
            "IPv4",
            json!([{"port": 8080}]),
            json!([endpoint("10.1.0.1", NODE, json!({}))]),
        ),
        slice(
            "a",
            "y-1",
            "y",
            "IPv4",
            json!([{"port": 9090}]),
            json!([endpoint("10.1.0.2", NODE, json!({}))]),
        ),
    ];
    let snap = snapshot(
        vec![shared("b", "x", "10.96.3.1"), shared("a", "y", "10.96.3.2")],
        slices,
    );
    let rules = node_rules(&snap, &config(ProxyMode::Replacement));
    assert_eq!(
        reals(&rules, VirtualServerKind::ExternalIP, "198.51.100.7"),
        ["10.1.0.2:9090"]
    );
    assert_eq!(
        rules
            .virtual_servers
            .iter()
            .filter(|vs| vs.kind == VirtualServerKind::ExternalIP)
            .count(),
        1
    );
    assert_eq!(rules.problems.len(), 1);
    assert_eq!(rules.problems[0].object, "Service/b/x");
    assert!(rules.problems[0].message.contains("Service/a/y"));

    // When the winner goes, the other Service takes the virtual server over.
    let mut tracker = RuleTracker::new(config(ProxyMode::Replacement));
    tracker.load_snapshot(&snap);
    tracker.take_dirty();
    tracker.remove_service("a", "y");
    let key = vs_key("198.51.100.7", 80, Protocol::Tcp);
    assert_eq!(
        tracker.take_dirty(),
        BTreeSet::from([vs_key("10.96.3.2", 80, Protocol::Tcp), key])
    );
    let reals: Vec<_> = tracker.desired()[&key]
        .real_servers
        .keys()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(reals, ["10.1.0.1:8080"]);
}

#[test]
fn one_slice_change_dirties_only_its_service() {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..5 {
        let name = format!("s{i}");
        services.push(service(
            "shop",
            &name,
            json!({}),
            json!({"clusterIP": format!("10.96.4.{i}"), "ports": [{"port": 80}]}),
            json!({}),
        ));
        slices.push(slice(
            "shop",
            &format!("{name}-1"),
            &name,
            "IPv4",
            json!([{"port": 8080}]),
            json!([endpoint(&format!("10.1.4.{i}"), NODE, json!({}))]),
        ));
    }
    let snap = snapshot(services, slices);
    let mut tracker = RuleTracker::new(config(ProxyMode::Replacement));
    tracker.load_snapshot(&snap);
    assert_eq!(tracker.take_dirty().len(), 5);
    // Reloading the same snapshot changes nothing.
    tracker.load_snapshot(&snap);
    assert!(tracker.take_dirty().is_empty());

    let kernel = tracker.desired().clone();
    tracker.upsert_slice(&slice(
        "shop",
        "s2-1",
        "s2",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            endpoint("10.1.4.2", NODE, json!({})),
            endpoint("10.1.4.22", NODE, json!({}))
        ]),
    ));
    let dirty = tracker.take_dirty();
    assert_eq!(dirty, BTreeSet::from([vs_key("10.96.4.2", 80, Protocol::Tcp)]));
    let ops = diff_keys(&kernel, tracker.desired(), &dirty, &Ownership::everything());
    assert_eq!(ops.len(), 1, "{ops:?}");
    // An upsert that changes nothing dirties nothing.
    tracker.upsert_slice(&snap.endpoint_slices[0]);
    assert!(tracker.take_dirty().is_empty());
}

#[test]
fn node_address_change_replans_node_ports() {
    let mut tracker = RuleTracker::new(config(ProxyMode::Replacement));
    tracker.load_snapshot(&snapshot(vec![web_service(json!({}), json!({}))], vec![]));
    tracker.take_dirty();
    tracker.set_node(&node(&[
        ("InternalIP", "192.168.0.10"),
        ("InternalIP", "192.168.0.11"),
    ]));
    let dirty: Vec<String> = tracker.take_dirty().iter().map(|k| k.to_string()).collect();
    assert_eq!(
        dirty,
        [
            "TCP 192.168.0.11:30080",
            "TCP 203.0.113.10:30080",
            "TCP [fd00::10]:30080"
        ]
    );
    // Another node's object is not this node's.
    let mut other = default_node();
    other.metadata.name = Some("node-b".into());
    tracker.set_node(&other);
    assert!(tracker.take_dirty().is_empty());
}

#[test]
fn later_copies_in_a_snapshot_win_as_applying_them_in_order_would() {
    let ports = http_ports();
    let web = |ip: &str| web_service(json!({"clusterIP": ip}), json!({}));
    let first = slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        ports.clone(),
        json!([endpoint("10.1.0.1", NODE, json!({}))]),
    );
    // The same slice again, relabeled to another Service and with another endpoint.
    let moved = slice(
        "shop",
        "web-abc",
        "api",
        "IPv4",
        ports.clone(),
        json!([endpoint("10.1.0.2", NODE, json!({}))]),
    );
    let api = service(
        "shop",
        "api",
        json!({}),
        json!({"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        json!({}),
    );
    let snap = snapshot(
        vec![web("10.96.0.9"), api.clone(), web("10.96.0.10")],
        vec![first.clone(), moved.clone()],
    );
    let rules = node_rules(&snap, &config(ProxyMode::Replacement));

    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "10.96.0.10"),
        Vec::<String>::new()
    );
    assert_eq!(
        reals(&rules, VirtualServerKind::ClusterIP, "10.96.0.20"),
        ["10.1.0.2:8080"]
    );
    assert!(
        !rules
            .virtual_servers
            .iter()
            .any(|vs| vs.key.address == ip("10.96.0.9")),
        "the earlier copy of the Service is replaced"
    );

    let mut applied = RuleTracker::new(config(ProxyMode::Replacement));
    applied.set_node(&default_node());
    for service in &snap.services {
        applied.upsert_service(service);
    }
    applied.upsert_slice(&first);
    applied.upsert_slice(&moved);
    assert_eq!(applied.node_rules(), rules);
}

mod topology;

mod incremental {
    use super::*;
    use crate::ipvs::IpvsOp;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Event {
        UpsertService {
            index: usize,
            variant: u8,
        },
        RemoveService {
            index: usize,
        },
        UpsertSlice {
            index: usize,
            service: usize,
            endpoints: Vec<(u8, bool, u8, u8)>,
        },
        RemoveSlice {
            index: usize,
        },
        SetNode {
            variant: u8,
        },
        /// A re-list: everything reloaded in bulk from the objects as they are now.
        Reload,
    }

    const SERVICES: [(&str, &str); 4] = [("a", "s0"), ("a", "s1"), ("b", "s0"), ("b", "s2")];

    fn service_variant(index: usize, variant: u8) -> Service {
        let (ns, name) = SERVICES[index];
        let kind = ["ClusterIP", "NodePort", "LoadBalancer"][usize::from(variant % 3)];
        let local = variant & 4 != 0;
        let mut spec = json!({"type": kind, "clusterIP": format!("10.96.0.{index}"),
            "ports": [{"name": "http", "port": 80, "nodePort": 30000 + index},
                      {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30100 + index}],
            "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
            "internalTrafficPolicy": if variant & 8 != 0 { "Local" } else { "Cluster" }});
        if variant & 16 != 0 {
            // A shared external IP: several Services claim the same virtual server.
            spec["externalIPs"] = json!(["198.51.100.1"]);
        }
        if variant & 32 != 0 {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        if variant & 128 != 0 {
            // Source ranges restrict the load-balancer virtual servers; the request for
            // topology only changes what the plan reports about a node without a zone.
            spec["loadBalancerSourceRanges"] = json!(["203.0.113.0/24", format!("10.{index}.0.0/16")]);
            spec["trafficDistribution"] = json!("PreferSameZone");
        }
        if kind != "LoadBalancer" {
            spec["externalTrafficPolicy"] = Value::Null;
        } else if local {
            spec["healthCheckNodePort"] = json!(32000 + index);
        }
        if kind == "ClusterIP" {
            for port in spec["ports"].as_array_mut().unwrap() {
                port.as_object_mut().unwrap().remove("nodePort");
            }
        }
        let meta = if variant & 64 != 0 {
            json!({"labels": {SERVICE_PROXY_NAME_LABEL: "other"}})
        } else {
            json!({})
        };
        service(
            ns,
            name,
            meta,
            spec,
            json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.50"}]}}),
        )
    }

    fn slice_variant(index: usize, service: usize, endpoints: &[(u8, bool, u8, u8)]) -> EndpointSlice {
        let (ns, name) = SERVICES[service];
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(host, local, state, hints)| {
                let conditions = match state % 4 {
                    0 => json!({}),
                    1 => json!({"ready": false, "serving": false}),
                    2 => json!({"ready": false, "serving": true, "terminating": true}),
                    _ => json!({"ready": true, "terminating": true}),
                };
                let node = if *local { NODE } else { "node-b" };
                let mut endpoint = endpoint(&format!("10.1.0.{host}"), node, conditions);
                // No hints, a zone, both zones, or a zone and the endpoint's own node.
                let zone = json!([{"name": format!("zone-{}", host % 2)}]);
                endpoint["hints"] = match hints % 4 {
                    0 => Value::Null,
                    1 => json!({"forZones": zone}),
                    2 => json!({"forZones": [{"name": "zone-0"}, {"name": "zone-1"}]}),
                    _ => json!({"forZones": zone, "forNodes": [{"name": node}]}),
                };
                endpoint
            })
            .collect();
        // Slice names are unique per namespace; keep the namespace of the Service.
        slice(
            ns,
            &format!("slice-{index}"),
            name,
            "IPv4",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!(endpoints),
        )
    }

    fn node_variant(variant: u8) -> Node {
        let mut node = match variant % 3 {
            0 => default_node(),
            1 => node(&[("InternalIP", "192.168.0.10")]),
            _ => node(&[("InternalIP", "192.168.0.12"), ("ExternalIP", "198.51.100.1")]),
        };
        // No zone label, or one of the two zones the endpoints are hinted for.
        let zone_variant = (variant / 3) % 3;
        if zone_variant > 0 {
            let zone = format!("zone-{}", zone_variant - 1);
            node.metadata.labels = Some(BTreeMap::from([(
                crate::well_known::ZONE_LABEL.to_string(),
                zone,
            )]));
        }
        node
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0..4usize, any::<u8>()).prop_map(|(index, variant)| Event::UpsertService { index, variant }),
            (0..4usize).prop_map(|index| Event::RemoveService { index }),
            (
                0..6usize,
                0..4usize,
                prop::collection::vec((0..5u8, any::<bool>(), 0..4u8, 0..4u8), 0..4)
            )
                .prop_map(|(index, service, endpoints)| Event::UpsertSlice {
                    index,
                    service,
                    endpoints
                }),
            (0..6usize).prop_map(|index| Event::RemoveSlice { index }),
            any::<u8>().prop_map(|variant| Event::SetNode { variant }),
            Just(Event::Reload),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// After any sequence of watch events and re-lists, the incremental planner's plan and
        /// table equal a fresh plan of the same objects, and applying only the dirty keys' diffs
        /// keeps a kernel table equal to the desired one.
        #[test]
        fn incremental_equals_from_scratch(
            events in prop::collection::vec((event(), prop::bool::weighted(0.2)), 1..30),
        ) {
            let mode = ProxyMode::Replacement;
            let mut tracker = RuleTracker::new(config(mode));
            let mut services: BTreeMap<usize, Service> = BTreeMap::new();
            let mut slices: BTreeMap<usize, EndpointSlice> = BTreeMap::new();
            let mut current_node: Option<Node> = None;
            let mut kernel = IpvsTable::new();
            // Whether an event was missed since the last re-list.
            let mut stale = false;
            for (event, missed) in events {
                // A missed event changes the objects but never reaches the planner, as when a
                // watch drops; the next re-list must catch up with it.
                let mut scratch;
                let target = if missed && !matches!(event, Event::Reload) {
                    stale = true;
                    scratch = tracker.clone();
                    &mut scratch
                } else {
                    &mut tracker
                };
                match event {
                    Event::UpsertService { index, variant } => {
                        let svc = service_variant(index, variant);
                        target.upsert_service(&svc);
                        services.insert(index, svc);
                    }
                    Event::RemoveService { index } => {
                        let (ns, name) = SERVICES[index];
                        target.remove_service(ns, name);
                        services.remove(&index);
                    }
                    Event::UpsertSlice { index, service, endpoints } => {
                        let s = slice_variant(index, service, &endpoints);
                        // A slice moving namespace is a delete and a create, as the API sees it.
                        if let Some(old) = slices.get(&index)
                            && old.metadata.namespace != s.metadata.namespace
                        {
                            target.remove_slice(old.metadata.namespace.as_deref().unwrap(), &format!("slice-{index}"));
                        }
                        target.upsert_slice(&s);
                        slices.insert(index, s);
                    }
                    Event::RemoveSlice { index } => {
                        if let Some(old) = slices.remove(&index) {
                            target.remove_slice(old.metadata.namespace.as_deref().unwrap(), &format!("slice-{index}"));
                        }
                    }
                    Event::SetNode { variant } => {
                        let n = node_variant(variant);
                        target.set_node(&n);
                        current_node = Some(n);
                    }
                    Event::Reload => {
                        stale = false;
                        target.load_snapshot(&Snapshot {
                            nodes: current_node.iter().cloned().collect(),
                            services: services.values().cloned().collect(),
                            endpoint_slices: slices.values().cloned().collect(),
                            ..Default::default()
                        });
                    }
                }
                let dirty = tracker.take_dirty();
                for op in diff_keys(&kernel, tracker.desired(), &dirty, &Ownership::everything()) {
                    prop_assert!(op.apply_to(&mut kernel).is_ok(), "{op}");
                    let drains = matches!(op, IpvsOp::UpdateRealServer { weight: 0, .. });
                    prop_assert!(!drains, "nothing has connections to drain: {}", op);
                }
                prop_assert_eq!(&kernel, tracker.desired());
            }
            let snap = Snapshot {
                nodes: current_node.into_iter().collect(),
                services: services.into_values().collect(),
                endpoint_slices: slices.into_values().collect(),
                ..Default::default()
            };
            if stale {
                tracker.load_snapshot(&snap);
                let dirty = tracker.take_dirty();
                for op in diff_keys(&kernel, tracker.desired(), &dirty, &Ownership::everything()) {
                    prop_assert!(op.apply_to(&mut kernel).is_ok(), "{op}");
                }
                prop_assert_eq!(&kernel, tracker.desired());
            }
            let fresh = node_rules(&snap, &config(mode));
            prop_assert_eq!(&tracker.node_rules(), &fresh);
            prop_assert_eq!(tracker.desired(), &fresh.table());
        }
    }
}
