//! `plan` without `--node`: what every node shares, printed once, and per node only what
//! differs, each node planned and written in turn.
//!
//! What every node shares is planned once, for a node that exists nowhere: no endpoint is local
//! to it, no hint names it and it has no zone, and its node-port addresses are `0.0.0.0` and
//! `::`, standing for each node's node-port addresses of that family. A real node can plan a
//! Service differently only through the endpoints and hints that name it or its zone, so each
//! node is derived from the shared plan by planning those Services again, as that node (and
//! then back): the cost of a node follows what names it, not the cluster. Where one of a node's
//! node-port addresses is also another virtual server's (a rare clash the shared plan cannot
//! see), that node is planned complete instead, as `--node` plans it.
//!
//! A virtual server a node plans differently (its Local backends, real servers narrowed by
//! topology hints) or that is not shared is listed for the node; a shared one it lacks (lost to
//! another Service's claim on one of its addresses) is listed as withdrawn. A node's complete
//! table is therefore always the shared one, node ports on its addresses, with its own entries
//! put over it and its withdrawn ones taken out: the split decides only how much is printed,
//! never what a node gets.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

use super::{
    ConflictRow, HealthCheckRow, JSON_VERSION, NodePortRow, Plan, RangeRow, VirtualServerRow, head_sections,
    health_check_lines, health_check_rows, problems_table, virtual_server_lines, virtual_server_row,
};
use crate::ipvs::{
    NodeRules, ProxyConfig, RuleTracker, VirtualServerKey, VirtualServerKind, VirtualServerRule, listing,
};
use crate::ports::Protocol;
use crate::problem::{Problem, object_ref};
use crate::service::parse_ip;
use crate::table::escape_controls;
use crate::well_known::{SERVICE_NAME_LABEL, ZONE_LABEL};

/// The name the shared part is planned under: not a valid Node name (it has a `/`), so no
/// endpoint of a real snapshot is local to it. Were one, the split would only print more.
const EVERY_NODE: &str = "portpolicy.io/every-node";

/// The address a shared node-port virtual server is listed at: each node's node-port addresses
/// of its family.
fn wildcard(ipv4: bool) -> IpAddr {
    if ipv4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

/// A virtual server's place in the shared part: node ports by family, the rest by their key.
fn shared_key(vs: &VirtualServerRule) -> (bool, VirtualServerKey) {
    if vs.kind == VirtualServerKind::NodePort {
        let key = VirtualServerKey {
            address: wildcard(vs.key.address.is_ipv4()),
            ..vs.key
        };
        (true, key)
    } else {
        (false, vs.key)
    }
}

/// The same rule but for where a node port is served.
fn same_rule(shared: &VirtualServerRule, node: &VirtualServerRule) -> bool {
    shared.service == node.service
        && shared.port_name == node.port_name
        && shared.kind == node.kind
        && shared.only_local == node.only_local
        && shared.masquerade_external == node.masquerade_external
        && shared.scheduler == node.scheduler
        && shared.persistence_timeout == node.persistence_timeout
        && shared.real_servers[..] == node.real_servers[..]
        && shared.topology == node.topology
        && shared.source_ranges.as_deref() == node.source_ranges.as_deref()
}

/// What every node shares: the virtual servers in plan order, and where each is; and the
/// planner that derives each node from it.
struct Shared<'p> {
    rules: Vec<VirtualServerRule>,
    index: HashMap<(bool, VirtualServerKey), usize>,
    /// `None` when there are no nodes.
    planner: Option<RefCell<SharedPlanner<'p>>>,
}

/// The shared plan kept live, to plan each node from it.
struct SharedPlanner<'p> {
    tracker: RuleTracker,
    slices: &'p [EndpointSlice],
    /// The slices that name each node (an endpoint on it, or a hint for it) and each zone (a
    /// hint for it), as indexes into `slices`.
    by_node: HashMap<&'p str, Vec<usize>>,
    by_zone: HashMap<&'p str, Vec<usize>>,
    /// The ports and protocols of node ports, `[IPv6, IPv4]`: where a node address holds one of
    /// them for another virtual server too, the node is planned complete.
    node_ports: [HashSet<(u16, Protocol)>; 2],
    /// The problems every node's plan has (the Services', the slices', contested claims).
    common_problems: Vec<Problem>,
}

/// One node's part: its differences from the shared plan, and the problems of its own plan.
struct NodePart {
    differences: NodeDifferences,
    /// Derived: beyond the shared plan's problems. Planned complete: all of its own, since the
    /// shared plan's need not all be its (a node-port clash on its address settles contested
    /// claims otherwise).
    problems: Vec<Problem>,
    /// Planned complete rather than derived from the shared plan.
    complete: bool,
}

impl<'p> Shared<'p> {
    fn plan(plan: &'p Plan) -> Shared<'p> {
        if plan.allocated.nodes.is_empty() {
            // No node, nothing any node programs.
            return Shared {
                rules: Vec::new(),
                index: HashMap::new(),
                planner: None,
            };
        }
        // Every address the stand-in node has serves node ports, whatever `--nodeport-addresses`
        // says: each real node applies it to its own.
        let mut tracker = RuleTracker::new(ProxyConfig::new(EVERY_NODE, plan.options.mode));
        tracker.load_snapshot(&plan.allocated);
        tracker.set_node(&every_node());
        tracker.take_dirty();
        let shared_rules = tracker.node_rules();
        // Its own node's problems are the shared node's: each real node reports its own.
        let every_node_ref = object_ref("Node", None, EVERY_NODE);
        let common_problems = shared_rules
            .problems
            .into_iter()
            .filter(|p| p.object != every_node_ref)
            .collect();
        let mut node_ports: [HashSet<(u16, Protocol)>; 2] = Default::default();
        for vs in &shared_rules.virtual_servers {
            if vs.kind == VirtualServerKind::NodePort {
                node_ports[usize::from(vs.key.address.is_ipv4())].insert((vs.key.port, vs.key.protocol));
            }
        }
        // Node ports of a family no node serves node ports on would be listed for nothing.
        let families = node_port_families(plan);
        let mut rules = shared_rules.virtual_servers;
        rules.retain(|vs| {
            vs.kind != VirtualServerKind::NodePort || families[usize::from(vs.key.address.is_ipv4())]
        });
        let index = rules
            .iter()
            .enumerate()
            .map(|(i, vs)| (shared_key(vs), i))
            .collect();
        let (by_node, by_zone) = naming_slices(&plan.allocated.endpoint_slices);
        Shared {
            rules,
            index,
            planner: Some(RefCell::new(SharedPlanner {
                tracker,
                slices: &plan.allocated.endpoint_slices,
                by_node,
                by_zone,
                node_ports,
                common_problems,
            })),
        }
    }

    fn rows(&self) -> Vec<VirtualServerRow> {
        self.rules.iter().map(virtual_server_row).collect()
    }

    /// The problems every node's plan has.
    fn common_problems(&self) -> Vec<Problem> {
        self.planner
            .as_ref()
            .map(|p| p.borrow().common_problems.clone())
            .unwrap_or_default()
    }

    /// One node's part: derived from the shared plan, or planned complete where one of its
    /// node-port addresses clashes with another virtual server.
    fn node(&self, plan: &Plan, node: &Node) -> NodePart {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        // The node's own addresses and problems: a planner that knows nothing but the node.
        let mut own = RuleTracker::new(plan.proxy_config(name.to_string()));
        own.set_node(node);
        let own = own.node_rules();
        let Some(planner) = &self.planner else {
            return self.complete(plan, node);
        };
        let mut planner = planner.borrow_mut();
        let clash = own.node_port_addresses.iter().any(|address| {
            planner.node_ports[usize::from(address.is_ipv4())]
                .iter()
                .any(|&(port, protocol)| {
                    let key = VirtualServerKey {
                        address: *address,
                        port,
                        protocol,
                    };
                    planner.tracker.desired().get(&key).is_some()
                })
        });
        if clash {
            return self.complete(plan, node);
        }
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL))
            .filter(|zone| !zone.is_empty());
        let mut naming: BTreeSet<usize> = BTreeSet::new();
        naming.extend(planner.by_node.get(name).into_iter().flatten());
        if let Some(zone) = zone {
            naming.extend(planner.by_zone.get(zone.as_str()).into_iter().flatten());
        }
        let slices: Vec<&EndpointSlice> = naming.iter().map(|&i| &planner.slices[i]).collect();
        let planned = planner.tracker.replan_as(name, zone.map(String::as_str), &slices);
        let (virtual_servers, withdrawn) =
            self.changed_rows(&planner.tracker, &planned, &own.node_port_addresses);
        let health_checks = planner.tracker.health_checks().map(HealthCheckRow::of).collect();
        let mut problems = own.problems;
        if zone.is_none() {
            problems.extend(planner.tracker.missing_zone_problem(name));
        }
        // Back to the shared plan.
        planner.tracker.replan_as(EVERY_NODE, None, &slices);
        planner.tracker.take_dirty();
        NodePart {
            differences: NodeDifferences {
                name: name.to_string(),
                node_port_addresses: own.node_port_addresses.iter().map(ToString::to_string).collect(),
                virtual_servers,
                withdrawn,
                health_checks,
            },
            problems,
            complete: false,
        }
    }

    /// A node planned complete, as `--node` plans it, and compared with the shared plan.
    fn complete(&self, plan: &Plan, node: &Node) -> NodePart {
        let rules = plan.node_rules(node);
        NodePart {
            differences: self.differences(&rules),
            problems: rules.problems,
            complete: true,
        }
    }

    /// Of the virtual servers `planned` again as one node, the rows of those it plans otherwise
    /// than the shared plan, node ports on each of `addresses` of their family; in the order a
    /// complete plan lists them (by Service, then kind and key).
    fn changed_rows(
        &self,
        tracker: &RuleTracker,
        planned: &BTreeSet<VirtualServerKey>,
        addresses: &BTreeSet<IpAddr>,
    ) -> (Vec<VirtualServerRow>, Vec<WithdrawnRow>) {
        let on_node = |kind: VirtualServerKind, key: VirtualServerKey| -> Vec<VirtualServerKey> {
            if kind == VirtualServerKind::NodePort {
                addresses
                    .iter()
                    .filter(|a| a.is_ipv4() == key.address.is_ipv4())
                    .map(|address| VirtualServerKey {
                        address: *address,
                        ..key
                    })
                    .collect()
            } else {
                vec![key]
            }
        };
        let mut rows: Vec<(
            (&str, &str),
            VirtualServerKind,
            VirtualServerKey,
            &VirtualServerRule,
        )> = Vec::new();
        let mut withdrawn = Vec::new();
        for key in planned {
            match tracker.winning_rule(key) {
                Some(rule) => {
                    let shared = self.index.get(&shared_key(rule)).map(|&i| &self.rules[i]);
                    if shared.is_some_and(|shared| same_rule(shared, rule)) {
                        continue;
                    }
                    let service = rule.service.split_once('/').unwrap_or(("", &rule.service));
                    for on in on_node(rule.kind, rule.key) {
                        rows.push((service, rule.kind, on, rule));
                    }
                }
                None => {
                    let shared = [true, false]
                        .iter()
                        .find_map(|&node_port| self.index.get(&(node_port, *key)))
                        .map(|&i| &self.rules[i]);
                    if let Some(shared) = shared {
                        for on in on_node(shared.kind, shared.key) {
                            withdrawn.push(WithdrawnRow::of(shared, on.address));
                        }
                    }
                }
            }
        }
        rows.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let rows = rows
            .into_iter()
            .map(|(_, _, key, rule)| {
                let mut row = virtual_server_row(rule);
                row.address = key.address.to_string();
                row
            })
            .collect();
        (rows, withdrawn)
    }

    /// What `rules` (one node's complete plan) has that the shared part does not, and lacks.
    fn differences(&self, rules: &NodeRules) -> NodeDifferences {
        let mut matched = vec![false; self.rules.len()];
        // (shared node port, address): node ports are shared per family, matched per address.
        let mut node_ports_matched: Vec<(usize, IpAddr)> = Vec::new();
        let mut virtual_servers = Vec::new();
        for vs in &rules.virtual_servers {
            let Some(&i) = self.index.get(&shared_key(vs)) else {
                virtual_servers.push(virtual_server_row(vs));
                continue;
            };
            if vs.kind == VirtualServerKind::NodePort {
                node_ports_matched.push((i, vs.key.address));
            } else {
                matched[i] = true;
            }
            if !same_rule(&self.rules[i], vs) {
                virtual_servers.push(virtual_server_row(vs));
            }
        }
        node_ports_matched.sort_unstable();
        let mut withdrawn = Vec::new();
        for (i, shared) in self.rules.iter().enumerate() {
            if shared.kind == VirtualServerKind::NodePort {
                let family = shared.key.address.is_ipv4();
                for address in rules.node_port_addresses.iter().filter(|a| a.is_ipv4() == family) {
                    if node_ports_matched.binary_search(&(i, *address)).is_err() {
                        withdrawn.push(WithdrawnRow::of(shared, *address));
                    }
                }
            } else if !matched[i] {
                withdrawn.push(WithdrawnRow::of(shared, shared.key.address));
            }
        }
        NodeDifferences {
            name: rules.node.clone(),
            node_port_addresses: rules
                .node_port_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            virtual_servers,
            withdrawn,
            health_checks: health_check_rows(rules),
        }
    }
}

/// The slices that name each node (an endpoint on it, or a node hint for it) and each zone (a
/// zone hint for it), by index. Only the Services of these slices plan differently on a node.
type SlicesNaming<'a> = HashMap<&'a str, Vec<usize>>;

fn naming_slices(slices: &[EndpointSlice]) -> (SlicesNaming<'_>, SlicesNaming<'_>) {
    let mut by_node: SlicesNaming<'_> = HashMap::new();
    let mut by_zone: SlicesNaming<'_> = HashMap::new();
    fn add<'a>(map: &mut SlicesNaming<'a>, name: &'a str, i: usize) {
        let list = map.entry(name).or_default();
        if list.last() != Some(&i) {
            list.push(i);
        }
    }
    for (i, slice) in slices.iter().enumerate() {
        let owned = slice
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(SERVICE_NAME_LABEL));
        if !owned {
            continue;
        }
        for endpoint in &slice.endpoints {
            if let Some(node) = endpoint.node_name.as_deref() {
                add(&mut by_node, node, i);
            }
            let hints = endpoint.hints.as_ref();
            for node in hints.and_then(|h| h.for_nodes.as_deref()).unwrap_or_default() {
                add(&mut by_node, &node.name, i);
            }
            for zone in hints.and_then(|h| h.for_zones.as_deref()).unwrap_or_default() {
                add(&mut by_zone, &zone.name, i);
            }
        }
    }
    (by_node, by_zone)
}

/// Whether any node serves node ports on an address of the family, `[IPv6, IPv4]`: the
/// planner's choice of a node's addresses (`NodePortAddresses::select`), made for every node.
fn node_port_families(plan: &Plan) -> [bool; 2] {
    let mut families = [false; 2];
    for node in &plan.allocated.nodes {
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        let ordered: Vec<IpAddr> = ["InternalIP", "ExternalIP"]
            .iter()
            .flat_map(|wanted| {
                listed
                    .into_iter()
                    .flatten()
                    .filter(move |a| a.type_ == *wanted)
                    .filter_map(|a| parse_ip(&a.address))
            })
            .collect();
        for ip in plan.options.node_port_addresses.select(&ordered) {
            families[usize::from(ip.is_ipv4())] = true;
        }
    }
    families
}

/// The Node the shared part is planned for.
fn every_node() -> Node {
    let address = |ip: IpAddr| NodeAddress {
        address: ip.to_string(),
        type_: "InternalIP".to_string(),
    };
    Node {
        metadata: ObjectMeta {
            name: Some(EVERY_NODE.to_string()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![address(wildcard(true)), address(wildcard(false))]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One node's entry when every node is planned.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct NodeDifferences {
    name: String,
    /// The addresses the shared node ports are served on here.
    node_port_addresses: Vec<String>,
    /// Virtual servers planned here otherwise than in `everyNode`, or not there at all: each
    /// takes the place of the shared one with its address, port and protocol.
    virtual_servers: Vec<VirtualServerRow>,
    /// Shared virtual servers this node does not program.
    withdrawn: Vec<WithdrawnRow>,
    /// Shown in the table; not part of the JSON contract.
    #[serde(skip)]
    health_checks: Vec<HealthCheckRow>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct WithdrawnRow {
    service: String,
    kind: String,
    address: String,
    port: u16,
    protocol: Protocol,
}

impl WithdrawnRow {
    fn of(vs: &VirtualServerRule, address: IpAddr) -> Self {
        WithdrawnRow {
            service: vs.service.to_string(),
            kind: format!("{:?}", vs.kind),
            address: address.to_string(),
            port: vs.key.port,
            protocol: vs.key.protocol,
        }
    }
}

/// Plans each node in name order, handing its differences to `each`; the nodes' problems are
/// gathered into `problems`.
fn for_each_node(
    plan: &Plan,
    shared: &Shared<'_>,
    problems: &mut BTreeSet<Problem>,
    mut each: impl FnMut(NodeDifferences) -> io::Result<()>,
) -> io::Result<()> {
    let mut derived = false;
    for node in plan.selected_nodes() {
        let part = shared.node(plan, node);
        derived |= !part.complete;
        problems.extend(part.problems);
        each(part.differences)?;
    }
    // The shared plan's problems are those of the nodes derived from it.
    if derived {
        problems.extend(shared.common_problems());
    }
    Ok(())
}

pub(super) fn write_table(plan: &Plan, out: &mut dyn Write) -> io::Result<()> {
    for (i, (title, body)) in head_sections(&plan.node_ports, &plan.ranges, &plan.host_port_conflicts)
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            out.write_all(b"\n")?;
        }
        write!(out, "{title}\n{body}")?;
    }
    let shared = Shared::plan(plan);
    let mut text = String::from(listing::HEADER);
    for vs in shared.rows() {
        let extra = if vs.kind == "NodePort" {
            " [each node-port address]"
        } else {
            ""
        };
        virtual_server_lines(&mut text, &vs, extra);
    }
    write!(out, "\nIPVS ON EVERY NODE\n{text}")?;

    let mut problems: BTreeSet<Problem> = plan.problems.iter().cloned().collect();
    for_each_node(plan, &shared, &mut problems, |node| {
        let mut text = String::new();
        let addresses = if node.node_port_addresses.is_empty() {
            "(none)".to_string()
        } else {
            node.node_port_addresses.join(", ")
        };
        text.push_str(&format!("node-port addresses: {addresses}\n"));
        if !node.virtual_servers.is_empty() {
            text.push_str(listing::HEADER);
            for vs in &node.virtual_servers {
                virtual_server_lines(&mut text, vs, "");
            }
        }
        for w in &node.withdrawn {
            let line = listing::virtual_server_line(w.protocol, &w.address, w.port, "", None);
            text.push_str(&format!(
                "not on this node: {} # {} {}\n",
                line.trim_end(),
                escape_controls(&w.service),
                w.kind
            ));
        }
        health_check_lines(&mut text, &node.health_checks);
        write!(
            out,
            "\nIPVS ON NODE {}, BESIDES EVERY NODE'S\n{text}",
            escape_controls(&node.name)
        )
    })?;
    write!(out, "\nPROBLEMS\n{}", problems_table(&problems))
}

pub(super) fn write_json(plan: &Plan, out: &mut dyn Write) -> io::Result<()> {
    let shared = Shared::plan(plan);
    let problems = RefCell::new(plan.problems.iter().cloned().collect::<BTreeSet<_>>());
    let document = Document {
        version: JSON_VERSION,
        node_ports: &plan.node_ports,
        host_port_conflicts: &plan.host_port_conflicts,
        every_node: EveryNode {
            virtual_servers: shared.rows(),
        },
        nodes: Nodes {
            plan,
            shared: &shared,
            problems: &problems,
        },
        problems: Problems(&problems),
        ranges: &plan.ranges,
    };
    serde_json::to_writer_pretty(&mut *out, &document)?;
    out.write_all(b"\n")
}

/// `plan -o json` without `--node`, its nodes planned as they are written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    version: u32,
    node_ports: &'a [NodePortRow],
    host_port_conflicts: &'a [ConflictRow],
    every_node: EveryNode,
    nodes: Nodes<'a>,
    /// After `nodes`, which add theirs.
    problems: Problems<'a>,
    ranges: &'a [RangeRow],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EveryNode {
    /// Node ports at `0.0.0.0` or `::`: on each of a node's `nodePortAddresses` of that family.
    virtual_servers: Vec<VirtualServerRow>,
}

struct Nodes<'a> {
    plan: &'a Plan,
    shared: &'a Shared<'a>,
    problems: &'a RefCell<BTreeSet<Problem>>,
}

impl Serialize for Nodes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        let mut derived = false;
        for node in self.plan.selected_nodes() {
            let part = self.shared.node(self.plan, node);
            derived |= !part.complete;
            self.problems.borrow_mut().extend(part.problems);
            seq.serialize_element(&part.differences)?;
        }
        // The shared plan's problems are those of the nodes derived from it.
        if derived {
            self.problems.borrow_mut().extend(self.shared.common_problems());
        }
        seq.end()
    }
}

struct Problems<'a>(&'a RefCell<BTreeSet<Problem>>);

impl Serialize for Problems<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.borrow().iter())
    }
}

#[cfg(test)]
mod tests;
