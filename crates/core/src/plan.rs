//! `portpolicy plan`: the whole core run once over a snapshot, as a report.
//!
//! The JSON shape is a versioned contract ([`JSON_VERSION`]; top-level keys `version`,
//! `nodePorts`, `hostPortConflicts`, `nodes`, `problems`, `ranges`, and `everyNode` when every
//! node is planned); the table output reads like `kubectl get` and, per node, `ipvsadm -Ln`.
//!
//! One node (`--node`) gets its complete table ([`build_plan`], [`PlanReport`]). Every node gets
//! what all nodes share once and per node only what differs, written node by node as each is
//! planned ([`Plan::write`], the `every_node` module), so neither memory nor output grows as
//! nodes x Services.

mod every_node;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::crd::{AllocationRecord, NodePortKind};
use crate::governance::PolicySet;
use crate::hostport;
use k8s_openapi::api::core::v1::Node;

use crate::ipvs::{
    HealthCheckRule, NodePortAddresses, NodeRules, ProxyConfig, ProxyMode, VirtualServerRule, listing,
    node_rules,
};
use crate::nodeport::{NodePortCounts, NodePortInput, allocate_node_ports};
use crate::ports::{PortRange, Protocol};
use crate::problem::Problem;
use crate::service::ServiceModel;
use crate::snapshot::Snapshot;
use crate::table::{Table, escape_controls};

/// What to plan, beyond the snapshot itself.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// The cluster's `--service-node-port-range`.
    pub node_port_range: PortRange,
    pub mode: ProxyMode,
    /// Plan IPVS for this node only; all nodes when `None`.
    pub node: Option<String>,
    /// Which node addresses get node-port virtual servers (the agent's `--nodeport-addresses`).
    pub node_port_addresses: NodePortAddresses,
    /// The moment retention windows are judged against.
    pub now: DateTime<Utc>,
}

/// The version of `plan -o json`'s shape, its top-level `version`. 2: `version` itself, and
/// without `--node` the nodes' shared virtual servers in `everyNode` with each node listing only
/// what differs. (Version 1, with no `version` key, listed every node's complete table.)
pub const JSON_VERSION: u32 = 2;

/// How `plan` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Table,
    Json,
}

/// One node's complete plan (or every node's, each complete, for library callers and tests):
/// what `plan --node` prints.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// [`JSON_VERSION`].
    pub version: u32,
    pub node_ports: Vec<NodePortRow>,
    pub host_port_conflicts: Vec<ConflictRow>,
    pub nodes: Vec<NodeRow>,
    pub problems: Vec<Problem>,
    /// Per policy with a nodePort range, how full it is.
    pub ranges: Vec<RangeRow>,
}

/// How one policy's nodePort range splits up: each port counted once, in the first of used
/// (held by a Service or a retained record), reserved, pinned (to a Service not holding it), free
/// (what the allocator can still hand out). The operator's `node_ports_*` gauges say the same.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RangeRow {
    pub policy: String,
    pub range: String,
    pub total: usize,
    pub used: usize,
    pub reserved: usize,
    pub pinned: usize,
    pub free: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodePortRow {
    pub policy: Option<String>,
    pub service: String,
    pub port_name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: u16,
    pub kind: NodePortKind,
    pub state: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConflictRow {
    pub node: String,
    pub protocol: Protocol,
    #[serde(rename = "hostIP")]
    pub host_ip: String,
    pub host_port: u16,
    pub pods: Vec<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    pub virtual_servers: Vec<VirtualServerRow>,
    /// Shown in the table; not part of the JSON contract.
    #[serde(skip)]
    pub health_checks: Vec<HealthCheckRow>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServerRow {
    pub service: String,
    pub kind: String,
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: String,
    pub persistence_timeout: Option<u32>,
    pub real_servers: Vec<RealServerRow>,
    /// `PreferSameNode` or `PreferSameZone` when endpoint hints narrowed the real servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// The clients a load-balancer virtual server accepts (`loadBalancerSourceRanges` of its
    /// family); absent when unrestricted, empty when it accepts none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<String>>,
    /// Shown as a mark in the table; not part of the JSON contract.
    #[serde(skip)]
    pub only_local: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RealServerRow {
    pub address: String,
    pub port: u16,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckRow {
    pub service: String,
    pub node_port: u16,
    pub local_endpoints: usize,
}

/// Runs allocation, conflict detection and per-node IPVS planning over one snapshot, each
/// planned node complete.
pub fn build_plan(snapshot: &Snapshot, options: &PlanOptions) -> PlanReport {
    Plan::new(snapshot, options).into_report()
}

/// A plan with everything but the nodes' IPVS decided, and the cluster as the IPVS planner
/// reads it: nodes are planned when the plan is printed, one at a time.
#[derive(Clone, Debug)]
pub struct Plan {
    pub node_ports: Vec<NodePortRow>,
    pub host_port_conflicts: Vec<ConflictRow>,
    pub ranges: Vec<RangeRow>,
    /// So far: the nodes' own problems join them as the nodes are planned.
    pub problems: Vec<Problem>,
    /// The snapshot as it will be once the operator has written the allocations.
    allocated: Snapshot,
    options: PlanOptions,
}

impl Plan {
    /// Allocation and conflict detection; IPVS is planned later, per node.
    pub fn new(snapshot: &Snapshot, options: &PlanOptions) -> Plan {
        let mut problems = Vec::new();
        let policies = PolicySet::compile(&snapshot.policies);
        problems.extend_from_slice(policies.problems());
        let namespace_labels = snapshot.namespace_labels();

        let records: BTreeMap<String, Vec<AllocationRecord>> = snapshot
            .policies
            .iter()
            .map(|p| {
                let records = p
                    .status
                    .as_ref()
                    .map(|s| s.allocations.clone())
                    .unwrap_or_default();
                (p.name().to_string(), records)
            })
            .collect();
        let services: Vec<ServiceModel<'_>> = snapshot.services.iter().map(ServiceModel::read).collect();
        let allocation = allocate_node_ports(&NodePortInput {
            cluster_range: options.node_port_range,
            policies: &policies,
            records: &records,
            services: &services,
            namespace_labels: &namespace_labels,
            now: options.now,
        });
        problems.extend(allocation.problems.iter().map(|p| p.problem.clone()));
        let ranges = allocation
            .policies
            .iter()
            .map(|(name, np)| {
                let compiled = policies.get(name);
                let counts = NodePortCounts::of(
                    np.range,
                    compiled.map(|c| c.reserved.as_slice()).unwrap_or_default(),
                    compiled.map(|c| c.pinned.as_slice()).unwrap_or_default(),
                    np.records.iter().filter_map(|r| u16::try_from(r.node_port).ok()),
                );
                RangeRow {
                    policy: name.clone(),
                    range: np.range.to_string(),
                    total: counts.total,
                    used: counts.used,
                    reserved: counts.reserved,
                    pinned: counts.pinned,
                    free: counts.free,
                }
            })
            .collect();
        let node_ports = allocation
            .assignments
            .iter()
            .map(|a| NodePortRow {
                policy: a.policy.clone(),
                service: format!("{}/{}", a.namespace, a.service),
                port_name: a.port_name.clone(),
                port: a.port,
                protocol: a.protocol,
                node_port: a.node_port,
                kind: a.kind,
                state: a.state.as_str().to_string(),
            })
            .collect();

        let host_ports = hostport::check_snapshot(snapshot, &policies, options.node_port_range);
        problems.extend(host_ports.problems);
        let conflicts = host_ports.conflicts;
        let host_port_conflicts = conflicts
            .iter()
            .map(|c| ConflictRow {
                node: c.node.clone(),
                protocol: c.protocol,
                host_ip: c.host_ip.to_string(),
                host_port: c.host_port,
                pods: c.pods.clone(),
                reason: c.reason.as_str().to_string(),
            })
            .collect();

        // IPVS is planned for the cluster as it will be once the operator has written the
        // allocations: a Service waiting for its nodePort already gets its node-port rules.
        let mut allocated = snapshot.clone();
        let by_name: HashMap<(&str, &str), usize> = snapshot
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some(((s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?), i)))
            .collect();
        for change in allocation.service_changes() {
            if let Some(&i) = by_name.get(&(change.namespace.as_str(), change.name.as_str())) {
                change.apply_to(&mut allocated.services[i]);
            }
        }
        Plan {
            node_ports,
            host_port_conflicts,
            ranges,
            problems,
            allocated,
            options: options.clone(),
        }
    }

    /// The nodes `--node` selects (all without it), by name: the same cluster prints the same
    /// plan whatever order the snapshot listed them in.
    fn selected_nodes(&self) -> Vec<&Node> {
        let mut nodes: Vec<&Node> = self
            .allocated
            .nodes
            .iter()
            .filter(|node| (self.options.node.as_deref()).is_none_or(|only| node_name(node) == only))
            .collect();
        nodes.sort_by(|a, b| node_name(a).cmp(node_name(b)));
        nodes
    }

    fn proxy_config(&self, node_name: String) -> ProxyConfig {
        let mut config = ProxyConfig::new(node_name, self.options.mode);
        config.node_port_addresses = self.options.node_port_addresses.clone();
        config
    }

    /// One node's complete rules.
    fn node_rules(&self, node: &Node) -> NodeRules {
        node_rules(&self.allocated, &self.proxy_config(node_name(node).to_string()))
    }

    /// Every selected node planned complete, in memory.
    pub fn into_report(self) -> PlanReport {
        let mut problems = self.problems.clone();
        let mut nodes = Vec::new();
        for node in self.selected_nodes() {
            let rules = self.node_rules(node);
            problems.extend(rules.problems.iter().cloned());
            nodes.push(node_row(&rules));
        }
        if let Some(only) = &self.options.node
            && nodes.is_empty()
        {
            problems.push(Problem::new(
                format!("Node/{only}"),
                "",
                "no such node in the snapshot (--node)",
            ));
        }
        problems.sort();
        problems.dedup();
        PlanReport {
            version: JSON_VERSION,
            node_ports: self.node_ports,
            host_port_conflicts: self.host_port_conflicts,
            nodes,
            problems,
            ranges: self.ranges,
        }
    }

    /// Prints the plan: with `--node`, that node's complete table; without, what every node
    /// shares once and then each node's differences, each node planned and written in turn.
    pub fn write(self, format: PlanFormat, out: &mut dyn Write) -> io::Result<()> {
        if self.options.node.is_some() {
            let report = self.into_report();
            let text = match format {
                PlanFormat::Table => report.to_table(),
                PlanFormat::Json => report.to_json(),
            };
            return out.write_all(text.as_bytes());
        }
        match format {
            PlanFormat::Table => every_node::write_table(&self, out),
            PlanFormat::Json => every_node::write_json(&self, out),
        }
    }
}

/// A Node's name as the planner is given it (a Node without one plans as `""`).
fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or_default()
}

fn node_row(rules: &NodeRules) -> NodeRow {
    NodeRow {
        name: rules.node.clone(),
        virtual_servers: rules.virtual_servers.iter().map(virtual_server_row).collect(),
        health_checks: health_check_rows(rules),
    }
}

fn virtual_server_row(vs: &VirtualServerRule) -> VirtualServerRow {
    VirtualServerRow {
        service: vs.service.to_string(),
        kind: format!("{:?}", vs.kind),
        address: vs.key.address.to_string(),
        port: vs.key.port,
        protocol: vs.key.protocol,
        scheduler: vs.scheduler.to_string(),
        persistence_timeout: vs.persistence_timeout,
        real_servers: vs
            .real_servers
            .iter()
            .map(|(rs, weight)| RealServerRow {
                address: rs.address.to_string(),
                port: rs.port,
                weight: *weight,
            })
            .collect(),
        topology: vs.topology.map(|t| t.as_str().to_string()),
        source_ranges: vs
            .source_ranges
            .as_ref()
            .map(|ranges| ranges.iter().map(ToString::to_string).collect()),
        only_local: vs.only_local,
    }
}

fn health_check_rows(rules: &NodeRules) -> Vec<HealthCheckRow> {
    rules.health_checks.iter().map(HealthCheckRow::of).collect()
}

impl HealthCheckRow {
    fn of(hc: &HealthCheckRule) -> Self {
        HealthCheckRow {
            service: format!("{}/{}", hc.namespace, hc.name),
            node_port: hc.node_port,
            local_endpoints: hc.local_endpoints,
        }
    }
}

impl PlanReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plan reports serialize") + "\n"
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut section = |title: &str, body: String| {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(title);
            out.push('\n');
            out.push_str(&body);
        };
        for (title, body) in head_sections(&self.node_ports, &self.ranges, &self.host_port_conflicts) {
            section(title, body);
        }
        for node in &self.nodes {
            section(
                &format!("IPVS ON NODE {}", escape_controls(&node.name)),
                ipvsadm_listing(node),
            );
        }
        section("PROBLEMS", problems_table(&self.problems));
        out
    }
}

/// The table's sections before the nodes', titled.
fn head_sections(
    node_ports: &[NodePortRow],
    range_rows: &[RangeRow],
    conflict_rows: &[ConflictRow],
) -> [(&'static str, String); 3] {
    let mut ports = Table::new(&[
        "policy", "service", "port", "protocol", "nodeport", "kind", "state",
    ]);
    for row in node_ports {
        let port = if row.kind == NodePortKind::HealthCheck {
            "-".to_string()
        } else if row.port_name.is_empty() {
            row.port.to_string()
        } else {
            format!("{}:{}", row.port_name, row.port)
        };
        ports.row(vec![
            row.policy.clone().unwrap_or_else(|| "<none>".into()),
            row.service.clone(),
            port,
            row.protocol.to_string(),
            row.node_port.to_string(),
            format!("{:?}", row.kind),
            row.state.clone(),
        ]);
    }

    let mut ranges = Table::new(&["policy", "range", "total", "used", "reserved", "pinned", "free"]);
    for r in range_rows {
        ranges.row(vec![
            r.policy.clone(),
            r.range.clone(),
            r.total.to_string(),
            r.used.to_string(),
            r.reserved.to_string(),
            r.pinned.to_string(),
            r.free.to_string(),
        ]);
    }

    let mut conflicts = Table::new(&["node", "protocol", "host ip", "host port", "reason", "pods"]);
    for c in conflict_rows {
        conflicts.row(vec![
            c.node.clone(),
            c.protocol.to_string(),
            c.host_ip.clone(),
            c.host_port.to_string(),
            c.reason.clone(),
            c.pods.join(","),
        ]);
    }
    [
        ("NODE PORTS", or_none(&ports)),
        ("NODE PORT RANGES", or_none(&ranges)),
        ("HOST PORT CONFLICTS", or_none(&conflicts)),
    ]
}

fn problems_table<'a>(problems: impl IntoIterator<Item = &'a Problem>) -> String {
    let mut table = Table::new(&["object", "field", "message"]);
    for p in problems {
        table.row(vec![p.object.clone(), p.field.clone(), p.message.clone()]);
    }
    or_none(&table)
}

fn or_none(table: &Table) -> String {
    if table.is_empty() {
        "(none)\n".to_string()
    } else {
        table.render()
    }
}

/// The node's rules as `ipvsadm -Ln` lists them, with the Service beside each virtual server
/// and marks: `[OnlyLocal]` on those that keep node traffic on the node, the topology mode
/// that chose the real servers, and the clients a load balancer accepts.
/// The planned table has no connections yet, and the lines drop `ipvsadm`'s trailing blanks.
fn ipvsadm_listing(node: &NodeRow) -> String {
    let mut out = String::from(listing::HEADER);
    for vs in &node.virtual_servers {
        virtual_server_lines(&mut out, vs, "");
    }
    health_check_lines(&mut out, &node.health_checks);
    out
}

/// One virtual server and its real servers, `extra` appended to its marks.
fn virtual_server_lines(out: &mut String, vs: &VirtualServerRow, extra: &str) {
    let line = listing::virtual_server_line(
        vs.protocol,
        &vs.address,
        vs.port,
        &vs.scheduler,
        vs.persistence_timeout,
    );
    let mut marks = String::new();
    if vs.only_local {
        marks.push_str(" [OnlyLocal]");
    }
    if let Some(topology) = &vs.topology {
        marks.push_str(&format!(" [{topology}]"));
    }
    if let Some(ranges) = &vs.source_ranges {
        let allowed = if ranges.is_empty() {
            "none".to_string()
        } else {
            ranges.join(",")
        };
        marks.push_str(&format!(" [from {allowed}]"));
    }
    marks.push_str(extra);
    out.push_str(&format!(
        "{line:<48} # {} {}{marks}\n",
        escape_controls(&vs.service),
        vs.kind
    ));
    for rs in &vs.real_servers {
        let line = listing::real_server_line(&rs.address, rs.port, rs.weight, 0, 0);
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn health_check_lines(out: &mut String, health_checks: &[HealthCheckRow]) {
    for hc in health_checks {
        out.push_str(&format!(
            "health check node port {} for {}: {} local endpoint(s)\n",
            hc.node_port,
            escape_controls(&hc.service),
            hc.local_endpoints
        ));
    }
}
