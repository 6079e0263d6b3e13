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
//! ports are never filtered. Both sets and the filter rule are always declared (empty sets match
//! nothing), so whether any range exists never changes the table's layout.
//!
//! Generation is a pure function of the plan and the options, so the whole ruleset is tested as
//! text.
//!
//! The table is written whole once, when the agent starts, and again only when its layout
//! changes (the ip6 table appearing or going) or a transaction failed. Between those, a sync
//! sends only the set elements that changed, as one `nft -f` transaction of `delete element`
//! and `add element` lines ([`NftSets`]), so its cost follows the change, not the cluster; the
//! full resync flushes and refills the sets, repairing them without replacing the table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

pub use portpolicy_core::cidr::Cidr;
#[cfg(test)]
use portpolicy_core::ipvs::IpvsTable;
use portpolicy_core::ipvs::{IpvsService, NodeRules, VirtualServerKey};
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn of(address: &IpAddr) -> Self {
        if address.is_ipv4() { Family::V4 } else { Family::V6 }
    }
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
        Family::of(address) == self
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

/// The sets whose elements follow the plan, in the order the table declares them. Everything
/// else in the table (the chains, their rules, the cluster-CIDR set) follows only the options,
/// which are fixed for the agent's lifetime: the layout.
const VIRTUAL_SERVERS: &str = "virtual-servers";
const EXTERNAL_CLUSTER: &str = "external-cluster";
const CLUSTER_IPS: &str = "cluster-ips";
const HAIRPIN: &str = "hairpin";
const LB_RESTRICTED: &str = "lb-restricted";
const LB_ALLOWED: &str = "lb-allowed";
const PLAN_SETS: [&str; 6] = [
    VIRTUAL_SERVERS,
    EXTERNAL_CLUSTER,
    CLUSTER_IPS,
    HAIRPIN,
    LB_RESTRICTED,
    LB_ALLOWED,
];

/// A load-balancer virtual server that accepts new connections only from `allowed`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRestriction {
    pub key: VirtualServerKey,
    /// Empty: no client may connect.
    pub allowed: Vec<Cidr>,
}

/// The sources a load balancer with these source ranges accepts: the ranges, and the VIP itself
/// when a range holds one of the node's addresses, since the node's own packets to a VIP it
/// holds carry the VIP as source (kube-proxy's `allowFromNode`).
///
/// Without overlaps: `lb-allowed` is an interval set, and `nft` refuses an element that overlaps
/// another (the whole transaction with it), so a range inside another one (`10.1.0.0/16` beside
/// `10.0.0.0/8`, the same range twice, the VIP inside a range) is left out; it adds nothing.
pub fn allowed_sources(key: &VirtualServerKey, ranges: &[Cidr], node_addresses: &[IpAddr]) -> Vec<Cidr> {
    let mut candidates = ranges.to_vec();
    let from_node = ranges
        .iter()
        .any(|range| node_addresses.iter().any(|ip| range.contains(ip)));
    if from_node {
        let host = if key.address.is_ipv4() { 32 } else { 128 };
        candidates.extend(Cidr::new(key.address, host));
    }
    // Two CIDRs are nested or disjoint; widest first, each kept unless a kept one holds it.
    candidates.sort_by_key(|c| (!c.is_ipv4(), c.prefix(), c.address()));
    let mut allowed: Vec<Cidr> = Vec::with_capacity(candidates.len());
    for range in candidates {
        let covered = allowed.iter().any(|wider| {
            wider.is_ipv4() == range.is_ipv4()
                && wider.prefix() <= range.prefix()
                && wider.contains(&range.address())
        });
        if !covered {
            allowed.push(range);
        }
    }
    allowed
}

/// The plan's load-balancer source ranges as restrictions.
pub fn source_restrictions(plan: &NodeRules) -> Vec<SourceRestriction> {
    let node_addresses: Vec<IpAddr> = plan.node_addresses.iter().copied().collect();
    plan.virtual_servers
        .iter()
        .filter_map(|vs| {
            let ranges = vs.source_ranges.as_ref()?;
            Some(SourceRestriction {
                key: vs.key,
                allowed: allowed_sources(&vs.key, ranges, &node_addresses),
            })
        })
        .collect()
}

/// One element of one of the agent's sets, as `nft` spells it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Element {
    family: Family,
    set: &'static str,
    value: String,
}

/// The elements one virtual server puts in the sets: itself in `virtual-servers` and in the
/// set of how it is reached, one hairpin element per real server (real servers shared by
/// several virtual servers give the same hairpin element, hence the counts in [`NftSets`]),
/// and, for a load balancer with source ranges (`allowed`, see [`allowed_sources`]), itself in
/// `lb-restricted` and one `lb-allowed` element per allowed range.
pub(crate) fn elements_of(
    key: &VirtualServerKey,
    reach: Reach,
    service: &IpvsService,
    allowed: Option<&[Cidr]>,
) -> Vec<Element> {
    let family = Family::of(&key.address);
    let element = |set, value| Element { family, set, value };
    let mut elements = vec![element(VIRTUAL_SERVERS, key_element(key))];
    match reach {
        Reach::ClusterIp => elements.push(element(CLUSTER_IPS, key_element(key))),
        Reach::External { local: false } => elements.push(element(EXTERNAL_CLUSTER, key_element(key))),
        Reach::External { local: true } => {}
    }
    for real in service.real_servers.keys() {
        let value = format!(
            "{} . {} . {} . {}",
            real.address,
            proto(key.protocol),
            real.port,
            real.address
        );
        elements.push(element(HAIRPIN, value));
    }
    if let Some(allowed) = allowed {
        elements.push(element(LB_RESTRICTED, key_element(key)));
        for range in allowed.iter().filter(|range| family.holds(&range.address())) {
            elements.push(element(LB_ALLOWED, format!("{} . {range}", key_element(key))));
        }
    }
    elements
}

/// The contents of the agent's sets as the plan wants them, kept per virtual server, and what
/// changed since the last batch was taken: the agent sends `add element` / `delete element`
/// for that alone instead of the whole table.
#[derive(Clone, Debug, Default)]
pub(crate) struct NftSets {
    by_key: HashMap<VirtualServerKey, Vec<Element>>,
    counts: HashMap<Element, usize>,
    /// Elements touched since the last batch, with whether each was in the sets before.
    touched: HashMap<Element, bool>,
    ipv6_elements: usize,
}

impl NftSets {
    /// Sets what one virtual server contributes (nothing: it is gone).
    pub(crate) fn set(&mut self, key: VirtualServerKey, elements: Vec<Element>) {
        let old = if elements.is_empty() {
            self.by_key.remove(&key)
        } else {
            self.by_key.insert(key, elements.clone())
        };
        for element in old.into_iter().flatten() {
            let Some(count) = self.counts.get_mut(&element) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&element);
                if element.family == Family::V6 {
                    self.ipv6_elements -= 1;
                }
                self.touched.entry(element).or_insert(true);
            }
        }
        for element in elements {
            let count = self.counts.entry(element.clone()).or_default();
            *count += 1;
            if *count == 1 {
                if element.family == Family::V6 {
                    self.ipv6_elements += 1;
                }
                self.touched.entry(element).or_insert(false);
            }
        }
    }

    /// Whether any set of the `ip6` table has an element, which decides whether that table
    /// exists (part of the layout).
    pub(crate) fn has_ipv6(&self) -> bool {
        self.ipv6_elements > 0
    }

    /// The `nft -f` transaction turning the sets as last sent into the sets as wanted: deletes,
    /// then adds, one line per set. Empty when nothing changed.
    pub(crate) fn take_batch(&mut self) -> String {
        let touched = std::mem::take(&mut self.touched);
        let mut deletes: BTreeMap<(Family, &'static str), Vec<String>> = BTreeMap::new();
        let mut adds: BTreeMap<(Family, &'static str), Vec<String>> = BTreeMap::new();
        for (element, was_there) in touched {
            let is_there = self.counts.contains_key(&element);
            let side = match (was_there, is_there) {
                (true, false) => &mut deletes,
                (false, true) => &mut adds,
                _ => continue,
            };
            side.entry((element.family, element.set))
                .or_default()
                .push(element.value);
        }
        let mut out = String::new();
        for (verb, changes) in [("delete", deletes), ("add", adds)] {
            for ((family, set), mut values) in changes {
                values.sort_unstable();
                let _ = writeln!(
                    out,
                    "{verb} element {} {TABLE_NAME} {set} {{ {} }}",
                    family.name(),
                    values.join(", ")
                );
            }
        }
        out
    }

    /// Forgets what changed: the next write is the whole table.
    pub(crate) fn discard_batch(&mut self) {
        self.touched.clear();
    }

    /// Every plan set flushed and filled again, in one transaction: the full resync's repair of
    /// the sets, leaving the table and its chains in place (if someone deleted them, the
    /// transaction fails and the agent writes the table whole).
    pub(crate) fn refill(&self) -> String {
        let mut sorted: BTreeMap<(Family, &'static str), BTreeSet<&str>> = BTreeMap::new();
        for element in self.counts.keys() {
            sorted
                .entry((element.family, element.set))
                .or_default()
                .insert(&element.value);
        }
        let families: &[Family] = if self.has_ipv6() {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        let mut out = String::new();
        for family in families {
            for set in PLAN_SETS {
                let _ = writeln!(out, "flush set {} {TABLE_NAME} {set}", family.name());
                if let Some(values) = sorted.get(&(*family, set)) {
                    let values: Vec<&str> = values.iter().copied().collect();
                    let _ = writeln!(
                        out,
                        "add element {} {TABLE_NAME} {set} {{ {} }}",
                        family.name(),
                        values.join(", ")
                    );
                }
            }
        }
        out
    }

    /// The whole table, both families as needed, deleted and recreated in one transaction.
    /// `drop_ipv6`: the ip6 table was written before and goes when nothing needs it.
    pub(crate) fn ruleset(&self, options: &MasqueradeOptions, drop_ipv6: bool) -> String {
        let mut sorted: BTreeMap<(Family, &'static str), BTreeSet<&str>> = BTreeMap::new();
        for element in self.counts.keys() {
            sorted
                .entry((element.family, element.set))
                .or_default()
                .insert(&element.value);
        }
        let mut out = String::new();
        family_table(&mut out, Family::V4, &sorted, options);
        // The ip6 table only when there is IPv6 to serve: on nodes without IPv6 the whole batch
        // would otherwise fail. (A table left from earlier IPv6 Services only matches their keys.)
        if self.has_ipv6() {
            family_table(&mut out, Family::V6, &sorted, options);
        } else if drop_ipv6 {
            let _ = writeln!(out, "add table ip6 {TABLE_NAME}");
            let _ = writeln!(out, "delete table ip6 {TABLE_NAME}");
        }
        out
    }
}

/// The whole batch for `nft -f -` for these virtual servers (with how each is reached) and
/// their desired IPVS entries.
#[cfg(test)]
pub(crate) fn ruleset<'a>(
    virtual_servers: impl IntoIterator<Item = (&'a VirtualServerKey, Reach)>,
    table: &IpvsTable,
    options: &MasqueradeOptions,
    restrictions: &[SourceRestriction],
) -> String {
    let mut sets = NftSets::default();
    let empty = IpvsService::default();
    for (key, reach) in virtual_servers {
        let allowed = restrictions
            .iter()
            .find(|r| r.key == *key)
            .map(|r| r.allowed.as_slice());
        sets.set(
            *key,
            elements_of(key, reach, table.get(key).unwrap_or(&empty), allowed),
        );
    }
    sets.ruleset(options, false)
}

fn family_table(
    out: &mut String,
    family: Family,
    sets: &BTreeMap<(Family, &'static str), BTreeSet<&str>>,
    options: &MasqueradeOptions,
) {
    let fam = family.name();
    let elements = |set: &'static str| -> Vec<&str> {
        sets.get(&(family, set))
            .map(|values| values.iter().copied().collect())
            .unwrap_or_default()
    };
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
    // First in both marking chains: a refused connection is neither marked nor forwarded.
    let source_filter = format!(
        "\t\tct state new {key_match} @{LB_RESTRICTED} {key_match} . {addr} saddr != @{LB_ALLOWED} drop\n"
    );

    let _ = writeln!(out, "add table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "delete table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "table {fam} {TABLE_NAME} {{");
    for name in PLAN_SETS {
        let (key_type, flags) = match name {
            HAIRPIN => (format!("{key_type} . {}", family.addr_type()), ""),
            LB_ALLOWED => (format!("{key_type} . {}", family.addr_type()), "interval"),
            _ => (key_type.clone(), ""),
        };
        set(out, name, &key_type, flags, &elements(name));
    }
    if !cidrs.is_empty() {
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        set(out, "cluster-cidrs", family.addr_type(), "interval", &cidrs);
    }
    // Priority mangle (-150) runs before IPVS (which hooks output and input near -100).
    let _ = writeln!(out, "\tchain mark-local {{");
    let _ = writeln!(out, "\t\ttype filter hook output priority mangle; policy accept;");
    out.push_str(&source_filter);
    let _ = writeln!(out, "\t\t{key_match} @virtual-servers {mark}");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain mark-incoming {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    out.push_str(&source_filter);
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

fn set(out: &mut String, name: &str, key_type: &str, flags: &str, elements: &[&str]) {
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
\tset lb-restricted {
\t\ttype ipv4_addr . inet_proto . inet_service
\t}
\tset lb-allowed {
\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr
\t\tflags interval
\t}
\tchain mark-local {
\t\ttype filter hook output priority mangle; policy accept;
\t\tct state new ip daddr . meta l4proto . th dport @lb-restricted ip daddr . meta l4proto . th dport . ip saddr != @lb-allowed drop
\t\tip daddr . meta l4proto . th dport @virtual-servers meta mark set meta mark | 0x00004000
\t}
\tchain mark-incoming {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tct state new ip daddr . meta l4proto . th dport @lb-restricted ip daddr . meta l4proto . th dport . ip saddr != @lb-allowed drop
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
\tset lb-restricted {
\t\ttype ipv6_addr . inet_proto . inet_service
\t}
\tset lb-allowed {
\t\ttype ipv6_addr . inet_proto . inet_service . ipv6_addr
\t\tflags interval
\t}
\tchain mark-local {
\t\ttype filter hook output priority mangle; policy accept;
\t\tct state new ip6 daddr . meta l4proto . th dport @lb-restricted ip6 daddr . meta l4proto . th dport . ip6 saddr != @lb-allowed drop
\t\tip6 daddr . meta l4proto . th dport @virtual-servers meta mark set meta mark | 0x00004000
\t}
\tchain mark-incoming {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tct state new ip6 daddr . meta l4proto . th dport @lb-restricted ip6 daddr . meta l4proto . th dport . ip6 saddr != @lb-allowed drop
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
        // Without restrictions the layout is the same: the sets are declared, only empty.
        let plain = ruleset(
            servers.iter().map(|(k, r)| (k, *r)),
            &table,
            &MasqueradeOptions::default(),
            &[],
        );
        let layout = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.contains("elements ="))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(layout(&plain), layout(&text));
        assert!(!plain.contains("198.51.100.50 . tcp . 443 . "));
    }

    #[test]
    fn a_source_range_change_sends_only_element_updates() {
        let lb = key("198.51.100.50", 443, Protocol::Tcp);
        let svc = service(&[("10.0.1.2", 8443)]);
        let reach = Reach::External { local: true };
        let ranges = |list: &[&str]| -> Vec<Cidr> { list.iter().map(|c| c.parse().unwrap()).collect() };
        let mut sets = NftSets::default();
        sets.set(lb, elements_of(&lb, reach, &svc, None));
        let _ = sets.take_batch();
        // Ranges appear.
        sets.set(
            lb,
            elements_of(&lb, reach, &svc, Some(&ranges(&["203.0.113.0/24"]))),
        );
        assert_eq!(
            sets.take_batch(),
            "add element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 203.0.113.0/24 }\n\
             add element ip portpolicy lb-restricted { 198.51.100.50 . tcp . 443 }\n"
        );
        // One range replaced by another, one added.
        let changed = ranges(&["192.0.2.0/24", "203.0.113.128/25"]);
        sets.set(lb, elements_of(&lb, reach, &svc, Some(&changed)));
        assert_eq!(
            sets.take_batch(),
            "delete element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 203.0.113.0/24 }\n\
             add element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 192.0.2.0/24, 198.51.100.50 . tcp . 443 . 203.0.113.128/25 }\n"
        );
        // Ranges emptied: nobody may connect, the key stays restricted.
        sets.set(lb, elements_of(&lb, reach, &svc, Some(&[])));
        assert_eq!(
            sets.take_batch(),
            "delete element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 192.0.2.0/24, 198.51.100.50 . tcp . 443 . 203.0.113.128/25 }\n"
        );
        // Ranges gone: open again.
        sets.set(lb, elements_of(&lb, reach, &svc, None));
        assert_eq!(
            sets.take_batch(),
            "delete element ip portpolicy lb-restricted { 198.51.100.50 . tcp . 443 }\n"
        );
        // The full resync refills the lb sets with the rest.
        sets.set(
            lb,
            elements_of(&lb, reach, &svc, Some(&ranges(&["203.0.113.0/24"]))),
        );
        let refill = sets.refill();
        assert!(refill.contains(
            "flush set ip portpolicy lb-restricted\nadd element ip portpolicy lb-restricted { 198.51.100.50 . tcp . 443 }\n\
             flush set ip portpolicy lb-allowed\nadd element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 203.0.113.0/24 }\n"
        ), "{refill}");
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

    /// `lb-allowed` is an interval set: `nft` refuses overlapping elements, and with them the
    /// whole transaction. Ranges inside others, repeated ones and a VIP inside a range are
    /// left out, in the full table and in element batches alike.
    #[test]
    fn overlapping_source_ranges_give_no_overlapping_elements() {
        let lb = key("198.51.100.50", 443, Protocol::Tcp);
        let cidrs = |list: &[&str]| -> Vec<Cidr> { list.iter().map(|c| c.parse().unwrap()).collect() };
        let node: [IpAddr; 1] = ["192.168.1.10".parse().unwrap()];
        assert_eq!(
            allowed_sources(
                &lb,
                &cidrs(&[
                    "10.1.0.0/16",
                    "10.0.0.0/8",
                    "192.168.1.0/24",
                    "10.0.0.0/8",
                    "10.1.2.3/32"
                ]),
                &node
            ),
            cidrs(&["10.0.0.0/8", "192.168.1.0/24", "198.51.100.50/32"])
        );
        // The VIP inside an allowed range needs no element of its own.
        assert_eq!(
            allowed_sources(&lb, &cidrs(&["198.51.100.0/24", "192.168.0.0/16"]), &node),
            cidrs(&["192.168.0.0/16", "198.51.100.0/24"])
        );
        // Families apart: ::/0 holds no IPv4 range.
        assert_eq!(
            allowed_sources(&lb, &cidrs(&["::/0", "10.0.0.0/8", "0.0.0.0/0"]), &[]),
            cidrs(&["0.0.0.0/0", "::/0"])
        );
        let svc = service(&[("10.0.1.2", 8443)]);
        let reach = Reach::External { local: true };
        let allowed = allowed_sources(&lb, &cidrs(&["10.0.0.0/8", "10.1.0.0/16", "10.1.0.0/16"]), &[]);
        let mut sets = NftSets::default();
        sets.set(lb, elements_of(&lb, reach, &svc, Some(&allowed)));
        let batch = sets.take_batch();
        assert!(
            batch.contains(
                "add element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 10.0.0.0/8 }\n"
            ),
            "{batch}"
        );
        assert!(!batch.contains("10.1.0.0/16"), "{batch}");
        // A change that turns the wider range into a narrower one swaps the two elements.
        let narrower = allowed_sources(&lb, &cidrs(&["10.1.0.0/16", "10.1.0.0/16"]), &[]);
        sets.set(lb, elements_of(&lb, reach, &svc, Some(&narrower)));
        assert_eq!(
            sets.take_batch(),
            "delete element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 10.0.0.0/8 }\n\
             add element ip portpolicy lb-allowed { 198.51.100.50 . tcp . 443 . 10.1.0.0/16 }\n"
        );
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
