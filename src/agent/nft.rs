//! The agent's nftables ruleset: which traffic to IPVS virtual servers gets masqueraded.
//!
//! IPVS rewrites only the destination. When the reply would not come back through this node
//! (or would come back to an address the client never talked to) the source must be rewritten
//! too. The rules mark such packets while their destination is still the virtual server, before
//! IPVS sees them, and a `postrouting` NAT chain masquerades marked packets:
//! - node-local clients to any virtual server, always (their source is the virtual IP itself,
//!   which the backend cannot answer);
//! - external clients to node ports, external IPs and load-balancer IPs of services with the
//!   Cluster traffic policy (the endpoint may be on another node);
//! - clients to cluster IPs, only with `--masquerade-all` or from outside `--cluster-cidr`;
//! - a pod load-balanced to itself (hairpin).
//!
//! Traffic to Local-policy services from outside the node is never marked: the endpoint sees the
//! client's real address.
//!
//! The same chains drop new connections to load-balancer virtual servers from sources outside
//! their `loadBalancerSourceRanges` (kube-proxy's KUBE-LOAD-BALANCER-FW / source-ranges
//! firewall): a set of the restricted virtual servers and an interval set of allowed
//! (virtual server, source range) pairs. As in kube-proxy, a node whose address is in a range
//! may also reach the load balancer from itself (its packets carry the VIP as source), and
//! established flows are left alone when the ranges change. Health-check node ports and node
//! ports are never filtered.
//!
//! Generation is a pure function of the plan and the options, so the whole ruleset is tested as
//! text.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

pub use portpolicy_core::cidr::Cidr;
use portpolicy_core::ipvs::{IpvsTable, NodeRules, VirtualServerKey};
use portpolicy_core::ports::Protocol;

/// The table name, in both the `ip` and `ip6` families. The agent owns it whole.
pub(crate) const TABLE_NAME: &str = "portpolicy";
/// The packet mark bit meaning "masquerade me" (the bit kube-proxy uses for the same purpose).
pub(crate) const MASQUERADE_MARK: u32 = 0x4000;

/// Why `nft -f -` did not apply a ruleset.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("writing to nft: {0}")]
    Write(#[source] std::io::Error),
    #[error("waiting for nft: {0}")]
    Wait(#[source] std::io::Error),
    #[error("nft -f - exited with {status}: {stderr}")]
    Refused {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// How a virtual server is reached, which decides whether its traffic is masqueraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reach {
    /// A cluster IP.
    ClusterIp,
    /// A node port, external IP or load-balancer IP; `local` when the service's external
    /// traffic policy is Local (or the OnlyLocal annotation), which keeps the client address.
    External { local: bool },
}

/// Masquerading options from the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasqueradeOptions {
    /// Masquerade all traffic to cluster IPs and Cluster-policy external addresses.
    pub all: bool,
    /// Pod network ranges: traffic to cluster IPs from outside them is masqueraded.
    pub cluster_cidrs: Vec<Cidr>,
}

/// One address family's table.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    fn holds(self, address: &IpAddr) -> bool {
        matches!(
            (self, address),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn key_element(key: &VirtualServerKey) -> String {
    format!("{} . {} . {}", key.address, proto(key.protocol), key.port)
}

/// A load-balancer virtual server that accepts new connections only from `allowed`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRestriction {
    pub key: VirtualServerKey,
    /// Empty: no client may connect.
    pub allowed: Vec<Cidr>,
}

/// The plan's load-balancer source ranges as restrictions. A range holding one of the node's
/// addresses also lets the node itself in: its packets to a VIP it holds carry the VIP as
/// source (kube-proxy's `allowFromNode`).
pub fn source_restrictions(plan: &NodeRules) -> Vec<SourceRestriction> {
    plan.virtual_servers
        .iter()
        .filter_map(|vs| {
            let ranges = vs.source_ranges.as_ref()?;
            let mut allowed = ranges.to_vec();
            let from_node = ranges
                .iter()
                .any(|range| plan.node_addresses.iter().any(|ip| range.contains(ip)));
            if from_node {
                let host = if vs.key.address.is_ipv4() { 32 } else { 128 };
                allowed.extend(Cidr::new(vs.key.address, host));
            }
            Some(SourceRestriction { key: vs.key, allowed })
        })
        .collect()
}

/// The whole batch for `nft -f -`: both tables deleted and recreated in one transaction, so the
/// kernel never runs with half a ruleset and rules the agent no longer wants disappear.
pub(crate) fn ruleset<'a>(
    virtual_servers: impl IntoIterator<Item = (&'a VirtualServerKey, Reach)>,
    table: &IpvsTable,
    options: &MasqueradeOptions,
    restrictions: &[SourceRestriction],
) -> String {
    let servers: BTreeSet<(VirtualServerKey, Reach)> =
        virtual_servers.into_iter().map(|(k, r)| (*k, r)).collect();
    let mut out = String::new();
    family_table(&mut out, Family::V4, &servers, table, options, restrictions);
    // The ip6 table only when there is IPv6 to serve: on nodes without IPv6 the whole batch
    // would otherwise fail. (A table left from earlier IPv6 Services only matches their keys.)
    if servers.iter().any(|(k, _)| k.address.is_ipv6()) {
        family_table(&mut out, Family::V6, &servers, table, options, restrictions);
    }
    out
}

fn family_table(
    out: &mut String,
    family: Family,
    servers: &BTreeSet<(VirtualServerKey, Reach)>,
    table: &IpvsTable,
    options: &MasqueradeOptions,
    restrictions: &[SourceRestriction],
) {
    let fam = family.name();
    let in_family = |k: &VirtualServerKey| family.holds(&k.address);
    let all: Vec<String> = servers
        .iter()
        .filter(|(k, _)| in_family(k))
        .map(|(k, _)| key_element(k))
        .collect();
    let external_cluster: Vec<String> = servers
        .iter()
        .filter(|(k, r)| in_family(k) && *r == Reach::External { local: false })
        .map(|(k, _)| key_element(k))
        .collect();
    let cluster_ips: Vec<String> = servers
        .iter()
        .filter(|(k, r)| in_family(k) && *r == Reach::ClusterIp)
        .map(|(k, _)| key_element(k))
        .collect();
    // Each real server reached through a virtual server it could be balanced to from itself.
    let hairpin: BTreeSet<String> = table
        .iter()
        .filter(|(k, _)| in_family(k))
        .flat_map(|(k, svc)| {
            svc.real_servers.keys().map(move |r| {
                format!(
                    "{} . {} . {} . {}",
                    r.address,
                    proto(k.protocol),
                    r.port,
                    r.address
                )
            })
        })
        .collect();
    let cidrs: Vec<String> = options
        .cluster_cidrs
        .iter()
        .filter(|c| family.holds(&c.address()))
        .map(Cidr::to_string)
        .collect();
    let key_type = format!("{} . inet_proto . inet_service", family.addr_type());
    let addr = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    let key_match = format!("{addr} daddr . meta l4proto . th dport");
    let mark = format!("meta mark set meta mark | {MASQUERADE_MARK:#010x}");
    let restricted: BTreeSet<String> = restrictions
        .iter()
        .filter(|r| in_family(&r.key))
        .map(|r| key_element(&r.key))
        .collect();
    let allowed: BTreeSet<String> = restrictions
        .iter()
        .filter(|r| in_family(&r.key))
        .flat_map(|r| {
            let key = key_element(&r.key);
            r.allowed
                .iter()
                .filter(|c| family.holds(&c.address()))
                .map(move |c| format!("{key} . {c}"))
        })
        .collect();
    // First in both marking chains: a refused connection is neither marked nor forwarded.
    let source_filter = (!restricted.is_empty()).then(|| {
        format!(
            "\t\tct state new {key_match} @lb-restricted {key_match} . {addr} saddr != @lb-allowed drop\n"
        )
    });

    let _ = writeln!(out, "add table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "delete table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "table {fam} {TABLE_NAME} {{");
    set(out, "virtual-servers", &key_type, "", &all);
    set(out, "external-cluster", &key_type, "", &external_cluster);
    set(out, "cluster-ips", &key_type, "", &cluster_ips);
    set(
        out,
        "hairpin",
        &format!(
            "{} . inet_proto . inet_service . {}",
            family.addr_type(),
            family.addr_type()
        ),
        "",
        &hairpin.into_iter().collect::<Vec<_>>(),
    );
    if !cidrs.is_empty() {
        set(out, "cluster-cidrs", family.addr_type(), "interval", &cidrs);
    }
    if source_filter.is_some() {
        set(
            out,
            "lb-restricted",
            &key_type,
            "",
            &restricted.into_iter().collect::<Vec<_>>(),
        );
        set(
            out,
            "lb-allowed",
            &format!("{key_type} . {}", family.addr_type()),
            "interval",
            &allowed.into_iter().collect::<Vec<_>>(),
        );
    }
    // Priority mangle (-150) runs before IPVS (which hooks output and input near -100).
    let _ = writeln!(out, "\tchain mark-local {{");
    let _ = writeln!(out, "\t\ttype filter hook output priority mangle; policy accept;");
    out.push_str(source_filter.as_deref().unwrap_or_default());
    let _ = writeln!(out, "\t\t{key_match} @virtual-servers {mark}");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain mark-incoming {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    out.push_str(source_filter.as_deref().unwrap_or_default());
    let _ = writeln!(out, "\t\t{key_match} @external-cluster {mark}");
    if options.all {
        let _ = writeln!(out, "\t\t{key_match} @cluster-ips {mark}");
    } else if !cidrs.is_empty() {
        let _ = writeln!(
            out,
            "\t\t{key_match} @cluster-ips {addr} saddr != @cluster-cidrs {mark}"
        );
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain postrouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(
        out,
        "\t\tmeta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} masquerade"
    );
    let _ = writeln!(out, "\t\t{key_match} . {addr} saddr @hairpin masquerade");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
}

fn set(out: &mut String, name: &str, key_type: &str, flags: &str, elements: &[String]) {
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\ttype {key_type}");
    if !flags.is_empty() {
        let _ = writeln!(out, "\t\tflags {flags}");
    }
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "\t}}");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pretty_assertions::assert_eq;

    use super::*;
    use portpolicy_core::ipvs::table::test_keys::vs_key as key;
    use portpolicy_core::ipvs::{IpvsService, RealServerKey, RealServerState};

    fn service(reals: &[(&str, u16)]) -> IpvsService {
        IpvsService {
            scheduler: "rr".into(),
            persistence_timeout: None,
            real_servers: reals
                .iter()
                .map(|(a, p)| {
                    (
                        RealServerKey {
                            address: a.parse().unwrap(),
                            port: *p,
                        },
                        RealServerState::with_weight(1),
                    )
                })
                .collect(),
        }
    }

    fn sample() -> (Vec<(VirtualServerKey, Reach)>, IpvsTable) {
        let cluster_ip = key("10.96.0.10", 80, Protocol::Tcp);
        let node_port_cluster = key("192.168.1.10", 30080, Protocol::Tcp);
        let node_port_local = key("192.168.1.10", 30081, Protocol::Udp);
        let v6 = key("fd00::10", 53, Protocol::Udp);
        let servers = vec![
            (cluster_ip, Reach::ClusterIp),
            (node_port_cluster, Reach::External { local: false }),
            (node_port_local, Reach::External { local: true }),
            (v6, Reach::ClusterIp),
        ];
        let table: IpvsTable = BTreeMap::from([
            (cluster_ip, service(&[("10.0.1.2", 8080), ("10.0.2.2", 8080)])),
            (node_port_cluster, service(&[("10.0.1.2", 8080)])),
            (node_port_local, service(&[])),
            (v6, service(&[("fd00:1::2", 5353)])),
        ]);
        (servers, table)
    }

    #[test]
    fn default_options_masquerade_local_clients_and_cluster_policy_external_traffic() {
        let (servers, table) = sample();
        let text = ruleset(
            servers.iter().map(|(k, r)| (k, *r)),
            &table,
            &MasqueradeOptions::default(),
            &[],
        );
        let expected = "\
add table ip portpolicy
delete table ip portpolicy
table ip portpolicy {
\tset virtual-servers {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 10.96.0.10 . tcp . 80, 192.168.1.10 . tcp . 30080, 192.168.1.10 . udp . 30081 }
\t}
\tset external-cluster {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 192.168.1.10 . tcp . 30080 }
\t}
\tset cluster-ips {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 10.96.0.10 . tcp . 80 }
\t}
\tset hairpin {
\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr
\t\telements = { 10.0.1.2 . tcp . 8080 . 10.0.1.2, 10.0.2.2 . tcp . 8080 . 10.0.2.2 }
\t}
\tchain mark-local {
\t\ttype filter hook output priority mangle; policy accept;
\t\tip daddr . meta l4proto . th dport @virtual-servers meta mark set meta mark | 0x00004000
\t}
\tchain mark-incoming {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tip daddr . meta l4proto . th dport @external-cluster meta mark set meta mark | 0x00004000
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 masquerade
\t\tip daddr . meta l4proto . th dport . ip saddr @hairpin masquerade
\t}
}
add table ip6 portpolicy
delete table ip6 portpolicy
table ip6 portpolicy {
\tset virtual-servers {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\telements = { fd00::10 . udp . 53 }
\t}
\tset external-cluster {
\t\ttype ipv6_addr . inet_proto . inet_service
\t}
\tset cluster-ips {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\telements = { fd00::10 . udp . 53 }
\t}
\tset hairpin {
\t\ttype ipv6_addr . inet_proto . inet_service . ipv6_addr
\t\telements = { fd00:1::2 . udp . 5353 . fd00:1::2 }
\t}
\tchain mark-local {
\t\ttype filter hook output priority mangle; policy accept;
\t\tip6 daddr . meta l4proto . th dport @virtual-servers meta mark set meta mark | 0x00004000
\t}
\tchain mark-incoming {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tip6 daddr . meta l4proto . th dport @external-cluster meta mark set meta mark | 0x00004000
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 masquerade
\t\tip6 daddr . meta l4proto . th dport . ip6 saddr @hairpin masquerade
\t}
}
";
        assert_eq!(text, expected);
    }

    #[test]
    fn cluster_cidrs_masquerade_cluster_ip_traffic_from_outside_the_pod_network() {
        let (servers, table) = sample();
        let options = MasqueradeOptions {
            all: false,
            cluster_cidrs: vec!["10.0.0.0/16".parse().unwrap(), "fd00:1::/64".parse().unwrap()],
        };
        let text = ruleset(servers.iter().map(|(k, r)| (k, *r)), &table, &options, &[]);
        assert!(text.contains(
            "\tset cluster-cidrs {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/16 }\n\t}\n"
        ));
        assert!(text.contains(
            "\t\tip daddr . meta l4proto . th dport @cluster-ips ip saddr != @cluster-cidrs meta mark set meta mark | 0x00004000\n"
        ));
        assert!(text.contains(
            "\t\tip6 daddr . meta l4proto . th dport @cluster-ips ip6 saddr != @cluster-cidrs meta mark set meta mark | 0x00004000\n"
        ));
    }

    #[test]
    fn masquerade_all_marks_every_cluster_ip_but_never_local_policy_external_traffic() {
        let (servers, table) = sample();
        let options = MasqueradeOptions {
            all: true,
            cluster_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
        };
        let text = ruleset(servers.iter().map(|(k, r)| (k, *r)), &table, &options, &[]);
        assert!(text.contains(
            "\t\tip daddr . meta l4proto . th dport @cluster-ips meta mark set meta mark | 0x00004000\n"
        ));
        assert!(!text.contains("saddr != @cluster-cidrs"));
        // The Local-policy node port (udp 30081) is only in the set node-local clients use.
        let marked_sets: Vec<&str> = text.lines().filter(|l| l.contains("30081")).collect();
        assert_eq!(
            marked_sets,
            [
                "\t\telements = { 10.96.0.10 . tcp . 80, 192.168.1.10 . tcp . 30080, 192.168.1.10 . udp . 30081 }"
            ]
        );
    }

    #[test]
    fn source_ranges_drop_new_connections_from_elsewhere_before_anything_is_marked() {
        let (mut servers, mut table) = sample();
        let lb = key("198.51.100.50", 443, Protocol::Tcp);
        let lb6 = key("2001:db8::50", 443, Protocol::Tcp);
        let closed = key("198.51.100.51", 53, Protocol::Udp);
        for k in [lb, lb6, closed] {
            servers.push((k, Reach::External { local: true }));
            table.insert(k, service(&[("10.0.1.2", 8443)]));
        }
        let restrictions = [
            SourceRestriction {
                key: lb,
                allowed: vec![
                    "203.0.113.0/24".parse().unwrap(),
                    "198.51.100.50/32".parse().unwrap(),
                ],
            },
            SourceRestriction {
                key: lb6,
                allowed: vec!["2001:db8:1::/48".parse().unwrap()],
            },
            SourceRestriction {
                key: closed,
                allowed: vec![],
            },
        ];
        let text = ruleset(
            servers.iter().map(|(k, r)| (k, *r)),
            &table,
            &MasqueradeOptions::default(),
            &restrictions,
        );
        assert!(text.contains(
            "\tset lb-restricted {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\
             \t\telements = { 198.51.100.50 . tcp . 443, 198.51.100.51 . udp . 53 }\n\t}\n\
             \tset lb-allowed {\n\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr\n\t\tflags interval\n\
             \t\telements = { 198.51.100.50 . tcp . 443 . 198.51.100.50/32, 198.51.100.50 . tcp . 443 . 203.0.113.0/24 }\n\t}\n"
        ), "{text}");
        assert!(text.contains("\t\telements = { 2001:db8::50 . tcp . 443 . 2001:db8:1::/48 }\n"));
        let filter = "\t\tct state new ip daddr . meta l4proto . th dport @lb-restricted \
                      ip daddr . meta l4proto . th dport . ip saddr != @lb-allowed drop\n";
        // In both chains, before their marking rules.
        assert_eq!(text.matches(filter).count(), 2, "{text}");
        assert!(text.contains(&format!(
            "priority mangle; policy accept;\n{filter}\t\tip daddr . meta l4proto . th dport @virtual-servers"
        )));
        assert!(text.contains(&format!(
            "priority mangle; policy accept;\n{filter}\t\tip daddr . meta l4proto . th dport @external-cluster"
        )));
        assert_eq!(text.matches("ip6 saddr != @lb-allowed drop").count(), 2);
        // Without restrictions the ruleset is exactly what it was.
        let plain = ruleset(
            servers.iter().map(|(k, r)| (k, *r)),
            &table,
            &MasqueradeOptions::default(),
            &[],
        );
        assert!(!plain.contains("lb-restricted") && !plain.contains("drop"));
    }

    #[test]
    fn a_node_inside_a_source_range_may_reach_the_load_balancer_from_itself() {
        use portpolicy_core::ipvs::{ProxyConfig, ProxyMode, node_rules};
        use portpolicy_core::snapshot::parse_str;
        let snapshot = |ranges: &str| {
            let text = format!(
                "apiVersion: v1
kind: Node
metadata: {{name: node-a}}
status: {{addresses: [{{type: InternalIP, address: 192.168.1.10}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  loadBalancerSourceRanges: {ranges}
  ports: [{{port: 80, nodePort: 30080}}]
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.50}}]}}}}
"
            );
            parse_str("lb.yaml", &text).snapshot
        };
        let config = ProxyConfig::new("node-a", ProxyMode::Replacement);
        let lb = key("198.51.100.50", 80, Protocol::Tcp);
        let plan = node_rules(&snapshot("[192.168.0.0/16, 203.0.113.0/24]"), &config);
        assert_eq!(
            source_restrictions(&plan),
            [SourceRestriction {
                key: lb,
                allowed: ["192.168.0.0/16", "203.0.113.0/24", "198.51.100.50/32"]
                    .map(|c| c.parse().unwrap())
                    .to_vec(),
            }]
        );
        let plan = node_rules(&snapshot("[203.0.113.0/24]"), &config);
        assert_eq!(
            source_restrictions(&plan),
            [SourceRestriction {
                key: lb,
                allowed: vec!["203.0.113.0/24".parse().unwrap()],
            }]
        );
        assert_eq!(source_restrictions(&node_rules(&snapshot("[]"), &config)), []);
    }

    #[test]
    fn an_empty_plan_still_replaces_the_tables() {
        let text = ruleset(
            std::iter::empty(),
            &IpvsTable::new(),
            &MasqueradeOptions::default(),
            &[],
        );
        assert!(
            text.starts_with("add table ip portpolicy\ndelete table ip portpolicy\ntable ip portpolicy {\n")
        );
        assert!(!text.contains("elements"));
        assert!(!text.contains("ip6"));
    }
}
