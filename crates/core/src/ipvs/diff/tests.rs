use std::collections::BTreeMap;

use super::*;
use crate::ipvs::table::test_keys::{rs_key as real, vs_key as key};
use crate::ipvs::table::{RealServerKey, RealServerState};
use pretty_assertions::assert_eq;
use proptest::prelude::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn state(weight: u32, active: u32, inactive: u32) -> RealServerState {
    RealServerState {
        weight,
        active_connections: active,
        inactive_connections: inactive,
    }
}

fn service(scheduler: &str, reals: &[(&str, RealServerState)]) -> IpvsService {
    IpvsService {
        scheduler: scheduler.into(),
        persistence_timeout: None,
        real_servers: reals.iter().map(|(r, s)| (real(r, 8080), *s)).collect(),
    }
}

fn table(entries: &[(VirtualServerKey, IpvsService)]) -> IpvsTable {
    entries.iter().cloned().collect()
}

fn apply(table: &mut IpvsTable, ops: &[IpvsOp]) {
    for op in ops {
        op.apply_to(table)
            .unwrap_or_else(|e| panic!("kernel refuses {op}: {e:?}"));
    }
}

const W1: RealServerState = RealServerState {
    weight: 1,
    active_connections: 0,
    inactive_connections: 0,
};

#[test]
fn unchanged_table_gives_no_ops() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let t = table(&[(k, service("rr", &[("10.1.0.1", state(1, 5, 3))]))]);
    let desired = table(&[(k, service("rr", &[("10.1.0.1", W1)]))]);
    assert_eq!(diff(&t, &desired, &Ownership::everything()), []);
}

#[test]
fn new_service_is_added_before_its_real_servers() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let desired = table(&[(k, service("lc", &[("10.1.0.1", W1), ("10.1.0.2", W1)]))]);
    let ops = diff(&IpvsTable::new(), &desired, &Ownership::everything());
    assert_eq!(
        ops,
        [
            IpvsOp::AddService {
                key: k,
                scheduler: "lc".into(),
                persistence_timeout: None
            },
            IpvsOp::AddRealServer {
                service: k,
                real: real("10.1.0.1", 8080),
                weight: 1
            },
            IpvsOp::AddRealServer {
                service: k,
                real: real("10.1.0.2", 8080),
                weight: 1
            },
        ]
    );
}

#[test]
fn one_replaced_endpoint_is_one_add_and_one_delete() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let current = table(&[(k, service("rr", &[("10.1.0.1", W1), ("10.1.0.2", W1)]))]);
    let desired = table(&[(k, service("rr", &[("10.1.0.1", W1), ("10.1.0.3", W1)]))]);
    let ops = diff(&current, &desired, &Ownership::everything());
    assert_eq!(
        ops,
        [
            IpvsOp::AddRealServer {
                service: k,
                real: real("10.1.0.3", 8080),
                weight: 1
            },
            IpvsOp::DeleteRealServer {
                service: k,
                real: real("10.1.0.2", 8080)
            },
        ]
    );
}

#[test]
fn settings_change_is_one_update() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let current = table(&[(k, service("rr", &[("10.1.0.1", W1)]))]);
    let mut want = service("rr", &[("10.1.0.1", W1)]);
    want.persistence_timeout = Some(10800);
    let ops = diff(&current, &table(&[(k, want)]), &Ownership::everything());
    assert_eq!(
        ops,
        [IpvsOp::UpdateService {
            key: k,
            scheduler: "rr".into(),
            persistence_timeout: Some(10800)
        }]
    );
    let ops = diff(
        &current,
        &table(&[(k, service("sh", &[("10.1.0.1", W1)]))]),
        &Ownership::everything(),
    );
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].kind(), "update_service");
}

#[test]
fn removed_service_is_one_delete() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let current = table(&[(
        k,
        service("rr", &[("10.1.0.1", state(1, 4, 0)), ("10.1.0.2", W1)]),
    )]);
    let ops = diff(&current, &IpvsTable::new(), &Ownership::everything());
    assert_eq!(ops, [IpvsOp::DeleteService { key: k }]);
}

#[test]
fn tcp_real_servers_drain_before_deletion() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let gone = real("10.1.0.2", 8080);
    let desired = table(&[(k, service("rr", &[("10.1.0.1", W1)]))]);
    let mut kernel = table(&[(
        k,
        service("rr", &[("10.1.0.1", W1), ("10.1.0.2", state(1, 2, 0))]),
    )]);

    let ops = diff(&kernel, &desired, &Ownership::everything());
    assert_eq!(
        ops,
        [IpvsOp::UpdateRealServer {
            service: k,
            real: gone,
            weight: 0
        }]
    );
    apply(&mut kernel, &ops);
    // Still draining (only inactive connections left): nothing more to do, and no repeat.
    kernel
        .get_mut(&k)
        .unwrap()
        .real_servers
        .get_mut(&gone)
        .unwrap()
        .active_connections = 0;
    kernel
        .get_mut(&k)
        .unwrap()
        .real_servers
        .get_mut(&gone)
        .unwrap()
        .inactive_connections = 1;
    assert_eq!(diff(&kernel, &desired, &Ownership::everything()), []);
    // Drained: deleted.
    kernel
        .get_mut(&k)
        .unwrap()
        .real_servers
        .get_mut(&gone)
        .unwrap()
        .inactive_connections = 0;
    assert_eq!(
        diff(&kernel, &desired, &Ownership::everything()),
        [IpvsOp::DeleteRealServer {
            service: k,
            real: gone
        }]
    );
}

#[test]
fn udp_and_sctp_real_servers_go_at_once() {
    for protocol in [Protocol::Udp, Protocol::Sctp] {
        let k = key("10.96.0.10", 53, protocol);
        let current = table(&[(
            k,
            service("rr", &[("10.1.0.1", W1), ("10.1.0.2", state(1, 9, 9))]),
        )]);
        let desired = table(&[(k, service("rr", &[("10.1.0.1", W1)]))]);
        assert_eq!(
            diff(&current, &desired, &Ownership::everything()),
            [IpvsOp::DeleteRealServer {
                service: k,
                real: real("10.1.0.2", 8080)
            }],
            "{protocol}"
        );
    }
}

#[test]
fn draining_real_server_that_comes_back_gets_its_weight() {
    let k = key("10.96.0.1", 80, Protocol::Tcp);
    let current = table(&[(k, service("rr", &[("10.1.0.1", state(0, 3, 1))]))]);
    let desired = table(&[(k, service("rr", &[("10.1.0.1", W1)]))]);
    assert_eq!(
        diff(&current, &desired, &Ownership::everything()),
        [IpvsOp::UpdateRealServer {
            service: k,
            real: real("10.1.0.1", 8080),
            weight: 1
        }]
    );
}

#[test]
fn ownership_rules() {
    let range = "31000-31099".parse::<PortRange>().unwrap();
    let ownership = Ownership::nothing()
        .with_bound_addresses([ip("10.96.0.1"), ip("198.51.100.7")])
        .with_node_ports([ip("192.168.0.10")], [range]);
    let cases = [
        (
            key("10.96.0.1", 80, Protocol::Tcp),
            true,
            "bound address, any port",
        ),
        (
            key("10.96.0.1", 9999, Protocol::Udp),
            true,
            "bound address, any protocol",
        ),
        (
            key("10.96.0.2", 80, Protocol::Tcp),
            false,
            "cluster IP bound by someone else",
        ),
        (
            key("192.168.0.10", 31000, Protocol::Tcp),
            true,
            "node address, port in range",
        ),
        (
            key("192.168.0.10", 31099, Protocol::Sctp),
            true,
            "node address, top of range",
        ),
        (
            key("192.168.0.10", 30080, Protocol::Tcp),
            false,
            "node address, kube-proxy's port",
        ),
        (
            key("192.168.0.11", 31000, Protocol::Tcp),
            false,
            "not this node's address",
        ),
    ];
    for (k, owned, why) in cases {
        assert_eq!(ownership.owns(&k), owned, "{why}: {k}");
    }
    // Rule 4: with the node's interfaces known, a port in range on an address none holds is
    // a node port left on an address the Node lost; one the node holds is someone else's.
    let knowing_the_host = ownership.with_host_addresses(Arc::new(BTreeSet::from([
        ip("192.168.0.10"),
        ip("10.96.0.2"),
        ip("127.0.0.1"),
    ])));
    let cases = [
        (
            key("192.168.0.11", 31000, Protocol::Tcp),
            true,
            "address the node lost, port in range",
        ),
        (
            key("192.168.0.11", 30080, Protocol::Tcp),
            false,
            "address the node lost, kube-proxy's port",
        ),
        (
            key("10.96.0.2", 31050, Protocol::Tcp),
            false,
            "kube-proxy's VIP, held on kube-ipvs0",
        ),
        (
            key("10.96.0.1", 80, Protocol::Tcp),
            true,
            "bound address, as before",
        ),
        (
            key("192.168.0.10", 31000, Protocol::Tcp),
            true,
            "node address, as before",
        ),
    ];
    for (k, owned, why) in cases {
        assert_eq!(knowing_the_host.owns(&k), owned, "{why}: {k}");
    }
    let everything = Ownership::everything();
    assert!(everything.owns(&key("10.0.0.1", 1, Protocol::Tcp)));
    assert!(!Ownership::nothing().owns(&key("10.0.0.1", 1, Protocol::Tcp)));
}

#[test]
fn foreign_virtual_servers_are_never_touched() {
    let ours = key("10.96.0.1", 80, Protocol::Tcp);
    let theirs = key("10.96.0.2", 80, Protocol::Tcp);
    let stale_theirs = key("10.96.0.3", 80, Protocol::Tcp);
    let current = table(&[
        (theirs, service("wlc", &[("10.2.0.1", W1)])),
        (stale_theirs, service("rr", &[])),
    ]);
    let desired = table(&[
        (ours, service("rr", &[("10.1.0.1", W1)])),
        // Desired but not ours to program: left alone, never created.
        (theirs, service("rr", &[("10.1.0.9", W1)])),
    ]);
    let ownership = Ownership::nothing().with_bound_addresses([ip("10.96.0.1")]);
    let ops = diff(&current, &desired, &ownership);
    assert!(ops.iter().all(|op| *op.service() == ours), "{ops:?}");
    assert_eq!(ops.len(), 2);
    let keys = BTreeSet::from([ours, theirs, stale_theirs]);
    assert_eq!(diff_keys(&current, &desired, &keys, &ownership), ops);
}

#[test]
fn diff_keys_looks_at_the_given_keys_only() {
    let a = key("10.96.0.1", 80, Protocol::Tcp);
    let b = key("10.96.0.2", 80, Protocol::Tcp);
    let desired = table(&[(a, service("rr", &[])), (b, service("rr", &[]))]);
    let ops = diff_keys(
        &IpvsTable::new(),
        &desired,
        &BTreeSet::from([b]),
        &Ownership::everything(),
    );
    assert_eq!(
        ops,
        [IpvsOp::AddService {
            key: b,
            scheduler: "rr".into(),
            persistence_timeout: None
        }]
    );
}

// Property tests over small universes, so that keys and real servers collide often.

fn key_strategy() -> impl Strategy<Value = VirtualServerKey> {
    (
        prop::sample::select(vec!["10.96.0.1", "10.96.0.2", "192.168.0.10", "fd00::1"]),
        prop::sample::select(vec![80u16, 31000]),
        prop::sample::select(Protocol::ALL.to_vec()),
    )
        .prop_map(|(a, port, protocol)| key(a, port, protocol))
}

fn service_strategy(with_counters: bool) -> impl Strategy<Value = IpvsService> {
    let max_counter = if with_counters { 2u32 } else { 0 };
    (
        prop::sample::select(vec!["rr", "lc"]),
        prop::option::of(Just(10800u32)),
        prop::collection::btree_map(
            (
                prop::sample::select(vec!["10.1.0.1", "10.1.0.2", "10.1.0.3", "fd00:1::1"]),
                prop::sample::select(vec![8080u16, 8081]),
            )
                .prop_map(|(a, p)| real(a, p)),
            (0..=2u32, 0..=max_counter, 0..=max_counter).prop_map(|(w, a, i)| state(w, a, i)),
            0..4,
        ),
    )
        .prop_map(|(scheduler, persistence_timeout, real_servers)| IpvsService {
            scheduler: scheduler.into(),
            persistence_timeout,
            real_servers,
        })
}

fn table_strategy(with_counters: bool) -> impl Strategy<Value = IpvsTable> {
    prop::collection::btree_map(key_strategy(), service_strategy(with_counters), 0..6)
}

fn ownership_strategy() -> impl Strategy<Value = Ownership> {
    let addresses = || {
        prop::collection::btree_set(
            prop::sample::select(vec!["10.96.0.1", "10.96.0.2", "192.168.0.10", "fd00::1"]).prop_map(ip),
            0..3,
        )
    };
    (any::<bool>(), addresses(), any::<bool>()).prop_map(|(everything, bound, node_ports)| {
        let base = if everything {
            Ownership::everything()
        } else {
            Ownership::nothing()
        };
        let ranges = node_ports.then(|| "30000-32767".parse::<PortRange>().unwrap());
        base.with_bound_addresses(bound)
            .with_node_ports([ip("192.168.0.10")], ranges)
    })
}

fn without_counters(service: &IpvsService) -> IpvsService {
    let mut service = service.clone();
    for state in service.real_servers.values_mut() {
        state.active_connections = 0;
        state.inactive_connections = 0;
    }
    service
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn diff_of_a_table_with_itself_is_empty(t in table_strategy(true), ownership in ownership_strategy()) {
        prop_assert_eq!(diff(&t, &t, &ownership), vec![]);
    }

    /// The kernel accepts every op; unowned keys are untouched; owned keys equal the desired
    /// state except for TCP real servers still holding connections, which are left at weight 0;
    /// once those drain, one more diff converges exactly, and then nothing is left to do.
    #[test]
    fn applying_the_diff_reaches_the_desired_state(
        current in table_strategy(true),
        desired in table_strategy(false),
        ownership in ownership_strategy(),
    ) {
        let ops = diff(&current, &desired, &ownership);
        let all_keys: BTreeSet<VirtualServerKey> = current.keys().chain(desired.keys()).copied().collect();
        prop_assert_eq!(&diff_keys(&current, &desired, &all_keys, &ownership), &ops);

        let mut kernel = current.clone();
        for op in &ops {
            prop_assert!(ownership.owns(op.service()));
            prop_assert!(op.apply_to(&mut kernel).is_ok(), "kernel refuses {}", op);
        }
        for k in &all_keys {
            if !ownership.owns(k) {
                prop_assert_eq!(kernel.get(k), current.get(k));
                continue;
            }
            let (Some(got), Some(want)) = (kernel.get(k), desired.get(k)) else {
                prop_assert_eq!(kernel.contains_key(k), desired.contains_key(k));
                continue;
            };
            prop_assert!(got.same_settings(want));
            let mut expected: BTreeMap<RealServerKey, u32> =
                want.real_servers.iter().map(|(r, s)| (*r, s.weight)).collect();
            if let Some(before) = current.get(k) {
                for (r, s) in &before.real_servers {
                    if !want.real_servers.contains_key(r) && k.protocol == Protocol::Tcp && s.has_connections() {
                        expected.insert(*r, 0);
                    }
                }
            }
            let weights: BTreeMap<RealServerKey, u32> = got.real_servers.iter().map(|(r, s)| (*r, s.weight)).collect();
            prop_assert_eq!(weights, expected);
        }

        // Drain every connection; the next diff converges.
        for service in kernel.values_mut() {
            *service = without_counters(service);
        }
        for op in diff(&kernel, &desired, &ownership) {
            prop_assert!(op.apply_to(&mut kernel).is_ok(), "kernel refuses {}", op);
        }
        for k in &all_keys {
            if ownership.owns(k) {
                prop_assert_eq!(kernel.get(k), desired.get(k));
            } else {
                prop_assert_eq!(kernel.get(k).map(without_counters), current.get(k).map(without_counters));
            }
        }
        prop_assert_eq!(diff(&kernel, &desired, &ownership), vec![]);
    }
}
