//! The rule tracker, the incremental planner: Services, EndpointSlices, the Node and the
//! PortPolicies in, the desired IPVS table and the keys that changed out.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::crd::DEFAULT_SCHEDULER;
use crate::governance::{Governance, NamespaceLabels, PolicySet};
use crate::problem::{Problem, object_ref};
use crate::service::{ServiceFields, ServiceModel, parse_ip};
use crate::snapshot::Snapshot;
use crate::well_known::ZONE_LABEL;

use super::claims::Claims;
use super::model::{ServiceId, ServiceInfo, SliceModel};
use super::node_state::{NodeState, Reach};
use super::rules::{HealthCheckRule, NodeRules, ProxyConfig, VirtualServerKind, VirtualServerRule};
use super::service_rules::{NodeContext, ServiceRules, kind_field, rules_for_service};
use super::table::{IpvsTable, VirtualServerKey};

/// Plans one node from a snapshot, with the same code the agent runs incrementally.
pub fn node_rules(snapshot: &Snapshot, config: &ProxyConfig) -> NodeRules {
    let mut tracker = RuleTracker::new(config.clone());
    tracker.load_snapshot(snapshot);
    tracker.node_rules()
}

/// A proxied Service and its current rules.
#[derive(Clone, Debug)]
struct ProxiedService {
    model: ServiceInfo,
    rules: ServiceRules,
}

/// The incremental planner the agent runs: feed it watch events, read the desired table and the
/// keys that changed.
///
/// [`RuleTracker::load_snapshot`] builds every index in bulk from sorted runs; the watch-event methods
/// re-plan one Service at a time. Both decide each Service with `rules_for_service` and each virtual
/// server by the same rule (the first claimant by namespace/name wins), and a property test holds
/// them equal.
#[derive(Clone, Debug)]
pub struct RuleTracker {
    config: ProxyConfig,
    /// This node's InternalIP and ExternalIP addresses, sorted, without duplicates.
    node_addresses: Vec<IpAddr>,
    /// Those of them that get node-port virtual servers (`config.node_port_addresses`), sorted.
    node_port_addresses: Vec<IpAddr>,
    /// This node's zone label; `None` when missing or empty (zone hints are then never used).
    zone: Option<String>,
    node_problems: Vec<Problem>,
    policies: PolicySet,
    namespace_labels: NamespaceLabels,
    /// Proxied Services only, each with its rules.
    services: BTreeMap<ServiceId, ProxiedService>,
    /// EndpointSlices by the Service they belong to (whether or not it exists or is proxied),
    /// each Service's in slice-name order: the order kube-proxy's cache de-duplicates in.
    slices: BTreeMap<ServiceId, Vec<SliceModel>>,
    /// The Service each slice belongs to, by namespace and slice name, to find the slice again
    /// when it changes or goes.
    slice_owners: HashMap<String, HashMap<Arc<str>, ServiceId>>,
    claims: Claims,
    /// Every scheduler name in use, shared by the plans that use it.
    schedulers: Vec<Arc<str>>,
    desired: IpvsTable,
    /// The rest of what the node needs, kept in step with `desired`.
    node: NodeState,
    dirty: BTreeSet<VirtualServerKey>,
}

/// What changed since the agent last asked: the planner's output as a delta.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDelta {
    /// Virtual servers whose desired entry or reach changed (added, changed or removed). Their
    /// addresses are the only ones whose binding may have changed.
    pub keys: BTreeSet<VirtualServerKey>,
    /// The reserved node ports changed: read [`RuleTracker::reserved_node_ports`].
    pub reserved_node_ports: bool,
    /// The health checks changed: read [`RuleTracker::health_checks`].
    pub health_checks: bool,
}

impl RuleTracker {
    pub fn new(config: ProxyConfig) -> Self {
        let node_problems = vec![missing_node_problem(&config.node_name)];
        RuleTracker {
            config,
            node_addresses: Vec::new(),
            node_port_addresses: Vec::new(),
            zone: None,
            node_problems,
            policies: PolicySet::default(),
            namespace_labels: NamespaceLabels::default(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slice_owners: HashMap::new(),
            claims: Claims::default(),
            schedulers: vec![Arc::from(DEFAULT_SCHEDULER)],
            desired: IpvsTable::new(),
            node: NodeState::default(),
            dirty: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Replaces everything the planner knows with a snapshot's objects. Keys whose desired state
    /// differs from before are marked dirty.
    pub fn load_snapshot(&mut self, snapshot: &Snapshot) {
        self.set_policy_set(
            PolicySet::compile(&snapshot.policies),
            snapshot.namespace_labels(),
        );
        let node_addresses_before = self.node_addresses.clone();
        match snapshot
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.config.node_name))
        {
            Some(node) => self.read_node(node),
            None => {
                self.node_addresses.clear();
                self.node_port_addresses.clear();
                self.zone = None;
                self.node_problems = vec![missing_node_problem(&self.config.node_name)];
            }
        }
        self.load_slices(&snapshot.endpoint_slices);

        let parsed: Vec<ServiceInfo> = snapshot
            .services
            .iter()
            .filter_map(|service| ServiceInfo::new(ServiceModel::read(service), self.config.mode))
            .collect();
        // Sort positions, not the models: a model is large, and moves once, into the index.
        let order = sorted_latest(&parsed, |service| service.id.pair());

        // Services and slices are both in ServiceId order: walk them together.
        let mut parsed: Vec<Option<ServiceInfo>> = parsed.into_iter().map(Some).collect();
        let mut slices = self.slices.iter().peekable();
        let services: Vec<(ServiceId, ProxiedService)> = order
            .iter()
            .filter_map(|&i| parsed[i].take())
            .map(|model| {
                while slices.next_if(|(owner, _)| **owner < model.id).is_some() {}
                let own = slices
                    .next_if(|(owner, _)| **owner == model.id)
                    .map_or(&[][..], |(_, slices)| slices.as_slice());
                let rules = self.rules_for(&model, own);
                (model.id.clone(), ProxiedService { model, rules })
            })
            .collect();

        // Every (key, claimant) in key order, claimants in ServiceId order: the first wins.
        let mut claimed: Vec<(VirtualServerKey, usize, usize)> = services
            .iter()
            .enumerate()
            .flat_map(|(s, (_, service))| {
                service
                    .rules
                    .virtual_servers
                    .iter()
                    .enumerate()
                    .map(move |(v, vs)| (vs.key, s, v))
            })
            .collect();
        claimed.sort_unstable();
        let mut winners = Vec::new();
        let mut contested = Vec::new();
        let mut desired = Vec::new();
        for group in claimed.chunk_by(|a, b| a.0 == b.0) {
            let (key, winner, vs) = group[0];
            winners.push((key, services[winner].0.clone()));
            if group.len() > 1 {
                contested.push((
                    key,
                    group.iter().map(|&(_, s, _)| services[s].0.clone()).collect(),
                ));
            }
            desired.push((
                key,
                services[winner].1.rules.virtual_servers[vs].to_ipvs_service(),
            ));
        }
        let reaches: Vec<(VirtualServerKey, Reach)> = claimed
            .chunk_by(|a, b| a.0 == b.0)
            .map(|group| {
                let (key, winner, vs) = group[0];
                (key, Reach::of(&services[winner].1.rules.virtual_servers[vs]))
            })
            .collect();
        let previous = std::mem::replace(&mut self.desired, desired.into_iter().collect());
        self.claims = Claims {
            winners: winners.into_iter().collect(),
            contested: contested.into_iter().collect(),
        };
        self.services = services.into_iter().collect();
        let reach_changed = self.node.rebuild(
            reaches
                .into_iter()
                .map(|(key, reach)| (key, reach, &self.desired[&key])),
            self.services.iter().map(|(id, service)| (id, &service.rules)),
        );

        // Keep what was still unread, and add what differs from before.
        let mut changed = changed_keys(&previous, &self.desired);
        changed.extend(reach_changed);
        if self.dirty.is_empty() {
            self.dirty = changed.into_iter().collect();
        } else {
            self.dirty.extend(changed);
        }
        if node_addresses_before != self.node_addresses {
            self.dirty_source_restricted();
        }
    }

    /// Whether the node itself may reach a load balancer with source ranges depends on the
    /// node's addresses (see the agent's nftables sets): when they change, those keys are dirty
    /// even though their IPVS entries are not.
    fn dirty_source_restricted(&mut self) {
        let restricted: Vec<VirtualServerKey> = self
            .winning_rules()
            .filter(|rule| rule.source_ranges.is_some())
            .map(|rule| rule.key)
            .collect();
        self.dirty.extend(restricted);
    }

    /// Replaces every slice with a snapshot's, in bulk: grouped by Service in ServiceId order,
    /// so that planning the Services in that order reads their slices in memory order.
    fn load_slices(&mut self, slices: &[EndpointSlice]) {
        let parsed: Vec<SliceModel> = slices
            .iter()
            .filter_map(|slice| SliceModel::parse(slice, &self.config.node_name))
            .collect();
        // Of two copies of one slice the later wins, as applying them in order would. Copies are
        // found by namespace and name, since a copy may name another Service.
        let mut latest: HashMap<(&str, &str), usize> = HashMap::with_capacity(parsed.len());
        for (i, slice) in parsed.iter().enumerate() {
            latest.insert((slice.service.namespace(), &slice.name), i);
        }
        // By Service, then slice name; the sort keys laid out flat, for the cache.
        let mut order: Vec<(&str, &str, &str, usize)> = latest
            .into_values()
            .map(|i| {
                let (namespace, service) = parsed[i].service.pair();
                (namespace, service, &*parsed[i].name, i)
            })
            .collect();
        order.sort_unstable();
        let order: Vec<usize> = order.into_iter().map(|(.., i)| i).collect();

        self.slice_owners.clear();
        let mut parsed: Vec<Option<SliceModel>> = parsed.into_iter().map(Some).collect();
        let mut by_service: Vec<(ServiceId, Vec<SliceModel>)> = Vec::new();
        for slice in order.iter().filter_map(|&i| parsed[i].take()) {
            self.own_slice(&slice);
            match by_service.last_mut() {
                Some((owner, group)) if *owner == slice.service => group.push(slice),
                _ => by_service.push((slice.service.clone(), vec![slice])),
            }
        }
        self.slices = by_service.into_iter().collect();
    }

    /// Takes this node's addresses and zone; a Node of another name is ignored. Re-plans the
    /// Services with node ports when the node-port addresses changed, and the Services whose
    /// endpoints carry zone hints when the zone changed.
    pub fn set_node(&mut self, node: &Node) {
        if node.metadata.name.as_deref() != Some(&self.config.node_name) {
            return;
        }
        let addresses_before = std::mem::take(&mut self.node_port_addresses);
        let node_addresses_before = std::mem::take(&mut self.node_addresses);
        let zone_before = self.zone.take();
        self.read_node(node);
        if node_addresses_before != self.node_addresses {
            self.dirty_source_restricted();
        }
        let addresses_changed = addresses_before != self.node_port_addresses;
        let zone_changed = zone_before != self.zone;
        if !(addresses_changed || zone_changed) {
            return;
        }
        let affected: Vec<ServiceId> = self
            .services
            .iter()
            .filter(|(id, s)| {
                (addresses_changed && s.model.ports.iter().any(|p| p.node_port.is_some()))
                    || (zone_changed && self.slices_of(id).iter().any(SliceModel::has_zone_hints))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &affected {
            self.recompute(id);
        }
    }

    fn read_node(&mut self, node: &Node) {
        let object = object_ref("Node", None, &self.config.node_name);
        self.node_problems.clear();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        // InternalIPs first, then ExternalIPs, each in the Node's order: the order kube-proxy
        // picks the primary address in.
        let mut ordered: Vec<IpAddr> = Vec::new();
        for wanted in ["InternalIP", "ExternalIP"] {
            for (i, address) in listed.into_iter().flatten().enumerate() {
                if address.type_ != wanted {
                    continue;
                }
                match parse_ip(&address.address) {
                    Some(ip) => ordered.push(ip),
                    None => self.node_problems.push(Problem::new(
                        &object,
                        format!("status.addresses[{i}].address"),
                        format!("{:?} is not an IP address; no node ports on it", address.address),
                    )),
                }
            }
        }
        if ordered.is_empty() {
            self.node_problems.push(Problem::new(
                &object,
                "status.addresses",
                "no InternalIP or ExternalIP address: node ports are not served on this node",
            ));
        }
        let selected = self.config.node_port_addresses.select(&ordered);
        if selected.is_empty() && !ordered.is_empty() {
            self.node_problems.push(Problem::new(
                &object,
                "status.addresses",
                "no address matches --nodeport-addresses: node ports are not served on this node",
            ));
        }
        self.node_port_addresses = selected.into_iter().collect();
        ordered.sort_unstable();
        ordered.dedup();
        self.node_addresses = ordered;
        self.zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(ZONE_LABEL))
            .filter(|zone| !zone.is_empty())
            .cloned();
    }

    /// Policies decide each Service's scheduler; every Service is re-planned.
    pub fn set_policies(&mut self, policies: PolicySet, namespace_labels: NamespaceLabels) {
        self.set_policy_set(policies, namespace_labels);
        let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
        for id in &ids {
            self.recompute(id);
        }
    }

    fn set_policy_set(&mut self, policies: PolicySet, namespace_labels: NamespaceLabels) {
        let mut schedulers: Vec<Arc<str>> = vec![Arc::from(DEFAULT_SCHEDULER)];
        for policy in policies.policies() {
            if !schedulers.iter().any(|s| **s == *policy.scheduler) {
                schedulers.push(Arc::from(policy.scheduler.as_str()));
            }
        }
        self.schedulers = schedulers;
        self.policies = policies;
        self.namespace_labels = namespace_labels;
    }

    pub fn upsert_service<'a>(&mut self, service: impl Into<ServiceFields<'a>>) {
        let model = ServiceModel::read(service);
        let id = ServiceId::new(model.namespace, model.name);
        // Not (or no longer) ours: forget it, as if deleted.
        self.set_service(&id, ServiceInfo::new(model, self.config.mode));
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        self.set_service(&ServiceId::new(namespace, name), None);
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = slice.metadata.name.as_deref().unwrap_or_default();
        let before = self.unindex_slice(namespace, name);
        let after = SliceModel::parse(slice, &self.config.node_name).map(|model| self.index_slice(model));
        for id in before
            .iter()
            .chain(after.iter().filter(|a| before.as_ref() != Some(*a)))
        {
            self.recompute(id);
        }
    }

    /// Plans the Services these slices belong to again, as node `node_name` in `zone` would
    /// plan them; everything else stays as it is, node-port addresses included. `plan` derives
    /// every node's table from one shared plan this way: only the Services whose endpoints or
    /// hints name a node (or its zone) can plan differently there, and only those are planned
    /// again, there and back. Returns every key those Services plan: a rule can change where
    /// the IPVS entry does not (a topology mark), so the dirty keys would not say it.
    pub fn replan_as(
        &mut self,
        node_name: &str,
        zone: Option<&str>,
        slices: &[&EndpointSlice],
    ) -> BTreeSet<VirtualServerKey> {
        self.config.node_name = node_name.to_string();
        self.zone = zone.filter(|zone| !zone.is_empty()).map(str::to_string);
        let mut keys = BTreeSet::new();
        for slice in slices {
            // Parsed again: which endpoints are local and which hints name the node depend on it.
            self.upsert_slice(slice);
            let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            let owner = self
                .slice_owners
                .get(namespace)
                .and_then(|owners| owners.get(name));
            if let Some(service) = owner.and_then(|id| self.services.get(id)) {
                keys.extend(service.rules.keys());
            }
        }
        keys
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        if let Some(id) = self.unindex_slice(namespace, name) {
            self.recompute(&id);
        }
    }

    /// The whole desired table, kept up to date by every change.
    pub fn desired(&self) -> &IpvsTable {
        &self.desired
    }

    /// Virtual servers whose desired state changed since the last call (added, changed or
    /// removed). Feed them to [`super::diff::diff_keys`].
    pub fn take_dirty(&mut self) -> BTreeSet<VirtualServerKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Everything that changed since the last call, for the agent: what it reads costs in
    /// proportion to the change, never to the cluster.
    pub fn take_delta(&mut self) -> NodeDelta {
        let (reserved_node_ports, health_checks) = self.node.take_changes();
        NodeDelta {
            keys: self.take_dirty(),
            reserved_node_ports,
            health_checks,
        }
    }

    /// The rule of the Service that wins a desired virtual server.
    pub fn winning_rule(&self, key: &VirtualServerKey) -> Option<&VirtualServerRule> {
        let winner = self.claims.winner(key)?;
        self.services.get(winner)?.rules.get(key)
    }

    /// Every desired virtual server's winning rule, in key order.
    pub fn winning_rules(&self) -> impl Iterator<Item = &VirtualServerRule> {
        self.desired.keys().filter_map(|key| self.winning_rule(key))
    }

    /// Whether the dummy interface must hold this address (a desired virtual server that is
    /// not a node port is on it).
    pub fn is_vip(&self, address: &IpAddr) -> bool {
        self.node.is_vip(address)
    }

    /// Every address the dummy interface must hold, in order.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node.vips()
    }

    /// This node's InternalIP and ExternalIP addresses, sorted.
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node_addresses
    }

    pub fn reserved_node_ports(&self) -> BTreeSet<u16> {
        self.node.reserved_node_ports()
    }

    /// The health checks this node serves, sorted by namespace and name.
    pub fn health_checks(&self) -> impl Iterator<Item = &HealthCheckRule> {
        self.node.health_checks()
    }

    /// Real servers in the desired table.
    pub fn real_server_count(&self) -> usize {
        self.node.real_server_count()
    }

    /// Everything this node must program, assembled from the per-Service results.
    pub fn node_rules(&self) -> NodeRules {
        let mut node = NodeRules {
            node: self.config.node_name.clone(),
            node_addresses: self.node_addresses.iter().copied().collect(),
            node_port_addresses: self.node_port_addresses.iter().copied().collect(),
            problems: self.node_problems.clone(),
            ..Default::default()
        };
        if self.zone.is_none() {
            node.problems
                .extend(self.missing_zone_problem(&self.config.node_name));
        }
        for slice in self.slices.values().flatten() {
            node.problems.extend(slice.problems.iter().cloned());
        }
        // Collected, then sorted once: inserting into the sets one by one costs a search each.
        let mut vips = Vec::new();
        let mut reserved_node_ports = Vec::new();
        for (id, ProxiedService { rules: result, .. }) in &self.services {
            node.problems.extend(result.problems.iter().cloned());
            reserved_node_ports.extend_from_slice(&result.node_ports);
            node.health_checks.extend(result.health_check.clone());
            for vs in &result.virtual_servers {
                let winner = self
                    .claims
                    .contested_winner(&vs.key)
                    .filter(|winner| *winner != id);
                if let Some(winner) = winner {
                    node.problems.push(Problem::new(
                        id.object(),
                        kind_field(vs.kind, &vs.port_name),
                        format!(
                            "virtual server {} is also planned by {}, which wins (first by namespace/name); \
                             not programmed for this Service",
                            vs.key,
                            winner.object()
                        ),
                    ));
                    continue;
                }
                if vs.kind != VirtualServerKind::NodePort {
                    vips.push(vs.key.address);
                }
                node.virtual_servers.push(vs.clone());
            }
        }
        vips.sort_unstable();
        node.vips = vips.into_iter().collect();
        reserved_node_ports.sort_unstable();
        node.reserved_node_ports = reserved_node_ports.into_iter().collect();
        node.problems.sort();
        node.problems.dedup();
        node
    }

    /// On a node without a zone label, zone hints are never used: say so when a Service asks
    /// for topology-aware routing (one problem for the node, naming a few of them).
    pub fn missing_zone_problem(&self, node_name: &str) -> Option<Problem> {
        const NAMED: usize = 3;
        let asking: Vec<String> = self
            .services
            .values()
            .filter_map(|s| {
                let request = s.model.topology?;
                Some(format!("{} ({})", s.model.id.qualified(), request.describe()))
            })
            .take(NAMED + 1)
            .collect();
        if asking.is_empty() {
            return None;
        }
        let mut named = asking[..asking.len().min(NAMED)].join(", ");
        if asking.len() > NAMED {
            named.push_str(", ...");
        }
        Some(Problem::new(
            object_ref("Node", None, node_name),
            format!("metadata.labels[{ZONE_LABEL}]"),
            format!(
                "missing: zone hints are never used on this node, so Services asking for \
                 topology-aware routing fall back to endpoints in every zone here: {named}"
            ),
        ))
    }

    /// Adds a parsed slice to the index, in its Service's name order; returns its Service.
    fn index_slice(&mut self, model: SliceModel) -> ServiceId {
        let id = model.service.clone();
        self.own_slice(&model);
        let slices = self.slices.entry(id.clone()).or_default();
        match slices.binary_search_by(|s| s.name.cmp(&model.name)) {
            Ok(at) => slices[at] = model,
            Err(at) => slices.insert(at, model),
        }
        id
    }

    fn own_slice(&mut self, slice: &SliceModel) {
        let namespace = slice.service.namespace();
        let owners = match self.slice_owners.get_mut(namespace) {
            Some(owners) => owners,
            None => self.slice_owners.entry(namespace.to_string()).or_default(),
        };
        owners.insert(slice.name.clone(), slice.service.clone());
    }

    /// Removes a slice from the index; returns the Service it belonged to.
    fn unindex_slice(&mut self, namespace: &str, name: &str) -> Option<ServiceId> {
        let owners = self.slice_owners.get_mut(namespace)?;
        let id = owners.remove(name)?;
        if owners.is_empty() {
            self.slice_owners.remove(namespace);
        }
        if let Some(slices) = self.slices.get_mut(&id) {
            slices.retain(|s| &*s.name != name);
            if slices.is_empty() {
                self.slices.remove(&id);
            }
        }
        Some(id)
    }

    fn slices_of(&self, id: &ServiceId) -> &[SliceModel] {
        self.slices.get(id).map_or(&[], Vec::as_slice)
    }

    /// Plans one Service with its slices (in slice-name order) and its governing policy.
    fn rules_for(&self, service: &ServiceInfo, slices: &[SliceModel]) -> ServiceRules {
        let mut problems = Vec::new();
        let scheduler = self.scheduler_for(service, &mut problems);
        let node = NodeContext {
            node_port_addresses: &self.node_port_addresses,
            zone: self.zone.as_deref(),
        };
        let mut rules = rules_for_service(service, slices, node, &scheduler);
        rules.problems.extend(problems);
        rules
    }

    fn scheduler_for(&self, service: &ServiceInfo, problems: &mut Vec<Problem>) -> Arc<str> {
        let governance = self.policies.governing_service(
            Some(&self.namespace_labels.of(service.id.namespace())),
            service.labels.as_ref(),
        );
        match governance {
            Governance::By(policy) => self.scheduler_named(&policy.scheduler),
            Governance::Ungoverned => self.scheduler_named(DEFAULT_SCHEDULER),
            Governance::Ambiguous(a, b) => {
                problems.push(Problem::new(
                    service.id.object(),
                    "metadata.labels",
                    format!(
                        "selected by PortPolicies {} and {}; using the default scheduler {DEFAULT_SCHEDULER}",
                        a.name, b.name
                    ),
                ));
                self.scheduler_named(DEFAULT_SCHEDULER)
            }
        }
    }

    fn scheduler_named(&self, name: &str) -> Arc<str> {
        let known = self.schedulers.iter().find(|s| ***s == *name);
        known.cloned().unwrap_or_else(|| Arc::from(name))
    }

    /// Plans a Service anew from its model, or forgets it (`None`).
    fn set_service(&mut self, id: &ServiceId, model: Option<ServiceInfo>) {
        let old = self.services.remove(id).map(|service| service.rules);
        if let Some(model) = model {
            let slices = self.slices_of(id);
            let rules = self.rules_for(&model, slices);
            self.services.insert(id.clone(), ProxiedService { model, rules });
        }
        self.update_claims(id, old);
    }

    /// Plans one Service again after its slices, the node or the policies changed.
    fn recompute(&mut self, id: &ServiceId) {
        let Some(service) = self.services.get(id) else {
            return;
        };
        let slices = self.slices_of(id);
        let rules = self.rules_for(&service.model, slices);
        let old = self
            .services
            .get_mut(id)
            .map(|service| std::mem::replace(&mut service.rules, rules));
        self.update_claims(id, old);
    }

    /// Updates the claims, the desired table and the dirty keys for exactly the virtual servers
    /// a Service planned before (`old`) and plans now.
    fn update_claims(&mut self, id: &ServiceId, old: Option<ServiceRules>) {
        let old_keys: Vec<VirtualServerKey> = old.iter().flat_map(ServiceRules::keys).collect();
        let new_keys: Vec<VirtualServerKey> = self
            .services
            .get(id)
            .into_iter()
            .flat_map(|service| service.rules.keys())
            .collect();
        for key in &old_keys {
            if !new_keys.contains(key) {
                self.claims.release(key, id);
            }
        }
        for key in &new_keys {
            self.claims.claim(*key, id);
        }
        for key in old_keys.iter().chain(&new_keys) {
            self.refresh_desired(key);
        }
        let new = self.services.get(id).map(|service| &service.rules);
        self.node.service_changed(id, old.as_ref(), new);
    }

    /// Sets the desired entry of one key from the Service that wins it.
    fn refresh_desired(&mut self, key: &VirtualServerKey) {
        let wanted = self
            .winning_rule(key)
            .map(|rule| (Reach::of(rule), rule.to_ipvs_service()));
        match wanted {
            Some((reach, service)) => {
                if self.desired.get(key) != Some(&service) || self.node.reach(key) != Some(&reach) {
                    let old = self.desired.insert(*key, service);
                    self.node
                        .entry_changed(key, old.as_ref(), Some((reach, &self.desired[key])));
                    self.dirty.insert(*key);
                }
            }
            None => {
                if let Some(old) = self.desired.remove(key) {
                    self.node.entry_changed(key, Some(&old), None);
                    self.dirty.insert(*key);
                }
            }
        }
    }
}

/// Positions of `items` in order of their keys, keeping only the last of equal keys (the copy
/// applied last wins). Keys are laid out flat before sorting, for the cache.
fn sorted_latest<'a, T, K: Ord>(items: &'a [T], key: impl Fn(&'a T) -> K) -> Vec<usize> {
    let mut keyed: Vec<(K, usize)> = items.iter().enumerate().map(|(i, item)| (key(item), i)).collect();
    // Equal keys sort by position, so the last of each run is the latest copy.
    keyed.sort_unstable();
    let mut order = Vec::with_capacity(keyed.len());
    let mut keyed = keyed.into_iter().peekable();
    while let Some((key, i)) = keyed.next() {
        if keyed.peek().is_none_or(|(next, _)| *next != key) {
            order.push(i);
        }
    }
    order
}

/// Keys whose entries differ between two tables (present in one only, or unequal), in order.
fn changed_keys(before: &IpvsTable, after: &IpvsTable) -> Vec<VirtualServerKey> {
    let mut changed = Vec::new();
    let mut before = before.iter().peekable();
    let mut after = after.iter().peekable();
    loop {
        let order = match (before.peek(), after.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((b, _)), Some((a, _))) => b.cmp(a),
        };
        match order {
            Ordering::Less => changed.extend(before.next().map(|(key, _)| *key)),
            Ordering::Greater => changed.extend(after.next().map(|(key, _)| *key)),
            Ordering::Equal => {
                if let (Some((key, b)), Some((_, a))) = (before.next(), after.next())
                    && b != a
                {
                    changed.push(*key);
                }
            }
        }
    }
    changed
}

fn missing_node_problem(node_name: &str) -> Problem {
    Problem::new(
        object_ref("Node", None, node_name),
        "",
        "node not known: node ports are not served until its addresses are",
    )
}
