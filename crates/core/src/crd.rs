//! The PortPolicy custom resource: `portpolicy.io/v1alpha1`, cluster-scoped.
//!
//! The schema carries the validation a user needs at `kubectl apply` time (CEL rules for what
//! plain OpenAPI cannot say); [`PortPolicySpec::compile`] repeats it in Rust so that an object
//! that slipped past an older CRD, or a snapshot file, is still judged the same way.
// KubeSchema re-declares each spec struct in a private module to build its schema, and the
// lint then calls the public originals unreachable.
#![allow(unreachable_pub)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::ports::PortRange;
use crate::problem::Problem;
use crate::selector::Selector;

/// CEL: a port range string, `PORT` or `LOW-HIGH`, inside 1-65535 with low <= high.
const RANGE_RULE: &str = "self.matches('^[0-9]{1,5}(-[0-9]{1,5})?$') && \
    int(self.split('-')[0]) >= 1 && int(self.split('-')[self.split('-').size() - 1]) <= 65535 && \
    int(self.split('-')[0]) <= int(self.split('-')[self.split('-').size() - 1])";
const PINNED_IN_RANGE_RULE: &str = "!has(self.pinned) || !self.range.matches('^[0-9]{1,5}(-[0-9]{1,5})?$') || \
    self.pinned.all(p, p.nodePort >= int(self.range.split('-')[0]) && \
    p.nodePort <= int(self.range.split('-')[self.range.split('-').size() - 1]))";
/// CEL: no two pins name the same Service port (portName defaults to the unnamed port).
/// `namespace` is a CEL reserved word: Kubernetes exposes the field as `__namespace__`.
const PINNED_ONCE_RULE: &str = "!has(self.pinned) || self.pinned.all(p, self.pinned.exists_one(q, \
    q.__namespace__ == p.__namespace__ && q.service == p.service && \
    (has(q.portName) ? q.portName : '') == (has(p.portName) ? p.portName : '')))";
const RANGE_MESSAGE: &str = "must be PORT or LOW-HIGH with 1 <= LOW <= HIGH <= 65535";

/// Makes Kubernetes ports predictable for the Services and Pods it selects.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "portpolicy.io",
    version = "v1alpha1",
    kind = "PortPolicy",
    plural = "portpolicies",
    shortname = "pp",
    status = "PortPolicyStatus",
    cel,
    printcolumn = r#"{"name":"Range","type":"string","jsonPath":".spec.nodePorts.range"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.nodePortsUsed","description":"nodePorts allocated / size of the range"}"#,
    printcolumn = r#"{"name":"Conflicts","type":"integer","jsonPath":".status.conflictCount"}"#,
    printcolumn = r#"{"name":"Agents","type":"string","jsonPath":".status.agentsReady","description":"agent pods ready / desired"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PortPolicySpec {
    /// Namespaces whose Services (and Pods, for hostPort rules) this policy governs. Empty or
    /// missing selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Services, within the selected namespaces, whose nodePorts this policy allocates. Empty or
    /// missing selects every Service there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ports: Option<NodePortsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ports: Option<HostPortsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
}

/// Where governed Services get their nodePorts from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.pinned) || self.pinned.all(p, self.pinned.exists_one(q, q.nodePort == p.nodePort))").message("pinned nodePorts must be unique"))]
#[x_kube(validation = Rule::new(PINNED_ONCE_RULE).message("a Service port may be pinned only once"))]
#[x_kube(validation = Rule::new(PINNED_IN_RANGE_RULE).message("pinned nodePorts must be inside range"))]
pub struct NodePortsSpec {
    /// The sub-range of the cluster's nodePort range this policy allocates from, e.g. "31000-31099".
    #[x_kube(validation = Rule::new(RANGE_RULE).message(RANGE_MESSAGE))]
    pub range: String,
    /// Ports or ranges in `range` that are never handed out automatically.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new(format!("self.all(r, {})", RANGE_RULE.replace("self", "r"))).message(RANGE_MESSAGE))]
    pub reserved: Vec<String>,
    /// Explicit nodePorts for named service ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub pinned: Vec<PinnedNodePort>,
    /// How long a released allocation stays reserved for the same Service identity
    /// (namespace, name, port name), so a re-created Service gets its old port back.
    #[serde(default = "default_retention_seconds")]
    #[schemars(range(min = 0))]
    pub retention_seconds: i64,
    /// Rewrite nodePorts that a user set outside the policy, instead of only reporting them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforce: bool,
}

pub(crate) const DEFAULT_RETENTION_SECONDS: i64 = 24 * 60 * 60;

fn default_retention_seconds() -> i64 {
    DEFAULT_RETENTION_SECONDS
}

/// One explicit nodePort assignment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PinnedNodePort {
    pub namespace: String,
    pub service: String,
    /// The Service port's `name`; empty for a Service's single unnamed port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: i32,
}

/// Which hostPorts Pods in the selected namespaces may use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPortsSpec {
    /// Ports or ranges Pods may bind on their node. Missing means any port is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(format!("self.all(r, {})", RANGE_RULE.replace("self", "r"))).message(RANGE_MESSAGE))]
    pub allowed: Option<Vec<String>>,
    /// Accept hostPorts inside the cluster's nodePort range. Off by default: such a hostPort
    /// collides with a node port on every node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_in_node_port_range: bool,
}

/// How governed NodePort and LoadBalancer Services treat external traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSpec {
    #[serde(default)]
    pub external_traffic_policy: ExternalTrafficRule,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalTrafficRule {
    /// Leave `externalTrafficPolicy` to the Service.
    #[default]
    Any,
    /// Set `Local` unless the Service's owner chose a policy themselves.
    DefaultLocal,
    /// Always `Local`: node traffic stays on the node and keeps the client's address.
    RequireLocal,
}

/// The node agent that programs IPVS for governed Services.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Hand governed Services to the agent (label `service.kubernetes.io/service-proxy-name:
    /// portpolicy`, which makes kube-proxy leave them alone).
    #[serde(default)]
    pub proxy: bool,
    /// Agent image; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// IPVS scheduler for governed Services.
    #[serde(default = "default_scheduler")]
    #[x_kube(validation = Rule::new("self in ['rr', 'wrr', 'lc', 'wlc', 'lblc', 'lblcr', 'dh', 'sh', 'sed', 'nq', 'mh']").message("must be an IPVS scheduler: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq or mh"))]
    pub scheduler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<MasqueradeSpec>,
}

pub(crate) const DEFAULT_SCHEDULER: &str = "rr";

fn default_scheduler() -> String {
    DEFAULT_SCHEDULER.to_string()
}

/// Source NAT for service traffic. Node-local clients are always masqueraded (their replies
/// would otherwise never return); Local-policy external traffic never is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MasqueradeSpec {
    /// Masquerade all service traffic, like kube-proxy's `--masquerade-all`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Pod CIDRs: traffic from outside them to a Cluster-policy service is masqueraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_cidrs: Vec<String>,
}

/// Observed state, written by the operator.
// Read tolerantly (see the `Deserialize` impl), so not derived.
#[derive(Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// "used/total" of the policy's nodePort range, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ports_used: Option<String>,
    #[serde(default)]
    pub conflict_count: i32,
    /// "ready/desired" agent pods, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_ready: Option<String>,
    /// Every nodePort the policy holds, including released ones still retained for their Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<AllocationRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<HostPortConflictRecord>,
    /// Records that did not parse and were skipped; never written back.
    #[serde(skip)]
    #[schemars(skip)]
    pub unreadable_records: Vec<UnreadableRecord>,
}

/// A status record that did not parse: where it is and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableRecord {
    /// The record's field path, like `status.allocations[3].nodePort`.
    pub field: String,
    pub message: String,
}

impl PortPolicyStatus {
    /// A problem for each skipped record, naming the policy and the record's field.
    pub fn unreadable_record_problems(&self, policy: &str) -> Vec<Problem> {
        self.unreadable_records
            .iter()
            .map(|r| {
                Problem::new(
                    format!("PortPolicy/{policy}"),
                    &r.field,
                    format!(
                        "{}; this record is skipped, the policy and its other records are kept",
                        r.message
                    ),
                )
            })
            .collect()
    }
}

// One record of `allocations` or `conflicts` that does not parse is skipped (kept in
// `unreadable_records` for the reader to report) instead of failing the whole policy: a
// hand-edited or older status loses that record, not every allocation. `plan`, the agent and
// the operator all read policies through this.
impl<'de> Deserialize<'de> for PortPolicyStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The status as written; the records stay untyped until each is read on its own.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default)]
            observed_generation: Option<i64>,
            #[serde(default)]
            conditions: Option<Vec<Condition>>,
            #[serde(default)]
            node_ports_used: Option<String>,
            #[serde(default)]
            conflict_count: Option<i32>,
            #[serde(default)]
            agents_ready: Option<String>,
            #[serde(default)]
            allocations: Option<Vec<serde_json::Value>>,
            #[serde(default)]
            conflicts: Option<Vec<serde_json::Value>>,
        }
        fn records<T: serde::de::DeserializeOwned>(
            list: &str,
            values: Option<Vec<serde_json::Value>>,
            unreadable: &mut Vec<UnreadableRecord>,
        ) -> Vec<T> {
            let mut out = Vec::new();
            for (i, value) in values.unwrap_or_default().into_iter().enumerate() {
                match serde_path_to_error::deserialize::<_, T>(value) {
                    Ok(record) => out.push(record),
                    Err(e) => {
                        let inner = crate::snapshot::error_field(&e);
                        let field = if inner.is_empty() {
                            format!("status.{list}[{i}]")
                        } else {
                            format!("status.{list}[{i}].{inner}")
                        };
                        unreadable.push(UnreadableRecord {
                            field,
                            message: e.into_inner().to_string(),
                        });
                    }
                }
            }
            out
        }
        let wire = Wire::deserialize(deserializer)?;
        let mut unreadable_records = Vec::new();
        let allocations = records("allocations", wire.allocations, &mut unreadable_records);
        let conflicts = records("conflicts", wire.conflicts, &mut unreadable_records);
        Ok(PortPolicyStatus {
            observed_generation: wire.observed_generation,
            conditions: wire.conditions.unwrap_or_default(),
            node_ports_used: wire.node_ports_used,
            conflict_count: wire.conflict_count.unwrap_or_default(),
            agents_ready: wire.agents_ready,
            allocations,
            conflicts,
            unreadable_records,
        })
    }
}

/// Whether a nodePort serves a Service port or its load balancer's health checks.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, schemars::JsonSchema,
)]
pub enum NodePortKind {
    Service,
    HealthCheck,
}

/// A nodePort held for one Service identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    pub namespace: String,
    pub service: String,
    /// Empty for the health-check port and for a single unnamed Service port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    pub kind: NodePortKind,
    pub node_port: i32,
    /// Set once the Service (or its port) is gone; the port stays reserved for the same identity
    /// until `retentionSeconds` after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<Time>,
}

/// One hostPort conflict, as `status.conflicts` lists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPortConflictRecord {
    pub node: String,
    pub protocol: String,
    #[serde(rename = "hostIP")]
    pub host_ip: String,
    pub host_port: i32,
    pub pods: Vec<String>,
    pub reason: String,
}

/// Condition types the operator maintains.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const SPEC_VALID: &str = "SpecValid";
    pub const NODE_PORTS_ALLOCATED: &str = "NodePortsAllocated";
    pub const HOST_PORT_CONFLICT: &str = "HostPortConflict";
    pub const AGENTS_READY: &str = "AgentsReady";
}

/// A policy's spec with its strings parsed: what the core works with.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledPolicy {
    pub name: String,
    pub namespace_selector: Selector,
    pub service_selector: Selector,
    pub node_port_range: Option<PortRange>,
    pub reserved: Vec<PortRange>,
    pub pinned: Vec<PinnedNodePort>,
    pub retention_seconds: i64,
    pub enforce: bool,
    /// `None`: any hostPort is allowed.
    pub host_ports_allowed: Option<Vec<PortRange>>,
    pub allow_host_ports_in_node_port_range: bool,
    pub external_traffic: ExternalTrafficRule,
    pub agent_proxies: bool,
    pub scheduler: String,
}

impl PortPolicy {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("<unnamed>")
    }

    /// Parses and checks the spec. Every problem names `PortPolicy/NAME` and the field.
    pub fn compile(&self) -> Result<CompiledPolicy, Vec<Problem>> {
        self.spec.compile(self.name())
    }

    /// The CRD as YAML, exactly as `crds/portpolicy.yaml` holds it.
    pub fn crd_yaml() -> String {
        serde_saphyr::to_string(&PortPolicy::crd()).expect("the CRD serializes to YAML")
    }
}

/// `address/prefix`, as the agent's `--cluster-cidr` takes it.
fn check_cidr(text: &str) -> Result<(), String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR like 10.244.0.0/16"))?;
    let address: std::net::IpAddr = address
        .parse()
        .map_err(|_| format!("{text:?}: {address:?} is not an IP address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok(()),
        _ => Err(format!("{text:?}: the prefix length must be 0-{max}")),
    }
}

impl PortPolicySpec {
    pub fn compile(&self, name: &str) -> Result<CompiledPolicy, Vec<Problem>> {
        let object = format!("PortPolicy/{name}");
        let mut problems = Vec::new();
        let mut problem =
            |field: String, message: String| problems.push(Problem::new(&object, field, message));

        let namespace_selector = Selector::compile(self.namespace_selector.as_ref())
            .map_err(|(f, m)| problem(format!("spec.namespaceSelector.{f}"), m))
            .unwrap_or_default();
        let service_selector = Selector::compile(self.service_selector.as_ref())
            .map_err(|(f, m)| problem(format!("spec.serviceSelector.{f}"), m))
            .unwrap_or_default();

        let mut node_port_range = None;
        let mut reserved = Vec::new();
        let mut pinned = Vec::new();
        let mut retention_seconds = DEFAULT_RETENTION_SECONDS;
        let mut enforce = false;
        if let Some(np) = &self.node_ports {
            match np.range.parse::<PortRange>() {
                Ok(range) => node_port_range = Some(range),
                Err(e) => problem("spec.nodePorts.range".into(), e),
            }
            for (i, r) in np.reserved.iter().enumerate() {
                match r.parse::<PortRange>() {
                    Ok(range) => reserved.push(range),
                    Err(e) => problem(format!("spec.nodePorts.reserved[{i}]"), e),
                }
            }
            let mut seen = BTreeMap::new();
            let mut seen_ports = BTreeMap::new();
            for (i, p) in np.pinned.iter().enumerate() {
                let field = format!("spec.nodePorts.pinned[{i}]");
                if p.namespace.is_empty() || p.service.is_empty() {
                    problem(field.clone(), "namespace and service are required".into());
                }
                // Which of two pins for one Service port would win is not the order they are
                // listed in: the policy is refused until one is removed, as the CRD refuses it.
                if let Some(first) = seen_ports.insert((&p.namespace, &p.service, &p.port_name), i) {
                    let port = match p.port_name.as_str() {
                        "" => "the unnamed port".to_string(),
                        name => format!("port {name:?}"),
                    };
                    problem(
                        field.clone(),
                        format!(
                            "{port} of Service/{}/{} is already pinned by spec.nodePorts.pinned[{first}]",
                            p.namespace, p.service
                        ),
                    );
                }
                match u16::try_from(p.node_port) {
                    Ok(port) if port > 0 => {
                        if let Some(range) = node_port_range
                            && !range.contains(port)
                        {
                            problem(
                                format!("{field}.nodePort"),
                                format!("{port} is outside the policy's range {range}"),
                            );
                        }
                        if let Some(first) = seen.insert(port, i) {
                            problem(
                                format!("{field}.nodePort"),
                                format!("{port} is already pinned by spec.nodePorts.pinned[{first}]"),
                            );
                        }
                    }
                    _ => problem(
                        format!("{field}.nodePort"),
                        format!("{} is not a port: must be 1-65535", p.node_port),
                    ),
                }
                pinned.push(p.clone());
            }
            if np.retention_seconds < 0 {
                problem(
                    "spec.nodePorts.retentionSeconds".into(),
                    format!("{} is negative", np.retention_seconds),
                );
            }
            retention_seconds = np.retention_seconds.max(0);
            enforce = np.enforce;
        }

        let mut host_ports_allowed = None;
        let mut allow_host_ports_in_node_port_range = false;
        if let Some(hp) = &self.host_ports {
            if let Some(allowed) = &hp.allowed {
                let mut ranges = Vec::new();
                for (i, r) in allowed.iter().enumerate() {
                    match r.parse::<PortRange>() {
                        Ok(range) => ranges.push(range),
                        Err(e) => problem(format!("spec.hostPorts.allowed[{i}]"), e),
                    }
                }
                host_ports_allowed = Some(ranges);
            }
            allow_host_ports_in_node_port_range = hp.allow_in_node_port_range;
        }

        let agent = self.agent.clone().unwrap_or_default();
        let scheduler = if agent.scheduler.is_empty() {
            DEFAULT_SCHEDULER.to_string()
        } else {
            agent.scheduler.clone()
        };
        const SCHEDULERS: [&str; 11] = [
            "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh",
        ];
        if !SCHEDULERS.contains(&scheduler.as_str()) {
            problem(
                "spec.agent.scheduler".into(),
                format!(
                    "{scheduler:?} is not an IPVS scheduler: must be one of {}",
                    SCHEDULERS.join(", ")
                ),
            );
        }
        // The agent gets these as `--cluster-cidr`; one it cannot parse would stop it on every
        // node, so the policy is refused instead.
        for (i, cidr) in agent.masquerade.iter().flat_map(|m| &m.cluster_cidrs).enumerate() {
            if let Err(message) = check_cidr(cidr) {
                problem(format!("spec.agent.masquerade.clusterCidrs[{i}]"), message);
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(CompiledPolicy {
            name: name.to_string(),
            namespace_selector,
            service_selector,
            node_port_range,
            reserved,
            pinned,
            retention_seconds,
            enforce,
            host_ports_allowed,
            allow_host_ports_in_node_port_range,
            external_traffic: self
                .traffic
                .as_ref()
                .map(|t| t.external_traffic_policy)
                .unwrap_or_default(),
            agent_proxies: agent.proxy,
            scheduler,
        })
    }
}

impl CompiledPolicy {
    /// Whether this policy governs a Service, given the labels of the Service and its Namespace.
    pub fn selects_service(
        &self,
        namespace_labels: Option<&BTreeMap<String, String>>,
        service_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        self.namespace_selector.matches(namespace_labels) && self.service_selector.matches(service_labels)
    }

    /// Whether this policy's hostPort rules apply to Pods in a namespace.
    pub fn selects_namespace(&self, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
        self.namespace_selector.matches(namespace_labels)
    }

    pub(crate) fn host_port_allowed(&self, port: u16) -> bool {
        self.host_ports_allowed
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|r| r.contains(port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: serde_json::Value) -> PortPolicy {
        serde_json::from_value(json!({
            "apiVersion": "portpolicy.io/v1alpha1",
            "kind": "PortPolicy",
            "metadata": {"name": "edge"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn crds_folder_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/portpolicy.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == PortPolicy::crd_yaml(),
            "crds/portpolicy.yaml is stale: regenerate it with `cargo run -- crd > crds/portpolicy.yaml`"
        );
    }

    #[test]
    fn crd_has_the_names_and_columns_kubectl_uses() {
        let crd = PortPolicy::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.plural, "portpolicies");
        assert_eq!(crd.spec.names.short_names, Some(vec!["pp".to_string()]));
        let version = &crd.spec.versions[0];
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Range", "Used", "Conflicts", "Agents", "Ready", "Age"]);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let schema = serde_json::to_string(&version.schema).unwrap();
        assert!(schema.contains("x-kubernetes-validations"));
        assert!(schema.contains(r#""x-kubernetes-list-map-keys":["type"]"#));
    }

    #[test]
    fn cel_rules_accept_good_and_reject_bad_ranges() {
        let cases = [
            ("31000-31099", true),
            ("31000", true),
            ("1-65535", true),
            ("0-10", false),
            ("31099-31000", false),
            ("31000-70000", false),
            ("abc", false),
            ("31000-", false),
        ];
        for (range, ok) in cases {
            let p = policy(json!({"nodePorts": {"range": range}}));
            assert_eq!(
                p.validate_cel().is_ok(),
                ok,
                "CEL on range {range:?}: {:?}",
                p.validate_cel()
            );
            assert_eq!(p.compile().is_ok(), ok, "Rust validation of range {range:?}");
        }
    }

    #[test]
    fn cel_rules_reject_duplicate_pins_and_bad_scheduler() {
        let dup = policy(json!({"nodePorts": {"range": "31000-31099", "pinned": [
            {"namespace": "a", "service": "x", "nodePort": 31001},
            {"namespace": "a", "service": "y", "nodePort": 31001},
        ]}}));
        assert!(dup.validate_cel().is_err());
        let problems = dup.compile().unwrap_err();
        assert_eq!(problems[0].field, "spec.nodePorts.pinned[1].nodePort");

        let outside = policy(json!({"nodePorts": {"range": "31000-31099", "pinned": [
            {"namespace": "a", "service": "x", "nodePort": 31100},
        ]}}));
        assert!(outside.validate_cel().is_err());
        assert_eq!(
            outside.compile().unwrap_err()[0].field,
            "spec.nodePorts.pinned[0].nodePort"
        );

        // One Service port pinned twice: refused by CEL and by compile, whichever pin is first.
        for (first, second) in [(31001, 31002), (31002, 31001)] {
            let twice = policy(json!({"nodePorts": {"range": "31000-31099", "pinned": [
                {"namespace": "a", "service": "x", "portName": "http", "nodePort": first},
                {"namespace": "a", "service": "x", "portName": "https", "nodePort": 31003},
                {"namespace": "a", "service": "x", "portName": "http", "nodePort": second},
            ]}}));
            assert!(twice.validate_cel().is_err());
            let problems = twice.compile().unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "spec.nodePorts.pinned[2]");
            assert!(
                problems[0]
                    .message
                    .contains("already pinned by spec.nodePorts.pinned[0]")
            );
        }
        let unnamed_twice = policy(json!({"nodePorts": {"range": "31000-31099", "pinned": [
            {"namespace": "a", "service": "x", "nodePort": 31001},
            {"namespace": "a", "service": "x", "portName": "", "nodePort": 31002},
        ]}}));
        assert!(unnamed_twice.validate_cel().is_err());
        assert!(unnamed_twice.compile().is_err());
        let distinct = policy(json!({"nodePorts": {"range": "31000-31099", "pinned": [
            {"namespace": "a", "service": "x", "portName": "http", "nodePort": 31001},
            {"namespace": "a", "service": "y", "portName": "http", "nodePort": 31002},
            {"namespace": "b", "service": "x", "portName": "http", "nodePort": 31003},
            {"namespace": "a", "service": "x", "nodePort": 31004},
        ]}}));
        assert!(distinct.validate_cel().is_ok(), "{:?}", distinct.validate_cel());
        assert!(distinct.compile().is_ok());

        let sched = policy(json!({"agent": {"scheduler": "fastest"}}));
        assert!(sched.validate_cel().is_err());
        assert_eq!(sched.compile().unwrap_err()[0].field, "spec.agent.scheduler");
    }

    #[test]
    fn compile_names_object_and_field() {
        let p = policy(json!({
            "nodePorts": {"range": "31000-31099", "reserved": ["31010", "x"],
                "pinned": [{"namespace": "a", "service": "x", "nodePort": 32000}]},
            "hostPorts": {"allowed": ["9100-9200", "70000"]},
        }));
        let problems = p.compile().unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.nodePorts.reserved[1]",
                "spec.nodePorts.pinned[0].nodePort",
                "spec.hostPorts.allowed[1]"
            ]
        );
        assert!(problems.iter().all(|p| p.object == "PortPolicy/edge"));
    }

    #[test]
    fn cluster_cidrs_must_be_cidrs() {
        let p = policy(
            json!({"agent": {"masquerade": {"clusterCidrs": ["10.244.0.0/16", "fd00::/64",
            "10.0.0.0", "10.0.0.0/33", "pods/8"]}}}),
        );
        let problems = p.compile().unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.agent.masquerade.clusterCidrs[2]",
                "spec.agent.masquerade.clusterCidrs[3]",
                "spec.agent.masquerade.clusterCidrs[4]"
            ]
        );
    }

    #[test]
    fn compile_applies_defaults() {
        let c = policy(json!({"nodePorts": {"range": "31000-31099"}}))
            .compile()
            .unwrap();
        assert_eq!(
            c.node_port_range,
            Some(PortRange {
                low: 31000,
                high: 31099
            })
        );
        assert_eq!(c.retention_seconds, DEFAULT_RETENTION_SECONDS);
        assert_eq!(c.scheduler, "rr");
        assert_eq!(c.external_traffic, ExternalTrafficRule::Any);
        assert!(c.host_port_allowed(1));
    }
}
