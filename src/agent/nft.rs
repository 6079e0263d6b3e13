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
//! client's real address. Generation is a pure function of the plan and the options, so the
//! whole ruleset is tested as text.
//!
//! The table is written whole once, when the agent starts, and again only when its layout
//! changes (the ip6 table appearing or going) or a transaction failed. Between those, a sync
//! sends only the set elements that changed, as one `nft -f` transaction of `delete element`
//! and `add element` lines ([`NftSets`]), so its cost follows the change, not the cluster; the
//! full resync flushes and refills the sets, repairing them without replacing the table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

#[cfg(test)]
use portpolicy_core::ipvs::IpvsTable;
use portpolicy_core::ipvs::{IpvsService, VirtualServerKey};
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

/// An address range, `10.244.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (expected address/prefix)"))?;
        let address: IpAddr = addr.parse().map_err(|e| format!("{text:?}: bad address: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|e| format!("{text:?}: bad prefix length: {e}"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{text:?}: prefix length above {max}"));
        }
        Ok(Cidr { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
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
const PLAN_SETS: [&str; 4] = [VIRTUAL_SERVERS, EXTERNAL_CLUSTER, CLUSTER_IPS, HAIRPIN];

/// One element of one of the agent's sets, as `nft` spells it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Element {
    family: Family,
    set: &'static str,
    value: String,
}

/// The elements one virtual server puts in the sets: itself in `virtual-servers` and in the
/// set of how it is reached, and one hairpin element per real server (real servers shared by
/// several virtual servers give the same hairpin element, hence the counts in [`NftSets`]).
pub(crate) fn elements_of(key: &VirtualServerKey, reach: Reach, service: &IpvsService) -> Vec<Element> {
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
) -> String {
    let mut sets = NftSets::default();
    let empty = IpvsService::default();
    for (key, reach) in virtual_servers {
        sets.set(*key, elements_of(key, reach, table.get(key).unwrap_or(&empty)));
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
        .filter(|c| family.holds(&c.address))
        .map(Cidr::to_string)
        .collect();
    let key_type = format!("{} . inet_proto . inet_service", family.addr_type());
    let addr = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    let key_match = format!("{addr} daddr . meta l4proto . th dport");
    let mark = format!("meta mark set meta mark | {MASQUERADE_MARK:#010x}");

    let _ = writeln!(out, "add table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "delete table {fam} {TABLE_NAME}");
    let _ = writeln!(out, "table {fam} {TABLE_NAME} {{");
    for name in PLAN_SETS {
        let key_type = if name == HAIRPIN {
            format!("{key_type} . {}", family.addr_type())
        } else {
            key_type.clone()
        };
        set(out, name, &key_type, "", &elements(name));
    }
    if !cidrs.is_empty() {
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        set(out, "cluster-cidrs", family.addr_type(), "interval", &cidrs);
    }
    // Priority mangle (-150) runs before IPVS (which hooks output and input near -100).
    let _ = writeln!(out, "\tchain mark-local {{");
    let _ = writeln!(out, "\t\ttype filter hook output priority mangle; policy accept;");
    let _ = writeln!(out, "\t\t{key_match} @virtual-servers {mark}");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain mark-incoming {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
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
        let text = ruleset(servers.iter().map(|(k, r)| (k, *r)), &table, &options);
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
        let text = ruleset(servers.iter().map(|(k, r)| (k, *r)), &table, &options);
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
    fn an_empty_plan_still_replaces_the_tables() {
        let text = ruleset(
            std::iter::empty(),
            &IpvsTable::new(),
            &MasqueradeOptions::default(),
        );
        assert!(
            text.starts_with("add table ip portpolicy\ndelete table ip portpolicy\ntable ip portpolicy {\n")
        );
        assert!(!text.contains("elements"));
        assert!(!text.contains("ip6"));
    }

    #[test]
    fn cidrs_parse_and_reject_nonsense() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
    }
}
